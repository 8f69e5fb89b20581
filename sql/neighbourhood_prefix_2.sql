-- Items that share the first two levels with a given item: its "neighbourhood" (README), the item included.
-- Answers: which active items are closest to this one in the code hierarchy?
-- params: :item_id   the item (same type as semantic_ids.item_id)
-- views: semantic_ids
SELECT s.item_id, s.semantic_id
FROM semantic_ids s
JOIN semantic_ids q ON s.prefix_2 = q.prefix_2
WHERE q.item_id = :item_id AND q.active AND s.active;
