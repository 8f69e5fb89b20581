-- Collision groups: every code tuple that needed a uniquifying suffix (one of its rows has suffix > 0),
-- over the whole ledger (a suffix is never reissued, so retired rows count), any number of levels.
-- Answers: how crowded is each colliding tuple, now and over all generations?
-- params: none
-- views: semantic_ids
SELECT codes,
       count(*) AS ids_issued,
       sum(CASE WHEN active THEN 1 ELSE 0 END) AS active_items,
       max(suffix) AS max_suffix
FROM semantic_ids
GROUP BY codes
HAVING max(suffix) > 0
ORDER BY ids_issued DESC, max_suffix DESC;
