"""pipelines.ledger on the embedded engine: modes, the plan of every ID's fate, MERGE publishing, id_changes.

Tiny hand-made ledgers (L = 2) with the expected outcome written out row by row.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
from pathlib import Path

import helpers
import numpy as np
import pytest
from pyspark.sql import functions as F

from pipelines import io, ledger
from pipelines.encode import Encoded, TokenizerModel
from pipelines.schema import (
    ACTIVE,
    ALTERNATIVE_ERRORS,
    ALTERNATIVES,
    EMBEDDING_FINGERPRINT,
    GENERATION,
    ISSUE_COLUMNS,
    ITEM_ID,
    RETIRED_AT,
    RETIRED_REASON,
    SEMANTIC_ID,
    SEMANTIC_IDS_TABLE,
    RetiredReason,
)
from pipelines.validate import RowAccountingError, ValidationCounts

pytestmark = pytest.mark.spark

T_1 = dt.datetime(2025, 12, 1, tzinfo=dt.timezone.utc)
T0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
NOW = dt.datetime(2026, 2, 1, tzinfo=dt.timezone.utc)
V1 = TokenizerModel("m", "1", b"", num_levels=2, codebook_size=16, input_dim=4)
V2 = TokenizerModel("m", "2", b"", num_levels=2, codebook_size=16, input_dim=4)
SCHEMA = ("item_id string, codes array<int>, suffix int, semantic_id string, quantization_error float, "
          "model_name string, model_version string, mlflow_run_id string, tokenized_at timestamp, generation int, "
          "embedding_fingerprint bigint, active boolean, retired_at timestamp, retired_reason string, "
          "prefix_1 string, prefix_2 string")


def row(item: str, codes: list[int], suffix: int, fp: int, *, active: bool = True, reason: str | None = None,
        error: float = 0.5, generation: int = 1, version: str = "1", at: dt.datetime = T0) -> tuple:
    sid = "_".join(map(str, codes)) + f"_{suffix}"
    return (item, codes, suffix, sid, error, "m", version, "run-0", at, generation, fp, active,
            None if active else T0, reason, str(codes[0]), f"{codes[0]}_{codes[1]}")


def utc(value):
    """Timestamps as aware UTC (Spark hands back naive local times), other values as they are."""
    return value.astimezone(dt.timezone.utc) if isinstance(value, dt.datetime) else value


LEDGER = [
    row("a", [1, 2], 0, 10),
    row("b", [1, 2], 1, 11),
    row("c", [3, 4], 0, 12),
    row("d", [5, 5], 0, 13, active=False, reason=RetiredReason.LEFT_CATALOG),  # may come back
    row("e", [6, 6], 0, 14, active=False, reason=RetiredReason.EMBEDDING_CHANGED, at=T_1),  # replaced by 6_7_0
    row("e", [6, 7], 0, 15),
]


def state_of(spark, rows: list[tuple] = LEDGER, version: int | None = None) -> ledger.TableState:
    df = spark.createDataFrame(rows, SCHEMA)
    active = sum(1 for r in rows if r[11])
    return ledger.TableState(df, version, "m", "1", 1, 2, True, len(rows), active)


def encoded(spark, rows: list[tuple], rejected: list[str] = ()) -> Encoded:
    """(item, codes or None, error or None, fingerprint) per clean catalog row, plus rejected ids."""
    codes = spark.createDataFrame(rows, "item_id string, codes array<int>, quantization_error float, "
                                        "embedding_fingerprint bigint")
    rejects = spark.createDataFrame([(i, "zero_vector") for i in rejected] or [("x", "x")], "item_id string, "
                                    "reason string")
    if not rejected:
        rejects = rejects.limit(0)
    return Encoded(codes, rejects, ValidationCounts(len(rows), {"zero_vector": len(rejected)}))


def plan(spark, state, enc, mode, on_changed="keep", model=V1) -> ledger.Plan:
    return ledger.plan_changes(state, enc, model, mode, on_changed=on_changed, run_id="run-1", now=NOW,
                               materialize=lambda df: None)


def table_rows(p: ledger.Plan) -> dict[str, dict]:
    """The whole ledger after the plan, by semantic_id."""
    rows = {r[SEMANTIC_ID]: {k: utc(v) for k, v in r.asDict().items()} for r in p.table().collect()}
    assert len(rows) == p.table().count()  # semantic_id is unique
    return rows


INCREMENTAL = ledger.Mode(ledger.INCREMENTAL, 1, False, "test")
NEW_GENERATION = ledger.Mode(ledger.FULL, 2, True, "test")

# The catalog of the next run: a unchanged, b's embedding changed (not encoded under keep), d back,
# f/g/h new (g has the lower error: it takes 1_2_2 before f), e gone, c rejected.
NEXT = [("a", None, None, 10), ("b", None, None, 99), ("d", None, None, 13),
        ("f", [1, 2], 0.5, 20), ("g", [1, 2], 0.1, 21), ("h", [9, 9], 0.3, 22)]


def test_an_incremental_run_keeps_every_id_and_issues_the_next_free_suffixes(spark) -> None:
    p = plan(spark, state_of(spark), encoded(spark, NEXT, rejected=["c"]), INCREMENTAL)
    c = p.counts
    assert (c.valid, c.unchanged, c.new_item, c.reactivated, c.changed_kept) == (6, 1, 3, 1, 1)
    assert (c.retired_left_catalog, c.retired_rejected, c.embedding_changed, c.compared, c.ids_changed) == (
        1, 1, 1, 2, 0)
    rows = table_rows(p)
    assert {(r[ITEM_ID], sid) for sid, r in rows.items() if r[ACTIVE]} == {
        ("a", "1_2_0"), ("b", "1_2_1"), ("d", "5_5_0"), ("g", "1_2_2"), ("f", "1_2_3"), ("h", "9_9_0")}
    assert {sid: r[RETIRED_REASON] for sid, r in rows.items() if not r[ACTIVE]} == {
        "3_4_0": RetiredReason.REJECTED, "6_6_0": RetiredReason.EMBEDDING_CHANGED,
        "6_7_0": RetiredReason.LEFT_CATALOG}
    assert rows["6_7_0"][RETIRED_AT] == rows["3_4_0"][RETIRED_AT] == NOW
    assert rows["6_6_0"][RETIRED_AT] == T0  # an old retirement is left alone
    assert rows["5_5_0"][RETIRED_AT] is None and rows["5_5_0"][RETIRED_REASON] is None
    assert rows["1_2_1"][EMBEDDING_FINGERPRINT] == 11  # kept: the row is as it was
    new = rows["1_2_2"]
    assert (new["quantization_error"], new["tokenized_at"], new["mlflow_run_id"], new[GENERATION]) == (
        pytest.approx(0.1), NOW, "run-1", 1)
    before = {r[3]: r for r in LEDGER}
    for sid in ("1_2_0", "1_2_1", "5_5_0", "6_6_0", "6_7_0", "3_4_0"):  # what was issued never changes
        assert [rows[sid][k] for k in ISSUE_COLUMNS] == [before[sid][i] for i in (0, 1, 2, 3, 4, 7, 8)]


def test_nothing_changes_when_the_catalog_did_not(spark) -> None:
    same = [("a", None, None, 10), ("b", None, None, 11), ("c", None, None, 12), ("e", None, None, 15)]
    p = plan(spark, state_of(spark), encoded(spark, same), INCREMENTAL)
    assert p.changes.count() == 0 and p.counts.unchanged == 4 and p.counts.issued == 0


def test_retokenize_gives_a_changed_item_a_new_id_unless_its_codes_stayed(spark) -> None:
    # b changed and moved to 3_4; a changed but kept its codes (its fingerprint is refreshed).
    changed = [("a", [1, 2], 0.2, 50), ("b", [3, 4], 0.2, 99), ("c", None, None, 12), ("e", None, None, 15)]
    p = plan(spark, state_of(spark), encoded(spark, changed), INCREMENTAL, on_changed="retokenize")
    assert (p.counts.retokenized, p.counts.confirmed, p.counts.embedding_changed, p.counts.ids_changed) == (1, 1, 2, 1)
    rows = table_rows(p)
    assert rows["1_2_1"][ACTIVE] is False and rows["1_2_1"][RETIRED_REASON] == RetiredReason.EMBEDDING_CHANGED
    assert rows["3_4_1"][ITEM_ID] == "b" and rows["3_4_1"][ACTIVE]  # after c's 3_4_0
    assert rows["1_2_0"][EMBEDDING_FINGERPRINT] == 50 and rows["1_2_0"][ACTIVE]
    changes = {(r[ITEM_ID], r["old_semantic_id"], r["new_semantic_id"])
               for r in ledger.id_changes(p.table()).collect()}
    assert changes == {("b", "1_2_1", "3_4_1"), ("e", "6_6_0", "6_7_0")}  # e's is from an earlier run
    assert p.pairs().count() == 1


def test_a_new_generation_keeps_ids_whose_codes_stay_and_moves_the_rest(spark) -> None:
    every = [("a", [1, 2], 0.4, 10), ("b", [7, 7], 0.4, 11), ("c", [3, 4], 0.9, 12), ("d", [5, 5], 0.1, 13),
             ("e", [6, 6], 0.1, 15)]
    p = plan(spark, state_of(spark), encoded(spark, every), NEW_GENERATION, model=V2)
    c = p.counts
    assert (c.confirmed, c.moved, c.compared, c.ids_changed) == (3, 2, 4, 2)
    rows = table_rows(p)
    for sid, item in (("1_2_0", "a"), ("3_4_0", "c"), ("5_5_0", "d")):  # same codes: same ID, generation 2
        assert (rows[sid][ITEM_ID], rows[sid][ACTIVE], rows[sid][GENERATION], rows[sid]["model_version"]) == (
            item, True, 2, "2")
        assert rows[sid]["quantization_error"] == pytest.approx(0.5)  # the issue columns stay
    assert rows["7_7_0"][ITEM_ID] == "b" and rows["1_2_1"][RETIRED_REASON] == RetiredReason.NEW_GENERATION
    # e's codes are those of its retired ID 6_6_0: a retired ID is never reissued, e gets 6_6_1.
    assert rows["6_6_1"][ITEM_ID] == "e" and rows["6_6_1"][GENERATION] == 2
    assert rows["6_7_0"][RETIRED_REASON] == RetiredReason.NEW_GENERATION
    # Each change belongs to the generation it happened in: e's re-tokenization to generation 1, even
    # though the ID it got (6_7_0) was then held by generation 2 until it moved.
    assert {(r[ITEM_ID], r["old_semantic_id"], r["new_semantic_id"], r[GENERATION])
            for r in ledger.id_changes(p.table()).collect()} == {
        ("b", "1_2_1", "7_7_0", 2), ("e", "6_7_0", "6_6_1", 2), ("e", "6_6_0", "6_7_0", 1)}


@pytest.mark.parametrize("current", [2, 3])
def test_an_item_away_when_a_generation_started_has_its_id_back_where_its_codes_are_the_same(spark, current) -> None:
    # Generation `current` is the table's. p, q, s left in generation 1 (p and q were away when the later ones
    # started); r was given a second row when it came back before this rule (a table written earlier): its active
    # row counts.
    left = RetiredReason.LEFT_CATALOG
    now = {"generation": current, "version": str(current)}
    rows = [row("a", [1, 2], 0, 10, **now),
            row("p", [3, 4], 0, 11, active=False, reason=left), row("q", [5, 5], 0, 12, active=False, reason=left),
            row("r", [6, 6], 0, 13, active=False, reason=left), row("r", [6, 7], 0, 14, **now),
            row("s", [9, 9], 0, 15, active=False, reason=left)]
    state = ledger.TableState(spark.createDataFrame(rows, SCHEMA), None, "m", str(current), current, 2, True,
                              len(rows), 2, earlier_retired=4)
    assert sorted(r[ITEM_ID] for r in state.returnable().collect()) == ["p", "q", "s"]
    back = [("a", None, None, 10), ("p", [3, 4], 0.3, 31), ("q", [8, 8], 0.3, 32), ("r", None, None, 14)]
    model = TokenizerModel("m", str(current), b"", num_levels=2, codebook_size=16, input_dim=4)
    p = plan(spark, state, encoded(spark, back), ledger.Mode(ledger.INCREMENTAL, current, False, "test"), model=model)
    c = p.counts
    assert (c.confirmed, c.moved, c.new_item, c.reactivated, c.ids_changed) == (1, 1, 0, 0, 0)
    after = table_rows(p)
    assert {(r[ITEM_ID], sid) for sid, r in after.items() if r[ACTIVE]} == {
        ("a", "1_2_0"), ("p", "3_4_0"), ("q", "8_8_0"), ("r", "6_7_0")}
    assert (after["3_4_0"][GENERATION], after["3_4_0"]["model_version"], after["3_4_0"][EMBEDDING_FINGERPRINT]) == (
        current, str(current), 31)
    assert after["3_4_0"]["tokenized_at"] == T0  # its own row, as issued
    assert {sid: r[RETIRED_REASON] for sid, r in after.items() if not r[ACTIVE]} == {
        "5_5_0": RetiredReason.NEW_GENERATION, "6_6_0": left, "9_9_0": left}
    # The move is the current generation's, however many generations q was away.
    assert {(r[ITEM_ID], r["old_semantic_id"], r["new_semantic_id"], r[GENERATION])
            for r in ledger.id_changes(p.table()).collect()} == {("q", "5_5_0", "8_8_0", current)}
    # A table without such rows reads none of this.
    assert state_of(spark).returnable() is None


def test_a_new_generation_counts_the_items_still_away_from_its_generation_before(spark) -> None:
    # d left earlier in generation 1 and is still away; c is active and away now. Neither row is written, both count
    # for the gate (the new generation decides their IDs when they return).
    every = [("a", [1, 2], 0.4, 10), ("b", [1, 2], 0.4, 11), ("e", [6, 7], 0.1, 15)]
    p = plan(spark, state_of(spark), encoded(spark, every), NEW_GENERATION, model=V2)
    c = p.counts
    assert (c.still_away, c.retired_left_catalog, c.compared) == (1, 1, 3)
    rows = table_rows(p)
    assert rows["5_5_0"][RETIRED_REASON] == RetiredReason.LEFT_CATALOG and rows["5_5_0"][GENERATION] == 1
    assert "1 still away since earlier in the last generation" in c.summary()


def test_a_first_run_numbers_every_tuple_from_zero(spark) -> None:
    p = plan(spark, None, encoded(spark, [("x", [1, 1], 0.2, 1), ("y", [1, 1], 0.1, 2)]),
             ledger.Mode(ledger.FULL, 1, True, "test"))
    assert {r[ITEM_ID]: r[SEMANTIC_ID] for r in p.table().collect()} == {"y": "1_1_0", "x": "1_1_1"}
    assert p.counts.new_item == 2 and p.counts.compared == 0


def test_a_table_of_another_code_length_is_refused(spark) -> None:
    three = TokenizerModel("m", "2", b"", num_levels=3, codebook_size=16, input_dim=4)
    with pytest.raises(ledger.ModeError, match="2 levels but m version 2 gives 3"):
        plan(spark, state_of(spark), encoded(spark, []), NEW_GENERATION, model=three)


@pytest.mark.parametrize(("requested", "model", "trained", "expected"), [
    ("auto", V1, False, (ledger.INCREMENTAL, 1, False)),
    ("full", V1, False, (ledger.FULL, 1, False)),
    ("auto", V2, True, (ledger.FULL, 2, True)),  # a retrain starts the next generation
    ("full", V2, False, (ledger.FULL, 2, True)),  # so does a given model, when asked for
    ("incremental", V1, False, (ledger.INCREMENTAL, 1, False)),
])
def test_choose_mode(spark, requested, model, trained, expected) -> None:
    mode = ledger.choose_mode(requested, state_of(spark), model.name, model.version, trained=trained)
    assert (mode.name, mode.generation, mode.new_generation) == expected


def test_a_given_model_that_is_not_the_tables_starts_no_generation_by_itself(spark) -> None:
    # e.g. @champion still on version 1 after a retrain published generation 2 but died before moving it
    with pytest.raises(ledger.ModeError, match=r"--model models:/m/1\), or pass --mode full to start generation 2"):
        ledger.choose_mode("auto", state_of(spark), "m", "2")


def test_a_model_of_another_code_length_or_a_smaller_codebook_is_refused(spark) -> None:
    state = dataclasses.replace(state_of(spark), max_code=9)
    ledger.check_compatible(state, 2, 16, "m")  # fits
    with pytest.raises(ledger.ModeError, match="2 levels but m gives 3.*--levels 2"):
        ledger.check_compatible(state, 3, 16, "m")
    with pytest.raises(ledger.ModeError, match="holds code 9 but m has 8 codes per level"):
        ledger.check_compatible(state, 2, 8, "m")
    ledger.check_compatible(None, 3, 8, "m")  # no table: anything goes


def test_incremental_with_another_model_names_mode_full(spark) -> None:
    with pytest.raises(ledger.ModeError, match="--mode full"):
        ledger.choose_mode("incremental", state_of(spark), "m", "2")


def test_without_a_table_every_mode_starts_generation_one(spark) -> None:
    assert ledger.choose_mode("auto", None, "m", "1").name == ledger.FULL
    assert ledger.choose_mode("incremental", None, "m", "1").generation == 1


def test_a_table_without_lifecycle_columns_is_upgraded_by_a_full_run(spark, tmp_path) -> None:
    old = spark.createDataFrame([r[:9] + r[14:] for r in LEDGER[:3]],
                                ", ".join(SCHEMA.split(", ")[:9] + SCHEMA.split(", ")[14:]))
    location = io.OutputLocation.for_path(str(tmp_path))
    io.write_table(old, location, SEMANTIC_IDS_TABLE)
    state = ledger.read_table_state(spark, location)
    assert state is not None and not state.has_lifecycle and state.active_rows == 3
    assert ledger.choose_mode("auto", state, "m", "1").name == ledger.FULL
    with pytest.raises(ledger.ModeError, match="--mode full"):
        ledger.choose_mode("incremental", state, "m", "1")


def state_fields(state: ledger.TableState | None) -> dict | None:
    """A state's figures (every field but the ledger frame)."""
    if state is None:
        return None
    return {f.name: getattr(state, f.name) for f in dataclasses.fields(state) if f.name != "ledger"}


