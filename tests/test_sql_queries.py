"""The queries of ``sql/`` on the embedded engine and on an independent reader, over tables real runs wrote.

Three runs of the job (full, incremental, retrain: ``tests/sql_tables.py``) write the tables once; each
query file then runs with each of its cases on the embedded Sail engine (the tables as temp views of
``spark.read.format("delta")``, older versions by ``versionAsOf``) and on delta-rs + DuckDB (no Spark),
and both must return the same rows. The rows must also be what the tables say, computed here in Python
from delta-rs. Classic JVM Spark + Delta runs the same cases in ``tests/classic/test_sql_classic.py``.
"""
from __future__ import annotations

import json
from collections import Counter
from typing import Any

import pyarrow as pa
import pytest
import sql_tables as st

pytestmark = [pytest.mark.spark, pytest.mark.slow]

QUERIES = st.load_queries()
Result = pa.Table | Exception


@pytest.fixture(scope="module")
def tables(tmp_path_factory) -> st.Tables:
    return st.build_tables_in_subprocess(tmp_path_factory.mktemp("sql-tables"))


@pytest.fixture(scope="module")
def facts(tables) -> st.Facts:
    return st.Facts.of(tables)


@pytest.fixture(scope="module")
def results(spark, tables) -> dict[tuple[str, str], tuple[Result, Result]]:
    """(query, label) -> (embedded engine's result, DuckDB's result)."""
    sail = {(n, lb): r for n, lb, r in st.run_cases(st.spark_temp_view_reader(spark, tables), tables)}
    duck = {(n, lb): r for n, lb, r in st.run_cases(st.duckdb_reader(tables), tables)}
    return {case: (sail[case], duck[case]) for case in st.CASES}


def result_rows(results, query: str, label: str) -> list[dict[str, Any]]:
    """The embedded engine's rows of a case (the readers' agreement is a test of its own)."""
    result = results[(query, label)][0]
    if isinstance(result, Exception):
        pytest.fail(f"{query}.sql ({label}) failed on the embedded engine: {result}")
    return st.rows(result)


@pytest.fixture(scope="module")
def ledger(tables) -> list[dict[str, Any]]:
    return tables.read("semantic_ids")


@pytest.fixture(scope="module")
def active(ledger) -> list[dict[str, Any]]:
    return [r for r in ledger if r["active"]]


def test_every_query_file_says_what_it_answers_and_declares_its_parameters_and_tables() -> None:
    assert len(QUERIES) >= 10, sorted(QUERIES)
    for q in QUERIES.values():
        assert q.text.startswith("--") and len(q.description) > 40, f"{q.name}.sql: no header saying what it answers"
        assert "Answers:" in q.description, f"{q.name}.sql: the header has no 'Answers:' line"
        assert set(q.params) == q.body_params | q.version_params, (
            f"{q.name}.sql declares {sorted(q.params)} but uses {sorted(q.body_params | q.version_params)}")
        assert q.views, f"{q.name}.sql names no table in its 'views:' line"
        for view in q.views:
            assert view.table in st.TABLE_FILES, f"{q.name}.sql reads {view.table!r}, no table the job writes"
            assert view.name in q.body, f"{q.name}.sql declares {view.name!r} but does not read it"
    # Every file is run by the readers, and every case names a file.
    assert {name for name, _ in st.CASES} == set(QUERIES)


def test_the_view_and_parameter_lines_are_read_as_written() -> None:
    drift = QUERIES["id_drift_between_versions"]
    assert drift.params == ("from_version", "to_version")
    assert drift.views == (st.View("semantic_ids_before", "semantic_ids", "from_version"),
                           st.View("semantic_ids_after", "semantic_ids", "to_version"))
    assert drift.body_params == set()  # the versions pick the views; the body has no parameter
    assert QUERIES["item_neighbourhood"].params == ("item_id",)
    assert QUERIES["collision_groups"].params == ()
    with pytest.raises(ValueError, match=r"needs the parameters \['item_id'\]"):
        st.duckdb_reader(st.Tables(st.HERE, {}))(QUERIES["item_neighbourhood"], {})


@pytest.mark.parametrize(("query", "label"), st.CASES, ids=[st.case_id(*c) for c in st.CASES])
def test_the_embedded_engine_and_delta_rs_with_duckdb_return_the_same_rows(results, query, label) -> None:
    sail, duck = results[(query, label)]
    assert not isinstance(sail, Exception), f"embedded engine: {type(sail).__name__}: {sail}"
    assert not isinstance(duck, Exception), f"DuckDB: {type(duck).__name__}: {duck}"
    assert not st.differences(sail, duck), st.differences(sail, duck)


# --- the results make sense ----------------------------------------------------------------------

