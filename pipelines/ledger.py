"""The semantic-ID table as a ledger of every ID ever issued (DESIGN.md "Uniquifying suffix and ID stability").

A row is one issued ID: ``item_id`` -> ``semantic_id``. Rows are never deleted and a ``semantic_id``
is never issued again, so a downstream model that emits an ID resolves it to the one item it ever
named. What a run may change on an existing row is its lifecycle and which generation holds it
(``schema.MUTABLE_COLUMNS``); what was fixed when the ID was issued (codes, suffix, error, run,
time: ``schema.ISSUE_COLUMNS``) never changes. After every run:

* ``semantic_id`` is unique over all rows, active and retired (new IDs take the next free suffix of
  their tuple over the whole ledger: :func:`pipelines.uniquify.assign_next_suffixes`);
* every valid catalog item has exactly one active row, and no other row is active;
* within a generation (one model) an item keeps its ID: a new item gets a new row, an item that
  left the catalog (or whose row was rejected) is retired and comes back to its old ID, an item whose
  embedding changed keeps its ID unless ``--on-changed retokenize`` gives it a new one (the old row
  is retired, never reissued);
* a new model starts a new generation on purpose (a full run): an item whose code tuple is the same
  keeps its row (its generation, model and fingerprint are updated), every other item gets a new row
  and its old row is retired; the drift report measures it and ``--max-id-churn`` can stop it.

Modes (:func:`choose_mode`): *incremental* encodes only the rows that need codes (new items, and
changed ones under retokenize) and commits one Delta ``MERGE``; *full* encodes every row and writes
the whole ledger in one commit (an atomic swap for Parquet).
"""
from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import pyarrow.compute as pc
from pyspark.sql import Column, DataFrame, SparkSession, Window
from pyspark.sql import functions as F

from pipelines import io
from pipelines.encode import BROADCAST_IDS, ENCODE_ALL, ENCODE_NEW, ENCODE_NEW_OR_CHANGED, Encoded, TokenizerModel
from pipelines.schema import (
    ACTIVE,
    ALTERNATIVE_ERRORS,
    ALTERNATIVES,
    CHANGED_AT,
    CODES,
    EMBEDDING_FINGERPRINT,
    GENERATION,
    ITEM_ID,
    MLFLOW_RUN_ID,
    MODEL_NAME,
    MODEL_VERSION,
    MODES,
    MUTABLE_COLUMNS,
    NEW_SEMANTIC_ID,
    OLD_SEMANTIC_ID,
    ON_CHANGED,
    QUANTIZATION_ERROR,
    RETIRED_AT,
    RETIRED_REASON,
    SEMANTIC_ID,
    SEMANTIC_ID_COLUMNS,
    SEMANTIC_IDS_TABLE,
    SUFFIX,
    TOKENIZED_AT,
    RetiredReason,
    prefix_column,
)
from pipelines.uniquify import (
    PART_ITEMS,
    Split,
    assign_next_suffixes,
    assign_suffixes,
    code_prefix,
    hash_part,
    in_parts,
    in_prefix_parts,
    parts_for,
    spread_and_number,
    spread_collisions,
)
from pipelines.uniquify import second_chance as spread_the_rest
from pipelines.validate import RowAccountingError

FULL, INCREMENTAL = "full", "incremental"

# The `change` of an item in a run (a column of Plan.changes, and the keys of ChangeCounts).
NEW_ITEM = "new_item"  # no row to keep: a new row
REACTIVATED = "reactivated"  # a row retired as left_catalog/rejected in this generation is active again
CONFIRMED = "confirmed"  # the row stays; its generation, model and fingerprint are refreshed
RETOKENIZED = "retokenized"  # embedding changed, --on-changed retokenize, other codes: a new row
MOVED = "moved"  # new generation, other codes: a new row
RETIRED_LEFT = "retired_left_catalog"
RETIRED_REJECTED = "retired_rejected"
CHANGED_KEPT = "changed_kept"  # embedding changed, the row is kept as it is (--on-changed keep)
UNCHANGED = "unchanged"  # nothing to do (not staged)
STILL_AWAY = "still_away"  # a new generation: a row retired (left/rejected) in the generation before, its item
# still away: nothing to write, counted for the gate (this generation decides its ID when it returns)
CHANGE = "change"
ACTION = "action"  # "insert" (a new row) or "update" (an existing row's mutable columns)

_OLD_SID, _OLD_CODES, _OLD_FP, _OLD_ACTIVE = "__old_sid", "__old_codes", "__old_fp", "__old_active"
_EARLIER = "__earlier_generation"  # the old row is an earlier generation's, retired while its item was away
# On the rows of Plan.changes: what an updated row held when the run read it (null on new rows). The
# MERGE updates a row only while it still holds that, and the drift counts moves of active IDs only.
WAS = {ACTIVE: "__was_active", GENERATION: "__was_generation", RETIRED_REASON: "__was_retired_reason"}
_IN_CATALOG, _REJECTED, _FP_CHANGED = "__in_catalog", "__rejected", "__fp_changed"
_ISSUING = (NEW_ITEM, RETOKENIZED, MOVED)
_UPDATING = (REACTIVATED, CONFIRMED, RETOKENIZED, MOVED, RETIRED_LEFT, RETIRED_REJECTED)


class ModeError(ValueError):
    """The requested mode cannot run against this table (the message names the flag to change)."""


