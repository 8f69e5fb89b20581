"""Wiring of the tokenize job: session + MLflow run + stages. The only module that joins them.

Every piece of stage work is a ``pipelines`` function a scheduler can call on its own; this module
reads like the job's table of contents: validate, (train, align, register), encode, plan, gate,
publish, report.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import os
import platform
import shutil
import signal
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from pyspark.sql import DataFrame

from jobs.config import EXIT_BAD_INPUT, EXIT_CONFLICT, EXIT_GATE, JobConfig
from pipelines import fingerprint_cache, io, ledger, publish, registry
from pipelines.demo import TITLE, write_demo_catalog
from pipelines.drift import Drift, compare_tables, drift_of_plan, drift_table
from pipelines.encode import ENCODE_ALL, Encoded, TokenizerModel, cache_keys, encode_catalog
from pipelines.gate import away_failure, churn_failure, gate_failures
from pipelines.prefix_stats import (
    LABEL_ORDER,
    LABELS_PER_PREFIX,
    PrefixSummary,
    catalog_labels,
    check_label_column,
    report_tables,
    sample_labels,
)
from pipelines.report import REPORT_HTML, SUMMARY_JSON, SampleLabels, write_report
from pipelines.sample import TrainingArrays, collect_training_arrays, sample_for_training
from pipelines.schema import (
    CATEGORY,
    DRIFT_TABLE,
    ID_CHANGES_TABLE,
    ITEM_ID,
    LEVEL_STATS_TABLE,
    PREFIX_STATS_TABLE,
    REJECTS_TABLE,
    RUN_REJECTS_TABLE,
    RUNS_TABLE,
    SEMANTIC_IDS_TABLE,
    InputColumns,
)
from pipelines.session import DeltaNotAvailableError, EngineSession, start_session
from pipelines.uniquify import PART_ITEMS, parts_for
from pipelines.validate import (
    INFER_DIM_ROWS,
    NoValidRowsError,
    RowAccountingError,
    SchemaError,
    TooManyRejectsError,
    ValidationCounts,
    ValidationResult,
    check_counts,
    most_common_length,
    nonzero,
    stamp_rejects,
    validate_catalog,
    validation_counts,
)
from rqvae import ProgressPrinter, fit, load_checkpoint, save_checkpoint
from rqvae.align import Agreement, align_to
from rqvae.encode import encode_array
from rqvae.evaluate import evaluate_model
from rqvae.metrics import level_usage
from rqvae.model import RQVAE
from rqvae.synthetic import CatalogSpec
from rqvae.taxonomy import category_ids_from_paths

Stage = Callable[[str], Any]
MIN_TRAIN_ITEMS = 16  # fit needs a held-out part and evaluation more than 10 neighbours
_EXPECTED = (SchemaError, TooManyRejectsError, RowAccountingError, NoValidRowsError, FileNotFoundError,
             ledger.ModeError, io.CatalogFormatError, ledger.NotWhereStatedError)


class JobFailed(RuntimeError):
    """The job stopped on purpose (bad input, failed gate); ``exit_code`` is the process status."""

    def __init__(self, message: str, exit_code: int = EXIT_BAD_INPUT) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class JobResult:
    """Where everything went, printed at the end of the job."""

    tracking_uri: str
    run_id: str
    tables: dict[str, str] = field(default_factory=dict)
    report: dict[str, str] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    reasons: dict[str, int] = field(default_factory=dict)  # rejected rows per reason (not printed)
    model: str = ""
    mode: str = ""
    drift: Drift | None = None  # against the table version the run started from (what the churn gate measures)
    comparison: Drift | None = None  # against --compare-to

    def summary_lines(self) -> list[str]:
        lines = ["", "==> results"]
        lines += [f"    {k:<22}{v}" for k, v in self.counts.items()]
        if self.mode:
            lines.append(f"    {'mode':<22}{self.mode}")
        lines += [f"    {'table ' + k:<22}{v}" for k, v in self.tables.items()]
        lines += [f"    {'report ' + k:<22}{v}" for k, v in self.report.items()]
        if self.model:
            lines.append(f"    {'model':<22}{self.model}")
        lines.append(f"    {'mlflow run':<22}{self.run_id} ({self.tracking_uri})")
        if self.tracking_uri.startswith("sqlite:"):
            lines.append(f"    {'open the MLflow UI':<22}mlflow ui --backend-store-uri {self.tracking_uri}")
        return lines


@dataclass
class _Job:
    """One run's fixed parts: config, engine, output location, result, banner, clock."""

    cfg: JobConfig
    session: EngineSession
    location: io.OutputLocation
    result: JobResult
    stage: Stage
    now: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.timezone.utc))  # aware: UTC in Spark
    publishing: bool = False  # the set is being written: a failure now rolls it back
    summary: PrefixSummary | None = None  # of the published table (the report renders it)
    catalog_rows: int | None = None  # the engine's count of the catalog, once taken for the files it encodes
    catalog_count: Future | None = None  # that count, started at validation where the encode pass wants it
    files_to_confirm: io.EmbeddingFiles | None = None  # the files the pass read, until that count confirms them

    @property
    def spark(self) -> Any:
        return self.session.spark

    def materialize(self, df: DataFrame) -> DataFrame | None:
        return self.session.materialize(df)


def run_job(cfg: JobConfig, stage: Stage) -> JobResult:
    """Run the configured stages; raises JobFailed with an exit code on expected failures."""
    work = Path(cfg.work_dir)
    try:
        location = io.resolve_output(cfg.output or (None if cfg.output_table_prefix else str(work / "tables")),
                                     cfg.output_table_prefix, cfg.format, engine=cfg.engine)
        registry.preload_tracking_store()  # imported while the engine starts; tracking waits for it
        with stage(f"start engine ({cfg.engine})"):
            session = start_session(cfg.engine, cfg.remote, want_delta=_wants_delta(cfg),
                                    shuffle_partitions=cfg.shuffle_partitions, engine_memory=cfg.engine_memory)
            if session.memory_limit:
                print(f"    engine memory pool {session.memory_limit >> 20} MiB: sorts and aggregates beyond it "
                      "spill to disk (--engine-memory)")
    except (ValueError, DeltaNotAvailableError) as e:
        raise JobFailed(str(e)) from e
    try:
        with session.activated():  # libraries that look the session up (MLflow) find this one
            _check_output(cfg, session, location)
            tracking, experiment_id = _open_tracking(cfg, work)
            for stale in registry.fail_abandoned_runs(experiment_id):
                print(f"    MLflow run {stale} of a job that was killed is now marked FAILED")
            with mlflow.start_run(run_name=f"tokenize-{dt.datetime.now(dt.timezone.utc):%Y%m%d-%H%M%S}",
                                  tags=registry.process_tags()) as run:
                job = _Job(cfg, session, location, JobResult(tracking, run.info.run_id), stage)
                # A run that publishes holds the output for its whole length, so no other run half-publishes
                # beside it, and what a killed run left is put right before anything is read.
                with publish.writer_lock(location) if cfg.encodes else nullcontext():
                    if cfg.encodes:
                        _recover(job)
                    try:
                        _run_stages(job)
                    except Exception:
                        if job.publishing:  # a failure between the first write of the set and its entry
                            try:
                                _recover(job)
                            except Exception as e:  # noqa: BLE001 - the next start recovers; report the first error
                                print(f"    could not roll back now ({io.first_line(e, 200)}); "
                                      "the next run on this output will")
                        raise
                return job.result
    except _EXPECTED as e:
        raise JobFailed(str(e)) from e
    except (ledger.ConcurrentRunError, publish.OutputBusyError) as e:
        raise JobFailed(str(e), EXIT_CONFLICT) from e
    finally:
        session.stop()


