"""The 2-prefix fill cap (--prefix-fill) on a synthetic catalog: crowding, uniqueness and reconstruction.

    python bench/prefix_fill.py                                   # 1M x 768, fills 0, 0.5, 1 (~6 min, 6 GB)
    python bench/prefix_fill.py --items 100000 --dim 64 --fills 0,0.5

Fits the job's default model (jobs/tokenize_catalog.py, every level anchored) on the job's default
sample size of the catalog with ``catalog_items`` = the whole catalog, as the job does, encodes the
whole catalog with the collision-aware last level (rqvae.resolve.spread_last_level, ties by row), and
prints one Markdown row per fill: the largest 2-prefix, the items beyond the K a 2-prefix can tell
apart, distinct tuples %, collision-free % (items whose tuple no other item has), the largest group,
the items the last level moved, the reconstruction cosine (centroid sum against the normalised
embedding), fit and encode seconds.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jobs.tokenize_catalog import parse_args  # noqa: E402
from rqvae import encode_array, fit  # noqa: E402
from rqvae.resolve import spread_last_level  # noqa: E402
from rqvae.synthetic import CatalogSpec, make_catalog  # noqa: E402


def measure(x: np.ndarray, fill: float, sample: np.ndarray, seed: int) -> dict[str, float]:
    job = parse_args(["--demo", "--seed", str(seed)])
    mcfg = dataclasses.replace(job.model_config, input_dim=x.shape[1])
    tcfg = dataclasses.replace(job.train_config, prefix_fill=fill)
    start = time.perf_counter()
    model = fit(x[sample], mcfg, tcfg, catalog_items=len(x)).model.eval()
    fit_s = time.perf_counter() - start
    start = time.perf_counter()
    r = encode_array(model, x, alternatives=mcfg.collision_alternatives)
    codes = spread_last_level(r.codes, r.quantization_error, r.alternatives, r.alternative_errors).codes
    encode_s = time.perf_counter() - start
    k = mcfg.codebook_size
    prefix = codes[:, 0].astype(np.int64) * k + codes[:, 1]
    per_prefix = np.bincount(prefix, minlength=k * k)
    _, per_tuple = np.unique(prefix * k + codes[:, 2], return_counts=True)
    with torch.no_grad():
        recon = np.concatenate([model.decode_codes(torch.as_tensor(codes[i:i + 65536], dtype=torch.long)).numpy()
                                for i in range(0, len(codes), 65536)])
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    cos = float((np.sum(unit * recon, axis=1) / np.linalg.norm(recon, axis=1)).mean())
    n = len(x)
    return {"fill": fill, "largest_2prefix": int(per_prefix.max()),
            "beyond_k": int(np.maximum(per_prefix - k, 0).sum()),
            "distinct_pct": round(100 * len(per_tuple) / n, 2),
            "collision_free_pct": round(100 * float((per_tuple == 1).sum()) / n, 2),
            "largest_group": int(per_tuple.max()), "moved": int((codes[:, 2] != r.codes[:, 2]).sum()),
            "recon_cos": round(cos, 4), "fit_s": round(fit_s, 1), "encode_s": round(encode_s, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, default=1_000_000, help="catalog items")
    p.add_argument("--dim", type=int, default=768, help="embedding width")
    p.add_argument("--fills", default="0,0.5,1", help="comma-separated --prefix-fill values")
    p.add_argument("--seed", type=int, default=0, help="catalog, sample and fit seed")
    p.add_argument("--json", type=Path, help="also write the rows as JSON here")
    a = p.parse_args(argv)
    torch.set_num_threads(2)
    x = np.asarray(make_catalog(CatalogSpec(n_items=a.items, dim=a.dim, seed=a.seed)).embeddings, dtype=np.float32)
    size = parse_args(["--demo"]).sample_size
    sample = np.sort(np.random.default_rng(a.seed).choice(a.items, size=min(a.items, size), replace=False))
    print(f"{a.items} items x {a.dim}, fitted on {len(sample)}; torch {torch.__version__}", flush=True)
    rows = []
    for fill in (float(v) for v in a.fills.split(",")):
        rows.append(measure(x, fill, sample, a.seed))
        print(json.dumps(rows[-1]), flush=True)
    cols = list(rows[0])
    print("\n| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for row in rows:
        print("| " + " | ".join(str(row[c]) for c in cols) + " |")
    if a.json:
        a.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
