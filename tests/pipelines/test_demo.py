"""write_demo_catalog: the synthetic catalog as Delta or Parquet, chunked, deterministic, replacing the folder."""
from __future__ import annotations

import helpers
import numpy as np
import pyarrow as pa
import pytest

from pipelines.demo import write_demo_catalog
from pipelines.io import delta_version
from rqvae.synthetic import CatalogSpec, make_catalog

SPEC = CatalogSpec(n_items=150, dim=4, seed=5)
READERS = {"delta": helpers.read_delta, "parquet": helpers.read_parquet}


def read(fmt: str, path) -> pa.Table:
    return READERS[fmt](path).sort_by("item_id")


@pytest.mark.parametrize("fmt", ["delta", "parquet"])
def test_rows_schema_and_content(tmp_path, fmt) -> None:
    assert write_demo_catalog(tmp_path / "c", SPEC, fmt=fmt, chunk_items=64) == 150
    table = read(fmt, tmp_path / "c")
    assert table.num_rows == 150
    assert [(f.name, str(f.type)) for f in table.schema] == [
        ("item_id", "int64"), ("embedding", "list<element: float>"), ("category", "list<element: string>")]
    expected = make_catalog(SPEC)
    assert table.column("item_id").to_pylist() == list(range(150))
    np.testing.assert_array_equal(np.stack(table.column("embedding").to_numpy(zero_copy_only=False)),
                                  expected.embeddings)
    assert table.column("category").to_pylist() == expected.category_paths()


def test_delta_is_written_chunk_by_chunk(tmp_path) -> None:
    write_demo_catalog(tmp_path / "c", SPEC, fmt="delta", chunk_items=64)
    assert delta_version(str(tmp_path / "c")) == 2  # 64 + 64 + 22 rows: three appends
    write_demo_catalog(tmp_path / "p", SPEC, fmt="parquet", chunk_items=64)
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == [f"part-0000{i}.parquet" for i in range(3)]


@pytest.mark.parametrize("fmt", ["delta", "parquet"])
def test_same_seed_same_table_other_seed_other_table(tmp_path, fmt) -> None:
    write_demo_catalog(tmp_path / "a", SPEC, fmt=fmt)
    write_demo_catalog(tmp_path / "b", SPEC, fmt=fmt, chunk_items=50)
    write_demo_catalog(tmp_path / "c", CatalogSpec(n_items=150, dim=4, seed=6), fmt=fmt)
    assert read(fmt, tmp_path / "a").equals(read(fmt, tmp_path / "b"))
    assert not read(fmt, tmp_path / "a").column("embedding").equals(read(fmt, tmp_path / "c").column("embedding"))


@pytest.mark.parametrize("fmt", ["delta", "parquet"])
def test_an_existing_folder_is_replaced(tmp_path, fmt) -> None:
    path = tmp_path / "c"
    write_demo_catalog(path, SPEC, fmt=fmt)
    (path / "stray.txt").write_text("left over")
    assert write_demo_catalog(path, CatalogSpec(n_items=30, dim=4, seed=5), fmt=fmt) == 30
    assert read(fmt, path).num_rows == 30
    assert not (path / "stray.txt").exists()
    if fmt == "delta":
        assert delta_version(str(path)) == 0  # a new table, not an append to the old one


@pytest.mark.spark
def test_spark_reads_the_contract_types(spark, tmp_path) -> None:
    write_demo_catalog(tmp_path / "c", SPEC, fmt="delta", chunk_items=64)
    df = spark.read.format("delta").load(str(tmp_path / "c"))
    assert df.schema.simpleString() == "struct<item_id:bigint,embedding:array<float>,category:array<string>>"
    assert df.count() == 150
