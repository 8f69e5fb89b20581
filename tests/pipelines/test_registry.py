"""MLflow edge: tracking set-up, model logging/registration, aliases and model resolution (local sqlite)."""
from __future__ import annotations

import re
from pathlib import Path

import helpers
import mlflow
import numpy as np
import pandas as pd
import pytest

from pipelines import registry
from rqvae import encode_array, load_checkpoint

DIM = 8


@pytest.fixture(autouse=True)
def _mlflow_globals(tmp_path, monkeypatch):
    """No tracking env vars, no active experiment, MLflow's ./mlruns in tmp, URIs restored afterwards."""
    before = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    monkeypatch.chdir(tmp_path)
    with helpers.fresh_mlflow_globals():
        yield
    mlflow.set_tracking_uri(before[0])
    mlflow.set_registry_uri(before[1])


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """One tracking + registry store for the module (creating a sqlite store takes seconds)."""
    return tmp_path_factory.mktemp("store")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("checkpoints")
    paths = [root / "first.pt", root / "second.pt"]
    for seed, path in enumerate(paths):
        path.write_bytes(helpers.untrained_checkpoint(DIM, seed=seed))
    return paths


def example(n: int = 2) -> pd.DataFrame:
    return pd.DataFrame({"embedding": list(helpers.random_vectors(n, DIM))})


def test_configure_tracking_defaults_to_sqlite_in_the_work_dir(tmp_path) -> None:
    work = tmp_path / "new" / "work"
    uri = registry.configure_tracking(work)
    assert uri == f"sqlite:///{work.resolve() / 'mlflow.db'}"
    assert work.is_dir()
    assert mlflow.get_tracking_uri() == uri and mlflow.get_registry_uri() == uri


