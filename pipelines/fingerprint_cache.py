"""Each catalog row group's checked and fingerprinted rows, kept between runs (a memo, never a source of truth).

An incremental run must know every catalog row's reject reason and embedding fingerprint to tell new
and changed items from those the table holds, and computing them means reading every embedding: at
5M x 256 that pass was 7.5 s of a 43 s run whose new items took 5 s. A Parquet row group's rows are
a function of its bytes, and a Delta table never rewrites a data file in place (it adds new ones),
so the encode UDF keeps, per row group, the (item id, reason, fingerprint) rows it computed, and a
later pass over the same row group reads those instead of its embeddings.

The key of an entry is everything the rows depend on: the row group's identity (its file's path inside
the table, size and modification time, its index, rows and bytes: :attr:`pipelines.io.EmbeddingFiles.identities`),
the two columns, the id's type, the dimension D, and a digest of the code of the per-row rules and of
the fingerprint (``pipelines/validate.py`` and ``pipelines/arrow_utils.py``), so an edit to either
makes every entry unused. An entry that cannot be read, or holds another number of rows than the row
group, is computed again. Entries are written whole (a temporary file renamed), so a killed run
leaves none half-written. A file rewritten in place with the same size and modification time to the
nanosecond would be taken for the old one: Delta never does that; ``--fingerprint-cache none`` turns the
cache off for a Parquet folder whose writer might.

The folder is ``<work-dir>/fingerprint_cache`` (``--fingerprint-cache``). After each pass, entries this
run did not use and that no run used for :data:`KEEP_UNUSED_DAYS` days are deleted (a compacted
catalog's old files, another catalog's entries in a shared work dir).
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa

from pipelines.schema import EMBEDDING_FINGERPRINT, ITEM_ID, REASON

FOLDER = "fingerprint_cache"  # under --work-dir, the default
KEEP_UNUSED_DAYS = 7
_SUFFIX = ".arrow"
_COLUMNS = (ITEM_ID, REASON, EMBEDDING_FINGERPRINT)


@functools.lru_cache(maxsize=1)
def rules_digest() -> str:
    """SHA-256 of the source of the per-row rules and the fingerprint: a change to either is a new key."""
    here = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for name in ("validate.py", "arrow_utils.py"):
        digest.update((here / name).read_bytes())
    return digest.hexdigest()


def keys(identities: Sequence[str], id_column: str, embedding_column: str, id_type: str, dim: int) -> tuple[str, ...]:
    """The entry key of each row group (hex, one per identity)."""
    common = f"{id_column}|{embedding_column}|{id_type}|{dim}|{rules_digest()}"
    return tuple(hashlib.sha256(f"{identity}|{common}".encode()).hexdigest()[:40] for identity in identities)


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
    if not os.path.isdir(folder):
        return 0
    now = time.time()
    in_use = set(used)
    deleted = 0
    for name in os.listdir(folder):
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
