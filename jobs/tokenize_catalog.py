"""Tokenize a catalog: validate -> sample -> train RQ-VAE -> MLflow -> encode -> uniquify -> Delta -> report.

    python jobs/tokenize_catalog.py --demo                      # embedded engine, synthetic catalog
    python jobs/tokenize_catalog.py --input /data/catalog --output /data/semids
    spark-submit jobs/tokenize_catalog.py --engine spark --input main.shop.items --output-table-prefix main.semids
    python jobs/tokenize_catalog.py --stages encode,report --model models:/catalog-semantic-ids@champion ...

    python jobs/tokenize_catalog.py --stages validate,encode,report --model models:/catalog-semantic-ids@champion \
        --input /data/catalog --output /data/semids            # daily: incremental, no ID moves

Exit codes: 0 success, 2 bad arguments or input, 3 a gate failed (quality, or ID churn): nothing
published, @champion not moved, 4 another run wrote the table meanwhile: nothing published, run again.
"""
from __future__ import annotations

import argparse
import sys
import time
from contextlib import contextmanager
from pathlib import Path

if __package__ in (None, ""):  # run as a script (python/spark-submit jobs/tokenize_catalog.py)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jobs.config import ALIGN_CHOICES, STAGES, JobConfig
from pipelines.gate import GateThresholds
from pipelines.schema import MODES, ON_CHANGED
from rqvae import ModelConfig, TrainConfig


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tokenize_catalog", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("input")
    g.add_argument("--input", help="catalog: Delta/Parquet path or table name (required unless --demo)")
    g.add_argument("--input-format", default="auto", choices=["auto", "delta", "parquet", "table"],
                   help="how to read --input (auto: Delta if it has _delta_log, else Parquet, else a table name)")
    g.add_argument("--demo", action="store_true",
                   help="first write the synthetic demo catalog to <work-dir>/demo_catalog and use it as --input")
    g.add_argument("--demo-items", type=int, default=100_000, help="items in the demo catalog")
    g.add_argument("--demo-dim", type=int, default=256, help="embedding length of the demo catalog")
    g.add_argument("--id-col", default="item_id", help="item id column (STRING or BIGINT, unique)")
    g.add_argument("--embedding-col", default="embedding", help="embedding column (ARRAY<FLOAT|DOUBLE>)")
    g.add_argument("--embedding-dim", type=int,
                   help="embedding length D; default: the most common length among the first 10,000 rows "
                        "(rows of any other length are rejected either way)")
    g.add_argument("--category-col", default="",
                   help="optional ARRAY<STRING> taxonomy path column; enables --taxonomy-weight and purity/NMI")
    g = p.add_argument_group("output")
    g.add_argument("--output", help="folder/URI for the tables (default <work-dir>/tables)")
    g.add_argument("--output-table-prefix", help="write catalog tables <prefix>.semantic_ids etc. instead")
    g.add_argument("--format", default="delta", choices=["delta", "parquet"], help="table format")
    g.add_argument("--work-dir", default="work", help="local folder for the demo catalog, checkpoints, "
                   "reports and the default MLflow store (mlflow.db, mlartifacts/)")
    g = p.add_argument_group("engine")
    g.add_argument("--engine", default="local", choices=["local", "spark", "remote"],
                   help="local: embedded Sail (no JVM); spark: the active/classic session (spark-submit); "
                        "remote: Spark Connect (--remote)")
    g.add_argument("--remote", help="Spark Connect URL, e.g. sc://host:15002 (implies --engine remote)")
    g.add_argument("--shuffle-partitions", type=int, help="spark.sql.shuffle.partitions for this job")
    g = p.add_argument_group("stages and model")
    g.add_argument("--stages", default=",".join(STAGES),
                   help=f"comma-separated subset of {','.join(STAGES)} (validate always runs when a later stage "
                        "needs the catalog)")
    g.add_argument("--model", help="skip training: models:/<name>@<alias>, models:/<name>/<version> or a .pt file")
    g.add_argument("--model-name", default="catalog-semantic-ids", help="registered MLflow model name")
    g.add_argument("--experiment", default="catalog-semantic-ids", help="MLflow experiment name")
    g.add_argument("--max-reject-share", type=float, default=0.05,
                   help="fail when more than this share of input rows is rejected (before training, and always "
                   "before any table is written)")
    g = p.add_argument_group("training")
    g.add_argument("--sample-size", type=int, default=200_000, help="items sampled (by id hash) for training")
    g.add_argument("--seed", type=int, default=0, help="seed for sampling and training")
    g.add_argument("--levels", type=int, default=3, help="L, code levels")
    g.add_argument("--codebook-size", type=int, default=256, help="K, codes per level")
    g.add_argument("--hidden-dims", default="512,256,128", help="encoder hidden widths (decoder mirrors)")
    g.add_argument("--latent-dim", type=int, default=32, help="latent (codeword) width")
    g.add_argument("--estimator", default="ste", choices=["ste", "rotation"], help="gradient estimator")
    g.add_argument("--shared-codebook", action="store_true", help="one codebook for all levels")
    g.add_argument("--no-anchor", action="store_true",
                   help="plain RQ-VAE: choose level 1 in the learned latent instead of from input-space "
                        "k-means centroids (docs/design.md explains the trade-off)")
    g.add_argument("--epochs", type=int, default=30, help="maximum epochs")
    g.add_argument("--batch-size", type=int, default=1024, help="training batch size")
    g.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    g.add_argument("--taxonomy-weight", type=float, default=0.0,
                   help="lambda of the catalog-tree contrastive regularizer (needs --category-col; ~0.01)")
    g.add_argument("--device", default="auto", help="training device: auto (cuda > mps > cpu), cpu, cuda")
    g.add_argument("--bf16", action="store_true", help="bfloat16 autocast on CUDA")
    g = p.add_argument_group("quality gate (held-out sample)")
    g.add_argument("--gate-min-utilization", type=float, default=0.5, help="minimum code utilization per level")
    g.add_argument("--gate-min-unique-rate", type=float, default=0.5, help="minimum distinct-tuple rate")
    g.add_argument("--gate-min-recon-cosine", type=float, default=0.5, help="minimum mean reconstruction cosine")
    g = p.add_argument_group("encoding and report")
    g.add_argument("--encode-batch-size", type=int, default=None,
                   help="rows per model call in the UDF (default: 2048 on CPU, 8192 on a GPU; on CPU small "
                   "batches are faster)")
    g.add_argument("--encode-device", default="cpu", help="torch device on the workers (cpu or cuda)")
    g.add_argument("--encode-threads", type=int, default=1,
                   help="torch threads per encode task (default 1: the engine runs one task per core; raise "
                   "it together with spark.task.cpus for fewer, fatter tasks; 0 = torch's default). 1 or a "
                   "power of two keeps each quantization error the same bits however the rows are batched; "
                   "other counts can change the last bit of a few, and so the suffix order of near ties")
    g.add_argument("--suffix-budget", type=int, default=16, help="suffixes beyond this count as overflow")
    g = p.add_argument_group("scheduled runs: ID stability and generations (docs/scheduling.md)")
    g.add_argument("--mode", default="auto", choices=MODES,
                   help="auto (default): incremental when the output table exists and its current generation "
                   "was written by this run's model, full otherwise (the job prints which and why). "
                   "incremental: only items the table does not hold (and, with --on-changed retokenize, items "
                   "whose embedding changed) are encoded; every existing row stays as it is; one Delta MERGE. "
                   "full: every item is encoded; with the table's model every ID is kept, with another model a "
                   "new generation starts (IDs aligned, changes listed in id_changes, gated by --max-id-churn)")
    g.add_argument("--on-changed", default="keep", choices=ON_CHANGED,
                   help="an item whose embedding changed (fingerprint differs) within a generation: keep its ID "
                   "(default), or retokenize it: a new ID if its codes changed, the old one retired and never "
                   "reissued. Either way the run reports how many changed")
    g.add_argument("--max-id-churn", type=float, default=0.5,
                   help="fail the run (exit 3, nothing written, @champion not moved) when more than this share "
                   "of the previously published items still in the catalog would get another semantic_id "
                   "(default 0.5; 1 turns the gate off)")
    g.add_argument("--align", default="warm-start", choices=ALIGN_CHOICES,
                   help="when training against an existing table, how the new model's codes are aligned to the "
                   "table's: warm-start (default) trains from the table's model and then relabels codes to match "
                   "it; relabel trains from scratch and relabels each level's codes by a one-to-one matching; "
                   "none does neither (every ID may move)")
    g.add_argument("--warm-start-epochs", type=int, default=3,
                   help="with --align warm-start, fine-tune at most this many epochs (at a tenth of --lr): each "
                   "epoch moves more IDs for little gain; raise it when the catalog drifted far")
    g.add_argument("--compare-to", help="a semantic-ID table (Delta or Parquet path) to measure drift against "
                   "instead of the output table's previous version; its churn is what --max-id-churn gates")
    return p


