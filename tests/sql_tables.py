"""The queries of ``sql/`` on every reader, and the tiny semantic-ID tables they are tested on.

Shared by ``tests/test_sql_queries.py`` (embedded Sail engine vs delta-rs + DuckDB) and
``tests/classic/test_sql_classic.py`` (classic JVM Spark + Delta vs delta-rs + DuckDB): each reader runs
the same files with the same arguments, and the results are compared as sorted row sets.

A query file starts with comment lines; two of them are read by the runners (docs/sql.md):

* ``-- params: :item_id ...`` -- the named parameters (``:name``); each runner binds them
  (``spark.sql(text, args=...)`` on Spark, ``$name`` on DuckDB);
* ``-- views: semantic_ids, ...`` -- the tables it reads by name; ``name = table VERSION AS OF :param``
  is ``table`` at an older Delta version, read from the Delta log (time travel) by every reader.

The tables come from three real runs of the job on the embedded engine (:func:`build_tables`, in a
process of its own: ``python tests/sql_tables.py build ROOT``):

1. ``full``: train and encode a 480-item catalog (generation 1);
2. ``incremental``: the champion on that catalog with 24 items gone, 30 new ones and 5 bad rows
   (new IDs, rows retired as ``left_catalog``, rejects);
3. ``retrain``: a new generation on the catalog of run 2, warm-started and aligned (rows retired as
   ``new_generation``, ``id_changes``).

``python tests/sql_tables.py classic ROOT OUT`` runs every case on a classic local JVM session with
Delta, the tables registered with ``CREATE TABLE ... USING delta LOCATION`` (the Spark / Databricks way
of docs/sql.md), and writes each result to ``OUT`` as Arrow IPC (or the error as text).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # run as a script: `helpers` sits beside this file
    sys.path.insert(0, str(HERE))

import helpers  # noqa: E402

SQL_DIR = helpers.ROOT / "sql"
N_ITEMS, DIM = 480, 16
MODEL = "csid-sql"
RUNS = ("full", "incremental", "retrain")
LEFT = tuple(range(0, N_ITEMS, 20))  # 24 items leave the catalog before run 2
NEW_IDS = tuple(range(10_000, 10_030))  # 30 items join it
# Bad rows of the catalog of runs 2 and 3: (item_id, embedding, the reason rejects must give).
BAD_ROWS: tuple[tuple[int, list[float], str], ...] = (
    (20_000, [float("nan")] * DIM, "nan_or_inf_in_embedding"),
    (20_001, [0.0] * DIM, "zero_vector"),
    (20_002, [1.0] * (DIM - 1), "wrong_embedding_length"),
    (20_003, [1.0] * DIM, "duplicate_item_id"),
    (20_003, [2.0] * DIM, "duplicate_item_id"),
)
MANIFEST = "manifest.json"
TABLE_FILES = ("semantic_ids", "rejects", "id_changes", "prefix_stats", "level_stats", "drift", "runs")

# Every query file is run by every reader with each of its cases: (query file stem, case label).
CASES: tuple[tuple[str, str], ...] = (
    ("neighbourhood_prefix_2", "collided_item"),
    ("neighbourhood_prefix_2", "left_item"),
    ("item_neighbourhood", "collided_item"),
    ("item_neighbourhood", "left_item"),
    ("largest_level1_groups", "top_5"),
    ("largest_level1_groups", "top_20"),
    ("largest_groups_per_level", "top_3"),
    ("collision_tuples", "all"),
    ("collision_groups", "all"),
    ("decode_semantic_id", "retired_id"),
    ("decode_semantic_id", "active_id"),
    ("decode_semantic_id", "unknown_id"),
    ("item_history", "moved_item"),
    ("item_history", "left_item"),
    ("retired_ids", "all"),
    ("id_drift_between_versions", "full_to_incremental"),
    ("id_drift_between_versions", "incremental_to_retrain"),
    ("reject_reasons", "all"),
    ("id_changes_of_generation", "generation_2"),
    ("published_set", "all"),
)


def case_id(query: str, label: str) -> str:
    return f"{query}--{label}"


# --- the tables ----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Tables:
    """Where the runs wrote, and the ``semantic_ids`` version each run left (from the Delta log)."""

    root: Path
    versions: dict[str, int]  # run name -> semantic_ids version after it

    @property
    def out(self) -> Path:
        return self.root / "tables"

    def path(self, table: str) -> Path:
        return self.out / table

    def read(self, table: str, version: int | None = None) -> list[dict[str, Any]]:
        """The rows of ``table`` (at ``version``), read with delta-rs."""
        from deltalake import DeltaTable

        return DeltaTable(str(self.path(table)), version=version).to_pyarrow_table().to_pylist()

    @classmethod
    def load(cls, root: str | Path) -> Tables:
        root = Path(root)
        data = json.loads((root / MANIFEST).read_text(encoding="utf-8"))
        return cls(root, {k: int(v) for k, v in data["versions"].items()})


def _catalogs(root: Path) -> tuple[Path, Path]:
    from pipelines.demo import write_demo_catalog
    from rqvae.synthetic import CatalogSpec, make_catalog

    first = root / "catalog-1"
    write_demo_catalog(first, CatalogSpec(n_items=N_ITEMS, dim=DIM, seed=11))
    table = helpers.read_delta(first).select(["item_id", "embedding"])
    keep = pa.array([i not in LEFT for i in table["item_id"].to_pylist()])
    extra = make_catalog(CatalogSpec(len(NEW_IDS), DIM, seed=12))
    list_type, id_type = table.schema.field("embedding").type, table.schema.field("item_id").type
    grown = pa.concat_tables([
        table.filter(keep),
        helpers.catalog_table(list(NEW_IDS), list(extra.embeddings), list_type=list_type, id_type=id_type),
        helpers.catalog_table([i for i, _, _ in BAD_ROWS], [v for _, v, _ in BAD_ROWS], list_type=list_type,
                              id_type=id_type),
    ])
    return first, helpers.write_delta(root / "catalog-2", grown)


def build_tables(root: str | Path) -> Tables:
    """Run the job three times (full, incremental, retrain) into ``root/tables``; write the manifest.

    Runs the job in this process on the embedded engine: call it in a process of its own.
    """
    from deltalake import DeltaTable

    root = Path(root)
    first, second = _catalogs(root)
    base = ["--work-dir", root / "work", "--output", root / "tables", "--model-name", MODEL, "--experiment", MODEL,
            "--shuffle-partitions", "2"]
    # --collision-alternatives 0: colliding items share their tuple (suffixes > 0) for the collision queries.
    train = ["--sample-size", "400", "--collision-alternatives", "0", *helpers.SMALL_MODEL, *helpers.GATE_OFF]
    runs: dict[str, list[Any]] = {
        "full": ["--input", first, *train],
        "incremental": ["--input", second, "--mode", "incremental", "--model", f"models:/{MODEL}@champion"],
        "retrain": ["--input", second, *train, "--seed", "3", "--max-id-churn", "1"],
    }
    versions = {}
    for name in RUNS:
        rc, out, err = helpers.run_main([*base, *runs[name]])
        if rc != 0:
            raise RuntimeError(f"the {name} run exited {rc}:\n{out[-3000:]}\n{err[-3000:]}")
        versions[name] = DeltaTable(str(root / "tables" / "semantic_ids")).version()
    (root / MANIFEST).write_text(json.dumps({"versions": versions}), encoding="utf-8")
    return Tables(root, versions)


def _script(*args: str | Path, cwd: Path, timeout: int, env: dict[str, str]) -> str:
    proc = subprocess.run([sys.executable, str(Path(__file__)), *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"`python tests/sql_tables.py {' '.join(map(str, args))}` failed (rc={proc.returncode}):"
                           f"\n{(proc.stdout + proc.stderr)[-5000:]}")
    return proc.stdout


def build_tables_in_subprocess(root: Path, timeout: int = 600) -> Tables:
    """:func:`build_tables` in a fresh Python process (its own engine, MLflow store and clock)."""
    root.mkdir(parents=True, exist_ok=True)
    _script("build", root, cwd=root, timeout=timeout, env=helpers.subprocess_env(TZ="UTC"))
    return Tables.load(root)


# --- the query files -----------------------------------------------------------------------------

_PARAM = re.compile(r"(?<![:\w]):([A-Za-z_]\w*)")
_VIEW = re.compile(r"^(\w+)(?:\s*=\s*(\w+)\s+VERSION\s+AS\s+OF\s+:(\w+))?$", re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class View:
    """A name the query reads: ``table`` (its latest version), or ``table`` at the version ``version_param`` names."""

    name: str
    table: str
    version_param: str | None = None


@dataclasses.dataclass(frozen=True)
class Query:
    name: str
    path: Path
    text: str  # the whole file, header included (comments are valid SQL on every reader)
    description: str
    params: tuple[str, ...]
    views: tuple[View, ...]

    @property
    def body(self) -> str:
        """The SQL without comment lines and without the trailing semicolon."""
        lines = [ln for ln in self.text.splitlines() if not ln.lstrip().startswith("--")]
        return "\n".join(lines).strip().rstrip(";").strip()

    @property
    def body_params(self) -> set[str]:
        return set(_PARAM.findall(self.body))

    @property
    def version_params(self) -> set[str]:
        return {v.version_param for v in self.views if v.version_param}


def _header(text: str) -> list[str]:
    lines = []
    for line in text.splitlines():
        if not line.startswith("--"):
            break
        lines.append(line[2:])
    return lines


def _header_field(header: list[str], key: str) -> list[str]:
    """Comma-separated values of ``-- key: a, b``, continued on the following lines indented by 3+ spaces."""
    values: list[str] = []
    collecting = False
    for line in header:
        content = line.strip()
        if content.lower().startswith(f"{key}:"):
            collecting, content = True, content[len(key) + 1:]
        elif not (line.startswith("   ") and content):
            collecting = False
        if collecting:
            values += [v.strip() for v in content.split(",") if v.strip()]
    return values


def parse_query(path: Path) -> Query:
    text = path.read_text(encoding="utf-8")
    header = _header(text)
    description = " ".join(ln.strip() for ln in header if not re.match(r"\s*(params|views):", ln)
                           and not ln.startswith("   ")).strip()
    params = tuple(_PARAM.findall(" ".join(_header_field(header, "params"))))
    views = []
    for spec in _header_field(header, "views"):
        m = _VIEW.match(spec)
        if not m:
            raise ValueError(f"{path.name}: cannot read the view {spec!r} (want NAME, or NAME = TABLE VERSION AS OF "
                             ":param)")
        views.append(View(m.group(1), m.group(2) or m.group(1), m.group(3)))
    return Query(path.stem, path, text, description, params, tuple(views))


def load_queries(folder: Path = SQL_DIR) -> dict[str, Query]:
    return {p.stem: parse_query(p) for p in sorted(folder.glob("*.sql"))}


def _version(view: View, args: dict[str, Any]) -> int | None:
    return None if view.version_param is None else int(args[view.version_param])


def _body_args(query: Query, args: dict[str, Any]) -> dict[str, Any]:
    missing = set(query.params) - set(args)
    if missing:
        raise ValueError(f"{query.name}.sql needs the parameters {sorted(missing)}")
    return {k: v for k, v in args.items() if k in query.body_params}


# --- the facts the cases' arguments come from ----------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Facts:
    """Items and IDs of the built tables that the cases ask about (found with delta-rs)."""

    collided_item: Any  # an active item whose full tuple another active item shares (it needed a suffix)
    left_item: Any  # an item that left the catalog (one retired row, no active one)
    moved_item: Any  # an item the retrain gave a new ID (id_changes)
    retired_id: str  # the moved item's old ID
    active_id: str  # the collided item's current ID

    @classmethod
    def of(cls, tables: Tables) -> Facts:
        rows = tables.read("semantic_ids")
        active = [r for r in rows if r["active"]]
        tuples: dict[tuple, list[dict[str, Any]]] = {}
        for r in active:
            tuples.setdefault(tuple(r["codes"]), []).append(r)
        collided = min((r for group in tuples.values() if len(group) > 1 for r in group if r["suffix"] > 0),
                       key=lambda r: r["item_id"])
        change = min(tables.read("id_changes"), key=lambda c: c["item_id"])
        return cls(collided["item_id"], LEFT[1], change["item_id"], change["old_semantic_id"],
                   collided["semantic_id"])


def case_args(tables: Tables, facts: Facts, label: str) -> dict[str, Any]:
    v = tables.versions
    return {
        "collided_item": {"item_id": facts.collided_item},
        "left_item": {"item_id": facts.left_item},
        "moved_item": {"item_id": facts.moved_item},
        "top_5": {"top_n": 5},
        "top_20": {"top_n": 20},
        "top_3": {"top_n": 3},
        "retired_id": {"semantic_id": facts.retired_id},
        "active_id": {"semantic_id": facts.active_id},
        "unknown_id": {"semantic_id": "99_99_99_0"},
        "full_to_incremental": {"from_version": v["full"], "to_version": v["incremental"]},
        "incremental_to_retrain": {"from_version": v["incremental"], "to_version": v["retrain"]},
        "generation_2": {"generation": 2},
        "all": {},
    }[label]


# --- readers -------------------------------------------------------------------------------------

Reader = Callable[[Query, dict[str, Any]], pa.Table]


def spark_temp_view_reader(spark: Any, tables: Tables) -> Reader:
    """A Spark session (classic or Connect) with each table as a temp view of ``spark.read.format("delta")``,
    time travel by the ``versionAsOf`` option; parameters bound by ``spark.sql(text, args=...)``."""

    def run(query: Query, args: dict[str, Any]) -> pa.Table:
        bound = _body_args(query, args)
        try:
            for view in query.views:
                reader = spark.read.format("delta")
                version = _version(view, args)
                if version is not None:
                    reader = reader.option("versionAsOf", version)
                reader.load(str(tables.path(view.table))).createOrReplaceTempView(view.name)
            return spark.sql(query.text, args=bound).toArrow()
        finally:
            for view in query.views:
                spark.catalog.dropTempView(view.name)

    return run


def spark_catalog_reader(spark: Any, tables: Tables) -> Reader:
    """A Spark session with Delta's catalog: each table registered by name with ``CREATE TABLE ... USING delta
    LOCATION``, an older version as ``CREATE TEMP VIEW ... AS SELECT * FROM table VERSION AS OF n``."""

    def literal(path: Path) -> str:
        return "'" + str(path).replace("\\", "\\\\").replace("'", "\\'") + "'"

    def run(query: Query, args: dict[str, Any]) -> pa.Table:
        bound = _body_args(query, args)
        for view in query.views:
            location = literal(tables.path(view.table))
            spark.sql(f"CREATE TABLE IF NOT EXISTS {view.table} USING delta LOCATION {location}")
            version = _version(view, args)
            if version is not None:
                spark.sql(f"CREATE OR REPLACE TEMP VIEW {view.name} AS SELECT * FROM {view.table} "
                          f"VERSION AS OF {version:d}")
        return spark.sql(query.text, args=bound).toArrow()

    return run


def duckdb_reader(tables: Tables) -> Reader:
    """DuckDB over Arrow datasets of delta-rs (no Spark, no JVM): time travel by ``DeltaTable(path, version=n)``,
    parameters as DuckDB's ``$name``."""
    try:
        import duckdb
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise RuntimeError("the SQL tests read the tables with DuckDB too: pip install -r requirements-dev.txt "
                           "(duckdb)") from e
    from deltalake import DeltaTable

    def run(query: Query, args: dict[str, Any]) -> pa.Table:
        bound = _body_args(query, args)
        con = duckdb.connect()
        try:
            con.execute("SET TimeZone = 'UTC'")
            for view in query.views:
                table = DeltaTable(str(tables.path(view.table)), version=_version(view, args))
                con.register(view.name, table.to_pyarrow_dataset())
            return con.sql(_PARAM.sub(r"$\1", query.text), params=bound).to_arrow_table()
        finally:
            con.close()

    return run