@pytest.mark.parametrize("fmt", ["delta", "parquet"])
@pytest.mark.parametrize("table", list(helpers.state_tables()))
def test_the_state_summarised_in_the_driver_is_the_engines(spark, tmp_path, fmt, table) -> None:
    rows, dropped, expected = helpers.state_tables()[table]
    location = io.OutputLocation.for_path(str(tmp_path / fmt), fmt)
    io.write_table(spark.createDataFrame(rows, helpers.STATE_SCHEMA).drop(*dropped), location, SEMANTIC_IDS_TABLE)
    if table == "several models":
        for in_driver in (False, True):
            with pytest.raises(ledger.ModeError, match="generation 1 names several models"):
                ledger.read_table_state(spark, location, in_driver=in_driver)
        return
    engine = ledger.read_table_state(spark, location)
    assert state_fields(ledger.read_table_state(spark, location, in_driver=True)) == state_fields(engine)
    # the driver's summary is what was compared, not the engine's again after a quiet fallback
    version = io.table_version(location, SEMANTIC_IDS_TABLE, spark)
    columns = [c for c in helpers.STATE_SCHEMA_COLUMNS if c not in dropped]
    summary = ledger._summary_in_driver(location, version, columns)
    assert summary is not None and sum(r["rows"] for r in summary) == len(rows)
    if expected is None:
        assert engine is None
    else:
        assert (engine.rows, engine.active_rows, engine.generation, engine.earlier_retired, engine.max_code) == expected
        assert engine.num_levels == 2


