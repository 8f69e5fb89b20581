"""Table IO: format detection, output locations, atomic overwrites, Delta versions (Sail engine)."""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from pyspark.sql import functions as F

from pipelines.io import (
    CatalogNotFoundError,
    OutputLocation,
    delta_version,
    detect_format,
    local_path,
    overwrite_independently,
    read_catalog,
    read_table,
    resolve_output,
    swap_directories,
    table_path,
    write_table,
)
from pipelines.schema import REJECTS_TABLE, SEMANTIC_IDS_TABLE


def ids(df) -> list[int]:
    return sorted(r["id"] for r in df.select("id").collect())


def failing_frame(spark, n: int = 400):
    """A frame whose evaluation fails on one row, after other partitions may have been written."""
    boom = F.when(F.col("id") == n - 1, F.raise_error(F.lit("boom: injected failure")))
    return spark.range(n).repartition(4).select(F.coalesce(boom.cast("bigint"), F.col("id")).alias("id"))


def test_output_locations_name_tables_beside_each_other() -> None:
    assert table_path("/data/out/", SEMANTIC_IDS_TABLE) == "/data/out/semantic_ids"
    assert OutputLocation.for_path("s3://b/x").of(REJECTS_TABLE) == "s3://b/x/rejects"
    catalog = resolve_output(None, "main.semids", "delta")
    assert catalog.is_catalog and catalog.of(SEMANTIC_IDS_TABLE) == "main.semids.semantic_ids"
    assert not resolve_output("/out", None, "parquet").is_catalog
    with pytest.raises(ValueError, match="exactly one of --output"):
        resolve_output("/out", "main.semids")
    with pytest.raises(ValueError, match="--format delta or --format parquet"):
        OutputLocation("/out", "csv")
    assert local_path("file:///tmp/x") == Path("/tmp/x") and local_path("s3://b/x") is None


@pytest.mark.spark
def test_read_catalog_detects_delta_parquet_and_table(spark, tmp_path) -> None:
    df = spark.range(5)
    df.write.format("delta").save(str(tmp_path / "d"))
    df.write.parquet(str(tmp_path / "p"))
    assert detect_format(spark, str(tmp_path / "d")) == "delta"
    assert detect_format(spark, str(tmp_path / "p")) == "parquet"
    assert ids(read_catalog(spark, str(tmp_path / "d"))) == ids(read_catalog(spark, f"file://{tmp_path}/p"))
    df.createOrReplaceTempView("csid_io_items")
    assert ids(read_catalog(spark, "csid_io_items")) == [0, 1, 2, 3, 4]


@pytest.mark.spark
def test_read_catalog_errors_name_the_path(spark, tmp_path) -> None:
    with pytest.raises(CatalogNotFoundError, match="nope' does not exist"):
        read_catalog(spark, str(tmp_path / "nope"))
    with pytest.raises(CatalogNotFoundError, match="nope' does not exist"):  # Sail alone returns no columns
        read_catalog(spark, str(tmp_path / "nope"), fmt="parquet")
    with pytest.raises(CatalogNotFoundError, match="rejects' does not exist"):
        read_table(spark, OutputLocation.for_path(str(tmp_path), "parquet"), REJECTS_TABLE)
    with pytest.raises(CatalogNotFoundError, match="'no_such_table' is neither an existing path nor a table"):
        read_catalog(spark, "no_such_table")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty.* is an empty folder, not a table"):
        read_catalog(spark, str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="not a Delta table"):
        read_catalog(spark, str(tmp_path / "empty"), fmt="delta")


@pytest.mark.spark
def test_delta_overwrite_replaces_schema_and_bumps_version(spark, tmp_path) -> None:
    location = OutputLocation.for_path(str(tmp_path))
    path = write_table(spark.range(3), location, SEMANTIC_IDS_TABLE)
    assert path == f"{tmp_path}/semantic_ids" and delta_version(path) == 0
    write_table(spark.range(2).withColumn("extra", F.lit("x")), location, SEMANTIC_IDS_TABLE)
    assert delta_version(path) == 1
    back = read_table(spark, location, SEMANTIC_IDS_TABLE)
    # Without overwriteSchema, Sail would silently drop "extra" (the old table lacks it).
    assert back.columns == ["id", "extra"] and ids(back) == [0, 1]
    more = spark.range(2, 4).withColumn("extra", F.lit("y"))
    write_table(more, location, SEMANTIC_IDS_TABLE, mode="append")
    assert ids(read_table(spark, location, SEMANTIC_IDS_TABLE)) == [0, 1, 2, 3]


