-- Supervised fine-tuning set: everything outside the golden bucket, split into train and
-- validation by the next hash bucket, plus people's corrections (as in human_corrections) of inputs
-- not in the golden set. A correction of an input already here replaces that row's output
-- (its split kept); a new input joins `train`. `origin` says which: task_data or
-- human_correction. A task with retrieved contexts takes new inputs only with their passages,
-- which corrections do not carry, so there corrections only replace outputs.
with task_rows as (
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
),

all_corrections as (
    {{ human_corrections_select() }}
),

near_golden as (
    {{ near_golden_ids('all_corrections', 'correction_id') }}
),

-- The latest correction of each input (normalised, as staging identifies examples).
corrections as (
    select
        correction_id,
        sha256({{ normalise_text('input_text') }}) as content_hash,
        input_text,
        output_json,
        rated_at
    from all_corrections
    where correction_id not in (select correction_id from near_golden)
    qualify row_number() over (
        partition by sha256({{ normalise_text('input_text') }}) order by rated_at desc, correction_id
    ) = 1
)

select
    t.example_id,
    t.content_hash,
    t.input_text,
    coalesce(c.output_json, t.output_json) as output_json,
    t.source_file,
    t.source_row,
    t.contexts_json,
    t.reference_contexts_json,
    t.split,
    case when c.correction_id is null then 'task_data' else 'human_correction' end as origin
from task_rows as t
left join corrections as c on c.content_hash = t.content_hash

{% if not var("task_has_contexts") %}
union all

select
    'ex_' || substr(c.content_hash, 1, 16) as example_id,
    c.content_hash,
    c.input_text,
    c.output_json,
    'feedback/ratings' as source_file,
    (row_number() over (order by c.rated_at, c.correction_id))::integer as source_row,
    null::varchar as contexts_json,
    null::varchar as reference_contexts_json,
    'train' as split,
    'human_correction' as origin
from corrections as c
where c.content_hash not in (select content_hash from {{ ref('stg_task_examples') }})
{% endif %}
