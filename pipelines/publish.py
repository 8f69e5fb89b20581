"""Publish a run's tables as one set, and put back a consistent set after a run that was killed mid-way.

The set: ``semantic_ids`` and the tables that describe it (``rejects``, ``id_changes``, ``drift``,
``prefix_stats``, ``level_stats``). A run computes all of them before it writes any, then:

1. writes the describing tables (each one atomic overwrite);
2. appends a ``pending`` entry to the ``runs`` table: the run, its model, each table's token (Delta
   version, or for local Parquet the run written into the folder) and the ``semantic_ids`` token it
   expects to replace;
3. commits ``semantic_ids`` (one Delta commit or MERGE, or one folder swap): the only step that
   issues IDs;
4. checks the committed table; a training run moves ``@champion`` to its model now (the runner);
5. appends a ``published`` entry with every token.

The last ``published`` entry of ``runs`` names the published set. A reader who must never see a
half-written set reads the tables at the versions it names (``versionAsOf``); every table's latest
version is that set again once the next run has started, because a run's first step is
:func:`recover`:

* the last entry is ``pending`` and ``semantic_ids`` moved past the token it expected: the run
  committed its IDs and died before saying so. IDs, once committed, are never taken back, so the set
  is completed instead (rolled forward): a ``published`` entry is appended, and the runner moves
  ``@champion`` if the run would have (again, if it had);
* otherwise every describing table whose token is not the last published one is rolled back to it
  (Delta: its rows at that version written as a new version; Parquet: the copy the run kept aside).

Runs that write a local output hold an exclusive lock on it for their whole length (:func:`writer_lock`):
a second run on the same output fails at once (exit 4), so recovery never meets a run in progress.
"""
from __future__ import annotations

import datetime as dt
import fcntl
import json
import os
import socket
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from pyspark.sql import SparkSession

from pipelines import io
from pipelines.schema import (
    DRIFT_TABLE,
    ID_CHANGES_TABLE,
    LEVEL_STATS_TABLE,
    PREFIX_STATS_TABLE,
    REJECTS_TABLE,
    RUNS_TABLE,
    SEMANTIC_IDS_TABLE,
)

DESCRIBING = (REJECTS_TABLE, ID_CHANGES_TABLE, DRIFT_TABLE, PREFIX_STATS_TABLE, LEVEL_STATS_TABLE)
SET_TABLES = (SEMANTIC_IDS_TABLE, *DESCRIBING)
PENDING, PUBLISHED, ROLLED_BACK = "pending", "published", "rolled_back"
RUNS_SCHEMA = ("entry BIGINT, mlflow_run_id STRING, status STRING, recorded_at TIMESTAMP, model_name STRING, "
               "model_version STRING, moves_champion BOOLEAN, semantic_ids_before STRING, tokens STRING, "
               "model_sha256 STRING")
# A runs table written before the model's digest was recorded lacks the last column; its entries are appended
# without it (they read as None), so such a table keeps one schema.
_LEGACY_RUNS_SCHEMA = RUNS_SCHEMA.rsplit(", model_sha256", 1)[0]


class OutputBusyError(RuntimeError):
    """Another run holds the output's writer lock."""


@dataclass(frozen=True)
class Entry:
    """One row of the ``runs`` table."""

    entry: int
    run_id: str
    status: str
    model_name: str | None
    model_version: str | None
    moves_champion: bool
    semantic_ids_before: str | None
    tokens: dict[str, str | None]
    model_sha256: str | None = None  # SHA-256 of the model's checkpoint (None: not recorded, or no model)


@dataclass(frozen=True)
class Recovery:
    """What :func:`recover` did: a sentence for the log, and the model whose ``@champion`` move the
    killed run did not get to make (rolled forward runs only)."""

    action: str
    champion: tuple[str, str] | None = None
    published_run: str | None = None  # rolled forward: the MLflow run whose set this completed


