"""The demo catalog: rqvae's synthetic catalog written as a Delta (or Parquet) table, in chunks.

Written with delta-rs / pyarrow straight from Arrow buffers (no Spark, no per-row objects), so the
same code serves the README demo, the tests and the benchmarks' large catalogs.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.arrow_utils import matrix_to_list_array
from pipelines.schema import CATEGORY, EMBEDDING, ITEM_ID
from rqvae.synthetic import CatalogSpec, SyntheticCatalog, iter_catalog_chunks


def catalog_to_arrow(chunk: SyntheticCatalog) -> pa.Table:
    """item_id BIGINT, embedding list<float>, category list<string> (root-to-leaf path)."""
    embedding = matrix_to_list_array(chunk.embeddings)
    depth = chunk.category_ids.shape[1]
    names = np.array(chunk.category_paths(), dtype=object).reshape(len(chunk), depth)  # (N, depth) of str
    category = matrix_to_list_array(names, pa.string())
    return pa.table({ITEM_ID: pa.array(chunk.item_ids), EMBEDDING: embedding, CATEGORY: category})


def write_demo_catalog(path: str | Path, spec: CatalogSpec, fmt: str = "delta", chunk_items: int = 100_000) -> int:
    """Write the synthetic catalog to ``path`` (replacing it); returns the number of rows."""
    path = Path(path)
    if path.exists():
        shutil.rmtree(path)
    rows = 0
    for i, chunk in enumerate(iter_catalog_chunks(spec, chunk_items)):
        table = catalog_to_arrow(chunk)
        if fmt == "delta":
            from deltalake import write_deltalake

            write_deltalake(str(path), table, mode="append")
        else:
            path.mkdir(parents=True, exist_ok=True)
            # Row groups of 16k rows (~50 MB at D = 768): a JVM reader holds one column chunk per task.
            pq.write_table(table, path / f"part-{i:05d}.parquet", row_group_size=16_384)
        rows += table.num_rows
    return rows
