-- Held-out evaluation set: a stable hash bucket of the deduplicated examples. Near
-- duplicates were removed across the whole task in staging, so nothing like a golden
-- example can reach training.
select
    example_id, content_hash, input_text, output_json, source_file, source_row,
    contexts_json, reference_contexts_json
from {{ ref('stg_task_examples') }}
where split_bucket < {{ var("golden_fraction") }}
