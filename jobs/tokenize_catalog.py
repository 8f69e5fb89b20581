r"""Tokenize a catalog: validate -> sample -> fit the RQ-VAE -> MLflow -> encode -> uniquify -> Delta -> report.

    python jobs/tokenize_catalog.py --demo                      # embedded engine, synthetic catalog
    python jobs/tokenize_catalog.py --input /data/catalog --output /data/semids
    spark-submit jobs/tokenize_catalog.py --engine spark --input main.shop.items --output-table-prefix main.semids
    python jobs/tokenize_catalog.py --stages encode,report --model models:/catalog-semantic-ids@champion ...

    python jobs/tokenize_catalog.py --model models:/catalog-semantic-ids@champion \
        --input /data/catalog --output /data/semids            # daily: incremental, no ID moves, no training

Exit codes: 0 success; 1 an unexpected error (a bug: rerun with --debug and report it); 2 bad
arguments or input, the message names the fix; 3 a gate failed (quality, or ID churn); 4 another run
wrote the table meanwhile, run again. On any failure, and when the job is killed, the published set
(semantic_ids, rejects, prefix statistics...) stays the previous run's and @champion does not move.
"""
from __future__ import annotations

import argparse
import gc
import math
import os
import re
import sys
import time
import traceback
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

if __package__ in (None, ""):  # run as a script (python/spark-submit jobs/tokenize_catalog.py)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
if __name__ == "__main__" and not os.environ.get("DATABRICKS_RUNTIME_VERSION"):  # _OWN_PROCESS, below
    gc.disable()  # no collection while the job's libraries import (see _settle_gc)

from jobs.config import ALIGN_CHOICES, EXIT_UNEXPECTED, READ_EMBEDDINGS, STAGES, JobConfig
from pipelines.gate import GateThresholds
from pipelines.schema import MODES, ON_CHANGED
from rqvae import ModelConfig, TrainConfig

# The script in its own process. Not on Databricks, whose Python task may run the file in a process that lives
# on after it: the collector is left alone there (the test at the top of the file is the same).
_OWN_PROCESS = __name__ == "__main__" and not os.environ.get("DATABRICKS_RUNTIME_VERSION")

# --- argument types: each names its flag's rule; argparse adds the flag and exits 2 ------------------

