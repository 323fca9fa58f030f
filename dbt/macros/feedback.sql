{# The feedback tables the human_ratings asset writes (schema `feedback`), or an empty relation
   of the same columns when it has not run yet: the marts build, empty, before any rating.
   The source() call always renders, so dbt (and Dagster) know the dependency. Column lists
   match genops_assets/defs/feedback/ratings.py. #}
{% macro feedback_source(table) -%}
{%- set rel = source('feedback', table) -%}
{%- set found = adapter.get_relation(database=rel.database, schema=rel.schema, identifier=rel.identifier) if execute else none -%}
{%- if found is not none -%}
(select * from {{ rel }} where task = '{{ var("task") }}')
{%- else -%}
{%- set columns = {
    'rating_items': 'task varchar, item_id varchar, kind varchar, source varchar, example_id varchar, request_id varchar, input_text varchar, prompt_version varchar, response_1 varchar, model_1 varchar, response_2 varchar, model_2 varchar, reference_json varchar, gold_choice varchar, priority double, reasons varchar, created_at varchar, retired boolean',
    'ratings': 'task varchar, rating_id varchar, item_id varchar, rater varchar, ts varchar, choice varchar, shown_first varchar, score_1 integer, score_2 integer, unsafe_1 boolean, unsafe_2 boolean, correction_json varchar, model_1 varchar, model_2 varchar, prompt_version varchar',
    'rater_quality': 'task varchar, rater varchar, ratings integer, gold_answered integer, gold_accuracy double, kappa double, excluded boolean, reason varchar',
    'item_agreement': 'task varchar, item_id varchar, n_ratings integer, majority_choice varchar, agreement double, included boolean, reason varchar',
} -%}
(select {% for col in columns[table].split(', ') -%}
    null::{{ col.split(' ')[1] }} as {{ col.split(' ')[0] }}{{ ', ' if not loop.last }}
{%- endfor %} where false)
{%- endif -%}
{%- endmacro %}

{# Ids of the rows of `relation` whose input is a golden-set input, exactly or nearly (Jaccard of
   word sets at or above near_duplicate_jaccard, as staging deduplicates): such rows are
   evaluation data and never train anything. #}
{% macro near_golden_ids(relation, id_col='item_id', text_col='input_text') -%}
select distinct c.{{ id_col }}
from (
    select {{ id_col }}, {{ normalise_text(text_col) }} as norm, {{ word_set(normalise_text(text_col)) }} as words
    from {{ relation }}
) as c
join (
    select {{ normalise_text('input_text') }} as norm, {{ word_set(normalise_text('input_text')) }} as words
    from {{ ref('golden_eval_dataset') }}
) as g
    on c.norm = g.norm
    or (len(c.words) > 0 and len(g.words) > 0
        and len(list_intersect(c.words, g.words))::double
            / len(list_distinct(list_concat(c.words, g.words))) >= {{ var("near_duplicate_jaccard") }})
{%- endmacro %}

{# The rating store's ratings of raters the agreement rules did not exclude. #}
{% macro counted_ratings() -%}
(select r.*
 from {{ feedback_source('ratings') }} as r
 where r.rater not in (select q.rater from {{ feedback_source('rater_quality') }} as q where q.excluded))
{%- endmacro %}

{# Corrected answers of counted raters (the human_corrections mart). sft_dataset takes them from
   here too, not from the mart: it then builds on its own, also where the feedback step has not
   run (no corrections). #}
{% macro human_corrections_select() -%}
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
join {{ feedback_source('rating_items') }} as i on i.item_id = r.item_id
where r.correction_json is not null
{%- endmacro %}
