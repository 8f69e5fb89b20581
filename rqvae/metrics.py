"""Quality metrics of Semantic ID codes and reconstructions (NumPy only, no torch).

Every metric has exactly one definition, stated in its docstring; DESIGN.md "Metrics" lists them.
Shapes: N items, L code levels, K codes per level, D embedding width, Q queries, T taxonomy depths.
Codes are integer arrays ``[N, L]``; embeddings are float arrays ``[N, D]`` (any float dtype).

All functions are vectorised (sorts, ``np.unique``, ``np.bincount``, blocked matrix products); none
loops over items in Python, so they run on millions of rows.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# A similarity block holds at most this many float32 entries (128 MiB), whatever `chunk` says.
_MAX_BLOCK_ELEMENTS = 1 << 25


@dataclass(frozen=True)
class TupleStats:
    """Collision statistics of full code tuples (see `tuple_stats`)."""

    n_items: int
    distinct_tuples: int
    unique_rate: float
    collision_rate: float
    items_in_collisions: float
    max_group_size: int


@dataclass(frozen=True)
class CodeUsage:
    """Usage statistics of the K codes of one level (see `code_usage_from_counts`)."""

    codebook_size: int
    used_codes: int
    utilization: float
    dead_codes: int
    entropy: float
    perplexity: float
    gini: float


@dataclass(frozen=True)
class CosineStats:
    """Summary of row-wise cosine similarities (see `reconstruction_cosine`)."""

    mean: float
    p10: float
    p50: float


@dataclass(frozen=True)
class PrefixCoincidence:
    """Per-level prefix sharing rates; element ``l - 1`` is level l (see `prefix_coincidence`)."""

    nn: list[float]
    random: list[float]


@dataclass(frozen=True)
class TaxonomyAgreement:
    """Agreement of level-l code prefixes with taxonomy depth l (see `taxonomy_agreement`)."""

    level: int
    purity: float
    nmi: float
    n_items: int


def _check_codes(codes: np.ndarray) -> np.ndarray:
    """Returns ``codes`` as an array after checking it is integer ``[N, L]`` with N, L >= 1."""
    arr = np.asarray(codes)
    if arr.ndim != 2:
        raise ValueError(f"codes must be a 2-D integer array [N, L], got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"codes must have an integer dtype, got {arr.dtype}")
    if arr.shape[0] == 0:
        raise ValueError("codes has no rows (N=0): code metrics are undefined for an empty catalog")
    if arr.shape[1] == 0:
        raise ValueError("codes has no levels (L=0)")
    return arr


def _check_embeddings(x: np.ndarray, n_rows: int | None = None, name: str = "x") -> np.ndarray:
    """Returns ``x`` as an array after checking it is ``[N, D]`` (and N == n_rows when given)."""
    arr = np.asarray(x)
    if arr.ndim != 2 or arr.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty 2-D array [N, D], got shape {arr.shape}")
    if n_rows is not None and arr.shape[0] != n_rows:
        raise ValueError(f"{name} has {arr.shape[0]} rows but {n_rows} were expected")
    return arr


def _dense_ids(keys: np.ndarray) -> tuple[np.ndarray, int]:
    """Maps int64 keys ``[N]`` to dense ids 0..n_distinct-1 (ordered like the keys); returns both."""
    uniq, inverse = np.unique(keys, return_inverse=True)
    return inverse.reshape(-1).astype(np.int64, copy=False), int(uniq.size)


def _prefix_ids(codes: np.ndarray) -> list[np.ndarray]:
    """Dense ids of every code prefix.

    Args:
        codes: int ``[N, L]``.

    Returns:
        L arrays of int64 ``[N]``; in element ``l - 1`` two rows have equal ids iff their level-l
        prefixes ``codes[:, :l]`` are equal. Built by packing (previous id, next code) into one int64.
    """
    ids = np.zeros(codes.shape[0], dtype=np.int64)
    n_ids = 1
    out = []
    for column in codes.T:
        shifted = column.astype(np.int64) - int(column.min())
        base = int(shifted.max()) + 1
        if n_ids * base >= 2**63:
            raise ValueError(f"code values span {base}, too wide to pack with {n_ids} prefixes in int64")
        ids, n_ids = _dense_ids(ids * base + shifted)
        out.append(ids)
    return out


def tuple_stats(codes: np.ndarray) -> TupleStats:
    """Collision statistics of the full code tuples.

    Definitions (N items, a "group" = the items sharing one full tuple ``codes[i, :]``):
    ``distinct_tuples`` = number of groups; ``unique_rate`` = distinct_tuples / N;
    ``collision_rate`` = 1 - unique_rate; ``items_in_collisions`` = (items in groups of size >= 2) / N;
    ``max_group_size`` = size of the largest group (1 when every tuple is unique).

    Args:
        codes: int ``[N, L]``, N >= 1.

    Returns:
        TupleStats. O(N log N) time (one sort per level).

    Raises:
        ValueError: if N = 0 or codes is not 2-D.
    """
    codes = _check_codes(codes)
    n = codes.shape[0]
    group_sizes = np.bincount(_prefix_ids(codes)[-1])
    unique_rate = group_sizes.size / n
    return TupleStats(
        n_items=n,
        distinct_tuples=int(group_sizes.size),
        unique_rate=unique_rate,
        collision_rate=1.0 - unique_rate,
        items_in_collisions=float(group_sizes[group_sizes > 1].sum()) / n,
        max_group_size=int(group_sizes.max()),
    )


def _entropy(counts: np.ndarray) -> float:
    """Natural-log entropy of the distribution ``counts / counts.sum()`` (zero counts contribute 0)."""
    nonzero = counts[counts > 0].astype(np.float64)
    p = nonzero / nonzero.sum()
    return float(-(p * np.log(p)).sum())


def code_usage_from_counts(counts: np.ndarray) -> CodeUsage:
    """Usage statistics of one level's codebook from per-code item counts.

    Definitions (K codes, x_j = count of code j, S = sum_j x_j, p_j = x_j / S):
    ``used_codes`` = #{j : x_j > 0}; ``utilization`` = used_codes / K; ``dead_codes`` = K - used_codes;
    ``entropy`` H = -sum_{j: p_j > 0} p_j ln p_j (nats); ``perplexity`` = exp(H), between 1 and K;
    ``gini`` = sum_{i=1..K} (2i - K - 1) x_(i) / (K S) with x_(1) <= ... <= x_(K) the sorted counts over
    all K codes, dead ones included: 0 for perfectly even usage, (K - 1) / K when one code takes all.

    Args:
        counts: int ``[K]`` non-negative usage counts (any numeric dtype holding whole numbers).

    Returns:
        CodeUsage.

    Raises:
        ValueError: if counts is not 1-D and non-empty, has negative entries or sums to 0.
    """
    x = np.asarray(counts)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"counts must be a non-empty 1-D array [K], got shape {x.shape}")
    if (x < 0).any():
        raise ValueError("counts must be non-negative")
    total = float(x.sum())
    if total <= 0:
        raise ValueError("counts sum to 0: usage statistics are undefined without items")
    k = int(x.size)
    used = int(np.count_nonzero(x))
    entropy = _entropy(x)
    rank = np.arange(1, k + 1, dtype=np.float64)
    gini = float(((2.0 * rank - k - 1.0) * np.sort(x.astype(np.float64))).sum() / (k * total))
    return CodeUsage(
        codebook_size=k,
        used_codes=used,
        utilization=used / k,
        dead_codes=k - used,
        entropy=entropy,
        perplexity=math.exp(entropy),
        gini=gini,
    )


def level_usage(codes: np.ndarray, codebook_size: int) -> list[CodeUsage]:
    """Per-level codebook usage: ``code_usage_from_counts(np.bincount(codes[:, l], minlength=K))``.

    Args:
        codes: int ``[N, L]`` with values in ``[0, codebook_size)``.
        codebook_size: K, the number of codes of every level.

    Returns:
        L CodeUsage objects, element ``l - 1`` for level l.
    """
    codes = _check_codes(codes)
    if codes.min() < 0 or codes.max() >= codebook_size:
        raise ValueError(f"codes must lie in [0, {codebook_size}), got [{codes.min()}, {codes.max()}]")
    return [code_usage_from_counts(np.bincount(col, minlength=codebook_size)) for col in codes.T]


def _row_norms(x: np.ndarray) -> np.ndarray:
    """L2 norms of the rows of ``x`` ``[N, D]`` as float64 ``[N]``."""
    return np.sqrt(np.einsum("ij,ij->i", x, x, dtype=np.float64))


def reconstruction_cosine(x: np.ndarray, x_hat: np.ndarray) -> CosineStats:
    """Row-wise cosine similarity between inputs and reconstructions.

    Definition: c_i = <x_i, x_hat_i> / (|x_i| |x_hat_i|), and c_i = 0 when either norm is 0.
    ``mean`` = mean_i c_i; ``p10`` / ``p50`` = 10th / 50th percentile of c (``np.percentile``, linear).

    Args:
        x: float ``[N, D]`` inputs.
        x_hat: float ``[N, D]`` reconstructions.

    Returns:
        CosineStats (computed in float64).
    """
    x = _check_embeddings(x)
    x_hat = _check_embeddings(x_hat, x.shape[0], "x_hat")
    if x.shape != x_hat.shape:
        raise ValueError(f"x {x.shape} and x_hat {x_hat.shape} must have the same shape")
    dots = np.einsum("ij,ij->i", x, x_hat, dtype=np.float64)
    norms = _row_norms(x) * _row_norms(x_hat)
    cos = np.divide(dots, norms, out=np.zeros_like(dots), where=norms > 0)
    p10, p50 = np.percentile(cos, [10.0, 50.0])
    return CosineStats(mean=float(cos.mean()), p10=float(p10), p50=float(p50))


def _unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows of ``x`` scaled to unit L2 norm as float32 ``[N, D]``; zero rows stay zero."""
    norms = _row_norms(x)
    scale = np.divide(1.0, norms, out=np.zeros_like(norms), where=norms > 0)
    return (x * scale[:, None]).astype(np.float32, copy=False)