def test_the_state_summarised_in_the_driver_reads_the_pinned_version(spark, tmp_path) -> None:
    tables = helpers.state_tables()
    location = io.OutputLocation.for_path(str(tmp_path / "out"))
    for name in ("ledger", "two generations"):  # versions 0 and 1
        io.write_table(spark.createDataFrame(tables[name][0], helpers.STATE_SCHEMA), location, SEMANTIC_IDS_TABLE)
    columns = helpers.STATE_SCHEMA_COLUMNS
    assert {r["generation"] for r in ledger._summary_in_driver(location, 0, columns)} == {1}
    assert {r["generation"] for r in ledger._summary_in_driver(location, 1, columns)} == {1, 2}


def test_a_null_list_of_codes_adds_no_code_even_where_its_slot_spans_values() -> None:
    import pyarrow as pa

    codes = pa.ListArray.from_arrays(pa.array([0, 2, 4, 6], pa.int32()), pa.array([1, 2, 99, 99, 3, 4], pa.int32()),
                                     mask=pa.array([False, True, False]))  # the null row's slot holds 99, 99
    got = pa.table({"model_name": ["m"] * 3, "model_version": ["1"] * 3, "codes": codes})
    (summary,) = ledger._summary_of(got, ["model_name", "model_version", "codes"])
    assert (summary["rows"], summary["active"], summary["levels"], summary["max_code"]) == (3, 3, 2, 4)


def test_a_table_beyond_one_part_is_summarised_by_the_engine(spark, tmp_path, monkeypatch) -> None:
    location = io.OutputLocation.for_path(str(tmp_path / "out"))
    io.write_table(spark.createDataFrame(LEDGER, SCHEMA), location, SEMANTIC_IDS_TABLE)
    read = []
    monkeypatch.setattr(io, "read_independently", lambda *a, **k: read.append(a) or pytest.fail("read in the driver"))
    monkeypatch.setattr(ledger, "PART_ITEMS", len(LEDGER) - 1)
    assert ledger.read_table_state(spark, location, in_driver=True).rows == len(LEDGER)
    assert read == []


# --- publishing ------------------------------------------------------------------------------------

def written_ledger(spark, tmp_path: Path) -> tuple[io.OutputLocation, ledger.TableState]:
    location = io.OutputLocation.for_path(str(tmp_path / "out"))
    io.write_table(spark.createDataFrame(LEDGER, SCHEMA), location, SEMANTIC_IDS_TABLE)
    state = ledger.read_table_state(spark, location)
    assert state is not None and state.version == 0
    return location, state


def delta_rows(location: io.OutputLocation) -> dict[str, dict]:
    return {r[SEMANTIC_ID]: {k: utc(v) for k, v in r.items()}
            for r in helpers.read_delta(location.of(SEMANTIC_IDS_TABLE)).to_pylist()}


def test_an_incremental_publish_is_one_merge_that_leaves_other_rows_as_they_were(spark, tmp_path) -> None:
    location, state = written_ledger(spark, tmp_path)
    before = delta_rows(location)
    p = plan(spark, state, encoded(spark, NEXT, rejected=["c"]), INCREMENTAL)
    assert ledger.publish(p, location) == location.of(SEMANTIC_IDS_TABLE)
    from deltalake import DeltaTable

    table = DeltaTable(location.of(SEMANTIC_IDS_TABLE))
    assert table.version() == 1 and table.history()[0]["operation"] == "MERGE"
    after = delta_rows(location)
    assert after["1_2_0"] == before["1_2_0"] and after["1_2_1"] == before["1_2_1"]
    assert after["6_6_0"] == before["6_6_0"]
    assert set(after) == set(before) | {"1_2_2", "1_2_3", "9_9_0"}
    planned = table_rows(p)
    assert planned.keys() == after.keys()
    for sid, r in after.items():
        assert {k: v for k, v in r.items() if k != "quantization_error"} == {
            k: v for k, v in planned[sid].items() if k != "quantization_error"}, sid
        assert r["quantization_error"] == pytest.approx(planned[sid]["quantization_error"])


def test_an_incremental_run_with_nothing_to_change_commits_nothing(spark, tmp_path) -> None:
    location, state = written_ledger(spark, tmp_path)
    same = [("a", None, None, 10), ("b", None, None, 11), ("c", None, None, 12), ("e", None, None, 15)]
    assert ledger.publish(plan(spark, state, encoded(spark, same), INCREMENTAL), location) is None
    assert io.table_version(location, SEMANTIC_IDS_TABLE) == 0


def test_a_table_that_moved_on_since_it_was_read_is_not_written(spark, tmp_path) -> None:
    location, state = written_ledger(spark, tmp_path)
    p = plan(spark, state, encoded(spark, NEXT, rejected=["c"]), INCREMENTAL)
    io.write_table(spark.createDataFrame(LEDGER, SCHEMA), location, SEMANTIC_IDS_TABLE)  # another run: version 1
    with pytest.raises(ledger.ConcurrentRunError, match="at version 0 when this run read it and is at 1 now"):
        ledger.publish(p, location)
    assert io.table_version(location, SEMANTIC_IDS_TABLE) == 1


def test_the_committed_table_is_counted_where_it_was_stated(spark, tmp_path) -> None:
    """verify_published reads the active flags back without the engine (delta-rs) and counts them: 4 active of
    the ledger's rows pass; a count that differs is the engine having written somewhere else."""
    location, _ = written_ledger(spark, tmp_path)
    assert ledger.verify_published(spark, location, expected_active=4) == 4
    with pytest.raises(ledger.NotWhereStatedError, match="read directly holds 4 active IDs, not the 5 this run wrote"):
        ledger.verify_published(spark, location, expected_active=5)


