"""assign_suffixes / assign_suffixes_incremental on the embedded (Sail) engine; expectations by hand."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from helpers import crowded_ranked_items

from pipelines import uniquify
from pipelines.schema import (
    ALTERNATIVE_ERRORS,
    ALTERNATIVES,
    CODES,
    ITEM_ID,
    QUANTIZATION_ERROR,
    SEMANTIC_ID,
    SUFFIX,
    prefix_column,
)
from pipelines.uniquify import (
    SPREAD_BUCKETS,
    assign_next_suffixes,
    assign_suffixes,
    assign_suffixes_incremental,
    spread_collisions,
)
from pipelines.validate import SchemaError
from rqvae.resolve import spread_last_level

pytestmark = pytest.mark.spark

SCHEMA = "item_id string, codes array<int>, quantization_error float, extra string"
# Groups: 1_2_3 = {a .5, b .1, c .1}, 1_2_4 = {d}, 1_5_3 = {e}, 7_2_3 = {f .9, g .4}.
ITEMS = [
    ("a", [1, 2, 3], 0.5, "xa"),
    ("b", [1, 2, 3], 0.1, "xb"),
    ("c", [1, 2, 3], 0.1, "xc"),  # ties with b on the error: item_id decides, b before c
    ("d", [1, 2, 4], 0.2, "xd"),
    ("e", [1, 5, 3], 0.3, "xe"),
    ("f", [7, 2, 3], 0.9, "xf"),
    ("g", [7, 2, 3], 0.4, "xg"),
]
COLUMNS = [ITEM_ID, SUFFIX, SEMANTIC_ID, prefix_column(1), prefix_column(2), prefix_column(3), "extra"]
EXPECTED = [
    ("a", 2, "1_2_3_2", "1", "1_2", "1_2_3", "xa"),
    ("b", 0, "1_2_3_0", "1", "1_2", "1_2_3", "xb"),
    ("c", 1, "1_2_3_1", "1", "1_2", "1_2_3", "xc"),
    ("d", 0, "1_2_4_0", "1", "1_2", "1_2_4", "xd"),
    ("e", 0, "1_5_3_0", "1", "1_5", "1_5_3", "xe"),
    ("f", 1, "7_2_3_1", "7", "7_2", "7_2_3", "xf"),
    ("g", 0, "7_2_3_0", "7", "7_2", "7_2_3", "xg"),
]


def rows(df, columns):
    """The frame's rows as sorted tuples: a whole-frame comparison that ignores row order."""
    return sorted(tuple(r) for r in df.select(*columns).collect())


def test_suffixes_follow_error_then_item_id(spark):
    out = assign_suffixes(spark.createDataFrame(ITEMS, SCHEMA), num_levels=3)
    assert rows(out, COLUMNS) == EXPECTED


def test_only_the_shared_tuples_are_ranked_and_materialising_their_keys_changes_nothing(spark):
    seen = []

    def materialize(df):
        seen.append(sorted(r[0] for r in df.collect()))
        return spark.createDataFrame(df.collect(), df.schema)

    out = assign_suffixes(spark.createDataFrame(ITEMS, SCHEMA), num_levels=3, materialize=materialize)
    assert rows(out, COLUMNS) == EXPECTED
    shared = Counter("_".join(map(str, item[1])) for item in ITEMS)
    assert seen == [sorted(key for key, n in shared.items() if n > 1)]  # the keys of the tuples 2+ items share


def test_output_schema(spark):
    out = assign_suffixes(spark.createDataFrame(ITEMS, SCHEMA), num_levels=3)
    assert out.dtypes == [
        (ITEM_ID, "string"), (CODES, "array<int>"), (QUANTIZATION_ERROR, "float"), ("extra", "string"),
        (SUFFIX, "int"), (SEMANTIC_ID, "string"),
        (prefix_column(1), "string"), (prefix_column(2), "string"), (prefix_column(3), "string"),
    ]


