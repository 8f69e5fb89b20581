"""Joint codeword refinement of a fully anchored model (TrainConfig.anchor_refine_passes)."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from rqvae import ModelConfig, TrainConfig, encode_array, fit
from rqvae.checkpoint import checkpoint_bytes, load_checkpoint, model_from_payload, to_payload
from rqvae.synthetic import CatalogSpec, make_catalog
from rqvae.train import _refine_jointly

CATALOG = make_catalog(CatalogSpec(n_items=3000, dim=64, seed=5)).embeddings
FULL = ModelConfig(input_dim=64, hidden_dims=(32,), latent_dim=8, num_levels=3, codebook_size=16, anchor_levels=3,
                   collision_alternatives=4)
PLAIN = TrainConfig(epochs=2, batch_size=128, kmeans_iters=10, seed=0)
REFINED = dataclasses.replace(PLAIN, anchor_refine_passes=3)


@pytest.fixture(scope="module")
def pair():  # type: ignore[no-untyped-def]
    return fit(CATALOG, FULL, PLAIN), fit(CATALOG, FULL, REFINED)


def unit(x: np.ndarray) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.from_numpy(x), dim=-1)


def squared_error(model, x: np.ndarray) -> float:  # type: ignore[no-untyped-def]
    codes = torch.from_numpy(encode_array(model, x).codes.astype(np.int64))
    with torch.no_grad():
        return float((unit(x) - model.decode_codes(codes)).pow(2).sum(1).mean())


def test_refinement_keeps_level_1_and_reconstructs_better(pair) -> None:  # type: ignore[no-untyped-def]
    plain, refined = (r.model for r in pair)
    assert torch.equal(plain.anchor, refined.anchor)  # the same k-means picks level 1
    assert torch.equal(plain.anchor_recon, plain.anchor)  # off: level 1 adds its centroid
    assert not torch.equal(refined.anchor_recon, refined.anchor)
    np.testing.assert_array_equal(encode_array(refined, CATALOG).codes[:, 0], encode_array(plain, CATALOG).codes[:, 0])
    train = np.setdiff1d(np.arange(len(CATALOG)), pair[1].holdout_index)
    held = pair[1].holdout_index
    assert squared_error(refined, CATALOG[train]) < squared_error(plain, CATALOG[train])  # 0.641 against 0.643
    assert squared_error(refined, CATALOG[held]) < squared_error(plain, CATALOG[held])  # and on items it never saw
    assert pair[1].history[0]["val_recon"] < pair[0].history[0]["val_recon"]


def test_refined_codes_are_the_residual_walk_by_hand(pair) -> None:  # type: ignore[no-untyped-def]
    model = pair[1].model
    r = unit(CATALOG)
    first = torch.cdist(r, model.anchor_book(0)).argmin(1)  # picked by the centroids ...
    r = r - model.anchor_recon[first]  # ... but what level 1 adds is its refined codeword
    second = torch.cdist(r, model.anchor_book(1)).argmin(1)
    r = r - model.anchor_book(1)[second]
    third = torch.cdist(r, model.anchor_book(2)).argmin(1)
    left = r - model.anchor_book(2)[third]
    got = encode_array(model, CATALOG, alternatives=4)
    np.testing.assert_array_equal(got.codes, torch.stack([first, second, third], 1).numpy())
    np.testing.assert_allclose(got.quantization_error, left.norm(dim=1).numpy(), rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        decoded = model.decode_codes(torch.from_numpy(got.codes.astype(np.int64)))
    torch.testing.assert_close(decoded, unit(CATALOG) - left)
    restored = load_checkpoint(checkpoint_bytes(model))
    assert torch.equal(restored.anchor_recon, model.anchor_recon)
    np.testing.assert_array_equal(encode_array(restored, CATALOG).codes, got.codes)


def test_one_pass_gives_each_level_the_mean_of_what_the_others_leave(pair) -> None:  # type: ignore[no-untyped-def]
    model = load_checkpoint(checkpoint_bytes(pair[0].model))
    with torch.no_grad():  # a level-3 codeword no item is near: no row holds it
        model.anchor_book(2)[5] = 100.0
    x = unit(CATALOG)
    codes = torch.from_numpy(encode_array(model, CATALOG).codes.astype(np.int64))
    _refine_jointly(model, x, 1)
    books = [model.recon_book(level) for level in range(3)]
    # levels in turn, each with the others' latest codewords: the last level's are final for these codes
    rest = x - books[0][codes[:, 0]] - books[1][codes[:, 1]]
    for code in range(16):
        held = codes[:, 2] == code
        if held.any():
            torch.testing.assert_close(books[2][code], rest[held].mean(0), rtol=1e-4, atol=1e-5)
        else:  # no row holds it: it keeps its codeword
            assert code == 5 and bool((books[2][code] == 100.0).all())
    assert not bool((codes[:, 2] == 5).any())
    assert torch.equal(model.anchor, pair[0].model.anchor)


def test_refinement_is_deterministic(pair) -> None:  # type: ignore[no-untyped-def]
    again = fit(CATALOG, FULL, REFINED).model
    assert torch.equal(again.anchor_recon, pair[1].model.anchor_recon)
    np.testing.assert_array_equal(encode_array(again, CATALOG).codes, encode_array(pair[1].model, CATALOG).codes)


def test_a_checkpoint_from_before_refinement_loads_with_level_1_adding_its_centroid(pair) -> None:  # type: ignore[no-untyped-def]
    payload = to_payload(pair[0].model)
    del payload["state_dict"]["anchor_recon"]
    old = model_from_payload(payload)
    assert torch.equal(old.anchor_recon, old.anchor)
    np.testing.assert_array_equal(encode_array(old, CATALOG).codes, encode_array(pair[0].model, CATALOG).codes)


@pytest.mark.parametrize("levels", [1, 2])
def test_with_fewer_than_three_levels_the_picking_centroids_never_move(levels: int) -> None:
    config = dataclasses.replace(FULL, num_levels=levels, anchor_levels=levels)
    plain, refined = fit(CATALOG, config, PLAIN).model, fit(CATALOG, config, REFINED).model
    assert torch.equal(plain.anchor, refined.anchor)
    np.testing.assert_array_equal(encode_array(refined, CATALOG).codes[:, 0], encode_array(plain, CATALOG).codes[:, 0])
    if levels == 1:  # nothing to refine against: the same model
        assert not hasattr(refined, "anchor_recon")
        np.testing.assert_array_equal(encode_array(refined, CATALOG).quantization_error,
                                      encode_array(plain, CATALOG).quantization_error)
    else:
        assert squared_error(refined, CATALOG) < squared_error(plain, CATALOG)


def test_the_2_prefix_cap_holds_after_refinement() -> None:
    # k-means on 1,000 rows, the cap's auction on every training row (the pool path)
    capped = dataclasses.replace(REFINED, prefix_fill=1.0, kmeans_init_size=1000)
    result = fit(CATALOG, FULL, capped)
    model = result.model
    train = np.setdiff1d(np.arange(len(CATALOG)), result.holdout_index)
    codes = encode_array(model, CATALOG[train]).codes
    cap = math.ceil(16 * len(train) / len(CATALOG))
    per_cell = np.bincount(codes[:, 0], minlength=16)
    limit = np.maximum(np.ceil(1.25 * per_cell / 16), cap)  # rqvae.kmeans.balance_offsets: never below a cell's floor
    counts = np.bincount(codes[:, 0] * 16 + codes[:, 1], minlength=256).reshape(16, 16)
    assert (counts <= limit[:, None]).all()
    assert float(model.anchor_offsets.max()) > 0


def test_a_warm_start_runs_no_passes_and_keeps_what_refinement_added(pair) -> None:  # type: ignore[no-untyped-def]
    old = pair[1].model
    shifted = CATALOG + np.random.default_rng(1).normal(0, 0.02, CATALOG.shape).astype(np.float32)
    new = fit(shifted, FULL, REFINED, init=old).model
    kept = (encode_array(new, CATALOG).codes == encode_array(old, CATALOG).codes).all(1).mean()
    cold = fit(shifted, FULL, REFINED).model
    kept_cold = (encode_array(cold, CATALOG).codes == encode_array(old, CATALOG).codes).all(1).mean()
    assert kept > 0.6 and kept > 3 * kept_cold
    # what refinement added to each level-1 centroid travels with it while Lloyd moves the centroid
    torch.testing.assert_close(new.anchor_recon - new.anchor, old.anchor_recon - old.anchor)
    assert not torch.equal(new.anchor, old.anchor)
    off = fit(shifted, FULL, dataclasses.replace(REFINED, anchor_refine_passes=0), init=old).model
    assert torch.equal(off.anchor_recon, new.anchor_recon)  # the passes take no part in a warm start
    np.testing.assert_array_equal(encode_array(off, CATALOG).codes, encode_array(new, CATALOG).codes)


def test_passes_must_not_be_negative() -> None:
    with pytest.raises(ValueError, match="anchor_refine_passes must be >= 0"):
        TrainConfig(anchor_refine_passes=-1)
