"""Validate the input catalog and quarantine bad rows, with one reason per row.

Nothing is dropped silently: every input row lands either in ``clean`` or in ``rejects``
(DESIGN.md "Data contract": input rows = written rows + rejected rows). The checks use only
built-in array functions (``size``, ``array_compact``, ``array_max``, ``array_min``) that run the
same on classic Spark and on Spark Connect engines (Sail), and no rows are collected to the driver.
Classic Spark interprets higher-order functions (``exists``/``forall``) element by element, so the
NaN/Inf and zero checks use ``array_max``/``array_min`` instead (the 1M x 768 counting pass went
from 109 s to 64 s on 2 cores, bench/validate_cost.py). The null-element check has no cheap form
there (``array_compact`` and ``exists`` both take about 50 s per 1M x 768 on 2 cores); on Sail every
check together adds about 2.5 s to a 1M x 768 encode pass.

The same per-row rules exist a second time, on Arrow batches (:func:`row_reason_codes`): the encode
UDF checks its rows itself, so a job given a model reads the embeddings once and never runs them
through the engine's array functions. Duplicate ids need every row of an id; :func:`flag_duplicates`
adds them on top of either form, joining ids and reasons only.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F
from pyspark.sql import types as T

from pipelines.schema import (
    CATEGORY,
    EMBEDDING,
    ITEM_ID,
    MLFLOW_RUN_ID,
    REASON,
    REJECTED_AT,
    InputColumns,
    RejectReason,
    magnitude_limits,
)

DEFAULT_COLUMNS = InputColumns()
_DUP = "__csid_duplicate"
_FLOAT_MAX = "3.4028234663852886E38"  # largest finite FLOAT: Inf is above it, and so is NaN in SQL ordering


class SchemaError(ValueError):
    """The catalog lacks a required column, or a column has the wrong type."""


class TooManyRejectsError(RuntimeError):
    """More input rows were rejected than ``--max-reject-share`` allows."""


@dataclass(frozen=True)
class ValidationResult:
    """Outcome of :func:`validate_catalog` (every frame is lazy).

    Attributes:
        clean: valid rows: ``item_id`` (STRING or BIGINT), ``embedding`` ARRAY<FLOAT> of length
            ``dim`` with finite, not-all-zero values, plus ``category`` ARRAY<STRING> when the
            input has a category column.
        rejects: quarantined rows: ``item_id`` (the catalog's id type, may be null), ``reason`` STRING, one of
            :attr:`RejectReason.ALL`.
        dim: the embedding length D the rows were checked against.
    """

    clean: DataFrame
    rejects: DataFrame
    dim: int
    flagged: DataFrame  # every row with its REASON (null when clean); clean and rejects are filters of it
    rows: DataFrame  # every input row with contract names and types, unchecked: the encode stage's input


def validate_catalog(
    df: DataFrame, columns: InputColumns = DEFAULT_COLUMNS, dim: int | None = None
) -> ValidationResult:
    """Split the catalog into clean rows and rejects, renaming columns to the contract names.

    Each rejected row gets the first matching reason in the order of :attr:`RejectReason.ALL`:
    null id, duplicate id (every row of an id that occurs more than once, so nothing is kept
    arbitrarily), null embedding, wrong length, null element, NaN/Inf, all-zero vector. Values
    are checked after the cast to FLOAT, so doubles beyond the float range count as Inf.

    Args:
        df: the catalog; ``columns.item_id`` STRING or integer, ``columns.embedding``
            ARRAY<FLOAT|DOUBLE>, optional ``columns.category`` ARRAY<STRING>. Other columns are
            ignored.
        columns: the input column names.
        dim: expected embedding length; ``None`` infers the most common non-null length (one
            small aggregation).

    Raises:
        SchemaError: a column is missing or has the wrong type.
        ValueError: ``dim`` is not positive, or cannot be inferred (no non-null embedding).
    """
    check_input_schema(df, columns)
    rows = select_contract_columns(df, columns)
    if dim is None:
        dim = infer_dim(rows, columns.embedding)
    if dim < 1:
        raise ValueError(f"the embedding length must be positive, got {dim}")
    flagged = flag_duplicates(rows.withColumn(REASON, reject_reason(dim)))
    clean = flagged.where(F.col(REASON).isNull()).select(*rows.columns)
    rejects = flagged.where(F.col(REASON).isNotNull()).select(ITEM_ID, REASON)
    return ValidationResult(clean=clean, rejects=rejects, dim=dim, flagged=flagged, rows=rows)


def flag_duplicates(df: DataFrame, ids: DataFrame | None = None, repeated: DataFrame | None = None,
                    broadcast: bool = False) -> DataFrame:
    """``df`` with REASON set to ``duplicate_item_id`` on every row whose ITEM_ID occurs more than once.

    Every row of a repeated id is flagged: keeping one of them would be an arbitrary choice. A null
    id is never a duplicate (it keeps ``null_item_id``); every other reason yields to this one, as in
    the order of :attr:`RejectReason.ALL`. The join carries whatever columns ``df`` has: the encode
    stage's small output (ids, codes, reasons), or, for :func:`validate_catalog`'s counts, only ids and
    reasons (the engine prunes the embeddings; its ``clean`` rows do carry them through the join).

    Args:
        df: ITEM_ID and REASON (STRING, null = clean), any other columns.
        ids: the frame whose ITEM_ID column is counted (default ``df``): the catalog's rows, when
            ``df`` is an expensive frame (the encode UDF's output) that must not be computed twice.
        repeated: :func:`duplicated_ids` already computed (and materialised) by the caller; ``ids``
            is then not read.
        broadcast: hint that ``repeated`` is small (the caller counted it), so that no engine builds
            the join's hash table from ``df``: Sail's planner did with the encode UDF's output, holding
            all of it in memory (1 GB at 5M rows with the alternatives).
    """
    if repeated is None:
        repeated = duplicated_ids(df if ids is None else ids)
    marks = repeated.select(ITEM_ID, F.lit(True).alias(_DUP))
    joined = df.join(F.broadcast(marks) if broadcast else marks, on=ITEM_ID, how="left")
    reason = F.when(F.col(_DUP).isNotNull(), F.lit(RejectReason.DUPLICATE_ID)).otherwise(F.col(REASON))
    return joined.withColumn(REASON, reason).select(*df.columns)


def duplicated_ids(ids: DataFrame) -> DataFrame:
    """ITEM_ID of every non-null id that occurs more than once in ``ids`` (one row each)."""
    return (ids.select(ITEM_ID).where(F.col(ITEM_ID).isNotNull()).groupBy(ITEM_ID).count()
            .where(F.col("count") > 1).select(ITEM_ID))


def select_contract_columns(df: DataFrame, columns: InputColumns = DEFAULT_COLUMNS) -> DataFrame:
    """Select and rename the catalog's columns to the contract names (no rows are filtered).

    Returns:
        ``item_id`` (STRING, or BIGINT for integer ids), ``embedding`` ARRAY<FLOAT> and, when
        ``columns.category`` is set, ``category`` ARRAY<STRING>.
    """
    item_id = F.col(columns.item_id)
    if not isinstance(df.schema[columns.item_id].dataType, T.StringType):
        item_id = item_id.cast("bigint")
    selected = [item_id.alias(ITEM_ID), F.col(columns.embedding).cast("array<float>").alias(EMBEDDING)]
    if columns.category:
        selected.append(F.col(columns.category).alias(CATEGORY))
    return df.select(*selected)


def reject_reason(dim: int) -> Column:
    """STRING column: the first per-row :class:`RejectReason` that applies, NULL for a clean row.

    Reads ``item_id`` and ``embedding`` (ARRAY<FLOAT>). The duplicate check needs every row of an id, so
    :func:`flag_duplicates` adds it on top. :func:`row_reason_codes` is the same rule on Arrow batches.
    """
    largest, smallest = F.array_max(EMBEDDING), F.array_min(EMBEDDING)
    low, high = magnitude_limits(dim)
    checks = [
        (F.col(ITEM_ID).isNull(), RejectReason.NULL_ID),
        (F.col(EMBEDDING).isNull(), RejectReason.NULL_EMBEDDING),
        (F.size(EMBEDDING) != F.lit(dim), RejectReason.WRONG_LENGTH),
        (F.size(F.array_compact(EMBEDDING)) != F.lit(dim), RejectReason.NULL_ELEMENT),
        # NaN sorts above every number in Spark SQL (and in Arrow's total order on Sail), so one NaN
        # makes array_max NaN, which is not <= the largest float; +-Inf fail the same bounds.
        (~((largest <= F.lit(_FLOAT_MAX).cast("float")) & (smallest >= -F.lit(_FLOAT_MAX).cast("float"))),
         RejectReason.NON_FINITE),
        ((largest == 0) & (smallest == 0), RejectReason.ZERO_VECTOR),
        ((F.greatest(largest, -smallest) < F.lit(low).cast("float"))
         | (F.greatest(largest, -smallest) > F.lit(high).cast("float")), RejectReason.NORM_OUT_OF_RANGE),
    ]
    reason = F.when(checks[0][0], F.lit(checks[0][1]))
    for condition, name in checks[1:]:
        reason = reason.when(condition, F.lit(name))
    return reason.otherwise(F.lit(None).cast("string"))


def row_reason_codes(item_ids: pa.Array, embeddings: pa.Array, dim: int) -> np.ndarray:
    """:func:`reject_reason` on one Arrow batch, with NumPy: int8 (N,), an index into
    :attr:`RejectReason.ALL` per row, -1 for a clean row.

    The encode UDF checks its rows with this instead of the SQL column: the UDF has the embeddings as
    a NumPy view anyway, and two reductions per row there cost far less than the engine's array
    functions (1M x 768 on Sail: 2.5 s of a 17 s encode pass). Same checks, same order, same float32
    semantics (doubles beyond the float range count as Inf); tests hold the two to the same cases.

    Args:
        item_ids: the id column (any type; only nulls matter).
        embeddings: ``list``/``large_list``/``fixed_size_list`` of floats (ChunkedArray allowed).
        dim: the expected length D.
    """
    if isinstance(embeddings, pa.ChunkedArray):
        embeddings = embeddings.combine_chunks()
    n = len(embeddings)
    codes = np.full(n, -1, dtype=np.int8)
    values = embeddings.values
    if pa.types.is_fixed_size_list(embeddings.type):
        size = embeddings.type.list_size
        starts = (np.arange(n, dtype=np.int64) + embeddings.offset) * size
        lengths = np.full(n, size, dtype=np.int64)
    else:
        offsets = embeddings.offsets.to_numpy().astype(np.int64)  # respects the slice: N + 1 entries
        starts, lengths = offsets[:-1], np.diff(offsets)
    bad = [embeddings.is_null().to_numpy(zero_copy_only=False), lengths != dim]
    if values.null_count:  # nulls per row from a running count over the child's validity
        running = np.concatenate(([0], np.cumsum(values.is_null().to_numpy(zero_copy_only=False))))
        bad.append(running[starts + lengths] - running[starts] > 0)
    else:
        bad.append(np.zeros(n, dtype=bool))
    checked = ~(bad[0] | bad[1] | bad[2])  # every such row has D values, none null
    non_finite, zero, out_of_range = (np.zeros(n, dtype=bool) for _ in range(3))
    if checked.any():
        largest, smallest = _row_extremes(values, starts, checked, dim, uniform=bool(checked.all()))
        non_finite[checked] = ~((largest <= _F32_MAX) & (smallest >= -_F32_MAX))  # NaN fails both bounds
        zero[checked] = (largest == 0) & (smallest == 0)
        low, high = (np.float32(b) for b in magnitude_limits(dim))
        magnitude = np.maximum(largest, -smallest)
        out_of_range[checked] = (magnitude < low) | (magnitude > high)
    by_reason = {RejectReason.NULL_ID: item_ids.is_null().to_numpy(zero_copy_only=False),
                 RejectReason.NULL_EMBEDDING: bad[0], RejectReason.WRONG_LENGTH: bad[1],
                 RejectReason.NULL_ELEMENT: bad[2], RejectReason.NON_FINITE: non_finite,
                 RejectReason.ZERO_VECTOR: zero, RejectReason.NORM_OUT_OF_RANGE: out_of_range}
    for index in reversed(range(len(RejectReason.ALL))):  # the first reason in order wins
        mask = by_reason.get(RejectReason.ALL[index])
        if mask is not None:
            codes[mask] = index
    return codes


_F32_MAX = np.float32(np.finfo(np.float32).max)


def _row_extremes(values: pa.Array, starts: np.ndarray, rows: np.ndarray, dim: int,
                  uniform: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per-row max and min (float32, NaN propagates) of the selected ``rows``, each D values long."""
    flat = values.to_numpy(zero_copy_only=False)
    with np.errstate(over="ignore"):  # doubles beyond the float range become +-Inf, as the SQL cast does
        flat = flat.astype(np.float32, copy=False)
    if uniform:  # every row checked: the rows are one contiguous block
        block = flat[starts[0]:starts[0] + len(starts) * dim].reshape(len(starts), dim)  # (N, D) view
        return block.max(axis=1), block.min(axis=1)
    # Some rows are not checked: reduce over [start, start + D) of each checked row. reduceat reduces
    # between consecutive indices, so every other result is a row (the ones between are gaps).
    first = starts[rows]
    bounds = np.column_stack([first, first + dim]).ravel()
    if bounds[-1] == len(flat):  # reduceat needs every index inside the array
        flat = np.append(flat, np.float32(0))
    return np.maximum.reduceat(flat, bounds)[::2], np.minimum.reduceat(flat, bounds)[::2]


INFER_DIM_ROWS = 10_000


def infer_dim(rows: DataFrame, input_name: str = EMBEDDING, sample_rows: int = INFER_DIM_ROWS) -> int:
    """The most common length among the first ``sample_rows`` non-null ``embedding`` arrays (ties: the
    shorter length).

    A sample, not a full pass: reading every embedding only to learn D costs as much as validating
    them (6 s of a 49 s job at 1M x 768). Rows of any other length are still rejected by validation,
    so a wrong guess loses nothing silently; pass ``--embedding-dim`` to state D outright.

    Raises:
        NoValidRowsError: the catalog is empty, or no row has a non-null embedding to infer from.
    """
    # Collected, not aggregated by the engine: classic Spark runs a limit followed by an aggregation as a
    # local limit in every file's task (30 tasks reading 10k rows each, 14 s at 1M x 768), while a collected
    # limit reads partitions incrementally until it has enough rows (under 1 s).
    lengths = Counter(int(r["length"]) for r in (
        rows.where(F.col(EMBEDDING).isNotNull()).select(F.size(EMBEDDING).alias("length")).limit(sample_rows).collect()))
    if lengths:
        return most_common_length(lengths)
    empty = rows.limit(1).count() == 0
    raise NoValidRowsError(
        "the catalog has no rows: nothing to tokenize. Check --input (and that the table was written)"
        if empty else f"column {input_name!r} has no non-null values in the first {sample_rows} rows, so no "
        "row can be tokenized: check --embedding-col (or pass --embedding-dim to have every such row rejected "
        "with a reason)")


def most_common_length(lengths: Mapping[int, int]) -> int:
    """The length with the highest count in ``lengths`` (length -> rows); ties: the shorter. D's rule, for a
    sample counted by the engine (:func:`infer_dim`) or read from the files (pipelines/io.embedding_lengths)."""
    return min(lengths, key=lambda n: (-lengths[n], n))


def check_input_schema(df: DataFrame, columns: InputColumns) -> None:
    """Raise :class:`SchemaError` naming the column and the flag when the catalog does not fit.

    Expects ``columns.item_id`` STRING or integer, ``columns.embedding`` ARRAY<FLOAT|DOUBLE> and,
    when set, ``columns.category`` ARRAY<STRING>.
    """
    fields = {f.name: f.dataType for f in df.schema.fields}
    expected = [
        (columns.item_id, "--id-col", "STRING or BIGINT", _is_id_type),
        (columns.embedding, "--embedding-col", "ARRAY<FLOAT> or ARRAY<DOUBLE>", _is_float_array),
        (columns.category, "--category-col", "ARRAY<STRING>", _is_string_array),
    ]
    for name, flag, wanted, type_ok in expected:
        if not name:
            continue
        if name not in fields:
            raise SchemaError(
                f"column {name!r} not found in the catalog (columns: {', '.join(fields)}); "
                f"name the right column with {flag}"
            )
        if not type_ok(fields[name]):
            raise SchemaError(
                f"column {name!r} has type {fields[name].simpleString()}, expected {wanted}; "
                f"convert it or name another column with {flag}"
            )


def _is_id_type(t: T.DataType) -> bool:
    return isinstance(t, T.StringType | T.LongType | T.IntegerType | T.ShortType | T.ByteType)


def _is_float_array(t: T.DataType) -> bool:
    return isinstance(t, T.ArrayType) and isinstance(t.elementType, T.FloatType | T.DoubleType)


def _is_string_array(t: T.DataType) -> bool:
    return isinstance(t, T.ArrayType) and isinstance(t.elementType, T.StringType)


@dataclass(frozen=True)
class ValidationCounts:
    """Row counts of a validated catalog: ``clean`` + sum(``rejected``) = input rows."""

    clean: int
    rejected: dict[str, int]

    @property
    def n_rejected(self) -> int:
        return sum(self.rejected.values())


def validation_counts(result: ValidationResult) -> ValidationCounts:
    """Clean and per-reason reject counts in ONE aggregation over the validated rows (not two)."""
    return count_reasons(result.flagged)


def count_reasons(df: DataFrame) -> ValidationCounts:
    """Rows of ``df`` per REASON (null = clean) in one aggregation: ``validate_catalog(...).flagged``, or
    the encode stage's output after :func:`flag_duplicates` (without it, duplicates count as clean)."""
    counts, clean = dict.fromkeys(RejectReason.ALL, 0), 0
    for row in df.groupBy(REASON).count().collect():
        if row[REASON] is None:
            clean = int(row["count"])
        else:
            counts[row[REASON]] = int(row["count"])
    return ValidationCounts(clean, counts)


def check_reject_share(n_rejected: int, n_input: int, max_share: float) -> None:
    """Fail the run when more than ``max_share`` of the input rows were rejected.

    Raises:
        TooManyRejectsError: ``n_rejected / n_input > max_share``; the message has the counts.
    """
    if not 0.0 <= max_share <= 1.0:
        raise ValueError(f"--max-reject-share must be between 0 and 1, got {max_share}")
    share = n_rejected / n_input if n_input else 0.0
    if share > max_share:
        raise TooManyRejectsError(
            f"{n_rejected} of {n_input} input rows ({share:.2%}) were rejected, more than "
            f"--max-reject-share {max_share} ({max_share:.2%}) allows: fix the input, or raise "
            "--max-reject-share to accept them."
        )


class RowAccountingError(RuntimeError):
    """Input rows != valid + rejected rows, or two counts of one run disagree: nothing is written."""


class NoValidRowsError(ValueError):
    """Every input row was rejected: there is nothing to tokenize."""


def check_counts(n_input: int, counts: ValidationCounts, max_reject_share: float,
                 earlier: tuple[int, ValidationCounts] | None = None) -> None:
    """The checks every run makes on its counts before anything is written.

    Args:
        n_input: rows of the catalog.
        counts: clean rows and rejected rows per reason.
        max_reject_share: ``--max-reject-share``.
        earlier: (input rows, counts) of an earlier count in the same run (training runs count before
            sampling and again in the encode pass); the two must agree.

    Raises:
        RowAccountingError: the counts disagree with each other or do not add up to the input rows.
        TooManyRejectsError: more than ``max_reject_share`` of the rows were rejected.
        NoValidRowsError: no row is valid.
    """
    if earlier is not None:
        before_input, before = earlier
        if (before_input, before.clean, before.rejected) != (n_input, counts.clean, counts.rejected):
            raise RowAccountingError(
                f"the validation pass and the encode pass counted differently: {before_input} rows in, "
                f"{before.clean} valid, rejected {nonzero(before.rejected)} when validated; {n_input} in, "
                f"{counts.clean} valid, rejected {nonzero(counts.rejected)} when encoded. Nothing was written. "
                "Either the catalog changed during the run (run again on a stable snapshot, e.g. a Delta "
                "version) or the engine's and the encode UDF's checks disagree on some rows (a bug: report it "
                "with rows of the differing reasons).")
        return
    if n_input != counts.clean + counts.n_rejected:
        raise RowAccountingError(f"row accounting failed: {n_input} input rows != {counts.clean} valid + "
                                 f"{counts.n_rejected} rejected")
    check_reject_share(counts.n_rejected, n_input, max_reject_share)
    if counts.clean == 0:
        raise NoValidRowsError("no valid rows to tokenize; see the rejects counts above")


def nonzero(reasons: dict[str, int]) -> dict[str, int]:
    """The reasons with at least one row."""
    return {k: c for k, c in reasons.items() if c}


def stamp_rejects(rejects: DataFrame, run_id: str, now: Any, n_rejected: int | None = None) -> DataFrame:
    """The rejects table of a run: ``item_id``, ``reason``, ``mlflow_run_id`` and ``rejected_at`` (``now``,
    an aware datetime: Spark stores the UTC instant). ``n_rejected`` 0 (known from the counts) writes
    the empty table without scanning for rejects again."""
    if n_rejected == 0:
        rejects = rejects.limit(0)
    return rejects.withColumn(MLFLOW_RUN_ID, F.lit(run_id)).withColumn(REJECTED_AT, F.lit(now).cast("timestamp"))
