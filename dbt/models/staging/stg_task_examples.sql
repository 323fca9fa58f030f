-- The active task's examples: normalised, with stable ids and content hashes, exact and
-- near duplicates removed. The first occurrence (by file, then row) of a duplicate wins.
-- Identity is the input alone: the same question with other retrieved passages is the same
-- example (it must not sit in both the golden set and training). Rows of the task's
-- golden_additions.jsonl (golden proposals a person accepted) always join the golden set: they
-- come first in load order, so they win over any duplicate, and their split bucket is 0.
with src as (
    select
        source_file,
        source_row,
        input_text,
        output_json,
        contexts_json,
        reference_contexts_json,
        {{ normalise_text('input_text') }} as normalised_text
    from {{ source('raw', 'task_examples') }}
    where task = '{{ var("task") }}'
),

hashed as (
    select
        *,
        sha256(normalised_text) as content_hash,
        'ex_' || substr(sha256(normalised_text), 1, 16) as example_id,
        row_number() over (
            order by (source_file = '{{ var("golden_additions_file") }}') desc, source_file, source_row
        ) as load_order
    from src
),

exact_dedup as (
    select *
    from hashed
    qualify row_number() over (partition by content_hash order by load_order) = 1
),

tokens as (
    select *, {{ word_set('normalised_text') }} as words
    from exact_dedup
),

-- A row is a near duplicate when an earlier row shares at least the threshold of its word set.
near_dups as (
    select distinct later.example_id
    from tokens as later
    join tokens as earlier
        on earlier.load_order < later.load_order
        and len(later.words) > 0
        -- Jaccard(A, B) <= min(|A|, |B|) / max(|A|, |B|): pairs whose set sizes differ too much
        -- cannot reach the threshold, and this cheap test skips most of the quadratic work.
        and least(len(earlier.words), len(later.words))
            >= {{ var("near_duplicate_jaccard") }} * greatest(len(earlier.words), len(later.words))
        and len(list_intersect(earlier.words, later.words))::double
            / len(list_distinct(list_concat(earlier.words, later.words)))
            >= {{ var("near_duplicate_jaccard") }}
)

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
        when source_file = '{{ var("golden_additions_file") }}' then 0.0
        else {{ hash_bucket('content_hash') }}
    end as split_bucket
from tokens
where example_id not in (select example_id from near_dups)
