"""assign_suffixes, its incremental mode and prefix_stats on classic local JVM Spark.

The same hand-written expectations as tests/pipelines/test_uniquify.py and test_prefix_stats.py (Sail).
"""
from __future__ import annotations

import pytest

from pipelines.prefix_stats import prefix_stats, summarize
from pipelines.schema import (
    CHILDREN,
    COLLISION_GROUPS,
    ITEM_COUNT,
    ITEM_ID,
    LEVEL,
    MAX_SUFFIX,
    PREFIX,
    SEMANTIC_ID,
    SUFFIX,
    prefix_column,
)
from pipelines.uniquify import assign_suffixes, assign_suffixes_incremental

pytestmark = [pytest.mark.spark, pytest.mark.classic]

SCHEMA = "item_id string, codes array<int>, quantization_error float"
ITEMS = [
    ("a", [1, 2, 3], 0.5), ("b", [1, 2, 3], 0.1), ("c", [1, 2, 3], 0.1), ("d", [1, 2, 4], 0.2),
    ("e", [1, 5, 3], 0.3), ("f", [7, 2, 3], 0.9), ("g", [7, 2, 3], 0.4),
]
COLUMNS = [ITEM_ID, SUFFIX, SEMANTIC_ID, prefix_column(1), prefix_column(2), prefix_column(3)]
EXPECTED = [
    ("a", 2, "1_2_3_2", "1", "1_2", "1_2_3"), ("b", 0, "1_2_3_0", "1", "1_2", "1_2_3"),
    ("c", 1, "1_2_3_1", "1", "1_2", "1_2_3"), ("d", 0, "1_2_4_0", "1", "1_2", "1_2_4"),
    ("e", 0, "1_5_3_0", "1", "1_5", "1_5_3"), ("f", 1, "7_2_3_1", "7", "7_2", "7_2_3"),
    ("g", 0, "7_2_3_0", "7", "7_2", "7_2_3"),
]
EXPECTED_STATS = [
    (1, "1", 5, 2, 1, 2), (1, "7", 2, 1, 1, 1),
    (2, "1_2", 4, 2, 1, 2), (2, "1_5", 1, 1, 0, 0), (2, "7_2", 2, 1, 1, 1),
    (3, "1_2_3", 3, 3, 1, 2), (3, "1_2_4", 1, 1, 0, 0), (3, "1_5_3", 1, 1, 0, 0), (3, "7_2_3", 2, 2, 1, 1),
]


def rows(df, columns):
    return sorted(tuple(r) for r in df.select(*columns).collect())


@pytest.mark.parametrize("reverse", [False, True])
def test_assign_suffixes(classic_spark, reverse):
    df = classic_spark.createDataFrame(ITEMS[::-1] if reverse else ITEMS, SCHEMA).repartition(5)
    out = assign_suffixes(df, num_levels=3)
    assert out.schema[SUFFIX].dataType.simpleString() == "int"
    assert rows(out, COLUMNS) == EXPECTED


def test_malformed_codes_fail_naming_the_column(classic_spark):
    df = classic_spark.createDataFrame([("a", [1, None, 3], 0.1)], SCHEMA)
    with pytest.raises(Exception, match="column 'codes' must be a non-null ARRAY<INT> of length 3"):
        assign_suffixes(df, num_levels=3).collect()


def test_incremental(classic_spark):
    existing = assign_suffixes(classic_spark.createDataFrame(ITEMS, SCHEMA), num_levels=3)
    new = classic_spark.createDataFrame(
        [("a", [9, 9, 9], 0.0), ("h", [1, 2, 3], 0.05), ("k", [4, 4, 4], 0.3), ("l", [4, 4, 4], 0.2)], SCHEMA
    )
    out = assign_suffixes_incremental(new, existing, num_levels=3)
    assert rows(out, COLUMNS) == sorted(EXPECTED + [
        ("h", 3, "1_2_3_3", "1", "1_2", "1_2_3"),
        ("k", 1, "4_4_4_1", "4", "4_4", "4_4_4"),
        ("l", 0, "4_4_4_0", "4", "4_4", "4_4_4"),
    ])


