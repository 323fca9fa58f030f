-- Preference pairs people agreed on: included pairwise items (agreement rule, excluded raters
-- left out) whose majority picked one answer; gold questions never. Golden-set prompts, and
-- live inputs that are (nearly) golden-set inputs, are always held out; the rest split by a
-- stable hash bucket of the item id.
with items as (
    select * from {{ feedback_source('rating_items') }}
),

agreement as (
    select * from {{ feedback_source('item_agreement') }}
),

pairs as (
    select i.*, a.n_ratings, a.agreement, a.majority_choice
    from items as i
    join agreement as a on a.item_id = i.item_id
    where a.included
      and a.majority_choice in ('1', '2')
      and i.kind = 'pairwise'
      and i.source <> 'gold'
      and i.gold_choice is null
),

near_golden as (
    {{ near_golden_ids('pairs') }}
)

select
    'pp_' || substr(sha256(item_id || ':' || majority_choice), 1, 16) as pair_id,
    item_id,
    example_id,
    request_id,
    input_text,
    prompt_version,
    case when majority_choice = '1' then response_1 else response_2 end as chosen_json,
    case when majority_choice = '1' then response_2 else response_1 end as rejected_json,
    case when majority_choice = '1' then model_1 else model_2 end as chosen_model,
    case when majority_choice = '1' then model_2 else model_1 end as rejected_model,
    n_ratings,
    agreement,
    source,
    case
        when source = 'golden' or item_id in (select item_id from near_golden) then 'heldout'
        when {{ hash_bucket('sha256(item_id)') }} < {{ var("heldout_fraction") }} then 'heldout'
        else 'train'
    end as split
from pairs
