"""Tests of rqvae.encode: dtypes and shapes, agreement with quantize, chunking invariance, edge cases."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rqvae import RQVAE, ModelConfig, RQKMeans, RQKMeansConfig, encode_array, reconstruct_array
from rqvae.encode import CPU_BATCH_SIZE, default_batch_size, model_device

D, L, K = 6, 3, 5
X = np.random.default_rng(0).normal(size=(60, D)).astype(np.float32)


def rqvae_model() -> RQVAE:
    torch.manual_seed(0)
    model = RQVAE(ModelConfig(input_dim=D, hidden_dims=(8,), latent_dim=4, num_levels=L, codebook_size=K))
    with torch.no_grad():
        model.quantizer.init_kmeans(model.encode_latent(torch.from_numpy(X)), iters=5)
    return model


def rqkmeans_model() -> RQKMeans:
    return RQKMeans.fit(X, RQKMeansConfig(input_dim=D, num_levels=L, codebook_size=K), iters=5)


MODELS = {"rqvae": rqvae_model, "rqkmeans": rqkmeans_model}


def codeword_sum(model: RQVAE | RQKMeans, codes: np.ndarray) -> torch.Tensor:
    """Sum over levels of the codewords named by codes (N, L), read from the model's tensors."""
    books = model.quantizer.codebooks.detach() if isinstance(model, RQVAE) else model.codebooks
    return sum(books[lv][torch.from_numpy(codes[:, lv]).long()] for lv in range(L))


@pytest.mark.parametrize("name", list(MODELS))
def test_codes_and_errors_match_quantize(name: str) -> None:
    model = MODELS[name]()
    result = encode_array(model, X)
    assert result.codes.dtype == np.int32 and result.codes.shape == (60, L)
    assert result.quantization_error.dtype == np.float32 and result.quantization_error.shape == (60,)
    assert result.codes.min() >= 0 and result.codes.max() < K
    assert len(np.unique(result.codes[:, 0])) > 1
    q = model.quantize(torch.from_numpy(X))
    np.testing.assert_array_equal(result.codes, q.codes.numpy())
    np.testing.assert_allclose(result.quantization_error, q.error.numpy(), rtol=1e-6)


