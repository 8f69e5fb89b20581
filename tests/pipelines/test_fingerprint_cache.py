"""The fingerprint cache (:mod:`pipelines.fingerprint_cache`): an incremental run's first pass reads a kept
row group's checked and fingerprinted rows instead of its embeddings, gives the rows the embeddings would,
and never uses an entry whose row group, rules or columns are not the ones it was computed from."""
from __future__ import annotations

import dataclasses
import os
import time

import pyarrow as pa
import pytest
from test_embedding_files import DIM, catalog, rows_of, write_table

from pipelines import fingerprint_cache, io
from pipelines.encode import cache_keys, encode_catalog
from pipelines.io import RowGroupStamp
from pipelines.schema import EMBEDDING_FINGERPRINT, ITEM_ID, REASON
from pipelines.validate import RowAccountingError, validate_catalog


def entry_rows(n: int, first_fp: int = 0) -> pa.RecordBatch:
    return pa.RecordBatch.from_arrays(
        [pa.array([f"i{i}" for i in range(n)]), pa.array([None] * (n - 1) + ["zero_vector"], pa.string()),
         pa.array([first_fp + i for i in range(n - 1)] + [None], pa.int64())],
        schema=fingerprint_cache.schema(pa.string()))


def test_an_entry_is_read_back_whole_and_only_as_written(tmp_path) -> None:
    folder = str(tmp_path / "cache")
    rows = entry_rows(5)
    assert fingerprint_cache.read(folder, "k", 5, pa.string()) is None  # none yet
    assert fingerprint_cache.write(folder, "k", [rows.slice(0, 2), rows.slice(2)], pa.string())
    assert os.listdir(folder) == ["k.arrow"]  # the temporary file renamed, nothing else left
    back = fingerprint_cache.read(folder, "k", 5, pa.string())
    assert back is not None and back.to_pylist() == rows.to_pylist()
    assert fingerprint_cache.read(folder, "k", 6, pa.string()) is None  # another row count: not this row group's
    assert fingerprint_cache.read(folder, "k", 5, pa.int64()) is None  # another id type
    (tmp_path / "cache" / "k.arrow").write_bytes(b"not arrow at all")
    assert fingerprint_cache.read(folder, "k", 5, pa.string()) is None  # unreadable: computed again
    (tmp_path / "blocked").write_text("a file where the folder would be")
    assert not fingerprint_cache.write(str(tmp_path / "blocked"), "k", [rows], pa.string())  # never raises


def test_keys_change_with_the_row_group_the_table_the_columns_the_type_and_the_dimension() -> None:
    stamp = RowGroupStamp("delta:1234", "part-0.parquet", 100, 5, 0, 16, "f00")

    def key(changed: RowGroupStamp = stamp, columns: tuple[str, str] = ("item_id", "embedding"),
            id_type: str = "string", dim: int = 8) -> str:
        return fingerprint_cache.keys([changed], *columns, id_type, dim)[0]

    others = [key(dataclasses.replace(stamp, **{name: value})) for name, value in (
        ("table", "delta:5678"), ("path", "part-1.parquet"), ("size", 101), ("mtime_ns", 6), ("index", 1),
        ("rows", 17), ("footer", "f01"))]
    others += [key(columns=("id", "embedding")), key(columns=("item_id", "vec")), key(id_type="bigint"), key(dim=9)]
    assert len({key(), *others}) == 12 and key() == key(RowGroupStamp("delta:1234", "part-0.parquet", 100, 5, 0, 16,
                                                                       "f00"))


def test_a_folder_that_cannot_be_used_is_named_with_the_reason(tmp_path) -> None:
    assert fingerprint_cache.unusable(str(tmp_path / "new" / "cache")) == ""  # created
    (tmp_path / "blocked").write_text("a file where the folder would be")
    assert "FileExistsError" in fingerprint_cache.unusable(str(tmp_path / "blocked"))
    assert fingerprint_cache.tidy(str(tmp_path / "blocked"), []) == 0  # never raises


