-- The largest groups at every prefix level: per level, the :top_n prefixes holding most active items
-- (ties by prefix), from the prefix_stats table the run wrote beside semantic_ids (any number of levels).
-- Answers: where is the catalog crowded, level by level?
-- params: :top_n   groups per level (e.g. 10)
-- views: prefix_stats
SELECT level, prefix, item_count, children, collision_groups, max_suffix, place
FROM (
    SELECT level, prefix, item_count, children, collision_groups, max_suffix,
           row_number() OVER (PARTITION BY level ORDER BY item_count DESC, prefix) AS place
    FROM prefix_stats
) ranked
WHERE place <= :top_n
ORDER BY level, place;
