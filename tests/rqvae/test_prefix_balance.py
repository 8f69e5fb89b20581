"""2-prefix fill cap: per-(level-1 code, level-2 code) offsets that keep a large cell from crowding a few
level-2 codes (rqvae.kmeans.balance_offsets, TrainConfig.prefix_fill)."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from rqvae import ModelConfig, TrainConfig, encode_array, fit, load_checkpoint
from rqvae.checkpoint import checkpoint_bytes, model_from_payload, to_payload
from rqvae.kmeans import balance_offsets
from rqvae.quantizer import residual_codes
from rqvae.synthetic import CatalogSpec, make_catalog


def caps(cells: torch.Tensor, k: int, cap: int) -> torch.Tensor:
    """(K, K) most rows a (cell, code) pair may hold: ``cap``, or 1.25 x the even share of the pair's own
    cell when that is more."""
    per_cell = torch.bincount(cells, minlength=k).double()
    return torch.clamp(torch.ceil(1.25 * per_cell / k), min=cap).long()[:, None].expand(k, k)


def crowded(n: int = 2000, k: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Distances where every row prefers code 0 (by 0.5 on average) and cells that are uneven."""
    g = torch.Generator().manual_seed(seed)
    d = torch.rand(n, k, generator=g) + 0.5
    d[:, 0] -= 0.5 * torch.rand(n, generator=g) + 0.25
    cells = torch.multinomial(torch.tensor([8.0, 4, 2, 1, 1, 1, 1, 1]), n, replacement=True, generator=g)
    return d, cells


