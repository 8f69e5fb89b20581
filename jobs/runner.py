"""Wiring of the tokenize job: session + MLflow run + stages. The only module that joins them."""
from __future__ import annotations

import dataclasses
import datetime as dt
import platform
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from jobs.tokenize_catalog import EXIT_BAD_INPUT, EXIT_GATE, JobConfig
from pipelines import io, registry
from pipelines.demo import write_demo_catalog
from pipelines.encode import encode_embeddings
from pipelines.gate import GateThresholds, gate_failures
from pipelines.prefix_stats import prefix_stats_of_groups, summarize_groups, tuple_groups
from pipelines.report import write_report
from pipelines.sample import collect_training_arrays, sample_for_training
from pipelines.schema import (
    CATEGORY,
    ITEM_ID,
    LEVEL_STATS_TABLE,
    MLFLOW_RUN_ID,
    MODEL_NAME,
    MODEL_VERSION,
    PREFIX_STATS_TABLE,
    REASON,
    REJECTED_AT,
    REJECTS_TABLE,
    SEMANTIC_ID_COLUMNS,
    SEMANTIC_IDS_TABLE,
    TOKENIZED_AT,
    InputColumns,
    prefix_column,
)
from pipelines.session import DeltaNotAvailableError, EngineSession, start_session
from pipelines.uniquify import assign_suffixes
from pipelines.validate import (
    SchemaError,
    TooManyRejectsError,
    ValidationCounts,
    ValidationResult,
    check_reject_share,
    count_reasons,
    flag_duplicates,
    validate_catalog,
    validation_counts,
)
from rqvae import ModelConfig, ProgressPrinter, TrainConfig, fit, load_checkpoint, save_checkpoint
from rqvae.encode import encode_array
from rqvae.evaluate import evaluate_model
from rqvae.metrics import level_usage
from rqvae.synthetic import CatalogSpec
from rqvae.taxonomy import category_ids_from_paths

Stage = Callable[[str], Any]


class JobFailed(RuntimeError):
    """The job stopped on purpose (bad input, failed gate); ``exit_code`` is the process status."""

    def __init__(self, message: str, exit_code: int = EXIT_BAD_INPUT) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class Model:
    """The model the encode stage uses: registered name/version, its bytes, L and K."""

    name: str
    version: str
    checkpoint: bytes
    num_levels: int
    codebook_size: int
    input_dim: int


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

    def summary_lines(self) -> list[str]:
        lines = ["", "==> results"]
        lines += [f"    {k:<22}{v}" for k, v in self.counts.items()]
        lines += [f"    {'table ' + k:<22}{v}" for k, v in self.tables.items()]
        lines += [f"    {'report ' + k:<22}{v}" for k, v in self.report.items()]
        if self.model:
            lines.append(f"    {'model':<22}{self.model}")
        lines.append(f"    {'mlflow run':<22}{self.run_id} ({self.tracking_uri})")
        if self.tracking_uri.startswith("sqlite:"):
            lines.append(f"    {'open the MLflow UI':<22}mlflow ui --backend-store-uri {self.tracking_uri}")
        return lines


def run_job(cfg: JobConfig, stage: Stage) -> JobResult:
    """Run the configured stages; raises JobFailed with an exit code on expected failures."""
    work = Path(cfg.work_dir)
    try:
        location = io.resolve_output(cfg.output or (None if cfg.output_table_prefix else str(work / "tables")),
                                     cfg.output_table_prefix, cfg.format)
        with stage(f"start engine ({cfg.engine})"):
            session = start_session(cfg.engine, cfg.remote, want_delta=cfg.format == "delta",
                                    shuffle_partitions=cfg.shuffle_partitions)
    except (ValueError, DeltaNotAvailableError) as e:
        raise JobFailed(str(e)) from e
    tracking = registry.configure_tracking(work)
    registry.use_experiment(cfg.experiment, work)
    try:
        with mlflow.start_run(run_name=f"tokenize-{dt.datetime.now(dt.timezone.utc):%Y%m%d-%H%M%S}") as run:
            result = JobResult(tracking, run.info.run_id)
            _run_stages(cfg, session, location, result, stage)
            return result
    except (SchemaError, TooManyRejectsError, FileNotFoundError) as e:
        raise JobFailed(str(e)) from e
    finally:
        session.stop()


