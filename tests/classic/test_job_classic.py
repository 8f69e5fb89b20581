"""The tokenize job on classic JVM Spark: spark-submit with Parquet output, and Delta refused with the fix named.

Runs only inside ``tests/test_classic_engine.py``'s subprocess (``CSID_CLASSIC_TESTS=1``).
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import helpers
import numpy as np
import pyarrow as pa
import pyspark
import pytest

from jobs.tokenize_catalog import main
from pipelines import publish
from pipelines.session import DeltaNotAvailableError, delta_maven_coordinate, start_session
from rqvae import load_checkpoint
from rqvae.synthetic import CatalogSpec, make_catalog

pytestmark = [pytest.mark.spark, pytest.mark.classic]

SPARK_SUBMIT = Path(pyspark.__file__).parent / "bin" / "spark-submit"
JOB = helpers.ROOT / "jobs" / "tokenize_catalog.py"
N_ITEMS, DIM = 800, 16
# The message must name the Maven coordinate of the installed delta-spark (with or without a Spark suffix).
DELTA_PACKAGES = rf"--packages io\.delta:delta-spark_(\d+\.\d+_)?2\.13:{re.escape(version('delta-spark'))}"


def test_spark_submit_writes_parquet_tables(tmp_path) -> None:
    # The whole job on the JVM: validate, sample, train (driver), MLflow, encode, uniquify, Parquet, report.
    work = tmp_path / "work"
    proc = subprocess.run(
        [str(SPARK_SUBMIT), "--master", "local[2]", "--conf", "spark.ui.enabled=false",
         "--conf", "spark.driver.memory=1g", str(JOB), "--engine", "spark", "--format", "parquet",
         "--demo", "--demo-items", str(N_ITEMS), "--demo-dim", str(DIM), "--shuffle-partitions", "4",
         "--sample-size", "600", *helpers.SMALL_MODEL, *helpers.GATE_OFF, "--work-dir", str(work),
         "--collision-alternatives", "2"],  # of 16 codes: the second chance runs on the JVM too
        cwd=tmp_path, env=helpers.subprocess_env(PYSPARK_PYTHON=sys.executable), capture_output=True, text=True,
        timeout=580,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    assert f"{N_ITEMS} semantic IDs written" in proc.stdout

    tables = work / "tables"
    sids = helpers.read_parquet(tables / "semantic_ids")
    rows = helpers.by_item(sids)
    assert sids.num_rows == N_ITEMS and sorted(rows) == list(range(N_ITEMS))
    assert len(set(sids.column("semantic_id").to_pylist())) == N_ITEMS
    assert {(r["model_name"], r["model_version"]) for r in rows.values()} == {("catalog-semantic-ids", "1")}
    helpers.assert_suffix_contract(list(rows.values()))
    (checkpoint,) = (work / "checkpoints").glob("*.pt")
    x = make_catalog(CatalogSpec(N_ITEMS, DIM, seed=0)).embeddings
    model = load_checkpoint(checkpoint)
    expected = helpers.issued_codes(model, x, list(range(N_ITEMS)))
    np.testing.assert_array_equal(np.array([rows[i]["codes"] for i in range(N_ITEMS)]), expected.codes)
    gained = int((expected.codes != helpers.issued_codes(model, x, list(range(N_ITEMS)), second_chance=False).codes)
                 .any(axis=1).sum())
    assert gained > 0 and f"second chance: {gained} items still sharing" in proc.stdout, proc.stdout[-3000:]
    assert helpers.read_parquet(tables / "rejects").num_rows == 0
    assert (tables / "report" / "prefix_summary.json").is_file()
    assert not list(tables.glob(".*staging*")) and not list(tables.glob(".*backup*"))

    helpers.assert_sid_checker_passes(tables / "semantic_ids", "--parquet", "--levels", "3", "--codebook-size", "16",
                                      "--catalog", work / "demo_catalog", "--rejects", tables / "rejects")


def test_delta_on_a_session_without_delta_names_the_fix(classic_spark, tmp_path, capsys) -> None:
    assert classic_spark.range(2).count() == 2  # the active session the job attaches to
    rc = main(["--engine", "spark", "--format", "delta", "--demo", "--demo-items", "50", "--demo-dim", "4",
               "--work-dir", str(tmp_path)])
    assert rc == 2
    err = capsys.readouterr().err
    assert re.search(DELTA_PACKAGES, err), err
    assert "--format parquet" in err
    assert not (tmp_path / "demo_catalog").exists()  # failed at start, before any stage
    assert classic_spark.range(3).count() == 3  # the job did not stop a session it does not own


def test_start_session_raises_the_typed_error(classic_spark) -> None:
    with pytest.raises(DeltaNotAvailableError, match=DELTA_PACKAGES + r".*--format parquet"):
        start_session("spark", want_delta=True)
    assert classic_spark.range(1).count() == 1


def test_an_attached_session_is_used_as_it_is(classic_spark) -> None:
    # A notebook's (or a platform's) session: the job neither re-configures it nor stops it.
    from pipelines.session import DELTA_SNAPSHOT_PARTITIONS

    es = start_session("spark", want_delta=False)
    assert es.spark is classic_spark
    es.stop()
    assert classic_spark.conf.get(DELTA_SNAPSHOT_PARTITIONS, None) is None
    assert classic_spark.range(2).count() == 2


def run_job(*args: str | Path, cwd: Path, extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``python jobs/tokenize_catalog.py ARGS`` in a fresh process (its own JVM when --engine spark)."""
    env = helpers.subprocess_env(SPARK_MASTER="local[2]", SPARK_DRIVER_MEMORY="1g", **(extra_env or {}))
    env.pop("PYSPARK_SUBMIT_ARGS", None)
    return subprocess.run([sys.executable, str(JOB), *map(str, args)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=580)


def write_parquet(path: Path, ids: np.ndarray, vectors: np.ndarray) -> Path:
    """A one-file Parquet catalog (item_id, embedding as list<float>) in a new folder ``path``."""
    import pyarrow.parquet as pq

    path.mkdir()
    pq.write_table(pa.table({"item_id": pa.array(ids), "embedding": pa.array(list(vectors), pa.list_(pa.float32()))}),
                   path / "part-0.parquet")
    return path


def test_the_job_on_classic_spark_with_delta_issues_the_embedded_engines_ids(tmp_path) -> None:
    # spark-submit with the Delta jars that match pyspark (as the README says), Delta written on the
    # JVM; then an incremental run from plain python, where the job builds its own session and
    # delta-spark's pip helper fetches the jars: the ledger's MERGE on the JVM.
    demo = ["--demo", "--demo-items", N_ITEMS, "--demo-dim", DIM, "--sample-size", 600, *helpers.SMALL_MODEL,
            *helpers.GATE_OFF]
    env = helpers.subprocess_env(PYSPARK_PYTHON=sys.executable)
    env.pop("PYSPARK_SUBMIT_ARGS", None)
    classic = subprocess.run(
        [str(SPARK_SUBMIT), "--master", "local[2]", "--conf", "spark.ui.enabled=false",
         "--conf", "spark.driver.memory=1g", "--packages", delta_maven_coordinate(),
         "--conf", "spark.sql.extensions=io.delta.sql.DeltaSparkSessionExtension",
         "--conf", "spark.sql.catalog.spark_catalog=org.apache.spark.sql.delta.catalog.DeltaCatalog",
         str(JOB), "--engine", "spark", "--shuffle-partitions", "4", *map(str, demo),
         "--read-embeddings", "engine",  # the JVM reads the embeddings here; the embedded run's UDF reads the files
         "--work-dir", str(tmp_path / "classic")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=580)
    assert classic.returncode == 0, (classic.stdout + classic.stderr)[-5000:]
    assert "the engine reads the embeddings (" in classic.stdout
    embedded = run_job("--engine", "local", *demo, "--work-dir", tmp_path / "embedded", cwd=tmp_path)
    assert embedded.returncode == 0, (embedded.stdout + embedded.stderr)[-5000:]
    assert "the encode UDF reads the embeddings from " in embedded.stdout
    tables = tmp_path / "classic" / "tables"
    on_jvm = helpers.by_item(helpers.read_delta(tables / "semantic_ids"))
    on_sail = helpers.by_item(helpers.read_delta(tmp_path / "embedded" / "tables" / "semantic_ids"))
    assert len(on_jvm) == N_ITEMS
    assert {i: r["semantic_id"] for i, r in on_jvm.items()} == {i: r["semantic_id"] for i, r in on_sail.items()}
    helpers.assert_sid_checker_passes(tables / "semantic_ids", "--catalog", tmp_path / "classic" / "demo_catalog",
                                      "--rejects", tables / "rejects")

    import json

    from deltalake import DeltaTable

    published = DeltaTable(str(tables / "semantic_ids")).version()
    catalog = DeltaTable(str(tmp_path / "classic" / "demo_catalog")).to_pyarrow_table()
    keep = [i for i in range(catalog.num_rows) if catalog.column("item_id")[i].as_py() % 40]  # 20 leave
    extra = make_catalog(CatalogSpec(15, DIM, seed=9))
    bad = [float("nan")] * DIM  # one row the run must reject, with its reason
    grown = helpers.write_delta(tmp_path / "grown", pa.concat_tables([
        catalog.take(keep).select(["item_id", "embedding"]),
        helpers.catalog_table([*(extra.item_ids + 10_000).tolist(), 20_000], [*extra.embeddings, bad],
                              list_type=catalog.schema.field("embedding").type,
                              id_type=catalog.schema.field("item_id").type)]))
    incremental = ["--engine", "spark", "--shuffle-partitions", 4, "--input", grown, "--output", tables,
                   "--mode", "incremental", "--model", "models:/catalog-semantic-ids@champion",
                   "--work-dir", tmp_path / "classic"]
    # Killed after it recorded its pending entry, before the ID commit: the published version stays
    # the latest, and reading it by version (time travel) gives exactly the published IDs.
    killed = run_job(*incremental, cwd=tmp_path, extra_env={"CSID_KILL_AT": "pending-recorded"})
    assert killed.returncode == -signal.SIGKILL, (killed.stdout + killed.stderr)[-3000:]
    assert DeltaTable(str(tables / "semantic_ids")).version() == published
    at_published = DeltaTable(str(tables / "semantic_ids"), version=published).to_pyarrow_table()
    assert {r["item_id"]: r["semantic_id"] for r in at_published.to_pylist()} == {
        i: r["semantic_id"] for i, r in on_jvm.items()}
    again = run_job(*incremental, cwd=tmp_path)  # recovers the killed run's leftovers first
    assert again.returncode == 0, (again.stdout + again.stderr)[-5000:]
    rejects = helpers.read_delta(tables / "rejects").to_pylist()
    assert [(r["item_id"], r["reason"]) for r in rejects] == [(20_000, "nan_or_inf_in_embedding")]
    rows = helpers.read_delta(tables / "semantic_ids").to_pylist()
    active = {r["item_id"]: r["semantic_id"] for r in rows if r["active"]}
    assert len(active) == len(keep) + 15
    assert all(active[i] == on_jvm[i]["semantic_id"] for i in active if i < 10_000)  # no published ID moved
    assert len({r["semantic_id"] for r in rows}) == len(rows) == N_ITEMS + 15
    assert DeltaTable(str(tables / "semantic_ids")).version() == published + 1  # one MERGE commit
    helpers.assert_sid_checker_passes(tables / "semantic_ids", "--previous-version", published)
    # On a local master the daily run's describing tables (the first run's engine created them) were collected and
    # overwritten by delta-rs from the driver, with the schema Delta on Spark gives a frame: every column nullable,
    # the run's instant a `timestamp`.
    for name in publish.DESCRIBING:
        table = DeltaTable(str(tables / name))
        assert table.history(1)[0]["clientVersion"].startswith("delta-rs"), name
        fields = json.loads(table.schema().to_json())["fields"]
        assert fields and all(f["nullable"] and f["type"] != "timestamp_ntz" for f in fields), (name, fields)
    levels = len(next(iter(on_jvm.values()))["codes"])
    assert helpers.read_delta(tables / "level_stats").num_rows == levels
    assert helpers.read_delta(tables / "prefix_stats").num_rows > 0


@pytest.mark.parametrize("fmt", ["delta", "parquet"])
def test_a_table_written_by_both_engines_in_turn_stays_readable_by_each(tmp_path, fmt) -> None:
    """A first run on the embedded engine, a daily run on classic Spark, a daily run on the embedded engine again.
    Classic Spark writes Parquet timestamps as INT96 by default, which the embedded engine then could not read back
    (a Delta table it created: "Cannot cast column 'tokenized_at'"; a Parquet runs folder: "Fail to merge schema
    field 'recorded_at'"), so every later run on the table failed; the job's own classic sessions write them as
    TIMESTAMP_MICROS. No published ID moves on the way."""
    import pyarrow.parquet as pq

    work, out = tmp_path / "work", tmp_path / "tables"
    catalog = make_catalog(CatalogSpec(300, DIM, seed=4))
    common = ["--format", fmt, "--work-dir", work, "--output", out]
    daily = [*common, "--stages", "validate,encode", "--model", "models:/catalog-semantic-ids@champion"]
    first = write_parquet(tmp_path / "catalog-0", catalog.item_ids, catalog.embeddings)
    ran = run_job("--engine", "local", *common, "--input", first, "--sample-size", 300, *helpers.SMALL_MODEL,
                  *helpers.GATE_OFF, cwd=tmp_path)
    assert ran.returncode == 0, (ran.stdout + ran.stderr)[-3000:]
    read = helpers.read_delta if fmt == "delta" else helpers.read_parquet
    published = {r["item_id"]: r["semantic_id"] for r in read(out / "semantic_ids").to_pylist()}
    ids, vectors = catalog.item_ids, catalog.embeddings
    for round_, engine in enumerate(("spark", "local"), start=1):
        extra = make_catalog(CatalogSpec(10, DIM, seed=10 + round_))
        ids = np.concatenate([ids, extra.item_ids + 1000 * round_])
        vectors = np.concatenate([vectors, extra.embeddings])
        grown = write_parquet(tmp_path / f"catalog-{round_}", ids, vectors)
        ran = run_job("--engine", engine, *daily, "--input", grown, cwd=tmp_path)
        assert ran.returncode == 0, f"{engine}: {(ran.stdout + ran.stderr)[-3000:]}"
        assert "10 rows went through the model" in ran.stdout
    rows = read(out / "semantic_ids").to_pylist()
    active = {r["item_id"]: r["semantic_id"] for r in rows if r["active"]}
    assert sorted(active) == sorted(ids.tolist()) and all(active[i] == sid for i, sid in published.items())
    assert len({r["semantic_id"] for r in rows}) == len(rows) == 320
    files = [f for table in ("semantic_ids", "runs") for f in (out / table).rglob("*.parquet")]
    assert files and all(pq.read_schema(f).field(column).type.unit == "us" for f in files
                         for column in ("tokenized_at", "recorded_at") if column in pq.read_schema(f).names)


def test_an_incremental_run_on_the_jvm_keeps_every_id(tmp_path, capsys) -> None:
    # The ledger's plan (full outer join, window, MERGE-free Parquet rewrite) on classic Spark.
    import pyarrow.parquet as pq

    work, out = tmp_path / "work", tmp_path / "tables"
    catalog = make_catalog(CatalogSpec(300, DIM, seed=4))
    first = write_parquet(tmp_path / "catalog", catalog.item_ids, catalog.embeddings)
    base = ["--engine", "spark", "--format", "parquet", "--work-dir", str(work), "--output", str(out),
            "--shuffle-partitions", "4"]
    assert main([*base, "--input", str(first), "--sample-size", "300", *helpers.SMALL_MODEL, *helpers.GATE_OFF]) == 0
    before = {r["item_id"]: r["semantic_id"] for r in helpers.read_parquet(out / "semantic_ids").to_pylist()}
    extra = make_catalog(CatalogSpec(20, DIM, seed=5))
    keep = [i for i in range(300) if i % 50]  # 6 items leave
    ids = np.concatenate([catalog.item_ids[keep], extra.item_ids + 10_000])
    grown = write_parquet(tmp_path / "grown", ids, np.concatenate([catalog.embeddings[keep], extra.embeddings]))
    assert main([*base, "--input", str(grown), "--stages", "validate,encode", "--model",
                 "models:/catalog-semantic-ids@champion"]) == 0
    rows = helpers.read_parquet(out / "semantic_ids").to_pylist()
    active = {r["item_id"]: r["semantic_id"] for r in rows if r["active"]}
    assert sorted(active) == sorted(ids.tolist())
    assert all(active[i] == before[i] for i in catalog.item_ids[keep].tolist())
    assert {r["item_id"] for r in rows if r["retired_reason"] == "left_catalog"} == {0, 50, 100, 150, 200, 250}
    assert len({r["semantic_id"] for r in rows}) == len(rows) == 320

    # A file appended to the folder: the JVM's Python workers kept the first file's fingerprints in the last
    # run, and read them now instead of its embeddings; only the new file's rows are read and encoded.
    more = make_catalog(CatalogSpec(10, DIM, seed=6))
    pq.write_table(pa.table({"item_id": pa.array(more.item_ids + 20_000),
                             "embedding": pa.array(list(more.embeddings), pa.list_(pa.float32()))}),
                   grown / "part-1.parquet")
    capsys.readouterr()
    assert main([*base, "--input", str(grown), "--stages", "validate,encode", "--model",
                 "models:/catalog-semantic-ids@champion"]) == 0
    said = capsys.readouterr().out
    cache = os.path.abspath(work / "fingerprint_cache")
    assert f"1 of 2 row groups' fingerprints are kept in {cache}" in said, said[-3000:]
    assert "10 rows went through the model" in said
    now = {r["item_id"]: r["semantic_id"] for r in helpers.read_parquet(out / "semantic_ids").to_pylist()
           if r["active"]}
    assert {i: now[i] for i in active} == active and len(now) == len(active) + 10


def test_files_that_are_not_the_engines_are_read_by_the_engine_instead(tmp_path, monkeypatch, capsys) -> None:
    # On a JVM engine the engine's count of the catalog is started at validation and compared with the files the
    # driver listed once the plan is made. Where the two differ (the driver sees other files than the engine reads),
    # the pass and the plan are done again with the engine reading, and nothing of the first pass reaches the table.
    from pipelines import io

    catalog, extra = make_catalog(CatalogSpec(300, DIM, seed=4)), make_catalog(CatalogSpec(12, DIM, seed=5))
    read = write_parquet(tmp_path / "catalog", catalog.item_ids, catalog.embeddings)
    listed = write_parquet(tmp_path / "elsewhere", np.concatenate([catalog.item_ids, extra.item_ids + 10_000]),
                           np.concatenate([catalog.embeddings, extra.embeddings]))
    real_listing = io.embedding_files
    monkeypatch.setattr(io, "embedding_files", lambda source, *args: real_listing(str(listed), *args))
    out = tmp_path / "tables"
    assert main(["--engine", "spark", "--format", "parquet", "--work-dir", str(tmp_path / "work"), "--output",
                 str(out), "--shuffle-partitions", "4", "--input", str(read), "--sample-size", "300",
                 *helpers.SMALL_MODEL, *helpers.GATE_OFF]) == 0
    said = capsys.readouterr().out
    assert (f"the encode UDF reads the embeddings from 1 row group(s) of {listed}" in said
            and "its files hold 312 rows by their footers and the engine reads 300: they are not the engine's "
                "files, so the engine reads the embeddings (the pass and the plan are done again)" in said), \
        said[-3000:]
    rows = helpers.read_parquet(out / "semantic_ids").to_pylist()
    assert sorted(r["item_id"] for r in rows) == sorted(catalog.item_ids.tolist())
    assert "300 rows in, 300 valid, 0 rejected" in said


def test_an_interrupted_swap_stops_a_classic_run_before_any_work(tmp_path, capsys) -> None:
    # On a JVM engine the semantic-ID table's state refuses a run whose output a Parquet swap killed between its
    # renames left with only the previous table's copy: the run stops before any work, with the fix named; a
    # validation error comes first.
    catalog = make_catalog(CatalogSpec(50, DIM, seed=4))
    write_parquet(tmp_path / "catalog", catalog.item_ids, catalog.embeddings)
    out = tmp_path / "tables"
    (out / ".semantic_ids.backup-0123abcd").mkdir(parents=True)
    base = ["--engine", "spark", "--format", "parquet", "--work-dir", str(tmp_path / "work"), "--output", str(out),
            "--shuffle-partitions", "4", "--sample-size", "50", *helpers.SMALL_MODEL, *helpers.GATE_OFF]
    assert main([*base, "--input", str(tmp_path / "catalog")]) == 2
    said = capsys.readouterr()
    assert "is missing but an interrupted write left its previous copy at" in said.err, said.err[-2000:]
    assert "schema ok" in said.out and "==> sample" not in said.out
    assert main([*base, "--input", str(tmp_path / "catalog"), "--id-col", "sku"]) == 2
    said = capsys.readouterr()
    assert "sku" in said.err and "interrupted write" not in said.err, said.err[-2000:]
