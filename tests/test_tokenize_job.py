"""The tokenize job end to end on the embedded engine, run in-process with ``main([...])``.

One module-scoped trained run (a 1,210-row catalog with 11 bad rows, STRING ids, 2 epochs of a tiny
model) feeds most tests; encode-only runs resolve ``models:/<name>@champion`` from that run's MLflow
store (its work dir) and write to their own ``--output``. Tables are read back with delta-rs.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import helpers
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from mlflow.tracking import MlflowClient

import pipelines.registry as registry
from jobs.tokenize_catalog import DEFAULT_COLLISION_ALTERNATIVES
from pipelines.demo import write_demo_catalog
from pipelines.io import delta_version
from pipelines.report import REPORT_HTML, SUMMARY_JSON
from pipelines.schema import (
    LEVEL_STATS_TABLE,
    PREFIX_STATS_TABLE,
    REJECTS_TABLE,
    SEMANTIC_ID_COLUMNS,
    SEMANTIC_IDS_TABLE,
    RejectReason,
    prefix_column,
)
from rqvae import encode_array, load_checkpoint
from rqvae.synthetic import CatalogSpec

pytestmark = [pytest.mark.spark, pytest.mark.usefixtures("job_isolation")]

MODEL, EXPERIMENT = "csid-job-test", "csid-job-test"
N_ITEMS, DIM, LEVELS, K = 1200, 16, 3, 16
CHAMPION = f"models:/{MODEL}@champion"


@dataclasses.dataclass(frozen=True)
class Catalog:
    path: Path
    shuffled: Path
    valid_ids: list[str]  # in catalog order
    valid_embeddings: np.ndarray  # (N_ITEMS - 1, DIM) float32, row i for valid_ids[i]
    rejects: list[tuple[str, str]]  # sorted (item_id or "", reason)
    n_input: int


@dataclasses.dataclass(frozen=True)
class Run:
    work: Path
    tables: Path
    stdout: str

    def table(self, name: str) -> pa.Table:
        return helpers.read_delta(self.tables / name)


def _bad_rows(v: np.ndarray) -> list[tuple[str | None, list | None, str]]:
    """(id, embedding, expected reason): one or more rows of every reject kind."""
    with_null = [*v[:3], None, *v[4:]]
    return [
        (None, list(v), RejectReason.NULL_ID),
        ("dup-a", list(v), RejectReason.DUPLICATE_ID),
        ("dup-a", list(2 * v), RejectReason.DUPLICATE_ID),
        ("7", list(v), RejectReason.DUPLICATE_ID),  # repeats a valid catalog id: both rows rejected
        ("no-embedding", None, RejectReason.NULL_EMBEDDING),
        ("short", list(v[:-1]), RejectReason.WRONG_LENGTH),
        ("null-element", with_null, RejectReason.NULL_ELEMENT),
        ("nan", [*v[:-1], float("nan")], RejectReason.NON_FINITE),
        ("inf", [float("-inf"), *v[1:]], RejectReason.NON_FINITE),
        ("zero", [0.0] * DIM, RejectReason.ZERO_VECTOR),
    ]



@pytest.fixture(scope="module")
def catalog(tmp_path_factory) -> Catalog:
    root = tmp_path_factory.mktemp("catalog")
    write_demo_catalog(root / "demo", CatalogSpec(n_items=N_ITEMS, dim=DIM, seed=3))
    demo = helpers.read_delta(root / "demo").sort_by("item_id")
    position = demo.column_names.index("item_id")
    good = demo.set_column(position, "item_id", pc.cast(demo["item_id"], pa.string()))  # "0".."1199": STRING
    embeddings = np.stack(good["embedding"].to_numpy(zero_copy_only=False)).astype(np.float32)
    bad = _bad_rows(embeddings[0])
    bad_table = helpers.catalog_table([i for i, _, _ in bad], [e for _, e, _ in bad], good["embedding"].type)
    bad_table = bad_table.append_column("category", pa.nulls(len(bad), good["category"].type))
    full = pa.concat_tables([good, bad_table.select(good.column_names)])
    helpers.write_delta(root / "catalog", full)
    shuffled = full.take(np.random.default_rng(1).permutation(full.num_rows))
    helpers.write_delta(root / "shuffled", shuffled, parts=5)

    ids = good["item_id"].to_pylist()
    keep = [i for i, item in enumerate(ids) if item != "7"]
    rejects = sorted([("7", RejectReason.DUPLICATE_ID)] + [(i or "", reason) for i, _, reason in bad])
    return Catalog(root / "catalog", root / "shuffled", [ids[i] for i in keep], embeddings[keep], rejects,
                   full.num_rows)


@pytest.fixture(scope="module")
def trained(catalog, tmp_path_factory) -> Run:
    work = tmp_path_factory.mktemp("work")
    rc, out, err = helpers.run_main([
        "--input", catalog.path, "--work-dir", work, "--model-name", MODEL, "--experiment", EXPERIMENT,
        "--sample-size", "800", *helpers.SMALL_MODEL, *helpers.GATE_OFF,
        "--engine-memory", "2g",  # every test of this run's tables is also one of a run under a pool
    ])
    assert rc == 0, f"trained run failed (rc {rc}):\n{err[-4000:]}\n{out[-2000:]}"
    return Run(work, work / "tables", out)


def encode_only(run: Run, input_path: Path, output: Path, stages: str = "validate,encode,report", *extra: str) -> Run:
    """An encode run with the champion of ``run``'s MLflow store, writing to ``output``."""
    rc, out, err = helpers.run_main([
        "--input", input_path, "--work-dir", run.work, "--output", output, "--stages", stages,
        "--model", CHAMPION, "--model-name", MODEL, "--experiment", EXPERIMENT, *extra,
    ])
    assert rc == 0, f"encode run failed (rc {rc}):\n{err[-4000:]}"
    return Run(run.work, output, out)


# --- the trained run ------------------------------------------------------------------------------

