"""prefix_stats / code_counts / level_stats / summarize on the embedded (Sail) engine; values by hand."""
from __future__ import annotations

import json
import math

import helpers
import numpy as np
import pytest

from pipelines.prefix_stats import (
    LevelUsage,
    PrefixRow,
    PrefixSummary,
    code_counts,
    level_stats,
    prefix_stats,
    report_tables,
    summarize,
)
from pipelines.schema import CHILDREN, CODE, COLLISION_GROUPS, ITEM_COUNT, LEVEL, MAX_SUFFIX, PREFIX
from rqvae.metrics import code_usage_from_counts

pytestmark = pytest.mark.spark

SCHEMA = "item_id string, codes array<int>, suffix int"
# The semantic-ID table of tests/pipelines/test_uniquify.py (groups 1_2_3 x3, 1_2_4, 1_5_3, 7_2_3 x2).
SIDS = [
    ("a", [1, 2, 3], 2), ("b", [1, 2, 3], 0), ("c", [1, 2, 3], 1), ("d", [1, 2, 4], 0),
    ("e", [1, 5, 3], 0), ("f", [7, 2, 3], 1), ("g", [7, 2, 3], 0),
]
STATS_COLUMNS = [LEVEL, PREFIX, ITEM_COUNT, CHILDREN, COLLISION_GROUPS, MAX_SUFFIX]
EXPECTED_STATS = [  # level, prefix, items, children, collision groups, max suffix
    (1, "1", 5, 2, 1, 2),  # children: level-2 codes {2, 5}
    (1, "7", 2, 1, 1, 1),
    (2, "1_2", 4, 2, 1, 2),  # children: level-3 codes {3, 4}
    (2, "1_5", 1, 1, 0, 0),
    (2, "7_2", 2, 1, 1, 1),
    (3, "1_2_3", 3, 3, 1, 2),  # level L: children = distinct suffixes = items
    (3, "1_2_4", 1, 1, 0, 0),
    (3, "1_5_3", 1, 1, 0, 0),
    (3, "7_2_3", 2, 2, 1, 1),
]
EXPECTED_COUNTS = [(1, 1, 5), (1, 7, 2), (2, 2, 6), (2, 5, 1), (3, 3, 6), (3, 4, 1)]  # level, code, items


def rows(df, columns):
    return sorted(tuple(r) for r in df.select(*columns).collect())


@pytest.fixture(scope="module")
def sids(spark):
    return spark.createDataFrame(SIDS, SCHEMA)


def test_prefix_stats_hand_checked(sids):
    out = prefix_stats(sids, num_levels=3)
    assert out.dtypes == [(LEVEL, "int"), (PREFIX, "string"), (ITEM_COUNT, "bigint"), (CHILDREN, "bigint"),
                          (COLLISION_GROUPS, "bigint"), (MAX_SUFFIX, "int")]
    assert rows(out, STATS_COLUMNS) == EXPECTED_STATS


def test_prefix_stats_ignores_input_layout(sids):
    assert rows(prefix_stats(sids.repartition(5), num_levels=3), STATS_COLUMNS) == EXPECTED_STATS


def test_code_counts(sids):
    assert rows(code_counts(sids, num_levels=3), [LEVEL, CODE, ITEM_COUNT]) == EXPECTED_COUNTS


def test_level_stats_uses_the_metrics_definitions(sids):
    usage = level_stats(sids, num_levels=3, codebook_size=8)
    assert [u.level for u in usage] == [1, 2, 3]
    assert usage[0].counts == (0, 5, 0, 0, 0, 0, 0, 2)
    assert usage[1].counts == (0, 0, 6, 0, 0, 1, 0, 0)
    assert [(u.used_codes, u.dead_codes, u.utilization) for u in usage] == [(2, 6, 0.25)] * 3
    entropy_l1 = -(5 / 7 * math.log(5 / 7) + 2 / 7 * math.log(2 / 7))
    assert usage[0].entropy == pytest.approx(entropy_l1)
    assert usage[0].perplexity == pytest.approx(math.exp(entropy_l1))
    assert usage[0].gini == pytest.approx(code_usage_from_counts(np.array(usage[0].counts)).gini)


