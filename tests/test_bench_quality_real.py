"""bench/quality_real.py's "<peer>_spread16" rows give a peer the job's collision-aware last level from
nothing but its codes, reconstruction and last-level codewords. They must move exactly the items that
rqvae.resolve moves for a model whose alternatives the library ranks itself; otherwise the trade-off
rows would compare the peers under a different rule than ours.
"""
from __future__ import annotations

import sys

import helpers
import numpy as np
import pytest
import torch

from rqvae import RQKMeans, RQKMeansConfig, encode_array
from rqvae.metrics import prefix_coincidence
from rqvae.synthetic import CatalogSpec, make_catalog

sys.path.insert(0, str(helpers.ROOT / "bench"))

import quality_real  # noqa: E402  (bench/quality_real.py)


def _model_and_codes() -> tuple[RQKMeans, np.ndarray]:
    x = make_catalog(CatalogSpec(600, 8, seed=5)).embeddings.astype(np.float32)
    # 64 2-prefixes of 8 last-level codes for 600 items: many items share a tuple and many of those find
    # a free code among their 3 nearest, while others find none and keep theirs.
    model = RQKMeans.fit(x, RQKMeansConfig(input_dim=8, num_levels=3, codebook_size=8, normalize_inputs=False),
                         seed=1)
    return model, x


def test_a_peers_spread_equals_the_librarys_for_the_same_codebooks() -> None:
    model, x = _model_and_codes()
    expected = quality_real.encode_spread(model, x, 3, second_chance=False)
    plain = encode_array(model, x).codes.astype(np.int64)
    recon = model.decode_codes(torch.as_tensor(plain)).numpy()

    codes, new_recon = quality_real.spread_additive(x, plain, recon, model.codebooks[-1].numpy(), 3)

    moved = int((codes[:, -1] != plain[:, -1]).sum())
    assert moved > 50, moved  # the case exercises many moves
    np.testing.assert_array_equal(codes, expected)
    np.testing.assert_array_equal(codes[:, :-1], plain[:, :-1])  # the prefix never changes
    np.testing.assert_allclose(new_recon, model.decode_codes(torch.as_tensor(codes)).numpy(), atol=1e-5)


def test_an_item_whose_own_code_is_not_the_nearest_keeps_it_when_nothing_collides() -> None:
    # A beam search may pick a last-level code that is not the nearest one for its prefix: the item's own
    # code still comes first among its alternatives, so an item that collides with nobody keeps it.
    last = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    codes = np.array([[0, 0, 1], [1, 0, 2]], dtype=np.int64)  # two prefixes: no collision
    x = np.array([[0.1, 0.0], [0.0, 0.9]], dtype=np.float32)  # item 0 is nearer codeword 0 than its own 1
    recon = last[codes[:, -1]]

    out, new_recon = quality_real.spread_additive(x, codes, recon, last, 2)

    np.testing.assert_array_equal(out, codes)
    np.testing.assert_array_equal(new_recon, recon)


def test_a_colliding_item_takes_the_nearest_free_code() -> None:
    last = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    codes = np.array([[0, 0, 0], [0, 0, 0]], dtype=np.int64)  # one prefix, one tuple, two items
    x = np.array([[0.05, 0.0], [0.2, 0.9]], dtype=np.float32)  # item 0 fits code 0 best; item 1 is near 2
    recon = last[codes[:, -1]]

    out, new_recon = quality_real.spread_additive(x, codes, recon, last, 3)

    np.testing.assert_array_equal(out[:, -1], [0, 2])
    np.testing.assert_array_equal(new_recon, last[[0, 2]])


def test_the_shared_neighbour_search_scores_as_the_librarys_prefix_coincidence() -> None:
    # score() searches neighbours once per run for every method; its P1 / P2 must stay the library's
    # definition (rqvae.metrics.prefix_coincidence: the same queries and random partners for a seed).
    x = make_catalog(CatalogSpec(300, 8, seed=2)).embeddings.astype(np.float32)
    codes = np.random.default_rng(0).integers(0, 3, size=(300, 3))
    labels = np.arange(300) % 5
    for n_queries in (40, 0):
        got = quality_real.score(x, codes, None, 3, labels, labels, seed=4, n_queries=n_queries)
        want = prefix_coincidence(x, codes, n_queries=n_queries or 300, seed=4)
        assert (got["p1_nn"], got["p2_nn"], got["p1_random"]) == (want.nn[0], want.nn[1], want.random[0])


def test_the_level_1_seed_curve_scores_level_1_as_the_main_table_does() -> None:
    # bench/tradeoff_real.py --seeds compares one level-1 fit's P1 / NMI1 with another's; they must be the
    # columns score() gives the same level-1 codes, or the seed spread would be read on another scale.
    import tradeoff_real  # noqa: E402  (bench/tradeoff_real.py)

    from rqvae.kmeans import kmeans, nearest

    x = torch.nn.functional.normalize(torch.from_numpy(make_catalog(CatalogSpec(800, 8, seed=3)).embeddings), dim=-1)
    labels = np.arange(800) % 7
    got = tradeoff_real.level_one(x, "ours", 2, labels, 0)
    level1 = nearest(x, kmeans(x, 256, iters=100, seed=2, tol=1e-3))[0].numpy()
    want = quality_real.score(x.numpy(), np.stack([level1, level1, level1], 1), None, 256, labels, labels, seed=0)
    assert (got["p1_nn"], got["nmi1"]) == (want["p1_nn"], want["nmi1"])
    assert 0.0 < got["p1_nn"] < 1.0 and got["ppl_l1"] > 100
    # --seed-k1: the codes-used curve across seeds fits K1 centroids with the same k-means and seed
    fewer = tradeoff_real.level_one(x, "ours", 2, labels, 0, k=24)
    level1 = nearest(x, kmeans(x, 24, iters=100, seed=2, tol=1e-3))[0].numpy()
    want = quality_real.score(x.numpy(), np.stack([level1, level1, level1], 1), None, 256, labels, labels, seed=0)
    assert (fewer["p1_nn"], fewer["nmi1"]) == (want["p1_nn"], want["nmi1"]) and fewer["ppl_l1"] <= 24
    with pytest.raises(ValueError, match="k must be 256"):
        tradeoff_real.level_one(x, "rvq", 0, labels, 0, k=96)
    with pytest.raises(ValueError, match="use ours, sklearn or rvq"):
        tradeoff_real.level_one(x, "faiss", 0, labels, 0)