def _check_output(cfg: JobConfig, session: EngineSession, location: io.OutputLocation) -> None:
    """Fail at start, not after a training, on an output the run could never write."""
    for flag, path in (("--output", None if location.is_catalog else io.local_path(location.root)),
                       ("--work-dir", Path(cfg.work_dir))):
        if path is not None and path.exists() and not path.is_dir():
            raise JobFailed(f"{flag} {path} is a file: give a folder (the job writes its "
                            f"{'tables' if flag == '--output' else 'MLflow store, checkpoints and caches'} under it)")
    # A path this machine's engine would read (a name without "/" may be a catalog table; a cluster reads its own
    # filesystem), checked now rather than after the training and the encode.
    compared = io.local_path(str(cfg.compare_to)) if cfg.compare_to and "/" in str(cfg.compare_to) else None
    if compared is not None and session.on_this_machine() and not compared.exists():
        raise JobFailed(f"--compare-to {cfg.compare_to} does not exist: give an earlier semantic_ids table (a Delta or "
                        "Parquet folder) to compare this run's IDs with")
    if not location.is_catalog:
        return
    if session.engine == "local":
        raise JobFailed(f"--output-table-prefix {location.root}: the embedded engine's catalog lives only as long as "
                        "the job, so its tables would be gone (and every ID issued anew) by the next run. Use --output "
                        "PATH here, or --engine spark / --remote with a persistent catalog (Hive metastore, Unity "
                        "Catalog)")
    try:
        exists = session.spark.catalog.databaseExists(location.root)
    except Exception:  # noqa: BLE001 - a catalog that cannot say: the write will tell
        return
    if not exists:
        raise JobFailed(f"--output-table-prefix {location.root}: no such schema (database). Create it first "
                        f"(CREATE SCHEMA {location.root}) or name an existing one")


def _open_tracking(cfg: JobConfig, work: Path) -> tuple[str, str]:
    """The MLflow store and experiment; a store that cannot be opened is exit 2 with the fix."""
    try:
        tracking = registry.configure_tracking(work)
        return tracking, registry.use_experiment(cfg.experiment, work)
    except Exception as e:  # noqa: BLE001 - mlflow and sqlalchemy raise many kinds
        raise JobFailed(f"cannot open the MLflow tracking store ({io.first_line(e, 300)}). Fix MLFLOW_TRACKING_URI, or "
                        f"move the broken {Path(work) / 'mlflow.db'} aside (the local default) and run again") from e


def _wants_delta(cfg: JobConfig) -> bool:
    """Whether the session must read or write Delta: a Delta output, or a catalog that is a Delta table (asked for
    with --input-format delta, or a local folder with a Delta log), so a session without Delta is refused at start
    with the fix named, not at the catalog's read."""
    if cfg.format == "delta" or cfg.input_format == "delta":
        return True
    local = io.local_path(str(cfg.input)) if cfg.input and cfg.input_format == "auto" else None
    return local is not None and (local / io.DELTA_LOG).is_dir()


def _recover(job: _Job) -> None:
    """Put back the published set a killed or failed run left half-written (pipelines/publish.py)."""
    io.remove_leftovers(job.location, publish.SET_TABLES)
    recovery = publish.recover(job.spark, job.location, job.result.run_id)
    if recovery is None:
        return
    print(f"    recovered {job.location.shown_root}: {recovery.action}")
    mlflow.set_tag("recovered", recovery.action[:5000])
    if recovery.published_run:  # its IDs are out: that run did its work, though its process was killed after
        registry.mark_published(recovery.published_run, job.result.run_id)
    if recovery.champion is not None:
        name, version = recovery.champion
        registry.set_alias(name, registry.CHAMPION, version)
        print(f"    {name} version {version} is now @{registry.CHAMPION} (the move that run did not get to make)")


def _run_stages(job: _Job) -> None:
    cfg, stage = job.cfg, job.stage
    if cfg.demo:
        with stage("write demo catalog"):
            job.cfg = cfg = _with_demo_catalog(cfg)
            print(f"    {cfg.demo_items} synthetic items x {cfg.demo_dim} dims -> {cfg.input}")
    given = _load_model(cfg.model) if cfg.model and not cfg.trains else None  # a bad --model fails before the scan
    with stage("validate"):
        # The table's state (its snapshot and one aggregation of the ledger) is read beside the catalog's validation
        # (on classic Spark a daily run at 1M rows waited 5 s for the catalog's snapshot, then 6 s for the state,
        # bench/RESULTS.md). Its error, if any, is raised here, after the catalog's.
        reads_state = cfg.encodes or cfg.trains
        # On classic Spark whose tasks run on this machine (so the stated path is the engine's table), a table of one
        # part is summarised from its files in the driver (ledger.read_table_state).
        in_driver = job.session.engine == "spark" and job.session.on_this_machine()
        state_ahead = _started(lambda: ledger.read_table_state(job.spark, job.location, in_driver=in_driver)
                               ) if reads_state else None
        try:
            catalog, v = _validate(job)
        except BaseException:
            if state_ahead is not None:  # not left reading while the engine stops under it
                state_ahead.exception()  # waits for it to end; its own error goes with it
            raise
        cfg = job.cfg  # now with the catalog's D
        if state_ahead is not None:
            state = state_ahead.result()
            print(f"    {state.describe() if state else 'no semantic-ID table at ' + job.location.shown_root + ' yet'}")
            if state is not None:
                _check_id_type(job, v, state)
        else:  # a validate or report run: the ledger is not planned against, so it is not read here
            state = None
        if state is not None and state.version is None and job.location.fmt == "delta":
            print("    WARNING: the table's Delta version cannot be read here, so a run that writes it at the same "
                  "time is not detected: schedule one run at a time on this output")
        # Without training the encode pass counts the reasons itself, so the embedding column is read once.
        if cfg.trains or not cfg.encodes:
            _check_counts(job, catalog.count(), validation_counts(v), v.rejects)
    model = _train(job, v, state) if cfg.trains else _with_dim(given, cfg.model, v.dim) if given else None
    if model is not None:
        job.result.model = f"{model.name} version {model.version}"
    if cfg.encodes and model is not None:
        _encode_and_publish(job, catalog, v, model, state)
    elif "validate" in cfg.stages:  # not a published set: this run's rejects go beside it
        job.result.tables["run_rejects"] = _write_run_rejects(job, v.rejects)
    if cfg.trains and model is not None and not cfg.encodes:  # a training-only run: @champion moves on publish
        print(f"    {model.name} version {model.version} stays @{registry.CANDIDATE} (@{registry.CHAMPION} moves when "
              f"its IDs are published: --model models:/{model.name}@{registry.CANDIDATE} --mode full)")
    if "report" in cfg.stages:
        with stage("report"):
            _report(job, model.codebook_size if model else cfg.model_config.codebook_size, catalog)