@pytest.mark.parametrize("layout", ["repartition5", "reversed", "reversed_repartition5"])
def test_result_does_not_depend_on_input_order(spark, layout):
    data = ITEMS[::-1] if layout.startswith("reversed") else ITEMS
    df = spark.createDataFrame(data, SCHEMA)
    if layout.endswith("repartition5"):
        df = df.repartition(5)
    assert rows(assign_suffixes(df, num_levels=3), COLUMNS) == EXPECTED


def test_semantic_id_is_codes_then_suffix(spark):
    out = assign_suffixes(spark.createDataFrame(ITEMS, SCHEMA), num_levels=3).collect()
    for r in out:
        assert r[SEMANTIC_ID] == "_".join(str(c) for c in r[CODES]) + f"_{r[SUFFIX]}"
    assert len({r[SEMANTIC_ID] for r in out}) == len(ITEMS)


def test_null_error_sorts_last_and_bigint_ids_sort_numerically(spark):
    df = spark.createDataFrame(
        [(10, [0, 0], 0.5), (9, [0, 0], 0.5), (1, [0, 0], None), (2, [0, 0], 0.7)],
        "item_id bigint, codes array<int>, quantization_error float",
    )
    out = assign_suffixes(df, num_levels=2)
    assert rows(out, [ITEM_ID, SEMANTIC_ID]) == [(1, "0_0_3"), (2, "0_0_2"), (9, "0_0_0"), (10, "0_0_1")]


def test_missing_column_is_named(spark):
    df = spark.createDataFrame([("a", [1, 2])], "item_id string, codes array<int>")
    with pytest.raises(SchemaError, match="quantization_error"):
        assign_suffixes(df, num_levels=2)


@pytest.mark.parametrize("codes", [[1, 2], [1, None, 3], None])
def test_malformed_codes_fail_naming_the_column(spark, codes):
    df = spark.createDataFrame([("a", codes, 0.1)], SCHEMA.replace(", extra string", ""))
    with pytest.raises(Exception, match="column 'codes' must be a non-null ARRAY<INT> of length 3"):
        assign_suffixes(df, num_levels=3).collect()


def test_incremental_keeps_existing_ids_and_appends(spark):
    existing = assign_suffixes(spark.createDataFrame(ITEMS, SCHEMA), num_levels=3).drop(
        prefix_column(1), prefix_column(2), prefix_column(3)
    )
    new = spark.createDataFrame(
        [
            ("a", [9, 9, 9], 0.0, "new-a"),  # already known: keeps 1_2_3_2 and its old row
            ("h", [1, 2, 3], 0.05, "xh"),  # lowest error, still after the existing max suffix 2
            ("i", [1, 2, 3], 0.7, "xi"),
            ("j", [1, 2, 4], 0.01, "xj"),
            ("k", [4, 4, 4], 0.3, "xk"),  # new tuple: suffixes from 0, l (0.2) before k (0.3)
            ("l", [4, 4, 4], 0.2, "xl"),
        ],
        SCHEMA,
    ).repartition(3)
    out = assign_suffixes_incremental(new, existing, num_levels=3)
    assert rows(out, COLUMNS) == sorted(EXPECTED + [
        ("h", 3, "1_2_3_3", "1", "1_2", "1_2_3", "xh"),
        ("i", 4, "1_2_3_4", "1", "1_2", "1_2_3", "xi"),
        ("j", 1, "1_2_4_1", "1", "1_2", "1_2_4", "xj"),
        ("k", 1, "4_4_4_1", "4", "4_4", "4_4_4", "xk"),
        ("l", 0, "4_4_4_0", "4", "4_4", "4_4_4", "xl"),
    ])
    assert set(out.columns) == set(existing.columns) | {prefix_column(1), prefix_column(2), prefix_column(3)}


def test_incremental_with_nothing_new_returns_existing(spark):
    existing = assign_suffixes(spark.createDataFrame(ITEMS, SCHEMA), num_levels=3)
    new = spark.createDataFrame(ITEMS[:2], SCHEMA)
    assert rows(assign_suffixes_incremental(new, existing, num_levels=3), COLUMNS) == EXPECTED


