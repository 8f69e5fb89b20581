"""Helpers of the job and stage tests: tiny job flags, table readers, catalogs with bad rows, MLflow and
clock hygiene.

``tests/`` is on ``sys.path`` (pytest's rootdir conftest), so test files ``import helpers``.

"""
from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # jobs/ is not an installed package; plain `pytest` must import it too
    sys.path.insert(0, str(ROOT))
# The independent checker lives in shared/, beside the repository (as in CI), not in it.
CHECK_SID_TABLE = ROOT.parent / "shared" / "tools" / "check_sid_table.py"
SMALL_MODEL = ["--levels", "3", "--codebook-size", "16", "--hidden-dims", "32,16", "--latent-dim", "8",
               "--epochs", "2", "--batch-size", "256"]
# recon_cos_mean of a 2-epoch model can be slightly negative, so its gate minimum is -1, not 0.
GATE_OFF = ["--gate-min-utilization", "0", "--gate-min-unique-rate", "0", "--gate-min-recon-cosine", "-1"]
MLFLOW_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME")
KEY_COLUMNS = ("item_id", "semantic_id", "codes", "suffix")



# --- every kind of bad row ------------------------------------------------------------------------

INF, NAN = float("inf"), float("nan")
# (id, 3-d vector as doubles, expected reason or None): what validate_catalog (SQL) and the encode UDF's
# checks (row_reason_codes) must both say, on each engine. Reason names as in pipelines.schema.
REJECT_CASES: list[tuple[Any, Any, str | None]] = [
    ("ok-1", [1.0, 2.0, 3.0], None),
    ("ok-2", [0.0, 0.0, 1e-3], None),
    (None, [1.0, 2.0, 3.0], "null_item_id"),
    (None, [4.0, 5.0, 6.0], "null_item_id"),  # two null ids: not duplicates of each other
    ("dup", [1.0, 2.0, 3.0], "duplicate_item_id"),
    ("dup", [4.0, 5.0, 6.0], "duplicate_item_id"),
    ("dup-bad", [NAN, 1.0, 1.0], "duplicate_item_id"),  # a duplicate id outranks a bad vector
    ("dup-bad", None, "duplicate_item_id"),
    ("null-vec", None, "null_embedding"),
    ("short", [1.0, 2.0], "wrong_embedding_length"),
    ("empty", [], "wrong_embedding_length"),
    ("long-with-nan", [1.0, 2.0, 3.0, NAN], "wrong_embedding_length"),
    ("null-element", [1.0, None, 3.0], "null_in_embedding"),
    ("null-and-nan", [NAN, None, 3.0], "null_in_embedding"),
    ("short-with-null", [None, 1.0], "wrong_embedding_length"),
    ("nan", [1.0, NAN, 3.0], "nan_or_inf_in_embedding"),
    ("nan-first", [NAN, 1.0, 3.0], "nan_or_inf_in_embedding"),
    ("nan-last", [-1.0, 1.0, NAN], "nan_or_inf_in_embedding"),
    ("negative-nan", [1.0, -NAN, -3.0], "nan_or_inf_in_embedding"),
    ("nan-and-zeros", [0.0, NAN, 0.0], "nan_or_inf_in_embedding"),
    ("inf", [1.0, -INF, 3.0], "nan_or_inf_in_embedding"),
    ("plus-inf", [INF, 1.0, 3.0], "nan_or_inf_in_embedding"),
    ("beyond-negative-float", [1.0, -1e300, 1.0], "nan_or_inf_in_embedding"),
    ("beyond-float", [1e300, 1.0, 1.0], "nan_or_inf_in_embedding"),
    ("zero", [0.0, -0.0, 0.0], "zero_vector"),
    ("negative", [-1.0, -2.0, -3.0], None),
    ("tiny", [0.0, -1e-30, 0.0], "embedding_norm_out_of_range"),  # float32 norm < 1e-12: not unit after normalising
    ("denormal", [1e-42, 2e-42, 0.0], "embedding_norm_out_of_range"),
    ("huge", [1e20, 1.0, 1.0], "embedding_norm_out_of_range"),  # finite, but its norm overflows float32
    ("huge-negative", [1.0, -1e20, 1.0], "embedding_norm_out_of_range"),
    ("large", [1e18, 1.0, 1.0], None),  # norm^2 = 1e36 is still a float32
    ("small", [1e-11, 0.0, 0.0], None),
]