@pytest.mark.parametrize("counted_by", ["delta-rs", "engine"])
def test_a_committed_table_that_breaks_the_ledger_is_found_by_either_count(spark, tmp_path, monkeypatch,
                                                                           counted_by) -> None:
    """The committed version is checked from delta-rs's read of it when it is small (at most PART_ITEMS rows, by
    the Delta log's statistics), else by the engine: either way an ID held twice, or an item active twice, is
    another run's commit interleaved with this one's."""
    if counted_by == "engine":
        monkeypatch.setattr(ledger, "PART_ITEMS", 5)  # the ledgers here (6 or 7 rows) are then "large"
    location = io.OutputLocation.for_path(str(tmp_path / "out"))
    assert io.rows_independently(location, SEMANTIC_IDS_TABLE) is None  # no table yet
    read_back: list = []
    reader = io.read_independently
    monkeypatch.setattr(io, "read_independently", lambda *a, **k: read_back.append(a[2]) or reader(*a, **k))
    reissued = row("zz", [1, 2], 0, 99, active=False, reason="left_catalog")  # LEDGER's first ID again
    io.write_table(spark.createDataFrame(LEDGER + [reissued], SCHEMA), location, SEMANTIC_IDS_TABLE)
    assert io.rows_independently(location, SEMANTIC_IDS_TABLE) == 7
    with pytest.raises(ledger.ConcurrentRunError, match="7 rows hold 6 distinct semantic IDs.*Restore the version"):
        ledger.verify_published(spark, location, expected_active=4)
    io.write_table(spark.createDataFrame(LEDGER + [row("a", [9, 9], 0, 10)], SCHEMA), location, SEMANTIC_IDS_TABLE,
                   mode="overwrite")
    with pytest.raises(ledger.ConcurrentRunError, match="5 active rows name 4 items.*Restore version 0"):
        ledger.verify_published(spark, location, expected_active=5)
    assert io.rows_independently(location, SEMANTIC_IDS_TABLE, version=0) == 7
    io.write_table(spark.createDataFrame(LEDGER, SCHEMA), location, SEMANTIC_IDS_TABLE, mode="overwrite")
    assert ledger.verify_published(spark, location, expected_active=4) == 4
    whole = ["active", "semantic_id", "item_id"] if counted_by == "delta-rs" else ["active"]
    assert read_back == [whole] * 3


def merge(spark, location, rows: list[tuple], action: str, was_active: bool | None = None) -> None:
    source = spark.createDataFrame(rows, SCHEMA).withColumns({
        ledger.ACTION: F.lit(action), ledger.WAS[ACTIVE]: F.lit(was_active).cast("boolean"),
        ledger.WAS[GENERATION]: F.lit(1 if was_active is not None else None).cast("int"),
        ledger.WAS[RETIRED_REASON]: F.lit(None).cast("string")})
    io.merge_into(source, location, SEMANTIC_IDS_TABLE, key=SEMANTIC_ID, update_columns=[ACTIVE, RETIRED_AT],
                  insert_columns=ledger.table_columns(2), action=ledger.ACTION,
                  expected={ITEM_ID: ITEM_ID, **ledger.WAS})


def test_a_merge_meeting_another_runs_writes_fails_and_commits_nothing(spark, tmp_path) -> None:
    location, _ = written_ledger(spark, tmp_path)
    # Another run issued 1_2_0 meanwhile (here: a's ID, inserted for another item).
    with pytest.raises(Exception, match="1_2_0 was issued or changed by another run"):
        merge(spark, location, [row("zz", [1, 2], 0, 99)], "insert")
    # Another run retired c (3_4_0) meanwhile: this run read it active.
    with pytest.raises(Exception, match="3_4_0 was issued or changed by another run"):
        merge(spark, location, [row("c", [3, 4], 0, 12, active=False, reason="left_catalog")], "update",
              was_active=False)
    # A row this run would update is gone.
    with pytest.raises(Exception, match="8_8_0 is no longer"):
        merge(spark, location, [row("zz", [8, 8], 0, 99)], "update", was_active=True)
    assert io.table_version(location, SEMANTIC_IDS_TABLE) == 0
    assert len(delta_rows(location)) == len(LEDGER)
    merge(spark, location, [row("c", [3, 4], 0, 12, active=False, reason="left_catalog")], "update", was_active=True)
    assert delta_rows(location)["3_4_0"][ACTIVE] is False  # as read: applied


def test_a_first_run_does_not_replace_a_table_another_run_created(spark, tmp_path) -> None:
    location = io.OutputLocation.for_path(str(tmp_path / "out"))
    p = plan(spark, None, encoded(spark, [("x", [1, 1], 0.2, 1)]), ledger.Mode(ledger.FULL, 1, True, "test"))
    io.write_table(spark.createDataFrame(LEDGER, SCHEMA), location, SEMANTIC_IDS_TABLE)  # the other run
    with pytest.raises(ledger.ConcurrentRunError, match="did not exist when this run started|already exists"):
        ledger.publish(p, location)
    assert len(delta_rows(location)) == len(LEDGER)
    parquet = io.OutputLocation.for_path(str(tmp_path / "pq"), "parquet")
    io.write_table(spark.createDataFrame(LEDGER, SCHEMA), parquet, SEMANTIC_IDS_TABLE)
    with pytest.raises(ledger.ConcurrentRunError, match="did not exist when this run started"):
        ledger.publish(p, parquet)


def test_a_parquet_table_lost_in_an_interrupted_swap_is_not_started_again(spark, tmp_path) -> None:
    parquet = io.OutputLocation.for_path(str(tmp_path), "parquet")
    io.write_table(spark.createDataFrame(LEDGER, SCHEMA), parquet, SEMANTIC_IDS_TABLE)
    (tmp_path / SEMANTIC_IDS_TABLE).rename(tmp_path / f".{SEMANTIC_IDS_TABLE}.backup-0123abcd")
    with pytest.raises(ledger.ModeError, match=r"rename it back to semantic_ids"):
        ledger.read_table_state(spark, parquet)


PARTS = [(1, False), (3, False), (3, True)]  # (parts, split): at once, in parts filtered, in parts split once


@pytest.mark.parametrize(("parts", "with_split", "in_driver"), [(*p, False) for p in PARTS] + [(1, False, True)])
def test_check_ledger_counts_ids_and_active_items(spark, parts, with_split, in_driver) -> None:
    """The same counts whether the distinct IDs and items are counted at once or in parts by their hash, or
    collected and counted in the driver."""
    calls: list = []
    split = helpers.collected_split(spark, calls) if with_split else None

    def check(df, expected_active):
        collected = df.select("semantic_id", "item_id", "active").toArrow() if in_driver else None
        return ledger.check_ledger(df, expected_active=expected_active, parts=parts, split=split, collected=collected)

    df = spark.createDataFrame(LEDGER, SCHEMA)
    assert check(df, 4) == 4
    with pytest.raises(RowAccountingError, match="4 active rows name 4 items where the catalog has 5 valid items"):
        check(df, 5)
    two_for_a = spark.createDataFrame(LEDGER + [row("a", [9, 9], 0, 10)], SCHEMA)  # a: two active IDs
    with pytest.raises(RowAccountingError, match="5 active rows name 4 items"):
        check(two_for_a, 5)
    reissued = spark.createDataFrame(LEDGER + [row("zz", [1, 2], 0, 99, active=False, reason="left_catalog")], SCHEMA)
    with pytest.raises(RowAccountingError, match="7 rows hold 6 distinct semantic IDs"):
        check(reissued, 4)
    # A damaged row without an ID is no ID (the hash of a null would have counted as one).
    no_id = row("zz", [8, 8], 0, 99, active=False, reason="left_catalog")
    no_id = (*no_id[:3], None, *no_id[4:])
    with pytest.raises(RowAccountingError, match="7 rows hold 6 distinct semantic IDs"):
        check(spark.createDataFrame(LEDGER + [no_id], SCHEMA), 4)
    active_without_item = (None, *row("zz", [8, 8], 0, 99)[1:])
    with pytest.raises(RowAccountingError, match="5 active rows name 4 items"):
        check(spark.createDataFrame(LEDGER + [active_without_item], SCHEMA), 5)
    if with_split:  # the IDs' hashes and the active items' hashes, split once per check
        assert calls[:2] == [(3, ("__csid_sid_hash",)), (3, ("__csid_item_hash",))]


@pytest.mark.parametrize(("parts", "with_split"), PARTS)
def test_check_ledger_decides_on_the_strings_when_hashes_collide(spark, monkeypatch, parts, with_split) -> None:
    """The distinct values are counted as 64-bit hashes first. Where two values share a hash the hashed
    counts fall short, and the strings decide: a sound ledger passes, a broken one fails with the true
    counts. Here every value hashes alike."""
    from pyspark.sql import functions as F

    hashed = []

    def colliding(*cols):
        hashed.append(cols)
        return F.lit(7).cast("long")

    monkeypatch.setattr(F, "xxhash64", colliding)
    split = helpers.collected_split(spark) if with_split else None
    assert ledger.check_ledger(spark.createDataFrame(LEDGER, SCHEMA), expected_active=4, parts=parts, split=split) == 4
    # The hashed count ran first: IDs and items of every part, or once each for the split.
    assert len(hashed) == (2 if with_split else 2 * parts)
    reissued = spark.createDataFrame(LEDGER + [row("zz", [1, 2], 0, 99, active=False, reason="left_catalog")], SCHEMA)
    with pytest.raises(RowAccountingError, match="7 rows hold 6 distinct semantic IDs"):
        ledger.check_ledger(reissued, expected_active=4, parts=parts, split=split)