def run_cases(reader: Reader, tables: Tables) -> Iterator[tuple[str, str, pa.Table | Exception]]:
    """(query, label, result or the error it raised) of every case in :data:`CASES`."""
    queries, facts = load_queries(), Facts.of(tables)
    for name, label in CASES:
        try:
            result: pa.Table | Exception = reader(queries[name], case_args(tables, facts, label))
        except Exception as e:  # noqa: BLE001 - reported per case by the tests
            result = e
        yield name, label, result


# --- results -------------------------------------------------------------------------------------

def _plain(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_plain(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _plain(v)) for k, v in value.items()))
    if isinstance(value, datetime) and value.tzinfo is not None:
        return value.astimezone(timezone.utc).replace(tzinfo=None)
    if isinstance(value, float) and math.isnan(value):
        return "NaN"
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    return value


def rows(table: pa.Table) -> list[dict[str, Any]]:
    """The rows of a result as dicts of plain, hashable values (lists as tuples, times as naive UTC)."""
    return [{k.lower(): _plain(v) for k, v in r.items()} for r in table.to_pylist()]


def _sort_key(row: tuple) -> tuple:
    return tuple((v is None, type(v).__name__, v if v is not None else 0) for v in row)


def row_set(table: pa.Table) -> tuple[tuple[str, ...], list[tuple]]:
    """(column names, rows sorted): how the results of two readers are compared."""
    return (tuple(n.lower() for n in table.column_names),
            sorted((tuple(r.values()) for r in rows(table)), key=_sort_key))