def _at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    parse.__name__ = "whole number"  # argparse names the type in its own messages
    return parse


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def _share(text: str) -> float:
    value = _number(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a share between 0 and 1, got {value:g}")
    return value


def _cosine(text: str) -> float:
    value = _number(text)
    if not -1.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a cosine between -1 and 1, got {value:g}")
    return value


def _positive(text: str) -> float:
    value = _number(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be above 0, got {value:g}")
    return value


def _non_negative(text: str) -> float:
    value = _number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value:g}")
    return value


_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def _bytes(text: str) -> int:
    """A memory size: bytes, or a number with k, m, g or t (powers of 1024), e.g. 1536m or 2g; 0 is allowed."""
    t = text.strip().lower().removesuffix("b").removesuffix("i")
    unit = t[-1] if t and t[-1] in "kmgt" else ""
    try:
        value = float(t[: len(t) - len(unit)]) * _SIZE_UNITS[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a size such as 2g, 1536m or 0, got {text!r}") from None
    if not 0 <= value < float("inf"):  # NaN fails too
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text!r}")
    return int(value)


def _size_text(n: int) -> str:
    """2147483648 -> "2g", 1610612736 -> "1536m", 0 -> "0"."""
    if n == 0:
        return "0"
    unit, shift = next(((u, s) for u, s in (("g", 30), ("m", 20), ("k", 10)) if n % (1 << s) == 0), ("", 0))
    return f"{n >> shift}{unit}" if unit else f"{n} bytes"


def _widths(text: str) -> tuple[int, ...]:
    parts = [p.strip() for p in text.split(",")]
    if not parts or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive widths such as 512,256,128, got {text!r}")
    return tuple(int(p) for p in parts)


def _anchor_levels(text: str) -> int | str:
    if text == "all":
        return text
    try:
        return _at_least(1)(text)
    except argparse.ArgumentTypeError as e:
        raise argparse.ArgumentTypeError(f"{e} (or 'all')") from None


def anchored_levels(setting: int | str, levels: int) -> int:
    """The number of anchored levels an ``--anchor-levels`` setting (a number or "all") names for ``levels``."""
    return levels if setting == "all" else int(setting)


def _nonempty(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text


# The tokenizer defaults measured best on the real catalog (bench/RESULTS.md, "Quality on a real catalog"):
# every level anchored (input-space residual k-means) with the collision-aware last level.
DEFAULT_ANCHOR_LEVELS = "all"
DEFAULT_ANCHOR_RECONSTRUCTION = True
DEFAULT_COLLISION_ALTERNATIVES = 16
# A 2-prefix holds at most this share of the K full tuples it has room for (TrainConfig.prefix_fill).
DEFAULT_PREFIX_FILL = 0.5
# Joint refinement passes of a fully anchored model's codewords (TrainConfig.anchor_refine_passes).
DEFAULT_ANCHOR_REFINE_PASSES = 5
DEFAULT_ENGINE_MEMORY = 0  # bytes, 0: no pool (docs/scaling.md, "Memory": what a pool costs and saves)
_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._-]{0,254}$")


def _model_name(text: str) -> str:
    if not _MODEL_NAME.match(text) or text != text.strip():
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a usable registered model name: start with a letter or digit, then letters, digits, "
            "spaces, '.', '_' or '-' (no '/', ':' or '@': they separate the parts of models:/<name>@<alias>)")
    return text


