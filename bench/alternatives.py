"""The job against what users would run instead: one catalog, one trained model, all variants in one run.

    python bench/alternatives.py                                   # 1M x 768, every variant
    python bench/alternatives.py --items 20000 --dim 64 --json bench/out/alternatives_small.json
    python bench/alternatives.py --variants s,e,i_local            # no JVM
    python bench/alternatives.py --items 50000000 --dim 256 --quantize-bits 8 --variants e   # point 3's scale run

Variants (each a whole process, timed from its start to its exit, Spark start-up included; the
catalog's files are in the OS page cache before each, read once untimed; items/s = N / wall):

  (s) no Spark: this script's own ``--worker s`` (:func:`standalone_tokenize`), the script a user would
      write instead: read the catalog Delta table with delta-rs/pyarrow in batches, ``rqvae.encode_array``
      with the model's collision alternatives, ``rqvae.resolve.spread_last_level`` and the second chance of
      the items still sharing a tuple (read again, ranked over every code: ``rqvae.resolve.spread_again``;
      the job's collision rule), suffixes with NumPy, write a Delta table with delta-rs. One process; torch
      uses the largest power of two <= the cores as threads (rqvae/encode.py: then every error has the job's bits).
  (u) the Databricks default, on classic Spark + Delta (spark-submit --packages <delta-spark>):
      ``mlflow.pyfunc.spark_udf`` of the registered model (registered once, untimed, in a store of its
      own) over the catalog, suffixes by a plain ``row_number`` window over the code tuple ordered by
      (quantization_error, item_id), Delta write (``--worker u`` under spark-submit).
  (e) the job on the embedded engine: ``jobs/tokenize_catalog.py --model <checkpoint>`` (no training;
      validate, encode, uniquify, statistics, report, Delta), its MLflow store created beforehand.
  (k) the same job on classic Spark + Delta (spark-submit --packages <delta-spark>, --engine spark).
  (i) the job's incremental run on catalog B = A + --new-share x N new items (bench/incremental.py's
      grown_catalog) into a copy of (e)'s table (i_local, embedded) and of (k)'s (i_spark, classic):
      only the new rows go through the model. ``i`` = both; i_local needs e and i_spark needs k (added
      when not asked for). Reported as a ratio of wall times: i_local/e and i_spark/k (B has 1% more
      items than the catalog e and k ran on). B's copies of A's files keep their modification times, so
      the row-group fingerprints (e) and (k) kept (``--fingerprint-cache``, in their work dirs) are found
      as a scheduled run on a table that grew by an append finds them: only the new file's embeddings
      are read. ``i_uncached`` and ``i_spark_uncached``: i_local and i_spark with ``--fingerprint-cache
      none`` (every embedding read).
  Floors, what no run of the job on an engine can go under (wall-time ratios to the full run, beside i's
  target; they say whether that target is within reach of any run of the job at all):
  (f) ``f_local`` / ``f_spark``: the job's process with nothing to do: the CLI's and the wiring's imports
      (with the job's collector settings), the engine started as the job starts it (``start_session``,
      Delta wanted) and stopped; ``f_spark`` under the same spark-submit as (k) (``--worker floor``).
  (0) ``i0_local`` / ``i0_spark``: a daily run with nothing new: catalog A itself into a copy of (e)'s /
      (k)'s table, the job's command as for (i).

Peak RSS is the whole process tree (JVM and Python workers included), sampled every 0.2 s; it counts a
page again in every process that maps it, so a forked child (Python workers forked from one daemon, a
helper the JVM spawns) adds its parent's pages once more. Peak PSS counts each page once (a shared page
split among its processes): the tree's memory (encode_throughput.run_sampled). A PSS read walks every page
of the tree on the cores the variant runs on, so it is read once a second, and at once when RSS has grown
2%, but never sooner after a read than 40 times that read's own time (a JVM of 7 GB: every few seconds);
``sampler_cpu_s`` in the JSON is the CPU the sampling took during the variant.
``--repeat N`` runs every variant N times, round by round (s, e, ..., s, e, ...), and reports the median
wall time of each (peak RSS and PSS: the highest); the checks read the last round's tables.

The model: --model, or bench/encode_throughput.py's cached model for D (the job's default model, fitted once
on the catalog's first 100k items). Its checkpoint is copied with ``collision_alternatives`` set to
--collision-alternatives (default 16, what the job registers when it trains with its defaults; -1
keeps the checkpoint's own), so the job spreads colliding items as in production; every variant
uses that one file.

Correctness, in the table: every variant's output is compared with (s)'s, item by item: the item
sets (items missing or extra), code tuples ("code mism."), the prefix (levels 1..L-1, "prefix
mism.") and the whole ID (codes + suffix, "ID mism."). (e) and (k) must agree with (s) on all of
them. (u) cannot agree on codes: the pyfunc returns each item's nearest codes, while the job (and
(s)) move an item whose nearest tuple a better-fitting item holds to a free last-level code
(docs/scoring.md), so (u)'s code mismatches must equal the items (s) moved, with no prefix mismatch;
its suffixes number nearest-code groups. The incremental runs must encode exactly the new rows, and
i_local's and i_spark's tables must hold the same IDs.

Acceptance ratios (issue 14; speed ratios are items/s ratios, i ratios wall-time ratios):
  e/s >= 0.8, e/u >= 2, k/s >= 0.4, k/u >= 1.5, i_local/e <= 0.15, i_spark/k <= 0.15.

Prints a Markdown table; --json writes every figure.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
if __package__ in (None, ""):
    sys.path.insert(0, str(ROOT))

from encode_throughput import (  # noqa: E402 - the catalog, model and process-tree timing of the throughput bench
    OUT,
    catalog_path,
    model_path,
    prepare_mlflow_store,
)
from incremental import grown_catalog, job, timed  # noqa: E402 - catalog B, the job's command, a timed run

VARIANTS = ("s", "u", "e", "k", "i_local", "i_uncached", "i_spark", "i_spark_uncached", "f_local", "f_spark",
            "i0_local", "i0_spark")
INCREMENTAL = ("i_local", "i_uncached", "i_spark", "i_spark_uncached")
NOTHING_NEW = ("i0_local", "i0_spark")
ON_THE_JVM = ("k", "i_spark", "i_spark_uncached", "f_spark", "i0_spark")
# an incremental run starts from a copy of this variant's table
NEEDS = {"i_local": "e", "i_uncached": "e", "i_spark": "k", "i_spark_uncached": "k", "i0_local": "e",
         "i0_spark": "k"}
LABELS = {"s": "(s) no Spark: delta-rs + rqvae + NumPy", "u": "(u) spark_udf + row_number, classic Spark",
          "e": "(e) job, embedded engine", "k": "(k) job, classic Spark",
          "i_local": "(i) incremental job, embedded",
          "i_uncached": "(i) incremental job, embedded, no fingerprint cache",
          "i_spark": "(i) incremental job, classic Spark",
          "i_spark_uncached": "(i) incremental job, classic Spark, no fingerprint cache",
          "f_local": "(f) the job's process with nothing to do, embedded", "f_spark": "(f) the same, classic Spark",
          "i0_local": "(0) a daily run with nothing new, embedded",
          "i0_spark": "(0) a daily run with nothing new, classic Spark"}
# (name, numerator, denominator, kind, target): kind "speed" = items/s ratio (>= target), "wall" = wall ratio (<=)
TARGETS = [("e/s", "e", "s", "speed", 0.8), ("e/u", "e", "u", "speed", 2.0), ("k/s", "k", "s", "speed", 0.4),
           ("k/u", "k", "u", "speed", 1.5), ("i_local/e", "i_local", "e", "wall", 0.15),
           ("i_uncached/e", "i_uncached", "e", "wall", 0.15),
           ("i_spark_uncached/k", "i_spark_uncached", "k", "wall", 0.15),
           ("i_spark/k", "i_spark", "k", "wall", 0.15)]
# floors against the full run, beside the i target they bound: (name, numerator, denominator)
FLOORS = [("f_local/e", "f_local", "e"), ("i0_local/e", "i0_local", "e"), ("f_spark/k", "f_spark", "k"),
          ("i0_spark/k", "i0_spark", "k")]
I_TARGET = 0.15
MODEL_NAME = "bench-alternatives"
ITEM_ID, EMBEDDING, CODES, SUFFIX = "item_id", "embedding", "codes", "suffix"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, default=1_000_000, help="catalog size N")
    p.add_argument("--dim", type=int, default=768, help="embedding length D")
    p.add_argument("--variants", default="s,u,e,k,i",
                   help="comma-separated subset of s,u,e,k,i,i_uncached,i_spark_uncached,f,i0 (i = i_local,i_spark; "
                   "f = f_local,f_spark; i0 = i0_local,i0_spark; each incremental variant adds the full run it "
                   "starts from)")
    p.add_argument("--quantize-bits", type=int, default=0,
                   help="use (and write once) the catalog with values rounded to 2^B - 1 levels "
                   "(bench/make_catalog.py --quantize-bits: 50M x 256 in 13 GB instead of 51 GB); 0: float32")
    p.add_argument("--new-share", type=float, default=0.01, help="new items of catalog B for (i), as a share of N")
    p.add_argument("--model", help="checkpoint (default: bench/out/model_<D>_default.pt, the job's default model, "
                   "fitted once)")
    p.add_argument("--collision-alternatives", type=int, default=16,
                   help="the model's collision_alternatives for every variant (-1: the checkpoint's own)")
    p.add_argument("--master", default=os.environ.get("SPARK_MASTER", "local[*]"),
                   help="classic Spark master for (u), (k) and i_spark")
    p.add_argument("--driver-memory", default="4g", help="spark-submit --driver-memory (the job's own default)")
    p.add_argument("--repeat", type=int, default=1,
                   help="rounds of all variants; each variant's wall time is the median of its rounds (default 1)")
    p.add_argument("--json", help="write the figures to this file")
    p.add_argument("--worker", choices=["s", "u", "floor"], help=argparse.SUPPRESS)  # internal: one variant here
    p.add_argument("--engine", default="local", help=argparse.SUPPRESS)  # internal: --worker floor's engine
    p.add_argument("--catalog", help=argparse.SUPPRESS)
    p.add_argument("--output", help=argparse.SUPPRESS)
    p.add_argument("--model-uri", help=argparse.SUPPRESS)
    p.add_argument("--tracking-uri", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# --- (s): the hand-written single-process script ------------------------------------------------------

def torch_threads() -> int:
    """The largest power of two <= the cores: rqvae.encode gives every row the same bits at 1, 2, 4... threads."""
    cores = os.cpu_count() or 1
    return 1 << (cores.bit_length() - 1)


def standalone_tokenize(catalog: str | Path, model_file: str | Path, output: str | Path,
                        read_rows: int = 32_768) -> dict[str, int]:
    """(s): semantic IDs of a Delta catalog (item_id, embedding) without Spark, written as a Delta table
    (item_id, codes, suffix, semantic_id, quantization_error). Rows with a non-finite or all-zero
    embedding are skipped and counted. Returns counts (rows, skipped, moved, max_suffix)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import torch
    from deltalake import DeltaTable, write_deltalake

    from rqvae import encode_array, load_checkpoint
    from rqvae.resolve import not_keepers, spread_again, spread_last_level, suffixes_in_tuples

    torch.set_num_threads(torch_threads())
    model = load_checkpoint(Path(model_file).read_bytes())
    k = model.config.collision_alternatives
    dim = model.config.input_dim
    ids, codes, errors, alts, alt_errors, skipped = [], [], [], [], [], 0
    dataset = DeltaTable(str(catalog)).to_pyarrow_dataset()
    for batch in dataset.to_batches(columns=[ITEM_ID, EMBEDDING], batch_size=read_rows):
        if not batch.num_rows:
            continue
        column = batch.column(EMBEDDING)
        lengths = pc.list_value_length(column)
        if column.null_count or pc.min(lengths).as_py() != dim or pc.max(lengths).as_py() != dim:
            raise ValueError(f"{catalog}: every embedding must be a list of {dim} values")
        x = column.flatten().to_numpy(zero_copy_only=False).reshape(batch.num_rows, dim)
        ok = np.isfinite(x).all(axis=1) & (x != 0).any(axis=1)
        batch_ids = batch.column(ITEM_ID).to_numpy(zero_copy_only=False)
        if not ok.all():
            skipped += int((~ok).sum())
            x, batch_ids = x[ok], batch_ids[ok]
        result = encode_array(model, x, alternatives=k)
        ids.append(batch_ids)
        codes.append(result.codes)
        errors.append(result.quantization_error)
        if k:
            alts.append(result.alternatives)
            alt_errors.append(result.alternative_errors)
    all_ids = np.concatenate(ids)
    all_codes, all_errors = np.concatenate(codes), np.concatenate(errors)
    moved = 0
    if k:
        spread = spread_last_level(all_codes, all_errors, np.concatenate(alts), np.concatenate(alt_errors),
                                   tiebreak=all_ids)
        # The job's second chance: the items still sharing a tuple, read again and ranked over every code.
        left = not_keepers(spread.codes, spread.quantization_error, all_ids)
        if len(left):
            wanted = all_ids[left]
            found_ids, found_x = [], []
            for batch in dataset.to_batches(columns=[ITEM_ID, EMBEDDING], batch_size=read_rows,
                                            filter=pc.field(ITEM_ID).isin(pa.array(wanted))):
                found_ids.append(batch.column(ITEM_ID).to_numpy(zero_copy_only=False))
                found_x.append(batch.column(EMBEDDING).flatten().to_numpy(zero_copy_only=False).reshape(-1, dim))
            got = np.concatenate(found_ids)
            order = np.argsort(got, kind="stable")
            at = order[np.searchsorted(got, wanted, sorter=order)]  # row of each wanted id among those read
            again = encode_array(model, np.concatenate(found_x)[at], alternatives=model.codebook_size)
            spread = spread_again(spread, left, again.codes, again.quantization_error, again.alternatives,
                                  again.alternative_errors, all_ids)
        all_codes, all_errors, moved = spread.codes, spread.quantization_error, int(spread.moved.sum())
    suffix = suffixes_in_tuples(all_codes, all_errors, all_ids)
    n, levels = all_codes.shape
    parts = [pa.array(all_codes[:, level]).cast(pa.string()) for level in range(levels)]
    table = pa.table({
        ITEM_ID: pa.array(all_ids),
        CODES: pa.ListArray.from_arrays(pa.array(np.arange(0, (n + 1) * levels, levels, dtype=np.int32)),
                                        pa.array(all_codes.ravel())),
        SUFFIX: pa.array(suffix),
        "semantic_id": pc.binary_join_element_wise(*parts, pa.array(suffix).cast(pa.string()), "_"),
        "quantization_error": pa.array(all_errors),
    })
    write_deltalake(str(output), table, mode="overwrite")
    return {"rows": n, "skipped": skipped, "moved": moved, "max_suffix": int(suffix.max()) if n else -1}


