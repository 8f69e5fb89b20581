-- ID drift between two versions of semantic_ids (e.g. the Delta versions N and N+1 of two runs): one row per
-- item whose current ID differs. change = 'issued' (a new ID for an item not active before), 'reactivated'
-- (an item back with its old ID), 'retired' (active before, not now; retired_reason says why), 'changed'
-- (another ID now; retired_reason of the old one: new_generation or embedding_changed).
-- Answers: what did the run from version N to N+1 add, retire and move?
-- params: :from_version, :to_version   Delta versions of semantic_ids (the runs table names them)
-- views: semantic_ids_before = semantic_ids VERSION AS OF :from_version,
--        semantic_ids_after = semantic_ids VERSION AS OF :to_version
WITH before_ids AS (SELECT item_id, semantic_id FROM semantic_ids_before WHERE active),
     after_ids AS (SELECT item_id, semantic_id FROM semantic_ids_after WHERE active),
     moves AS (
         SELECT coalesce(a.item_id, b.item_id) AS item_id,
                b.semantic_id AS old_semantic_id,
                a.semantic_id AS new_semantic_id
         FROM before_ids b
         FULL OUTER JOIN after_ids a ON a.item_id = b.item_id
         WHERE b.semantic_id IS NULL OR a.semantic_id IS NULL OR a.semantic_id <> b.semantic_id
     )
SELECT CASE WHEN m.old_semantic_id IS NULL AND known.semantic_id IS NULL THEN 'issued'
            WHEN m.old_semantic_id IS NULL THEN 'reactivated'
            WHEN m.new_semantic_id IS NULL THEN 'retired'
            ELSE 'changed' END AS change,
       m.item_id,
       m.old_semantic_id,
       m.new_semantic_id,
       gone.retired_reason
FROM moves m
LEFT JOIN semantic_ids_before known ON known.semantic_id = m.new_semantic_id
LEFT JOIN semantic_ids_after gone ON gone.semantic_id = m.old_semantic_id
ORDER BY change, m.item_id;
