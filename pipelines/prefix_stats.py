"""Prefix statistics of a semantic-ID table: per prefix, per level and overall (DESIGN.md "Metrics").

Everything is aggregated in Spark; only small results reach the driver (at most L*K code counts,
one row per distinct group size, L*top_n prefixes). The per-level usage metrics (utilization, dead
codes, entropy, perplexity, Gini) are computed by :func:`rqvae.metrics.code_usage_from_counts`, so
each metric has one definition in the project. Collision metrics follow
:func:`rqvae.metrics.tuple_stats`: unique_rate = distinct full tuples / items, collision_rate =
1 - unique_rate, items_in_collisions = share of items whose tuple is held by >= 2 items.

All aggregations start from one grouping of the table by its full code tuple (:func:`tuple_groups`):
one row per distinct tuple with its group size and max suffix. Pass a materialized table (the
written ``semantic_ids``), not the encoding plan: :func:`summarize` reads its input three times.
At catalog scale (a trained model gives about one tuple per item) that grouping is the cost, so the
job computes it once, materialises it, and derives everything from it with :func:`summarize_groups`
and :func:`prefix_stats_of_groups`.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from functools import reduce
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F
from pyspark.sql import types as T

from pipelines.schema import (
    ACTIVE,
    CHILDREN,
    CODE,
    CODES,
    COLLISION_GROUPS,
    ITEM_COUNT,
    ITEM_ID,
    LEVEL,
    MAX_SUFFIX,
    PREFIX,
    QUANTIZATION_ERROR,
    SUFFIX,
)
from pipelines.uniquify import (
    CODE_SEPARATOR,
    Split,
    code_keys,
    code_prefix,
    prefix_part,
    prefix_parts,
    prefix_strings,
    require_columns,
    run_starts,
)
from pipelines.validate import SchemaError
from rqvae.metrics import CodeUsage, TupleStats, code_usage_from_counts

_GROUP_SIZE = "__csid_group_size"
_OVERFLOW = "__csid_overflow"
_NEXT_CODE = "__csid_next_code"
_PREFIX_CODES = "__csid_prefix_codes"
_TUPLES = "__csid_tuples"
_LABEL = "__csid_label"
_RANK = "__csid_rank"
LABELS_PER_PREFIX = 3  # sample labels shown per top prefix in the report
LABEL_MAX_CHARS = 80  # a longer label is cut to this many characters (the last one "…") in the report


@dataclass(frozen=True)
class LevelUsage(CodeUsage):
    """:class:`rqvae.metrics.CodeUsage` of one level, plus which level and the counts behind it.

    Attributes:
        level: 1-based level.
        counts: items per code, element j for code j (length K, dead codes included).
    """

    level: int
    counts: tuple[int, ...]

    def metrics(self) -> dict[str, Any]:
        """The scalar fields, ``level`` first (no counts): one row of a ``level_stats`` table."""
        return {"level": self.level, **{f.name: getattr(self, f.name) for f in fields(CodeUsage)}}


@dataclass(frozen=True)
class PrefixRow:
    """One row of :func:`prefix_stats` (see there for the column definitions)."""

    level: int
    prefix: str
    item_count: int
    children: int
    collision_groups: int
    max_suffix: int


@dataclass(frozen=True)
class PrefixSummary(TupleStats):
    """Overall and per-level statistics of a semantic-ID table (see :func:`summarize`): the
    :class:`rqvae.metrics.TupleStats` of its code tuples plus suffixes, usage and top prefixes.

    Attributes:
        n_items: rows of the table.
        distinct_tuples: distinct full code tuples.
        unique_rate: distinct_tuples / n_items.
        collision_rate: 1 - unique_rate.
        items_in_collisions: share of items whose full tuple is held by >= 2 items.
        max_group_size: items in the largest group (1 when every tuple is unique).
        suffix_budget: suffixes 0..suffix_budget-1 fit the downstream vocabulary.
        suffix_overflow: items whose suffix >= suffix_budget.
        num_levels: L; codebook_size: K.
        levels: L LevelUsage, element l-1 for level l.
        group_size_histogram: (group size, number of tuples of that size), by ascending size.
        top_prefixes: per level (ascending), the ``top_n`` prefixes by item count (desc), ties by prefix.
    """

    suffix_budget: int
    suffix_overflow: int
    num_levels: int
    codebook_size: int
    levels: tuple[LevelUsage, ...]
    group_size_histogram: tuple[tuple[int, int], ...]
    top_prefixes: tuple[PrefixRow, ...]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (nested dataclasses as dicts, tuples as lists once serialized)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PrefixSummary:
        """Inverse of :meth:`to_dict`, also after a JSON round trip (lists back to tuples)."""
        return cls(**{
            **d,
            "levels": tuple(LevelUsage(**{**u, "counts": tuple(u["counts"])}) for u in d["levels"]),
            "group_size_histogram": tuple((int(s), int(n)) for s, n in d["group_size_histogram"]),
            "top_prefixes": tuple(PrefixRow(**p) for p in d["top_prefixes"]),
        })


def prefix_stats(sid_df: DataFrame, num_levels: int) -> DataFrame:
    """Statistics of every code prefix at every level, in one aggregation.

    Args:
        sid_df: a semantic-ID table: ``codes`` ARRAY<INT> of length L, ``suffix`` INT.
        num_levels: L.

    Returns:
        One row per (level, prefix): ``level`` INT (1..L), ``prefix`` STRING (as in
        ``prefix_<level>``: "35", "35_7"...), ``item_count`` BIGINT (items under the prefix),
        ``children`` BIGINT (distinct level+1 codes under the prefix; at level L, where the prefix
        is the full tuple, the number of distinct suffixes, i.e. = item_count), ``collision_groups``
        BIGINT (full tuples under the prefix held by more than one item) and ``max_suffix`` INT
        (largest suffix under the prefix).
    """
    require_columns(sid_df, (CODES, SUFFIX), "prefix_stats")
    return prefix_stats_of_groups(tuple_groups(sid_df), num_levels)


def code_counts(sid_df: DataFrame, num_levels: int) -> DataFrame:
    """Items per code at each level (for usage plots and the level statistics).

    Args:
        sid_df: ``codes`` ARRAY<INT> of length L.
        num_levels: L.

    Returns:
        ``level`` INT, ``code`` INT, ``item_count`` BIGINT: one row per (level, used code); codes
        no item uses have no row.
    """
    require_columns(sid_df, (CODES,), "code_counts")
    return _code_counts(sid_df, num_levels, F.lit(1))


def level_stats(sid_df: DataFrame, num_levels: int, codebook_size: int) -> list[LevelUsage]:
    """Per-level code usage: utilization, dead codes, entropy, perplexity, Gini and counts.

    Collects :func:`code_counts` (at most L*K rows) and applies ``code_usage_from_counts`` per level.

    Args:
        sid_df: ``codes`` ARRAY<INT> of length L with values in [0, codebook_size).
        num_levels: L.
        codebook_size: K.

    Returns:
        L LevelUsage, element l-1 for level l.
    """
    return _level_usages(code_counts(sid_df, num_levels).collect(), num_levels, codebook_size)


def summarize(
    sid_df: DataFrame, num_levels: int, codebook_size: int, suffix_budget: int, top_n: int = 10
) -> PrefixSummary:
    """Overall collision numbers, per-level usage, group-size histogram and top prefixes.

    Runs three small Spark jobs over one grouping by full tuple: the group-size histogram (with
    suffix overflow), the per-level code counts, and the top ``top_n`` prefixes of each level.

    Args:
        sid_df: a semantic-ID table: ``codes`` ARRAY<INT> of length L, ``suffix`` INT.
        num_levels: L.
        codebook_size: K.
        suffix_budget: how many suffixes downstream vocabularies reserve (suffix < budget fits).
        top_n: prefixes kept per level in ``top_prefixes``.

    Raises:
        ValueError: the table is empty, or a code lies outside [0, codebook_size).
    """
    require_columns(sid_df, (CODES, SUFFIX), "summarize")
    return summarize_groups(tuple_groups(sid_df, suffix_budget), num_levels, codebook_size, suffix_budget, top_n)


def summarize_groups(
    groups: DataFrame, num_levels: int, codebook_size: int, suffix_budget: int, top_n: int = 10,
    prefix_table: DataFrame | None = None,
) -> PrefixSummary:
    """:func:`summarize` from ``tuple_groups(sid_df, suffix_budget)`` (best materialised: it is read
    three times).

    Args:
        groups: :func:`tuple_groups` of the table, with the same ``suffix_budget``.
        prefix_table: :func:`prefix_stats` of the same table when it exists already (e.g. just
            written); the top prefixes are then read from it instead of being aggregated again.
        num_levels, codebook_size, suffix_budget, top_n: as in :func:`summarize`.
    """
    histogram = groups.groupBy(_GROUP_SIZE).agg(
        F.count(F.lit(1)).alias(_TUPLES), F.sum(_OVERFLOW).alias(_OVERFLOW)
    ).collect()
    if not histogram:
        raise ValueError("summarize: the semantic-ID table has no rows; nothing to summarize")
    stats = prefix_table if prefix_table is not None else prefix_stats_of_groups(groups, num_levels)
    counts = _code_counts_of(stats, groups, num_levels).collect()
    top = _top_prefixes(stats, num_levels, top_n).collect()
    return _build_summary(
        histogram, _level_usages(counts, num_levels, codebook_size), top, suffix_budget, codebook_size
    )


def tuple_groups(sid_df: DataFrame, suffix_budget: int | None = None) -> DataFrame:
    """One row per distinct ``codes``: group size, max suffix and (with a budget) overflowing items.

    The input of :func:`summarize_groups` and :func:`prefix_stats_of_groups`; its column names other
    than ``codes`` and ``max_suffix`` are internal.
    """
    require_columns(sid_df, (CODES, SUFFIX), "tuple_groups")
    aggregates = [F.count(F.lit(1)).alias(_GROUP_SIZE), F.max(SUFFIX).alias(MAX_SUFFIX)]
    if suffix_budget is not None:
        overflow = F.when(F.col(SUFFIX) >= suffix_budget, 1).otherwise(0)
        aggregates.append(F.sum(overflow).cast("long").alias(_OVERFLOW))
    return sid_df.groupBy(CODES).agg(*aggregates)


def prefix_stats_of_groups(groups: DataFrame, num_levels: int, levels: Sequence[int] | None = None) -> DataFrame:
    """:func:`prefix_stats` from the :func:`tuple_groups` frame (one row per level and tuple, then grouped);
    ``levels``: only the rows of these levels (default: 1..L).

    Level L's prefixes are the tuples themselves, one row of ``groups`` each, so its rows are selected,
    not aggregated: about one group per item was the largest part of the aggregation."""
    wanted = list(levels if levels is not None else range(1, num_levels + 1))
    out = []
    shallower = [level for level in wanted if level < num_levels]
    if shallower:
        # Grouped by the prefix's codes, its string made per prefix after (about 2 rows per tuple before).
        per_level = [
            F.struct(
                F.lit(level).alias(LEVEL),
                F.slice(F.col(CODES), 1, level).alias(_PREFIX_CODES),
                F.col(CODES)[level].alias(_NEXT_CODE),
                F.col(_GROUP_SIZE).alias(_GROUP_SIZE),
                F.col(MAX_SUFFIX).alias(MAX_SUFFIX),
            )
            for level in shallower
        ]
        stats = groups.select(F.inline(F.array(*per_level))).groupBy(LEVEL, _PREFIX_CODES).agg(
            F.sum(_GROUP_SIZE).alias(ITEM_COUNT),
            F.countDistinct(_NEXT_CODE).alias(_NEXT_CODE),
            F.sum(F.when(F.col(_GROUP_SIZE) > 1, 1).otherwise(0)).cast("long").alias(COLLISION_GROUPS),
            F.max(MAX_SUFFIX).alias(MAX_SUFFIX),
        )
        prefix = F.array_join(F.col(_PREFIX_CODES).cast("array<string>"), CODE_SEPARATOR)
        out.append(stats.select(LEVEL, prefix.alias(PREFIX), ITEM_COUNT, F.col(_NEXT_CODE).cast("long").alias(CHILDREN),
                                COLLISION_GROUPS, MAX_SUFFIX))
    if num_levels in wanted:
        size = F.col(_GROUP_SIZE).cast("long")
        out.append(groups.select(
            F.lit(num_levels).alias(LEVEL), code_prefix(num_levels).alias(PREFIX), size.alias(ITEM_COUNT),
            size.alias(CHILDREN), F.when(F.col(_GROUP_SIZE) > 1, 1).otherwise(0).cast("long").alias(COLLISION_GROUPS),
            F.col(MAX_SUFFIX)))
    if not out:
        raise ValueError(f"prefix_stats_of_groups: no level of 1..{num_levels} asked for (got {wanted})")
    return reduce(DataFrame.unionByName, out)


def _code_counts(df: DataFrame, num_levels: int, weight: Column) -> DataFrame:
    """Sum of ``weight`` per (level, code of ``codes`` at that level): the body of :func:`code_counts`."""
    per_level = [
        F.struct(F.lit(level).alias(LEVEL), F.col(CODES)[level - 1].alias(CODE), weight.alias(ITEM_COUNT))
        for level in range(1, num_levels + 1)
    ]
    exploded = df.select(F.inline(F.array(*per_level)))
    return exploded.groupBy(LEVEL, CODE).agg(F.sum(ITEM_COUNT).cast("long").alias(ITEM_COUNT))


def _code_counts_of(stats: DataFrame, groups: DataFrame, num_levels: int) -> DataFrame:
    """:func:`code_counts` from a table's prefix statistics and its :func:`tuple_groups`: a level above L
    from its prefix rows (few: at most K^l), its code the prefix's last; level L from the groups by their
    last code. Not the groups exploded into L rows each (1.0 s at 5M x 256 against about 0.4 s)."""
    last = F.substring_index(F.col(PREFIX), CODE_SEPARATOR, -1).cast("int")
    shallow = stats.where(F.col(LEVEL) < num_levels).select(LEVEL, last.alias(CODE), ITEM_COUNT)
    deepest = groups.select(F.lit(num_levels).alias(LEVEL), F.col(CODES)[num_levels - 1].alias(CODE),
                            F.col(_GROUP_SIZE).alias(ITEM_COUNT))
    return shallow.unionByName(deepest).groupBy(LEVEL, CODE).agg(F.sum(ITEM_COUNT).cast("long").alias(ITEM_COUNT))


def _top_prefixes(stats: DataFrame, num_levels: int, top_n: int) -> DataFrame:
    """The ``top_n`` rows of each level by (item_count desc, prefix asc); a top-k per level, no window."""
    order = [F.col(ITEM_COUNT).desc(), F.col(PREFIX).asc()]
    per_level = [
        stats.filter(F.col(LEVEL) == level).orderBy(*order).limit(top_n) for level in range(1, num_levels + 1)
    ]
    return reduce(DataFrame.unionByName, per_level)


def _level_usages(rows: list, num_levels: int, codebook_size: int) -> list[LevelUsage]:
    """LevelUsage per level from collected (level, code, item_count) rows."""
    counts = np.zeros((num_levels, codebook_size), dtype=np.int64)
    for row in rows:
        level, code = int(row[LEVEL]), int(row[CODE])
        if not 0 <= code < codebook_size:
            raise _outside_the_codebook(code, level, codebook_size)
        counts[level - 1, code] = int(row[ITEM_COUNT])
    return [_level_usage(level, counts[level - 1]) for level in range(1, num_levels + 1)]


def _outside_the_codebook(code: int, level: int, codebook_size: int) -> ValueError:
    return ValueError(f"column {CODES!r} holds code {code} at level {level}, outside [0, {codebook_size}); "
                      "pass the model's codebook size (--codebook-size)")


def _level_usage(level: int, counts: np.ndarray) -> LevelUsage:
    """LevelUsage of one level from its int [K] counts, with plain Python numbers."""
    usage = code_usage_from_counts(counts)
    plain = {f.name: getattr(usage, f.name).item() if hasattr(getattr(usage, f.name), "item")
             else getattr(usage, f.name) for f in fields(CodeUsage)}
    return LevelUsage(level=level, counts=tuple(int(c) for c in counts), **plain)


def _build_summary(
    histogram: list, levels: list[LevelUsage], top: list, suffix_budget: int, codebook_size: int
) -> PrefixSummary:
    """PrefixSummary from the collected histogram rows, level usages and top-prefix rows."""
    sizes = sorted((int(r[_GROUP_SIZE]), int(r[_TUPLES]), int(r[_OVERFLOW])) for r in histogram)
    n_items = sum(size * tuples for size, tuples, _ in sizes)
    distinct = sum(tuples for _, tuples, _ in sizes)
    top_rows = sorted((PrefixRow(**{f.name: r[f.name] for f in fields(PrefixRow)}) for r in top),
                      key=lambda p: (p.level, -p.item_count, p.prefix))
    return PrefixSummary(
        n_items=n_items,
        distinct_tuples=distinct,
        unique_rate=distinct / n_items,
        collision_rate=1.0 - distinct / n_items,
        items_in_collisions=sum(size * tuples for size, tuples, _ in sizes if size > 1) / n_items,
        max_group_size=sizes[-1][0],
        suffix_budget=suffix_budget,
        suffix_overflow=sum(overflow for _, _, overflow in sizes),
        num_levels=len(levels),
        codebook_size=codebook_size,
        levels=tuple(levels),
        group_size_histogram=tuple((size, tuples) for size, tuples, _ in sizes),
        top_prefixes=tuple(top_rows),
    )


@dataclass(frozen=True)
class ReportTables:
    """The report stage's output: ``prefix_stats`` and ``level_stats`` frames and the summary behind the
    HTML/JSON report."""

    prefix_stats: DataFrame
    level_stats: DataFrame
    summary: PrefixSummary


def report_tables(sids: DataFrame, codebook_size: int, suffix_budget: int,
                  materialize: Callable[[DataFrame], DataFrame | None], parts: int = 1,
                  split: Split | None = None, num_levels: int | None = None,
                  collected: pa.Table | None = None,
                  arrow_frame: Callable[[pa.Table, T.StructType], DataFrame] | None = None) -> ReportTables:
    """Prefix and level statistics of the current IDs of a semantic-ID table.

    Args:
        sids: the semantic-ID table; only its active rows count (every row of a table without the
            ``active`` column).
        codebook_size: K.
        suffix_budget: suffixes at or beyond it count as overflow.
        materialize: computes a frame once (``EngineSession.materialize``) or returns None. The
            grouping by full tuple (about one row per item) is computed once and every statistic is
            derived from it.
        parts: > 1 (a large table): the tuples are grouped, and their rows of levels L-1 and L (about
            one per tuple) aggregated, one part of the prefixes after another
            (:func:`pipelines.uniquify.prefix_parts`), each part materialised, so that the engine holds
            one part's groups at a time; the same statistics.
        split: ``EngineSession.materialize_split``: the table's (codes, suffix) are split into those parts in
            one pass, and each part's grouping reads only its own rows (otherwise each part reads the whole
            table and keeps its own: 11 reads of 50M rows, 5.5 s each, on the embedded engine).
        num_levels: L, when the caller knows it (the model's); otherwise read from the table's first active row,
            a query of its own (1.1 s of a classic Spark run's publish stage on a planned table).
        collected: the table's ``codes`` and ``suffix`` (and ``active``, if it has the column) collected as Arrow
            already, for a table small enough to hold in this process (the job's on a JVM engine, at most
            ``pipelines.uniquify.PART_ITEMS`` rows), with ``num_levels`` given: the statistics are computed here
            with NumPy (:func:`_report_in_driver`), the same rows and summary, and the engine only receives the
            prefix rows. On classic Spark at 1M rows the engine's grouping, statistics and three collects took
            9 s of the publish stage (bench/RESULTS.md). Codes that are not a full L-long tuple on every row, a
            null suffix, or K^L past 2^62 (a tuple no longer fits one 64-bit key) leave it to the engine.
        arrow_frame: how those prefix rows become a frame (``EngineSession.frame_of_arrow``); default
            ``createDataFrame``.
    """
    current = sids.where(F.col(ACTIVE)) if ACTIVE in sids.columns else sids
    if collected is not None and num_levels is not None:
        schema = prefix_stats_of_groups(tuple_groups(current), num_levels).schema
        here = _report_in_driver(collected, schema, num_levels, codebook_size, suffix_budget)
        if here is not None:
            stats, summary = here
            frame = (arrow_frame or (lambda t, s: sids.sparkSession.createDataFrame(t, schema=s)))(stats, schema)
            return ReportTables(frame, _level_stats_table(sids, summary), summary)
    levels = num_levels if num_levels is not None else len(current.select(CODES).first()[0])  # type: ignore[index]
    if parts <= 1 or levels < 2:
        groups = tuple_groups(current, suffix_budget)
        groups = materialize(groups) or groups
        stats = prefix_stats_of_groups(groups, levels)
        stats = materialize(stats) or stats
    else:
        per_part, deep = [], [levels - 1, levels]  # a prefix of these levels lies in one part
        rows = current.select(CODES, SUFFIX)
        split_up = split(rows, prefix_part(levels, parts), parts) if split is not None else None
        for rows_here in split_up or [rows.where(here) for here in prefix_parts(levels, parts)]:
            part = tuple_groups(rows_here, suffix_budget)
            part = materialize(part) or part
            per_part.append((part, prefix_stats_of_groups(part, levels, deep)))
        groups = reduce(DataFrame.unionByName, [g for g, _ in per_part])
        shallow = [prefix_stats_of_groups(groups, levels, range(1, levels - 1))] if levels > 2 else []
        # Every piece computed once; their union is not written again (its deepest levels hold about a
        # row per item: 1.6 s of rewriting at 5M x 256).
        stats = reduce(DataFrame.unionByName, [materialize(s) or s for s in [*(s for _, s in per_part), *shallow]])
    summary = summarize_groups(groups, levels, codebook_size, suffix_budget, prefix_table=stats)
    return ReportTables(stats, _level_stats_table(sids, summary), summary)


def _level_stats_table(sids: DataFrame, summary: PrefixSummary) -> DataFrame:
    """The ``level_stats`` table: one row of :meth:`LevelUsage.metrics` per level."""
    rows = [u.metrics() for u in summary.levels]
    names = list(rows[0])  # "level" first
    return sids.sparkSession.createDataFrame([tuple(r[k] for k in names) for r in rows], names)


def _report_in_driver(collected: pa.Table, schema: T.StructType, levels: int, codebook_size: int,
                      suffix_budget: int, top_n: int = 10) -> tuple[pa.Table, PrefixSummary] | None:
    """:func:`report_tables`' prefix rows (as Arrow, in ``schema``'s columns) and summary, computed with NumPy
    from the collected table; None when its codes are not one L-long tuple a row without nulls, a suffix is
    null, or K^L tuples do not fit a 64-bit key (the engine computes them then).

    Every tuple is a key (its codes in base K), sorted once; a level's prefix is the key divided by K^(L-l),
    so each level's groups are runs of the sorted keys, and the same sums, maxima and distinct counts as the
    engine's aggregation (:func:`prefix_stats_of_groups`, :func:`summarize_groups`) are reductions over runs."""
    rows = collected.select([CODES, SUFFIX])
    if ACTIVE in collected.column_names:
        rows = rows.filter(pc.fill_null(collected.column(ACTIVE), False))
    if rows.num_rows == 0:
        raise ValueError("summarize: the semantic-ID table has no rows; nothing to summarize")
    lists, suffix = rows.column(CODES).combine_chunks(), rows.column(SUFFIX)
    if lists.null_count or suffix.null_count:
        return None
    lengths = pc.list_value_length(lists)
    flat = lists.flatten()
    if pc.min_max(lengths).as_py() != {"min": levels, "max": levels} or flat.null_count or \
            codebook_size ** levels >= 2 ** 62:
        return None
    codes = flat.to_numpy(zero_copy_only=False).astype(np.int64).reshape(-1, levels)
    for level in range(1, levels + 1):
        low, high = int(codes[:, level - 1].min()), int(codes[:, level - 1].max())
        if low < 0 or high >= codebook_size:
            raise _outside_the_codebook(low if low < 0 else high, level, codebook_size)
    keys = code_keys(codes, codebook_size)
    order = np.argsort(keys, kind="stable")
    keys, suffixes = keys[order], suffix.to_numpy(zero_copy_only=False).astype(np.int64)[order]
    starts = run_starts(keys)
    tuples, sizes = keys[starts], np.diff(np.append(starts, len(keys)))
    max_suffix = np.maximum.reduceat(suffixes, starts)
    overflow = np.add.reduceat((suffixes >= suffix_budget).astype(np.int64), starts)
    shared = (sizes > 1).astype(np.int64)
    per_level = []
    for level in range(1, levels):
        prefixes = tuples // codebook_size ** (levels - level)
        runs = run_starts(prefixes)
        below = np.unique(tuples // codebook_size ** (levels - level - 1)) // codebook_size  # a child: a run each
        per_level.append(_prefix_rows(level, prefixes[runs], codebook_size, np.add.reduceat(sizes, runs),
                                      np.diff(np.append(run_starts(below), len(below))),
                                      np.add.reduceat(shared, runs), np.maximum.reduceat(max_suffix, runs)))
    per_level.append(_prefix_rows(levels, tuples, codebook_size, sizes, sizes, shared, max_suffix))
    by_size, which = np.unique(sizes, return_inverse=True)
    histogram = [{_GROUP_SIZE: int(size), _TUPLES: int(n), _OVERFLOW: int(o)} for size, n, o in
                 zip(by_size, np.bincount(which), np.bincount(which, weights=overflow).astype(np.int64))]
    usages = [_level_usage(level, np.bincount(codes[:, level - 1], minlength=codebook_size))
              for level in range(1, levels + 1)]
    order_by = [(ITEM_COUNT, "descending"), (PREFIX, "ascending")]
    top = [row for table in per_level
           for row in table.take(pc.select_k_unstable(table, top_n, sort_keys=order_by)).to_pylist()]
    stats = pa.concat_tables(per_level).cast(pa.schema([(f.name, _ARROW_TYPES[f.name]) for f in schema.fields]))
    return stats, _build_summary(histogram, usages, top, suffix_budget, codebook_size)


_ARROW_TYPES = {LEVEL: pa.int32(), PREFIX: pa.string(), ITEM_COUNT: pa.int64(), CHILDREN: pa.int64(),
                COLLISION_GROUPS: pa.int64(), MAX_SUFFIX: pa.int32()}


def _prefix_rows(level: int, keys: np.ndarray, codebook_size: int, items: np.ndarray, children: np.ndarray,
                 collision_groups: np.ndarray, max_suffix: np.ndarray) -> pa.Table:
    """A level's prefix rows, the prefix written from its key as ``prefix_<level>`` is ("35_7")."""
    return pa.table({LEVEL: pa.array(np.full(len(keys), level, np.int32)),
                     PREFIX: prefix_strings(keys, level, codebook_size),
                     ITEM_COUNT: pa.array(items.astype(np.int64)), CHILDREN: pa.array(children.astype(np.int64)),
                     COLLISION_GROUPS: pa.array(collision_groups), MAX_SUFFIX: pa.array(max_suffix.astype(np.int32))})


# --- sample labels of the top prefixes (the report's "what is in this cluster") --------------------------

LABEL_ORDER = "smallest quantization_error first, ties by item_id"


def check_label_column(catalog: DataFrame, name: str, flag: str = "--label-col") -> None:
    """Raise :class:`~pipelines.validate.SchemaError` naming the column and ``flag`` when ``name`` is not a
    STRING column of ``catalog`` (the same messages as the other input columns' checks)."""
    types = {f.name: f.dataType for f in catalog.schema.fields}
    if name not in types:
        raise SchemaError(f"column {name!r} not found in the catalog (columns: {', '.join(types)}); name the right "
                          f"column with {flag}")
    if not isinstance(types[name], T.StringType | T.VarcharType | T.CharType):
        raise SchemaError(f"column {name!r} has type {types[name].simpleString()}, expected STRING; convert it "
                          f"(e.g. CAST({name} AS STRING) in a view) or name another column with {flag}")


def catalog_labels(catalog: DataFrame, id_col: str, label_col: str) -> DataFrame:
    """The catalog's labels keyed like the semantic-ID table: ``item_id`` (STRING, or BIGINT for integer
    ids, as validation names it) and the label; rows without a label (null or blank) are left out.

    Raises:
        SchemaError: ``label_col`` is missing or not STRING (see :func:`check_label_column`).
    """
    check_label_column(catalog, label_col)
    item_id = F.col(id_col)
    if not isinstance(catalog.schema[id_col].dataType, T.StringType):
        item_id = item_id.cast("bigint")
    label = F.col(label_col).cast("string")
    return catalog.select(item_id.alias(ITEM_ID), label.alias(_LABEL)).where(
        label.isNotNull() & (F.length(F.trim(label)) > 0))


def sample_labels(sids: DataFrame, labels: DataFrame, prefixes: Sequence[PrefixRow],
                  per_prefix: int = LABELS_PER_PREFIX) -> dict[str, tuple[str, ...]]:
    """A few labels of the items under each of ``prefixes`` (the report's top prefixes), deterministically.

    Under each prefix, the labelled active items are ordered by ``quantization_error`` (smallest first:
    the items the codes describe best) and then ``item_id``; the first ``per_prefix`` give their labels,
    whitespace collapsed to single spaces and cut to :data:`LABEL_MAX_CHARS` characters. Only the rows
    under the wanted prefixes are joined with the labels, and only ``len(prefixes) * per_prefix`` rows
    reach the driver. Reads the table; writes nothing and changes no ID.

    Args:
        sids: the semantic-ID table (``item_id``, ``codes``, ``quantization_error``; only ``active`` rows
            count when the column exists).
        labels: :func:`catalog_labels` of the catalog.
        prefixes: e.g. ``PrefixSummary.top_prefixes``.
        per_prefix: labels kept per prefix.

    Returns:
        prefix -> up to ``per_prefix`` labels in that order; a prefix without a labelled item maps to ``()``.
    """
    require_columns(sids, (ITEM_ID, CODES, QUANTIZATION_ERROR), "sample_labels")
    wanted: dict[int, list[str]] = {}
    for p in prefixes:
        wanted.setdefault(p.level, []).append(p.prefix)
    found: dict[str, list[tuple[int, str]]] = {p.prefix: [] for p in prefixes}  # (rank, label)
    if wanted and per_prefix >= 1:
        current = sids.where(F.col(ACTIVE)) if ACTIVE in sids.columns else sids
        under = [(level, code_prefix(level).isin(names)) for level, names in sorted(wanted.items())]
        member = current.where(reduce(Column.__or__, [cond for _, cond in under]))
        # One row per (item, wanted prefix it is under): at most one per level.
        per_level = [F.when(cond, F.struct(F.lit(level).alias(LEVEL), code_prefix(level).alias(PREFIX)))
                     for level, cond in under]
        under_prefix = F.explode(F.array_compact(F.array(*per_level))).alias("p")
        pairs = member.select(ITEM_ID, QUANTIZATION_ERROR, under_prefix).select(
            ITEM_ID, QUANTIZATION_ERROR, F.col("p")[LEVEL].alias(LEVEL), F.col("p")[PREFIX].alias(PREFIX))
        order = Window.partitionBy(LEVEL, PREFIX).orderBy(F.col(QUANTIZATION_ERROR).asc_nulls_last(),
                                                          F.col(ITEM_ID).asc())
        ranked = pairs.join(labels, on=ITEM_ID).withColumn(_RANK, F.row_number().over(order))
        for row in ranked.where(F.col(_RANK) <= per_prefix).select(PREFIX, _RANK, _LABEL).collect():
            found[row[PREFIX]].append((int(row[_RANK]), display_label(row[_LABEL])))
    return {prefix: tuple(label for _, label in sorted(ranked_labels)) for prefix, ranked_labels in found.items()}


def display_label(text: str, max_chars: int = LABEL_MAX_CHARS) -> str:
    """``text`` on one line (whitespace runs as one space) and at most ``max_chars`` characters long."""
    line = " ".join(str(text).split())
    return line if len(line) <= max_chars else line[:max_chars - 1] + "…"