def test_every_valid_item_gets_one_unique_semantic_id(trained, catalog) -> None:
    sids = trained.table(SEMANTIC_IDS_TABLE)
    prefixes = [prefix_column(lv) for lv in range(1, LEVELS + 1)]
    assert sids.column_names == [*SEMANTIC_ID_COLUMNS, *prefixes]
    rows = sids.to_pylist()
    assert len(rows) == len(catalog.valid_ids) == N_ITEMS - 1
    assert sorted(r["item_id"] for r in rows) == sorted(catalog.valid_ids)
    assert len({r["semantic_id"] for r in rows}) == len(rows)
    for r in rows:
        codes = r["codes"]
        assert len(codes) == LEVELS and all(0 <= c < K for c in codes), r
        assert r["semantic_id"] == "_".join(map(str, codes)) + f"_{r['suffix']}"
        assert [r[p] for p in prefixes] == ["_".join(map(str, codes[:lv])) for lv in range(1, LEVELS + 1)]
    tuples = helpers.assert_suffix_contract(rows)
    # The model's own codes collide; the job spread colliding items over free last-level codes, so the
    # table has more distinct tuples than the model gives (the suffix order within groups that still
    # collide is tested in tests/pipelines/test_uniquify.py and by the scheduled-runs rounds).
    registry.configure_tracking(trained.work)
    nearest = encode_array(load_checkpoint(registry.resolve_model(CHAMPION).checkpoint), catalog.valid_embeddings)
    assert len({tuple(c) for c in nearest.codes.tolist()}) < tuples
    assert {(r["model_name"], r["model_version"]) for r in rows} == {(MODEL, "1")}
    assert len({r["mlflow_run_id"] for r in rows}) == 1
    types = {f.name: str(f.type) for f in sids.schema}
    assert (types["codes"], types["suffix"], types["quantization_error"]) == ("list<element: int32>", "int32", "float")


def test_rejects_hold_exactly_the_bad_rows(trained, catalog) -> None:
    rejects = trained.table(REJECTS_TABLE)
    assert rejects.column_names == ["item_id", "reason", "mlflow_run_id", "rejected_at"]
    rows = rejects.to_pylist()
    assert sorted((r["item_id"] or "", r["reason"]) for r in rows) == catalog.rejects
    run_ids = {r["mlflow_run_id"] for r in rows}
    assert run_ids == set(trained.table(SEMANTIC_IDS_TABLE).column("mlflow_run_id").to_pylist())
    assert all(r["rejected_at"] is not None for r in rows)
    assert catalog.n_input == trained.table(SEMANTIC_IDS_TABLE).num_rows + len(rows) == N_ITEMS + 10


def test_run_is_logged_and_timestamps_are_the_run_time(trained) -> None:
    sids = trained.table(SEMANTIC_IDS_TABLE).to_pylist()
    run_id = sids[0]["mlflow_run_id"]
    registry.configure_tracking(trained.work)
    run = MlflowClient().get_run(run_id)
    metrics = run.data.metrics
    assert (metrics["input_rows"], metrics["valid_rows"], metrics["rejected_rows"], metrics["written_rows"]) == (
        N_ITEMS + 10, N_ITEMS - 1, 11, N_ITEMS - 1)
    assert metrics["rejected_duplicate_item_id"] == 4 and metrics["rejected_nan_or_inf_in_embedding"] == 2
    assert run.data.tags["quality_gate"] == "passed"
    assert run.data.params["model.codebook_size"] == str(K)
    # Held-out figures as holdout_*, code usage as the whole sample's (docs/metrics.md), each once.
    assert 0 < metrics["holdout_unique_rate"] <= 1 and 0 < metrics["sample_l1_utilization"] <= 1
    assert metrics["sample_l3_perplexity"] >= 1 and not [k for k in metrics if k.startswith("holdout_sample_")]
    start = dt.datetime.fromtimestamp(run.info.start_time / 1000, dt.timezone.utc)
    end = dt.datetime.fromtimestamp(run.info.end_time / 1000, dt.timezone.utc)
    stamps = {r["tokenized_at"] for r in sids} | {r["rejected_at"] for r in trained.table(REJECTS_TABLE).to_pylist()}
    assert all(start - dt.timedelta(seconds=1) <= s <= end + dt.timedelta(seconds=1) for s in stamps), stamps


def test_statistics_tables_and_report_files(trained) -> None:
    level_stats = trained.table(LEVEL_STATS_TABLE).to_pylist()
    assert sorted(r["level"] for r in level_stats) == [1, 2, 3]
    assert all(r["codebook_size"] == K and 0 < r["used_codes"] <= K for r in level_stats)
    prefix_stats = trained.table(PREFIX_STATS_TABLE).to_pylist()
    level1 = [r for r in prefix_stats if r["level"] == 1]
    assert sum(r["item_count"] for r in level1) == N_ITEMS - 1
    sids = trained.table(SEMANTIC_IDS_TABLE)
    assert {r["prefix"] for r in level1} == set(sids.column("prefix_1").to_pylist())
    report = trained.tables / "report"
    assert "<html>" in (report / REPORT_HTML).read_text(encoding="utf-8")
    summary = json.loads((report / SUMMARY_JSON).read_text(encoding="utf-8"))["summary"]
    distinct = len({tuple(c) for c in sids.column("codes").to_pylist()})
    assert (summary["n_items"], summary["distinct_tuples"]) == (N_ITEMS - 1, distinct)


@pytest.mark.skipif(not helpers.CHECK_SID_TABLE.is_file(), reason="shared checker not on this machine")
def test_independent_checker_accepts_the_output(trained, catalog) -> None:
    proc = helpers.run_sid_checker(trained.tables / SEMANTIC_IDS_TABLE, "--levels", str(LEVELS),
                                   "--codebook-size", str(K), "--catalog", catalog.path,
                                   "--rejects", trained.tables / REJECTS_TABLE)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "FAIL" not in proc.stdout and proc.stdout.count("ok ") >= 10


def test_udf_codes_equal_batch_encoding_of_the_registered_model(trained, catalog) -> None:
    registry.configure_tracking(trained.work)
    resolved = registry.resolve_model(CHAMPION)
    assert (resolved.name, resolved.version) == (MODEL, "1")
    run_id = trained.table(SEMANTIC_IDS_TABLE).column("mlflow_run_id")[0].as_py()
    assert resolved.checkpoint == (trained.work / "checkpoints" / f"{run_id}.pt").read_bytes()
    model = load_checkpoint(resolved.checkpoint)
    assert model.config.collision_alternatives == DEFAULT_COLLISION_ALTERNATIVES > 0  # the default travels with it
    # The job's default fill cap moved some items' level-2 codes at this catalog's size, so the
    # comparison below covers the learned 2-prefix offsets too.
    plain = load_checkpoint(resolved.checkpoint)
    plain.anchor_offsets.zero_()
    assert (encode_array(plain, catalog.valid_embeddings).codes[:, 1]
            != encode_array(model, catalog.valid_embeddings).codes[:, 1]).any()
    # The table holds the model's codes with colliding items spread over free last-level codes.
    expected = spread_codes(model, catalog)
    assert expected.moved.any()
    rows = helpers.by_item(trained.table(SEMANTIC_IDS_TABLE))
    codes = np.array([rows[i]["codes"] for i in catalog.valid_ids], dtype=np.int32)
    errors = np.array([rows[i]["quantization_error"] for i in catalog.valid_ids], dtype=np.float32)
    np.testing.assert_array_equal(codes, expected.codes)
    np.testing.assert_allclose(errors, expected.quantization_error, rtol=1e-5, atol=1e-6)