def expected_rejects(cases: Sequence[tuple[Any, Any, str | None]] = REJECT_CASES) -> list[tuple[str, str]]:
    """Sorted (id or "", reason) of the rejected cases: what a rejects frame must hold."""
    return sorted((i or "", reason) for i, _, reason in cases if reason)


# --- running the job in-process -------------------------------------------------------------------

def run_main(argv: Sequence[str]) -> tuple[int, str, str]:
    """``jobs.tokenize_catalog.main(argv)`` with stdout/stderr captured: (exit code, stdout, stderr)."""
    from jobs.tokenize_catalog import main

    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        rc = main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


def subprocess_env(**extra: str) -> dict[str, str]:
    """Environment for child processes: none of this process's MLflow or Spark Connect settings, the
    repository on PYTHONPATH; ``extra`` overrides, and an empty value removes the variable."""
    leaked = set(MLFLOW_ENV) | {"SPARK_CONNECT_MODE_ENABLED", "SPARK_REMOTE"}
    env = {k: v for k, v in os.environ.items() if k not in leaked}
    env["PYTHONPATH"] = str(ROOT)
    for key, value in extra.items():
        if value:
            env[key] = value
        else:
            env.pop(key, None)
    return env


def _forget_mlflow_state() -> None:
    import mlflow
    import mlflow.tracking._model_registry.utils as registry_utils
    import mlflow.tracking._tracking_service.utils as tracking_utils
    import mlflow.tracking.fluent as fluent

    while mlflow.active_run() is not None:
        mlflow.end_run()
    tracking_utils._tracking_uri = None
    registry_utils._registry_uri = None
    fluent._active_experiment_id = None


@contextmanager
def fresh_mlflow_globals() -> Iterator[None]:
    """For the block: no MLFLOW_* variables and no tracking URI / experiment left from other tests."""
    saved = {k: os.environ.pop(k) for k in MLFLOW_ENV if k in os.environ}
    _forget_mlflow_state()
    try:
        yield
    finally:
        _forget_mlflow_state()
        os.environ.update(saved)


@contextmanager
def local_timezone(name: str) -> Iterator[None]:
    """Run the block with the process's local time zone set to ``name`` (TZ + time.tzset)."""
    saved = os.environ.get("TZ")
    os.environ["TZ"] = name
    time.tzset()
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("TZ", None)
        else:
            os.environ["TZ"] = saved
        time.tzset()


# Runs the checker as its own __main__ and leaves with os._exit(its exit code): delta-rs aborts with
# std::terminate while the interpreter tears down after reading a table version (not every time; more
# often on a loaded machine), after every verdict was printed. Skipping the teardown keeps the
# checker's own verdicts and exit code.
_RUN_CHECKER = """
import os, runpy, sys
sys.argv = sys.argv[1:]
code = 0
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit as e:
    code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
sys.stdout.flush()
sys.stderr.flush()
os._exit(code)
"""