def _check_id_type(job: _Job, v: ValidationResult, state: ledger.TableState) -> None:
    """The catalog's ids must have the table's type: compared across types, the engine would cast them ('01' and
    '1' naming one item, '1.0' failing the run halfway)."""
    ours, theirs = (df.schema[ITEM_ID].dataType.simpleString().upper() for df in (v.clean, state.ledger))
    if ours != theirs:
        raise JobFailed(f"--id-col {job.cfg.id_col} is {ours} in this catalog, but "
                        f"{job.location.shown_of(SEMANTIC_IDS_TABLE)} holds {theirs} item ids: compared across types "
                        f"ids would be cast ('01' and '1' naming one item). Give the catalog's ids the table's type "
                        f"({theirs}) in the input, or write to another --output")


def _with_demo_catalog(cfg: JobConfig) -> JobConfig:
    path = Path(cfg.work_dir) / "demo_catalog"
    write_demo_catalog(path, CatalogSpec(n_items=cfg.demo_items, dim=cfg.demo_dim, seed=cfg.seed), fmt=cfg.format,
                       titles=True)
    return dataclasses.replace(cfg, input=str(path.resolve()), input_format=cfg.format,
                               category_col=cfg.category_col or CATEGORY, label_col=cfg.label_col or TITLE)


def _validate(job: _Job) -> tuple[DataFrame, ValidationResult]:
    """The catalog and its (lazy) validation: schema checked, D known, the run's params logged."""
    cfg = job.cfg
    source = _engine_path(job, str(cfg.input))
    catalog = io.read_catalog(job.spark, source, cfg.input_format)
    if _counts_ahead(job):
        # The engine's count, for the files the encode pass reads, runs while the driver validates and plans, and
        # is compared only once the plan is made: taken before the pass it held the pass up by 2-3 s, and started
        # with the pass its jobs waited for the pass's tasks and held up the next step (bench/RESULTS.md). An
        # error in it is raised where it is compared; a run stopped before then leaves it to end with the session.
        job.catalog_count = _started(catalog.count)
    columns = InputColumns(item_id=cfg.id_col, embedding=cfg.embedding_col, category=cfg.category_col)
    v = validate_catalog(catalog, columns, dim=_dim_from_files(job) if cfg.embedding_dim is None else cfg.embedding_dim)
    if cfg.label_col:  # read by the report only; a bad one fails now, not after the training
        check_label_column(catalog, cfg.label_col)
    job.cfg = dataclasses.replace(cfg, model_config=dataclasses.replace(cfg.model_config, input_dim=v.dim))
    if cfg.encodes and cfg.read_embeddings == "files":  # a table the files cannot be read from stops the run now
        _embedding_files(job, v.rows, quiet=True)
    print(f"    schema ok, D = {v.dim}")
    _log_lineage(job.cfg, job.session.engine, source)
    return catalog, v


def _dim_from_files(job: _Job) -> int | None:
    """D by the engine's rule (the most common length of the first non-null embeddings, here in the files'
    row-group order) read with pyarrow from the catalog's files, in a run whose encode pass may read them
    (--read-embeddings); None: the engine samples it (also when the files cannot be read)."""
    cfg = job.cfg
    if not cfg.encodes or cfg.read_embeddings == "engine" or not job.session.on_this_machine():
        return None
    try:
        files, _ = io.embedding_files(str(cfg.input), cfg.input_format, cfg.id_col, cfg.embedding_col)
        lengths = io.embedding_lengths(files, INFER_DIM_ROWS) if files is not None else None
    except Exception:  # noqa: BLE001 - a file pyarrow cannot read now: the engine's own sample decides
        return None
    return most_common_length(lengths) if lengths else None


def _engine_path(job: _Job, path: str) -> str:
    """A user's input path as the engine must be given it (pipelines/io.engine_path); a table name as it is."""
    if io.local_path(path) is not None and "/" not in path and not os.path.exists(path):
        return path  # a table name such as main.shop.items
    try:
        return io.engine_path(path, job.session.engine)
    except ValueError as e:
        raise JobFailed(str(e)) from e


def _log_lineage(cfg: JobConfig, engine: str, source: str) -> None:
    """Params (the full config, nested configs as model.* / train.* / gate.*) and lineage tags."""
    from importlib.metadata import version

    nested = {"model_config": "model", "train_config": "train", "gate": "gate"}
    params = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in nested}
    for name, prefix in nested.items():
        params.update({f"{prefix}.{k}": v for k, v in dataclasses.asdict(getattr(cfg, name)).items()})
    mlflow.log_params({k: str(v) for k, v in params.items()})
    # ``source``: the input as the engine read it (a safe link for an odd path, which delta-rs reads too)
    delta = io.delta_version(source) if cfg.input_format in ("auto", "delta") else None
    mlflow.set_tags({"input": cfg.input, "input_delta_version": str(delta), "engine": engine,
                     "sample_size": str(cfg.sample_size), "seed": str(cfg.seed), "python": platform.python_version(),
                     "package_version": version("catalog-semantic-ids")})


def _write_run_rejects(job: _Job, rejects: DataFrame) -> str:
    """This run's rejects as the ``run_rejects`` table (a run that publishes nothing: ``--stages validate``,
    or one stopped by ``--max-reject-share``), beside the published set and not part of it."""
    stamped = stamp_rejects(rejects, job.result.run_id, job.now, n_rejected=job.result.counts.get("rejected_rows"))
    io.write_table(stamped, job.location, RUN_REJECTS_TABLE)
    return job.location.shown_of(RUN_REJECTS_TABLE)


def _check_counts(job: _Job, n_input: int, counts: ValidationCounts, rejects: DataFrame) -> None:
    """Print and log the counts, and check them (row accounting, reject share, something valid).

    Called once before anything is written; a training run counts before sampling and again in the
    encode pass, and the two must agree. When too many rows are rejected, they are written to the
    ``run_rejects`` table before the run stops, so the user can see which.
    """
    result = job.result
    earlier = None
    if "input_rows" in result.counts:
        earlier = (result.counts["input_rows"], ValidationCounts(result.counts["valid_rows"], result.reasons))
    else:
        shown = f" {nonzero(counts.rejected)}" if counts.n_rejected else ""
        print(f"    {n_input} rows in, {counts.clean} valid, {counts.n_rejected} rejected{shown}")
        result.counts.update(input_rows=n_input, valid_rows=counts.clean, rejected_rows=counts.n_rejected)
        result.reasons = dict(counts.rejected)
        mlflow.log_metrics({"input_rows": n_input, "valid_rows": counts.clean, "rejected_rows": counts.n_rejected,
                            **{f"rejected_{k}": c for k, c in counts.rejected.items()}})
    try:
        check_counts(n_input, counts, job.cfg.max_reject_share, earlier)
    except TooManyRejectsError as e:
        where = _write_run_rejects(job, rejects)
        raise TooManyRejectsError(f"{e} The rejected rows of this run, with their reasons, are in {where} (the "
                                  "published tables are as they were).") from e


