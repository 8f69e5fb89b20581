"""Cost of each validation expression over a catalog, on one engine (single aggregations, wall seconds).

    python bench/validate_cost.py --engine spark    # classic local Spark, the Parquet bench catalog
    python bench/validate_cost.py --engine local    # embedded Sail, the Delta bench catalog

Compares the lambda forms (``exists``/``forall``, what pipelines/validate.py used before) with the
built-ins it uses now, and times the whole reject-reason expression both ways. Needs the catalog
written by bench/encode_throughput.py (or bench/make_catalog.py) for --items/--dim.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):
    sys.path.insert(0, str(ROOT))

_MAX = "3.4028234663852886E38"
LAMBDA_REASON = (  # the per-row reason expression before (same order of checks as pipelines/validate.py)
    "CASE WHEN item_id IS NULL THEN 'null_item_id' "
    "WHEN embedding IS NULL THEN 'null_embedding' WHEN size(embedding) != {dim} THEN 'wrong_embedding_length' "
    "WHEN exists(embedding, x -> x IS NULL) THEN 'null_in_embedding' "
    f"WHEN exists(embedding, x -> isnan(x) OR abs(x) > {_MAX}) THEN 'nan_or_inf_in_embedding' "
    "WHEN forall(embedding, x -> x = 0) THEN 'zero_vector' END"
)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine", choices=["local", "spark"], default="spark")
    p.add_argument("--items", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=768)
    a = p.parse_args(argv)

    from pyspark.sql import functions as F

    from pipelines import io
    from pipelines.schema import REASON
    from pipelines.session import start_session
    from pipelines.validate import count_reasons, flag_duplicates, select_contract_columns, validate_catalog

    fmt = "delta" if a.engine == "local" else "parquet"
    catalog = ROOT / "bench" / "out" / f"catalog_{a.items}_{a.dim}_{fmt}"
    if not catalog.exists():
        p.error(f"{catalog} not found: write it with bench/encode_throughput.py --items {a.items} --dim {a.dim}")
    with start_session(a.engine, want_delta=fmt == "delta") as es:
        source = io.read_catalog(es.spark, str(catalog), fmt)
        rows = select_contract_columns(source)
        flagged = validate_catalog(source, dim=a.dim).flagged
        timed = [
            ("count(*)", lambda: rows.select(F.count(F.lit(1))).collect()),
            ("sum(size(embedding))", lambda: rows.select(F.sum(F.size("embedding"))).collect()),
            ("sum(array_max(embedding))", lambda: rows.select(F.sum(F.array_max("embedding"))).collect()),
            ("exists(embedding, x -> x IS NULL)",
             lambda: rows.select(F.sum(F.expr("exists(embedding, x -> x IS NULL)").cast("int"))).collect()),
            ("size(array_compact(embedding))",
             lambda: rows.select(F.sum(F.size(F.array_compact("embedding")))).collect()),
            ("all checks, lambdas (before)",  # duplicate-id join included, the old per-row reason column
             lambda: count_reasons(flag_duplicates(rows.withColumn(REASON, F.expr(LAMBDA_REASON.format(dim=a.dim)))))),
            ("all checks, pipelines/validate.py (now)", lambda: count_reasons(flagged)),
        ]
        print(f"{a.engine}, {catalog.name}")
        print("| expression | seconds |\n|---|---:|")
        for name, run in timed:
            start = time.perf_counter()
            run()
            print(f"| `{name}` | {time.perf_counter() - start:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
