"""Encode stage: a ``mapInArrow`` UDF that turns embeddings into codes, one model per worker process.

The checkpoint travels inside the UDF closure as bytes; each Python worker builds the model once
(cached by the checkpoint's digest) and reuses it for every Arrow batch it is given. Embeddings go
Arrow -> NumPy through :func:`pipelines.arrow_utils.embeddings_to_numpy`, with no per-row objects.

The stage can take the validated catalog *with* its reject reasons (``validate_catalog(...).flagged``):
rows with a reason pass through uncoded, so one scan of the embeddings yields the codes, the rejects
and every count (the job materialises that small output once; see ``jobs/runner.py``).
"""
from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from pyspark.sql import DataFrame

from pipelines.arrow_utils import embeddings_to_numpy, matrix_to_list_array
from pipelines.schema import CODES, EMBEDDING, ITEM_ID, QUANTIZATION_ERROR, REASON
from pipelines.uniquify import require_columns

_MODELS: dict[str, Any] = {}  # per worker process: checkpoint digest -> model (built once)


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


def make_encoder(checkpoint: bytes, dim: int, *, batch_size: int = 65536, device: str = "cpu",
                 threads: int | None = None) -> Callable[[Iterator[pa.RecordBatch]], Iterator[pa.RecordBatch]]:
    """The function given to ``mapInArrow``: batches of (item_id, embedding[, reason]) -> (item_id, codes,
    error[, reason]). Rows with a non-null ``reason`` are not encoded: their codes and error are null."""
    digest = hashlib.sha256(checkpoint).hexdigest()

    def encode_batches(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        from rqvae.encode import encode_array

        model = model_for(checkpoint, digest, device, threads)

        def encoded(batch: pa.RecordBatch) -> list[pa.Array]:
            result = encode_array(model, embeddings_to_numpy(batch.column(EMBEDDING), dim), batch_size=batch_size)
            return [batch.column(ITEM_ID), matrix_to_list_array(result.codes), pa.array(result.quantization_error)]

        for batch in batches:
            if REASON not in batch.schema.names:
                yield pa.RecordBatch.from_arrays(encoded(batch), names=[ITEM_ID, CODES, QUANTIZATION_ERROR])
                continue
            reasons = batch.column(REASON)
            if reasons.null_count < len(reasons):  # rejects in this batch: they pass through uncoded
                flagged = batch.filter(pc.is_valid(reasons))
                n = flagged.num_rows
                yield pa.RecordBatch.from_arrays(
                    [flagged.column(ITEM_ID), pa.nulls(n, pa.list_(pa.int32())), pa.nulls(n, pa.float32()),
                     flagged.column(REASON)], names=_WITH_REASON)
                batch = batch.filter(pc.is_null(reasons))
            if batch.num_rows:
                yield pa.RecordBatch.from_arrays([*encoded(batch), batch.column(REASON)], names=_WITH_REASON)

    return encode_batches


_WITH_REASON = [ITEM_ID, CODES, QUANTIZATION_ERROR, REASON]


def encode_embeddings(df: DataFrame, checkpoint: bytes, dim: int, *, batch_size: int = 65536,
                      device: str = "cpu", threads: int | None = None) -> DataFrame:
    """Codes for every row of a validated catalog.

    Args:
        df: columns ITEM_ID (STRING or BIGINT) and EMBEDDING (ARRAY<FLOAT>, length ``dim``), as
            produced by :func:`pipelines.validate.validate_catalog` (``clean``). When ``df`` also has
            REASON (``validate_catalog(...).flagged``), rows with a reason are passed through with
            null codes, so rejects and codes come out of one scan.
        checkpoint: model checkpoint bytes (:func:`rqvae.checkpoint_bytes`).
        dim: embedding length D.
        batch_size: rows per model call inside each Arrow batch.
        device: torch device on the workers ("cpu", or "cuda" on GPU executors).
        threads: torch threads per worker process (None = torch's default).

    Returns:
        DataFrame with ITEM_ID, CODES ARRAY<INT>, QUANTIZATION_ERROR FLOAT (and REASON STRING when
        ``df`` has it).
    """
    require_columns(df, [ITEM_ID, EMBEDDING], "encode_embeddings")
    id_type = df.schema[ITEM_ID].dataType.simpleString()
    columns = [ITEM_ID, EMBEDDING] + ([REASON] if REASON in df.columns else [])
    schema = f"{ITEM_ID} {id_type}, {CODES} array<int>, {QUANTIZATION_ERROR} float"
    if REASON in df.columns:
        schema += f", {REASON} string"
    encoder = make_encoder(checkpoint, dim, batch_size=batch_size, device=device, threads=threads)
    return df.select(*columns).mapInArrow(encoder, schema)