def test_current_codes_of_sampled_items(spark) -> None:
    import numpy as np

    state = state_of(spark)
    items = spark.createDataFrame([("a",), ("d",), ("e",), ("zz",)], "item_id string")
    positions, codes = state.current_codes(items, np.array(["a", "d", "e", "zz"], dtype=object))
    assert sorted(zip(positions.tolist(), codes.tolist())) == [(0, [1, 2]), (2, [6, 7])]


def test_lifecycle_defaults_of_an_old_table(spark) -> None:
    df = ledger.with_lifecycle_defaults(spark.createDataFrame([("a", "1_0")], "item_id string, semantic_id string"))
    r = df.first()
    assert (r[GENERATION], r[ACTIVE], r[EMBEDDING_FINGERPRINT], r[RETIRED_AT], r[RETIRED_REASON]) == (
        1, True, None, None, None)


def test_the_drift_of_a_new_generation_counts_moves_of_active_ids_only(spark) -> None:
    # d had left the catalog (its row is retired) and comes back with other codes: it gets a new ID, which
    # id_changes lists, but no published, active ID moved with it.
    every = [("a", [1, 2], 0.4, 10), ("b", [7, 7], 0.4, 11), ("c", [3, 4], 0.9, 12), ("d", [5, 6], 0.1, 13),
             ("e", [6, 7], 0.1, 15)]
    p = plan(spark, state_of(spark), encoded(spark, every), NEW_GENERATION, model=V2)
    assert (p.counts.moved, p.counts.ids_changed, p.counts.compared) == (2, 1, 4)
    assert [(r[ITEM_ID], r["old_codes"], r["new_codes"]) for r in p.pairs().collect()] == [("b", [1, 2], [7, 7])]
    assert {r[ITEM_ID] for r in ledger.id_changes(p.table()).collect() if r[GENERATION] == 2} == {"b", "d"}


def encoded_ranked(spark, rows: list[tuple]) -> Encoded:
    """(item, codes, error, fingerprint, ranked last-level codes) per clean row: a model with
    collision_alternatives (each alternative's error is the item's error + 0.1 per rank)."""
    full = [(i, c, e, fp, alts, None if alts is None else [e + 0.1 * r for r in range(len(alts))])
            for i, c, e, fp, alts in rows]
    codes = spark.createDataFrame(full, f"item_id string, codes array<int>, quantization_error float, "
                                        f"embedding_fingerprint bigint, {ALTERNATIVES} array<int>, "
                                        f"{ALTERNATIVE_ERRORS} array<float>")
    rejects = spark.createDataFrame([("x", "x")], "item_id string, reason string").limit(0)
    return Encoded(codes, rejects, ValidationCounts(len(rows), {}))


def test_new_items_take_a_free_tuple_among_their_alternatives_before_a_suffix(spark) -> None:
    # 1_2 is issued (a, b): f and g would be 1_2_2 and 1_2_3. With alternatives g (the better fit)
    # takes 1_3 first, so f takes 1_6; h's 9_9 is free and stays. 5_5 was d's (retired): k, new, is
    # kept off it (a retired ID's tuple is never handed out) and takes 5_4.
    nxt = [("a", None, None, 10, None), ("b", None, None, 11, None), ("c", None, None, 12, None),
           ("e", None, None, 15, None), ("f", [1, 2], 0.5, 20, [2, 3, 6, 8]), ("g", [1, 2], 0.1, 21, [2, 3, 8, 9]),
           ("h", [9, 9], 0.3, 22, [9, 1, 2, 3]), ("k", [5, 5], 0.2, 23, [5, 4, 1, 2])]
    p = plan(spark, state_of(spark), encoded_ranked(spark, nxt), INCREMENTAL)
    rows = table_rows(p)
    assert {(r[ITEM_ID], sid) for sid, r in rows.items() if r[ACTIVE]} == {
        ("a", "1_2_0"), ("b", "1_2_1"), ("c", "3_4_0"), ("e", "6_7_0"), ("g", "1_3_0"), ("f", "1_6_0"),
        ("h", "9_9_0"), ("k", "5_4_0")}
    assert rows["1_3_0"]["quantization_error"] == pytest.approx(0.2)  # g's error on the code it took
    assert rows["5_5_0"][ACTIVE] is False  # d's retired ID stays d's


def test_a_new_generation_confirms_an_id_whose_tuple_is_still_among_the_items_alternatives(spark) -> None:
    # a's nearest tuple is now 1_5, but its ID's tuple 1_2 is its second choice: it keeps 1_2_0. b's
    # prefix changed: it moves (to 7_7, free).
    every = [("a", [1, 5], 0.4, 10, [5, 2]), ("b", [7, 7], 0.4, 11, [7, 2]), ("c", [3, 4], 0.9, 12, [4, 0]),
             ("d", [5, 5], 0.1, 13, [5, 1]), ("e", [6, 7], 0.1, 15, [7, 6])]
    p = plan(spark, state_of(spark), encoded_ranked(spark, every), NEW_GENERATION, model=V2)
    assert (p.counts.confirmed, p.counts.moved) == (4, 1)
    rows = table_rows(p)
    assert rows["1_2_0"][ITEM_ID] == "a" and rows["1_2_0"][ACTIVE] and rows["1_2_0"][GENERATION] == 2
    assert rows["7_7_0"][ITEM_ID] == "b" and rows["1_2_1"][RETIRED_REASON] == RetiredReason.NEW_GENERATION


@pytest.mark.parametrize("with_table", [False, True])
def test_issuing_in_parts_of_the_prefixes_gives_the_same_ids(spark, monkeypatch, with_table) -> None:
    """Many items to issue are spread and numbered one part of the prefixes after another (each part
    materialised): every row of the resulting ledger is the one a single pass gives."""
    import numpy as np

    from pipelines import uniquify

    rng = np.random.default_rng(3)
    n = 400
    rows = []
    for j in range(n):  # 6 x 5 tuples for 400 items: crowded, so items move and suffixes count up
        codes = [int(rng.integers(1, 7)), int(rng.integers(0, 5))]
        others = [int(c) for c in rng.permutation(16) if c != codes[1]][:3]
        rows.append((f"n{j:03d}", codes, float(rng.random()), 100 + j, [codes[1], *others]))
    if with_table:  # the ledger's items come back unchanged; the new ones avoid every tuple it issued
        rows += [(r[0], None, None, r[10], None) for r in LEDGER if r[11]]
    state = state_of(spark) if with_table else None
    mode = INCREMENTAL if with_table else ledger.Mode(ledger.FULL, 1, True, "test")
    materialized = []

    def materialize(df):
        materialized.append(df.columns)
        return spark.createDataFrame(df.collect(), df.schema)

    lines: list[str] = []

    splits: list[tuple[int, tuple[str, ...]]] = []
    split = helpers.collected_split(spark, splits)

    def ledger_rows(part_items, split_with=None):
        monkeypatch.setattr(uniquify, "PART_ITEMS", part_items)
        materialized.clear()
        p = ledger.plan_changes(state, encoded_ranked(spark, rows), V1, mode, on_changed="keep", run_id="run-1",
                                now=NOW, materialize=materialize, progress=lines.append, split=split_with)
        table = sorted((r[ITEM_ID], r[SEMANTIC_ID], r[ACTIVE]) for r in p.table().collect())
        return table, len(materialized)

    whole, calls_whole = ledger_rows(10 ** 9)
    in_parts, calls_parts = ledger_rows(90)  # 400 items to issue: 5 parts
    assert in_parts == whole
    assert calls_parts > calls_whole + 4  # each part was computed (and materialised) on its own
    assert lines == [f"new IDs issued for part {p} of 5 of the prefixes" for p in range(1, 6)]
    assert ledger_rows(90, split)[0] == whole
    # With a table: the catalog side, the table side and the rejects split once for their comparison (parts of
    # the item ids), then the rows to issue and the ledger (parts of the prefixes).
    assert [parts for parts, _ in splits] == ([5, 5, 5, 5, 5] if with_table else [5])
    assert len({sid for _, sid, _ in whole}) == len(whole) == n + (len(LEDGER) if with_table else 0)
    assert len({tuple(sid.split("_")[:2]) for _, sid, _ in whole}) > 30  # items moved off the 30 nearest tuples


