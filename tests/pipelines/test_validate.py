"""validate_catalog: every bad-input kind is quarantined with its reason; nothing is dropped."""
from __future__ import annotations

import helpers
import numpy as np
import pyarrow as pa
import pytest

from pipelines.schema import CATEGORY, EMBEDDING, ITEM_ID, REASON, InputColumns, RejectReason
from pipelines.validate import (
    SchemaError,
    TooManyRejectsError,
    check_reject_share,
    row_reason_codes,
    validate_catalog,
    validation_counts,
)

CASES = helpers.REJECT_CASES  # every bad-input kind, with its reason; the input uses non-contract names
COLUMNS = InputColumns(item_id="id", embedding="vec")


@pytest.fixture(scope="module")
def catalog(spark):
    return spark.createDataFrame([(i, v, 7) for i, v, _ in CASES], "id string, vec array<double>, extra int")


@pytest.fixture(scope="module")
def result(catalog):
    return validate_catalog(catalog, COLUMNS, dim=3)


@pytest.mark.spark
def test_each_bad_row_has_its_reason(result) -> None:
    got = sorted((r[ITEM_ID] or "", r[REASON]) for r in result.rejects.collect())
    assert got == helpers.expected_rejects()


@pytest.mark.spark
def test_clean_rows_use_contract_names_and_float_arrays(result) -> None:
    assert result.clean.columns == [ITEM_ID, EMBEDDING]
    assert result.clean.schema[EMBEDDING].dataType.simpleString() == "array<float>"
    rows = {r[ITEM_ID]: r[EMBEDDING] for r in result.clean.collect()}
    assert rows == {"ok-1": [1.0, 2.0, 3.0], "ok-2": [0.0, 0.0, pytest.approx(1e-3)], "negative": [-1.0, -2.0, -3.0],
                    "large": [pytest.approx(1e18), 1.0, 1.0], "small": [pytest.approx(1e-11), 0.0, 0.0]}
    assert result.rejects.schema[ITEM_ID].dataType.simpleString() == "string"


@pytest.mark.spark
def test_rows_are_accounted_for_and_counted_per_reason(catalog, result) -> None:
    n_clean, n_rejects = result.clean.count(), result.rejects.count()
    assert n_clean + n_rejects == catalog.count() == len(CASES)
    expected = {reason: sum(c[2] == reason for c in CASES) for reason in RejectReason.ALL}
    assert validation_counts(result).rejected == expected


@pytest.mark.spark
def test_dim_is_inferred_as_the_most_common_length(catalog) -> None:
    assert validate_catalog(catalog, COLUMNS).dim == 3


@pytest.mark.spark
def test_bigint_ids_duplicates_and_category(spark) -> None:
    df = spark.createDataFrame(
        [(1, [1.0, 2.0], ["a", "b"]), (1, [1.0, 2.0], ["a"]),
         (2, [3.0, 4.0], ["a", "c"]), (3, [0.0, 0.0], None)],
        "item_id bigint, embedding array<float>, path array<string>",
    )
    res = validate_catalog(df, InputColumns(category="path"))
    assert res.clean.columns == [ITEM_ID, EMBEDDING, CATEGORY]
    assert res.clean.schema[ITEM_ID].dataType.simpleString() == "bigint"
    assert [tuple(r) for r in res.clean.collect()] == [(2, [3.0, 4.0], ["a", "c"])]
    got = sorted(tuple(r) for r in res.rejects.collect())
    assert got == [(1, RejectReason.DUPLICATE_ID)] * 2 + [(3, RejectReason.ZERO_VECTOR)]
    # Rejects keep the catalog's id type, so they join back to it (and to the output) without casts.
    assert res.rejects.schema[ITEM_ID].dataType.simpleString() == "bigint"


@pytest.mark.spark
@pytest.mark.parametrize(
    ("item_id", "embedding", "category", "message"),
    [
        ("sku", "vec", "", r"column 'sku' not found .* --id-col"),
        ("id", "emb", "", r"column 'emb' not found .* --embedding-col"),
        ("id", "extra", "", r"'extra' has type int, expected ARRAY<FLOAT> or ARRAY<DOUBLE>.*--embedding-col"),
        ("vec", "vec", "", r"'vec' has type array<double>, expected STRING or BIGINT.* --id-col"),
        ("id", "vec", "cat", r"column 'cat' not found .* --category-col"),
        ("id", "vec", "vec", r"'vec' has type array<double>, expected ARRAY<STRING>.* --category-col"),
    ],
)
def test_schema_errors_name_the_column_and_the_flag(catalog, item_id, embedding, category, message) -> None:
    with pytest.raises(SchemaError, match=message):
        validate_catalog(catalog, InputColumns(item_id, embedding, category), dim=3)


@pytest.mark.spark
def test_dim_cannot_be_inferred_without_embeddings(spark) -> None:
    df = spark.createDataFrame([("a", None)], "item_id string, embedding array<float>")
    with pytest.raises(ValueError, match="column 'embedding' has no non-null values"):
        validate_catalog(df)


def test_check_reject_share() -> None:
    check_reject_share(1, 10, max_share=0.1)
    check_reject_share(0, 0, max_share=0.0)
    with pytest.raises(TooManyRejectsError, match=r"2 of 10 input rows \(20.00%\).*--max-reject-share 0.1"):
        check_reject_share(2, 10, max_share=0.1)
    with pytest.raises(ValueError, match="between 0 and 1"):
        check_reject_share(0, 10, max_share=1.5)


