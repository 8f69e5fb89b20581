"""Table IO: the one module that reads the catalog and reads/writes the pipeline's tables.

Output tables sit beside each other under one :class:`OutputLocation`: a directory
(``<root>/semantic_ids``, ``<root>/rejects``...) or a catalog schema (``main.semids.semantic_ids``).

Overwrites are atomic so that a failed or killed run leaves the previous version readable:

* Delta: an overwrite is one commit to ``_delta_log``; files of a failed write are never committed.
* Parquet on a local filesystem: the new data is written to a hidden staging sibling, then the
  directories are swapped with two renames (old -> backup, staging -> final) and the backup is
  deleted. A failure before the swap leaves the old data untouched. Between the two renames (a
  few microseconds) the table path does not exist; a crash exactly there leaves the old data in
  the ``.<name>.backup-*`` sibling, and a killed write may leave a ``.<name>.staging-*`` sibling
  (both hidden from Spark readers; safe to delete). Plain paths and ``file:`` URIs are taken as
  the driver's filesystem; Parquet on other stores (``s3://``, ``hdfs://``, ``dbfs:/``) is written
  in place, as plain Spark does, and is not atomic. Prefer Delta (the default) everywhere.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from pyspark.sql import DataFrame, DataFrameWriter, SparkSession

from pipelines.session import DeltaNotAvailableError, first_line, pid_alive  # first_line: io.first_line too

log = logging.getLogger(__name__)

OUTPUT_FORMATS = ("delta", "parquet")
INPUT_FORMATS = ("auto", "delta", "parquet", "table")
DELTA_LOG = "_delta_log"


class CatalogNotFoundError(FileNotFoundError):
    """The input catalog path (or table name) does not exist."""


class CatalogFormatError(ValueError):
    """The input exists but is not a table the job reads (CSV, an empty folder, Delta read as Parquet...)."""


@dataclass(frozen=True)
class OutputLocation:
    """Where the output tables go: a directory/URI or a catalog schema, and their format.

    Attributes:
        root: directory or URI (``/data/semids``, ``s3://bucket/semids``), or a catalog schema
            (``main.semids``) when ``is_catalog``.
        fmt: "delta" (default) or "parquet".
        is_catalog: tables are catalog tables ``<root>.<name>`` written with ``saveAsTable``.
    """

    root: str
    fmt: str = "delta"
    is_catalog: bool = False
    shown: str | None = None  # the user's spelling of ``root`` (``root`` may be a safe link to it: engine_path)

    def __post_init__(self) -> None:
        if self.fmt not in OUTPUT_FORMATS:
            raise ValueError(f"unknown output format {self.fmt!r}; use --format delta or --format parquet")
        if not self.root:
            raise ValueError("empty output location; pass --output PATH or --output-table-prefix SCHEMA")

    @classmethod
    def for_path(cls, path: str, fmt: str = "delta") -> OutputLocation:
        """Tables as directories ``<path>/<name>``."""
        return cls(path, fmt, is_catalog=False)

    @classmethod
    def for_catalog(cls, schema: str, fmt: str = "delta") -> OutputLocation:
        """Tables as catalog tables ``<schema>.<name>`` (e.g. ``main.semids.semantic_ids``)."""
        return cls(schema.rstrip("."), fmt, is_catalog=True)

    def of(self, name: str) -> str:
        """Path or fully qualified table name of table ``name`` (e.g. ``SEMANTIC_IDS_TABLE``)."""
        return f"{self.root}.{name}" if self.is_catalog else table_path(self.root, name)

    def shown_of(self, name: str) -> str:
        """:meth:`of` as the user wrote the location: for messages."""
        return f"{self.root}.{name}" if self.is_catalog else table_path(self.shown or self.root, name)

    @property
    def shown_root(self) -> str:
        return self.shown or self.root


# --- user paths -> paths every reader of them agrees on ---------------------------------------------------

# Characters the embedded engine (Sail) and delta-rs both take literally in a local path. Sail URL-encodes
# others (space, '#', '%', non-ASCII... land in percent-encoded siblings), cuts Delta paths at '?' and '*',
# and classic Spark and Sail treat '*?[]{}\' as glob patterns on read; delta-rs decodes '%XX'.
_SAFE_LOCAL = re.compile(r"[A-Za-z0-9/._\-+=,@!$&'();:]*")
_GLOB = frozenset("*?[]{}\\")
_PERCENT_ESCAPE = re.compile(r"%[0-9A-Fa-f]{2}")
_LINKS = "csid-paths"


def engine_path(path: str, engine: str = "local", create: bool = False) -> str:
    """The form of a user's table path that the engine, delta-rs and Python all read at that very place.

    * Object-store and other non-local URIs (``s3://``, ``abfss://``, ``dbfs:/``) and every path on a
      remote (Spark Connect) engine are the server's to resolve: returned as given, except a relative local
      path on a remote engine, which is made absolute against this process's working directory: the job
      writes the demo catalog and reads its tables back here, so a server that resolved it against its own
      working directory would use another folder.
    * ``file:`` URIs are local paths (as in Hadoop: the rest is taken literally, not percent-decoded).
    * Local paths become absolute (Sail resolves relative ones against the cwd of each call). One with a
      character outside ``[A-Za-z0-9/._-+=,@!$&'();:]`` (a space, '#', '%', '?', non-ASCII...) is reached
      through a symbolic link of a safe name under ``$TMPDIR/csid-paths-<uid>/`` that points at it: the
      engine writes through the link into the stated folder. With ``create`` (an output folder) the
      folder is created first; a missing input is returned as it is, to be reported by its own name.

    Raises:
        ValueError: a glob character in a path that is not local (no link can hide it there), or a local path
            with ``%`` and two hex digits (delta-rs decodes them, whatever form it is given).
    """
    if engine == "remote" or _is_remote_uri(path):
        bad = "".join(sorted(_GLOB & set(path)))
        if bad:
            raise ValueError(f"path {path!r} contains {bad!r}, which Spark reads as a glob pattern: rename it")
        local = local_path(path)
        return os.path.abspath(local) if local is not None and not local.is_absolute() else path
    local = local_path(path)
    assert local is not None
    absolute = os.path.abspath(local)
    escape = _PERCENT_ESCAPE.search(absolute)
    if escape:
        raise ValueError(f"path {path!r} contains {escape.group()!r}: delta-rs (and so every reader outside Spark) "
                         f"decodes it as an escaped character and would look elsewhere; rename the folder")
    if _SAFE_LOCAL.fullmatch(absolute):
        return absolute
    if create:
        Path(absolute).mkdir(parents=True, exist_ok=True)
    elif not os.path.exists(absolute):
        return absolute
    return str(_safe_link(absolute))


def _is_remote_uri(path: str) -> bool:
    return local_path(path) is None


def _safe_link(target: str) -> Path:
    """A symbolic link with a safe name that points at ``target`` (created, or reused when it already does)."""
    import hashlib
    import tempfile

    folder = Path(tempfile.gettempdir()) / f"{_LINKS}-{os.getuid()}"
    folder.mkdir(parents=True, exist_ok=True)
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", os.path.basename(target.rstrip("/")))[:40] or "path"
    link = folder / f"{readable}-{hashlib.sha256(target.encode()).hexdigest()[:12]}"
    if os.path.islink(link) and os.readlink(link) == target:
        return link
    temporary = folder / f".{link.name}.{os.getpid()}-{uuid.uuid4().hex[:6]}"
    os.symlink(target, temporary)
    os.replace(temporary, link)  # atomic: a concurrent run sees the old link or this one
    return link


def resolve_output(output: str | None, table_prefix: str | None, fmt: str = "delta",
                   engine: str | None = None) -> OutputLocation:
    """Map the ``--output`` / ``--output-table-prefix`` flags onto an :class:`OutputLocation`; given the
    engine, a path goes through :func:`engine_path` (created if missing)."""
    if bool(output) == bool(table_prefix):
        raise ValueError("pass exactly one of --output PATH and --output-table-prefix CATALOG.SCHEMA")
    if table_prefix:
        return OutputLocation.for_catalog(table_prefix, fmt)
    if engine is None:
        return OutputLocation.for_path(str(output), fmt)
    return OutputLocation(engine_path(str(output), engine, create=True), fmt, shown=str(output))


def table_path(output: str, name: str) -> str:
    """``<output>/<name>``: the path of table ``name`` under the output directory or URI."""
    return f"{output.rstrip('/')}/{name}"


def local_path(path: str) -> Path | None:
    """The local filesystem path of a plain path or ``file:`` URI; None for other URIs (s3://...).

    The rest of a ``file:`` URI is taken literally, as Hadoop does: ``file:///data/a b#1`` is the folder
    ``/data/a b#1`` (no percent-decoding, no fragment)."""
    if path.startswith("file:"):
        rest = path[len("file:"):]
        return Path(rest[2:] if rest.startswith("///") else rest)
    parsed = urlparse(path)
    if parsed.scheme and len(parsed.scheme) > 1:  # one letter: a Windows drive, still local
        return None
    return Path(path)


def read_catalog(spark: SparkSession, source: str, fmt: str = "auto") -> DataFrame:
    """Read the input catalog from a path/URI or a table name.

    Args:
        spark: the session.
        source: directory, file or URI of a Delta/Parquet table, or a table name (``items``,
            ``main.shop.items``).
        fmt: "delta", "parquet", "table" or "auto": a local path with ``_delta_log`` is Delta, one
            with ``.parquet`` files is Parquet; a string without "/" that is no existing path is a
            table name; any other path (a URI, or a path only the cluster's filesystem has) is
            Delta unless it ends in ``.parquet``.

    Raises:
        CatalogNotFoundError: neither the driver nor the engine finds the path (or the table).
        ValueError: unknown ``fmt``, or a local path whose format cannot be told.
    """
    if fmt not in INPUT_FORMATS:
        raise ValueError(f"unknown input format {fmt!r}; choose one of {', '.join(INPUT_FORMATS)}")
    if fmt == "auto":
        fmt = detect_format(spark, source)
    if fmt == "table":
        return spark.read.table(source)
    path = local_path(source)
    if path is not None and path.exists():
        is_delta = (path / DELTA_LOG).is_dir()
        if fmt == "delta" and not is_delta:
            raise CatalogFormatError(f"{source!r} is not a Delta table (no {DELTA_LOG} folder): pass --input-format "
                                     "parquet (or auto)")
        if fmt == "parquet" and is_delta:
            raise CatalogFormatError(f"{source!r} is a Delta table: reading its Parquet files directly would also read "
                                     "rows Delta has deleted or replaced. Pass --input-format delta (or auto)")
    df = load_path(spark, source, fmt)
    try:
        df.schema  # noqa: B018 - resolves the files on Connect, where load() is lazy
    except Exception as e:  # noqa: BLE001 - the engine's reason goes into the message
        reason = first_line(e, 300)
        raise CatalogFormatError(f"cannot read {source!r} as {fmt} ({reason}): the job reads Delta or Parquet "
                                 "tables; check --input and --input-format") from e
    return df


@dataclass(frozen=True)
class RowGroupStamp:
    """What identifies a Parquet row group's content without reading its data: the key of its cached
    fingerprints (pipelines/fingerprint_cache.py).

    Attributes:
        table: the Delta table's id (kept by a copy or a move of the table), or a Parquet table's real path.
        path: the file's path inside the table.
        size, mtime_ns: the file's size and modification time (nanoseconds) when it was listed.
        index: the row group's index in the file.
        rows: the row group's rows by the footer.
        footer: SHA-256 of the row group's footer metadata (column chunks' offsets, sizes, statistics).
    """

    table: str
    path: str
    size: int
    mtime_ns: int
    index: int
    rows: int
    footer: str


@dataclass(frozen=True)
class EmbeddingFiles:
    """The Parquet row groups that hold every row of a file table, for a reader outside the engine.

    Attributes:
        row_groups: (file path, row group index) of every non-empty row group, in file order.
        id_column, embedding_column: the physical column names of the item id and the embedding.
        source: the table's path, and for Delta its version (printed and logged with the run).
    """

    row_groups: tuple[tuple[str, int], ...]
    id_column: str
    embedding_column: str
    source: str
    rows: int = 0  # the files' rows by their footers: checked against the engine's count before they are used
    stamps: tuple[RowGroupStamp, ...] = ()  # one per row group, when known: the fingerprint cache's key


def embedding_lengths(files: EmbeddingFiles, rows: int) -> dict[int, int]:
    """How many of the first ``rows`` non-null embeddings of ``files`` (in row-group order) have each length:
    read with pyarrow, a batch at a time, without the engine (whose first query on classic Spark, a limit
    read incrementally over the files, costs 4 s of JVM start-up work at 1M x 768). The column's pages are
    streamed, not its whole row-group chunk read first: 0.09 s instead of 0.45 s for 10,000 of 768 floats."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    counts: dict[int, int] = {}
    seen = 0
    for file, group in files.row_groups:
        parquet = pq.ParquetFile(file, pre_buffer=False, buffer_size=1 << 20)
        for batch in parquet.iter_batches(batch_size=min(rows, 8192), row_groups=[group],
                                          columns=[files.embedding_column]):
            lengths = pc.list_value_length(batch.column(0)).drop_null()[:rows - seen]
            for value in pc.value_counts(lengths).to_pylist():
                counts[value["values"]] = counts.get(value["values"], 0) + value["counts"]
            seen += len(lengths)
            if seen >= rows:
                return counts
    return counts


# Delta reader features that change nothing about how a data file's rows are read.
_PLAIN_READER_FEATURES = frozenset({"timestampNtz", "v2Checkpoint", "vacuumProtocolCheck", "checkpointProtection"})


def embedding_files(source: str, fmt: str, id_column: str, embedding_column: str) -> tuple[EmbeddingFiles | None, str]:
    """The row groups to read the ids and embeddings of a local Delta or Parquet table from, or why not.

    The encode pass can read them with pyarrow inside its UDF instead of through the engine: the
    engine then never decodes nor hands over the embedding column (its biggest column by far). Only
    where that reads exactly the rows and values the engine would: a path on the driver's filesystem
    (which the engine's workers must see too, as for the engine's own read), a Delta table whose
    files are plain Parquet (no deletion vectors, no column mapping or other reader feature, the two
    columns not partition columns) or a Parquet folder/file, every file with an id column of STRING
    or an integer type and an embedding column of ``list<float>`` (FLOAT, not DOUBLE: the engine casts).

    Returns:
        (the files, "") or (None, the reason the engine must read the table).
    """
    path = local_path(source)
    if path is None or not path.exists():
        return None, "not a path on this machine's filesystem"
    is_delta = (path / DELTA_LOG).is_dir()
    if fmt not in ("auto", "delta", "parquet") or (fmt == "parquet" and is_delta) or (fmt == "delta" and not is_delta):
        return None, f"input format {fmt!r}"
    import pyarrow.parquet as pq

    if is_delta:
        try:
            from deltalake import DeltaTable

            table = DeltaTable(str(path))
            protocol, metadata = table.protocol(), table.metadata()
        except Exception as e:  # noqa: BLE001 - a log delta-rs cannot read: the engine may
            return None, f"delta-rs cannot read its log ({first_line(e)})"
        features = set(protocol.reader_features or ()) - _PLAIN_READER_FEATURES
        mapping = metadata.configuration.get("delta.columnMapping.mode", "none")
        if features or mapping != "none" or protocol.min_reader_version == 2:
            return None, (f"Delta reader features {sorted(features)}" if features
                          else f"column mapping (mode {mapping}, reader version {protocol.min_reader_version})")
        if {id_column, embedding_column} & set(metadata.partition_columns):
            return None, "the id or embedding column is a partition column"
        # The log's paths are URIs relative to the table (percent-encoded once: the partition folder
        # "k=x%20y" is "k=x%2520y" there); file_uris() would encode the table's own path as well.
        relative = table.get_add_actions(flatten=True).column("path").to_pylist()
        if any("://" in uri or uri.startswith("/") for uri in relative):
            return None, "data files outside the table's folder (a shallow clone)"
        files = [str(path / unquote(uri)) for uri in relative]
        shown = f"{path} (Delta version {table.version()})"
        table_id = f"delta:{metadata.id}"
    else:
        files, shown = _spark_visible_files(path), str(path)
        table_id = f"parquet:{os.path.realpath(path)}"
    row_groups: list[tuple[str, int]] = []
    stamps: list[RowGroupStamp] = []
    rows = 0
    for file in files:
        try:
            meta = pq.ParquetFile(file).metadata
            stat = os.stat(file)
        except Exception as e:  # noqa: BLE001 - not a Parquet file pyarrow can read: the engine decides
            return None, f"{file}: {first_line(e)}"
        why = _unreadable_columns(meta.schema.to_arrow_schema(), id_column, embedding_column)
        if why:
            return None, f"{file}: {why}"
        inside = os.path.relpath(file, path) if path.is_dir() else os.path.basename(file)
        for g in range(meta.num_row_groups):
            group = meta.row_group(g)
            if group.num_rows:
                row_groups.append((file, g))
                footer = hashlib.sha256(repr(group.to_dict()).encode()).hexdigest()
                stamps.append(RowGroupStamp(table_id, inside, stat.st_size, stat.st_mtime_ns, g, group.num_rows,
                                            footer))
        rows += meta.num_rows
    if not row_groups:
        return None, "no rows in its files"
    return EmbeddingFiles(tuple(row_groups), id_column, embedding_column, shown, rows, tuple(stamps)), ""


def _spark_visible_files(path: Path) -> list[str]:
    """The files under ``path`` that Spark's file listing reads (a file itself, or every file below a
    folder whose name it does not hide: "_x" unless it has "=" (a partition folder), ".x", "x._COPYING_")."""
    def hidden(name: str) -> bool:
        return (name.startswith("_") and "=" not in name) or name.startswith(".") or name.endswith("._COPYING_")

    if path.is_file():
        return [str(path)]
    found = []
    for folder, subfolders, names in os.walk(path):
        subfolders[:] = sorted(d for d in subfolders if not hidden(d))
        found += [os.path.join(folder, n) for n in sorted(names) if not hidden(n)]
    return found


def _unreadable_columns(schema: Any, id_column: str, embedding_column: str) -> str:
    """Why a file's id and embedding columns are not ones the encode UDF reads as the engine would ("" if they are)."""
    import pyarrow as pa

    names = schema.names
    for name in (id_column, embedding_column):
        if names.count(name) != 1:
            return f"column {name!r} {'missing' if name not in names else 'repeated'}"
    id_type, emb_type = schema.field(id_column).type, schema.field(embedding_column).type
    if not (pa.types.is_string(id_type) or pa.types.is_large_string(id_type) or pa.types.is_integer(id_type)) \
            or pa.types.is_uint64(id_type):
        return f"id column of type {id_type}"
    if not ((pa.types.is_list(emb_type) or pa.types.is_large_list(emb_type) or pa.types.is_fixed_size_list(emb_type))
            and pa.types.is_float32(emb_type.value_type)):
        return f"embedding column of type {emb_type} (the engine casts it to list<float>)"
    return ""


def load_path(spark: SparkSession, source: str, fmt: str) -> DataFrame:
    """``spark.read.format(fmt).load(source)``; a path nobody can find raises CatalogNotFoundError.

    A plain path missing on the driver may still exist on the cluster's default filesystem (HDFS,
    DBFS), so the engine is asked (a metadata-only schema resolution) before giving up. Classic
    Spark raises PATH_NOT_FOUND; Sail returns an empty frame without columns, counted as missing.
    """
    path = local_path(source)
    if path is None or path.exists():
        return spark.read.format(fmt).load(source)
    reason = "it has no columns"
    try:
        df = spark.read.format(fmt).load(source)
        if df.schema.fields:  # resolving the schema forces the lookup on Connect, where load() is lazy
            return df
    except Exception as e:  # noqa: BLE001 - the engine's reason goes into the message
        reason = first_line(e, 200)
    raise CatalogNotFoundError(
        f"table path {source!r} does not exist: not on the driver ({path.absolute()}), and the engine "
        f"cannot read it as {fmt} ({reason})"
    )


def detect_format(spark: SparkSession, source: str) -> str:
    """The input format "auto" resolves to for ``source``; see :func:`read_catalog`."""
    path = local_path(source)
    if path is None:
        return "parquet" if source.rstrip("/").endswith(".parquet") else "delta"
    if path.exists():
        if (path / DELTA_LOG).is_dir():
            return "delta"
        if path.suffix == ".parquet" or (path.is_dir() and next(path.rglob("*.parquet"), None)):
            return "parquet"
        if path.is_dir() and not any(path.iterdir()):
            raise CatalogFormatError(f"{source!r} is an empty folder, not a table: check --input")
        raise CatalogFormatError(
            f"{source!r} is neither a Delta table (no {DELTA_LOG} folder) nor Parquet (no .parquet files): the job "
            "reads Delta or Parquet tables, or a table name. Convert the catalog first (e.g. "
            "spark.read.csv(...).write.format('delta').save(...)), or pass --input-format parquet for Parquet files "
            "without the .parquet suffix"
        )
    if "/" not in source and os.sep not in source:
        if _table_missing(spark, source):
            raise CatalogNotFoundError(f"{source!r} is neither an existing path nor a table name")
        return "table"
    # Not on the driver: maybe on the cluster's default filesystem. Delta is the project's default.
    return "parquet" if source.rstrip("/").endswith(".parquet") else "delta"


def _table_missing(spark: SparkSession, name: str) -> bool:
    """True when the catalog says table ``name`` does not exist (unknown when it cannot say)."""
    try:
        return not spark.catalog.tableExists(name)
    except Exception:  # noqa: BLE001 - e.g. an unknown catalog: let spark.read.table report it
        return False


def read_table(spark: SparkSession, location: OutputLocation, name: str, version: int | None = None) -> DataFrame:
    """Read output table ``name`` (e.g. ``REJECTS_TABLE``) back from ``location``.

    Args:
        version: a Delta table version to read (time travel); None reads the latest.

    Raises:
        CatalogNotFoundError: the table path does not exist.
    """
    target = location.of(name)
    if location.is_catalog:
        if version is not None:
            return spark.read.option("versionAsOf", version).table(target)
        return spark.read.table(target)
    if version is not None:
        if location.fmt != "delta":
            raise ValueError(f"version {version} of {target}: only Delta tables have versions")
        return spark.read.format("delta").option("versionAsOf", version).load(target)
    return load_path(spark, target, location.fmt)


def table_exists(spark: SparkSession, location: OutputLocation, name: str) -> bool:
    """Whether output table ``name`` exists under ``location`` (a Delta log, Parquet files or a catalog table).

    A local path is looked at directly; a remote URI is asked of the engine (a schema lookup).
    """
    target = location.of(name)
    if location.is_catalog:
        return not _table_missing(spark, target)
    path = local_path(target)
    if path is not None:
        if location.fmt == "delta":
            return (path / DELTA_LOG).is_dir()
        return path.is_dir() and next(path.rglob("*.parquet"), None) is not None
    try:
        return bool(load_path(spark, target, location.fmt).schema.fields)
    except (CatalogNotFoundError, Exception):  # noqa: BLE001 - any failure to resolve it: not there
        return False


def table_version(location: OutputLocation, name: str, spark: SparkSession | None = None) -> int | None:
    """Current Delta version of output table ``name``: delta-rs for a path it can open, else (given the
    session) ``DESCRIBE HISTORY`` on engines that have it (classic Spark with Delta, Databricks: catalog
    tables, stores only the cluster can read); None for Parquet or when neither can tell."""
    if location.fmt != "delta":
        return None
    version = None if location.is_catalog else delta_version(location.of(name))
    if version is None and spark is not None:
        try:
            row = spark.sql(f"DESCRIBE HISTORY {_table_reference(location, name)} LIMIT 1").first()
            version = int(row["version"]) if row is not None else None
        except Exception:  # noqa: BLE001 - the embedded engine has no DESCRIBE HISTORY
            version = None
    return version


def interrupted_swap(location: OutputLocation, name: str) -> Path | None:
    """The backup a Parquet swap left when it was killed between its two renames (the table itself is
    then missing), or None."""
    local = None if location.is_catalog else local_path(location.of(name))
    if local is None or location.fmt != "parquet":
        return None
    return next(iter(sorted(local.parent.glob(f".{local.name}.backup-*"))), None)


def merge_into(
    source: DataFrame,
    location: OutputLocation,
    name: str,
    *,
    key: str,
    update_columns: Sequence[str],
    insert_columns: Sequence[str],
    action: str,
    expected: Mapping[str, str],
) -> None:
    """One Delta ``MERGE`` of ``source`` into table ``name``: update rows that match on ``key``, insert the rest.

    ``source`` rows carry ``action``: an "update" row sets ``update_columns`` of the row with the same
    ``key``, but only while that row still holds what the source expects of it (``expected`` maps a
    target column to the source column with its expected value, compared null-safely); an "insert"
    row adds a row of ``insert_columns``. Anything else fails the whole statement with an error naming
    the key, and nothing is committed: an insert whose key some row already holds (another run issued
    it meanwhile), an update whose row changed since it was read, an update whose row is gone. Rows
    the statement does not touch stay as they are (byte-identical).
    """
    view = f"csid_merge_source_{uuid.uuid4().hex[:12]}"
    source.createOrReplaceTempView(view)

    def fail(what: str) -> str:
        return (f"cast(raise_error(concat('{key} ', cast(s.{_quote(key)} as string), ' {what} in {name}: the "
                "table changed during this run (another run?); nothing was committed, run again')) as string)")

    guard = " AND ".join(f"t.{_quote(t)} <=> s.{_quote(src)}" for t, src in expected.items()) or "true"
    sets = ", ".join(f"{_quote(c)} = s.{_quote(c)}" for c in update_columns)
    columns = ", ".join(_quote(c) for c in insert_columns)
    values = ", ".join(f"s.{_quote(c)}" for c in insert_columns)
    statement = (
        f"MERGE INTO {_table_reference(location, name)} AS t USING {view} AS s ON t.{_quote(key)} = s.{_quote(key)} "
        f"WHEN MATCHED AND s.{_quote(action)} = 'update' AND {guard} THEN UPDATE SET {sets} "
        f"WHEN MATCHED THEN UPDATE SET {_quote(key)} = {fail('was issued or changed by another run')} "
        f"WHEN NOT MATCHED AND s.{_quote(action)} = 'insert' THEN INSERT ({columns}) VALUES ({values}) "
        f"WHEN NOT MATCHED THEN INSERT ({_quote(key)}) VALUES ({fail('is no longer')})"
    )
    try:
        source.sparkSession.sql(statement).collect()
    finally:
        source.sparkSession.catalog.dropTempView(view)


def _table_reference(location: OutputLocation, name: str) -> str:
    """SQL name of an output table: the catalog name, or ``delta.`<path>``` (backticks doubled)."""
    if location.is_catalog:
        return location.of(name)
    return f"{location.fmt}.{_quote(location.of(name))}"


def _quote(identifier: str) -> str:
    return "`" + identifier.replace("`", "``") + "`"


def read_independently(location: OutputLocation, name: str, columns: Sequence[str], version: int | None = None) -> Any:
    """Table ``name``'s ``columns`` read without the engine (delta-rs for Delta, pyarrow for Parquet) at the
    local path the location states: a pyarrow Table, or None when it is not local (or is a catalog table).
    ``version``: that Delta version (default the current one).

    Raises:
        CatalogNotFoundError: there is no readable table at that path.
    """
    local = None if location.is_catalog else local_path(location.of(name))
    if local is None:
        return None
    try:
        if location.fmt == "delta":
            return _delta_table(local, version).to_pyarrow_table(columns=list(columns))
        return _parquet_dataset(local).to_table(columns=list(columns))
    except BaseException as e:  # noqa: BLE001 - delta-rs raises PanicException (a BaseException) on odd paths
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        raise CatalogNotFoundError(f"{location.shown_of(name)} cannot be read back at the stated place: "
                                   f"{first_line(e, 200)}") from e


def overwrite_independently(table: Any, location: OutputLocation, name: str) -> bool:
    """Overwrite the existing Delta table ``name`` with the pyarrow ``table`` from this process (delta-rs), where
    the location states a local path. False where it does not (a catalog table, a remote store, Parquet), where
    there is no such Delta table yet (the engine creates it, with the session's Delta defaults and its
    checkpoint interval), and where delta-rs cannot write that table (a table feature it does not know): the
    caller then writes it through the engine.

    The table is written as the engine writes it: every column nullable, nested fields too (Delta on Spark
    stores a frame's schema as nullable), the schema replaced with the rows. A write that fails leaves the
    table's last version as it was (the new version is one commit), at most with data files no version names;
    one that failed after its commit (in delta-rs's checkpoint or log clean-up) is written again by the engine:
    one version more, the same rows.
    """
    local = overwritable_independently(location, name)
    if local is None:
        return False
    from deltalake import write_deltalake

    try:
        write_deltalake(str(local), table.cast(_nullable_schema(table.schema)), mode="overwrite",
                        schema_mode="overwrite")
    except BaseException as e:  # noqa: BLE001 - as read_independently: delta-rs panics on odd tables
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        log.warning("%s was not written by delta-rs (%s); the engine writes it", location.shown_of(name), first_line(e))
        return False
    return True


def overwritable_independently(location: OutputLocation, name: str) -> Path | None:
    """The local path of Delta table ``name`` where :func:`overwrite_independently` may write it (the location
    states a local Delta path and the table is there); None otherwise. Asked before a frame is collected for it."""
    local = None if location.is_catalog or location.fmt != "delta" else local_path(location.of(name))
    return local if local is not None and delta_version(str(local)) is not None else None


def _nullable_schema(schema: Any) -> Any:
    import pyarrow as pa

    def field(f: Any) -> Any:
        return pa.field(f.name, kind(f.type), nullable=True, metadata=f.metadata)

    def kind(t: Any) -> Any:
        if pa.types.is_list(t) or pa.types.is_large_list(t):
            return (pa.large_list if pa.types.is_large_list(t) else pa.list_)(field(t.value_field))
        if pa.types.is_struct(t):
            return pa.struct([field(t.field(i)) for i in range(t.num_fields)])
        if pa.types.is_map(t):
            return pa.map_(t.key_type, field(t.item_field))
        return t

    return pa.schema([field(f) for f in schema], metadata=schema.metadata)


def rows_independently(location: OutputLocation, name: str, version: int | None = None) -> int | None:
    """How many rows table ``name`` holds (at Delta ``version``), from its metadata alone (the Delta log's file
    statistics, the Parquet footers), without the engine; None when it is not local or they do not say."""
    local = None if location.is_catalog else local_path(location.of(name))
    if local is None:
        return None
    try:
        if location.fmt == "delta":
            import pyarrow as pa
            import pyarrow.compute as pc

            records = pa.table(_delta_table(local, version).get_add_actions(flatten=True)).column("num_records")
            return None if records.null_count else int(pc.sum(records).as_py() or 0)
        return int(_parquet_dataset(local).count_rows())
    except BaseException as e:  # noqa: BLE001 - as read_independently: delta-rs panics on odd paths
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        return None


def _delta_table(local: Path, version: int | None) -> Any:
    from deltalake import DeltaTable

    return DeltaTable(str(local), version=version)


def _parquet_dataset(local: Path) -> Any:
    import pyarrow.dataset as ds

    return ds.dataset(str(local), format="parquet", ignore_prefixes=[".", "_"])


def delta_version(path: str) -> int | None:
    """Current version of the Delta table at ``path`` via ``deltalake``; None if not Delta/unreadable.

    Used for lineage (the input table version logged with a run) and to check that a failed write
    left a table's version unchanged.
    """
    try:
        from deltalake import DeltaTable
    except ImportError:  # pragma: no cover - deltalake is part of the [spark] extra
        return None
    local = local_path(path)
    try:
        return int(DeltaTable(str(local) if local is not None else path).version())
    except Exception:  # noqa: BLE001 - missing, not Delta, or a remote store without credentials
        return None


def write_table(
    df: DataFrame,
    location: OutputLocation,
    name: str,
    mode: str = "overwrite",
    partition_by: Sequence[str] | None = None,
    must_not_exist: bool = False,
    run_id: str | None = None,
) -> str:
    """Write ``df`` as table ``name`` under ``location``; overwrites are atomic (see module doc).

    Delta overwrites set ``overwriteSchema``: the table takes ``df``'s schema. (Without it, Sail
    silently drops columns the old table did not have, and classic Delta refuses the write.)

    Args:
        df: the rows to write, any schema.
        location: output directory or catalog schema, and the format.
        name: table name, e.g. ``SEMANTIC_IDS_TABLE``.
        mode: "overwrite" (default), "append", "error" or "ignore" (Spark save modes).
        partition_by: partition columns, if any.
        must_not_exist: write only if the table does not exist (a first write that must not replace a
            table another writer created meanwhile): Delta's save mode "error" (its first commit is
            atomic), or for a local Parquet overwrite a check just before the swap.

    Returns:
        The path or fully qualified table name written.

    Raises:
        DeltaNotAvailableError: Delta was asked for on a session without Delta support.
        FileExistsError: ``must_not_exist`` and a Parquet table appeared (Delta raises the engine's
            "already exists" error).

    ``run_id``: for a local Parquet overwrite, the run is written into the table's folder
    (:data:`RUN_FILE`, which Spark readers skip) and the previous copy is kept as
    ``.<name>.backup-<run_id>`` until :func:`drop_backups` (so a half-published set can be rolled back).
    """
    target = location.of(name)
    if must_not_exist and location.fmt == "delta":
        mode = "error"
    writer = df.write.format(location.fmt).mode(mode)
    if partition_by:
        writer = writer.partitionBy(*partition_by)
    if location.fmt == "delta" and mode == "overwrite":
        writer = writer.option("overwriteSchema", "true")
    try:
        _save(writer, location, target, mode, df, must_not_exist, run_id)
    except Exception as e:
        if location.fmt == "delta" and _is_missing_delta(e):
            raise DeltaNotAvailableError(
                f"cannot write Delta table {target!r}: this Spark session has no Delta Lake support. "
                "Fix: start Spark with delta-spark (--packages io.delta:delta-spark_2.13:<version>), run "
                "on Databricks, use the embedded engine, or write Parquet with --format parquet."
            ) from e
        raise
    return target


def _save(writer: DataFrameWriter, location: OutputLocation, target: str, mode: str, df: DataFrame,
          must_not_exist: bool = False, run_id: str | None = None) -> None:
    """saveAsTable for catalog tables, staging + swap for local Parquet overwrites, else save."""
    local = None if location.is_catalog else local_path(target)
    if location.is_catalog:
        writer.saveAsTable(target)
    elif location.fmt == "parquet" and mode == "overwrite" and local is not None:
        _save_and_swap(writer, local, df, must_not_exist, run_id)
    else:
        if location.fmt == "parquet" and mode == "overwrite":
            log.warning("Parquet overwrite of %s is not atomic; Delta output is", target)
        writer.save(target)


def _is_missing_delta(error: Exception) -> bool:
    text = str(error)
    return "DATA_SOURCE_NOT_FOUND" in text or "Failed to find the data source: delta" in text


def _save_and_swap(writer: DataFrameWriter, final: Path, df: DataFrame, must_not_exist: bool = False,
                   run_id: str | None = None) -> None:
    """Write to a hidden staging sibling of ``final``, then swap it in with two renames."""
    token = uuid.uuid4().hex[:12]
    # The pid lets a later run remove what a killed one left (remove_leftovers); the engine creates parents.
    staging = final.with_name(f".{final.name}.staging-{os.getpid()}-{token}")
    try:
        writer.save(str(staging))
        if not staging.is_dir() and df.limit(1).count() == 0:
            _write_empty_parquet(staging, df)  # Sail writes no folder at all for no rows
        if run_id is not None and staging.is_dir():
            (staging / RUN_FILE).write_text(run_id, encoding="utf-8")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if must_not_exist and final.exists():
        shutil.rmtree(staging, ignore_errors=True)
        raise FileExistsError(f"{final} was created by someone else while this run wrote it")
    if not staging.is_dir():
        raise RuntimeError(
            f"Spark did not write the staging copy to the local directory {staging}: the path seems to "
            "be on the cluster's default filesystem, where a local rename cannot swap it in. Use "
            "--format delta (atomic anywhere) or a fully qualified output URI. The staged copy may "
            f"remain at {staging} on that filesystem."
        )
    swap_directories(staging, final, keep_backup_as=None if run_id is None else backup_path(final, run_id))


def remove_leftovers(location: OutputLocation, names: Sequence[str]) -> list[str]:
    """Delete the staging copies that killed jobs left beside local Parquet tables (their process is gone)."""
    removed: list[str] = []
    for name in names:
        local = None if location.is_catalog else local_path(location.of(name))
        if local is None or not local.parent.is_dir():
            continue
        for staging in local.parent.glob(f".{local.name}.staging-*"):
            pid = staging.name.rsplit(".staging-", 1)[1].split("-")[0]
            if pid.isdigit() and not pid_alive(int(pid)):
                shutil.rmtree(staging, ignore_errors=True)
                removed.append(str(staging))
    return removed


RUN_FILE = "_csid_run"  # a local Parquet table's writer run (Spark readers skip names starting with "_")


def backup_path(final: Path, run_id: str) -> Path:
    """Where the copy that run ``run_id`` replaced is kept until the run is published."""
    return final.with_name(f".{final.name}.backup-{run_id}")


def parquet_run(location: OutputLocation, name: str) -> str | None:
    """The run that wrote local Parquet table ``name`` (its :data:`RUN_FILE`), or None."""
    local = None if location.is_catalog else local_path(location.of(name))
    try:
        return (local / RUN_FILE).read_text(encoding="utf-8").strip() if local is not None else None
    except OSError:
        return None


def drop_backups(location: OutputLocation, names: Sequence[str], run_id: str) -> None:
    """Delete the previous copies kept by run ``run_id``'s Parquet overwrites (once the run is published)."""
    for name in names:
        local = None if location.is_catalog else local_path(location.of(name))
        if local is not None:
            shutil.rmtree(backup_path(local, run_id), ignore_errors=True)


def restore_backup(location: OutputLocation, name: str, run_id: str) -> bool:
    """Put back the copy of Parquet table ``name`` that run ``run_id`` replaced; False when none was kept."""
    local = None if location.is_catalog else local_path(location.of(name))
    if local is None or not backup_path(local, run_id).is_dir():
        return False
    swap_directories(backup_path(local, run_id), local)
    return True


def _write_empty_parquet(folder: Path, df: DataFrame) -> None:
    """A folder with one Parquet file of ``df``'s schema and no rows: an empty table readers can open."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from pyspark.sql.pandas.types import to_arrow_schema

    folder.mkdir(parents=True)
    schema = to_arrow_schema(df.schema, timezone="UTC")  # Spark timestamps are UTC instants
    pq.write_table(pa.Table.from_batches([], schema=schema), folder / "part-00000-empty.parquet")


def swap_directories(new: Path, final: Path, keep_backup_as: Path | None = None) -> None:
    """Replace directory ``final`` by ``new``: final -> backup, new -> final, delete backup (or keep it
    as ``keep_backup_as``).

    If the second rename fails the backup is renamed back, so ``final`` keeps the old data.
    """
    if keep_backup_as is not None:
        shutil.rmtree(keep_backup_as, ignore_errors=True)
    backup = keep_backup_as or final.with_name(f".{final.name}.backup-{uuid.uuid4().hex[:12]}")
    had_old = final.exists()
    if had_old:
        os.rename(final, backup)
    try:
        os.rename(new, final)
    except BaseException:
        if had_old:
            os.rename(backup, final)
        raise
    if had_old and keep_backup_as is None:
        shutil.rmtree(backup, ignore_errors=True)

