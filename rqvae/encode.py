"""Batch encoding of NumPy arrays in bounded-memory chunks."""
from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NamedTuple, Protocol

import numpy as np
import torch

from rqvae.model import Quantized


class Tokenizer(Protocol):
    """What encoding needs from a model: RQVAE and RQKMeans both provide it."""

    @property
    def num_levels(self) -> int: ...

    @property
    def codebook_size(self) -> int: ...

    def quantize(self, x: torch.Tensor) -> Quantized: ...

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor: ...

    def parameters(self):  # type: ignore[no-untyped-def]  # noqa: ANN201 - torch's own signature
        ...


class EncodeResult(NamedTuple):
    """codes: int32 (N, L); quantization_error: float32 (N,)."""

    codes: np.ndarray
    quantization_error: np.ndarray


def model_device(model: Tokenizer) -> torch.device:
    """Device of the model's first parameter or buffer (CPU for a parameter-less model)."""
    for tensor in list(model.parameters()) + list(getattr(model, "buffers", list)()):
        return tensor.device
    return torch.device("cpu")


@contextmanager
def _eval_mode(model: Tokenizer) -> Iterator[None]:
    """Eval mode for the block; the caller's train/eval mode is restored afterwards, even on error."""
    was_training = getattr(model, "training", False)
    model.eval()  # type: ignore[attr-defined]
    try:
        yield
    finally:
        model.train(was_training)  # type: ignore[attr-defined]


def _to_tensor(x: np.ndarray) -> torch.Tensor:
    """Zero-copy tensor view of a (possibly read-only, e.g. Arrow-backed) array; it is only read."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(x)


def _as_float32(x: np.ndarray) -> np.ndarray:
    if x.ndim != 2:
        raise ValueError(f"expected a 2-D array (N, D) of embeddings, got shape {x.shape}")
    return np.ascontiguousarray(x, dtype=np.float32)


CPU_BATCH_SIZE = 2048  # rows per model call on CPU: the activations stay in cache
ACCELERATOR_BATCH_SIZE = 65536  # on a GPU, fewer and larger calls


def default_batch_size(device: torch.device | str) -> int:
    """Rows per model call when the caller does not say: small on CPU, large on an accelerator.

    On CPU, small batches are faster: a (B, 512) activation of 2048 rows stays in cache, one of 65536
    rows (128 MB) does not. Default model shape at D = 768, 2 threads (bench/RESULTS.md): on the whole
    1M-item bench catalog 2048 rows give 139.6k items/s and 65536 rows 74.9k (1.8x); on 300k of its
    items 2048 -> 120k, 8192 -> 108k, 65536 -> 80k. The codes are the same for every batch size.
    """
    return CPU_BATCH_SIZE if torch.device(device).type == "cpu" else ACCELERATOR_BATCH_SIZE


def encode_array(model: Tokenizer, x: np.ndarray, *, batch_size: int | None = None) -> EncodeResult:
    """Codes and quantization errors for x (N, D), ``batch_size`` rows at a time.

    Memory beyond the output is bounded by one batch whatever N is. Runs on the model's device;
    ``batch_size`` None takes :func:`default_batch_size` for it.
    """
    x = _as_float32(x)
    device = model_device(model)
    batch_size = batch_size or default_batch_size(device)
    codes = np.empty((len(x), model.num_levels), dtype=np.int32)
    errors = np.empty(len(x), dtype=np.float32)
    with _eval_mode(model), torch.inference_mode():
        for start in range(0, len(x), batch_size):
            batch = _to_tensor(x[start:start + batch_size]).to(device, non_blocking=True)
            q = model.quantize(batch)
            codes[start:start + len(batch)] = q.codes.to(torch.int32).cpu().numpy()
            errors[start:start + len(batch)] = q.error.float().cpu().numpy()
    return EncodeResult(codes, errors)


def reconstruct_array(model: Tokenizer, x: np.ndarray, *, batch_size: int | None = None) -> np.ndarray:
    """Decoder output (N, D) float32 for x (N, D): x -> codes -> reconstruction."""
    x = _as_float32(x)
    device = model_device(model)
    batch_size = batch_size or default_batch_size(device)
    out = np.empty_like(x)
    with _eval_mode(model), torch.inference_mode():
        for start in range(0, len(x), batch_size):
            batch = _to_tensor(x[start:start + batch_size]).to(device)
            out[start:start + len(batch)] = model.decode_codes(model.quantize(batch).codes).float().cpu().numpy()
    return out
