"""Semantic-ID quality on a real catalog, our tokenizer and its peers side by side, one metric code for all.

    HF_HUB_OFFLINE=1 python bench/real_catalog.py                 # once: WordNet nouns x MiniLM (cached)
    python bench/quality_real.py                                  # every method at 3 x 256, ~82k items
    HF_HUB_OFFLINE=1 python bench/debian_catalog.py               # a second catalog: Debian's ~64k packages
    python bench/quality_real.py --catalog bench/.cache/debian_packages.parquet --nmi2-depth 2
    python bench/quality_real.py --items 20000 --methods ours,faiss_kmeans_residual --json out.json

Needs bench/requirements-bench.txt for the peers (a missing package only drops its rows). Prints a
Markdown table for bench/RESULTS.md. Columns (all computed here, from codes and reconstructions):

* collision-free %: items whose full code tuple no other item has; distinct %: distinct tuples / items;
  largest: the largest group of items sharing a tuple.
* util l1/l2/l3 and ppl l1/l2/l3: share of the K codes used, and perplexity, per level.
* recon cos: mean cosine of x and the reconstruction (our decoder's output; the sum of centroids for
  k-means peers).
* P1 nn / P1 rand: share of items whose exact nearest neighbour (cosine) has the same level-1 code, and
  the same for a random other item; P2 nn: the same for the 2-prefix. NN-code@5: mean share of an item's
  5 nearest neighbours that share its 2-prefix. Every item is a query (``--queries`` to sample); the
  neighbour search runs once per run for all methods.
* NMI1 / pur1: level-1 codes against WordNet's lexicographer file (26 noun files); NMI2 / pur2:
  2-prefixes against the hypernym path cut at depth 5 (entity > ... 4 levels below). On the Debian
  catalog: the section (58), and [section, source package] (``--nmi2-depth 2``).
* fit s and encode items/s on this machine.

A "<peer>_spread16" row is that peer with the job's collision-aware last level added (its items' 16
nearest last-level codewords as alternatives, ``spread_additive``; without the job's second chance over
every code): what being collision-free costs it.

The header line and the JSON name the embeddings scored (the first 16 hex digits of their SHA-256): the
sentence encoder's last bits differ between CPUs, and the columns by about 0.001 with them, so compare
tables across machines only where the digests are equal.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import peers  # noqa: E402  (bench/peers.py)

from jobs.tokenize_catalog import (  # noqa: E402
    DEFAULT_ANCHOR_LEVELS,
    DEFAULT_ANCHOR_RECONSTRUCTION,
    DEFAULT_ANCHOR_REFINE_PASSES,
    DEFAULT_COLLISION_ALTERNATIVES,
    DEFAULT_PREFIX_FILL,
    anchored_levels,
)
from rqvae import ModelConfig, RQKMeans, RQKMeansConfig, TrainConfig, fit, issue_codes  # noqa: E402
from rqvae.metrics import (  # noqa: E402
    _cluster_class_agreement,
    _prefix_ids,
    _sample_queries,
    _shared_prefix_rates,
    level_usage,
    nearest_neighbours,
)
from rqvae.quantizer import ranked_codes  # noqa: E402
from rqvae.resolve import spread_last_level  # noqa: E402
from rqvae.taxonomy import category_ids_from_paths  # noqa: E402

DEFAULT_CATALOG = Path(__file__).resolve().parent / ".cache" / "wordnet_nouns.parquet"
NMI2_DEPTH = 5


def load_catalog(path: Path, items: int | None, seed: int, nmi2_depth: int = NMI2_DEPTH
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """x (N, D) float32, lexname ids (N,), category-path-prefix ids at ``nmi2_depth`` (N,) (-1: shallower),
    and the (N, T) category-path-prefix ids of every depth (rqvae.taxonomy), the regularizer's input."""
    import pyarrow.parquet as pq

    if not path.is_file():
        sys.exit(f"{path} is missing: build it with HF_HUB_OFFLINE=1 python bench/real_catalog.py")
    table = pq.read_table(path, columns=["embedding", "lexname", "category"])
    if items and items < table.num_rows:
        pick = np.sort(np.random.default_rng(seed).choice(table.num_rows, items, replace=False))
        table = table.take(pick)
    x = np.stack(table["embedding"].to_numpy(zero_copy_only=False)).astype(np.float32)
    lex = np.unique(np.asarray(table["lexname"].to_pylist()), return_inverse=True)[1]
    paths = ["/".join(p[:nmi2_depth]) if len(p) >= nmi2_depth else "" for p in table["category"].to_pylist()]
    ids = np.unique(np.asarray(paths), return_inverse=True)[1].astype(np.int64)
    ids[np.asarray(paths) == ""] = -1
    return x, lex.astype(np.int64), ids, category_ids_from_paths(table["category"].to_pylist())


