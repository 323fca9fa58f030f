-- Few-shot pool: per value of the task's label field, the first few short training
-- examples (stable order by content hash).
with train as (
    select
        *,
        json_extract_string(output_json, '$.{{ var("few_shot_label_field") }}') as label
    from {{ ref('sft_dataset') }}
    where split = 'train'
)

select example_id, content_hash, input_text, output_json, source_file, source_row, label
from train
qualify row_number() over (
    partition by label
    order by (length(input_text) > {{ var("few_shot_max_chars") }}), content_hash
) <= {{ var("few_shot_per_label") }}
