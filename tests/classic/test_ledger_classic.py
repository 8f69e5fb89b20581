"""The ledger's plan of a new generation on classic local JVM Spark.

The same scenario as tests/pipelines/test_ledger.py's new-generation tests (Sail): the rule that keeps an
item's ID when none of its alternatives is free runs through a broadcast, an explode and a semi-join, which
each engine plans its own way.
"""
from __future__ import annotations

import datetime as dt

import helpers
import pytest

from pipelines import io, ledger
from pipelines.encode import Encoded, TokenizerModel
from pipelines.schema import ACTIVE, ALTERNATIVE_ERRORS, ALTERNATIVES, ITEM_ID, SEMANTIC_ID, SEMANTIC_IDS_TABLE
from pipelines.validate import ValidationCounts

pytestmark = [pytest.mark.spark, pytest.mark.classic]

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
LEDGER_SCHEMA = ("item_id string, codes array<int>, suffix int, semantic_id string, quantization_error float, "
                 "model_name string, model_version string, mlflow_run_id string, tokenized_at timestamp, "
                 "generation int, embedding_fingerprint bigint, active boolean, retired_at timestamp, "
                 "retired_reason string, prefix_1 string, prefix_2 string")


def ledger_row(item: str, codes: list[int], fp: int) -> tuple:
    return (item, codes, 0, f"{codes[0]}_{codes[1]}_0", 0.5, "m", "1", "run-0", T0, 1, fp, True, None, None,
            str(codes[0]), f"{codes[0]}_{codes[1]}")


def new_generation_plan(classic_spark, materialize, one_map: bool = False) -> tuple[ledger.Plan, dict[str, str]]:
    """A new generation's plan over a ledger of four items, and its active IDs (semantic_id -> item).

    c took 1_9 by a second chance; the new model ranks 1_2 and 1_3 (a's and b's) first again: c keeps 1_9_0.
    d's 1_4 is outside its alternatives and 1_5 is free: d moves there. x was rejected (it is in neither)."""
    rows = [ledger_row("a", [1, 2], 10), ledger_row("b", [1, 3], 11), ledger_row("c", [1, 9], 12),
            ledger_row("d", [1, 4], 13)]
    state = ledger.TableState(classic_spark.createDataFrame(rows, LEDGER_SCHEMA), None, "m", "1", 1, 2, True, 4, 4)
    encoded = [("a", [1, 2], 0.1, 10, [2, 3]), ("b", [1, 3], 0.1, 11, [3, 2]), ("c", [1, 2], 0.3, 12, [2, 3]),
               ("d", [1, 2], 0.4, 13, [2, 5])]
    codes = classic_spark.createDataFrame(
        [(*r, [r[2], r[2] + 0.1]) for r in encoded],
        f"item_id string, codes array<int>, quantization_error float, embedding_fingerprint bigint, "
        f"{ALTERNATIVES} array<int>, {ALTERNATIVE_ERRORS} array<float>")
    rejects = classic_spark.createDataFrame([("x", "not_finite")], "item_id string, reason string")
    model = TokenizerModel("m", "2", b"", num_levels=2, codebook_size=16, input_dim=4)
    plan = ledger.plan_changes(state, Encoded(codes, rejects, ValidationCounts(4, {"not_finite": 1})), model,
                               ledger.Mode(ledger.FULL, 2, True, "test"), on_changed="keep", run_id="run-1",
                               now=dt.datetime(2026, 2, 1, tzinfo=dt.timezone.utc), materialize=materialize,
                               one_map=one_map)
    return plan, {r[SEMANTIC_ID]: r[ITEM_ID] for r in plan.table().collect() if r[ACTIVE]}


def test_a_new_generation_confirms_an_item_none_of_whose_alternatives_is_free_on_the_jvm(classic_spark):
    plan, active = new_generation_plan(classic_spark, lambda df: df.localCheckpoint())
    assert (plan.counts.confirmed, plan.counts.moved) == (3, 1)
    assert active == {"1_2_0": "a", "1_3_0": "b", "1_9_0": "c", "1_5_0": "d"}


