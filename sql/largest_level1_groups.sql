-- The largest level-1 groups (README): active items per level-1 code, largest first (ties by prefix).
-- Answers: which top-level codes hold most of the catalog?
-- params: :top_n   how many groups (e.g. 20)
-- views: semantic_ids
SELECT prefix_1, count(*) AS items
FROM semantic_ids
WHERE active
GROUP BY prefix_1
ORDER BY items DESC, prefix_1
LIMIT :top_n;
