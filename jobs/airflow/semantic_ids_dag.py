"""Airflow DAGs for the two scheduled runs of the semantic-ID job (docs/airflow.md, docs/scheduling.md).

    catalog_semantic_ids_retrain  weekly: train, quality gate, a full run aligned to the table's generation
                                  (warm start + relabelled codes), the ID churn gate (--max-id-churn); a run
                                  that passes publishes and moves @champion
    catalog_semantic_ids_daily    daily: the @champion model tokenizes only what is new (incremental: one
                                  Delta MERGE, every published ID stays as it is)

Each DAG has one task: a SparkSubmitOperator (apache-airflow-providers-apache-spark) whose application is
jobs/tokenize_catalog.py, with its arguments, spark-submit options and launcher environment built from the
run's params when the task starts (trigger with a conf to override any of them).

The job's exit code decides the task's fate, so nothing is hidden: 0 success; 2 (bad arguments or input)
and 3 (a gate failed: quality, or ID churn) fail the task at once, without retries, since a rerun would
fail the same way; 4 (another run is writing the output) and anything else fail it and Airflow retries, except
that a retrain is retried only after exit 4: stopped after its commit it has published a generation, and a retry
would publish another (see ``retried``).

Airflow runs in its own virtualenv (jobs/airflow/make_venv.py); the job runs with the project's python
(param ``python``), whose pyspark also provides spark-submit unless ``spark_home`` names another Spark.
"""
from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from airflow.providers.apache.spark.operators.spark_submit import SparkSubmitOperator
from airflow.sdk import DAG, Param
from airflow.sdk.exceptions import AirflowException, AirflowFailException

# Where the project is: this file's repository, unless it was copied into a dags folder elsewhere.
PROJECT_DIR = Path(os.environ.get("CSID_PROJECT_DIR") or Path(__file__).resolve().parents[2])
MODEL_NAME = "catalog-semantic-ids"
SPARK_CONN_ID = os.environ.get("CSID_SPARK_CONN_ID", "spark_default")
# An Airflow pool of one slot shared by both DAGs makes them take turns on the output (create it first).
POOL = os.environ.get("CSID_POOL", "default_pool")
RETRAIN_SCHEDULE = os.environ.get("CSID_RETRAIN_SCHEDULE", "0 2 * * 0")  # Sundays 02:00
DAILY_SCHEDULE = os.environ.get("CSID_DAILY_SCHEDULE", "0 4 * * *")  # every day 04:00, after the retrain
DAILY_STAGES = "validate,encode,report"
# spark-submit exits with the Python driver's exit code; the job's codes (jobs/config.py):
EXIT_MEANING = {
    1: "an unexpected error in the job (a bug): add --debug to the param extra_args for the traceback",
    2: "bad arguments or input: the job's FAILED line above names the flag or the fix",
    3: "a gate failed (quality, or ID churn over --max-id-churn): the previous published set stays and "
       "@champion did not move; the new model is @candidate",
    4: "another run is writing this output, or wrote it meanwhile: the task is retried",
}
NO_RETRY = frozenset({2, 3})  # a rerun fails the same way
RETRAIN_NOT_RETRIED = ("a retrain is not retried automatically unless another run held the output (exit 4): it may "
                       "have published before it stopped, and another try would start a further generation. Read the "
                       "last entry of the output's runs table (or the job's log), then trigger the DAG again if "
                       "nothing was published")


def retried(kind: str, code: int) -> bool:
    """Whether Airflow may retry a task of ``kind`` that exited ``code``: never after exits 2 and 3 (a rerun fails
    the same way); a retrain only after exit 4 (another run held the output: nothing happened), since a retrain
    stopped after its commit (a killed process, a failure after the commit) has published a generation, and a
    retry would train and publish another one; a daily run after anything else (it is idempotent)."""
    if code in NO_RETRY:
        return False
    return kind != "retrain" or code == 4
CONNECT_ENGINES = ("local", "remote")  # Spark Connect clients: spark-submit only launches their driver


