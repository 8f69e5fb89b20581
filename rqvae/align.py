"""Align a retrained model's codes to an earlier model's: one-to-one relabelling of each level's codes.

Two RQ-VAEs trained on the same catalog can split it alike and still name the parts differently:
code 17 of one is code 203 of the other. Permuting a level's codebook rows renames its codes without
changing which items share a code (the residuals, hence every later level, stay the same), so the
permutation that best matches the earlier codes is found by a maximum-weight matching (Hungarian
method) on the co-assignment counts of items coded by both models, and applied to the codebooks
(and to the input-space anchor, which names level 1). A shared codebook gets one permutation for
all levels.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from rqvae.model import RQVAE


def linear_assignment(cost: np.ndarray) -> np.ndarray:
    """Minimum-cost perfect matching of a square cost matrix (n, n): ``cols`` (n,) int64 with row i
    matched to column ``cols[i]``.

    The shortest augmenting path form of the Hungarian method (Kuhn 1955; Jonker & Volgenant 1987)
    with dual potentials, O(n^3): one row at a time joins the matching along the cheapest path in
    reduced costs; the inner scan over columns is vectorised (n = 256 runs in well under a second).
    """
    cost = np.asarray(cost, dtype=np.float64)
    n = cost.shape[0]
    if cost.ndim != 2 or cost.shape[1] != n:
        raise ValueError(f"cost must be a square matrix, got shape {cost.shape}")
    u, v = np.zeros(n + 1), np.zeros(n + 1)  # dual potentials of rows / columns (1-based; 0 is a sentinel)
    match = np.zeros(n + 1, dtype=np.int64)  # match[j]: the row (1-based) holding column j, 0 = free
    for row in range(1, n + 1):
        match[0], col = row, 0
        min_reduced = np.full(n + 1, np.inf)
        came_from = np.zeros(n + 1, dtype=np.int64)
        used = np.zeros(n + 1, dtype=bool)
        while match[col] != 0:
            used[col] = True
            r = match[col]
            reduced = cost[r - 1] - u[r] - v[1:]  # (n,) reduced cost of row r to every column
            better = ~used[1:] & (reduced < min_reduced[1:])
            min_reduced[1:][better] = reduced[better]
            came_from[1:][better] = col
            candidates = np.where(used[1:], np.inf, min_reduced[1:])
            nxt = int(np.argmin(candidates)) + 1
            delta = candidates[nxt - 1]
            u[match[used]] += delta
            v[used] -= delta
            min_reduced[1:][~used[1:]] -= delta
            col = nxt
        while col:  # flip the augmenting path back to its start
            prev = came_from[col]
            match[col] = match[prev]
            col = prev
    cols = np.empty(n, dtype=np.int64)
    cols[match[1:] - 1] = np.arange(n)
    return cols


def co_assignment(new: np.ndarray, old: np.ndarray, k: int) -> np.ndarray:
    """(k, k) int64 counts: entry [a, b] = items with code a under the new model and b under the old."""
    counts = np.zeros((k, k), dtype=np.int64)
    np.add.at(counts, (np.asarray(new, dtype=np.int64), np.asarray(old, dtype=np.int64)), 1)
    return counts


def code_permutations(new_codes: np.ndarray, old_codes: np.ndarray, codebook_size: int,
                      shared: bool = False) -> list[np.ndarray]:
    """Per codebook, ``perm`` (K,) int64 such that ``perm[c]`` is the old name of new code c.

    Args:
        new_codes, old_codes: (N, L) codes of the same N items under the new and the old model.
        codebook_size: K.
        shared: one codebook for all levels: one permutation from the counts of every level.

    Returns:
        One permutation per level, or one in all for a shared codebook. Codes no item holds are
        matched too (they carry no weight, so the matching keeps them as one-to-one as the rest).
    """
    new_codes, old_codes = np.asarray(new_codes), np.asarray(old_codes)
    if new_codes.shape != old_codes.shape or new_codes.ndim != 2:
        raise ValueError(f"new and old codes must both be (N, L); got {new_codes.shape} and {old_codes.shape}")
    per_level = [co_assignment(new_codes[:, lv], old_codes[:, lv], codebook_size)
                 for lv in range(new_codes.shape[1])]
    counts = [np.sum(per_level, axis=0)] if shared else per_level
    return [linear_assignment(-c) for c in counts]


@torch.no_grad()
def relabel_codes(model: RQVAE, perms: list[np.ndarray]) -> None:
    """Rename the model's codes in place: afterwards it gives ``perms[l][c]`` where it gave code c at level l.

    ``perms`` has one permutation per codebook (:func:`code_permutations`). The anchor, which picks
    the first levels, follows those levels' codebooks' permutations (level 1's reconstruction codewords
    with its centroids).
    """
    quantizer = model.quantizer
    if len(perms) != quantizer.codebooks.shape[0]:
        raise ValueError(f"need {quantizer.codebooks.shape[0]} permutations (one per codebook), got {len(perms)}")
    for book, perm in enumerate(perms):
        index = _inverse(perm, quantizer.codebook_size, quantizer.codebooks.device)
        quantizer.codebooks.data[book] = quantizer.codebooks.data[book][index]
        quantizer.steps_unused[book] = quantizer.steps_unused[book][index]
    rows = [_inverse(perms[min(level, len(perms) - 1)], model.codebook_size, quantizer.codebooks.device)
            for level in range(model.config.anchored)]
    for level, index in enumerate(rows):
        centroids = model.anchor_book(level)
        centroids.copy_(centroids[index.to(centroids.device)])
    if model.refines_first_level:  # level 1's reconstruction codewords follow its centroids
        model.anchor_recon.copy_(model.anchor_recon[rows[0].to(model.anchor_recon.device)])
    if model.balances_prefixes:  # offsets[level-1 code, level-2 code] follow both renamings
        offsets = model.anchor_offsets
        offsets.copy_(offsets[rows[0].to(offsets.device)][:, rows[1].to(offsets.device)])


def _inverse(perm: np.ndarray, k: int, device: torch.device) -> torch.Tensor:
    """Row order that moves row c to position perm[c]: new_rows[perm[c]] = rows[c]."""
    perm = np.asarray(perm, dtype=np.int64)
    if sorted(perm.tolist()) != list(range(k)):
        raise ValueError(f"not a permutation of 0..{k - 1}")
    inverse = np.empty(k, dtype=np.int64)
    inverse[perm] = np.arange(k)
    return torch.from_numpy(inverse).to(device)


class Agreement(NamedTuple):
    """Share of items whose level-1 code, 2-prefix, ... full tuple is the same under two models."""

    prefix: tuple[float, ...]

    @classmethod
    def of(cls, a: np.ndarray, b: np.ndarray) -> Agreement:
        same = np.cumprod(np.asarray(a) == np.asarray(b), axis=1)  # (N, L): prefix up to l equal
        return cls(tuple(float(x) for x in same.mean(axis=0))) if len(same) else cls(())


def align_to(model: RQVAE, x: np.ndarray, old_codes: np.ndarray) -> tuple[Agreement, Agreement]:
    """Relabel ``model``'s codes to match ``old_codes`` (N, L) of the items x (N, D) under an earlier
    model; returns the prefix agreement before and after."""
    from rqvae.encode import encode_array

    new_codes = encode_array(model, x).codes
    before = Agreement.of(new_codes, old_codes)
    perms = code_permutations(new_codes, old_codes, model.codebook_size, shared=model.config.shared_codebook)
    relabel_codes(model, perms)
    after = Agreement.of(encode_array(model, x).codes, old_codes)
    return before, after