@pytest.mark.parametrize("scenario", ["incremental", "retokenize", "new_generation", "unchanged"])
def test_comparing_the_catalog_with_the_table_in_parts_of_the_ids_gives_the_same_plan(spark, monkeypatch,
                                                                                         scenario) -> None:
    """A large catalog or table is compared with the other one part of the item ids after another (each part
    materialised): the counts and every row of the planned ledger are those of one comparison."""
    from pipelines import uniquify

    catalog, rejected, mode, on_changed, model = {
        "incremental": (NEXT, ["c"], INCREMENTAL, "keep", V1),
        "retokenize": ([("a", [1, 2], 0.2, 50), ("b", [3, 4], 0.2, 99), ("c", None, None, 12),
                        ("e", None, None, 15)], [], INCREMENTAL, "retokenize", V1),
        "new_generation": ([("a", [1, 2], 0.4, 10), ("b", [7, 7], 0.4, 11), ("c", [3, 4], 0.9, 12),
                            ("d", [5, 5], 0.1, 13), ("e", [6, 6], 0.1, 15)], [], NEW_GENERATION, "keep", V2),
        "unchanged": ([("a", None, None, 10), ("b", None, None, 11), ("c", None, None, 12), ("e", None, None, 15)],
                      [], INCREMENTAL, "keep", V1),
    }[scenario]
    splits: list[tuple[int, tuple[str, ...]]] = []
    split = helpers.collected_split(spark, splits)

    def materialize(df):
        return spark.createDataFrame(df.collect(), df.schema)

    def planned(part_items):
        monkeypatch.setattr(uniquify, "PART_ITEMS", part_items)
        p = ledger.plan_changes(state_of(spark), encoded(spark, catalog, rejected), model, mode, on_changed=on_changed,
                                run_id="run-1", now=NOW, materialize=materialize, split=split)
        return p.counts, table_rows(p)

    whole = planned(10 ** 9)
    assert splits == []
    in_parts = planned(2)  # 6 ledger rows: 3 parts
    assert in_parts == whole
    assert [parts for parts, _ in splits[:3]] == [3, 3, 3]  # catalog side, table side, rejects: each split once
    assert all(ITEM_ID in columns for _, columns in splits[:3])
    if scenario == "unchanged":
        assert len(splits) == 3  # nothing to issue: the ledger is not split (nor read) for the spreading
    splits.clear()
    assert ledger.plan_changes(state_of(spark), encoded(spark, catalog, rejected), model, mode, on_changed=on_changed,
                               run_id="run-1", now=NOW, materialize=materialize, split=split,
                               table_parts=False).counts == whole[0]
    # Classic Spark: no comparison in parts, and only the items to issue set the spreading's parts.
    assert [parts for parts, _ in splits] == ([2, 2] if whole[0].issued == 3 else [])


def test_the_engines_own_split_gives_the_same_checks_and_plan(spark, monkeypatch, tmp_path) -> None:
    """The embedded engine's split (partitioned scratch files, EngineSession.materialize_split) in the ledger
    check and the comparison with the table: the counts and plan of the unsplit path."""
    from pipelines import uniquify
    from pipelines.session import EngineSession

    engine = EngineSession(spark, "local", True, _owns_session=False, _scratch=str(tmp_path / "scratch"))
    df = spark.createDataFrame(LEDGER, SCHEMA)
    assert ledger.check_ledger(df, expected_active=4, parts=3, split=engine.materialize_split) == 4
    reissued = spark.createDataFrame(LEDGER + [row("zz", [1, 2], 0, 99, active=False, reason="left_catalog")], SCHEMA)
    with pytest.raises(RowAccountingError, match="7 rows hold 6 distinct semantic IDs"):
        ledger.check_ledger(reissued, expected_active=4, parts=3, split=engine.materialize_split)

    def planned(part_items):
        monkeypatch.setattr(uniquify, "PART_ITEMS", part_items)
        p = ledger.plan_changes(state_of(spark), encoded(spark, NEXT, ["c"]), V1, INCREMENTAL, on_changed="keep",
                                run_id="run-1", now=NOW, materialize=engine.materialize, split=engine.materialize_split)
        return p.counts, table_rows(p)

    assert planned(2) == planned(10 ** 9)


# The second chance's moves worked out by the engine, or in the driver from the rows collected (the job's plan on a
# JVM engine, one_map): the same IDs.
WHERE = pytest.mark.parametrize("where", ["engine", "driver"])


def collected(spark):
    """A materialize callback: the frame's rows, collected and handed back as a new frame."""
    return lambda df: spark.createDataFrame(df.collect(), df.schema)


def ranked_again(spark, rankings: dict[str, tuple[list[int], float, list[int]]], asked: list[tuple[list[str], int]]):
    """Encoded.again for hand-made rows: item -> (codes, error, every last-level code ranked); each alternative's
    error is the item's error + 0.1 per rank. Records the ids and the k it was asked for."""
    def again(ids, k):
        wanted = sorted(r[ITEM_ID] for r in ids.collect())
        asked.append((wanted, k))
        rows = [(i, 100, rankings[i][0], rankings[i][1], rankings[i][2],
                 [rankings[i][1] + 0.1 * r for r in range(len(rankings[i][2]))]) for i in wanted]
        return spark.createDataFrame(rows, f"item_id string, embedding_fingerprint bigint, codes array<int>, "
                                           f"quantization_error float, {ALTERNATIVES} array<int>, "
                                           f"{ALTERNATIVE_ERRORS} array<float>")
    return again


def first_run_with_second_chance(spark, first: list[tuple], rankings: dict, where: str):
    """A full run's plan (no table) of ``first`` with :func:`ranked_again`'s ``rankings``, the second chance worked
    out ``where`` ("engine", or "driver": the JVM engines' one_map plan): its rows, the ids asked for again and
    the progress lines."""
    asked: list = []
    enc = dataclasses.replace(encoded_ranked(spark, first), again=ranked_again(spark, rankings, asked))
    lines: list[str] = []
    p = ledger.plan_changes(None, enc, V1, ledger.Mode(ledger.FULL, 1, True, "test"), on_changed="keep",
                            run_id="run-1", now=NOW, materialize=collected(spark), progress=lines.append,
                            one_map=where == "driver")
    return table_rows(p), asked, lines


@pytest.mark.parametrize("how", ["one pass", "rows whole", "in parts", "over the cap"])
@WHERE
def test_items_still_sharing_a_tuple_get_a_second_chance_over_every_last_level_code(spark, monkeypatch, how,
                                                                                   where) -> None:
    # Prefix 1: p keeps 1_2 and q takes 1_3 (their 2 alternatives); r, s, t find nothing free among theirs.
    # Ranked over every code, r (the better fit) takes 1_7, s takes 1_8, t's codes are all taken: it stays,
    # its suffix closed up from 3 to 1. Prefix 4: w is ranked otherwise the second time (a model call that
    # differs): it stays as it was. Items nobody shares with (z) are never asked for. The items' ranking within
    # their prefixes in parts of the prefixes gives the same; more items than the cap leave the spreading's IDs.
    from pipelines import uniquify

    if how == "in parts":  # 4 rows ranked within prefixes with room: 2 parts (and the IDs issued in parts)
        monkeypatch.setattr(uniquify, "PART_ITEMS", 2)
    if how == "over the cap":
        monkeypatch.setattr(uniquify, "SECOND_CHANCE_ITEMS", 3)
    if how == "rows whole":  # the tuples held counted over every row, not only those in the left items' prefixes
        monkeypatch.setattr(ledger, "BROADCAST_IDS", 0)
    first = [("p", [1, 2], 0.1, 100, [2, 3]), ("q", [1, 2], 0.2, 100, [2, 3]), ("r", [1, 2], 0.3, 100, [2, 3]),
             ("s", [1, 2], 0.4, 100, [2, 3]), ("t", [1, 2], 0.5, 100, [2, 3]), ("u", [4, 4], 0.2, 100, [4, 5]),
             ("v", [4, 4], 0.3, 100, [4, 5]), ("w", [4, 4], 0.4, 100, [4, 5]), ("z", [9, 9], 0.1, 100, [9, 8])]
    rankings = {"r": ([1, 2], 0.3, [2, 3, 7, 8]), "s": ([1, 2], 0.4, [2, 3, 7, 8]), "t": ([1, 2], 0.5, [2, 3, 7, 8]),
                "w": ([4, 6], 0.4, [6, 4, 5, 1])}
    rows, asked, lines = first_run_with_second_chance(spark, first, rankings, where)
    if how == "over the cap":
        assert asked == [] and lines[-1:] == ["second chance skipped: 4 items share a tuple in prefixes with room, "
                                              "more than the 3 ranked again at most; they keep their suffixes"]
        assert {sid: r[ITEM_ID] for sid, r in rows.items()} == {
            "1_2_0": "p", "1_3_0": "q", "1_2_1": "r", "1_2_2": "s", "1_2_3": "t", "4_4_0": "u", "4_5_0": "v",
            "4_4_1": "w", "9_9_0": "z"}
        return
    assert {sid: r[ITEM_ID] for sid, r in rows.items()} == {
        "1_2_0": "p", "1_3_0": "q", "1_7_0": "r", "1_8_0": "s", "1_2_1": "t", "4_4_0": "u", "4_5_0": "v",
        "4_4_1": "w", "9_9_0": "z"}
    assert asked == [(["r", "s", "t", "w"], 16)]  # K = 16: every last-level code ranked
    assert rows["1_7_0"]["quantization_error"] == pytest.approx(0.5)  # r's error on its third-ranked code
    assert rows["1_2_1"]["quantization_error"] == pytest.approx(0.5)  # t kept its code and error
    assert rows["1_7_0"]["prefix_2"] == "1_7" and rows["1_7_0"]["codes"] == [1, 7]
    assert lines[-1:] == ["second chance: 2 items still sharing a tuple moved to a free last-level code of their "
                          "prefix (4 read again, ranked over every code)"]
    helpers.assert_suffix_contract([r for r in rows.values()])


