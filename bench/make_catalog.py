"""Write a synthetic catalog of N items x D dims to a Delta (or Parquet) table, chunk by chunk.

    python bench/make_catalog.py --items 1000000 --dim 768 --out bench/out/catalog_1m_768
    python bench/make_catalog.py --items 10000000 --dim 256 --out bench/out/catalog_10m_256

``--quantize-bits 8`` rounds every value to one of 255 levels (as an int8 vector store keeps them):
Parquet then dictionary-encodes the embedding column to about a byte per value, which is how the
50M x 256 catalog (51 GB as float32) fits on the benchmark machine's disk (about 13 GB).

Memory stays bounded by one chunk (``--chunk-items`` rows) whatever N is; the content depends only
on --items, --dim and --seed (the generator draws fixed blocks), not on the chunk size.
"""
from __future__ import annotations

import argparse
import dataclasses
import resource
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from pipelines.demo import write_demo_catalog  # noqa: E402
from rqvae.synthetic import CatalogSpec, SyntheticCatalog  # noqa: E402


def quantizer(bits: int):  # noqa: ANN201 - a chunk transform
    """Rounds a chunk's embeddings to 2^bits - 1 levels over +-4 sigma, sigma taken from the first chunk."""
    levels, sigma = 2 ** (bits - 1) - 1, []

    def transform(chunk: SyntheticCatalog) -> SyntheticCatalog:
        if not sigma:
            sigma.append(float(chunk.embeddings.std()))
        step = 4 * sigma[0] / levels
        q = np.clip(np.rint(chunk.embeddings / step), -levels, levels) * step
        return dataclasses.replace(chunk, embeddings=q.astype(np.float32))

    return transform


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, required=True, help="number of items N")
    p.add_argument("--dim", type=int, required=True, help="embedding length D")
    p.add_argument("--seed", type=int, default=0, help="catalog seed")
    p.add_argument("--out", required=True, help="output folder (replaced)")
    p.add_argument("--format", default="delta", choices=["delta", "parquet"], help="table format")
    p.add_argument("--chunk-items", type=int, default=262_144, help="rows generated and written per chunk")
    p.add_argument("--quantize-bits", type=int, default=0,
                   help="round values to 2^B - 1 levels over +-4 standard deviations (0: float32 as generated)")
    a = p.parse_args(argv)
    start = time.perf_counter()
    rows = write_demo_catalog(a.out, CatalogSpec(n_items=a.items, dim=a.dim, seed=a.seed), fmt=a.format,
                              chunk_items=a.chunk_items,
                              transform=quantizer(a.quantize_bits) if a.quantize_bits else None)
    seconds = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{rows} rows x {a.dim} dims -> {a.out} ({a.format}) in {seconds:.1f}s "
          f"({rows / seconds:,.0f} rows/s), peak RSS {peak_mb:,.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
