"""Quality benchmark: RQ-VAE vs the RQ-KMeans baseline on the synthetic catalog, every metric.

    python bench/quality.py                      # 50k items, 384-d, 3 x 256 (about 5-10 min on 2 CPU cores)
    python bench/quality.py --items 10000 --epochs 20 --check-determinism

Prints a Markdown table (paste it into bench/RESULTS.md) and the acceptance checks of the core
issue; writes the figures as JSON with --json. Exit code 1 when a check fails.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

if __package__ in (None, ""):  # run as a script from anywhere: the project's packages beside it
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rqvae import ModelConfig, RQKMeans, RQKMeansConfig, TrainConfig, encode_array, fit
from rqvae.callbacks import ProgressPrinter
from rqvae.evaluate import evaluate_model
from rqvae.metrics import format_metrics_table
from rqvae.synthetic import CatalogSpec, make_catalog


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, default=50_000, help="catalog size N")
    p.add_argument("--dim", type=int, default=384, help="embedding length D")
    p.add_argument("--levels", type=int, default=3, help="code levels L")
    p.add_argument("--codebook-size", type=int, default=256, help="codes per level K")
    p.add_argument("--epochs", type=int, default=60, help="maximum training epochs")
    p.add_argument("--batch-size", type=int, default=1024, help="training batch size")
    p.add_argument("--estimator", choices=["ste", "rotation"], default="ste", help="gradient estimator")
    p.add_argument("--seed", type=int, default=0, help="seed of the catalog and of training")
    p.add_argument("--check-determinism", action="store_true", help="train twice and compare codes")
    p.add_argument("--with-plain", action="store_true",
                   help="also train a plain RQ-VAE (no input-space anchor) and show it as a third column")
    p.add_argument("--json", help="write all figures to this JSON file")
    return p.parse_args(argv)


def acceptance(rq: dict[str, float], km: dict[str, float], levels: int, k: int) -> list[tuple[str, bool]]:
    """The core issue's quality bar, as (description, passed) pairs."""
    checks = []
    for lv in range(1, levels + 1):
        checks.append((f"level {lv}: 0 dead codes (got {rq[f'l{lv}_dead_codes']:.0f})", rq[f"l{lv}_dead_codes"] == 0))
        ppl = rq[f"l{lv}_perplexity"]
        checks.append((f"level {lv}: perplexity {ppl:.1f} >= 0.8 K = {0.8 * k:.1f}", ppl >= 0.8 * k))
    checks.append((f"unique_rate RQ-VAE {rq['unique_rate']:.4f} > RQ-KMeans {km['unique_rate']:.4f}",
                   rq["unique_rate"] > km["unique_rate"]))
    checks.append((f"level-1 prefix coincidence (NN) RQ-VAE {rq['l1_prefix_nn']:.4f} >= RQ-KMeans "
                   f"{km['l1_prefix_nn']:.4f} - 0.02", rq["l1_prefix_nn"] >= km["l1_prefix_nn"] - 0.02))
    return checks


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    catalog = make_catalog(CatalogSpec(n_items=a.items, dim=a.dim, seed=a.seed))
    x, cats = catalog.embeddings, catalog.category_ids
    mcfg = ModelConfig(input_dim=a.dim, num_levels=a.levels, codebook_size=a.codebook_size, estimator=a.estimator)
    tcfg = TrainConfig(epochs=a.epochs, batch_size=a.batch_size, seed=a.seed)
    t0 = time.perf_counter()
    result = fit(x, mcfg, tcfg, callbacks=[ProgressPrinter(every=10)])
    t_rq = time.perf_counter() - t0
    t0 = time.perf_counter()
    baseline = RQKMeans.fit(x, RQKMeansConfig(input_dim=a.dim, num_levels=a.levels, codebook_size=a.codebook_size),
                            seed=a.seed)
    t_km = time.perf_counter() - t0
    rq = evaluate_model(result.model, x, category_ids=cats, seed=a.seed)
    km = evaluate_model(baseline, x, category_ids=cats, seed=a.seed)
    rq["train_seconds"], km["train_seconds"] = t_rq, t_km
    print(f"\n{a.items} items x {a.dim}-d, {a.levels} x {a.codebook_size}, {platform.processor() or platform.machine()}"
          f", torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    columns = {"RQ-VAE": rq, "RQ-KMeans": km}
    if a.with_plain:
        t0 = time.perf_counter()
        plain = fit(x, replace(mcfg, anchor_first_level=False), tcfg)
        columns["RQ-VAE plain"] = evaluate_model(plain.model, x, category_ids=cats, seed=a.seed)
        columns["RQ-VAE plain"]["train_seconds"] = time.perf_counter() - t0
    print(format_metrics_table(columns))
    checks = acceptance(rq, km, a.levels, a.codebook_size)
    if a.check_determinism:
        again = fit(x, mcfg, replace(tcfg))
        same = np.array_equal(encode_array(again.model, x).codes, encode_array(result.model, x).codes)
        checks.append(("same seed, same codes (trained twice)", same))
    print()
    for text, ok in checks:
        print(("PASS  " if ok else "FAIL  ") + text)
    print(f"level-1 NMI vs taxonomy level 1: RQ-VAE {rq.get('l1_nmi', float('nan')):.4f}, "
          f"RQ-KMeans {km.get('l1_nmi', float('nan')):.4f}")
    if a.json:
        with open(a.json, "w", encoding="utf-8") as f:
            json.dump({"args": vars(a), "models": columns, "checks": checks}, f, indent=2)
    return 0 if all(ok for _, ok in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
