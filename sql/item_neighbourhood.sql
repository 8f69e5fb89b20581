-- An item's neighbourhood by prefix: every active item that shares its level-1 prefix, and how many
-- leading levels it shares (2: also the level-2 prefix, the closer circle; 1: only the first level).
-- The item itself is in the result (shared_levels = 2). Needs L >= 2 levels.
-- Answers: what else is near this item, and how near?
-- params: :item_id   the item (same type as semantic_ids.item_id)
-- views: semantic_ids
SELECT s.item_id,
       s.semantic_id,
       CASE WHEN s.prefix_2 = q.prefix_2 THEN 2 ELSE 1 END AS shared_levels
FROM semantic_ids q
JOIN semantic_ids s ON s.prefix_1 = q.prefix_1
WHERE q.item_id = :item_id AND q.active AND s.active
ORDER BY shared_levels DESC, s.semantic_id;
