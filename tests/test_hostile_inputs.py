"""The job as a hostile but realistic user drives it: odd paths, bad arguments, bad tables, the reject
limit, a validate-only run, Parquet output. Each case ends in exit 0, or in exit 2 (3) with a message that
names the fix, and never in a traceback.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import helpers
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable, write_deltalake

import pipelines.registry as registry
from pipelines import publish
from pipelines.demo import write_demo_catalog
from pipelines.schema import REJECTS_TABLE, RUN_REJECTS_TABLE, RUNS_TABLE, SEMANTIC_IDS_TABLE
from rqvae.synthetic import CatalogSpec

pytestmark = [pytest.mark.spark, pytest.mark.usefixtures("job_isolation")]

MODEL, DIM = "csid-hostile", 16
CHAMPION = f"models:/{MODEL}@champion"
TRAIN = ["--sample-size", "600", *helpers.SMALL_MODEL, *helpers.GATE_OFF, "--model-name", MODEL, "--experiment", MODEL]
# Every character the engine used to mangle (percent-encoded siblings, '?' cutting the path), and unicode.
ODD = "prev out #1 50% ?é ü"



@pytest.fixture(scope="module")
def odd(tmp_path_factory) -> dict[str, Path]:
    """A catalog, a work dir and an output, each in a folder named with every odd character; one trained run."""
    root = tmp_path_factory.mktemp("odd") / ODD
    write_demo_catalog(root / "in put" / "cat", CatalogSpec(n_items=800, dim=DIM, seed=2))
    paths = {"input": root / "in put" / "cat", "work": root / "wo rk#?", "output": root / "out put"}
    rc, out, err = helpers.run_main(["--input", paths["input"], "--work-dir", paths["work"], "--output",
                                     paths["output"], *TRAIN])
    assert rc == 0, err[-3000:]
    paths["stdout"] = out  # type: ignore[assignment]
    return paths


def test_odd_characters_in_input_output_and_work_paths_land_exactly_there(odd) -> None:
    out = odd["output"]
    table = DeltaTable(str(out / SEMANTIC_IDS_TABLE)).to_pyarrow_table()  # at the stated place, read by delta-rs
    assert table.num_rows == 800 and all(table.column("active").to_pylist())
    assert f"800 semantic IDs written to {out / SEMANTIC_IDS_TABLE}" in odd["stdout"]
    # nothing beside it: no percent-encoded sibling, no table cut at '?', no stray MLflow database
    assert sorted(p.name for p in out.parent.iterdir()) == ["in put", "out put", "wo rk#?"]
    assert (odd["work"] / "mlflow.db").is_file()
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == sorted(
        [*publish.SET_TABLES, RUNS_TABLE, "report"])
    helpers.assert_sid_checker_passes(out / SEMANTIC_IDS_TABLE)


def test_an_incremental_run_merges_into_a_table_at_an_odd_path(odd) -> None:
    before = DeltaTable(str(odd["output"] / SEMANTIC_IDS_TABLE)).to_pyarrow_table().to_pylist()
    rc, out, err = helpers.run_main(["--input", odd["input"], "--work-dir", odd["work"], "--output", odd["output"],
                                     "--model", CHAMPION])
    assert rc == 0, err[-3000:]
    assert "mode: incremental" in out
    after = DeltaTable(str(odd["output"] / SEMANTIC_IDS_TABLE)).to_pyarrow_table().to_pylist()
    assert sorted(map(str, after)) == sorted(map(str, before))


def test_model_alone_means_no_training(odd) -> None:
    """--model with the default stages used to train a new model, move @champion and change every ID."""
    registry.configure_tracking(odd["work"])
    versions = registry.MlflowClient().search_model_versions(f"name = '{MODEL}'")
    rc, out, err = helpers.run_main(["--input", odd["input"], "--work-dir", odd["work"], "--output", odd["output"],
                                     "--model", CHAMPION])
    assert rc == 0, err[-3000:]
    assert "==> train" not in out and "mode: incremental" in out
    registry.configure_tracking(odd["work"])
    assert len(registry.MlflowClient().search_model_versions(f"name = '{MODEL}'")) == len(versions)
    assert registry.alias_version(MODEL, registry.CHAMPION) == "1"


def test_a_percent_escape_in_a_path_is_refused_with_the_reason(tmp_path) -> None:
    rc, _, err = helpers.run_main(["--demo", "--demo-items", "300", "--work-dir", tmp_path / "w",
                                   "--output", tmp_path / "a%41b", *TRAIN])
    assert rc == 2 and "'%41'" in err and "rename the folder" in err and "Traceback" not in err, err[-2000:]
    assert not (tmp_path / "a%41b").exists() and not (tmp_path / "aAb").exists()


# --- arguments: refused when parsed, the flag named --------------------------------------------------

BAD_ARGUMENTS = [
    (["--max-reject-share", "1.5"], "argument --max-reject-share: must be a share between 0 and 1, got 1.5"),
    (["--sample-size", "0"], "argument --sample-size: must be at least 16, got 0"),
    (["--levels", "0"], "argument --levels: must be at least 1, got 0"),
    (["--lr", "-1"], "argument --lr: must be above 0, got -1"),
    (["--lr", "nan"], "argument --lr: must be a finite number, got 'nan'"),
    (["--hidden-dims", "abc"], "argument --hidden-dims: expected comma-separated positive widths"),
    (["--hidden-dims", "64,,32"], "argument --hidden-dims: expected comma-separated positive widths"),
    (["--embedding-dim", "0"], "argument --embedding-dim: must be at least 1, got 0"),
    (["--codebook-size", "1"], "argument --codebook-size: must be at least 2, got 1"),
    (["--epochs", "0"], "argument --epochs: must be at least 1, got 0"),
    (["--encode-batch-size", "0"], "argument --encode-batch-size: must be at least 1, got 0"),
    (["--gate-min-utilization", "2"], "argument --gate-min-utilization: must be a share between 0 and 1, got 2"),
    (["--prefix-fill", "2"], "argument --prefix-fill: must be a share between 0 and 1, got 2"),
    (["--anchor-refine-passes", "-1"], "argument --anchor-refine-passes: must be at least 0, got -1"),
    (["--engine-memory", "lots"], "argument --engine-memory: expected a size such as 2g, 1536m or 0, got 'lots'"),
    (["--engine-memory=-2g"], "argument --engine-memory: must be 0 or more, got '-2g'"),
    (["--model-name", "bad/name"], "argument --model-name: 'bad/name' is not a usable registered model name"),
    (["--model-name", ""], "argument --model-name: '' is not a usable registered model name"),
    (["--experiment", " "], "argument --experiment: must not be empty"),
    (["--device", "tpu"], "argument --device: choose one of auto, cpu, cuda, mps (or cuda:N), got 'tpu'"),
    (["--model", "x.pt", "--stages", "validate,train,encode"], "--model names the model to use, but --stages asks"),
    (["--taxonomy-weight", "0.1"], "--taxonomy-weight needs the catalog's taxonomy: pass --category-col"),
    (["--anchor-levels", "4"], "--anchor-levels 4 is more than the --levels 3 there are: use at most 3, or all"),
    (["--anchor-levels", "0"], "argument --anchor-levels: must be at least 1, got 0 (or 'all')"),
    (["--anchor-levels", "most"], "argument --anchor-levels: expected a whole number, got 'most' (or 'all')"),
    (["--shared-codebook"], "--shared-codebook shares the latent codebook of the learned levels, and with "
                            "--anchor-levels all every level is anchored: pass --anchor-levels 2 with it"),
    (["--taxonomy-anchor-scale", "-1"], "argument --taxonomy-anchor-scale: must be 0 or more, got -1"),
    (["--collision-alternatives", "300"], "--collision-alternatives 300 is more than the --codebook-size 256 codes"),
    (["--collision-alternatives", "-1"], "argument --collision-alternatives: must be at least 0, got -1"),
]


@pytest.mark.parametrize("argv,message", BAD_ARGUMENTS, ids=[" ".join(a) for a, _ in BAD_ARGUMENTS])
def test_bad_arguments_exit_2_naming_the_flag(argv, message, capsys) -> None:
    from jobs.tokenize_catalog import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--input", "unused", *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has CUDA: nothing to refuse")
@pytest.mark.parametrize("flag", ["--device", "--encode-device"])
def test_cuda_asked_without_cuda_fails_before_any_work(flag, tmp_path, capsys) -> None:
    from jobs.tokenize_catalog import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--demo", "--work-dir", str(tmp_path), flag, "cuda"])
    assert exit_info.value.code == 2
    assert f"{flag} cuda: this machine has no CUDA device" in capsys.readouterr().err
    assert not tmp_path.joinpath("demo_catalog").exists()


# --- bad tables: exit 2 with the fix, no traceback ----------------------------------------------------

def _empty(path: Path) -> Path:
    write_deltalake(str(path), pa.table({"item_id": pa.array([], pa.string()),
                                         "embedding": pa.array([], pa.list_(pa.float32()))}))
    return path


def _all_null(path: Path) -> Path:
    return helpers.write_delta(path, helpers.catalog_table([f"i{i}" for i in range(50)], [None] * 50))


def _csv(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("item_id,embedding\na,1\n")
    return path


def _empty_folder(path: Path) -> Path:
    path.mkdir(parents=True)
    return path


def _delta(path: Path) -> Path:
    return helpers.write_delta(path, helpers.catalog_table(["a", "b"], helpers.random_vectors(2, DIM)))


def _parquet(path: Path) -> Path:
    path.mkdir(parents=True)
    pq.write_table(helpers.catalog_table(["a", "b"], helpers.random_vectors(2, DIM)), path / "part-0.parquet")
    return path


BAD_TABLES = [
    ("empty table", _empty, [], "the catalog has no rows: nothing to tokenize"),
    ("all embeddings null", _all_null, [], "column 'embedding' has no non-null values"),
    ("CSV file", _csv, [], "is neither a Delta table (no _delta_log folder) nor Parquet"),
    ("CSV read as Parquet", _csv, ["--input-format", "parquet"], "cannot read"),
    ("empty folder", _empty_folder, [], "is an empty folder, not a table"),
    ("Delta read as Parquet", _delta, ["--input-format", "parquet"], "is a Delta table: reading its Parquet files"),
    ("Parquet read as Delta", _parquet, ["--input-format", "delta"], "is not a Delta table (no _delta_log folder)"),
    ("too few rows to train", _delta, [], "only 2 valid items to train on; a model needs at least 16"),
    ("a table prefix on the embedded engine", _delta, ["--output-table-prefix", "semids"],
     "--output-table-prefix semids: the embedded engine's catalog lives only as long as the job"),
    ("no such registered model", _delta, ["--model", "models:/no-such-model@champion"], "no-such-model"),
    ("no such checkpoint", _delta, ["--model", "/no/such.pt"], "/no/such.pt"),
]


@pytest.mark.parametrize("make,extra,message", [c[1:] for c in BAD_TABLES], ids=[c[0] for c in BAD_TABLES])
def test_bad_tables_exit_2_with_the_fix(make, extra, message, tmp_path) -> None:
    source = make(tmp_path / "catalog")
    rc, out, err = helpers.run_main(["--input", source, "--work-dir", tmp_path / "work", *TRAIN, *extra])
    assert rc == 2, (out[-2000:], err[-2000:])
    assert message in err and "Traceback" not in err and "unexpected" not in err, err[-2000:]
    assert not (tmp_path / "work" / "tables" / SEMANTIC_IDS_TABLE).exists()


# --- the reject limit, validate-only runs, Parquet without bad rows -----------------------------------

def _with_bad_rows(path: Path, bad: int) -> Path:
    good = helpers.random_vectors(300, DIM, seed=7)
    ids = [f"i{i}" for i in range(300 + bad)]
    return helpers.write_delta(path, helpers.catalog_table(ids, [*good, *[[0.0] * DIM] * bad]))


def test_rejects_of_a_run_over_the_reject_limit_are_written_beside_the_set(tmp_path) -> None:
    """The message used to say "see the rejects table" when no rejects table of the run existed."""
    catalog = _with_bad_rows(tmp_path / "catalog", 40)
    out = tmp_path / "out"
    rc, _, err = helpers.run_main(["--input", catalog, "--work-dir", tmp_path / "work", "--output", out, *TRAIN])
    assert rc == 2 and f"are in {out / RUN_REJECTS_TABLE}" in err, err[-2000:]
    # One place named for the reasons: this run's rejects (the set's rejects table is the last published run's).
    assert ("allows: fix the input, or raise --max-reject-share to accept them. The rejected rows of this run, with "
            f"their reasons, are in {out / RUN_REJECTS_TABLE}") in err, err[-2000:]
    rows = DeltaTable(str(out / RUN_REJECTS_TABLE)).to_pyarrow_table().to_pylist()
    assert sorted(r["item_id"] for r in rows) == sorted(f"i{i}" for i in range(300, 340))
    assert {r["reason"] for r in rows} == {"zero_vector"}
    assert not (out / SEMANTIC_IDS_TABLE).exists() and not (out / REJECTS_TABLE).exists()  # nothing published


def test_a_validate_only_run_leaves_the_published_set_as_it_was(odd) -> None:
    """`--stages validate` used to overwrite the set's rejects, which then disagreed with semantic_ids."""
    before = {name: DeltaTable(str(odd["output"] / name)).version() for name in publish.SET_TABLES}
    rc, out, err = helpers.run_main(["--input", odd["input"], "--work-dir", odd["work"], "--output", odd["output"],
                                     "--stages", "validate"])
    assert rc == 0, err[-2000:]
    assert "no semantic-ID table" not in out  # it has one; a validate run just does not read it
    assert {name: DeltaTable(str(odd["output"] / name)).version() for name in publish.SET_TABLES} == before
    assert DeltaTable(str(odd["output"] / RUN_REJECTS_TABLE)).to_pyarrow_table().num_rows == 0


