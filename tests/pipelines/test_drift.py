"""pipelines.drift: per-level prefix changes, flows, and two tables compared (embedded engine)."""
from __future__ import annotations

import pytest

from pipelines.drift import Drift, Flow, compare_tables, drift_table, level_changes

pytestmark = pytest.mark.spark

PAIRS = "old_codes array<int>, new_codes array<int>"


def test_level_changes_count_items_per_level_and_rank_flows(spark) -> None:
    pairs = spark.createDataFrame([
        ([1, 2, 3], [1, 2, 4]),  # only the last level moved
        ([1, 2, 3], [1, 5, 3]),  # levels 2 and 3 (the 3-prefix includes level 2)
        ([1, 2, 3], [1, 5, 3]),
        ([7, 2, 3], [8, 2, 3]),  # every level
        ([4, 4, 4], [4, 4, 4]),  # unchanged: counts nowhere
    ], PAIRS)
    changed, flows = level_changes(pairs, 3, top_n=2)
    assert changed == (1, 3, 4)
    assert flows == (
        Flow(1, "7", "8", 1),
        Flow(2, "1_2", "1_5", 2), Flow(2, "7_2", "8_2", 1),
        Flow(3, "1_2_3", "1_5_3", 2), Flow(3, "1_2_3", "1_2_4", 1),
    )


def test_compare_tables_uses_active_rows_and_counts_added_and_retired(spark) -> None:
    schema = "item_id string, semantic_id string, codes array<int>, active boolean"
    old = spark.createDataFrame([
        ("a", "1_2_0", [1, 2], True), ("b", "1_2_1", [1, 2], True), ("c", "3_3_0", [3, 3], True),
        ("z", "9_9_0", [9, 9], False),  # retired before: not compared
    ], schema)
    new = spark.createDataFrame([
        ("a", "1_2_0", [1, 2], True), ("b", "1_3_0", [1, 3], True), ("d", "4_4_0", [4, 4], True),
    ], schema)
    drift = compare_tables(old, new, None, against="old")
    assert (drift.compared, drift.ids_changed, drift.ids_added, drift.ids_retired) == (2, 1, 2, 2)
    assert drift.prefix_changed == (0, 1) and drift.churn == 0.5
    assert drift.flows == (Flow(2, "1_2", "1_3", 1),)
    without_active = compare_tables(old.drop("active"), new.drop("active"), 2, against="old")
    assert without_active.compared == 2 and without_active.ids_retired == 3  # z counts as a current ID there


def test_drift_rows_metrics_and_table(spark) -> None:
    drift = Drift("v3", compared=10, ids_changed=2, ids_added=5, ids_retired=3, prefix_changed=(1, 2),
                  flows=(Flow(1, "1", "2", 1),))
    metrics = drift.metrics()
    assert metrics["drift_id_churn"] == 0.2 and metrics["drift_l2_prefix_changed_share"] == 0.2
    other = Drift("other table", 4, 4, 0, 0, (4, 4), ())
    rows = {(r["against"], r["metric"], r["level"]): r["value"] for r in drift_table(spark, [drift, other]).collect()}
    assert rows[("v3", "id_churn", None)] == 0.2 and rows[("v3", "prefix_changed", 1)] == 1.0
    assert rows[("v3", "flow", 1)] == 1.0 and rows[("other table", "id_churn", None)] == 1.0
    assert Drift("none", 0, 0, 0, 0, (), ()).churn == 0.0


def test_drift_of_plan_compares_pairs_only_when_an_active_id_is_replaced(spark) -> None:
    """With replaced IDs the flows come from the plan's pairs; with none (a first run, most scheduled runs)
    the drift is zero without a Spark job over the plan (whose pairs would be empty anyway)."""
    from types import SimpleNamespace

    from pipelines.drift import drift_of_plan
    from pipelines.ledger import ChangeCounts

    pairs = spark.createDataFrame([([1, 2, 3], [1, 5, 3])], PAIRS)
    asked = []

    def plan(ids_changed: int) -> SimpleNamespace:
        def read_pairs():
            asked.append(ids_changed)
            return pairs
        counts = ChangeCounts(valid=4, compared=4, ids_changed=ids_changed, new_item=ids_changed)
        return SimpleNamespace(counts=counts, pairs=read_pairs, num_levels=3, previous=None)

    replaced = drift_of_plan(plan(1))
    assert replaced.prefix_changed == (0, 1, 1) and replaced.flows[0] == Flow(2, "1_2", "1_5", 1)
    none = drift_of_plan(plan(0))
    assert none.prefix_changed == (0, 0, 0) and none.flows == () and none.churn == 0.0
    assert asked == [1]
