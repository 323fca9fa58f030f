-- Supervised fine-tuning set: everything outside the golden bucket, split into train and
-- validation by the next hash bucket.
select
    example_id,
    content_hash,
    input_text,
    output_json,
    source_file,
    source_row,
    contexts_json,
    reference_contexts_json,
    case
        when split_bucket < {{ var("golden_fraction") }} + {{ var("validation_fraction") }} then 'validation'
        else 'train'
    end as split
from {{ ref('stg_task_examples') }}
where split_bucket >= {{ var("golden_fraction") }}