def test_a_catalog_whose_ids_have_another_type_than_the_tables_is_refused(odd, tmp_path) -> None:
    """The table holds BIGINT ids; the same catalog with STRING ids would be matched by casting ("01" naming
    item 1, "1.0" failing the run halfway), so the run stops at validation, naming both types and the fix."""
    out = shutil.copytree(odd["output"], tmp_path / "out")
    version = DeltaTable(str(out / SEMANTIC_IDS_TABLE)).version()
    table = helpers.read_delta(odd["input"]).select(["item_id", "embedding"])
    table = table.set_column(0, "item_id", pa.array([f"0{i}" for i in table["item_id"].to_pylist()]))
    catalog = helpers.write_delta(tmp_path / "string-ids", table)
    rc, out_text, err = helpers.run_main(["--input", catalog, "--work-dir", odd["work"], "--output", out,
                                          "--model", f"models:/{MODEL}@champion", "--stages", "validate,encode"])
    assert rc == 2, err[-2000:]
    assert (f"--id-col item_id is STRING in this catalog, but {out / SEMANTIC_IDS_TABLE} holds BIGINT item ids"
            in err and "Give the catalog's ids the table's type (BIGINT)" in err), err[-2000:]
    assert "==> encode" not in out_text and DeltaTable(str(out / SEMANTIC_IDS_TABLE)).version() == version


