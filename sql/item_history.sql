-- Every ID an item has held, oldest first: the active one (if the item is valid now) and the retired ones.
-- Answers: what has this item been called, by which generation, and why did each old ID stop?
-- params: :item_id   the item (same type as semantic_ids.item_id)
-- views: semantic_ids
SELECT semantic_id, generation, model_version, active, tokenized_at, retired_at, retired_reason
FROM semantic_ids
WHERE item_id = :item_id
ORDER BY tokenized_at, semantic_id;