def _device(flag: str, *names: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text in names or ("cuda" in names and re.fullmatch(r"cuda:\d+", text)):
            return text
        raise argparse.ArgumentTypeError(f"choose one of {', '.join(names)}" + (" (or cuda:N)" if "cuda" in names
                                                                                else "") + f", got {text!r}")

    return parse


def _missing_device(device: str) -> str | None:
    """Why ``device`` cannot be used on this machine (None when it can, or when it is auto/cpu)."""
    if not (device.startswith("cuda") or device == "mps"):
        return None
    import torch

    if device == "mps":
        return None if torch.backends.mps.is_available() else "this machine has no MPS (Apple GPU) device"
    if not torch.cuda.is_available():
        return "this machine has no CUDA device (torch.cuda.is_available() is False)"
    index = int(device.split(":")[1]) if ":" in device else 0
    if index >= torch.cuda.device_count():
        return f"this machine has {torch.cuda.device_count()} CUDA device(s), so there is no {device}"
    return None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tokenize_catalog", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("input")
    g.add_argument("--input", help="catalog: Delta/Parquet path or table name (required unless --demo)")
    g.add_argument("--input-format", default="auto", choices=["auto", "delta", "parquet", "table"],
                   help="how to read --input (auto: Delta if it has _delta_log, else Parquet, else a table name)")
    g.add_argument("--demo", action="store_true",
                   help="first write the synthetic demo catalog to <work-dir>/demo_catalog and use it as --input")
    g.add_argument("--demo-items", type=_at_least(1), default=100_000, help="items in the demo catalog")
    g.add_argument("--demo-dim", type=_at_least(1), default=256, help="embedding length of the demo catalog")
    g.add_argument("--id-col", default="item_id", help="item id column (STRING or BIGINT, unique)")
    g.add_argument("--embedding-col", default="embedding", help="embedding column (ARRAY<FLOAT|DOUBLE>)")
    g.add_argument("--embedding-dim", type=_at_least(1),
                   help="embedding length D; default: the most common length among the first 10,000 rows "
                        "(rows of any other length are rejected either way)")
    g.add_argument("--category-col", default="",
                   help="optional ARRAY<STRING> taxonomy path column; enables --taxonomy-weight and purity/NMI")
    g.add_argument("--label-col", default="",
                   help="optional STRING column people recognise items by (e.g. a title): the report lists a few "
                   "of its values under each top prefix (those of the items with the smallest quantization_error). "
                   "Read for the report only, it never changes an ID; a missing column or another type fails at "
                   "start (exit 2). --demo uses its synthetic 'title' column")
    g = p.add_argument_group("output")
    g.add_argument("--output", help="folder/URI for the tables (default <work-dir>/tables)")
    g.add_argument("--output-table-prefix", help="write catalog tables <prefix>.semantic_ids etc. instead")
    g.add_argument("--format", default="delta", choices=["delta", "parquet"], help="table format")
    g.add_argument("--work-dir", default="work", help="local folder for the demo catalog, checkpoints, "
                   "reports and the default MLflow store (mlflow.db, mlartifacts/) (default: %(default)s)")
    g = p.add_argument_group("engine")
    g.add_argument("--engine", default="local", choices=["local", "spark", "remote"],
                   help="local: embedded Sail (no JVM); spark: the active/classic session (spark-submit); "
                        "remote: Spark Connect (--remote)")
    g.add_argument("--remote", help="Spark Connect URL, e.g. sc://host:15002 (implies --engine remote)")
    g.add_argument("--debug", action="store_true",
                   help="print the Python traceback of a failure (by default only its message and the exit code), and "
                        "MLflow's own INFO lines and download progress bars (off by default when the script runs)")
    g.add_argument("--shuffle-partitions", type=_at_least(1), help="spark.sql.shuffle.partitions for this job")
    g.add_argument("--engine-memory", type=_bytes, default=DEFAULT_ENGINE_MEMORY, metavar="SIZE",
                   help="embedded engine only: cap its operators' memory (2g, 1536m; 0: no cap). Sorts, "
                        "aggregates and joins of two large inputs spill to TMPDIR beyond it, which is slower; "
                        "an operator that cannot spill fails the job with a message naming this flag. "
                        "SAIL_RUNTIME__MEMORY_POOL__TYPE in the environment overrides it "
                        f"(default: {_size_text(DEFAULT_ENGINE_MEMORY)})")
    g = p.add_argument_group("stages and model")
    g.add_argument("--stages",
                   help=f"comma-separated subset of {','.join(STAGES)} (default: all of them; with --model: "
                   f"{','.join(s for s in STAGES if s != 'train')}). validate always runs when a later stage needs "
                   "the catalog")
    g.add_argument("--model", help="use this model and do not train (refused beside a --stages list that names train): "
                   "models:/<name>@<alias>, models:/<name>/<version> or a .pt checkpoint file")
    g.add_argument("--model-name", type=_model_name, default="catalog-semantic-ids",
                   help="registered MLflow model name (letters, digits, '-', '_', '.', spaces)")
    g.add_argument("--experiment", type=_nonempty, default="catalog-semantic-ids",
                   help="MLflow experiment name")
    g.add_argument("--max-reject-share", type=_share, default=0.05,
                   help="fail when more than this share of input rows is rejected (before training, and always "
                   "before any table is written)")
    g = p.add_argument_group("training")
    g.add_argument("--sample-size", type=_at_least(16), default=200_000, help="items sampled (by id hash) for training")
    g.add_argument("--seed", type=_at_least(0), default=0, help="seed for sampling and training")
    g.add_argument("--levels", type=_at_least(1), default=3, help="L, code levels")
    g.add_argument("--codebook-size", type=_at_least(2), default=256, help="K, codes per level")
    g.add_argument("--hidden-dims", type=_widths, default="512,256,128", help="encoder hidden widths (decoder mirrors)")
    g.add_argument("--latent-dim", type=_at_least(1), default=32, help="latent (codeword) width")
    g.add_argument("--estimator", default="ste", choices=["ste", "rotation"], help="gradient estimator")
    g.add_argument("--shared-codebook", action="store_true",
                   help="one latent codebook for all learned levels (needs --anchor-levels below --levels)")
    g.add_argument("--no-anchor", action="store_true",
                   help="plain RQ-VAE: choose level 1 in the learned latent instead of from input-space "
                        "k-means centroids (docs/design.md explains the trade-off)")
    g.add_argument("--anchor-levels", type=_anchor_levels, default=DEFAULT_ANCHOR_LEVELS,
                   help="leading levels chosen by input-space residual k-means (the anchor); the rest are learned by "
                        "the RQ-VAE. 'all' (the default, best on the real-catalog benchmark) anchors every level: "
                        "residual k-means with no epochs to train, so --epochs, --latent-dim and the other network "
                        "settings take no part; 2 with --levels 3 learns the last level (docs/design.md)")
    g.add_argument("--anchor-reconstruction", action=argparse.BooleanOptionalAction,
                   default=DEFAULT_ANCHOR_RECONSTRUCTION,
                   help="with a learned level (--anchor-levels below --levels): reconstruct an item as its anchored "
                        "centroids plus the decoder's output, so the decoder learns what the anchor leaves (ignored "
                        "with --no-anchor; with every level anchored the reconstruction is the centroid sum)")
    g.add_argument("--collision-alternatives", type=_at_least(0), default=None,
                   help="an item whose code tuple a better-fitting item holds takes the nearest free of its this-many "
                        "nearest last-level codes before a suffix is needed; 0: off (docs/design.md) (default: "
                        f"{DEFAULT_COLLISION_ALTERNATIVES}, or the --codebook-size when it is smaller)")
    g.add_argument("--prefix-fill", type=_share, default=DEFAULT_PREFIX_FILL,
                   help="with at least two anchored levels and a third level: the most items of the catalog a "
                        "2-prefix should hold, as a share of the --codebook-size full tuples it has room for, so a "
                        "large level-1 cell cannot crowd a few level-2 codes past what they can tell apart; level 2 "
                        "then adds a learned per-prefix offset to the distance, fitted on the training sample. 0: no "
                        "new offsets (a fresh model: nearest centroid; a warm start keeps its model's). A catalog of "
                        "many near-duplicates (product variants) leaves fewer items sharing a tuple at 0.15, for a "
                        "little 2-prefix coherence (docs/design.md)")
    g.add_argument("--anchor-refine-passes", type=_at_least(0), default=DEFAULT_ANCHOR_REFINE_PASSES,
                   help="with every level anchored: passes that refine the levels' codewords together after the "
                        "level-by-level k-means, so that their sum reconstructs an item better; level 1's codes "
                        "stay those of its k-means centroids. 0: off; a warm start runs none and keeps the "
                        "refinement its model has (docs/design.md)")
    g.add_argument("--epochs", type=_at_least(1), default=30, help="maximum epochs")
    g.add_argument("--batch-size", type=_at_least(2), default=1024, help="training batch size")
    g.add_argument("--lr", type=_positive, default=1e-3, help="peak learning rate")
    g.add_argument("--taxonomy-weight", type=_non_negative, default=0.0,
                   help="lambda of the catalog-tree regularizer (needs --category-col; ~0.01): the level-1 anchor "
                   "guided by the taxonomy (--taxonomy-anchor-scale), and with a learned level a contrastive loss "
                   "on the code prefixes. With every level anchored (the default) any value > 0 only turns the "
                   "guided anchor on (default: %(default)s: off)")
    g.add_argument("--taxonomy-anchor-scale", type=_non_negative, default=TrainConfig.taxonomy_anchor_scale,
                   help="with --taxonomy-weight > 0: weight of an item's category mean when the level-1 anchor "
                   "is clustered (the shallowest taxonomy depth with at least --codebook-size categories); the "
                   "centroids are then fitted to give those cells from the embedding alone, so encoding needs no "
                   "category. 0 = plain k-means anchor")
    g.add_argument("--device", type=_device("--device", "auto", "cpu", "cuda", "mps"), default="auto",
                   help="training device: auto (cuda > mps > cpu), cpu, cuda, cuda:N or mps; asking for one this "
                   "machine lacks fails at once")
    g.add_argument("--bf16", action="store_true", help="bfloat16 autocast on CUDA")
    g = p.add_argument_group("quality gate (held-out sample)")
    g.add_argument("--gate-min-utilization", type=_share, default=0.5, help="minimum code utilization per level")
    g.add_argument("--gate-min-unique-rate", type=_share, default=0.5, help="minimum distinct-tuple rate")
    g.add_argument("--gate-min-recon-cosine", type=_cosine, default=0.5, help="minimum mean reconstruction cosine")
    g = p.add_argument_group("encoding and report")
    g.add_argument("--encode-batch-size", type=_at_least(1), default=None,
                   help="rows per model call in the UDF (default: 2048 on CPU, 8192 on a GPU; on CPU small "
                   "batches are faster)")
    g.add_argument("--encode-device", type=_device("--encode-device", "cpu", "cuda"), default="cpu",
                   help="torch device on the workers: cpu or cuda (cuda:N); cuda is checked on the driver at start")
    g.add_argument("--encode-threads", type=_at_least(0), default=1,
                   help="torch threads per encode task (default 1: the engine runs one task per core; raise "
                   "it together with spark.task.cpus for fewer, fatter tasks; 0 = torch's default). 1 or a "
                   "power of two keeps each quantization error the same bits however the rows are batched; "
                   "other counts can change the last bit of a few, and so the suffix order of near ties")
    g.add_argument("--read-embeddings", default="auto", choices=READ_EMBEDDINGS,
                   help="who reads the embeddings in the pass over every row. files: the encode UDF reads the "
                   "catalog's Parquet row groups itself, with pyarrow, so the engine never decodes nor hands over "
                   "the embedding column (faster: docs/scaling.md); only for a Delta or Parquet table at a path "
                   "this machine and the engine's workers see, without deletion vectors or column mapping, with a "
                   "list<float> embedding column; the job stops and says why when the table is not one. engine: "
                   "the engine reads the table. auto (default): files where the table allows it on the embedded "
                   "engine or classic Spark, the engine otherwise (the job says which)")
    g.add_argument("--fingerprint-cache", default=None, metavar="DIR|none",
                   help="where the pass over every row keeps each catalog row group's checked and fingerprinted "
                   "rows when the UDF reads the files (--read-embeddings), so that an incremental run reads the "
                   "embeddings of new files only (default <work-dir>/fingerprint_cache; entries are keyed by the "
                   "file's path in the table, size and modification time, and deleted after 7 days unused). none: "
                   "no cache, every run reads every embedding (for a Parquet folder whose writer rewrites files in "
                   "place keeping their size and modification time; Delta never does)")
    g.add_argument("--suffix-budget", type=_at_least(0), default=16, help="suffixes beyond this count as overflow")
    g.add_argument("--no-second-chance", dest="second_chance", action="store_false",
                   help="issue IDs without the second chance: by default the new IDs' items still sharing a tuple "
                   "after the collision spreading (families of near-duplicates) are read again, ranked over every "
                   "last-level code and given a free one of their prefix (docs/design.md). It reads the "
                   "embeddings of the row groups holding them again: a full run of 1M x 768 with 2,515 such "
                   "items took 32 -> 42 s on the embedded engine, 98 -> 128 s on classic Spark (bench/RESULTS.md); "
                   "an incremental run reads only its new items' row groups")
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
    g.add_argument("--max-id-churn", type=_share, default=0.5,
                   help="fail the run (exit 3, nothing written, @champion not moved) when more than this share "
                   "of the previously published items still in the catalog would get another semantic_id "
                   "(default 0.5; 1 turns the gate off)")
    g.add_argument("--align", default="warm-start", choices=ALIGN_CHOICES,
                   help="when training against an existing table, how the new model's codes are aligned to the "
                   "table's: warm-start (default) trains from the table's model and then relabels codes to match "
                   "it; relabel trains from scratch and relabels each level's codes by a one-to-one matching; "
                   "none does neither (every ID may move)")
    g.add_argument("--warm-start-epochs", type=_at_least(1), default=3,
                   help="with --align warm-start, fine-tune at most this many epochs (at a tenth of --lr) and refine "
                   "the input-space centroids by at most this many Lloyd iterations: each pass moves more IDs for "
                   "little gain; raise it when the catalog drifted far")
    g.add_argument("--compare-to", help="a semantic-ID table (Delta or Parquet path) to measure drift against as "
                   "well: written to the drift table beside the drift against the output table's previous version "
                   "and logged as compare_* metrics; --max-id-churn still gates the output table's own churn")
    for action in p._actions:  # every flag with a value by default shows it, unless its help words it already
        if action.help and "default" not in action.help.lower() and not (
                action.default is None or action.default is False or action.default == ""
                or action.default is argparse.SUPPRESS):
            action.help += " (default: %(default)s)"
    return p


def parse_args(argv: list[str] | None = None) -> JobConfig:
    p = build_parser()
    a = p.parse_args(argv)
    if a.stages is None:  # --model means "use this model": no training unless asked for by name
        stages = tuple(s for s in STAGES if not (a.model and s == "train"))
    else:
        stages = tuple(s.strip() for s in a.stages.split(",") if s.strip())
    bad = [s for s in stages if s not in STAGES]
    if bad or not stages:
        p.error(f"--stages: unknown {bad or 'empty'}; choose from {','.join(STAGES)}")
    if a.model and "train" in stages:
        p.error("--model names the model to use, but --stages asks to train a new one: drop train from --stages to "
                "encode with --model, or drop --model to train (a training run warm-starts from the output table's "
                "own model by itself, see --align)")
    if not (a.input or a.demo):
        p.error("--input is required (or --demo for the synthetic catalog)")
    if "train" not in stages and "encode" in stages and not a.model:
        p.error("--stages without train needs --model models:/<name>@<alias> (or a checkpoint file)")
    if a.mode == "incremental" and "train" in stages:
        p.error("--mode incremental keeps the IDs the table's model issued, so it does not train: pass --model "
                "models:/<name>@champion with --stages validate,encode,report, or --mode full (or auto) to train "
                "a new generation")
    anchored = 0 if a.no_anchor else anchored_levels(a.anchor_levels, a.levels)
    if anchored > a.levels:
        p.error(f"--anchor-levels {a.anchor_levels} is more than the --levels {a.levels} there are: use at most "
                f"{a.levels}, or all")
    if a.shared_codebook and anchored == a.levels:
        p.error("--shared-codebook shares the latent codebook of the learned levels, and with --anchor-levels "
                f"{a.anchor_levels} every level is anchored: pass --anchor-levels {max(1, a.levels - 1)} with it, "
                "or drop it")
    if a.collision_alternatives is None:  # not given: the default, as far as the codebook has codes
        a.collision_alternatives = min(DEFAULT_COLLISION_ALTERNATIVES, a.codebook_size)
    if a.collision_alternatives > a.codebook_size:
        p.error(f"--collision-alternatives {a.collision_alternatives} is more than the --codebook-size "
                f"{a.codebook_size} codes there are; use at most {a.codebook_size} (0 turns it off)")
    if a.warm_start_epochs < 1:
        p.error(f"--warm-start-epochs must be at least 1, got {a.warm_start_epochs}")
    if not 0.0 <= a.max_id_churn <= 1.0:
        p.error(f"--max-id-churn must be between 0 and 1, got {a.max_id_churn}")
    if a.taxonomy_weight > 0 and not (a.category_col or a.demo):
        p.error("--taxonomy-weight needs the catalog's taxonomy: pass --category-col COLUMN (ARRAY<STRING>)")
    engine = "remote" if a.remote else a.engine
    for flag, device, needed in (("--device", a.device, "train" in stages),
                                 # on a cluster the workers' GPUs are not the driver's: checked where they run
                                 ("--encode-device", a.encode_device, "encode" in stages and engine == "local")):
        missing = _missing_device(device) if needed else None
        if missing:
            p.error(f"{flag} {device}: {missing}. Use {flag} {'auto' if flag == '--device' else 'cpu'}, or run on a "
                    "machine with that device")
    hidden = a.hidden_dims
    return JobConfig(
        input=a.input, input_format=a.input_format, demo=a.demo, demo_items=a.demo_items, demo_dim=a.demo_dim,
        output=a.output, output_table_prefix=a.output_table_prefix, format=a.format, work_dir=a.work_dir,
        engine=engine, remote=a.remote, stages=stages, model=a.model,
        model_name=a.model_name, experiment=a.experiment, id_col=a.id_col, embedding_col=a.embedding_col,
        category_col=a.category_col, embedding_dim=a.embedding_dim,
        max_reject_share=a.max_reject_share, sample_size=a.sample_size, seed=a.seed,
        model_config=ModelConfig(input_dim=a.embedding_dim or 1, hidden_dims=hidden, latent_dim=a.latent_dim,
                                 num_levels=a.levels, codebook_size=a.codebook_size, estimator=a.estimator,
                                 shared_codebook=a.shared_codebook, anchor_first_level=not a.no_anchor,
                                 anchor_levels=anchored or 1,
                                 anchor_reconstruction=a.anchor_reconstruction and not a.no_anchor,
                                 collision_alternatives=a.collision_alternatives),
        train_config=TrainConfig(epochs=a.epochs, batch_size=a.batch_size, lr=a.lr, seed=a.seed,
                                 taxonomy_weight=a.taxonomy_weight, taxonomy_anchor_scale=a.taxonomy_anchor_scale,
                                 device=a.device, bf16=a.bf16,
                                 warm_start_epochs=a.warm_start_epochs, prefix_fill=a.prefix_fill,
                                 anchor_refine_passes=a.anchor_refine_passes),
        gate=GateThresholds(min_utilization=a.gate_min_utilization, min_unique_rate=a.gate_min_unique_rate,
                            min_recon_cosine=a.gate_min_recon_cosine),
        encode_batch_size=a.encode_batch_size, encode_device=a.encode_device,
        encode_threads=a.encode_threads, read_embeddings=a.read_embeddings,
        fingerprint_cache=a.fingerprint_cache, suffix_budget=a.suffix_budget, second_chance=a.second_chance,
        shuffle_partitions=a.shuffle_partitions, engine_memory=a.engine_memory, mode=a.mode,
        on_changed=a.on_changed, compare_to=a.compare_to,
        max_id_churn=a.max_id_churn, align=a.align, debug=a.debug, label_col=a.label_col,
    )


@contextmanager
def stage(name: str):  # type: ignore[no-untyped-def]
    """Banner before and after a stage, with its wall time."""
    from jobs.runner import boundary

    print(f"\n==> {name}", flush=True)
    start = time.perf_counter()
    yield
    print(f"    {name} done in {time.perf_counter() - start:.1f}s", flush=True)
    boundary(f"after-{name.split()[0]}")


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = parse_args(argv)
        _quiet_mlflow(cfg.debug)
        from jobs.runner import JobFailed, run_job
        from pipelines.session import POOL_ENV, is_out_of_engine_memory
    finally:  # collection back on even when the arguments are refused (a host that ran the file keeps it)
        _settle_gc()
    debug = cfg.debug

    try:
        result = run_job(cfg, stage)
    except JobFailed as e:
        if debug:
            traceback.print_exc()
        print(f"\nFAILED: {e}", file=sys.stderr)
        return e.exit_code
    except Exception as e:  # noqa: BLE001 - the last line of defence: a message, not a traceback
        if debug:
            traceback.print_exc()
        first = _headline(e)
        if isinstance(e, MemoryError) or is_out_of_engine_memory(e):
            pool = ("set by SAIL_RUNTIME__MEMORY_POOL__* in the environment" if POOL_ENV in os.environ
                    else f"it is {_size_text(cfg.engine_memory)}")
            print(f"\nFAILED: the embedded engine needed more memory than its pool allows ({first}). Fix: rerun "
                  f"with a larger --engine-memory ({pool}), or --engine-memory 0 for no limit. Nothing was "
                  "published unless the output above says so.", file=sys.stderr)
            return EXIT_UNEXPECTED
        rerun = "Please report it with the traceback above" if debug else \
            "Rerun with --debug for the traceback, and please report it"
        print(f"\nFAILED with an unexpected {type(e).__name__}: {first}\nNothing was published unless the output "
              f"above says so. {rerun}.", file=sys.stderr)
        return EXIT_UNEXPECTED
    for line in result.summary_lines():
        print(line)
    return 0


_ERROR_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt)\b.*")


