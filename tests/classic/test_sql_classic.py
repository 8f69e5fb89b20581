"""The queries of ``sql/`` on classic JVM Spark with Delta: the same rows as delta-rs + DuckDB.

The tables come from the same three job runs as in ``tests/test_sql_queries.py`` (embedded engine, in a
process of their own). The classic session runs in a further process of its own, started with the Delta
jars (``pipelines.session.delta_maven_coordinate``), because this process's JVM may already run without
them. It registers the tables the Spark / Databricks way of docs/sql.md: ``CREATE TABLE ... USING delta
LOCATION``, and an older version as ``CREATE TEMP VIEW ... AS SELECT * FROM semantic_ids VERSION AS OF n``.

Runs only inside ``tests/test_classic_engine.py``'s subprocess (``CSID_CLASSIC_TESTS=1``).
"""
from __future__ import annotations

import pytest
import sql_tables as st

pytestmark = [pytest.mark.spark, pytest.mark.classic, pytest.mark.slow]


@pytest.fixture(scope="module")
def tables(tmp_path_factory) -> st.Tables:
    return st.build_tables_in_subprocess(tmp_path_factory.mktemp("sql-tables"))


@pytest.fixture(scope="module")
def classic(tables, tmp_path_factory) -> dict:
    return st.run_classic_in_subprocess(tables, tmp_path_factory.mktemp("sql-classic"))


@pytest.fixture(scope="module")
def duck(tables) -> dict:
    return {st.case_id(n, lb): r for n, lb, r in st.run_cases(st.duckdb_reader(tables), tables)}


@pytest.mark.parametrize(("query", "label"), st.CASES, ids=[st.case_id(*c) for c in st.CASES])
def test_classic_spark_with_delta_and_delta_rs_with_duckdb_return_the_same_rows(classic, duck, query,
                                                                               label) -> None:
    case = st.case_id(query, label)
    assert case in classic, f"the classic run wrote no result for {case}"
    assert not isinstance(classic[case], str), f"classic Spark: {classic[case]}"
    assert not isinstance(duck[case], Exception), f"DuckDB: {duck[case]}"
    assert not st.differences(classic[case], duck[case]), st.differences(classic[case], duck[case])


def test_time_travel_on_the_jvm_sees_each_runs_version(classic, tables) -> None:
    # VERSION AS OF on the catalog table: the incremental run issued the new items' IDs and retired the
    # items that left; the retrain changed IDs only (the meaning of every query: tests/test_sql_queries.py).
    first = st.rows(classic[st.case_id("id_drift_between_versions", "full_to_incremental")])
    assert {(r["change"], r["item_id"]) for r in first} == (
        {("issued", i) for i in st.NEW_IDS} | {("retired", i) for i in st.LEFT})
    second = st.rows(classic[st.case_id("id_drift_between_versions", "incremental_to_retrain")])
    assert second and {r["change"] for r in second} == {"changed"}
    assert len(second) == len(tables.read("id_changes"))