# --- training ---------------------------------------------------------------------------------------

class _MlflowEpochLogger:
    """fit() callback: per-epoch metrics to the active MLflow run."""

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
        mlflow.log_metrics(metrics, step=epoch)


def _train(job: _Job, v: ValidationResult, state: ledger.TableState | None) -> TokenizerModel:
    """Sample, fit (aligned to the table's generation), evaluate, log + register, apply the quality gate."""
    cfg, stage = job.cfg, job.stage
    with stage("sample"):
        sample = sample_for_training(v.clean, cfg.sample_size, cfg.seed, n_rows=int(job.result.counts["valid_rows"]))
        arrays = collect_training_arrays(sample, v.dim, category_col=CATEGORY if cfg.category_col else None)
        cats = category_ids_from_paths(arrays.categories) if arrays.categories else None
        print(f"    {len(arrays.embeddings)} items sampled for training (seed {cfg.seed})")
        if len(arrays.embeddings) < MIN_TRAIN_ITEMS:
            raise JobFailed(f"only {len(arrays.embeddings)} valid items to train on; a model needs at least "
                            f"{MIN_TRAIN_ITEMS}. Raise --sample-size, train on a larger catalog, or encode this one "
                            "with a model trained elsewhere (--model)")
        mlflow.log_metric("train_sample_items", len(arrays.embeddings))
    mcfg = cfg.model_config
    ledger.check_compatible(state, mcfg.num_levels, mcfg.codebook_size, "--levels/--codebook-size")
    previous = _previous_generation(job, sample, arrays, state)
    with job.session.kept_alive():  # training can outlast the engine's idle timeout
        return _fit_and_register(job, v, arrays, cats, previous)


def _fit_and_register(job: _Job, v: ValidationResult, arrays: TrainingArrays, cats: np.ndarray | None,
                      previous: _Previous) -> TokenizerModel:
    cfg, stage, mcfg = job.cfg, job.stage, job.cfg.model_config
    with stage("train"):
        fitted = fit(arrays.embeddings, cfg.model_config, cfg.train_config, category_ids=cats,
                     callbacks=[ProgressPrinter(), _MlflowEpochLogger()], init=previous.init,
                     catalog_items=max(len(arrays.embeddings), int(job.result.counts["valid_rows"])))
    if previous.codes is not None:
        with stage("align codes to the table's generation"):
            _align(fitted.model, previous)
    with stage("evaluate + register"):
        metrics = _evaluate(fitted, arrays, cats, cfg.model_config.codebook_size)
        path = save_checkpoint(fitted.model.cpu(), Path(cfg.work_dir) / "checkpoints" / f"{job.result.run_id}.pt")
        example = pd.DataFrame({"embedding": list(arrays.embeddings[:2])})
        version = registry.log_and_register(path, cfg.model_name, input_example=example)
        registry.set_alias(cfg.model_name, registry.CANDIDATE, version)
        failures = gate_failures(metrics, cfg.gate, cfg.model_config.num_levels)
        mlflow.set_tag("quality_gate", "failed" if failures else "passed")
    if failures:
        raise JobFailed(f"quality gate failed for {cfg.model_name} version {version} (alias '{registry.CANDIDATE}' "
                        f"set, '{registry.CHAMPION}' not moved, tables untouched): " + "; ".join(failures), EXIT_GATE)
    print(f"    quality gate passed: {cfg.model_name} version {version} is @{registry.CANDIDATE}")
    return TokenizerModel(cfg.model_name, version, path.read_bytes(), mcfg.num_levels, mcfg.codebook_size, v.dim,
                          mcfg.collision_alternatives)


def _evaluate(fitted: Any, arrays: TrainingArrays, cats: np.ndarray | None, codebook_size: int) -> dict[str, float]:
    """Held-out metrics, plus code usage over the whole sample (a small held-out part cannot show K codes)."""
    # The neighbourhood metrics need more than k = 10 items: a smaller held-out part is replaced by the sample.
    hold = fitted.holdout_index if len(fitted.holdout_index) > 10 else slice(None)
    metrics = evaluate_model(fitted.model, arrays.embeddings[hold], category_ids=None if cats is None else cats[hold])
    codes = encode_array(fitted.model, arrays.embeddings).codes
    for lv, usage in enumerate(level_usage(codes, codebook_size), start=1):
        metrics[f"sample_l{lv}_utilization"] = usage.utilization
        metrics[f"sample_l{lv}_perplexity"] = usage.perplexity
    # Code usage is the whole sample's, logged as such; the rest is the held-out part's.
    mlflow.log_metrics({(k if k.startswith("sample_") else f"holdout_{k}"): float(v) for k, v in metrics.items()})
    keys = ["unique_rate", "max_group_size", "recon_cos_mean", "l1_prefix_nn", "l1_nmi"]
    keys += [k for k in metrics if k.startswith("sample_")]
    print("    held-out: " + ", ".join(f"{k}={metrics[k]:.4g}" for k in keys if k in metrics))
    for line in crowded_levels(codes, codebook_size):
        print(f"    warning: {line}")
    return metrics


CROWDED_SHARE = 0.5  # a level where one code holds more of the sample than this is worth a warning


def crowded_levels(codes: np.ndarray, codebook_size: int) -> list[str]:
    """A line for each level where one code holds more than :data:`CROWDED_SHARE` of the sample's items: every
    code can be in use (the gate's utilization passes) while that level tells almost no items apart. K-means
    with few items per code in many dimensions does this (a centroid near the residuals' mean is nearer to
    most of them than any other is): on the demo catalog at 3 x 256, 3,000 items left 92% of level 2 in one
    code, 6,000 items 96% of level 3, and 20,000 items (about 80 a code) none."""
    n = len(codes)
    lines = []
    for level in range(codes.shape[1] if n else 0):
        counts = np.bincount(codes[:, level], minlength=codebook_size)
        if counts.max() > CROWDED_SHARE * n:
            lines.append(f"level {level + 1}: one code holds {counts.max():,} of the {n:,} sampled items "
                         f"({counts.max() / n:.0%}), so that level tells few items apart. A sample this small for "
                         f"{codebook_size} codes a level does that: sample more items (--sample-size, about "
                         f"{80 * codebook_size:,} where the catalog has them) or use a smaller --codebook-size")
    return lines


@dataclass(frozen=True)
class _Previous:
    """The table's generation as training sees it: its codes for the sampled items, its model."""

    embeddings: np.ndarray | None = None  # (n, D) sampled items the table holds
    codes: np.ndarray | None = None  # (n, L) their current codes
    init: RQVAE | None = None  # the model to warm-start from