@pytest.mark.parametrize(("broadcast_up_to", "join"), [(1_000_000, "BroadcastHashJoin"), (0, "SortMergeJoin")])
def test_the_ledger_is_filtered_as_it_is_read_when_few_rows_are_issued_and_updated(classic_spark, monkeypatch,
                                                                                  broadcast_up_to, join):
    # The rows updated and the prefixes of the rows issued are broadcast to their joins with the ledger: a
    # checkpoint's size is unknown to the planner, which otherwise shuffles every ledger row (the whole table in a
    # daily run that updates none). Automatic broadcasts are off, so a broadcast can only come from the plan's hint.
    # The scenario above, spread and numbered in one grouped map as the job does on the JVM.
    monkeypatch.setattr(ledger, "BROADCAST_IDS", broadcast_up_to)
    plans = []

    def recording(df):  # noqa: ANN001, ANN202 - a DataFrame
        plans.append(df._jdf.queryExecution().executedPlan().toString())
        return df.localCheckpoint()

    before = classic_spark.conf.get("spark.sql.autoBroadcastJoinThreshold")
    classic_spark.conf.set("spark.sql.autoBroadcastJoinThreshold", "-1")
    try:
        plan, active = new_generation_plan(classic_spark, recording, one_map=True)
        # The table after the run: the ledger's rows less the ones the run changes (few: broadcast).
        table_plan = plan.table()._jdf.queryExecution().executedPlan().toString()
    finally:
        classic_spark.conf.set("spark.sql.autoBroadcastJoinThreshold", before)
    changes = [p for p in plans if "FlatMapGroupsInArrow" in p]
    assert len(changes) == 1, plans
    assert helpers.join_kinds(changes[0], join) == {"Inner", "LeftSemi"}, changes[0]
    # The comparison with the table joins the catalog's and the table's rows (both large: sort-merge), then the
    # rejected ids onto them: broadcast, so the joined rows are not shuffled a second time.
    compared = [p for p in plans if "FullOuter" in p]
    assert len(compared) == 1 and "LeftOuter" in helpers.join_kinds(compared[0], join), compared
    assert helpers.join_kinds(table_plan, join) == {"LeftAnti"}, table_plan
    assert (plan.counts.confirmed, plan.counts.moved) == (3, 1)
    assert active == {"1_2_0": "a", "1_3_0": "b", "1_9_0": "c", "1_5_0": "d"}


@pytest.mark.parametrize("broadcast_up_to", [1_000_000, 0], ids=["few-broadcast", "many"])
def test_an_item_back_after_a_generation_change_is_compared_by_its_codes_on_the_jvm(classic_spark, monkeypatch,
                                                                                   broadcast_up_to):
    monkeypatch.setattr(ledger, "BROADCAST_IDS", broadcast_up_to)
    # Generation 2 is current; p and q left in generation 1. Back now: p with its old tuple has its ID again, q with
    # another moves (its old row retired as a new generation's move). a is unchanged and not encoded.
    def away(item: str, codes: list[int], fp: int) -> tuple:
        row = list(ledger_row(item, codes, fp))
        row[11:14] = [False, T0, "left_catalog"]
        return tuple(row)

    current = list(ledger_row("a", [1, 2], 10))
    current[6], current[9] = "2", 2
    rows = [tuple(current), away("p", [3, 4], 11), away("q", [5, 5], 12)]
    state = ledger.TableState(classic_spark.createDataFrame(rows, LEDGER_SCHEMA), None, "m", "2", 2, 2, True, 3, 1,
                              earlier_retired=2)
    codes = classic_spark.createDataFrame([("a", None, None, 10), ("p", [3, 4], 0.2, 31), ("q", [8, 8], 0.2, 32)],
                                          "item_id string, codes array<int>, quantization_error float, "
                                          "embedding_fingerprint bigint")
    rejects = classic_spark.createDataFrame([], "item_id string, reason string")
    model = TokenizerModel("m", "2", b"", num_levels=2, codebook_size=16, input_dim=4)
    plan = ledger.plan_changes(state, Encoded(codes, rejects, ValidationCounts(3, {})),
                               model, ledger.Mode(ledger.INCREMENTAL, 2, False, "test"), on_changed="keep",
                               run_id="run-1", now=dt.datetime(2026, 2, 1, tzinfo=dt.timezone.utc),
                               materialize=lambda df: df.localCheckpoint(), one_map=True)
    after = {r[SEMANTIC_ID]: r for r in plan.table().collect()}
    assert {(r[ITEM_ID], sid) for sid, r in after.items() if r[ACTIVE]} == {("a", "1_2_0"), ("p", "3_4_0"),
                                                                         ("q", "8_8_0")}
    assert after["3_4_0"]["generation"] == 2 and after["5_5_0"]["retired_reason"] == "new_generation"
    assert (plan.counts.confirmed, plan.counts.moved) == (1, 1)


@pytest.mark.parametrize("table", [name for name, (_, _, expected) in helpers.state_tables().items() if expected])
def test_the_state_summarised_in_the_driver_is_the_jvms(classic_spark, tmp_path, table) -> None:
    """The table's state summed up from its files (the job's way on classic Spark with a local master) against the
    JVM's own aggregation, on Parquet (this session has no Delta): the same figures."""
    rows, dropped, expected = helpers.state_tables()[table]
    location = io.OutputLocation.for_path(str(tmp_path), "parquet")
    io.write_table(classic_spark.createDataFrame(rows, helpers.STATE_SCHEMA).drop(*dropped), location,
                   SEMANTIC_IDS_TABLE)
    engine = ledger.read_table_state(classic_spark, location)
    driver = ledger.read_table_state(classic_spark, location, in_driver=True)
    assert ledger._summary_in_driver(location, None, [c for c in helpers.STATE_SCHEMA_COLUMNS if c not in dropped])
    figures = [(s.rows, s.active_rows, s.generation, s.earlier_retired, s.max_code, s.num_levels, s.model_version)
               for s in (engine, driver)]
    assert figures[0] == figures[1] and figures[0][:5] == expected
