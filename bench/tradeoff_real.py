"""Trade-off curves on the real catalog: what neighbour coherence and NMI cost in codes used, and what
reconstruction costs in fit effort. Issue 12 asks for the curve wherever a column cannot be won.

    python bench/tradeoff_real.py                                   # both curves, ~10 min on 2 cores
    python bench/tradeoff_real.py --grid 256x256,128x256 --refine-rounds 0

Same catalog, metric code and columns as bench/quality_real.py (its ``load_catalog`` and ``score``).

1. **Codes used against coherence** (``--grid K1xK2,...``): residual k-means in input space with K1
   centroids at level 1 and K2 at level 2 (level 3 always 256), and the job's collision-aware last
   level (16 alternatives), scored on the 3 x 256 grid, so a row with K1 < 256 uses only K1 / 256 of
   level 1 (util_l1) and has fewer, larger level-1 groups (ppl_l1). P1 nn, P2 nn and NMI1 rise as the
   groups grow; reading the curve at a peer's perplexity compares the two at equal group sizes.
2. **Fit effort against reconstruction** (``--refine-rounds R``): residual k-means at 3 x 256, then R
   rounds of block-coordinate refinement (each level's centroids re-fitted to what the other levels
   leave, with every item's codes re-assigned greedily between rounds), spreading as above.

3. **Level 1 across seeds** (``--seeds N``): level 1 alone, fitted N times with seeds 0..N-1 by our
   k-means (the job's settings: at most 100 Lloyd iterations, tol 1e-3) and by scikit-learn's KMeans
   with one k-means++ start (what semantic-id's RQKMeans runs at each level, 10 times, keeping the
   lowest inertia): mean squared distance to the centroid, P1 nn, NMI1 and perplexity per seed. Their
   spread is how far one fit's P1 or NMI1 can be from another's by chance alone. ``--seed-k1 96,128``
   adds our k-means with fewer level-1 centroids (the codes-used curve, across seeds), and
   ``--seed-peers rvq`` the level-1 codes of bench/peers.py's ResidualVQ (all three levels fitted as
   in bench/quality_real.py, level 1 scored), so a peer's column is compared at its own seed spread.

Prints Markdown tables for bench/RESULTS.md; --json writes the rows.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import peers  # noqa: E402  (bench/peers.py)
from quality_real import DEFAULT_CATALOG, DEFAULT_QUERIES, load_catalog, neighbours, score, table  # noqa: E402

from rqvae.kmeans import kmeans, nearest  # noqa: E402
from rqvae.metrics import _cluster_class_agreement, level_usage  # noqa: E402
from rqvae.quantizer import ranked_codes  # noqa: E402
from rqvae.resolve import spread_last_level  # noqa: E402

SPREAD = 16
COLUMNS = ("collision_free_pct", "distinct_pct", "util_l1", "ppl_l1", "util_l2", "ppl_l2", "recon_cos",
           "p1_nn", "p1_random", "p2_nn", "nmi1", "nmi2", "fit_s")


def assign(x: torch.Tensor, books: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy residual codes (N, L) of x (N, D) against per-level centroids, and the last level's input."""
    residual, codes = x, []
    for book in books:
        last_input = residual
        idx = nearest(residual, book)[0]
        codes.append(idx)
        residual = residual - book[idx]
    return torch.stack(codes, dim=1), last_input


def fit_levels(x: torch.Tensor, sizes: tuple[int, ...], seed: int) -> list[torch.Tensor]:
    """Residual k-means with ``sizes[l]`` centroids at level l."""
    books, residual = [], x
    for level, k in enumerate(sizes):
        book = kmeans(residual, k, seed=seed + level)
        books.append(book)
        residual = residual - book[nearest(residual, book)[0]]
    return books


