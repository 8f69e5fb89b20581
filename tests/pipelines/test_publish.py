"""A describing table whose write fails: the tables written before it hold the run's rows, the error is
raised, and the next run's :func:`publish.recover` puts every table back to the published set."""
from __future__ import annotations

import pytest
from deltalake import DeltaTable
from pyspark.sql import functions as F

from pipelines import io, publish
from pipelines.schema import DRIFT_TABLE, LEVEL_STATS_TABLE, PREFIX_STATS_TABLE, SEMANTIC_IDS_TABLE

pytestmark = pytest.mark.spark


def frames_of(spark, run: int) -> dict:
    """One small frame per describing table, each holding ``run`` and its own name."""
    return {name: spark.createDataFrame([(run, name)], "run INT, name STRING") for name in publish.DESCRIBING}


def rows(location: io.OutputLocation, name: str) -> list[tuple]:
    return sorted((r["run"], r["name"]) for r in DeltaTable(location.of(name)).to_pyarrow_table().to_pylist())


class Collected:
    """A frame whose collections (``toArrow``) are counted in ``calls``; everything else is the frame's."""

    def __init__(self, frame, calls: list) -> None:  # noqa: ANN001 - a DataFrame
        self._frame, self._calls = frame, calls

    def toArrow(self):  # noqa: ANN201, N802 - the DataFrame method's name
        self._calls.append(self._frame)
        return self._frame.toArrow()

    def __getattr__(self, name: str):  # noqa: ANN204
        return getattr(self._frame, name)


def writer(location: io.OutputLocation, name: str) -> str:
    """Who wrote table ``name``'s last version: "delta-rs" (the driver) or the engine."""
    client = DeltaTable(location.of(name)).history(1)[0].get("clientVersion") or ""
    return "delta-rs" if client.startswith("delta-rs") else "engine"


@pytest.mark.parametrize("in_driver", [False, True], ids=["engine", "in_driver"])
def test_a_failed_describing_write_is_raised_and_recover_puts_the_set_back(spark, tmp_path, in_driver):
    """Also with the tables written by delta-rs from the driver (classic Spark's way on a local master; the engine
    creates them): a frame that fails fails as it is collected, and the rollback puts back the versions delta-rs
    overwrote."""
    location = io.OutputLocation.for_path(str(tmp_path / "tables"))
    io.write_table(spark.createDataFrame([(1, "x")], "run INT, name STRING"), location, SEMANTIC_IDS_TABLE)
    collected: list = []
    first = {name: Collected(frame, collected) for name, frame in frames_of(spark, 1).items()}
    written = publish.write_describing(spark, location, first, "run-1", in_driver=in_driver)
    assert written == {name: "0" for name in publish.DESCRIBING}
    assert {writer(location, name) for name in publish.DESCRIBING} == {"engine"}  # created by the engine ...
    assert collected == []  # ... from the frames as they are, none collected first
    publish.record(spark, location, [], "run-1", publish.PUBLISHED,
                   {**written, SEMANTIC_IDS_TABLE: publish.token(spark, location, SEMANTIC_IDS_TABLE)})

    frames = frames_of(spark, 2)
    frames[DRIFT_TABLE] = frames[DRIFT_TABLE].withColumn("name", F.raise_error(F.lit("drift broke")).cast("string"))
    with pytest.raises(Exception, match="drift broke"):
        publish.write_describing(spark, location, frames, "run-2", in_driver=in_driver)
    order = list(publish.DESCRIBING)
    before, after = order[:order.index(DRIFT_TABLE)], order[order.index(DRIFT_TABLE):]
    assert before and all(rows(location, name) == [(2, name)] for name in before)  # written, in order
    assert {writer(location, name) for name in before} == {"delta-rs" if in_driver else "engine"}
    assert all(rows(location, name) == [(1, name)] for name in after)  # the failed one and those after it

    recovery = publish.recover(spark, location, "run-3")
    assert recovery is not None
    assert recovery.action.startswith(f"{', '.join(before)} rolled back to the set run run-1 published")
    for name in publish.DESCRIBING:
        assert rows(location, name) == [(1, name)]  # the published set's rows again
    assert publish.recover(spark, location, "run-4") is None  # nothing left to do
    # the runs table is read with delta-rs where it is a local Delta table: the same entries as the engine reads
    direct = publish.entries(spark, location)
    assert [e.status for e in direct][-1] == publish.ROLLED_BACK and len(direct) >= 2
    engine_rows = [r.asDict() for r in io.read_table(spark, location, publish.RUNS_TABLE).collect()]
    direct_rows = publish._runs_rows_directly(location)
    assert direct_rows is not None
    key = lambda r: r["entry"]  # noqa: E731
    assert sorted(direct_rows, key=key) == sorted(({c: r[c] for c in publish._RUNS_COLUMNS} for r in engine_rows),
                                                  key=key)


