"""The per-row part of the encode UDF's pass: a row group's (item_id, embedding) rows read, checked and
fingerprinted.

A fingerprint-cache entry holds exactly :func:`entry_rows` of each batch this module read
(:func:`open_file`, :func:`read_row_group`) and checked (:func:`check_batch`: validation's per-row rules,
:func:`pipelines.validate.row_reason_codes`, and the fingerprint, :func:`pipelines.arrow_utils.row_fingerprints`):
each row's id (as read and cast), reject reason and embedding fingerprint. So the cache's key covers the source
of this module and of those it calls (:data:`pipelines.fingerprint_cache.RULES`), not of
:mod:`pipelines.encode`, which runs the model on the clean rows and hands :func:`entry_rows` to the cache
unchanged: an upgrade that changes how rows are encoded, batched or handed to the engine keeps every entry, and
one that changes how a row is read, checked or fingerprinted makes every entry unused.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from pipelines.arrow_utils import embeddings_to_numpy, row_fingerprints
from pipelines.schema import EMBEDDING, EMBEDDING_FINGERPRINT, ITEM_ID, REASON, RejectReason
from pipelines.validate import row_reason_codes

REASON_NAMES = np.array(RejectReason.ALL, dtype=object)


def open_file(file: str) -> Any:
    """``file`` opened with pyarrow (``pq.ParquetFile``: its footer read once)."""
    import pyarrow.parquet as pq

    return pq.ParquetFile(file)


def read_row_group(parquet: Any, group: int, id_column: str, embedding_column: str, id_type: pa.DataType,
                   batch_rows: int) -> Iterator[pa.RecordBatch]:
    """The (ITEM_ID, EMBEDDING) batches of one whole row group of an opened Parquet file (``pq.ParquetFile``),
    ``batch_rows`` rows each (the last: what is left), the id cast to ``id_type``."""
    # One thread: the engine already runs one task per core.
    for batch in parquet.iter_batches(batch_size=batch_rows, row_groups=[group],
                                      columns=[id_column, embedding_column], use_threads=False):
        yield pa.RecordBatch.from_arrays([batch.column(id_column).cast(id_type), batch.column(embedding_column)],
                                         names=[ITEM_ID, EMBEDDING])


@dataclass(frozen=True)
class CheckedBatch:
    """One batch's rows after the per-row rules.

    Attributes:
        rejected: the rows with a reason as ITEM_ID, REASON (the reason's name) and EMBEDDING_FINGERPRINT (null:
            a rejected row has none), or None when there are none.
        clean: the rows without a reason (ITEM_ID, EMBEDDING), in the batch's order; their REASON is null.
        x: the clean rows' embeddings, float32 (n, D); None when there are none.
        fingerprints: the clean rows' embedding fingerprints (int64), when asked for and there are any.
    """

    rejected: pa.RecordBatch | None
    clean: pa.RecordBatch
    x: np.ndarray | None
    fingerprints: pa.Array | None


def entry_rows(checked: CheckedBatch) -> pa.RecordBatch:
    """The rows a fingerprint-cache entry keeps for one checked batch: ITEM_ID, REASON and EMBEDDING_FINGERPRINT of
    the rejected rows, then of the clean rows (null reason; the batch must have been checked with
    ``fingerprints``)."""
    clean = checked.clean
    if checked.x is not None and checked.fingerprints is None:
        raise ValueError("entry_rows: the batch was checked without fingerprints")
    fps = checked.fingerprints if checked.fingerprints is not None else pa.nulls(clean.num_rows, pa.int64())
    rows = pa.RecordBatch.from_arrays([clean.column(ITEM_ID), pa.nulls(clean.num_rows, pa.string()), fps],
                                      names=[ITEM_ID, REASON, EMBEDDING_FINGERPRINT])
    if checked.rejected is None:
        return rows
    return pa.Table.from_batches([checked.rejected, rows]).combine_chunks().to_batches()[0]


def check_batch(batch: pa.RecordBatch, dim: int, fingerprints: bool) -> CheckedBatch:
    """Every row of ``batch`` (ITEM_ID, EMBEDDING) checked with validation's per-row rules (everything but
    repeated ids, which need the whole catalog) and, with ``fingerprints``, each clean row fingerprinted."""
    reasons = row_reason_codes(batch.column(ITEM_ID), batch.column(EMBEDDING), dim)
    bad = reasons >= 0
    rejected = None
    if bad.any():
        ids = batch.column(ITEM_ID).filter(pa.array(bad))  # the ids only: no copy of the embeddings
        rejected = pa.RecordBatch.from_arrays(
            [ids, pa.array(REASON_NAMES[reasons[bad]], pa.string()), pa.nulls(len(ids), pa.int64())],
            names=[ITEM_ID, REASON, EMBEDDING_FINGERPRINT])
        batch = batch.filter(pa.array(~bad))
    if not batch.num_rows:
        return CheckedBatch(rejected, batch, None, None)
    x = embeddings_to_numpy(batch.column(EMBEDDING), dim)  # (n, D)
    fps = pa.array(row_fingerprints(x), pa.int64()) if fingerprints else None
    return CheckedBatch(rejected, batch, x, fps)
