"""rqvae.align (Hungarian matching, code relabelling) and aligned retraining (warm start, retention loss)."""
from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest
import torch

from rqvae import ModelConfig, TrainConfig, encode_array, fit
from rqvae.align import Agreement, align_to, co_assignment, code_permutations, linear_assignment, relabel_codes
from rqvae.kmeans import kmeans
from rqvae.model import RQVAE
from rqvae.synthetic import CatalogSpec, make_catalog


@pytest.mark.parametrize("n", [1, 2, 3, 5, 7])
def test_linear_assignment_is_a_minimum_cost_perfect_matching(n: int) -> None:
    rng = np.random.default_rng(n)
    for _ in range(40):
        cost = rng.integers(0, 6, size=(n, n)).astype(float)  # small integers: many ties
        cols = linear_assignment(cost)
        assert sorted(cols.tolist()) == list(range(n))
        best = min(sum(cost[i, p[i]] for i in range(n)) for p in itertools.permutations(range(n)))
        assert cost[np.arange(n), cols].sum() == pytest.approx(best)


def test_linear_assignment_recovers_a_hidden_permutation_at_k_256() -> None:
    rng = np.random.default_rng(0)
    hidden = rng.permutation(256)
    counts = rng.integers(0, 5, size=(256, 256))
    counts[np.arange(256), hidden] += 100
    np.testing.assert_array_equal(linear_assignment(-counts), hidden)


def test_linear_assignment_refuses_a_non_square_matrix() -> None:
    with pytest.raises(ValueError, match="square"):
        linear_assignment(np.zeros((2, 3)))


def test_code_permutations_map_new_names_to_old_ones() -> None:
    rng = np.random.default_rng(1)
    old = rng.integers(0, 8, size=(500, 2))
    rename = [rng.permutation(8), rng.permutation(8)]
    new = np.stack([rename[0][old[:, 0]], rename[1][old[:, 1]]], axis=1)
    perms = code_permutations(new, old, 8)
    for level in range(2):
        np.testing.assert_array_equal(perms[level][new[:, level]], old[:, level])
    shared = code_permutations(new[:, :1], old[:, :1], 8, shared=True)
    assert len(shared) == 1
    assert co_assignment(new[:, 0], old[:, 0], 8).sum() == 500


def small_model(shared: bool, anchor: int, seed: int = 0) -> RQVAE:
    """``anchor``: anchored levels (0: none)."""
    torch.manual_seed(seed)
    model = RQVAE(ModelConfig(input_dim=12, hidden_dims=(24,), latent_dim=6, num_levels=3, codebook_size=8,
                              shared_codebook=shared, anchor_first_level=anchor > 0, anchor_levels=max(1, anchor)))
    with torch.no_grad():
        model.quantizer.codebooks.normal_()
        for level in range(anchor):
            model.anchor_book(level).normal_()
        if model.balances_prefixes:  # offsets large enough to change level 2 for many items
            model.anchor_offsets.normal_(0.0, 5.0)
    return model.eval()


@pytest.mark.parametrize(("shared", "anchor"), [(False, 1), (False, 0), (True, 1), (True, 0), (False, 2), (True, 2),
                                                  (False, 3)])
def test_relabelling_renames_codes_and_changes_nothing_else(shared: bool, anchor: int) -> None:
    model = small_model(shared, anchor)
    x = np.random.default_rng(2).normal(size=(300, 12)).astype(np.float32)
    before = encode_array(model, x, batch_size=64)
    rng = np.random.default_rng(3)
    perms = [rng.permutation(8) for _ in range(1 if shared else 3)]
    relabel_codes(model, perms)
    after = encode_array(model, x, batch_size=64)
    expected = np.stack([perms[0 if shared else lv][before.codes[:, lv]] for lv in range(3)], axis=1)
    np.testing.assert_array_equal(after.codes, expected)
    np.testing.assert_array_equal(after.quantization_error, before.quantization_error)


def test_relabelling_needs_one_permutation_per_codebook() -> None:
    model = small_model(False, 1)
    with pytest.raises(ValueError, match="need 3 permutations"):
        relabel_codes(model, [np.arange(8)])
    with pytest.raises(ValueError, match="not a permutation"):
        relabel_codes(model, [np.zeros(8, dtype=int)] * 3)


def test_align_to_undoes_a_renaming_of_the_same_model() -> None:
    model = small_model(False, 1)
    x = np.random.default_rng(4).normal(size=(400, 12)).astype(np.float32)
    old = encode_array(model, x).codes
    relabel_codes(model, [np.random.default_rng(5).permutation(8) for _ in range(3)])
    before, after = align_to(model, x, old)
    assert before.prefix[0] < 0.5
    assert after.prefix == (1.0, 1.0, 1.0)


def test_agreement_counts_prefixes() -> None:
    a = np.array([[1, 2, 3], [1, 2, 3], [1, 2, 3], [4, 5, 6]])
    b = np.array([[1, 2, 3], [1, 2, 9], [1, 9, 3], [7, 5, 6]])
    assert Agreement.of(a, b).prefix == (0.75, 0.5, 0.25)


