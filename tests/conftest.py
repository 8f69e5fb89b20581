"""Shared fixtures: one embedded (Sail) session and one classic local JVM session per test run."""
from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

os.environ.setdefault("PYARROW_IGNORE_TIMEZONE", "1")


@pytest.fixture(scope="session")
def spark() -> Iterator:
    """Embedded engine: in-process Sail Spark Connect server, few shuffle partitions."""
    from pipelines.session import start_session

    es = start_session("local", shuffle_partitions=4)
    yield es.spark
    es.stop()