def test_a_run_names_the_embeddings_it_scored(tmp_path, capsys) -> None:
    """The header and the JSON carry the embeddings' digest: a one-ulp change to one value changes it, so two
    tables with equal digests scored bit-identical inputs."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    x = make_catalog(CatalogSpec(300, 8, seed=3)).embeddings.astype(np.float32)
    lex = [f"noun.{i % 5}" for i in range(len(x))]
    paths = [["entity", f"a{i % 3}", f"b{i % 7}", f"c{i % 11}", f"d{i % 13}", f"item{i}"] for i in range(len(x))]
    catalog = tmp_path / "catalog.parquet"
    pq.write_table(pa.table({"embedding": list(x), "lexname": lex, "category": paths}), catalog)
    out = tmp_path / "rows.json"
    assert quality_real.main(["--catalog", str(catalog), "--levels", "2", "--codebook-size", "4",
                              "--methods", "ours_rqkmeans", "--json", str(out)]) == 0
    digest = quality_real.embeddings_digest(x)
    assert len(digest) == 16 and f"(embeddings sha256 {digest})" in capsys.readouterr().out
    written = json.loads(out.read_text())
    assert written["embeddings_sha256"] == digest and set(written["rows"]) == {"ours_rqkmeans"}
    nudged = x.copy()
    nudged[17, 3] = np.nextafter(nudged[17, 3], np.float32(np.inf))
    assert quality_real.embeddings_digest(nudged) != digest
    assert quality_real.embeddings_digest(x.astype(np.float64)) == digest  # the float32 bits, whatever the dtype


def test_nmi2_depth_groups_by_the_category_path_cut_there(tmp_path) -> None:
    """--nmi2-depth 2 (the Debian catalog's [section, source]) groups by the first two names of the path;
    an item whose path is shallower than the depth belongs to no group (-1)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    x = np.eye(4, dtype=np.float32)
    paths = [["libs", "zlib"], ["libs", "zlib"], ["libs", "openssl"], ["games"]]
    catalog = tmp_path / "catalog.parquet"
    pq.write_table(pa.table({"embedding": list(x), "lexname": ["libs", "libs", "libs", "games"], "category": paths}),
                   catalog)

    _, lex, deep, _ = quality_real.load_catalog(catalog, None, 0, nmi2_depth=2)
    _, _, deep5, _ = quality_real.load_catalog(catalog, None, 0)

    assert lex[0] == lex[1] == lex[2] != lex[3]
    assert deep[0] == deep[1] != deep[2] and deep[2] >= 0 and deep[3] == -1
    assert (deep5 == -1).all()  # WordNet's default depth: none of these paths is that deep


def test_the_debian_catalog_parses_a_package_list(tmp_path) -> None:
    """bench/debian_catalog.py: one row per package name (its first stanza), the section without its area,
    the source without its version (the package itself when none is named), continuation lines and stanzas
    without a description skipped; the Parquet file has bench/real_catalog.py's schema."""
    import debian_catalog
    import pyarrow.parquet as pq

    listing = "\n".join([
        "Package: zlib1g-dev", "Source: zlib (1:1.2.13-1)", "Section: libdevel",
        "Description: compression library - development", " The long description,", " on two lines.", "",
        "Package: 0ad", "Section: contrib/games", "Description: Real-time strategy game", "",
        "Package: zlib1g-dev", "Section: oldlibs", "Description: a second stanza of the same name", "",
        "Package: no-description", "Section: misc", "",
    ])
    packages = debian_catalog.parse_packages(listing)
    ids, categories, sections, texts = debian_catalog.catalog_rows(packages)

    assert ids == [0, 1]
    assert texts == ["0ad: Real-time strategy game", "zlib1g-dev: compression library - development"]
    assert categories == [["games", "0ad"], ["libdevel", "zlib"]] and sections == ["games", "libdevel"]

    from real_catalog import write_parquet

    out = tmp_path / "debian.parquet"
    write_parquet(out, ids, categories, sections, texts, np.eye(2, 384, dtype=np.float32))
    table = pq.read_table(out)
    assert table.column_names == ["item_id", "embedding", "category", "lexname", "text"]
    assert table["category"].to_pylist() == categories and table["lexname"].to_pylist() == sections


def test_the_debian_catalog_names_a_missing_packages_file(tmp_path, capsys) -> None:
    import debian_catalog

    assert debian_catalog.main(["--packages-file", str(tmp_path / "no such list"), "--out", str(tmp_path / "o")]) == 2
    assert "--packages-file" in capsys.readouterr().err and not (tmp_path / "o").exists()
