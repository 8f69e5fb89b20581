"""validate + sample + Parquet IO on classic local JVM Spark: same results as on the embedded engine."""
from __future__ import annotations

import os

import helpers
import numpy as np
import pytest
from pyspark.sql import functions as F

from pipelines.encode import encode_embeddings
from pipelines.io import CatalogNotFoundError, OutputLocation, read_catalog, read_table, write_table
from pipelines.sample import collect_training_arrays, sample_for_training
from pipelines.schema import (
    CODES,
    EMBEDDING,
    ITEM_ID,
    REASON,
    REJECTS_TABLE,
    SEMANTIC_IDS_TABLE,
    InputColumns,
)
from pipelines.session import DeltaNotAvailableError
from pipelines.validate import flag_duplicates, validate_catalog, validation_counts

pytestmark = [pytest.mark.spark, pytest.mark.classic]

CASES = helpers.REJECT_CASES  # every bad-input kind, with its reason (as on the embedded engine)
# Must equal the literals in tests/pipelines/test_sample.py (computed there on Sail).
EXPECTED_STRING_IDS_SEED_7 = [
    "item-015", "item-036", "item-043", "item-047", "item-068",
    "item-073", "item-084", "item-149", "item-193", "item-196",
]
EXPECTED_BIGINT_IDS_SEED_3 = [29, 74, 77, 93, 106, 114, 132, 175, 179, 184]


def sorted_ids(df, column: str = ITEM_ID) -> list:
    return sorted(r[column] for r in df.select(column).collect())


def test_validate_quarantines_each_kind_with_its_reason(classic_spark) -> None:
    df = classic_spark.createDataFrame([(i, v) for i, v, _ in CASES], "id string, vec array<double>")
    result = validate_catalog(df, InputColumns(item_id="id", embedding="vec"))
    assert result.dim == 3
    got = sorted((r[ITEM_ID] or "", r[REASON]) for r in result.rejects.collect())
    assert got == helpers.expected_rejects()
    clean = sorted(r[ITEM_ID] for r in result.clean.collect())
    assert clean == sorted(i for i, _, reason in CASES if reason is None)
    assert result.clean.schema[EMBEDDING].dataType.simpleString() == "array<float>"
    assert validation_counts(result).n_rejected + len(clean) == len(CASES)


def test_the_encode_udf_flags_the_same_rows_as_validation(classic_spark) -> None:
    df = classic_spark.createDataFrame([(i, v) for i, v, _ in CASES], "id string, vec array<double>")
    v = validate_catalog(df, InputColumns(item_id="id", embedding="vec"), dim=3)
    out = flag_duplicates(encode_embeddings(v.rows, helpers.untrained_checkpoint(3, codebook_size=4), 3), ids=v.rows)
    rows = out.collect()
    assert len(rows) == len(CASES)
    assert sorted((r[ITEM_ID] or "", r[REASON]) for r in rows if r[REASON]) == helpers.expected_rejects()


def test_sample_picks_the_same_items_as_sail(classic_spark) -> None:
    rows = [(f"item-{i:03d}", [float(i), 1.0]) for i in range(200)]
    items = classic_spark.createDataFrame(rows, "item_id string, embedding array<float>")
    assert sorted_ids(sample_for_training(items, 10, seed=7)) == EXPECTED_STRING_IDS_SEED_7
    repartitioned = sample_for_training(items.repartition(7), 10, seed=7, n_rows=200)
    assert sorted_ids(repartitioned) == EXPECTED_STRING_IDS_SEED_7
    bigint = classic_spark.range(1, 201).selectExpr(f"id AS {ITEM_ID}", "array(1.0f) AS embedding")
    assert sorted_ids(sample_for_training(bigint, 10, seed=3)) == EXPECTED_BIGINT_IDS_SEED_3


def test_collect_training_arrays_through_arrow(classic_spark) -> None:
    rows = [("b", [3.0, 4.0]), ("a", [1.0, 2.0])]
    df = classic_spark.createDataFrame(rows, "item_id string, embedding array<float>")
    arrays = collect_training_arrays(df.repartition(2), dim=2)
    assert arrays.item_ids.tolist() == ["a", "b"]
    assert arrays.embeddings.dtype == np.float32
    np.testing.assert_array_equal(arrays.embeddings, [[1, 2], [3, 4]])