def spread_codes(model, catalog):  # type: ignore[no-untyped-def]
    return helpers.issued_codes(model, catalog.valid_embeddings, catalog.valid_ids)


def test_training_run_is_in_its_experiment_with_local_artifacts(trained) -> None:
    registry.configure_tracking(trained.work)
    run_id = trained.table(SEMANTIC_IDS_TABLE).column("mlflow_run_id")[0].as_py()
    run = MlflowClient().get_run(run_id)
    assert MlflowClient().get_experiment(run.info.experiment_id).name == EXPERIMENT
    assert run.info.artifact_uri.startswith((trained.work / "mlartifacts").resolve().as_uri())


# --- encode-only runs with the registered champion ------------------------------------------------

def test_ids_do_not_depend_on_input_order_or_partitioning(trained, catalog, tmp_path) -> None:
    shuffled = encode_only(trained, catalog.shuffled, tmp_path / "tables")
    got = shuffled.table(SEMANTIC_IDS_TABLE)
    assert got.num_rows == N_ITEMS - 1
    assert helpers.key_rows(got) == helpers.key_rows(trained.table(SEMANTIC_IDS_TABLE))
    assert set(got.column("model_version").to_pylist()) == {"1"}
    reasons = sorted((r["item_id"] or "", r["reason"]) for r in shuffled.table(REJECTS_TABLE).to_pylist())
    assert reasons == catalog.rejects


def test_the_engine_reading_the_embeddings_gives_the_same_tables(trained, catalog, tmp_path) -> None:
    # The trained run's UDF read the catalog's Parquet files itself (the default for a local Delta table).
    assert "the encode UDF reads the embeddings from " in trained.stdout
    by_engine = encode_only(trained, catalog.shuffled, tmp_path / "tables", "validate,encode,report",
                            "--read-embeddings", "engine")
    assert "the engine reads the embeddings (--read-embeddings engine)" in by_engine.stdout
    got = by_engine.table(SEMANTIC_IDS_TABLE)
    assert helpers.key_rows(got) == helpers.key_rows(trained.table(SEMANTIC_IDS_TABLE))
    reasons = sorted((r["item_id"] or "", r["reason"]) for r in by_engine.table(REJECTS_TABLE).to_pylist())
    assert reasons == catalog.rejects


def test_embeddings_the_files_cannot_give_are_read_by_the_engine_or_stop_the_run(trained, tmp_path, capsys) -> None:
    vectors = helpers.random_vectors(40, DIM, seed=5).astype(np.float64)
    table = helpers.catalog_table([f"d{i}" for i in range(40)], vectors, pa.list_(pa.float64()))
    helpers.write_delta(tmp_path / "doubles", table)
    argv = ["--input", tmp_path / "doubles", "--work-dir", trained.work, "--stages", "validate,encode",
            "--model", CHAMPION, "--model-name", MODEL, "--experiment", EXPERIMENT]
    rc = main_with([*argv, "--output", tmp_path / "strict", "--read-embeddings", "files"])
    assert rc == 2
    err = capsys.readouterr().err
    assert f"--read-embeddings files cannot read {tmp_path / 'doubles'}: " in err
    assert "embedding column of type list<item: double> (the engine casts it to list<float>)" in err
    assert "Fix: --read-embeddings engine" in err
    assert not (tmp_path / "strict" / SEMANTIC_IDS_TABLE).exists()
    assert main_with([*argv, "--output", tmp_path / "auto"]) == 0  # auto: the engine reads them, and says why
    assert "the engine reads the embeddings (" in capsys.readouterr().out
    assert helpers.read_delta(tmp_path / "auto" / SEMANTIC_IDS_TABLE).num_rows == 40


def test_encoding_twice_keeps_every_row_and_full_mode_rewrites_one_version(trained, catalog, tmp_path) -> None:
    out = tmp_path / "tables"
    first = encode_only(trained, catalog.path, out, stages="validate,encode")
    v1, rows1 = delta_version(str(out / SEMANTIC_IDS_TABLE)), first.table(SEMANTIC_IDS_TABLE)
    # The same model again: auto mode is incremental, nothing is new, so nothing is committed.
    second = encode_only(trained, catalog.path, out, stages="validate,encode")
    assert "mode: incremental" in second.stdout and "no commit" in second.stdout
    unchanged = f"{out / SEMANTIC_IDS_TABLE} unchanged, its {len(catalog.valid_ids)} active semantic IDs checked"
    assert unchanged in second.stdout
    assert "semantic IDs written to" not in second.stdout  # nothing was
    assert delta_version(str(out / SEMANTIC_IDS_TABLE)) == v1 == 0
    # Its first pass read every row group's kept rows (the earlier runs' passes kept them), bad rows included:
    # the rejects and their reasons are those read from the embeddings.
    kept = re.search(r"(\d+) of (\d+) row groups' fingerprints are kept", second.stdout)
    assert kept is not None and kept.group(1) == kept.group(2), second.stdout[-2000:]
    reasons = sorted((r["item_id"] or "", r["reason"]) for r in second.table(REJECTS_TABLE).to_pylist())
    assert reasons == catalog.rejects
    # A cache folder that cannot be made: the run says why, reads every embedding, and does the same.
    (trained.work.parent / "not-a-folder").write_text("")
    blocked = encode_only(trained, catalog.path, out, "validate,encode", "--fingerprint-cache",
                          trained.work.parent / "not-a-folder")
    assert f"no fingerprint cache: {trained.work.parent / 'not-a-folder'} cannot be used (FileExistsError" in \
        blocked.stdout
    assert "no commit" in blocked.stdout and sorted(
        (r["item_id"] or "", r["reason"]) for r in blocked.table(REJECTS_TABLE).to_pylist()) == catalog.rejects
    # --mode full encodes every row again: one new version, every row as it was (issue columns included).
    rc, stdout, err = helpers.run_main([
        "--input", catalog.path, "--work-dir", trained.work, "--output", out, "--stages", "validate,encode",
        "--model", CHAMPION, "--model-name", MODEL, "--experiment", EXPERIMENT, "--mode", "full"])
    assert rc == 0, err[-3000:]
    assert "mode: full" in stdout
    v3, rows3 = delta_version(str(out / SEMANTIC_IDS_TABLE)), helpers.read_delta(out / SEMANTIC_IDS_TABLE)
    assert v3 == 1
    assert rows3.sort_by("semantic_id").to_pylist() == rows1.sort_by("semantic_id").to_pylist()
    assert helpers.key_rows(rows1) == helpers.key_rows(trained.table(SEMANTIC_IDS_TABLE))
    assert len(set(rows1.column("mlflow_run_id").to_pylist())) == 1