def refine(x: torch.Tensor, books: list[torch.Tensor]) -> list[torch.Tensor]:
    """One round: re-assign every item, then re-fit each level's centroids (in turn) to the mean of what
    the other levels leave for its items; a centroid nobody uses stays where it is."""
    codes, _ = assign(x, books)
    residual = x - sum(book[codes[:, lv]] for lv, book in enumerate(books))
    out = []
    for lv, book in enumerate(books):
        target = residual + book[codes[:, lv]]
        sums = torch.zeros_like(book).index_add_(0, codes[:, lv], target)
        counts = torch.bincount(codes[:, lv], minlength=len(book)).to(x.dtype).unsqueeze(1)
        new = torch.where(counts > 0, sums / counts.clamp_min(1.0), book)
        residual = target - new[codes[:, lv]]
        out.append(new)
    return out


def spread_codes(x: torch.Tensor, books: list[torch.Tensor]) -> np.ndarray:
    """The codes the job would issue: greedy levels, colliding items moved to a free last-level code among
    their SPREAD nearest (rqvae.resolve.spread_last_level)."""
    codes, last_input = assign(x, books)
    ranked, errors = ranked_codes(last_input, books[-1], SPREAD)
    codes[:, -1] = ranked[:, 0]
    return spread_last_level(codes.numpy(), errors[:, 0].numpy(), ranked.numpy(), errors.numpy()).codes


def row(x: torch.Tensor, books: list[torch.Tensor], fit_s: float, k: int, lex: np.ndarray, deep: np.ndarray,
        seed: int) -> dict[str, float]:
    codes = spread_codes(x, books)
    recon = sum(book[torch.as_tensor(codes[:, lv])] for lv, book in enumerate(books)).numpy()
    out = score(x.numpy(), codes, recon, k, lex, deep, seed=seed)
    out["fit_s"] = fit_s
    return {c: out[c] for c in COLUMNS}


SEED_COLUMNS = ("inertia", "p1_nn", "nmi1", "ppl_l1", "fit_s")