def _previous_generation(job: _Job, sample: DataFrame, arrays: TrainingArrays,
                         state: ledger.TableState | None) -> _Previous:
    """What aligning to the table needs (nothing without a table or with ``--align none``)."""
    cfg = job.cfg
    held = _check_the_tables_store(job, state) if state is not None else None
    if state is None or cfg.align == "none":
        return _Previous()
    positions, codes = state.current_codes(sample, arrays.item_ids)
    print(f"    {len(positions)} sampled items hold IDs of generation {state.generation}: the new codes are aligned "
          "to theirs")
    init = _warm_start_model(state, cfg, held) if cfg.align == "warm-start" else None
    return _Previous(arrays.embeddings[positions], codes, init)


def _check_the_tables_store(job: _Job, state: ledger.TableState) -> registry.ResolvedModel | None:
    """Before a training against a table: the table's model, a registered version of the name this run registers
    under, must be in this run's MLflow store, as the model that issued the table's IDs. Otherwise the store is
    another one (a relative --work-dir run from another folder, an unset MLFLOW_TRACKING_URI) and the new model
    would take that name's version numbers there: two models named "version 1" in the table's ``model_version``.
    Returns the table's model as this store holds it (the warm start's, read once), or None where not resolved."""
    cfg = job.cfg
    if state.model_name != cfg.model_name or not registry.is_registered_version(state.model_version):
        return None
    fix = ("Fix: point MLFLOW_TRACKING_URI (or --work-dir, whose mlflow.db is the local default) at the store that "
           "registered the table's model; if that store is lost, train under another --model-name")
    if not registry.has_version(state.model_name, state.model_version):
        raise JobFailed(f"the table's IDs were issued by {state.model_name} version {state.model_version}, which the "
                        f"MLflow registry {registry.store_shown()} does not hold: this run would register its model "
                        f"there under the same name and version numbers. {fix}")
    try:
        resolved = registry.resolve_model(f"models:/{state.model_name}/{state.model_version}")
    except ValueError:  # held but not loadable here: the warm start says so and falls back to relabelling
        return None
    _check_recorded_model(job, resolved.name, resolved.version, resolved.checkpoint, fix)
    return resolved


def _check_recorded_model(job: _Job, name: str, version: str, checkpoint: bytes, fix: str) -> None:
    """A registered model whose name and version issued IDs in this table must be the model that did: the ``runs``
    table records its checkpoint's digest. Another MLflow store (another --work-dir, an unset or changed
    MLFLOW_TRACKING_URI) can hold another model under the same name and version; its codes would be written as
    that generation's. A table written before the digest was recorded is not checked."""
    recorded = publish.model_digest(publish.entries(job.spark, job.location), (name, version))
    digest = registry.checkpoint_digest(checkpoint)
    if recorded is None or recorded == digest:
        return
    raise JobFailed(f"{name} version {version} in the MLflow registry {registry.store_shown()} is not the model that "
                    f"issued IDs in this table as {name} version {version}: its checkpoint's SHA-256 begins "
                    f"{digest[:12]}, the one the runs table recorded {recorded[:12]}. This registry is another store "
                    f"than the one that registered the table's model. {fix}")


def _warm_start_model(state: ledger.TableState, cfg: JobConfig,
                      held: registry.ResolvedModel | None = None) -> RQVAE | None:
    """The table's model when it can seed this training (same shape), else None (relabelling only). ``held``: that
    model already resolved (:func:`_check_the_tables_store`), not downloaded again."""
    uri = f"models:/{state.model_name}/{state.model_version}"
    try:
        model = load_checkpoint((held or registry.resolve_model(uri)).checkpoint)
    except ValueError as e:
        print(f"    no warm start: {uri} cannot be loaded here ({io.first_line(e, 400)}); codes are relabelled")
        return None
    differences = cfg.model_config.shape_differences(model.config)
    if differences:
        print(f"    no warm start: {uri} is another shape than this run asks for ({'; '.join(differences)}: this "
              "run's value first); codes are only relabelled, so more IDs move. To keep the table's model's "
              "shape, pass its settings (e.g. --anchor-levels 2 for a model trained "
              "before every level was anchored by default)")
        return None
    print(f"    warm start from {uri} (the table's generation {state.generation})")
    return model


def _align(model: RQVAE, previous: _Previous) -> None:
    """Relabel the model's codes to the previous generation's; log the prefix agreement before and after."""
    assert previous.embeddings is not None and previous.codes is not None
    if len(previous.codes) == 0:
        print("    no sampled item holds an ID yet: nothing to align to")
        return
    before, after = align_to(model, previous.embeddings, previous.codes)
    for name, agreement in (("before", before), ("after", after)):
        mlflow.log_metrics({f"align_{name}_l{lv}_prefix_kept": share
                            for lv, share in enumerate(agreement.prefix, start=1)})
    print(f"    sampled items whose nearest codes keep their prefix (levels 1..L): {_shares(before)} as trained, "
          f"{_shares(after)} after relabelling (the model's own codes: the ID rules of the encode keep an item's ID "
          "where its codes still fit, so fewer IDs move)")


def _shares(agreement: Agreement) -> str:
    return "/".join(f"{share:.1%}" for share in agreement.prefix)


def _load_model(uri: str) -> TokenizerModel:
    """A registered model (alias resolved to a version once) or a checkpoint file; its D is checked against
    the catalog's by :func:`_with_dim`."""
    try:
        resolved = registry.resolve_model(uri)
        model = load_checkpoint(resolved.checkpoint)
    except ValueError as e:
        raise JobFailed(str(e)) from e
    print(f"    using {resolved.name} version {resolved.version}")
    return TokenizerModel(resolved.name, resolved.version, resolved.checkpoint, model.num_levels, model.codebook_size,
                          model.config.input_dim, getattr(model.config, "collision_alternatives", 0))


def _with_dim(model: TokenizerModel, uri: str | None, dim: int) -> TokenizerModel:
    if model.input_dim != dim:
        raise JobFailed(f"model {uri} expects {model.input_dim}-d embeddings but the catalog has D = {dim}: give the "
                        f"catalog's embedding column (--embedding-col) of the model's length, or a model trained on "
                        f"this catalog (train one: leave out --model)")
    return model


# --- encode, plan, gate, publish ----------------------------------------------------------------------