@dataclass(frozen=True)
class TableState:
    """The semantic-ID table as the run found it.

    Attributes:
        ledger: every row (pinned to ``version`` for Delta), with the lifecycle columns (defaults
            filled in for a table written before they existed).
        version: the Delta version read; None for Parquet and catalog tables.
        model_name, model_version, generation: the current generation (the largest) and its model.
        num_levels: L of its IDs; max_code: the largest code in them (codes are < K).
        has_lifecycle: False for a table written before the lifecycle columns existed.
        rows, active_rows: row counts.
        earlier_retired: rows retired as left the catalog or rejected in a generation before the current
            one (0: :meth:`returnable` is empty, and no run reads it).
    """

    ledger: DataFrame
    version: int | None
    model_name: str
    model_version: str
    generation: int
    num_levels: int
    has_lifecycle: bool
    rows: int
    active_rows: int
    max_code: int = 0
    earlier_retired: int = 0

    def active(self) -> DataFrame:
        """The rows that hold the current IDs."""
        return self.ledger.where(F.col(ACTIVE))

    def candidates(self) -> DataFrame:
        """Per item the row it can keep: its active row, or its row retired (left the catalog or
        rejected) in the current generation. At most one per item."""
        reactivatable = F.col(RETIRED_REASON).isin(*RetiredReason.REACTIVATABLE) & (
            F.col(GENERATION) == F.lit(self.generation))
        return self.ledger.where(F.col(ACTIVE) | reactivatable)

    def returnable(self) -> DataFrame | None:
        """Per item without a row in the current generation (and without an active row), its latest row retired
        as left the catalog or rejected in an earlier generation: an item that was away when a new generation
        started. Its ID was issued under an earlier model, so when it comes back its codes under the current
        model decide (:func:`plan_changes`): the same tuple, and it has that ID again; another, and it moves,
        listed in ``id_changes``. None when the table has no such row (``earlier_retired``).

        The ledger is read twice, each time filtered as it is read: those rows, and the rows of now of their items
        (their ids broadcast when they are up to ``BROADCAST_IDS``), so that the cost follows the items that left,
        not the table."""
        if not self.earlier_retired:
            return None
        earlier = self.ledger.where(F.col(RETIRED_REASON).isin(*RetiredReason.REACTIVATABLE) & ~F.col(ACTIVE)
                                    & (F.col(GENERATION) < F.lit(self.generation)))
        ids = earlier.select(ITEM_ID)
        # An item back with a new row under the rule before this one also kept its old row as it was: its row of
        # now is the one it has.
        here_now = (self.ledger.where(F.col(ACTIVE) | (F.col(GENERATION) == F.lit(self.generation))).select(ITEM_ID)
                    .join(F.broadcast(ids) if self.earlier_retired <= BROADCAST_IDS else ids, ITEM_ID, "left_semi"))
        latest = Window.partitionBy(ITEM_ID).orderBy(F.col(GENERATION).desc(), F.col(RETIRED_AT).desc_nulls_last(),
                                                     F.col(SEMANTIC_ID).desc())
        return (earlier.join(here_now, ITEM_ID, "left_anti").withColumn("__latest", F.row_number().over(latest))
                .where(F.col("__latest") == 1).drop("__latest"))

    def known_fingerprints(self) -> DataFrame:
        """``item_id`` and ``embedding_fingerprint`` of every item with a row it can keep: what an
        incremental run's encode pass compares the catalog with."""
        return self.candidates().select(ITEM_ID, EMBEDDING_FINGERPRINT)

    def current_codes(self, items: DataFrame, sorted_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The active codes of the ``items`` (a frame with ``item_id``) the table holds, on the driver.

        Returns:
            ``positions`` (n,) int64 into ``sorted_ids`` (every id of ``items``, sorted) and ``codes``
            (n, L) int64 of those items.
        """
        held = items.select(ITEM_ID).join(self.active().select(ITEM_ID, CODES), ITEM_ID).toArrow()
        positions = np.searchsorted(sorted_ids, held.column(ITEM_ID).to_numpy(zero_copy_only=False))
        codes = np.array(held.column(CODES).to_pylist(), dtype=np.int64).reshape(len(positions), self.num_levels)
        return positions.astype(np.int64), codes

    def describe(self) -> str:
        version = f" version {self.version}" if self.version is not None else ""
        return (f"table{version}: {self.active_rows} active of {self.rows} rows, generation {self.generation}, "
                f"{self.model_name} version {self.model_version}")


# A table written before the lifecycle columns existed reads as generation 1, every row active, fingerprints and
# retirements unknown (null): (value, SQL type) of each column it lacks.
_LIFECYCLE_DEFAULTS: dict[str, tuple[Any, str]] = {
    GENERATION: (1, "int"), EMBEDDING_FINGERPRINT: (None, "bigint"), ACTIVE: (True, "boolean"),
    RETIRED_AT: (None, "timestamp"), RETIRED_REASON: (None, "string")}


def with_lifecycle_defaults(df: DataFrame) -> DataFrame:
    """A table written before the lifecycle columns existed, as the ledger it describes (:data:`_LIFECYCLE_DEFAULTS`):
    generation 1, every row active, fingerprints unknown (null)."""
    missing = {k: F.lit(value).cast(kind) for k, (value, kind) in _LIFECYCLE_DEFAULTS.items() if k not in df.columns}
    return df.withColumns(missing) if missing else df


def read_table_state(spark: SparkSession, location: io.OutputLocation, in_driver: bool = False) -> TableState | None:
    """The semantic-ID table under ``location`` and its current generation, or None when there is none.

    Reads one small aggregation (rows per generation and model). Delta tables are pinned to the
    version current now, so the whole run plans against one snapshot and the publish step can tell
    whether another run committed meanwhile.

    ``in_driver``: where the table is on this machine and holds at most ``PART_ITEMS`` rows (its metadata
    says), the aggregation is computed here from its files at that version (:func:`_summary_in_driver`) instead
    of by the engine: the same rows. The job's choice on classic Spark with a local master (where the engine's
    tables are this machine's files), where the query cost a daily run at 1M rows 6 s of a cold JVM
    (bench/RESULTS.md); the ledger frame itself is the engine's either way.

    Raises:
        ModeError: the table's current generation names more than one model (it was not written by
            this job, or was edited by hand), or a Parquet table is missing but an interrupted swap
            left its previous copy beside it (a new table would reissue its IDs).
    """
    if not io.table_exists(spark, location, SEMANTIC_IDS_TABLE):
        backup = io.interrupted_swap(location, SEMANTIC_IDS_TABLE)
        if backup is not None:
            raise ModeError(f"{location.of(SEMANTIC_IDS_TABLE)} is missing but an interrupted write left its previous "
                            f"copy at {backup}: rename it back to {SEMANTIC_IDS_TABLE} and run again (a new table "
                            "would give its IDs to other items)")
        return None
    version = io.table_version(location, SEMANTIC_IDS_TABLE, spark)
    raw = io.read_table(spark, location, SEMANTIC_IDS_TABLE, version=version)
    has_lifecycle = all(c in raw.columns for c in SEMANTIC_ID_COLUMNS)
    ledger = with_lifecycle_defaults(raw)
    summary = _summary_in_driver(location, version, raw.columns) if in_driver else None
    if summary is None:
        away = ~F.col(ACTIVE) & F.col(RETIRED_REASON).isin(*RetiredReason.REACTIVATABLE)
        summary = [r.asDict() for r in ledger.groupBy(GENERATION, MODEL_NAME, MODEL_VERSION).agg(
            F.count(F.lit(1)).alias("rows"), F.sum(F.col(ACTIVE).cast("long")).alias("active"),
            F.sum(away.cast("long")).alias("away"),
            F.max(F.size(CODES)).alias("levels"), F.max(F.array_max(CODES)).alias("max_code")).collect()]
    if not summary:
        return None
    current = max(int(r[GENERATION]) for r in summary)
    models = [r for r in summary if int(r[GENERATION]) == current]
    if len(models) != 1:
        names = ", ".join(f"{r[MODEL_NAME]} version {r[MODEL_VERSION]}" for r in models)
        raise ModeError(f"{location.of(SEMANTIC_IDS_TABLE)}: generation {current} names several models ({names}); "
                        "it was not written by this job. Write to another --output.")
    return TableState(
        ledger=ledger, version=version, model_name=str(models[0][MODEL_NAME]),
        model_version=str(models[0][MODEL_VERSION]), generation=current, num_levels=int(models[0]["levels"]),
        has_lifecycle=has_lifecycle, rows=sum(int(r["rows"]) for r in summary),
        active_rows=sum(int(r["active"] or 0) for r in summary),
        max_code=max(int(r["max_code"] or 0) for r in summary),
        earlier_retired=sum(int(r["away"] or 0) for r in summary if int(r[GENERATION]) < current))


def _summary_in_driver(location: io.OutputLocation, version: int | None,
                       columns: list[str]) -> list[dict[str, Any]] | None:
    """:func:`read_table_state`'s aggregation (per generation, model name and version: rows, active, away, levels,
    max_code) computed with pyarrow from the table's files read at ``version`` without the engine, with the
    lifecycle defaults of :func:`with_lifecycle_defaults` for a table written before those columns; None where the
    table is not on this machine, its metadata does not give its rows, or it holds more than ``PART_ITEMS`` (the
    engine computes it then). Nulls count as in the engine's query: a row without ``active`` is in ``rows`` only,
    a list without codes adds no level or code. A Parquet table has no version: its files are listed again here,
    as the engine listed them for the ledger frame (a run that publishes holds the output's writer lock)."""
    import pyarrow as pa

    if any(c not in columns for c in (MODEL_NAME, MODEL_VERSION, CODES)):
        return None  # not a semantic-ID table: the engine's query says what is missing
    rows = io.rows_independently(location, SEMANTIC_IDS_TABLE, version)
    if rows is None or rows > PART_ITEMS:
        return None
    wanted = [c for c in (GENERATION, MODEL_NAME, MODEL_VERSION, ACTIVE, RETIRED_REASON, CODES) if c in columns]
    try:
        got = io.read_independently(location, SEMANTIC_IDS_TABLE, wanted, version=version)
    except io.CatalogNotFoundError:
        return None
    if got is None:
        return None
    try:
        return _summary_of(got, wanted)
    except (pa.ArrowException, ValueError, TypeError):  # columns of unexpected types: the engine's query decides
        return None


def _summary_of(got: Any, wanted: list[str]) -> list[dict[str, Any]]:
    """:func:`_summary_in_driver`'s rows of the ``wanted`` columns read (a pyarrow table)."""
    import pyarrow as pa

    n = got.num_rows
    arrow_types = {"int": pa.int32(), "boolean": pa.bool_(), "string": pa.string()}

    def column(name: str) -> Any:  # as read, or :func:`with_lifecycle_defaults`' value on every row
        if name in wanted:
            return got.column(name)
        value, kind = _LIFECYCLE_DEFAULTS[name]
        return pa.array([value] * n, arrow_types[kind])

    keys = {GENERATION: column(GENERATION), **{k: got.column(k) for k in (MODEL_NAME, MODEL_VERSION)}}
    active, reason = column(ACTIVE), column(RETIRED_REASON)
    away = pc.and_kleene(pc.invert(active), pc.is_in(reason, value_set=pa.array(list(RetiredReason.REACTIVATABLE))))
    codes = got.column(CODES).combine_chunks()
    per_row = pa.table({**keys, "rows": pa.array(np.ones(n, np.int64)), "active": pc.cast(active, pa.int64()),
                        "away": pc.cast(away, pa.int64()), "levels": pc.list_value_length(codes)})
    grouped = per_row.group_by(list(keys)).aggregate(
        [("rows", "sum"), ("active", "sum"), ("away", "sum"), ("levels", "max")]).to_pylist()
    # A null list may still span values in the buffers: flatten what the rows hold, as the engine does (nothing).
    held = pc.if_else(pc.is_valid(codes), codes, pa.scalar([], codes.type))
    parents = pc.list_parent_indices(held)
    per_code = pa.table({**{k: v.take(parents) for k, v in keys.items()}, "code": pc.list_flatten(held)})
    max_code = {(r[GENERATION], r[MODEL_NAME], r[MODEL_VERSION]): r["code_max"]
                for r in per_code.group_by(list(keys)).aggregate([("code", "max")]).to_pylist()}
    return [{GENERATION: r[GENERATION], MODEL_NAME: r[MODEL_NAME], MODEL_VERSION: r[MODEL_VERSION],
             "rows": r["rows_sum"], "active": r["active_sum"], "away": r["away_sum"], "levels": r["levels_max"],
             "max_code": max_code.get((r[GENERATION], r[MODEL_NAME], r[MODEL_VERSION]))} for r in grouped]


def check_compatible(state: TableState | None, num_levels: int, codebook_size: int, model: str) -> None:
    """Refuse a model whose IDs cannot extend the table's: another code length L, or a codebook too
    small for the codes it holds. Checked before training and again before planning.

    Raises:
        ModeError: naming another ``--output`` (a new vocabulary is a new table).
    """
    if state is None:
        return
    if state.num_levels != num_levels:
        raise ModeError(f"the table's IDs have {state.num_levels} levels but {model} gives {num_levels}: IDs of "
                        "another length are another vocabulary. Write them to a new table (another --output), or "
                        f"keep --levels {state.num_levels}.")
    if state.max_code >= codebook_size:
        raise ModeError(f"the table holds code {state.max_code} but {model} has {codebook_size} codes per level: "
                        "another codebook size is another vocabulary. Write to a new table (another --output), or "
                        "keep the table's --codebook-size.")


@dataclass(frozen=True)
class Mode:
    """How a run writes the table: ``name`` "full" or "incremental", the ``generation`` its IDs belong
    to, whether that generation is new, and why (printed)."""

    name: str
    generation: int
    new_generation: bool
    reason: str


def choose_mode(requested: str, state: TableState | None, model_name: str, model_version: str,
                trained: bool = False) -> Mode:
    """The run's mode: ``auto`` is incremental when the table's current generation is this model's,
    full otherwise; but only a run that trained its model (against the table, so aligned to it) starts
    a new generation on its own.

    Raises:
        ModeError: ``incremental`` against a table of another model (or written before the lifecycle
            columns existed); ``auto`` with a given model (``--model``) that is not the table's: a new
            generation is started on purpose only. The messages name ``--mode full``.
    """
    if requested not in MODES:
        raise ModeError(f"unknown --mode {requested!r}; choose one of {', '.join(MODES)}")
    ours = f"{model_name} version {model_version}"
    if state is None:
        mode = INCREMENTAL if requested == INCREMENTAL else FULL
        return Mode(mode, 1, True, "no semantic-ID table yet: every item is new (generation 1)")
    same_model = (state.model_name, state.model_version) == (model_name, model_version)
    theirs = f"{state.model_name} version {state.model_version}"
    if requested == INCREMENTAL and not same_model:
        raise ModeError(
            f"--mode incremental keeps the table's IDs, which {theirs} issued, but this run encodes with {ours}. "
            f"Encode with --model models:/{state.model_name}/{state.model_version}, or start a new generation "
            "with --mode full (aligned, measured by the drift report, gated by --max-id-churn).")
    if requested == INCREMENTAL and not state.has_lifecycle:
        raise ModeError("the table predates the active/retired_at/embedding_fingerprint columns; run once with "
                        "--mode full: with the same model it keeps every ID and adds the columns")
    if same_model and state.has_lifecycle and requested != FULL:
        return Mode(INCREMENTAL, state.generation, False,
                    f"the table's generation {state.generation} is {ours}: only new and changed items are encoded")
    if requested != FULL and not trained and not same_model:
        raise ModeError(
            f"this run encodes with {ours} but the table's generation {state.generation} is {theirs}; a run that "
            f"does not train starts a new generation only when asked. Encode with the table's model (--model "
            f"models:/{state.model_name}/{state.model_version}), or pass --mode full to start generation "
            f"{state.generation + 1} with {ours}. (If a retrain published the table but did not finish, run it "
            "again.)")
    if same_model:
        why = "--mode full" if requested == FULL else "the table predates the lifecycle columns"
        return Mode(FULL, state.generation, False,
                    f"{why}: every item is encoded with {ours}, the table's model; every active ID is kept")
    return Mode(FULL, state.generation + 1, True,
                f"{ours} is not the table's model ({theirs}): new generation {state.generation + 1}, every item "
                "encoded; items whose codes stay keep their IDs")


def rows_to_encode(mode: Mode, state: TableState | None, on_changed: str) -> tuple[str, DataFrame | None]:
    """The encode policy of a run (:mod:`pipelines.encode`) and the fingerprints it compares with:
    every row in a full run; in an incremental one the rows the table does not hold, and with
    ``--on-changed retokenize`` also those whose fingerprint differs from their row's."""
    if mode.name != INCREMENTAL or state is None:
        return ENCODE_ALL, None
    return (ENCODE_NEW_OR_CHANGED if on_changed == "retokenize" else ENCODE_NEW), state.known_fingerprints()


@dataclass(frozen=True)
class ChangeCounts:
    """Items per change of one run (``valid`` = items of the catalog that passed validation)."""

    valid: int = 0
    unchanged: int = 0
    new_item: int = 0
    reactivated: int = 0
    confirmed: int = 0
    retokenized: int = 0
    moved: int = 0
    retired_left_catalog: int = 0
    retired_rejected: int = 0
    still_away: int = 0  # a new generation's items away since earlier in the generation before (not written)
    changed_kept: int = 0
    embedding_changed: int = 0  # items whose fingerprint differs from their row's (kept or not)
    compared: int = 0  # items active before the run and valid now
    ids_changed: int = 0  # of those, items whose active semantic_id changes

    @property
    def issued(self) -> int:
        return self.new_item + self.retokenized + self.moved

    @property
    def retired(self) -> int:
        return self.retired_left_catalog + self.retired_rejected + self.retokenized + self.moved

    @property
    def updated(self) -> int:
        """Items whose existing row this run updates (the changes of ``_UPDATING``, named as these fields)."""
        return sum(getattr(self, change) for change in _UPDATING)

    @property
    def churn(self) -> float:
        """Share of the previously published (active) items still in the catalog whose ID changes."""
        return self.ids_changed / self.compared if self.compared else 0.0

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def summary(self) -> str:
        parts = [f"{self.valid} valid items", f"{self.unchanged} kept their ID", f"{self.new_item} new"]
        parts += [f"{getattr(self, k)} {label}" for k, label in (
            ("reactivated", "back with their old ID"),
            ("confirmed", "kept their ID under the new model (confirmed: the same codes)"),
            ("moved", "moved to a new ID (a new generation, or back after one with other codes)"),
            ("retokenized", "re-tokenized (embedding changed)"),
            ("retired_left_catalog", "retired (left the catalog)"), ("retired_rejected", "retired (rejected)"),
            ("changed_kept", "changed embeddings kept their ID"),
            ("still_away", "still away since earlier in the last generation")) if getattr(self, k)]
        return ", ".join(parts)


@dataclass(frozen=True)
class Plan:
    """What a run writes to the semantic-ID table.

    Attributes:
        changes: full rows (every table column) of the rows this run inserts (``action`` "insert")
            or updates (``action`` "update"), each with the ``change`` of its item; materialised
            when the engine can.
        counts: items per change.
        mode: the run's mode.
        previous: the table as found (None when there was none).
    """

    changes: DataFrame
    counts: ChangeCounts
    mode: Mode
    previous: TableState | None
    num_levels: int

    @property
    def rows(self) -> int:
        """The table's rows after the run: the previous ones (updated in place) and one per ID issued."""
        return (self.previous.rows if self.previous is not None else 0) + self.counts.issued

    def table(self) -> DataFrame:
        """The whole ledger after the run: the previous rows, updated where ``changes`` says, plus the new rows."""
        columns = table_columns(self.num_levels)
        rows = self.changes.select(*columns)
        if self.previous is None:
            return rows
        # The rows it changes are broadcast when few (a daily run's): the ledger is then read, not shuffled whole
        # with every column, each time the table is (the checks, the statistics, the describing tables).
        changed = self.changes.select(SEMANTIC_ID)
        few = self.counts.issued + self.counts.updated <= BROADCAST_IDS
        kept = self.previous.ledger.join(F.broadcast(changed) if few else changed, SEMANTIC_ID, "left_anti")
        return kept.select(*columns).unionByName(rows)

    def pairs(self) -> DataFrame:
        """``item_id``, old and new ``codes`` of every item whose active ID this run replaces."""
        old = self.changes.where((F.col(ACTION) == "update") & F.col(CHANGE).isin(RETOKENIZED, MOVED)
                                 & F.col(WAS[ACTIVE]))
        new = self.changes.where(F.col(ACTION) == "insert")
        return old.select(ITEM_ID, F.col(CODES).alias("old_codes")).join(
            new.select(ITEM_ID, F.col(CODES).alias("new_codes")), ITEM_ID)


def table_columns(num_levels: int) -> list[str]:
    """The semantic-ID table's columns in order: the contract columns, then prefix_1..prefix_L."""
    return [*SEMANTIC_ID_COLUMNS, *(prefix_column(level) for level in range(1, num_levels + 1))]


def plan_changes(
    state: TableState | None,
    encoded: Encoded,
    model: TokenizerModel,
    mode: Mode,
    *,
    on_changed: str,
    run_id: str,
    now: dt.datetime,
    materialize: Callable[[DataFrame], DataFrame | None],
    progress: Callable[[str], None] | None = None,
    split: Split | None = None,
    one_map: bool = False,
    table_parts: bool = True,
    second_chance: bool = True,
) -> Plan:
    """Decide, for every item, what happens to its ID in this run, and build the rows to write.

    With ``second_chance``, the new IDs' items still sharing a tuple after the spreading get a second chance over
    every last-level code (:func:`pipelines.uniquify.second_chance`) when ``encoded.again`` and ``materialize``
    can read them again.

    Args:
        state: the table as found, or None.
        encoded: the catalog encoded for ``mode`` (:func:`pipelines.encode.encode_catalog`): in an
            incremental run only the rows that may need codes have them.
        model: the model that encoded it.
        mode: from :func:`choose_mode`.
        on_changed: "keep" or "retokenize": what an embedding change does within a generation.
        run_id: the MLflow run stamped on new rows.
        now: the run's time (UTC, aware), stamped as ``tokenized_at`` and ``retired_at``.
        materialize: computes a frame once (``EngineSession.materialize``), or returns None.
        progress: called with a line of progress when the new IDs are issued in parts (many of them).
        split: ``EngineSession.materialize_split``, to split each input of a part-wise step (the comparison
            with the table, the rows to issue and the ledger) into its parts once.
        one_map: the items to issue are spread and numbered in one grouped map
            (:func:`pipelines.uniquify.spread_and_number`) instead of a plan of joins and a window: the same
            IDs, fewer computed frames (the job's choice on classic Spark).
        table_parts: a large catalog or table (more than ``PART_ITEMS`` rows) puts the comparison with the
            table in parts, and the ledger's rows count toward the spreading's parts: for an engine that holds a
            join's rows in memory (the embedded one). Classic Spark's joins spill; there parts would only read
            the inputs again, so only many items to issue go in parts.
    """
    if on_changed not in ON_CHANGED:
        raise ValueError(f"unknown --on-changed {on_changed!r}; choose one of {', '.join(ON_CHANGED)}")
    check_compatible(state, model.num_levels, model.codebook_size, f"{model.name} version {model.version}")
    # Without a table every row is new: the frame is the encoded rows plus constants, read twice below
    # for the cost of a scan. With one, it holds the full outer join with the table: computed once, and for a
    # large catalog or table in parts of the item ids (the embedded engine holds a join's rows in memory:
    # 17 GB for 50M items in one join, bench/RESULTS.md).
    table_rows = state.rows if state is not None and table_parts else 0
    if state is None:
        staged = _all_new(encoded)
    else:
        staged = _classified_in_parts(state, encoded, mode, on_changed, materialize, split,
                                      parts_for(max(encoded.counts.clean, table_rows)) if table_parts else 1)
        if _alternatives_in(encoded.codes) and (mode.new_generation or on_changed == "retokenize"
                                                or state.earlier_retired):
            staged = _confirm_where_nothing_nearer_is_free(staged, state, model.num_levels, materialize,
                                                           parts_for(table_rows), split)
    # Without a table every valid item is new, as _all_new says: nothing to count (a query of the 1M rows on
    # classic Spark, 0.7 s).
    counts = (_count_changes(staged, encoded.counts.clean) if state is not None
              else ChangeCounts(valid=encoded.counts.clean, new_item=encoded.counts.clean))
    stamp = _Stamp(model, mode.generation, run_id, now)
    # The ledger's rows go through the spreading and the suffixes beside the items to issue: the parts follow
    # the larger of the two. Nothing to issue: the ledger is not read at all.
    ledger_state = state if counts.issued else None
    few_issued = counts.issued <= BROADCAST_IDS  # their prefixes broadcast to the ledger's joins
    issued = _issue(staged.where(F.col(CHANGE).isin(*_ISSUING)), ledger_state, model.num_levels, stamp, materialize,
                    parts=parts_for(max(counts.issued, table_rows if counts.issued else 0)), progress=progress,
                    split=split, one_map=one_map, few=few_issued)
    changes = issued
    if state is not None:
        updated = _updated_rows(staged.where(F.col(CHANGE).isin(*_UPDATING) & F.col(_OLD_SID).isNotNull()),
                                state, stamp, model.num_levels, few=counts.updated <= BROADCAST_IDS)
        changes = updated.unionByName(issued)
    staged = materialize(changes)
    changes = staged or changes
    if (second_chance and staged is not None and counts.issued and encoded.again is not None
            and _alternatives_in(encoded.codes)):
        # The new IDs' items still sharing a tuple get every last-level code ranked (pipelines.uniquify).
        ledger_rows = ledger_state.ledger.select(CODES, SUFFIX) if ledger_state is not None else None
        # On classic Spark (one_map) with the run's rows and the ledger in one part, the moves are worked out in
        # the driver from the rows' columns collected once (the engine's dozen small frames cost seconds there).
        in_driver = one_map and counts.issued + counts.updated <= PART_ITEMS and (
            ledger_state is None or ledger_state.rows <= PART_ITEMS)
        respread = spread_the_rest(changes, ledger_rows, model.num_levels, model.codebook_size, encoded.again,
                                   materialize, movable=F.col(ACTION) == "insert", progress=progress,
                                   few=few_issued, in_driver=in_driver)
        if respread is not changes:
            changes = materialize(respread) or respread
    return Plan(changes, counts, mode, state, model.num_levels)


def _all_new(encoded: Encoded) -> DataFrame:
    """Without a table: every catalog item is NEW_ITEM."""
    return _catalog_side(encoded).withColumns({
        CHANGE: F.lit(NEW_ITEM), _OLD_SID: F.lit(None).cast("string"), _OLD_ACTIVE: F.lit(None).cast("boolean"),
        _FP_CHANGED: F.lit(False)})


def _classified_in_parts(state: TableState, encoded: Encoded, mode: Mode, on_changed: str,
                         materialize: Callable[[DataFrame], DataFrame | None], split: Split | None,
                         parts: int) -> DataFrame:
    """One row per item of the catalog or the table's candidate rows whose ID this run changes (every row but
    the UNCHANGED ones), with its CHANGE; materialised. With ``parts`` > 1 computed one part of the item ids
    after another (every input split by its id's hash: an item's catalog row, table row and reject meet in
    one part), so that the engine's join holds a part's rows (:func:`pipelines.uniquify.in_parts`)."""
    new = _catalog_side(encoded)
    old, rejected = _table_side(state, encoded)

    def compared(new: DataFrame, old: DataFrame, rejected: DataFrame) -> DataFrame:
        return _compared(new, old, rejected, mode, on_changed,
                         few_rejected=encoded.counts.n_rejected <= BROADCAST_IDS)

    # An id hashes to one part on every side only when its type is the same there (a table written from
    # integer ids, a catalog of string ids: the one join compares them as Spark converts them).
    same_type = len({f.schema[ITEM_ID].dataType.simpleString() for f in (new, old, rejected)}) == 1
    if parts <= 1 or not same_type:
        one = compared(new, old, rejected)
        return materialize(one) or one
    return in_parts([new, old, rejected], lambda: hash_part(ITEM_ID, parts), parts, compared, materialize, split=split)


def _catalog_side(encoded: Encoded) -> DataFrame:
    return encoded.codes.select(ITEM_ID, CODES, QUANTIZATION_ERROR, EMBEDDING_FINGERPRINT,
                                *_alternatives_in(encoded.codes), F.lit(True).alias(_IN_CATALOG))


def _table_side(state: TableState, encoded: Encoded) -> tuple[DataFrame, DataFrame]:
    """The table's candidate rows and the rejected ids, as the comparison reads them."""
    def side(rows: DataFrame, earlier: bool) -> DataFrame:
        return rows.select(ITEM_ID, F.col(SEMANTIC_ID).alias(_OLD_SID), F.col(CODES).alias(_OLD_CODES),
                           F.col(EMBEDDING_FINGERPRINT).alias(_OLD_FP), F.col(ACTIVE).alias(_OLD_ACTIVE),
                           F.lit(earlier).alias(_EARLIER))

    old = side(state.candidates(), False)
    returnable = state.returnable()
    if returnable is not None:  # items away since an earlier generation: one row each, none in the candidates
        old = old.unionByName(side(returnable, True))
    rejected = (encoded.rejects.where(F.col(ITEM_ID).isNotNull()).select(ITEM_ID).distinct()
                .withColumn(_REJECTED, F.lit(True)))
    return old, rejected


def _compared(new: DataFrame, old: DataFrame, rejected: DataFrame, mode: Mode, on_changed: str,
              few_rejected: bool = False) -> DataFrame:
    """The catalog side joined with the table side (and the rejects): each item's CHANGE, UNCHANGED left out.
    ``few_rejected``: the rejected ids are broadcast to their join, so the joined rows are not shuffled again
    (classic Spark; the embedded engine plans its joins itself)."""
    ranked = _alternatives_in(new)
    joined = new.join(old, ITEM_ID, "full_outer").join(F.broadcast(rejected) if few_rejected else rejected, ITEM_ID,
                                                        "left")
    in_catalog = F.col(_IN_CATALOG).isNotNull()
    has_row, was_active = F.col(_OLD_SID).isNotNull(), F.coalesce(F.col(_OLD_ACTIVE), F.lit(False))
    fp_same = F.col(_OLD_FP).eqNullSafe(F.col(EMBEDDING_FINGERPRINT)) & F.col(_OLD_FP).isNotNull()
    codes_same = F.coalesce(F.col(_OLD_CODES) == F.col(CODES), F.lit(False))
    if ranked:  # an item moved off a collision earlier keeps its tuple while it stays among its alternatives
        codes_same = codes_same | F.coalesce(_still_among_alternatives(), F.lit(False))
    encoded_now = F.col(CODES).isNotNull()
    by_codes = F.when(codes_same, F.lit(CONFIRMED)).otherwise(F.lit(MOVED))
    if mode.new_generation:
        both = by_codes
    else:
        kept = F.when(was_active, F.lit(CHANGED_KEPT)).otherwise(F.lit(REACTIVATED))
        changed = F.when(encoded_now & codes_same, F.lit(CONFIRMED))
        if on_changed == "retokenize":
            changed = changed.when(encoded_now, F.lit(RETOKENIZED))
        both = (F.when(fp_same, F.when(was_active, F.lit(UNCHANGED)).otherwise(F.lit(REACTIVATED)))
                .otherwise(changed.otherwise(kept)))
        # Back after a new generation started without it: its ID is an earlier model's, so the current model's
        # codes decide, as they did for every item present when the generation started (it was not in the
        # fingerprints the pass compared with, so it was encoded).
        both = F.when(F.coalesce(F.col(_EARLIER), F.lit(False)), by_codes).otherwise(both)
    change = (F.when(in_catalog & ~has_row, F.lit(NEW_ITEM))
              .when(~in_catalog & was_active & F.col(_REJECTED).isNotNull(), F.lit(RETIRED_REJECTED))
              .when(~in_catalog & was_active, F.lit(RETIRED_LEFT))
              .when(~in_catalog & has_row & F.lit(mode.new_generation) & ~F.coalesce(F.col(_EARLIER), F.lit(False)),
                    F.lit(STILL_AWAY))
              .when(~in_catalog, F.lit(UNCHANGED))
              .otherwise(both))
    return joined.withColumns({CHANGE: change, _FP_CHANGED: in_catalog & has_row & ~fp_same}).where(
        F.col(CHANGE) != UNCHANGED)


_PREFIX, _LAST, _WANTED, _KEEP = "__prefix", "__last_code", "__wanted", "__keep"


def _confirm_where_nothing_nearer_is_free(staged: DataFrame, state: TableState, num_levels: int,
                                          materialize: Callable[[DataFrame], DataFrame | None], parts: int = 1,
                                          split: Split | None = None) -> DataFrame:
    """``staged`` with the MOVED or RETOKENIZED items whose old tuple has their new prefix and every one of
    whose ranked alternatives is a tuple the ledger holds made CONFIRMED: they keep their ID.

    Such an item can take none of its alternatives (every tuple ever issued is claimed first), so a new ID would
    put it on a suffix or, by the second chance, on a code beyond its alternatives: where its old ID already is
    when the last generation's second chance placed it there. Without this it would move in every new generation
    although its codes did not. Only the items whose old tuple has their new prefix and a last code outside their
    alternatives are looked at, against the ledger's tuples in their prefixes, in ``parts`` of the prefixes."""
    prefix = code_prefix(num_levels - 1)
    looked_at = (staged.where(F.col(CHANGE).isin(MOVED, RETOKENIZED) & F.col(CODES).isNotNull()
                              & F.col(_IN_CATALOG).isNotNull() & F.coalesce(_old_tuple_has_new_prefix(), F.lit(False)))
                 .select(ITEM_ID, prefix.alias(_PREFIX), ALTERNATIVES))
    looked_at = materialize(looked_at)
    if looked_at is None or looked_at.isEmpty():
        return staged
    alternatives = looked_at.select(ITEM_ID, _PREFIX, F.explode(ALTERNATIVES).alias(_LAST),
                                    F.size(ALTERNATIVES).alias(_WANTED))
    tuples = (state.ledger.select(prefix.alias(_PREFIX), F.element_at(CODES, -1).alias(_LAST))
              .join(F.broadcast(looked_at.select(_PREFIX).distinct()), _PREFIX, "left_semi"))

    def every_one_held(alternatives: DataFrame, tuples: DataFrame) -> DataFrame:
        held = alternatives.join(tuples, [_PREFIX, _LAST], "left_semi")
        return (held.groupBy(ITEM_ID, _WANTED).count().where(F.col("count") == F.col(_WANTED))
                .select(ITEM_ID, F.lit(True).alias(_KEEP)))

    kept = in_parts([alternatives, tuples], lambda: hash_part(_PREFIX, parts), parts, every_one_held, materialize,
                    split=split)
    kept = materialize(kept) or kept
    if kept.isEmpty():
        return staged
    # Not broadcast: in a new generation of a large catalog the items kept can be millions (the planner chooses).
    confirmed = staged.join(kept, ITEM_ID, "left").withColumn(
        CHANGE, F.when(F.col(_KEEP).isNotNull(), F.lit(CONFIRMED)).otherwise(F.col(CHANGE))).drop(_KEEP)
    return materialize(confirmed) or confirmed


def _alternatives_in(df: DataFrame) -> list[str]:
    """The ranked last-level columns ``df`` carries (a model with ``collision_alternatives``), or []."""
    return [c for c in (ALTERNATIVES, ALTERNATIVE_ERRORS) if c in df.columns]


def _old_tuple_has_new_prefix() -> Column:
    """The item's old tuple is as long as its new one and has its new prefix (levels 1..L-1)."""
    old, new = F.col(_OLD_CODES), F.col(CODES)
    levels = F.size(new)
    return (F.size(old) == levels) & (F.slice(old, 1, levels - 1) == F.slice(new, 1, levels - 1))


def _still_among_alternatives() -> Column:
    """The item's old tuple has its new prefix and a last code among its new ranked alternatives."""
    return _old_tuple_has_new_prefix() & F.array_contains(F.col(ALTERNATIVES), F.element_at(F.col(_OLD_CODES), -1))


def _count_changes(staged: DataFrame, valid: int) -> ChangeCounts:
    """ChangeCounts from the staged (non-unchanged) items and the number of valid catalog items."""
    rows = staged.groupBy(CHANGE, _OLD_ACTIVE, _IN_CATALOG, _FP_CHANGED).count().collect()
    per_change: dict[str, int] = {}
    in_catalog = changed_fp = compared = ids_changed = 0
    for r in rows:
        n = int(r["count"])
        per_change[r[CHANGE]] = per_change.get(r[CHANGE], 0) + n
        active_before, present = bool(r[_OLD_ACTIVE]), r[_IN_CATALOG] is not None
        in_catalog += n if present else 0
        changed_fp += n if r[_FP_CHANGED] else 0
        compared += n if present and active_before else 0
        ids_changed += n if active_before and r[CHANGE] in (RETOKENIZED, MOVED) else 0
    unchanged = valid - in_catalog
    return ChangeCounts(valid=valid, unchanged=unchanged, embedding_changed=changed_fp,
                        compared=compared + unchanged, ids_changed=ids_changed,
                        **{k: v for k, v in per_change.items() if k != UNCHANGED})


@dataclass(frozen=True)
class _Stamp:
    """What this run writes on the rows it issues or confirms."""

    model: TokenizerModel
    generation: int
    run_id: str
    now: dt.datetime

    def time(self) -> Column:
        return F.lit(self.now).cast("timestamp")

    def generation_columns(self) -> dict[str, Column]:
        return {MODEL_NAME: F.lit(self.model.name), MODEL_VERSION: F.lit(self.model.version),
                GENERATION: F.lit(self.generation).cast("int")}


def _issue(to_issue: DataFrame, state: TableState | None, num_levels: int, stamp: _Stamp,
           materialize: Callable[[DataFrame], DataFrame | None] | None = None, parts: int = 1,
           progress: Callable[[str], None] | None = None, split: Split | None = None,
           one_map: bool = False, few: bool = False) -> DataFrame:
    """New rows (full table columns) for the items that get a new ID (``materialize``, ``one_map``: see
    :func:`plan_changes`; ``few``: they can be broadcast, :func:`pipelines.uniquify.spread_and_number`).

    ``parts`` > 1 (many items to issue, or a large ledger beside them: :func:`plan_changes`): the spreading and
    the suffixes run one part of the prefixes after another (:func:`pipelines.uniquify.in_prefix_parts`), with
    the same result, so that the engine's memory follows a part and not the catalog."""
    ranked = _alternatives_in(to_issue)
    base = to_issue.select(ITEM_ID, CODES, QUANTIZATION_ERROR, EMBEDDING_FINGERPRINT, CHANGE, *ranked)
    issued = state.ledger.select(CODES, SUFFIX) if state is not None else None  # what the spreading reads of it

    def numbered_in(base: DataFrame, issued: DataFrame | None) -> DataFrame:
        if ranked and one_map and num_levels >= 2:  # one level: no prefix to split the items by, one Python call
            return spread_and_number(base, num_levels, issued, few=few)
        if ranked:  # the model's collision-aware last level, away from every tuple ever issued
            base = spread_collisions(base, num_levels, issued, materialize)
            if materialize is not None:  # the suffixes read it three times (their shared tuples, the rest, the join)
                base = materialize(base) or base
        return (assign_suffixes(base, num_levels, materialize) if issued is None
                else assign_next_suffixes(base, issued, num_levels))

    def report(done: int, parts: int) -> None:
        if progress is not None:
            progress(f"new IDs issued for part {done} of {parts} of the prefixes")

    numbered = in_prefix_parts([base, issued], num_levels, parts, numbered_in, materialize, report, split)
    return numbered.withColumns({
        **stamp.generation_columns(), MLFLOW_RUN_ID: F.lit(stamp.run_id), TOKENIZED_AT: stamp.time(),
        ACTIVE: F.lit(True), RETIRED_AT: F.lit(None).cast("timestamp"), RETIRED_REASON: F.lit(None).cast("string"),
        ACTION: F.lit("insert"),
        **{was: F.lit(None).cast(kind) for was, kind in zip(WAS.values(), ("boolean", "int", "string"))},
    }).select(*table_columns(num_levels), CHANGE, ACTION, *WAS.values())


_RETIRE_AS = {RETIRED_LEFT: RetiredReason.LEFT_CATALOG, RETIRED_REJECTED: RetiredReason.REJECTED,
              RETOKENIZED: RetiredReason.EMBEDDING_CHANGED, MOVED: RetiredReason.NEW_GENERATION}


def _updated_rows(updates: DataFrame, state: TableState, stamp: _Stamp, num_levels: int,
                  few: bool = False) -> DataFrame:
    """The existing rows this run updates, in full, with their mutable columns set by their CHANGE.

    ``few``: the updates can be broadcast, so the ledger is filtered as it is read. Otherwise classic Spark
    shuffles every ledger row to the join, as many as the table holds even when a daily run updates none."""
    spec = updates.select(F.col(_OLD_SID).alias(SEMANTIC_ID), CHANGE,
                          F.col(EMBEDDING_FINGERPRINT).alias("__new_fp"))
    rows = state.ledger.join(F.broadcast(spec) if few else spec, SEMANTIC_ID).withColumns(
        {was: F.col(c) for c, was in WAS.items()})
    change = F.col(CHANGE)
    retiring = change.isin(*_RETIRE_AS)
    reason = F.lit(None).cast("string")
    for kind, why in _RETIRE_AS.items():
        reason = F.when(change == kind, F.lit(why)).otherwise(reason)
    confirmed = change == CONFIRMED
    values = {
        ACTIVE: ~retiring,
        RETIRED_AT: F.when(retiring, stamp.time()).otherwise(F.lit(None).cast("timestamp")),
        RETIRED_REASON: reason,
        EMBEDDING_FINGERPRINT: F.when(confirmed, F.col("__new_fp")).otherwise(F.col(EMBEDDING_FINGERPRINT)),
        **{k: F.when(confirmed, v).otherwise(F.col(k)) for k, v in stamp.generation_columns().items()
           if k != GENERATION},
        # A row a move retires belongs to the generation before the move (id_changes names the move's from it),
        # also when it was retired earlier, its item away since a generation before that.
        GENERATION: F.when(confirmed, F.lit(stamp.generation)).when(change == MOVED, F.lit(stamp.generation - 1))
        .otherwise(F.col(GENERATION)).cast("int"),
        ACTION: F.lit("update"),
    }
    return rows.withColumns(values).select(*table_columns(num_levels), CHANGE, ACTION, *WAS.values())


def publish(plan: Plan, location: io.OutputLocation, run_id: str | None = None) -> str | None:
    """Write the plan to the semantic-ID table in one commit; returns the table written, or None when
    an incremental run had nothing to change.

    An incremental run on Delta is one ``MERGE``: the rows it does not touch stay byte-identical, and it
    fails as a whole if another run issued one of its new IDs or changed one of the rows it updates.
    Anything else writes the whole ledger (:meth:`Plan.table`) as one overwrite commit (an atomic swap
    for Parquet); a first run (no table when it started) writes only if there still is none.

    ``run_id``: written into a local Parquet table's folder (pipelines/publish.py tells runs apart by it).

    Raises:
        ConcurrentRunError: another run wrote the table since this one read it (nothing was written).
    """
    previous = plan.previous
    incremental = plan.mode.name == INCREMENTAL and previous is not None and previous.has_lifecycle
    if incremental and plan.counts.issued == 0 and not _has_updates(plan.counts):
        return None
    check_unchanged_since(previous, location)
    try:
        if incremental and location.fmt == "delta":
            io.merge_into(plan.changes, location, SEMANTIC_IDS_TABLE, key=SEMANTIC_ID, update_columns=MUTABLE_COLUMNS,
                          insert_columns=table_columns(plan.num_levels), action=ACTION,
                          expected={ITEM_ID: ITEM_ID, **WAS})
            return location.of(SEMANTIC_IDS_TABLE)
        return io.write_table(plan.table(), location, SEMANTIC_IDS_TABLE, must_not_exist=previous is None,
                              run_id=run_id if location.fmt == "parquet" else None)
    except FileExistsError as e:
        raise ConcurrentRunError(_conflict_message(location, "the table did not exist when this run started")) from e
    except Exception as e:
        if _is_commit_conflict(e):
            raise ConcurrentRunError(_conflict_message(location, io.first_line(e, 300))) from e
        raise


def _has_updates(counts: ChangeCounts) -> bool:
    return bool(counts.reactivated or counts.confirmed or counts.retired_left_catalog or counts.retired_rejected)


class NotWhereStatedError(RuntimeError):
    """The table read back at the stated location (not through the engine) does not hold the run's rows."""


class ConcurrentRunError(RuntimeError):
    """Another run committed to the semantic-ID table while this one was planning; nothing was written."""


def check_unchanged_since(state: TableState | None, location: io.OutputLocation) -> None:
    """Raise ConcurrentRunError when the Delta table moved past the version ``state`` was read at."""
    if state is None or state.version is None:
        return
    now = io.table_version(location, SEMANTIC_IDS_TABLE, state.ledger.sparkSession)
    if now != state.version:
        raise ConcurrentRunError(_conflict_message(
            location, f"it was at version {state.version} when this run read it and is at {now} now"))


def _conflict_message(location: io.OutputLocation, detail: str) -> str:
    return (f"another run wrote {location.of(SEMANTIC_IDS_TABLE)} while this one was running ({detail.strip()}); "
            "nothing was written by this run. Run it again: it will plan against the new version.")


def _is_commit_conflict(error: Exception) -> bool:
    text = str(error)
    return any(word in text for word in ("Failed to commit transaction", "ConcurrentAppend", "ConcurrentModification",
                                         "ConcurrentDelete", "ConcurrentTransaction", "the table changed during",
                                         "already exists"))


def collected_for_checks(table: DataFrame) -> Any:
    """The columns of a planned table that the ledger check and the prefix statistics read (ID, item, active,
    codes, suffix), collected as one pyarrow table: for :func:`check_ledger`'s and
    ``pipelines.prefix_stats.report_tables``' ``collected``, on a table small enough for this process."""
    return table.select(SEMANTIC_ID, ITEM_ID, ACTIVE, CODES, SUFFIX).toArrow()


def check_ledger(table: DataFrame, expected_active: int, parts: int = 1, split: Split | None = None,
                 collected: Any = None) -> int:
    """The ledger's invariants: every ``semantic_id`` once over all rows, and the active rows exactly
    ``expected_active`` distinct items (the run's valid catalog items). Run on the planned table before it
    is committed, and on the committed version after.

    One aggregation, or ``parts`` (a large table: :func:`pipelines.uniquify.parts_for`): part p counts the
    IDs and the items whose hash is p modulo ``parts``, so that the engine holds a part's distinct values
    at a time, not the table's.

    The distinct values counted first are the 64-bit hashes (``xxhash64``) of the IDs and items, not the
    strings: the engine's distinct sets then hold 8 bytes a value (at 5M rows on the embedded engine the
    check's memory falls from about 1.0 GB to 0.4-0.5 GB, bench/RESULTS.md). Hashes can only merge values,
    so they never count more distinct values than the strings do. When every count holds with the hashes
    it holds with the strings; when one does not (a failure, or two values sharing a hash), the check runs
    again on the strings, and that verdict stands.

    ``split`` (``EngineSession.materialize_split``, which splits from 3 parts on) with ``parts`` > 1: the hashes
    are written split into the parts in two passes over the table (by the ID's hash, and the active rows by the
    item's), and each part is counted from its own rows, instead of every part reading the whole table (at 50M
    rows on the embedded engine: 11 reads of 5 s each). A null ID or item counts as no value, as in the
    strings' count.

    ``collected`` (a pyarrow table: the caller collected the table's ID, item and active columns, a table small
    enough to hold in this process, at most ``pipelines.uniquify.PART_ITEMS`` rows): counted in this process
    (:func:`arrow_ledger_counts`, on the strings themselves) instead of by the engine's distinct counts
    (classic Spark, 1M rows: 0.4-1.2 s instead of 1.5-3 s alone, 5.5 s beside the statistics; bench/RESULTS.md).

    Returns the number of active rows.

    Raises:
        RowAccountingError: an invariant does not hold; the message gives the counts.
    """
    if collected is not None:
        counts = arrow_ledger_counts(collected)
    else:
        counts = (_split_hash_counts(table, parts, split) if split is not None and parts > 1 else None) or \
            _ledger_counts(table, parts, hashed=True)
        if not _ledger_holds(counts, expected_active):
            counts = _ledger_counts(table, parts, hashed=False)
    return _checked(counts, expected_active)


def _checked(counts: tuple[int, int, int, int], expected_active: int) -> int:
    """The number of active rows, once ``counts`` (rows, distinct IDs, active rows, distinct active items) hold
    the ledger's invariants; :class:`RowAccountingError` with the counts otherwise."""
    if not _ledger_holds(counts, expected_active):
        rows, ids, n_active, items = counts
        raise RowAccountingError(
            f"row accounting failed: {rows} rows hold {ids} distinct semantic IDs, and {n_active} active rows name "
            f"{items} items where the catalog has {expected_active} valid items")
    return counts[2]


def arrow_ledger_counts(table: Any) -> tuple[int, int, int, int]:
    """(rows, distinct IDs, active rows, distinct active items) of a pyarrow table with the ledger's
    ``semantic_id``, ``item_id`` and ``active`` columns, counted as the engine's strings count does: a null ID
    or item is no value, a null ``active`` is not active."""
    active = pc.fill_null(table.column(ACTIVE), False)
    items = pc.filter(table.column(ITEM_ID), active)
    return (table.num_rows, pc.count_distinct(table.column(SEMANTIC_ID), mode="only_valid").as_py(),
            pc.sum(active.cast("int64")).as_py() or 0, pc.count_distinct(items, mode="only_valid").as_py())


def _ledger_holds(counts: tuple[int, int, int, int], expected_active: int) -> bool:
    rows, ids, n_active, items = counts
    return ids == rows and n_active == items == expected_active


_SID_HASH, _ITEM_HASH = "__csid_sid_hash", "__csid_item_hash"


def _hash_of(name: str) -> Column:
    """The 64-bit hash of a column's value, null for null (``xxhash64`` of a null is its seed, 42, which a
    distinct count would count as a value where the strings' count does not)."""
    return F.when(F.col(name).isNotNull(), F.xxhash64(name))


def _part_of(name: str, parts: int) -> Column:
    """The part of a row by a hash column; a null hash in part 0 (a null partition value would leave the
    row out of every part's files)."""
    return F.coalesce(F.pmod(F.col(name), F.lit(parts)), F.lit(0))


def _split_hash_counts(table: DataFrame, parts: int, split: Split) -> tuple[int, int, int, int] | None:
    """:func:`_ledger_counts` with ``hashed``, each part counted from its share of the hashes (split once per
    kind); None when ``split`` cannot split (the caller counts without it)."""
    by_id = split(table.select(_hash_of(SEMANTIC_ID).alias(_SID_HASH)), _part_of(_SID_HASH, parts), parts)
    if by_id is None:
        return None
    by_item = split(table.where(F.col(ACTIVE)).select(_hash_of(ITEM_ID).alias(_ITEM_HASH)), _part_of(_ITEM_HASH, parts),
                    parts)
    if by_item is None:
        return None
    rows = ids = n_active = items = 0
    for ids_here, items_here in zip(by_id, by_item, strict=True):
        r = ids_here.agg(F.count(F.lit(1)).alias("rows"), F.countDistinct(_SID_HASH).alias("ids")).first()
        a = items_here.agg(F.count(F.lit(1)).alias("active"), F.countDistinct(_ITEM_HASH).alias("items")).first()
        assert r is not None and a is not None
        rows, ids, n_active, items = rows + int(r["rows"]), ids + int(r["ids"]), n_active + int(a["active"]), \
            items + int(a["items"])
    return rows, ids, n_active, items


def _ledger_counts(table: DataFrame, parts: int, hashed: bool) -> tuple[int, int, int, int]:
    """(rows, distinct IDs, active rows, distinct active items) of ``table``, counted in ``parts``; with
    ``hashed`` the distinct counts are of the values' 64-bit hashes (at most the true counts)."""
    active = F.col(ACTIVE)

    def value(name: str) -> Column:
        return _hash_of(name) if hashed else F.col(name)

    rows = ids = n_active = items = 0
    for part in range(parts):
        sid_here, item_here = ((F.lit(True), F.lit(True)) if parts == 1 else
                               (hash_part(SEMANTIC_ID, parts) == part, hash_part(ITEM_ID, parts) == part))
        r = table.agg(F.count(F.when(sid_here, F.lit(1))).alias("rows"),
                      F.countDistinct(F.when(sid_here, value(SEMANTIC_ID))).alias("ids"),
                      F.sum(F.when(item_here, active.cast("long"))).alias("active"),
                      F.countDistinct(F.when(active & item_here, value(ITEM_ID))).alias("items")).first()
        assert r is not None
        rows, ids = rows + int(r["rows"]), ids + int(r["ids"])
        n_active, items = n_active + int(r["active"] or 0), items + int(r["items"])
    return rows, ids, n_active, items


def verify_published(spark: SparkSession, location: io.OutputLocation, expected_active: int, parts: int = 1,
                     split: Split | None = None) -> int:
    """:func:`check_ledger` (in ``parts``) on the table as committed (the version current now); a failure means
    another run's commit interleaved with this one's (ConcurrentRunError, with the version to go back to).

    Where the table is on this machine, its active flags are read back without the engine (delta-rs / pyarrow):
    what any other reader finds at the stated place. A table of at most ``PART_ITEMS`` rows is counted from that
    read alone, its IDs and items too (:func:`arrow_ledger_counts`; the engine's check of 1M rows on classic
    Spark took 3.3 s, bench/RESULTS.md); a larger one, or one elsewhere, by the engine in ``parts``."""
    version = io.table_version(location, SEMANTIC_IDS_TABLE, spark)
    rows = io.rows_independently(location, SEMANTIC_IDS_TABLE, version)
    whole = rows is not None and rows <= PART_ITEMS
    independent = io.read_independently(location, SEMANTIC_IDS_TABLE,
                                        [ACTIVE, SEMANTIC_ID, ITEM_ID] if whole else [ACTIVE], version=version)
    if independent is not None:  # what any other reader finds at the stated place (delta-rs / pyarrow)
        found = pc.sum(independent.column(ACTIVE)).as_py() or 0  # no Python object per row (50M rows: 0.4 GB)
        if found != expected_active:
            raise NotWhereStatedError(
                f"after the write, {location.shown_of(SEMANTIC_IDS_TABLE)} read directly holds {found} active IDs, not "
                f"the {expected_active} this run wrote: the engine wrote somewhere else (a path it rewrote?). Check "
                "for a percent-encoded sibling folder, and pass an output path without unusual characters")
    try:
        if whole and independent is not None:
            return _checked(arrow_ledger_counts(independent), expected_active)
        return check_ledger(io.read_table(spark, location, SEMANTIC_IDS_TABLE, version=version), expected_active,
                            parts, split)
    except RowAccountingError as e:
        before = f"version {version - 1}" if version else "the version before it"
        raise ConcurrentRunError(
            f"{location.of(SEMANTIC_IDS_TABLE)} as committed breaks the ledger's invariants ({e}): another run's "
            f"commit interleaved with this one's. Restore {before} (Delta time travel) and run again.") from e


def id_changes(ledger: DataFrame) -> DataFrame:
    """One row per ID that was replaced by another for the same item (a re-tokenized item, or an item a
    new generation moved): ``item_id``, ``old_semantic_id``, ``new_semantic_id``, the ``generation``
    the change belongs to, ``retired_reason`` (why) and ``changed_at``. Derived from the ledger: the old
    row was retired at the instant the new one was issued. The generation comes from the old row, which
    never changes once replaced (the new row's may move on when a later generation confirms it): the old
    row's own for a re-tokenized item, the next one for a new generation's move."""
    replaced = F.col(RETIRED_REASON).isin(RetiredReason.EMBEDDING_CHANGED, RetiredReason.NEW_GENERATION)
    next_one = (F.col(RETIRED_REASON) == RetiredReason.NEW_GENERATION).cast("int")
    old = ledger.where(replaced).select(ITEM_ID, F.col(SEMANTIC_ID).alias(OLD_SEMANTIC_ID),
                                        F.col(RETIRED_AT).alias(CHANGED_AT), RETIRED_REASON,
                                        (F.col(GENERATION) + next_one).alias(GENERATION))
    # Only a row issued at an instant some row was retired can be a new ID: those instants (one per run at most)
    # pick its candidates before the join, so a ledger with few changes is not shuffled whole (classic Spark, an
    # incremental run at 1M items: this table's write 1.2 -> 0.5 s warm, more in the run; bench/RESULTS.md).
    instants = old.select(CHANGED_AT).distinct()
    new = (ledger.select(ITEM_ID, F.col(SEMANTIC_ID).alias(NEW_SEMANTIC_ID), F.col(TOKENIZED_AT).alias(CHANGED_AT))
           .join(F.broadcast(instants), CHANGED_AT, "left_semi"))
    return (old.join(new, [ITEM_ID, CHANGED_AT]).where(F.col(OLD_SEMANTIC_ID) != F.col(NEW_SEMANTIC_ID))
            .select(ITEM_ID, OLD_SEMANTIC_ID, NEW_SEMANTIC_ID, GENERATION, RETIRED_REASON, CHANGED_AT))