def test_tidy_keeps_what_this_run_used_and_what_was_used_lately(tmp_path) -> None:
    folder = str(tmp_path)
    for key in ("used", "recent", "old"):
        assert fingerprint_cache.write(folder, key, [entry_rows(3)], pa.string())
    week_ago = time.time() - 8 * 86400
    for key in ("used", "old"):
        os.utime(fingerprint_cache.entry(folder, key), (week_ago, week_ago))
    (tmp_path / ".old.123.abc.tmp").write_bytes(b"left by a killed run")
    os.utime(tmp_path / ".old.123.abc.tmp", (week_ago, week_ago))
    assert fingerprint_cache.tidy(folder, ["used"]) == 2
    assert sorted(os.listdir(folder)) == ["recent.arrow", "used.arrow"]
    assert os.stat(fingerprint_cache.entry(folder, "used")).st_mtime > time.time() - 60  # marked as used now
    assert fingerprint_cache.tidy(str(tmp_path / "absent"), ["used"]) == 0


@pytest.mark.spark
@pytest.mark.parametrize("id_type", [pa.string(), pa.int32()])
def test_an_incremental_first_pass_reads_the_kept_rows_not_the_embeddings(spark, tmp_path, id_type) -> None:
    import helpers

    from pipelines.session import EngineSession

    checkpoint = helpers.untrained_checkpoint(DIM, levels=3, codebook_size=8, seed=1)
    table, _ = catalog(id_type=id_type)
    write_table(tmp_path / "catalog", table, "delta")
    source = str(tmp_path / "catalog")
    v = validate_catalog(io.read_catalog(spark, source, "delta"), dim=DIM)
    contract = v.rows.schema[ITEM_ID].dataType.simpleString()
    files, _ = io.embedding_files(source, "delta", "item_id", "embedding")
    assert files is not None and len(files.stamps) == len(files.row_groups) >= 6
    keys = cache_keys(files, DIM, contract)
    scratch = EngineSession(spark, "local", True, _owns_session=False, _scratch=str(tmp_path / "scratch"))
    folder = str(tmp_path / "cache")

    # The full pass keeps every row group's rows (rejects included) and reads none.
    full = encode_catalog(v, checkpoint, materialize=scratch.materialize, files=files, tasks=2, cache=folder)
    first = rows_of(full.codes)
    assert fingerprint_cache.present(folder, keys) == len(keys)
    arrow_id = pa.string() if contract == "string" else pa.int64()
    kept = [fingerprint_cache.read(folder, k, st.rows, arrow_id) for k, st in zip(keys, files.stamps, strict=True)]
    assert sum(b.num_rows for b in kept) == table.num_rows
    # Each entry is what the keyed per-row pass alone gives for its row group (pipelines/row_checks.py, whose
    # source the key holds), whatever the encoder around it does: read, checked and fingerprinted again here in
    # batches of 4 rows, the same rows.
    from pipelines import row_checks

    for (file, group), entry in zip(files.row_groups, kept, strict=True):
        alone = [row_checks.entry_rows(row_checks.check_batch(batch, DIM, fingerprints=True))
                 for batch in row_checks.read_row_group(row_checks.open_file(file), group, "item_id", "embedding",
                                                        arrow_id, batch_rows=4)]
        assert entry is not None and alone
        assert sorted(pa.Table.from_batches(alone).to_pylist(), key=str) == sorted(entry.to_pylist(), key=str)
    clean = {r[ITEM_ID]: r[EMBEDDING_FINGERPRINT] for b in kept for r in b.to_pylist() if r[REASON] is None}
    # The repeated id is flagged after the pass, on its output: its rows are kept as the per-row rules leave them.
    assert set(clean) - set(first) == {"dup" if contract == "string" else 7}
    assert {i: clean[i] for i in first} == {i: row[EMBEDDING_FINGERPRINT] for i, row in first.items()}

    held = sorted(first)[:60]
    known = spark.createDataFrame([(i, first[i][EMBEDDING_FINGERPRINT]) for i in held],
                                  f"{ITEM_ID} {contract}, {EMBEDDING_FINGERPRINT} bigint")

    def incremental(listed: io.EmbeddingFiles, cache: str | None) -> tuple[dict, object]:
        out = encode_catalog(v, checkpoint, materialize=scratch.materialize, known=known, policy="new_or_changed",
                             files=listed, tasks=2, cache=cache)
        return rows_of(out.codes), out

    without, plain = incremental(files, None)
    cached, out = incremental(files, folder)
    assert cached == without and (out.counts, out.encoded_rows) == (plain.counts, plain.encoded_rows) == (
        plain.counts, 30)
    assert sorted(map(tuple, out.rejects.collect()), key=str) == sorted(map(tuple, plain.rejects.collect()), key=str)

    # The entries are what the pass reads: one held item's kept fingerprint altered makes it "changed", and
    # the second pass, reading that item's embedding to encode it, finds another fingerprint: the run stops.
    victim = held[0]
    at = next(j for j, b in enumerate(kept) if victim in b.column(ITEM_ID).to_pylist())
    altered = kept[at].to_pydict()
    altered[EMBEDDING_FINGERPRINT] = [fp + 1 if i == victim else fp
                                      for i, fp in zip(altered[ITEM_ID], altered[EMBEDDING_FINGERPRINT], strict=True)]
    assert fingerprint_cache.write(folder, keys[at], [pa.RecordBatch.from_pydict(
        altered, schema=fingerprint_cache.schema(arrow_id))], arrow_id)
    with pytest.raises(RowAccountingError, match="read 31 rows again and read 31, 30 of them as the first pass"):
        incremental(files, folder)

    # The file touched after it was listed: the workers see it is not the listed one, so they neither use the
    # altered entry nor keep what they read under the old key.
    file = files.row_groups[at][0]
    later = os.stat(file).st_mtime_ns + 1_000_000_000
    os.utime(file, ns=(later, later))
    again, _ = incremental(files, folder)
    assert again == without
    assert fingerprint_cache.read(folder, keys[at], files.stamps[at].rows, arrow_id).to_pydict() == altered
    # Listed again, it is another row group (a new key): read, and kept under that key.
    relisted, _ = io.embedding_files(source, "delta", "item_id", "embedding")
    assert relisted is not None
    new_keys = cache_keys(relisted, DIM, contract)
    same_file = [f == file for f, _ in files.row_groups]  # the file's every row group has a new key, no other
    assert [new != old for new, old in zip(new_keys, keys, strict=True)] == same_file
    assert incremental(relisted, folder)[0] == without
    assert fingerprint_cache.read(folder, new_keys[at], relisted.stamps[at].rows, arrow_id).to_pylist() == \
        kept[at].to_pylist()


