"""Uniquifying suffix: turn code tuples into unique Semantic IDs (DESIGN.md "Uniquifying suffix").

Items that share a full code tuple (a "group") get suffixes 0..n-1, ordered by
``quantization_error`` (nulls last) then ``item_id``. That order is a total order on the items (ids
are unique), so the result depends neither on the input order, nor on its partitioning, nor on the
engine. The group is found by a window partitioned by the tuple's string key ("35_7_120"), not by
the array itself, so no engine has to partition by an array column (only the ledger's tuples, grouped
by their codes for :func:`spread_and_number`, which each engine hashes as it does any other key).

Every function here is lazy (no Spark job runs) unless it is given a ``materialize`` callback, and
uses only DataFrame APIs that work on classic Spark and on Spark Connect (Sail).
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F
from pyspark.sql.types import ArrayType, FloatType, IntegerType, LongType, StructField, StructType

from pipelines.arrow_utils import embeddings_to_numpy, matrix_to_list_array
from pipelines.schema import (
    ALTERNATIVE_ERRORS,
    ALTERNATIVES,
    CODE_SEPARATOR,
    CODES,
    EMBEDDING_FINGERPRINT,
    ITEM_ID,
    QUANTIZATION_ERROR,
    SEMANTIC_ID,
    SUFFIX,
    prefix_column,
)
from pipelines.session import is_out_of_engine_memory
from pipelines.validate import SchemaError

_TUPLE_KEY = "__csid_tuple_key"
_NEXT_SUFFIX = "__csid_next_suffix"
_PREFIX_KEY = "__csid_prefix_key"
_HELD = "__csid_held"
_RANK = "__csid_rank"
_LAST_CODE = "__csid_last_code"
_CLAIM_WORD = "__csid_claim_word"
_CLAIM_BITS = "__csid_claim_bits"
_WORD_BITS = 64
_BUCKET = "__csid_bucket"
_SHARED = "__csid_shared"
_COUNT = "__csid_count"
_KEEPER = "__csid_keeper"
_BEST_ERROR = "__csid_best_error"
_HELD_SUFFIX = "__csid_held_suffix"
_OLD_CODES = "__csid_old_codes"
_OLD_SUFFIX = "__csid_old_suffix"
_TUPLES = "__csid_tuples"
_ROOM = "__csid_room"
_NEW_CODES = "__csid_new_codes"
_NEW_ERROR = "__csid_new_error"
_SHIFT = "__csid_shift"
_MOVED = "__csid_moved"
_CHANGED = "__csid_changed"
_SPREAD_ONLY = frozenset({_PREFIX_KEY, ALTERNATIVES, ALTERNATIVE_ERRORS, _CLAIM_WORD, _CLAIM_BITS, _BUCKET,
                          _HELD_SUFFIX})
SPREAD_BUCKETS = 64  # Python calls of spread_collisions: movers' prefixes hashed into this many groups
SPREAD_CHUNK_MOVERS = 1_500_000  # at most about this many movers (and their prefixes' claims) spread at once
SPREAD_MAX_CHUNKS = 4096  # chunks halved on an exhausted memory pool: no further than this
_CHUNK_SEED = 17  # the chunk of a prefix: another hash than its group's
SECOND_CHANCE_ITEMS = 1_000_000  # items ranked again over every last-level code in one run, at most
PART_ITEMS = 5_000_000  # items spread and numbered at once (in_prefix_parts): more go in parts by prefix hash
_PART_SEED = 29  # the part of a prefix: another hash than its chunk's and its group's


def require_columns(df: DataFrame, columns: Iterable[str], where: str) -> None:
    """Raise :class:`SchemaError` naming every column of ``columns`` that ``df`` lacks.

    Args:
        df: the input of a stage.
        columns: names the stage needs.
        where: the stage (and argument) name, used in the message.
    """
    present = set(df.columns)
    missing = [c for c in columns if c not in present]
    if missing:
        raise SchemaError(
            f"{where}: input lacks column(s) {', '.join(map(repr, missing))} (has: {', '.join(df.columns)}); "
            "pass the output of the encode stage (a semantic-ID table) or rename the columns to the "
            "names in pipelines/schema.py"
        )


def code_prefix(level: int, codes: str = CODES) -> Column:
    """STRING: the first ``level`` codes of ARRAY<INT> column ``codes`` joined by "_" ("35_7")."""
    return F.array_join(F.slice(F.col(codes).cast("array<string>"), 1, level), CODE_SEPARATOR)


def checked_codes(num_levels: int) -> Column:
    """Column ``codes`` unchanged, or a runtime error naming it when a row is not a full tuple.

    A row fails (when the plan runs) if ``codes`` is null, its length is not ``num_levels`` or it
    holds a null element: ``array_join`` would silently skip such a null and forge a shorter ID.
    """
    codes = F.col(CODES)
    bad = codes.isNull() | (F.size(codes) != num_levels) | F.exists(codes, lambda c: c.isNull())
    message = (
        f"column {CODES!r} must be a non-null ARRAY<INT> of length {num_levels} without null elements; "
        "check that --levels matches the model and that the encode stage wrote every level"
    )
    return F.when(bad, F.raise_error(F.lit(message))).otherwise(codes)


def with_prefix_columns(df: DataFrame, num_levels: int) -> DataFrame:
    """Adds (or replaces) STRING columns ``prefix_1``..``prefix_L`` computed from ``codes``."""
    return df.withColumns({prefix_column(level): code_prefix(level) for level in range(1, num_levels + 1)})


def assign_suffixes(df: DataFrame, num_levels: int,
                    materialize: Callable[[DataFrame], DataFrame | None] | None = None) -> DataFrame:
    """Give every item a unique Semantic ID: its code tuple plus a suffix within the tuple.

    Args:
        df: ``item_id`` (STRING or BIGINT, unique), ``codes`` ARRAY<INT> of length ``num_levels``,
            ``quantization_error`` FLOAT; other columns are carried through unchanged.
        num_levels: L, the code tuple length.
        materialize: computes a frame once (``EngineSession.materialize``) or returns None: the
            shared tuples' keys (:func:`_ranked_in_tuples`), so that the engine sees how few they are.

    Returns:
        ``df`` plus ``suffix`` INT (0..n-1 within each group of n items sharing ``codes``, ordered
        by ``quantization_error`` ascending with nulls last, then ``item_id``), ``semantic_id``
        STRING (codes and suffix joined by "_": "35_7_120_0") and ``prefix_1``..``prefix_L`` STRING
        ("35", "35_7", "35_7_120"). Existing columns of those names are replaced.

    Raises:
        SchemaError: a required column is missing (at once); a malformed ``codes`` row fails the
            Spark job that evaluates the result.
    """
    _check_levels(num_levels)
    require_columns(df, (ITEM_ID, CODES, QUANTIZATION_ERROR), "assign_suffixes")
    keyed = df.withColumn(CODES, checked_codes(num_levels)).withColumn(_TUPLE_KEY, code_prefix(num_levels))
    ranked = _ranked_in_tuples(keyed, materialize).withColumn(SUFFIX, (F.col(_RANK) - 1).cast("int")).drop(_RANK)
    return _with_ids(ranked, num_levels).drop(_TUPLE_KEY)


def _ranked_in_tuples(keyed: DataFrame, materialize: Callable[[DataFrame], DataFrame | None] | None) -> DataFrame:
    """``keyed`` (with the tuple key) plus its RANK (1, 2, ...) within its tuple, in the suffix order.

    Only the rows of a tuple that two or more items share go through the window; every other row is
    first of its tuple without a sort. A window over every row sorts them all, and the embedded
    engine holds a sort's rows in memory (no spilling): the job's peak memory grew with the catalog.
    The shared tuples' keys (one row each) are materialised when ``materialize`` can, so the engine
    builds its join's hash table from them, not from ``keyed``.
    """
    shared = (keyed.groupBy(_TUPLE_KEY).count().where(F.col("count") > 1)
              .select(_TUPLE_KEY, F.lit(True).alias(_SHARED)))
    shared = _computed_once(shared, materialize)
    marked = keyed.join(shared, _TUPLE_KEY, "left")
    alone = marked.where(F.col(_SHARED).isNull()).withColumn(_RANK, F.lit(1))
    in_group = Window.partitionBy(_TUPLE_KEY).orderBy(*_suffix_order())
    crowd = marked.where(F.col(_SHARED).isNotNull()).withColumn(_RANK, F.row_number().over(in_group))
    return alone.unionByName(crowd).drop(_SHARED)


def assign_suffixes_incremental(new_df: DataFrame, existing_df: DataFrame, num_levels: int) -> DataFrame:
    """Assign Semantic IDs to the items not yet in ``existing_df``; keep everyone else's.

    An item of ``new_df`` whose ``item_id`` is already in ``existing_df`` keeps its existing row
    (codes, suffix, semantic_id and every other column) and its new codes are ignored. The other
    items get IDs from :func:`assign_next_suffixes`: existing items whose tuple gains new items are
    not renumbered, so within a tuple the suffix order follows (quantization_error, item_id) per
    batch of arrival, not overall.

    Args:
        new_df: as for :func:`assign_suffixes`.
        existing_df: a previous semantic-ID table: ``item_id``, ``codes``, ``suffix`` INT,
            ``semantic_id`` STRING, possibly more columns (model_version, tokenized_at...).
        num_levels: L, the code tuple length.

    Returns:
        One row per item of the union: the new items as :func:`assign_suffixes` shapes them, then
        the existing rows with ``prefix_1``..``prefix_L`` (re)computed from their codes. Columns
        present on one side only are null on the other side.
    """
    require_columns(existing_df, (ITEM_ID, CODES, SUFFIX, SEMANTIC_ID), "assign_suffixes_incremental(existing_df)")
    fresh = new_df.join(existing_df.select(ITEM_ID), ITEM_ID, "left_anti")
    added = assign_next_suffixes(fresh, existing_df, num_levels)
    return added.unionByName(with_prefix_columns(existing_df, num_levels), allowMissingColumns=True)


def assign_next_suffixes(new_df: DataFrame, existing_df: DataFrame, num_levels: int) -> DataFrame:
    """Give every row of ``new_df`` a Semantic ID that no row of ``existing_df`` holds or ever held.

    A row takes the next free suffix of its tuple: the largest suffix any row of ``existing_df``
    has in that tuple + 1, + 1 per row of ``new_df`` of the tuple before it in (``quantization_error``
    nulls last, ``item_id``) order; 0.. for a tuple ``existing_df`` does not have. ``existing_df`` is
    the ledger of every ID ever issued (active and retired rows), so no ID is reissued. Rows of
    ``new_df`` are numbered whether or not their item is in ``existing_df`` (an item whose old ID was
    retired gets a new one).

    Args:
        new_df: ``item_id`` (unique within ``new_df``), ``codes`` ARRAY<INT> of length L,
            ``quantization_error`` FLOAT; other columns are carried through.
        existing_df: ``codes`` ARRAY<INT>, ``suffix`` INT (only these two are read).
        num_levels: L.

    Returns:
        ``new_df``'s columns, then ``suffix``, ``semantic_id`` and ``prefix_1``..``prefix_L``.
    """
    _check_levels(num_levels)
    where = "assign_next_suffixes"
    require_columns(new_df, (ITEM_ID, CODES, QUANTIZATION_ERROR), f"{where}(new_df)")
    require_columns(existing_df, (CODES, SUFFIX), f"{where}(existing_df)")
    fresh = new_df.withColumn(CODES, checked_codes(num_levels)).withColumn(_TUPLE_KEY, code_prefix(num_levels))
    # Only the tuples the new rows fall into are aggregated: a broadcast semi-join of their keys.
    touched = F.broadcast(fresh.select(_TUPLE_KEY).distinct())
    next_free = (existing_df.select(code_prefix(num_levels).alias(_TUPLE_KEY), SUFFIX)
                 .join(touched, _TUPLE_KEY, "left_semi")
                 .groupBy(_TUPLE_KEY).agg((F.max(SUFFIX) + 1).alias(_NEXT_SUFFIX)))
    in_group = Window.partitionBy(_TUPLE_KEY).orderBy(*_suffix_order())
    first = F.coalesce(F.col(_NEXT_SUFFIX), F.lit(0))
    ranked = fresh.join(next_free, _TUPLE_KEY, "left").withColumn(
        SUFFIX, (first + F.row_number().over(in_group) - 1).cast("int")
    )
    return _with_ids(ranked, num_levels).select(*_output_columns(new_df.columns, num_levels))


def spread_collisions(df: DataFrame, num_levels: int, issued: DataFrame | None = None,
                      materialize: Callable[[DataFrame], DataFrame | None] | None = None) -> DataFrame:
    """The collision-aware last level (:mod:`rqvae.resolve`) on a DataFrame, before the suffixes.

    In every group of items sharing a full tuple the best-fitting one (the suffix order: error, then
    item id) keeps it; the others take, in that order, the nearest of their ranked alternatives that
    no item of their prefix holds, and keep their code (and get a suffix later) when none is free. A
    tuple of ``issued`` (the ledger: every ID ever issued, active or retired) is never given out, and
    an item whose nearest tuple is issued moves too. Items that do not collide are not touched; the
    prefix (levels 1..L-1) never changes. Only the movers go to Python (Arrow), their prefixes hashed into
    ``SPREAD_BUCKETS`` calls, so the cost follows the collisions, not the catalog.

    Args:
        df: ``item_id`` (unique), ``codes``, ``quantization_error``, ALTERNATIVES ARRAY<INT> and
            ALTERNATIVE_ERRORS ARRAY<FLOAT> (:func:`pipelines.encode.encode_embeddings` with
            ``alternatives``); other columns are carried through.
        num_levels: L.
        issued: ``codes`` of every tuple already issued, or None (a first run).
        materialize: computes a frame once (``EngineSession.materialize``) or returns None: the
            keyed items, the shared tuples' best errors and keepers (one row per shared tuple) and
            the movers with their prefixes' claim bitmaps, so that the engine knows their sizes and
            builds its joins' hash tables from the small sides; the movers are then spread in chunks
            (``SPREAD_CHUNK_MOVERS``; halved while the engine's memory pool refuses them), each
            chunk's result materialised.

    Returns:
        ``df``'s columns without the alternatives; ``codes`` and ``quantization_error`` are the moved
        items' new ones.
    """
    _check_levels(num_levels)
    require_columns(df, (ITEM_ID, CODES, QUANTIZATION_ERROR, ALTERNATIVES, ALTERNATIVE_ERRORS), "spread_collisions")
    out_columns = [c for c in df.columns if c not in (ALTERNATIVES, ALTERNATIVE_ERRORS)]
    last = F.element_at(F.col(CODES), num_levels)
    keyed = df.withColumn(CODES, checked_codes(num_levels)).withColumns(
        {_TUPLE_KEY: code_prefix(num_levels), _PREFIX_KEY: code_prefix(num_levels - 1)})
    if issued is not None:
        held = issued.select(code_prefix(num_levels).alias(_TUPLE_KEY)).distinct().withColumn(_HELD, F.lit(True))
        keyed = keyed.join(held, _TUPLE_KEY, "left")
    else:
        keyed = keyed.withColumn(_HELD, F.lit(None).cast("boolean"))
    # Only who keeps each shared tuple matters here (the movers are ordered in Python), so no row is
    # sorted: a window ranking every row held them all in memory on the embedded engine (killed at
    # 20M x 256). Aggregates with plain numeric accumulators find the keeper instead: the smallest
    # error of every tuple that 2+ items share, then the smallest id among the items that have it.
    # Materialised, the frames tell the engine their true sizes, so it builds each join's hash table
    # from the small side: estimating a filtered ``df`` small, it built one from all of its rows
    # (11 GB at 20M x 256).
    keyed = _computed_once(keyed, materialize)
    shared = _computed_once(keyed.groupBy(_TUPLE_KEY).agg(F.count(F.lit(1)).alias(_COUNT),
                                                          F.min(QUANTIZATION_ERROR).alias(_BEST_ERROR))
                            .where(F.col(_COUNT) > 1).drop(_COUNT), materialize)
    keepers_of = _computed_once(keyed.select(_TUPLE_KEY, ITEM_ID, QUANTIZATION_ERROR).join(shared, _TUPLE_KEY)
                                .where(F.col(QUANTIZATION_ERROR).eqNullSafe(F.col(_BEST_ERROR)))
                                .groupBy(_TUPLE_KEY).agg(F.min(ITEM_ID).alias(_KEEPER)), materialize)
    ranked = keyed.join(keepers_of, _TUPLE_KEY, "left")
    first = F.col(_KEEPER).isNull() | F.coalesce(F.col(ITEM_ID) == F.col(_KEEPER), F.lit(False))
    keeps = first & F.col(_HELD).isNull()
    keepers, movers = ranked.where(keeps), ranked.where(~keeps)
    claims = keepers.select(_PREFIX_KEY, last.alias(_LAST_CODE))
    if issued is not None:  # the ledger has a row per suffix, retired ones included: the bitmaps fold repeats
        claims = claims.unionByName(issued.select(code_prefix(num_levels - 1).alias(_PREFIX_KEY),
                                                  last.alias(_LAST_CODE)))
    moved = _spread_movers(movers, claims, df, out_columns, materialize, SPREAD_CHUNK_MOVERS)
    return keepers.select(*out_columns).unionByName(moved.select(*out_columns))


def _spread_movers(movers: DataFrame, claims: DataFrame, df: DataFrame, out_columns: list[str],
                   materialize: Callable[[DataFrame], DataFrame | None] | None, chunk_movers: int,
                   movers_n: int | None = None) -> DataFrame:
    """The movers (``_PREFIX_KEY``, ``out_columns`` of ``df`` and the ranked alternatives) with the codes and
    errors :func:`rqvae.resolve.spread_last_level` gives them against ``claims`` (``_PREFIX_KEY``,
    ``_LAST_CODE``: the codes their prefixes' other items and the ledger hold). ``movers_n``: their number,
    when the caller knows it."""
    # A prefix's claimed last-level codes travel to the Python call of its prefix as 64-code bitmaps:
    # one row per (prefix, word of 64 codes), at most K^(L-1) * K/64 rows whatever the catalog's size.
    # A row per claim (every keeper of a prefix with movers) was most of the grouped map's input, which
    # the engine holds at once; a set per prefix (collect_set) held every claim as a boxed value.
    # A mover row carries every output column through the Python call, which returns it with its new codes:
    # joined back onto the movers instead, the engine held a hash table of every moved item.
    mover_rows = movers.select(_PREFIX_KEY, *out_columns, ALTERNATIVES, ALTERNATIVE_ERRORS,
                               F.lit(None).cast("int").alias(_CLAIM_WORD), F.lit(None).cast("long").alias(_CLAIM_BITS))
    claim_rows = (claims.join(movers.select(_PREFIX_KEY).distinct(), _PREFIX_KEY, "left_semi")
                  .groupBy(_PREFIX_KEY, F.floor(F.col(_LAST_CODE) / _WORD_BITS).cast("int").alias(_CLAIM_WORD))
                  .agg(F.bit_or(_bit_of(_LAST_CODE)).alias(_CLAIM_BITS))
                  .select(_PREFIX_KEY, *(F.lit(None).cast(mover_rows.schema[c].dataType).alias(c) for c in (
                      *out_columns, ALTERNATIVES, ALTERNATIVE_ERRORS)), _CLAIM_WORD, _CLAIM_BITS))
    # Prefixes never interact (a claim names a full tuple), so many prefixes share one Python call: a
    # call per prefix cost ~1 ms each, and a 1M-item catalog has tens of thousands with movers.
    rows = mover_rows.unionByName(claim_rows).withColumn(_BUCKET, hash_part(_PREFIX_KEY, SPREAD_BUCKETS))
    schema = StructType(_spread_output_fields(df, out_columns))
    staged = materialize(rows) if materialize is not None else None
    if staged is None:
        moved = rows.groupBy(_BUCKET).applyInArrow(_spread_group, schema)
    else:
        # The engine's grouped map holds all of its input at once (650 bytes per mover on the embedded
        # engine: 5.4 GB at 20M x 256), so many movers are spread in chunks of whole prefixes, one after
        # another, each computed once; a chunk that does not fit the engine's memory pool is halved.
        if movers_n is None:
            movers_n = staged.where(F.col(_CLAIM_BITS).isNull()).count()
        moved = _spread_in_chunks(staged, max(1, -(-movers_n // chunk_movers)), schema, materialize)
    return moved


def second_chance(rows: DataFrame, issued: DataFrame | None, num_levels: int, codebook_size: int,
                  again: Callable[[DataFrame, int], DataFrame], materialize: Callable[[DataFrame], DataFrame | None],
                  movable: Column | None = None, progress: Callable[[str], None] | None = None,
                  few: bool = False, in_driver: bool = False) -> DataFrame:
    """The items still sharing a tuple after the spreading, ranked again over all K last-level codes and
    spread once more: ``rows`` with their new codes, errors and IDs, and the suffixes of the tuples they left
    closed up.

    The spreading offers a colliding item its ``collision_alternatives`` nearest last-level codes. A family of
    near-duplicates (product variants; one package built for 20 architectures) has nearly the same few, so
    some of its items find none free and are told apart by a suffix though their prefix has room. Those items
    (a suffix of 1 or more: they share their tuple with a better-fitting item or with the ledger) whose prefix
    has a last-level code no tuple holds, as many of them per prefix as it has such codes (the first in the
    suffix order), are read and encoded again with every code ranked (``again``), and the spreading's grouped
    map (:func:`rqvae.resolve.spread_last_level`) gives each, best fit first, the nearest code that no item and
    no ledger row of its prefix holds. The prefix never changes, nor does any other item's code. An item that
    moves is alone on its tuple (suffix 0); in each tuple it left, the suffixes above its own close up, so they
    stay 0..n-1 (after the ledger's largest one) in the suffix order. Deterministic as the spreading is: the
    same rows give the same result on either engine, in any order.

    Args:
        rows: the items with IDs (ITEM_ID, EMBEDDING_FINGERPRINT, CODES, QUANTIZATION_ERROR, SUFFIX, SEMANTIC_ID,
            prefix_1..prefix_L; other columns carried), materialised.
        issued: ``codes`` and ``suffix`` of every ID the table has issued (the ledger), or None.
        num_levels, codebook_size: L and K.
        again: :attr:`pipelines.encode.Encoded.again`.
        materialize: ``EngineSession.materialize``.
        movable: the rows issued in this run (default every row): only they move, and only their suffixes
            close up; the others' tuples are taken.
        progress: called with a line saying how many items moved.
        few: the movable rows are few enough to broadcast their prefixes (``spread_and_number``'s ``few``): the
            tuples held (the rows' and the ledger's) are counted and claimed only in the prefixes of the items
            left, filtered as they are read, once.
        in_driver: the movable rows and the ledger are small enough for this process (the caller's judgement: the
            job's plan on classic Spark with at most ``PART_ITEMS`` of each): their IDs, errors, codes and suffixes
            are collected once and the items to read again, the spreading and the suffixes that close up are
            worked out here (:func:`_moves_found_in_driver`), the same moves; the engine reads the items again
            and writes the result. On classic Spark each of the engine path's dozen small frames costs a local
            JVM's fixed overhead (about 7 s at 1M rows for 2,585 items, bench/RESULTS.md).

    Returns:
        ``rows`` (same columns, same rows), unchanged when no item could move. More than
        ``SECOND_CHANCE_ITEMS`` items to read again leave ``rows`` as they are, said through ``progress``.
    """
    require_columns(rows, (ITEM_ID, EMBEDDING_FINGERPRINT, CODES, QUANTIZATION_ERROR, SUFFIX), "second_chance")
    mine = F.lit(True) if movable is None else movable
    if in_driver and codebook_size ** num_levels < 2 ** 62:
        found = _moves_found_in_driver(rows, issued, mine, num_levels, codebook_size, again, progress)
        return rows if found is None else _moves_applied(rows, mine, *found, num_levels)
    prefix = code_prefix(num_levels - 1)
    left = rows.where(mine & (F.col(SUFFIX) >= 1)).select(
        ITEM_ID, EMBEDDING_FINGERPRINT, QUANTIZATION_ERROR, F.col(CODES).alias(_OLD_CODES),
        F.col(SUFFIX).alias(_OLD_SUFFIX), prefix.alias(_PREFIX_KEY))
    # A tuple's suffixes start at 0, in the run's rows and in the ledger (an item of the run on a tuple the ledger
    # holds numbers after the ledger's largest suffix): its row with suffix 0 stands for it. So the tuples held
    # are counted per prefix without a distinct over every row (at 50M x 256 that distinct and the ranking below,
    # in one computed frame, held 6.0 GB: bench/RESULTS.md, "The second chance at 50M x 256").
    held = rows.where(mine).select(CODES, SUFFIX)
    if issued is not None:
        held = held.unionByName(issued.select(CODES, SUFFIX))
    held = held.withColumn(_PREFIX_KEY, prefix)
    if few:
        # Only the prefixes of the items left are ranked, and only their tuples are claims: the rows and the ledger
        # are read once for both, filtered as they are read, and that small frame computed once (two reads of the
        # whole ledger before, on classic Spark about 2 s each at 1M rows for a daily run's few items; of a full
        # run's 1M rows, 1.8 and 2.1 s).
        held = _computed_once(held.join(F.broadcast(left.select(_PREFIX_KEY).distinct()), _PREFIX_KEY, "left_semi"),
                              materialize)
    taken = held.where(F.col(SUFFIX) == 0)
    # Ranked over every code, the left items of a prefix take its free codes one each, in the suffix order
    # (error, then id: the spreading's order), until none is left: so in a prefix with r codes no tuple holds,
    # exactly the first r of them move, and only they are read again.
    room = _computed_once(
        taken.groupBy(_PREFIX_KEY).agg(F.count(F.lit(1)).alias(_TUPLES))
        .select(_PREFIX_KEY, (F.lit(codebook_size) - F.col(_TUPLES)).alias(_ROOM)).where(F.col(_ROOM) > 0),
        materialize)
    # How many items that is (at most r per prefix) and how many rows the ranking within the prefixes would sort,
    # from a count per prefix: the ranking (a window) is computed only when it is to be used, and in parts of the
    # prefixes when it would sort many rows (at 50M x 256 it ranked every item left in a prefix with room, only
    # for the count to find 1.25M of them: too many, so the second chance was skipped).
    sizes = (left.groupBy(_PREFIX_KEY).agg(F.count(F.lit(1)).alias(_COUNT)).join(F.broadcast(room), _PREFIX_KEY)
             .agg(F.sum(F.least(F.col(_COUNT), F.col(_ROOM))), F.sum(_COUNT)).first())
    n, ranked_rows = (0, 0) if sizes is None else (int(sizes[0] or 0), int(sizes[1] or 0))
    if not _to_read_again(n, progress):
        return rows
    in_order = Window.partitionBy(_PREFIX_KEY).orderBy(*_suffix_order())

    def first_r(left: DataFrame, room: DataFrame) -> DataFrame:
        return (left.join(F.broadcast(room), _PREFIX_KEY).withColumn(_RANK, F.row_number().over(in_order))
                .where(F.col(_RANK) <= F.col(_ROOM)).drop(_RANK, _ROOM))

    parts = parts_for(ranked_rows)
    candidates = _computed_once(in_parts([left, room], lambda: hash_part(_PREFIX_KEY, parts, _PART_SEED), parts,
                                         first_r, materialize), materialize)
    ranked = again(candidates.select(ITEM_ID, EMBEDDING_FINGERPRINT), codebook_size)
    # Ranked again, an item has the codes it had (its embedding is the first pass's); one that did not, were a
    # model call ever to differ in its last bit, is left as it is.
    movers = (ranked.join(candidates.select(ITEM_ID, _OLD_CODES, _OLD_SUFFIX), ITEM_ID)
              .where(F.col(CODES) == F.col(_OLD_CODES))
              .select(ITEM_ID, CODES, QUANTIZATION_ERROR, ALTERNATIVES, ALTERNATIVE_ERRORS, _OLD_CODES, _OLD_SUFFIX))
    # Every mover's tuple is taken (by its keeper, or the ledger), so none keeps it: they all go to the
    # spreading's grouped map, with the codes their prefixes hold.
    out_columns = [c for c in movers.columns if c not in (ALTERNATIVES, ALTERNATIVE_ERRORS)]
    # Every row's tuple is claimed (a ledger whose tuple had lost its row of suffix 0 is still kept off).
    claims = held.join(F.broadcast(candidates.select(_PREFIX_KEY).distinct()), _PREFIX_KEY, "left_semi")
    spread = _spread_movers(movers.withColumn(_PREFIX_KEY, prefix),
                            claims.select(_PREFIX_KEY, F.element_at(F.col(CODES), num_levels).alias(_LAST_CODE)),
                            movers, out_columns, materialize,
                            max(1, SPREAD_CHUNK_MOVERS * 16 // max(codebook_size, 16)), movers_n=n)
    moved = _computed_once(spread.where(F.col(CODES) != F.col(_OLD_CODES)), materialize)
    m = moved.count()
    if progress is not None:
        progress(f"second chance: {m:,} items still sharing a tuple moved to a free last-level code of their "
                 f"prefix ({n:,} read again, ranked over every code)")
    if m == 0:
        return rows
    # The moved items (at most SECOND_CHANCE_ITEMS) and the rows they shift are few: broadcast to their joins.
    new = moved.select(ITEM_ID, F.col(CODES).alias(_NEW_CODES), F.col(QUANTIZATION_ERROR).alias(_NEW_ERROR))
    gone = moved.select(code_prefix(num_levels, _OLD_CODES).alias(_TUPLE_KEY), _OLD_SUFFIX)
    # A row of a tuple that lost items moves down by the number of them ranked before it. A mover's suffix was 1
    # or more, so only rows of suffix 2 or more can: only they are keyed by their tuple's string and looked up
    # (at 1M rows, keying every row took about a second of a classic run).
    shift = (rows.where(mine & (F.col(SUFFIX) >= 2))
             .select(ITEM_ID, code_prefix(num_levels).alias(_TUPLE_KEY), SUFFIX).join(F.broadcast(gone), _TUPLE_KEY)
             .where(F.col(_OLD_SUFFIX) < F.col(SUFFIX)).groupBy(ITEM_ID).agg(F.count(F.lit(1)).alias(_SHIFT)))
    shift = _computed_once(shift, materialize)
    return _moves_applied(rows, mine, new, shift, num_levels)


def _to_read_again(n: int, progress: Callable[[str], None] | None) -> bool:
    """Whether the second chance's ``n`` items are read again: some, and at most ``SECOND_CHANCE_ITEMS`` (more
    skip it, said through ``progress``)."""
    if n > SECOND_CHANCE_ITEMS and progress is not None:
        progress(f"second chance skipped: {n:,} items share a tuple in prefixes with room, more than the "
                 f"{SECOND_CHANCE_ITEMS:,} ranked again at most; they keep their suffixes")
    return 0 < n <= SECOND_CHANCE_ITEMS


def _moves_applied(rows: DataFrame, mine: Column, new: DataFrame, shift: DataFrame, num_levels: int) -> DataFrame:
    """``rows`` with the second chance's moves: ``new`` (ITEM_ID, _NEW_CODES, _NEW_ERROR) the moved items, ``shift``
    (ITEM_ID, _SHIFT) how far each row of a tuple they left moves down; both few, broadcast to the joins."""
    # Joined by id, so only the movable row of an item changes: in a new generation an item can also have
    # a row of the ledger in ``rows`` (its old ID, retired), which keeps every value it has.
    joined = rows.join(F.broadcast(new), ITEM_ID, "left").join(F.broadcast(shift), ITEM_ID, "left")
    has_moved = mine & F.col(_NEW_CODES).isNotNull()
    flagged = joined.withColumns({_MOVED: has_moved, _CHANGED: has_moved | (mine & F.col(_SHIFT).isNotNull())})
    moved_now, changed = F.col(_MOVED), F.col(_CHANGED)
    suffix = F.when(moved_now, F.lit(0)).otherwise(F.col(SUFFIX) - F.coalesce(F.col(_SHIFT), F.lit(0))).cast("int")
    out = flagged.withColumns({
        CODES: F.when(moved_now, F.col(_NEW_CODES)).otherwise(F.col(CODES)),
        QUANTIZATION_ERROR: F.when(moved_now, F.col(_NEW_ERROR)).otherwise(F.col(QUANTIZATION_ERROR)),
        SUFFIX: F.when(changed, suffix).otherwise(F.col(SUFFIX)),
    })
    # The ID columns are written anew only on the rows that changed, from their new codes and suffix (their
    # strings made there only): the others keep theirs as they are.
    made = {SEMANTIC_ID: F.concat(code_prefix(num_levels), F.lit(CODE_SEPARATOR), F.col(SUFFIX).cast("string")),
            **{prefix_column(level): code_prefix(level) for level in range(1, num_levels + 1)}}
    return out.withColumns({c: F.when(changed, made[c]).otherwise(F.col(c)) for c in made if c in rows.columns}
                           ).select(*rows.columns)


def _moves_found_in_driver(rows: DataFrame, issued: DataFrame | None, mine: Column, num_levels: int,
                           codebook_size: int, again: Callable[[DataFrame, int], DataFrame],
                           progress: Callable[[str], None] | None) -> tuple[DataFrame, DataFrame] | None:
    """:func:`second_chance`'s moves worked out in this process: ``new`` and ``shift`` for :func:`_moves_applied`,
    or None when no item moves (said through ``progress`` as the engine path says it).

    The same steps as the engine path, on the movable rows' columns collected once (and the ledger's tuples in
    the left items' prefixes): tuples and prefixes are integer keys (the codes in base K); a prefix's room is K
    less its tuples (their rows of suffix 0); its left items are ranked in the suffix order (error with missing
    ones last, NaN before them, then id in the engine's order); the first of them, as many as its room, are
    read again by the engine (``again``), and :func:`rqvae.resolve.spread_last_level` spreads those that kept
    their codes against every tuple of their prefixes, as the engine path's grouped map does."""
    from rqvae.resolve import spread_last_level

    spark = rows.sparkSession
    got = rows.where(mine).select(ITEM_ID, EMBEDDING_FINGERPRINT, QUANTIZATION_ERROR, CODES, SUFFIX).toArrow()
    n_rows, levels = got.num_rows, num_levels
    if n_rows == 0:
        return None
    codes = _int_matrix(got.column(CODES), n_rows)
    suffix = pc.fill_null(got.column(SUFFIX), -1).to_numpy().astype(np.int64)  # a null suffix: none
    prefix = code_keys(codes[:, :-1], codebook_size)
    left = np.flatnonzero(suffix >= 1)
    if not len(left):
        return None
    in_left = np.unique(prefix[left])
    held_codes, held_suffix = codes, suffix
    if issued is not None:  # the ledger's tuples in the left items' prefixes, filtered as the engine reads them
        wanted = spark.createDataFrame(pa.table({_PREFIX_KEY: prefix_strings(in_left, levels - 1, codebook_size)}))
        ledger = (issued.withColumn(_PREFIX_KEY, code_prefix(levels - 1)).join(F.broadcast(wanted), _PREFIX_KEY,
                                                                                "left_semi")
                  .select(CODES, SUFFIX).toArrow())
        if ledger.num_rows:
            held_codes = np.concatenate([codes, _int_matrix(ledger.column(CODES), ledger.num_rows)])
            held_suffix = np.concatenate([suffix, pc.fill_null(ledger.column(SUFFIX), -1).to_numpy().astype(np.int64)])
    held_prefix = code_keys(held_codes[:, :-1], codebook_size)
    tuples_of, tuples = np.unique(held_prefix[held_suffix == 0], return_counts=True)
    room = np.full(len(in_left), codebook_size, dtype=np.int64)
    at = np.searchsorted(in_left, tuples_of).clip(max=len(in_left) - 1)
    found = in_left[at] == tuples_of
    room[at[found]] -= tuples[found]
    # The left items of prefixes with room, in each prefix in the suffix order: the first ``room`` of them.
    left = left[room[np.searchsorted(in_left, prefix[left])] > 0]
    errors, missing = _errors_of(got.column(QUANTIZATION_ERROR).take(left))
    order = np.lexsort((_id_ranks(got.column(ITEM_ID).take(left)), errors, missing, prefix[left]))
    left = left[order]
    ranked_prefix = prefix[left]
    starts = run_starts(ranked_prefix)
    rank = np.arange(len(left)) - np.repeat(starts, np.diff(np.append(starts, len(left))))
    chosen = left[rank < room[np.searchsorted(in_left, ranked_prefix)]]
    n = len(chosen)
    if not _to_read_again(n, progress):
        return None
    ids_schema = rows.select(ITEM_ID, EMBEDDING_FINGERPRINT).schema
    ranked = again(spark.createDataFrame(got.select([ITEM_ID, EMBEDDING_FINGERPRINT]).take(chosen), ids_schema),
                   codebook_size).select(ITEM_ID, CODES, QUANTIZATION_ERROR, ALTERNATIVES, ALTERNATIVE_ERRORS).toArrow()
    # Ranked again, an item has the codes it had (its embedding is the first pass's); one that did not, were a
    # model call ever to differ in its last bit, is left as it is.
    row_of = pc.index_in(ranked.column(ITEM_ID), got.column(ITEM_ID).take(chosen)).to_numpy()
    old = chosen[row_of]
    again_codes = _int_matrix(ranked.column(CODES), ranked.num_rows)
    kept = np.flatnonzero((again_codes == codes[old]).all(axis=1))
    movers, old = ranked.take(kept), old[kept]
    moved = np.zeros(0, np.int64)
    if len(kept):  # none kept its codes: nobody moves
        claims = held_codes[np.isin(held_prefix, np.unique(prefix[old]))]
        errors, missing = _errors_of(movers.column(QUANTIZATION_ERROR))
        spread = spread_last_level(again_codes[kept], errors, _int_matrix(movers.column(ALTERNATIVES), len(kept)),
                                   embeddings_to_numpy(movers.column(ALTERNATIVE_ERRORS)),
                                   tiebreak=_id_ranks(movers.column(ITEM_ID)), taken=claims, missing=missing)
        moved = np.flatnonzero((spread.codes != codes[old]).any(axis=1))
    if progress is not None:
        progress(f"second chance: {len(moved):,} items still sharing a tuple moved to a free last-level code of "
                 f"their prefix ({n:,} read again, ranked over every code)")
    if not len(moved):
        return None
    new = pa.table({ITEM_ID: movers.column(ITEM_ID).take(moved),
                    _NEW_CODES: matrix_to_list_array(spread.codes[moved].astype(np.int32, copy=False)),
                    _NEW_ERROR: pa.array(spread.quantization_error[moved], pa.float32())})
    # A row of a tuple that lost items moves down by the number of them ranked before it.
    gone: dict[int, list[int]] = {}
    for key, was in zip(code_keys(codes[old[moved]], codebook_size).tolist(), suffix[old[moved]].tolist()):
        gone.setdefault(key, []).append(was)
    behind = np.flatnonzero(suffix >= 2)
    behind = behind[np.isin(code_keys(codes[behind], codebook_size), np.fromiter(gone, np.int64, len(gone)))]
    shifts = np.array([sum(was < after for was in gone[key]) for key, after in
                       zip(code_keys(codes[behind], codebook_size).tolist(), suffix[behind].tolist())],
                      dtype=np.int64)
    shift = pa.table({ITEM_ID: got.column(ITEM_ID).take(behind[shifts > 0]), _SHIFT: pa.array(shifts[shifts > 0])})
    id_type = rows.schema[ITEM_ID].dataType
    return (spark.createDataFrame(new, StructType([StructField(ITEM_ID, id_type),
                                                   StructField(_NEW_CODES, ArrayType(IntegerType())),
                                                   StructField(_NEW_ERROR, FloatType())])),
            spark.createDataFrame(shift, StructType([StructField(ITEM_ID, id_type), StructField(_SHIFT, LongType())])))


def code_keys(codes: np.ndarray, codebook_size: int) -> np.ndarray:
    """int64 key of each row of (N, l) codes: the codes as the digits of a base-K number, first code most
    significant, so sorted keys sort the tuples and a key divided by K^j is the key of its (l-j)-prefix. The
    caller keeps K^l below 2^62; :func:`prefix_strings` writes a key back as its prefix."""
    return codes @ (codebook_size ** np.arange(codes.shape[1] - 1, -1, -1, dtype=np.int64))


def run_starts(sorted_keys: np.ndarray) -> np.ndarray:
    """Where each run of equal values of a sorted array starts."""
    return np.flatnonzero(np.concatenate([[True], sorted_keys[1:] != sorted_keys[:-1]]))


def prefix_strings(keys: np.ndarray, level: int, codebook_size: int) -> pa.Array:
    """The ``code_prefix(level)`` strings ("35_7") of prefixes given as integer keys (their codes in base K)."""
    digits = [pa.array((keys // codebook_size ** (level - 1 - j)) % codebook_size).cast(pa.string())
              for j in range(level)]
    return digits[0] if level == 1 else pc.binary_join_element_wise(*digits, CODE_SEPARATOR)


def spread_and_number(df: DataFrame, num_levels: int, issued: DataFrame | None = None,
                      buckets: int = SPREAD_BUCKETS, few: bool = False) -> DataFrame:
    """:func:`spread_collisions` then :func:`assign_suffixes` (no ledger) or :func:`assign_next_suffixes`
    (``issued``), in one grouped map.

    Every row goes to Python once, its prefix (levels 1..L-1) hashed into one of ``buckets`` groups, and
    each group is spread (:func:`rqvae.resolve.spread_last_level`) and numbered
    (:func:`rqvae.resolve.suffixes_in_tuples`) there: both look only inside a prefix, so the result is
    exactly theirs. With a ledger, each tuple it holds in the rows' prefixes joins the group as one row
    (its largest suffix): a tuple given out there, and the suffixes start after it. It replaces the joins,
    aggregates and window of the two steps (about ten frames computed one after another) by one shuffle,
    the cheaper plan where each computed frame costs seconds (classic Spark). The engine's grouped map
    holds a group at a time on classic Spark, but all of its input at once on the embedded engine, so
    the job uses it on classic Spark only.

    Args:
        df: as for :func:`spread_collisions`.
        num_levels: L.
        issued: ``codes`` and ``suffix`` of every ID ever issued (the ledger), or None (a first issue).
        buckets: the number of Python calls (groups of prefixes).
        few: ``df`` holds few enough rows to broadcast (the caller's judgement: the job's plan says so up to
            ``pipelines.encode.BROADCAST_IDS``): its prefixes go to every task of the join that picks the
            ledger's rows in them, so the ledger is filtered as it is read instead of shuffled whole.

    Returns:
        ``df``'s columns without the alternatives, with the moved items' ``codes`` and
        ``quantization_error``, then ``suffix``, ``semantic_id`` and ``prefix_1``..``prefix_L``, as
        the two steps give them.
    """
    _check_levels(num_levels)
    require_columns(df, (ITEM_ID, CODES, QUANTIZATION_ERROR, ALTERNATIVES, ALTERNATIVE_ERRORS), "spread_and_number")
    out_columns = [c for c in df.columns if c not in (ALTERNATIVES, ALTERNATIVE_ERRORS, *_added_columns(num_levels))]
    rows = df.select(*out_columns, ALTERNATIVES, ALTERNATIVE_ERRORS).withColumns(
        {CODES: checked_codes(num_levels), _HELD_SUFFIX: F.lit(None).cast("int")})
    if issued is not None:
        require_columns(issued, (CODES, SUFFIX), "spread_and_number(issued)")
        prefixes = rows.select(code_prefix(num_levels - 1).alias(_PREFIX_KEY)).distinct()
        # Grouped by the codes themselves (a tuple's key names them one to one): a hash aggregate of one integer
        # per tuple, where a string key and first(codes) made classic Spark sort every ledger row of the prefixes.
        held = (issued.select(CODES, SUFFIX, code_prefix(num_levels - 1).alias(_PREFIX_KEY))
                .join(F.broadcast(prefixes) if few else prefixes, _PREFIX_KEY, "left_semi")
                .groupBy(CODES)
                .agg(F.coalesce(F.max(SUFFIX), F.lit(-1)).alias(_HELD_SUFFIX)))  # only null suffixes: taken, from 0
        rows = rows.unionByName(held, allowMissingColumns=True)
    rows = rows.withColumn(_BUCKET, hash_part(code_prefix(num_levels - 1), buckets))
    schema = StructType([*_spread_output_fields(df, out_columns), StructField(SUFFIX, IntegerType())])
    numbered = rows.groupBy(_BUCKET).applyInArrow(_spread_and_number_group, schema)
    return _with_ids(numbered.withColumn(_TUPLE_KEY, code_prefix(num_levels)), num_levels).drop(_TUPLE_KEY)


def _spread_in_chunks(rows: DataFrame, chunks: int, schema: StructType,
                      materialize: Callable[[DataFrame], DataFrame | None]) -> DataFrame:
    """The grouped map of :func:`spread_collisions` over ``rows``, in ``chunks`` chunks of whole prefixes.

    A chunk is the prefixes whose hash is r modulo m. One that the engine cannot hold in its memory
    pool (``--engine-memory``) is split in two (r and r + m modulo 2m) and retried, down to
    ``SPREAD_MAX_CHUNKS`` chunks; beyond that the error names the fix."""
    done: list[DataFrame] = []
    pending = [(chunks, r) for r in range(chunks)]
    while pending:
        modulus, residue = pending.pop(0)
        part = rows if modulus == 1 else rows.where(hash_part(_PREFIX_KEY, modulus, _CHUNK_SEED) == residue)
        try:
            done.append(_computed_once(part.groupBy(_BUCKET).applyInArrow(_spread_group, schema), materialize))
        except Exception as e:  # noqa: BLE001 - pyspark raises engine-specific classes
            if not is_out_of_engine_memory(e):
                raise
            if 2 * modulus > SPREAD_MAX_CHUNKS:
                raise MemoryError(
                    f"the collision spreading of one prefix chunk (1/{modulus} of the movers) does not fit the "
                    "engine's memory pool. Fix: a larger --engine-memory (or 0 for no limit), or "
                    "--collision-alternatives 0") from e
            # The other chunks of this size are about as large: all of them are halved, not tried first.
            halved = [(m, r) for m, r in [(modulus, residue), *pending] if m == modulus]
            pending = [(m, r) for m, r in pending if m != modulus]
            pending += [(2 * m, r + half) for m, r in halved for half in (0, m)]
    return functools.reduce(DataFrame.unionByName, done)


def parts_for(items: int) -> int:
    """How many parts ``items`` rows are worked on in (:func:`in_prefix_parts`, :func:`in_parts`): one per
    ``PART_ITEMS``."""
    return max(1, -(-int(items) // PART_ITEMS))


def hash_part(column: Column | str, parts: int, seed: int | None = None) -> Column:
    """The part (0..parts-1) of a row by a column: its Spark ``hash`` (with ``seed`` as a second hashed value,
    for a split independent of another one on the same column) modulo ``parts``. Every split of a large
    frame into parts one after another (prefixes, ids, items) goes through it."""
    hashed = F.hash(column) if seed is None else F.hash(column, F.lit(seed))
    return F.pmod(hashed, F.lit(parts))


def prefix_part(num_levels: int, parts: int) -> Column:
    """The part (0..parts-1) of a row: the hash of its ``codes``' prefix (levels 1..L-1) modulo ``parts``."""
    return hash_part(code_prefix(num_levels - 1), parts, _PART_SEED)


def prefix_parts(num_levels: int, parts: int) -> list[Column]:
    """One condition per part (:func:`prefix_part`)."""
    part = prefix_part(num_levels, parts)
    return [part == p for p in range(parts)]


Split = Callable[[DataFrame, Column, int], "list[DataFrame] | None"]


def in_prefix_parts(frames: list[DataFrame | None], num_levels: int, parts: int,
                    work: Callable[..., DataFrame], materialize: Callable[[DataFrame], DataFrame | None] | None,
                    progress: Callable[[int, int], None] | None = None, split: Split | None = None) -> DataFrame:
    """``work(*frames)`` computed one part of the prefixes after another, each part materialised, then united.

    Every frame has a ``codes`` column; part p is the rows whose prefix (levels 1..L-1) hashes to p, in
    every frame alike. Collision spreading and suffixes look only inside a prefix (a tuple's items, a
    prefix's claims), so the result is the same as ``work`` on the whole frames. What changes is what the
    engine holds at once: the embedded engine keeps a join's hash table and an aggregate's groups in memory,
    and those follow the tuples, of which a catalog of N items has up to min(N, K^L). With one part per
    ``PART_ITEMS`` items the engine holds one part's tuples at a time (docs/scaling.md). A ``None`` frame
    stays ``None``. One part, L = 1 or no ``materialize``: ``work(*frames)`` as it is.

    ``split(frame, part, parts)`` (``EngineSession.materialize_split``), where it returns frames, splits
    each frame once, so that a part reads only its own rows; otherwise every part filters the frames.
    ``progress(done, parts)`` is called after each part.
    """
    if num_levels < 2:
        return work(*frames)
    return in_parts(frames, lambda: prefix_part(num_levels, parts), parts, work, materialize, progress, split)


def in_parts(frames: list[DataFrame | None], part: Callable[[], Column], parts: int, work: Callable[..., DataFrame],
             materialize: Callable[[DataFrame], DataFrame | None] | None,
             progress: Callable[[int, int], None] | None = None, split: Split | None = None) -> DataFrame:
    """``work(*frames)`` computed one part after another, each part materialised, then united; part p of every
    frame is its rows where ``part()`` (an integer expression, 0..parts-1, resolved on each frame) is p.

    The same result as ``work(*frames)`` whenever ``work`` relates only rows of the same part (the rows of one
    prefix, :func:`in_prefix_parts`; of one item id, the ledger's comparison of the catalog with the table).
    ``split``: see :func:`in_prefix_parts`. One part or no ``materialize``: ``work(*frames)`` as it is.
    """
    if parts <= 1 or materialize is None:
        return work(*frames)
    pieces = []
    for f in frames:
        split_up = None if f is None or split is None else split(f, part(), parts)
        pieces.append([None] * parts if f is None else split_up or [f.where(part() == p) for p in range(parts)])
    done = []
    for p in range(parts):
        done.append(_computed_once(work(*(piece[p] for piece in pieces)), materialize))
        if progress is not None:
            progress(len(done), parts)
    return functools.reduce(DataFrame.unionByName, done)


def _computed_once(df: DataFrame, materialize: Callable[[DataFrame], DataFrame | None] | None) -> DataFrame:
    """``materialize(df)`` where it can, else ``df`` (recomputed where used)."""
    return (materialize(df) if materialize is not None else None) or df


def _spread_group(table: pa.Table) -> pa.Table:
    """The movers of some prefixes -> their rows (the output columns) with the codes and quantization
    error of :func:`rqvae.resolve.spread_last_level`, with each prefix's claimed last-level codes taken.

    ``table`` holds mover rows (CLAIM_BITS null) and claim rows (only the prefix key, CLAIM_WORD w and
    CLAIM_BITS: bit b set when a keeper or the ledger holds last-level code 64 w + b in that prefix).
    Arrow, not pandas: the list columns become NumPy matrices without a Python object per row."""
    from rqvae.resolve import spread_last_level  # numpy only, but imported where the group runs

    is_claim = pc.is_valid(table.column(_CLAIM_BITS))
    claims, movers = table.filter(is_claim), table.filter(pc.invert(is_claim))
    out_columns = [c for c in table.column_names if c not in _SPREAD_ONLY]
    ids = movers.column(ITEM_ID).to_numpy()
    if not len(ids):
        return movers.select(out_columns)
    codes = _int_matrix(movers.column(CODES), len(ids))
    keys = movers.column(_PREFIX_KEY).to_pylist()
    first_row = {key: row for row, key in reversed(list(enumerate(keys)))}  # a mover row of each prefix
    # Claims are sent only for the prefixes of movers; as full tuples (the prefix, then the claimed code).
    claim_of, claimed = _bitmap_codes(claims.column(_CLAIM_WORD).to_numpy(), claims.column(_CLAIM_BITS).to_numpy())
    claim_keys = claims.column(_PREFIX_KEY).to_pylist()
    rows_of_claims = np.fromiter((first_row[claim_keys[i]] for i in claim_of), np.int64, count=len(claim_of))
    taken = np.column_stack([codes[rows_of_claims, :-1], claimed])
    errors, missing = _errors_of(movers.column(QUANTIZATION_ERROR))
    out = spread_last_level(codes, errors, _int_matrix(movers.column(ALTERNATIVES), len(ids)),
                            embeddings_to_numpy(movers.column(ALTERNATIVE_ERRORS)),
                            tiebreak=_id_ranks(movers.column(ITEM_ID)), taken=taken, missing=missing)
    new = {CODES: matrix_to_list_array(out.codes.astype(np.int32, copy=False)),
           QUANTIZATION_ERROR: pa.array(out.quantization_error, pa.float32(), mask=missing & ~out.moved)}
    return pa.table({c: new.get(c, movers.column(c)) for c in out_columns})


def _spread_output_fields(df: DataFrame, out_columns: list[str]) -> list[StructField]:
    """The fields of the spreading's grouped map: ``df``'s ``out_columns``, with ``codes`` ARRAY<INT> and
    ``quantization_error`` FLOAT as the Python side writes them."""
    return [StructField(CODES, ArrayType(IntegerType())) if c == CODES
            else StructField(QUANTIZATION_ERROR, FloatType()) if c == QUANTIZATION_ERROR
            else df.schema[c] for c in out_columns]


def _spread_and_number_group(table: pa.Table) -> pa.Table:
    """The items of some prefixes (and the ledger's tuples there: HELD_SUFFIX set) -> the items' rows with
    the codes and quantization error of :func:`rqvae.resolve.spread_last_level` (the ledger's tuples
    taken) and their suffixes (:func:`rqvae.resolve.suffixes_in_tuples`, after the ledger's largest one
    in the tuple). A missing error orders last in both, as in the Spark plans."""
    from rqvae.resolve import spread_last_level, suffixes_in_tuples  # numpy only, imported where the group runs

    out_columns = [c for c in table.column_names if c not in _SPREAD_ONLY]
    is_held = pc.is_valid(table.column(_HELD_SUFFIX))
    held, table = table.filter(is_held), table.filter(pc.invert(is_held))
    n = table.num_rows
    if not n:
        return table.select(out_columns).append_column(SUFFIX, pa.array([], pa.int32()))
    tie = _id_ranks(table.column(ITEM_ID))
    errors, missing = _errors_of(table.column(QUANTIZATION_ERROR))
    codes = _int_matrix(table.column(CODES), n)
    taken = _int_matrix(held.column(CODES), held.num_rows) if held.num_rows else None
    spread = spread_last_level(codes, errors, _int_matrix(table.column(ALTERNATIVES), n),
                               embeddings_to_numpy(table.column(ALTERNATIVE_ERRORS)), tiebreak=tie, taken=taken,
                               missing=missing)
    # A moved item's error is its new code's (known), as the two steps' suffixes see it.
    suffix = suffixes_in_tuples(spread.codes, spread.quantization_error, tie, missing & ~spread.moved)
    if taken is not None:  # a tuple of the ledger numbers on from its largest suffix
        _, tuple_of = np.unique(np.concatenate([spread.codes, taken]), axis=0, return_inverse=True)
        tuple_of = tuple_of.reshape(-1)
        first_free = np.zeros(tuple_of.max() + 1, dtype=np.int64)
        first_free[tuple_of[n:]] = held.column(_HELD_SUFFIX).to_numpy().astype(np.int64) + 1
        suffix = (suffix + first_free[tuple_of[:n]]).astype(np.int32)
    new = {CODES: matrix_to_list_array(spread.codes.astype(np.int32, copy=False)),
           QUANTIZATION_ERROR: pa.array(spread.quantization_error, pa.float32(), mask=missing & ~spread.moved)}
    return pa.table({**{c: new.get(c, table.column(c)) for c in out_columns}, SUFFIX: pa.array(suffix, pa.int32())})


def _id_ranks(column: pa.ChunkedArray) -> np.ndarray:
    """int64 (N,) rank of each item id in Spark's order of the ids (numbers by value, strings byte by byte):
    the tie-break of the Python side. NumPy's own strings would drop trailing NUL characters and hold
    4 bytes x the longest id per row."""
    return pc.rank(column, sort_keys="ascending", tiebreaker="first").to_numpy().astype(np.int64)


def _errors_of(column: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """float32 errors (NaN for a missing one) and where they were missing: the sorts put a missing error
    after every known one, NaN included, as the Spark plans' nulls-last order does, and an item that keeps
    its code keeps a null error."""
    errors = pc.fill_null(column.cast(pa.float32()), float("nan")).to_numpy().astype(np.float32)
    return errors, column.is_null().to_numpy(zero_copy_only=False)


def _bit_of(code: str) -> Column:
    """BIGINT with the bit of ``code`` within its 64-code word set. In SQL: classic pyspark's
    ``shiftleft`` takes the shift as a Python int only."""
    return F.expr(f"shiftleft(CAST(1 AS BIGINT), pmod({code}, {_WORD_BITS}))")


def _bitmap_codes(words: np.ndarray, bits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The codes that 64-code bitmaps name: (row of each code, the code), row by row, codes ascending.

    Row i's bit b (of its INT64 read as unsigned, bit 0 the least significant) names code
    64 * words[i] + b."""
    flags = np.unpackbits(bits.astype(np.int64).view(np.uint64).astype("<u8").view(np.uint8).reshape(-1, 8),
                          axis=1, bitorder="little").astype(bool)
    rows, positions = np.nonzero(flags)
    return rows.astype(np.int64), words.astype(np.int64)[rows] * _WORD_BITS + positions


def _int_matrix(column: pa.ChunkedArray, rows: int) -> np.ndarray:
    """(rows, W) int64 of a column of equal-length non-null int lists."""
    return column.combine_chunks().flatten().to_numpy().astype(np.int64).reshape(rows, -1)


def _suffix_order() -> list[Column]:
    """The order of items inside a group: quantization error (nulls last), then item id."""
    return [F.col(QUANTIZATION_ERROR).asc_nulls_last(), F.col(ITEM_ID).asc()]


def _with_ids(ranked: DataFrame, num_levels: int) -> DataFrame:
    """Adds ``semantic_id`` ("<tuple key>_<suffix>") and the prefix columns to a ranked frame."""
    semantic_id = F.concat(F.col(_TUPLE_KEY), F.lit(CODE_SEPARATOR), F.col(SUFFIX).cast("string"))
    return with_prefix_columns(ranked.withColumn(SEMANTIC_ID, semantic_id), num_levels)


def _added_columns(num_levels: int) -> list[str]:
    """The columns numbering adds: suffix, semantic_id, prefix_1..prefix_L."""
    return [SUFFIX, SEMANTIC_ID, *(prefix_column(level) for level in range(1, num_levels + 1))]


def _output_columns(input_columns: list[str], num_levels: int) -> list[str]:
    """Input columns in their order, then suffix, semantic_id, prefix_1..prefix_L (once each)."""
    added = _added_columns(num_levels)
    return [c for c in input_columns if c not in added] + added


def _check_levels(num_levels: int) -> None:
    if num_levels < 1:
        raise ValueError(f"num_levels must be >= 1 (the code tuple length L), got {num_levels}")
