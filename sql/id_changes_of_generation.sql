-- The ID changes a generation made (docs/scheduling.md): old -> new ID for every item whose ID it replaced.
-- Answers: how do I remap a downstream model's vocabulary / training data to generation :generation?
-- params: :generation   e.g. 2
-- views: id_changes
SELECT item_id, old_semantic_id, new_semantic_id, retired_reason
FROM id_changes
WHERE generation = :generation
ORDER BY item_id;
