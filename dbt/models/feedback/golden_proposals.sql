-- Live items whose correction people agree on, proposed for the golden set. Agreement as for
-- choices: the most frequent correction (exact JSON) must come from at least min_item_ratings
-- counted raters and from at least min_item_agreement of those who rated the item. A person
-- accepts a proposal with `genops golden accept --task <task> <proposal_id>`; never automatic.
with items as (
    select * from {{ feedback_source('rating_items') }}
    where source = 'live'
),

counted as (
    select * from {{ counted_ratings() }}
),

per_item as (
    select item_id, count(*) as n_ratings from counted group by item_id
),

votes as (
    select item_id, correction_json as output_json, count(*) as n_raters, max(ts) as last_rated_at
    from counted
    where correction_json is not null
    group by item_id, correction_json
    qualify row_number() over (partition by item_id order by count(*) desc, correction_json) = 1
),

proposed as (
    select i.item_id, i.request_id, i.input_text, v.output_json, v.n_raters, p.n_ratings,
           v.n_raters::double / p.n_ratings as agreement, v.last_rated_at
    from votes as v
    join per_item as p on p.item_id = v.item_id
    join items as i on i.item_id = v.item_id
    where v.n_raters >= {{ var("min_item_ratings") }}
      and v.n_raters::double / p.n_ratings >= {{ var("min_item_agreement") }}
),

near_golden as (
    {{ near_golden_ids('proposed') }}
)

select
    'gp_' || substr(sha256(item_id || ':' || output_json), 1, 16) as proposal_id,
    item_id,
    request_id,
    input_text,
    output_json,
    n_raters,
    n_ratings,
    agreement,
    last_rated_at
from proposed
where item_id not in (select item_id from near_golden)