def _params(kind: str) -> dict[str, Param]:
    """The run's settings; every DAG run can override them with its conf."""
    common = {
        "input": Param(os.environ.get("CSID_INPUT", ""), type="string",
                       description="catalog: Delta/Parquet path or table name (--input); required"),
        "output": Param(os.environ.get("CSID_OUTPUT", ""), type="string",
                        description="folder/URI of the tables (--output); empty: <work_dir>/tables. Both DAGs "
                                    "must write the same one"),
        "work_dir": Param(os.environ.get("CSID_WORK_DIR", str(PROJECT_DIR / "work")), type="string",
                          description="--work-dir: checkpoints, reports and, without mlflow_tracking_uri, the "
                                      "MLflow store (both DAGs must share it, the champion lives there)"),
        "mlflow_tracking_uri": Param(os.environ.get("MLFLOW_TRACKING_URI", ""), type="string",
                                     description="MLFLOW_TRACKING_URI for the job; empty: sqlite under work_dir"),
        "model_name": Param(MODEL_NAME, type="string", pattern=r"^[A-Za-z0-9][A-Za-z0-9 ._-]{0,254}$",
                            description="registered MLflow model (--model-name)"),
        "engine": Param("local", enum=["local", "spark", "remote"],
                        description="--engine: local (embedded Sail, no cluster), spark (classic Spark: the "
                                    "connection's master), remote (Spark Connect at the param remote)"),
        "remote": Param("", type="string", description="Spark Connect URL sc://host:15002 (engine remote)"),
        "python": Param(os.environ.get("CSID_PYTHON", "python3"), type="string",
                        description="python of the project environment (torch, pyspark, pysail, MLflow): the "
                                    "job's driver, and its pyspark provides spark-submit"),
        "project_dir": Param(str(PROJECT_DIR), type="string",
                             description="checkout of catalog-semantic-ids on the worker"),
        "spark_home": Param(os.environ.get("CSID_SPARK_HOME", ""), type="string",
                            description="Spark installation whose bin/spark-submit to use; empty: the pyspark "
                                        "package of python"),
        "spark_packages": Param("", type="string",
                                description="spark-submit --packages, e.g. io.delta:delta-spark_4.2_2.13:4.4.0 "
                                            "for Delta on classic Spark"),
        "spark_conf": Param({}, type="object", description="spark-submit --conf key=value pairs"),
        "extra_args": Param([], type="array", items={"type": "string"},
                            description="more job flags, one item each, e.g. [\"--device\", \"cuda\"]"),
    }
    if kind == "retrain":
        return {
            **common,
            "max_id_churn": Param(0.2, type="number", minimum=0, maximum=1,
                                  description="--max-id-churn: share of published IDs a new generation may move "
                                              "(exit 3 above it; 1 turns the gate off)"),
            "align": Param("warm-start", enum=["warm-start", "relabel", "none"], description="--align"),
        }
    return {**common, "model_alias": Param("champion", type="string",
                                           description="alias of the registered model that encodes")}


def job_args(params: Mapping[str, Any], kind: str) -> list[str]:
    """jobs/tokenize_catalog.py's arguments for a ``kind`` ("retrain" or "daily") run with ``params``."""
    if not str(params["input"]).strip():
        raise AirflowFailException("the param input is empty: trigger with a conf {\"input\": \"/lake/catalog\"} "
                                   "or set CSID_INPUT where the DAG is parsed")
    args = ["--input", str(params["input"]), "--engine", str(params["engine"]), "--work-dir",
            str(params["work_dir"]), "--model-name", str(params["model_name"])]
    if params["output"]:
        args += ["--output", str(params["output"])]
    if params["engine"] == "remote":
        if not params["remote"]:
            raise AirflowFailException("engine remote needs the param remote (sc://host:15002)")
        args += ["--remote", str(params["remote"])]
    if kind == "retrain":  # no --model: train, gate, then a full run aligned to the table's generation
        args += ["--max-id-churn", repr(float(params["max_id_churn"])), "--align", str(params["align"])]
    else:  # the champion encodes, nothing trains; --mode auto picks incremental
        args += ["--model", f"models:/{params['model_name']}@{params['model_alias']}", "--stages", DAILY_STAGES]
    return args + [str(a) for a in params["extra_args"]]


def _pyspark_home(python: str) -> str:
    # find_spec locates the package without importing it (an import of pyspark takes seconds)
    probe = subprocess.run([python, "-c", "import importlib.util as u; "
                            "print(u.find_spec('pyspark').submodule_search_locations[0])"],
                           capture_output=True, text=True, timeout=300)
    if probe.returncode != 0:
        raise AirflowFailException(
            f"the param python ({python!r}) cannot import pyspark: set it to the project environment's python (the "
            f"one `pip install -r requirements-dev.txt` installed into), or spark_home to a Spark installation. "
            f"{probe.stderr.strip()[-500:]}")
    return probe.stdout.strip().splitlines()[-1]