def test_the_key_covers_the_modules_that_make_an_entrys_rows_and_not_the_encoder(tmp_path) -> None:
    """Every function the pass calls to read, check and fingerprint a row and to make an entry's rows lives in a
    keyed module, so an edit to any of them is a new key; an edit to pipelines/encode.py (the model, the
    batching) keeps the entries. That an entry holds only those functions' output is the test above."""
    import inspect
    from pathlib import Path

    from pipelines import arrow_utils, row_checks, schema, validate

    keyed = set(fingerprint_cache.RULES)
    makers = [row_checks.check_batch, row_checks.entry_rows, row_checks.read_row_group, row_checks.open_file,
              validate.row_reason_codes, arrow_utils.row_fingerprints, arrow_utils.embeddings_to_numpy,
              schema.RejectReason]
    assert {Path(inspect.getfile(f)).name for f in makers} <= keyed

    package = Path(row_checks.__file__).parent
    copy = tmp_path / "pipelines"
    copy.mkdir()
    for name in [*keyed, "encode.py"]:
        (copy / name).write_bytes((package / name).read_bytes())
    before = fingerprint_cache.digest_of(copy)
    assert before == fingerprint_cache.rules_digest()
    (copy / "encode.py").write_text((package / "encode.py").read_text() + "\n# a release that changes the encoder\n")
    assert fingerprint_cache.digest_of(copy) == before
    for name in sorted(keyed):
        edited = copy / name
        original = edited.read_bytes()
        edited.write_bytes(original + b"\n# an edit to the rules\n")
        assert fingerprint_cache.digest_of(copy) != before, name
        edited.write_bytes(original)
