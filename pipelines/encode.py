"""Encode stage: a ``mapInArrow`` UDF that turns embeddings into codes, one model per worker process.

The checkpoint travels inside the UDF closure as bytes; each Python worker builds the model once
(cached by the checkpoint's digest) and reuses it for every Arrow batch it is given. Embeddings go
Arrow -> NumPy through :func:`pipelines.arrow_utils.embeddings_to_numpy`, with no per-row objects.

The UDF checks every row with validation's per-row rules (:func:`pipelines.validate.row_reason_codes`)
before encoding it: rows with a reason pass through uncoded, so one scan of the embeddings yields the
codes, the rejects and every count (:func:`encode_catalog` adds duplicate ids on the small output and
materialises it once). It can also fingerprint every clean row and, given the fingerprints of the
items a table already holds, encode only the rows that need new codes (an incremental run).
"""
from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from pipelines.arrow_utils import embeddings_to_numpy, matrix_to_list_array, row_fingerprints
from pipelines.schema import (
    CODES,
    EMBEDDING,
    EMBEDDING_FINGERPRINT,
    ITEM_ID,
    QUANTIZATION_ERROR,
    REASON,
    RejectReason,
)
from pipelines.uniquify import require_columns
from pipelines.validate import (
    ValidationCounts,
    ValidationResult,
    count_reasons,
    flag_duplicates,
    row_reason_codes,
    validation_counts,
)

_MODELS: dict[str, Any] = {}  # per worker process: checkpoint digest -> model (built once)
TASK_THREADS = 1  # torch threads per encode task: the engines run one task per core
KNOWN_FINGERPRINT = "__csid_known_fingerprint"  # input column: the fingerprint a table already holds

ENCODE_ALL, ENCODE_NEW, ENCODE_NEW_OR_CHANGED = "all", "new", "new_or_changed"
ENCODE_POLICIES = (ENCODE_ALL, ENCODE_NEW, ENCODE_NEW_OR_CHANGED)


def model_for(checkpoint: bytes, digest: str, device: str = "cpu", threads: int | None = None) -> Any:
    """The model for ``checkpoint``, built on first use in this process and cached afterwards."""
    model = _MODELS.get(digest)
    if model is None:
        import torch

        from rqvae.checkpoint import load_checkpoint

        if threads:
            torch.set_num_threads(threads)
        model = load_checkpoint(checkpoint, map_location=device).to(device).eval()
        _MODELS.clear()  # one model per worker: a new checkpoint replaces the old one
        _MODELS[digest] = model
    return model