@pytest.mark.parametrize("name", list(MODELS))
def test_error_is_distance_to_the_codeword_sum(name: str) -> None:
    model = MODELS[name]()
    result = encode_array(model, X)
    x = F.normalize(torch.from_numpy(X), dim=-1)
    target = model.encoder(x).detach() if isinstance(model, RQVAE) else x
    expected = (target - codeword_sum(model, result.codes)).norm(dim=1).numpy()
    np.testing.assert_allclose(result.quantization_error, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", list(MODELS))
def test_chunking_does_not_change_results(name: str) -> None:
    model = MODELS[name]()
    big, small, single = (encode_array(model, X, batch_size=b) for b in (1000, 7, 1))
    for other in (small, single):
        np.testing.assert_array_equal(other.codes, big.codes)
        np.testing.assert_allclose(other.quantization_error, big.quantization_error, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(reconstruct_array(model, X, batch_size=7), reconstruct_array(model, X),
                               rtol=1e-5, atol=1e-6)


def test_default_batch_is_small_on_cpu_and_large_on_accelerators(monkeypatch) -> None:
    assert default_batch_size("cpu") == default_batch_size(torch.device("cpu")) == CPU_BATCH_SIZE == 2048
    assert default_batch_size("cuda:1") == default_batch_size("mps") == 8192
    x = np.random.default_rng(1).normal(size=(CPU_BATCH_SIZE + 5, D)).astype(np.float32)  # two model calls
    model, calls = rqvae_model(), []
    original = model.quantize
    monkeypatch.setattr(model, "quantize", lambda batch: calls.append(len(batch)) or original(batch))
    np.testing.assert_array_equal(encode_array(model, x).codes, encode_array(model, x, batch_size=len(x)).codes)
    assert calls == [CPU_BATCH_SIZE, CPU_BATCH_SIZE, len(x)]  # the 5-row tail is padded to a full call


@pytest.mark.parametrize("threads", [1, 2, 4])  # 3, 5, 6 threads are not covered: see _fixed_shape_batches
def test_results_are_bitwise_the_same_however_the_rows_are_split(threads: int) -> None:
    # Large enough that BLAS picks different kernels for different call sizes: before model calls were
    # padded to one shape, splitting these rows into pieces changed a few errors in the last bit.
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _check_split_invariance()
    finally:
        torch.set_num_threads(before)


def _check_split_invariance() -> None:
    dim, rows = 96, 1500
    x = np.random.default_rng(3).normal(size=(rows, dim)).astype(np.float32)
    torch.manual_seed(3)
    model = RQVAE(ModelConfig(input_dim=dim, hidden_dims=(192,), latent_dim=24, num_levels=3, codebook_size=64))
    with torch.no_grad():
        model.quantizer.init_kmeans(model.encode_latent(torch.from_numpy(x)), iters=3)
    whole = encode_array(model, x, batch_size=256)
    recon = reconstruct_array(model, x, batch_size=256)
    cuts = np.sort(np.random.default_rng(4).choice(np.arange(1, rows), size=25, replace=False))
    pieces = np.split(np.arange(rows), cuts)  # 26 pieces of 1 to ~200 rows
    split = [encode_array(model, x[p], batch_size=256) for p in pieces]
    np.testing.assert_array_equal(np.concatenate([r.codes for r in split]), whole.codes)
    np.testing.assert_array_equal(np.concatenate([r.quantization_error for r in split]), whole.quantization_error)
    np.testing.assert_array_equal(np.concatenate([reconstruct_array(model, x[p], batch_size=256) for p in pieces]),
                                  recon)


@pytest.mark.parametrize("name", list(MODELS))
def test_empty_input(name: str) -> None:
    model = MODELS[name]()
    result = encode_array(model, np.zeros((0, D), dtype=np.float32))
    assert result.codes.shape == (0, L) and result.codes.dtype == np.int32
    assert result.quantization_error.shape == (0,)
    assert reconstruct_array(model, np.zeros((0, D), dtype=np.float32)).shape == (0, D)


@pytest.mark.parametrize("shape", [(D,), (2, 3, D)])
def test_non_matrix_input_raises(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="2-D"):
        encode_array(rqkmeans_model(), np.zeros(shape, dtype=np.float32))
    with pytest.raises(ValueError, match="2-D"):
        reconstruct_array(rqkmeans_model(), np.zeros(shape, dtype=np.float32))


def test_float64_and_non_contiguous_input() -> None:
    model = rqvae_model()
    wide = np.repeat(X.astype(np.float64), 2, axis=1)[:, ::2]  # float64 view with stride 2
    np.testing.assert_array_equal(encode_array(model, wide).codes, encode_array(model, X).codes)


@pytest.mark.parametrize("name", list(MODELS))
def test_reconstruct_decodes_the_codes(name: str) -> None:
    model = MODELS[name]()
    out = reconstruct_array(model, X)
    assert out.dtype == np.float32 and out.shape == X.shape
    latent = codeword_sum(model, encode_array(model, X).codes)
    expected = model.decoder(latent).detach() if isinstance(model, RQVAE) else latent
    np.testing.assert_allclose(out, expected.numpy(), rtol=1e-5, atol=1e-6)


def test_encode_restores_training_mode() -> None:
    model = rqvae_model().train()
    encode_array(model, X)
    assert model.training
    encode_array(model.eval(), X)
    assert not model.training


def test_reconstruct_restores_training_mode() -> None:
    model = rqvae_model().train()
    reconstruct_array(model, X)
    assert model.training


def test_model_device() -> None:
    assert model_device(rqvae_model()) == torch.device("cpu")
    assert model_device(rqkmeans_model()) == torch.device("cpu")  # buffers only
    assert model_device(torch.nn.ReLU()) == torch.device("cpu")  # nothing at all