def test_an_items_neighbourhood_holds_the_item_and_every_active_item_of_its_prefixes(results, facts, active) -> None:
    me = next(r for r in active if r["item_id"] == facts.collided_item)
    near = {(r["item_id"], r["semantic_id"]) for r in result_rows(results, "neighbourhood_prefix_2", "collided_item")}
    assert (me["item_id"], me["semantic_id"]) in near
    assert near == {(r["item_id"], r["semantic_id"]) for r in active if r["prefix_2"] == me["prefix_2"]}
    assert len(near) >= 2  # it shares even its whole tuple with another item

    levels = {(r["item_id"], r["semantic_id"]): r["shared_levels"]
              for r in result_rows(results, "item_neighbourhood", "collided_item")}
    assert levels == {(r["item_id"], r["semantic_id"]): 2 if r["prefix_2"] == me["prefix_2"] else 1
                      for r in active if r["prefix_1"] == me["prefix_1"]}
    assert {k for k, v in levels.items() if v == 2} == near
    assert set(levels.values()) == {1, 2}
    ordered = [r["shared_levels"] for r in result_rows(results, "item_neighbourhood", "collided_item")]
    assert ordered == sorted(ordered, reverse=True)
    # An item that left the catalog has no neighbourhood: only active rows are anyone's neighbours.
    assert result_rows(results, "neighbourhood_prefix_2", "left_item") == []
    assert result_rows(results, "item_neighbourhood", "left_item") == []


def ranked(counts: Counter) -> list[tuple[str, int]]:
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))


def test_the_largest_groups_are_the_counts_of_the_active_rows(results, active) -> None:
    level1 = Counter(r["prefix_1"] for r in active)
    top5 = [(r["prefix_1"], r["items"]) for r in result_rows(results, "largest_level1_groups", "top_5")]
    assert top5 == ranked(level1)[:5]
    top20 = result_rows(results, "largest_level1_groups", "top_20")
    assert len(top20) == min(20, len(level1)) and sum(r["items"] for r in top20) == len(active)

    per_level = result_rows(results, "largest_groups_per_level", "top_3")
    assert sorted({r["level"] for r in per_level}) == [1, 2, 3]
    for level in (1, 2, 3):
        counts = Counter(r[f"prefix_{level}"] for r in active)
        got = [(r["prefix"], r["item_count"], r["place"]) for r in per_level if r["level"] == level]
        assert got == [(p, n, i + 1) for i, (p, n) in enumerate(ranked(counts)[:3])], level
    for r in per_level:
        if r["level"] < 3:  # children: the distinct next-level prefixes under it
            below = {a[f"prefix_{r['level'] + 1}"] for a in active if a[f"prefix_{r['level']}"] == r["prefix"]}
            assert r["children"] == len(below), r
    assert per_level[0]["item_count"] == top5[0][1] == max(level1.values())


def test_collisions_are_the_tuples_that_needed_a_suffix(results, ledger, active) -> None:
    shared = Counter(r["prefix_3"] for r in active)
    tuples = {r["prefix_3"]: (r["items"], r["max_suffix"]) for r in result_rows(results, "collision_tuples", "all")}
    assert tuples and tuples == {
        p: (n, max(a["suffix"] for a in active if a["prefix_3"] == p)) for p, n in shared.items() if n > 1}

    groups = {r["codes"]: r for r in result_rows(results, "collision_groups", "all")}
    by_codes: dict[tuple, list[dict[str, Any]]] = {}
    for r in ledger:
        by_codes.setdefault(tuple(r["codes"]), []).append(r)
    expected = {c: (len(rs), sum(r["active"] for r in rs), max(r["suffix"] for r in rs))
                for c, rs in by_codes.items() if max(r["suffix"] for r in rs) > 0}
    assert groups and {c: (g["ids_issued"], g["active_items"], g["max_suffix"]) for c, g in groups.items()} == expected
    for g in groups.values():  # suffixes 0..n-1 over the whole ledger: none skipped, none reissued
        assert g["ids_issued"] == g["max_suffix"] + 1, g


def test_an_id_decodes_to_its_one_item_whatever_generation_issued_it(results, facts) -> None:
    assert result_rows(results, "decode_semantic_id", "retired_id") == [
        {"item_id": facts.moved_item, "active": False, "retired_reason": "new_generation", "generation": 1}]
    assert result_rows(results, "decode_semantic_id", "active_id") == [
        {"item_id": facts.collided_item, "active": True, "retired_reason": None, "generation": 2}]
    assert result_rows(results, "decode_semantic_id", "unknown_id") == []


def test_an_items_history_lists_each_id_it_held_oldest_first(results, facts, tables) -> None:
    change = next(c for c in tables.read("id_changes") if c["item_id"] == facts.moved_item)
    history = result_rows(results, "item_history", "moved_item")
    assert [(h["semantic_id"], h["generation"], h["active"], h["retired_reason"]) for h in history] == [
        (change["old_semantic_id"], 1, False, "new_generation"), (change["new_semantic_id"], 2, True, None)]
    assert history[0]["tokenized_at"] < history[1]["tokenized_at"] and history[0]["retired_at"] is not None
    (left,) = result_rows(results, "item_history", "left_item")
    assert (left["active"], left["retired_reason"], left["generation"]) == (False, "left_catalog", 1)


