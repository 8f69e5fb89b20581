"""Create (once) the virtualenv that runs Airflow for jobs/airflow/, from requirements-airflow.txt.

    python jobs/airflow/make_venv.py                 # prints the venv's python; quick when it is there
    python jobs/airflow/make_venv.py --venv /opt/csid-airflow --force

Airflow gets its own environment: its pins (SQLAlchemy, protobuf, pandas, ...) are not the project's
(MLflow, pyspark), and the DAG's tasks run the job with the project's own python anyway. The venv is
made with ``uv`` when it is installed (requirements-dev.txt pins it; ~15 s from PyPI on a cold cache)
and with ``python -m venv`` + pip otherwise (~90 s). A stamp file records the requirements' hash and
the interpreter, so a second call returns at once and a changed requirements file rebuilds the venv.
A lock file lets concurrent callers (two pytest processes) wait for one build.
"""
from __future__ import annotations

import argparse
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
REQUIREMENTS = HERE / "requirements-airflow.txt"
DEFAULT_VENV = ROOT / ".cache" / "airflow-venv"
STAMP = ".csid-airflow-stamp"


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def _stamp_text(python: str, requirements: Path) -> str:
    digest = hashlib.sha256(requirements.read_bytes()).hexdigest()
    version = subprocess.run([python, "-c", "import sys; print(sys.version.split()[0])"], capture_output=True,
                             text=True, check=True).stdout.strip()
    return f"requirements sha256 {digest}\npython {python} {version}\n"


def _uv() -> str | None:
    try:
        from uv import find_uv_bin  # the PyPI package `uv` ships the binary

        return str(find_uv_bin())
    except (ImportError, FileNotFoundError):
        return shutil.which("uv")


def _run(cmd: list[str], env: dict[str, str] | None = None) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {proc.returncode}):\n{(proc.stdout + proc.stderr)[-4000:]}")


def ensure_venv(venv: Path = DEFAULT_VENV, python: str | None = None, requirements: Path = REQUIREMENTS,
                force: bool = False, log: bool = True) -> Path:
    """The python of an Airflow virtualenv at ``venv`` built from ``requirements`` (built now if missing,
    stale or ``force``). ``python``: the interpreter to base it on (default: this one; Airflow 3.3 and
    the Spark provider need 3.11-3.14)."""
    python = python or sys.executable
    venv = Path(venv).resolve()
    venv.parent.mkdir(parents=True, exist_ok=True)
    wanted = _stamp_text(python, requirements)
    stamp = venv / STAMP
    with open(venv.parent / f".{venv.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building it: wait, then look again
        if not force and stamp.is_file() and stamp.read_text() == wanted and venv_python(venv).exists():
            return venv_python(venv)
        start = time.perf_counter()
        if venv.exists():
            shutil.rmtree(venv)
        uv = _uv()
        if uv:
            # Never let uv fetch an interpreter (only package registries are reachable): use `python`.
            env = {**os.environ, "UV_PYTHON_DOWNLOADS": "never"}
            _run([uv, "venv", "--quiet", "--python", python, str(venv)], env)
            _run([uv, "pip", "install", "--quiet", "--python", str(venv_python(venv)), "-r", str(requirements)], env)
        else:
            _run([python, "-m", "venv", str(venv)])
            _run([str(venv_python(venv)), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                  "-r", str(requirements)])
        stamp.write_text(wanted)  # last: a build that stopped half-way has no stamp and is redone
        if log:
            print(f"made the Airflow venv {venv} with {'uv' if uv else 'pip'} in {time.perf_counter() - start:.0f}s",
                  file=sys.stderr)
    return venv_python(venv)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="make_venv", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--venv", type=Path, default=DEFAULT_VENV, help=f"where (default {DEFAULT_VENV})")
    p.add_argument("--python", help="interpreter to base the venv on (default: this one)")
    p.add_argument("--force", action="store_true", help="rebuild even when the stamp says it is current")
    a = p.parse_args(argv)
    print(ensure_venv(a.venv, a.python, force=a.force))
    return 0


if __name__ == "__main__":
    sys.exit(main())