def _run_stages(cfg: JobConfig, session: EngineSession, location: io.OutputLocation, result: JobResult,
                stage: Stage) -> None:
    spark = session.spark
    if cfg.demo:
        with stage("write demo catalog"):
            cfg = _with_demo_catalog(cfg)
            print(f"    {cfg.demo_items} synthetic items x {cfg.demo_dim} dims -> {cfg.input}")
    _log_lineage(cfg, session.engine)
    model_given = "train" not in cfg.stages and bool(cfg.model)
    # Counts are needed before training (sample size, reject share). Without training, the encode pass
    # counts the reasons itself, so the 3 GB-per-million-items embedding column is read once, not twice.
    count_now = not ("encode" in cfg.stages and model_given)
    with stage("validate"):
        catalog, v = _validate(cfg, spark)
        if count_now:
            _check_counts(cfg, catalog.count(), validation_counts(v), result)
    model = None
    if "train" in cfg.stages:
        model = _train(cfg, v.clean, v.dim, result, stage)
    elif cfg.model:
        model = _resolve(cfg.model, v.dim)
    if model is not None:
        result.model = f"{model.name} version {model.version}"
    if "encode" in cfg.stages and model is not None:
        with stage("encode + uniquify + write"):
            _encode_and_write(cfg, session, catalog, v, model, location, result)
    elif "validate" in cfg.stages:
        result.tables["rejects"] = io.write_table(_stamp_rejects(v.rejects, result.run_id), location, REJECTS_TABLE)
    if "report" in cfg.stages:
        with stage("prefix statistics + report"):
            k = model.codebook_size if model else int(cfg.model_args["codebook_size"])
            _report(cfg, session, location, k, result)


def _with_demo_catalog(cfg: JobConfig) -> JobConfig:
    path = Path(cfg.work_dir) / "demo_catalog"
    write_demo_catalog(path, CatalogSpec(n_items=cfg.demo_items, dim=cfg.demo_dim, seed=cfg.seed), fmt=cfg.format)
    return dataclasses.replace(cfg, input=str(path.resolve()), input_format=cfg.format,
                               category_col=cfg.category_col or CATEGORY)


def _log_lineage(cfg: JobConfig, engine: str) -> None:
    """Params (the full config) and lineage tags of this run."""
    from importlib.metadata import version

    params = {k: v for k, v in dataclasses.asdict(cfg).items() if not k.endswith("_args")}
    for group in ("model_args", "train_args", "gate_args"):
        params.update({f"{group[:-5]}.{k}": v for k, v in getattr(cfg, group).items()})
    mlflow.log_params({k: str(v) for k, v in params.items()})
    delta = io.delta_version(cfg.input) if cfg.input and cfg.input_format in ("auto", "delta") else None
    mlflow.set_tags({"input": cfg.input, "input_delta_version": str(delta), "engine": engine,
                     "sample_size": str(cfg.sample_size), "seed": str(cfg.seed), "python": platform.python_version(),
                     "package_version": version("catalog-semantic-ids")})


def _validate(cfg: JobConfig, spark: SparkSession) -> tuple[DataFrame, ValidationResult]:
    """The catalog and its (lazy) validation: schema checked, D known; nothing counted yet."""
    catalog = io.read_catalog(spark, str(cfg.input), cfg.input_format)
    columns = InputColumns(item_id=cfg.id_col, embedding=cfg.embedding_col, category=cfg.category_col)
    v = validate_catalog(catalog, columns, dim=cfg.embedding_dim)
    print(f"    schema ok, D = {v.dim}")
    return catalog, v


def _check_counts(cfg: JobConfig, n_input: int, counts: ValidationCounts, result: JobResult) -> None:
    """Print and log the counts; check row accounting, the reject share and that something is valid.

    Called once before anything is written. When the counts were taken before (training runs count
    before sampling) and again by the encode pass, the two must agree.
    """
    n_clean, reasons, n_rejected = counts.clean, counts.rejected, counts.n_rejected
    if "input_rows" in result.counts:
        before = (result.counts["input_rows"], result.counts["valid_rows"], result.reasons)
        if before != (n_input, n_clean, reasons):
            raise JobFailed(
                f"the validation pass and the encode pass counted differently: {before[0]} rows in, {before[1]} "
                f"valid, rejected {_nonzero(before[2])} when validated; {n_input} in, {n_clean} valid, rejected "
                f"{_nonzero(reasons)} when encoded. Nothing was written. Either the catalog changed during the "
                "run (run again on a stable snapshot, e.g. a Delta version) or the engine's and the encode "
                "UDF's checks disagree on some rows (a bug: report it with rows of the differing reasons).")
        return
    shown = _nonzero(reasons)
    print(f"    {n_input} rows in, {n_clean} valid, {n_rejected} rejected" + (f" {shown}" if shown else ""))
    if n_input != n_clean + n_rejected:
        raise JobFailed(f"row accounting failed: {n_input} input rows != {n_clean} valid + {n_rejected} rejected")
    result.counts.update(input_rows=n_input, valid_rows=n_clean, rejected_rows=n_rejected)
    result.reasons = dict(reasons)
    mlflow.log_metrics({"input_rows": n_input, "valid_rows": n_clean, "rejected_rows": n_rejected,
                        **{f"rejected_{k}": c for k, c in reasons.items()}})
    check_reject_share(n_rejected, n_input, cfg.max_reject_share)
    if n_clean == 0:
        raise JobFailed("no valid rows to tokenize; see the rejects counts above")


