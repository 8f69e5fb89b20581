"""Tests of rqvae.metrics: every metric against a small example whose value is worked out by hand."""
from __future__ import annotations

import ast
import math
from pathlib import Path

import numpy as np
import pytest

from rqvae import metrics
from rqvae.metrics import (
    CodeUsage,
    TupleStats,
    code_usage_from_counts,
    evaluate_codes,
    format_metrics_table,
    level_usage,
    nearest_neighbours,
    nn_overlap,
    prefix_coincidence,
    reconstruction_cosine,
    taxonomy_agreement,
    tuple_stats,
)

# Four items, two levels: items 0 and 1 collide; level 1 uses codes {0, 1}, level 2 uses {1, 2, 3}.
CODES = np.array([[0, 1], [0, 1], [0, 2], [1, 3]])


def test_imports_only_numpy_and_stdlib() -> None:
    tree = ast.parse(Path(metrics.__file__).read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert imported <= {"__future__", "math", "dataclasses", "numpy"}


def test_tuple_stats_hand_example() -> None:
    # tuples (0,1) x2, (0,2), (1,3): 3 distinct of 4 -> unique 3/4; items 0, 1 collide -> 2/4.
    assert tuple_stats(CODES) == TupleStats(
        n_items=4, distinct_tuples=3, unique_rate=0.75, collision_rate=0.25,
        items_in_collisions=0.5, max_group_size=2,
    )


def test_tuple_stats_uses_the_whole_tuple_not_the_last_code() -> None:
    # (0,5) and (1,5) share the last code but are different tuples; (7,9) appears three times.
    codes = np.array([[0, 5], [1, 5], [7, 9], [7, 9], [7, 9]])
    stats = tuple_stats(codes)
    assert stats.distinct_tuples == 3  # {(0,5), (1,5), (7,9)}
    assert stats.unique_rate == pytest.approx(3 / 5)
    assert stats.items_in_collisions == pytest.approx(3 / 5)  # the three (7,9) items
    assert stats.max_group_size == 3


def test_tuple_stats_all_unique_and_wide_code_values() -> None:
    codes = np.array([[2**31 - 1, 0, 3], [0, 2**31 - 1, 3], [2**31 - 1, 2**31 - 1, 3]], dtype=np.int64)
    stats = tuple_stats(codes)
    assert (stats.distinct_tuples, stats.unique_rate, stats.collision_rate) == (3, 1.0, 0.0)
    assert (stats.items_in_collisions, stats.max_group_size) == (0.0, 1)


def test_tuple_stats_rejects_empty_and_bad_shapes() -> None:
    with pytest.raises(ValueError, match="N=0"):
        tuple_stats(np.zeros((0, 3), dtype=np.int64))
    with pytest.raises(ValueError, match="2-D"):
        tuple_stats(np.array([1, 2, 3]))
    with pytest.raises(TypeError, match="integer"):
        tuple_stats(np.zeros((2, 2), dtype=np.float32))


def test_code_usage_two_of_four_codes_evenly() -> None:
    # counts [2,2,0,0]: p = (1/2, 1/2) -> H = ln 2, perplexity 2.
    # Gini: sorted (0,0,2,2), weights 2i-K-1 = (-3,-1,1,3): (1*2 + 3*2) / (4 * 4) = 8/16 = 0.5.
    usage = code_usage_from_counts(np.array([2, 2, 0, 0]))
    assert (usage.codebook_size, usage.used_codes, usage.dead_codes) == (4, 2, 2)
    assert usage.utilization == 0.5
    assert usage.entropy == pytest.approx(math.log(2))
    assert usage.perplexity == pytest.approx(2.0)
    assert usage.gini == pytest.approx(0.5)


def test_code_usage_single_code_used() -> None:
    # One code holds everything: H = 0, perplexity 1; Gini = (K-1)/K = 3/4 for K = 4 ((3*5)/(4*5)).
    usage = code_usage_from_counts(np.array([0, 0, 0, 5]))
    assert usage == CodeUsage(codebook_size=4, used_codes=1, utilization=0.25, dead_codes=3,
                              entropy=0.0, perplexity=1.0, gini=0.75)


def test_code_usage_uneven_counts() -> None:
    # counts [4,1,3,2], total 10, p = (.4,.1,.3,.2).
    # Gini: sorted (1,2,3,4), weights (-3,-1,1,3): -3 - 2 + 3 + 12 = 10; 10 / (4 * 10) = 0.25.
    usage = code_usage_from_counts(np.array([4, 1, 3, 2]))
    entropy = -(0.4 * math.log(0.4) + 0.1 * math.log(0.1) + 0.3 * math.log(0.3) + 0.2 * math.log(0.2))
    assert usage.entropy == pytest.approx(entropy)  # 1.279854
    assert usage.perplexity == pytest.approx(math.exp(entropy))
    assert usage.gini == pytest.approx(0.25)
    assert usage.utilization == 1.0


def test_code_usage_even_counts_have_zero_gini() -> None:
    usage = code_usage_from_counts(np.array([3, 3, 3, 3]))
    assert usage.gini == pytest.approx(0.0)
    assert usage.perplexity == pytest.approx(4.0)  # exp(ln 4)


@pytest.mark.parametrize("counts", [np.array([], dtype=np.int64), np.zeros((2, 2)), np.array([1, -1]),
                                    np.array([0, 0])])
def test_code_usage_rejects_bad_counts(counts: np.ndarray) -> None:
    with pytest.raises(ValueError):
        code_usage_from_counts(counts)


def test_level_usage_per_column() -> None:
    first, second = level_usage(CODES, codebook_size=4)
    # level 1 counts [3,1,0,0]: H = -(.75 ln .75 + .25 ln .25); Gini sorted (0,0,1,3): (1 + 9) / 16.
    assert (first.used_codes, first.dead_codes, first.utilization) == (2, 2, 0.5)
    assert first.entropy == pytest.approx(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))  # 0.562335
    assert first.gini == pytest.approx(10 / 16)
    # level 2 counts [0,2,1,1]: p = (.5,.25,.25); Gini sorted (0,1,1,2): (-1 + 1 + 6) / 16.
    assert (second.used_codes, second.utilization) == (3, 0.75)
    assert second.perplexity == pytest.approx(math.exp(-(0.5 * math.log(0.5) + 0.5 * math.log(0.25))))
    assert second.gini == pytest.approx(6 / 16)


