"""Lint and type checks are part of the test command: ruff on the tree, mypy on rqvae/."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_ruff_is_clean() -> None:
    proc = _run("ruff", "check", ".")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_mypy_rqvae_is_clean() -> None:
    proc = _run("mypy", "rqvae")
    assert proc.returncode == 0, proc.stdout + proc.stderr
