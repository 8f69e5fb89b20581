"""assign_suffixes / assign_suffixes_incremental on the embedded (Sail) engine; expectations by hand."""
from __future__ import annotations

import pytest

from pipelines.schema import CODES, ITEM_ID, QUANTIZATION_ERROR, SEMANTIC_ID, SUFFIX, prefix_column
from pipelines.uniquify import assign_suffixes, assign_suffixes_incremental
from pipelines.validate import SchemaError

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