def test_the_second_chance_in_the_driver_makes_the_engines_moves_on_crowded_prefixes(spark) -> None:
    """Families crowding three prefixes (K = 16), with ties of error and a NaN error, and a few items
    ranked otherwise the second time: the driver's moves are the engine's, ID for ID."""
    rng = np.random.default_rng(11)
    first, rankings = [], {}
    for j in range(60):
        prefix, own = int(rng.integers(1, 4)), int(rng.integers(0, 3))
        error = float("nan") if j == 8 else float(rng.choice([0.1, 0.2, 0.3, 0.4]))
        near = [own, *rng.permutation([c for c in range(16) if c != own])[:1].tolist()]
        every = [own, *rng.permutation([c for c in range(16) if c != own]).tolist()]
        first.append((f"i{j:02d}", [prefix, own], error, 100 + j, near))
        rankings[f"i{j:02d}"] = ([prefix, own if j % 9 else (own + 1) % 16], error, every)
    planned = {}
    for where in ("engine", "driver"):
        rows, asked, lines = first_run_with_second_chance(spark, first, rankings, where)
        planned[where] = ({sid: (r[ITEM_ID], repr(r["quantization_error"])) for sid, r in rows.items()}, asked,
                          lines[-1:])  # repr: a NaN error equals itself
        helpers.assert_suffix_contract(list(rows.values()))
    assert planned["driver"] == planned["engine"]
    assert "moved to a free last-level code" in planned["driver"][2][0] and planned["driver"][1]


@WHERE
def test_a_second_chance_mover_of_suffix_1_closes_up_the_tuple_behind_it(spark, where) -> None:
    # u keeps 4_4, v takes 4_5; x and w find nothing free: 4_4_1 and 4_4_2. Ranked again, x (suffix 1) takes
    # 4_10 and w, ranked otherwise the second time, stays on 4_4: its suffix closes up from 2 to 1.
    first = [("u", [4, 4], 0.2, 100, [4, 5]), ("v", [4, 4], 0.3, 100, [4, 5]), ("x", [4, 4], 0.35, 100, [4, 5]),
             ("w", [4, 4], 0.4, 100, [4, 5])]
    rankings = {"x": ([4, 4], 0.35, [4, 5, 10, 11]), "w": ([4, 6], 0.4, [6, 4, 5, 1])}
    asked: list = []
    enc = dataclasses.replace(encoded_ranked(spark, first), again=ranked_again(spark, rankings, asked))
    p = ledger.plan_changes(None, enc, V1, ledger.Mode(ledger.FULL, 1, True, "test"), on_changed="keep",
                            run_id="run-1", now=NOW, materialize=collected(spark), one_map=where == "driver")
    rows = table_rows(p)
    assert {sid: r[ITEM_ID] for sid, r in rows.items()} == {"4_4_0": "u", "4_5_0": "v", "4_10_0": "x", "4_4_1": "w"}
    assert asked == [(["w", "x"], 16)]
    assert rows["4_4_1"]["prefix_2"] == "4_4" and rows["4_10_0"]["prefix_2"] == "4_10"
    helpers.assert_suffix_contract([r for r in rows.values()])


@pytest.mark.parametrize("broadcast_up_to", [1_000_000, 0], ids=["ledger filtered", "ledger whole"])
@WHERE
def test_the_second_chance_of_new_items_keeps_off_every_tuple_the_ledger_issued(spark, monkeypatch,
                                                                                broadcast_up_to, where) -> None:
    # Either way the plan reads the ledger (its rows in the items' prefixes, or all of them), the same IDs.
    monkeypatch.setattr(ledger, "BROADCAST_IDS", broadcast_up_to)
    # 1_2 is a's and b's: g takes 1_3, f finds nothing free among its two and would be 1_2_2; ranked over every
    # code it takes 1_6. m's 6_7 is e's and its alternative 6_6 was e's (retired): ranked again, 6_6 is still
    # never handed out and m takes 6_8. Only the new items are ever asked for or moved.
    nxt = [("a", None, None, 10, None), ("b", None, None, 11, None), ("c", None, None, 12, None),
           ("e", None, None, 15, None), ("f", [1, 2], 0.5, 20, [2, 3]), ("g", [1, 2], 0.1, 21, [2, 3]),
           ("m", [6, 7], 0.2, 24, [7, 6])]
    rankings = {"f": ([1, 2], 0.5, [2, 3, 6, 9]), "m": ([6, 7], 0.2, [7, 6, 8, 1])}
    asked: list = []
    enc = dataclasses.replace(encoded_ranked(spark, nxt), again=ranked_again(spark, rankings, asked))
    p = ledger.plan_changes(state_of(spark), enc, V1, INCREMENTAL, on_changed="keep", run_id="run-1", now=NOW,
                            materialize=collected(spark), one_map=where == "driver")
    rows = table_rows(p)
    assert {(r[ITEM_ID], sid) for sid, r in rows.items() if r[ACTIVE]} == {
        ("a", "1_2_0"), ("b", "1_2_1"), ("c", "3_4_0"), ("e", "6_7_0"), ("g", "1_3_0"), ("f", "1_6_0"),
        ("m", "6_8_0")}
    assert asked == [(["f", "m"], 16)]
    assert rows["6_6_0"][ITEM_ID] == "e" and not rows["6_6_0"][ACTIVE]


@WHERE
def test_an_item_ranked_otherwise_when_read_again_keeps_its_id(spark, where) -> None:
    # w is the only item read again, and the second read ranks it otherwise (a model call that differs): nobody
    # moves, and w keeps 4_4_1.
    first = [("u", [4, 4], 0.2, 100, [4, 5]), ("v", [4, 4], 0.3, 100, [4, 5]), ("w", [4, 4], 0.4, 100, [4, 5])]
    rows, asked, lines = first_run_with_second_chance(spark, first, {"w": ([4, 6], 0.4, [6, 4, 5, 1])}, where)
    assert {sid: r[ITEM_ID] for sid, r in rows.items()} == {"4_4_0": "u", "4_5_0": "v", "4_4_1": "w"}
    assert asked == [(["w"], 16)]
    assert lines[-1:] == ["second chance: 0 items still sharing a tuple moved to a free last-level code of their "
                          "prefix (1 read again, ranked over every code)"]


@WHERE
def test_no_second_chance_where_the_prefix_has_no_free_code(spark, where) -> None:
    # 17 items on 3_3 in prefix 3, 16 of them spread over every code of it (K = 16): the last one cannot move,
    # so nobody is read again.
    first = [(f"i{j:02d}", [3, 3], 0.1 + 0.01 * j, 100, list(range(3, 16)) + [0, 1, 2]) for j in range(17)]
    asked: list = []
    enc = dataclasses.replace(encoded_ranked(spark, first), again=ranked_again(spark, {}, asked))
    p = ledger.plan_changes(None, enc, V1, ledger.Mode(ledger.FULL, 1, True, "test"), on_changed="keep",
                            run_id="run-1", now=NOW, materialize=collected(spark), one_map=where == "driver")
    assert asked == []
    assert sorted(r["suffix"] for r in table_rows(p).values()) == [0] * 16 + [1]


@pytest.mark.parametrize("broadcast_up_to", [1_000_000, 0], ids=["ledger filtered", "ledger whole"])
@WHERE
def test_the_ledgers_tuples_leave_no_room_for_a_second_chance_in_their_prefix(spark, monkeypatch,
                                                                              broadcast_up_to, where) -> None:
    # Either way the plan reads the ledger (its rows in the items' prefixes, or all of them), the same IDs.
    monkeypatch.setattr(ledger, "BROADCAST_IDS", broadcast_up_to)
    # The ledger holds 5_0 .. 5_13 (K = 16) and an unrelated 7_7. x keeps 5_14, y takes 5_15, z finds nothing free:
    # with the ledger's tuples its prefix has no free code left, so nobody is read again (counted without them,
    # the prefix would seem to have 14 and z would be asked for).
    held = [row(f"l{c:02d}", [5, c], 0, 100 + c) for c in range(14)] + [row("o", [7, 7], 0, 99)]
    nxt = [*((r[0], None, None, r[10], None) for r in held), ("x", [5, 14], 0.1, 1, [14, 15]),
           ("y", [5, 14], 0.2, 2, [14, 15]), ("z", [5, 14], 0.3, 3, [14, 15])]
    asked: list = []
    enc = dataclasses.replace(encoded_ranked(spark, nxt), again=ranked_again(spark, {}, asked))
    p = ledger.plan_changes(state_of(spark, held), enc, V1, INCREMENTAL, on_changed="keep", run_id="run-1", now=NOW,
                            materialize=collected(spark), one_map=where == "driver")
    assert asked == []
    assert {sid: r[ITEM_ID] for sid, r in table_rows(p).items() if r[ITEM_ID] in "xyz"} == {
        "5_14_0": "x", "5_15_0": "y", "5_14_1": "z"}


