"""Collision-aware last level (rqvae.resolve.spread_last_level)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from rqvae import RQKMeans, RQKMeansConfig, encode_array, issue_codes
from rqvae.quantizer import _smallest_stable, ranked_codes
from rqvae.resolve import not_keepers, spread_last_level, suffixes_in_tuples
from rqvae.synthetic import CatalogSpec, make_catalog


def hand_made() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Items 0-2 share tuple (1, 5); item 3 alone on (1, 7); item 4 alone on (2, 5)."""
    codes = np.array([[1, 5], [1, 5], [1, 5], [1, 7], [2, 5]])
    errors = np.array([0.3, 0.1, 0.2, 0.5, 0.4], dtype=np.float32)
    alternatives = np.array([[5, 7, 6], [5, 7, 6], [5, 7, 8], [7, 5, 6], [5, 6, 7]])
    alt_errors = np.array([[0.3, 0.35, 0.4], [0.1, 0.6, 0.7], [0.2, 0.25, 0.9], [0.5, 0.6, 0.7], [0.4, 0.5, 0.6]],
                          dtype=np.float32)
    return codes, errors, alternatives, alt_errors


def test_only_colliding_items_move_and_the_best_fit_keeps_its_tuple() -> None:
    codes, errors, alternatives, alt_errors = hand_made()
    out = spread_last_level(codes, errors, alternatives, alt_errors)
    # Item 1 (error 0.1) keeps (1, 5). Item 2 (0.2) goes first among the others: 7 is held by item 3,
    # so it takes 8. Item 0 (0.3): 7 held, 6 free.
    np.testing.assert_array_equal(out.codes, [[1, 6], [1, 5], [1, 8], [1, 7], [2, 5]])
    np.testing.assert_allclose(out.quantization_error, [0.4, 0.1, 0.9, 0.5, 0.4])
    np.testing.assert_array_equal(out.moved, [True, False, True, False, False])
    np.testing.assert_array_equal(out.codes[:, :-1], codes[:, :-1])  # prefixes never change


def test_an_item_without_a_free_alternative_keeps_its_code() -> None:
    codes, errors, alternatives, alt_errors = hand_made()
    out = spread_last_level(codes, errors, alternatives[:, :2], alt_errors[:, :2])  # only 5 and 7 offered
    np.testing.assert_array_equal(out.codes[:, 1], [5, 5, 5, 7, 5])
    assert not out.moved.any()


def test_issued_tuples_are_never_handed_out_again() -> None:
    codes, errors, alternatives, alt_errors = hand_made()
    out = spread_last_level(codes, errors, alternatives, alt_errors, taken=np.array([[1, 6], [2, 5]]))
    # (1, 6) is issued: item 0 cannot take it and keeps (1, 5) beside item 1 (a suffix tells them apart).
    # (2, 5) is issued: item 4 moves to 6.
    np.testing.assert_array_equal(out.codes, [[1, 5], [1, 5], [1, 8], [1, 7], [2, 6]])
    assert {tuple(r) for r in out.codes[out.moved]}.isdisjoint({(1, 6), (2, 5)})


def test_the_result_does_not_depend_on_row_order_and_tiebreak_orders_equal_errors() -> None:
    codes, errors, alternatives, alt_errors = hand_made()
    errors = np.full(5, 0.2, dtype=np.float32)
    ids = np.array([40, 10, 30, 20, 50])
    out = spread_last_level(codes, errors, alternatives, alt_errors, tiebreak=ids)
    perm = np.random.default_rng(1).permutation(5)
    shuffled = spread_last_level(codes[perm], errors[perm], alternatives[perm], alt_errors[perm], tiebreak=ids[perm])
    np.testing.assert_array_equal(shuffled.codes, out.codes[perm])
    assert tuple(out.codes[1]) == (1, 5)  # the smallest key keeps the tuple


def test_on_a_crowded_catalog_it_gives_more_distinct_tuples_and_moves_only_within_alternatives() -> None:
    cat = make_catalog(CatalogSpec(n_items=4000, dim=16, seed=5))
    model = RQKMeans.fit(cat.embeddings, RQKMeansConfig(input_dim=16, num_levels=2, codebook_size=96), seed=0)
    r = encode_array(model, cat.embeddings, alternatives=8)
    out = spread_last_level(r.codes, r.quantization_error, r.alternatives, r.alternative_errors)
    before, after = len(np.unique(r.codes, axis=0)), len(np.unique(out.codes, axis=0))
    assert after > before * 1.05, (before, after)
    assert after - before == out.moved.sum()  # each move frees nothing and fills one new tuple
    # Every moved item holds a tuple of its own, taken from its own alternatives.
    _, inverse, counts = np.unique(out.codes, axis=0, return_inverse=True, return_counts=True)
    assert (counts[inverse.reshape(-1)][out.moved] == 1).all()
    assert all(out.codes[i, -1] in r.alternatives[i, 1:] for i in np.flatnonzero(out.moved))
    # Each moved item's error is that alternative's error, never below its nearest code's.
    assert (out.quantization_error[out.moved] >= r.quantization_error[out.moved]).all()