def test_prefix_stats(classic_spark):
    sids = assign_suffixes(classic_spark.createDataFrame(ITEMS, SCHEMA), num_levels=3)
    out = prefix_stats(sids, num_levels=3)
    assert [t for _, t in out.dtypes] == ["int", "string", "bigint", "bigint", "bigint", "int"]
    assert rows(out, [LEVEL, PREFIX, ITEM_COUNT, CHILDREN, COLLISION_GROUPS, MAX_SUFFIX]) == EXPECTED_STATS


def test_summarize(classic_spark):
    sids = assign_suffixes(classic_spark.createDataFrame(ITEMS, SCHEMA), num_levels=3)
    s = summarize(sids, num_levels=3, codebook_size=8, suffix_budget=2, top_n=1)
    assert (s.n_items, s.distinct_tuples, s.max_group_size, s.suffix_overflow) == (7, 4, 3, 1)
    assert s.group_size_histogram == ((1, 2), (2, 1), (3, 1))
    assert [(p.level, p.prefix) for p in s.top_prefixes] == [(1, "1"), (2, "1_2"), (3, "1_2_3")]
    assert [u.counts for u in s.levels][0] == (0, 5, 0, 0, 0, 0, 0, 2)


def crowded_items(n: int = 300) -> list[tuple[str, list[int], float]]:
    """``n`` items on 4 x 3 x 3 tuples: every prefix crowded, so suffixes count up within each tuple."""
    import random

    rng = random.Random(5)
    return [(f"i{j:03d}", [rng.randrange(4), rng.randrange(3), rng.randrange(3)], rng.random()) for j in range(n)]


def test_work_in_parts_of_the_prefixes_on_the_jvm(classic_spark):
    """A large catalog's suffixes, statistics and ledger check go in parts of the prefixes (or of the ids),
    one after another, each part checkpointed by the JVM (the job's ``materialize`` on classic Spark, which
    filters the frame per part, as it has no scratch folder to split into): the same rows as one pass."""
    from pipelines.ledger import check_ledger
    from pipelines.prefix_stats import report_tables
    from pipelines.uniquify import in_prefix_parts

    df = classic_spark.createDataFrame(crowded_items(), SCHEMA)
    checkpoints = []

    def materialize(frame):
        checkpoints.append(frame)
        return frame.localCheckpoint(eager=True)

    def numbered(frame):
        return assign_suffixes(frame, num_levels=3)

    lines = []
    whole = rows(numbered(df), COLUMNS)
    in_parts = in_prefix_parts([df], 3, 4, numbered, materialize, progress=lambda d, n: lines.append((d, n)))
    assert rows(in_parts, COLUMNS) == whole
    assert len(checkpoints) == 4 and lines == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert max(s for _, s, *_ in whole) > 5  # crowded: the numbering across a tuple's items is checked

    sids = classic_spark.createDataFrame(
        [(i, s, sid, list(map(int, sid.split("_")[:3]))) for i, s, sid, *_ in whole],
        "item_id string, suffix int, semantic_id string, codes array<int>")
    one, three = (report_tables(sids, codebook_size=4, suffix_budget=8, materialize=materialize, parts=p)
                  for p in (1, 3))
    stats = [LEVEL, PREFIX, ITEM_COUNT, CHILDREN, COLLISION_GROUPS, MAX_SUFFIX]
    assert rows(three.prefix_stats, stats) == rows(one.prefix_stats, stats)
    assert three.summary == one.summary and one.summary.n_items == 300

    ledger = sids.selectExpr("item_id", "semantic_id", "true AS active")
    assert check_ledger(ledger, expected_active=300, parts=3) == 300
    reused = ledger.unionByName(ledger.limit(1).selectExpr("'other' AS item_id", "semantic_id", "false AS active"))
    with pytest.raises(Exception, match="301 rows hold 300 distinct semantic IDs"):
        check_ledger(reused, expected_active=300, parts=3)