def embeddings_digest(x: np.ndarray) -> str:
    """The first 16 hex digits of the SHA-256 of ``x``'s float32 bytes (row-major): which build of the catalog's
    embeddings a run scored. The sentence encoder's output differs in its last bits between CPUs, and so, by
    about 0.001, do the table's columns; equal digests mean bit-identical inputs."""
    return hashlib.sha256(np.ascontiguousarray(x, dtype=np.float32).tobytes()).hexdigest()[:16]


# Query rows of the neighbour columns: all items by default (P1 nn's standard error on WordNet's 82k items
# is then about 0.002; with the 4,000 queries of earlier runs it was 0.008, as large as the gaps it judged).
DEFAULT_QUERIES = 0
_NEIGHBOURS: dict[tuple[Any, ...], tuple[np.ndarray, np.ndarray, np.ndarray]] = {}


def neighbours(x: np.ndarray, n_queries: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Query rows (Q,), their 5 nearest other rows by cosine (Q, 5) and a random other row each (Q,):
    computed once per catalog and shared by every method of a run (the exact search is the costly part
    of scoring). ``n_queries`` 0: every row is a query."""
    key = (id(x), x.shape, n_queries, seed)
    if key not in _NEIGHBOURS:
        n = len(x)
        rng = np.random.default_rng(seed)
        queries = _sample_queries(n, n_queries if n_queries > 0 else n, rng)  # as prefix_coincidence draws them
        partner = rng.integers(0, n - 1, size=queries.size)
        partner += partner >= queries  # uniform over the other N - 1 rows
        _NEIGHBOURS[key] = queries, nearest_neighbours(x, queries, 5), partner
    return _NEIGHBOURS[key]


def score(x: np.ndarray, codes: np.ndarray, recon: np.ndarray | None, k: int, lex: np.ndarray,
          deep: np.ndarray, seed: int = 0, hidden: np.ndarray | None = None,
          n_queries: int = DEFAULT_QUERIES) -> dict[str, float]:
    """Every column of the table for one method's codes (N, L) and reconstruction (N, D) or None."""
    n, levels = codes.shape
    full = _prefix_ids(codes)[-1]
    counts = np.bincount(full)
    out: dict[str, float] = {
        "collision_free_pct": 100.0 * float((counts[full] == 1).mean()),
        "distinct_pct": 100.0 * len(np.unique(full)) / n,
        "largest": float(counts.max()),
    }
    for lv, usage in enumerate(level_usage(codes, k), start=1):
        out[f"util_l{lv}"], out[f"ppl_l{lv}"] = usage.utilization, usage.perplexity
    if recon is not None:
        a = x / np.linalg.norm(x, axis=1, keepdims=True)
        b = recon / np.maximum(np.linalg.norm(recon, axis=1, keepdims=True), 1e-12)
        out["recon_cos"] = float((a * b).sum(axis=1).mean())
    queries, nn5, partner = neighbours(x, n_queries, seed)
    nn_rates = _shared_prefix_rates(codes, queries, nn5[:, 0])  # as rqvae.metrics.prefix_coincidence
    out["p1_nn"], out["p1_random"], out["p2_nn"] = nn_rates[0], _shared_prefix_rates(codes, queries, partner)[0], \
        nn_rates[1]
    prefix2 = _prefix_ids(codes)[1]
    out["nn_code_at_5"] = float((prefix2[nn5] == prefix2[queries][:, None]).mean())
    level1 = _prefix_ids(codes)[0]
    one = _cluster_class_agreement(1, level1, lex)
    known = deep >= 0
    two = _cluster_class_agreement(2, prefix2[known], deep[known])
    out["nmi1"], out["pur1"], out["nmi2"], out["pur2"] = one.nmi, one.purity, two.nmi, two.purity
    if hidden is not None:  # the items whose categories no method saw
        out["nmi1_hidden"] = _cluster_class_agreement(1, level1[hidden], lex[hidden]).nmi
        seen = hidden & known
        out["nmi2_hidden"] = _cluster_class_agreement(2, prefix2[seen], deep[seen]).nmi
    return out


# (x, levels, K, seed, category ids (N, T) with the hidden half at -1) -> codes, recon, fit s, encode items/s
Method = Callable[[np.ndarray, int, int, int, np.ndarray], tuple[np.ndarray, np.ndarray | None, float, float]]


def encode_spread(model: Any, x: np.ndarray, spread: int, second_chance: bool = True) -> np.ndarray:
    """Codes (N, L); with ``spread`` > 0, colliding items moved to free last-level codes among their
    ``spread`` nearest, ties by row number, and with ``second_chance`` the items still sharing a tuple ranked
    over every last-level code and spread again: the job's issue path (:func:`rqvae.issue_codes`)."""
    return issue_codes(model, x, spread, second_chance=second_chance).codes


def ours(**changes: object) -> Method:
    """The job's tokenizer with its defaults (jobs/tokenize_catalog.py), plus ``changes`` to its configs
    (``collision_alternatives=0`` turns the collision-aware last level off). The categories reach the fit
    only when ``taxonomy_weight`` > 0 (the regularizer)."""
    second_chance = bool(changes.pop("second_chance", True))  # the job's step, not a model config key

    def run(x: np.ndarray, levels: int, k: int, seed: int, cats: np.ndarray
            ) -> tuple[np.ndarray, np.ndarray | None, float, float]:
        model_keys = set(ModelConfig.__dataclass_fields__)
        model_args: dict[str, Any] = {"input_dim": x.shape[1], "hidden_dims": (512, 256, 128), "latent_dim": 32,
                                      "num_levels": levels, "codebook_size": k,
                                      "anchor_levels": anchored_levels(DEFAULT_ANCHOR_LEVELS, levels),
                                      "anchor_reconstruction": DEFAULT_ANCHOR_RECONSTRUCTION,
                                      "collision_alternatives": DEFAULT_COLLISION_ALTERNATIVES}
        train_args: dict[str, Any] = {"epochs": 30, "batch_size": 1024, "lr": 1e-3, "seed": seed,
                                      "prefix_fill": DEFAULT_PREFIX_FILL,
                                      "anchor_refine_passes": DEFAULT_ANCHOR_REFINE_PASSES}
        for key, value in changes.items():
            (model_args if key in model_keys else train_args)[key] = value
        mcfg, tcfg = ModelConfig(**model_args), TrainConfig(**train_args)
        start = time.perf_counter()
        model = fit(x, mcfg, tcfg, category_ids=cats if tcfg.taxonomy_weight > 0 else None).model.eval()
        fit_s = time.perf_counter() - start
        start = time.perf_counter()
        codes = encode_spread(model, x, mcfg.collision_alternatives, second_chance)
        enc = len(x) / (time.perf_counter() - start)
        with torch.no_grad():
            recon = np.concatenate([model.decode_codes(torch.as_tensor(codes[i:i + 8192], dtype=torch.long)).numpy()
                                    for i in range(0, len(codes), 8192)])
        return codes, recon, fit_s, enc
    return run


def our_rqkmeans(spread: int = 0) -> Method:
    def run(x: np.ndarray, levels: int, k: int, seed: int, cats: np.ndarray
            ) -> tuple[np.ndarray, np.ndarray | None, float, float]:
        start = time.perf_counter()
        model = RQKMeans.fit(x, RQKMeansConfig(input_dim=x.shape[1], num_levels=levels, codebook_size=k), seed=seed)
        fit_s = time.perf_counter() - start
        start = time.perf_counter()
        codes = encode_spread(model, x, spread)
        enc = len(x) / (time.perf_counter() - start)
        with torch.no_grad():
            recon = model.decode_codes(torch.as_tensor(codes, dtype=torch.long)).numpy()
        return codes, recon, fit_s, enc
    return run


def spread_additive(x: np.ndarray, codes: np.ndarray, recon: np.ndarray, last_level: np.ndarray, spread: int
                    ) -> tuple[np.ndarray, np.ndarray]:
    """A peer's codes (N, L) and reconstruction (N, D) after the job's collision-aware last level
    (rqvae.resolve, as :func:`encode_spread` does for ours): each item's alternatives are the ``spread``
    codewords of ``last_level`` (K, D) nearest to what its prefix leaves, x - recon + its own codeword
    (the reconstruction is a sum of one codeword per level), its own code first."""
    own = codes[:, -1]
    residual = torch.from_numpy(x - recon + last_level[own])
    ranked_t, errors_t = ranked_codes(residual, torch.from_numpy(last_level), spread)
    ranked, errors = ranked_t.numpy(), errors_t.numpy()
    mine = ranked == own[:, None]
    for i in np.flatnonzero(~mine[:, 0]):  # own code not ranked first (a tie, or a beam search's choice)
        others = ranked[i][~mine[i]]
        ranked[i] = np.concatenate([[own[i]], others])[:spread]
        errors[i] = np.linalg.norm(residual[i].numpy()[None] - last_level[ranked[i]], axis=1)
    errors[:, 0] = np.linalg.norm(x - recon, axis=1)
    moved = spread_last_level(codes, errors[:, 0], ranked, errors)
    out = moved.codes.astype(np.int64)
    return out, recon - last_level[own] + last_level[out[:, -1]]


_PEER_RUNS: dict[tuple[Any, ...], peers.PeerResult] = {}


def peer(fn: Callable[..., peers.PeerResult], spread: int = 0) -> Method:
    """A peer's row; with ``spread`` > 0 its codes after the job's collision-aware last level (what it
    would take that peer to be collision-free). A peer is fitted once per run for both rows."""
    def run(x: np.ndarray, levels: int, k: int, seed: int, cats: np.ndarray
            ) -> tuple[np.ndarray, np.ndarray | None, float, float]:
        key = (fn, id(x), x.shape, levels, k, seed)
        if key not in _PEER_RUNS:
            _PEER_RUNS[key] = fn(x, levels=levels, codebook_size=k, seed=seed)
        r = _PEER_RUNS[key]
        if spread <= 0 or r.last_level is None or r.reconstruction is None:
            return r.codes, r.reconstruction, r.fit_seconds, r.encode_items_per_s
        start = time.perf_counter()
        codes, recon = spread_additive(x, r.codes, r.reconstruction, r.last_level, spread)
        encode_s = len(x) / r.encode_items_per_s + time.perf_counter() - start  # as ours: with the spreading
        return codes, recon, r.fit_seconds, len(x) / encode_s
    return run


# The job's defaults before issue 12's changes: level 1 anchored, decoder-only reconstruction, no spreading.
BEFORE = {"anchor_levels": 1, "anchor_reconstruction": False, "collision_alternatives": 0, "prefix_fill": 0.0}

METHODS: dict[str, Method] = {
    "ours": ours(),
    "ours_plain_rqvae": ours(**{**BEFORE, "anchor_first_level": False}),
    # variants tried (issue 12's "table of everything tried"; bench/RESULTS.md)
    "ours_before": ours(**BEFORE),
    # the defaults of the job before every level was anchored: two anchored levels, the RQ-VAE learns level 3
    "ours_rqvae_anchor2": ours(anchor_levels=2, prefix_fill=0.0),
    # 2-prefix fill cap (TrainConfig.prefix_fill): 0 is the default before it existed
    "ours_fill0": ours(prefix_fill=0.0),
    "ours_fill0.1": ours(prefix_fill=0.1),
    "ours_fill0.15": ours(prefix_fill=0.15),
    "ours_fill0.2": ours(prefix_fill=0.2),
    "ours_fill0.25": ours(prefix_fill=0.25),
    "ours_fill1": ours(prefix_fill=1.0),
    "ours_before_spread16": ours(**{**BEFORE, "collision_alternatives": 16}),
    "ours_anchor2_spread16": ours(**{**BEFORE, "anchor_levels": 2, "collision_alternatives": 16}),
    "ours_anchor1_recon_spread16": ours(**{**BEFORE, "anchor_reconstruction": True, "collision_alternatives": 16}),
    "ours_no_spread": ours(collision_alternatives=0),
    # without the job's second chance for the items still sharing a tuple after the spreading
    "ours_no_second_chance": ours(second_chance=False),
    # the k-means of every level run a fixed 25 Lloyd iterations (the default until TrainConfig.kmeans_tol)
    "ours_kmeans25": ours(kmeans_iters=25, kmeans_tol=0.0),
    "ours_kmeans300": ours(kmeans_iters=300, kmeans_tol=1e-4),
    # joint codeword refinement (TrainConfig.anchor_refine_passes): 0 is the default before it existed
    "ours_refine0": ours(anchor_refine_passes=0),
    "ours_refine1": ours(anchor_refine_passes=1),
    "ours_refine10": ours(anchor_refine_passes=10),
    "ours_spread4": ours(collision_alternatives=4),
    "ours_latent64": ours(anchor_levels=2, latent_dim=64, prefix_fill=0.0),
    "ours_epochs60": ours(anchor_levels=2, epochs=60, prefix_fill=0.0),
    "ours_rotation": ours(anchor_levels=2, estimator="rotation", prefix_fill=0.0),
    # the taxonomy regularizer (issue 12 point 4): lambda x hierarchical batches on/off; lambda > 0 also
    # guides the level-1 anchor (rqvae.taxonomy.guided_centers)
    "ours_tax0.01": ours(taxonomy_weight=0.01),
    "ours_tax0.1": ours(taxonomy_weight=0.1),
    "ours_tax0.01_flat": ours(taxonomy_weight=0.01, hierarchical_fraction=0.0),
    "ours_tax0.1_flat": ours(taxonomy_weight=0.1, hierarchical_fraction=0.0),
    "ours_tax0.01_unguided": ours(taxonomy_weight=0.01, taxonomy_anchor_scale=0.0),
    "ours_tax0.01_guide10": ours(taxonomy_weight=0.01, taxonomy_anchor_epochs=10),
    "ours_tax0.01_spread32": ours(taxonomy_weight=0.01, collision_alternatives=32),
    "ours_tax0.01_scale1": ours(taxonomy_weight=0.01, taxonomy_anchor_scale=1.0),
    "ours_rqkmeans": our_rqkmeans(),
    "ours_rqkmeans_spread16": our_rqkmeans(spread=16),
    "semantic_id_rqkmeans": peer(peers.fit_semantic_id_rqkmeans),
    "vqtorch_residual_vq": peer(peers.fit_vqtorch_residual_vq),
    "faiss_residual_quantizer": peer(peers.fit_faiss_residual_quantizer),
    "faiss_kmeans_residual": peer(peers.fit_faiss_kmeans_residual),
    # the peers with the job's collision-aware last level added (16 alternatives): the reconstruction
    # each pays to be collision-free, the trade-off of the collision-free and recon cos columns
    "semantic_id_rqkmeans_spread16": peer(peers.fit_semantic_id_rqkmeans, spread=16),
    "vqtorch_residual_vq_spread16": peer(peers.fit_vqtorch_residual_vq, spread=16),
    "faiss_residual_quantizer_spread16": peer(peers.fit_faiss_residual_quantizer, spread=16),
    "faiss_kmeans_residual_spread16": peer(peers.fit_faiss_kmeans_residual, spread=16),
}
COLUMNS = ["collision_free_pct", "distinct_pct", "largest", "util_l1", "util_l2", "util_l3", "ppl_l1", "ppl_l2",
           "ppl_l3", "recon_cos", "p1_nn", "p1_random", "p2_nn", "nn_code_at_5", "nmi1", "pur1", "nmi2", "pur2",
           "nmi1_hidden", "nmi2_hidden", "fit_s", "encode_items_per_s"]


def table(rows: dict[str, dict[str, float]], columns: tuple[str, ...] | list[str] | None = None) -> str:
    columns = columns or COLUMNS
    head = "| method | " + " | ".join(columns) + " |"
    lines = [head, "|" + "---|" * (len(columns) + 1)]
    for name, r in rows.items():
        cells = []
        for c in columns:
            v = r.get(c)
            cells.append("" if v is None else f"{v:.0f}" if c in ("largest", "encode_items_per_s") else
                         f"{v:.1f}" if c in ("collision_free_pct", "distinct_pct", "fit_s") or c.startswith("ppl")
                         else f"{v:.3f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--catalog", type=Path, default=DEFAULT_CATALOG, help="bench/real_catalog.py's Parquet file")
    p.add_argument("--items", type=int, help="a random subset of this many items (default: all)")
    p.add_argument("--nmi2-depth", type=int, default=NMI2_DEPTH,
                   help="NMI2 / pur2 group the items by their category path cut at this depth (WordNet: 5; "
                        "bench/debian_catalog.py's [section, source package]: 2)")
    p.add_argument("--levels", type=int, default=3)
    p.add_argument("--codebook-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--queries", type=int, default=DEFAULT_QUERIES,
                   help="query rows of the neighbour columns (P1, P2, NN-code@5); 0: every item")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--json", type=Path, help="also write the rows as JSON here")
    p.add_argument("--hidden-categories", type=float, default=0.5,
                   help="share of items whose categories the regularized methods never see (NMI *_hidden)")
    a = p.parse_args(argv)
    torch.manual_seed(a.seed)
    x, lex, deep, cats = load_catalog(a.catalog, a.items, a.seed, a.nmi2_depth)
    # Half the items' categories are hidden from every method: NMI on them shows what the regularizer
    # learnt for items it never saw a category of (all items are scored on every other column).
    hidden = np.random.default_rng([a.seed, 1]).random(len(x)) < a.hidden_categories
    cats = np.where(hidden[:, None], -1, cats)
    digest = embeddings_digest(x)
    print(f"{len(x)} items x {x.shape[1]} (embeddings sha256 {digest}), {a.levels} x {a.codebook_size}; torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}",
          flush=True)
    rows: dict[str, dict[str, float]] = {}
    for name in a.methods.split(","):
        try:
            codes, recon, fit_s, enc = METHODS[name](x, a.levels, a.codebook_size, a.seed, cats)
        except ImportError as e:
            print(f"{name}: skipped ({e})", flush=True)
            continue
        rows[name] = {**score(x, np.asarray(codes, dtype=np.int64), recon, a.codebook_size, lex, deep, a.seed,
                              hidden, a.queries),
                      "fit_s": fit_s, "encode_items_per_s": enc}
        print(f"{name}: fit {fit_s:.1f}s, " + ", ".join(f"{c} {rows[name][c]:.3f}" for c in COLUMNS[:3] + ["recon_cos",
              "p2_nn", "nmi1", "nmi1_hidden"] if c in rows[name]), flush=True)
    print()
    print(table(rows))
    if a.json:
        a.json.write_text(json.dumps({"items": len(x), "embeddings_sha256": digest, "versions": peers.peer_versions(),
                                      "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