def parse_args(argv: list[str] | None = None) -> JobConfig:
    p = build_parser()
    a = p.parse_args(argv)
    stages = tuple(s.strip() for s in a.stages.split(",") if s.strip())
    bad = [s for s in stages if s not in STAGES]
    if bad or not stages:
        p.error(f"--stages: unknown {bad or 'empty'}; choose from {','.join(STAGES)}")
    if not (a.input or a.demo):
        p.error("--input is required (or --demo for the synthetic catalog)")
    if "train" not in stages and "encode" in stages and not a.model:
        p.error("--stages without train needs --model models:/<name>@<alias> (or a checkpoint file)")
    if a.mode == "incremental" and "train" in stages:
        p.error("--mode incremental keeps the IDs the table's model issued, so it does not train: pass --model "
                "models:/<name>@champion with --stages validate,encode,report, or --mode full (or auto) to train "
                "a new generation")
    if a.warm_start_epochs < 1:
        p.error(f"--warm-start-epochs must be at least 1, got {a.warm_start_epochs}")
    if not 0.0 <= a.max_id_churn <= 1.0:
        p.error(f"--max-id-churn must be between 0 and 1, got {a.max_id_churn}")
    hidden = tuple(int(v) for v in a.hidden_dims.split(",") if v)
    return JobConfig(
        input=a.input, input_format=a.input_format, demo=a.demo, demo_items=a.demo_items, demo_dim=a.demo_dim,
        output=a.output, output_table_prefix=a.output_table_prefix, format=a.format, work_dir=a.work_dir,
        engine="remote" if a.remote else a.engine, remote=a.remote, stages=stages, model=a.model,
        model_name=a.model_name, experiment=a.experiment, id_col=a.id_col, embedding_col=a.embedding_col,
        category_col=a.category_col, embedding_dim=a.embedding_dim,
        max_reject_share=a.max_reject_share, sample_size=a.sample_size, seed=a.seed,
        model_config=ModelConfig(input_dim=a.embedding_dim or 1, hidden_dims=hidden, latent_dim=a.latent_dim,
                                 num_levels=a.levels, codebook_size=a.codebook_size, estimator=a.estimator,
                                 shared_codebook=a.shared_codebook, anchor_first_level=not a.no_anchor),
        train_config=TrainConfig(epochs=a.epochs, batch_size=a.batch_size, lr=a.lr, seed=a.seed,
                                 taxonomy_weight=a.taxonomy_weight, device=a.device, bf16=a.bf16,
                                 warm_start_epochs=a.warm_start_epochs),
        gate=GateThresholds(min_utilization=a.gate_min_utilization, min_unique_rate=a.gate_min_unique_rate,
                            min_recon_cosine=a.gate_min_recon_cosine),
        encode_batch_size=a.encode_batch_size, encode_device=a.encode_device,
        encode_threads=a.encode_threads, suffix_budget=a.suffix_budget,
        shuffle_partitions=a.shuffle_partitions, mode=a.mode, on_changed=a.on_changed, compare_to=a.compare_to,
        max_id_churn=a.max_id_churn, align=a.align,
    )


@contextmanager
def stage(name: str):  # type: ignore[no-untyped-def]
    """Banner before and after a stage, with its wall time."""
    print(f"\n==> {name}", flush=True)
    start = time.perf_counter()
    yield
    print(f"    {name} done in {time.perf_counter() - start:.1f}s", flush=True)


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    from jobs.runner import JobFailed, run_job

    try:
        result = run_job(cfg, stage)
    except JobFailed as e:
        print(f"\nFAILED: {e}", file=sys.stderr)
        return e.exit_code
    for line in result.summary_lines():
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