def make_encoder(checkpoint: bytes, dim: int, *, batch_size: int | None = None, device: str = "cpu",
                 threads: int | None = TASK_THREADS, fingerprints: bool = False, policy: str = ENCODE_ALL,
                 ) -> Callable[[Iterator[pa.RecordBatch]], Iterator[pa.RecordBatch]]:
    """The function given to ``mapInArrow``: batches of (item_id, embedding[, known fingerprint]) ->
    (item_id, codes, error, reason[, embedding_fingerprint]).

    Each row is checked first (:func:`pipelines.validate.row_reason_codes`); a row with a reason is not
    encoded: its codes and error are null. Clean rows get a null reason. With ``fingerprints`` every
    clean row also gets its :func:`~pipelines.arrow_utils.row_fingerprints` value. ``policy`` says
    which clean rows are encoded: every one (``"all"``), or, reading the ``KNOWN_FINGERPRINT`` input
    column, only those without one (``"new"``) or also those whose fingerprint differs from it
    (``"new_or_changed"``); the others keep null codes. The policies other than "all" need
    ``fingerprints``.
    """
    if policy not in ENCODE_POLICIES:
        raise ValueError(f"unknown encode policy {policy!r}; choose one of {ENCODE_POLICIES}")
    if policy != ENCODE_ALL and not fingerprints:
        raise ValueError(f"encode policy {policy!r} compares fingerprints: pass fingerprints=True")
    digest = hashlib.sha256(checkpoint).hexdigest()
    names = _OUTPUT + ([EMBEDDING_FINGERPRINT] if fingerprints else [])

    def encode_batches(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        from rqvae.encode import encode_array

        model = model_for(checkpoint, digest, device, threads)
        for batch in batches:
            reasons = row_reason_codes(batch.column(ITEM_ID), batch.column(EMBEDDING), dim)
            bad = reasons >= 0
            if bad.any():  # rejects in this batch: they pass through uncoded
                rejected = batch.filter(pa.array(bad))
                n = rejected.num_rows
                extra = [pa.nulls(n, pa.int64())] if fingerprints else []
                yield pa.RecordBatch.from_arrays(
                    [rejected.column(ITEM_ID), pa.nulls(n, pa.list_(pa.int32())), pa.nulls(n, pa.float32()),
                     pa.array(_REASON_NAMES[reasons[bad]], pa.string()), *extra], names=names)
                batch = batch.filter(pa.array(~bad))
            if not batch.num_rows:
                continue
            x = embeddings_to_numpy(batch.column(EMBEDDING), dim)  # (n, D)
            fps = row_fingerprints(x) if fingerprints else None
            todo = _rows_to_encode(batch, fps, policy)  # (n,) bool, or None = every row
            columns = _encoded_columns(encode_array, model, x, todo, batch_size)
            extra = [pa.array(fps, pa.int64())] if fps is not None else []
            yield pa.RecordBatch.from_arrays(
                [batch.column(ITEM_ID), *columns, pa.nulls(batch.num_rows, pa.string()), *extra], names=names)

    return encode_batches


def _rows_to_encode(batch: pa.RecordBatch, fps: np.ndarray | None, policy: str) -> np.ndarray | None:
    """(n,) bool: the clean rows ``policy`` sends through the model; None when that is every row."""
    if policy == ENCODE_ALL:
        return None
    known = batch.column(KNOWN_FINGERPRINT)
    new = known.is_null().to_numpy(zero_copy_only=False)
    if policy == ENCODE_NEW:
        return new
    known_values = known.fill_null(0).to_numpy(zero_copy_only=False)
    return new | (known_values != fps)


def _encoded_columns(encode_array: Callable[..., Any], model: Any, x: np.ndarray, todo: np.ndarray | None,
                     batch_size: int | None) -> list[pa.Array]:
    """Codes (list<int>) and error (float) columns for the rows of x; null where ``todo`` is False."""
    if todo is None:
        result = encode_array(model, x, batch_size=batch_size)
        return [matrix_to_list_array(result.codes), pa.array(result.quantization_error)]
    n, picked = len(x), np.flatnonzero(todo)
    if picked.size == 0:
        return [pa.nulls(n, pa.list_(pa.int32())), pa.nulls(n, pa.float32())]
    result = encode_array(model, x[picked], batch_size=batch_size)
    # Scatter the encoded rows back: list i takes codes row rank[i]; rows not encoded are null.
    rank = np.cumsum(todo) - 1
    codes = matrix_to_list_array(result.codes).take(pa.array(np.where(todo, rank, 0)))
    missing = pa.array(~todo)
    errors = np.zeros(n, dtype=np.float32)
    errors[picked] = result.quantization_error
    return [pc.if_else(missing, pa.nulls(n, codes.type), codes),
            pa.array(errors, mask=~todo)]


_OUTPUT = [ITEM_ID, CODES, QUANTIZATION_ERROR, REASON]
_REASON_NAMES = np.array(RejectReason.ALL, dtype=object)


def encode_embeddings(df: DataFrame, checkpoint: bytes, dim: int, *, batch_size: int | None = None,
                      device: str = "cpu", threads: int | None = TASK_THREADS, fingerprints: bool = False,
                      policy: str = ENCODE_ALL) -> DataFrame:
    """Codes for every row of a catalog, and the reject reason of every row that cannot be encoded.

    Args:
        df: columns ITEM_ID (STRING or BIGINT) and EMBEDDING (ARRAY<FLOAT>), e.g. the catalog's rows
            with contract names (:func:`pipelines.validate.select_contract_columns`, or
            ``validate_catalog(...).rows``). Rows are checked inside the UDF with the per-row rules of
            validation (everything but duplicate ids: :func:`pipelines.validate.flag_duplicates` adds
            those on the output), so one scan of the embeddings yields codes and rejects. With a
            ``policy`` other than "all", also ``KNOWN_FINGERPRINT`` BIGINT (null for an item the
            table does not hold).
        checkpoint: model checkpoint bytes (:func:`rqvae.checkpoint_bytes`).
        dim: embedding length D.
        batch_size: rows per model call inside each Arrow batch (None: rqvae's default for the device).
        device: torch device on the workers ("cpu", or "cuda" on GPU executors).
        threads: torch threads per worker process (None = torch's default, one per core). The default,
            1, suits engines that run one task per core (Sail, ``local[*]``, executors with
            ``spark.task.cpus=1``): more threads per task only oversubscribe the cores (1M x 768 on Sail,
            2 cores: 16.2 s with torch's 2 threads per task, 14.7 s with 1).
        fingerprints: add EMBEDDING_FINGERPRINT BIGINT (xxh3-64 of the row's float32 values) to every
            clean row.
        policy: which clean rows are encoded ("all", "new", "new_or_changed"; see :func:`make_encoder`).

    Returns:
        DataFrame with ITEM_ID, CODES ARRAY<INT>, QUANTIZATION_ERROR FLOAT and REASON STRING (null for
        a clean row; codes and error are null for a rejected one, and for a clean one the policy
        skipped), then EMBEDDING_FINGERPRINT BIGINT when asked for.
    """
    needed = [ITEM_ID, EMBEDDING] + ([KNOWN_FINGERPRINT] if policy != ENCODE_ALL else [])
    require_columns(df, needed, "encode_embeddings")
    id_type = df.schema[ITEM_ID].dataType.simpleString()
    schema = f"{ITEM_ID} {id_type}, {CODES} array<int>, {QUANTIZATION_ERROR} float, {REASON} string"
    if fingerprints:
        schema += f", {EMBEDDING_FINGERPRINT} bigint"
    encoder = make_encoder(checkpoint, dim, batch_size=batch_size, device=device, threads=threads,
                           fingerprints=fingerprints, policy=policy)
    return df.select(*needed).mapInArrow(encoder, schema)


@dataclass(frozen=True)
class Encoded:
    """What :func:`encode_catalog` gives: the clean rows' codes, the rejects and the counts.

    Attributes:
        codes: one row per clean catalog row: ITEM_ID, CODES ARRAY<INT> and QUANTIZATION_ERROR FLOAT
            (both null for a row the policy did not encode), EMBEDDING_FINGERPRINT BIGINT.
        rejects: ITEM_ID and REASON of every rejected row.
        counts: clean rows and rejected rows per reason (computed, not lazy).
        encoded_rows: rows that went through the model (None when the engine could not materialise
            the pass, so counting them would run it again).
    """

    codes: DataFrame
    rejects: DataFrame
    counts: ValidationCounts
    encoded_rows: int | None = None


def encode_catalog(v: ValidationResult, checkpoint: bytes, *, materialize: Callable[[DataFrame], DataFrame | None],
                   known: DataFrame | None = None, policy: str = ENCODE_ALL, batch_size: int | None = None,
                   device: str = "cpu", threads: int | None = TASK_THREADS) -> Encoded:
    """Encode a validated catalog in one scan of its embeddings: codes, fingerprints, rejects and counts.

    The UDF checks every row (rejects pass through uncoded), duplicate ids are flagged on its small
    output (ids, codes, reasons: ~30 bytes per item) against the catalog's id column, and that output
    is materialised once; counts, rejects and codes all come from it. When ``materialize`` cannot
    (returns None), the counts come from validation's SQL pass and the clean rows are encoded after it.

    Args:
        v: :func:`pipelines.validate.validate_catalog` of the catalog.
        checkpoint: model checkpoint bytes.
        materialize: computes a frame once and returns it (``EngineSession.materialize``), or None.
        known: ITEM_ID and EMBEDDING_FINGERPRINT of the items a table already holds (one row per id),
            needed by the policies other than "all"; broadcast to the scan, so the embeddings are
            never shuffled.
        policy: which clean rows are encoded (see :func:`make_encoder`).
        batch_size, device, threads: as for :func:`encode_embeddings`.
    """
    def encode(df: DataFrame) -> DataFrame:
        if policy != ENCODE_ALL:
            if known is None:
                raise ValueError(f"encode policy {policy!r} needs the known fingerprints (known=...)")
            fps = known.select(ITEM_ID, F.col(EMBEDDING_FINGERPRINT).alias(KNOWN_FINGERPRINT))
            df = df.join(F.broadcast(fps), ITEM_ID, "left")
        return encode_embeddings(df, checkpoint, v.dim, batch_size=batch_size, device=device, threads=threads,
                                 fingerprints=True, policy=policy)

    # Rows of a duplicated id were encoded before being flagged; their codes are dropped with the REASON filters.
    staged = materialize(flag_duplicates(encode(v.rows), ids=v.rows))
    if staged is not None:
        codes = staged.where(F.col(REASON).isNull()).drop(REASON)
        rejects = staged.where(F.col(REASON).isNotNull()).select(ITEM_ID, REASON)
        return Encoded(codes, rejects, count_reasons(staged), codes.where(F.col(CODES).isNotNull()).count())
    counts = validation_counts(v)
    return Encoded(encode(v.clean).drop(REASON), v.rejects, counts)


@dataclass(frozen=True)
class TokenizerModel:
    """The model a run encodes with: its registered name and version (alias resolved once), the
    checkpoint bytes the UDF rebuilds it from, and its shape."""

    name: str
    version: str
    checkpoint: bytes
    num_levels: int
    codebook_size: int
    input_dim: int
