-- requests_outcome_started served no query: /api/history filters outcome
-- together with an optional model and walks the table by id, and /api/stats
-- goes through requests_model_started. It cost a third B-tree insert for
-- every request row.
DROP INDEX IF EXISTS requests_outcome_started;
