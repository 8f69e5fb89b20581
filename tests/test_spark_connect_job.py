"""The tokenize job through a real Apache Spark Connect server (``--remote sc://...``), with Delta.

The server is pyspark's own ``SparkConnectServer`` with the Delta jars (``tests/spark_connect_server.py``),
one per module, on a free loopback port; the job runs as ``python jobs/tokenize_catalog.py --remote ...``
in a subprocess, as a user would run it. A first run trains and publishes; its IDs must equal those of the
embedded engine (Sail) for the same catalog and seed, and the codes those an in-process encode of its
checkpoint gives; an incremental run through the same server keeps every published ID (one MERGE). A server
without Delta is refused at start with the fix; a server that cannot start fails with its log's tail and
leaves no process behind.

Why in the main test process and not in ``tests/classic``: this process never opens a Spark session for
these tests (the job, the embedded run and the server are all subprocesses; tables are read with
delta-rs), so they cannot clash with the embedded-engine fixture, and they do not lengthen the classic
suite's single subprocess test.
"""
from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import helpers
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable
from spark_connect_server import ConnectServer, ConnectServerError, running_connect_server, start_connect_server

from pipelines.session import delta_maven_coordinate
from rqvae import load_checkpoint
from rqvae.synthetic import CatalogSpec, make_catalog

pytestmark = [pytest.mark.spark, pytest.mark.classic, pytest.mark.slow]

JOB = helpers.ROOT / "jobs" / "tokenize_catalog.py"
N_ITEMS, DIM, SAMPLE = 600, 16, 400  # SAMPLE < N_ITEMS: both engines must pick the same items by id hash
# 2 collision alternatives of 16 codes: some items still share a tuple after the spreading, so the second
# chance (read again, ranked over every code) runs through the server too.
FIRST_RUN = ["--demo", "--demo-items", N_ITEMS, "--demo-dim", DIM, "--format", "delta", "--sample-size", SAMPLE,
             "--shuffle-partitions", 4, *helpers.SMALL_MODEL, *helpers.GATE_OFF, "--collision-alternatives", 2]