def _encode_and_publish(job: _Job, catalog: DataFrame, v: ValidationResult, model: TokenizerModel,
                        state: ledger.TableState | None) -> None:
    """Choose the mode, encode what it needs, plan every ID's fate, gate the churn, publish in one commit."""
    cfg, stage, result = job.cfg, job.stage, job.result
    if state is not None and registry.is_registered_version(model.version):
        _check_recorded_model(job, model.name, model.version, model.checkpoint,
                              "Fix: point MLFLOW_TRACKING_URI (or --work-dir, whose mlflow.db is the local default) at "
                              "the store that registered the table's model")
    mode = ledger.choose_mode(cfg.mode, state, model.name, model.version, trained=cfg.trains)
    result.mode = f"{mode.name} (generation {mode.generation})"
    print(f"\n==> mode: {mode.name}, because {mode.reason}")
    with stage("encode"):
        def encoded_and_planned(engine_reads: bool = False) -> tuple[Encoded, ledger.Plan]:
            encoded = _encode(job, v, model, state, mode, engine_reads)
            return encoded, ledger.plan_changes(
                state, encoded, model, mode, on_changed=cfg.on_changed, run_id=result.run_id, now=job.now,
                materialize=job.materialize, progress=lambda line: print(f"    {line}", flush=True),
                split=job.session.materialize_split, one_map=job.session.engine == "spark",
                table_parts=job.session.engine == "local", second_chance=cfg.second_chance)

        encoded, plan = encoded_and_planned()
        if not _files_were_the_engines(job):
            encoded, plan = encoded_and_planned(engine_reads=True)
        # The input count: the one the listed files were checked against (the pass read those files), else now.
        _check_counts(job, catalog.count() if job.catalog_rows is None else job.catalog_rows, encoded.counts,
                      encoded.rejects)
        print(f"    {plan.counts.summary()}")
        if encoded.encoded_rows is not None:
            print(f"    {encoded.encoded_rows} rows went through the model")
            mlflow.log_metric("encoded_rows", encoded.encoded_rows)
        print(f"    embeddings changed: {plan.counts.embedding_changed} (--on-changed {cfg.on_changed})")
    with stage("drift + ID churn gate"):
        result.drift = drift = drift_of_plan(plan)
        mlflow.log_metrics({**{f"ids_{k}": float(n) for k, n in plan.counts.as_dict().items()}, **drift.metrics()})
        if cfg.compare_to:
            result.comparison = _compare(job, plan.table(), plan.num_levels)
        if drift.compared:
            print(f"    {drift.ids_changed} of {drift.compared} published items change ID (churn {drift.churn:.2%}); "
                  f"prefix changed per level: {', '.join(f'{s:.1%}' for s in drift.prefix_changed_share())}")
        else:
            print(f"    no published ID to compare with ({drift.against})")
        failure = churn_failure(drift.ids_changed, drift.compared, cfg.max_id_churn)
        fix = "Check the drift above; retrain with --align warm-start, or raise --max-id-churn to accept it."
        away = plan.counts.retired_left_catalog + plan.counts.retired_rejected
        if not mode.new_generation and away > drift.compared:  # most of the catalog gone (or all of it)
            print(f"    WARNING: {away} of {away + drift.compared} published items are not valid items of this "
                  "catalog and are retired now. They have their IDs back if they return before a new generation "
                  "starts; if this is not expected, check --input (a partial snapshot?)")
        if mode.new_generation and state is not None and (away := away + plan.counts.still_away):
            earlier = (f" ({plan.counts.still_away} of them away since an earlier run of generation "
                       f"{state.generation})" if plan.counts.still_away else "")
            print(f"    {away} items with IDs of generation {state.generation} are not valid items of this catalog"
                  f"{earlier}: they have their IDs back on return only where this generation's model gives them "
                  "the same codes")
            mlflow.log_metric("ids_away_at_new_generation", away)
            if failure is None and (failure := away_failure(away, drift.compared, cfg.max_id_churn)):
                fix = ("Check that --input is the whole catalog (a partial snapshot, or a day of rejected rows?); if "
                       "those items left for good, raise --max-id-churn to accept it.")
        mlflow.set_tag("id_churn_gate", "failed" if failure else "passed")
    if failure:
        raise JobFailed(f"{failure}: nothing was written, the tables and @{registry.CHAMPION} are as they were. {fix}",
                        EXIT_GATE)
    with stage("publish"):
        _publish(job, plan, encoded, drift, model)


def _encode(job: _Job, v: ValidationResult, model: TokenizerModel, state: ledger.TableState | None,
            mode: ledger.Mode, engine_reads: bool = False) -> Encoded:
    """The encode pass (and an incremental run's second pass); ``engine_reads``: the engine reads the embeddings
    (after :func:`_files_were_the_engines` found the listed files were not the engine's)."""
    cfg = job.cfg
    policy, known = ledger.rows_to_encode(mode, state, cfg.on_changed)

    def encode(files: io.EmbeddingFiles | None) -> Encoded:
        cache, keys = _fingerprint_cache(cfg, files, v, reads=policy != ENCODE_ALL)
        encoded = encode_catalog(v, model.checkpoint, materialize=job.materialize, known=known, policy=policy,
                                 batch_size=cfg.encode_batch_size, device=cfg.encode_device,
                                 threads=cfg.encode_threads, alternatives=model.collision_alternatives, files=files,
                                 tasks=job.session.parallelism(), cache=cache)
        if cache is not None:
            fingerprint_cache.tidy(cache, keys)
        return encoded

    # The listed files are the engine's only if they hold as many rows as it counts. On a JVM engine that count
    # (a Delta snapshot and two or three jobs) started at validation (_validate) and is compared once the plan is
    # made (_files_were_the_engines): its jobs fill the cores' idle time between the small jobs after the pass.
    # --read-embeddings files has checked the files already (the run stops there if they differ).
    if engine_reads:
        return encode(None)
    ahead = _counts_ahead(job)
    files = _embedding_files(job, None if ahead else v.rows)
    if files is not None and ahead:
        job.files_to_confirm = files
        if job.catalog_count is None:
            job.catalog_count = _started(v.rows.count)
    return encode(files)


def _files_were_the_engines(job: _Job) -> bool:
    """Whether the files the encode pass read (if it read files it was to confirm) hold as many rows as the engine
    counts in the catalog; where they do not, says so: the engine is to read the embeddings, the pass and the plan
    done again (nothing is written before then)."""
    files, job.files_to_confirm = job.files_to_confirm, None
    if files is None or job.catalog_count is None:
        return True
    counted = job.catalog_count.result()
    if counted == files.rows:
        job.catalog_rows = files.rows
        return True
    print(f"    {_not_the_engines(files, counted)}, so the engine reads the embeddings (the pass and the plan are done "
          "again)", flush=True)
    mlflow.set_tag("embeddings_read_from", "the engine")
    return False


def _counts_ahead(job: _Job) -> bool:
    """Whether the engine's count of the catalog, to check the files the encode pass reads against, is started
    at validation (a JVM engine, --read-embeddings auto, a run that encodes) and compared after the plan."""
    return job.session.engine != "local" and job.cfg.read_embeddings == "auto" and job.cfg.encodes


def _started(work: Callable[[], Any]) -> Future:
    """``work()`` (a count, a read of the table's state) running in a driver thread of its own: its future."""
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="csid-ahead")
    try:
        return pool.submit(work)
    finally:
        pool.shutdown(wait=False)  # the thread ends with the work


