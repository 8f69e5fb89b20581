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


@pytest.mark.parametrize("levels", [0, 4])
def test_anchor_levels_must_be_between_one_and_the_number_of_levels(levels: int) -> None:
    with pytest.raises(ValueError, match="anchor_levels must be between 1 and num_levels = 3"):
        ModelConfig(input_dim=24, num_levels=3, anchor_levels=levels)


def test_every_level_anchored_has_no_shared_latent_codebook_to_share() -> None:
    with pytest.raises(ValueError, match="shared_codebook shares the latent codebook of the learned levels"):
        ModelConfig(input_dim=24, num_levels=3, anchor_levels=3, shared_codebook=True)


FULL = ModelConfig(input_dim=24, hidden_dims=(32,), latent_dim=8, num_levels=3, codebook_size=16, anchor_levels=3,
                   collision_alternatives=4)


@pytest.fixture(scope="module")
def fully_anchored():  # type: ignore[no-untyped-def]
    return fit(CATALOG.embeddings, FULL, TRAIN)


def residual_k_means_by_hand(model, x: np.ndarray):  # type: ignore[no-untyped-def]
    """Codes, the input-space residual before the last level and after it, walked with cdist."""
    r = torch.nn.functional.normalize(torch.from_numpy(x), dim=-1)
    codes = []
    for level in range(3):
        book = model.anchor_book(level)
        idx = torch.cdist(r, book).argmin(1)
        codes.append(idx)
        before, r = r, r - book[idx]
    return torch.stack(codes, dim=1).numpy(), before, r


def test_fully_anchored_model_is_residual_k_means_in_input_space(fully_anchored) -> None:  # type: ignore[no-untyped-def]
    model = fully_anchored.model
    codes, before_last, left = residual_k_means_by_hand(model, CATALOG.embeddings)
    got = encode_array(model, CATALOG.embeddings, alternatives=4)
    np.testing.assert_array_equal(got.codes, codes)
    assert all(len(np.unique(codes[:, level])) > 8 for level in range(3))  # every level fitted, none left random
    # the error and the ranked alternatives are the input-space residual's (the latent takes no part)
    np.testing.assert_allclose(got.quantization_error, left.norm(dim=1).numpy(), rtol=1e-5, atol=1e-6)
    dist = torch.cdist(before_last, model.anchor_book(2))
    np.testing.assert_array_equal(got.alternatives[:, 0], codes[:, 2])
    np.testing.assert_allclose(got.alternative_errors, dist.sort(dim=1).values[:, :4].numpy(), rtol=1e-4, atol=1e-5)
    # the reconstruction is the centroid sum, whatever the (untrained) decoder would say
    with torch.no_grad():
        decoded = model.decode_codes(torch.from_numpy(codes))
    x = torch.nn.functional.normalize(torch.from_numpy(CATALOG.embeddings), dim=-1)
    torch.testing.assert_close(decoded, x - left)
    restored = load_checkpoint(checkpoint_bytes(model))
    np.testing.assert_array_equal(encode_array(restored, CATALOG.embeddings).codes, codes)


def test_fully_anchored_fit_runs_no_epochs_and_reports_its_reconstruction(fully_anchored) -> None:  # type: ignore[no-untyped-def]
    result = fully_anchored
    assert result.best_epoch == 0 and len(result.history) == 1
    metrics = result.history[0]
    assert set(metrics) == {"epoch", "val_loss", "val_recon", "val_l1_utilization", "val_l2_utilization",
                            "val_l3_utilization"}
    held_out = CATALOG.embeddings[result.holdout_index]
    x = torch.nn.functional.normalize(torch.from_numpy(held_out), dim=-1)
    with torch.no_grad():
        recon = result.model.decode_codes(torch.from_numpy(encode_array(result.model, held_out).codes.astype(np.int64)))
    assert metrics["val_recon"] == pytest.approx(float((x - recon).pow(2).sum(1).mean()), rel=1e-4)
    again = fit(CATALOG.embeddings, FULL, TRAIN).model  # determinism: same seed, same codes
    np.testing.assert_array_equal(encode_array(again, CATALOG.embeddings).codes,
                                  encode_array(result.model, CATALOG.embeddings).codes)


def test_fully_anchored_warm_start_refines_every_level_from_its_centroids(fully_anchored) -> None:  # type: ignore[no-untyped-def]
    old = fully_anchored.model
    shifted = CATALOG.embeddings + np.random.default_rng(1).normal(0, 0.02, CATALOG.embeddings.shape).astype(np.float32)
    new = fit(shifted, FULL, TRAIN, init=old).model
    for level in range(3):  # refined, not refitted from scratch: every centroid stays close to its old self
        moved = (new.anchor_book(level) - old.anchor_book(level)).norm(dim=1)
        assert float(moved.max()) > 0
        nearest_old = torch.cdist(new.anchor_book(level), old.anchor_book(level)).argmin(1)
        assert float((nearest_old == torch.arange(16)).float().mean()) >= 0.9
    before = encode_array(old, CATALOG.embeddings).codes
    kept = (encode_array(new, CATALOG.embeddings).codes == before).all(1).mean()
    cold = fit(shifted, FULL, TRAIN).model  # refitted from scratch, the codes lose their meaning
    kept_cold = (encode_array(cold, CATALOG.embeddings).codes == before).all(1).mean()
    assert kept > 0.4 and kept > 4 * kept_cold  # measured: 0.51 against 0.08


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
