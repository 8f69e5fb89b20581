"""Batch encoding of NumPy arrays in bounded-memory chunks."""
from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NamedTuple, Protocol

import numpy as np
import torch

from rqvae.model import Quantized
from rqvae.resolve import Spread, not_keepers, spread_again, spread_last_level


class Tokenizer(Protocol):
    """What encoding needs from a model: RQVAE and RQKMeans both provide it."""

    @property
    def num_levels(self) -> int: ...

    @property
    def codebook_size(self) -> int: ...

    def quantize(self, x: torch.Tensor, alternatives: int = 0) -> Quantized: ...

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor: ...

    def parameters(self):  # type: ignore[no-untyped-def]  # noqa: ANN201 - torch's own signature
        ...


class EncodeResult(NamedTuple):
    """codes: int32 (N, L); quantization_error: float32 (N,); with ``alternatives=k`` also the k best
    last-level codes, int32 (N, k) nearest first, and their errors, float32 (N, k)."""

    codes: np.ndarray
    quantization_error: np.ndarray
    alternatives: np.ndarray | None = None
    alternative_errors: np.ndarray | None = None


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
ACCELERATOR_BATCH_SIZE = 8192  # on a GPU: one engine Arrow batch (Sail hands over 8,192 rows) per call


def default_batch_size(device: torch.device | str) -> int:
    """Rows per model call when the caller does not say: 2048 on CPU, 8192 on an accelerator.

    On CPU, small batches are faster: a (B, 512) activation of 2048 rows stays in cache, one of 65536
    rows (128 MB) does not. Default model shape at D = 768, 2 threads (bench/RESULTS.md): on the whole
    1M-item bench catalog 2048 rows give 139.6k items/s and 65536 rows 74.9k (1.8x); on 300k of its
    items 2048 -> 120k, 8192 -> 108k, 65536 -> 80k. The codes are the same for every batch size.
    On an accelerator 8192 rows is one engine batch, so the UDF's calls are not padded (a call is
    always exactly the batch size, see :func:`_fixed_shape_batches`). On an H200 (D = 1,024, codes only,
    from host arrays) 8192 rows gave 1.05M items/s and 65536 rows 1.40M (bench/RESULTS.md).
    """
    return CPU_BATCH_SIZE if torch.device(device).type == "cpu" else ACCELERATOR_BATCH_SIZE


def _fixed_shape_batches(x: np.ndarray, batch_size: int,
                         device: torch.device) -> Iterator[tuple[int, int, torch.Tensor]]:
    """(start, rows, block) for x in model calls of exactly ``batch_size`` rows on ``device``: a short
    last block (or an x shorter than one batch) is zero-padded there to full size, and only the
    first ``rows`` of its output are real.

    Why a fixed shape: BLAS picks its kernel (and so its summation order) by the call's row count,
    so one item's float32 outputs can differ in the last bit between calls of different sizes (MKL
    on CPU, bench model at D = 768, errors against 4,096-row calls: 87% of items differ with 1-row
    calls, up to 12 of 4,096 with many sizes from 18 to 4,095 rows, e.g. 511). Calls of one shape
    gave the same bits for every row at every offset tried. So with every call the same shape an
    item's codes and quantization error depend on its own embedding only, not on how the engine
    split the catalog into batches, and the suffix order (sorted by the error) is reproducible
    across runs, engines and partitionings.

    That holds for one model, batch size, device, BLAS and torch thread count, and on CPU only with
    1 thread (the encode UDF's default) or a power of two: with 3, 5 or 6 threads torch splits the
    element-wise ops into chunks that end mid-vector, so a row's bits depend on its position in the
    call again (bench model, 6,000 rows shifted by 1-1,000: 4-12 errors differ; 0 with 1, 2 or 4).
    """
    for start in range(0, len(x), batch_size):
        block = _to_tensor(x[start:start + batch_size]).to(device, non_blocking=True)
        rows = len(block)
        if rows < batch_size:
            block = torch.cat([block, block.new_zeros((batch_size - rows, block.shape[1]))])
        yield start, rows, block