def test_engine_without_materialisation_gives_the_same_tables(trained, catalog, tmp_path, monkeypatch) -> None:
    from pipelines.session import EngineSession

    monkeypatch.setattr(EngineSession, "materialize", lambda self, df: None)  # as a remote Sail server without one
    fallback = encode_only(trained, catalog.shuffled, tmp_path / "tables")
    assert helpers.key_rows(fallback.table(SEMANTIC_IDS_TABLE)) == helpers.key_rows(trained.table(SEMANTIC_IDS_TABLE))
    reasons = sorted((r["item_id"] or "", r["reason"]) for r in fallback.table(REJECTS_TABLE).to_pylist())
    assert reasons == catalog.rejects


def test_too_many_rejects_found_while_encoding_leave_the_tables_untouched(trained, catalog, tmp_path, capsys) -> None:
    out = tmp_path / "tables"
    encode_only(trained, catalog.path, out, stages="validate,encode")
    rc = main_with(["--input", catalog.path, "--work-dir", trained.work, "--output", out, "--stages",
                    "validate,encode", "--model", CHAMPION, "--model-name", MODEL, "--experiment", EXPERIMENT,
                    "--max-reject-share", "0.001"])
    assert rc == 2
    assert f"{len(catalog.rejects)} of {catalog.n_input} input rows" in capsys.readouterr().err
    assert delta_version(str(out / SEMANTIC_IDS_TABLE)) == delta_version(str(out / REJECTS_TABLE)) == 0


_PREDICT = textwrap.dedent("""
    import json, sys
    import numpy as np, pandas as pd
    model_uri, x_path, out_path, mode = sys.argv[1:5]
    if mode == "without-project":  # as on a serving host or Spark worker without the package installed
        sys.modules["pipelines"] = None
    import mlflow.pyfunc
    model = mlflow.pyfunc.load_model(model_uri)
    x = np.load(x_path)
    rows = [row.tolist() for row in x] if mode == "python-lists" else list(x)
    out = model.predict(pd.DataFrame({"embedding": rows}))
    json.dump({"codes": [[int(c) for c in row] for row in out["codes"]],
               "errors": [float(e) for e in out["quantization_error"]]}, open(out_path, "w"))
""")


