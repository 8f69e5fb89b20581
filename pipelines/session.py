"""Session factory: the one place that builds Spark sessions.

Three engines, one DataFrame API (DESIGN.md "Engines"):

* ``local``  (default): an in-process Sail Spark Connect server (PyPI ``pysail``) and a pyspark
  Connect client. Native Delta, no JVM.
* ``spark``: the active classic session (spark-submit, Databricks, EMR...), or a new local one.
* ``remote``: a Spark Connect server at ``sc://host:port`` (Spark 4 connect server, Databricks
  Connect).
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pyspark.sql import Column, DataFrame, SparkSession

log = logging.getLogger(__name__)

ENGINES = ("local", "spark", "remote")
DELTA_EXTENSION = "io.delta.sql.DeltaSparkSessionExtension"


class DeltaNotAvailableError(RuntimeError):
    """Delta output was asked for on a session that cannot write Delta."""


@dataclass
class EngineSession:
    """A Spark session plus what is needed to shut its engine down.

    Attributes:
        spark: the session stages run on.
        engine: "local", "spark" or "remote".
        supports_delta: whether Delta reads/writes are known to work on this session.
        memory_limit: the embedded engine's memory pool in bytes (``start_session``'s
            ``engine_memory``), or None: no limit set here.
    """

    spark: SparkSession
    engine: str
    supports_delta: bool
    memory_limit: int | None = None
    _server: Any = field(default=None, repr=False)
    _owns_session: bool = field(default=True, repr=False)
    _scratch: str | None = field(default=None, repr=False)

    def stop(self) -> None:
        """Stop the session if this object created it, and the embedded server if any."""
        if self._owns_session:
            self.spark.stop()
        if self._server is not None:
            self._server.stop()
            self._server = None
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)
            self._scratch = None

    def materialize(self, df: DataFrame) -> DataFrame | None:
        """Compute ``df`` once and keep its rows, so that later actions read them instead of recomputing.

        Meant for small frames that are expensive to compute (the encode stage's codes, not the
        embeddings). The embedded engine writes them as Parquet to a scratch directory of this session
        (under ``TMPDIR``; removed by :meth:`stop`): Sail's own ``localCheckpoint`` needs a server-wide
        checkpoint path and, in pysail 0.7.2, works only for the first server started in a process.
        Classic and remote sessions use ``localCheckpoint`` (eager).

        Returns:
            The materialised frame, or None when the engine cannot checkpoint; the caller then falls
            back to a plan that needs no materialisation.
        """
        if self._scratch is not None:
            path = self._write_scratch(df)
            # With the schema: an empty result leaves no Parquet file, and a schema-less read of it
            # would come back without columns.
            return self.spark.read.schema(df.schema).parquet(path)
        try:
            return df.localCheckpoint(eager=True)
        except Exception as e:  # noqa: BLE001 - pyspark raises engine-specific classes
            if not _is_unsupported(e):
                raise  # a failure of the computation itself: rerunning it another way would not help
            log.warning("this %s session cannot materialise intermediate results (%s); falling back to an extra "
                        "pass over the input", self.engine, first_line(e, 200))
            return None

    def materialize_split(self, df: DataFrame, part: Column, parts: int) -> list[DataFrame] | None:
        """``df`` computed once and split by ``part`` (an integer expression, 0..parts-1): one frame per part.

        The embedded engine writes the rows partitioned by part to its scratch directory, so each part's
        frame reads only its own files; a list of ``df.where(part == p)`` over one materialised frame
        would read all of them for every part. None on classic and remote sessions (their storage is
        not a folder of this process), and below :data:`SPLIT_FROM_PARTS` parts (two filtered reads cost about
        what the split's write and reads do: an incremental run of 5M x 256 + 1%, encode stage 7.6-7.7 s
        filtered against 8.3-9.0 s split): the caller filters ``df`` once per part instead.
        """
        if self._scratch is None or parts < SPLIT_FROM_PARTS:
            return None
        path = self._write_scratch(df.withColumn(_PART_COLUMN, part.cast("int")), partition_by=_PART_COLUMN)
        return [self.spark.read.schema(df.schema).parquet(folder) if os.path.isdir(folder)
                else self.spark.createDataFrame([], df.schema)
                for folder in (os.path.join(path, f"{_PART_COLUMN}={p}") for p in range(parts))]

    def _write_scratch(self, df: DataFrame, partition_by: str | None = None) -> str:
        """Write ``df`` as Parquet to a new ``materialized-*`` folder of this session's scratch directory
        (row groups of ``MATERIALIZED_ROW_GROUP_ROWS``; folders by ``partition_by``); returns its path."""
        assert self._scratch is not None
        path = os.path.join(self._scratch, f"materialized-{uuid.uuid4().hex}")
        writer = df.write.option("max_row_group_size", MATERIALIZED_ROW_GROUP_ROWS)
        (writer.partitionBy(partition_by) if partition_by else writer).parquet(path)
        return path

    def frame_of_arrow(self, table: Any, schema: Any) -> DataFrame:
        """A frame of a pyarrow table computed in the driver (``spark.createDataFrame(table, schema)``).

        On classic Spark, a table of more than :data:`ARROW_ROWS_IN_TASKS` rows goes to the engine as
        ``parallelism()`` Arrow batches that the tasks decode (pyspark's RDD path), not as a local relation
        that the driver's JVM converts row by row and ships inside the tasks: 1M prefix-statistics rows were
        made and written to Delta in 1.9-2.5 s instead of 4.3-5.6 s (bench/RESULTS.md). pyspark takes that path
        above ``spark.sql.execution.arrow.localRelationThreshold`` bytes, in batches of
        ``spark.sql.execution.arrow.maxRecordsPerBatch`` rows: both are set for the call and put back after
        it (the job runs no query meanwhile). The other engines receive the table as it is.
        """
        if self.engine != "spark" or table.num_rows <= ARROW_ROWS_IN_TASKS:
            return self.spark.createDataFrame(table, schema=schema)
        conf = self.spark.conf
        kept = {key: conf.get(key, None) for key in _ARROW_IN_TASKS}
        conf.set(_ARROW_IN_TASKS[0], "0")
        conf.set(_ARROW_IN_TASKS[1], str(-(-table.num_rows // self.parallelism())))
        try:  # one chunk, so that the batches are even (a table of several chunks is cut at their ends too)
            return self.spark.createDataFrame(table.combine_chunks(), schema=schema)
        finally:
            for key, value in kept.items():
                conf.unset(key) if value is None else conf.set(key, value)

    def on_this_machine(self) -> bool:
        """Whether the engine's tasks run on this machine, and so see its files: the embedded engine, or
        classic Spark on a ``local[...]`` master outside Databricks."""
        if self.engine == "local":
            return not os.environ.get("DATABRICKS_RUNTIME_VERSION")
        return self.engine == "spark" and local_classic_context(self.spark) is not None

    def parallelism(self) -> int:
        """How many tasks the engine runs at once: classic Spark's default parallelism; the driver's cores
        for the embedded engine (one task per core) and for sessions without a readable SparkContext."""
        if self.engine == "spark":
            try:
                return max(1, int(self.spark.sparkContext.defaultParallelism))
            except Exception:  # noqa: BLE001 - a session without a SparkContext (shared clusters)
                pass
        return os.cpu_count() or 1

    @contextmanager
    def kept_alive(self, every_s: float | None = None) -> Iterator[None]:
        """Keep the session from timing out while the driver works without it (training).

        Spark Connect servers drop a session idle for a while (Sail: 900 s by default,
        ``SAIL_SPARK__SESSION_TIMEOUT_SECS``; Apache Spark: an hour), so a long training would leave the
        job with a dead session. A daemon thread runs a trivial query every ``every_s`` seconds (default:
        a quarter of Sail's timeout, at most 60 s). Classic sessions do not time out: nothing is started.
        """
        if self.engine == "spark":
            yield
            return
        if every_s is None:
            timeout = _float_env("SAIL_SPARK__SESSION_TIMEOUT_SECS", 900.0)
            every_s = max(0.5, min(60.0, timeout / 4))
        stop = threading.Event()

        def ping() -> None:
            while not stop.wait(every_s):
                try:
                    self.spark.sql("SELECT 1").collect()
                except Exception as e:  # noqa: BLE001 - the job's next real call reports a dead session
                    log.warning("keep-alive query failed: %s", first_line(e, 200))

        thread = threading.Thread(target=ping, name="csid-session-keepalive", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(timeout=30)

    @contextmanager
    def activated(self) -> Iterator[None]:
        """Make this the thread's active Spark Connect session for the block, then restore the one before.

        Libraries that look the session up find this one: MLflow asks ``SparkSession.getActiveSession()``
        for Databricks settings when a run starts, and another Connect session of the process (a
        notebook's, which may have timed out) would fail the job there. pyspark's Connect client only
        makes a new session active when none is (``create()``), so its thread-local is set here. Classic
        sessions are the process's active session already.
        """
        if self.engine == "spark":
            yield
            return
        from pyspark.sql.connect.session import SparkSession as ConnectSession

        holder = ConnectSession._active_session
        before = getattr(holder, "session", None)
        holder.session = self.spark
        try:
            yield
        finally:
            holder.session = before

    def __enter__(self) -> EngineSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_session(
    engine: str = "local",
    remote: str | None = None,
    *,
    want_delta: bool = True,
    app_name: str = "catalog-semantic-ids",
    shuffle_partitions: int | None = None,
    engine_memory: int | None = None,
) -> EngineSession:
    """Start (or attach to) a session for ``engine``.

    Args:
        engine: "local" (embedded Sail), "spark" (classic) or "remote" (needs ``remote``).
        remote: Spark Connect URL such as ``sc://host:15002``; implies ``engine="remote"``.
        want_delta: Delta output will be written; a session without Delta support fails here,
            at start, with a message naming the fix.
        app_name: application name for classic sessions.
        shuffle_partitions: ``spark.sql.shuffle.partitions``; ``None`` keeps the engine default.
        engine_memory: the embedded engine's memory pool in bytes (Sail's ``fair`` pool): sorts,
            aggregates and joins of two large inputs (sort-merge joins under a pool) spill to
            ``TMPDIR`` beyond it, so their memory does not grow with the catalog;
            an operator that cannot spill and needs more fails with an error that
            :func:`is_out_of_engine_memory` recognises. None or 0: no limit. Ignored by the other
            engines (their executors' memory is set where they are started), and by this one when
            ``SAIL_RUNTIME__MEMORY_POOL__TYPE`` is set in the environment (the user's setting wins).
    """
    if remote:
        engine = "remote"
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    if engine == "local":
        es = _start_sail(engine_memory or None)
    elif engine == "remote":
        if not remote:
            raise ValueError("engine 'remote' needs a Spark Connect URL: --remote sc://host:15002")
        _check_reachable(remote)
        spark = SparkSession.builder.remote(remote).create()
        write_portable_timestamps(spark, remote=True)
        es = EngineSession(spark, "remote", remote_has_delta(spark) if want_delta else True)
    else:
        es = _start_classic(app_name, want_delta)
    if shuffle_partitions is not None:
        es.spark.conf.set("spark.sql.shuffle.partitions", str(shuffle_partitions))
    if want_delta and not es.supports_delta:
        es.stop()
        raise DeltaNotAvailableError(
            f"this {engine!r} Spark session has no Delta Lake support, so Delta output cannot be "
            f"written. Fix: start Spark with Delta (--packages {delta_maven_coordinate()} plus "
            f"--conf spark.sql.extensions={DELTA_EXTENSION} --conf spark.sql.catalog.spark_catalog="
            "org.apache.spark.sql.delta.catalog.DeltaCatalog), run on Databricks, "
            "or write Parquet with --format parquet."
        )
    return es


CONNECT_PROBE_SECONDS = 10.0
_PROXIES = ("grpc_proxy", "https_proxy", "http_proxy", "GRPC_PROXY", "HTTPS_PROXY", "HTTP_PROXY")


def _check_reachable(remote: str) -> None:
    """A TCP connection to the Spark Connect URL's host and port, or ValueError naming them: the client itself
    retries an unreachable server for minutes without a word. Skipped behind a proxy (the client goes through
    it; a direct connection may not)."""
    import socket
    from urllib.parse import urlparse

    if any(os.environ.get(name) for name in _PROXIES):
        return
    try:
        url = urlparse(remote.split(";", 1)[0].rstrip("/"))
        host, port = url.hostname, url.port or 15002
    except ValueError as e:
        raise ValueError(f"--remote {remote!r} is not a Spark Connect URL (sc://host:15002): {e}") from e
    if url.scheme != "sc" or not host:
        raise ValueError(f"--remote {remote!r} is not a Spark Connect URL: expected sc://host:15002")
    try:
        socket.create_connection((host, port), timeout=CONNECT_PROBE_SECONDS).close()
    except OSError as e:
        raise ValueError(f"cannot reach the Spark Connect server at {host}:{port} ({e.strerror or e}). Check --remote, "
                         "and that the server is running and its port open to this machine") from e


def first_line(e: BaseException, limit: int = 120) -> str:
    """An error's first line (at most ``limit`` characters), or its type's name when it has no message."""
    return str(e).strip().splitlines()[0][:limit] if str(e).strip() else type(e).__name__


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def remove_abandoned_scratch() -> list[str]:
    """Delete the embedded engine's scratch folders whose process is gone (a killed job's); returns them."""
    removed = []
    for folder in Path(tempfile.gettempdir()).glob(f"{_SCRATCH_PREFIX}*"):
        pid = folder.name[len(_SCRATCH_PREFIX):].split("-")[0]
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(str(folder))
    return removed


_SCRATCH_PREFIX = "csid-engine-"
# Rows per row group of the embedded engine's scratch Parquet: each open file buffers one row group in
# memory, by default about 1M rows (150 MB of encoded rows with alternatives); a split writes 2 x parts files
# at once. At 50M x 256 the split of the rows to issue into 10 parts peaked 0.7 GB above every other phase.
MATERIALIZED_ROW_GROUP_ROWS = 131_072
ARROW_ROWS_IN_TASKS = 100_000  # EngineSession.frame_of_arrow: a larger table is decoded by classic Spark's tasks
_ARROW_IN_TASKS = ("spark.sql.execution.arrow.localRelationThreshold", "spark.sql.execution.arrow.maxRecordsPerBatch")
SPLIT_FROM_PARTS = 3  # materialize_split splits a frame into at least this many parts (fewer: the caller filters)
_PART_COLUMN = "csid_part"  # the folder name of a part of a split frame (materialize_split)


def _float_env(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        return default


POOL_ENV = "SAIL_RUNTIME__MEMORY_POOL__TYPE"  # set by the user: their pool, not --engine-memory
_LOG_ENV = "RUST_LOG"  # set by the user: their filter, not _SAIL_LOG
# The embedded engine's log filter: its warnings, without the two it gives on every run of the job (a
# broadcast hint, which Sail plans without, "is not yet supported and is a no-op"; the server's own tasks
# "aborting" when it stops) and without its INFO lines on the server's start and stop.
_SAIL_LOG = "warn,sail_plan::resolver::query::misc=error,sail_common::actor=error"


def is_out_of_engine_memory(error: BaseException) -> bool:
    """Whether ``error`` is the embedded engine refusing memory beyond its pool (``engine_memory``)."""
    text = str(error)
    return ("Failed to allocate additional" in text and "memory pool" in text) or "ResourcesExhausted" in text


def _is_unsupported(error: Exception) -> bool:
    text = str(error).lower()
    return any(word in text for word in ("checkpoint", "not supported", "unsupported", "not implemented"))


def delta_maven_coordinate() -> str:
    """Maven coordinate of the Delta jars for the installed pyspark and delta-spark packages.

    delta-spark 4.x names the artifact after the Spark version (delta-spark_<major.minor>_2.13),
    as its own ``configure_spark_with_delta_pip`` does.
    """
    try:
        from importlib.metadata import version

        import pyspark

        spark_minor = ".".join(pyspark.__version__.split(".")[:2])
        return f"io.delta:delta-spark_{spark_minor}_2.13:{version('delta-spark')}"
    except Exception:  # noqa: BLE001 - delta-spark not installed: name the family
        return "io.delta:delta-spark_2.13:<version>"


def _start_sail(engine_memory: int | None = None) -> EngineSession:
    """Start an in-process Sail Spark Connect server on a free loopback port and connect to it.

    ``engine_memory`` (bytes) becomes the server's memory pool: Sail reads its configuration from the
    environment when a server starts, so the variables are set for that moment only and later servers
    of this process (a notebook's, the tests') keep their own."""
    try:
        from pysail.spark import SparkConnectServer
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise RuntimeError(
            "the embedded engine needs pysail: pip install 'catalog-semantic-ids[spark]' "
            "(or use --engine spark / --remote sc://...)"
        ) from e
    # Under a pool, joins of two large inputs sort and merge (which spills) instead of building a hash
    # table of one side (which cannot spill, and grows with the catalog).
    pool = {} if engine_memory is None or POOL_ENV in os.environ else {
        POOL_ENV: "fair", "SAIL_RUNTIME__MEMORY_POOL__FAIR__MAX_SIZE": str(int(engine_memory)),
        "SAIL_OPTIMIZER__PREFER_HASH_JOIN": os.environ.get("SAIL_OPTIMIZER__PREFER_HASH_JOIN", "false")}
    quiet = {} if _LOG_ENV in os.environ else {_LOG_ENV: _SAIL_LOG}
    saved = {name: os.environ.get(name) for name in {**pool, **quiet}}
    os.environ.update({**pool, **quiet})
    try:
        server = SparkConnectServer(ip="127.0.0.1", port=0)
        server.start(background=True)
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    host, port = server.listening_address
    # create(), not getOrCreate(): another Connect session in this process must not be taken over.
    spark = SparkSession.builder.remote(f"sc://{host}:{port}").create()
    remove_abandoned_scratch()  # what killed jobs left
    scratch = tempfile.mkdtemp(prefix=f"{_SCRATCH_PREFIX}{os.getpid()}-")  # the pid: see remove_abandoned_scratch
    return EngineSession(spark, "local", True, _server=server, _scratch=scratch,
                         memory_limit=int(engine_memory) if pool else None)


def _start_classic(app_name: str, want_delta: bool) -> EngineSession:
    """Attach to the active classic session, or build a local one.

    Under spark-submit (``PYSPARK_GATEWAY_PORT`` set) or on Databricks the session's jars are
    already decided, so the session is taken as it is. A session built here from plain ``python``
    gets delta-spark's ``configure_spark_with_delta_pip`` when Delta is wanted (needs Maven).
    """
    active = SparkSession.getActiveSession()
    if active is not None:  # a notebook's or a platform's session: used as it is, never re-configured
        return EngineSession(active, "spark", classic_has_delta(active), _owns_session=False)
    builder = SparkSession.builder.appName(app_name)
    if "PYSPARK_GATEWAY_PORT" not in os.environ:
        builder = builder.master(os.environ.get("SPARK_MASTER", "local[*]")).config(
            "spark.driver.memory", os.environ.get("SPARK_DRIVER_MEMORY", "4g"))  # 1g default is too small
        if want_delta:
            from delta import configure_spark_with_delta_pip

            builder = configure_spark_with_delta_pip(
                builder.config("spark.sql.extensions", DELTA_EXTENSION).config(
                    "spark.sql.catalog.spark_catalog", "org.apache.spark.sql.delta.catalog.DeltaCatalog"
                )
            )
    try:
        spark = builder.getOrCreate()
    except Exception as e:  # noqa: BLE001 - the JVM cannot start with Delta jars it could not fetch
        if not want_delta:
            raise
        raise DeltaNotAvailableError(
            f"could not start a local Spark session with Delta ({type(e).__name__}): its jars come from "
            f"Maven. Fix: run with --packages {delta_maven_coordinate()} where Maven is reachable "
            "(spark-submit, or a cluster with Delta), or write Parquet with --format parquet."
        ) from e
    spark.sparkContext.setLogLevel(os.environ.get("CSID_SPARK_LOG_LEVEL", "WARN"))  # ours: quiet INFO logs
    tune_local_delta(spark)
    write_portable_timestamps(spark)
    return EngineSession(spark, "spark", classic_has_delta(spark))


PARQUET_TIMESTAMP_TYPE = "spark.sql.parquet.outputTimestampType"


def write_portable_timestamps(spark: SparkSession, remote: bool = False) -> None:
    """Write Parquet timestamps (``tokenized_at``, ``retired_at``, the ``runs`` table's ``recorded_at``) as
    TIMESTAMP_MICROS, as the embedded engine and delta-rs do, not classic Spark's default INT96.

    A table written by both engines over time (a first run on the embedded engine, daily runs on a cluster)
    otherwise holds files whose timestamps differ in physical type: the embedded engine then cannot read them
    back (a Delta table it created: "Cannot cast column 'tokenized_at' from Timestamp(us) (physical)"; a Parquet
    ``runs`` folder: "Fail to merge schema field 'recorded_at'") and every later run on it fails. Called for a
    session the job starts itself: a classic one keeps a value given with ``--conf``; a Spark Connect session
    (``remote``, this client's own session on the server) is set only where it holds Spark's default, INT96."""
    try:
        if remote:
            if (spark.conf.get(PARQUET_TIMESTAMP_TYPE, None) or "INT96").upper() == "INT96":
                spark.conf.set(PARQUET_TIMESTAMP_TYPE, "TIMESTAMP_MICROS")
        elif not spark.sparkContext.getConf().contains(PARQUET_TIMESTAMP_TYPE):
            spark.conf.set(PARQUET_TIMESTAMP_TYPE, "TIMESTAMP_MICROS")
    except Exception:  # noqa: BLE001 - a session that cannot say or cannot set it keeps its setting
        pass


DELTA_SNAPSHOT_PARTITIONS = "spark.databricks.delta.snapshotPartitions"


def tune_local_delta(spark: SparkSession) -> None:
    """On a ``local[...]`` master, replay Delta logs in as many partitions as there are cores, not Delta's 50.

    Every read of a Delta version and every commit replays the table's log in
    ``spark.databricks.delta.snapshotPartitions`` tasks (default 50, sized for clusters); on a 2-core local
    JVM those 50 small tasks cost about a second per snapshot, and the job takes a dozen snapshots (the
    catalog, the output before and after the commit, each table of the published set). 1M x 768 job on
    2 cores: validate 14.5 -> 9.9 s, the committed table's check 8.0 -> 4.2 s (bench/RESULTS.md). Called
    only for a session the job starts (and stops) itself; a value given with ``--conf`` is kept, cluster
    masters and Databricks keep Delta's default, and a session that cannot say is left as it is.
    """
    sc = local_classic_context(spark)
    if sc is not None and not sc.getConf().contains(DELTA_SNAPSHOT_PARTITIONS):
        spark.conf.set(DELTA_SNAPSHOT_PARTITIONS, str(max(1, sc.defaultParallelism)))


def local_classic_context(spark: SparkSession) -> Any:
    """The SparkContext of a classic session whose master is ``local[...]``, outside Databricks (whose
    single-node clusters run ``local[*, 4]`` under their own rules); None for a cluster master, Databricks,
    or a session without a readable SparkContext (Spark Connect, shared clusters)."""
    if os.environ.get("DATABRICKS_RUNTIME_VERSION"):
        return None
    try:
        sc = spark.sparkContext
        return sc if sc.master.startswith("local") else None
    except Exception:  # noqa: BLE001 - no SparkContext here
        return None


def remote_has_delta(spark: SparkSession) -> bool:
    """Whether a Spark Connect server knows the Delta data source.

    The server is asked to resolve a Delta table at a path that does not exist: one without Delta answers
    ``DATA_SOURCE_NOT_FOUND``. Any other answer (no such table, no access to that path) counts as Delta
    support, so a server that words its errors otherwise (Databricks, Sail) is never refused by this probe.
    """
    try:
        spark.read.format("delta").load(f"/csid-delta-probe-{uuid.uuid4().hex}").schema  # noqa: B018 - analysis
    except Exception as e:  # noqa: BLE001 - pyspark raises engine-specific classes
        text = str(e)
        return "DATA_SOURCE_NOT_FOUND" not in text and "Failed to find the data source: delta" not in text
    return True


def classic_has_delta(spark: SparkSession) -> bool:
    """Whether a classic session can read/write Delta (Databricks, or the Delta extension loaded)."""
    if os.environ.get("DATABRICKS_RUNTIME_VERSION"):
        return True
    extensions = spark.conf.get("spark.sql.extensions", "") or ""
    if DELTA_EXTENSION not in extensions:
        return False
    try:  # the extension is configured; are its classes on the driver's classpath too?
        jvm = spark.sparkContext._jvm  # classic only; never reached on Spark Connect
        assert jvm is not None
        return bool(jvm.org.apache.spark.util.Utils.classIsLoadable("io.delta.tables.DeltaTable"))
    except Exception:  # noqa: BLE001 - any failure means "no usable Delta"
        return False