def _fingerprint_cache(cfg: JobConfig, files: io.EmbeddingFiles | None, v: ValidationResult,
                       reads: bool) -> tuple[str | None, tuple[str, ...]]:
    """The fingerprint cache's folder for this pass and its row groups' keys, or (None, ()): no cache
    (--fingerprint-cache none, or the engine reads the embeddings). ``reads``: the pass uses what is kept
    (an incremental run's first pass; a full pass only keeps). Says how many row groups are kept."""
    if files is None or (cfg.fingerprint_cache or "").lower() == "none":
        return None, ()
    # Absolute: the engine's Python workers need not share the driver's working directory.
    folder = os.path.abspath(cfg.fingerprint_cache or Path(cfg.work_dir) / fingerprint_cache.FOLDER)
    why = fingerprint_cache.unusable(folder)
    if why:
        print(f"    no fingerprint cache: {folder} cannot be used ({why}); every embedding is read. Fix its "
              "permissions, or point --fingerprint-cache at a folder this user can write")
        return None, ()
    keys = cache_keys(files, v.dim, v.rows.schema[ITEM_ID].dataType.simpleString())
    if keys is None:
        return None, ()
    if reads:
        kept = fingerprint_cache.present(folder, keys)
        print(f"    {kept} of {len(keys)} row groups' fingerprints are kept in {folder}: their embeddings are not "
              "read (--fingerprint-cache)")
        mlflow.log_metric("fingerprint_cache_row_groups", kept)
    else:
        print(f"    each row group's fingerprints are kept in {folder} (--fingerprint-cache): an incremental run "
              "reads the embeddings of new files only")
    return folder, keys


def _embedding_files(job: _Job, rows: DataFrame | None = None, quiet: bool = False) -> io.EmbeddingFiles | None:
    """The catalog's row groups for the encode UDF to read itself (--read-embeddings), or None: the engine
    reads the embeddings. Listed when the pass starts, so they are the table's files of that moment; with
    ``rows`` (the catalog as the engine reads it) used only if they hold as many rows as the engine counts."""
    cfg = job.cfg
    if cfg.read_embeddings == "engine":
        files, why = None, "--read-embeddings engine"
    elif cfg.read_embeddings == "auto" and not job.session.on_this_machine():
        files, why = None, ("the engine's tasks may not run on this machine (a cluster, a remote server, Databricks), "
                            "so they need not see its files; --read-embeddings files reads them there anyway")
    else:
        files, why = io.embedding_files(str(cfg.input), cfg.input_format, cfg.id_col, cfg.embedding_col)
        counted = rows.count() if files is not None and rows is not None else None
        if files is not None and counted is not None and counted != files.rows:
            files, why = None, _not_the_engines(files, counted)
        job.catalog_rows = counted if files is not None else None  # the rows the pass over these files reads
    if files is None and cfg.read_embeddings == "files":
        raise JobFailed(f"--read-embeddings files cannot read {cfg.input}: {why}. Fix: --read-embeddings engine "
                        "(or auto: the engine reads where the files cannot)")
    if not quiet:
        print(f"    the encode UDF reads the embeddings from {len(files.row_groups)} row group(s) of {files.source}"
              if files is not None else f"    the engine reads the embeddings ({why})")
        mlflow.set_tag("embeddings_read_from", files.source if files is not None else "the engine")
    return files


def _not_the_engines(files: io.EmbeddingFiles, counted: int) -> str:
    """Why listed files that hold another number of rows than the engine counts are not read."""
    return (f"its files hold {files.rows} rows by their footers and the engine reads {counted}: they are not the "
            "engine's files")


def _compare(job: _Job, table: DataFrame, num_levels: int | None) -> Drift:
    """Drift of ``table`` against the --compare-to table: printed, logged as compare_* metrics."""
    other = io.read_catalog(job.spark, _engine_path(job, str(job.cfg.compare_to)))
    comparison = compare_tables(other, table, num_levels, against=str(job.cfg.compare_to))
    mlflow.log_metrics({k.replace("drift_", "compare_", 1): v for k, v in comparison.metrics().items()})
    print(f"    against {comparison.against}: {comparison.ids_changed} of {comparison.compared} items have another ID "
          f"({comparison.churn:.2%})")
    return comparison


def _publish(job: _Job, plan: ledger.Plan, encoded: Encoded, drift: Drift, model: TokenizerModel) -> None:
    """Publish the run's set in one step (pipelines/publish.py): every table computed first, the describing
    tables written, a pending entry, the one semantic-ID commit, the checks, the published entry."""
    cfg, location, result, spark = job.cfg, job.location, job.result, job.spark
    table = plan.table()
    parts = parts_for(result.counts["valid_rows"])  # a large catalog's checks and statistics go in parts
    split = job.session.materialize_split
    # Before anything is written: the ledger's invariants and the statistics, both read-only. On a JVM engine the
    # check's counts run beside the statistics' queries (each query's jobs leave the cores idle between them),
    # and a table of one part is collected once and both are computed in the driver (the distinct counts, the
    # grouping and the statistics' queries cost a JVM engine seconds each; the embedded engine's take tenths).
    collected = (ledger.collected_for_checks(table)
                 if job.session.engine != "local" and plan.rows <= PART_ITEMS else None)
    with _beside(job.session.engine != "local", ledger.check_ledger, table,
                 expected_active=result.counts["valid_rows"], parts=parts, split=split, collected=collected):
        stats = report_tables(table, model.codebook_size, cfg.suffix_budget, job.materialize, parts=parts,
                              split=split, num_levels=model.num_levels, collected=collected,
                              arrow_frame=job.session.frame_of_arrow)
    drifts = [drift] + ([result.comparison] if result.comparison else [])
    frames = {REJECTS_TABLE: stamp_rejects(encoded.rejects, result.run_id, job.now,
                                           n_rejected=result.counts["rejected_rows"]),
              ID_CHANGES_TABLE: ledger.id_changes(table), DRIFT_TABLE: drift_table(spark, drifts),
              PREFIX_STATS_TABLE: stats.prefix_stats, LEVEL_STATS_TABLE: stats.level_stats}
    history = publish.entries(spark, location)
    sids_before = publish.token(spark, location, SEMANTIC_IDS_TABLE)
    # @champion follows the published generation: a run that trained, or one that published a new generation
    # with a given registered model (e.g. the @candidate of a training-only run); never a checkpoint file.
    moves = cfg.trains or (plan.mode.new_generation and registry.is_registered_version(model.version))
    job.publishing = True
    # On a JVM engine the five small Delta writes overlap (mostly the driver's commits); the embedded engine's
    # take a fraction of a second in all, so they stay one after another there, as do Parquet outputs (some of
    # them, catalog tables and object stores, cannot be rolled back: a failure leaves what was written).
    # On classic Spark with a local master, a table of one part has them collected and written by delta-rs from the
    # driver (each of the engine's Delta overwrites replays the table's log in a job first); beyond one part the
    # driver holds none of it.
    in_driver = job.session.engine == "spark" and job.session.on_this_machine() and plan.rows <= PART_ITEMS
    describing = publish.write_describing(spark, location, frames, result.run_id,
                                          concurrent=job.session.engine != "local" and location.fmt == "delta",
                                          in_driver=in_driver)
    boundary("describing-written")
    digest = registry.checkpoint_digest(model.checkpoint)
    publish.record(spark, location, history, result.run_id, publish.PENDING, describing,
                   model=(model.name, model.version), moves_champion=moves, semantic_ids_before=sids_before,
                   model_sha256=digest)
    boundary("pending-recorded")
    written = ledger.publish(plan, location, run_id=result.run_id)
    boundary("semantic-ids-committed")
    sids = location.shown_of(SEMANTIC_IDS_TABLE)
    if written is None:
        print(f"    nothing to change in {sids}: no commit")
    active = ledger.verify_published(spark, location, expected_active=result.counts["valid_rows"], parts=parts,
                                     split=split)
    if moves:  # the IDs are out and checked: the model that issued them is the one daily runs use
        registry.set_alias(model.name, registry.CHAMPION, model.version)
        print(f"    {model.name} version {model.version} is now @{registry.CHAMPION}")
    publish.record(spark, location, history, result.run_id, publish.PUBLISHED, publish.tokens(spark, location),
                   model=(model.name, model.version), moves_champion=moves, semantic_ids_before=sids_before,
                   model_sha256=digest)
    job.publishing = False
    publish.finish(location, result.run_id)
    boundary("published")
    for name in (SEMANTIC_IDS_TABLE, *frames):
        result.tables[name] = location.shown_of(name)
    job.summary = stats.summary
    held = (f"{active} semantic IDs written to {sids} (the active ones; this run issued {plan.counts.issued} and "
            f"retired {plan.counts.retired})" if written is not None else
            f"{sids} unchanged, its {active} active semantic IDs checked")
    print(f"    {held}, with {', '.join(frames)}: published together as run {result.run_id} (the {RUNS_TABLE} table)")
    result.counts["written_rows"] = active
    mlflow.log_metric("written_rows", active)


