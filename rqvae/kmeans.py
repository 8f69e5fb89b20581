"""k-means in torch (k-means++ seeding + Lloyd), used to initialise codebooks and by RQ-KMeans, and the
per-cell offsets that keep one code from crowding a cell."""
from __future__ import annotations

import torch


def squared_distances(x: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances. x: (N, d), centers: (K, d) -> (N, K)."""
    # (x @ c.T) * 2 has the same bits as (2 * x) @ c.T (doubling a normal float is exact; products
    # in the subnormal range, ~1e-38, would differ) and doubles N*K values instead of N*d: fewer for
    # the input-space anchor (K = 256, d = 768), a few more for small latents, negligible there.
    d = x.pow(2).sum(1, keepdim=True) - (x @ centers.T).mul_(2.0) + centers.pow(2).sum(1)
    return d.clamp_min_(0.0)


def nearest(x: torch.Tensor, centers: torch.Tensor, chunk: int = 65536) -> tuple[torch.Tensor, torch.Tensor]:
    """Index (N,) int64 and squared distance (N,) of each row's nearest center, in chunks."""
    idx, dist = [], []
    for part in x.split(chunk):
        d = squared_distances(part, centers)
        best, arg = d.min(dim=1)
        idx.append(arg)
        dist.append(best)
    return torch.cat(idx), torch.cat(dist)


def kmeans_plus_plus(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii 2007). x: (N, d) -> centers (k, d)."""
    n = x.shape[0]
    norms = x.pow(2).sum(1)  # once: each draw then costs one matrix-vector product (5x faster at 78k x 384)

    def to_center(j: int) -> torch.Tensor:
        return (norms - (x @ x[j]).mul_(2.0) + norms[j]).clamp_min_(0.0)

    first = int(torch.randint(n, (1,), generator=generator, device="cpu"))
    centers = [x[first]]
    closest = to_center(first)
    for _ in range(1, k):
        total = closest.sum()
        if total <= 0:  # fewer distinct points than k: pick uniformly among the rest
            j = int(torch.randint(n, (1,), generator=generator, device="cpu"))
        else:
            probs = (closest / total).double().cpu()
            j = int(torch.multinomial(probs, 1, generator=generator))
        centers.append(x[j])
        closest = torch.minimum(closest, to_center(j))
    return torch.stack(centers)


# k-means++ draws its k seeds from at most this many rows per center. Measured on 78k x 384 unit vectors
# (WordNet nouns x MiniLM, K = 256, 25 Lloyd iterations): seeding 13.9 s -> 1.1 s, and the final mean
# squared distance 0.6817 (all rows) vs 0.6807 (subset); bench/RESULTS.md.
SEEDING_ROWS_PER_CENTER = 64


def kmeans(x: torch.Tensor, k: int, *, iters: int = 25, seed: int = 0,
           init: torch.Tensor | None = None) -> torch.Tensor:
    """Lloyd's k-means with k-means++ seeding; empty clusters are re-seeded from the worst-fit points.

    Args:
        x: (N, d) float tensor, N >= 1.
        k: number of centers.
        iters: Lloyd iterations.
        seed: seeds the k-means++ draws (from a random subset of ``k * SEEDING_ROWS_PER_CENTER`` rows
            when x has more).
        init: (k, d) starting centers instead of k-means++ (a warm start: center j stays the cluster
            that grew from ``init[j]``, so its label keeps its meaning).

    Returns:
        (k, d) centers on x's device and dtype.
    """
    generator = torch.Generator().manual_seed(seed)
    x = x.detach()
    if init is not None and tuple(init.shape) != (k, x.shape[1]):
        raise ValueError(f"init must have shape ({k}, {x.shape[1]}), got {tuple(init.shape)}")
    if init is not None:
        centers = init.detach().to(x.device, x.dtype).clone()
    elif len(x) > k * SEEDING_ROWS_PER_CENTER:  # seed on a random subset: the Lloyd iterations use every row
        pick = torch.randperm(len(x), generator=generator)[: k * SEEDING_ROWS_PER_CENTER].to(x.device)
        centers = kmeans_plus_plus(x[pick], k, generator)
    else:
        centers = kmeans_plus_plus(x, k, generator)
    for _ in range(iters):
        assign, dist = nearest(x, centers)
        sums = torch.zeros_like(centers).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k).to(x.dtype)
        empty = counts == 0
        centers = sums / counts.clamp_min(1.0).unsqueeze(1)
        if empty.any():  # move empty centers onto the points that are worst served now
            n_move = min(int(empty.sum()), len(x))  # fewer points than centers: move what we can
            worst = dist.topk(n_move).indices
            centers[empty.nonzero().squeeze(1)[:n_move]] = x[worst]
    return centers


def nearest_offset(x: torch.Tensor, centers: torch.Tensor, offsets: torch.Tensor, cells: torch.Tensor,
                   chunk: int = 65536) -> torch.Tensor:
    """Index (N,) int64 of the center that minimises ``|x - c_j|^2 + offsets[cell, j]`` per row, where
    ``cells`` (N,) int64 picks each row's row of ``offsets`` (C, K); in chunks."""
    return torch.cat([(squared_distances(part, centers) + offsets[cell]).argmin(dim=1)
                      for part, cell in zip(x.split(chunk), cells.split(chunk))])


def balance_offsets(d: torch.Tensor, cells: torch.Tensor, *, cap: int, iters: int = 200,
                    init: torch.Tensor | None = None) -> torch.Tensor:
    """Per-(cell, code) offsets (C, K) that keep any one code from crowding one cell.

    Rows are assigned ``argmin_j d[i, j] + offsets[cells[i], j]``. A (cell, code) pair may hold at
    most ``cap`` rows, and never less than 1.25 times the even share of its own cell (so a cell too
    large for ``K * cap`` still fits, evenly). Each round raises the offset of every pair over its cap
    just past the gap of its first row beyond the cap, rows ordered by how much more they prefer the
    pair to their next-best code: the cap's worth most attached stay, the rest move to their next-best
    code (an auction step). Moved rows may fill another pair, which a later round handles. Each raise
    adds 1% of the first round's mean gap, which makes the rounds end quickly instead of trading rows
    back and forth by tiny amounts. Offsets only grow, so a warm start from ``init`` keeps the moves
    it made. Deterministic.

    Args:
        d: (N, K) float squared distances of the rows to the K centers.
        cells: (N,) int64 cell of each row (e.g. its level-1 code), in [0, C).
        cap: most rows per pair, >= 1.
        iters: most rounds (each a top-2 and two stable sorts of N rows); a pair may be left over its
            cap when they run out.
        init: (C, K) offsets to start from; default zeros with C = K.

    Returns:
        (C, K) offsets on d's device and dtype; pairs never over their cap keep their start value.
    """
    if cap < 1:
        raise ValueError(f"cap must be at least 1, got {cap}")
    n, k = d.shape
    offsets = torch.zeros(k, k, dtype=d.dtype, device=d.device) if init is None else init.to(d).clone()
    c = offsets.shape[0]
    if n == 0 or k < 2:
        return offsets
    per_cell = torch.bincount(cells, minlength=c)
    caps = torch.clamp(torch.ceil(1.25 * per_cell / k), min=cap).long().repeat_interleave(k)  # (C * K,)
    flat = offsets.view(-1)
    step = None
    for _ in range(iters):
        two = (d + offsets[cells]).topk(2, dim=1, largest=False)
        pair = cells * k + two.indices[:, 0]
        gap = two.values[:, 0] - two.values[:, 1]  # <= 0: how much more the row prefers its code
        if step is None:
            step = 0.01 * float(gap.abs().mean())
        counts = torch.bincount(pair, minlength=c * k)
        over = counts > caps
        if not over.any():
            break
        by_gap = gap.argsort(stable=True)
        order = by_gap[pair[by_gap].argsort(stable=True)]  # by pair, then most attached first
        sorted_pair = pair[order]
        rank = torch.arange(n, device=d.device) - (torch.cumsum(counts, 0) - counts)[sorted_pair]
        first_out = (rank == caps[sorted_pair]) & over[sorted_pair]
        flat[sorted_pair[first_out]] += step - gap[order][first_out]
    return offsets
