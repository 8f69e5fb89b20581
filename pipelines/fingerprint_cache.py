"""Each catalog row group's checked and fingerprinted rows, kept between runs (a memo, never a source of truth).

An incremental run must know every catalog row's reject reason and embedding fingerprint to tell new
and changed items from those the table holds, and computing them means reading every embedding: at
5M x 256 that pass was 7.5 s of a 43 s run whose new items took 5 s. A Parquet row group's rows are
a function of its bytes, and a Delta table never rewrites a data file in place (it adds new ones),
so the encode UDF keeps, per row group, the (item id, reason, fingerprint) rows it computed, and a
later pass over the same row group reads those instead of its embeddings.

The key of an entry is everything the rows depend on: the row group's stamp
(:class:`pipelines.io.RowGroupStamp`: the Delta table's id or the Parquet folder's real path, the file's
path inside the table, its size and modification time, the row group's index and rows, a digest of its
footer metadata), the two columns, the id's type, the dimension D, and :func:`rules_digest` (the source
of the modules that read, check and fingerprint a row, :data:`RULES`, and the versions of xxhash, pyarrow
and NumPy), so an edit to the rules or an upgrade of those libraries makes every entry unused. The encode
stage itself (:mod:`pipelines.encode`: the model, the batching, the engine hand-over) is not in the key.
A worker uses or keeps an entry only while the file still has the listed size and modification time
(checked before and after reading it). An
entry that cannot be read, or holds another number of rows than the row group, is computed again.
Entries are written whole (a temporary file synced and renamed), so a killed run leaves none
half-written. A file rewritten in place with the same size, modification time to the nanosecond and
footer would be taken for the old one: Delta never rewrites a file; ``--fingerprint-cache none`` turns
the cache off for a Parquet folder whose writer might.

The folder is ``<work-dir>/fingerprint_cache`` (``--fingerprint-cache``). After each pass, entries this
run did not use and that no run used for :data:`KEEP_UNUSED_DAYS` days are deleted (a compacted
catalog's old files, another catalog's entries in a shared work dir).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa

from pipelines.io import RowGroupStamp
from pipelines.schema import EMBEDDING_FINGERPRINT, ITEM_ID, REASON

FOLDER = "fingerprint_cache"  # under --work-dir, the default
KEEP_UNUSED_DAYS = 7
_SUFFIX = ".arrow"


# The modules whose code decides an entry's rows: the per-row pass (how a row group is read, checked and
# fingerprinted), the per-row rules and their limits, the fingerprint, and the reasons' names. Not
# encode.py: it runs the model on the clean rows and places the columns, and its edits (batching, the engine
# hand-over) would otherwise make every entry unused (tests/pipelines/test_fingerprint_cache.py checks that
# the functions the pass calls live in these modules).
RULES = ("row_checks.py", "validate.py", "arrow_utils.py", "schema.py")


@functools.lru_cache(maxsize=1)
def rules_digest() -> str:
    """SHA-256 of :data:`RULES`' source and of the xxhash, pyarrow and NumPy versions: a change to any of
    them is a new key for every entry. Raises OSError when the sources cannot be read (the cache is off)."""
    return digest_of(Path(__file__).resolve().parent)


def digest_of(folder: Path) -> str:
    """:func:`rules_digest` of the :data:`RULES` modules in ``folder`` (the installed ``pipelines`` package)."""
    import numpy as np
    import xxhash

    digest = hashlib.sha256()
    for name in RULES:
        digest.update((folder / name).read_bytes())
    digest.update(json.dumps([xxhash.VERSION, getattr(xxhash, "XXHASH_VERSION", ""), pa.__version__,
                              np.__version__]).encode())
    return digest.hexdigest()


def keys(stamps: Sequence[RowGroupStamp], id_column: str, embedding_column: str, id_type: str,
         dim: int) -> tuple[str, ...]:
    """The entry key of each row group (hex, one per stamp)."""
    common = [id_column, embedding_column, id_type, dim, rules_digest()]
    return tuple(hashlib.sha256(json.dumps([dataclasses.astuple(stamp), common]).encode()).hexdigest()[:40]
                 for stamp in stamps)


def unchanged(file: str, stamp: RowGroupStamp) -> bool:
    """Whether ``file`` still has the size and modification time it was listed with."""
    try:
        stat = os.stat(file)
    except OSError:
        return False
    return (stat.st_size, stat.st_mtime_ns) == (stamp.size, stamp.mtime_ns)


def unusable(folder: str) -> str:
    """Why the cache cannot be used in ``folder`` (it cannot be created, written or listed), or ""."""
    try:
        rules_digest()
        os.makedirs(folder, exist_ok=True)
        probe = os.path.join(folder, f".probe.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
        with open(probe, "wb"):
            pass
        os.remove(probe)
        os.listdir(folder)
    except OSError as e:
        return f"{type(e).__name__}: {e.strerror or e}"
    return ""


def schema(id_type: pa.DataType) -> pa.Schema:
    """The columns an entry holds: the id (as the encode UDF outputs it), the reason, the fingerprint."""
    return pa.schema([(ITEM_ID, id_type), (REASON, pa.string()), (EMBEDDING_FINGERPRINT, pa.int64())])


def entry(folder: str, key: str) -> str:
    return os.path.join(folder, key + _SUFFIX)


def read(folder: str, key: str, rows: int, id_type: pa.DataType) -> pa.RecordBatch | None:
    """The entry's rows, or None when it is missing, unreadable or not the row group's (row count, columns)."""
    try:
        with pa.OSFile(entry(folder, key)) as source:
            table = pa.ipc.open_file(source).read_all()
    except (OSError, pa.ArrowException):
        return None
    if table.num_rows != rows or not table.schema.equals(schema(id_type)):
        return None
    return table.combine_chunks().to_batches()[0] if rows else None


def write(folder: str, key: str, batches: Sequence[pa.RecordBatch], id_type: pa.DataType) -> bool:
    """Write an entry whole (a temporary file renamed into place); False, and nothing left, if it cannot be.

    A cache that cannot be written (a full disk, no permission) never fails the pass: the rows are
    computed again next time."""
    target = entry(folder, key)
    temporary = os.path.join(folder, f".{key}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        os.makedirs(folder, exist_ok=True)
        with pa.OSFile(temporary, "wb") as sink, pa.ipc.new_file(sink, schema(id_type)) as writer:
            for batch in batches:
                writer.write_batch(batch)
        with open(temporary, "rb+") as written:  # on disk before it has its name (a power loss)
            os.fsync(written.fileno())
        os.replace(temporary, target)
        return True
    except (OSError, pa.ArrowException):
        with contextlib.suppress(OSError):
            os.remove(temporary)
        return False


def present(folder: str, wanted: Sequence[str]) -> int:
    """How many of ``wanted`` have an entry (a quick look, before the pass: the pass checks each one)."""
    return sum(1 for key in wanted if os.path.exists(entry(folder, key)))


def tidy(folder: str, used: Sequence[str], keep_unused_s: float = KEEP_UNUSED_DAYS * 86400.0) -> int:
    """Mark the ``used`` entries as just used, and delete the entries (and temporary files) no run used for
    ``keep_unused_s`` seconds; returns how many were deleted. Nothing happens without the folder."""
    try:
        names = os.listdir(folder)
    except OSError:  # no folder, or one this user may not list: nothing to tidy
        return 0
    now = time.time()
    in_use = set(used)
    deleted = 0
    for name in names:
        path = os.path.join(folder, name)
        key = name[: -len(_SUFFIX)] if name.endswith(_SUFFIX) else None
        try:
            if key in in_use:
                os.utime(path, (now, now))
            elif now - os.stat(path).st_mtime > keep_unused_s:
                os.remove(path)
                deleted += 1
        except OSError:  # another run's temporary file renamed or removed meanwhile
            continue
    return deleted
