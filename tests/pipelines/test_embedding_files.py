"""The encode pass reading a file table's row groups itself (``--read-embeddings files``): which tables
qualify (:func:`pipelines.io.embedding_files`), and that the UDF then yields exactly the rows, codes,
rejects and counts of the engine's own read of the same table (:func:`pipelines.encode.encode_files`)."""
from __future__ import annotations

import helpers
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines import io
from pipelines.encode import balanced_tasks, encode_catalog, encode_files
from pipelines.schema import (
    ALTERNATIVE_ERRORS,
    ALTERNATIVES,
    CODES,
    EMBEDDING_FINGERPRINT,
    ITEM_ID,
    QUANTIZATION_ERROR,
    RejectReason,
)
from pipelines.validate import validate_catalog

DIM = 8
NAN = float("nan")


@pytest.fixture(scope="module")
def checkpoint() -> bytes:
    return helpers.untrained_checkpoint(DIM, levels=3, codebook_size=8, seed=1)


def bad_rows(v: np.ndarray) -> list[tuple]:
    """(id, embedding, reason) of one row of every per-row reject kind and one repeated id."""
    return [
        (None, list(v[0]), RejectReason.NULL_ID),
        ("dup", list(v[1]), RejectReason.DUPLICATE_ID),
        ("dup", list(v[2]), RejectReason.DUPLICATE_ID),
        ("no-embedding", None, RejectReason.NULL_EMBEDDING),
        ("short", list(v[3][:-1]), RejectReason.WRONG_LENGTH),
        ("null-element", [None, *v[4][1:]], RejectReason.NULL_ELEMENT),
        ("nan", [*v[5][:-1], NAN], RejectReason.NON_FINITE),
        ("zero", [0.0] * DIM, RejectReason.ZERO_VECTOR),
    ]