@pytest.mark.parametrize("in_driver", [False, True], ids=["engine", "in_driver"])
def test_concurrent_describing_writes_end_before_the_first_failure_is_raised_and_recover_puts_the_set_back(
        spark, tmp_path, in_driver):
    """The JVM engines' path (the runner passes concurrent=True there, for Delta, and on classic Spark with a local
    master in_driver=True): every write but the failed ones lands, a slow one included, before the failure of the
    first failed table (in DESCRIBING order) is raised with the others' in its notes."""
    import time

    location = io.OutputLocation.for_path(str(tmp_path / "tables"))
    io.write_table(spark.createDataFrame([(1, "x")], "run INT, name STRING"), location, SEMANTIC_IDS_TABLE)
    written = publish.write_describing(spark, location, frames_of(spark, 1), "run-1", concurrent=True,
                                       in_driver=in_driver)
    assert written == {name: "0" for name in publish.DESCRIBING}
    assert all(rows(location, name) == [(1, name)] for name in publish.DESCRIBING)
    publish.record(spark, location, [], "run-1", publish.PUBLISHED,
                   {**written, SEMANTIC_IDS_TABLE: publish.token(spark, location, SEMANTIC_IDS_TABLE)})

    frames = frames_of(spark, 2)
    frames[DRIFT_TABLE] = frames[DRIFT_TABLE].withColumn("name", F.raise_error(F.lit("drift broke")).cast("string"))
    frames[PREFIX_STATS_TABLE] = frames[PREFIX_STATS_TABLE].withColumn(
        "name", F.raise_error(F.lit("prefix stats broke")).cast("string"))
    slowly = F.udf(lambda name: (time.sleep(1.0), name)[1], "string")
    frames[LEVEL_STATS_TABLE] = frames[LEVEL_STATS_TABLE].withColumn("name", slowly("name"))
    with pytest.raises(Exception, match="drift broke") as raised:
        publish.write_describing(spark, location, frames, "run-2", concurrent=True, in_driver=in_driver)
    assert any(f"writing {PREFIX_STATS_TABLE} failed too" in note and "prefix stats broke" in note
               for note in getattr(raised.value, "__notes__", []))
    failed = (DRIFT_TABLE, PREFIX_STATS_TABLE)
    others = [name for name in publish.DESCRIBING if name not in failed]
    assert LEVEL_STATS_TABLE in others
    assert all(rows(location, name) == [(2, name)] for name in others)  # each ran to its end, the slow one too
    assert {writer(location, name) for name in others} == {"delta-rs" if in_driver else "engine"}
    assert all(rows(location, name) == [(1, name)] for name in failed)

    recovery = publish.recover(spark, location, "run-3")
    assert recovery is not None
    assert recovery.action.startswith(f"{', '.join(others)} rolled back to the set run run-1 published")
    for name in publish.DESCRIBING:
        assert rows(location, name) == [(1, name)]


