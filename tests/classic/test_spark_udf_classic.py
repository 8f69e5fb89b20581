"""``mlflow.pyfunc.spark_udf`` on the registered champion, scored on classic JVM Spark (local[2]) and compared
with the table the job wrote (tests/test_spark_udf.py does the same on the embedded engine).

Runs only inside ``tests/test_classic_engine.py``'s subprocess (``CSID_CLASSIC_TESTS=1``). The job itself runs
on the embedded engine in a child process: a Connect session cannot share this process with the JVM one.
"""
from __future__ import annotations

import subprocess
import sys

import helpers
import numpy as np
import pytest

from pipelines.registry import configure_tracking, resolve_model
from rqvae import load_checkpoint

pytestmark = [pytest.mark.spark, pytest.mark.classic]

N_ITEMS, DIM = 400, 16
CHAMPION = "models:/catalog-semantic-ids@champion"


def test_spark_udf_on_classic_spark_gives_the_tables_codes_except_where_the_job_moved_an_item(
        classic_spark, tmp_path) -> None:
    import mlflow.pyfunc

    work = tmp_path / "work"
    proc = subprocess.run(
        [sys.executable, str(helpers.ROOT / "jobs" / "tokenize_catalog.py"), "--demo", "--demo-items", str(N_ITEMS),
         "--demo-dim", str(DIM), "--work-dir", str(work), *helpers.SMALL_MODEL, *helpers.GATE_OFF],
        cwd=tmp_path, env=helpers.subprocess_env(), capture_output=True, text=True, timeout=580,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    table = {r["item_id"]: r for r in helpers.read_delta(work / "tables" / "semantic_ids").to_pylist()}
    catalog = helpers.read_delta(work / "demo_catalog").select(["item_id", "embedding"])

    with helpers.fresh_mlflow_globals():
        configure_tracking(work)
        model = load_checkpoint(resolve_model(CHAMPION).checkpoint)
        score = mlflow.pyfunc.spark_udf(classic_spark, CHAMPION)  # as on Databricks: type from the signature
        # this session has no Delta: the catalog goes in through Arrow
        df = classic_spark.createDataFrame(catalog.to_pandas())
        scored = df.select("item_id", score("embedding").alias("model"))
        assert scored.schema["model"].dataType.simpleString() == "struct<codes:array<int>,quantization_error:float>"
        udf = {r["item_id"]: r["model"].asDict() for r in scored.collect()}

    assert sorted(udf) == sorted(table) == list(range(N_ITEMS))
    ids = np.asarray(catalog["item_id"].to_pylist())
    x = np.stack(catalog["embedding"].to_numpy(zero_copy_only=False)).astype(np.float32)
    moved = {i for i, m in zip(ids.tolist(), helpers.issued_codes(model, x, ids).moved) if m}
    assert 0 < len(moved) < N_ITEMS // 2, len(moved)
    assert {i for i in table if list(udf[i]["codes"]) != table[i]["codes"]} == moved
    assert all(list(udf[i]["codes"])[:-1] == table[i]["codes"][:-1] for i in table)  # prefixes: always the table's
    kept = sorted(set(table) - moved)
    np.testing.assert_allclose([udf[i]["quantization_error"] for i in kept],
                               [table[i]["quantization_error"] for i in kept], rtol=1e-5, atol=1e-6)
