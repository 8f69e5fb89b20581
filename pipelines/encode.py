"""Encode stage: a ``mapInArrow`` UDF that turns embeddings into codes, one model per worker process.

The checkpoint travels inside the UDF closure as bytes; each Python worker builds the model once
(cached by the checkpoint's digest) and reuses it for every Arrow batch it is given. Embeddings go
Arrow -> NumPy through :func:`pipelines.arrow_utils.embeddings_to_numpy`, with no per-row objects.

The UDF checks every row with validation's per-row rules (:func:`pipelines.validate.row_reason_codes`)
before encoding it: rows with a reason pass through uncoded, so one scan of the embeddings yields the
codes, the rejects and every count (the job adds duplicate ids on the small output and materialises
it once; see ``jobs/runner.py``).
"""
from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pyarrow as pa
from pyspark.sql import DataFrame

from pipelines.arrow_utils import embeddings_to_numpy, matrix_to_list_array
from pipelines.schema import CODES, EMBEDDING, ITEM_ID, QUANTIZATION_ERROR, REASON, RejectReason
from pipelines.uniquify import require_columns
from pipelines.validate import row_reason_codes

_MODELS: dict[str, Any] = {}  # per worker process: checkpoint digest -> model (built once)
TASK_THREADS = 1  # torch threads per encode task: the engines run one task per core


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
                 threads: int | None = TASK_THREADS) -> Callable[[Iterator[pa.RecordBatch]], Iterator[pa.RecordBatch]]:
    """The function given to ``mapInArrow``: batches of (item_id, embedding) -> (item_id, codes, error, reason).

    Each row is checked first (:func:`pipelines.validate.row_reason_codes`); a row with a reason is not
    encoded: its codes and error are null. Clean rows get a null reason.
    """
    digest = hashlib.sha256(checkpoint).hexdigest()

    def encode_batches(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        from rqvae.encode import encode_array

        model = model_for(checkpoint, digest, device, threads)
        for batch in batches:
            reasons = row_reason_codes(batch.column(ITEM_ID), batch.column(EMBEDDING), dim)
            bad = reasons >= 0
            if bad.any():  # rejects in this batch: they pass through uncoded
                rejected = batch.filter(pa.array(bad))
                n = rejected.num_rows
                yield pa.RecordBatch.from_arrays(
                    [rejected.column(ITEM_ID), pa.nulls(n, pa.list_(pa.int32())), pa.nulls(n, pa.float32()),
                     pa.array(_REASON_NAMES[reasons[bad]], pa.string())], names=_OUTPUT)
                batch = batch.filter(pa.array(~bad))
            if batch.num_rows:
                result = encode_array(model, embeddings_to_numpy(batch.column(EMBEDDING), dim), batch_size=batch_size)
                yield pa.RecordBatch.from_arrays(
                    [batch.column(ITEM_ID), matrix_to_list_array(result.codes), pa.array(result.quantization_error),
                     pa.nulls(batch.num_rows, pa.string())], names=_OUTPUT)

    return encode_batches


_OUTPUT = [ITEM_ID, CODES, QUANTIZATION_ERROR, REASON]
_REASON_NAMES = np.array(RejectReason.ALL, dtype=object)


def encode_embeddings(df: DataFrame, checkpoint: bytes, dim: int, *, batch_size: int | None = None,
                      device: str = "cpu", threads: int | None = TASK_THREADS) -> DataFrame:
    """Codes for every row of a catalog, and the reject reason of every row that cannot be encoded.

    Args:
        df: columns ITEM_ID (STRING or BIGINT) and EMBEDDING (ARRAY<FLOAT>), e.g. the catalog's rows
            with contract names (:func:`pipelines.validate.select_contract_columns`, or
            ``validate_catalog(...).rows``). Rows are checked inside the UDF with the per-row rules of
            validation (everything but duplicate ids: :func:`pipelines.validate.flag_duplicates` adds
            those on the output), so one scan of the embeddings yields codes and rejects.
        checkpoint: model checkpoint bytes (:func:`rqvae.checkpoint_bytes`).
        dim: embedding length D.
        batch_size: rows per model call inside each Arrow batch (None: rqvae's default for the device).
        device: torch device on the workers ("cpu", or "cuda" on GPU executors).
        threads: torch threads per worker process (None = torch's default, one per core). The default,
            1, suits engines that run one task per core (Sail, ``local[*]``, executors with
            ``spark.task.cpus=1``): more threads per task only oversubscribe the cores (1M x 768 on Sail,
            2 cores: 16.2 s with torch's 2 threads per task, 14.7 s with 1).

    Returns:
        DataFrame with ITEM_ID, CODES ARRAY<INT>, QUANTIZATION_ERROR FLOAT and REASON STRING (null for
        an encoded row; codes and error are null for a rejected one).
    """
    require_columns(df, [ITEM_ID, EMBEDDING], "encode_embeddings")
    id_type = df.schema[ITEM_ID].dataType.simpleString()
    schema = f"{ITEM_ID} {id_type}, {CODES} array<int>, {QUANTIZATION_ERROR} float, {REASON} string"
    encoder = make_encoder(checkpoint, dim, batch_size=batch_size, device=device, threads=threads)
    return df.select(ITEM_ID, EMBEDDING).mapInArrow(encoder, schema)
