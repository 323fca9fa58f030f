-- What people chose between two answers, for certifying and tuning judges: included pairwise
-- items with their majority choice. Items on golden-set prompts (and near them) and gold
-- questions go to `certify`; the rest half and half by a stable hash bucket, so a judge is
-- never tuned on the items that certify it.
with items as (
    select * from {{ feedback_source('rating_items') }}
),

agreement as (
    select * from {{ feedback_source('item_agreement') }}
),

judged as (
    select i.*, a.n_ratings, a.agreement, a.majority_choice
    from items as i
    join agreement as a on a.item_id = i.item_id
    where a.included and i.kind = 'pairwise'
),

near_golden as (
    {{ near_golden_ids('judged') }}
)

select
    item_id,
    example_id,
    input_text,
    reference_json,
    response_1,
    response_2,
    model_1,
    model_2,
    majority_choice as human_choice,
    n_ratings,
    agreement,
    source,
    case
        when source in ('golden', 'gold') or item_id in (select item_id from near_golden) then 'certify'
        when {{ hash_bucket('sha256(item_id)') }} < 0.5 then 'certify'
        else 'train'
    end as split
from judged