def launcher_env(params: Mapping[str, Any]) -> dict[str, str]:
    """Environment of the local spark-submit process (and so of a client-mode driver): which Spark, which
    python runs the driver, the job's MLflow store. Not forwarded to a cluster."""
    python = str(params["python"])
    spark_home = str(params["spark_home"]) or _pyspark_home(python)
    if not (Path(spark_home) / "bin" / "spark-submit").is_file():
        raise AirflowFailException(f"no bin/spark-submit under {spark_home} (param spark_home, or the pyspark "
                                   f"package of {python})")
    engine_is_connect = params["engine"] in CONNECT_ENGINES
    env = {
        "SPARK_HOME": spark_home,
        "PATH": os.pathsep.join([str(Path(spark_home) / "bin"), os.environ.get("PATH", "")]),
        "PYSPARK_PYTHON": python,
        "CSID_PYTHON": python,
        # Connect engines: a driver that drops the MASTER spark-submit sets (jobs/airflow/embedded_driver.sh)
        "PYSPARK_DRIVER_PYTHON": (str(Path(params["project_dir"]) / "jobs" / "airflow" / "embedded_driver.sh")
                                  if engine_is_connect else python),
        "PYTHONPATH": os.pathsep.join(p for p in [str(params["project_dir"]), os.environ.get("PYTHONPATH", "")]
                                      if p),
    }
    if params["mlflow_tracking_uri"]:
        env["MLFLOW_TRACKING_URI"] = str(params["mlflow_tracking_uri"])
    return env


@contextmanager
def _environ(extra: Mapping[str, str]) -> Iterator[None]:
    """os.environ plus ``extra`` for the block (the task's spark-submit inherits it), then as it was."""
    saved = {k: os.environ.get(k) for k in extra}
    os.environ.update(extra)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class TokenizeCatalogOperator(SparkSubmitOperator):
    """``spark-submit jobs/tokenize_catalog.py ARGS`` with ARGS, --packages, --conf and the launcher
    environment from the run's params; the job's exit code named in the failure."""

    def __init__(self, *, kind: str, **kwargs: Any) -> None:
        super().__init__(name=f"catalog-semantic-ids-{kind}", **kwargs)
        self.kind = kind

    def prepare(self, params: Mapping[str, Any]) -> dict[str, str]:
        """Set application, arguments, packages and conf from ``params``; return the launcher environment."""
        self.application = str(Path(params["project_dir"]) / "jobs" / "tokenize_catalog.py")
        self.application_args = job_args(params, self.kind)
        self.packages = params["spark_packages"] or None
        conf: dict[str, Any] = dict(getattr(self, "conf", None) or {})
        self.conf = {**conf, **{str(k): str(v) for k, v in params["spark_conf"].items()}}
        self._hook = None  # built from the fields above
        return launcher_env(params)

    def execute(self, context: Any) -> None:
        env = self.prepare(context["params"])
        self.log.info("job: %s %s", self.application, " ".join(self.application_args or []))
        with _environ(env):
            try:
                super().execute(context)
            except AirflowException as e:
                code = self._exit_code(e)
                if code is None:
                    raise
                meaning = EXIT_MEANING.get(code, "the job was stopped (a signal, or the JVM failed)")
                if retried(self.kind, code):
                    raise AirflowException(f"tokenize_catalog exited {code}: {meaning}") from e
                why = f"; {RETRAIN_NOT_RETRIED}" if code not in NO_RETRY else ""
                raise AirflowFailException(f"tokenize_catalog exited {code}: {meaning}{why}") from e

    def _exit_code(self, error: Exception) -> int | None:
        process = getattr(self._hook, "_submit_sp", None)
        if process is not None and process.returncode is not None:
            return int(process.returncode)
        found = re.search(r"Error code is: (-?\d+)", str(error))
        return int(found.group(1)) if found else None


def _dag(dag_id: str, kind: str, schedule: str, doc: str) -> DAG:
    with DAG(
        dag_id=dag_id,
        schedule=schedule,
        start_date=datetime(2026, 1, 1, tzinfo=timezone.utc),
        catchup=False,
        max_active_runs=1,  # one writer per output at a time (a second one would fail with exit 4)
        params=_params(kind),
        tags=["catalog-semantic-ids"],
        doc_md=doc,
        default_args={"retries": 2, "retry_delay": timedelta(minutes=15)},  # exits 2 and 3 are never retried
    ) as dag:
        TokenizeCatalogOperator(task_id=f"tokenize_catalog_{kind}", kind=kind, conn_id=SPARK_CONN_ID, pool=POOL)
    return dag


retrain = _dag(
    "catalog_semantic_ids_retrain", "retrain", RETRAIN_SCHEDULE,
    "Retrain the RQ-VAE, gate its quality, encode the whole catalog as a new generation aligned to the table's "
    "(unchanged code tuples keep their IDs), gate the ID churn (`max_id_churn`), publish and move `@champion`. "
    "Exit 3 (a gate failed) fails the task without retries; the published set and `@champion` stay as they were.")
daily = _dag(
    "catalog_semantic_ids_daily", "daily", DAILY_SCHEDULE,
    "Tokenize new items with `models:/<model_name>@champion` (incremental: published IDs never move; items "
    "that left are retired, items that came back get their old ID).")
