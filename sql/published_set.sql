-- The set published last (docs/scheduling.md): its run and the Delta version of each of its tables
-- (tokens: JSON such as {"semantic_ids": "12", "rejects": "12", ...}); read each table at that version.
-- Answers: which versions make one consistent, fully published set?
-- params: none
-- views: runs
SELECT entry, mlflow_run_id, model_name, model_version, tokens
FROM runs
WHERE status = 'published'
ORDER BY entry DESC
LIMIT 1;
