"""The tokenize job's configuration (typed, filled from the command line) and its exit codes.

Imported by the CLI (``jobs/tokenize_catalog.py``) and by the wiring (``jobs/runner.py``), so neither
imports the other's module for it.
"""
from __future__ import annotations

from dataclasses import dataclass

from pipelines.gate import GateThresholds
from rqvae import ModelConfig, TrainConfig

STAGES = ("validate", "train", "encode", "report")
ALIGN_CHOICES = ("warm-start", "relabel", "none")
READ_EMBEDDINGS = ("auto", "engine", "files")  # --read-embeddings
EXIT_UNEXPECTED, EXIT_BAD_INPUT, EXIT_GATE, EXIT_CONFLICT = 1, 2, 3, 4


@dataclass(frozen=True)
class JobConfig:
    """Everything the job needs, straight from the command line (see ``--help``).

    ``model_config.input_dim`` is ``--embedding-dim`` when given and otherwise a placeholder that the
    job replaces with the catalog's D once validation has found it.
    """

    input: str | None
    input_format: str
    demo: bool
    demo_items: int
    demo_dim: int
    output: str | None
    output_table_prefix: str | None
    format: str
    work_dir: str
    engine: str
    remote: str | None
    stages: tuple[str, ...]
    model: str | None
    model_name: str
    experiment: str
    id_col: str
    embedding_col: str
    category_col: str
    embedding_dim: int | None
    max_reject_share: float
    sample_size: int
    seed: int
    model_config: ModelConfig
    train_config: TrainConfig
    gate: GateThresholds
    encode_batch_size: int | None = None  # None: rqvae's default for the device
    encode_device: str = "cpu"
    encode_threads: int | None = 1
    read_embeddings: str = "auto"  # auto / engine / files: who reads the embeddings in the pass over every row
    fingerprint_cache: str | None = None  # folder (None: <work_dir>/fingerprint_cache; "none": no cache)
    suffix_budget: int = 16
    second_chance: bool = True  # the new IDs' items still sharing a tuple get every free code of their prefix
    shuffle_partitions: int | None = None
    engine_memory: int = 0  # bytes; the embedded engine's memory pool, 0: no limit
    mode: str = "auto"
    on_changed: str = "keep"
    compare_to: str | None = None
    max_id_churn: float | None = None
    align: str = "warm-start"
    debug: bool = False
    label_col: str = ""  # optional STRING column: sample labels per top prefix in the report (never IDs)

    @property
    def trains(self) -> bool:
        return "train" in self.stages

    @property
    def encodes(self) -> bool:
        return "encode" in self.stages