def _headline(e: BaseException) -> str:
    """The line of an unexpected error that says what went wrong: its first, and where that only introduces
    the rest (a failure in the engine's Python workers: "An exception was thrown from the Python worker..."),
    the last line of the worker's traceback that names an error too."""
    lines = [line.rstrip() for line in str(e).strip().splitlines()]
    first = (lines or [""])[0]
    named = [line for line in lines[1:] if _ERROR_LINE.match(line)]
    if named and (first.endswith(":") or "Python worker" in first):
        first = f"{first} {named[-1]}"
    return first[:500]


# What MLflow prints on its own in a run (its INFO log lines, a progress bar per artifact download), off in the
# script's own process: the job's lines say what it did. A value the user exported is kept, and --debug keeps it all.
_MLFLOW_QUIET = {"MLFLOW_LOGGING_LEVEL": "WARNING", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}


def _quiet_mlflow(debug: bool) -> None:
    """Before MLflow is imported (it reads its log level then), in the script's own process and without
    ``--debug``: :data:`_MLFLOW_QUIET` where the environment does not set them. ``main`` called from another
    program (a notebook, tests, a Databricks task) leaves MLflow's output and the environment as they are."""
    if _OWN_PROCESS and not debug:
        for name, value in _MLFLOW_QUIET.items():
            os.environ.setdefault(name, value)