# The collision-aware last level. Group 1_2_3 = {a .5, b .1, c .1}: b keeps it (lowest error, then id);
# c then a move in that order. 1_2_4 is d's, so c skips 4 and takes 5; a takes 6. g keeps 7_2_3, f moves.
RANKED = {"a": [3, 4, 6], "b": [3, 4, 5], "c": [3, 4, 5], "d": [4, 3, 5], "e": [3, 4, 5], "f": [3, 9, 8],
          "g": [3, 2, 1]}
SPREAD_SCHEMA = (f"item_id string, codes array<int>, quantization_error float, extra string, "
                 f"{ALTERNATIVES} array<int>, {ALTERNATIVE_ERRORS} array<float>")


def ranked_items():
    return [(*item, RANKED[item[0]], [item[2], item[2] + 0.1, item[2] + 0.2]) for item in ITEMS]


def test_spread_moves_only_colliding_items_to_free_alternatives(spark):
    out = spread_collisions(spark.createDataFrame(ranked_items(), SPREAD_SCHEMA), num_levels=3)
    assert out.columns == [ITEM_ID, CODES, QUANTIZATION_ERROR, "extra"]
    got = {r[ITEM_ID]: (list(r[CODES]), round(r[QUANTIZATION_ERROR], 4), r["extra"]) for r in out.collect()}
    assert out.count() == len(ITEMS)  # one row per item: none lost, none doubled by a join
    assert got == {"a": ([1, 2, 6], 0.7, "xa"), "b": ([1, 2, 3], 0.1, "xb"), "c": ([1, 2, 5], 0.3, "xc"),
                   "d": ([1, 2, 4], 0.2, "xd"), "e": ([1, 5, 3], 0.3, "xe"), "f": ([7, 2, 9], 1.0, "xf"),
                   "g": ([7, 2, 3], 0.4, "xg")}


def test_claim_bitmaps_name_every_code_of_every_word():
    # Bit 63 makes the INT64 negative; word 3 holds codes 192..255.
    rows, codes = uniquify._bitmap_codes(np.array([0, 1, 3], np.int32),
                                         np.array([np.iinfo(np.int64).min + 1, 1, 0b110], np.int64))
    assert rows.tolist() == [0, 0, 1, 2, 2] and codes.tolist() == [0, 63, 64, 193, 194]
    rows, codes = uniquify._bitmap_codes(np.array([], np.int32), np.array([], np.int64))
    assert rows.size == 0 and codes.size == 0


def test_spread_skips_codes_claimed_in_any_word_of_the_bitmap(spark):
    """Keepers hold last codes 63, 130 and 200 of prefix (1, 2) (three bitmap words); the ledger holds 64."""
    rows = [("k1", [1, 2, 63], 0.1, "x", [63, 0, 1], [0.1, 0.5, 0.6]),
            ("k2", [1, 2, 130], 0.1, "x", [130, 0, 1], [0.1, 0.5, 0.6]),
            ("k3", [1, 2, 200], 0.1, "x", [200, 0, 1], [0.1, 0.5, 0.6]),
            ("m1", [1, 2, 63], 0.2, "x", [63, 130, 200, 64, 255], [0.2, 0.3, 0.4, 0.45, 0.5]),
            ("m2", [1, 2, 130], 0.3, "x", [130, 64, 200, 63, 7], [0.3, 0.35, 0.4, 0.45, 0.5])]
    schema = SPREAD_SCHEMA
    ledger = spark.createDataFrame([([1, 2, 64],)], "codes array<int>")
    out = spread_collisions(spark.createDataFrame([(*r[:4], r[4][:3], r[5][:3]) if r[0].startswith("k") else r
                                                   for r in rows], schema), 3, issued=ledger,
                            materialize=lambda df: spark.createDataFrame(df.collect(), df.schema))
    got = {r[ITEM_ID]: list(r[CODES]) for r in out.collect()}
    assert got == {"k1": [1, 2, 63], "k2": [1, 2, 130], "k3": [1, 2, 200], "m1": [1, 2, 255], "m2": [1, 2, 7]}


