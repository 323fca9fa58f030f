{# Lower case, every run of ASCII whitespace one space, trimmed. Must match
   genops_assets.lib.validation.normalise_text. #}
{% macro normalise_text(col) -%}
trim(regexp_replace(lower({{ col }}), '[\t\n\f\r ]+', ' ', 'g'), ' ')
{%- endmacro %}

{# Distinct word tokens used for near-duplicate detection (Jaccard of word sets).
   Must match genops_assets.lib.validation.word_set. #}
{% macro word_set(col) -%}
list_distinct(regexp_extract_all({{ col }}, '[0-9a-z]+'))
{%- endmacro %}

{# A stable number in [0, 1) from a hex digest: the split of an example never changes
   when other examples are added or removed. #}
{% macro hash_bucket(hex_col) -%}
(('0x' || substr({{ hex_col }}, 1, 8))::ubigint / 4294967296.0)
{%- endmacro %}
