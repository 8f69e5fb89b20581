"""Deterministic training sample and its collection into NumPy arrays.

The sample is chosen by a hash of ``(item_id, seed)``, never by ``rand()`` / ``sample()``
(DESIGN.md "Sampling"): the same catalog and seed give the same items on any engine and under any
partitioning, and a rerun trains on the same items.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from pipelines.arrow_utils import embeddings_to_numpy
from pipelines.schema import EMBEDDING, ITEM_ID

_HASH = "__csid_sample_hash"
_SLACK_SIGMAS = 8.0  # keep-threshold margin: P(fewer than sample_size rows pass) < 1e-15


@dataclass(frozen=True)
class TrainingArrays:
    """The training sample on the driver, rows sorted by item id.

    Attributes:
        item_ids: [N] int64 (BIGINT ids) or object array of str (STRING ids).
        embeddings: [N, D] float32, C-contiguous.
        categories: per row the root-to-leaf category path ([] where null), or None when no
            category column was collected.
    """

    item_ids: np.ndarray
    embeddings: np.ndarray
    categories: list[list[str]] | None = None


def sample_hash(seed: int) -> Column:
    """BIGINT column ``xxhash64(cast(item_id as string), cast(seed as bigint))``, the sampling key.

    Both engines implement Spark's xxhash64 bit for bit, so the key is engine-independent.
    """
    return F.xxhash64(F.col(ITEM_ID).cast("string"), F.lit(seed).cast("bigint"))


def sample_for_training(df: DataFrame, sample_size: int, seed: int, n_rows: int | None = None) -> DataFrame:
    """The ``min(sample_size, n_rows)`` rows with the smallest ``(sample_hash(seed), item_id)``.

    A hash threshold first keeps a little more than ``sample_size / n_rows`` of the rows (an
    8-sigma margin), so the final top-k sort only sees about ``sample_size`` rows; the result does
    not depend on partitioning, row order or engine.

    Args:
        df: validated catalog with a unique, non-null ``item_id`` (STRING or BIGINT); other
            columns are passed through.
        sample_size: number of rows wanted (>= 1).
        seed: sampling seed; a different seed gives a different, equally deterministic sample.
        n_rows: row count of ``df`` when already known (saves a count). Must not overstate it:
            too large a value shrinks the threshold and could return fewer rows.

    Returns:
        ``df``'s columns, at most ``sample_size`` rows.
    """
    if sample_size < 1:
        raise ValueError(f"sample_size must be >= 1, got {sample_size}")
    if n_rows is None:
        n_rows = df.count()
    hashed = df.withColumn(_HASH, sample_hash(seed))
    fraction = keep_fraction(sample_size, n_rows)
    if fraction < 1.0:
        hashed = hashed.where(F.col(_HASH) < F.lit(hash_threshold(fraction)))
    return hashed.orderBy(_HASH, ITEM_ID).limit(sample_size).drop(_HASH)


def keep_fraction(sample_size: int, n_rows: int) -> float:
    """Share of rows the hash threshold keeps: ``sample_size`` plus an 8-sigma margin, capped at 1."""
    if n_rows <= sample_size:
        return 1.0
    wanted = sample_size + _SLACK_SIGMAS * math.sqrt(sample_size) + 64
    return min(1.0, wanted / n_rows)


def hash_threshold(fraction: float) -> int:
    """BIGINT ``t`` such that ``xxhash64 < t`` holds for ``fraction`` of uniformly spread hashes.

    Same as mapping the hash to ``u = (h + 2**63) / 2**64`` in [0, 1) and keeping ``u < fraction``,
    but compared as integers so no floating-point rounding can differ between engines.
    """
    return min(-(2**63) + int(fraction * 2**64), 2**63 - 1)


def collect_training_arrays(df: DataFrame, dim: int, category_col: str | None = None) -> TrainingArrays:
    """Collect the (small) training sample to the driver through Arrow, sorted by item id.

    The embeddings go Arrow buffer -> float32 matrix without per-row Python objects; only the
    optional category paths become Python lists. Rows are sorted by ``item_id`` on the driver so
    the arrays, and a model trained on them, do not depend on the engine's output order.

    Args:
        df: ``item_id`` (STRING or BIGINT) and ``embedding`` ARRAY<FLOAT> of length ``dim``, plus
            ``category_col`` ARRAY<STRING> when given (``"category"`` after validation).
        dim: embedding length D.
        category_col: name of the category-path column, or None to skip it.

    Raises:
        ValueError: an embedding is null or does not have length ``dim``.
    """
    columns = [ITEM_ID, EMBEDDING] + ([category_col] if category_col else [])
    table = df.select(*columns).toArrow()
    ids = table.column(ITEM_ID).to_numpy()
    order = np.argsort(ids, kind="stable")
    embeddings = embeddings_to_numpy(table.column(EMBEDDING), dim)  # (N, D), maybe a read-only view
    if not embeddings.flags.writeable or not np.array_equal(order, np.arange(len(order))):
        embeddings = embeddings[order]  # writable, C-contiguous, in id order
    categories = None
    if category_col:
        paths = table.column(category_col).to_pylist()
        categories = [list(paths[i] or []) for i in order]
    return TrainingArrays(item_ids=ids[order], embeddings=embeddings, categories=categories)