def encode_array(model: Tokenizer, x: np.ndarray, *, batch_size: int | None = None,
                 alternatives: int = 0) -> EncodeResult:
    """Codes and quantization errors for x (N, D), in model calls of exactly ``batch_size`` rows.

    Memory beyond the output is bounded by one batch whatever N is. Runs on the model's device;
    ``batch_size`` None takes :func:`default_batch_size` for it. Each row's result depends on that
    row alone (within the limits in :func:`_fixed_shape_batches`: same batch size and device, 1 or
    a power-of-two torch threads), so any split of a catalog gives the same codes and errors.
    ``alternatives`` > 0 adds the ranked last-level codes that :func:`rqvae.resolve.spread_last_level`
    chooses from.
    """
    x = _as_float32(x)
    device = model_device(model)
    batch_size = batch_size or default_batch_size(device)
    codes = np.empty((len(x), model.num_levels), dtype=np.int32)
    errors = np.empty(len(x), dtype=np.float32)
    k = min(max(0, alternatives), model.codebook_size)
    alt = np.empty((len(x), k), dtype=np.int32) if k else None
    alt_errors = np.empty((len(x), k), dtype=np.float32) if k else None
    with _eval_mode(model), torch.inference_mode():
        for start, rows, block in _fixed_shape_batches(x, batch_size, device):
            q = model.quantize(block, alternatives=k) if k else model.quantize(block)
            codes[start:start + rows] = q.codes[:rows].to(torch.int32).cpu().numpy()
            errors[start:start + rows] = q.error[:rows].float().cpu().numpy()
            if (alt is not None and alt_errors is not None and q.alternatives is not None
                    and q.alternative_errors is not None):
                alt[start:start + rows] = q.alternatives[:rows].to(torch.int32).cpu().numpy()
                alt_errors[start:start + rows] = q.alternative_errors[:rows].float().cpu().numpy()
    return EncodeResult(codes, errors, alt, alt_errors)


def reconstruct_array(model: Tokenizer, x: np.ndarray, *, batch_size: int | None = None) -> np.ndarray:
    """Decoder output (N, D) float32 for x (N, D): x -> codes -> reconstruction, in fixed-shape calls."""
    x = _as_float32(x)
    device = model_device(model)
    batch_size = batch_size or default_batch_size(device)
    out = np.empty_like(x)
    with _eval_mode(model), torch.inference_mode():
        for start, rows, block in _fixed_shape_batches(x, batch_size, device):
            codes = model.quantize(block).codes
            out[start:start + rows] = model.decode_codes(codes)[:rows].float().cpu().numpy()
    return out


def issue_codes(model: Tokenizer, x: np.ndarray, alternatives: int, *, second_chance: bool = True,
                tiebreak: np.ndarray | None = None, batch_size: int | None = None) -> Spread:
    """The codes a first run of the job issues for catalog x (N, D), in process: :func:`encode_array` with
    ``alternatives`` ranked last-level codes, colliding items spread over them
    (:func:`rqvae.resolve.spread_last_level`, ties by ``tiebreak``, default the row number), and with
    ``second_chance`` the items still sharing a tuple (:func:`rqvae.resolve.not_keepers`) encoded again with
    every last-level code ranked and spread once more, every other item's tuple taken
    (``pipelines.uniquify.second_chance`` on a DataFrame). ``alternatives`` 0: the model's codes as they are.

    Returns a :class:`rqvae.resolve.Spread` (``moved``: the last-level code is not the nearest).
    """
    if alternatives <= 0:
        r = encode_array(model, x, batch_size=batch_size)
        return Spread(r.codes, r.quantization_error, np.zeros(len(r.codes), dtype=bool))
    tie = np.arange(len(x)) if tiebreak is None else np.asarray(tiebreak)
    r = encode_array(model, x, batch_size=batch_size, alternatives=alternatives)
    assert r.alternatives is not None and r.alternative_errors is not None
    first = spread_last_level(r.codes, r.quantization_error, r.alternatives, r.alternative_errors, tiebreak=tie)
    left = not_keepers(first.codes, first.quantization_error, tie) if second_chance else np.zeros(0, np.int64)
    if not len(left):
        return first
    again = encode_array(model, _as_float32(x)[left], batch_size=batch_size, alternatives=model.codebook_size)
    assert again.alternatives is not None and again.alternative_errors is not None
    return spread_again(first, left, again.codes, again.quantization_error, again.alternatives,
                        again.alternative_errors, tie)
