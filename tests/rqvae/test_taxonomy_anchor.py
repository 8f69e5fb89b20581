"""The taxonomy-guided input-space anchor (rqvae.taxonomy.guided_centers; the regularizer's coarse part)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from rqvae import ModelConfig, TrainConfig, encode_array, fit
from rqvae.kmeans import kmeans, nearest
from rqvae.metrics import _cluster_class_agreement
from rqvae.synthetic import CatalogSpec, make_catalog
from rqvae.taxonomy import category_means, guided_centers, guiding_depth


def tall_box(n: int = 2000, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Points uniform in [0, 1] x [0, 3]: k-means with K = 2 cuts across the long (y) axis, but the
    categories split the box along x (left / right)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 2, generator=g) * torch.tensor([1.0, 3.0])
    return x, (x[:, 0] >= 0.5).long()


def nmi(assign: torch.Tensor, labels: torch.Tensor) -> float:
    return _cluster_class_agreement(1, assign.numpy().astype(np.int64), labels.numpy().astype(np.int64)).nmi


def test_guiding_depth_is_the_shallowest_with_enough_categories() -> None:
    ids = np.array([[0, 0, 0], [0, 1, 2], [0, 1, 3], [0, 2, 4], [0, 2, -1]])  # 1, 3, 4 known categories
    assert guiding_depth(ids, 3) == 1
    assert guiding_depth(ids, 4) == 2
    assert guiding_depth(ids, 9) == 2  # none has 9: the one with the most


def test_category_means_average_each_category_and_keep_unknown_rows() -> None:
    rows = torch.tensor([[1.0, 0.0], [3.0, 2.0], [5.0, 5.0], [7.0, 7.0]])
    got = category_means(rows, torch.tensor([4, 4, -1, 9]))
    torch.testing.assert_close(got, torch.tensor([[2.0, 1.0], [2.0, 1.0], [5.0, 5.0], [7.0, 7.0]]))


def test_guided_cells_follow_the_categories_where_k_means_does_not() -> None:
    x, category = tall_box()
    plain = nearest(x, kmeans(x, 2, seed=0))[0]
    centers = guided_centers(x, category, 2, scale=4.0, epochs=3, iters=25, seed=0)
    guided = nearest(x, centers)[0]  # assigned from x alone
    assert nmi(plain, category) < 0.1
    assert nmi(guided, category) > 0.8
    # New items, whose categories were never seen, fall in the cells of their category too.
    fresh, fresh_category = tall_box(seed=1)
    assert nmi(nearest(fresh, centers)[0], fresh_category) > 0.8


def test_a_warm_start_keeps_each_guided_codes_meaning() -> None:
    x, category = tall_box()
    first = guided_centers(x, category, 2, scale=4.0, epochs=3, iters=25, seed=0)
    swapped = first.flip(0)  # a previous model whose code 0 is the right half
    again = guided_centers(x, category, 2, scale=4.0, epochs=3, iters=25, seed=5, init=swapped)
    assert (nearest(x, again)[0] == nearest(x, swapped)[0]).float().mean() > 0.95


@pytest.fixture(scope="module")
def catalog():
    return make_catalog(CatalogSpec(1500, 16, seed=0))


def _fit(catalog, weight: float, categories: bool, **train: object):
    m = ModelConfig(input_dim=16, hidden_dims=(32,), latent_dim=8, num_levels=3, codebook_size=16,
                    anchor_levels=2, anchor_reconstruction=True)
    t = TrainConfig(epochs=2, taxonomy_weight=weight, **train)  # type: ignore[arg-type]
    return fit(catalog.embeddings, m, t, category_ids=catalog.category_ids if categories else None).model


def test_the_regularizer_guides_the_anchor_and_lambda_zero_leaves_it_alone(catalog) -> None:
    plain = _fit(catalog, 0.0, categories=False)
    unused = _fit(catalog, 0.0, categories=True)  # lambda = 0: the categories change nothing
    torch.testing.assert_close(unused.anchor, plain.anchor, atol=0, rtol=0)
    guided = _fit(catalog, 0.01, categories=True)
    unguided = _fit(catalog, 0.01, categories=True, taxonomy_anchor_scale=0.0)
    assert not torch.equal(guided.anchor, unguided.anchor)
    torch.testing.assert_close(unguided.anchor, plain.anchor, atol=0, rtol=0)  # only the losses differ there
    # Encoding needs embeddings only, and the same seed gives the same codes.
    again = _fit(catalog, 0.01, categories=True)
    np.testing.assert_array_equal(encode_array(guided, catalog.embeddings).codes,
                                  encode_array(again, catalog.embeddings).codes)