def test_level_usage_rejects_codes_outside_the_codebook() -> None:
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        level_usage(CODES, codebook_size=3)


def test_reconstruction_cosine_hand_example() -> None:
    x = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 0.0]])
    x_hat = np.array([[2.0, 0.0], [0.0, 1.0], [0.0, 3.0], [1.0, 0.0], [1.0, 0.0]])
    # cosines 1, 0, 1, 1/sqrt(2), 0 (zero-norm row) -> sorted (0, 0, .7071, 1, 1)
    stats = reconstruction_cosine(x, x_hat)
    assert stats.mean == pytest.approx((2 + 1 / math.sqrt(2)) / 5)  # 0.541421
    assert stats.p50 == pytest.approx(1 / math.sqrt(2))
    assert stats.p10 == pytest.approx(0.0)  # position 0.4 between two zeros


def test_reconstruction_cosine_interpolates_percentiles() -> None:
    # cosines (-1, 1): p10 at position 0.1 -> -1 + 0.1 * 2 = -0.8; p50 = 0.
    stats = reconstruction_cosine(np.array([[1.0, 0.0], [1.0, 0.0]]), np.array([[-1.0, 0.0], [2.0, 0.0]]))
    assert (stats.mean, stats.p10, stats.p50) == (pytest.approx(0.0), pytest.approx(-0.8), pytest.approx(0.0))


