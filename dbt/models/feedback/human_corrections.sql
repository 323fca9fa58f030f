-- Corrected answers people wrote, from raters the agreement rules did not exclude (the rating
-- UI validates each against the task's output schema; a blocking check validates them again).
with items as (
    select * from {{ feedback_source('rating_items') }}
)

select
    'hc_' || substr(sha256(r.rating_id), 1, 16) as correction_id,
    r.item_id,
    i.example_id,
    i.request_id,
    i.input_text,
    r.correction_json as output_json,
    r.rater,
    r.ts as rated_at,
    i.source
from {{ counted_ratings() }} as r
join items as i on i.item_id = r.item_id
where r.correction_json is not null