def standalone_worker(a: argparse.Namespace) -> int:
    counts = standalone_tokenize(a.catalog, a.model, a.output)
    print(json.dumps({"worker": "s", **counts}), flush=True)
    return 0


# --- (u): mlflow.pyfunc.spark_udf on classic Spark + Delta ---------------------------------------------

def udf_worker(a: argparse.Namespace) -> int:
    """(u) under spark-submit: score the catalog with the registered pyfunc, number the tuples, write Delta."""
    import mlflow
    from pyspark.sql import SparkSession, Window
    from pyspark.sql import functions as F

    spark = SparkSession.builder.getOrCreate()
    mlflow.set_tracking_uri(a.tracking_uri)
    score = mlflow.pyfunc.spark_udf(spark, a.model_uri)  # result type from the model's signature
    scored = (spark.read.format("delta").load(a.catalog)
              .select(ITEM_ID, score(EMBEDDING).alias("model"))
              .select(ITEM_ID, F.col("model.codes").alias(CODES),
                      F.col("model.quantization_error").alias("quantization_error")))
    in_tuple = Window.partitionBy(CODES).orderBy("quantization_error", ITEM_ID)
    out = (scored.withColumn(SUFFIX, (F.row_number().over(in_tuple) - 1).cast("int"))
           .withColumn("semantic_id", F.concat_ws("_", F.array_join(CODES, "_"), F.col(SUFFIX).cast("string"))))
    out.write.format("delta").mode("overwrite").save(a.output)
    print(json.dumps({"worker": "u"}), flush=True)
    spark.stop()
    return 0