def test_level_stats_rejects_codes_outside_the_codebook(sids):
    with pytest.raises(ValueError, match="column 'codes' holds code 7 at level 1, outside"):
        level_stats(sids, num_levels=3, codebook_size=6)


def test_summarize_hand_checked(sids):
    s = summarize(sids, num_levels=3, codebook_size=8, suffix_budget=2, top_n=2)
    assert (s.n_items, s.distinct_tuples, s.max_group_size) == (7, 4, 3)
    assert (s.suffix_budget, s.suffix_overflow) == (2, 1)  # only a has suffix >= 2
    assert s.unique_rate == pytest.approx(4 / 7)
    assert s.collision_rate == pytest.approx(3 / 7)
    assert s.items_in_collisions == pytest.approx(5 / 7)  # a, b, c, f, g
    assert s.group_size_histogram == ((1, 2), (2, 1), (3, 1))
    assert (s.num_levels, s.codebook_size) == (3, 8)
    assert s.levels == tuple(level_stats(sids, num_levels=3, codebook_size=8))
    assert s.top_prefixes == (
        PrefixRow(1, "1", 5, 2, 1, 2), PrefixRow(1, "7", 2, 1, 1, 1),
        PrefixRow(2, "1_2", 4, 2, 1, 2), PrefixRow(2, "7_2", 2, 1, 1, 1),
        PrefixRow(3, "1_2_3", 3, 3, 1, 2), PrefixRow(3, "7_2_3", 2, 2, 1, 1),
    )


def test_summary_json_round_trip(sids):
    s = summarize(sids, num_levels=3, codebook_size=8, suffix_budget=2, top_n=2)
    assert PrefixSummary.from_dict(json.loads(json.dumps(s.to_dict()))) == s
    assert isinstance(s.levels[0], LevelUsage)
    assert "counts" not in s.levels[0].metrics()


def test_summarize_empty_table_is_an_error(spark):
    with pytest.raises(ValueError, match="no rows"):
        summarize(spark.createDataFrame([], SCHEMA), num_levels=3, codebook_size=8, suffix_budget=2)


@pytest.mark.parametrize(("parts", "with_split"), [(1, False), (3, False), (3, True)])
def test_report_tables_in_parts_of_the_prefixes_are_the_hand_checked_ones(spark, sids, parts, with_split):
    """A large table's statistics are computed one part of the prefixes after another, each materialised
    (with ``split``, the table's rows split into the parts once): the same rows and summary as the whole
    table's."""
    materialized, splits = [], []

    def materialize(df):
        materialized.append(df)
        return spark.createDataFrame(df.collect(), df.schema)

    out = report_tables(sids, codebook_size=8, suffix_budget=2, materialize=materialize, parts=parts,
                        split=helpers.collected_split(spark, splits) if with_split else None)
    assert rows(out.prefix_stats, STATS_COLUMNS) == EXPECTED_STATS
    assert out.summary == summarize(sids, num_levels=3, codebook_size=8, suffix_budget=2)
    assert len(materialized) == (2 if parts == 1 else 2 * parts + 1)  # groups and stats of every part, the union
    assert splits == ([(3, ("codes", "suffix"))] if with_split else [])
    # L given by the caller (the job passes its model's) instead of read from the table: the same tables
    given = report_tables(sids, codebook_size=8, suffix_budget=2, materialize=materialize, parts=parts, num_levels=3)
    assert rows(given.prefix_stats, STATS_COLUMNS) == EXPECTED_STATS and given.summary == out.summary


def _collected(df):
    return df.select(*[c for c in ("active", "codes", "suffix") if c in df.columns]).toArrow()