def run_sid_checker(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """Run the shared independent checker (``check_sid_table.py``) on ``args``; its printed verdicts and
    exit code are the result."""
    return subprocess.run([sys.executable, "-c", _RUN_CHECKER, str(CHECK_SID_TABLE), *map(str, args)],
                          capture_output=True, text=True, timeout=300, env=subprocess_env())


def assert_sid_checker_passes(*args: str | Path) -> None:
    """The shared independent checker passes on ``args``, where this machine has it (``../shared/tools``: a clone
    outside the workplace has not; the tests' own checks of the same table still run there)."""
    if CHECK_SID_TABLE.is_file():
        check = run_sid_checker(*args)
        assert check.returncode == 0, check.stdout + check.stderr


# --- tables ---------------------------------------------------------------------------------------

def read_delta(path: str | Path) -> pa.Table:
    """A Delta table read with delta-rs (not the engine that wrote it)."""
    from deltalake import DeltaTable

    return DeltaTable(str(path)).to_pyarrow_table()


def read_parquet(path: str | Path) -> pa.Table:
    import pyarrow.dataset as ds

    return ds.dataset(str(path), format="parquet").to_table()


def key_rows(table: pa.Table) -> set[tuple]:
    """(item_id, semantic_id, codes, suffix) of every row, as a set of hashable tuples."""
    return {(r["item_id"], r["semantic_id"], tuple(r["codes"]), r["suffix"])
            for r in table.select(list(KEY_COLUMNS)).to_pylist()}


def by_item(table: pa.Table) -> dict[Any, dict[str, Any]]:
    return {r["item_id"]: r for r in table.to_pylist()}


# --- catalogs -------------------------------------------------------------------------------------

def catalog_table(ids: Sequence[Any], vectors: Sequence[Any], list_type: pa.DataType | None = None,
                  id_type: pa.DataType | None = None) -> pa.Table:
    """item_id (STRING unless ``id_type``) + embedding (list<float>) from Python values (None allowed anywhere)."""
    list_type = list_type or pa.list_(pa.float32())
    id_type = id_type or pa.string()
    rows = [None if v is None else [None if x is None else float(x) for x in v] for v in vectors]
    return pa.table({"item_id": pa.array(list(ids), id_type), "embedding": pa.array(rows, list_type)})


def write_delta(path: str | Path, table: pa.Table, parts: int = 1) -> Path:
    """Write ``table`` as a new Delta table in ``parts`` files (one commit each)."""
    from deltalake import write_deltalake

    bounds = np.linspace(0, table.num_rows, parts + 1).astype(int)
    for start, stop in zip(bounds[:-1], bounds[1:]):
        write_deltalake(str(path), table.slice(start, stop - start), mode="append")
    return Path(path)


def random_vectors(n: int, dim: int, seed: int = 0) -> np.ndarray:
    """float32 (n, dim) standard-normal vectors (never all-zero)."""
    return np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)


def untrained_checkpoint(dim: int, *, levels: int = 3, codebook_size: int = 16, seed: int = 0,
                         hidden_dims: tuple[int, ...] = (32, 16), latent_dim: int = 8) -> bytes:
    """Checkpoint bytes of a freshly initialised (untrained) RQ-VAE: fast, and enough to compare codes."""
    import torch

    from rqvae import RQVAE, ModelConfig, checkpoint_bytes

    torch.manual_seed(seed)
    model = RQVAE(ModelConfig(input_dim=dim, hidden_dims=hidden_dims, latent_dim=latent_dim, num_levels=levels,
                              codebook_size=codebook_size))
    return checkpoint_bytes(model)


# --- contract checks ------------------------------------------------------------------------------