def _settle_gc() -> None:
    """Once the job's libraries are imported, in the script: what they left is collected once and frozen, and
    collection (off since the script's first lines) is back on.

    torch, MLflow, pyspark and pandas leave about 370k objects that live as long as the process. While they
    import, Python's cyclic collector walks all of them again every time its oldest generation fills (6 full
    collections, 0.4 s); frozen (``gc.freeze``), later collections in the run skip them too (0.4
    -> 0.1 s during an incremental run). A no-op when ``main`` is called from another program (tests, the
    console script, a Databricks wheel task) or the script runs on Databricks: the collector is left as it is."""
    if _OWN_PROCESS and not gc.isenabled():
        gc.collect()  # what the imports left as garbage is freed, not frozen with the rest
        gc.freeze()
        gc.enable()


def _exit(code: int) -> NoReturn:
    """``sys.exit(code)`` without the interpreter's last full garbage collection.

    A run leaves millions of objects behind (torch, MLflow, pandas and what they import), and the collection
    Python runs while it shuts down walks every one of them once more: 1.1-1.3 s of each run's wall time, after
    the results are printed (bench/RESULTS.md). Frozen (``gc.freeze``), they are left to the operating system.
    By then the engine is stopped, the MLflow run ended and every file closed (run_job's ``finally`` and
    context managers); atexit handlers and the flush of stdout and stderr still run. Only for the script in its
    own process: ``main`` itself (the console script, tests, a Databricks wheel task) and the script on
    Databricks leave the process as they found it."""
    if _OWN_PROCESS:
        gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    _exit(main())