def test_retired_ids_are_the_inactive_rows_with_what_replaced_them(results, ledger, tables) -> None:
    retired = result_rows(results, "retired_ids", "all")
    assert sorted(r["semantic_id"] for r in retired) == sorted(r["semantic_id"] for r in ledger if not r["active"])
    reasons = Counter(r["retired_reason"] for r in retired)
    new_ids = {c["item_id"]: c["new_semantic_id"] for c in tables.read("id_changes")}
    assert reasons["left_catalog"] == len(st.LEFT) and reasons["new_generation"] == len(new_ids)
    assert set(reasons) == {"left_catalog", "new_generation"}
    for r in retired:
        if r["retired_reason"] == "left_catalog":
            assert r["item_id"] in st.LEFT and r["current_semantic_id"] is None, r
        else:
            assert r["current_semantic_id"] == new_ids[r["item_id"]], r
    assert [r["retired_at"] for r in retired] == sorted(r["retired_at"] for r in retired)


def expected_drift(tables, before: int, after: int) -> set[tuple]:
    """The drift query's rows, computed in Python from two versions read with delta-rs."""
    old_rows, new_rows = tables.read("semantic_ids", before), tables.read("semantic_ids", after)
    old = {r["item_id"]: r["semantic_id"] for r in old_rows if r["active"]}
    new = {r["item_id"]: r["semantic_id"] for r in new_rows if r["active"]}
    known = {r["semantic_id"] for r in old_rows}
    reason = {r["semantic_id"]: r["retired_reason"] for r in new_rows}
    rows = set()
    for item in old.keys() | new.keys():
        o, n = old.get(item), new.get(item)
        if o == n:
            continue
        change = ("retired" if n is None else "changed") if o is not None else (
            "reactivated" if n in known else "issued")
        rows.add((change, item, o, n, reason.get(o) if o else None))
    return rows


def test_drift_between_versions_is_read_from_the_delta_log(results, tables) -> None:
    v = tables.versions
    assert v["full"] < v["incremental"] < v["retrain"]  # three versions of one table, not copies
    incremental = {tuple(r.values()) for r in result_rows(results, "id_drift_between_versions", "full_to_incremental")}
    assert incremental == expected_drift(tables, v["full"], v["incremental"])
    assert {(c, i) for c, i, *_ in incremental} == (
        {("issued", i) for i in st.NEW_IDS} | {("retired", i) for i in st.LEFT})
    assert {reason for c, _, _, _, reason in incremental if c == "retired"} == {"left_catalog"}

    retrain = {tuple(r.values()) for r in result_rows(results, "id_drift_between_versions", "incremental_to_retrain")}
    assert retrain == expected_drift(tables, v["incremental"], v["retrain"])
    assert retrain == {("changed", c["item_id"], c["old_semantic_id"], c["new_semantic_id"], "new_generation")
                       for c in tables.read("id_changes")}


def test_reject_reasons_count_the_bad_rows(results) -> None:
    got = {r["reason"]: (r["rejected_rows"], r["items"]) for r in result_rows(results, "reject_reasons", "all")}
    expected: dict[str, tuple[int, int]] = {}
    for reason in {reason for _, _, reason in st.BAD_ROWS}:
        ids = [i for i, _, r in st.BAD_ROWS if r == reason]
        expected[reason] = (len(ids), len(set(ids)))
    assert got == expected
    assert list(got)[0] == "duplicate_item_id"  # most rows first


def test_the_id_changes_of_a_generation_link_an_items_old_and_new_rows(results, ledger, tables) -> None:
    changes = result_rows(results, "id_changes_of_generation", "generation_2")
    assert changes and len(changes) == len(tables.read("id_changes"))
    rows_by_id = {r["semantic_id"]: r for r in ledger}
    for c in changes:
        old, new = rows_by_id[c["old_semantic_id"]], rows_by_id[c["new_semantic_id"]]
        assert old["item_id"] == new["item_id"] == c["item_id"]
        assert (old["active"], old["retired_reason"], new["active"], new["generation"]) == (
            False, "new_generation", True, 2)


def test_the_published_set_names_the_versions_the_last_run_published(results, tables, ledger) -> None:
    from deltalake import DeltaTable

    (published,) = result_rows(results, "published_set", "all")
    tokens = json.loads(published["tokens"])
    assert int(tokens["semantic_ids"]) == tables.versions["retrain"]
    for table, version in tokens.items():
        assert DeltaTable(str(tables.path(table))).version() == int(version), table
    assert published["model_version"] == "2" and published["model_name"] == st.MODEL
    issued_by_retrain = {r["mlflow_run_id"] for r in ledger if r["generation"] == 2 and r["tokenized_at"] == max(
        x["tokenized_at"] for x in ledger)}
    assert issued_by_retrain == {published["mlflow_run_id"]}