def _nonzero(reasons: dict[str, int]) -> dict[str, int]:
    return {k: c for k, c in reasons.items() if c}


class _MlflowEpochLogger:
    """fit() callback: per-epoch metrics to the active MLflow run."""

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
        mlflow.log_metrics(metrics, step=epoch)


def _train(cfg: JobConfig, clean: DataFrame, dim: int, result: JobResult, stage: Stage) -> Model:
    """Sample, fit, evaluate on the held-out part, log + register, apply the quality gate."""
    with stage("sample"):
        n_rows = int(result.counts["valid_rows"])
        sample = sample_for_training(clean, cfg.sample_size, cfg.seed, n_rows=n_rows)
        arrays = collect_training_arrays(sample, dim, category_col=CATEGORY if cfg.category_col else None)
        cats = category_ids_from_paths(arrays.categories) if arrays.categories else None
        print(f"    {len(arrays.embeddings)} items sampled for training (seed {cfg.seed})")
        mlflow.log_metric("train_sample_items", len(arrays.embeddings))
    with stage("train"):
        mcfg = ModelConfig(input_dim=dim, **cfg.model_args)
        fitted = fit(arrays.embeddings, mcfg, TrainConfig(**cfg.train_args), category_ids=cats,
                     callbacks=[ProgressPrinter(), _MlflowEpochLogger()])
    with stage("evaluate + register"):
        hold = fitted.holdout_index if len(fitted.holdout_index) >= 2 else slice(None)
        held_cats = None if cats is None else cats[hold]
        metrics = evaluate_model(fitted.model, arrays.embeddings[hold], category_ids=held_cats)
        # Code usage needs many more items than codes: measure it on the whole training sample.
        codes = encode_array(fitted.model, arrays.embeddings).codes
        for lv, usage in enumerate(level_usage(codes, mcfg.codebook_size), start=1):
            metrics[f"sample_l{lv}_utilization"] = usage.utilization
            metrics[f"sample_l{lv}_perplexity"] = usage.perplexity
        mlflow.log_metrics({f"holdout_{k}": float(v) for k, v in metrics.items()})
        path = save_checkpoint(fitted.model.cpu(), Path(cfg.work_dir) / "checkpoints" / f"{result.run_id}.pt")
        example = pd.DataFrame({"embedding": list(arrays.embeddings[:2])})
        version = registry.log_and_register(path, cfg.model_name, input_example=example)
        registry.set_alias(cfg.model_name, registry.CANDIDATE, version)
        failures = gate_failures(metrics, GateThresholds(**cfg.gate_args), mcfg.num_levels)
        _print_metrics(metrics)
        mlflow.set_tag("quality_gate", "failed" if failures else "passed")
    if failures:
        raise JobFailed(f"quality gate failed for {cfg.model_name} version {version} (alias '{registry.CANDIDATE}' "
                        f"set, '{registry.CHAMPION}' not moved, tables untouched): " + "; ".join(failures), EXIT_GATE)
    registry.set_alias(cfg.model_name, registry.CHAMPION, version)
    print(f"    gate passed: {cfg.model_name} version {version} is now @{registry.CHAMPION}")
    return Model(cfg.model_name, version, path.read_bytes(), mcfg.num_levels, mcfg.codebook_size, dim)


def _print_metrics(metrics: dict[str, float]) -> None:
    keys = ["unique_rate", "max_group_size", "recon_cos_mean", "l1_prefix_nn", "l1_nmi"]
    keys += [k for k in metrics if k.startswith("sample_")]
    print("    held-out: " + ", ".join(f"{k}={metrics[k]:.4g}" for k in keys if k in metrics))


def _resolve(uri: str, dim: int) -> Model:
    """A registered model (alias resolved to a version once) or a checkpoint file."""
    try:
        resolved = registry.resolve_model(uri)
        model = load_checkpoint(resolved.checkpoint)
    except ValueError as e:
        raise JobFailed(str(e)) from e
    input_dim = model.config.input_dim
    if input_dim != dim:
        raise JobFailed(f"model {uri} expects {input_dim}-d embeddings but the catalog has D = {dim}")
    print(f"    using {resolved.name} version {resolved.version}")
    return Model(resolved.name, resolved.version, resolved.checkpoint, model.num_levels, model.codebook_size, dim)


def _stamp_rejects(rejects: DataFrame, run_id: str) -> DataFrame:
    now = dt.datetime.now(dt.timezone.utc)  # aware: Spark stores the UTC instant
    return rejects.withColumn(MLFLOW_RUN_ID, F.lit(run_id)).withColumn(REJECTED_AT, F.lit(now).cast("timestamp"))