def level_one(x: torch.Tensor, who: str, seed: int, lex: np.ndarray, query_seed: int, k: int = 256
              ) -> dict[str, float]:
    """Level 1 alone fitted by ``who`` with ``seed``: its columns. ``who`` is "ours" (our k-means with ``k``
    centroids), "sklearn" (scikit-learn's KMeans, one start, ``k`` centroids) or "rvq" (bench/peers.py's
    ResidualVQ at 3 x 256, its level-1 codes; ``k`` must be 256). Inertia is the mean squared distance
    to the nearest level-1 centroid (for "rvq", to the codeword its level 1 picked)."""
    start = time.perf_counter()
    if who == "rvq":
        if k != 256:
            raise ValueError("the ResidualVQ peer fits 256 level-1 codes; k must be 256")
        fitted_rvq = peers.fit_vqtorch_residual_vq(x.numpy(), seed=seed)
        fit_s = fitted_rvq.fit_seconds
        level1 = fitted_rvq.codes[:, 0]
        inertia = float("nan")  # its level-1 codewords are not returned by the peer
    else:
        if who == "ours":
            centers = kmeans(x, k, iters=100, seed=seed, tol=1e-3)
        elif who == "sklearn":
            from sklearn.cluster import KMeans

            fitted = KMeans(k, n_init=1, max_iter=100, tol=1e-4, random_state=seed).fit(x.numpy())
            centers = torch.from_numpy(fitted.cluster_centers_.astype(np.float32))
        else:
            raise ValueError(f"unknown level-1 fitter {who!r}; use ours, sklearn or rvq")
        fit_s = time.perf_counter() - start
        codes, dist = nearest(x, centers)
        level1, inertia = codes.numpy(), float(dist.mean())
    queries, nn5, _ = neighbours(x.numpy(), DEFAULT_QUERIES, query_seed)
    return {"inertia": inertia, "p1_nn": float((level1[queries] == level1[nn5[:, 0]]).mean()),
            "nmi1": _cluster_class_agreement(1, level1, lex).nmi,
            "ppl_l1": level_usage(level1[:, None], 256)[0].perplexity, "fit_s": fit_s}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--catalog", default=str(DEFAULT_CATALOG), help="catalog parquet (bench/real_catalog.py)")
    p.add_argument("--items", type=int, default=None, help="subsample this many items (default: all)")
    p.add_argument("--grid", default="256x256,192x256,128x256,96x256,64x256,256x64,256x16",
                   help="comma-separated K1xK2 level sizes for the coherence curve ('' skips it)")
    p.add_argument("--refine-rounds", type=int, default=3, help="rounds for the reconstruction curve (0 skips it)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seeds", type=int, default=0,
                   help="fit level 1 alone with this many seeds, ours and scikit-learn's (0 skips it; needs the "
                        "bench requirements)")
    p.add_argument("--seed-k1", default="",
                   help="with --seeds: also our k-means with these comma-separated level-1 sizes (e.g. 96,128)")
    p.add_argument("--seed-peers", default="", help="with --seeds: also these peers' level 1 ('rvq': ResidualVQ)")
    p.add_argument("--json", help="write the rows to this file")
    a = p.parse_args(argv)
    torch.manual_seed(a.seed)
    x_np, lex, deep, _ = load_catalog(Path(a.catalog), a.items, a.seed)
    x = F.normalize(torch.from_numpy(x_np), dim=-1)
    print(f"# {len(x)} items x {x.shape[1]}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{platform.processor() or platform.machine()}", flush=True)
    rows: dict[str, dict[str, dict[str, float]]] = {"coherence": {}, "refinement": {}, "level-1 seeds": {}}
    for spec in filter(None, a.grid.split(",")):
        k1, k2 = (int(v) for v in spec.split("x"))
        start = time.perf_counter()
        books = fit_levels(x, (k1, k2, 256), a.seed)
        rows["coherence"][f"K1={k1} K2={k2}"] = row(x, books, time.perf_counter() - start, 256, lex, deep, a.seed)
        print(f"{spec}: {rows['coherence'][f'K1={k1} K2={k2}']}", file=sys.stderr, flush=True)
    if a.refine_rounds > 0:
        start = time.perf_counter()
        books = fit_levels(x, (256, 256, 256), a.seed)
        fit_s = time.perf_counter() - start  # scoring is not fit time
        rows["refinement"]["0 rounds"] = row(x, books, fit_s, 256, lex, deep, a.seed)
        for r in range(1, a.refine_rounds + 1):
            start = time.perf_counter()
            books = refine(x, books)
            fit_s += time.perf_counter() - start
            rows["refinement"][f"{r} rounds"] = row(x, books, fit_s, 256, lex, deep, a.seed)
            print(f"refine {r}: {rows['refinement'][f'{r} rounds']}", file=sys.stderr, flush=True)
    fitters = [("ours", 256, "ours"), ("sklearn", 256, "sklearn")]
    fitters += [("ours", int(k), f"ours K1={int(k)}") for k in filter(None, a.seed_k1.split(","))]
    for peer_name in filter(None, a.seed_peers.split(",")):
        if peer_name != "rvq":
            p.error(f"--seed-peers: unknown peer {peer_name!r}; the one available is rvq")
        fitters.append(("rvq", 256, "ResidualVQ"))
    for seed in range(a.seeds):
        for who, k, label in fitters:
            name = f"{label} seed {seed}"
            rows["level-1 seeds"][name] = level_one(x, who, seed, lex, a.seed, k)
            print(f"{name}: {rows['level-1 seeds'][name]}", file=sys.stderr, flush=True)
    if a.seeds > 1:
        for _, _, label in fitters:
            per_seed = [rows["level-1 seeds"][f"{label} seed {seed}"] for seed in range(a.seeds)]
            rows["level-1 seeds"][f"{label} mean"] = {c: float(np.mean([r[c] for r in per_seed])) for c in SEED_COLUMNS}
            rows["level-1 seeds"][f"{label} sd"] = {c: float(np.std([r[c] for r in per_seed], ddof=1))
                                                    for c in SEED_COLUMNS}
    for name, part in rows.items():
        if part:
            print(f"\n{name}\n\n{table(part, SEED_COLUMNS if name == 'level-1 seeds' else COLUMNS)}")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