@contextmanager
def _beside(concurrent: bool, check: Callable[..., Any], *args: Any, **kwargs: Any) -> Iterator[Future]:
    """Run ``check(*args, **kwargs)`` beside the block (in a driver thread), or before it; either way it has
    ended when the block has, and its error is raised then (the block's own error first, if it has one).
    Yields the check's future: its value can be read once the block has ended."""
    if not concurrent:
        done: Future = Future()
        done.set_result(check(*args, **kwargs))
        yield done
        return
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="csid-check")
    checked = pool.submit(check, *args, **kwargs)
    try:
        yield checked
    except BaseException as e:
        pool.shutdown(wait=True)
        failure = checked.exception()
        if failure is not None:  # not lost behind the block's error: it is the ledger's invariants
            e.add_note(f"the check beside it failed too: {io.first_line(failure, 300)}")
        raise
    pool.shutdown(wait=True)
    checked.result()


def boundary(name: str) -> None:
    """Fault injection for tests: ``CSID_KILL_AT=<name>`` kills the job here (SIGKILL, as an OOM killer
    or a preempted node would). Does nothing otherwise. Called between the publish steps and, by the
    CLI's stage banner, after every stage (``after-<first word of the stage>``)."""
    if os.environ.get("CSID_KILL_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


# --- report ---------------------------------------------------------------------------------------------

def _report(job: _Job, codebook_size: int, catalog: DataFrame) -> None:
    """The HTML/JSON report of the published table (the prefix statistics this run published, or for a
    report-only run those of the table as it is), swapped in whole and logged to the MLflow run."""
    cfg, location, result = job.cfg, job.location, job.result
    summary, sids = job.summary, None
    if summary is None:  # a report-only run: the table as it is (nothing is written to the set)
        try:
            sids = io.read_table(job.spark, location, SEMANTIC_IDS_TABLE)
        except io.CatalogNotFoundError as e:
            raise JobFailed(f"--stages {','.join(cfg.stages)} reports on the published semantic-ID table, and there is "
                            f"none at {location.shown_of(SEMANTIC_IDS_TABLE)}: run the encode stage first (the default "
                            "--stages), or check --output") from e
        if result.comparison is None and cfg.compare_to:
            result.comparison = _compare(job, sids, None)
        summary = report_tables(sids, codebook_size, cfg.suffix_budget, job.materialize,
                                parts=parts_for(sids.count()), split=job.session.materialize_split).summary
    out_dir = Path(cfg.work_dir) / "report" if location.is_catalog else Path(location.shown_root) / "report"
    staging = out_dir.with_name(f".{out_dir.name}.staging-{os.getpid()}-{result.run_id}")
    shutil.rmtree(staging, ignore_errors=True)
    write_report(summary, staging, f"Semantic IDs: {cfg.model_name}",
                 extra={"model": result.model, "mode": result.mode, "mlflow_run_id": result.run_id, **result.tables},
                 drift=result.drift.to_dict() if result.drift else None,
                 comparison=result.comparison.to_dict() if result.comparison else None,
                 labels=_sample_labels(job, catalog, sids, summary) if cfg.label_col else None)
    io.swap_directories(staging, out_dir)  # a reader sees the previous report or this one, whole
    result.report = {kind: str(out_dir / Path(path).name) for kind, path in
                     (("html", staging / REPORT_HTML), ("json", staging / SUMMARY_JSON))}
    mlflow.log_artifacts(str(out_dir), artifact_path="report")
    table_metrics = {k: v for k, v in summary.to_dict().items() if isinstance(v, (int, float))}
    mlflow.log_metrics({f"table_{k}": float(v) for k, v in table_metrics.items()})
    print(f"    unique_rate {summary.unique_rate:.4f}, max group {summary.max_group_size}, "
          f"suffix overflow {summary.suffix_overflow} (budget {cfg.suffix_budget}); report of run {result.run_id}")
    if summary.suffix_overflow:
        print(f"    {summary.suffix_overflow} items have a suffix of {cfg.suffix_budget} or more: more items share "
              f"their code tuple than --suffix-budget's {cfg.suffix_budget} suffix tokens name. Families of "
              "near-duplicates (product variants) crowding a 2-prefix past its codes do that; a retrain with "
              "--prefix-fill 0.15 spreads crowded 2-prefixes over more of them, a larger --codebook-size gives each "
              "more codes (docs/design.md, \"2-prefix fill cap\")"
              + ("" if cfg.second_chance else "; a run without --no-second-chance gives more of them a tuple of "
                 "their own"))


def _sample_labels(job: _Job, catalog: DataFrame, sids: DataFrame | None, summary: PrefixSummary) -> SampleLabels:
    """A few ``--label-col`` values per top prefix of the published table (read back when not given)."""
    cfg = job.cfg
    if sids is None:
        sids = io.read_table(job.spark, job.location, SEMANTIC_IDS_TABLE)
    found = sample_labels(sids, catalog_labels(catalog, cfg.id_col, cfg.label_col), summary.top_prefixes,
                          LABELS_PER_PREFIX)
    print(f"    sample {cfg.label_col!r} values for {sum(1 for v in found.values() if v)} of {len(found)} top prefixes")
    return SampleLabels(cfg.label_col, found, LABEL_ORDER)
