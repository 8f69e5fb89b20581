-- Why rows were rejected: rejected rows and distinct item ids per reason (the rejects of the run that wrote
-- the table), most frequent first. null_item_id rows have no id, so they add no distinct item.
-- Answers: what is wrong with the catalog rows that got no ID?
-- params: none
-- views: rejects
SELECT reason, count(*) AS rejected_rows, count(DISTINCT item_id) AS items
FROM rejects
GROUP BY reason
ORDER BY rejected_rows DESC, reason;