def pair_counts(d: torch.Tensor, cells: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    k = d.shape[1]
    codes = (d + offsets[cells]).argmin(1)
    return torch.bincount(cells * k + codes, minlength=k * k).view(k, k)


def test_offsets_keep_every_pair_within_its_cap() -> None:
    d, cells = crowded()
    before = pair_counts(d, cells, torch.zeros(8, 8))
    cap = caps(cells, 8, 63)
    assert bool((before > cap).any())  # code 0 crowds the large cells without offsets
    offsets = balance_offsets(d, cells, cap=63)
    after = pair_counts(d, cells, offsets)
    assert bool((after <= cap).all())
    assert int(after.sum()) == len(d)  # every row still has a code
    assert float(offsets.min()) == 0.0  # offsets only grow, and only for pairs that were over their cap
    assert bool((offsets[:3, 0] > 0).all())  # code 0 was over in the three large cells


def test_the_rows_that_stay_are_the_most_attached() -> None:
    # one cell, two codes: code 1 at distance 1 for all, code 0 nearer by 1 - d0. The cell's floor is
    # ceil(1.25 * 10 / 2) = 7 rows per code, so the 3 rows with the largest d0 must move to code 1.
    d0 = torch.tensor([0.5, 0.1, 0.9, 0.3, 0.7, 0.2, 0.8, 0.4, 0.6, 0.05])
    d = torch.stack([d0, torch.ones(10)], dim=1)
    cells = torch.zeros(10, dtype=torch.long)
    offsets = balance_offsets(d, cells, cap=1, init=torch.zeros(1, 2))
    codes = (d + offsets[cells]).argmin(1)
    assert codes.tolist() == [0, 0, 1, 0, 1, 0, 1, 0, 0, 0]
    assert float(offsets[0, 1]) == 0.0


def test_a_cell_larger_than_k_caps_gets_an_even_share_of_its_codes() -> None:
    d, _ = crowded(n=1000)
    cells = torch.zeros(1000, dtype=torch.long)
    offsets = balance_offsets(d, cells, cap=16)  # 8 codes x 16 cannot hold 1000 rows
    counts = pair_counts(d, cells, offsets)
    assert int(counts[0].max()) <= math.ceil(1.25 * 1000 / 8)  # 157: the cell's own floor
    assert int(counts[0].sum()) == 1000


def test_a_block_of_identical_rows_too_large_for_any_pair_takes_no_part() -> None:
    # 30 duplicate rows (one embedding) in a cell of 400 rows over 8 codes, cap 13: the block fits in
    # no pair, so it stays where it is and nothing else in its cell is pushed around; again from the
    # result (a warm start), nothing changes.
    g = torch.Generator().manual_seed(4)
    d = torch.rand(400, 8, generator=g) + 1.0
    d[:30] = d[0]
    cells = torch.zeros(400, dtype=torch.long)
    offsets = balance_offsets(d, cells, cap=13)
    plain = d.argmin(1)
    moved = (d + offsets[cells]).argmin(1) != plain
    assert not moved[:30].any()
    assert int(pair_counts(d[30:], cells[30:], offsets).max()) <= 63  # the cell's floor: ceil(1.25 * 400 / 8)
    assert torch.equal(balance_offsets(d, cells, cap=13, init=offsets), offsets)


def test_smaller_blocks_move_whole() -> None:
    # Blocks of 5 identical rows, all preferring code 0 of one cell: they bid as one row of weight 5,
    # so a block is never split between two codes.
    g = torch.Generator().manual_seed(5)
    base = torch.rand(40, 8, generator=g) + 1.0
    base[:, 0] -= 0.5
    d = base.repeat_interleave(5, dim=0)
    cells = torch.zeros(200, dtype=torch.long)
    offsets = balance_offsets(d, cells, cap=32)  # the cell's floor: ceil(1.25 * 200 / 8) = 32
    codes = (d + offsets[cells]).argmin(1).view(40, 5)
    assert bool((codes == codes[:, :1]).all())
    assert int(torch.bincount(codes[:, 0], minlength=8).max()) * 5 <= 32


def test_ties_everywhere_still_end() -> None:
    # Every row ties between codes 0 and 1 (mean gap 0): the raise must still move rows.
    g = torch.Generator().manual_seed(6)
    d = torch.rand(300, 8, generator=g) + 1.0
    d[:, :2] = 0.0
    cells = torch.zeros(300, dtype=torch.long)
    offsets = balance_offsets(d, cells, cap=48)
    assert int(pair_counts(d, cells, offsets).max()) <= 48


def test_nothing_moves_when_nothing_crowds() -> None:
    g = torch.Generator().manual_seed(1)
    d = torch.rand(500, 8, generator=g)
    cells = torch.randint(0, 8, (500,), generator=g)
    assert bool((balance_offsets(d, cells, cap=100) == 0).all())


def test_offsets_are_deterministic_and_grow_from_a_warm_start() -> None:
    d, cells = crowded(seed=2)
    first = balance_offsets(d, cells, cap=63)
    assert torch.equal(first, balance_offsets(d, cells, cap=63))
    start = torch.rand(8, 8, generator=torch.Generator().manual_seed(3))
    warm = balance_offsets(d, cells, cap=63, init=start)
    assert bool((warm >= start).all())
    assert bool((pair_counts(d, cells, warm) <= caps(cells, 8, 63)).all())


@pytest.mark.parametrize("fill", [-0.1, 1.5])
def test_cap_and_fill_are_checked(fill: float) -> None:
    d, cells = crowded(n=10)
    with pytest.raises(ValueError, match="cap must be at least 1"):
        balance_offsets(d, cells, cap=0)
    with pytest.raises(ValueError, match=r"prefix_fill must be in \[0, 1\]"):
        TrainConfig(prefix_fill=fill)


def test_offsets_need_a_second_level_that_is_not_ranked() -> None:
    books = [torch.randn(4, 3), torch.randn(4, 3)]
    with pytest.raises(ValueError, match="offsets apply to a second level that is not ranked"):
        residual_codes(torch.randn(5, 3), books, alternatives=2, offsets=torch.zeros(4, 4))


CATALOG = make_catalog(CatalogSpec(n_items=3000, dim=64, seed=3)).embeddings
FULL = ModelConfig(input_dim=64, hidden_dims=(32,), latent_dim=8, num_levels=3, codebook_size=16, anchor_levels=3,
                   collision_alternatives=4)
TRAIN = TrainConfig(epochs=2, batch_size=128, kmeans_iters=5, seed=0, prefix_fill=1.0)


@pytest.fixture(scope="module")
def balanced():  # type: ignore[no-untyped-def]
    return fit(CATALOG, FULL, TRAIN)


def two_prefix_counts(codes: np.ndarray) -> np.ndarray:
    return np.bincount(codes[:, 0] * 16 + codes[:, 1], minlength=256)


def test_fit_caps_the_2_prefixes_of_the_rows_it_fitted(balanced) -> None:  # type: ignore[no-untyped-def]
    train = np.setdiff1d(np.arange(len(CATALOG)), balanced.holdout_index)
    codes = encode_array(balanced.model, CATALOG[train]).codes
    # prefix_fill 1: K = 16 items of the 3,000-item catalog, scaled to the rows fitted (16 * 2850 / 3000)
    cells = torch.from_numpy(codes[:, 0])
    cap = caps(cells, 16, math.ceil(1.0 * 16 * len(train) / len(CATALOG))).numpy().ravel()
    plain = fit(CATALOG, FULL, dataclasses.replace(TRAIN, prefix_fill=0.0)).model
    assert (two_prefix_counts(encode_array(plain, CATALOG[train]).codes) > cap).any()  # the largest held 41
    assert bool((plain.anchor_offsets == 0).all())
    assert (two_prefix_counts(codes) <= cap).all()
    assert float(balanced.model.anchor_offsets.max()) > 0


def test_the_cap_follows_the_catalog_the_model_will_encode() -> None:
    # Fitted on the same 3,000 rows for a catalog 10x larger, each 2-prefix may hold 1.6 of the fitted
    # rows, so every cell is split about evenly (its own floor); with the catalog = the rows, up to 16.
    train_rows = len(CATALOG) - int(len(CATALOG) * TRAIN.holdout_fraction)
    wide = fit(CATALOG, FULL, TRAIN).model
    tight = fit(CATALOG, FULL, TRAIN, catalog_items=10 * len(CATALOG)).model
    train = np.setdiff1d(np.arange(len(CATALOG)), fit(CATALOG, FULL, TRAIN).holdout_index)
    assert len(train) == train_rows
    floors = {}
    for name, model in (("wide", wide), ("tight", tight)):
        codes = encode_array(model, CATALOG[train]).codes
        floors[name] = (two_prefix_counts(codes), caps(torch.from_numpy(codes[:, 0]), 16, 2).numpy().ravel())
    assert (floors["wide"][0] > floors["wide"][1]).any()  # the catalog's size is what makes the difference
    assert (floors["tight"][0] <= floors["tight"][1]).all()
    assert float(tight.anchor_offsets.sum()) > float(wide.anchor_offsets.sum())


def test_balanced_codes_are_the_offset_residual_walk_by_hand(balanced) -> None:  # type: ignore[no-untyped-def]
    model = balanced.model
    r = torch.nn.functional.normalize(torch.from_numpy(CATALOG), dim=-1)
    first = torch.cdist(r, model.anchor_book(0)).argmin(1)
    r = r - model.anchor_book(0)[first]
    second = (torch.cdist(r, model.anchor_book(1)).pow(2) + model.anchor_offsets[first]).argmin(1)
    r = r - model.anchor_book(1)[second]
    third = torch.cdist(r, model.anchor_book(2)).argmin(1)
    left = r - model.anchor_book(2)[third]
    got = encode_array(model, CATALOG, alternatives=4)
    np.testing.assert_array_equal(got.codes, torch.stack([first, second, third], 1).numpy())
    assert (second != torch.cdist(torch.nn.functional.normalize(torch.from_numpy(CATALOG), dim=-1)
                                  - model.anchor_book(0)[first], model.anchor_book(1)).argmin(1)).any()
    np.testing.assert_allclose(got.quantization_error, left.norm(dim=1).numpy(), rtol=1e-5, atol=1e-6)
    # an item's codes do not depend on the other items encoded with it
    pieces = [encode_array(model, CATALOG[i:i + 7], batch_size=5).codes for i in range(0, len(CATALOG), 7)]
    np.testing.assert_array_equal(np.concatenate(pieces), got.codes)
    restored = load_checkpoint(checkpoint_bytes(model))
    assert torch.equal(restored.anchor_offsets, model.anchor_offsets)
    np.testing.assert_array_equal(encode_array(restored, CATALOG).codes, got.codes)


def test_a_checkpoint_from_before_the_offsets_loads_as_nearest_centroid(balanced) -> None:  # type: ignore[no-untyped-def]
    payload = to_payload(balanced.model)
    del payload["state_dict"]["anchor_offsets"]
    old = model_from_payload(payload)
    assert bool((old.anchor_offsets == 0).all())
    r = torch.nn.functional.normalize(torch.from_numpy(CATALOG), dim=-1)
    first = torch.cdist(r, old.anchor_book(0)).argmin(1)
    second = torch.cdist(r - old.anchor_book(0)[first], old.anchor_book(1)).argmin(1)
    np.testing.assert_array_equal(encode_array(old, CATALOG).codes[:, 1], second.numpy())


def test_a_warm_start_grows_the_offsets_it_starts_from(balanced) -> None:  # type: ignore[no-untyped-def]
    old = balanced.model
    shifted = CATALOG + np.random.default_rng(1).normal(0, 0.02, CATALOG.shape).astype(np.float32)
    new = fit(shifted, FULL, TRAIN, init=old).model
    assert bool((new.anchor_offsets >= old.anchor_offsets).all())
    kept = (encode_array(new, CATALOG).codes == encode_array(old, CATALOG).codes).all(1).mean()
    assert kept > 0.4


def test_a_warm_start_with_the_cap_off_keeps_the_offsets_it_starts_from(balanced) -> None:  # type: ignore[no-untyped-def]
    old = balanced.model
    new = fit(CATALOG, FULL, dataclasses.replace(TRAIN, prefix_fill=0.0), init=old).model
    assert torch.equal(new.anchor_offsets, old.anchor_offsets)
    fresh = fit(CATALOG, FULL, dataclasses.replace(TRAIN, prefix_fill=0.0)).model
    assert not fresh.anchor_offsets.any()


def test_two_anchored_levels_and_a_learned_third_use_the_offsets_too() -> None:
    cfg = ModelConfig(input_dim=64, hidden_dims=(32,), latent_dim=8, num_levels=3, codebook_size=16, anchor_levels=2)
    model = fit(CATALOG, cfg, TRAIN).model.eval()
    assert float(model.anchor_offsets.max()) > 0
    r = torch.nn.functional.normalize(torch.from_numpy(CATALOG), dim=-1)
    first = torch.cdist(r, model.anchor_book(0)).argmin(1)
    second = (torch.cdist(r - model.anchor_book(0)[first], model.anchor_book(1)).pow(2)
              + model.anchor_offsets[first]).argmin(1)
    np.testing.assert_array_equal(encode_array(model, CATALOG).codes[:, 1], second.numpy())


@pytest.mark.parametrize(("levels", "anchored"), [(2, 2), (3, 1)])
def test_no_offsets_without_an_anchored_level_2_before_a_third(levels: int, anchored: int) -> None:
    cfg = ModelConfig(input_dim=64, hidden_dims=(32,), latent_dim=8, num_levels=levels, codebook_size=16,
                      anchor_levels=anchored)
    model = fit(CATALOG[:600], cfg, TRAIN).model
    assert not model.balances_prefixes and not hasattr(model, "anchor_offsets")