@pytest.mark.parametrize("with_ledger", [False, True])
def test_spread_and_number_in_one_map_on_the_jvm(classic_spark, with_ledger):
    """The plan the job uses on classic Spark (one grouped map of the items to issue, with the ledger's
    tuples in their prefixes) gives the IDs of spreading then numbering, with crowded prefixes, tied and
    null errors."""
    from helpers import crowded_ranked_items

    from pipelines.schema import ALTERNATIVE_ERRORS, ALTERNATIVES, CODES, QUANTIZATION_ERROR
    from pipelines.uniquify import assign_next_suffixes, spread_and_number, spread_collisions

    schema = (f"item_id string, codes array<int>, quantization_error float, extra string, "
              f"{ALTERNATIVES} array<int>, {ALTERNATIVE_ERRORS} array<float>")
    df = classic_spark.createDataFrame(crowded_ranked_items(600, seed=8), schema).repartition(3)
    issued = classic_spark.createDataFrame([([p % 5, p // 5 % 4, p % 23], p % 3) for p in range(0, 400, 3)],
                                           "codes array<int>, suffix int") if with_ledger else None
    columns = [ITEM_ID, CODES, QUANTIZATION_ERROR, "extra", SUFFIX, SEMANTIC_ID, *map(prefix_column, (1, 2, 3))]
    got = rows(spread_and_number(df, 3, issued), columns)
    spread = spread_collisions(df, 3, issued)
    two_steps = assign_suffixes(spread, 3) if issued is None else assign_next_suffixes(spread, issued, 3)
    assert got == rows(two_steps, columns)
    assert len({r[5] for r in got}) == 600 and sum(r[4] > 0 for r in got) > 50


def test_spread_and_number_in_parts_of_the_prefixes_on_the_jvm(classic_spark):
    """Above PART_ITEMS the job runs the one grouped map per part of the prefixes, the items and the ledger
    split alike (``in_prefix_parts``): the same IDs as one pass."""
    from helpers import crowded_ranked_items

    from pipelines.schema import ALTERNATIVE_ERRORS, ALTERNATIVES, CODES, QUANTIZATION_ERROR
    from pipelines.uniquify import in_prefix_parts, spread_and_number

    schema = (f"item_id string, codes array<int>, quantization_error float, extra string, "
              f"{ALTERNATIVES} array<int>, {ALTERNATIVE_ERRORS} array<float>")
    df = classic_spark.createDataFrame(crowded_ranked_items(600, seed=2), schema)
    issued = classic_spark.createDataFrame([([p % 5, p // 5 % 4, p % 23], p % 3) for p in range(0, 400, 3)],
                                           "codes array<int>, suffix int")
    columns = [ITEM_ID, CODES, QUANTIZATION_ERROR, "extra", SUFFIX, SEMANTIC_ID, *map(prefix_column, (1, 2, 3))]
    checkpoints = []

    def materialize(frame):
        checkpoints.append(frame)
        return frame.localCheckpoint(eager=True)

    def work(items, ledger):
        return spread_and_number(items, 3, ledger)

    whole = rows(work(df, issued), columns)
    assert rows(in_prefix_parts([df, issued], 3, 3, work, materialize), columns) == whole
    assert len(checkpoints) == 3 and len(whole) == 600


def test_one_map_follows_the_jvms_byte_order_of_ids_and_its_nulls_last(classic_spark):
    """Ids that differ by trailing NUL characters or hold non-ASCII characters, a NaN and a null error: the
    one grouped map keeps, moves and numbers them as the JVM's plan does."""
    from pipelines.schema import ALTERNATIVE_ERRORS, ALTERNATIVES, CODES
    from pipelines.uniquify import spread_and_number, spread_collisions

    schema = (f"item_id string, codes array<int>, quantization_error float, {ALTERNATIVES} array<int>, "
              f"{ALTERNATIVE_ERRORS} array<float>")
    items = [(i, [0, 0, 1], e, [1, 2], [0.25 if e is None else e, 0.5])
             for i, e in [("a\x00\x00", 0.25), ("a\x00", 0.25), ("a", 0.25), ("\u00e9", 0.25), ("z", 0.25),
                          ("n", float("nan")), ("u", None)]]
    df = classic_spark.createDataFrame(items, schema)
    columns = [ITEM_ID, CODES, SUFFIX, SEMANTIC_ID]
    got = rows(spread_and_number(df, 3), columns)
    assert got == rows(assign_suffixes(spread_collisions(df, 3), 3), columns)
    # "a" keeps 0_0_1, "a\x00" (next in byte order) takes the free 0_0_2, the rest number on 0_0_1.
    by_id = [r[0] for r in sorted(got, key=lambda r: r[3])]
    assert by_id == ["a", "a\x00\x00", "z", "\u00e9", "n", "u", "a\x00"]
