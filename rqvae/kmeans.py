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
           init: torch.Tensor | None = None, tol: float = 0.0) -> torch.Tensor:
    """Lloyd's k-means with k-means++ seeding; empty clusters are re-seeded from the worst-fit points.

    Args:
        x: (N, d) float tensor, N >= 1.
        k: number of centers.
        iters: Lloyd iterations, at most.
        seed: seeds the k-means++ draws (from a random subset of ``k * SEEDING_ROWS_PER_CENTER`` rows
            when x has more).
        init: (k, d) starting centers instead of k-means++ (a warm start: center j stays the cluster
            that grew from ``init[j]``, so its label keeps its meaning).
        tol: stop early once an assignment differs from the one before it in at most this share of
            the rows (0: run every iteration); the centers are then the means of the one before.

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
    previous: torch.Tensor | None = None  # the assignment whose means ``centers`` are (None: not means)
    for _ in range(iters):
        assign, dist = nearest(x, centers)
        if previous is not None and tol > 0 and int((assign != previous).sum()) <= tol * len(x):
            break
        previous = assign
        sums = torch.zeros_like(centers).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k).to(x.dtype)
        empty = counts == 0
        centers = sums / counts.clamp_min(1.0).unsqueeze(1)
        if empty.any():  # move empty centers onto the points that are worst served now
            n_move = min(int(empty.sum()), len(x))  # fewer points than centers: move what we can
            worst = dist.topk(n_move).indices
            centers[empty.nonzero().squeeze(1)[:n_move]] = x[worst]
            previous = None  # a re-seeded center is no cluster's mean: never stop on it
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
    large for ``0.8 * K * cap`` rows is split about evenly instead). Each round raises the offset of
    every pair over its cap just past the gap of its first row beyond the cap, rows ordered by how
    much more they prefer the pair to their next-best code: the cap's worth most attached stay, the
    rest move to their next-best code (an auction step). Moved rows may fill another pair, which a
    later round handles. Each raise adds 1% of the first round's mean gap (of the mean spread of a
    row's distances when every row ties), which makes the rounds end quickly instead of trading rows
    back and forth by tiny amounts.

    Identical rows (same cell and distances: duplicate embeddings) can only move together, so they
    bid as one row of their weight; a block larger than its pair's cap fits nowhere and takes no part
    (moving it from code to code would push unrelated rows out of every pair it lands in, on every
    warm start again). Offsets only grow, so a warm start from ``init`` keeps the moves it made.
    Deterministic.

    Args:
        d: (N, K) float squared distances of the rows to the K centers.
        cells: (N,) int64 cell of each row (e.g. its level-1 code), in [0, C).
        cap: most rows per pair, >= 1.
        iters: most rounds (each an argmin, a min and two stable sorts of the distinct rows); a pair
            may be left over its cap when they run out.
        init: (C, K) offsets to start from; default zeros with C = K.

    Returns:
        (C, K) offsets on d's device and dtype; pairs never raised keep their start value.
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
    keys, weight = torch.unique(torch.cat([cells[:, None].to(d.dtype), d], dim=1), dim=0, return_counts=True)
    cells, d = keys[:, 0].long(), keys[:, 1:]
    bids = weight <= caps[cells * k]  # a block over even its cell's floor fits in no pair
    cells, d, weight = cells[bids], d[bids], weight[bids]
    if not len(d):
        return offsets
    rows = torch.arange(len(d), device=d.device)
    flat = offsets.view(-1)
    step = None
    for _ in range(iters):
        cost = d + offsets[cells]
        code = cost.argmin(dim=1)  # the rule encoding applies (first index among equal costs)
        gap = cost[rows, code] - cost.scatter(1, code[:, None], float("inf")).min(dim=1).values  # <= 0
        if step is None:
            # 1% of the mean gap; when every row ties (mean gap 0), 1% of the mean spread of its costs
            step = 0.01 * (float(gap.abs().mean()) or float((cost.mean(dim=1) - cost[rows, code]).mean()) or 1.0)
        pair = cells * k + code
        counts = torch.bincount(pair, weights=weight.to(d.dtype), minlength=c * k).long()
        over = counts > caps
        if not over.any():
            break
        by_gap = gap.argsort(stable=True)
        order = by_gap[pair[by_gap].argsort(stable=True)]  # by pair, then most attached first
        sorted_pair, w = pair[order], weight[order]
        upto = torch.cumsum(w, 0) - (torch.cumsum(counts, 0) - counts)[sorted_pair]  # rows up to this one
        first_out = (upto > caps[sorted_pair]) & (upto - w <= caps[sorted_pair]) & over[sorted_pair]
        flat[sorted_pair[first_out]] += step - gap[order][first_out]
    return offsets