def assert_suffix_contract(rows: Sequence[dict[str, Any]]) -> int:
    """Suffixes are 0..n-1 per code tuple in (quantization_error, item_id) order; returns the tuple count."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(tuple(r["codes"]), []).append(r)
    for codes, group in groups.items():
        ordered = sorted(group, key=lambda r: (r["quantization_error"], r["item_id"]))
        assert [r["suffix"] for r in ordered] == list(range(len(group))), f"tuple {codes}: {ordered}"
    return len(groups)


def issued_codes(model: Any, x: np.ndarray, ids: Sequence[Any], second_chance: bool = True) -> Any:
    """The codes the job issues for a first run of catalog ``x`` (rows named by ``ids``), computed
    in-process by :func:`rqvae.issue_codes` with the model's ranked last-level alternatives (ties by item id),
    and the second chance unless told. A :class:`rqvae.resolve.Spread`."""
    from rqvae import issue_codes

    return issue_codes(model, x, model.config.collision_alternatives, second_chance=second_chance,
                       tiebreak=np.asarray(ids))


# --- tools a test installs from Debian's packages (CI runs as root with apt-get) ----------------------

class ToolMissing(RuntimeError):
    """A program a test needs is missing and cannot be installed here; the message names the fix."""


_APT_WAIT = ["-o", "DPkg::Lock::Timeout=300"]  # a fresh CI machine may still be running its own apt


def apt_install(package: str, find: Callable[[], str | None], fix: str,
                error: type[RuntimeError] = ToolMissing) -> str:
    """``find()``'s program, installed first with ``apt-get install -y --no-install-recommends package``
    when it is missing and this process can (root with apt-get; ``apt-get update`` only when that
    install fails). Otherwise raises ``error`` naming ``fix``."""
    found = find()
    if found:
        return found
    if not shutil.which("apt-get") or os.geteuid() != 0:
        raise error(f"{package} is not installed, and a test can install it only as root with apt-get: {fix}")
    install = ["apt-get", *_APT_WAIT, "install", "-y", "--no-install-recommends", package]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    log = []
    for command in (install, ["apt-get", *_APT_WAIT, "update"], install):
        proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1200)
        log.append(f"$ {' '.join(command)} -> {proc.returncode}\n{proc.stdout[-1500:]}{proc.stderr[-1500:]}")
        if command is install and proc.returncode == 0:
            break
    found = find()
    if not found:
        raise error(f"{package} is not installed and installing it failed: {fix}\n" + "\n".join(log))
    return found


JAVA_PACKAGE = "openjdk-17-jre-headless"


def ensure_java(error: type[RuntimeError] = ToolMissing) -> str:
    """The ``java`` binary (``$JAVA_HOME/bin/java``, else ``PATH``), Debian's JRE 17 installed first when
    it is missing and this process can."""
    def find() -> str | None:
        home_java = Path(os.environ.get("JAVA_HOME") or "/nonexistent") / "bin" / "java"
        return str(home_java) if home_java.is_file() else shutil.which("java")

    return apt_install(JAVA_PACKAGE, find, f"install Java 17 (`sudo apt-get install -y {JAVA_PACKAGE}` on "
                       "Debian/Ubuntu) or set JAVA_HOME", error)


STATE_SCHEMA = ("item_id string, codes array<int>, suffix int, semantic_id string, model_name string, "
                "model_version string, generation int, embedding_fingerprint bigint, active boolean, "
                "retired_reason string")
STATE_SCHEMA_COLUMNS = [c.split()[0] for c in STATE_SCHEMA.split(", ")]
LIFECYCLE = ("generation", "embedding_fingerprint", "active", "retired_reason")


def state_row(item: str, codes: list[int | None] | None, *, suffix: int = 0, version: str = "1", generation: int = 1,
              active: bool | None = True, reason: str | None = None) -> tuple:
    sid = f"{item}_{suffix}" if codes is None else "_".join(map(str, codes)) + f"_{suffix}"
    return (item, codes, suffix, sid, "m", version, generation, 1, active, reason)


def state_tables() -> dict[str, tuple[list[tuple], tuple[str, ...], tuple[int, int, int, int, int] | None]]:
    """Semantic-ID tables whose state (``pipelines.ledger.read_table_state``) the engine and the driver must sum up
    alike (:data:`STATE_SCHEMA`): name -> (rows, columns to drop, the state's (rows, active rows, current
    generation, rows away in earlier generations, largest code), or None for no state)."""
    ledger = [state_row("a", [1, 2]), state_row("b", [1, 2], suffix=1), state_row("c", [3, 4]),
              state_row("d", [5, 5], active=False, reason="left_catalog"),
              state_row("e", [6, 6], active=False, reason="embedding_changed"), state_row("e", [6, 7])]
    two = [state_row("a", [1, 2], generation=2, version="2"),
           state_row("b", [9, 15], suffix=3, generation=2, version="2"),
           state_row("c", [3, 4], active=False, reason="left_catalog"),
           state_row("d", [5, 5], active=False, reason="rejected"),
           state_row("e", [6, 6], active=False, reason="new_generation"),
           state_row("f", [2, 2], suffix=1, active=False, reason="left_catalog", generation=2, version="2")]
    nulls = [state_row("a", [1, 2]), state_row("b", [1, None], suffix=1), state_row("c", None),
             state_row("d", [3, 11], active=None), state_row("e", [4, 4], active=False),
             state_row("f", [4, 5], active=False, reason="rejected"), state_row("g", [4, 6], reason="left_catalog")]
    return {"ledger": (ledger, (), (6, 4, 1, 0, 7)), "two generations": (two, (), (6, 2, 2, 2, 15)),
            "nulls": (nulls, (), (7, 4, 1, 0, 11)), "no lifecycle columns": (ledger[:4], LIFECYCLE, (4, 4, 1, 0, 5)),
            "some lifecycle columns": (ledger, ("active", "retired_reason"), (6, 6, 1, 0, 7)),
            "several models": ([*ledger, state_row("g", [7, 7], version="9")], (), None), "empty": ([], (), None)}


def crowded_ranked_items(n: int, seed: int, numeric_ids: bool = False) -> list[tuple]:
    """``n`` items for the collision spreading: (item_id, codes, quantization_error, extra, alternatives,
    alternative_errors) on 5 x 4 prefixes of 6 last codes, ranked among 24, so that many tuples are shared,
    some prefixes fill up (suffixes needed), some errors tie and some are null (they order last).
    ``numeric_ids``: BIGINT ids whose string order differs from their numeric one."""
    rng = np.random.default_rng(seed)
    k = 6
    codes = np.column_stack([rng.integers(0, 5, n), rng.integers(0, 4, n), rng.integers(0, 6, n)])
    errors = rng.choice(np.float32([0.1, 0.2, 0.3]), n) + rng.integers(0, 3, n).astype(np.float32) / 10
    out = []
    for j, order in enumerate(rng.permuted(np.tile(np.arange(24), (n, 1)), axis=1)):
        alternatives = [int(codes[j, 2]), *[int(c) for c in order if c != codes[j, 2]][:k - 1]]
        error = None if j % 17 == 0 else float(errors[j])
        alt_errors = [float(errors[j]), *np.sort(rng.random(k - 1) + 0.6).astype(np.float32).tolist()]
        item_id: Any = int(10 ** (j % 4) + j) if numeric_ids else f"i{(j * 7919) % n:04d}"
        out.append((item_id, codes[j].tolist(), error, f"x{j}", alternatives, alt_errors))
    return out


def collected_split(spark, calls: list | None = None):
    """A stand-in for ``EngineSession.materialize_split``: ``df`` collected once and handed back as one frame
    per part (``calls`` records each split's parts and columns)."""
    def split(df, part, parts):
        if calls is not None:
            calls.append((parts, tuple(df.columns)))
        kept = df.withColumn("p", part).collect()
        return [spark.createDataFrame([r[:-1] for r in kept if r["p"] == p], df.schema) for p in range(parts)]
    return split


def join_kinds(plan: str, join: str) -> set[str]:
    """The kinds (Inner, LeftOuter, LeftSemi...) of the ``join`` operators (BroadcastHashJoin, SortMergeJoin) in
    a classic Spark plan's text (``df._jdf.queryExecution().executedPlan().toString()``)."""
    return set(re.findall(rf"{join} \[[^\]]*\], \[[^\]]*\], (\w+)", plan))