def register_model(checkpoint: Path, work: Path) -> tuple[str, str]:
    """Log + register ``checkpoint`` as the job does (untimed); returns (tracking URI, the version's source)."""
    import mlflow
    import pandas as pd
    from mlflow.tracking import MlflowClient

    from pipelines.registry import configure_tracking, log_and_register, use_experiment
    from rqvae import load_checkpoint

    dim = load_checkpoint(checkpoint.read_bytes()).config.input_dim
    example = pd.DataFrame({EMBEDDING: list(np.random.default_rng(0).normal(size=(2, dim)).astype(np.float32))})
    uri = configure_tracking(work)
    use_experiment(MODEL_NAME, work)
    with mlflow.start_run():
        version = log_and_register(checkpoint, MODEL_NAME, input_example=example)
    return uri, MlflowClient().get_model_version(MODEL_NAME, version).source


# --- (f): the job's process with nothing to do -----------------------------------------------------------

def floor_worker(a: argparse.Namespace) -> int:
    """(f): what every run of the job pays before it reads a row, in this process: the job's imports with its
    collector settings (as ``jobs/tokenize_catalog.py`` run as a script), the engine started as the job starts
    it and stopped. Prints its parts as JSON."""
    import gc
    import time

    start = time.perf_counter()
    gc.disable()  # as the job's own process does while its libraries import
    import jobs.tokenize_catalog as cli
    from jobs.runner import run_job  # noqa: F401 - the wiring the job imports before the engine starts
    from pipelines.session import start_session

    cli._settle_gc()
    imported = time.perf_counter()
    session = start_session(a.engine, want_delta=True)
    started = time.perf_counter()
    session.stop()
    stopped = time.perf_counter()
    print(json.dumps({"worker": "floor", "imports_s": round(imported - start, 2),
                      "engine_start_s": round(started - imported, 2), "engine_stop_s": round(stopped - started, 2)}),
          flush=True)
    return 0