def test_parquet_output_of_a_catalog_without_bad_rows(tmp_path) -> None:
    """Used to exit 1 after semantic_ids was swapped in: the empty rejects frame left no folder to swap."""
    catalog = _with_bad_rows(tmp_path / "catalog", 0)
    out = tmp_path / "out"
    rc, _, err = helpers.run_main(["--input", catalog, "--work-dir", tmp_path / "work", "--output", out,
                                   "--format", "parquet", *TRAIN])
    assert rc == 0, err[-2000:]
    assert pq.read_table(out / REJECTS_TABLE).num_rows == 0
    assert pq.read_table(out / SEMANTIC_IDS_TABLE).num_rows == 300
    runs = pq.read_table(out / RUNS_TABLE).to_pylist()
    published = [r for r in runs if r["status"] == "published"]
    assert len(published) == 1 and json.loads(published[0]["tokens"])[REJECTS_TABLE] == published[0]["mlflow_run_id"]
    assert not [p for p in out.iterdir() if ".backup-" in p.name or ".staging-" in p.name]


def test_a_second_run_on_a_busy_output_exits_4(odd, tmp_path) -> None:
    lock = odd["output"] / ".csid-writer.lock"
    import fcntl

    with open(lock, "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        rc, _, err = helpers.run_main(["--input", odd["input"], "--work-dir", odd["work"], "--output", odd["output"],
                                       "--model", CHAMPION])
    assert rc == 4 and "another run is writing" in err and "Run it again" in err, err[-2000:]