def test_spread_halves_a_chunk_that_the_engine_memory_pool_refuses(monkeypatch):
    """An embedded engine with a 16 MB pool: the grouped map of all movers does not fit it, so the chunk is
    split until the pieces do; the IDs are those of rqvae.resolve."""
    from pipelines.session import start_session

    rng = np.random.default_rng(5)
    n, k = 12_000, 16
    codes = np.column_stack([rng.integers(0, 30, n), rng.integers(0, 4, n), rng.integers(0, 40, n)])
    alternatives = np.array([[c, *[x for x in rng.permutation(200) if x != c][:k - 1]] for c in codes[:, 2]])
    errors = rng.random(n).astype(np.float32)
    alt_errors = np.sort(rng.random((n, k)).astype(np.float32), axis=1)
    alt_errors[:, 0] = errors
    ids = np.array([f"i{j:05d}" for j in range(n)])
    # Hash joins: under so small a pool a sort-merge join's two 10 MB merge reservations do not fit.
    monkeypatch.setenv("SAIL_OPTIMIZER__PREFER_HASH_JOIN", "true")
    es = start_session("local", engine_memory=16 << 20)
    chunks_tried = []
    try:
        assert es.memory_limit == 16 << 20

        def materialize(df):
            if df.columns == [ITEM_ID, CODES, QUANTIZATION_ERROR, "extra"]:  # a chunk of spread movers
                chunks_tried.append(df)
            return es.materialize(df)

        frame = es.spark.createDataFrame([(str(ids[j]), codes[j].tolist(), float(errors[j]), "x",
                                           alternatives[j].tolist(), alt_errors[j].tolist()) for j in range(n)],
                                         SPREAD_SCHEMA)
        got = {r[ITEM_ID]: list(r[CODES]) for r in spread_collisions(frame, 3, materialize=materialize).collect()}
    finally:
        es.stop()
    expected = spread_last_level(codes, errors, alternatives, alt_errors, tiebreak=ids).codes
    assert got == {str(ids[j]): expected[j].tolist() for j in range(n)}
    assert len(chunks_tried) > 2  # the whole did not fit: it was split (and the parts retried)


@pytest.mark.parametrize("level1, level2, materialized, chunk_movers", [(3, 2, False, None), (40, 8, True, None),
                                                                        (40, 8, True, 100)])