@pytest.mark.spark
def test_validation_counts_match_the_clean_and_rejects_frames(result) -> None:
    counts = validation_counts(result)
    assert counts.clean == result.clean.count() == sum(1 for _, _, reason in CASES if reason is None) == 5
    expected = {reason: 0 for reason in RejectReason.ALL}
    for _, _, reason in CASES:
        if reason:
            expected[reason] += 1
    assert counts.rejected == expected
    assert counts.n_rejected == result.rejects.count()


@pytest.mark.spark
def test_infer_dim_reads_only_its_sample(spark) -> None:
    from pipelines.validate import infer_dim

    # 3 rows of length 2 first, then 5 of length 4: the whole column says 4, the 3-row sample says 2.
    rows = [(i, [1.0] * 2) for i in range(3)] + [(i, [1.0] * 4) for i in range(3, 8)]
    df = spark.createDataFrame(rows, "item_id bigint, embedding array<float>").coalesce(1)
    assert infer_dim(df, sample_rows=3) == 2
    assert infer_dim(df, sample_rows=100) == 4
    tied = spark.createDataFrame([(0, [1.0] * 4), (1, [1.0] * 3), (2, [1.0] * 4), (3, [1.0] * 3)],
                                 "item_id bigint, embedding array<float>").coalesce(1)
    assert infer_dim(tied) == 3  # as often as 4: the shorter length wins


# --- the same rules on Arrow batches (the encode UDF's checks) -------------------------------------

PER_ROW = [(i, v, r) for i, v, r in CASES if r != RejectReason.DUPLICATE_ID]  # duplicates need every row


def reasons_of(ids: pa.Array, embeddings: pa.Array, dim: int = 3) -> list:
    return [RejectReason.ALL[c] if c >= 0 else None for c in row_reason_codes(ids, embeddings, dim)]


@pytest.mark.parametrize("list_type", [pa.list_(pa.float64()), pa.list_(pa.float32()), pa.large_list(pa.float32())])
def test_row_reason_codes_match_the_sql_rules(list_type) -> None:
    ids = pa.array([i for i, _, _ in PER_ROW], pa.string())
    with np.errstate(over="ignore"):
        vectors = pa.array([v for _, v, _ in PER_ROW], pa.list_(pa.float64())).cast(list_type, safe=False)
    assert reasons_of(ids, vectors) == [r for _, _, r in PER_ROW]


def test_row_reason_codes_check_each_row_of_a_duplicated_id_on_its_own() -> None:
    dups = [(i, v) for i, v, r in CASES if r == RejectReason.DUPLICATE_ID]
    ids, vectors = pa.array([i for i, _ in dups]), pa.array([v for _, v in dups], pa.list_(pa.float32()))
    assert reasons_of(ids, vectors) == [None, None, RejectReason.NON_FINITE, RejectReason.NULL_EMBEDDING]


def test_row_reason_codes_on_slices_chunks_and_fixed_size_lists() -> None:
    ids = pa.array([i for i, _, _ in PER_ROW], pa.string())
    vectors = pa.array([v for _, v, _ in PER_ROW], pa.list_(pa.float32()))
    expected = [r for _, _, r in PER_ROW]
    for start, stop in [(1, 9), (5, len(PER_ROW)), (10, 11)]:  # the slice offset must be honoured
        assert reasons_of(ids[start:stop], vectors[start:stop]) == expected[start:stop]
    chunked = pa.chunked_array([vectors[:7], vectors[7:]])
    assert reasons_of(ids, chunked) == expected
    three = [k for k, (_, v, _) in enumerate(PER_ROW) if v is None or len(v) == 3]
    fixed = pa.array([PER_ROW[k][1] for k in three], pa.list_(pa.float32(), 3))
    assert reasons_of(pa.array([PER_ROW[k][0] for k in three])[1:], fixed[1:]) == [PER_ROW[k][2] for k in three][1:]


def test_a_clean_batch_has_no_reasons() -> None:
    vectors = helpers.random_vectors(50, 4, seed=3)
    embeddings = pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), 4).cast(pa.list_(pa.float32()))
    assert (row_reason_codes(pa.array(range(50)), embeddings, 4) == -1).all()
    assert (row_reason_codes(pa.array(range(50)), embeddings, 5) == RejectReason.ALL.index(
        RejectReason.WRONG_LENGTH)).all()


def test_a_recount_that_differs_names_both_counts_and_both_causes() -> None:
    from pipelines.validate import RowAccountingError, ValidationCounts, check_counts

    earlier = (10, ValidationCounts(8, {"zero_vector": 2, "null_embedding": 0}))
    same_totals = ValidationCounts(8, {"zero_vector": 1, "null_embedding": 1})  # the totals alone agree
    with pytest.raises(RowAccountingError) as failed:
        check_counts(10, same_totals, 0.5, earlier)
    message = str(failed.value)
    assert "rejected {'zero_vector': 2} when validated" in message
    assert "rejected {'zero_vector': 1, 'null_embedding': 1} when encoded" in message
    assert "catalog changed during the run" in message and "checks disagree" in message
    check_counts(10, ValidationCounts(8, {"zero_vector": 2, "null_embedding": 0}), 0.5, earlier)  # same: no error


def test_counts_that_do_not_add_up_or_hold_nothing_valid_are_refused() -> None:
    from pipelines.validate import NoValidRowsError, RowAccountingError, ValidationCounts, check_counts

    with pytest.raises(RowAccountingError, match="10 input rows != 8 valid \\+ 1 rejected"):
        check_counts(10, ValidationCounts(8, {"zero_vector": 1}), 0.5)
    with pytest.raises(NoValidRowsError, match="no valid rows"):
        check_counts(2, ValidationCounts(0, {"zero_vector": 2}), 1.0)
    with pytest.raises(TooManyRejectsError, match="2 of 10 input rows"):
        check_counts(10, ValidationCounts(8, {"zero_vector": 2}), 0.1)