def test_parquet_round_trip_and_atomic_overwrite(classic_spark, tmp_path) -> None:
    location = OutputLocation.for_path(str(tmp_path / "out"), "parquet")
    path = write_table(classic_spark.range(50), location, REJECTS_TABLE)
    assert sorted_ids(read_catalog(classic_spark, path), "id") == list(range(50))
    boom = F.when(F.col("id") == 399, F.raise_error(F.lit("boom: injected failure"))).cast("bigint")
    failing = classic_spark.range(400).repartition(4).select(F.coalesce(boom, F.col("id")).alias("id"))
    with pytest.raises(Exception, match="boom: injected failure"):
        write_table(failing, location, REJECTS_TABLE)
    assert sorted_ids(read_table(classic_spark, location, REJECTS_TABLE), "id") == list(range(50))
    write_table(classic_spark.range(3).withColumn("x", F.lit(1)), location, REJECTS_TABLE)
    back = read_table(classic_spark, location, REJECTS_TABLE)
    assert back.columns == ["id", "x"] and sorted_ids(back, "id") == [0, 1, 2]
    assert os.listdir(tmp_path / "out") == [REJECTS_TABLE]


def test_parquet_overwrite_may_read_its_own_output(classic_spark, tmp_path) -> None:
    """Staging makes "read the old table, write the new one" safe (plain Spark refuses it)."""
    location = OutputLocation.for_path(str(tmp_path), "parquet")
    write_table(classic_spark.range(3), location, SEMANTIC_IDS_TABLE)
    old = read_table(classic_spark, location, SEMANTIC_IDS_TABLE)
    write_table(old.withColumn("id", F.col("id") + 10), location, SEMANTIC_IDS_TABLE)
    assert sorted_ids(read_table(classic_spark, location, SEMANTIC_IDS_TABLE), "id") == [10, 11, 12]


def test_missing_paths_are_named(classic_spark, tmp_path) -> None:
    with pytest.raises(CatalogNotFoundError, match="nope' does not exist.*PATH_NOT_FOUND"):
        read_catalog(classic_spark, str(tmp_path / "nope"), fmt="parquet")
    with pytest.raises(CatalogNotFoundError, match="rejects' does not exist"):
        read_table(classic_spark, OutputLocation.for_path(str(tmp_path), "parquet"), REJECTS_TABLE)


def test_delta_without_delta_support_names_the_fix(classic_spark, tmp_path) -> None:
    with pytest.raises(DeltaNotAvailableError, match="--format parquet"):
        write_table(classic_spark.range(1), OutputLocation.for_path(str(tmp_path)), SEMANTIC_IDS_TABLE)


def test_materialize_computes_the_udf_once(classic_spark, tmp_path) -> None:
    from pipelines.session import EngineSession

    calls = tmp_path / "calls.txt"

    def logged(batches):  # noqa: ANN001, ANN202 - mapInArrow function
        for b in batches:
            with open(calls, "a") as fh:
                fh.write(f"{b.num_rows}\n")
            yield b

    es = EngineSession(classic_spark, "spark", False, _owns_session=False)
    kept = es.materialize(classic_spark.range(300).repartition(3).mapInArrow(logged, "id bigint"))
    assert kept is not None
    assert kept.count() == 300 and kept.where("id < 100").count() == 100
    assert sum(map(int, calls.read_text().split())) == 300  # localCheckpoint: the UDF ran once


@pytest.mark.parametrize("rows", [10, 250_001])
def test_a_frame_of_a_large_arrow_table_is_decoded_by_the_tasks(classic_spark, monkeypatch, rows) -> None:
    """EngineSession.frame_of_arrow: a table above ARROW_ROWS_IN_TASKS rows becomes a frame of parallelism()
    partitions read from its Arrow batches (no local relation), a small one a local relation; the same rows
    and schema either way, and the session's Arrow settings as they were."""
    import pyarrow as pa
    from pyspark.sql import types as T

    from pipelines import session as session_module
    from pipelines.session import EngineSession

    monkeypatch.setattr(session_module, "ARROW_ROWS_IN_TASKS", 1000)
    es = EngineSession(classic_spark, "spark", False, _owns_session=False)
    table = pa.table({"level": pa.array(np.arange(rows) % 3 + 1, pa.int32()),
                      "prefix": pa.array([str(i) for i in range(rows)])})
    table = pa.concat_tables([table.slice(0, 3), table.slice(3)])  # two chunks, as the statistics' levels are
    schema = T.StructType([T.StructField("level", T.IntegerType(), False), T.StructField("prefix", T.StringType())])
    classic_spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", "7777")
    try:
        frame = es.frame_of_arrow(table, schema)
        plan = frame._jdf.queryExecution().executedPlan().toString()
        assert ("LocalTableScan" in plan) == (rows == 10)
        if rows > 10:
            assert frame.rdd.getNumPartitions() == es.parallelism()
        assert frame.schema == schema
        assert frame.count() == rows and frame.agg(F.sum("level")).first()[0] == int(table["level"].to_numpy().sum())
        assert classic_spark.conf.get("spark.sql.execution.arrow.maxRecordsPerBatch") == "7777"
        assert classic_spark.conf.get("spark.sql.execution.arrow.localRelationThreshold") != "0"
    finally:
        classic_spark.conf.unset("spark.sql.execution.arrow.maxRecordsPerBatch")