def test_reconstruction_cosine_rejects_shape_mismatch() -> None:
    with pytest.raises(ValueError):
        reconstruction_cosine(np.ones((3, 2)), np.ones((3, 4)))


# Unit directions: 0 = east, 1 = north, 2 = west, 3 = south, 4 = (3, 1) just north of east.
COMPASS = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0], [3.0, 1.0]])


def test_nearest_neighbours_order_and_ties() -> None:
    # From north (1): cos with 4 = 1/sqrt(10), with east and west exactly 0 (tie -> lower index 0 first),
    # with south -1. From east (0): 4 (cos .949), then north and south tie at 0, then west.
    got = nearest_neighbours(COMPASS, np.array([1, 0]), k=4)
    np.testing.assert_array_equal(got, [[4, 0, 2, 3], [4, 1, 3, 2]])
    # k = 2 cuts through the tie: the lower index must win there too.
    np.testing.assert_array_equal(nearest_neighbours(COMPASS, np.array([1, 0]), k=2), [[4, 0], [4, 1]])


def test_nearest_neighbours_all_tied_rows_and_self_exclusion() -> None:
    x = np.ones((6, 3))  # every pair has cosine 1: neighbours are the lowest other indices
    got = nearest_neighbours(x, np.array([0, 3, 5]), k=3, chunk=2)
    np.testing.assert_array_equal(got, [[1, 2, 3], [0, 1, 2], [0, 1, 2]])
    np.testing.assert_array_equal(nearest_neighbours(x, np.array([0, 3]), k=1), [[1], [0]])  # argmax path


def test_nearest_neighbours_is_scale_invariant_and_chunk_independent() -> None:
    rng = np.random.default_rng(3)
    x = rng.standard_normal((50, 5))
    scaled = x * rng.uniform(0.1, 10.0, size=(50, 1))
    queries = np.arange(50)
    full = nearest_neighbours(x, queries, k=5)
    np.testing.assert_array_equal(nearest_neighbours(scaled, queries, k=5, chunk=7), full)
    assert not (full == queries[:, None]).any()
    np.testing.assert_array_equal(nearest_neighbours(x, queries, k=1), full[:, :1])


def test_nearest_neighbours_rejects_bad_k_and_queries() -> None:
    with pytest.raises(ValueError, match="k must be"):
        nearest_neighbours(COMPASS, np.array([0]), k=5)
    with pytest.raises(ValueError, match="queries"):
        nearest_neighbours(COMPASS, np.array([5]), k=1)


def _directions(degrees: list[float]) -> np.ndarray:
    rad = np.deg2rad(np.asarray(degrees))
    return np.stack([np.cos(rad), np.sin(rad)], axis=1)


# Three tight pairs: rows (0,1) near 0 deg, (2,3) near 120 deg, (4,5) near 240 deg.
PAIRS = _directions([0, 5, 120, 125, 240, 245])
# Same points, but rows 3 and 4 swapped: the pairs become (0,1), (2,4), (3,5).
PAIRS_SWAPPED = _directions([0, 5, 120, 240, 125, 245])


def test_nn_overlap_identity_is_one() -> None:
    assert nn_overlap(PAIRS, PAIRS, k=1) == 1.0
    assert nn_overlap(PAIRS, PAIRS * 3.0, k=2, n_queries=3) == 1.0


def test_nn_overlap_hand_example() -> None:
    # 1-NN in x: 0<->1, 2<->3, 4<->5; in x_hat: 0<->1, 2<->4, 3<->5. Only rows 0 and 1 keep theirs: 2/6.
    assert nn_overlap(PAIRS, PAIRS_SWAPPED, k=1) == pytest.approx(2 / 6)


def test_nn_overlap_samples_queries_with_the_seeded_rng() -> None:
    # Documented sampling: n_queries rows without replacement by default_rng(seed); rows 0, 1 are hits.
    sampled = np.random.default_rng(7).choice(6, size=3, replace=False)
    expected = np.isin(sampled, [0, 1]).mean()
    assert nn_overlap(PAIRS, PAIRS_SWAPPED, k=1, n_queries=3, seed=7) == pytest.approx(expected)


