"""Shared fixtures: one embedded (Sail) session and one classic local JVM session per test run."""
from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

os.environ.setdefault("PYARROW_IGNORE_TIMEZONE", "1")
# Sail drops a session idle for 900 s; the session fixture's sits idle while tests/classic runs in its
# subprocess (over 15 min on 2 cores), so its servers keep sessions for 4 hours here.
os.environ.setdefault("SAIL_SPARK__SESSION_TIMEOUT_SECS", "14400")


@pytest.fixture(scope="session")
def spark() -> Iterator:
    """Embedded engine: in-process Sail Spark Connect server, few shuffle partitions."""
    from pipelines.session import start_session

    es = start_session("local", shuffle_partitions=4)
    yield es.spark
    es.stop()


@pytest.fixture(scope="module")
def job_isolation(tmp_path_factory) -> Iterator[None]:
    """For a module that runs the job in-process: local MLflow stores only, a UTC clock, and its own cwd
    (MLflow's Default experiment writes ./mlruns), so no test writes into the repository or another's store."""
    import helpers

    with pytest.MonkeyPatch.context() as mp, helpers.fresh_mlflow_globals(), helpers.local_timezone("UTC"):
        mp.chdir(tmp_path_factory.mktemp("cwd"))
        yield