def run_job(*args: object, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``python jobs/tokenize_catalog.py ARGS`` in a fresh process (a Connect client, or the embedded engine)."""
    return subprocess.run([sys.executable, str(JOB), *map(str, args)], cwd=cwd, env=helpers.subprocess_env(),
                          capture_output=True, text=True, timeout=580)


def failure(proc: subprocess.CompletedProcess[str], server: ConnectServer | None = None) -> str:
    text = f"rc={proc.returncode}\n{(proc.stdout + proc.stderr)[-5000:]}"
    return text + (f"\n--- server log ({server.log_path}):\n{server.log_tail(40)}" if server else "")


@pytest.fixture(scope="module")
def connect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ConnectServer]:
    with running_connect_server(tmp_path_factory.mktemp("connect-server")) as server:
        yield server
        running = server.leftovers()
    assert any(line.startswith(f"{server.process.pid} ") for line in running), running  # the check sees the JVM
    assert not server.leftovers(), f"the Spark Connect server outlived its fixture: {server.leftovers()}"


@dataclass
class FirstRun:
    """The first (training) run through the server, and what was read right after it."""

    proc: subprocess.CompletedProcess[str]
    server: ConnectServer
    work: Path
    published: int  # the semantic_ids Delta version it published
    rejects: int  # rows of its rejects table
    check: subprocess.CompletedProcess[str] | None  # the shared checker on its set (when the checker exists)

    @property
    def tables(self) -> Path:
        return self.work / "tables"

    def rows(self) -> dict[int, dict]:
        """The published semantic_ids rows by item_id (delta-rs, at the published version)."""
        return helpers.by_item(DeltaTable(str(self.tables / "semantic_ids"), version=self.published).to_pyarrow_table())


@pytest.fixture(scope="module")
def first_run(connect_server: ConnectServer, tmp_path_factory: pytest.TempPathFactory) -> FirstRun:
    work = tmp_path_factory.mktemp("connect-job") / "work"
    # A relative --work-dir (so the output too: work/tables) means the client's folder, not one in the server's
    # working directory (its log folder here).
    proc = run_job("--remote", connect_server.url, *FIRST_RUN, "--work-dir", "work", cwd=work.parent)
    assert proc.returncode == 0, failure(proc, connect_server)
    assert not (connect_server.log_path.parent / "work").exists()
    tables = work / "tables"
    check = None
    if helpers.CHECK_SID_TABLE.is_file():  # now: a later test grows the table
        check = helpers.run_sid_checker(tables / "semantic_ids", "--levels", "3", "--codebook-size", "16",
                                        "--catalog", work / "demo_catalog", "--rejects", tables / "rejects")
    return FirstRun(proc, connect_server, work, DeltaTable(str(tables / "semantic_ids")).version(),
                    helpers.read_delta(tables / "rejects").num_rows, check)


def test_the_job_through_spark_connect_publishes_the_delta_set(first_run: FirstRun) -> None:
    out = first_run.proc.stdout
    assert "==> start engine (remote)" in out
    assert f"{N_ITEMS} semantic IDs written" in out
    rows = first_run.rows()
    assert sorted(rows) == list(range(N_ITEMS))
    assert len({r["semantic_id"] for r in rows.values()}) == N_ITEMS
    assert {(r["model_name"], r["model_version"], r["generation"], r["active"]) for r in rows.values()} == {
        ("catalog-semantic-ids", "1", 1, True)}
    helpers.assert_suffix_contract(list(rows.values()))
    # The codes are the trained model's: an in-process encode of its checkpoint issues the same.
    (checkpoint,) = (first_run.work / "checkpoints").glob("*.pt")
    x = make_catalog(CatalogSpec(N_ITEMS, DIM, seed=0)).embeddings
    model = load_checkpoint(checkpoint)
    expected = helpers.issued_codes(model, x, list(range(N_ITEMS)))
    np.testing.assert_array_equal(np.array([rows[i]["codes"] for i in range(N_ITEMS)]), expected.codes)
    gained = int((expected.codes != helpers.issued_codes(model, x, list(range(N_ITEMS)), second_chance=False).codes)
                 .any(axis=1).sum())
    assert gained > 0 and f"second chance: {gained} items still sharing" in out, out[-3000:]
    assert first_run.rejects == 0
    # Written by the server's JVM (delta-spark), not by the embedded engine or delta-rs.
    history = DeltaTable(str(first_run.tables / "semantic_ids")).history()
    engines = {h.get("engineInfo") for h in history if h["version"] <= first_run.published}
    assert engines and all(str(e).startswith("Apache-Spark/4.") and "Delta-Lake/" in str(e) for e in engines), engines
    # Its timestamps in microseconds (the job sets its session so), not INT96: the embedded engine can run on it later.
    files = list((first_run.tables / "semantic_ids").glob("*.parquet"))
    assert files and {pq.read_schema(f).field("tokenized_at").type.unit for f in files} == {"us"}
    if first_run.check is not None:
        assert first_run.check.returncode == 0, first_run.check.stdout + first_run.check.stderr
        assert "FAIL" not in first_run.check.stdout, first_run.check.stdout


def test_spark_connect_issues_the_embedded_engines_ids(first_run: FirstRun, tmp_path: Path) -> None:
    # Same catalog, seed and flags on the embedded engine: the hash sample, the training (on the client) and
    # the encode (in the engine's Python workers) agree, so every item gets the same ID.
    assert first_run.proc.returncode == 0
    embedded = run_job("--engine", "local", *FIRST_RUN, "--work-dir", tmp_path / "work", cwd=tmp_path)
    assert embedded.returncode == 0, failure(embedded)
    # The script's stderr holds what the job says, not MLflow's INFO lines or its artifact progress bars.
    for proc in (embedded, first_run.proc):
        assert "Downloading artifacts" not in proc.stderr and " INFO mlflow" not in proc.stderr, proc.stderr[-3000:]
    on_sail = helpers.by_item(helpers.read_delta(tmp_path / "work" / "tables" / "semantic_ids"))
    on_connect = first_run.rows()
    assert len(on_sail) == N_ITEMS
    assert {i: r["semantic_id"] for i, r in on_connect.items()} == {i: r["semantic_id"] for i, r in on_sail.items()}
    np.testing.assert_allclose([on_connect[i]["quantization_error"] for i in range(N_ITEMS)],
                               [on_sail[i]["quantization_error"] for i in range(N_ITEMS)], rtol=1e-5)


def test_an_incremental_run_through_spark_connect_keeps_every_id(first_run: FirstRun, tmp_path: Path) -> None:
    # 15 items leave, 15 arrive, one arrives with a NaN: one MERGE on the server's Delta, no published ID moves.
    assert first_run.proc.returncode == 0
    before = first_run.rows()
    catalog = DeltaTable(str(first_run.work / "demo_catalog")).to_pyarrow_table()
    keep = [i for i in range(catalog.num_rows) if catalog.column("item_id")[i].as_py() % 40]
    extra = make_catalog(CatalogSpec(15, DIM, seed=9))
    grown = helpers.write_delta(tmp_path / "grown", pa.concat_tables([
        catalog.take(keep).select(["item_id", "embedding"]),
        helpers.catalog_table([*(extra.item_ids + 10_000).tolist(), 20_000], [*extra.embeddings, [float("nan")] * DIM],
                              list_type=catalog.schema.field("embedding").type,
                              id_type=catalog.schema.field("item_id").type)]))
    proc = run_job("--remote", first_run.server.url, "--input", grown, "--output", first_run.tables,
                   "--mode", "incremental", "--model", "models:/catalog-semantic-ids@champion",
                   "--shuffle-partitions", 4, "--work-dir", first_run.work, cwd=tmp_path)
    assert proc.returncode == 0, failure(proc, first_run.server)
    assert "15 rows went through the model" in proc.stdout  # only the new items were encoded

    table = DeltaTable(str(first_run.tables / "semantic_ids"))
    assert table.version() == first_run.published + 1
    assert table.history(1)[0]["operation"] == "MERGE"
    rows = table.to_pyarrow_table().to_pylist()
    active = {r["item_id"]: r["semantic_id"] for r in rows if r["active"]}
    assert sorted(active) == sorted([*(catalog.column("item_id")[i].as_py() for i in keep),
                                     *(extra.item_ids + 10_000).tolist()])
    assert all(active[i] == before[i]["semantic_id"] for i in active if i < 10_000)
    assert {r["item_id"] for r in rows if r["retired_reason"] == "left_catalog"} == set(range(0, N_ITEMS, 40))
    assert len({r["semantic_id"] for r in rows}) == len(rows) == N_ITEMS + 15
    rejects = helpers.read_delta(first_run.tables / "rejects").to_pylist()
    assert [(r["item_id"], r["reason"]) for r in rejects] == [(20_000, "nan_or_inf_in_embedding")]
    helpers.assert_sid_checker_passes(first_run.tables / "semantic_ids", "--previous-version", first_run.published)


def test_a_server_without_delta_is_refused_at_start_with_the_fix(tmp_path: Path) -> None:
    # pyspark's server without the Delta jars: exit 2 before any stage, naming the --packages line (the
    # server must be restarted with it) and the Parquet alternative; nothing is written.
    with running_connect_server(tmp_path / "server", delta=False) as server:
        proc = run_job("--remote", server.url, "--demo", "--demo-items", 50, "--demo-dim", 4, "--format", "delta",
                       "--work-dir", tmp_path / "work", cwd=tmp_path)
    assert proc.returncode == 2, failure(proc, server)
    assert re.search(rf"no Delta Lake support.*--packages {re.escape(delta_maven_coordinate())}.*--format parquet",
                     proc.stderr), proc.stderr
    assert "==> write demo catalog" not in proc.stdout
    assert not (tmp_path / "work" / "demo_catalog").exists() and not (tmp_path / "work" / "tables").exists()


def test_a_server_that_cannot_start_fails_with_its_log_tail(tmp_path: Path) -> None:
    # A bad master makes spark-submit exit at once: the error says so and quotes the server's own log line.
    with pytest.raises(ConnectServerError, match=r"(?s)exited with code 1 before.*Master must either be") as err:
        start_connect_server(tmp_path, delta=False, master="bogus://nowhere", timeout_s=120)
    assert err.value.server is not None and not err.value.server.leftovers()


def test_a_server_that_does_not_listen_in_time_is_stopped(tmp_path: Path) -> None:
    with pytest.raises(ConnectServerError, match=r"did not listen on 127\.0\.0\.1:\d+ within 1 s.*last lines") as err:
        start_connect_server(tmp_path, delta=False, timeout_s=1)
    assert err.value.server is not None and not err.value.server.leftovers()