def test_prefix_coincidence_hand_example() -> None:
    # 1-NN pairs: 0<->1, 2<->3 (PAIRS rows 0-3 minus the last pair, as 4 points).
    x = PAIRS[:4]
    codes = np.array([[0, 0], [0, 1], [1, 2], [1, 2]])
    result = prefix_coincidence(x, codes)
    # level 1: all four pairs agree on the first code; level 2: only (2,3) and (3,2) -> 2/4.
    assert result.nn == [1.0, 0.5]


def test_prefix_coincidence_random_pairs_never_use_the_query_itself() -> None:
    # Level 1 is shared by everyone (random rate exactly 1); level 2 codes are all distinct, so a random
    # partner can only match if it were the query itself (rate exactly 0).
    codes = np.stack([np.zeros(6, dtype=np.int64), np.arange(6)], axis=1)
    result = prefix_coincidence(PAIRS, codes, seed=3)
    assert result.random == [1.0, 0.0]
    assert result.nn == [1.0, 0.0]


def test_prefix_coincidence_random_rate_matches_group_share() -> None:
    # Two equal groups of 200: a uniform other item is in the same group with prob 199/399 ~ 0.499.
    rng = np.random.default_rng(0)
    x = rng.standard_normal((400, 4))
    codes = (np.arange(400) % 2)[:, None]
    result = prefix_coincidence(x, codes, n_queries=400)
    assert result.random[0] == pytest.approx(199 / 399, abs=0.08)


def test_taxonomy_agreement_hand_example() -> None:
    codes = np.array([[0, 0], [0, 0], [0, 1], [1, 0]])
    categories = np.array([[5, 50], [5, 51], [7, -1], [7, 71]])
    first, second = taxonomy_agreement(codes, categories)
    # Level 1: clusters {0,1,2} (classes 5,5,7) and {3} (class 7). Purity (2 + 1)/4.
    # I = .5 ln(.5/(.75*.5)) + .25 ln(.25/(.75*.5)) + .25 ln(.25/(.25*.5)) = 0.215762
    # H(U) = -(.75 ln .75 + .25 ln .25) = 0.562335, H(V) = ln 2 = 0.693147 -> NMI = 0.343712
    mutual = 0.5 * math.log(4 / 3) + 0.25 * math.log(2 / 3) + 0.25 * math.log(2)
    h_u, h_v = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25)), math.log(2)
    assert (first.level, first.n_items) == (1, 4)
    assert first.purity == pytest.approx(0.75)
    assert first.nmi == pytest.approx(2 * mutual / (h_u + h_v))
    assert first.nmi == pytest.approx(0.343712, abs=1e-6)
    # Level 2: row 2 unknown (-1) -> n = 3; clusters {0,1} (classes 50,51) and {3} (71): purity 2/3.
    # V determines U, so I = H(U) = -(2/3 ln 2/3 + 1/3 ln 1/3) = 0.636514; H(V) = ln 3 -> NMI = 0.733680
    h_u2 = -(2 / 3 * math.log(2 / 3) + 1 / 3 * math.log(1 / 3))
    assert (second.level, second.n_items) == (2, 3)
    assert second.purity == pytest.approx(2 / 3)
    assert second.nmi == pytest.approx(2 * h_u2 / (h_u2 + math.log(3)))


