"""embeddings_to_numpy: Arrow list columns -> float32 [N, D] without per-row Python objects."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from pipelines.arrow_utils import embeddings_to_numpy

N, D = 6, 4
MATRIX = np.arange(N * D, dtype=np.float32).reshape(N, D) / 7  # (N, D)


def list_array(matrix: np.ndarray, list_type=pa.list_, value_type: pa.DataType | None = None) -> pa.Array:
    return pa.array(matrix.tolist(), type=list_type(value_type or pa.float32()))


@pytest.mark.parametrize("list_type", [pa.list_, pa.large_list])
@pytest.mark.parametrize("value_type", [pa.float32(), pa.float64()])
def test_list_arrays_become_float32_matrix(list_type, value_type) -> None:
    out = embeddings_to_numpy(list_array(MATRIX, list_type, value_type), D)
    assert out.dtype == np.float32 and out.shape == (N, D) and out.flags.c_contiguous
    np.testing.assert_array_equal(out, MATRIX)


def test_fixed_size_list_and_inferred_dim() -> None:
    arr = pa.FixedSizeListArray.from_arrays(pa.array(MATRIX.ravel()), D)
    np.testing.assert_array_equal(embeddings_to_numpy(arr), MATRIX)
    np.testing.assert_array_equal(embeddings_to_numpy(list_array(MATRIX)), MATRIX)


@pytest.mark.parametrize("fixed", [False, True])
def test_sliced_arrays_respect_the_offset(fixed: bool) -> None:
    arr = pa.FixedSizeListArray.from_arrays(pa.array(MATRIX.ravel()), D) if fixed else list_array(MATRIX)
    np.testing.assert_array_equal(embeddings_to_numpy(arr.slice(2, 3), D), MATRIX[2:5])


def test_float32_without_nulls_is_zero_copy_and_copy_flag_gives_writable() -> None:
    arr = list_array(MATRIX)
    view = embeddings_to_numpy(arr, D)
    assert not view.flags.writeable
    assert np.shares_memory(view, arr.flatten().to_numpy())
    owned = embeddings_to_numpy(arr, D, copy=True)
    assert owned.flags.writeable and not np.shares_memory(owned, view)


def test_chunked_array_with_sliced_and_empty_chunks() -> None:
    whole = list_array(MATRIX)
    rest = list_array(MATRIX[2:], pa.large_list).cast(pa.list_(pa.float32()))
    chunked = pa.chunked_array([whole.slice(0, 2), whole.slice(2, 0), rest])
    out = embeddings_to_numpy(chunked, D)
    assert out.flags.writeable and out.flags.c_contiguous
    np.testing.assert_array_equal(out, MATRIX)


def test_empty_inputs_give_zero_rows() -> None:
    assert embeddings_to_numpy(pa.chunked_array([], type=pa.list_(pa.float32())), D).shape == (0, D)
    assert embeddings_to_numpy(list_array(MATRIX).slice(0, 0), D).shape == (0, D)


def test_wrong_length_is_named() -> None:
    arr = pa.array([[1.0, 2.0], [1.0, 2.0, 3.0], [1.0, 2.0]], type=pa.list_(pa.float32()))
    with pytest.raises(ValueError, match=r"1 embedding\(s\) do not have length 2 \(first at row 1: length 3"):
        embeddings_to_numpy(arr)
    with pytest.raises(ValueError, match="length 4, expected 3"):
        embeddings_to_numpy(pa.FixedSizeListArray.from_arrays(pa.array(MATRIX.ravel()), D), 3)


def test_wrong_length_in_a_later_chunk() -> None:
    chunked = pa.chunked_array([list_array(MATRIX), list_array(MATRIX[:, :3])])
    with pytest.raises(ValueError, match="do not have length 4"):
        embeddings_to_numpy(chunked)


def test_wrong_length_hidden_by_the_slice_is_ignored() -> None:
    arr = pa.array([[1.0], [1.0, 2.0], [3.0, 4.0]], type=pa.list_(pa.float32()))
    np.testing.assert_array_equal(embeddings_to_numpy(arr.slice(1), 2), [[1, 2], [3, 4]])


def test_nulls_are_rejected() -> None:
    with pytest.raises(ValueError, match=r"1 embedding\(s\) are null"):
        embeddings_to_numpy(pa.array([[1.0, 2.0], None], type=pa.list_(pa.float32())))
    with pytest.raises(ValueError, match=r"1 embedding element\(s\) are null"):
        embeddings_to_numpy(pa.array([[1.0, None]], type=pa.list_(pa.float32())))


def test_non_float_lists_are_a_type_error() -> None:
    with pytest.raises(TypeError, match="float or double"):
        embeddings_to_numpy(pa.array([[1, 2]], type=pa.list_(pa.int64())))
    with pytest.raises(TypeError, match="list array"):
        embeddings_to_numpy(pa.array([1.0, 2.0]))


def test_row_fingerprints_depend_on_the_float32_values_only() -> None:
    import xxhash

    from pipelines.arrow_utils import row_fingerprints

    x = np.random.default_rng(0).normal(size=(50, 7)).astype(np.float32)
    fps = row_fingerprints(x)
    assert fps.dtype == np.int64 and fps.shape == (50,) and len(set(fps.tolist())) == 50
    # One value, by hand: xxh3-64 of the row's little-endian float32 bytes, as a signed 64-bit int.
    expected = np.array([xxhash.xxh3_64_intdigest(x[3].astype("<f4").tobytes())], dtype=np.uint64).view(np.int64)
    assert fps[3] == expected[0]
    np.testing.assert_array_equal(row_fingerprints(x.astype(np.float64)), fps)  # doubles: cast, same values
    np.testing.assert_array_equal(row_fingerprints(np.asfortranarray(x)), fps)  # any memory layout
    np.testing.assert_array_equal(row_fingerprints(x[10:20]), fps[10:20])  # any batch
    bumped = x.copy()
    bumped[5, 6] = np.nextafter(bumped[5, 6], np.float32(np.inf))  # one ulp
    assert (row_fingerprints(bumped) != fps).tolist() == [i == 5 for i in range(50)]
    assert row_fingerprints(np.zeros((0, 7), dtype=np.float32)).shape == (0,)
