"""Encode stage: the mapInArrow UDF equals rqvae's batch encoding; one model per worker process."""
from __future__ import annotations

import hashlib

import helpers
import numpy as np
import pyarrow as pa
import pytest
import torch

import pipelines.encode as encode
import rqvae.checkpoint
from pipelines.arrow_utils import matrix_to_list_array
from pipelines.encode import encode_embeddings, make_encoder
from pipelines.schema import (
    CODES,
    EMBEDDING,
    EMBEDDING_FINGERPRINT,
    ITEM_ID,
    QUANTIZATION_ERROR,
    REASON,
    InputColumns,
    RejectReason,
)
from pipelines.validate import SchemaError, count_reasons, flag_duplicates, validate_catalog
from rqvae import encode_array, load_checkpoint

DIM, LEVELS = 8, 3
N = 60


@pytest.fixture(scope="module")
def checkpoint() -> bytes:
    return helpers.untrained_checkpoint(DIM, levels=LEVELS, codebook_size=8, seed=1)


@pytest.fixture(scope="module")
def vectors() -> np.ndarray:
    return helpers.random_vectors(N, DIM, seed=2)


@pytest.fixture(scope="module")
def expected(checkpoint, vectors):
    return encode_array(load_checkpoint(checkpoint), vectors)


def batch(ids: list, vectors: np.ndarray | list) -> pa.RecordBatch:
    embedding = pa.array([list(map(float, v)) for v in vectors], pa.list_(pa.float32()))
    return pa.RecordBatch.from_arrays([pa.array(ids), embedding], names=[ITEM_ID, EMBEDDING])


@pytest.mark.spark
@pytest.mark.parametrize("id_type", ["string", "bigint"])
def test_udf_equals_batch_encoding_per_id(spark, checkpoint, vectors, expected, id_type) -> None:
    ids = [f"item-{i:03d}" for i in range(N)] if id_type == "string" else [10_000 + 7 * i for i in range(N)]
    rows = [(item, [float(x) for x in v]) for item, v in zip(ids, vectors)]
    df = spark.createDataFrame(rows[::-1], f"{ITEM_ID} {id_type}, {EMBEDDING} array<float>").repartition(3)
    out = encode_embeddings(df, checkpoint, DIM, batch_size=16)
    assert out.schema.simpleString() == (
        f"struct<{ITEM_ID}:{id_type},{CODES}:array<int>,{QUANTIZATION_ERROR}:float,{REASON}:string>")
    got = {r[ITEM_ID]: (r[CODES], r[QUANTIZATION_ERROR]) for r in out.collect() if r[REASON] is None}
    assert sorted(got) == sorted(ids)
    codes = np.array([got[i][0] for i in ids], dtype=np.int32)
    errors = np.array([got[i][1] for i in ids], dtype=np.float32)
    np.testing.assert_array_equal(codes, expected.codes)
    np.testing.assert_allclose(errors, expected.quantization_error, rtol=1e-5, atol=1e-7)
    assert len({tuple(c) for c in codes}) > 1, "every row got the same codes: the comparison proves little"