def differences(a: pa.Table, b: pa.Table) -> str:
    """What differs between two results, for an assertion message; "" when they are equal as row sets."""
    (names_a, rows_a), (names_b, rows_b) = row_set(a), row_set(b)
    if names_a != names_b:
        return f"columns {names_a} vs {names_b}"
    if rows_a == rows_b:
        return ""
    only_a = [r for r in rows_a if r not in rows_b][:5]
    only_b = [r for r in rows_b if r not in rows_a][:5]
    return f"{len(rows_a)} vs {len(rows_b)} rows; only in the first: {only_a}; only in the second: {only_b}"


# --- classic JVM Spark, in a process of its own --------------------------------------------------

def run_classic(tables: Tables, out: Path) -> None:
    """Every case on a new classic local[2] JVM session with Delta (the jars of ``delta_maven_coordinate``):
    the results as ``OUT/<case id>.arrow`` (Arrow IPC), a failure as ``OUT/<case id>.error``."""
    from pyspark.sql import SparkSession

    from pipelines.session import DELTA_EXTENSION, delta_maven_coordinate

    out.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    spark = (
        SparkSession.builder.master("local[2]")
        .appName("csid-sql-tests")
        .config("spark.jars.packages", delta_maven_coordinate())
        .config("spark.sql.extensions", DELTA_EXTENSION)
        .config("spark.sql.catalog.spark_catalog", "org.apache.spark.sql.delta.catalog.DeltaCatalog")
        .config("spark.sql.warehouse.dir", str(out / "warehouse"))
        .config("spark.ui.enabled", "false")
        .config("spark.sql.shuffle.partitions", "2")
        .config("spark.sql.session.timeZone", "UTC")
        .config("spark.driver.memory", "1g")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.sql.codegen.wholeStage", "false")
        .config("spark.sql.adaptive.enabled", "false")
        .config("spark.databricks.delta.snapshotPartitions", "2")  # Delta's log replay: 50 tasks by default
        # Delta's SQL parser drops spark.sql(args=...) on Spark 4.1+ (delta-io/delta#7640: UNBOUND_SQL_PARAMETER);
        # the legacy substitution binds them in the analyzer instead.
        .config("spark.sql.legacy.parameterSubstitution.constantsOnly", "true")
        .getOrCreate()
    )
    spark.sparkContext.setLogLevel("ERROR")
    print(f"session started in {time.monotonic() - start:.1f} s", flush=True)
    try:
        for name, label, result in run_cases(spark_catalog_reader(spark, tables), tables):
            print(f"{case_id(name, label)}: {time.monotonic() - start:.1f} s", flush=True)
            target = out / case_id(name, label)
            if isinstance(result, Exception):
                target.with_suffix(".error").write_text(f"{type(result).__name__}: {result}", encoding="utf-8")
                continue
            with pa.OSFile(str(target.with_suffix(".arrow")), "wb") as sink, pa.ipc.new_file(sink,
                                                                                             result.schema) as w:
                w.write_table(result)
    finally:
        spark.stop()


