"""Classic local JVM Spark tests (the spark-submit code path, Parquet output).

A Spark Connect session switches pyspark into Connect mode for the whole process, so these tests
cannot share a process with the embedded-engine tests. ``tests/test_classic_engine.py`` runs this
folder in its own pytest process with ``CSID_CLASSIC_TESTS=1``; without it the folder is skipped
at collection (it is never silently skipped: the outer test fails if the inner run fails).
"""
from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

if not os.environ.get("CSID_CLASSIC_TESTS"):
    collect_ignore_glob = ["test_*.py"]


@pytest.fixture(scope="session")
def classic_spark() -> Iterator:
    """Classic local[2] JVM session, UI off, few shuffle partitions, no Delta."""
    from pyspark.sql import SparkSession

    spark = (
        SparkSession.builder.master("local[2]")
        .appName("catalog-semantic-ids-tests")
        .config("spark.ui.enabled", "false")
        .config("spark.sql.shuffle.partitions", "4")
        .config("spark.sql.session.timeZone", "UTC")
        .config("spark.driver.memory", "2g")
        .getOrCreate()
    )
    yield spark
    spark.stop()
