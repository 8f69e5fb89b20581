"""The job's layering (DESIGN.md "Layers"): jobs/runner.py wires stage functions and does no DataFrame
work itself, and the CLI and the runner do not import each other's modules (no cycle)."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def test_the_runner_builds_no_dataframe_expressions() -> None:
    runner = ROOT / "jobs" / "runner.py"
    modules = imported_modules(runner)
    assert not {m for m in modules if m.startswith("pyspark.sql.functions") or m.startswith("pyspark.sql.window")
                or m in ("pyspark.sql.Window", "pyspark.sql.Column", "pyspark.sql.functions")}, modules
    calls = {node.func.attr for node in ast.walk(ast.parse(runner.read_text(encoding="utf-8")))
             if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
             and not isinstance(node.func.value, ast.Constant)}  # "; ".join(...) is no DataFrame work
    assert not calls & {"withColumn", "withColumns", "select", "where", "filter", "join", "groupBy", "agg",
                        "unionByName", "orderBy", "limit"}, calls


def test_cli_and_runner_do_not_import_each_other() -> None:
    runner = imported_modules(ROOT / "jobs" / "runner.py")
    cli = imported_modules(ROOT / "jobs" / "tokenize_catalog.py")
    assert not any(m.startswith("jobs.tokenize_catalog") for m in runner)
    assert "jobs.config" in runner and "jobs.config" in cli
