"""The input-space anchored first level (ModelConfig.anchor_first_level)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from rqvae import ModelConfig, TrainConfig, encode_array, fit, load_checkpoint
from rqvae.checkpoint import checkpoint_bytes
from rqvae.synthetic import CatalogSpec, make_catalog

CATALOG = make_catalog(CatalogSpec(n_items=1500, dim=24, seed=3))
TRAIN = TrainConfig(epochs=2, batch_size=128, ae_warmup_epochs=1, kmeans_iters=5, seed=0)


def model_config(anchored: bool) -> ModelConfig:
    return ModelConfig(input_dim=24, hidden_dims=(32,), latent_dim=8, num_levels=2, codebook_size=16,
                       anchor_first_level=anchored)


@pytest.fixture(scope="module")
def anchored_fit():  # type: ignore[no-untyped-def]
    return fit(CATALOG.embeddings, model_config(True), TRAIN)


def test_level_one_code_is_the_nearest_input_space_centroid(anchored_fit) -> None:  # type: ignore[no-untyped-def]
    model = anchored_fit.model
    x = torch.nn.functional.normalize(torch.from_numpy(CATALOG.embeddings), dim=-1)
    expected = torch.cdist(x, model.anchor).argmin(1).numpy()
    np.testing.assert_array_equal(encode_array(model, CATALOG.embeddings).codes[:, 0], expected)


def test_fit_replaces_the_random_anchor_with_centroids_near_the_data(anchored_fit) -> None:  # type: ignore[no-untyped-def]
    anchor = anchored_fit.model.anchor
    x = torch.nn.functional.normalize(torch.from_numpy(CATALOG.embeddings), dim=-1)
    # A random init has norm ~0.01 * sqrt(24) = 0.05; centroids of unit vectors are means of nearby
    # points on the sphere, far longer than that.
    assert float(anchor.norm(dim=1).min()) > 0.25
    assert float(torch.cdist(anchor, x).min(dim=1).values.max()) < 1.0  # every centroid has data close by


def test_plain_model_has_no_anchor_and_picks_level_one_in_the_latent() -> None:
    plain = fit(CATALOG.embeddings, model_config(False), TRAIN).model
    assert not hasattr(plain, "anchor")
    z = plain.encode_latent(torch.from_numpy(CATALOG.embeddings)).detach()
    expected = torch.cdist(z, plain.quantizer.codebook(0).detach()).argmin(1).numpy()
    np.testing.assert_array_equal(encode_array(plain, CATALOG.embeddings).codes[:, 0], expected)


@pytest.mark.parametrize("anchored", [True, False])
def test_checkpoint_round_trip_keeps_codes(anchored: bool, anchored_fit) -> None:  # type: ignore[no-untyped-def]
    model = anchored_fit.model if anchored else fit(CATALOG.embeddings, model_config(False), TRAIN).model
    again = load_checkpoint(checkpoint_bytes(model))
    np.testing.assert_array_equal(encode_array(again, CATALOG.embeddings).codes,
                                  encode_array(model, CATALOG.embeddings).codes)


def test_assign_normalises_once_with_the_same_bits_as_each_part_on_its_own(anchored_fit) -> None:  # type: ignore[no-untyped-def]
    model = anchored_fit.model.eval()
    # The catalog's rows are unit-norm already; scaled rows tell a normalised input from a raw one.
    scale = np.random.default_rng(7).uniform(0.5, 3.0, size=(len(CATALOG.embeddings), 1)).astype(np.float32)
    x = torch.from_numpy(CATALOG.embeddings * scale)
    with torch.no_grad():
        codes, inputs, residual = model.assign(x)
        parts = model.quantizer.assign(model.encode_latent(x).float(), model.anchor_codes(x))
    assert torch.equal(codes, parts[0]) and torch.equal(inputs, parts[1]) and torch.equal(residual, parts[2])
    assert torch.equal(codes[:, :1], model.anchor_codes(torch.nn.functional.normalize(x, dim=-1), prepared=True))


def test_two_anchored_levels_are_residual_k_means_in_input_space_and_survive_a_checkpoint() -> None:
    cfg = ModelConfig(input_dim=24, hidden_dims=(32,), latent_dim=8, num_levels=3, codebook_size=16,
                      anchor_levels=2)
    model = fit(CATALOG.embeddings, cfg, TRAIN).model.eval()
    x = torch.nn.functional.normalize(torch.from_numpy(CATALOG.embeddings), dim=-1)
    first = torch.cdist(x, model.anchor).argmin(1)
    second = torch.cdist(x - model.anchor[first], model.anchor_deeper[0]).argmin(1)
    codes = encode_array(model, CATALOG.embeddings).codes
    np.testing.assert_array_equal(codes[:, 0], first.numpy())
    np.testing.assert_array_equal(codes[:, 1], second.numpy())
    assert len(np.unique(codes[:, 1])) > 8  # the second anchor level is fitted, not left random
    restored = load_checkpoint(checkpoint_bytes(model))
    np.testing.assert_array_equal(encode_array(restored, CATALOG.embeddings).codes, codes)


@pytest.mark.parametrize("levels", [0, 3])
def test_anchor_levels_must_leave_a_learned_level(levels: int) -> None:
    with pytest.raises(ValueError, match="anchor_levels must be between 1 and num_levels - 1 = 2"):
        ModelConfig(input_dim=24, num_levels=3, anchor_levels=levels)


def test_anchor_reconstruction_adds_the_anchor_centroids_to_the_decoder_output() -> None:
    cfg = ModelConfig(input_dim=24, hidden_dims=(32,), latent_dim=8, num_levels=3, codebook_size=16,
                      anchor_levels=2, anchor_reconstruction=True)
    model = fit(CATALOG.embeddings, cfg, TRAIN).model.eval()
    codes = torch.from_numpy(encode_array(model, CATALOG.embeddings).codes.astype(np.int64))
    with torch.no_grad():
        decoded = model.decode_codes(codes)
        by_hand = (model.decoder(model.quantizer.codes_to_latent(codes)) + model.anchor[codes[:, 0]]
                   + model.anchor_deeper[0][codes[:, 1]])
        forward = model(torch.from_numpy(CATALOG.embeddings)).reconstruction
    torch.testing.assert_close(decoded, by_hand)
    torch.testing.assert_close(forward, decoded)
    with pytest.raises(ValueError, match="needs anchor_first_level"):
        ModelConfig(input_dim=24, anchor_first_level=False, anchor_reconstruction=True)