def _predict_in_fresh_process(run: Run, catalog: Catalog, tmp_path: Path, mode: str) -> None:
    pick = list(range(0, len(catalog.valid_ids), 37))
    np.save(tmp_path / "x.npy", catalog.valid_embeddings[pick])
    # Unpickling refused, as MLflow means to make its default: the model is its code file and checkpoint.
    env = helpers.subprocess_env(MLFLOW_TRACKING_URI=f"sqlite:///{run.work.resolve() / 'mlflow.db'}",
                                 PYTHONPATH="", MLFLOW_ALLOW_PICKLE_DESERIALIZATION="false")
    proc = subprocess.run(
        [sys.executable, "-c", _PREDICT, CHAMPION, str(tmp_path / "x.npy"), str(tmp_path / "out.json"), mode],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = json.loads((tmp_path / "out.json").read_text())
    # The served model gives each item its nearest codes: the table's, except for the items the job
    # moved off a collision (their table tuple is then one of the model's alternatives).
    registry.configure_tracking(run.work)
    model = load_checkpoint(registry.resolve_model(CHAMPION).checkpoint)
    nearest = encode_array(model, catalog.valid_embeddings[pick])
    assert got["codes"] == nearest.codes.tolist()
    np.testing.assert_allclose(got["errors"], nearest.quantization_error, rtol=1e-5, atol=1e-6)
    rows = helpers.by_item(run.table(SEMANTIC_IDS_TABLE))
    moved = spread_codes(model, catalog).moved[pick]
    assert not moved.all()
    assert [rows[catalog.valid_ids[i]]["codes"] for i, m in zip(pick, moved) if not m] == [
        c for c, m in zip(got["codes"], moved) if not m]


def test_registered_model_reproduces_the_table_in_a_fresh_process(trained, catalog, tmp_path) -> None:
    _predict_in_fresh_process(trained, catalog, tmp_path, "installed")


def test_registered_model_loads_without_the_project_package(trained, catalog, tmp_path) -> None:
    _predict_in_fresh_process(trained, catalog, tmp_path, "without-project")


def test_registered_model_predicts_on_lists_of_python_floats(trained, catalog, tmp_path) -> None:
    _predict_in_fresh_process(trained, catalog, tmp_path, "python-lists")


def test_timestamps_are_utc_in_any_local_time_zone(trained, catalog, tmp_path) -> None:
    with helpers.local_timezone("Asia/Tokyo"):
        before = dt.datetime.now(dt.timezone.utc)
        run = encode_only(trained, catalog.path, tmp_path / "tables", stages="validate,encode")
        after = dt.datetime.now(dt.timezone.utc)
    stamps = {run.table(SEMANTIC_IDS_TABLE).column("tokenized_at")[0].as_py(),
              run.table(REJECTS_TABLE).column("rejected_at")[0].as_py()}
    assert all(before - dt.timedelta(seconds=1) <= s <= after for s in stamps), (before, stamps)


# --- the quality gate -----------------------------------------------------------------------------

def test_failed_gate_keeps_champion_and_tables(trained, catalog, capsys) -> None:
    sids_path = trained.tables / SEMANTIC_IDS_TABLE
    registry.configure_tracking(trained.work)
    versions_before = {v.version for v in MlflowClient().search_model_versions(f"name='{MODEL}'")}
    sid_version, rejects_version = delta_version(str(sids_path)), delta_version(str(trained.tables / REJECTS_TABLE))
    rows_before = helpers.key_rows(trained.table(SEMANTIC_IDS_TABLE))

    rc = main_with(["--input", catalog.path, "--work-dir", trained.work, "--model-name", MODEL,
                    "--experiment", EXPERIMENT, "--sample-size", "600", *helpers.SMALL_MODEL, *helpers.GATE_OFF,
                    "--gate-min-recon-cosine", "1"])
    assert rc == 3
    err = capsys.readouterr().err
    assert "quality gate failed" in err and "--gate-min-recon-cosine" in err and "recon_cos_mean" in err

    registry.configure_tracking(trained.work)
    versions = {v.version for v in MlflowClient().search_model_versions(f"name='{MODEL}'")}
    (new,) = versions - versions_before
    assert registry.alias_version(MODEL, registry.CHAMPION) == "1"
    assert registry.alias_version(MODEL, registry.CANDIDATE) == str(new) != "1"
    run = MlflowClient().get_run(MlflowClient().get_model_version(MODEL, str(new)).run_id)
    assert (run.data.tags["quality_gate"], run.info.status) == ("failed", "FAILED")
    assert delta_version(str(sids_path)) == sid_version
    assert delta_version(str(trained.tables / REJECTS_TABLE)) == rejects_version
    assert helpers.key_rows(trained.table(SEMANTIC_IDS_TABLE)) == rows_before


def main_with(argv: list) -> int:
    from jobs.tokenize_catalog import main

    return main([str(a) for a in argv])


# --- bad arguments and bad input ------------------------------------------------------------------

def test_input_is_required_without_demo(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main_with(["--work-dir", "unused"])
    assert exit_info.value.code == 2
    assert "--input is required" in capsys.readouterr().err


def test_encode_without_training_needs_a_model(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main_with(["--input", "unused", "--stages", "validate,encode"])
    assert exit_info.value.code == 2
    assert "--model models:/<name>@<alias>" in capsys.readouterr().err


def test_unknown_stage_is_named(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main_with(["--input", "unused", "--stages", "validate,tokenise"])
    assert exit_info.value.code == 2
    assert "--stages: unknown ['tokenise']" in capsys.readouterr().err


def test_help_lists_every_flag_group(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main_with(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for group in ("input:", "output:", "engine:", "stages and model:", "training:",
                  "quality gate (held-out sample):", "encoding and report:"):
        assert group in text
    for flag in ("--input", "--demo", "--output-table-prefix", "--format", "--engine", "--remote", "--stages",
                 "--model", "--max-reject-share", "--sample-size", "--codebook-size", "--estimator",
                 "--gate-min-unique-rate", "--encode-batch-size", "--suffix-budget"):
        assert f"{flag} " in text or f"{flag}\n" in text, flag
    from jobs.tokenize_catalog import build_parser

    # Every flag with a value by default says which (in its own words, or argparse's "(default: ...)").
    for action in build_parser()._actions:
        if action.help and action.default not in (None, False, "") and action.default is not argparse.SUPPRESS:
            shown = action.help % {"default": action.default}
            assert "default" in shown.lower(), action.option_strings
            if not isinstance(action.default, bool):  # a switch's default is its absence
                assert str(action.default) in shown, action.option_strings
    flat = " ".join(text.split())
    assert "(default: 200000)" in flat and "peak learning rate (default: 0.001)" in flat
    assert "mlartifacts/) (default: work)" in flat and "guided anchor on (default: 0.0: off)" in flat
    # The examples are commands to copy: a continued one keeps its backslash and its line break.
    assert "@champion \\\n        --input /data/catalog --output /data/semids" in text


def test_the_collision_alternatives_default_fits_a_small_codebook() -> None:
    from jobs.tokenize_catalog import parse_args

    # Not given: 16, or every code of a smaller codebook (a --codebook-size 8 run used to fail on a flag not set).
    assert parse_args(["--demo"]).model_config.collision_alternatives == 16
    assert parse_args(["--demo", "--codebook-size", "8"]).model_config.collision_alternatives == 8
    assert parse_args(["--demo", "--codebook-size", "8", "--collision-alternatives", "0"]
                      ).model_config.collision_alternatives == 0


def test_too_many_bad_rows_fail_before_training(tmp_path, capsys) -> None:
    good = helpers.random_vectors(30, 8)
    table = helpers.catalog_table([f"i{i}" for i in range(34)], [*good, None, None, [0.0] * 8, [1.0] * 3])
    helpers.write_delta(tmp_path / "catalog", table)
    rc = main_with(["--input", tmp_path / "catalog", "--work-dir", tmp_path / "work", *helpers.SMALL_MODEL])
    assert rc == 2
    err = capsys.readouterr().err
    assert "4 of 34 input rows" in err and "--max-reject-share 0.05" in err
    assert not (tmp_path / "work" / "tables" / SEMANTIC_IDS_TABLE).exists()
    assert not (tmp_path / "work" / "checkpoints").exists()


def test_model_of_another_dimension_is_refused(trained, tmp_path, capsys) -> None:
    helpers.write_delta(tmp_path / "catalog", helpers.catalog_table(["a", "b"], helpers.random_vectors(2, 24)))
    run_id = trained.table(SEMANTIC_IDS_TABLE).column("mlflow_run_id")[0].as_py()
    checkpoint = trained.work / "checkpoints" / f"{run_id}.pt"
    rc = main_with(["--input", tmp_path / "catalog", "--work-dir", tmp_path / "work", "--stages", "validate,encode",
                    "--model", checkpoint])
    assert rc == 2
    err = capsys.readouterr().err
    assert f"{checkpoint} expects {DIM}-d embeddings but the catalog has D = 24: give the catalog's" in err
    assert "(train one: leave out --model)" in err
    assert not (tmp_path / "work" / "tables" / SEMANTIC_IDS_TABLE).exists()


def test_missing_input_path_is_named(tmp_path, capsys) -> None:
    missing = tmp_path / "no" / "such" / "catalog"
    rc = main_with(["--input", missing, "--work-dir", tmp_path / "work"])
    assert rc == 2
    err = capsys.readouterr().err
    assert f"table path '{missing}' does not exist" in err


# --- regressions of bugs found in review ----------------------------------------------------------

def test_training_registers_the_model_as_is(catalog, tmp_path, monkeypatch) -> None:
    rc, _, err = helpers.run_main(["--input", catalog.path, "--work-dir", tmp_path, "--model-name", "csid-as-is",
                                   "--sample-size", "300", *helpers.SMALL_MODEL, *helpers.GATE_OFF,
                                   "--stages", "validate,train"])
    assert rc == 0, err[-3000:]
    registry.configure_tracking(tmp_path)
    assert registry.alias_version("csid-as-is", registry.CANDIDATE) == "1"
    # @champion moves when the model's IDs are published, by the run that encodes with it.
    assert registry.alias_version("csid-as-is", registry.CHAMPION) is None
    rc, out, err = helpers.run_main(["--input", catalog.path, "--work-dir", tmp_path, "--model-name", "csid-as-is",
                                     "--model", "models:/csid-as-is@candidate", "--mode", "full",
                                     "--stages", "validate,encode"])
    assert rc == 0, err[-3000:]
    assert "version 1 is now @champion" in out
    assert registry.alias_version("csid-as-is", registry.CHAMPION) == "1"


_TWO_SESSIONS = textwrap.dedent("""
    import json
    from pipelines.session import start_session
    caller = start_session("local", shuffle_partitions=3)   # e.g. a notebook's session
    job = start_session("local", shuffle_partitions=7)      # what run_job does in the same process
    same = job.spark is caller.spark
    partitions = caller.spark.conf.get("spark.sql.shuffle.partitions")
    job.stop()
    try:
        count = caller.spark.range(3).count()
    except Exception as e:
        count = type(e).__name__
    print(json.dumps({"same": same, "partitions": partitions, "count": count}))
""")


def test_second_embedded_session_is_its_own(tmp_path) -> None:
    proc = subprocess.run([sys.executable, "-c", _TWO_SESSIONS], cwd=tmp_path, env=helpers.subprocess_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"same": False, "partitions": "3", "count": 3}


_DEAD_CALLER_SESSION = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, {tests!r})
    import helpers
    from pipelines.session import start_session
    from jobs.tokenize_catalog import main
    caller = start_session("local")   # e.g. a notebook's session, the process's active one ...
    caller.spark.range(3).count()
    caller._server.stop()             # ... whose server went away (or whose session timed out)
    rc = main(["--demo", "--demo-items", "300", "--demo-dim", "8", "--work-dir", "work",
               *helpers.SMALL_MODEL, *helpers.GATE_OFF])
    print("rc", rc, flush=True)
    os._exit(rc)                      # the dead session's client threads would retry at exit
""")


def test_the_job_runs_on_its_own_session_when_the_callers_is_dead(tmp_path) -> None:
    # MLflow looks the active Spark session up when a run starts; it must find the job's, not the caller's.
    code = _DEAD_CALLER_SESSION.format(tests=str(helpers.ROOT / "tests"))
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=helpers.subprocess_env(),
                          capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert "300 semantic IDs written" in proc.stdout and "rc 0" in proc.stdout


@pytest.mark.parametrize("own_process,debug,users,expected", [
    (True, False, {}, {"MLFLOW_LOGGING_LEVEL": "WARNING", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}),
    (True, False, {"MLFLOW_LOGGING_LEVEL": "DEBUG"},
     {"MLFLOW_LOGGING_LEVEL": "DEBUG", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}),
    (True, True, {}, {"MLFLOW_LOGGING_LEVEL": None, "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": None}),
    (False, False, {}, {"MLFLOW_LOGGING_LEVEL": None, "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": None}),
])
def test_mlflow_is_quiet_in_the_scripts_own_process_only(monkeypatch, own_process, debug, users, expected) -> None:
    """The script turns MLflow's INFO lines and progress bars off, keeping what the user exported; --debug, or
    main called from another program, leaves the environment as it is."""
    import jobs.tokenize_catalog as cli

    for name in expected:
        monkeypatch.delenv(name, raising=False)
    for name, value in users.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(cli, "_OWN_PROCESS", own_process)
    cli._quiet_mlflow(debug)
    assert {name: os.environ.get(name) for name in expected} == expected


def test_a_level_where_one_code_holds_most_items_is_warned_about() -> None:
    from jobs.runner import crowded_levels

    rng = np.random.default_rng(0)
    codes = rng.integers(0, 16, (1000, 3))
    assert crowded_levels(codes, 16) == []
    codes[:600, 1] = 5  # level 2: one code holds 60% of the items, every code still in use
    (line,) = crowded_levels(codes, 16)
    assert line.startswith("level 2: one code holds 6") and "of the 1,000 sampled items" in line
    assert "(--sample-size, about 1,280 where the catalog has them)" in line and "--codebook-size" in line


def test_console_script_entry_point_loads(tmp_path) -> None:
    probe = ("from importlib.metadata import entry_points; "
             "(ep,) = [e for e in entry_points(group='console_scripts') if e.name == 'tokenize-catalog']; "
             "print(ep.load().__module__)")
    proc = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "jobs.tokenize_catalog"


def test_the_job_passes_the_anchor_scale_to_training() -> None:
    from jobs.tokenize_catalog import parse_args
    from rqvae import TrainConfig

    cfg = parse_args(["--demo", "--taxonomy-weight", "0.01", "--taxonomy-anchor-scale", "3"])
    assert (cfg.train_config.taxonomy_weight, cfg.train_config.taxonomy_anchor_scale) == (0.01, 3.0)
    assert parse_args(["--demo"]).train_config.taxonomy_anchor_scale == TrainConfig.taxonomy_anchor_scale


@pytest.mark.parametrize(("argv", "anchored"), [([], 3), (["--levels", "4"], 4), (["--anchor-levels", "all"], 3),
                                               (["--anchor-levels", "2"], 2), (["--no-anchor"], 0)])
def test_every_level_is_anchored_unless_asked_otherwise(argv: list[str], anchored: int) -> None:
    from jobs.tokenize_catalog import parse_args

    assert parse_args(["--demo", *argv]).model_config.anchored == anchored


def test_prefix_fill_defaults_to_half_and_is_a_share() -> None:
    from jobs.tokenize_catalog import parse_args

    assert parse_args(["--demo"]).train_config.prefix_fill == 0.5
    assert parse_args(["--demo", "--prefix-fill", "0"]).train_config.prefix_fill == 0.0


def test_anchor_refine_passes_default_to_five_and_reach_the_train_config() -> None:
    from jobs.tokenize_catalog import parse_args

    assert parse_args(["--demo"]).train_config.anchor_refine_passes == 5
    assert parse_args(["--demo", "--anchor-refine-passes", "0"]).train_config.anchor_refine_passes == 0


def test_engine_memory_is_a_size_with_no_cap_by_default() -> None:
    from jobs.tokenize_catalog import parse_args

    assert parse_args(["--demo"]).engine_memory == 0
    assert parse_args(["--demo", "--engine-memory", "1536m"]).engine_memory == 1536 << 20
    assert parse_args(["--demo", "--engine-memory", "0"]).engine_memory == 0


def test_the_trained_run_ran_under_an_engine_memory_pool(trained) -> None:
    assert "engine memory pool 2048 MiB: sorts and aggregates beyond it spill to disk" in trained.stdout


def test_a_pool_too_small_for_the_job_fails_naming_the_flag(trained, catalog, tmp_path) -> None:
    output = tmp_path / "out"
    rc, out, err = helpers.run_main([
        "--input", catalog.path, "--work-dir", trained.work, "--output", output, "--stages", "validate,encode",
        "--model", CHAMPION, "--model-name", MODEL, "--experiment", EXPERIMENT, "--engine-memory", "256k",
    ])
    assert rc == 1, out[-2000:]
    assert "FAILED: the embedded engine needed more memory than its pool allows" in err
    assert "Fix: rerun with a larger --engine-memory (it is 256k), or --engine-memory 0 for no limit" in err
    assert not (output / SEMANTIC_IDS_TABLE / "_delta_log").exists()


def test_the_fill_cap_is_scaled_to_the_whole_valid_catalog(catalog, tmp_path, monkeypatch) -> None:
    # The model is fitted on a 300-item sample but encodes every valid item: the 2-prefix cap must be
    # the catalog's, not the sample's.
    import jobs.runner as runner

    seen: dict[str, object] = {}
    real_fit = runner.fit

    def spy(x, *args, **kwargs):  # type: ignore[no-untyped-def]
        seen.update(rows=len(x), catalog_items=kwargs.get("catalog_items"))
        return real_fit(x, *args, **kwargs)

    monkeypatch.setattr(runner, "fit", spy)
    rc, _, err = helpers.run_main(["--input", catalog.path, "--work-dir", tmp_path, "--model-name", "csid-fill",
                                   "--sample-size", "300", *helpers.SMALL_MODEL, *helpers.GATE_OFF,
                                   "--stages", "validate,train"])
    assert rc == 0, err[-3000:]
    assert seen["rows"] < len(catalog.valid_ids)
    assert seen["catalog_items"] == len(catalog.valid_ids)  # valid rows: the rejects and the duplicate id excluded


def test_a_suffix_beyond_the_budget_is_explained_with_the_settings_that_help(trained, catalog, tmp_path) -> None:
    """40 copies of one embedding share a tuple beyond the 16 codes of their prefix: the run
    says how many items have a suffix past the budget and names the settings that leave fewer; a run with
    nothing past the budget says nothing of it."""
    copies = 40
    path = helpers.write_delta(tmp_path / "copies", helpers.catalog_table(
        [*catalog.valid_ids, *(f"copy-{i}" for i in range(copies))],
        [*map(list, catalog.valid_embeddings), *[list(catalog.valid_embeddings[0])] * copies], pa.list_(pa.float32())))
    crowded = encode_only(trained, path, tmp_path / "crowded", "validate,encode,report", "--suffix-budget", "4")
    overflow = int(re.search(r"suffix overflow (\d+) \(budget 4\)", crowded.stdout).group(1))
    assert overflow > 0, crowded.stdout[-2000:]
    assert f"{overflow} items have a suffix of 4 or more" in crowded.stdout
    assert "--prefix-fill 0.15" in crowded.stdout and "--codebook-size" in crowded.stdout
    roomy = encode_only(trained, path, tmp_path / "roomy", "validate,encode,report", "--suffix-budget", "1000")
    assert "suffix overflow 0 (budget 1000)" in roomy.stdout and "items have a suffix of" not in roomy.stdout


def assert_stuck_items_have_no_free_code(rows: list[dict], codebook_size: int) -> int:
    """Every prefix holding an item with a suffix of 1 or more has all of its K last-level codes issued: the
    second chance left no item on a shared tuple while its prefix had a code free. Returns how many such
    items there are."""
    held: dict[tuple, set[int]] = {}
    for r in rows:
        held.setdefault(tuple(r["codes"][:-1]), set()).add(r["codes"][-1])
    stuck = [r for r in rows if r["suffix"] >= 1]
    for r in stuck:
        assert len(held[tuple(r["codes"][:-1])]) == codebook_size, r
    return len(stuck)


def test_items_still_sharing_a_tuple_get_a_second_chance_over_every_last_level_code(catalog, tmp_path) -> None:
    """A model that offers colliding items only 2 alternatives leaves some sharing a tuple; the job ranks those
    over all K codes and spreads them again. The table holds rqvae.issue_codes' codes (the NumPy path), an
    item keeps a suffix only where its prefix has no code free, and an incremental run of 30 copies of one
    item fills its prefix's free codes the same way, moving no published ID."""
    work, name = tmp_path / "work", "csid-second-chance"
    rc, out, err = helpers.run_main([
        "--input", catalog.path, "--work-dir", work, "--model-name", name, "--experiment", name,
        "--sample-size", "800", *helpers.SMALL_MODEL, *helpers.GATE_OFF, "--collision-alternatives", "2"])
    assert rc == 0, err[-4000:]
    first = Run(work, work / "tables", out)
    (checkpoint,) = (work / "checkpoints").glob("*.pt")
    model = load_checkpoint(checkpoint)
    rows = helpers.by_item(first.table(SEMANTIC_IDS_TABLE))
    expected = helpers.issued_codes(model, catalog.valid_embeddings, catalog.valid_ids)
    without = helpers.issued_codes(model, catalog.valid_embeddings, catalog.valid_ids, second_chance=False)
    np.testing.assert_array_equal(np.array([rows[i]["codes"] for i in catalog.valid_ids]), expected.codes)
    gained = int((expected.codes != without.codes).any(axis=1).sum())
    assert gained > 0, "the catalog should leave items sharing a tuple after 2 alternatives"
    assert re.search(rf"second chance: {gained} items still sharing a tuple moved", out), out[-3000:]
    assert_stuck_items_have_no_free_code(list(rows.values()), K)
    helpers.assert_suffix_contract(list(rows.values()))
    # --no-second-chance: the spreading's IDs alone, nothing read again.
    rc, off, err = helpers.run_main([
        "--input", catalog.path, "--work-dir", work, "--output", tmp_path / "off", "--stages", "validate,encode,report",
        "--model", f"models:/{name}@champion", "--model-name", name, "--experiment", name, "--no-second-chance"])
    assert rc == 0, err[-4000:]
    assert "second chance" not in off
    off_rows = helpers.by_item(helpers.read_delta(tmp_path / "off" / SEMANTIC_IDS_TABLE))
    np.testing.assert_array_equal(np.array([off_rows[i]["codes"] for i in catalog.valid_ids]), without.codes)

    copies = [f"copy-{j:02d}" for j in range(30)]
    path = helpers.write_delta(tmp_path / "grown", helpers.catalog_table(
        [*catalog.valid_ids, *copies],
        [*map(list, catalog.valid_embeddings), *[list(catalog.valid_embeddings[5])] * 30], pa.list_(pa.float32())))
    version = delta_version(str(first.tables / SEMANTIC_IDS_TABLE))
    rc, out, err = helpers.run_main([
        "--input", path, "--work-dir", work, "--stages", "validate,encode,report",
        "--model", f"models:/{name}@champion", "--model-name", name, "--experiment", name])
    assert rc == 0, err[-4000:]
    assert "mode: incremental" in out and "second chance:" in out
    grown = helpers.by_item(first.table(SEMANTIC_IDS_TABLE))
    assert {i: grown[i]["semantic_id"] for i in rows} == {i: r["semantic_id"] for i, r in rows.items()}
    assert len({grown[c]["semantic_id"] for c in copies}) == 30
    assert_stuck_items_have_no_free_code(list(grown.values()), K)
    helpers.assert_sid_checker_passes(first.tables / SEMANTIC_IDS_TABLE, "--previous-version", str(version))



def test_the_script_turns_collection_back_on_and_a_library_call_leaves_it_as_found(monkeypatch) -> None:
    """The script runs its imports without the cyclic collector and, once they are done, freezes what they left
    and turns collection back on (jobs.tokenize_catalog._settle_gc); ``main`` called from another program (a
    test, the console script, a Databricks wheel task) never touches its collector."""
    import gc

    import jobs.tokenize_catalog as tc

    frozen = gc.get_freeze_count()
    try:
        gc.enable()
        tc._settle_gc()  # as a library: nothing changes
        assert gc.isenabled() and gc.get_freeze_count() == frozen
        gc.disable()
        tc._settle_gc()  # a library call with the collector off (the caller's choice): still nothing
        assert not gc.isenabled() and gc.get_freeze_count() == frozen
        monkeypatch.setattr(tc, "_OWN_PROCESS", True)  # as the script, which turned it off at its start
        tc._settle_gc()
        assert gc.isenabled() and gc.get_freeze_count() > frozen
    finally:
        gc.unfreeze()
        gc.enable()


def test_the_script_exits_with_mains_code(tmp_path) -> None:
    """Run as a script, the job leaves through _exit (the collector frozen, sys.exit): a refused input still
    exits 2 with its message, and refused arguments exit 2 from argparse."""
    script = Path(__file__).resolve().parents[1] / "jobs" / "tokenize_catalog.py"
    missing = subprocess.run([sys.executable, str(script), "--input", str(tmp_path / "no_such_catalog"), "--work-dir",
                              str(tmp_path / "work")], capture_output=True, text=True, timeout=300)
    assert missing.returncode == 2, missing.stderr[-2000:]
    assert "does not exist" in missing.stderr
    refused = subprocess.run([sys.executable, str(script), "--stages", "bogus", "--input", "x"], capture_output=True,
                             text=True, timeout=300)
    assert refused.returncode == 2 and "--stages: unknown ['bogus']" in refused.stderr


@pytest.mark.parametrize("concurrent", [False, True])
def test_a_check_beside_the_statistics_has_ended_and_raised_when_they_have(concurrent) -> None:
    """The pre-publish ledger check runs beside the statistics on JVM engines (jobs/runner.py's _beside): its
    failure still stops the run before anything is written, and a failure of the block itself comes first."""
    import threading

    from jobs import runner
    from pipelines.ledger import RowAccountingError

    done, released = threading.Event(), threading.Event()

    def failing_check(rows: int, wait_s: float) -> None:
        released.wait(timeout=wait_s)  # beside the block: not before the block has run
        done.set()
        raise RowAccountingError(f"row accounting failed: {rows} rows")

    after_block = []
    with pytest.raises(RowAccountingError, match="row accounting failed: 7 rows"), \
            runner._beside(concurrent, failing_check, 7, wait_s=30 if concurrent else 0):
        after_block.append(done.is_set())  # beside: the check is still waiting; before: it has raised already
        released.set()
    assert after_block == ([False] if concurrent else [])
    assert done.is_set()

    done.clear()
    released.clear()  # the check now waits 0.3 s, and the block fails at once
    with pytest.raises(ValueError, match="the statistics broke") as raised, \
            runner._beside(True, failing_check, 7, wait_s=0.3):
        raise ValueError("the statistics broke")
    assert done.is_set()  # waited for, though its own error is not the one raised
    assert raised.value.__notes__ == ["the check beside it failed too: row accounting failed: 7 rows"]


@pytest.mark.parametrize("concurrent", [False, True])
def test_what_runs_beside_a_block_hands_its_value_on(concurrent) -> None:
    # The engine's count of the catalog runs beside the encode pass on JVM engines: the value is read after it.
    import threading

    from jobs import runner

    released = threading.Event()

    def count(n: int) -> int:
        released.wait(timeout=30 if concurrent else 0)
        return n + 1

    with runner._beside(concurrent, count, 41) as counted:
        assert counted.done() is not concurrent  # beside: still waiting for the block
        released.set()
    assert counted.result(timeout=0) == 42


def test_a_delta_catalog_asks_for_a_session_with_delta_whatever_the_output_format(tmp_path) -> None:
    """A classic session is started with Delta when the catalog is a Delta table, not only when the output is: a
    Parquet output over a Delta catalog otherwise failed at the catalog's read (DATA_SOURCE_NOT_FOUND, exit 1)
    instead of starting with Delta, or being refused at start with the fix named."""
    from jobs.runner import _wants_delta
    from jobs.tokenize_catalog import parse_args

    delta = helpers.write_delta(tmp_path / "delta-catalog", helpers.catalog_table(["a"], [[0.5, 0.5]]))
    parquet = tmp_path / "parquet-catalog"
    parquet.mkdir()
    assert _wants_delta(parse_args(["--input", str(delta), "--format", "parquet"]))
    assert _wants_delta(parse_args(["--input", str(parquet), "--format", "delta"]))
    assert not _wants_delta(parse_args(["--input", str(parquet), "--format", "parquet"]))
    assert _wants_delta(parse_args(["--input", str(parquet), "--format", "parquet", "--input-format", "delta"]))
    assert not _wants_delta(parse_args(["--input", "s3://bucket/catalog", "--format", "parquet"]))