def run_classic_in_subprocess(tables: Tables, out: Path, timeout: int = 600) -> dict[str, pa.Table | str]:
    """:func:`run_classic` in a fresh process (a JVM of its own, with the Delta jars); case id -> result or error."""
    env = helpers.subprocess_env(TZ="UTC")
    env.pop("PYSPARK_SUBMIT_ARGS", None)
    _script("classic", tables.root, out, cwd=tables.root, timeout=timeout, env=env)
    results: dict[str, pa.Table | str] = {}
    for name, label in CASES:
        target = out / case_id(name, label)
        if target.with_suffix(".error").exists():
            results[case_id(name, label)] = target.with_suffix(".error").read_text(encoding="utf-8")
        elif target.with_suffix(".arrow").exists():
            with pa.memory_map(str(target.with_suffix(".arrow"))) as source:
                results[case_id(name, label)] = pa.ipc.open_file(source).read_all()
    return results


def main(argv: list[str]) -> int:
    os.environ.setdefault("PYARROW_IGNORE_TIMEZONE", "1")
    if len(argv) == 2 and argv[0] == "build":
        with helpers.fresh_mlflow_globals():
            print(json.dumps(build_tables(argv[1]).versions))
        return 0
    if len(argv) == 3 and argv[0] == "classic":
        run_classic(Tables.load(argv[1]), Path(argv[2]))
        return 0
    print("usage: python tests/sql_tables.py build ROOT | classic ROOT OUT", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
