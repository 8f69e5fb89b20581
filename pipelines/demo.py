"""The demo catalog: rqvae's synthetic catalog written as a Delta (or Parquet) table, in chunks.

Written with delta-rs / pyarrow straight from Arrow buffers (no Spark, no per-row objects), so the
same code serves the README demo, the tests and the benchmarks' large catalogs.

The job's ``--demo`` also writes a ``title`` column (``titles=True``): a made-up product name per item
from its category ("cheese c00.3.1 #42"), so that the report's sample labels per prefix show whether a
prefix holds one kind of item.
"""
from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.arrow_utils import matrix_to_list_array
from pipelines.schema import CATEGORY, EMBEDDING, ITEM_ID
from rqvae.synthetic import CatalogSpec, SyntheticCatalog, iter_catalog_chunks

TITLE = "title"  # the demo catalog's label column (the job's --demo passes it as --label-col)
# One word per top category (cycled when there are more): the first word of a demo title.
_DEPARTMENTS = ("cheese", "coffee", "tea", "pasta", "olive oil", "chocolate", "wine", "bread", "honey", "rice",
                "spices", "jam", "nuts", "beer", "cereal", "sauce")


def catalog_to_arrow(chunk: SyntheticCatalog, titles: bool = False) -> pa.Table:
    """item_id BIGINT, embedding list<float>, category list<string> (root-to-leaf path) and, with
    ``titles``, title STRING (department word of the top category, leaf category, item id)."""
    embedding = matrix_to_list_array(chunk.embeddings)
    depth = chunk.category_ids.shape[1]
    names = np.array(chunk.category_paths(), dtype=object).reshape(len(chunk), depth)  # (N, depth) of str
    category = matrix_to_list_array(names, pa.string())
    columns = {ITEM_ID: pa.array(chunk.item_ids), EMBEDDING: embedding, CATEGORY: category}
    if titles:
        tops = chunk.category_ids[:, 0].tolist()
        columns[TITLE] = pa.array([f"{_DEPARTMENTS[top % len(_DEPARTMENTS)]} {leaf} #{item}"
                                   for top, leaf, item in zip(tops, names[:, -1], chunk.item_ids.tolist())],
                                  pa.string())
    return pa.table(columns)


def write_demo_catalog(path: str | Path, spec: CatalogSpec, fmt: str = "delta", chunk_items: int = 100_000,
                       titles: bool = False,
                       transform: Callable[[SyntheticCatalog], SyntheticCatalog] | None = None) -> int:
    """Write the synthetic catalog to ``path`` (replacing it); returns the number of rows. ``titles`` adds
    the ``title`` column (see :func:`catalog_to_arrow`); ``transform`` changes each chunk before it is
    written (the benchmarks' quantized catalogs)."""
    path = Path(path)
    if path.exists():
        shutil.rmtree(path)
    rows = 0
    for i, chunk in enumerate(iter_catalog_chunks(spec, chunk_items)):
        table = catalog_to_arrow(transform(chunk) if transform is not None else chunk, titles=titles)
        if fmt == "delta":
            from deltalake import write_deltalake

            write_deltalake(str(path), table, mode="append")
        else:
            path.mkdir(parents=True, exist_ok=True)
            # Row groups of 16k rows (~50 MB at D = 768): a JVM reader holds one column chunk per task.
            pq.write_table(table, path / f"part-{i:05d}.parquet", row_group_size=16_384)
        rows += table.num_rows
    return rows
