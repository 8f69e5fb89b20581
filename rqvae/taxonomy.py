"""Category paths -> the hierarchical integer ids the regularizer and the taxonomy metrics use, and the
taxonomy-guided input-space anchor (the regularizer's part that shapes the coarse levels)."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from rqvae.kmeans import kmeans, nearest, squared_distances


def category_ids_from_paths(paths: Sequence[Sequence[str] | None], depth: int | None = None) -> np.ndarray:
    """int64 (N, T) ids: column t identifies the path prefix of depth t+1; -1 where unknown.

    Two items get the same id in column t exactly when their paths agree on the first t+1 names.
    ``depth`` defaults to the longest path.
    """
    depth = depth if depth is not None else max((len(p) for p in paths if p), default=0)
    out = np.full((len(paths), depth), -1, dtype=np.int64)
    ids: list[dict[tuple[str, ...], int]] = [{} for _ in range(depth)]
    for row, path in enumerate(paths):
        for t in range(min(depth, len(path or ()))):
            key = tuple(path[: t + 1])  # type: ignore[index]
            out[row, t] = ids[t].setdefault(key, len(ids[t]))
    return out


# Softmax temperature of the nearest-centroid classifier that fits the guided anchor's centroids; the
# inputs are unit vectors (squared distances in [0, 4]), so 0.02 makes the assignment nearly hard.
GUIDED_ANCHOR_TEMPERATURE = 0.02


def guiding_depth(category_ids: np.ndarray, k: int) -> int:
    """Column of ``category_ids`` (N, T) that guides a K-code level: the shallowest depth with at least
    ``k`` known categories (a level of K codes can name that many), else the one with the most."""
    counts = [len(np.unique(col[col >= 0])) for col in np.asarray(category_ids).T]
    if not counts:
        raise ValueError("category_ids has no columns")
    return next((t for t, c in enumerate(counts) if c >= k), int(np.argmax(counts)))


def category_means(rows: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """(N, D): each row's category mean over ``rows`` (ids (N,) int64, -1 = unknown: the row itself)."""
    known = ids >= 0
    out = rows.clone()
    if known.any():
        labels, inverse = torch.unique(ids[known], return_inverse=True)
        sums = torch.zeros(len(labels), rows.shape[1], dtype=rows.dtype, device=rows.device)
        sums.index_add_(0, inverse, rows[known])
        counts = torch.bincount(inverse, minlength=len(labels)).to(rows.dtype).unsqueeze(1)
        out[known] = (sums / counts)[inverse]
    return out


def guided_centers(rows: torch.Tensor, ids: torch.Tensor, k: int, *, scale: float, epochs: int, iters: int,
                   seed: int, init: torch.Tensor | None = None, tol: float = 0.0) -> torch.Tensor:
    """(K, D) input-space centroids whose nearest-centroid cells follow the taxonomy.

    Items are clustered on ``[x, scale * category mean]`` (so an item is pulled towards its category's
    other items), and the centroids are then fitted as a nearest-centroid classifier of x that
    predicts those clusters (``epochs`` of Adam on the cross-entropy of ``-|x - c|^2 / T``). Encoding
    still needs x only: categories guide the cells but are never needed to assign an item.

    Args:
        rows: (N, D) model-space inputs; ids: (N,) category id per row at the guiding depth, -1 unknown.
        init: (K, D) centroids of a previous model (a warm start): the clusters grow from them, so
            code j keeps its meaning.
        iters, tol: the k-means' Lloyd iterations at most, and its early stop (``rqvae.kmeans.kmeans``).
    """
    feature = scale * category_means(rows, ids)
    augmented = torch.cat([rows, feature], dim=1)
    start = None
    if init is not None:
        owner = nearest(rows, init)[0]
        sums = torch.zeros_like(init).index_add_(0, owner, feature)
        counts = torch.bincount(owner, minlength=k).to(rows.dtype).clamp_min(1.0).unsqueeze(1)
        start = torch.cat([init, sums / counts], dim=1)
    target = nearest(augmented, kmeans(augmented, k, iters=iters, seed=seed, init=start, tol=tol))[0]
    counts = torch.bincount(target, minlength=k).to(rows.dtype)
    centers = torch.zeros(k, rows.shape[1], dtype=rows.dtype, device=rows.device).index_add_(0, target, rows)
    centers = centers / counts.clamp_min(1.0).unsqueeze(1)
    if init is not None:
        centers[counts == 0] = init[counts == 0]
    if epochs <= 0:
        return centers
    generator = torch.Generator().manual_seed(seed)
    with torch.enable_grad():
        c = centers.clone().requires_grad_(True)
        optimizer = torch.optim.Adam([c], lr=1e-3)
        for _ in range(epochs):
            for idx in torch.randperm(len(rows), generator=generator).split(4096):
                idx = idx.to(rows.device)
                logits = -squared_distances(rows[idx], c) / GUIDED_ANCHOR_TEMPERATURE
                loss = torch.nn.functional.cross_entropy(logits, target[idx])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
    return c.detach()
