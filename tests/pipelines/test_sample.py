"""sample_for_training: exact size, same items under any partitioning and on any engine."""
from __future__ import annotations

import numpy as np
import pytest
from pyspark.sql import functions as F

from pipelines.sample import (
    collect_training_arrays,
    hash_threshold,
    keep_fraction,
    sample_for_training,
    sample_hash,
)
from pipelines.schema import CATEGORY, EMBEDDING, ITEM_ID

# The same literals are asserted on classic Spark in tests/classic/test_stages_classic.py: both engines
# must pick exactly these items (xxhash64 of the id string and the seed).
EXPECTED_STRING_IDS_SEED_7 = [
    "item-015", "item-036", "item-043", "item-047", "item-068",
    "item-073", "item-084", "item-149", "item-193", "item-196",
]
EXPECTED_BIGINT_IDS_SEED_3 = [29, 74, 77, 93, 106, 114, 132, 175, 179, 184]


@pytest.fixture(scope="module")
def items(spark):
    """200 items ``item-000``..``item-199`` with embedding [i, 1]."""
    rows = [(f"item-{i:03d}", [float(i), 1.0]) for i in range(200)]
    return spark.createDataFrame(rows, "item_id string, embedding array<float>")


def ids_of(df) -> list:
    return sorted(r[ITEM_ID] for r in df.select(ITEM_ID).collect())


@pytest.mark.spark
def test_sample_is_the_expected_item_set(items, spark) -> None:
    assert ids_of(sample_for_training(items, 10, seed=7)) == EXPECTED_STRING_IDS_SEED_7
    bigint = spark.range(1, 201).select(F.col("id").alias(ITEM_ID), F.array(F.lit(1.0)).alias("embedding"))
    assert ids_of(sample_for_training(bigint, 10, seed=3)) == EXPECTED_BIGINT_IDS_SEED_3


@pytest.mark.spark
def test_sample_is_the_k_smallest_hashes(items) -> None:
    """The threshold is only a shortcut: the result equals a full sort by (hash, item_id)."""
    full_sort = items.orderBy(sample_hash(7), ITEM_ID).limit(10)
    assert ids_of(sample_for_training(items, 10, seed=7)) == ids_of(full_sort)


@pytest.mark.spark
def test_sample_does_not_depend_on_partitioning(items) -> None:
    expected = ids_of(sample_for_training(items, 25, seed=11))
    assert len(expected) == 25
    assert ids_of(sample_for_training(items.repartition(7), 25, seed=11, n_rows=200)) == expected
    assert ids_of(sample_for_training(items.orderBy(F.desc(ITEM_ID)).coalesce(1), 25, seed=11)) == expected


@pytest.mark.spark
def test_seed_changes_the_sample_and_size_is_capped(items) -> None:
    assert ids_of(sample_for_training(items, 10, seed=8)) != EXPECTED_STRING_IDS_SEED_7
    assert ids_of(sample_for_training(items, 500, seed=7)) == ids_of(items)
    assert sample_for_training(items, 10, seed=7).columns == items.columns


@pytest.mark.parametrize(("k", "n"), [(10, 200), (1000, 10**6), (10**6, 10**9), (100, 100)])
def test_threshold_keeps_enough_rows(k: int, n: int) -> None:
    fraction = keep_fraction(k, n)
    assert fraction == 1.0 or n * fraction >= k + 8 * k**0.5
    assert hash_threshold(1.0) == 2**63 - 1 and hash_threshold(0.5) == 0
    with pytest.raises(ValueError, match="sample_size must be >= 1"):
        sample_for_training(None, 0, seed=1)


@pytest.mark.spark
def test_collect_training_arrays(spark) -> None:
    df = spark.createDataFrame(
        [("b", [3.0, 4.0], ["x", "y"]), ("a", [1.0, 2.0], None), ("c", [5.0, 6.0], ["x"])],
        f"{ITEM_ID} string, embedding array<float>, {CATEGORY} array<string>",
    ).repartition(2)
    arrays = collect_training_arrays(df, dim=2, category_col=CATEGORY)
    assert arrays.item_ids.tolist() == ["a", "b", "c"]
    assert arrays.embeddings.dtype == np.float32 and arrays.embeddings.flags.c_contiguous
    assert arrays.embeddings.flags.writeable
    np.testing.assert_array_equal(arrays.embeddings, [[1, 2], [3, 4], [5, 6]])
    assert arrays.categories == [[], ["x", "y"], ["x"]]
    assert collect_training_arrays(df, dim=2).categories is None


@pytest.mark.spark
def test_collect_training_arrays_bigint_and_empty(spark) -> None:
    df = spark.range(3).select(F.col("id").alias(ITEM_ID), F.array(F.lit(1.0).cast("float")).alias(EMBEDDING))
    arrays = collect_training_arrays(df, dim=1)
    assert arrays.item_ids.dtype == np.int64 and arrays.item_ids.tolist() == [0, 1, 2]
    empty = collect_training_arrays(df.where("false"), dim=1)
    assert empty.embeddings.shape == (0, 1) and len(empty.item_ids) == 0