def test_report_tables_from_collected_rows_are_the_hand_checked_ones(spark, sids):
    """A small table's statistics computed in this process from its collected rows (the job's on a JVM engine):
    the engine's rows, types and summary, and nothing materialised by the engine."""
    materialized = []
    out = report_tables(sids, codebook_size=8, suffix_budget=2, materialize=lambda df: materialized.append(df),
                        num_levels=3, collected=_collected(sids))
    assert out.prefix_stats.dtypes == prefix_stats(sids, num_levels=3).dtypes
    assert rows(out.prefix_stats, STATS_COLUMNS) == EXPECTED_STATS
    assert out.summary == summarize(sids, num_levels=3, codebook_size=8, suffix_budget=2)
    assert rows(out.level_stats, ["level", "used_codes"]) == [(1, 2), (2, 2), (3, 2)]
    assert materialized == []


def test_report_tables_from_collected_rows_match_the_engine_on_a_larger_table(spark):
    """Random tuples with crowded prefixes and shared tuples, inactive rows (left out) and suffixes past the
    budget: every prefix row, the histogram, the usages and the top prefixes as the engine computes them."""
    rng = np.random.default_rng(7)
    n = 3000
    codes = np.stack([rng.integers(0, 5, n), rng.integers(0, 12, n), rng.integers(0, 12, n)], axis=1)
    codes[:400] = codes[0]  # one tuple shared by 400 items
    data = [(f"i{i}", [int(c) for c in codes[i]], int(rng.integers(0, 40)), bool(i % 7)) for i in range(n)]
    table = spark.createDataFrame(data, "item_id string, codes array<int>, suffix int, active boolean")
    engine = report_tables(table, codebook_size=12, suffix_budget=16, materialize=lambda df: None, num_levels=3)
    here = report_tables(table, codebook_size=12, suffix_budget=16, materialize=lambda df: None, num_levels=3,
                         collected=_collected(table))
    assert rows(here.prefix_stats, STATS_COLUMNS) == rows(engine.prefix_stats, STATS_COLUMNS)
    assert here.summary == engine.summary
    assert here.summary.n_items == n - len(range(0, n, 7)) and here.summary.suffix_overflow > 0
    assert here.summary.max_group_size >= 300


def test_report_tables_from_collected_rows_say_what_the_engine_says_of_bad_codes(spark, sids):
    with pytest.raises(ValueError, match="column 'codes' holds code 7 at level 1, outside"):
        report_tables(sids, codebook_size=6, suffix_budget=2, materialize=lambda df: None, num_levels=3,
                      collected=_collected(sids))
    empty = spark.createDataFrame([], SCHEMA)
    with pytest.raises(ValueError, match="no rows"):
        report_tables(empty, codebook_size=8, suffix_budget=2, materialize=lambda df: None, num_levels=3,
                      collected=_collected(empty))


def test_report_tables_leave_rows_numpy_cannot_key_to_the_engine(spark):
    """A null suffix, or a row whose codes are not an L-long tuple: what the engine computes (or raises), as
    without collected rows."""
    nulls = spark.createDataFrame([("a", [1, 2, 3], 0), ("b", [1, 2, 3], None), ("c", [1, 2, 4], 1)], SCHEMA)
    engine = report_tables(nulls, codebook_size=8, suffix_budget=1, materialize=lambda df: None, num_levels=3)
    here = report_tables(nulls, codebook_size=8, suffix_budget=1, materialize=lambda df: None, num_levels=3,
                         collected=_collected(nulls))
    assert rows(here.prefix_stats, STATS_COLUMNS) == rows(engine.prefix_stats, STATS_COLUMNS)
    assert here.summary == engine.summary and here.summary.n_items == 3
    ragged = spark.createDataFrame([("a", [1, 2, 3], 0), ("b", [1, 2], 0)], SCHEMA)
    with pytest.raises(Exception, match="INVALID_ARRAY_INDEX"):
        report_tables(ragged, codebook_size=8, suffix_budget=2, materialize=lambda df: None, num_levels=3,
                      collected=_collected(ragged))