# --- running the variants ------------------------------------------------------------------------------

def spark_submit(a: argparse.Namespace, script: Path, *args: str) -> list[str]:
    """spark-submit with the Delta jars of the installed pyspark + delta-spark (as tests/classic does)."""
    import pyspark

    from pipelines.session import DELTA_EXTENSION, delta_maven_coordinate

    return [str(Path(pyspark.__file__).parent / "bin" / "spark-submit"), "--master", a.master,
            "--driver-memory", a.driver_memory, "--conf", "spark.ui.enabled=false",
            "--packages", delta_maven_coordinate(), "--conf", f"spark.sql.extensions={DELTA_EXTENSION}",
            "--conf", "spark.sql.catalog.spark_catalog=org.apache.spark.sql.delta.catalog.DeltaCatalog",
            str(script), *args]


def spark_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYSPARK_SUBMIT_ARGS", "SPARK_REMOTE", "SPARK_CONNECT_MODE_ENABLED")}
    env["PYSPARK_PYTHON"] = env["PYSPARK_DRIVER_PYTHON"] = sys.executable
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    return env


def checkpoint_with_alternatives(model: Path, k: int) -> Path:
    """``model``, or a copy of it whose config has collision_alternatives = k (at most its codebook size; k < 0:
    ``model`` as it is)."""
    import torch

    if k < 0:
        return model
    payload = torch.load(model, map_location="cpu", weights_only=True)
    k = min(k, payload["config"]["codebook_size"])
    if payload["config"].get("collision_alternatives", 0) == k:
        return model
    payload["config"]["collision_alternatives"] = k
    path = OUT / f"{model.stem}_alt{k}.pt"
    torch.save(payload, path)
    return path


