"""Tests of rqvae.kmeans: blob recovery, degenerate inputs, nearest-centre search, seeding."""
from __future__ import annotations

import pytest
import torch

from rqvae.kmeans import kmeans, kmeans_plus_plus, nearest, squared_distances

CENTRES = torch.tensor([[0.0, 0.0, 0.0], [6.0, 0.0, 0.0], [0.0, 6.0, 0.0],
                        [0.0, 0.0, 6.0], [6.0, 6.0, 6.0], [-6.0, 3.0, 0.0]])  # (6, 3), >= 6 apart


def blob_points(n_per: int = 30, spread: float = 0.1, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return CENTRES.repeat_interleave(n_per, 0) + spread * torch.randn(len(CENTRES) * n_per, 3, generator=g)


def brute_force_sq(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    return (x.double()[:, None, :] - c.double()[None]).pow(2).sum(-1)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_recovers_well_separated_blob_centres(seed: int) -> None:
    found = kmeans(blob_points(seed=seed), len(CENTRES), iters=20, seed=seed)
    assert found.shape == CENTRES.shape and found.dtype == torch.float32
    dist = torch.cdist(CENTRES, found)  # (true, found)
    match = dist.argmin(1)
    assert sorted(match.tolist()) == list(range(len(CENTRES)))  # a one-to-one matching ...
    assert float(dist.min(1).values.max()) < 0.1  # ... onto the blob means


@pytest.mark.parametrize("seed", [0, 1])
def test_seeding_on_a_subset_still_recovers_the_blobs_and_uses_every_row(seed: int) -> None:
    from rqvae.kmeans import SEEDING_ROWS_PER_CENTER

    n_per = 3 * SEEDING_ROWS_PER_CENTER  # 6 * n_per rows > 6 * SEEDING_ROWS_PER_CENTER: seeded on a subset
    x = blob_points(n_per=n_per, spread=0.3, seed=seed)
    found = kmeans(x, len(CENTRES), iters=20, seed=seed)
    dist = torch.cdist(CENTRES, found)
    assert sorted(dist.argmin(1).tolist()) == list(range(len(CENTRES)))
    assign = brute_force_sq(x, found).argmin(1)  # the centres are the means of all rows, not of the subset
    for j in range(len(CENTRES)):
        torch.testing.assert_close(found[j], x[assign == j].mean(0), atol=1e-5, rtol=0)
    torch.testing.assert_close(kmeans(x, len(CENTRES), iters=20, seed=seed), found, atol=0, rtol=0)


def test_centres_are_the_means_of_their_clusters() -> None:
    x = blob_points(n_per=10, spread=0.5)
    c = kmeans(x, 6, iters=30)
    assign = brute_force_sq(x, c).argmin(1)
    for j in range(6):
        torch.testing.assert_close(c[j], x[assign == j].mean(0), atol=1e-5, rtol=0)


def test_fewer_distinct_points_than_k_gives_finite_centres_on_the_points() -> None:
    distinct = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
    x = distinct.repeat(10, 1)  # 30 rows, 3 distinct points, k = 6
    c = kmeans(x, 6, iters=5)
    assert c.shape == (6, 2) and bool(torch.isfinite(c).all())
    on_point = brute_force_sq(c, distinct).min(1).values
    assert float(on_point.max()) < 1e-10  # every centre is one of the points
    assert float(brute_force_sq(distinct, c).min(1).values.max()) < 1e-10  # every point has a centre


def test_identical_points() -> None:
    x = torch.ones(8, 3)
    c = kmeans(x, 4, iters=3)
    torch.testing.assert_close(c, torch.ones(4, 3))


def test_more_centres_than_rows_gives_finite_centres() -> None:
    x = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    c = kmeans(x, 5, iters=3)
    assert c.shape == (5, 2) and bool(torch.isfinite(c).all())


def test_nearest_equals_brute_force_argmin_in_any_chunking() -> None:
    g = torch.Generator().manual_seed(0)
    x, c = torch.randn(50, 5, generator=g), torch.randn(7, 5, generator=g)
    d = brute_force_sq(x, c)
    for chunk in (50, 7, 1):
        idx, dist = nearest(x, c, chunk=chunk)
        assert idx.dtype == torch.int64 and idx.shape == (50,) and dist.shape == (50,)
        assert torch.equal(idx, d.argmin(1))
        torch.testing.assert_close(dist.double(), d.min(1).values, atol=1e-5, rtol=1e-5)


def test_squared_distances_are_non_negative_on_duplicates() -> None:
    x = torch.full((4, 3), 1e3)
    d = squared_distances(x, x[:2])
    assert bool((d >= 0).all()) and float(d.max()) < 1.0  # cancellation is clamped, not negative
    torch.testing.assert_close(squared_distances(torch.tensor([[1.0, 2.0]]), torch.tensor([[4.0, 6.0]])),
                               torch.tensor([[25.0]]))


def test_kmeans_plus_plus_picks_distinct_data_points() -> None:
    x = torch.tensor([[0.0, 0.0], [5.0, 0.0], [0.0, 5.0], [5.0, 5.0], [9.0, 9.0]])
    c = kmeans_plus_plus(x, 5, torch.Generator().manual_seed(3))
    # a chosen point has probability 0 afterwards, so k = N picks every point once
    assert sorted(map(tuple, c.tolist())) == sorted(map(tuple, x.tolist()))


def test_same_seed_same_centres_other_seed_other_centres() -> None:
    x = torch.rand(300, 2, generator=torch.Generator().manual_seed(0))  # no cluster structure
    a, b = kmeans(x, 12, iters=3, seed=5), kmeans(x, 12, iters=3, seed=5)
    assert torch.equal(a, b)
    assert not torch.allclose(a, kmeans(x, 12, iters=3, seed=6))


def test_lloyd_from_given_centres_keeps_their_labels() -> None:
    # Two tight blobs; starting centres in reverse order: centre 0 must become the blob it started near.
    g = torch.Generator().manual_seed(0)
    points = torch.cat([torch.randn(50, 2, generator=g) * 0.1 + 5, torch.randn(50, 2, generator=g) * 0.1 - 5])
    start = torch.tensor([[-4.0, -4.0], [4.0, 4.0]])
    centres = kmeans(points, 2, iters=5, init=start)
    assert torch.allclose(centres[0], points[50:].mean(0), atol=1e-5)
    assert torch.allclose(centres[1], points[:50].mean(0), atol=1e-5)
    with pytest.raises(ValueError, match=r"init must have shape \(2, 2\)"):
        kmeans(points, 2, init=start[:1])


def test_tol_stops_once_the_assignment_settles() -> None:
    x = torch.randn(2000, 4, generator=torch.Generator().manual_seed(3))  # no blobs: Lloyd moves many rows
    # tol 1 stops at the second assignment, with the means of the first: one Lloyd iteration.
    torch.testing.assert_close(kmeans(x, 16, iters=50, seed=0, tol=1.0), kmeans(x, 16, iters=1, seed=0))
    # A tolerance that is met only at the fixed point changes nothing against running every iteration.
    settled = kmeans(x, 16, iters=300, seed=0)
    torch.testing.assert_close(kmeans(x, 16, iters=300, seed=0, tol=1e-9), settled)
    # In between, it stops part-way: its centers are those of a shorter full run, and the assignment they
    # give differs from the one they are the means of in at most tol of the rows.
    early = kmeans(x, 16, iters=300, seed=0, tol=0.01)
    steps = next(k for k in range(1, 301) if torch.equal(kmeans(x, 16, iters=k, seed=0), early))
    assert 1 < steps < 300 and not torch.equal(early, settled)
    before = nearest(x, kmeans(x, 16, iters=steps - 1, seed=0))[0]
    assert int((nearest(x, early)[0] != before).sum()) <= 0.01 * len(x)
