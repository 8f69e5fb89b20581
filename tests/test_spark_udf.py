"""Scoring a Spark DataFrame with ``mlflow.pyfunc.spark_udf`` on the registered champion, as Databricks users
score, on the embedded engine (Sail, a Spark Connect server), compared with the table the job wrote.

Two trained runs of the job on one 400-item catalog (in-process, tiny model): one with
``--collision-alternatives 0`` and one with the default. The model gives each item its NEAREST codes; the
table holds the codes the job ISSUED, which differ only for the items the job moved off a collision
(docs/scoring.md). tests/classic/test_spark_udf_classic.py does the same scoring on classic JVM Spark.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import helpers
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from jobs.tokenize_catalog import DEFAULT_COLLISION_ALTERNATIVES
from pipelines.demo import write_demo_catalog
from pipelines.registry import configure_tracking, resolve_model
from pipelines.schema import SEMANTIC_IDS_TABLE
from rqvae import encode_array, load_checkpoint
from rqvae.synthetic import CatalogSpec

pytestmark = [pytest.mark.spark, pytest.mark.usefixtures("job_isolation")]

N_ITEMS, DIM, LEVELS = 400, 16, 3
MODEL_NAME = "catalog-semantic-ids"
CHAMPION = f"models:/{MODEL_NAME}@champion"


@dataclasses.dataclass(frozen=True)
class Scored:
    """One run of the job and the champion's spark_udf output over its catalog."""

    work: Path
    table: dict[Any, dict[str, Any]]  # active semantic_ids rows by item_id (read with delta-rs)
    udf: dict[Any, dict[str, Any]]  # item_id -> {"codes": [...], "quantization_error": float}
    udf_type: str  # the UDF's result type, as Spark prints it
    model: Any  # the champion's rqvae model (from the registry)
    ids: np.ndarray  # catalog item ids, catalog order
    x: np.ndarray  # catalog embeddings (N, D) float32, same order