def test_no_second_chance_without_materialisation(spark) -> None:
    first = [("p", [1, 2], 0.1, 100, [2, 3]), ("q", [1, 2], 0.2, 100, [2, 3]), ("r", [1, 2], 0.3, 100, [2, 3])]
    asked: list = []
    enc = dataclasses.replace(encoded_ranked(spark, first), again=ranked_again(spark, {}, asked))
    p = ledger.plan_changes(None, enc, V1, ledger.Mode(ledger.FULL, 1, True, "test"), on_changed="keep",
                            run_id="run-1", now=NOW, materialize=lambda df: None)
    assert asked == [] and set(table_rows(p)) == {"1_2_0", "1_3_0", "1_2_1"}


@WHERE
def test_a_new_generations_moved_items_get_the_second_chance_on_their_new_rows_only(spark, where) -> None:
    # The new model puts a, b and c on 8_1: a keeps it, b takes 8_2, c finds nothing free among its two and gets
    # its second chance (8_5). Their old rows are retired as they were (codes, suffix, ID), e is confirmed.
    every = [("a", [8, 1], 0.1, 10, [1, 2]), ("b", [8, 1], 0.2, 11, [1, 2]), ("c", [8, 1], 0.3, 12, [1, 2]),
             ("e", [6, 7], 0.1, 15, [7, 6])]
    asked: list = []
    enc = dataclasses.replace(encoded_ranked(spark, every),
                              again=ranked_again(spark, {"c": ([8, 1], 0.3, [1, 2, 5, 7])}, asked))
    p = ledger.plan_changes(state_of(spark), enc, V2, NEW_GENERATION, on_changed="keep", run_id="run-1", now=NOW,
                            materialize=collected(spark), one_map=where == "driver")
    assert (p.counts.moved, p.counts.confirmed) == (3, 1) and asked == [(["c"], 16)]
    rows = table_rows(p)
    assert len(rows) == len(LEDGER) + 3
    assert {(r[ITEM_ID], sid) for sid, r in rows.items() if r[ACTIVE]} == {
        ("a", "8_1_0"), ("b", "8_2_0"), ("c", "8_5_0"), ("e", "6_7_0")}
    for sid, item in (("1_2_0", "a"), ("1_2_1", "b"), ("3_4_0", "c")):
        old = rows[sid]
        assert (old[ITEM_ID], old[ACTIVE], old[RETIRED_REASON]) == (item, False, RetiredReason.NEW_GENERATION)
        assert old["codes"] == [int(x) for x in sid.split("_")[:2]] and old["prefix_2"] == "_".join(sid.split("_")[:2])
    assert rows["8_5_0"]["prefix_2"] == "8_5" and rows["8_5_0"]["quantization_error"] == pytest.approx(0.5)


def test_a_prefix_with_r_free_codes_reads_again_only_its_first_r_items_still_sharing_a_tuple(spark) -> None:
    # Prefix 3 holds 15 of its 16 tuples; x, y and z share 3_0 with i00 and find both their alternatives taken.
    # Ranked over every code, the first of them in the suffix order (x, the best fit) takes the one free code and
    # the others could not move whatever their ranking: only x is read again, and y, z close up behind it.
    first = [(f"i{c:02d}", [3, c], 0.1, 100, [c, (c + 1) % 15]) for c in range(15)]
    first += [("x", [3, 0], 0.2, 100, [0, 1]), ("y", [3, 0], 0.3, 100, [0, 1]), ("z", [3, 0], 0.4, 100, [0, 1])]
    asked: list = []
    enc = dataclasses.replace(encoded_ranked(spark, first),
                              again=ranked_again(spark, {"x": ([3, 0], 0.2, [0, *range(1, 16)])}, asked))
    p = ledger.plan_changes(None, enc, V1, ledger.Mode(ledger.FULL, 1, True, "test"), on_changed="keep",
                            run_id="run-1", now=NOW, materialize=collected(spark))
    assert asked == [(["x"], 16)]
    rows = table_rows(p)
    assert {sid: r[ITEM_ID] for sid, r in rows.items() if r[ITEM_ID] in "xyz"} == {"3_15_0": "x", "3_0_1": "y",
                                                                                  "3_0_2": "z"}
    helpers.assert_suffix_contract(list(rows.values()))


# c took 1_9 in generation 1 by a second chance (1_2 and 1_3, its two nearest codes, were a's and b's).
PLACED = [row("a", [1, 2], 0, 10), row("b", [1, 3], 0, 11), row("c", [1, 9], 0, 12), row("d", [1, 4], 0, 13),
          row("e", [6, 7], 0, 15)]


@pytest.mark.parametrize("how", ["one pass", "in parts", "no materialisation"])
def test_a_new_generation_confirms_an_item_none_of_whose_alternatives_is_free(spark, monkeypatch, how) -> None:
    # The new model ranks c's codes as before: 1_2 and 1_3 are still held, so c keeps 1_9_0 (a new ID would only
    # be a suffix or another code beyond both). d's 1_4 is outside its alternatives and 1_5 is free: d moves
    # there. e's prefix changed: it moves. In parts of the prefixes (a large table), the same. Without
    # materialisation nothing is looked at: c moves too (1_2_1).
    from pipelines import uniquify

    every = [("a", [1, 2], 0.1, 10, [2, 3]), ("b", [1, 3], 0.1, 11, [3, 2]), ("c", [1, 2], 0.3, 12, [2, 3]),
             ("d", [1, 2], 0.4, 13, [2, 5]), ("e", [7, 7], 0.1, 15, [7, 6])]
    calls: list = []
    if how == "in parts":
        monkeypatch.setattr(uniquify, "PART_ITEMS", 2)
    materialized = how != "no materialisation"
    p = ledger.plan_changes(state_of(spark, PLACED), encoded_ranked(spark, every), V2, NEW_GENERATION,
                            on_changed="keep", run_id="run-1", now=NOW,
                            materialize=collected(spark) if materialized else (lambda df: None),
                            split=helpers.collected_split(spark, calls))
    if how == "in parts":  # the ledger's tuples in the looked-at prefixes were split in 3 parts
        assert (3, ("__prefix", "__last_code")) in calls
    rows = table_rows(p)
    active = {sid: r[ITEM_ID] for sid, r in rows.items() if r[ACTIVE]}
    if materialized:
        assert (p.counts.confirmed, p.counts.moved) == (3, 2)
        assert active == {"1_2_0": "a", "1_3_0": "b", "1_9_0": "c", "1_5_0": "d", "7_7_0": "e"}
        assert rows["1_9_0"][GENERATION] == 2 and rows["1_9_0"]["model_version"] == "2"
    else:
        assert (p.counts.confirmed, p.counts.moved) == (2, 3)
        assert active == {"1_2_0": "a", "1_3_0": "b", "1_2_1": "c", "1_5_0": "d", "7_7_0": "e"}
    assert rows["1_4_0"][RETIRED_REASON] == RetiredReason.NEW_GENERATION and not rows["1_4_0"][ACTIVE]


def test_a_retokenized_item_none_of_whose_alternatives_is_free_keeps_its_id(spark) -> None:
    # --on-changed retokenize: c's and d's embeddings changed. c's two nearest tuples are a's and b's: it keeps
    # 1_9_0. d's nearest free tuple is 1_5: it is retokenized there. An incremental keep run looks at nothing.
    nxt = [("a", None, None, 10, None), ("b", None, None, 11, None), ("c", [1, 2], 0.3, 92, [2, 3]),
           ("d", [1, 2], 0.4, 93, [2, 5]), ("e", None, None, 15, None)]
    p = ledger.plan_changes(state_of(spark, PLACED), encoded_ranked(spark, nxt), V1, INCREMENTAL,
                            on_changed="retokenize", run_id="run-1", now=NOW, materialize=collected(spark))
    assert (p.counts.confirmed, p.counts.retokenized) == (1, 1)
    rows = table_rows(p)
    assert rows["1_9_0"][ITEM_ID] == "c" and rows["1_9_0"][ACTIVE] and rows["1_9_0"][EMBEDDING_FINGERPRINT] == 92
    assert rows["1_5_0"][ITEM_ID] == "d" and rows["1_4_0"][RETIRED_REASON] == RetiredReason.EMBEDDING_CHANGED