def test_an_overwrite_from_the_driver_is_the_engines_delta_write(spark, tmp_path) -> None:
    """delta-rs from this process (classic Spark's describing tables) overwrites a table the engine created: every
    column nullable, nested ones too, as Delta on Spark stores a frame's columns (a NOT NULL the frame implies
    would make the next engine write's schema differ), an aware timestamp as Delta's ``timestamp``, the rows and
    the schema replaced, one version a write; read back by the engine as written. A table not there yet is left
    to the engine (False), which creates it with the session's Delta defaults."""
    import datetime as dt
    import json

    import pyarrow as pa
    from deltalake import DeltaTable

    location = OutputLocation.for_path(str(tmp_path))
    at = dt.datetime(2026, 12, 6, 12, 0, tzinfo=dt.timezone.utc)
    strict = pa.list_(pa.field("element", pa.int32(), nullable=False))
    schema = pa.schema([pa.field("item_id", pa.int64(), nullable=False), ("reason", pa.string()),
                        ("at", pa.timestamp("us", tz="UTC")), pa.field("codes", strict, nullable=False)])
    first = pa.table({"item_id": pa.array([1, 2], pa.int64()), "reason": ["a", None],
                      "at": pa.array([at, at], pa.timestamp("us", tz="UTC")), "codes": pa.array([[1], [2, 3]], strict)},
                     schema=schema)
    assert not overwrite_independently(first, location, REJECTS_TABLE)
    assert delta_version(location.of(REJECTS_TABLE)) is None
    write_table(spark.range(1), location, REJECTS_TABLE)
    assert overwrite_independently(first, location, REJECTS_TABLE)
    table = DeltaTable(location.of(REJECTS_TABLE))
    fields = json.loads(table.schema().to_json())["fields"]
    assert [(f["name"], f["type"], f["nullable"]) for f in fields] == [
        ("item_id", "long", True), ("reason", "string", True), ("at", "timestamp", True),
        ("codes", {"type": "array", "elementType": "integer", "containsNull": True}, True)]
    assert table.version() == 1 and table.history(1)[0]["clientVersion"].startswith("delta-rs")
    back = sorted(read_table(spark, location, REJECTS_TABLE).collect(), key=lambda r: r["item_id"])
    # pyspark hands back the instant as a naive datetime of this machine's zone
    assert [(r["item_id"], r["reason"], r["at"].astimezone(dt.timezone.utc), r["codes"]) for r in back] == [
        (1, "a", at, [1]), (2, None, at, [2, 3])]
    assert overwrite_independently(pa.table({"level": pa.array([3], pa.int32())}), location, REJECTS_TABLE)
    assert DeltaTable(location.of(REJECTS_TABLE)).version() == 2
    assert [tuple(r) for r in read_table(spark, location, REJECTS_TABLE).collect()] == [(3,)]


def test_an_overwrite_from_the_driver_leaves_to_the_engine_what_delta_rs_cannot_write(tmp_path) -> None:
    """Not a local Delta path (Parquet, a catalog table, an object store): False, nothing written. A table with a
    writer feature delta-rs does not know: False, the table at its version (the engine writes it instead)."""
    import json

    import pyarrow as pa
    from deltalake import DeltaTable, write_deltalake

    rows = pa.table({"a": [1]})
    assert not overwrite_independently(rows, OutputLocation.for_path(str(tmp_path / "p"), "parquet"), REJECTS_TABLE)
    assert not overwrite_independently(rows, OutputLocation.for_catalog("main.semids"), REJECTS_TABLE)
    assert not overwrite_independently(rows, OutputLocation.for_path("s3://bucket/tables"), REJECTS_TABLE)
    assert not (tmp_path / "p").exists()

    location = OutputLocation.for_path(str(tmp_path / "d"))
    write_deltalake(location.of(REJECTS_TABLE), rows)
    with open(Path(location.of(REJECTS_TABLE)) / "_delta_log" / f"{1:020d}.json", "w") as log:
        log.write(json.dumps({"protocol": {"minReaderVersion": 1, "minWriterVersion": 7,
                                           "writerFeatures": ["aFeatureOfTheFuture"]}}) + "\n")
    assert not overwrite_independently(pa.table({"b": ["x"]}), location, REJECTS_TABLE)
    table = DeltaTable(location.of(REJECTS_TABLE))
    assert table.version() == 1 and table.to_pyarrow_table().to_pylist() == [{"a": 1}]


@pytest.mark.spark
def test_failed_delta_overwrite_keeps_the_previous_version(spark, tmp_path) -> None:
    location = OutputLocation.for_path(str(tmp_path))
    path = write_table(spark.range(100).repartition(4), location, REJECTS_TABLE)
    with pytest.raises(Exception, match="boom: injected failure"):
        write_table(failing_frame(spark), location, REJECTS_TABLE)
    assert delta_version(path) == 0
    assert ids(read_table(spark, location, REJECTS_TABLE)) == list(range(100))


