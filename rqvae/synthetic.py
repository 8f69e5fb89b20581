"""Deterministic synthetic catalog: a category tree with clustered, unit-norm item embeddings (NumPy only).

Generative model (D = ``dim``, branching (B_1, ..., B_T), default (16, 8, 4) -> 512 leaves):

* Every node at depth t (1-based) draws an offset ~ N(0, s_t^2 / D * I_D), s_t = ``level_scales[t-1]``,
  so its norm is about s_t. A leaf's centre is the sum of the offsets on its root-to-leaf path.
* Leaf weights w_j = exp(sigma * clip(z_j, -2, 2)), z_j ~ N(0, 1), sigma = ``leaf_size_skew``; each item
  picks leaf j with probability w_j / sum(w). The clip bounds any leaf's expected size to at most
  e^{4 sigma} times any other's; at sigma = 0.4 the largest expected leaf is about 2x the mean.
* item = leaf centre + noise, then scaled to unit L2 norm (float32). The noise is N(0, ``item_noise``^2 / r)
  in each of r = min(``noise_rank``, D) orthonormal directions shared by all items (a random subspace drawn
  with the tree), so its norm is about ``item_noise`` and, the intrinsic dimension being fixed, the
  neighbour structure barely changes with D. Isotropic noise in all D dimensions would concentrate
  distances as D grows (with the same noise norm: 77% leaf sharing at D=128, 98% at D=384).

Defaults were tuned so that the nearest neighbour (cosine) of an item shares its leaf for about 70-85%
of items and its top category for all of them (measured over all items, seed 0: n=20,000, D=128: 71.8%
leaf, 98.0% parent, 100% top; n=50,000, D=384: 83.1% leaf, 99.9% parent, 100% top). Mean cosine of two
items in the same leaf is about 0.52, same parent 0.45, same top 0.34, otherwise 0.

Randomness: the tree (offsets and leaf weights) comes from ``np.random.default_rng([seed, 0])``; items are
drawn in fixed blocks of 65,536 (block b from ``np.random.default_rng([seed, b + 1])``), so any chunking
of the stream (`iter_catalog_chunks`) concatenates to exactly `make_catalog`, and a 10M x 256 catalog
can be streamed in bounded memory.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

_BLOCK_ITEMS = 65536


@dataclass(frozen=True)
class CatalogSpec:
    """Settings of a synthetic catalog.

    Attributes:
        n_items: N, number of items (>= 0).
        dim: D, embedding width (>= 1).
        seed: non-negative seed; the same spec always gives the same catalog.
        branching: children per node at each depth: (top categories, children per top, leaves per child).
        level_scales: norm of the node offsets at each depth (same length as branching); decreasing, so
            siblings are closer to each other than to nodes under another parent.
        item_noise: norm of the per-item noise added to its leaf centre. The default 1.6 puts an item's
            nearest neighbour in its own leaf for about 82% of items at D = 384 (20k items).
        noise_rank: the noise lives in one random subspace of dimension r = min(noise_rank, dim);
            ``None`` (default) spreads it over all D dimensions, as item-specific variation is in real
            embedding models. A small rank (e.g. 64) makes the neighbour structure nearly independent
            of D, but concentrates the noise in a few strong directions that a narrow latent keeps
            instead of the taxonomy (see docs/design.md and bench/RESULTS.md).
        leaf_size_skew: sigma of the clipped log-normal leaf weights (0 = equal expected sizes).
    """

    n_items: int
    dim: int
    seed: int = 0
    branching: tuple[int, ...] = (16, 8, 4)
    level_scales: tuple[float, ...] = (1.0, 0.6, 0.4)
    item_noise: float = 1.6
    noise_rank: int | None = None
    leaf_size_skew: float = 0.4

    def __post_init__(self) -> None:
        if self.n_items < 0 or self.dim < 1 or self.seed < 0:
            raise ValueError(f"need n_items >= 0, dim >= 1, seed >= 0; got {self.n_items}, {self.dim}, "
                             f"{self.seed}")
        if not self.branching or min(self.branching) < 1:
            raise ValueError(f"branching must be non-empty with entries >= 1, got {self.branching}")
        if len(self.level_scales) != len(self.branching):
            raise ValueError(f"level_scales {self.level_scales} must have one entry per depth of "
                             f"branching {self.branching}")
        if self.item_noise < 0 or self.leaf_size_skew < 0 or min(self.level_scales) < 0:
            raise ValueError("level_scales, item_noise and leaf_size_skew must be non-negative")
        if self.noise_rank is not None and self.noise_rank < 1:
            raise ValueError(f"noise_rank must be >= 1, got {self.noise_rank}")

    @property
    def n_leaves(self) -> int:
        """Number of leaf categories, prod(branching)."""
        return math.prod(self.branching)


@functools.lru_cache(maxsize=8)
def _node_names(branching: tuple[int, ...]) -> tuple[tuple[str, ...], ...]:
    """Names of all nodes, per depth, indexed by global node id: "c07", "c07.3", "c07.3.1", ..."""
    width = max(2, len(str(branching[0] - 1)))
    names: list[tuple[str, ...]] = [tuple(f"c{i:0{width}d}" for i in range(branching[0]))]
    for b in branching[1:]:
        names.append(tuple(f"{names[-1][g // b]}.{g % b}" for g in range(len(names[-1]) * b)))
    return tuple(names)


@dataclass(frozen=True, eq=False)
class SyntheticCatalog:
    """A synthetic catalog (or a chunk of one).

    Attributes:
        item_ids: int64 ``[N]``, global positions in the catalog (0..n_items-1 for a whole catalog).
        embeddings: float32 ``[N, D]``, unit L2-norm rows.
        category_ids: int32 ``[N, depth]``; column t is the global id of the item's category path prefix
            of depth t + 1 (node ids numbered breadth-first, id_t = id_{t-1} * branching[t] + local index),
            so equal ids at column t imply equal ids at every column before t.
        branching: the tree's branching factors, needed to name the categories.
    """

    item_ids: np.ndarray
    embeddings: np.ndarray
    category_ids: np.ndarray
    branching: tuple[int, ...]

    def __len__(self) -> int:
        return int(self.item_ids.shape[0])

    def category_paths(self, rows: np.ndarray | None = None) -> list[list[str]]:
        """Root-to-leaf category names, e.g. ``["c07", "c07.3", "c07.3.1"]`` (local indices 0-based).

        Args:
            rows: optional int ``[M]`` row positions (not item ids) in this catalog; all rows when None.

        Returns:
            One path of ``depth`` names per selected row.
        """
        ids = self.category_ids if rows is None else self.category_ids[np.asarray(rows)]
        names = _node_names(self.branching)
        return [[names[t][node] for t, node in enumerate(row)] for row in ids.tolist()]


class _Tree(NamedTuple):
    """The drawn tree: leaf centres, leaf probabilities and the noise subspace.

    Attributes:
        leaf_centres: float32 ``[n_leaves, D]``.
        leaf_probs: float64 ``[n_leaves]``, summing to 1.
        noise_basis: float32 ``[r, D]`` with orthonormal rows.
    """

    leaf_centres: np.ndarray
    leaf_probs: np.ndarray
    noise_basis: np.ndarray


def _make_tree(spec: CatalogSpec) -> _Tree:
    """Draws the category tree of ``spec`` from ``default_rng([seed, 0])``."""
    rng = np.random.default_rng([spec.seed, 0])
    centres = np.zeros((1, spec.dim))
    for b, scale in zip(spec.branching, spec.level_scales):
        offsets = rng.standard_normal((centres.shape[0] * b, spec.dim)) * (scale / math.sqrt(spec.dim))
        centres = np.repeat(centres, b, axis=0) + offsets  # child g*b + j of node g, breadth-first
    weights = np.exp(spec.leaf_size_skew * np.clip(rng.standard_normal(centres.shape[0]), -2.0, 2.0))
    rank = spec.dim if spec.noise_rank is None else min(spec.noise_rank, spec.dim)
    basis = np.linalg.qr(rng.standard_normal((spec.dim, rank)))[0].T  # orthonormal rows [r, D]
    return _Tree(leaf_centres=centres.astype(np.float32), leaf_probs=weights / weights.sum(),
                 noise_basis=basis.astype(np.float32))


def _leaf_to_category_ids(leaves: np.ndarray, branching: tuple[int, ...]) -> np.ndarray:
    """int32 ``[N, depth]`` path-prefix ids of leaf ids ``[N]``: column t = leaf // prod(branching[t+1:])."""
    divisors = [math.prod(branching[t + 1:]) for t in range(len(branching))]
    return np.stack([leaves // d for d in divisors], axis=1).astype(np.int32)


def _draw_block(spec: CatalogSpec, tree: _Tree, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Leaf ids int64 ``[M]`` and unit embeddings float32 ``[M, D]`` of the items in one fixed block."""
    m = min(_BLOCK_ITEMS, spec.n_items - block * _BLOCK_ITEMS)
    rng = np.random.default_rng([spec.seed, block + 1])
    leaves = rng.choice(tree.leaf_probs.size, size=m, p=tree.leaf_probs).astype(np.int64)
    rank = tree.noise_basis.shape[0]
    noise = rng.standard_normal((m, rank), dtype=np.float32) * np.float32(spec.item_noise / math.sqrt(rank))
    emb = noise @ tree.noise_basis  # [M, D]
    emb += tree.leaf_centres[leaves]
    emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), np.float32(1e-12))
    return leaves, emb


def _iter_blocks(spec: CatalogSpec) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yields (leaf ids, embeddings) of every fixed block in order."""
    tree = _make_tree(spec)
    for block in range(-(-spec.n_items // _BLOCK_ITEMS)):
        yield _draw_block(spec, tree, block)


def _to_catalog(spec: CatalogSpec, start: int, leaves: np.ndarray, emb: np.ndarray) -> SyntheticCatalog:
    """Wraps rows ``start .. start + len(leaves)`` of the catalog."""
    return SyntheticCatalog(
        item_ids=np.arange(start, start + leaves.size, dtype=np.int64),
        embeddings=emb,
        category_ids=_leaf_to_category_ids(leaves, spec.branching),
        branching=spec.branching,
    )


def make_catalog(spec: CatalogSpec) -> SyntheticCatalog:
    """The whole synthetic catalog of ``spec`` in memory (N * D * 4 bytes of embeddings)."""
    leaves = np.empty(spec.n_items, dtype=np.int64)
    emb = np.empty((spec.n_items, spec.dim), dtype=np.float32)
    for block, (block_leaves, block_emb) in enumerate(_iter_blocks(spec)):
        start = block * _BLOCK_ITEMS
        leaves[start:start + block_leaves.size] = block_leaves
        emb[start:start + block_leaves.size] = block_emb
    return _to_catalog(spec, 0, leaves, emb)


def iter_catalog_chunks(spec: CatalogSpec, chunk_items: int = 262144) -> Iterator[SyntheticCatalog]:
    """Streams the catalog of ``spec`` in chunks of ``chunk_items`` rows (the last one may be shorter).

    The chunks concatenate exactly to `make_catalog(spec)` for any chunk size. Peak memory is about
    2 * (chunk_items + 65,536) * D * 4 bytes (one block plus one chunk, while they are concatenated).

    Args:
        spec: the catalog.
        chunk_items: rows per chunk, >= 1.

    Yields:
        SyntheticCatalog chunks with global item_ids.
    """
    if chunk_items < 1:
        raise ValueError(f"chunk_items must be >= 1, got {chunk_items}")
    parts: list[tuple[np.ndarray, np.ndarray]] = []
    n_pending, start = 0, 0
    for block in _iter_blocks(spec):
        parts.append(block)
        n_pending += block[0].size
        if n_pending < chunk_items:
            continue
        leaves = np.concatenate([p[0] for p in parts])
        emb = np.concatenate([p[1] for p in parts])
        n_full = n_pending - n_pending % chunk_items
        for offset in range(0, n_full, chunk_items):
            rows = slice(offset, offset + chunk_items)
            yield _to_catalog(spec, start + offset, leaves[rows], emb[rows])
        parts, n_pending, start = [(leaves[n_full:], emb[n_full:])], n_pending - n_full, start + n_full
    if n_pending:
        yield _to_catalog(spec, start, np.concatenate([p[0] for p in parts]),
                          np.concatenate([p[1] for p in parts]))