def _top_k(sims: np.ndarray, k: int) -> np.ndarray:
    """Column indices of the k largest entries of each row, sorted by (value desc, index asc).

    Args:
        sims: float ``[B, N]`` with N > k.
        k: number of columns to keep.

    Returns:
        int64 ``[B, k]``. Ties are broken by the lower column index, also at the k-th place.
    """
    if k == 1:  # argmax returns the first (lowest-index) maximum: the same tie rule, much cheaper
        return sims.argmax(axis=1).astype(np.int64)[:, None]
    n = sims.shape[1]
    top = np.argpartition(sims, n - k, axis=1)[:, n - k:]
    vals = np.take_along_axis(sims, top, axis=1)
    cut = vals.min(axis=1)
    # argpartition may pick any of several entries tied at the cut; redo those (rare) rows exactly.
    for r in np.flatnonzero((sims >= cut[:, None]).sum(axis=1) > k):
        above = np.flatnonzero(sims[r] > cut[r])
        tied = np.flatnonzero(sims[r] == cut[r])[: k - above.size]
        top[r] = np.concatenate([above, tied])
        vals[r] = sims[r, top[r]]
    order = np.lexsort((top, -vals), axis=1)
    return np.take_along_axis(top, order, axis=1).astype(np.int64, copy=False)