def token(spark: SparkSession, location: io.OutputLocation, name: str) -> str | None:
    """What identifies table ``name``'s current content: its Delta version, or the run written into a
    local Parquet table's folder; None when it does not exist (or, for Parquet elsewhere, cannot tell)."""
    if location.fmt == "delta":
        version = io.table_version(location, name, spark)
        return None if version is None else str(version)
    return io.parquet_run(location, name)


def tokens(spark: SparkSession, location: io.OutputLocation, names: tuple[str, ...] = SET_TABLES
           ) -> dict[str, str | None]:
    return {name: token(spark, location, name) for name in names}


def entries(spark: SparkSession, location: io.OutputLocation) -> list[Entry]:
    """Every entry of the ``runs`` table, oldest first (none when there is no such table)."""
    if not io.table_exists(spark, location, RUNS_TABLE):
        return []
    rows = _runs_rows_directly(location)
    if rows is None:
        rows = [r.asDict() for r in io.read_table(spark, location, RUNS_TABLE).collect()]
    return sorted((Entry(int(r["entry"]), r["mlflow_run_id"], r["status"], r["model_name"], r["model_version"],
                         bool(r["moves_champion"]), r["semantic_ids_before"], json.loads(r["tokens"] or "{}"),
                         r.get("model_sha256"))
                   for r in rows), key=lambda e: e.entry)


def _runs_rows_directly(location: io.OutputLocation) -> list[dict[str, Any]] | None:
    """The runs table's rows read without the engine where it is local (delta-rs for Delta, pyarrow for Parquet), else
    None (the engine reads it). A few rows: no engine query, which on classic Spark is the session's first and costs
    its warm-up. For a Parquet ``runs`` folder, which every run appends to, it is also what reads files that two
    engines wrote: their timestamps' time zones are spelled differently ("UTC", "Etc/UTC"), which the embedded
    engine refuses to merge, and the columns read here leave ``recorded_at`` out."""
    for columns in (_RUNS_COLUMNS, _RUNS_COLUMNS[:-1]):  # a table written before the digest was recorded: without
        try:
            table = io.read_independently(location, RUNS_TABLE, columns)
        except Exception:  # noqa: BLE001 - unreadable here: the engine reads it, and says why if it cannot either
            continue
        return None if table is None else table.to_pylist()
    return None


_RUNS_COLUMNS = ("entry", "mlflow_run_id", "status", "model_name", "model_version", "moves_champion",
                 "semantic_ids_before", "tokens", "model_sha256")


def model_digest(history: list[Entry], model: tuple[str, str]) -> str | None:
    """The checkpoint digest the last published entry of ``model`` (name, version) recorded: what that name and
    version meant when it issued IDs here. None when no entry of it recorded one (a table written before the
    digest was recorded)."""
    return next((e.model_sha256 for e in reversed(history)
                 if e.status == PUBLISHED and (e.model_name, e.model_version) == model and e.model_sha256), None)


def last_published(history: list[Entry]) -> Entry | None:
    """The entry of the run whose set is published now."""
    return next((e for e in reversed(history) if e.status == PUBLISHED), None)


def reference(history: list[Entry]) -> Entry | None:
    """The entry whose tokens the tables must show now: the last published one, or the roll-back after it
    (a Delta roll-back writes the published rows again, as new versions)."""
    return next((e for e in reversed(history) if e.status in (PUBLISHED, ROLLED_BACK)), None)


def record(spark: SparkSession, location: io.OutputLocation, history: list[Entry], run_id: str, status: str,
           table_tokens: Mapping[str, str | None], *, model: tuple[str, str] | None = None,
           moves_champion: bool = False, semantic_ids_before: str | None = None,
           model_sha256: str | None = None) -> Entry:
    """Append one entry to the ``runs`` table (and to ``history``). ``model_sha256``: the digest of the model's
    checkpoint (not written to a runs table made before the digest was recorded)."""
    entry = Entry((history[-1].entry + 1) if history else 1, run_id, status, model[0] if model else None,
                  model[1] if model else None, moves_champion, semantic_ids_before, dict(table_tokens), model_sha256)
    row = (entry.entry, run_id, status, dt.datetime.now(dt.timezone.utc), entry.model_name, entry.model_version,
           moves_champion, semantic_ids_before, json.dumps(entry.tokens, sort_keys=True))
    legacy = bool(history) and "model_sha256" not in _runs_columns(spark, location)
    df = spark.createDataFrame([row if legacy else (*row, model_sha256)],
                               _LEGACY_RUNS_SCHEMA if legacy else RUNS_SCHEMA)
    io.write_table(df, location, RUNS_TABLE, mode="append")
    history.append(entry)
    return entry


