"""Runs tests/classic (classic local JVM Spark) in its own process; see tests/classic/conftest.py."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.classic
@pytest.mark.spark
def test_classic_engine_suite_passes() -> None:
    env = {**os.environ, "CSID_CLASSIC_TESTS": "1"}
    env.pop("SPARK_CONNECT_MODE_ENABLED", None)
    env.pop("SPARK_REMOTE", None)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(ROOT / "tests" / "classic")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500,
    )
    tail = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, f"classic Spark tests failed (rc={proc.returncode}):\n{tail}"
    assert " passed" in proc.stdout, f"classic Spark tests ran nothing:\n{tail}"
