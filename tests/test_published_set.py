"""A run's tables are published as one set: kill -9 at every stage boundary and publish step.

One trained generation on a small catalog; then, for each kill point, a copy of its tables gets a run
(incremental with the champion, or a retrain) that is killed there. Right after the kill the last
published entry of ``runs`` still names a readable, consistent set; the next start puts every table's
latest version back to one run's set (rolled back, or completed when the IDs were already committed),
marks the killed MLflow run FAILED and removes the killed engine's scratch folder; the rerun then
publishes exactly what an uninterrupted run does.
"""
from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import helpers
import mlflow
import pyarrow as pa
import pytest
from deltalake import DeltaTable

import pipelines.registry as registry
from pipelines import publish
from pipelines.demo import write_demo_catalog
from pipelines.schema import (
    LEVEL_STATS_TABLE,
    PREFIX_STATS_TABLE,
    REJECTS_TABLE,
    RUN_REJECTS_TABLE,
    RUNS_TABLE,
    SEMANTIC_IDS_TABLE,
)
from rqvae.synthetic import CatalogSpec

pytestmark = [pytest.mark.spark, pytest.mark.usefixtures("job_isolation")]

MODEL, DIM = "csid-set", 16
CHAMPION = f"models:/{MODEL}@champion"
TRAIN = ["--sample-size", "800", *helpers.SMALL_MODEL, *helpers.GATE_OFF, "--model-name", MODEL, "--experiment", MODEL,
         "--max-id-churn", "1"]



@pytest.fixture(scope="module")
def base(tmp_path_factory) -> dict[str, Path]:
    """A published first generation (tables + MLflow store), and the next catalog: new items and bad rows."""
    root = tmp_path_factory.mktemp("set")
    first, second = root / "catalog-0", root / "catalog-1"
    write_demo_catalog(root / "demo", CatalogSpec(n_items=1000, dim=DIM, seed=3))
    table = helpers.read_delta(root / "demo").select(["item_id", "embedding"])
    ids, vectors = table["item_id"].to_pylist(), table["embedding"].to_pylist()
    bad = [None, [0.0] * DIM]  # each catalog has bad rows: every published set has its run's rejects
    helpers.write_delta(first, helpers.catalog_table([*ids, 9_000_000, 9_000_001], [*vectors, *bad],
                                                     id_type=pa.int64()))
    more = [*helpers.random_vectors(60, DIM, seed=4).tolist(), *bad]
    helpers.write_delta(second, helpers.catalog_table([*ids, *range(10_000_000, 10_000_000 + len(more))],
                                                      [*vectors, *more], id_type=pa.int64()))
    rc, _, err = helpers.run_main(["--input", first, "--work-dir", root / "work", "--output", root / "tables", *TRAIN])
    assert rc == 0, err[-3000:]
    return {"root": root, "work": root / "work", "tables": root / "tables", "catalog": second}


def copy_world(base: dict[str, Path], dst: Path) -> tuple[Path, Path]:
    shutil.copytree(base["tables"], dst / "tables")
    shutil.copytree(base["work"], dst / "work")
    return dst / "tables", dst / "work"


def job_args(base: dict[str, Path], tables: Path, work: Path, train: bool) -> list[str]:
    args = ["--input", base["catalog"], "--work-dir", work, "--output", tables]
    return [*args, *TRAIN] if train else [*args, "--model", CHAMPION, "--model-name", MODEL, "--experiment", MODEL]


def versions(tables: Path) -> dict[str, int]:
    return {name: DeltaTable(str(tables / name)).version() for name in publish.SET_TABLES}


def published_entry(tables: Path) -> dict:
    rows = DeltaTable(str(tables / RUNS_TABLE)).to_pyarrow_table().to_pylist()
    return max((r for r in rows if r["status"] == publish.PUBLISHED), key=lambda r: r["entry"])


