-- Retired IDs: every row that is no longer active, why and when, and the item's current ID (NULL when the
-- item is not in the catalog now). A retired ID is never reissued; decode it with decode_semantic_id.sql.
-- Answers: which IDs will a downstream model no longer see, and what replaced them?
-- params: none
-- views: semantic_ids
SELECT r.semantic_id,
       r.item_id,
       r.generation,
       r.retired_reason,
       r.retired_at,
       c.semantic_id AS current_semantic_id
FROM semantic_ids r
LEFT JOIN semantic_ids c ON c.item_id = r.item_id AND c.active
WHERE NOT r.active
ORDER BY r.retired_at, r.semantic_id;