def test_errors_are_bitwise_those_of_one_in_process_call_whatever_the_batching() -> None:
    # The engine hands the UDF batches of whatever size its partitions and files give; with model calls
    # padded to one shape each item's error is the same bits as in one in-process call, so suffix
    # order (which sorts by the error) cannot change with the batching. Unpadded (MKL on CPU), 8 of
    # these 20 one-row batches gave an error that differed in the last bit.
    dim, rows = 96, 1500
    checkpoint = helpers.untrained_checkpoint(dim, levels=3, codebook_size=64, seed=5, hidden_dims=(192,),
                                              latent_dim=24)
    vectors = helpers.random_vectors(rows, dim, seed=6)
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the UDF's thread count (threads=1 below)
    try:
        whole = encode_array(load_checkpoint(checkpoint), vectors, batch_size=256)
    finally:
        torch.set_num_threads(before)
    sizes = [1] * 20 + [214, 9, 9, 600, 37, 611]
    bounds = np.cumsum([0] + sizes)
    assert bounds[-1] == rows
    batches = [batch(list(range(a, b)), vectors[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
    out = pa.Table.from_batches(list(make_encoder(checkpoint, dim, batch_size=256, threads=1)(iter(batches))))
    assert out.column(ITEM_ID).to_pylist() == list(range(rows))
    np.testing.assert_array_equal(np.array(out.column(CODES).to_pylist(), dtype=np.int32), whole.codes)
    np.testing.assert_array_equal(out.column(QUANTIZATION_ERROR).to_numpy(), whole.quantization_error)


@pytest.mark.spark
def test_rejects_pass_through_uncoded_and_clean_rows_are_encoded(spark, checkpoint, vectors, expected) -> None:
    bad = [("nan", [float("nan")] * DIM), ("short", [1.0] * (DIM - 1)), ("none", None), ("zero", [0.0] * DIM)]
    rows = [(f"i{i}", [float(x) for x in v]) for i, v in enumerate(vectors)] + bad
    df = spark.createDataFrame(rows, f"{ITEM_ID} string, {EMBEDDING} array<float>").repartition(3)
    out = encode_embeddings(df, checkpoint, DIM, batch_size=16)
    got = {r[ITEM_ID]: r for r in out.collect()}
    assert len(got) == N + len(bad)
    np.testing.assert_array_equal(np.array([got[f"i{i}"][CODES] for i in range(N)]), expected.codes)
    assert all(got[f"i{i}"][REASON] is None for i in range(N))
    assert {k: (got[k][REASON], got[k][CODES], got[k][QUANTIZATION_ERROR]) for k, _ in bad} == {
        "nan": (RejectReason.NON_FINITE, None, None), "short": (RejectReason.WRONG_LENGTH, None, None),
        "none": (RejectReason.NULL_EMBEDDING, None, None), "zero": (RejectReason.ZERO_VECTOR, None, None)}
    counts = count_reasons(out)
    assert (counts.clean, counts.n_rejected) == (N, len(bad))


@pytest.mark.spark
def test_udf_checks_and_duplicate_flags_give_the_reasons_of_validation(spark) -> None:
    df = spark.createDataFrame([(i, v) for i, v, _ in helpers.REJECT_CASES], "id string, vec array<double>")
    v = validate_catalog(df, InputColumns(item_id="id", embedding="vec"), dim=3)
    out = flag_duplicates(encode_embeddings(v.rows, helpers.untrained_checkpoint(3, codebook_size=4), 3), ids=v.rows)
    rows = out.collect()
    assert len(rows) == len(helpers.REJECT_CASES)
    assert sorted((r[ITEM_ID] or "", r[REASON]) for r in rows if r[REASON]) == helpers.expected_rejects()
    assert sorted((r[ITEM_ID] or "", r[REASON]) for r in v.rejects.collect()) == helpers.expected_rejects()
    clean = [r for r in rows if r[REASON] is None]
    assert sorted(r[ITEM_ID] for r in clean) == sorted(i for i, _, reason in helpers.REJECT_CASES if reason is None)
    assert all(len(r[CODES]) == LEVELS and r[QUANTIZATION_ERROR] is not None for r in clean)


def test_a_batch_of_rejects_only_yields_no_encoded_rows(checkpoint, counted_loads) -> None:
    rejected = pa.RecordBatch.from_arrays(
        [pa.array(["a", "b"]), pa.array([None, [1.0]], pa.list_(pa.float32()))], names=[ITEM_ID, EMBEDDING])
    out = list(make_encoder(checkpoint, DIM)(iter([rejected])))
    assert [b.num_rows for b in out] == [2]
    assert out[0].to_pylist() == [
        {ITEM_ID: "a", CODES: None, QUANTIZATION_ERROR: None, REASON: RejectReason.NULL_EMBEDDING},
        {ITEM_ID: "b", CODES: None, QUANTIZATION_ERROR: None, REASON: RejectReason.WRONG_LENGTH}]


@pytest.mark.spark
def test_encode_needs_the_contract_columns(spark, checkpoint) -> None:
    df = spark.createDataFrame([("a", [1.0] * DIM)], f"id string, {EMBEDDING} array<float>")
    with pytest.raises(SchemaError, match="lacks column.*'item_id'"):
        encode_embeddings(df, checkpoint, DIM)


def test_codes_go_to_arrow_as_int_lists() -> None:
    codes = np.array([[1, 2], [3, 4], [5, 6]], dtype=np.int32)
    arr = matrix_to_list_array(codes)
    assert arr.type == pa.list_(pa.int32())
    assert arr.to_pylist() == [[1, 2], [3, 4], [5, 6]]
    assert matrix_to_list_array(codes[:, ::-1]).to_pylist() == [[2, 1], [4, 3], [6, 5]]  # a strided view
    assert matrix_to_list_array(codes[1:]).to_pylist() == [[3, 4], [5, 6]]
    assert matrix_to_list_array(np.zeros((0, 2), dtype=np.int32)).to_pylist() == []


@pytest.fixture
def counted_loads(monkeypatch) -> list:
    """Every rqvae load_checkpoint call made by the encoder, on an empty per-process model cache."""
    calls: list = []
    original = rqvae.checkpoint.load_checkpoint

    def counting(source, map_location="cpu"):  # noqa: ANN001, ANN202 - same signature as the original
        calls.append(source)
        return original(source, map_location=map_location)

    monkeypatch.setattr(rqvae.checkpoint, "load_checkpoint", counting)
    monkeypatch.setattr(encode, "_MODELS", {})
    return calls


def test_model_is_built_once_per_process(checkpoint, vectors, expected, counted_loads) -> None:
    encoder = make_encoder(checkpoint, DIM, batch_size=7)
    parts = [batch(list(range(s, s + 20)), vectors[s:s + 20]) for s in (0, 20, 40)]
    out = list(encoder(iter(parts)))
    assert len(counted_loads) == 1
    assert list(encode._MODELS) == [hashlib.sha256(checkpoint).hexdigest()]
    model = encode._MODELS[hashlib.sha256(checkpoint).hexdigest()]

    again = list(make_encoder(checkpoint, DIM)(iter(parts[:1])))  # the next partition in the same worker
    assert len(counted_loads) == 1 and next(iter(encode._MODELS.values())) is model

    assert [b.num_rows for b in out] == [20, 20, 20]
    assert [b.schema.names for b in out] == [[ITEM_ID, CODES, QUANTIZATION_ERROR, REASON]] * 3
    table = pa.Table.from_batches(out)
    assert table.column(ITEM_ID).to_pylist() == list(range(N))
    np.testing.assert_array_equal(np.array(table.column(CODES).to_pylist()), expected.codes)
    np.testing.assert_allclose(table.column(QUANTIZATION_ERROR).to_numpy(), expected.quantization_error, rtol=1e-5)
    assert again[0].column(CODES).to_pylist() == out[0].column(CODES).to_pylist()


def test_a_new_checkpoint_replaces_the_cached_model(checkpoint, vectors, counted_loads) -> None:
    other = helpers.untrained_checkpoint(DIM, levels=LEVELS, codebook_size=8, seed=9)
    list(make_encoder(checkpoint, DIM)(iter([batch([0], vectors[:1])])))
    list(make_encoder(other, DIM)(iter([batch([0], vectors[:1])])))
    assert len(counted_loads) == 2
    assert list(encode._MODELS) == [hashlib.sha256(other).hexdigest()]


def test_a_wrong_length_row_is_flagged_and_the_rest_of_its_batch_encoded(checkpoint, vectors, expected,
                                                                         counted_loads) -> None:
    mixed = batch(["a", "b", "c"], [list(vectors[0]), list(vectors[1][:-1]), list(vectors[2])])
    table = pa.Table.from_batches(list(make_encoder(checkpoint, DIM)(iter([mixed]))))
    got = {r[ITEM_ID]: r for r in table.to_pylist()}
    assert got["b"] == {ITEM_ID: "b", CODES: None, QUANTIZATION_ERROR: None, REASON: RejectReason.WRONG_LENGTH}
    assert [got["a"][CODES], got["c"][CODES]] == expected.codes[[0, 2]].tolist()


def test_fingerprints_without_the_model(checkpoint, vectors, counted_loads) -> None:
    from pipelines.arrow_utils import row_fingerprints

    mixed = batch(["a", "b", "c"], [list(vectors[0]), list(vectors[1][:-1]), list(vectors[2])])
    out = pa.Table.from_batches(list(make_encoder(checkpoint, DIM, fingerprints=True, encode=False)(iter([mixed]))))
    assert out.column_names == [ITEM_ID, CODES, QUANTIZATION_ERROR, REASON, EMBEDDING_FINGERPRINT]
    got = {r[ITEM_ID]: r for r in out.to_pylist()}
    assert got["b"][REASON] == RejectReason.WRONG_LENGTH and got["b"][EMBEDDING_FINGERPRINT] is None
    assert [got[i][EMBEDDING_FINGERPRINT] for i in "ac"] == row_fingerprints(vectors[[0, 2]]).tolist()
    assert all(got[i][CODES] is None and got[i][QUANTIZATION_ERROR] is None for i in "ac")
    assert counted_loads == []  # the model was never built


@pytest.mark.spark
@pytest.mark.parametrize(("policy", "expected_encoded"), [("new", ["i6", "i7", "i8", "i9"]),
                                                           ("new_or_changed", ["i0", "i6", "i7", "i8", "i9"])])
@pytest.mark.parametrize("broadcast_up_to", [1_000_000, 0])  # the rows to encode broadcast to the second pass, or not
def test_encode_catalog_encodes_only_the_rows_a_policy_needs(spark, checkpoint, vectors, expected, tmp_path,
                                                              monkeypatch, policy, expected_encoded,
                                                              broadcast_up_to) -> None:
    from pipelines.encode import encode_catalog
    from pipelines.session import EngineSession

    monkeypatch.setattr(encode, "BROADCAST_IDS", broadcast_up_to)

    rows = [(f"i{i}", [float(x) for x in v]) for i, v in enumerate(vectors[:10])] + [("bad", None)]
    v = validate_catalog(spark.createDataFrame(rows, f"{ITEM_ID} string, {EMBEDDING} array<float>"), dim=DIM)
    full = encode_catalog(v, checkpoint, materialize=lambda df: None)
    assert full.counts.clean == 10 and full.encoded_rows is None  # no materialisation: not counted
    first = {r[ITEM_ID]: r for r in full.codes.collect()}
    assert [first[f"i{i}"][CODES] for i in range(10)] == expected.codes[:10].tolist()
    # The table holds i0..i5; i0's embedding has changed since.
    known = spark.createDataFrame([(f"i{i}", first[f"i{i}"][EMBEDDING_FINGERPRINT] + (i == 0)) for i in range(6)],
                                  f"{ITEM_ID} string, {EMBEDDING_FINGERPRINT} bigint")
    scratch = EngineSession(spark, "local", True, _owns_session=False, _scratch=str(tmp_path))
    incremental = encode_catalog(v, checkpoint, materialize=scratch.materialize, known=known, policy=policy)
    got = {r[ITEM_ID]: r for r in incremental.codes.collect()}
    assert incremental.encoded_rows == len(expected_encoded) and sorted(got) == sorted(first)
    assert sorted(i for i in got if got[i][CODES] is not None) == expected_encoded
    for i in expected_encoded:  # the codes and error of encoding the row alone; every fingerprint as before
        assert got[i][CODES] == first[i][CODES]
        assert got[i][QUANTIZATION_ERROR] == pytest.approx(first[i][QUANTIZATION_ERROR])
    assert all(got[i][EMBEDDING_FINGERPRINT] == first[i][EMBEDDING_FINGERPRINT] for i in got)
    assert sorted((r[ITEM_ID], r[REASON]) for r in incremental.rejects.collect()) == [
        ("bad", RejectReason.NULL_EMBEDDING)]
    assert (incremental.counts.clean, incremental.counts.n_rejected) == (10, 1)


@pytest.mark.spark
@pytest.mark.parametrize("listed", [False, True], ids=["engine_reads", "files_listed"])
def test_a_daily_run_with_nothing_new_reads_no_row_again(spark, checkpoint, vectors, tmp_path, listed) -> None:
    """Every clean row is held with its fingerprint: no second pass over the catalog (the engine's or the row
    groups'), none through the model, every row kept uncoded and the rejects as the first pass flagged them."""
    from pipelines.encode import encode_catalog
    from pipelines.io import embedding_files
    from pipelines.session import EngineSession

    path = tmp_path / "catalog"
    helpers.write_delta(path, helpers.catalog_table([f"i{i}" for i in range(6)], vectors[:6]))
    v = validate_catalog(spark.read.format("delta").load(str(path)), dim=DIM)
    files = embedding_files(str(path), "delta", ITEM_ID, EMBEDDING)[0] if listed else None
    scratch = EngineSession(spark, "local", True, _owns_session=False, _scratch=str(tmp_path / "scratch"))
    first = encode_catalog(v, checkpoint, materialize=scratch.materialize, files=files, tasks=2)
    known = first.codes.select(ITEM_ID, EMBEDDING_FINGERPRINT)
    materialised = []

    def counted(df):  # noqa: ANN001, ANN202 - a DataFrame
        materialised.append(df.columns)
        return scratch.materialize(df)

    daily = encode_catalog(v, checkpoint, materialize=counted, known=known, policy="new_or_changed", files=files,
                           tasks=2)
    got = {r[ITEM_ID]: r for r in daily.codes.collect()}
    assert daily.encoded_rows == 0 and sorted(got) == [f"i{i}" for i in range(6)]
    assert all(r[CODES] is None for r in got.values())
    assert [columns for columns in materialised if CODES in columns] == materialised[:1]  # the first pass alone
    assert daily.counts.clean == 6 and daily.rejects.count() == 0


@pytest.mark.spark
def test_a_second_pass_that_cannot_be_materialised_is_not_counted(spark, checkpoint, vectors, expected,
                                                                  tmp_path) -> None:
    # The ids to encode materialise, the second pass's codes do not: its rows are recomputed where used,
    # so no count of them is reported (they would not be the rows written).
    from pipelines.encode import encode_catalog
    from pipelines.session import EngineSession

    rows = [(f"i{i}", [float(x) for x in v]) for i, v in enumerate(vectors[:6])]
    v = validate_catalog(spark.createDataFrame(rows, f"{ITEM_ID} string, {EMBEDDING} array<float>"), dim=DIM)
    known = spark.createDataFrame([(f"i{i}", 0) for i in range(3)], f"{ITEM_ID} string, {EMBEDDING_FINGERPRINT} bigint")
    scratch = EngineSession(spark, "local", True, _owns_session=False, _scratch=str(tmp_path))
    passes = []

    def not_the_second_pass(df):  # noqa: ANN001, ANN202 - a DataFrame
        if EMBEDDING_FINGERPRINT in df.columns:
            passes.append(df)
            if len(passes) == 2:
                return None
        return scratch.materialize(df)

    out = encode_catalog(v, checkpoint, materialize=not_the_second_pass, known=known, policy="new")
    got = {r[ITEM_ID]: r[CODES] for r in out.codes.collect()}
    assert len(passes) == 2 and out.encoded_rows is None
    assert got == {f"i{i}": (expected.codes[i].tolist() if i >= 3 else None) for i in range(6)}


@pytest.mark.spark
@pytest.mark.parametrize("broadcast_up_to", [1_000_000, 0])
def test_encode_catalog_flags_every_row_of_a_repeated_id(spark, checkpoint, vectors, expected, tmp_path, monkeypatch,
                                                          broadcast_up_to) -> None:
    from pipelines.encode import encode_catalog
    from pipelines.session import EngineSession

    monkeypatch.setattr(encode, "BROADCAST_IDS", broadcast_up_to)  # 0: the plain join
    rows = [(f"i{i}", [float(x) for x in v]) for i, v in enumerate(vectors[:8])]
    rows += [("i3", [float(x) for x in vectors[9]]), ("bad", None), (None, [float(x) for x in vectors[10]])]
    v = validate_catalog(spark.createDataFrame(rows, f"{ITEM_ID} string, {EMBEDDING} array<float>"), dim=DIM)
    scratch = EngineSession(spark, "local", True, _owns_session=False, _scratch=str(tmp_path))
    out = encode_catalog(v, checkpoint, materialize=scratch.materialize)
    assert sorted((r[ITEM_ID] or "", r[REASON]) for r in out.rejects.collect()) == [
        ("", RejectReason.NULL_ID), ("bad", RejectReason.NULL_EMBEDDING),
        ("i3", RejectReason.DUPLICATE_ID), ("i3", RejectReason.DUPLICATE_ID)]
    got = {r[ITEM_ID]: r[CODES] for r in out.codes.collect()}
    assert got == {f"i{i}": expected.codes[i].tolist() for i in range(8) if i != 3}
    assert (out.counts.clean, out.counts.n_rejected, out.encoded_rows) == (7, 4, 7)


@pytest.mark.spark
@pytest.mark.parametrize("id_type", ["string", "int32"])
def test_with_the_files_listed_the_repeated_ids_are_counted_from_their_id_column(spark, checkpoint, vectors, expected,
                                                                              tmp_path, monkeypatch, id_type) -> None:
    """The UDF reads the files: their id column (read with pyarrow, cast as the pass casts it) gives the repeated
    ids, and the engine does not group the pass's rows. The same rows are flagged, across files; nulls never."""
    import pyarrow as pa

    from pipelines.encode import encode_catalog, repeated_file_ids
    from pipelines.io import embedding_files
    from pipelines.session import EngineSession

    def grouped(*a, **k):
        raise AssertionError("the engine grouped the pass's rows by id")

    monkeypatch.setattr(encode, "_repeated_ids", grouped)
    arrow_id = pa.string() if id_type == "string" else pa.int32()
    name = (lambda i: f"i{i}") if id_type == "string" else (lambda i: 100 + i)
    ids = [name(i) for i in range(8)] + [name(3), name(5), name(5), None]
    path = helpers.write_delta(tmp_path / "catalog", helpers.catalog_table(ids, vectors[:12], id_type=arrow_id),
                               parts=3)
    files, _ = embedding_files(str(path), "delta", ITEM_ID, EMBEDDING)
    assert files is not None and len({f for f, _ in files.row_groups}) == 3
    engine_type = "string" if id_type == "string" else "bigint"
    assert sorted(repeated_file_ids(files, engine_type).to_pylist()) == [name(3), name(5)]
    v = validate_catalog(spark.read.format("delta").load(str(path)), dim=DIM)
    scratch = EngineSession(spark, "local", True, _owns_session=False, _scratch=str(tmp_path / "scratch"))
    out = encode_catalog(v, checkpoint, materialize=scratch.materialize, files=files, tasks=2)
    assert sorted((str(r[ITEM_ID]), r[REASON]) for r in out.rejects.collect()) == sorted(
        [("None", RejectReason.NULL_ID)] + [(str(name(i)), RejectReason.DUPLICATE_ID) for i in (3, 3, 5, 5, 5)])
    assert {r[ITEM_ID]: r[CODES] for r in out.codes.collect()} == {
        name(i): expected.codes[i].tolist() for i in range(8) if i not in (3, 5)}
    # A file this process cannot read (here, deleted since it was listed): None, and the engine counts.
    (path / files.row_groups[0][0].rsplit("/", 1)[-1]).unlink()
    assert repeated_file_ids(files, engine_type) is None


def test_encode_catalog_refuses_an_unknown_policy_or_one_without_fingerprints(checkpoint) -> None:
    from pipelines.encode import encode_catalog

    with pytest.raises(ValueError, match="unknown encode policy"):
        encode_catalog(None, checkpoint, materialize=lambda df: None, policy="changed")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="needs the known fingerprints"):
        encode_catalog(None, checkpoint, materialize=lambda df: None, policy="new")  # type: ignore[arg-type]


def replace_b(path, vectors) -> None:
    """b's embedding is replaced in a new table version."""
    from deltalake import write_deltalake

    write_deltalake(str(path), helpers.catalog_table(["a", "b"], vectors[[0, 5]]), mode="overwrite")


def append_second_b(path, vectors) -> None:
    """A second row for the new id b, with another embedding."""
    helpers.write_delta(path, helpers.catalog_table(["b"], vectors[5:6]))


@pytest.mark.spark
@pytest.mark.parametrize(("change", "message"), [
    (replace_b, "to read 2 rows again and read 2, 1 of them as the first pass had"),
    (append_second_b, "to read 2 rows again and read 3"),
])
def test_a_catalog_that_changes_between_the_two_passes_stops_the_run(spark, checkpoint, vectors, tmp_path, change,
                                                                     message) -> None:
    from pipelines.encode import encode_catalog
    from pipelines.session import EngineSession
    from pipelines.validate import RowAccountingError

    path = tmp_path / "catalog"
    helpers.write_delta(path, helpers.catalog_table(["a", "b"], vectors[:2]))
    v = validate_catalog(spark.read.format("delta").load(str(path)), dim=DIM)
    known = spark.createDataFrame([("a", 0)], f"{ITEM_ID} string, {EMBEDDING_FINGERPRINT} bigint").limit(0)
    scratch = EngineSession(spark, "local", True, _owns_session=False, _scratch=str(tmp_path / "scratch"))
    calls = []

    def materialize_then_change(df):
        out = scratch.materialize(df)
        if EMBEDDING_FINGERPRINT in df.columns and not calls:  # after the first pass (not the duplicate ids)
            change(path, vectors)
            calls.append(df)
        return out

    with pytest.raises(RowAccountingError, match=message):
        encode_catalog(v, checkpoint, materialize=materialize_then_change, known=known, policy="new")


@pytest.mark.spark
def test_with_the_files_listed_both_passes_read_the_same_snapshot(spark, checkpoint, vectors, expected,
                                                                 tmp_path) -> None:
    # The row groups are listed once, before the first pass: a version committed meanwhile is not mixed in,
    # and both passes read the listed version (the engine's read would stop the run, as above).
    from pipelines.encode import encode_catalog
    from pipelines.io import embedding_files
    from pipelines.session import EngineSession

    path = tmp_path / "catalog"
    helpers.write_delta(path, helpers.catalog_table(["a", "b"], vectors[:2]))
    v = validate_catalog(spark.read.format("delta").load(str(path)), dim=DIM)
    files, _ = embedding_files(str(path), "delta", ITEM_ID, EMBEDDING)
    known = spark.createDataFrame([("a", 0)], f"{ITEM_ID} string, {EMBEDDING_FINGERPRINT} bigint").limit(0)
    scratch = EngineSession(spark, "local", True, _owns_session=False, _scratch=str(tmp_path / "scratch"))
    changed = []

    def materialize_then_change(df):  # noqa: ANN001, ANN202 - a DataFrame
        out = scratch.materialize(df)
        if EMBEDDING_FINGERPRINT in df.columns and not changed:
            replace_b(path, vectors)
            changed.append(df)
        return out

    out = encode_catalog(v, checkpoint, materialize=materialize_then_change, known=known, policy="new",
                         files=files, tasks=2)
    assert changed and out.encoded_rows == 2
    assert expected.codes[1].tolist() != expected.codes[5].tolist()  # b's new embedding would have other codes
    assert {r[ITEM_ID]: r[CODES] for r in out.codes.collect()} == {"a": expected.codes[0].tolist(),
                                                                   "b": expected.codes[1].tolist()}


@pytest.mark.spark
@pytest.mark.parametrize("parts", [1, 4])
def test_repeated_ids_are_the_same_counted_in_parts(spark, parts) -> None:
    """A large catalog's repeated ids are counted one part of the ids (by hash) after another."""
    rows = [(f"i{i % 37}",) for i in range(100)] + [(f"u{i}",) for i in range(50)] + [(None,), (None,)]
    frame = spark.createDataFrame(rows, f"{ITEM_ID} string")
    materialized = []

    def materialize(df):
        materialized.append(df)
        return spark.createDataFrame(df.collect(), df.schema)

    got = encode._repeated_ids(frame, parts, materialize)
    assert sorted(r[ITEM_ID] for r in got.collect()) == sorted(f"i{i}" for i in range(37))  # u* once, nulls never
    assert len(materialized) == parts