def catalog(n: int = 90, id_type: pa.DataType | None = None, seed: int = 2) -> tuple[pa.Table, np.ndarray]:
    """n good rows (ids "i0".. or 1000..) and the bad rows, interleaved, as an Arrow table."""
    id_type = id_type or pa.string()
    v = helpers.random_vectors(n + 8, DIM, seed=seed)
    text = pa.types.is_string(id_type) or pa.types.is_large_string(id_type)
    good = [(f"i{i}" if text else 1000 + i, list(v[i])) for i in range(n)]
    bad = [(i if i is None or text else {"dup": 7, "no-embedding": 8, "short": 9,
                                                                 "null-element": 10, "nan": 11, "zero": 12}[i], e)
           for i, e, _ in bad_rows(v[n:])]
    rows = good[: n // 2] + bad + good[n // 2:]
    return helpers.catalog_table([r[0] for r in rows], [r[1] for r in rows], id_type=id_type), v[:n]


def write_table(path, table: pa.Table, fmt: str) -> None:  # noqa: ANN001 - a Path
    """Delta in 3 commits, or 2 Parquet files; row groups of at most 16 rows either way."""
    if fmt == "delta":
        from deltalake import WriterProperties, write_deltalake

        for part in (table.slice(0, 40), table.slice(40, 30), table.slice(70)):
            write_deltalake(str(path), part, mode="append", writer_properties=WriterProperties(max_row_group_size=16))
    else:
        path.mkdir()
        pq.write_table(table.slice(0, 50), path / "part-0.parquet", row_group_size=16)
        pq.write_table(table.slice(50), path / "part-1.parquet", row_group_size=16)


def rows_of(frame) -> dict:  # noqa: ANN001 - a DataFrame
    return {r[ITEM_ID]: r.asDict() for r in frame.collect()}


@pytest.mark.spark
@pytest.mark.parametrize("fmt", ["delta", "parquet"])
@pytest.mark.parametrize("id_type", [pa.string(), pa.large_string(), pa.int32()])
def test_the_udf_reading_the_files_gives_the_engines_rows(spark, checkpoint, tmp_path, fmt, id_type) -> None:
    from pipelines.session import EngineSession

    table, _ = catalog(id_type=id_type)
    write_table(tmp_path / "catalog", table, fmt)
    files, why = io.embedding_files(str(tmp_path / "catalog"), "auto", "item_id", "embedding")
    assert why == "" and files is not None
    assert len(files.row_groups) >= 6  # several files and row groups: several units per task
    assert sum(pq.ParquetFile(f).metadata.row_group(g).num_rows for f, g in files.row_groups) == table.num_rows

    v = validate_catalog(io.read_catalog(spark, str(tmp_path / "catalog"), "auto"), dim=DIM)
    scratch = EngineSession(spark, "local", True, _owns_session=False, _scratch=str(tmp_path / "scratch"))
    by_engine = encode_catalog(v, checkpoint, materialize=scratch.materialize, alternatives=4)
    by_files = encode_catalog(v, checkpoint, materialize=scratch.materialize, alternatives=4, files=files, tasks=3)

    assert by_files.codes.schema == by_engine.codes.schema  # the id as the engine types it: STRING or BIGINT
    assert (by_files.counts, by_files.encoded_rows) == (by_engine.counts, by_engine.encoded_rows)
    assert by_files.counts.clean == 90 and by_files.counts.n_rejected == 8
    assert sorted((str(r[ITEM_ID]), r["reason"]) for r in by_files.rejects.collect()) == sorted(
        (str(r[ITEM_ID]), r["reason"]) for r in by_engine.rejects.collect())
    got, want = rows_of(by_files.codes), rows_of(by_engine.codes)
    assert sorted(got) == sorted(want) and len(got) == 90
    for item, row in want.items():
        for column in (CODES, ALTERNATIVES, EMBEDDING_FINGERPRINT):
            assert got[item][column] == row[column], (item, column)
        assert got[item][QUANTIZATION_ERROR] == row[QUANTIZATION_ERROR]  # fixed-shape calls: the same bits
        assert got[item][ALTERNATIVE_ERRORS] == row[ALTERNATIVE_ERRORS]


@pytest.mark.spark
@pytest.mark.parametrize("tasks", [1, 2, 8])  # 8: more tasks than row groups
def test_any_number_of_tasks_reads_every_row_once(spark, checkpoint, tmp_path, tasks) -> None:
    table, _ = catalog(n=20)
    (tmp_path / "catalog").mkdir()
    pq.write_table(table.slice(0, 5), tmp_path / "catalog" / "a.parquet")
    pq.write_table(table.slice(5, 15), tmp_path / "catalog" / "b.parquet", row_group_size=8)
    pq.write_table(table.slice(0, 0), tmp_path / "catalog" / "c.parquet")  # no rows: no unit
    files, _ = io.embedding_files(str(tmp_path / "catalog"), "parquet", "item_id", "embedding")
    assert files is not None and len(files.row_groups) == 3
    out = encode_files(spark, files, checkpoint, DIM, id_type="string", tasks=tasks, fingerprints=True, encode=False)
    ids = [r[ITEM_ID] for r in out.collect()]
    assert sorted(ids, key=str) == sorted(table.slice(0, 20)["item_id"].to_pylist(), key=str)


@pytest.mark.parametrize("sizes,tasks,rows", [
    ([33792] * 20 + [32416] * 10, 2, [500_000, 500_000]),  # the 1M-row catalog of bench/: 15 row groups each
    ([100, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10], 2, [100, 100]),  # one large row group: the others beside it
    ([5, 4, 3, 3, 3], 2, [8, 10]),  # largest first, each to the lighter task: within one row group of even
    ([7], 3, [7, 0, 0]),
])
def test_row_groups_are_dealt_to_tasks_by_their_rows(sizes, tasks, rows) -> None:
    dealt = balanced_tasks(sizes, tasks)
    assert sorted(i for task in dealt for i in task) == list(range(len(sizes)))  # every row group once
    assert [sum(sizes[i] for i in task) for task in dealt] == rows
    assert all(task == sorted(task) for task in dealt)  # each task reads its row groups in file order
    assert max(rows) - min(rows) <= max(sizes)


def test_encode_files_refuses_an_empty_list_and_an_unknown_id_type(checkpoint) -> None:
    empty = io.EmbeddingFiles((), "item_id", "embedding", "/nowhere")
    with pytest.raises(ValueError, match="has no rows to read"):
        encode_files(None, empty, checkpoint, DIM, id_type="string", tasks=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="'string' or 'bigint'"):
        encode_files(None, empty, checkpoint, DIM, id_type="int", tasks=1)  # type: ignore[arg-type]


@pytest.mark.parametrize(("write", "reason"), [
    (lambda p, t: helpers.write_delta(p, t.set_column(1, "embedding", t["embedding"].cast(pa.list_(pa.float64())))),
     "embedding column of type list<item: double> (the engine casts it to list<float>)"),
    (lambda p, t: helpers.write_delta(p, t.rename_columns(["id", "embedding"])), "column 'item_id' missing"),
    (lambda p, t: _parquet(p, t.set_column(0, "item_id", pa.array(range(t.num_rows), pa.uint64()))),
     "id column of type uint64"),  # Delta has no unsigned types; a Parquet folder can
    (lambda p, t: _delta(p, t, configuration={"delta.enableDeletionVectors": "true"}), "Delta reader features"),
    (lambda p, t: _delta(p, t, configuration={"delta.columnMapping.mode": "name"}),
     "column mapping (mode name, reader version 2)"),
    (lambda p, t: _delta(p, t.slice(0, 5), partition_by=["item_id"]), "partition column"),
    (lambda p, t: _delta(p, t.slice(0, 0)), "no rows in its files"),
    (lambda p, t: _parquet(p, t, junk="not.parquet"), "not.parquet: "),  # a file the engine would refuse too
])
def test_a_table_the_udf_cannot_read_as_the_engine_does_is_left_to_the_engine(tmp_path, write, reason) -> None:
    table, _ = catalog(n=10)
    write(tmp_path / "t", table.slice(0, 10))
    files, why = io.embedding_files(str(tmp_path / "t"), "auto", "item_id", "embedding")
    assert files is None and reason in why


def _parquet(path, table: pa.Table, junk: str = "") -> None:  # noqa: ANN001
    path.mkdir()
    pq.write_table(table, path / "part-0.parquet")
    if junk:
        (path / junk).write_bytes(b"half an upload")


def test_a_parquet_folder_is_listed_as_spark_lists_it(tmp_path) -> None:
    # Hidden: "_x" unless a partition folder ("_k=1"), ".x", "x._COPYING_" (a copy under way).
    table, _ = catalog(n=10)
    root = tmp_path / "cat"
    (root / "_k=1").mkdir(parents=True)
    (root / "_tmp").mkdir()
    pq.write_table(table.slice(0, 4), root / "a.parquet")
    pq.write_table(table.slice(4, 3), root / "_k=1" / "b.parquet")
    pq.write_table(table.slice(7, 3), root / "_tmp" / "c.parquet")
    for junk in ("_SUCCESS", ".a.parquet.crc", "d.parquet._COPYING_"):
        (root / junk).write_bytes(b"not parquet")
    files, why = io.embedding_files(str(root), "parquet", "item_id", "embedding")
    assert why == "" and files is not None and files.rows == 7
    assert [f for f, _ in files.row_groups] == [str(root / "a.parquet"), str(root / "_k=1" / "b.parquet")]


def _delta(path, table: pa.Table, **options) -> None:  # noqa: ANN001, ANN003
    from deltalake import write_deltalake

    write_deltalake(str(path), table, **options)


@pytest.mark.parametrize(("source", "fmt", "reason"), [
    ("s3://bucket/catalog", "auto", "not a path on this machine's filesystem"),
    ("main.shop.items", "auto", "not a path on this machine's filesystem"),
    ("{tmp}/missing", "auto", "not a path on this machine's filesystem"),
    ("{tmp}/delta", "parquet", "input format 'parquet'"),
    ("{tmp}/delta", "table", "input format 'table'"),
])
def test_sources_that_are_not_local_file_tables_are_left_to_the_engine(tmp_path, source, fmt, reason) -> None:
    table, _ = catalog(n=10)
    helpers.write_delta(tmp_path / "delta", table.slice(0, 10))
    files, why = io.embedding_files(source.format(tmp=tmp_path), fmt, "item_id", "embedding")
    assert files is None and why == reason


def test_a_file_uri_and_the_latest_delta_version_are_read(tmp_path) -> None:
    table, _ = catalog(n=30)
    helpers.write_delta(tmp_path / "delta", table.slice(0, 30), parts=3)
    files, _ = io.embedding_files(f"file://{tmp_path / 'delta'}", "delta", "item_id", "embedding")
    assert files is not None and files.source.endswith("(Delta version 2)") and len(files.row_groups) == 3
    assert all(f.startswith(str(tmp_path / "delta")) for f, _ in files.row_groups)


def test_odd_characters_in_the_table_path_and_its_partition_folders(tmp_path) -> None:
    # The log's paths are percent-encoded URIs relative to the table; the folders on disk are not.
    from deltalake import write_deltalake

    table, _ = catalog(n=12)
    table = table.slice(0, 12).append_column("shop", pa.array(["x y", "z%", "é#?"] * 4))
    root = tmp_path / "prev out #1 50% ?é" / "cat"
    write_deltalake(str(root), table, partition_by=["shop"])
    files, why = io.embedding_files(str(root), "auto", "item_id", "embedding")
    assert why == "" and files is not None and len(files.row_groups) == 3
    read = [i for f, g in files.row_groups for i in pq.ParquetFile(f).read_row_group(g, columns=["item_id"])
            .column("item_id").to_pylist()]
    assert sorted(read, key=str) == sorted(table["item_id"].to_pylist(), key=str)


@pytest.mark.spark
@pytest.mark.parametrize("policy", ["new", "new_or_changed"])
@pytest.mark.parametrize("broadcast_up_to", [1_000_000, 0])  # 0: too many rows to send: the engine reads them
@pytest.mark.parametrize("id_type", [pa.string(), pa.int32()])  # int32 in the files, BIGINT for the engine
def test_an_incremental_second_pass_reads_only_the_rows_to_encode(spark, checkpoint, tmp_path, monkeypatch, policy,
                                                                  broadcast_up_to, id_type) -> None:
    import pipelines.encode as encode
    from pipelines.session import EngineSession

    table, _ = catalog(id_type=id_type)
    write_table(tmp_path / "catalog", table, "delta")
    v = validate_catalog(io.read_catalog(spark, str(tmp_path / "catalog"), "delta"), dim=DIM)
    files, _ = io.embedding_files(str(tmp_path / "catalog"), "delta", "item_id", "embedding")
    scratch = EngineSession(spark, "local", True, _owns_session=False, _scratch=str(tmp_path / "scratch"))
    first = rows_of(encode_catalog(v, checkpoint, materialize=scratch.materialize, alternatives=4, files=files,
                                   tasks=2).codes)
    held = sorted(first)[:60]  # the table holds 60 of the 90 clean items; the first one's embedding changed since
    known = spark.createDataFrame([(i, first[i][EMBEDDING_FINGERPRINT] + (i == held[0])) for i in held],
                                  f"{ITEM_ID} {'string' if id_type == pa.string() else 'bigint'}, "
                                  f"{EMBEDDING_FINGERPRINT} bigint")
    expected = sorted(set(first) - set(held)) + ([held[0]] if policy == "new_or_changed" else [])
    monkeypatch.setattr(encode, "BROADCAST_IDS", broadcast_up_to)
    asked = []

    def recording(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202 - encode_files' own
        asked.append(kwargs.get("only_ids"))
        return encode_files(*args, **kwargs)

    monkeypatch.setattr(encode, "encode_files", recording)
    out = encode_catalog(v, checkpoint, materialize=scratch.materialize, known=known, policy=policy,
                         alternatives=4, files=files, tasks=2)
    got = rows_of(out.codes)
    assert out.encoded_rows == len(expected) and sorted(got) == sorted(first)
    assert sorted(i for i in got if got[i][CODES] is not None) == sorted(expected)
    for item in expected:  # the codes, error and alternatives of the full pass
        for column in (CODES, QUANTIZATION_ERROR, ALTERNATIVES, ALTERNATIVE_ERRORS):
            assert got[item][column] == first[item][column], (item, column)
    assert (out.counts.clean, out.counts.n_rejected) == (90, 8)
    # The first pass read every row from the files; the second its rows' ids only, unless they were too many.
    assert asked[0] is None
    if broadcast_up_to:
        assert len(asked) == 2 and sorted(asked[1].to_pylist()) == sorted(expected)
    else:
        assert len(asked) == 1


@pytest.mark.spark
def test_d_sampled_from_the_files_is_the_engines(spark, tmp_path) -> None:
    """embedding_lengths counts the first non-null embeddings in row-group order (nulls skipped, across row
    groups, stopping at ``rows``); D by the shared rule is the engine's infer_dim on the same rows."""
    from pipelines.validate import infer_dim, most_common_length, select_contract_columns

    lengths = [None, 3, None, 5] + [5] * 3 + [3] * 4 + [7] * 20  # first 9 non-null: 3 x 1, 5 x 4, 3 x 4
    rows = [None if n is None else [1.0] * n for n in lengths]
    (tmp_path / "catalog").mkdir()
    pq.write_table(helpers.catalog_table([f"i{i}" for i in range(len(rows))], rows), tmp_path / "catalog" / "a.parquet",
                   row_group_size=4)
    files, _ = io.embedding_files(str(tmp_path / "catalog"), "parquet", "item_id", "embedding")
    assert files is not None and len(files.row_groups) == 8
    assert io.embedding_lengths(files, 9) == {3: 5, 5: 4}
    assert io.embedding_lengths(files, 8) == {3: 4, 5: 4}  # a tie: the shorter wins
    assert io.embedding_lengths(files, 1000) == {3: 5, 5: 4, 7: 20}
    catalog_rows = select_contract_columns(io.read_catalog(spark, str(tmp_path / "catalog"), "parquet"))
    for n, d in ((9, 3), (8, 3), (1000, 7)):
        assert most_common_length(io.embedding_lengths(files, n)) == infer_dim(catalog_rows, sample_rows=n) == d


def test_the_wanted_rows_are_gathered_into_full_batches(tmp_path, monkeypatch) -> None:
    """A second pass over a few ids per read batch hands the encoder batches of at least FILE_BATCH_ROWS rows
    (every model call is padded to its full size), the wanted rows in file order, each once."""
    from pipelines import encode

    monkeypatch.setattr(encode, "FILE_BATCH_ROWS", 4)  # read batches of 4 rows, gathered to at least 4
    table, _ = catalog(n=40)
    (tmp_path / "catalog").mkdir()
    pq.write_table(table, tmp_path / "catalog" / "a.parquet", row_group_size=8)
    files, _ = io.embedding_files(str(tmp_path / "catalog"), "parquet", "item_id", "embedding")
    assert files is not None and len(files.row_groups) == 6
    ids = table.column("item_id").to_pylist()
    wanted = [ids[i] for i in (1, 6, 9, 17, 18, 25, 33, 40, 47)]  # one or two in 8 of the 12 read batches
    units = iter([pa.record_batch({encode._FILE: [f for f, _ in files.row_groups],
                                   encode._ROW_GROUP: [g for _, g in files.row_groups]})])
    batches = list(encode._row_group_batches(units, "item_id", "embedding", pa.string(), pa.array(wanted)))
    assert [b.num_rows for b in batches] == [5, 4]  # 1+1+1+2 rows, then 1+1+1+1
    assert [i for b in batches for i in b.column(ITEM_ID).to_pylist()] == wanted
    got = pa.Table.from_batches(batches)
    rows = {i: e for i, e in zip(ids, table.column("embedding").to_pylist(), strict=True)}
    assert got.column("embedding").to_pylist() == [rows[i] for i in wanted]


def test_files_whose_embedding_columns_differ_in_arrow_type_are_gathered_apart(tmp_path, monkeypatch) -> None:
    """Files written by different writers (list<float> beside large_list<float>): the wanted rows of each
    kind are gathered into their own batches, all of them read, none lost."""
    from pipelines import encode

    monkeypatch.setattr(encode, "FILE_BATCH_ROWS", 4)
    table, _ = catalog(n=16)
    (tmp_path / "catalog").mkdir()
    pq.write_table(table.slice(0, 12), tmp_path / "catalog" / "a.parquet", row_group_size=6)
    large = table.slice(12).cast(pa.schema([("item_id", pa.string()), ("embedding", pa.large_list(pa.float32()))]))
    pq.write_table(large, tmp_path / "catalog" / "b.parquet")
    files, why = io.embedding_files(str(tmp_path / "catalog"), "parquet", "item_id", "embedding")
    assert files is not None, why
    ids = table.column("item_id").to_pylist()
    wanted = [ids[i] for i in (2, 11, 13, 20)]  # two in a.parquet (list), two in b.parquet (large_list)
    units = iter([pa.record_batch({encode._FILE: [f for f, _ in files.row_groups],
                                   encode._ROW_GROUP: [g for _, g in files.row_groups]})])
    batches = list(encode._row_group_batches(units, "item_id", "embedding", pa.string(), pa.array(wanted)))
    assert [(b.num_rows, b.schema.field("embedding").type) for b in batches] == [
        (2, pa.list_(pa.float32())), (2, pa.large_list(pa.float32()))]
    assert [i for b in batches for i in b.column(ITEM_ID).to_pylist()] == wanted