def test_it_refuses_alternatives_that_do_not_start_with_the_items_code() -> None:
    codes, errors, alternatives, alt_errors = hand_made()
    with pytest.raises(ValueError, match="nearest first"):
        spread_last_level(codes, errors, alternatives[:, ::-1], alt_errors)


def test_ranked_alternatives_start_with_the_encoded_code_and_rank_by_error() -> None:
    cat = make_catalog(CatalogSpec(n_items=600, dim=16, seed=2))
    model = RQKMeans.fit(cat.embeddings, RQKMeansConfig(input_dim=16, num_levels=3, codebook_size=32), seed=0)
    plain = encode_array(model, cat.embeddings)
    r = encode_array(model, cat.embeddings, alternatives=5)
    np.testing.assert_array_equal(r.codes, plain.codes)
    np.testing.assert_array_equal(r.quantization_error, plain.quantization_error)
    np.testing.assert_array_equal(r.alternatives[:, 0], r.codes[:, -1])
    np.testing.assert_array_equal(r.alternative_errors[:, 0], r.quantization_error)  # the same bits
    assert (np.diff(r.alternative_errors, axis=1) >= -1e-6).all()
    # every alternative's error is |residual before the last level - that code's centroid|
    x = torch.nn.functional.normalize(torch.from_numpy(cat.embeddings), dim=-1)
    before_last = x - model.codebooks[0][r.codes[:, 0]] - model.codebooks[1][r.codes[:, 1]]
    explicit = (before_last.unsqueeze(1) - model.codebooks[2][torch.from_numpy(r.alternatives).long()]).norm(dim=-1)
    np.testing.assert_allclose(r.alternative_errors, explicit.numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("levels_of_distance", [6, 100_000])  # 6: rows full of exact ties
def test_ranked_codes_are_the_stable_sorts_first_columns_ties_included(levels_of_distance) -> None:
    """The top-k in ranked_codes must pick and order exactly as a stable sort of all K distances does
    (equal distances by code number), or column 0 would disagree with ``nearest`` and the spread would
    hand out other codes than before."""
    generator = torch.Generator().manual_seed(levels_of_distance)
    for k in (1, 5, 16, 31):
        d = torch.randint(0, levels_of_distance, (256, 32), generator=generator).float()
        np.testing.assert_array_equal(_smallest_stable(d, k).numpy(),
                                      d.sort(dim=1, stable=True).indices[:, :k].numpy())
    book = torch.tensor([[0.0], [1.0], [-1.0], [2.0], [-2.0], [1.0]])  # ties: codes 1 and 5, and 1 and 2 for 0
    order, errors = ranked_codes(torch.tensor([[0.0], [1.0]]), book, 4)
    assert order.tolist() == [[0, 1, 2, 5], [1, 5, 0, 3]]
    np.testing.assert_allclose(errors.numpy(), [[0, 1, 1, 1], [0, 0, 1, 1]])
    # three codes tie for the second place of a 2-best list: the lowest code number takes it
    assert ranked_codes(torch.tensor([[0.0]]), book, 2)[0].tolist() == [[0, 1]]


def test_suffixes_follow_error_then_tiebreak_with_unknown_errors_after_nan_in_any_row_order() -> None:
    codes = np.array([[1, 2], [1, 2], [1, 2], [1, 2], [3, 4], [1, 2]])
    errors = np.array([0.5, np.nan, 0.1, 0.0, 0.9, 0.1], np.float32)
    ids = np.array([10, 11, 12, 13, 14, 9])
    missing = np.array([False, False, False, True, False, False])  # row 3's error is unknown (its 0.0 is filler)
    # (1, 2) in order: 0.1 (id 9), 0.1 (id 12), 0.5, NaN, unknown; the lone tuple (3, 4) gets 0.
    assert suffixes_in_tuples(codes, errors, ids, missing).tolist() == [2, 3, 1, 4, 0, 0]
    perm = np.random.default_rng(0).permutation(6)
    shuffled = suffixes_in_tuples(codes[perm], errors[perm], ids[perm], missing[perm])
    assert shuffled.tolist() == [[2, 3, 1, 4, 0, 0][i] for i in perm]
    assert suffixes_in_tuples(np.zeros((0, 2), int), np.zeros(0), np.zeros(0)).tolist() == []


def test_an_unknown_error_never_keeps_a_shared_tuple_from_a_known_one() -> None:
    # Both on (0, 0): the unknown error's filler value 0.0 would win if it were read as an error.
    out = spread_last_level(np.array([[0, 0], [0, 0]]), np.array([0.0, 0.7], np.float32),
                            np.array([[0, 1], [0, 1]]), np.array([[0.0, 0.8], [0.7, 0.9]], np.float32),
                            missing=np.array([True, False]))
    assert out.codes.tolist() == [[0, 1], [0, 0]] and out.moved.tolist() == [True, False]


def test_not_keepers_are_every_holder_of_a_shared_tuple_but_the_best_fitting() -> None:
    codes = np.array([[0, 1], [0, 1], [0, 2], [0, 1], [3, 3], [3, 3]])
    errors = np.array([0.5, 0.2, 0.9, 0.2, 0.1, 0.1])
    # tuple (0,1): rows 1 and 3 tie at 0.2, the lower row number keeps it; (3,3): rows 4, 5 tie, 4 keeps
    np.testing.assert_array_equal(not_keepers(codes, errors), [0, 3, 5])
    # the tie-break keys decide ties instead of the row numbers: row 3 and row 5 now keep
    np.testing.assert_array_equal(not_keepers(codes, errors, tiebreak=np.array([5, 4, 3, 2, 1, 0])), [0, 1, 4])
    assert not_keepers(np.zeros((0, 2), dtype=int), np.zeros(0)).shape == (0,)


def test_not_keepers_after_the_spreading_are_the_items_a_suffix_tells_apart() -> None:
    rng = np.random.default_rng(5)
    n, k = 300, 4
    codes = np.column_stack([rng.integers(0, 3, n), rng.integers(0, 8, n)])
    errors = rng.random(n).astype(np.float32)
    alternatives = np.column_stack([codes[:, 1], *(rng.integers(0, 8, n) for _ in range(k - 1))])
    spread = spread_last_level(codes, errors, alternatives, np.tile(errors[:, None], (1, k)) + 0.01)
    suffix = suffixes_in_tuples(spread.codes, spread.quantization_error, np.arange(n))
    left = not_keepers(spread.codes, spread.quantization_error)
    assert len(left) > 0
    np.testing.assert_array_equal(left, np.flatnonzero(suffix >= 1))


def test_the_second_chance_frees_a_family_the_alternatives_cannot() -> None:
    """rqvae.issue_codes' second chance (the change bench/RESULTS.md measures on the Debian catalog): a family
    of near-duplicates larger than the alternatives can spread leaves items sharing a tuple; encoded again with
    every last-level code ranked, each takes a free one. Prefixes never change, items that kept their tuple keep
    it, and the result is collision-free when the prefixes have room."""
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(4, 8)).astype(np.float32) * 4
    family = centers[0] + rng.normal(scale=0.01, size=(40, 8)).astype(np.float32)  # 40 near-copies
    rest = (centers[rng.integers(1, 4, 200)] + rng.normal(size=(200, 8))).astype(np.float32)
    x = np.concatenate([family, rest])
    model = RQKMeans.fit(x, RQKMeansConfig(input_dim=8, num_levels=2, codebook_size=64, normalize_inputs=False),
                         seed=1)

    once = issue_codes(model, x, 3, second_chance=False).codes
    twice = issue_codes(model, x, 3).codes

    def shared(codes: np.ndarray) -> int:
        _, counts = np.unique(codes, axis=0, return_counts=True)
        return int(counts[counts > 1].sum())

    assert shared(once) > 10  # the 3 alternatives cannot spread the family
    assert shared(twice) == 0
    np.testing.assert_array_equal(twice[:, :-1], once[:, :-1])
    _, tuple_id, counts = np.unique(once, axis=0, return_inverse=True, return_counts=True)
    tuple_id = tuple_id.reshape(-1)
    unique = counts[tuple_id] == 1
    np.testing.assert_array_equal(twice[unique], once[unique])  # an item nobody shared with is never moved
    for t in np.flatnonzero(counts > 1):  # of a shared tuple's holders exactly one keeps it
        holders = np.flatnonzero(tuple_id == t)
        assert int((twice[holders] == once[holders]).all(axis=1).sum()) == 1
