"""Arrow -> NumPy conversion of embedding columns, without per-row Python objects.

Used on the encode UDF hot path and when collecting the training sample, so it works on the Arrow
buffers directly: the child values are flattened once (respecting slice offsets), list lengths are
checked from the offsets in one vectorised step, and a float32 child without nulls is viewed, not
copied.
"""
from __future__ import annotations

from typing import TypeAlias

import numpy as np
import pyarrow as pa

ListLike: TypeAlias = pa.ListArray | pa.LargeListArray | pa.FixedSizeListArray | pa.ChunkedArray


def embeddings_to_numpy(arr: ListLike, dim: int | None = None, *, copy: bool = False) -> np.ndarray:
    """Turn an Arrow column of equal-length float lists into a C-contiguous float32 matrix.

    Args:
        arr: ``list<float|double>``, ``large_list<...>`` or ``fixed_size_list<...>`` array, or a
            ChunkedArray of one of these (as in ``pa.Table.column``). Neither lists nor their
            elements may be null (validation quarantines such rows before this point).
        dim: expected list length D; ``None`` takes the length of the first list.
        copy: always return a writable copy. Otherwise a single float32 chunk without nulls is
            returned as a read-only zero-copy view of the Arrow buffer.

    Returns:
        float32 array of shape [N, D], C-contiguous.

    Raises:
        ValueError: a null list, a null element, or a list whose length is not D.
        TypeError: the column is not a list of floating-point values.
    """
    chunks = arr.chunks if isinstance(arr, pa.ChunkedArray) else [arr]
    chunks = [c for c in chunks if len(c)]
    if not chunks:
        return np.zeros((0, _declared_dim(arr.type, dim)), dtype=np.float32)
    flat, dim = _flat_values(chunks[0], dim)
    if len(chunks) == 1:
        return np.ascontiguousarray(flat.astype(np.float32, copy=copy).reshape(len(chunks[0]), dim))
    out = np.empty((sum(len(c) for c in chunks), dim), dtype=np.float32)  # (N, D)
    out[: len(chunks[0])] = flat.reshape(len(chunks[0]), dim)
    start = len(chunks[0])
    for chunk in chunks[1:]:  # one copy per chunk, straight into the output (casting on the way)
        flat, _ = _flat_values(chunk, dim)
        out[start : start + len(chunk)] = flat.reshape(len(chunk), dim)
        start += len(chunk)
    return out


def _flat_values(arr: pa.Array, dim: int | None) -> tuple[np.ndarray, int]:
    """Checked, flattened child values of one non-empty list array (a view where possible), and D."""
    if not isinstance(arr, pa.FixedSizeListArray | pa.ListArray | pa.LargeListArray):
        raise TypeError(f"expected an Arrow list array of floats, got {arr.type}")
    if not pa.types.is_floating(arr.type.value_type):
        raise TypeError(f"embedding elements must be float or double, got {arr.type.value_type}")
    if arr.null_count:
        raise ValueError(f"{arr.null_count} embedding(s) are null; validate_catalog quarantines those rows")
    dim = _check_lengths(arr, dim)
    values = arr.flatten()  # respects the slice offset, unlike .values
    if values.null_count:
        raise ValueError(
            f"{values.null_count} embedding element(s) are null; validate_catalog quarantines those rows"
        )
    return values.to_numpy(zero_copy_only=False), dim


def _declared_dim(list_type: pa.DataType, dim: int | None) -> int:
    """D of an empty column: ``dim`` if given, else a fixed-size list's size, else 0."""
    if dim is not None:
        return dim
    return list_type.list_size if pa.types.is_fixed_size_list(list_type) else 0


def _check_lengths(arr: pa.Array, dim: int | None) -> int:
    """Return D after checking every list of ``arr`` has length D (vectorised over the offsets)."""
    if isinstance(arr, pa.FixedSizeListArray):
        size = arr.type.list_size
        if dim is not None and size != dim:
            raise ValueError(f"embeddings have length {size}, expected {dim}")
        return size
    lengths = np.diff(arr.offsets.to_numpy())  # offsets respect the slice: N + 1 entries
    if dim is None:
        if len(lengths) == 0:
            raise ValueError("cannot infer the embedding length of an empty array; pass dim")
        dim = int(lengths[0])
    bad = np.flatnonzero(lengths != dim)
    if bad.size:
        raise ValueError(
            f"{bad.size} embedding(s) do not have length {dim} (first at row {bad[0]}: length "
            f"{lengths[bad[0]]}); validate_catalog quarantines such rows as wrong_embedding_length"
        )
    return dim


def matrix_to_list_array(values: np.ndarray, value_type: pa.DataType | None = None) -> pa.ListArray:
    """The inverse of :func:`embeddings_to_numpy`: a 2-D array (N, W) -> Arrow ``list<...>`` of N
    lists of W values, built from one flat buffer and computed offsets (no per-row objects).

    ``value_type`` sets the element type (e.g. ``pa.string()`` for an object array of names).
    """
    n, width = values.shape
    offsets = pa.array(np.arange(0, (n + 1) * width, width, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(np.ascontiguousarray(values).ravel(), value_type))


def row_fingerprints(matrix: np.ndarray) -> np.ndarray:
    """int64 (N,) fingerprint of each row of a float32 matrix (N, D): xxh3-64 of the row's bytes.

    The bytes are the row's float32 values in little-endian order, so a fingerprint depends only on
    the values the encoder sees (after the cast to FLOAT), not on the engine, the batch, the machine
    or the input's float/double type. Any bit change gives another fingerprint (also -0.0 vs 0.0).
    xxh3 (the ``xxhash`` package) hashes a 768-float row in well under a microsecond; ``hashlib``'s
    blake2b was 14x slower here, about a fifth of the model's own encode cost.
    """
    import xxhash

    values = np.ascontiguousarray(matrix, dtype="<f4")
    rows = values.view(np.uint8).reshape(len(values), 4 * values.shape[1])  # (N, 4 D) bytes
    digest = xxhash.xxh3_64_intdigest
    return np.fromiter((digest(row.data) for row in rows), dtype=np.uint64, count=len(rows)).view(np.int64)