@pytest.mark.parametrize(("broadcast_up_to", "join"), [(1_000_000, "BroadcastHashJoin"), (0, "SortMergeJoin")])
def test_the_incremental_second_pass_filters_the_catalog_by_broadcast_ids(classic_spark, monkeypatch,
                                                                          broadcast_up_to, join) -> None:
    # A checkpoint's size is unknown to the planner, so without the hint classic Spark sort-merge joins the
    # catalog (every embedding shuffled) with the ids to encode. Automatic broadcasts are off here, so a
    # broadcast in the plan can only come from the hint.
    from pipelines import encode
    from pipelines.encode import encode_catalog
    from pipelines.session import EngineSession

    monkeypatch.setattr(encode, "BROADCAST_IDS", broadcast_up_to)
    vectors = np.random.default_rng(0).normal(size=(20, 3)).astype(np.float32)
    df = classic_spark.createDataFrame([(f"i{i}", [float(x) for x in v]) for i, v in enumerate(vectors)],
                                       f"{ITEM_ID} string, {EMBEDDING} array<float>")
    v = validate_catalog(df, dim=3)
    known = classic_spark.createDataFrame([(f"i{i}", 0) for i in range(15)],
                                          f"{ITEM_ID} string, embedding_fingerprint bigint")
    es = EngineSession(classic_spark, "spark", False, _owns_session=False)
    plans, counted = [], []

    def recording(frame):  # noqa: ANN001, ANN202 - a DataFrame
        plans.append(frame._jdf.queryExecution().executedPlan().toString())
        return es.materialize(frame)

    counting = type(df).count

    def count(frame):  # noqa: ANN001, ANN202 - a DataFrame
        counted.append(frame._jdf.queryExecution().executedPlan().toString())
        return counting(frame)

    monkeypatch.setattr(type(df), "count", count)
    before = classic_spark.conf.get("spark.sql.autoBroadcastJoinThreshold")
    classic_spark.conf.set("spark.sql.autoBroadcastJoinThreshold", "-1")
    try:
        out = encode_catalog(v, helpers.untrained_checkpoint(3, codebook_size=4), materialize=recording, known=known,
                             policy="new")
        coded = sorted(r[ITEM_ID] for r in out.codes.collect() if r[CODES] is not None)
        joined_back = out.codes._jdf.queryExecution().executedPlan().toString()
    finally:
        classic_spark.conf.set("spark.sql.autoBroadcastJoinThreshold", before)
    second = [p for p in plans if "LeftSemi" in p]
    assert len(second) == 1 and join in second[0], second
    # The codes of those rows are joined back onto the catalog's rows the same way: the few rows broadcast.
    assert helpers.join_kinds(joined_back, join) == {"LeftOuter"}, joined_back
    # The rows read again are checked against the catalog's (the same fingerprints): they meet them broadcast too.
    checked = [p for p in counted if "Inner" in p]
    assert len(checked) == 1 and helpers.join_kinds(checked[0], join) == {"Inner"}, counted
    assert out.encoded_rows == 5 and coded == [f"i{i}" for i in range(15, 20)]


@pytest.mark.parametrize("sizes", [[4] * 30, [8] * 5 + [2] * 10])
def test_the_file_reading_encode_gives_each_task_equal_rows(classic_spark, tmp_path, sizes) -> None:
    """The row groups go to the tasks by their rows, one partition each (``repartition(2)`` had dealt 30 equal
    row groups 16 and 14 on this engine: one core encoding alone at the end of the pass)."""
    import pyarrow.parquet as pq

    from pipelines.encode import encode_files
    from pipelines.io import embedding_files

    n = sum(sizes)
    v = helpers.random_vectors(n, 8, seed=4)
    table = helpers.catalog_table([f"i{i}" for i in range(n)], [list(row) for row in v])
    (tmp_path / "catalog").mkdir()
    with pq.ParquetWriter(tmp_path / "catalog" / "part-0.parquet", table.schema) as writer:
        start = 0
        for size in sizes:
            writer.write_table(table.slice(start, size))
            start += size
    files, why = embedding_files(str(tmp_path / "catalog"), "parquet", "item_id", "embedding")
    assert why == "" and files is not None and len(files.row_groups) == len(sizes)
    out = encode_files(classic_spark, files, helpers.untrained_checkpoint(8, codebook_size=4), 8, id_type="string",
                       tasks=2, fingerprints=True, encode=False)
    assert out.rdd.glom().map(len).collect() == [n // 2, n // 2]
    assert sorted(r[ITEM_ID] for r in out.collect()) == sorted(f"i{i}" for i in range(n))