def _runs_columns(spark: SparkSession, location: io.OutputLocation) -> list[str]:
    """The columns of the existing ``runs`` table: from its files' schema where it is local (no engine query),
    else from the engine."""
    local = None if location.is_catalog else io.local_path(location.of(RUNS_TABLE))
    if local is not None:
        try:
            if location.fmt == "delta":
                from deltalake import DeltaTable

                return [f.name for f in DeltaTable(str(local)).schema().fields]
            import pyarrow.dataset as ds

            return list(ds.dataset(str(local), format="parquet", ignore_prefixes=[".", "_"]).schema.names)
        except Exception:  # noqa: BLE001 - unreadable here: the engine says
            pass
    return io.read_table(spark, location, RUNS_TABLE).columns


def recover(spark: SparkSession, location: io.OutputLocation, run_id: str) -> Recovery | None:
    """Make the latest version of every table of the set the last published run's again (see the module
    doc); ``run_id`` is the run doing it (named in a rolled-back entry). None when nothing was to do."""
    if location.is_catalog and location.fmt == "parquet":
        return None  # catalog Parquet tables have no token to check
    history = entries(spark, location)
    if not history:
        return None
    last, published, expected = history[-1], last_published(history), reference(history)
    now = tokens(spark, location)
    if last.status == PENDING and now[SEMANTIC_IDS_TABLE] != last.semantic_ids_before:
        # The killed run committed its IDs: complete its set (its describing tables were written first).
        record(spark, location, history, last.run_id, PUBLISHED, now,
               model=(last.model_name or "", last.model_version or ""), moves_champion=last.moves_champion,
               model_sha256=last.model_sha256)
        io.drop_backups(location, SET_TABLES, last.run_id)
        champion = (last.model_name, last.model_version) if last.moves_champion else None
        return Recovery(f"run {last.run_id} committed {SEMANTIC_IDS_TABLE} but was stopped before it finished "
                        "publishing: its set is now marked published", champion,  # type: ignore[arg-type]
                        published_run=last.run_id)
    if published is None or expected is None:
        return None  # nothing was ever published here: a later run overwrites what a killed first run left
    stale = [n for n in DESCRIBING if now[n] != expected.tokens.get(n)]
    if not stale and last.status != PENDING:
        return None
    for name in stale:
        _roll_back(spark, location, name, expected.tokens.get(name), now[name])
    killed = last.run_id if last.status == PENDING else "a run stopped before its pending entry"
    record(spark, location, history, run_id, ROLLED_BACK, tokens(spark, location))
    return Recovery(f"{', '.join(stale) or 'no table'} rolled back to the set run {published.run_id} published "
                    f"(left half-written by {killed})")


def _roll_back(spark: SparkSession, location: io.OutputLocation, name: str, published: str | None,
               current: str | None) -> None:
    if location.fmt == "parquet":
        if current is None or not io.restore_backup(location, name, current):
            print(f"    WARNING: {location.of(name)} was rewritten by an unpublished run and its previous copy is "
                  "gone; the next successful run rewrites it")
        return
    if published is None:  # the table did not exist when the set was published: leave it empty
        old = io.read_table(spark, location, name).limit(0)
    else:
        old = io.read_table(spark, location, name, version=int(published))
    io.write_table(old, location, name)


