"""The Airflow DAGs of jobs/airflow/ in their own virtualenv (jobs/airflow/make_venv.py, made once under
.cache/airflow-venv): the DagBag loads with no import errors, and ``dag.test()`` runs both DAGs end to end
through SparkSubmitOperator (a real spark-submit, Java 17) with the embedded engine on a tiny catalog:
the retrain (generation 1), then the daily run on the grown catalog (only the new items get IDs, one
MERGE), then a retrain whose quality gate fails (exit 3: a failed task without retries, the table and
@champion untouched).

Airflow runs in a subprocess with the venv's python, AIRFLOW_HOME in a tmp dir (SQLite, no scheduler);
the tasks run the job with this process's python.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import helpers
import numpy as np
import pyarrow as pa
import pytest

from rqvae.synthetic import CatalogSpec, make_catalog

pytestmark = [pytest.mark.slow]

DAGS = helpers.ROOT / "jobs" / "airflow"
RETRAIN, DAILY = "catalog_semantic_ids_retrain", "catalog_semantic_ids_daily"
N_ITEMS, DIM, N_NEW = 300, 16, 20
LEAVING = {i for i in range(N_ITEMS) if i % 30 == 0}  # 10 items leave the catalog before the daily run

# Runs in the Airflow venv: the DagBag, the arguments each DAG builds from its params, then dag.test() of
# each run in argv[2] (JSON), one line per result. Retries come 1 s apart here, so a failure that the DAG
# would retry shows as a try_number above 1 instead of a 15-minute wait.
DRIVER = r"""
import json, sys
from datetime import datetime, timedelta, timezone
from airflow.dag_processing.dagbag import DagBag
from airflow.utils import db

db.initdb()
bag = DagBag(dag_folder=sys.argv[1])
import_errors = {k: str(v) for k, v in bag.import_errors.items()}
print("DAGBAG " + json.dumps({"import_errors": import_errors, "dags": {
    dag_id: {"schedule": str(dag.schedule), "max_active_runs": dag.max_active_runs, "tasks": {
        t.task_id: [type(t).__name__, [c.__name__ for c in type(t).__mro__]] for t in dag.tasks},
        "params": sorted(dag.params)} for dag_id, dag in bag.dags.items()}}), flush=True)
if import_errors:
    sys.exit(1)
mod = sys.modules[type(bag.dags["catalog_semantic_ids_daily"].tasks[0]).__module__]
base = {"input": "/lake/catalog"}
print("ARGS " + json.dumps({kind: mod.job_args({**bag.dags[dag_id].params.dump(), **base}, kind) for kind, dag_id in
                           (("retrain", "catalog_semantic_ids_retrain"), ("daily", "catalog_semantic_ids_daily"))}),
      flush=True)
try:
    mod.job_args({**bag.dags["catalog_semantic_ids_daily"].params.dump(), "input": " "}, "daily")
    print("NO_INPUT " + json.dumps(None))
except Exception as e:
    print("NO_INPUT " + json.dumps([type(e).__name__, str(e)]), flush=True)
print("RETRIED " + json.dumps({f"{kind} {code}": mod.retried(kind, code) for kind in ("retrain", "daily")
                               for code in (1, 2, 3, 4, -9, 137)}), flush=True)
for n, run in enumerate(json.loads(sys.argv[2])):
    dag = bag.dags[run["dag_id"]]
    for task in dag.tasks:
        task.retry_delay = timedelta(seconds=1)
    dr = dag.test(run_conf=run["conf"], logical_date=datetime(2026, 1, 5 + n, tzinfo=timezone.utc))
    tis = {ti.task_id: [str(ti.state), ti.try_number] for ti in dr.get_task_instances()}
    print("RESULT " + json.dumps({"dag_id": run["dag_id"], "state": str(dr.state), "tasks": tis}), flush=True)