def selected(spec: str) -> list[str]:
    names = set()
    for token in (t.strip() for t in spec.split(",") if t.strip()):
        expanded = {"i": ["i_local", "i_spark"], "f": ["f_local", "f_spark"],
                    "i0": ["i0_local", "i0_spark"]}.get(token, [token])
        for name in expanded:
            if name not in VARIANTS:
                raise SystemExit(f"--variants: unknown variant {token!r}; choose from {','.join(VARIANTS)},i,f,i0")
            names.add(name)
            if name in NEEDS:
                names.add(NEEDS[name])
    return [v for v in VARIANTS if v in names]


def worker_json(stdout: str) -> dict[str, Any]:
    lines = [line for line in stdout.splitlines() if line.startswith('{"worker"')]
    return json.loads(lines[-1]) if lines else {}


def run_variant(name: str, a: argparse.Namespace, run: Path, catalog: Path, grown: Path | None,
                model: Path, round_index: int = 0) -> dict[str, Any]:
    """Run one variant as its own timed process (round ``round_index`` of ``--repeat``); returns its figures and
    the path of its output table."""
    script = Path(__file__).resolve()
    folder = run / name
    if name == "s":
        table = folder / "semantic_ids"
        cmd = [sys.executable, str(script), "--worker", "s", "--catalog", str(catalog), "--model", str(model),
               "--output", str(table)]
        result = timed(cmd, catalog, env=dict(os.environ))
    elif name == "u":
        # A store of each round's own: MLflow keeps one database engine per store URI in this process, and a
        # later round's store at the same path (its folder removed and made again) was a deleted file to it.
        tracking, source = register_model(model, folder / f"work{round_index}")
        table = folder / "semantic_ids"
        cmd = spark_submit(a, script, "--worker", "u", "--catalog", str(catalog), "--output", str(table),
                           "--model-uri", source, "--tracking-uri", tracking)
        result = timed(cmd, catalog, env=spark_env())
    elif name in ("f_local", "f_spark"):
        table = None
        engine = "spark" if name == "f_spark" else "local"
        cmd = [sys.executable, str(script), "--worker", "floor", "--engine", engine]
        if name == "f_spark":
            cmd = spark_submit(a, script, *cmd[2:])
        result = timed(cmd, catalog, env=spark_env() if name == "f_spark" else dict(os.environ))
    elif name in ("e", "k"):
        prepare_mlflow_store(folder / "work")
        table = folder / "tables" / "semantic_ids"
        cmd = job(catalog, folder / "tables", folder / "work", model)
        if name == "k":
            cmd = spark_submit(a, Path(cmd[1]), *cmd[2:], "--engine", "spark")
        result = timed(cmd, catalog, env=spark_env() if name == "k" else dict(os.environ))
    else:
        assert grown is not None or name in NOTHING_NEW
        base = run / NEEDS[name]
        shutil.copytree(base / "tables", folder / "tables")
        table = folder / "tables" / "semantic_ids"
        read = catalog if name in NOTHING_NEW or grown is None else grown
        cmd = job(read, folder / "tables", base / "work", model,
                  *(["--fingerprint-cache", "none"] if name.endswith("_uncached") else []))
        if name in ON_THE_JVM:
            cmd = spark_submit(a, Path(cmd[1]), *cmd[2:], "--engine", "spark")
        result = timed(cmd, read, env=spark_env() if name in ON_THE_JVM else dict(os.environ))
    items = a.items + (int(round(a.items * a.new_share)) if name in INCREMENTAL else 0)
    if name in ("f_local", "f_spark"):
        items = 0  # reads no item: no items/s
    figures = {"wall_s": result["wall_s"], "peak_rss_mb": result["peak_rss_mb"],
               "peak_pss_mb": result["peak_pss_mb"], "items": items,
               "items_per_s": items / result["wall_s"], "table": table and str(table), "stages": result["stages"],
               "encoded_rows": result["encoded_rows"], "sampler_cpu_s": result.get("sampler_cpu_s"),
               **worker_json(result["stdout_tail"])}
    print(f"{name}: {result['wall_s']:.1f} s, {figures['items_per_s']:,.0f} items/s, "
          f"peak RSS {result['peak_rss_mb']:,.0f} MB, PSS {result['peak_pss_mb']:,.0f} MB", flush=True)
    return figures