def write_describing(spark: SparkSession, location: io.OutputLocation, frames: Mapping[str, Any], run_id: str,
                     concurrent: bool = False, in_driver: bool = False) -> dict[str, str | None]:
    """Write the describing tables; returns their tokens after.

    ``in_driver``: where the output is a local Delta path, each frame is collected (``toArrow``) and an existing
    table overwritten by delta-rs from this process (:func:`pipelines.io.overwrite_independently`); a table not
    there yet, or one delta-rs cannot write, is written through the engine. For classic Spark on a local master
    and a table of one part (the runner's choice), whose Delta overwrite of even a one-row table replays the
    table's log in a job first (about 1 s each, 5-6 s for the five at once at 1M items: bench/RESULTS.md).

    One after another in :data:`DESCRIBING` order, or with ``concurrent`` all at once from threads of the
    driver: each write is its own atomic overwrite of its own table, and on a JVM engine most of a small
    table's write is the driver's Delta commit, not work on the cores, so they overlap (classic Spark at
    1M items: bench/RESULTS.md). Meant for outputs a failed run can be rolled back on (Delta): a failure
    then leaves every other table written, where one after another it stops at the failed one. Concurrent
    writes have all ended before this returns or raises, also when the wait is interrupted (Ctrl-C), so none
    lands after the run has let go of the output. The failure raised is that of the first failed table in
    :data:`DESCRIBING` order, with the others' in its notes; the runner's rollback (or, after a kill, the
    next run's :func:`recover`) puts back whichever tables were written.
    """
    names = [name for name in DESCRIBING if name in frames]

    def write(name: str) -> None:  # collected only for a table delta-rs may overwrite: never computed twice there
        if (in_driver and io.overwritable_independently(location, name) is not None
                and io.overwrite_independently(frames[name].toArrow(), location, name)):
            return
        io.write_table(frames[name], location, name, run_id=run_id if location.fmt == "parquet" else None)

    if concurrent and len(names) > 1:
        pool = ThreadPoolExecutor(max_workers=len(names), thread_name_prefix="csid-describing")
        futures = {name: pool.submit(write, name) for name in names}
        try:
            pool.shutdown(wait=True)
        except BaseException:  # interrupted while waiting: the writes in flight end (Spark cancels its jobs)
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        failed = [(name, f.exception()) for name, f in futures.items() if f.exception() is not None]
        if failed:
            first = failed[0][1]
            assert first is not None
            for name, other in failed[1:]:
                first.add_note(f"writing {name} failed too: {io.first_line(other, 300)}")
            raise first
    else:
        for name in names:
            write(name)
    return tokens(spark, location, DESCRIBING)


def finish(location: io.OutputLocation, run_id: str) -> None:
    """After the published entry: drop the previous Parquet copies the run kept aside."""
    io.drop_backups(location, SET_TABLES, run_id)


# --- one writer per output ------------------------------------------------------------------------------

@contextmanager
def writer_lock(location: io.OutputLocation) -> Iterator[None]:
    """Hold an exclusive lock on a local output for the whole run; raise OutputBusyError when another run
    holds it (its pid and host are in the message). Outputs that are not local paths (object stores,
    catalog tables) have no lock: schedule one run at a time there (the commit checks still stop a
    second writer, with exit 4)."""
    root = None if location.is_catalog else io.local_path(location.root)
    if root is None:
        yield
        return
    root.mkdir(parents=True, exist_ok=True)
    path = root / ".csid-writer.lock"
    with open(path, "a+") as handle:
        if not _try_lock(handle):
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise OutputBusyError(f"another run is writing {location.root} ({holder}); nothing was written by this "
                                  "run. Run it again when that one has finished (runs on one output take turns).")
        handle.seek(0)
        handle.truncate()
        since = f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M:%S}"
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}, since {since} UTC")
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _try_lock(handle: IO[str]) -> bool:
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False



# --- the checker: the published set read back without Spark (delta-rs / pyarrow) ---------------------

