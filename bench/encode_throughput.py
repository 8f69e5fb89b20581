"""Encode throughput: the model's own limit vs the pipeline, on one catalog and one model.

    python bench/encode_throughput.py --items 1000000 --dim 768                  # both engines
    python bench/encode_throughput.py --items 4000000 --dim 768 --engines local --skip-limit

Measures, side by side:
  (a) limit:    rqvae.encode_array on the catalog held in memory as float32 (all cores, best of 3, at the
                fastest of --limit-batch-sizes);
  (b) encode:   read table -> mapInArrow UDF -> write codes (no uniquify, no statistics);
  (c) job:      jobs/tokenize_catalog.py --stages validate,encode,report --model <the same checkpoint>
                (wall time of the whole process; its MLflow store exists already, as for a scheduled job)
(b) and (c) start with the catalog's files in the OS page cache (read once, untimed), as (a) starts
with the array in memory.
for the embedded engine (Sail + Delta) and classic local Spark (local[*] JVM + Parquet). (b) and (c)
run in their own processes; the peak RSS of each process tree (JVM and Python workers included) is
sampled every 0.2 s. Prints a Markdown table and writes JSON with --json.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):
    sys.path.insert(0, str(ROOT))

OUT = ROOT / "bench" / "out"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, default=1_000_000, help="catalog size N")
    p.add_argument("--dim", type=int, default=768, help="embedding length D")
    p.add_argument("--engines", default="local,spark", help="comma-separated: local (Sail), spark (classic)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="rows per model call in (b) and (c) (default: rqvae's for the device, 2048 on CPU)")
    p.add_argument("--limit-batch-sizes", default="auto,65536",
                   help="comma-separated batch sizes (a) is measured at ('auto' = rqvae's default); the limit "
                   "is the fastest of them")
    p.add_argument("--device", default="cpu", help="torch device for (a), (b) and the job's --encode-device "
                   "(cuda on a GPU machine)")
    p.add_argument("--skip-limit", action="store_true", help="skip (a), e.g. when N x D does not fit in memory")
    p.add_argument("--json", help="write the figures to this file")
    p.add_argument("--worker", choices=["encode"], help=argparse.SUPPRESS)  # internal: run (b) in this process
    p.add_argument("--engine", default="local", help=argparse.SUPPRESS)
    p.add_argument("--catalog", help=argparse.SUPPRESS)
    p.add_argument("--model", help="checkpoint to measure (default: bench/out/model_<D>_default.pt, the job's "
                   "default model fitted on the catalog's first 100k items on first use)")
    p.add_argument("--output", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def catalog_path(n: int, dim: int, fmt: str, quantize_bits: int = 0) -> Path:
    """The benchmark catalog (written once by bench/make_catalog.py's writer, then reused); with
    ``quantize_bits``, its values rounded as ``make_catalog.py --quantize-bits`` does (``..._q8_delta``)."""
    from make_catalog import quantizer

    from pipelines.demo import write_demo_catalog
    from rqvae.synthetic import CatalogSpec

    path = OUT / f"catalog_{n}_{dim}{f'_q{quantize_bits}' if quantize_bits else ''}_{fmt}"
    if not (path / ("_delta_log" if fmt == "delta" else "part-00000.parquet")).exists():
        print(f"writing {path} ...", flush=True)
        write_demo_catalog(path, CatalogSpec(n_items=n, dim=dim, seed=0), fmt=fmt,
                           transform=quantizer(quantize_bits) if quantize_bits else None)
    return path


MODEL_TRAIN_ITEMS = 100_000


def model_path(dim: int, catalog: Path) -> Path:
    """The model the job trains with its defaults (``--demo``'s model config at D: since 2026-12-03 residual
    k-means at every level, 3 x 256, 16 collision alternatives), fitted once on the catalog's first 100k items
    (as the job would fit on a sample of it), then reused. (``model_<D>_trained.pt``, the library's default
    shape with one anchored level and a learned MLP, is what the figures before that date measured.)"""
    import numpy as np
    from deltalake import DeltaTable

    from jobs.tokenize_catalog import parse_args
    from pipelines.arrow_utils import embeddings_to_numpy
    from rqvae import ProgressPrinter, TrainConfig, fit, save_checkpoint

    path = OUT / f"model_{dim}_default.pt"
    if not path.exists():
        parts, n = [], 0
        for batch in DeltaTable(str(catalog)).to_pyarrow_dataset().to_batches(columns=["embedding"]):
            parts.append(embeddings_to_numpy(batch.column("embedding"), dim, copy=True))
            n += len(parts[-1])
            if n >= MODEL_TRAIN_ITEMS:
                break
        x = np.concatenate(parts)[:MODEL_TRAIN_ITEMS]
        print(f"training the benchmark model on {len(x)} x {dim} ...", flush=True)
        config = dataclasses.replace(parse_args(["--demo"]).model_config, input_dim=dim)
        fitted = fit(x, config, TrainConfig(epochs=30), callbacks=[ProgressPrinter()])
        save_checkpoint(fitted.model, path)
    return path


PSS_EVERY_S = 1.0  # a PSS read at least this often; RSS every 0.2 s, and PSS at once when RSS grew by PSS_GROWTH
PSS_GROWTH = 1.02
PSS_GAP_PER_READ_S = 40  # ...but never sooner than 40x the last PSS read's own time after it (<= 2.5% of a core)


def run_sampled(cmd: list[str], env: dict[str, str],
                stats: dict[str, float] | None = None) -> tuple[int, float, float, float, str]:
    """Run ``cmd``; return (exit code, wall seconds, peak RSS and peak PSS of its process tree in MB, stdout).

    The RSS sum counts a page once per process that maps it, so a forked child counts its parent's pages
    again: a JVM spawning a helper (its child briefly shows the JVM's whole RSS) or Python workers forked
    from one daemon. The PSS sum (proportional set size: a shared page split among the processes that
    share it) counts each page once; it equals the RSS sum for a tree without shared pages. PSS is read
    from /proc (Linux); elsewhere it repeats the RSS figure.

    Reading PSS makes the kernel walk every page of every process (about 15 ms for a JVM of 1.4 GB, more as
    it grows), on the same cores as the command: read every 0.2 s it cost a 7 GB classic-Spark job several
    percent of its wall time. So RSS (cheap) is read every 0.2 s and PSS at least every ``PSS_EVERY_S`` and
    at once whenever the RSS sum has grown by ``PSS_GROWTH`` since the last PSS read, but never sooner after a
    PSS read than ``PSS_GAP_PER_READ_S`` times that read's own time (without that, a 7 GB JVM's tree took 9.2
    CPU seconds of sampling in a 100 s run: the JVM variants paid for their own measurement). ``stats``, when
    given, gets ``sampler_cpu_s``: the CPU seconds the sampling itself took."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    peak = [0, 0]

    def sample() -> None:
        root = psutil.Process(proc.pid)
        last_pss_at, last_pss_rss, gap = -PSS_EVERY_S, 0, 0.0
        while proc.poll() is None:
            try:
                tree = [root, *root.children(recursive=True)]
                rss = sum(_rss(p) for p in tree)
                peak[0] = max(peak[0], rss)
                now = time.perf_counter()
                due = now - last_pss_at >= PSS_EVERY_S or rss > last_pss_rss * PSS_GROWTH
                if due and now - last_pss_at >= gap:
                    peak[1] = max(peak[1], sum(_pss(p) for p in tree))
                    read = time.perf_counter()
                    last_pss_at, last_pss_rss, gap = read, rss, PSS_GAP_PER_READ_S * (read - now)
            except psutil.Error:
                pass
            time.sleep(0.2)
        if stats is not None:
            stats["sampler_cpu_s"] = time.thread_time()

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, _ = proc.communicate()
    sampler.join()
    return proc.returncode, time.perf_counter() - start, peak[0] / 2**20, max(peak[1], 0) / 2**20, out


def _rss(p: psutil.Process) -> int:
    try:
        return p.memory_info().rss
    except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
        return 0


def _pss(p: psutil.Process) -> int:
    try:
        full = p.memory_full_info()
        return getattr(full, "pss", full.rss)
    except (psutil.AccessDenied, psutil.ZombieProcess):
        return _rss(p)
    except psutil.NoSuchProcess:
        return 0


def codes_digest(ids: np.ndarray, codes: np.ndarray) -> str:
    """A digest of the codes in item-id order: equal digests = every item got the same codes."""
    order = np.argsort(ids, kind="stable")
    return hashlib.sha256(np.ascontiguousarray(codes[order], dtype=np.int32).tobytes()).hexdigest()[:16]


def table_codes_digest(path: Path, fmt: str) -> str:
    """:func:`codes_digest` of a semantic-ID table the job wrote (Delta or Parquet)."""
    import pyarrow.dataset as ds
    from deltalake import DeltaTable

    dataset = DeltaTable(str(path)).to_pyarrow_dataset() if fmt == "delta" else ds.dataset(str(path))
    table = dataset.to_table(columns=["item_id", "codes"])
    codes = table.column("codes").combine_chunks()
    return codes_digest(table.column("item_id").to_numpy(), codes.flatten().to_numpy().reshape(len(codes), -1))


def limit_items_per_s(catalog: Path, model_file: Path, batch_sizes: list[int | None],
                      device: str = "cpu") -> tuple[dict[str, float], str]:
    """(a): encode the whole catalog from memory at each batch size (None = rqvae's default); returns
    items/s per batch size and the digest of the codes (the same at every batch size, or it raises)."""
    import torch
    from deltalake import DeltaTable

    from pipelines.arrow_utils import embeddings_to_numpy
    from rqvae import encode_array, load_checkpoint

    torch.set_num_threads(os.cpu_count() or 1)
    parts, ids = [], []
    for b in DeltaTable(str(catalog)).to_pyarrow_dataset().to_batches(columns=["item_id", "embedding"]):
        parts.append(embeddings_to_numpy(b.column("embedding"), copy=True))
        ids.append(b.column("item_id").to_numpy())
    x = np.concatenate(parts)
    del parts
    model = load_checkpoint(model_file.read_bytes(), map_location=device).to(device)
    rates, digests = {}, set()
    for batch_size in batch_sizes:
        seconds = []
        for _ in range(3):  # best of 3: the limit is what the machine can do, not what it did once
            start = time.perf_counter()
            codes = encode_array(model, x, batch_size=batch_size).codes
            seconds.append(time.perf_counter() - start)
        rates[str(batch_size or "auto")] = len(x) / min(seconds)
        digests.add(codes_digest(np.concatenate(ids), codes))
    if len(digests) != 1:
        raise RuntimeError(f"the batch size changed the codes: digests {sorted(digests)}")
    return rates, digests.pop()


def encode_worker(a: argparse.Namespace) -> int:
    """(b) inside its own process: read -> UDF -> write; prints the seconds as JSON."""
    from pipelines import io
    from pipelines.encode import encode_embeddings
    from pipelines.session import start_session

    fmt = "delta" if a.engine == "local" else "parquet"
    with start_session(a.engine, want_delta=fmt == "delta") as es:
        start = time.perf_counter()
        df = io.read_catalog(es.spark, a.catalog, fmt).select("item_id", "embedding")
        codes = encode_embeddings(df, Path(a.model).read_bytes(), a.dim, batch_size=a.batch_size, device=a.device)
        codes = codes.drop("reason")  # every catalog row is clean; (b) writes the codes only
        io.write_table(codes, io.OutputLocation.for_path(a.output, fmt), "codes")
        print(json.dumps({"seconds": time.perf_counter() - start}))
    return 0


def warm_page_cache(path: Path) -> None:
    """Read every file under ``path`` once, so (b) and (c) start with the catalog in the OS page cache,
    as (a) starts with it in memory (otherwise whichever run reads first pays the disk)."""
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        with open(file, "rb") as fh:
            while fh.read(1 << 24):
                pass


def prepare_mlflow_store(work: Path) -> None:
    """Create the job's sqlite MLflow store before (c) is timed, as a scheduled job finds it: a fresh
    store runs MLflow's schema migrations once (about 1 s), which is not a per-run cost."""
    work.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{work.resolve() / 'mlflow.db'}"
    subprocess.run([sys.executable, "-c", f"import mlflow; mlflow.MlflowClient({uri!r}).search_experiments()"],
                   check=True, capture_output=True)


def engine_figures(engine: str, a: argparse.Namespace, model_file: Path) -> dict[str, Any]:
    """(b) and (c) for one engine: items/s and peak RSS of each process tree."""
    fmt = "delta" if engine == "local" else "parquet"
    catalog = catalog_path(a.items, a.dim, fmt)
    env = {**os.environ, "SPARK_MASTER": os.environ.get("SPARK_MASTER", "local[*]")}
    run_dir = OUT / f"run_{engine}_{a.items}_{a.dim}"
    batch = ["--batch-size", str(a.batch_size)] if a.batch_size else []
    worker = [sys.executable, str(Path(__file__).resolve()), "--worker", "encode", "--engine", engine,
              "--catalog", str(catalog), "--model", str(model_file), "--output", str(run_dir / "encode"),
              "--dim", str(a.dim), "--device", a.device, *batch]
    warm_page_cache(catalog)
    rc, wall_b, rss_b, _, out = run_sampled(worker, env)
    if rc != 0:
        raise RuntimeError(f"encode-only run failed on {engine}:\n{out[-3000:]}")
    seconds_b = next(json.loads(line) for line in out.splitlines() if line.startswith('{"seconds"'))["seconds"]
    prepare_mlflow_store(run_dir / "work")
    warm_page_cache(catalog)
    job = [sys.executable, str(ROOT / "jobs" / "tokenize_catalog.py"), "--engine", engine, "--format", fmt,
           "--input", str(catalog), "--output", str(run_dir / "tables"), "--work-dir", str(run_dir / "work"),
           "--stages", "validate,encode,report", "--model", str(model_file),
           "--encode-device", a.device, "--max-reject-share", "0",
           *(["--encode-batch-size", str(a.batch_size)] if a.batch_size else [])]
    rc, wall_c, rss_c, _, out = run_sampled(job, env)
    if rc != 0:
        raise RuntimeError(f"job failed on {engine}:\n{out[-3000:]}")
    digest = table_codes_digest(run_dir / "tables" / "semantic_ids", fmt)
    return {"job_codes_digest": digest, "encode_items_per_s": a.items / seconds_b, "encode_seconds": seconds_b,
            "encode_wall": wall_b,
            "encode_peak_rss_mb": rss_b, "job_items_per_s": a.items / wall_c, "job_seconds": wall_c,
            "job_peak_rss_mb": rss_c}


def report(a: argparse.Namespace, limits: dict[str, float], digest: str, figures: dict[str, dict[str, Any]]) -> str:
    limit = max(limits.values()) if limits else None
    lines = [f"N = {a.items:,}, D = {a.dim}, batch {a.batch_size or 'auto'}, {os.cpu_count()} cores, "
             f"{psutil.virtual_memory().total / 2**30:.0f} GiB, Python {platform.python_version()}",
             "", "| engine | (a) limit items/s | (b) encode items/s | b/a | (c) job items/s | c/a "
             "| (b) peak RSS MB | (c) peak RSS MB |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for engine, f in figures.items():
        ratio_b = f"{f['encode_items_per_s'] / limit:.2f}" if limit else "n/a"
        ratio_c = f"{f['job_items_per_s'] / limit:.2f}" if limit else "n/a"
        lines.append(f"| {engine} | {limit or 0:,.0f} | {f['encode_items_per_s']:,.0f} | {ratio_b} | "
                     f"{f['job_items_per_s']:,.0f} | {ratio_c} | {f['encode_peak_rss_mb']:,.0f} | "
                     f"{f['job_peak_rss_mb']:,.0f} |")
    lines.append("\n(a) items/s per batch size: " + ", ".join(f"{k}: {v:,.0f}" for k, v in limits.items()))
    lines.append(f"codes digest of (a): {digest}")
    for engine, f in figures.items():
        same = "same as (a)" if f["job_codes_digest"] == digest else "DIFFERENT from (a)" if limit else "(a) skipped"
        lines.append(f"codes digest of the {engine} job's table: {f['job_codes_digest']} ({same})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.worker:
        return encode_worker(a)
    OUT.mkdir(parents=True, exist_ok=True)
    model_file = Path(a.model) if a.model else model_path(a.dim, catalog_path(a.items, a.dim, "delta"))
    limits: dict[str, float] = {}
    digest = "skipped"
    if not a.skip_limit:
        sizes = [None if b.strip() == "auto" else int(b) for b in a.limit_batch_sizes.split(",") if b.strip()]
        limits, digest = limit_items_per_s(catalog_path(a.items, a.dim, "delta"), model_file, sizes, a.device)
        print(f"(a) limit: {max(limits.values()):,.0f} items/s {limits}", flush=True)
    figures = {}
    for engine in [e.strip() for e in a.engines.split(",") if e.strip()]:
        figures[engine] = engine_figures(engine, a, model_file)
        print(engine, {k: round(v, 1) if isinstance(v, float) else v for k, v in figures[engine].items()}, flush=True)
    print(report(a, limits, digest, figures))
    if a.json:
        Path(a.json).write_text(json.dumps({"args": vars(a), "limit_items_per_s": max(limits.values(), default=None),
                                            "limit_by_batch_size": limits, "codes_digest": digest,
                                            "engines": figures}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
