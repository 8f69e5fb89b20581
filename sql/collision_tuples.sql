-- Code tuples that more than one active item shares (README), largest first (ties by tuple), for L = 3
-- levels (prefix_3 is the full tuple; use prefix_<L> for another L, or collision_groups.sql).
-- Answers: which tuples needed a suffix among the current IDs, and how many?
-- params: none
-- views: semantic_ids
SELECT prefix_3, count(*) AS items, max(suffix) AS max_suffix
FROM semantic_ids
WHERE active
GROUP BY prefix_3
HAVING count(*) > 1
ORDER BY items DESC, prefix_3;
