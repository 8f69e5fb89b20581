"""How many items keep their codes when a new generation is trained: --align none / relabel / warm-start.

    python bench/alignment.py                    # the demo catalog's size: 100k items x 256, then +10%
    python bench/alignment.py --items 20000 --epochs 10

The synthetic demo catalog (the job's --demo generator, seed 0) with N x 1.1 items: generation 1
is the job's default run on the first N items; generation 2 retrains on all of them (10% new items)
with another --seed, once per --align choice, each into a copy of generation 1's table (same MLflow
store, --max-id-churn 1 so every variant publishes). For the items of generation 1 that are in both
tables: the share that keeps its level-1 code, 2-prefix and 3-prefix, and its semantic_id; then the
new model's held-out quality (unique rate, reconstruction cosine, level-1 prefix coherence) and the
training time, read from the job's MLflow run. Prints a Markdown table; --json writes the figures.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):
    sys.path.insert(0, str(ROOT))

OUT = ROOT / "bench" / "out"
ALIGN = ("none", "relabel", "warm-start")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, default=100_000, help="items N of generation 1 (the demo's 100k)")
    p.add_argument("--dim", type=int, default=256, help="embedding length D (the demo's 256)")
    p.add_argument("--epochs", type=int, default=30, help="--epochs of every training (the job's default)")
    p.add_argument("--seed", type=int, default=1, help="--seed of generation 2 (generation 1 uses 0)")
    p.add_argument("--json", help="write the figures to this file")
    return p.parse_args(argv)


def catalogs(n: int, dim: int, root: Path) -> tuple[Path, Path]:
    """The first N items, and all N x 1.1 items, of one demo catalog, as Delta tables."""
    from deltalake import write_deltalake

    from pipelines.demo import catalog_to_arrow
    from rqvae.synthetic import CatalogSpec, make_catalog

    table = catalog_to_arrow(make_catalog(CatalogSpec(n_items=int(n * 1.1), dim=dim, seed=0)))
    first, grown = root / "catalog_gen1", root / "catalog_gen2"
    write_deltalake(str(first), table.slice(0, n), mode="overwrite")
    write_deltalake(str(grown), table, mode="overwrite")
    return first, grown


def run_job(args: list[str]) -> str:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(ROOT / "jobs" / "tokenize_catalog.py"), *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"job failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc.stdout + f"\n    wall done in {time.perf_counter() - start:.1f}s\n"


def active(table: Path) -> dict[int, tuple[str, list[int]]]:
    from deltalake import DeltaTable

    t = DeltaTable(str(table)).to_pyarrow_table(columns=["item_id", "semantic_id", "codes", "active"])
    t = t.filter(t["active"])
    return dict(zip(t["item_id"].to_pylist(), zip(t["semantic_id"].to_pylist(), t["codes"].to_pylist())))


def kept(before: dict, after: dict) -> dict[str, float]:
    both = [i for i in before if i in after]
    old = np.array([before[i][1] for i in both])
    new = np.array([after[i][1] for i in both])
    prefix = np.cumprod(old == new, axis=1).mean(axis=0)
    same_id = float(np.mean([before[i][0] == after[i][0] for i in both]))
    return {**{f"l{lv}_prefix_kept": float(v) for lv, v in enumerate(prefix, start=1)}, "id_kept": same_id,
            "items": len(both)}


def run_metrics(work: Path, stdout: str) -> dict[str, Any]:
    """Held-out quality of the run's model and its training seconds (from MLflow and the banners)."""
    import mlflow

    run_id = re.search(r"mlflow run\s+(\w+)", stdout)
    assert run_id is not None
    mlflow.set_tracking_uri(f"sqlite:///{work.resolve() / 'mlflow.db'}")
    metrics = mlflow.MlflowClient().get_run(run_id.group(1)).data.metrics
    seconds = {m.group(1): float(m.group(2)) for m in re.finditer(r"^    (.+) done in ([0-9.]+)s$", stdout, re.M)}
    return {"unique_rate": metrics.get("holdout_unique_rate"), "recon_cos_mean": metrics.get("holdout_recon_cos_mean"),
            "l1_prefix_nn": metrics.get("holdout_l1_prefix_nn"), "train_s": seconds.get("train"),
            "wall_s": seconds.get("wall"), "churn": metrics.get("drift_id_churn")}


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    root = OUT / f"alignment_{a.items}_{a.dim}"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    first, grown = catalogs(a.items, a.dim, root)
    work = root / "work"
    common = ["--work-dir", work, "--category-col", "category", "--epochs", a.epochs]
    print(f"generation 1: {a.items:,} items ...", flush=True)
    gen1 = run_job(["--input", first, "--output", root / "gen1", "--seed", 0, *common])
    figures: dict[str, Any] = {"items": a.items, "dim": a.dim, "epochs": a.epochs,
                               "gen1": run_metrics(work, gen1), "gen2": {}}
    before = active(root / "gen1" / "semantic_ids")
    for align in ALIGN:
        print(f"generation 2, --align {align} ...", flush=True)
        out = root / f"gen2_{align}"
        shutil.copytree(root / "gen1", out)
        stdout = run_job(["--input", grown, "--output", out, "--seed", a.seed, "--align", align,
                          "--max-id-churn", "1", *common])
        figures["gen2"][align] = {**kept(before, active(out / "semantic_ids")), **run_metrics(work, stdout)}
        print(align, figures["gen2"][align], flush=True)
    print(report(figures))
    if a.json:
        Path(a.json).write_text(json.dumps(figures, indent=2))
    return 0


def report(f: dict[str, Any]) -> str:
    g1 = f["gen1"]
    lines = [f"generation 1: {f['items']:,} items x {f['dim']}, {f['epochs']} epochs: unique {g1['unique_rate']:.4f}, "
             f"recon cos {g1['recon_cos_mean']:.4f}, P1 nn {g1['l1_prefix_nn']:.3f}, train {g1['train_s']:.0f}s", "",
             "| --align | level-1 kept | 2-prefix kept | 3-prefix kept | ID kept | churn | unique | recon cos "
             "| P1 nn | train s |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for align, r in f["gen2"].items():
        lines.append(f"| {align} | {r['l1_prefix_kept']:.1%} | {r['l2_prefix_kept']:.1%} | {r['l3_prefix_kept']:.1%} "
                     f"| {r['id_kept']:.1%} | {r['churn']:.1%} | {r['unique_rate']:.4f} | {r['recon_cos_mean']:.4f} "
                     f"| {r['l1_prefix_nn']:.3f} | {r['train_s']:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