def test_spread_matches_rqvae_resolve_and_never_hands_out_an_issued_tuple(spark, monkeypatch, level1, level2,
                                                                          materialized, chunk_movers):
    """6 prefixes; then 320 (more than SPREAD_BUCKETS, so one Python call resolves several prefixes) with
    the keepers computed once through a ``materialize`` callback; then the movers spread in chunks."""
    if chunk_movers:
        monkeypatch.setattr(uniquify, "SPREAD_CHUNK_MOVERS", chunk_movers)
    assert level1 * level2 == 6 or level1 * level2 > SPREAD_BUCKETS
    rng = np.random.default_rng(4)
    n, k = 400 if level1 == 3 else 1600, 6
    codes = np.column_stack([rng.integers(0, level1, n), rng.integers(0, level2, n), rng.integers(0, 5, n)])
    alternatives = np.array([[c, *[x for x in rng.permutation(12) if x != c][:k - 1]] for c in codes[:, 2]])
    errors = rng.random(n).astype(np.float32)
    alt_errors = np.sort(rng.random((n, k)).astype(np.float32), axis=1)
    alt_errors[:, 0] = errors
    ids = np.array([f"i{j:04d}" for j in rng.permutation(n)])
    issued = np.array([[0, 0, 7], [1, 1, 0], [2, 0, 3]])
    rows_in = [(str(ids[j]), codes[j].tolist(), float(errors[j]), "x", alternatives[j].tolist(),
                alt_errors[j].tolist()) for j in range(n)]
    ledger = spark.createDataFrame([(c.tolist(),) for c in issued], "codes array<int>")
    calls = []

    def materialize(df):
        calls.append(df.count())
        return spark.createDataFrame(df.collect(), df.schema)

    out = spread_collisions(spark.createDataFrame(rows_in, SPREAD_SCHEMA), 3, issued=ledger,
                            materialize=materialize if materialized else None)
    got = {r[ITEM_ID]: list(r[CODES]) for r in out.collect()}
    assert out.count() == n
    _, sizes = np.unique(codes, axis=0, return_counts=True)
    if materialized:  # all rows, the shared tuples' best errors, their keepers, movers and claims, each chunk
        assert calls[0] == n and calls[1:3] == [int((sizes > 1).sum())] * 2
        calls = calls[1:]
        tuples, held = {tuple(c) for c in codes.tolist()}, {tuple(c) for c in issued.tolist()}
        keepers = len(tuples - held)
        movers = n - keepers  # all but the best of each tuple, and the best of an issued one
        crowded = {t for t, size in zip(map(tuple, np.unique(codes, axis=0).tolist()), sizes) if size > 1}
        mover_prefixes = {t[:2] for t in crowded | (tuples & held)}
        # Claims as bitmaps: a row per (prefix of movers, word of 64 codes) that a keeper or the ledger holds;
        # every code here is below 64, so one word per prefix.
        claimed_prefixes = {t[:2] for t in (tuples - held) | held} & mover_prefixes
        assert calls[2] == movers + len(claimed_prefixes)
        chunks = -(-movers // chunk_movers) if chunk_movers else 1
        assert len(calls) == 3 + chunks and (chunks > 2) == bool(chunk_movers)
        assert sum(calls[3:]) == movers  # every mover was spread in exactly one chunk
    else:
        assert calls == []
    expected = spread_last_level(codes, errors, alternatives, alt_errors, tiebreak=ids, taken=issued).codes
    assert got == {str(ids[j]): expected[j].tolist() for j in range(n)}
    # An item on an issued tuple is one whose nearest tuple it is and that found no free alternative.
    nearest = {str(ids[j]): codes[j].tolist() for j in range(n)}
    assert all(got[i] == nearest[i] for i, c in got.items() if c in issued.tolist())
    # 6 prefixes x 12 codes for 400 items (320 for 1,600): the crowded prefixes fill up to the codes
    # their items rank.
    assert sum(got[i] != nearest[i] for i in got) > 30


def ledger_of(spark, seed: int):
    """A ledger (codes, suffix) on the prefixes of crowded_ranked_items: 150 tuples, some with several
    suffixes (retired rows), some in prefixes that get no new items (5 x 4 prefixes of which 5 x 5 exist)."""
    rng = np.random.default_rng(seed)
    rows = [([int(rng.integers(0, 5)), int(rng.integers(0, 5)), int(rng.integers(0, 24))], int(rng.integers(0, 3)))
            for _ in range(150)]
    return spark.createDataFrame(rows, "codes array<int>, suffix int")


@pytest.mark.parametrize("numeric_ids, with_ledger", [(False, False), (True, False), (False, True)])
def test_spread_and_number_in_one_map_gives_the_ids_of_the_two_steps(spark, numeric_ids, with_ledger):
    """The one grouped map (the job's plan on classic Spark) against spreading then numbering: the same
    codes, errors, suffixes and IDs for every item, with shared and filled-up tuples, tied and null errors,
    ids whose string order is not their numeric one, and a ledger whose tuples are never given out and
    whose suffixes the new ones follow."""
    items = crowded_ranked_items(900, seed=3, numeric_ids=numeric_ids)
    schema = SPREAD_SCHEMA.replace("item_id string", "item_id bigint") if numeric_ids else SPREAD_SCHEMA
    df = spark.createDataFrame(items, schema).repartition(3)
    issued = ledger_of(spark, seed=1) if with_ledger else None
    columns = [ITEM_ID, CODES, QUANTIZATION_ERROR, "extra", SUFFIX, SEMANTIC_ID, *map(prefix_column, (1, 2, 3))]
    spread = spread_collisions(df, 3, issued)
    two_steps = assign_suffixes(spread, 3) if issued is None else assign_next_suffixes(spread, issued, 3)
    one_map = uniquify.spread_and_number(df, 3, issued, buckets=7)
    assert set(one_map.columns) == set(columns)
    got = rows(one_map, columns)
    assert got == rows(two_steps, columns)
    assert len(got) == 900 and len({r[5] for r in got}) == 900  # every item once, every ID unique
    suffixed = sum(r[4] > 0 for r in got)
    moved = sum(r[1] != it[1] for r, it in zip(got, sorted(items, key=lambda it: it[0])))
    assert suffixed > 50 and moved > 100  # both rules were exercised, not just passed through
    assert sum(r[2] is None for r in got) > 10  # null errors stay null where the item kept its code
    if issued is not None:
        ledger = {(tuple(r[CODES]), r[SUFFIX]) for r in issued.collect()}
        assert not ledger & {(tuple(r[1]), r[4]) for r in got}  # no ID of the ledger is issued again
        after_ledger = {tuple(r[1]) for r in got if r[4] > 0} & {codes for codes, _ in ledger}
        assert after_ledger  # some new items number on after a tuple's issued suffixes


def test_spread_and_number_of_an_empty_frame(spark):
    out = uniquify.spread_and_number(spark.createDataFrame([], SPREAD_SCHEMA), 3)
    assert out.count() == 0 and SEMANTIC_ID in out.columns


def one_map_and_two_steps(spark, items, issued=None, schema=SPREAD_SCHEMA):
    """(one map, two steps) rows of the same input, every output column."""
    df = spark.createDataFrame(items, schema)
    columns = [ITEM_ID, CODES, QUANTIZATION_ERROR, SUFFIX, SEMANTIC_ID]
    spread = spread_collisions(df, 3, issued)
    two = assign_suffixes(spread, 3) if issued is None else assign_next_suffixes(spread, issued, 3)
    return rows(uniquify.spread_and_number(df, 3, issued, buckets=1), columns), rows(two, columns)


def test_one_map_orders_ids_byte_by_byte_as_spark_does(spark):
    """Ids that differ only by trailing NUL characters (which NumPy's strings drop) and a non-ASCII one:
    the keeper and the suffixes follow Spark's byte order in both plans."""
    ids = ["a\x00\x00", "a\x00", "a", "\u00e9", "z"]
    keep_or_suffix = [(i, [0, 0, 1], 0.25, "x", [1], [0.25]) for i in ids]
    one, two = one_map_and_two_steps(spark, keep_or_suffix)
    assert one == two
    assert {r[0]: r[3] for r in one} == {"a": 0, "a\x00": 1, "a\x00\x00": 2, "z": 3, "\u00e9": 4}
    move = [("a\x00", [0, 0, 1], 0.25, "x", [1, 2], [0.25, 0.5]), ("a", [0, 0, 1], 0.25, "x", [1, 2], [0.25, 0.5])]
    one, two = one_map_and_two_steps(spark, move)
    assert one == two and {r[0]: r[1] for r in one} == {"a": [0, 0, 1], "a\x00": [0, 0, 2]}


def test_one_map_puts_a_null_error_after_nan_as_spark_does(spark):
    items = [("b", [0, 0, 1], float("nan"), "x", [1], [0.25]), ("a", [0, 0, 1], None, "x", [1], [0.25]),
             ("c", [0, 0, 1], 0.5, "x", [1], [0.5])]
    one, two = one_map_and_two_steps(spark, items)
    assert one == two or str(one) == str(two)  # NaN != NaN: compared as text where the rows hold one
    assert {r[0]: r[3] for r in one} == {"c": 0, "b": 1, "a": 2}


def test_one_map_takes_a_ledger_tuple_whose_suffixes_are_null(spark):
    """A ledger row without a suffix (a damaged table) still holds its tuple; numbering starts at 0, as in
    assign_next_suffixes."""
    issued = spark.createDataFrame([([0, 0, 1], None)], "codes array<int>, suffix int")
    items = [("a", [0, 0, 1], 0.1, "x", [1, 2], [0.1, 0.2]), ("b", [0, 0, 1], 0.2, "x", [1, 2], [0.2, 0.3])]
    one, two = one_map_and_two_steps(spark, items, issued)
    assert one == two
    assert {r[0]: (r[1], r[3]) for r in one} == {"a": ([0, 0, 2], 0), "b": ([0, 0, 1], 0)}
