"""Column names, table names and reject reasons: the data contract of DESIGN.md in one place.

Input column names are configurable (:class:`InputColumns`); output column names are fixed by the
contract so that downstream SQL never has to guess.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class InputColumns:
    """Names of the catalog's columns.

    Attributes:
        item_id: unique item key, STRING or BIGINT.
        embedding: ARRAY<FLOAT|DOUBLE> of fixed length D.
        category: optional ARRAY<STRING>, root-to-leaf taxonomy path ("" = not used).
    """

    item_id: str = "item_id"
    embedding: str = "embedding"
    category: str = ""


# Output contract (semantic-ID table).
ITEM_ID = "item_id"
# Contract names of the validated catalog (``validate_catalog`` renames the input columns to these).
EMBEDDING = "embedding"
CATEGORY = "category"
CODES = "codes"
SUFFIX = "suffix"
SEMANTIC_ID = "semantic_id"
QUANTIZATION_ERROR = "quantization_error"
# Working columns of a run (never written): the model's ranked last-level codes and their errors,
# for the collision-aware last level (rqvae.resolve, pipelines.uniquify.spread_collisions).
ALTERNATIVES = "__csid_alternatives"
ALTERNATIVE_ERRORS = "__csid_alternative_errors"
MODEL_NAME = "model_name"
MODEL_VERSION = "model_version"
MLFLOW_RUN_ID = "mlflow_run_id"
TOKENIZED_AT = "tokenized_at"
# Lifecycle of a published ID (the table is a ledger: a row is never deleted, an ID never reissued).
GENERATION = "generation"
EMBEDDING_FINGERPRINT = "embedding_fingerprint"
ACTIVE = "active"
RETIRED_AT = "retired_at"
RETIRED_REASON = "retired_reason"
PREFIX_PREFIX = "prefix_"  # prefix_1 .. prefix_L: "35", "35_7", "35_7_120"
CODE_SEPARATOR = "_"  # joins codes (and the suffix) in semantic_id and prefix_<l>

# Prefix statistics (prefix_stats table) and per-level code usage (code counts / level stats).
LEVEL = "level"
PREFIX = "prefix"
CODE = "code"
ITEM_COUNT = "item_count"
CHILDREN = "children"
COLLISION_GROUPS = "collision_groups"
MAX_SUFFIX = "max_suffix"

SEMANTIC_ID_COLUMNS = (
    ITEM_ID, CODES, SUFFIX, SEMANTIC_ID, QUANTIZATION_ERROR,
    MODEL_NAME, MODEL_VERSION, MLFLOW_RUN_ID, TOKENIZED_AT,
    GENERATION, EMBEDDING_FINGERPRINT, ACTIVE, RETIRED_AT, RETIRED_REASON,
)
# Columns fixed when an ID is issued; the others record which generation/model holds the ID now and
# its lifecycle (what a later run may update: see pipelines/ledger.py).
ISSUE_COLUMNS = (ITEM_ID, CODES, SUFFIX, SEMANTIC_ID, QUANTIZATION_ERROR, MLFLOW_RUN_ID, TOKENIZED_AT)
MUTABLE_COLUMNS = (MODEL_NAME, MODEL_VERSION, GENERATION, EMBEDDING_FINGERPRINT, ACTIVE, RETIRED_AT, RETIRED_REASON)


class RetiredReason:
    """Why a row of the semantic-ID table is no longer active (``retired_reason``)."""

    LEFT_CATALOG = "left_catalog"  # the item is no longer in the catalog
    REJECTED = "rejected"  # the item is in the catalog but its row was rejected this run (see rejects)
    EMBEDDING_CHANGED = "embedding_changed"  # --on-changed retokenize gave the item a new ID
    NEW_GENERATION = "new_generation"  # a new model's codes moved the item to a new ID

    # The item may come back to its old ID (same generation); the other reasons have a successor row.
    REACTIVATABLE = (LEFT_CATALOG, REJECTED)
    ALL = (LEFT_CATALOG, REJECTED, EMBEDDING_CHANGED, NEW_GENERATION)

# Rejects table.
REASON = "reason"
REJECTED_AT = "rejected_at"


class RejectReason:
    """The reasons a catalog row is quarantined instead of tokenized (one per row, first match)."""

    NULL_ID = "null_item_id"
    DUPLICATE_ID = "duplicate_item_id"
    NULL_EMBEDDING = "null_embedding"
    WRONG_LENGTH = "wrong_embedding_length"
    NULL_ELEMENT = "null_in_embedding"
    NON_FINITE = "nan_or_inf_in_embedding"
    ZERO_VECTOR = "zero_vector"
    # |values| too large for the float32 L2 norm (its square overflows) or too small for it to reach the
    # normalisation's epsilon: such a vector would not become unit-length and would get the zero vector's codes.
    NORM_OUT_OF_RANGE = "embedding_norm_out_of_range"

    ALL = (NULL_ID, DUPLICATE_ID, NULL_EMBEDDING, WRONG_LENGTH, NULL_ELEMENT, NON_FINITE, ZERO_VECTOR,
           NORM_OUT_OF_RANGE)


def magnitude_limits(dim: int) -> tuple[float, float]:
    """(smallest, largest) allowed largest absolute value of a D-long float32 embedding.

    Below the smallest (1e-12, ``F.normalize``'s epsilon) the norm cannot reach the epsilon, so the
    vector is not normalised to unit length; above the largest, ``D * max|x|^2`` may overflow float32,
    so the norm may be Inf and the vector normalises to zeros. The bound is on max |x| (not on the norm)
    so that the SQL check needs only ``array_max``/``array_min`` and agrees bit for bit with the Arrow one.
    """
    largest = float(np.float32(np.sqrt(float(np.finfo(np.float32).max) / max(dim, 1)) / 2))
    return 1e-12, largest


# How a run writes the semantic-ID table (--mode) and what an embedding change does (--on-changed).
MODES = ("auto", "full", "incremental")
ON_CHANGED = ("keep", "retokenize")

# Tables written beside each other under one output location (path or catalog schema).
SEMANTIC_IDS_TABLE = "semantic_ids"
REJECTS_TABLE = "rejects"
PREFIX_STATS_TABLE = "prefix_stats"
LEVEL_STATS_TABLE = "level_stats"
ID_CHANGES_TABLE = "id_changes"
DRIFT_TABLE = "drift"
RUN_REJECTS_TABLE = "run_rejects"  # rejects of a run that published nothing (validate only, too many)
RUNS_TABLE = "runs"  # one entry per run that published (or was rolled back): pipelines/publish.py

# id_changes: one row per ID that was replaced (item_id, old -> new), derived from the ledger.
OLD_SEMANTIC_ID = "old_semantic_id"
NEW_SEMANTIC_ID = "new_semantic_id"
CHANGED_AT = "changed_at"


def prefix_column(level: int) -> str:
    """Name of the SQL-friendly prefix column for ``level`` (1-based): ``prefix_1``, ``prefix_2``..."""
    return f"{PREFIX_PREFIX}{level}"
