"""Tests of rqvae.synthetic: determinism, streaming, taxonomy ids and the neighbour structure."""
from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest

from rqvae import synthetic
from rqvae.metrics import nearest_neighbours
from rqvae.synthetic import CatalogSpec, SyntheticCatalog, iter_catalog_chunks, make_catalog

SMALL = CatalogSpec(n_items=3000, dim=16, seed=5)


def _assert_same_catalog(a: SyntheticCatalog, b: SyntheticCatalog) -> None:
    np.testing.assert_array_equal(a.item_ids, b.item_ids)
    np.testing.assert_array_equal(a.embeddings, b.embeddings)
    np.testing.assert_array_equal(a.category_ids, b.category_ids)
    assert a.branching == b.branching


def test_imports_only_numpy_and_stdlib() -> None:
    tree = ast.parse(Path(synthetic.__file__).read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert imported <= {"__future__", "collections", "dataclasses", "functools", "math", "typing", "numpy"}


def test_shapes_dtypes_and_unit_norm() -> None:
    cat = make_catalog(SMALL)
    assert len(cat) == 3000
    assert cat.item_ids.dtype == np.int64 and cat.embeddings.dtype == np.float32
    assert cat.category_ids.dtype == np.int32 and cat.category_ids.shape == (3000, 3)
    assert cat.embeddings.shape == (3000, 16)
    np.testing.assert_array_equal(cat.item_ids, np.arange(3000))
    np.testing.assert_allclose(np.linalg.norm(cat.embeddings, axis=1), 1.0, atol=1e-5)


def test_deterministic_per_seed() -> None:
    _assert_same_catalog(make_catalog(SMALL), make_catalog(CatalogSpec(n_items=3000, dim=16, seed=5)))
    other = make_catalog(CatalogSpec(n_items=3000, dim=16, seed=6))
    assert not np.array_equal(other.embeddings, make_catalog(SMALL).embeddings)
    assert not np.array_equal(other.category_ids, make_catalog(SMALL).category_ids)


@pytest.mark.parametrize("chunk_items", [7919, 65536, 100_000])
def test_chunks_concatenate_to_the_whole_catalog(chunk_items: int) -> None:
    spec = CatalogSpec(n_items=140_000, dim=4, seed=1)  # crosses two internal 65,536-item blocks
    chunks = list(iter_catalog_chunks(spec, chunk_items=chunk_items))
    assert [len(c) for c in chunks[:-1]] == [chunk_items] * (len(chunks) - 1)
    assert 0 < len(chunks[-1]) <= chunk_items
    joined = SyntheticCatalog(
        item_ids=np.concatenate([c.item_ids for c in chunks]),
        embeddings=np.concatenate([c.embeddings for c in chunks]),
        category_ids=np.concatenate([c.category_ids for c in chunks]),
        branching=chunks[0].branching,
    )
    _assert_same_catalog(joined, make_catalog(spec))


def test_empty_catalog_and_bad_arguments() -> None:
    assert len(make_catalog(CatalogSpec(n_items=0, dim=3))) == 0
    assert list(iter_catalog_chunks(CatalogSpec(n_items=0, dim=3))) == []
    with pytest.raises(ValueError, match="chunk_items"):
        next(iter_catalog_chunks(SMALL, chunk_items=0))
    with pytest.raises(ValueError, match="level_scales"):
        CatalogSpec(n_items=10, dim=4, level_scales=(1.0, 0.5))
    with pytest.raises(ValueError):
        CatalogSpec(n_items=10, dim=0)


def test_category_ids_are_hierarchical() -> None:
    ids = make_catalog(SMALL).category_ids.astype(np.int64)
    assert ids[:, 0].max() < 16 and ids[:, 1].max() < 16 * 8 and ids[:, 2].max() < 16 * 8 * 4
    # documented numbering: id_t = id_{t-1} * branching[t] + local index
    np.testing.assert_array_equal(ids[:, 1] // 8, ids[:, 0])
    np.testing.assert_array_equal(ids[:, 2] // 4, ids[:, 1])
    # same leaf => same parent and top: each leaf id appears with exactly one (parent, top) pair
    assert np.unique(ids, axis=0).shape[0] == np.unique(ids[:, 2]).shape[0]


def test_category_paths_match_category_ids() -> None:
    cat = make_catalog(SMALL)
    rows = np.array([0, 17, 2999])
    paths = cat.category_paths(rows)
    for path, (top, parent, leaf) in zip(paths, cat.category_ids[rows].tolist()):
        assert path == [f"c{top:02d}", f"c{top:02d}.{parent % 8}", f"c{top:02d}.{parent % 8}.{leaf % 4}"]
    all_paths = cat.category_paths()
    assert [all_paths[r] for r in rows] == paths
    # leaf names and leaf ids are in one-to-one correspondence
    pairs = {(p[-1], leaf) for p, leaf in zip(all_paths, cat.category_ids[:, 2].tolist())}
    assert len(pairs) == len({p[-1] for p in all_paths}) == len(np.unique(cat.category_ids[:, 2]))


def test_leaf_sizes_are_mildly_skewed() -> None:
    counts = np.bincount(make_catalog(CatalogSpec(n_items=200_000, dim=2)).category_ids[:, 2], minlength=512)
    mean = counts.mean()
    assert counts.min() > 0
    assert counts.max() <= 3 * mean  # documented bound: about 2.1x for sigma = 0.4
    assert counts.max() >= 1.5 * mean  # but not uniform
    even_spec = CatalogSpec(n_items=200_000, dim=2, leaf_size_skew=0.0)
    even = np.bincount(make_catalog(even_spec).category_ids[:, 2])
    assert even.max() <= 1.3 * even.mean()


def test_nearest_neighbour_mostly_shares_leaf_and_top() -> None:
    cat = make_catalog(CatalogSpec(n_items=20_000, dim=384))
    queries = np.random.default_rng(0).choice(len(cat), size=2000, replace=False)
    nearest = nearest_neighbours(cat.embeddings, queries, k=1)[:, 0]
    shares = (cat.category_ids[queries] == cat.category_ids[nearest]).mean(axis=0)  # top, parent, leaf
    assert 0.6 <= shares[2] <= 0.9
    assert shares[0] > 0.95
    assert shares[0] >= shares[1] >= shares[2]