def nearest_neighbours(x: np.ndarray, queries: np.ndarray, k: int, chunk: int = 4096) -> np.ndarray:
    """Cosine-similarity k nearest neighbours of some rows of ``x`` among all other rows.

    Neighbours of row q are the k rows j != q with the largest cosine(x_q, x_j) (zero rows have
    cosine 0 with everything), most similar first; ties go to the lower row index. The query itself is
    always excluded, exact duplicates of it are not. Similarities are float32, computed in blocks of
    at most ``chunk`` queries (and at most 2**25 similarities), so memory is O(chunk * N) at most.

    Args:
        x: float ``[N, D]``.
        queries: int ``[Q]`` row indices into x.
        k: neighbours per query, 1 <= k <= N - 1.
        chunk: maximum number of queries per similarity block.

    Returns:
        int64 ``[Q, k]`` row indices into x.
    """
    x = _check_embeddings(x)
    n = x.shape[0]
    q_all = np.asarray(queries, dtype=np.int64).reshape(-1)
    if not 1 <= k <= n - 1:
        raise ValueError(f"k must be in [1, N - 1] = [1, {n - 1}], got {k}")
    if q_all.size and (q_all.min() < 0 or q_all.max() >= n):
        raise ValueError(f"queries must be row indices in [0, {n})")
    unit = _unit_rows(x)
    rows = max(1, min(chunk, _MAX_BLOCK_ELEMENTS // n))
    out = np.empty((q_all.size, k), dtype=np.int64)
    for start in range(0, q_all.size, rows):
        q = q_all[start:start + rows]
        sims = unit[q] @ unit.T  # [B, N]
        sims[np.arange(q.size), q] = -np.inf
        out[start:start + q.size] = _top_k(sims, k)
    return out


def _sample_queries(n: int, n_queries: int, rng: np.random.Generator) -> np.ndarray:
    """All rows (int64 ``[N]``) if N <= n_queries, else n_queries distinct rows drawn by ``rng``, sorted."""
    if n <= n_queries:
        return np.arange(n, dtype=np.int64)
    return np.sort(rng.choice(n, size=n_queries, replace=False)).astype(np.int64)


def nn_overlap(x: np.ndarray, x_hat: np.ndarray, k: int = 10, n_queries: int = 1000, seed: int = 0) -> float:
    """How well the reconstruction preserves cosine neighbourhoods: nn_overlap@k.

    Definition: mean over queries i of |kNN_x(i) ∩ kNN_xhat(i)| / k, where kNN_a(i) is the set of k
    nearest rows of ``a`` to row i by cosine, i excluded (`nearest_neighbours`). Queries are all rows if
    N <= n_queries, else n_queries rows drawn without replacement by ``np.random.default_rng(seed)``.

    Args:
        x: float ``[N, D]`` inputs.
        x_hat: float ``[N, D']`` reconstructions (same N; any width).
        k: neighbourhood size, 1 <= k <= N - 1.
        n_queries: maximum number of query rows.
        seed: seed of the query sample.

    Returns:
        A float in [0, 1].
    """
    x = _check_embeddings(x)
    x_hat = _check_embeddings(x_hat, x.shape[0], "x_hat")
    queries = _sample_queries(x.shape[0], n_queries, np.random.default_rng(seed))
    nn_x = nearest_neighbours(x, queries, k)
    nn_hat = nearest_neighbours(x_hat, queries, k)
    hits = (nn_x[:, :, None] == nn_hat[:, None, :]).any(axis=2).sum(axis=1)  # [Q]
    return float(hits.mean() / k)


def _shared_prefix_rates(codes: np.ndarray, a: np.ndarray, b: np.ndarray) -> list[float]:
    """Element l - 1: share of pairs (a_i, b_i) whose level-l prefixes ``codes[:, :l]`` are equal."""
    same = np.logical_and.accumulate(codes[a] == codes[b], axis=1)  # [Q, L]
    return [float(v) for v in same.mean(axis=0)]


def prefix_coincidence(
    x: np.ndarray, codes: np.ndarray, n_queries: int = 2000, seed: int = 0
) -> PrefixCoincidence:
    """Do nearest neighbours share code prefixes more often than random pairs?

    Definitions, per level l = 1..L: ``nn[l-1]`` = share of queries q whose nearest neighbour in x
    (cosine, q excluded, `nearest_neighbours` with k = 1) has the same prefix ``codes[:, :l]`` as q;
    ``random[l-1]`` = share of pairs (q, r) with r drawn uniformly from the other N - 1 rows that have the
    same level-l prefix. With rng = ``np.random.default_rng(seed)``, queries are all rows if
    N <= n_queries, else n_queries rows drawn without replacement by rng; then rng draws the r's.

    Args:
        x: float ``[N, D]`` embeddings, N >= 2.
        codes: int ``[N, L]``.
        n_queries: maximum number of query rows.
        seed: seed of the query and partner sample.

    Returns:
        PrefixCoincidence with two lists of L floats in [0, 1].
    """
    codes = _check_codes(codes)
    n = codes.shape[0]
    x = _check_embeddings(x, n)
    if n < 2:
        raise ValueError("prefix_coincidence needs at least 2 items")
    rng = np.random.default_rng(seed)
    queries = _sample_queries(n, n_queries, rng)
    nearest = nearest_neighbours(x, queries, 1)[:, 0]
    partner = rng.integers(0, n - 1, size=queries.size)
    partner += partner >= queries  # skip the query itself: uniform over the other N - 1 rows
    return PrefixCoincidence(
        nn=_shared_prefix_rates(codes, queries, nearest),
        random=_shared_prefix_rates(codes, queries, partner),
    )


def _cluster_class_agreement(level: int, clusters: np.ndarray, classes: np.ndarray) -> TaxonomyAgreement:
    """Purity and NMI of int64 cluster ids ``[n]`` against int class ids ``[n]`` (see taxonomy_agreement)."""
    n = clusters.size
    if n == 0:
        return TaxonomyAgreement(level=level, purity=math.nan, nmi=math.nan, n_items=0)
    cl, n_cl = _dense_ids(clusters)
    cs, n_cs = _dense_ids(classes.astype(np.int64))
    pairs, n_ij = np.unique(cl * n_cs + cs, return_counts=True)  # sparse contingency table
    pair_cl, pair_cs = pairs // n_cs, pairs % n_cs
    best = np.zeros(n_cl, dtype=np.int64)
    np.maximum.at(best, pair_cl, n_ij)
    a = np.bincount(cl, minlength=n_cl).astype(np.float64)
    b = np.bincount(cs, minlength=n_cs).astype(np.float64)
    mutual = float((n_ij / n * np.log(n * n_ij / (a[pair_cl] * b[pair_cs]))).sum())
    if n_cl == 1 and n_cs == 1:
        nmi = 1.0
    elif n_cl == 1 or n_cs == 1:
        nmi = 0.0
    else:
        nmi = min(1.0, max(0.0, 2.0 * mutual / (_entropy(a) + _entropy(b))))
    return TaxonomyAgreement(level=level, purity=float(best.sum()) / n, nmi=nmi, n_items=n)


def taxonomy_agreement(codes: np.ndarray, category_ids: np.ndarray) -> list[TaxonomyAgreement]:
    """Agreement between code prefixes and the category taxonomy, per level.

    For level l = 1..min(L, T): clusters are the distinct level-l prefixes ``codes[:, :l]``, classes are
    ``category_ids[:, l - 1]``; rows whose class is -1 (unknown) are left out, n = rows kept.
    ``purity`` = (1/n) sum over clusters of the largest class count inside the cluster.
    ``nmi`` = 2 I(U; V) / (H(U) + H(V)) (arithmetic normalisation, sklearn's default; natural logs),
    U = cluster, V = class; 1.0 when both entropies are 0, 0.0 when exactly one is. With n = 0 both
    are NaN.

    Args:
        codes: int ``[N, L]``.
        category_ids: int ``[N, T]``; column t holds a global id of the item's category path prefix of
            depth t + 1 (equal ids mean equal paths up to that depth), -1 when unknown.

    Returns:
        min(L, T) TaxonomyAgreement objects, element ``l - 1`` for level l.
    """
    codes = _check_codes(codes)
    cats = np.asarray(category_ids)
    if cats.ndim != 2 or cats.shape[0] != codes.shape[0]:
        raise ValueError(f"category_ids must be [N={codes.shape[0]}, T], got shape {cats.shape}")
    prefixes = _prefix_ids(codes)
    out = []
    for level in range(1, min(codes.shape[1], cats.shape[1]) + 1):
        classes = cats[:, level - 1]
        known = classes >= 0
        out.append(_cluster_class_agreement(level, prefixes[level - 1][known], classes[known]))
    return out


def _code_metrics(x: np.ndarray, codes: np.ndarray, codebook_size: int, n_queries: int, seed: int
                  ) -> dict[str, float]:
    """Tuple, per-level usage and prefix-coincidence metrics of `evaluate_codes`."""
    stats = tuple_stats(codes)
    out: dict[str, float] = {
        "unique_rate": stats.unique_rate,
        "collision_rate": stats.collision_rate,
        "items_in_collisions": stats.items_in_collisions,
        "max_group_size": stats.max_group_size,
        "distinct_tuples": stats.distinct_tuples,
    }
    coincidence = prefix_coincidence(x, codes, n_queries, seed)
    for level, usage in enumerate(level_usage(codes, codebook_size), start=1):
        out[f"l{level}_utilization"] = usage.utilization
        out[f"l{level}_dead_codes"] = usage.dead_codes
        out[f"l{level}_perplexity"] = usage.perplexity
        out[f"l{level}_entropy"] = usage.entropy
        out[f"l{level}_gini"] = usage.gini
        out[f"l{level}_prefix_nn"] = coincidence.nn[level - 1]
        out[f"l{level}_prefix_random"] = coincidence.random[level - 1]
    return out


def evaluate_codes(
    x: np.ndarray,
    codes: np.ndarray,
    codebook_size: int,
    x_hat: np.ndarray | None = None,
    category_ids: np.ndarray | None = None,
    k: int = 10,
    n_queries: int = 2000,
    seed: int = 0,
) -> dict[str, float]:
    """All applicable metrics as one flat dict with stable names (for MLflow and tables).

    Always: ``unique_rate, collision_rate, items_in_collisions, max_group_size, distinct_tuples`` and,
    for each level l, ``l{l}_utilization, l{l}_dead_codes, l{l}_perplexity, l{l}_entropy, l{l}_gini,
    l{l}_prefix_nn, l{l}_prefix_random``. With x_hat: ``recon_cos_mean, recon_cos_p10, recon_cos_p50,
    nn_overlap_at_{k}`` (MLflow-safe name for nn_overlap@k). With category_ids: ``l{l}_purity,
    l{l}_nmi`` for l = 1..min(L, T).
    Counts (max_group_size, distinct_tuples, dead codes) are Python ints, everything else floats.

    Args:
        x: float ``[N, D]`` input embeddings.
        codes: int ``[N, L]`` codes in ``[0, codebook_size)``.
        codebook_size: K codes per level.
        x_hat: optional float ``[N, D]`` reconstructions of x.
        category_ids: optional int ``[N, T]`` hierarchical category ids, -1 = unknown.
        k: neighbourhood size of nn_overlap.
        n_queries: query sample size of prefix coincidence and nn_overlap.
        seed: seed of those samples.

    Returns:
        dict metric name -> value, in the order above.
    """
    out = _code_metrics(x, codes, codebook_size, n_queries, seed)
    if x_hat is not None:
        cos = reconstruction_cosine(x, x_hat)
        out.update(recon_cos_mean=cos.mean, recon_cos_p10=cos.p10, recon_cos_p50=cos.p50)
        out[f"nn_overlap_at_{k}"] = nn_overlap(x, x_hat, k=k, n_queries=n_queries, seed=seed)
    if category_ids is not None:
        for agreement in taxonomy_agreement(codes, category_ids):
            out[f"l{agreement.level}_purity"] = agreement.purity
            out[f"l{agreement.level}_nmi"] = agreement.nmi
    return out


def _format_value(value: float | None) -> str:
    """Integers as integers, floats with 4 decimals (scientific beyond 1e6), missing as 'n/a'."""
    if value is None:
        return "n/a"
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return str(int(value))
    value = float(value)
    if math.isnan(value) or math.isinf(value):
        return str(value)
    return f"{value:.4e}" if abs(value) >= 1e6 else f"{value:.4f}"


def format_metrics_table(rows: dict[str, dict[str, float]]) -> str:
    """A Markdown pipe table: one row per metric, one column per model.

    Args:
        rows: model name -> flat metric dict (as returned by `evaluate_codes`), e.g.
            ``{"rqvae": {...}, "rqkmeans": {...}}``. Metric rows appear in first-seen order; a metric a
            model lacks shows as ``n/a``. Integers print as integers, floats with 4 decimals.

    Returns:
        The table as a string (no trailing newline), columns padded so it also reads as plain text.
    """
    models = list(rows)
    names = list(dict.fromkeys(name for metrics in rows.values() for name in metrics))
    body = [[name] + [_format_value(rows[m].get(name)) for m in models] for name in names]
    header = ["metric", *models]
    widths = [max(len(r[c]) for r in [header, *body]) for c in range(len(header))]

    def line(cells: list[str]) -> str:
        padded = [cells[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(cells[1:], widths[1:])]
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join(["-" * (widths[0] + 2)] + ["-" * (w + 1) + ":" for w in widths[1:]]) + "|"
    return "\n".join([line(header), rule, *(line(r) for r in body)])
