-- Corrected answers people wrote, from raters the agreement rules did not exclude (the rating
-- UI validates each against the task's output schema; a blocking check validates them again).
{{ human_corrections_select() }}