def written_set(root, level_used: list[int], counted: int) -> None:
    """A published set written with delta-rs: 3 active IDs (codes [1,2], [1,3], [4,2]) and a retired one."""
    import json

    import pyarrow as pa
    from deltalake import write_deltalake

    tokens = {name: "0" for name in publish.SET_TABLES}
    write_deltalake(str(root / "runs"), pa.table({"entry": [1], "mlflow_run_id": ["r1"], "status": [publish.PUBLISHED],
                                                  "tokens": [json.dumps(tokens)]}))
    write_deltalake(str(root / SEMANTIC_IDS_TABLE), pa.table({
        "active": [True, True, False, True], "codes": [[1, 2], [1, 3], [9, 9], [4, 2]]}))
    for name in publish.DESCRIBING:
        table = {"prefix_stats": pa.table({"level": [1, 1], "item_count": [counted - 1, 1]}),
                 "level_stats": pa.table({"level": [1, 2], "used_codes": level_used})}.get(
            name, pa.table({"mlflow_run_id": ["r1"]}))
        write_deltalake(str(root / name), table)


def test_the_checker_counts_the_active_ids_and_their_codes(tmp_path) -> None:
    """check_files (no Spark) compares the statistics with the active IDs: 3 of them, 2 distinct codes at each
    level (the retired row's codes are not counted)."""
    written_set(tmp_path / "ok", [2, 2], counted=3)
    assert publish.check_files(str(tmp_path / "ok")) == ([], [])
    written_set(tmp_path / "codes", [3, 2], counted=3)
    assert publish.check_files(str(tmp_path / "codes"))[0] == ["level_stats does not match the codes of the active IDs"]
    written_set(tmp_path / "count", [2, 2], counted=4)
    assert publish.check_files(str(tmp_path / "count"))[0] == [
        "prefix_stats counts 4 items at level 1, semantic_ids has 3 active IDs"]


@pytest.mark.parametrize("fmt", ["delta", "parquet"])
def test_the_runs_table_records_each_models_digest_and_a_table_from_before_keeps_its_schema(spark, tmp_path, fmt):
    """A new runs table records the digest of the model that published; one written before the digest was recorded
    (its schema without the column) takes later entries without it, and reads them as recording none."""
    new = io.OutputLocation.for_path(str(tmp_path / "new"), fmt=fmt)
    history: list[publish.Entry] = []
    publish.record(spark, new, history, "run-1", publish.PENDING, {}, model=("m", "1"), model_sha256="a" * 64)
    publish.record(spark, new, history, "run-1", publish.PUBLISHED, {}, model=("m", "1"), model_sha256="a" * 64)
    publish.record(spark, new, history, "run-2", publish.PUBLISHED, {}, model=("m", "2"), model_sha256="b" * 64)
    read = publish.entries(spark, new)
    assert [(e.model_version, e.model_sha256) for e in read] == [("1", "a" * 64), ("1", "a" * 64), ("2", "b" * 64)]
    assert publish.model_digest(read, ("m", "1")) == "a" * 64 and publish.model_digest(read, ("m", "2")) == "b" * 64
    assert publish.model_digest(read, ("m", "3")) is None and publish.model_digest(read, ("other", "1")) is None

    old = io.OutputLocation.for_path(str(tmp_path / "old"), fmt=fmt)
    first = (1, "run-0", publish.PUBLISHED, None, "m", "1", False, None, "{}")
    io.write_table(spark.createDataFrame([first], publish._LEGACY_RUNS_SCHEMA).withColumn(
        "recorded_at", F.current_timestamp()), old, publish.RUNS_TABLE, mode="append")
    history = publish.entries(spark, old)
    publish.record(spark, old, history, "run-1", publish.PUBLISHED, {}, model=("m", "1"), model_sha256="a" * 64)
    assert "model_sha256" not in io.read_table(spark, old, publish.RUNS_TABLE).columns
    read = publish.entries(spark, old)
    assert [(e.run_id, e.model_sha256) for e in read] == [("run-0", None), ("run-1", None)]
    assert publish.model_digest(read, ("m", "1")) is None  # nothing recorded: not checked