def check_files(root: str) -> tuple[list[str], list[str]]:
    """Check the set under a local output folder without Spark: (problems, notes).

    Problems: no ``runs`` table; the published set, read at the versions its entry names, is not one
    run's (``rejects`` of another run, ``prefix_stats``/``level_stats`` that do not count the active IDs of
    ``semantic_ids``). Notes: tables whose latest version is not the published one (a killed run's; the
    next run puts them right), and a report of another run.
    """
    import pyarrow.compute as pc
    import pyarrow.dataset as ds
    from deltalake import DeltaTable

    base = Path(io.engine_path(root))
    parquet = not (base / RUNS_TABLE / io.DELTA_LOG).is_dir()
    if not (base / RUNS_TABLE).is_dir():
        return [f"{root}: no {RUNS_TABLE} table, so no published set (not written by this job, or never published)"], []

    def read(name: str, version: str | None = None) -> Any:
        if parquet:
            return ds.dataset(str(base / name), format="parquet", ignore_prefixes=[".", "_"]).to_table()
        return DeltaTable(str(base / name), version=None if version is None else int(version)).to_pyarrow_table()

    rows = read(RUNS_TABLE).to_pylist()
    published = max((r for r in rows if r["status"] == PUBLISHED), key=lambda r: r["entry"], default=None)
    if published is None:
        return [f"{root}: the {RUNS_TABLE} table has no published entry"], []
    run, at = published["mlflow_run_id"], json.loads(published["tokens"])
    problems, notes = [], []
    pinned = {name: (None if parquet else at.get(name)) for name in SET_TABLES}
    if parquet:  # no versions: the folders must still be the published run's (or a run that changed nothing)
        stale = [n for n in SET_TABLES if at.get(n) and (base / n / io.RUN_FILE).is_file()
                 and (base / n / io.RUN_FILE).read_text().strip() != at[n]]
        problems += [f"{n} is not the published run's (Parquet keeps no versions): run the job to repair it"
                     for n in stale]
    else:
        latest = {n: str(DeltaTable(str(base / n)).version()) for n in SET_TABLES if (base / n).is_dir()}
        expected = max((r for r in rows if r["status"] in (PUBLISHED, ROLLED_BACK)), key=lambda r: r["entry"])
        want = json.loads(expected["tokens"])
        notes += [f"{n}: latest version {latest.get(n)} is not the published set's {want.get(n)} (left by a "
                  "stopped run; read at the published versions, or start a run to repair it)"
                  for n in SET_TABLES if n in want and latest.get(n) != want[n]]
    ledger = read(SEMANTIC_IDS_TABLE, pinned[SEMANTIC_IDS_TABLE]).select(["active", "codes"])
    active = ledger.filter(pc.fill_null(ledger.column("active"), False)).column("codes")  # Arrow: no object per row
    rejects = {r for r in read(REJECTS_TABLE, pinned[REJECTS_TABLE]).column("mlflow_run_id").to_pylist()}
    if rejects - {run}:
        problems.append(f"{REJECTS_TABLE} holds rows of run(s) {sorted(rejects - {run})}, not of the published {run}")
    prefix = read(PREFIX_STATS_TABLE, pinned[PREFIX_STATS_TABLE]).to_pylist()
    counted = sum(r["item_count"] for r in prefix if r["level"] == 1)
    if counted != len(active):
        problems.append(f"{PREFIX_STATS_TABLE} counts {counted} items at level 1, {SEMANTIC_IDS_TABLE} has "
                        f"{len(active)} active IDs")
    used = {r["level"]: r["used_codes"] for r in read(LEVEL_STATS_TABLE, pinned[LEVEL_STATS_TABLE]).to_pylist()}
    levels = len(active[0]) if len(active) else 0
    if used != {lv: pc.count_distinct(pc.list_element(active, lv - 1)).as_py() for lv in range(1, levels + 1)}:
        problems.append(f"{LEVEL_STATS_TABLE} does not match the codes of the active IDs")
    report = base / "report" / "prefix_summary.json"
    if report.is_file():
        named = json.loads(report.read_text()).get("extra", {}).get("mlflow_run_id")
        if named != run:
            notes.append(f"the report is of run {named}, the published set of run {run}: rerun with --stages report")
    return problems, notes
