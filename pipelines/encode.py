"""Encode stage: a ``mapInArrow`` UDF that turns embeddings into codes, one model per worker process.

The checkpoint travels inside the UDF closure as bytes; each Python worker builds the model once
(cached by the checkpoint's digest) and reuses it for every Arrow batch it is given. Embeddings go
Arrow -> NumPy through :func:`pipelines.arrow_utils.embeddings_to_numpy`, with no per-row objects.

The UDF checks every row with validation's per-row rules (:func:`pipelines.row_checks.check_batch`)
before encoding it: rows with a reason pass through uncoded, so one scan of the embeddings yields the
codes, the rejects and every count (:func:`encode_catalog` adds duplicate ids on the small output and
materialises it once). It can also fingerprint every clean row and, given the fingerprints of the
items a table already holds, encode only the rows that need new codes (an incremental run).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from pipelines import fingerprint_cache
from pipelines.arrow_utils import matrix_to_list_array
from pipelines.io import EmbeddingFiles, RowGroupStamp
from pipelines.row_checks import check_batch, entry_rows, open_file, read_row_group
from pipelines.schema import (
    ALTERNATIVE_ERRORS,
    ALTERNATIVES,
    CODES,
    EMBEDDING,
    EMBEDDING_FINGERPRINT,
    ITEM_ID,
    QUANTIZATION_ERROR,
    REASON,
)
from pipelines.session import local_classic_context
from pipelines.uniquify import hash_part, parts_for, require_columns
from pipelines.validate import (
    RowAccountingError,
    ValidationCounts,
    ValidationResult,
    count_reasons,
    duplicated_ids,
    flag_duplicates,
    validation_counts,
)

_MODELS: dict[str, Any] = {}  # per worker process: checkpoint digest -> model (built once)
TASK_THREADS = 1  # torch threads per encode task: the engines run one task per core

ENCODE_ALL, ENCODE_NEW, ENCODE_NEW_OR_CHANGED = "all", "new", "new_or_changed"
ENCODE_POLICIES = (ENCODE_ALL, ENCODE_NEW, ENCODE_NEW_OR_CHANGED)


def model_for(checkpoint: bytes, digest: str, device: str = "cpu", threads: int | None = None) -> Any:
    """The model for ``checkpoint``, built on first use in this process and cached afterwards."""
    model = _MODELS.get(digest)
    if model is None:
        import torch

        from rqvae.checkpoint import load_checkpoint

        if threads:
            torch.set_num_threads(threads)
        model = load_checkpoint(checkpoint, map_location=device).to(device).eval()
        _MODELS.clear()  # one model per worker: a new checkpoint replaces the old one
        _MODELS[digest] = model
    return model


def make_encoder(checkpoint: bytes, dim: int, *, batch_size: int | None = None, device: str = "cpu",
                 threads: int | None = TASK_THREADS, fingerprints: bool = False, encode: bool = True,
                 alternatives: int = 0) -> Callable[[Iterator[pa.RecordBatch]], Iterator[pa.RecordBatch]]:
    """The function given to ``mapInArrow``: batches of (item_id, embedding) -> (item_id, codes, error,
    reason[, alternatives, alternative errors][, embedding_fingerprint]).

    Each row is checked first (:func:`pipelines.row_checks.check_batch`: validation's per-row rules); a row
    with a reason is not encoded: its codes and error are null. Clean rows get a null reason. With
    ``fingerprints`` every clean row also gets its :func:`~pipelines.arrow_utils.row_fingerprints` value.
    ``encode`` False checks and fingerprints the rows without running (or even loading) the model: codes
    and error stay null (an incremental run's first pass). ``alternatives`` > 0 adds each coded row's that-many
    nearest last-level codes and their errors (``rqvae.encode_array(..., alternatives=k)``).
    """
    if not encode:
        checkpoint = b""  # not shipped with every task of a pass that never builds the model
    digest = hashlib.sha256(checkpoint).hexdigest()
    names = _output_names(fingerprints, alternatives)

    def encode_batches(batches: Iterator[pa.RecordBatch],
                       keep: list[pa.RecordBatch] | None = None) -> Iterator[pa.RecordBatch]:
        """``keep``: a list given each batch's :func:`pipelines.row_checks.entry_rows` (a fingerprint-cache
        entry's rows, made by the keyed per-row pass, not from this function's output)."""
        model: Any = None
        encode_array: Callable[..., Any] | None = None
        if encode:  # torch: imported (and the model built) by the workers that encode only
            from rqvae.encode import encode_array as encode_rows

            model, encode_array = model_for(checkpoint, digest, device, threads), encode_rows
        for batch in batches:
            checked = check_batch(batch, dim, fingerprints)
            if keep is not None:
                keep.append(entry_rows(checked))
            rejected = checked.rejected
            if rejected is not None:  # rejects in this batch: they pass through uncoded
                yield _uncoded(rejected, rejected.column(REASON),
                               rejected.column(EMBEDDING_FINGERPRINT) if fingerprints else None, alternatives)
            batch, x, fps = checked.clean, checked.x, checked.fingerprints
            if x is None:
                continue
            if model is None or encode_array is None:
                yield _uncoded(batch, pa.nulls(batch.num_rows, pa.string()), fps, alternatives)
                continue
            if alternatives:
                result = encode_array(model, x, batch_size=batch_size, alternatives=alternatives)
                ranked = [matrix_to_list_array(result.alternatives), matrix_to_list_array(result.alternative_errors)]
            else:
                result, ranked = encode_array(model, x, batch_size=batch_size), []
            yield pa.RecordBatch.from_arrays(
                [batch.column(ITEM_ID), matrix_to_list_array(result.codes), pa.array(result.quantization_error),
                 pa.nulls(batch.num_rows, pa.string()), *ranked, *([fps] if fps is not None else [])], names=names)

    return encode_batches


def _output_names(fingerprints: bool, alternatives: int) -> list[str]:
    return [*_OUTPUT, *([ALTERNATIVES, ALTERNATIVE_ERRORS] if alternatives else []),
            *([EMBEDDING_FINGERPRINT] if fingerprints else [])]


def _uncoded(batch: pa.RecordBatch, reasons: pa.Array, fps: pa.Array | None, alternatives: int = 0) -> pa.RecordBatch:
    """Output rows without codes: the batch's ids, null codes, error (and alternatives), ``reasons`` (and
    ``fps``)."""
    n = batch.num_rows
    columns = [batch.column(ITEM_ID), pa.nulls(n, pa.list_(pa.int32())), pa.nulls(n, pa.float32()), reasons]
    if alternatives:
        columns += [pa.nulls(n, pa.list_(pa.int32())), pa.nulls(n, pa.list_(pa.float32()))]
    if fps is not None:
        columns.append(fps)
    return pa.RecordBatch.from_arrays(columns, names=_output_names(fps is not None, alternatives))


_OUTPUT = [ITEM_ID, CODES, QUANTIZATION_ERROR, REASON]


def encode_embeddings(df: DataFrame, checkpoint: bytes, dim: int, *, batch_size: int | None = None,
                      device: str = "cpu", threads: int | None = TASK_THREADS, fingerprints: bool = False,
                      encode: bool = True, alternatives: int = 0) -> DataFrame:
    """Codes for every row of a catalog, and the reject reason of every row that cannot be encoded.

    Args:
        df: columns ITEM_ID (STRING or BIGINT) and EMBEDDING (ARRAY<FLOAT>), e.g. the catalog's rows
            with contract names (:func:`pipelines.validate.select_contract_columns`, or
            ``validate_catalog(...).rows``). Rows are checked inside the UDF with the per-row rules of
            validation (everything but duplicate ids: :func:`pipelines.validate.flag_duplicates` adds
            those on the output), so one scan of the embeddings yields codes and rejects.
        checkpoint: model checkpoint bytes (:func:`rqvae.checkpoint_bytes`).
        dim: embedding length D.
        batch_size: rows per model call inside each Arrow batch (None: rqvae's default for the device).
        device: torch device on the workers ("cpu", or "cuda" on GPU executors).
        threads: torch threads per worker process (None = torch's default, one per core). The default,
            1, suits engines that run one task per core (Sail, ``local[*]``, executors with
            ``spark.task.cpus=1``): more threads per task only oversubscribe the cores (1M x 768 on Sail,
            2 cores: 16.2 s with torch's 2 threads per task, 14.7 s with 1).
        fingerprints: add EMBEDDING_FINGERPRINT BIGINT (xxh3-64 of the row's float32 values) to every
            clean row.
        encode: False checks (and fingerprints) the rows without the model: codes and error stay null.
        alternatives: the model's ``collision_alternatives``; > 0 adds ALTERNATIVES ARRAY<INT> and
            ALTERNATIVE_ERRORS ARRAY<FLOAT> (the ranked last-level codes) to every coded row.

    Returns:
        DataFrame with ITEM_ID, CODES ARRAY<INT>, QUANTIZATION_ERROR FLOAT and REASON STRING (null for
        a clean row; codes and error are null for a rejected one), then the alternatives and
        EMBEDDING_FINGERPRINT BIGINT when asked for.
    """
    require_columns(df, [ITEM_ID, EMBEDDING], "encode_embeddings")
    schema = _output_schema(df.schema[ITEM_ID].dataType.simpleString(), fingerprints, alternatives)
    encoder = make_encoder(checkpoint, dim, batch_size=batch_size, device=device, threads=threads,
                           fingerprints=fingerprints, encode=encode, alternatives=alternatives)
    return df.select(ITEM_ID, EMBEDDING).mapInArrow(encoder, schema)


def _output_schema(id_type: str, fingerprints: bool, alternatives: int) -> str:
    """The DDL schema of the encode UDF's output (:func:`make_encoder`)."""
    schema = f"{ITEM_ID} {id_type}, {CODES} array<int>, {QUANTIZATION_ERROR} float, {REASON} string"
    if alternatives:
        schema += f", {ALTERNATIVES} array<int>, {ALTERNATIVE_ERRORS} array<float>"
    if fingerprints:
        schema += f", {EMBEDDING_FINGERPRINT} bigint"
    return schema


def encode_files(spark: SparkSession, files: EmbeddingFiles, checkpoint: bytes, dim: int, *, id_type: str,
                 tasks: int, batch_size: int | None = None, device: str = "cpu", threads: int | None = TASK_THREADS,
                 fingerprints: bool = False, encode: bool = True, alternatives: int = 0,
                 only_ids: pa.Array | None = None, cache: str | None = None) -> DataFrame:
    """:func:`encode_embeddings` of a file table whose rows the UDF reads itself, with pyarrow.

    The engine is handed only the list of row groups (one small row each), spread over ``tasks``
    tasks; each task reads its row groups' id and embedding columns and encodes them. The engine
    neither decodes the embeddings nor hands them to Python: on 2 cores, 1M x 768, that hand-over
    cost classic Spark 15 s and the embedded engine about 6 s of a 20 s pass (docs/scaling.md).
    The output is the same rows as :func:`encode_embeddings` of the same table: every row of every
    row group, checked by the same per-row rules.

    Args:
        spark: the session (only the row-group list is sent through it).
        files: :func:`pipelines.io.embedding_files` of the catalog.
        id_type: the contract type of ITEM_ID, "string" or "bigint" (the engine's read casts integer
            ids to BIGINT, :func:`pipelines.validate.select_contract_columns`).
        tasks: how many tasks read and encode (the engine's parallelism); at most one per row group.
        only_ids: read only the rows of these ids (an incremental run's second pass: the rows of the
            ``v.rows.join(ids, "left_semi")`` the engine would read). Each task reads a row group's id
            column first and its embeddings only where it holds one of them, so a run whose new items
            sit in new files reads little more than the id column. The ids travel with every task.
        cache: a folder of row groups' checked and fingerprinted rows (:mod:`pipelines.fingerprint_cache`),
            used with ``fingerprints`` over whole row groups (not with ``only_ids``) when ``files`` has
            their stamps: every row group read is kept there, and a pass that does not ``encode``
            reads a kept row group's rows instead of its embeddings.
        the rest: as for :func:`encode_embeddings`.
    """
    if id_type not in ("string", "bigint"):
        raise ValueError(f"id_type must be 'string' or 'bigint', got {id_type!r}")
    if not files.row_groups:
        raise ValueError(f"{files.source} has no rows to read")
    encoder = make_encoder(checkpoint, dim, batch_size=batch_size, device=device, threads=threads,
                           fingerprints=fingerprints, encode=encode, alternatives=alternatives)
    arrow_id = pa.string() if id_type == "string" else pa.int64()
    id_column, embedding_column = files.id_column, files.embedding_column

    wanted = None if only_ids is None else only_ids.cast(arrow_id)
    keys = cache_keys(files, dim, id_type) if cache and fingerprints and only_ids is None else None
    folder = os.path.abspath(cache) if cache else ""  # the workers' working directory need not be the driver's

    def read_and_encode(units: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        if keys is None:
            yield from encoder(_row_group_batches(units, id_column, embedding_column, arrow_id, wanted))
            return
        for unit in units:
            listed = (unit.column(c).to_pylist() for c in (_FILE, _ROW_GROUP, _KEY, _STAMP))
            for file, group, key, stamp in zip(*listed, strict=True):
                stamp = RowGroupStamp(**stamp)
                kept = None
                if not encode and fingerprint_cache.unchanged(file, stamp):
                    kept = fingerprint_cache.read(folder, key, stamp.rows, arrow_id)
                if kept is not None:  # this row group's rows as an earlier pass computed them: no embedding read
                    yield _uncoded(kept, kept.column(REASON), kept.column(EMBEDDING_FINGERPRINT), alternatives)
                    continue
                before = fingerprint_cache.unchanged(file, stamp)
                computed: list[pa.RecordBatch] = []  # the entry's rows, as the keyed per-row pass made them
                yield from encoder(_batches_of(open_file(file), group, id_column, embedding_column, arrow_id), computed)
                if before and fingerprint_cache.unchanged(file, stamp):  # kept only as the file was listed
                    fingerprint_cache.write(folder, key, computed, arrow_id)

    if keys is None:
        rows, schema = [list(unit) for unit in files.row_groups], f"{_FILE} string, {_ROW_GROUP} int"
    else:
        listed = zip(files.row_groups, keys, files.stamps, strict=True)
        rows = [[*unit, key, dataclasses.asdict(stamp)] for unit, key, stamp in listed]
        schema = (f"{_FILE} string, {_ROW_GROUP} int, {_KEY} string, {_STAMP} struct<table: string, path: string, "
                  "size: bigint, mtime_ns: bigint, index: int, rows: bigint, footer: string>")
    sizes = [stamp.rows for stamp in files.stamps] if len(files.stamps) == len(rows) else [1] * len(rows)
    return _units_in_tasks(spark, rows, schema, sizes, tasks).mapInArrow(
        read_and_encode, _output_schema(id_type, fingerprints, alternatives))


def _units_in_tasks(spark: SparkSession, units: list[list[Any]], schema: str, sizes: list[int],
                    tasks: int) -> DataFrame:
    """The row-group list as a frame of ``tasks`` partitions (at most one per row group), one task each.

    On classic Spark with a local master each task gets the row groups :func:`balanced_tasks` gives it
    (about equal rows), one partition per task with no shuffle: ``repartition(n)`` there deals the rows
    round robin from a random start in each input partition, which gave one task 16 row groups of 30 and
    the other 14, so one core encoded alone for the last 4-5 s of the pass (1M x 768; bench/RESULTS.md).
    The embedded engine's round robin from its one input partition deals them evenly by count (Spark
    Connect has no RDDs to place rows by); elsewhere (a cluster, Databricks) the engine's round robin
    stands."""
    n = max(1, min(tasks, len(units)))
    context = local_classic_context(spark)
    if context is None:
        return spark.createDataFrame(units, schema).repartition(n)
    per_task = [[units[i] for i in task] for task in balanced_tasks(sizes, n)]
    # n lists in n slices: one list each (pyspark batches a list this short one element per slice).
    return spark.createDataFrame(context.parallelize(per_task, n).flatMap(lambda task_units: task_units), schema)


def balanced_tasks(sizes: list[int], tasks: int) -> list[list[int]]:
    """The indices of ``sizes`` dealt to ``tasks`` tasks, largest first, each to the task with the fewest rows so
    far (then the fewest items, then the lowest number): about equal rows per task, each task's in order."""
    held = [[0, 0, t] for t in range(tasks)]
    out: list[list[int]] = [[] for _ in range(tasks)]
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        least = min(held)
        out[least[2]].append(i)
        least[0] += sizes[i]
        least[1] += 1
    return [sorted(task) for task in out]



def cache_keys(files: EmbeddingFiles, dim: int, id_type: str) -> tuple[str, ...] | None:
    """The fingerprint cache's key of each of ``files``' row groups (None when their stamps are unknown)."""
    if len(files.stamps) != len(files.row_groups):
        return None
    return fingerprint_cache.keys(files.stamps, files.id_column, files.embedding_column, id_type, dim)


FILE_BATCH_ROWS = 8192  # rows per Arrow batch read from a row group (the embedded engine's own batch size)
_FILE, _ROW_GROUP, _KEY, _STAMP = "__csid_file", "__csid_row_group", "__csid_cache_key", "__csid_stamp"


def _batches_of(parquet: Any, group: int, id_column: str, embedding_column: str,
                id_type: pa.DataType) -> Iterator[pa.RecordBatch]:
    """The (ITEM_ID, EMBEDDING) batches of one whole row group of an opened Parquet file, ``FILE_BATCH_ROWS``
    rows each (:func:`pipelines.row_checks.read_row_group`)."""
    return read_row_group(parquet, group, id_column, embedding_column, id_type, FILE_BATCH_ROWS)


def _row_group_batches(units: Iterator[pa.RecordBatch], id_column: str, embedding_column: str,
                       id_type: pa.DataType, wanted: pa.Array | None = None) -> Iterator[pa.RecordBatch]:
    """The (ITEM_ID, EMBEDDING) batches of the row groups listed in ``units`` (file, row group); with
    ``wanted``, only the rows whose id is one of those, and a row group's embeddings only if it has any.

    The wanted rows are gathered across read batches and row groups into batches of at least
    ``FILE_BATCH_ROWS`` rows (the last: what is left; a file whose columns have other Arrow types than the
    batches gathered so far, e.g. ``large_list`` beside ``list``, starts a new batch): the encoder pads every
    model call to its full size (rqvae.encode), so a few wanted rows per read batch would cost a whole call
    each (the second chance's 2,515 rows of a 1M-row catalog, in one process: 138 calls instead of 1)."""
    if wanted is not None and not len(wanted):
        return
    among = None if wanted is None else _membership(wanted)  # built once per task, used for every batch
    gathered: list[pa.RecordBatch] = []
    held = 0  # rows in gathered
    for unit in units:
        for file, group in zip(unit.column(_FILE).to_pylist(), unit.column(_ROW_GROUP).to_pylist(), strict=True):
            parquet = open_file(file)
            if among is not None:  # the ids first: a row group without a wanted one is not read further
                ids = parquet.read_row_group(group, columns=[id_column], use_threads=False).column(0).cast(id_type)
                if not among(ids).any():
                    continue
            for out in _batches_of(parquet, group, id_column, embedding_column, id_type):
                if among is None:
                    if out.num_rows:
                        yield out
                    continue
                out = out.filter(pa.array(among(out.column(ITEM_ID))))
                if gathered and out.num_rows and out.schema != gathered[0].schema:
                    yield _one_batch(gathered)
                    gathered, held = [], 0
                if out.num_rows:
                    gathered.append(out)
                    held += out.num_rows
                if held >= FILE_BATCH_ROWS:
                    yield _one_batch(gathered)
                    gathered, held = [], 0
    if gathered:
        yield _one_batch(gathered)


def _one_batch(batches: list[pa.RecordBatch]) -> pa.RecordBatch:
    """``batches`` (one schema) as one record batch."""
    return pa.Table.from_batches(batches).combine_chunks().to_batches()[0]


def _membership(wanted: pa.Array) -> Callable[[pa.Array | pa.ChunkedArray], np.ndarray]:
    """A test "is each id one of ``wanted``" (bool per id, False for a null id), its lookup built once:
    ``pc.is_in`` builds it on every call (0.1 s per batch for 1M wanted ids)."""
    if pa.types.is_integer(wanted.type):
        table = np.unique(wanted.drop_null().to_numpy())

        def among(ids: pa.Array | pa.ChunkedArray) -> np.ndarray:
            values = ids.fill_null(0).to_numpy() if ids.null_count else ids.to_numpy()
            at = np.minimum(np.searchsorted(table, values), len(table) - 1)
            found = np.asarray(table[at] == values)
            if ids.null_count:
                found &= ~np.asarray(ids.is_null().to_numpy(zero_copy_only=False))
            return found
        return among
    members = frozenset(wanted.drop_null().to_pylist())
    return lambda ids: np.fromiter((i in members for i in ids.to_pylist()), dtype=bool, count=len(ids))


@dataclass(frozen=True)
class Encoded:
    """What :func:`encode_catalog` gives: the clean rows' codes, the rejects and the counts.

    Attributes:
        codes: one row per clean catalog row: ITEM_ID, CODES ARRAY<INT> and QUANTIZATION_ERROR FLOAT
            (both null for a row the policy did not encode), EMBEDDING_FINGERPRINT BIGINT.
        rejects: ITEM_ID and REASON of every rejected row.
        counts: clean rows and rejected rows per reason (computed, not lazy).
        encoded_rows: rows that went through the model (None when the engine could not materialise
            the pass, so counting them would run it again).
        again: ``again(ids, k)`` reads the catalog rows of ``ids`` (ITEM_ID, EMBEDDING_FINGERPRINT: clean rows
            of ``codes``) once more and encodes them with their ``k`` nearest last-level codes ranked: ITEM_ID,
            EMBEDDING_FINGERPRINT, CODES, QUANTIZATION_ERROR, ALTERNATIVES, ALTERNATIVE_ERRORS, materialised. It
            raises :class:`~pipelines.validate.RowAccountingError` when a row is gone or is not the one this pass
            saw. The collision spreading's second chance (:func:`pipelines.uniquify.second_chance`) uses it;
            None without materialisation.
    """

    codes: DataFrame
    rejects: DataFrame
    counts: ValidationCounts
    encoded_rows: int | None = None
    again: Callable[[DataFrame, int], DataFrame] | None = None


def encode_catalog(v: ValidationResult, checkpoint: bytes, *, materialize: Callable[[DataFrame], DataFrame | None],
                   known: DataFrame | None = None, policy: str = ENCODE_ALL, batch_size: int | None = None,
                   device: str = "cpu", threads: int | None = TASK_THREADS, alternatives: int = 0,
                   files: EmbeddingFiles | None = None, tasks: int = 1, cache: str | None = None) -> Encoded:
    """Encode a validated catalog: codes, fingerprints, rejects and counts.

    ``policy`` "all" (a full run) reads the embeddings once: the UDF checks, fingerprints and encodes
    every row (rejects pass through uncoded); that output (ids, codes, reasons, alternatives) is
    materialised once and its repeated ids are flagged on it (:func:`_scanned_and_flagged`);
    counts, rejects and codes all come from it.

    The other policies (an incremental run) encode only the rows the table cannot keep: a first pass
    checks and fingerprints every row without the model; its small output is compared with ``known``
    (the table's fingerprints, on small frames: the embeddings are never shuffled for it), and a
    second pass encodes just the rows of the ids that need codes (new ids, and with "new_or_changed"
    ids whose fingerprint differs), selected by a semi-join with that small id list (on Sail the
    scan then skips what it cannot contain: 10k new rows of a 1M x 256 catalog in 0.2 s, against 4.4 s
    for the single pass that joins the fingerprints to the embeddings). The second pass must see the
    same embeddings as the first, or the run stops (the catalog changed under it).

    When ``materialize`` cannot (returns None), the counts come from validation's SQL pass and the
    frames are recomputed when used.

    Args:
        v: :func:`pipelines.validate.validate_catalog` of the catalog.
        checkpoint: model checkpoint bytes.
        materialize: computes a frame once and returns it (``EngineSession.materialize``), or None.
        known: ITEM_ID and EMBEDDING_FINGERPRINT of the items a table already holds (one row per id),
            needed by the policies other than "all".
        policy: "all", "new" or "new_or_changed".
        batch_size, device, threads, alternatives: as for :func:`encode_embeddings` (the alternatives
            ride along in ``Encoded.codes``, null where a row was not encoded).
        files: the catalog's row groups (:func:`pipelines.io.embedding_files`) when ``v.rows`` is a plain
            read of a file table: the pass over every row reads them inside the UDF
            (:func:`encode_files`, in ``tasks`` tasks) instead of through the engine, and so does an
            incremental run's second pass when it has at most ``BROADCAST_IDS`` rows to encode. Without
            materialisation, or with more rows to encode, the engine reads ``v`` as usual.
        cache: with ``files``, the folder of :mod:`pipelines.fingerprint_cache`: the pass over every row
            keeps each row group's checked and fingerprinted rows there, and an incremental run's first
            pass reads a kept row group's rows instead of its embeddings.
    """
    if policy not in ENCODE_POLICIES:
        raise ValueError(f"unknown encode policy {policy!r}; choose one of {', '.join(ENCODE_POLICIES)}")
    if policy != ENCODE_ALL and known is None:
        raise ValueError(f"encode policy {policy!r} needs the known fingerprints (known=...)")

    def scan(df: DataFrame, encode: bool = True, ranked: int = alternatives) -> DataFrame:
        return encode_embeddings(df, checkpoint, v.dim, batch_size=batch_size, device=device, threads=threads,
                                 fingerprints=True, encode=encode, alternatives=ranked)

    def read_files(encode: bool = True, only_ids: pa.Array | None = None, ranked: int = alternatives) -> DataFrame:
        assert files is not None
        return encode_files(v.rows.sparkSession, files, checkpoint, v.dim,
                            id_type=v.rows.schema[ITEM_ID].dataType.simpleString(), tasks=tasks,
                            batch_size=batch_size, device=device, threads=threads, fingerprints=True, encode=encode,
                            alternatives=ranked, only_ids=only_ids, cache=cache)

    encode_all = policy == ENCODE_ALL
    every_row = scan(v.rows, encode=encode_all) if files is None else read_files(encode=encode_all)
    # Rows of a duplicated id were scanned before being flagged; they leave with the REASON filters.
    # A large catalog's repeated ids are counted in parts; its size is known without a pass when the UDF
    # reads the files (their footers), else one part. A catalog of one part whose files the UDF reads has its
    # repeated ids counted here, from the id column of the same row groups.
    parts = parts_for(files.rows) if files is not None else 1
    repeated = (repeated_file_ids(files, v.rows.schema[ITEM_ID].dataType.simpleString())
                if files is not None and parts == 1 else None)
    staged = _scanned_and_flagged(every_row, materialize, parts, repeated)
    if staged is None:  # no materialisation: validation's SQL pass counts, the frames are recomputed when used
        counts, rejects, encoded_rows = validation_counts(v), v.rejects, None
        clean = scan(v.clean, encode=encode_all).drop(REASON)
    else:
        counts = count_reasons(staged)
        clean = staged.where(F.col(REASON).isNull()).drop(REASON)
        rejects = staged.where(F.col(REASON).isNotNull()).select(ITEM_ID, REASON)
        encoded_rows = counts.clean if encode_all else None

    def ranked_again(ids: DataFrame, k: int) -> DataFrame:
        coded, _ = _encode_ids(v, clean, ids, functools.partial(scan, ranked=k), materialize,
                               functools.partial(read_files, ranked=k) if files is not None else None)
        return coded.select(ITEM_ID, EMBEDDING_FINGERPRINT, CODES, QUANTIZATION_ERROR, ALTERNATIVES, ALTERNATIVE_ERRORS)

    again = ranked_again if staged is not None else None
    if encode_all:
        return Encoded(clean, rejects, counts, encoded_rows, again)
    assert known is not None
    codes, encoded_rows = _encode_needed(v, clean, known, policy, scan, materialize,
                                         read_files if files is not None else None)
    return Encoded(codes, rejects, counts, encoded_rows, again)


def _scanned_and_flagged(scanned: DataFrame, materialize: Callable[[DataFrame], DataFrame | None],
                         parts: int = 1, repeated_ids: pa.Array | None = None) -> DataFrame | None:
    """The encode pass materialised, with every row of a repeated id flagged; None when the engine
    cannot materialise.

    The repeated ids are counted on the materialised rows themselves, so they are the rows the pass
    read whatever the catalog does meanwhile; or they are given (``repeated_ids``, :func:`repeated_file_ids`
    of the row groups the pass reads: the same rows). None, the usual case, leaves the rows as they are; a few
    are flagged through a join whose small side is those ids (broadcast up to
    ``BROADCAST_IDS``). Counted inside the scan's plan, Sail's planner built that join's hash
    table from the encode output and held all of it in memory (1 GB of 5M rows with alternatives).
    """
    first = materialize(scanned)
    if first is None:
        return None
    # REASON cast as flag_duplicates' expression leaves it: Spark 4.2 types the UDF's output column
    # "string collate UTF8_BINARY", which Delta then writes and delta-rs cannot read.
    first = first.withColumn(REASON, F.col(REASON).cast("string"))
    if repeated_ids is not None:
        if len(repeated_ids) == 0:
            return first
        ids = first.sparkSession.createDataFrame(pa.table({ITEM_ID: repeated_ids}),
                                                 schema=first.select(ITEM_ID).schema)
        repeated, count = materialize(ids) or ids, len(repeated_ids)
    else:
        repeated = _repeated_ids(first, parts, materialize)
        count = repeated.count()
    if count == 0:
        return first
    flagged = flag_duplicates(first, repeated=repeated, broadcast=count <= BROADCAST_IDS)
    return materialize(flagged) or flagged


def repeated_file_ids(files: EmbeddingFiles, id_type: str) -> pa.Array | None:
    """Every non-null item id that occurs more than once in the row groups of ``files`` (once each), as the
    encode pass types it (``id_type``: "string" or "bigint"); None when this process cannot read them (the
    engine then counts them). Read with pyarrow, the id column only: at 1M rows about 0.2 s, where the
    engine's group-by of the pass's rows took 3.1 s on classic Spark (bench/RESULTS.md). It holds every id at
    once, so it is for a catalog of one part (``pipelines.uniquify.PART_ITEMS`` rows)."""
    import pyarrow.compute as pc

    arrow_id = pa.string() if id_type == "string" else pa.int64()
    chunks: list[pa.Array] = []
    opened: dict[str, Any] = {}
    try:
        for file, group in files.row_groups:
            parquet = opened[file] if file in opened else opened.setdefault(file, open_file(file))
            chunks.extend(parquet.read_row_group(group, columns=[files.id_column], use_threads=False)
                          .column(0).cast(arrow_id).chunks)
    except (OSError, pa.ArrowException):  # e.g. files only the executors see: the engine counts
        return None
    counted = pc.value_counts(pa.chunked_array(chunks, arrow_id).drop_null())
    return counted.field("values").filter(pc.greater(counted.field("counts"), 1))


def _repeated_ids(rows: DataFrame, parts: int, materialize: Callable[[DataFrame], DataFrame | None]) -> DataFrame:
    """:func:`duplicated_ids` of ``rows``, materialised; in ``parts`` (a large catalog) by the id's hash, one
    after another, so that the engine's aggregate holds a part's ids, not the catalog's."""
    if parts <= 1:
        return materialize(duplicated_ids(rows)) or duplicated_ids(rows)
    part = hash_part(ITEM_ID, parts)
    found = [duplicated_ids(rows.where(part == p)) for p in range(parts)]
    return functools.reduce(DataFrame.unionByName, [materialize(f) or f for f in found])


BROADCAST_IDS = 1_000_000  # id sets up to this many rows are broadcast to their joins (repeated ids, rows to encode)


def _encode_needed(v: ValidationResult, clean: DataFrame, known: DataFrame, policy: str,
                   scan: Callable[[DataFrame], DataFrame], materialize: Callable[[DataFrame], DataFrame | None],
                   read_files: Callable[..., DataFrame] | None = None) -> tuple[DataFrame, int | None]:
    """The second pass of an incremental run: codes for the clean rows that need them, joined back.

    Returns the clean rows (ITEM_ID, CODES, QUANTIZATION_ERROR[, the alternatives], EMBEDDING_FINGERPRINT;
    codes null where not needed) and how many rows went through the model (None without materialisation).
    """
    held = known.select(ITEM_ID, F.col(EMBEDDING_FINGERPRINT).alias(_HELD_FP))
    marked = clean.select(ITEM_ID, EMBEDDING_FINGERPRINT).join(held, ITEM_ID, "left")
    needed = F.col(_HELD_FP).isNull()
    if policy == ENCODE_NEW_OR_CHANGED:
        needed = needed | (F.col(_HELD_FP) != F.col(EMBEDDING_FINGERPRINT))
    second, encoded_rows = _encode_ids(v, clean, marked.where(needed).select(ITEM_ID), scan, materialize, read_files)
    # Joined on the fingerprint too: a row that is not the one the first pass saw never lends its codes. Few (a
    # daily run's new rows), they are broadcast, so the catalog's rows are not shuffled to meet them. A row
    # carries its ranked alternatives (about 150 bytes with 16), so a tenth of an id set's limit: about 15 MB.
    carried = [c for c in (CODES, QUANTIZATION_ERROR, ALTERNATIVES, ALTERNATIVE_ERRORS) if c in second.columns]
    coded_rows = second.select(ITEM_ID, EMBEDDING_FINGERPRINT, *carried)
    if encoded_rows is not None and encoded_rows <= BROADCAST_IDS // 10:
        coded_rows = F.broadcast(coded_rows)
    codes = clean.drop(*carried).join(coded_rows, [ITEM_ID, EMBEDDING_FINGERPRINT], "left")
    return codes.select(ITEM_ID, *carried, EMBEDDING_FINGERPRINT), encoded_rows


def _encode_ids(v: ValidationResult, clean: DataFrame, todo: DataFrame, scan: Callable[[DataFrame], DataFrame],
                materialize: Callable[[DataFrame], DataFrame | None],
                read_files: Callable[..., DataFrame] | None = None) -> tuple[DataFrame, int | None]:
    """The catalog rows of the ids in ``todo`` (ITEM_ID), read and encoded again: the encode UDF's output
    (materialised) and how many rows that was (None without materialisation).

    With ``read_files`` (the catalog's row groups, :func:`encode_files`) and at most ``BROADCAST_IDS`` ids,
    the UDF reads those rows itself: each row group's ids, and its embeddings only where it holds one of
    them. Otherwise the engine reads the catalog joined with the ids. Every row read must be clean and have
    the fingerprint it has in ``clean`` (the first pass), or :class:`RowAccountingError` says the catalog
    changed during the run.
    """
    # Counted first, so the ids can be broadcast: classic Spark knows nothing of a checkpoint's size and
    # sort-merge joined the catalog with them, shuffling every embedding (1.01M x 768: 24.9 s for a second
    # pass of 10,000 rows; broadcast, the rows are filtered as they are read).
    staged, encoded_rows, ids = materialize(todo), None, None
    if staged is not None:
        wanted = staged.count()
        if wanted == 0:  # nothing to read again (a daily run with nothing new): no pass over the catalog's rows, and
            # no rows of the UDF's schema (not the UDF's plan, which carries the checkpoint into every later query)
            return v.rows.sparkSession.createDataFrame([], scan(v.rows.limit(0)).schema), 0
        todo = F.broadcast(staged) if wanted <= BROADCAST_IDS else staged
        if read_files is not None and wanted <= BROADCAST_IDS:
            ids = staged.select(ITEM_ID).toArrow().column(0).combine_chunks()
    second = scan(v.rows.join(todo, ITEM_ID, "left_semi")) if ids is None else read_files(only_ids=ids)
    coded = materialize(second) if staged is not None else None
    if coded is not None:  # the checks cover the rows that will be written
        second, read = coded, coded.count()
        # Few rows read again (a daily run's, the second chance's) are broadcast to meet the catalog's rows: not the
        # catalog's ids and fingerprints shuffled to meet them.
        seen = second.where(F.col(REASON).isNull()).select(ITEM_ID, F.col(EMBEDDING_FINGERPRINT).alias(_HELD_FP))
        same = (F.broadcast(seen) if read <= BROADCAST_IDS else seen).join(clean, ITEM_ID).where(
            F.col(_HELD_FP) == F.col(EMBEDDING_FINGERPRINT)).count()
        if not same == read == wanted:
            raise RowAccountingError(
                f"the catalog changed during the run: the encode pass was to read {wanted} rows again and read "
                f"{read}, {same} of them as the first pass had. Nothing was written; run again on a stable snapshot "
                "(e.g. a Delta version).")
        encoded_rows = wanted
    return second, encoded_rows


_HELD_FP = "__csid_held_fingerprint"


@dataclass(frozen=True)
class TokenizerModel:
    """The model a run encodes with: its registered name and version (alias resolved once), the
    checkpoint bytes the UDF rebuilds it from, and its shape."""

    name: str
    version: str
    checkpoint: bytes
    num_levels: int
    codebook_size: int
    input_dim: int
    collision_alternatives: int = 0