def test_taxonomy_agreement_degenerate_cases() -> None:
    codes = np.array([[0, 0, 0], [0, 1, 0], [0, 2, 0], [0, 3, 0]])
    categories = np.array([[1, 10], [1, 10], [1, 11], [1, -1]])
    first, second = taxonomy_agreement(codes, categories)  # min(L=3, T=2) = 2 levels
    # Level 1: one cluster and one class -> both entropies 0 -> NMI 1; purity 4/4.
    assert (first.purity, first.nmi) == (1.0, 1.0)
    # Level 2: 3 singleton clusters, 2 classes; every cluster is pure -> purity 1; H(U), H(V) > 0.
    assert second.purity == 1.0 and 0.0 < second.nmi < 1.0
    # One cluster, two classes -> exactly one entropy is 0 -> NMI 0; purity = 2/3 (majority class).
    (only,) = taxonomy_agreement(np.zeros((3, 1), dtype=np.int64), np.array([[4], [4], [9]]))
    assert (only.purity, only.nmi) == (pytest.approx(2 / 3), 0.0)
    (unknown,) = taxonomy_agreement(np.zeros((2, 1), dtype=np.int64), np.array([[-1], [-1]]))
    assert unknown.n_items == 0 and math.isnan(unknown.purity) and math.isnan(unknown.nmi)


def test_taxonomy_agreement_relabelled_perfect_match() -> None:
    codes = np.array([[3, 0], [3, 0], [1, 0], [1, 2]])
    categories = np.array([[20], [20], [10], [10]])
    (level,) = taxonomy_agreement(codes, categories)
    assert (level.purity, level.nmi) == (1.0, pytest.approx(1.0))


def test_evaluate_codes_names_and_values() -> None:
    x = PAIRS[:4]
    categories = np.array([[5, 50], [5, 51], [7, -1], [7, 71]])
    got = evaluate_codes(x, CODES, codebook_size=4, x_hat=x, category_ids=categories, k=1)
    per_level = ["utilization", "dead_codes", "perplexity", "entropy", "gini", "prefix_nn", "prefix_random"]
    expected_names = (
        ["unique_rate", "collision_rate", "items_in_collisions", "max_group_size", "distinct_tuples"]
        + [f"l{lv}_{name}" for lv in (1, 2) for name in per_level]
        + ["recon_cos_mean", "recon_cos_p10", "recon_cos_p50", "nn_overlap_at_1"]
        + ["l1_purity", "l1_nmi", "l2_purity", "l2_nmi"]
    )
    assert list(got) == expected_names
    assert (got["unique_rate"], got["max_group_size"], got["distinct_tuples"]) == (0.75, 2, 3)
    assert isinstance(got["max_group_size"], int) and isinstance(got["l1_dead_codes"], int)
    assert (got["l1_utilization"], got["l2_utilization"], got["l2_gini"]) == (0.5, 0.75, 6 / 16)
    # 1-NN pairs 0<->1, 2<->3; CODES rows 0,1 = (0,1),(0,1) share both levels, rows 2,3 = (0,2),(1,3)
    # share none -> 2/4 at both levels.
    assert (got["l1_prefix_nn"], got["l2_prefix_nn"]) == (0.5, 0.5)
    assert got["recon_cos_mean"] == pytest.approx(1.0) and got["nn_overlap_at_1"] == 1.0


def test_evaluate_codes_without_optional_inputs() -> None:
    got = evaluate_codes(PAIRS[:4], CODES, codebook_size=4)
    assert "recon_cos_mean" not in got and "l1_purity" not in got
    assert len(got) == 5 + 2 * 7


def test_format_metrics_table_markdown() -> None:
    table = format_metrics_table({"a": {"unique_rate": 0.75, "max_group_size": 2}, "b": {"unique_rate": 1.0}})
    assert table == "\n".join([
        "| metric         |      a |      b |",
        "|----------------|-------:|-------:|",
        "| unique_rate    | 0.7500 | 1.0000 |",
        "| max_group_size |      2 |    n/a |",
    ])


def test_format_metrics_table_rounds_and_handles_nan() -> None:
    table = format_metrics_table({"m": {"x": 1 / 3, "y": float("nan"), "z": np.int64(7)}})
    assert table.splitlines()[2:] == ["| x      | 0.3333 |", "| y      |    nan |", "| z      |      7 |"]
