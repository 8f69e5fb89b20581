"""MLflow edge: tracking set-up, the training run, model logging/registration, aliases, resolution.

Local default (no ``MLFLOW_TRACKING_URI``): a sqlite tracking + registry database and an artifact
folder under the job's work directory. Encoding resolves an alias to a concrete version once.
"""
from __future__ import annotations

import fcntl
import hashlib
import importlib
import os
import re
import socket
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
from mlflow.tracking import MlflowClient

from pipelines.pyfunc_model import CHECKPOINT_ARTIFACT, signature
from pipelines.session import pid_alive

CANDIDATE, CHAMPION = "candidate", "champion"
_MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))$")


@dataclass(frozen=True)
class ResolvedModel:
    """A concrete model: registered name + version + its bytes. A checkpoint file is named by its stem and
    versioned ``local-<first 12 hex digits of its SHA-256>``: a table written with one file is then never
    taken for the same generation as another file of the same name."""

    name: str
    version: str
    run_id: str
    checkpoint: bytes


# The work-dir default URIs this module set: mlflow.set_*_uri also export them to os.environ.
_SET_HERE: dict[str, set[str]] = {}


def configure_tracking(work_dir: str | Path) -> str:
    """Point MLflow at ``$MLFLOW_TRACKING_URI`` or at ``<work_dir>/mlflow.db``; returns the URI.

    ``mlflow.set_tracking_uri`` writes the URI into ``os.environ`` as well, so a value this function set
    for an earlier job in the same process (a notebook, the tests) is not taken for the user's.
    """
    while _PRELOADING:  # MLflow is touched by one thread at a time
        _PRELOADING.pop().join()
    given = _users("MLFLOW_TRACKING_URI")
    default = not given
    uri = given or f"sqlite:///{Path(local_work_dir(work_dir)) / 'mlflow.db'}"
    registry_uri = _users("MLFLOW_REGISTRY_URI") or uri
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(registry_uri)
    if default:  # only the work-dir defaults: a URI the user exported stays the user's on every call
        _SET_HERE.setdefault("MLFLOW_TRACKING_URI", set()).add(uri)
        _SET_HERE.setdefault("MLFLOW_REGISTRY_URI", set()).add(registry_uri)
    return uri


_SQL_STORES = ("sqlite", "postgresql", "mysql", "mssql")  # URI schemes MLflow's SQLAlchemy store serves


def preload_tracking_store() -> threading.Thread | None:
    """Import MLflow's SQL tracking store in a background thread, when tracking will use one (the local
    default or a database URI), and return the thread; :func:`configure_tracking` waits for it first.

    Those imports (SQLAlchemy, Alembic, the store's tables) take 3-4 s of a run on 2 cores, and the engine's
    start-up, where the driver waits on the JVM or on Sail's threads, can hide them. A failed import is
    left to the caller's own, which reports it.
    """
    uri = _users("MLFLOW_TRACKING_URI") or "sqlite:"
    if uri.split(":", 1)[0].split("+", 1)[0] not in _SQL_STORES:
        return None

    def load() -> None:
        with suppress(Exception):  # opening tracking imports it again, and says what is wrong
            importlib.import_module("mlflow.store.tracking.sqlalchemy_store")

    thread = threading.Thread(target=load, name="csid-preload-mlflow-store", daemon=True)
    thread.start()
    _PRELOADING.append(thread)
    return thread


_PRELOADING: list[threading.Thread] = []  # started by preload_tracking_store, joined by configure_tracking


def local_work_dir(work_dir: str | Path) -> str:
    """The work directory, created, as a path a SQLite URL and a file URI can hold (a safe link to it when
    its name has characters such as '?' or '#' that URLs give a meaning: pipelines.io.engine_path)."""
    from pipelines.io import engine_path

    Path(work_dir).mkdir(parents=True, exist_ok=True)
    return engine_path(str(work_dir), "local", create=True)


def _users(name: str) -> str | None:
    value = os.environ.get(name)
    return None if not value or value in _SET_HERE.get(name, set()) else value


def use_experiment(name: str, work_dir: str | Path) -> str:
    """Create (with a local artifact folder when tracking is local sqlite) or reuse an experiment.

    With local sqlite tracking, jobs started together on one work directory take turns (a file lock):
    the first creates the database and the experiment, the others then find them. Without the lock two
    of them could run the database's schema migrations at once, and one would fail.
    """
    local = mlflow.get_tracking_uri().startswith("sqlite:")
    with _work_dir_lock(work_dir) if local else nullcontext():
        experiment = mlflow.get_experiment_by_name(name)
        if experiment is None:
            artifacts = (Path(local_work_dir(work_dir)) / "mlartifacts").as_uri() if local else None
            try:
                experiment_id = str(mlflow.create_experiment(name, artifact_location=artifacts))
            except mlflow.exceptions.MlflowException:
                experiment = mlflow.get_experiment_by_name(name)  # another job (not ours) made it meanwhile
                if experiment is None:
                    raise
                experiment_id = str(experiment.experiment_id)
        else:
            experiment_id = str(experiment.experiment_id)
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