def check_set(tables: Path, at: dict[str, int] | None = None) -> str:
    """The set at ``at`` (the latest versions when None) is one run's: that run's rejects, and prefix and
    level statistics that count exactly the table's active IDs. Returns the run."""
    def read(name: str):  # noqa: ANN202
        return DeltaTable(str(tables / name), version=None if at is None else at[name]).to_pyarrow_table()

    ledger = read(SEMANTIC_IDS_TABLE).to_pylist()
    active = [r for r in ledger if r["active"]]
    runs = {r["mlflow_run_id"] for r in read(REJECTS_TABLE).to_pylist()}
    assert len(runs) == 1, runs  # the catalogs here always have bad rows
    level1 = [r for r in read(PREFIX_STATS_TABLE).to_pylist() if r["level"] == 1]
    assert sum(r["item_count"] for r in level1) == len(active)
    used = {r["level"]: r["used_codes"] for r in read(LEVEL_STATS_TABLE).to_pylist()}
    assert used == {lv: len({r["codes"][lv - 1] for r in active}) for lv in (1, 2, 3)}
    return runs.pop()


def mlflow_status(work: Path, run_id: str) -> str:
    mlflow.set_tracking_uri(f"sqlite:///{work / 'mlflow.db'}")
    return mlflow.get_run(run_id).info.status


# (kill point, retrain?): every stage boundary of a daily run, every publish step, and a retrain's own points.
KILL_POINTS = [("after-validate", False), ("after-encode", False), ("after-drift", False),
               ("describing-written", False), ("pending-recorded", False), ("semantic-ids-committed", False),
               ("published", False), ("after-publish", False), ("after-train", True), ("after-evaluate", True),
               ("semantic-ids-committed", True)]


@pytest.fixture(scope="module")
def uninterrupted(base, tmp_path_factory) -> dict[bool, set]:
    """What each kind of run publishes when nothing stops it: (item, semantic_id, active) rows."""
    out = {}
    for train in (False, True):
        tables, work = copy_world(base, tmp_path_factory.mktemp(f"reference-{train}"))
        rc, _, err = helpers.run_main(job_args(base, tables, work, train))
        assert rc == 0, err[-3000:]
        out[train] = {(r["item_id"], r["semantic_id"], r["active"])
                      for r in DeltaTable(str(tables / SEMANTIC_IDS_TABLE)).to_pyarrow_table().to_pylist()}
    return out