def median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The last round's figures (its table is the one checked) with the median wall time of all rounds, the
    items/s of that median, every round's wall time and the highest peak RSS and PSS."""
    walls = sorted(r["wall_s"] for r in runs)
    wall = float(np.median(walls))
    last = runs[-1]
    return {**last, "wall_s": wall, "items_per_s": last["items"] / wall, "walls_s": [r["wall_s"] for r in runs],
            "peak_rss_mb": max(r["peak_rss_mb"] for r in runs), "peak_pss_mb": max(r["peak_pss_mb"] for r in runs)}


# --- correctness ---------------------------------------------------------------------------------------

def read_ids(table: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(item ids sorted, codes (N, L), suffixes) of the active rows of a semantic-ID Delta table."""
    import pyarrow.compute as pc
    from deltalake import DeltaTable

    dataset = DeltaTable(str(table)).to_pyarrow_dataset()
    columns = [ITEM_ID, CODES, SUFFIX]
    t = dataset.to_table(columns=columns + (["active"] if "active" in dataset.schema.names else []))
    if "active" in t.column_names:
        t = t.filter(pc.fill_null(t["active"], False))
    ids = t[ITEM_ID].to_numpy()
    order = np.argsort(ids, kind="stable")
    flat = t[CODES].combine_chunks()
    codes = flat.flatten().to_numpy().reshape(len(flat), -1) if len(flat) else np.zeros((0, 0), np.int32)
    return ids[order], codes[order], t[SUFFIX].to_numpy()[order]


def compare(reference: str | Path, other: str | Path) -> dict[str, int]:
    """Item-by-item differences of ``other``'s IDs from ``reference``'s (over the items both hold)."""
    ref_ids, ref_codes, ref_suffix = read_ids(reference)
    ids, codes, suffix = read_ids(other)
    common, ref_at, at = np.intersect1d(ref_ids, ids, assume_unique=True, return_indices=True)
    code_diff = (ref_codes[ref_at] != codes[at]).any(axis=1)
    prefix_diff = (ref_codes[ref_at, :-1] != codes[at, :-1]).any(axis=1)
    id_diff = code_diff | (ref_suffix[ref_at] != suffix[at])
    return {"items": len(ids), "missing": len(ref_ids) - len(common), "extra": len(ids) - len(common),
            "code_mismatches": int(code_diff.sum()), "prefix_mismatches": int(prefix_diff.sum()),
            "id_mismatches": int(id_diff.sum())}


def check(figures: dict[str, dict[str, Any]], n_new: int) -> dict[str, Any]:
    """Comparisons with (s) and between the incremental runs, and a verdict line per check."""
    checks: dict[str, Any] = {"vs_s": {}, "problems": []}
    problems = checks["problems"]
    if "s" in figures:
        for name in ("u", "e", "k"):
            if name in figures:
                c = checks["vs_s"][name] = compare(figures["s"]["table"], figures[name]["table"])
                if c["missing"] or c["extra"] or c["prefix_mismatches"]:
                    problems.append(f"{name}: {c['missing']} items missing, {c['extra']} extra, "
                                    f"{c['prefix_mismatches']} prefix mismatches against (s)")
                if name != "u" and c["id_mismatches"]:
                    problems.append(f"{name}: {c['id_mismatches']} IDs differ from (s)'s")
                if name == "u" and c["code_mismatches"] != figures["s"].get("moved"):
                    problems.append(f"u: {c['code_mismatches']} code mismatches against (s), but (s) moved "
                                    f"{figures['s'].get('moved')} items off a collision")
    for name in INCREMENTAL:
        if name in figures and figures[name]["encoded_rows"] != n_new:
            problems.append(f"{name}: {figures[name]['encoded_rows']} rows went through the model, not the "
                            f"{n_new} new ones")
    for name in NOTHING_NEW:  # nothing new: nothing through the model, and every ID where its base left it
        if name in figures:
            if figures[name]["encoded_rows"] != 0:
                problems.append(f"{name}: {figures[name]['encoded_rows']} rows went through the model, not 0")
            if NEEDS[name] in figures:
                c = checks[f"{name}_vs_{NEEDS[name]}"] = compare(figures[NEEDS[name]]["table"], figures[name]["table"])
                if c["missing"] or c["extra"] or c["id_mismatches"]:
                    problems.append(f"{name}: {c} against {NEEDS[name]}")
    for cached, uncached in (("i_local", "i_uncached"), ("i_spark", "i_spark_uncached")):
        if cached in figures and uncached in figures:
            c = checks[f"{cached}_vs_{uncached}"] = compare(figures[cached]["table"], figures[uncached]["table"])
            if c["missing"] or c["extra"] or c["id_mismatches"]:
                problems.append(f"{uncached}: {c} against {cached}")
    if "i_local" in figures and "i_spark" in figures:
        c = checks["i_local_vs_i_spark"] = compare(figures["i_local"]["table"], figures["i_spark"]["table"])
        if c["missing"] or c["extra"] or c["id_mismatches"]:
            problems.append(f"i_spark: {c} against i_local")
    return checks


def ratios(figures: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for name, top, bottom, kind, target in TARGETS:
        if top in figures and bottom in figures:
            if kind == "speed":
                value = figures[top]["items_per_s"] / figures[bottom]["items_per_s"]
                met = value >= target
            else:
                value = figures[top]["wall_s"] / figures[bottom]["wall_s"]
                met = value <= target
            out.append({"ratio": name, "kind": kind, "value": value, "target": target, "met": met})
    return out


def floors(figures: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Each floor as a share of its full run's wall time, and whether i's target (I_TARGET) lies above it."""
    return [{"ratio": name, "value": figures[top]["wall_s"] / figures[bottom]["wall_s"],
             "floor_s": figures[top]["wall_s"], "target_s": I_TARGET * figures[bottom]["wall_s"],
             "target_reachable": figures[top]["wall_s"] < I_TARGET * figures[bottom]["wall_s"]}
            for name, top, bottom in FLOORS if top in figures and bottom in figures]


def report(a: argparse.Namespace, model: Path, figures: dict[str, dict[str, Any]], checks: dict[str, Any],
           ratio_rows: list[dict[str, Any]], n_new: int, floor_rows: list[dict[str, Any]] | None = None) -> str:
    lines = [f"N = {a.items:,}, D = {a.dim}, model {model.name}, {os.cpu_count()} cores, "
             f"{psutil.virtual_memory().total / 2**30:.0f} GiB, Python {platform.python_version()}, "
             f"classic master {a.master}; (i): {n_new:,} new items"
             + (f"; wall s = the median of {a.repeat} rounds (all rounds in the JSON)" if a.repeat > 1 else ""), "",
             "| variant | wall s | items/s | peak RSS MB | peak PSS MB | code mism. vs (s) | prefix mism. | ID mism. "
             "| items |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, f in figures.items():
        c = checks["vs_s"].get(name)
        cells = ([str(c["code_mismatches"]), str(c["prefix_mismatches"]), str(c["id_mismatches"])] if c
                 else ["ref" if name == "s" else "-"] * 3)
        speed = f"{f['items_per_s']:,.0f}" if f["items"] else "-"
        lines.append(f"| {LABELS[name]} | {f['wall_s']:.1f} | {speed} | {f['peak_rss_mb']:,.0f} | "
                     f"{f['peak_pss_mb']:,.0f} | "
                     + " | ".join(cells) + f" | {f['items']:,} |")
    lines += ["", "| ratio | value | target | met |", "|---|---:|---:|---|"]
    for r in ratio_rows:
        sign = ">=" if r["kind"] == "speed" else "<="
        lines.append(f"| {r['ratio']} ({'items/s' if r['kind'] == 'speed' else 'wall'}) | {r['value']:.3f} | "
                     f"{sign} {r['target']} | {'yes' if r['met'] else 'NO'} |")
    if floor_rows:
        lines += ["", f"| floor | wall s | share of the full run | i's target ({I_TARGET} x the full run) | "
                  "target above the floor |", "|---|---:|---:|---:|---|"]
        for r in floor_rows:
            lines.append(f"| {r['ratio']} | {r['floor_s']:.1f} | {r['value']:.3f} | {r['target_s']:.1f} s | "
                         f"{'yes' if r['target_reachable'] else 'NO'} |")
    for name in ("f_local", "f_spark"):
        if name in figures and "imports_s" in figures[name]:
            f = figures[name]
            lines.append(f"{name}: imports {f['imports_s']} s, engine start {f['engine_start_s']} s, "
                         f"stop {f['engine_stop_s']} s, the rest of its {f['wall_s']:.1f} s the interpreter's "
                         "(and spark-submit's JVM) start and exit")
    if "s" in figures:
        s = figures["s"]
        lines += ["", f"(s) moved {s.get('moved')} items off a collision, largest suffix {s.get('max_suffix')}, "
                  f"skipped {s.get('skipped')} bad rows. (u) scores nearest codes, so its code mismatches "
                  "should equal the moved items (docs/scoring.md)."]
    for name in INCREMENTAL:
        if name in figures:
            lines.append(f"{name}: {figures[name]['encoded_rows']} rows through the model ({n_new} new)")
    for pair in ("i_local_vs_i_uncached", "i_spark_vs_i_spark_uncached", "i_local_vs_i_spark", "i0_local_vs_e",
                 "i0_spark_vs_k"):
        if pair in checks:
            lines.append(f"{pair.replace('_vs_', ' vs ')} tables: {checks[pair]}")
    lines.append("correctness: " + ("OK" if not checks["problems"] else "PROBLEMS: " + "; ".join(checks["problems"])))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.worker == "s":
        return standalone_worker(a)
    if a.worker == "u":
        return udf_worker(a)
    if a.worker == "floor":
        return floor_worker(a)
    variants = selected(a.variants)
    OUT.mkdir(parents=True, exist_ok=True)
    catalog = catalog_path(a.items, a.dim, "delta", a.quantize_bits)
    model = checkpoint_with_alternatives(Path(a.model) if a.model else model_path(a.dim, catalog),
                                         a.collision_alternatives)
    n_new = int(round(a.items * a.new_share))
    grown = grown_catalog(catalog, n_new, a.dim) if any(v in INCREMENTAL for v in variants) else None
    run = OUT / f"alternatives_{a.items}_{a.dim}"
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in variants}
    for r in range(a.repeat):  # rounds of every variant in turn, so a slow spell of the machine hits them all
        for name in variants:
            print(f"running {LABELS[name]}{f' (round {r + 1} of {a.repeat})' if a.repeat > 1 else ''} ...", flush=True)
            shutil.rmtree(run / name, ignore_errors=True)  # each round starts from nothing (i: from its base's copy)
            rounds[name].append(run_variant(name, a, run, catalog, grown, model, round_index=r))
    figures = {name: median_of(runs) for name, runs in rounds.items()}
    checks = check(figures, n_new)
    ratio_rows, floor_rows = ratios(figures), floors(figures)
    print(report(a, model, figures, checks, ratio_rows, n_new, floor_rows))
    if a.json:
        Path(a.json).write_text(json.dumps({"args": vars(a), "model": str(model), "new_items": n_new,
                                            "variants": figures, "ratios": ratio_rows, "floors": floor_rows,
                                            "checks": checks}, indent=2))
    return 0 if not checks["problems"] else 1


if __name__ == "__main__":
    code = main()
    # delta-rs can abort while the interpreter tears down after reading a table (tests/helpers.py's checker
    # runner has the story); every figure is printed and written by now, so skip the teardown.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