@contextmanager
def _work_dir_lock(work_dir: str | Path) -> Iterator[None]:
    """An exclusive lock on ``<work_dir>/.mlflow.lock`` (POSIX ``flock``; released if the process dies)."""
    Path(work_dir).mkdir(parents=True, exist_ok=True)
    with open(Path(work_dir) / ".mlflow.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def log_and_register(checkpoint_path: Path, model_name: str, input_example: Any = None) -> str:
    """Log the checkpoint as a pyfunc model in the active run and register it; returns the version.

    ``input_example``: a small pandas DataFrame with an ``embedding`` column; MLflow stores it
    and checks that the model predicts on it.
    """
    from pipelines import pyfunc_model

    # "Models from code": MLflow stores pyfunc_model.py itself and runs it at load (it sets the model), and
    # rqvae/ travels as code, so the model loads where this project is not installed (serving hosts, Spark
    # workers) and where unpickling is refused (MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false; MLflow means to
    # make that the default), which a pickled model object would not.
    info = mlflow.pyfunc.log_model(
        name="model", python_model=pyfunc_model.__file__, artifacts={CHECKPOINT_ARTIFACT: str(checkpoint_path)},
        signature=signature(), registered_model_name=model_name, input_example=input_example,
        pip_requirements=["torch", "numpy", "pandas", "mlflow"],
        code_paths=[str(Path(__file__).resolve().parents[1] / "rqvae")],
    )
    return str(info.registered_model_version)


def set_alias(model_name: str, alias: str, version: str) -> None:
    MlflowClient().set_registered_model_alias(model_name, alias, version)


def alias_version(model_name: str, alias: str) -> str | None:
    """Version an alias points to, or None when the alias (or model) does not exist."""
    try:
        return str(MlflowClient().get_model_version_by_alias(model_name, alias).version)
    except mlflow.exceptions.MlflowException:
        return None


def has_version(model_name: str, version: str) -> bool:
    """Whether the registry holds version ``version`` of ``model_name``."""
    try:
        MlflowClient().get_model_version(model_name, version)
        return True
    except mlflow.exceptions.MlflowException:
        return False


def store_shown() -> str:
    """The MLflow registry this process uses, for messages."""
    return mlflow.get_registry_uri()


_LOCAL_VERSION = "local-"  # the version of a model given as a checkpoint file


def resolve_model(uri: str) -> ResolvedModel:
    """Resolve ``models:/name@alias``, ``models:/name/3`` or a local checkpoint path, once."""
    match = _MODEL_URI.match(uri)
    if match is None:
        path = Path(uri)
        if not path.is_file():
            raise ValueError(f"--model {uri!r} is neither models:/<name>@<alias>, models:/<name>/<version> "
                             "nor an existing checkpoint file")
        data = path.read_bytes()
        return ResolvedModel(path.stem, f"{_LOCAL_VERSION}{checkpoint_digest(data)[:12]}", "", data)
    name, alias, version = match.group("name"), match.group("alias"), match.group("version")
    client = MlflowClient()
    try:
        mv = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
    except mlflow.exceptions.MlflowException as e:
        raise ValueError(f"cannot resolve {uri} in the MLflow registry {store_shown()}: {e.message}. Fix: point "
                         "MLFLOW_TRACKING_URI (or --work-dir, whose mlflow.db is the local default) at the store that "
                         "registered it, or train a model first (a run without --model)") from e
    with tempfile.TemporaryDirectory() as tmp:
        local = mlflow.artifacts.download_artifacts(f"models:/{name}/{mv.version}", dst_path=tmp)
        checkpoint = next(Path(local).rglob("*.pt")).read_bytes()
    return ResolvedModel(name, str(mv.version), mv.run_id or "", checkpoint)


def checkpoint_digest(checkpoint: bytes) -> str:
    """The SHA-256 (hex) of a checkpoint's bytes: what a model is, whatever store names it (the ``runs`` table
    records it beside the name and version that issued IDs)."""
    return hashlib.sha256(checkpoint).hexdigest()


def is_registered_version(version: str) -> bool:
    """Whether ``version`` names a registry version (not a checkpoint file's ``local-<hash>``)."""
    return not version.startswith(_LOCAL_VERSION)


_PID, _HOST = "csid.pid", "csid.host"


def process_tags() -> dict[str, str]:
    """Tags that let a later job tell whether this run's process is still alive (:func:`fail_abandoned_runs`)."""
    return {_PID: str(os.getpid()), _HOST: socket.gethostname()}


def fail_abandoned_runs(experiment_id: str) -> list[str]:
    """End as FAILED the RUNNING runs of the active experiment whose job was killed: started on this host by a
    process that no longer exists. Returns their run ids. (A run killed on another host stays RUNNING until
    a job on that host starts.)"""
    client = MlflowClient()
    host, ended = socket.gethostname(), []
    runs = client.search_runs([experiment_id], filter_string="attributes.status = 'RUNNING'",
                              max_results=1000)
    for run in runs:
        tags = run.data.tags
        if tags.get(_HOST) != host or not tags.get(_PID, "").isdigit() or pid_alive(int(tags[_PID])):
            continue
        client.set_tag(run.info.run_id, "killed", "the job's process ended without finishing the run")
        client.set_terminated(run.info.run_id, status="FAILED")
        ended.append(run.info.run_id)
    return ended



def mark_published(run_id: str, by: str) -> None:
    """The MLflow run ``run_id`` published its set though its process was killed before it said so (a later run,
    ``by``, completed its set: pipelines.publish.recover): ended as FINISHED, not FAILED, with a tag saying so.
    A run that is not in this store (another tracking URI) is left alone."""
    client = MlflowClient()
    try:
        client.get_run(run_id)
    except mlflow.exceptions.MlflowException:
        return
    client.set_tag(run_id, "published_by_recovery", f"its set was completed by run {by}")
    client.set_terminated(run_id, status="FINISHED")