@pytest.fixture(scope="module")
def generations() -> dict:
    """Generation 1 on 1,800 items; the catalog grown by 10%; a model to warm-start from."""
    catalog = make_catalog(CatalogSpec(n_items=2000, dim=32, seed=3)).embeddings
    mcfg = ModelConfig(input_dim=32, hidden_dims=(64,), latent_dim=8, num_levels=3, codebook_size=16)
    first = fit(catalog[:1800], mcfg, TrainConfig(epochs=8, batch_size=128, seed=0)).model
    return {"x": catalog, "old": encode_array(first, catalog[:1800]).codes, "model": first, "config": mcfg}


def retrain(generations: dict, *, warm: bool) -> np.ndarray:
    """Codes of the first 1,800 items under a model retrained on all 2,000 with another seed, relabelled."""
    x, old = generations["x"], generations["old"]
    model = fit(x, generations["config"], TrainConfig(epochs=8, batch_size=128, seed=1),
                init=generations["model"] if warm else None).model
    align_to(model, x[:len(old)], old)
    return encode_array(model, x[:len(old)]).codes


def test_a_warm_started_retrain_keeps_most_prefixes(generations) -> None:
    old = generations["old"]
    scratch = Agreement.of(retrain(generations, warm=False), old).prefix
    aligned = Agreement.of(retrain(generations, warm=True), old).prefix
    assert aligned[0] >= 0.9 and aligned[1] >= 0.75, (aligned, scratch)
    assert aligned[1] > scratch[1] + 0.3, (aligned, scratch)


def test_a_warm_start_fine_tunes_at_a_tenth_of_the_learning_rate(generations) -> None:
    seen = []

    class Lr:
        def on_epoch_end(self, epoch: int, metrics: dict) -> None:
            seen.append(metrics["lr"])

    fit(generations["x"], generations["config"], TrainConfig(epochs=1, batch_size=128, lr=1e-3, warmup_fraction=0,
                                                             min_lr_ratio=1.0), init=generations["model"],
        callbacks=[Lr()])
    assert seen == [pytest.approx(1e-4)]


def test_warm_start_needs_a_model_of_the_same_shape(generations) -> None:
    other = ModelConfig(input_dim=32, hidden_dims=(32,), latent_dim=8, num_levels=3, codebook_size=16)
    with pytest.raises(ValueError, match="another shape"):
        fit(generations["x"], other, TrainConfig(epochs=1, batch_size=128), init=generations["model"])
    anchored = dataclasses.replace(generations["config"], anchor_levels=2)
    with pytest.raises(ValueError, match=r"another shape \(anchor_levels: 2 vs 1\)"):
        fit(generations["x"], anchored, TrainConfig(epochs=1, batch_size=128), init=generations["model"])


def test_a_warm_start_may_change_how_collisions_are_spread(generations) -> None:
    # collision_alternatives decides how IDs are issued, not the weights: a model trained without it
    # seeds one with it (the upgrade path of a table whose model predates the setting).
    assert generations["config"].collision_alternatives == 0
    spreading = dataclasses.replace(generations["config"], collision_alternatives=8)
    model = fit(generations["x"], spreading, TrainConfig(epochs=1, batch_size=128), init=generations["model"]).model
    assert model.config.collision_alternatives == 8


def test_a_warm_start_trains_at_most_warm_start_epochs(generations) -> None:
    epochs = []

    class Count:
        def on_epoch_end(self, epoch: int, metrics: dict) -> None:
            epochs.append(epoch)

    fit(generations["x"], generations["config"], TrainConfig(epochs=8, batch_size=128, warm_start_epochs=2),
        init=generations["model"], callbacks=[Count()])
    assert epochs == [0, 1]


def test_a_warm_start_refines_the_anchor_by_at_most_warm_start_epochs_lloyd_iterations(generations) -> None:
    anchored = dataclasses.replace(generations["config"], anchor_levels=3)
    x = generations["x"]
    old = fit(x, anchored, TrainConfig(epochs=1, batch_size=128)).model
    shifted = x + np.random.default_rng(9).normal(0, 0.05, x.shape).astype(np.float32)
    rows = torch.nn.functional.normalize(torch.from_numpy(shifted), dim=-1)
    new = fit(shifted, anchored, TrainConfig(epochs=5, batch_size=128, warm_start_epochs=2, holdout_fraction=0.0,
                                             kmeans_init_size=len(x)), init=old).model
    # by hand: two Lloyd iterations per level from the old centroids, on the residual the refined levels leave
    residual = rows
    for level in range(3):
        expected = kmeans(residual, 16, iters=2, init=old.anchor_book(level))
        torch.testing.assert_close(new.anchor_book(level), expected)
        residual = residual - expected[torch.cdist(residual, expected).argmin(1)]