def test_configure_tracking_honours_the_environment(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/elsewhere.db")
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", f"sqlite:///{tmp_path}/registry.db")
    uri = registry.configure_tracking(tmp_path / "work")
    assert uri == f"sqlite:///{tmp_path}/elsewhere.db" == mlflow.get_tracking_uri()
    assert mlflow.get_registry_uri() == f"sqlite:///{tmp_path}/registry.db"
    assert not (tmp_path / "work").exists()


def test_resolve_model_rejects_a_bad_uri() -> None:
    with pytest.raises(ValueError, match=r"--model 'models:/only-name' is neither models:/<name>@<alias>"):
        registry.resolve_model("models:/only-name")
    with pytest.raises(ValueError, match="nor an existing checkpoint file"):
        registry.resolve_model("no/such/model.pt")


def test_resolve_model_missing_alias_names_the_fix(store) -> None:
    uri = registry.configure_tracking(store)
    with pytest.raises(ValueError, match=rf"cannot resolve models:/nobody@champion in the MLflow registry "
                                         rf"{re.escape(uri)}: .*point MLFLOW_TRACKING_URI \(or --work-dir.*at the "
                                         r"store that registered it, or train a model first \(a run without --model\)"):
        registry.resolve_model("models:/nobody@champion")


def test_resolve_model_on_a_local_checkpoint(checkpoints) -> None:
    import hashlib

    data = checkpoints[0].read_bytes()
    resolved = registry.resolve_model(str(checkpoints[0]))
    # The version names the file's content, so another checkpoint saved under the same name is another model.
    assert resolved == registry.ResolvedModel("first", f"local-{hashlib.sha256(data).hexdigest()[:12]}", "", data)


def test_register_alias_and_resolve_round_trip(store, checkpoints) -> None:
    registry.configure_tracking(store)
    experiment = registry.use_experiment("registry-test", store)
    assert registry.use_experiment("registry-test", store) == experiment  # reused, not created twice
    with mlflow.start_run(experiment_id=experiment) as run:
        v1 = registry.log_and_register(checkpoints[0], "csid-reg", input_example=example())
        registry.set_alias("csid-reg", registry.CANDIDATE, v1)
        assert registry.alias_version("csid-reg", registry.CANDIDATE) == v1 == "1"
        assert registry.alias_version("csid-reg", registry.CHAMPION) is None
        assert registry.alias_version("no-such-model", registry.CANDIDATE) is None
        v2 = registry.log_and_register(checkpoints[1], "csid-reg")
        registry.set_alias("csid-reg", registry.CANDIDATE, v2)
        registry.set_alias("csid-reg", registry.CHAMPION, v1)
    assert (v2, registry.alias_version("csid-reg", registry.CANDIDATE)) == ("2", "2")
    assert registry.alias_version("csid-reg", registry.CHAMPION) == "1"

    champion = registry.resolve_model("models:/csid-reg@champion")
    assert champion == registry.ResolvedModel("csid-reg", "1", run.info.run_id, checkpoints[0].read_bytes())
    assert registry.resolve_model("models:/csid-reg/2").checkpoint == checkpoints[1].read_bytes()
    assert registry.resolve_model("models:/csid-reg@candidate").version == "2"
    artifacts = Path(mlflow.get_run(run.info.run_id).info.artifact_uri.removeprefix("file://"))
    assert artifacts.is_relative_to((store / "mlartifacts").resolve())


def test_logged_model_predicts_like_rqvae(store, checkpoints) -> None:
    registry.configure_tracking(store)
    with mlflow.start_run(experiment_id=registry.use_experiment("predict-test", store)):
        version = registry.log_and_register(checkpoints[0], "csid-predict")
    x = helpers.random_vectors(5, DIM, seed=4)
    out = mlflow.pyfunc.load_model(f"models:/csid-predict/{version}").predict(pd.DataFrame({"embedding": list(x)}))
    expected = encode_array(load_checkpoint(checkpoints[0]), x)
    assert list(out.columns) == ["codes", "quantization_error"]
    np.testing.assert_array_equal(np.array([list(c) for c in out["codes"]]), expected.codes)
    np.testing.assert_allclose(out["quantization_error"].to_numpy(), expected.quantization_error, rtol=1e-5)


def test_logged_model_names_the_embedding_length_it_expects(store, checkpoints) -> None:
    registry.configure_tracking(store)
    with mlflow.start_run(experiment_id=registry.use_experiment("predict-length", store)):
        version = registry.log_and_register(checkpoints[0], "csid-length")
    model = mlflow.pyfunc.load_model(f"models:/csid-length/{version}")
    good = list(helpers.random_vectors(2, DIM, seed=4))
    with pytest.raises(ValueError) as refused:
        model.predict(pd.DataFrame({"embedding": [good[0], [0.1] * (DIM + 3), [0.1] * 16, good[1]]}))
    assert (f"this model encodes embeddings of length {DIM} (the D of the catalog it was trained on); 2 of 4 rows "
            f"are not (row 1: length {DIM + 3}, row 2: length 16)") in str(refused.value)
    assert model.predict(pd.DataFrame({"embedding": []})).shape == (0, 2)  # no rows: no error


def test_use_experiment_activates_a_new_experiment(store) -> None:
    registry.configure_tracking(store)
    experiment = registry.use_experiment("fresh", store)
    with mlflow.start_run() as run:
        pass
    assert run.info.experiment_id == experiment
    assert run.info.artifact_uri.startswith((store / "mlartifacts").resolve().as_uri())


_START = """
import sys
from pipelines import registry
registry.configure_tracking(sys.argv[1])
print(registry.use_experiment("race", sys.argv[1]))
"""


def test_jobs_started_together_on_a_fresh_work_dir_share_one_store(tmp_path) -> None:
    """Jobs started at once on one new work dir used to race on creating mlflow.db; the loser exited 1."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["PYTHONPATH"] = str(Path(__file__).parents[2])
    procs = [subprocess.Popen([sys.executable, "-c", _START, str(tmp_path / "work")], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(3)]
    results = [(p.wait(timeout=300), p.stdout.read().strip(), p.stderr.read()) for p in procs]  # type: ignore[union-attr]
    assert [rc for rc, _, _ in results] == [0, 0, 0], [err[-2000:] for _, _, err in results]
    assert len({out for _, out, _ in results}) == 1  # one experiment, found by all


@pytest.mark.parametrize(("uri", "preloads"), [(None, True), ("sqlite:////tmp/x/mlflow.db", True),
                                              ("postgresql+psycopg2://h/db", True), ("databricks", False),
                                              ("file:///tmp/mlruns", False), ("http://tracking:5000", False)])
def test_the_sql_tracking_store_is_preloaded_only_where_tracking_uses_it(monkeypatch, uri, preloads) -> None:
    """The job imports MLflow's SQL store beside the engine's start-up only for the local default and database
    URIs; a thread that was started has imported it once joined."""
    import sys

    if uri is None:
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    else:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    thread = registry.preload_tracking_store()
    assert (thread is not None) == preloads
    if thread is not None:
        thread.join(timeout=60)
        assert not thread.is_alive() and "mlflow.store.tracking.sqlalchemy_store" in sys.modules


def test_the_preloading_thread_imports_the_store() -> None:
    """In a fresh process (this one imported the store long ago): absent before, imported once joined."""
    import os
    import subprocess
    import sys

    code = ("import sys; from pipelines import registry; name = 'mlflow.store.tracking.sqlalchemy_store'; "
            "assert name not in sys.modules; t = registry.preload_tracking_store(); t.join(60); "
            "assert name in sys.modules; print('imported')")
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env,
                          cwd=str(Path(__file__).resolve().parents[2]))
    assert proc.returncode == 0 and proc.stdout.strip() == "imported", proc.stderr[-2000:]