def _encode_and_write(cfg: JobConfig, session: EngineSession, catalog: DataFrame, v: ValidationResult, model: Model,
                      location: io.OutputLocation, result: JobResult) -> None:
    """Encode, count, assign suffixes, stamp the model version, write both tables, check the row count.

    One scan of the embeddings: the UDF checks every row (rejects pass through uncoded), duplicate ids
    are flagged on its small output (ids, codes, reasons) against the catalog's id column, and that
    output is materialised once; counts, rejects and codes all come from it. Engines that cannot
    materialise get the counting pass first instead.
    """
    def encode(df: DataFrame) -> DataFrame:
        return encode_embeddings(df, model.checkpoint, v.dim, batch_size=cfg.encode_batch_size,
                                 device=cfg.encode_device, threads=cfg.encode_threads)

    # Rows of a duplicated id were encoded before being flagged; their codes are dropped with the REASON filters.
    staged = session.materialize(flag_duplicates(encode(v.rows), ids=v.rows))
    if staged is not None:
        _check_counts(cfg, catalog.count(), count_reasons(staged), result)
        codes = staged.where(F.col(REASON).isNull()).drop(REASON)
        rejects = staged.where(F.col(REASON).isNotNull()).select(ITEM_ID, REASON)
    else:
        _check_counts(cfg, catalog.count(), validation_counts(v), result)
        codes, rejects = encode(v.clean).drop(REASON), v.rejects
    now = dt.datetime.now(dt.timezone.utc)  # aware: Spark stores the UTC instant
    sids = (assign_suffixes(codes, model.num_levels)
            .withColumn(MODEL_NAME, F.lit(model.name)).withColumn(MODEL_VERSION, F.lit(model.version))
            .withColumn(MLFLOW_RUN_ID, F.lit(result.run_id)).withColumn(TOKENIZED_AT, F.lit(now).cast("timestamp")))
    prefixes = [prefix_column(lv) for lv in range(1, model.num_levels + 1)]
    result.tables["semantic_ids"] = io.write_table(sids.select(*SEMANTIC_ID_COLUMNS, *prefixes), location,
                                                   SEMANTIC_IDS_TABLE)
    if result.counts["rejected_rows"] == 0:  # known from the counts: skip a scan for nothing
        rejects = rejects.limit(0)
    result.tables["rejects"] = io.write_table(_stamp_rejects(rejects, result.run_id), location, REJECTS_TABLE)
    written = io.read_table(catalog.sparkSession, location, SEMANTIC_IDS_TABLE).count()
    print(f"    {written} semantic IDs written to {result.tables['semantic_ids']}")
    if written != result.counts["valid_rows"]:
        raise JobFailed(f"row accounting failed: {result.counts['valid_rows']} valid rows but {written} written")
    result.counts["written_rows"] = written
    mlflow.log_metric("written_rows", written)


def _report(cfg: JobConfig, session: EngineSession, location: io.OutputLocation, codebook_size: int,
            result: JobResult) -> None:
    """Prefix-statistics tables, the HTML/JSON report beside them, all logged to the MLflow run."""
    spark = session.spark
    sids = io.read_table(spark, location, SEMANTIC_IDS_TABLE)
    levels = len(sids.select("codes").first()[0])  # type: ignore[index]
    # One grouping by full tuple (about one row per item with a trained model), computed once.
    groups = tuple_groups(sids, cfg.suffix_budget)
    groups = session.materialize(groups) or groups
    result.tables["prefix_stats"] = io.write_table(prefix_stats_of_groups(groups, levels), location,
                                                   PREFIX_STATS_TABLE)
    summary = summarize_groups(groups, levels, codebook_size, cfg.suffix_budget,
                               prefix_table=io.read_table(spark, location, PREFIX_STATS_TABLE))
    rows = [u.metrics() for u in summary.levels]
    usage = spark.createDataFrame(pd.DataFrame(rows, columns=list(rows[0])))  # keeps "level" first
    result.tables["level_stats"] = io.write_table(usage, location, LEVEL_STATS_TABLE)
    out_dir = Path(cfg.work_dir) / "report" if location.is_catalog else Path(location.root) / "report"
    result.report = write_report(summary, out_dir, f"Semantic IDs: {cfg.model_name}",
                                 extra={"model": result.model, "mlflow_run_id": result.run_id, **result.tables})
    mlflow.log_artifacts(str(out_dir), artifact_path="report")
    table_metrics = {k: v for k, v in summary.to_dict().items() if isinstance(v, (int, float))}
    mlflow.log_metrics({f"table_{k}": float(v) for k, v in table_metrics.items()})
    print(f"    unique_rate {summary.unique_rate:.4f}, max group {summary.max_group_size}, "
          f"suffix overflow {summary.suffix_overflow} (budget {cfg.suffix_budget})")
