-- Every model of a run goes to the schema of the task it is built for (the `task` variable):
-- marts_<task>, the name genops' resources/warehouse.py `mart_schema` gives. Tasks share one
-- dbt project and one DuckDB file but never each other's tables.
{% macro generate_schema_name(custom_schema_name, node) -%}
    marts_{{ var('task') | trim }}
{%- endmacro %}