"""


def _ensure_java() -> None:
    """spark-submit (the operator's launcher) needs Java 17 (``helpers.ensure_java``); the test fails naming the fix."""
    try:
        helpers.ensure_java()
    except helpers.ToolMissing as e:
        pytest.fail(f"spark-submit needs Java: {e}")


@pytest.fixture(scope="module")
def airflow_python() -> Path:
    """The Airflow venv's python, made from jobs/airflow/requirements-airflow.txt if it is not there yet."""
    sys.path.insert(0, str(DAGS))
    try:
        from make_venv import ensure_venv
    finally:
        sys.path.remove(str(DAGS))
    start = time.perf_counter()
    python = ensure_venv()
    print(f"Airflow venv ready in {time.perf_counter() - start:.1f}s: {python}")
    return python


def _catalog(path: Path, ids: np.ndarray, vectors: np.ndarray) -> Path:
    return helpers.write_delta(path, helpers.catalog_table(ids.tolist(), list(vectors), id_type=pa.int64()))


def _published_versions(output: Path) -> list[int]:
    """The semantic_ids Delta version of each published entry of the runs table, in order."""
    entries = sorted((r for r in helpers.read_delta(output / "runs").to_pylist() if r["status"] == "published"),
                     key=lambda r: r["recorded_at"])
    return [int(json.loads(r["tokens"])["semantic_ids"]) for r in entries]


def test_both_dags_run_end_to_end_through_spark_submit(airflow_python: Path, tmp_path: Path) -> None:
    _ensure_java()
    from deltalake import DeltaTable

    first = make_catalog(CatalogSpec(N_ITEMS, DIM, seed=0))
    new = make_catalog(CatalogSpec(N_NEW, DIM, seed=7))
    kept = np.array([i for i in range(N_ITEMS) if i not in LEAVING])
    catalog = _catalog(tmp_path / "catalog", first.item_ids, first.embeddings)
    grown = _catalog(tmp_path / "catalog_grown", np.concatenate([first.item_ids[kept], new.item_ids + 10_000]),
                     np.concatenate([first.embeddings[kept], new.embeddings]))
    output, work = tmp_path / "semids", tmp_path / "work"
    common = {"output": str(output), "work_dir": str(work), "python": sys.executable,
              "extra_args": ["--shuffle-partitions", "2"]}
    small = [*helpers.SMALL_MODEL, "--sample-size", str(N_ITEMS)]
    runs = [
        {"dag_id": RETRAIN, "conf": {**common, "input": str(catalog), "extra_args": [
            *common["extra_args"], *small, *helpers.GATE_OFF]}},
        {"dag_id": DAILY, "conf": {**common, "input": str(grown)}},
        # a quality gate no model passes: exit 3 after training, before anything is written
        {"dag_id": RETRAIN, "conf": {**common, "input": str(grown), "extra_args": [
            *common["extra_args"], *small, "--epochs", "1", "--gate-min-recon-cosine", "1"]}},
    ]
    env = helpers.subprocess_env(
        PYTHONPATH="", AIRFLOW_HOME=str(tmp_path / "airflow_home"), AIRFLOW__CORE__DAGS_FOLDER=str(DAGS),
        AIRFLOW__CORE__LOAD_EXAMPLES="False", AIRFLOW_CONN_SPARK_DEFAULT='{"conn_type": "spark", "host": "local[1]"}',
        CSID_PYTHON=sys.executable, SPARK_HOME="", PYSPARK_SUBMIT_ARGS="", PYSPARK_PYTHON="",
        PYSPARK_DRIVER_PYTHON="")
    start = time.perf_counter()
    proc = subprocess.run([str(airflow_python), "-c", DRIVER, str(DAGS), json.dumps(runs)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    print(f"Airflow: DagBag + {len(runs)} dag.test() runs in {time.perf_counter() - start:.0f}s")
    lines = {kind: [json.loads(line.split(" ", 1)[1]) for line in proc.stdout.splitlines()
                    if line.startswith(kind + " ")] for kind in ("DAGBAG", "ARGS", "NO_INPUT", "RETRIED", "RESULT")}
    assert proc.returncode == 0 and len(lines["RESULT"]) == len(runs), out[-8000:]

    # The DagBag: both DAGs, no import errors, one SparkSubmitOperator task each, one run at a time.
    (bag,) = lines["DAGBAG"]
    assert bag["import_errors"] == {}
    assert set(bag["dags"]) == {RETRAIN, DAILY}
    for dag in bag["dags"].values():
        assert dag["max_active_runs"] == 1
        ((name, mro),) = dag["tasks"].values()
        assert "SparkSubmitOperator" in mro, (name, mro)
        assert {"input", "output", "engine", "model_name", "python", "extra_args"} <= set(dag["params"])
    assert {"max_id_churn", "align"} <= set(bag["dags"][RETRAIN]["params"])
    # The job's arguments from the default params: the two runs of docs/scheduling.md.
    (args,) = lines["ARGS"]
    retrain_args, daily_args = " ".join(args["retrain"]), " ".join(args["daily"])
    assert "--max-id-churn 0.2 --align warm-start" in retrain_args and "--model" not in args["retrain"]
    assert "--model models:/catalog-semantic-ids@champion --stages validate,encode,report" in daily_args
    assert "--input /lake/catalog --engine local" in retrain_args and "--max-id-churn" not in daily_args
    # No catalog given: the task fails at once (no retries), naming the fix.
    ((error, message),) = lines["NO_INPUT"]
    assert error == "AirflowFailException" and "the param input is empty" in message, message

    # Retries: never after exits 2 and 3; a retrain only after exit 4 (it may have published before it stopped).
    (retries,) = lines["RETRIED"]
    assert {k for k, v in retries.items() if v} == {"retrain 4", "daily 1", "daily 4", "daily -9", "daily 137"}

    # The runs: retrain and daily succeed; the gated retrain fails on its first try (exit 3: no retries).
    first_run, daily_run, gated = lines["RESULT"]
    assert (first_run["state"], daily_run["state"], gated["state"]) == ("success", "success", "failed"), out[-8000:]
    assert list(gated["tasks"].values()) == [["failed", 1]], gated
    assert "tokenize_catalog exited 3: a gate failed" in out
    assert "quality gate failed" in out  # the job's own FAILED line is in the task log

    # The table: the retrain issued generation 1; the daily run added the new items only (one MERGE).
    retrain_version, daily_version = _published_versions(output)  # the gated retrain published nothing
    assert DeltaTable(str(output / "semantic_ids")).version() == daily_version == retrain_version + 1
    before = {r["item_id"]: r for r in DeltaTable(str(output / "semantic_ids"), version=retrain_version)
              .to_pyarrow_table().to_pylist()}
    assert sorted(before) == list(range(N_ITEMS)) and all(r["active"] for r in before.values())
    assert len({r["semantic_id"] for r in before.values()}) == N_ITEMS
    assert {(r["generation"], r["model_version"]) for r in before.values()} == {(1, "1")}

    rows = helpers.read_delta(output / "semantic_ids").to_pylist()
    assert len(rows) == N_ITEMS + N_NEW and len({r["semantic_id"] for r in rows}) == len(rows)
    active = {r["item_id"]: r for r in rows if r["active"]}
    assert sorted(active) == sorted([*kept.tolist(), *(new.item_ids + 10_000).tolist()])
    for i, row in before.items():  # every published ID stays: kept items active, the others retired
        (now,) = [r for r in rows if r["item_id"] == i]
        assert now["semantic_id"] == row["semantic_id"] and now["tokenized_at"] == row["tokenized_at"]
        assert now["active"] == (i not in LEAVING)
        assert now["retired_reason"] == ("left_catalog" if i in LEAVING else None)
    added = [r for r in rows if r["item_id"] >= 10_000]
    assert len(added) == N_NEW and {(r["generation"], r["model_version"]) for r in added} == {(1, "1")}
    assert len({r["tokenized_at"] for r in added}) == 1 and added[0]["tokenized_at"] > max(
        r["tokenized_at"] for r in before.values())

    # @champion did not move: version 1 issued every ID; the gated retrain's model is only @candidate.
    from mlflow import MlflowClient

    uri = f"sqlite:///{work / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    assert str(client.get_model_version_by_alias("catalog-semantic-ids", "champion").version) == "1"
    assert str(client.get_model_version_by_alias("catalog-semantic-ids", "candidate").version) == "2"