@pytest.mark.parametrize("point,train", KILL_POINTS, ids=[f"{p}{'-retrain' if t else ''}" for p, t in KILL_POINTS])
def test_a_run_killed_anywhere_leaves_one_runs_set_and_a_rerun_completes_it(base, uninterrupted, tmp_path, point,
                                                                            train, monkeypatch) -> None:
    tables, work = copy_world(base, tmp_path)
    before, first_run = versions(tables), check_set(tables)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    proc = subprocess.run([sys.executable, str(helpers.ROOT / "jobs" / "tokenize_catalog.py"),
                           *map(str, job_args(base, tables, work, train))],
                          cwd=tmp_path, env=helpers.subprocess_env(CSID_KILL_AT=point, TMPDIR=str(scratch)),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, (proc.stdout[-2000:], proc.stderr[-3000:])
    killed_run = proc.stdout.split("published together as run ")[-1].split()[0] if point in (
        "published", "after-publish") else None

    # Right after the kill: the last published entry names a consistent set, readable at its versions.
    entry = published_entry(tables)
    at = {name: int(v) for name, v in json.loads(entry["tokens"]).items()}
    assert check_set(tables, at) == entry["mlflow_run_id"]
    if killed_run is None and point != "semantic-ids-committed":
        assert entry["mlflow_run_id"] == first_run and at == before  # nothing of the killed run is published
    assert any(scratch.iterdir())  # the killed engine's scratch folder
    registry.configure_tracking(work)  # a model registered but not published is @candidate, never @champion
    assert registry.alias_version(MODEL, registry.CHAMPION) == "1"
    problems, notes = publish.check_files(str(tables))  # the checker (delta-rs) agrees, and sees the stale tables
    assert problems == [], problems
    # notes: tables a stopped run rewrote, or (once its set is published) a report still of the run before
    assert bool(notes) == (point not in ("after-validate", "after-encode", "after-drift", "after-train",
                                         "after-evaluate")), notes

    # The next start puts the latest versions right; then the rerun publishes what an uninterrupted run does.
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # the rerun's engine scratch goes where the killed one's is
    rc, out, err = helpers.run_main(job_args(base, tables, work, train))
    assert rc == 0, err[-3000:]
    assert check_set(tables) == published_entry(tables)["mlflow_run_id"]
    assert publish.check_files(str(tables)) == ([], [])  # latest versions and report: the published run's
    rows = {(r["item_id"], r["semantic_id"], r["active"])
            for r in DeltaTable(str(tables / SEMANTIC_IDS_TABLE)).to_pyarrow_table().to_pylist()}
    if point == "semantic-ids-committed":  # the killed run's IDs were committed: its set was completed
        assert "is now marked published" in out, out[-3000:]
    elif killed_run is None:
        assert "rolled back" in out or point.startswith("after-") and point != "after-publish", out[-3000:]
    if not (point == "semantic-ids-committed" and train):  # a completed retrain is followed by another one
        assert rows == uninterrupted[train]
    failed = out.split(" of a job that was killed is now marked FAILED")[0].split("MLflow run ")[-1]
    # The killed run's, ended by the next start: FAILED, unless its set was completed (it published its IDs).
    assert mlflow_status(work, failed) == ("FINISHED" if point == "semantic-ids-committed" else "FAILED")
    assert not [p for p in scratch.iterdir() if p.name.startswith("csid-engine-")]  # its scratch folder removed
    if point == "semantic-ids-committed" and train:  # completed: its model became @champion, as it would have
        assert f"{MODEL} version 2 is now @champion (the move that run did not get to make)" in out, out[-3000:]
        registry.configure_tracking(work)
        assert registry.alias_version(MODEL, registry.CHAMPION) == "3"  # and the rerun's retrain after it
    assert not list(tables.glob(".*staging*")) and not list(tables.glob(".*backup*"))
    assert not (tables / RUN_REJECTS_TABLE).exists()


@pytest.fixture(scope="module")
def parquet_base(base, tmp_path_factory) -> dict[str, Path]:
    """The same first generation written as Parquet (tables in folders, no versions)."""
    root = tmp_path_factory.mktemp("parquet")
    rc, _, err = helpers.run_main(["--input", base["root"] / "catalog-0", "--work-dir", root / "work", "--output",
                                   root / "tables", "--format", "parquet", *TRAIN])
    assert rc == 0, err[-3000:]
    return {**base, "root": root, "work": root / "work", "tables": root / "tables"}


def parquet_rows(tables: Path) -> set:
    return {(r["item_id"], r["semantic_id"], r["active"])
            for r in helpers.read_parquet(tables / SEMANTIC_IDS_TABLE).to_pylist()}


@pytest.mark.parametrize("point", ["describing-written", "semantic-ids-committed"])
def test_a_killed_parquet_run_is_rolled_back_from_the_copies_it_kept(parquet_base, tmp_path, point) -> None:
    """Parquet has no versions: a run keeps each folder it replaces until its set is published, so the next
    start can put them back (or drop them, once the IDs are committed)."""
    reference, work = copy_world(parquet_base, tmp_path / "reference")
    args = [*job_args(parquet_base, reference, work, False), "--format", "parquet"]
    assert helpers.run_main(args)[0] == 0
    tables, work = copy_world(parquet_base, tmp_path / "killed")
    before = parquet_rows(tables)
    args = [*job_args(parquet_base, tables, work, False), "--format", "parquet"]
    proc = subprocess.run([sys.executable, str(helpers.ROOT / "jobs" / "tokenize_catalog.py"), *map(str, args)],
                          cwd=tmp_path, env=helpers.subprocess_env(CSID_KILL_AT=point), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert [p.name for p in tables.iterdir() if ".backup-" in p.name]  # the folders the killed run replaced
    if point == "describing-written":
        assert parquet_rows(tables) == before and publish.check_files(str(tables))[0]  # rejects: not the set's
    rc, out, err = helpers.run_main(args)
    assert rc == 0, err[-3000:]
    assert ("rolled back" if point == "describing-written" else "is now marked published") in out, out[-3000:]
    assert publish.check_files(str(tables)) == ([], [])
    assert parquet_rows(tables) == parquet_rows(reference)
    assert not [p.name for p in tables.iterdir() if ".backup-" in p.name or ".staging-" in p.name]