def test_an_output_or_work_dir_that_is_a_file_is_refused_at_start(tmp_path) -> None:
    catalog = _delta(tmp_path / "catalog")
    (tmp_path / "a-file").write_text("not a folder")
    rc, out, err = helpers.run_main(["--input", catalog, "--work-dir", tmp_path / "work", "--output",
                                     tmp_path / "a-file"])
    assert rc == 2 and f"--output {tmp_path / 'a-file'} is a file: give a folder" in err, err[-2000:]
    assert "==> validate" not in out
    rc, _, err = helpers.run_main(["--input", catalog, "--work-dir", tmp_path / "a-file"])
    assert rc == 2 and f"--work-dir {tmp_path / 'a-file'} is a file: give a folder" in err, err[-2000:]


def test_a_report_without_a_published_table_says_to_encode_first(tmp_path) -> None:
    catalog = _delta(tmp_path / "catalog")
    rc, _, err = helpers.run_main(["--input", catalog, "--work-dir", tmp_path / "work", "--output",
                                   tmp_path / "tables", "--stages", "report"])
    assert rc == 2 and "--stages report reports on the published semantic-ID table, and there is none at" in err
    assert "run the encode stage first" in err and "_delta_log" not in err, err[-2000:]


def test_an_unreachable_spark_connect_server_is_named_at_once(tmp_path, monkeypatch) -> None:
    import socket

    with socket.socket() as probe:  # a port nothing listens on once closed
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    for name in ("grpc_proxy", "https_proxy", "http_proxy", "GRPC_PROXY", "HTTPS_PROXY", "HTTP_PROXY"):
        monkeypatch.delenv(name, raising=False)
    rc, _, err = helpers.run_main(["--remote", f"sc://127.0.0.1:{port}", "--input", tmp_path / "catalog",
                                   "--work-dir", tmp_path / "work"])
    assert rc == 2 and f"cannot reach the Spark Connect server at 127.0.0.1:{port}" in err, err[-2000:]
    assert "Check --remote" in err