@pytest.fixture(scope="module")
def catalog(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("udf-catalog") / "catalog"
    write_demo_catalog(path, CatalogSpec(n_items=N_ITEMS, dim=DIM, seed=5))
    return path


def _train_and_score(spark: Any, catalog: Path, work: Path, *flags: str, by_alias: bool) -> Scored:
    import mlflow.pyfunc

    from pipelines.io import read_catalog

    rc, out, err = helpers.run_main(["--input", catalog, "--work-dir", work, "--model-name", MODEL_NAME,
                                     *helpers.SMALL_MODEL, *helpers.GATE_OFF, *flags])
    assert rc == 0, f"the job failed (rc {rc}):\n{err[-4000:]}\n{out[-2000:]}"
    table = helpers.read_delta(work / "tables" / SEMANTIC_IDS_TABLE)
    rows = {r["item_id"]: r for r in table.to_pylist() if r["active"]}
    assert len(rows) == table.num_rows == N_ITEMS

    configure_tracking(work)  # the run's local MLflow store: <work>/mlflow.db
    champion = MlflowClient().get_model_version_by_alias(MODEL_NAME, "champion")
    if by_alias:
        # Sail runs Python UDFs inside this process, and on Spark Connect mlflow's UDF loads the model from
        # $TMPDIR/mlflow/<sha1 of the URI>/<pid> when that folder exists: a champion of another store (or an
        # earlier process with this pid) would be scored instead. docs/scoring.md
        uri = CHAMPION
        shutil.rmtree(Path(tempfile.gettempdir(), "mlflow", hashlib.sha1(uri.encode()).hexdigest(), str(os.getpid())),
                      ignore_errors=True)
    else:
        uri = champion.source  # models:/m-<id>: names this one logged model, so no such cache can be stale
        assert uri.startswith("models:/m-"), uri
    # As on Databricks: no env_manager, no result_type (inferred from the model's signature).
    score = mlflow.pyfunc.spark_udf(spark, uri)
    scored = read_catalog(spark, str(catalog)).select("item_id", score("embedding").alias("model"))
    udf_type = scored.schema["model"].dataType.simpleString()
    udf = {r["item_id"]: r["model"] for r in scored.toArrow().to_pylist()}

    source = helpers.read_delta(catalog)
    x = np.stack(source["embedding"].to_numpy(zero_copy_only=False)).astype(np.float32)
    model = load_checkpoint(resolve_model(CHAMPION).checkpoint)
    return Scored(work, rows, udf, udf_type, model, np.asarray(source["item_id"].to_pylist()), x)


@pytest.fixture(scope="module")
def without_alternatives(spark, catalog, tmp_path_factory) -> Scored:
    # another seed than the other run: a model of the other store scored by mistake would show
    return _train_and_score(spark, catalog, tmp_path_factory.mktemp("work-off"), "--collision-alternatives", "0",
                            "--seed", "1", by_alias=True)


@pytest.fixture(scope="module")
def with_alternatives(spark, catalog, tmp_path_factory) -> Scored:
    return _train_and_score(spark, catalog, tmp_path_factory.mktemp("work-default"), by_alias=False)


def _errors(run: Scored, items: Any, source: str) -> np.ndarray:
    rows = run.udf if source == "udf" else run.table
    return np.array([rows[i]["quantization_error"] for i in items], dtype=np.float32)


def test_the_udf_type_comes_from_the_models_signature(without_alternatives) -> None:
    assert without_alternatives.udf_type == "struct<codes:array<int>,quantization_error:float>"
    assert sorted(without_alternatives.udf) == sorted(without_alternatives.table) == list(range(N_ITEMS))


def test_each_run_was_scored_with_its_own_champion(without_alternatives, with_alternatives) -> None:
    # the runs' models differ (seeds 1 and 0), so scoring one store's model for the other would show below
    off, default = without_alternatives, with_alternatives
    assert sum(off.udf[i]["codes"] != default.udf[i]["codes"] for i in off.table) > N_ITEMS // 2
    for run in (off, default):
        assert encode_array(run.model, run.x).codes.tolist() == [run.udf[i]["codes"] for i in run.ids.tolist()]


def test_without_alternatives_the_udf_gives_every_item_the_tables_codes(without_alternatives) -> None:
    run = without_alternatives
    assert run.model.config.collision_alternatives == 0
    items = sorted(run.table)
    mismatched = [(i, run.udf[i]["codes"], run.table[i]["codes"]) for i in items
                  if run.udf[i]["codes"] != run.table[i]["codes"]]
    assert mismatched == [], f"{len(mismatched)} items: (item, udf, table) {mismatched[:10]}"
    np.testing.assert_allclose(_errors(run, items, "udf"), _errors(run, items, "table"), rtol=1e-5, atol=1e-6)
    # the check covers colliding items: they keep their nearest tuple and are told apart by the suffix
    assert max(r["suffix"] for r in run.table.values()) >= 1


def test_with_alternatives_the_udf_differs_exactly_on_the_items_the_job_moved(with_alternatives) -> None:
    run = with_alternatives
    assert run.model.config.collision_alternatives == DEFAULT_COLLISION_ALTERNATIVES
    differ = {i for i in run.table if run.udf[i]["codes"] != run.table[i]["codes"]}
    moved = {i for i, m in zip(run.ids.tolist(), helpers.issued_codes(run.model, run.x, run.ids).moved) if m}
    assert 0 < len(moved) < N_ITEMS // 2, len(moved)  # the demo catalog has collisions: the check is not empty
    assert differ == moved
    kept = sorted(set(run.table) - moved)
    np.testing.assert_allclose(_errors(run, kept, "udf"), _errors(run, kept, "table"), rtol=1e-5, atol=1e-6)


def test_a_moved_item_keeps_its_prefix_and_takes_one_of_its_ranked_alternatives(with_alternatives) -> None:
    run = with_alternatives
    moved = sorted(i for i in run.table if run.udf[i]["codes"] != run.table[i]["codes"])
    assert moved
    # The pyfunc returns only the nearest codes (docs/scoring.md), so the ranked alternatives come from the
    # same registered model through rqvae.
    ranked = encode_array(run.model, run.x, alternatives=DEFAULT_COLLISION_ALTERNATIVES)
    assert ranked.alternatives is not None and ranked.alternative_errors is not None
    row_of = {item: n for n, item in enumerate(run.ids.tolist())}
    holders = {tuple(r["codes"]): r for r in run.table.values() if r["suffix"] == 0}
    for i in moved:
        nearest, issued = run.udf[i]["codes"], run.table[i]["codes"]
        assert issued[:-1] == nearest[:-1], (i, nearest, issued)  # the prefix is the model's
        alternatives = ranked.alternatives[row_of[i]].tolist()
        assert alternatives[0] == nearest[-1]
        assert issued[-1] in alternatives[1:], (i, issued, alternatives)
        position = alternatives.index(issued[-1])
        assert run.table[i]["quantization_error"] == pytest.approx(
            float(ranked.alternative_errors[row_of[i], position]), rel=1e-5, abs=1e-6)
        assert run.table[i]["quantization_error"] >= run.udf[i]["quantization_error"] - 1e-6
        # its nearest tuple is held by an item the job did not move, one that fits that tuple at least as well
        holder = holders[tuple(nearest)]
        assert run.udf[holder["item_id"]]["codes"] == nearest, (i, holder)
        assert holder["quantization_error"] <= run.udf[i]["quantization_error"] + 1e-6
