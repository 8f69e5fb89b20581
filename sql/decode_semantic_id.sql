-- Which item an ID names, whatever generation issued it (README): IDs are never reused, so at most one row.
-- Answers: a model emitted this ID -- which item is it, and is the ID still current?
-- params: :semantic_id   e.g. '35_7_120_0'
-- views: semantic_ids
SELECT item_id, active, retired_reason, generation
FROM semantic_ids
WHERE semantic_id = :semantic_id;