def test_an_unexpected_error_is_one_message_and_exit_1_unless_debug(tmp_path, monkeypatch) -> None:
    import jobs.runner

    def broken(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise KeyError("simulated bug")

    monkeypatch.setattr(jobs.runner, "_run_stages", broken)
    catalog = _delta(tmp_path / "catalog")
    rc, _, err = helpers.run_main(["--input", catalog, "--work-dir", tmp_path / "work"])
    assert rc == 1 and "FAILED with an unexpected KeyError: 'simulated bug'" in err and "--debug" in err
    assert "Traceback" not in err
    rc, _, err = helpers.run_main(["--input", catalog, "--work-dir", tmp_path / "work", "--debug"])
    assert rc == 1 and "Traceback" in err and "Rerun with --debug" not in err

    def in_a_worker(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202 - as pyspark words a worker's failure
        raise RuntimeError("An exception was thrown from the Python worker. Please see the stack trace below.\n"
                           "Traceback (most recent call last):\n  File \"udf.py\", line 3, in f\n"
                           "ModuleNotFoundError: No module named 'pipelines'\n\n\tat org.apache.spark.api.python.X")

    monkeypatch.setattr(jobs.runner, "_run_stages", in_a_worker)
    rc, _, err = helpers.run_main(["--input", catalog, "--work-dir", tmp_path / "work"])
    assert rc == 1 and "ModuleNotFoundError: No module named 'pipelines'" in err.splitlines()[-2], err[-2000:]


def test_leftover_link_folder_is_only_links(odd) -> None:
    """The safe links the engine reads odd paths through are symbolic links to the stated folders."""
    import tempfile

    links = Path(tempfile.gettempdir()) / f"csid-paths-{os.getuid()}"
    targets = {os.readlink(p) for p in links.iterdir() if p.is_symlink()}
    assert str(odd["output"]) in targets and str(odd["input"]) in targets
    assert all(p.is_symlink() for p in links.iterdir())