@pytest.mark.spark
def test_failed_delta_overwrite_from_a_python_udf_keeps_the_previous_version(spark, tmp_path) -> None:
    @F.udf("bigint")
    def explode_on_last(x):  # no type hints: Connect would try to infer a pandas UDF from them
        if x == 399:
            raise RuntimeError("udf failed mid-job")
        return x

    location = OutputLocation.for_path(str(tmp_path))
    path = write_table(spark.range(100), location, REJECTS_TABLE)
    with pytest.raises(Exception, match="udf failed mid-job"):
        failing = spark.range(400).repartition(4).select(explode_on_last("id").alias("id"))
        write_table(failing, location, REJECTS_TABLE)
    assert delta_version(path) == 0
    assert ids(read_table(spark, location, REJECTS_TABLE)) == list(range(100))


@pytest.mark.spark
def test_parquet_overwrite_is_swapped_in_and_failure_keeps_old_data(spark, tmp_path) -> None:
    location = OutputLocation.for_path(str(tmp_path / "out"), "parquet")
    write_table(spark.range(50), location, REJECTS_TABLE)
    with pytest.raises(Exception, match="boom: injected failure"):
        write_table(failing_frame(spark), location, REJECTS_TABLE)
    assert ids(read_table(spark, location, REJECTS_TABLE)) == list(range(50))
    assert os.listdir(tmp_path / "out") == [REJECTS_TABLE]  # staging copy cleaned up
    write_table(spark.range(3).withColumn("x", F.lit(1)), location, REJECTS_TABLE)
    assert ids(read_table(spark, location, REJECTS_TABLE)) == [0, 1, 2]
    assert os.listdir(tmp_path / "out") == [REJECTS_TABLE]  # no backup left behind
    assert delta_version(location.of(REJECTS_TABLE)) is None


def test_swap_rolls_back_when_the_final_rename_fails(tmp_path, monkeypatch) -> None:
    (tmp_path / "new").mkdir()
    (tmp_path / "final").mkdir()
    (tmp_path / "final" / "old.txt").write_text("old")
    real_rename = os.rename

    def rename(src, dst) -> None:
        if Path(src).name == "new":
            raise OSError("disk gone")
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="disk gone"):
        swap_directories(tmp_path / "new", tmp_path / "final")
    assert (tmp_path / "final" / "old.txt").read_text() == "old"
    assert sorted(os.listdir(tmp_path)) == ["final", "new"]


@pytest.mark.spark
def test_catalog_output_uses_save_as_table(spark, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # Sail puts managed tables under ./spark-warehouse
    spark.sql("CREATE DATABASE IF NOT EXISTS csid_io_test")
    location = OutputLocation.for_catalog("csid_io_test")
    try:
        assert write_table(spark.range(3), location, SEMANTIC_IDS_TABLE) == "csid_io_test.semantic_ids"
        write_table(spark.range(5).withColumn("x", F.lit(1)), location, SEMANTIC_IDS_TABLE)
        back = read_table(spark, location, SEMANTIC_IDS_TABLE)
        assert back.columns == ["id", "x"] and ids(back) == [0, 1, 2, 3, 4]
        assert ids(read_catalog(spark, "csid_io_test.semantic_ids")) == [0, 1, 2, 3, 4]
    finally:
        spark.sql("DROP TABLE IF EXISTS csid_io_test.semantic_ids")


def test_delta_version_of_missing_path_is_none(tmp_path) -> None:
    assert delta_version(str(tmp_path / "missing")) is None



def test_engine_path_leaves_safe_paths_and_links_odd_ones(tmp_path) -> None:
    from pipelines.io import engine_path, local_path

    safe = tmp_path / "plain-name_1.x"
    assert engine_path(str(safe)) == str(safe)
    odd = tmp_path / "a b#1 50% ?é"
    linked = engine_path(str(odd), create=True)
    assert odd.is_dir() and Path(linked).is_symlink() and os.readlink(linked) == str(odd)
    assert re.fullmatch(r"[A-Za-z0-9/._-]+", linked)
    assert engine_path(f"file://{odd}") == linked  # a file: URI is the same folder, taken literally
    assert local_path(f"file://{odd}") == odd
    assert engine_path(str(tmp_path / "missing dir")) == str(tmp_path / "missing dir")  # reported by its own name
    assert engine_path("s3://bucket/semids out") == "s3://bucket/semids out"
    with pytest.raises(ValueError, match="'%41'.*rename the folder"):
        engine_path(str(tmp_path / "a%41b"))
    with pytest.raises(ValueError, match="glob pattern"):
        engine_path("s3://bucket/semids*")
