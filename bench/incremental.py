"""An incremental run against a full run on the embedded engine: N items, then 1% new ones.

    python bench/incremental.py --items 1000000 --dim 256
    python bench/incremental.py --items 1000000 --dim 768 --new-share 0.01

Catalog A (N items) is tokenized once (untimed) with the benchmark model; catalog B is A plus
``--new-share`` x N new items (a copy of A's Delta table with one appended commit, as a daily feed
appends). Then, timed as whole processes (``--stages validate,encode,report --model <checkpoint>``,
the catalog's files in the page cache, the MLflow store already created):

  (f) full:        B into an empty output: every row through the model, the whole table written;
  (i) incremental: B into A's table (auto mode picks incremental): only the new rows through the
                   model, one Delta MERGE; the run that tokenized A kept its row groups' fingerprints
                   (``--fingerprint-cache``), so only the appended file's embeddings are read;
  (n) the same without the fingerprint cache (``--fingerprint-cache none``): every embedding read;
  (t) with --with-training: the job's default run of B into an empty output (sample, train, encode,
                   report), what every run cost before incremental runs existed.

Checks that (i) encoded exactly the new rows, that every ID of A's table is unchanged (the shared
checker's --previous-version), and that (i)'s active IDs equal (f)'s for the items of A. Prints a
Markdown table (wall time, stage times, peak RSS) and writes JSON with --json.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
if __package__ in (None, ""):
    sys.path.insert(0, str(ROOT))

from encode_throughput import (  # noqa: E402 - the catalog, model and timing helpers of the throughput bench
    OUT,
    catalog_path,
    model_path,
    prepare_mlflow_store,
    run_sampled,
    warm_page_cache,
)

CHECKER = ROOT.parent / "shared" / "tools" / "check_sid_table.py"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, default=1_000_000, help="items N of catalog A")
    p.add_argument("--dim", type=int, default=256, help="embedding length D")
    p.add_argument("--new-share", type=float, default=0.01, help="new items in B, as a share of N")
    p.add_argument("--model", help="checkpoint (default: the throughput bench's model for D, trained once)")
    p.add_argument("--with-training", action="store_true", help="also time (t), a full run that trains")
    p.add_argument("--json", help="write the figures to this file")
    return p.parse_args(argv)


def grown_catalog(a: Path, n_new: int, dim: int) -> Path:
    """A copy of catalog A with ``n_new`` new items appended in one commit (ids after A's largest)."""
    from deltalake import DeltaTable, write_deltalake

    from pipelines.arrow_utils import matrix_to_list_array
    from rqvae.synthetic import CatalogSpec, make_catalog

    b = a.with_name(a.name + f"_plus_{n_new}")
    if not (b / "_delta_log").is_dir():
        shutil.copytree(a, b)
        start = int(DeltaTable(str(b)).to_pyarrow_dataset().to_table(columns=["item_id"])["item_id"]
                    .to_numpy().max()) + 1
        fresh = make_catalog(CatalogSpec(n_items=n_new, dim=dim, seed=99))
        write_deltalake(str(b), pa.table({"item_id": pa.array(np.arange(start, start + n_new)),
                                          "embedding": matrix_to_list_array(fresh.embeddings),
                                          "category": pa.nulls(n_new, pa.list_(pa.string()))}), mode="append")
    return b


def job(catalog: Path, output: Path, work: Path, model: Path, *extra: str) -> list[str]:
    return [sys.executable, str(ROOT / "jobs" / "tokenize_catalog.py"), "--input", str(catalog), "--output",
            str(output), "--work-dir", str(work), "--stages", "validate,encode,report", "--model", str(model),
            "--max-reject-share", "0", *extra]


def stage_seconds(stdout: str) -> dict[str, float]:
    """``{stage: seconds}`` from the job's banners ("    encode done in 3.2s")."""
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^    (.+) done in ([0-9.]+)s$", stdout, re.M)}


def timed(cmd: list[str], catalog: Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``cmd`` (environment ``env``, default this process's) with ``catalog``'s files in the page cache;
    its wall time, peak RSS and PSS, stage times and rows through the model (the job's banners)."""
    warm_page_cache(catalog)
    sampling: dict[str, float] = {}
    rc, wall, rss, pss, out = run_sampled(cmd, dict(os.environ) if env is None else env, sampling)
    if rc != 0:
        raise RuntimeError(f"job failed (rc {rc}):\n{out[-4000:]}")
    encoded = re.search(r"^    (\d+) rows went through the model$", out, re.M)
    return {"wall_s": wall, "peak_rss_mb": rss, "peak_pss_mb": pss, "stages": stage_seconds(out),
            "sampler_cpu_s": sampling.get("sampler_cpu_s"),
            "encoded_rows": int(encoded.group(1)) if encoded else None, "stdout_tail": out[-1500:]}


def active_ids(table: Path) -> dict[int, str]:
    from deltalake import DeltaTable

    t = DeltaTable(str(table)).to_pyarrow_dataset().to_table(columns=["item_id", "semantic_id", "active"])
    keep = t.filter(t["active"])
    return dict(zip(keep["item_id"].to_pylist(), keep["semantic_id"].to_pylist()))


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    OUT.mkdir(parents=True, exist_ok=True)
    cat_a = catalog_path(a.items, a.dim, "delta")
    model = Path(a.model) if a.model else model_path(a.dim, cat_a)
    n_new = int(round(a.items * a.new_share))
    cat_b = grown_catalog(cat_a, n_new, a.dim)
    run = OUT / f"incremental_{a.items}_{a.dim}"
    shutil.rmtree(run, ignore_errors=True)
    work = run / "work"
    prepare_mlflow_store(work)
    print(f"tokenizing A ({a.items:,} items) once, untimed ...", flush=True)
    base = timed(job(cat_a, run / "base", work, model), cat_a)
    shutil.copytree(run / "base", run / "incremental")
    shutil.copytree(run / "base", run / "incremental_uncached")

    print("(f) full run of B into an empty output ...", flush=True)
    # Its own cache folder: it keeps B's row groups (the cost of a full run), which (i) must not find.
    full = timed(job(cat_b, run / "full", work, model, "--fingerprint-cache", str(run / "full_cache")), cat_b)
    print("(i) incremental run of B into A's table ...", flush=True)
    incremental = timed(job(cat_b, run / "incremental", work, model), cat_b)
    print("(n) incremental run of B into A's table, without the fingerprint cache ...", flush=True)
    uncached = timed(job(cat_b, run / "incremental_uncached", work, model, "--fingerprint-cache", "none"), cat_b)
    trained = None
    if a.with_training:
        print("(t) full run of B with training, into an empty output ...", flush=True)
        cmd = job(cat_b, run / "trained", work, model)
        cut = cmd.index("--stages")
        trained = timed(cmd[:cut] + cmd[cut + 4:], cat_b)  # default stages, no --model: it trains

    for name, r in (("incremental", incremental), ("incremental_uncached", uncached)):
        if r["encoded_rows"] != n_new:
            raise RuntimeError(f"the {name} run encoded {r['encoded_rows']} rows, not the {n_new} new ones")
    ids_f, ids_i = active_ids(run / "full" / "semantic_ids"), active_ids(run / "incremental" / "semantic_ids")
    if ids_i != active_ids(run / "incremental_uncached" / "semantic_ids"):
        raise RuntimeError("the incremental runs with and without the fingerprint cache issued different IDs")
    old_items = set(active_ids(run / "base" / "semantic_ids"))
    same = sum(ids_f[i] == ids_i[i] for i in old_items)
    checker = subprocess.run([sys.executable, str(CHECKER), str(run / "incremental" / "semantic_ids"),
                              "--previous-version", "0"], capture_output=True, text=True) if CHECKER.is_file() else None
    figures = {"items": a.items, "dim": a.dim, "new_items": n_new, "base_wall_s": base["wall_s"],
               "full": {k: v for k, v in full.items() if k != "stdout_tail"},
               "incremental": {k: v for k, v in incremental.items() if k != "stdout_tail"},
               "incremental_uncached": {k: v for k, v in uncached.items() if k != "stdout_tail"},
               "ratio_wall": incremental["wall_s"] / full["wall_s"],
               "ratio_wall_uncached": uncached["wall_s"] / full["wall_s"],
               "trained": None if trained is None else {k: v for k, v in trained.items() if k != "stdout_tail"},
               "ratio_wall_to_trained": None if trained is None else incremental["wall_s"] / trained["wall_s"],
               "old_items_same_id_as_full_run": same / len(old_items),
               "checker": None if checker is None else checker.stdout}
    print(report(figures))
    if a.json:
        Path(a.json).write_text(json.dumps(figures, indent=2))
    return 0 if checker is None or checker.returncode == 0 else 1


def report(f: dict[str, Any]) -> str:
    stages = sorted(set(f["full"]["stages"]) | set(f["incremental"]["stages"]))
    lines = [f"N = {f['items']:,} x {f['dim']}, {f['new_items']:,} new items, {os.cpu_count()} cores", "",
             "| run | wall s | peak RSS MB | rows through the model | " + " | ".join(stages) + " |",
             "|---|---:|---:|---:|" + "---:|" * len(stages)]
    for name in ("full", "incremental", "incremental_uncached", "trained"):
        r = f.get(name)
        if r is None:
            continue
        lines.append(f"| {name} | {r['wall_s']:.1f} | {r['peak_rss_mb']:,.0f} | {r['encoded_rows']:,} | "
                     + " | ".join(f"{r['stages'].get(s, 0):.1f}" for s in stages) + " |")
    lines += ["", f"incremental / full wall time: {f['ratio_wall']:.3f}"]
    if f.get("incremental_uncached"):
        lines.append(f"incremental without the fingerprint cache / full: {f['ratio_wall_uncached']:.3f}")
    if f["trained"]:
        lines.append(f"incremental / full run with training: {f['ratio_wall_to_trained']:.3f}")
    lines += [
              f"items of A with the same ID in both runs: {f['old_items_same_id_as_full_run']:.2%}"]
    if f["checker"]:
        lines += ["", "check_sid_table.py --previous-version 0 on the incremental table:", f["checker"]]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
