"""notebooks/*.ipynb run top to bottom (nbclient, a Jupyter kernel of this interpreter) on a tiny run of the job,
and what they show matches the tables.

The notebook reads its paths from CSID_WORK_DIR / CSID_TABLES / CSID_CATALOG / CSID_MODEL_NAME /
CSID_MODEL_ALIAS (defaults in its first code cell; docs/scoring.md). Cells are found by their tags; a cell
appended here (never saved) hands back every value the notebook displayed (IPython's ``Out``) as JSON, so the
checks compare values, not printed text.
"""
from __future__ import annotations

import ast
import json
from collections import Counter
from pathlib import Path
from typing import Any

import helpers
import numpy as np
import pytest

try:
    import nbformat
    from ipykernel.kernelspec import write_kernel_spec
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError
except ImportError as e:  # a collection error, never a skip
    raise ImportError(f"{e}. The notebook tests need nbclient, nbformat and ipykernel: "
                      "pip install -r requirements-dev.txt") from e

from pipelines.schema import REJECTS_TABLE, SEMANTIC_IDS_TABLE

pytestmark = [pytest.mark.spark, pytest.mark.usefixtures("job_isolation")]

NOTEBOOKS = sorted((helpers.ROOT / "notebooks").glob("*.ipynb"))
EXPLORE = helpers.ROOT / "notebooks" / "explore_semantic_ids.ipynb"
N_ITEMS, DIM, LEVELS = 400, 16, 3
MARK = "CSID-NOTEBOOK-VALUES "
# Appended to the executed copy only: every DataFrame the notebook displayed, by execution count.
DUMP_CELL = f"""
import json as _json
print({MARK!r} + _json.dumps({{str(n): v.to_dict(orient="list") for n, v in Out.items() if hasattr(v, "to_dict")}},
                             default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))
"""


def _kernel_dir(root: Path, name: str) -> Path:
    """A Jupyter data dir holding kernel ``name`` that runs this interpreter (so the kernel sees exactly the
    packages of the test run, whatever `python` is on PATH). Put it first on JUPYTER_PATH."""
    write_kernel_spec(root / "kernels" / name, overrides={"display_name": f"{name} (tests)"})
    return root


def _load(path: Path) -> Any:
    return nbformat.read(str(path), as_version=4)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """The demo job, tiny: 400 items of 16 floats, the small model, gates off."""
    work = tmp_path_factory.mktemp("nb-work")
    rc, out, err = helpers.run_main(["--demo", "--demo-items", N_ITEMS, "--demo-dim", DIM, "--work-dir", work,
                                     *helpers.SMALL_MODEL, *helpers.GATE_OFF])
    assert rc == 0, f"the demo job failed (rc {rc}):\n{err[-4000:]}\n{out[-2000:]}"
    return work


def _execute(path: Path, work: Path, tmp: Path) -> tuple[Any, dict[str, Any]]:
    nb = _load(path)
    kernel = nb.metadata.get("kernelspec", {}).get("name")
    assert kernel, f"{path.name} names no kernel (metadata.kernelspec.name)"
    nb.cells.append(nbformat.v4.new_code_cell(DUMP_CELL))
    env = helpers.subprocess_env(CSID_WORK_DIR=str(work), CSID_TABLES=str(work / "tables"),
                                 CSID_CATALOG=str(work / "demo_catalog"),
                                 JUPYTER_PATH=str(_kernel_dir(tmp / "jupyter", kernel)))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JUPYTER_PATH", env["JUPYTER_PATH"])  # where this process's nbclient looks the kernel up
        client = NotebookClient(nb, kernel_name=kernel, timeout=300, allow_errors=False,
                                resources={"metadata": {"path": str(tmp)}})
        try:
            client.execute(env=env)
        except CellExecutionError as e:
            raise AssertionError(f"{path.name} failed:\n{str(e)[-4000:]}") from e
    printed = "".join(o.text for o in nb.cells[-1].outputs if o.output_type == "stream" and o.name == "stdout")
    assert MARK in printed, f"no values came back from {path.name}: {nb.cells[-1].outputs}"
    values = json.loads(printed.split(MARK, 1)[1].splitlines()[0])
    nb.cells.pop()
    return nb, values


@pytest.fixture(scope="module")
def explored(tiny_run, tmp_path_factory) -> tuple[Any, dict[str, dict[str, list]]]:
    """The exploration notebook run on the tiny run: (executed notebook, {tag: displayed DataFrame as lists})."""
    nb, values = _execute(EXPLORE, tiny_run, tmp_path_factory.mktemp("nb-run"))
    shown = {}
    for cell in nb.cells:
        for tag in cell.metadata.get("tags", []):
            if cell.cell_type == "code" and str(cell.execution_count) in values:
                shown[tag] = values[str(cell.execution_count)]
    return nb, shown


def _table(work: Path, name: str) -> list[dict[str, Any]]:
    return helpers.read_delta(work / "tables" / name).to_pylist()


# --- the notebooks as saved in git ----------------------------------------------------------------

@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_saved_notebooks_are_cleared_and_thin(path) -> None:
    nb = _load(path)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code, f"{path.name} has no code"
    assert [c.outputs for c in code if c.outputs] == [], f"{path.name}: clear the outputs before committing"
    assert [c.execution_count for c in code if c.execution_count is not None] == []
    for cell in code:  # people explore here; logic belongs in the packages (DESIGN.md)
        defined = [n for n in ast.walk(ast.parse(cell.source))
                   if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda))]
        assert not defined, f"{path.name} defines code of its own; move it to pipelines/ or rqvae/:\n{cell.source}"
    assert nb.metadata.kernelspec.name == "python3"


def test_every_notebook_is_run_here() -> None:
    assert NOTEBOOKS == [EXPLORE], "a new notebook needs its run and checks in tests/test_notebook.py"


# --- the notebook run on a tiny table -------------------------------------------------------------

def test_every_cell_ran_without_error(explored) -> None:
    nb, _ = explored
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1))
    assert [o for c in code for o in c.outputs if o.output_type == "error"] == []


def test_the_summary_counts_the_tables_rows(explored, tiny_run) -> None:
    rows = _table(tiny_run, SEMANTIC_IDS_TABLE)
    assert explored[1]["summary"] == {"rows": [len(rows)], "active_items": [sum(r["active"] for r in rows)],
                                      "semantic_ids": [len({r["semantic_id"] for r in rows})]}
    assert len(rows) == N_ITEMS


def test_prefix_counts_add_up_to_the_items_at_every_level(explored, tiny_run) -> None:
    rows = [r for r in _table(tiny_run, SEMANTIC_IDS_TABLE) if r["active"]]
    tuples = Counter(tuple(r["codes"]) for r in rows)
    shown = explored[1]["prefix-levels"]
    assert shown["level"] == list(range(1, LEVELS + 1))
    assert shown["items"] == [N_ITEMS] * LEVELS
    assert shown["prefixes"] == [len({r[f"prefix_{level}"] for r in rows}) for level in range(1, LEVELS + 1)]
    assert shown["collision_groups"][-1] == sum(n > 1 for n in tuples.values())


def test_the_largest_level_1_groups_are_the_tables(explored, tiny_run) -> None:
    counts = Counter(r["prefix_1"] for r in _table(tiny_run, SEMANTIC_IDS_TABLE) if r["active"])
    shown = explored[1]["largest-level-1"]
    expected = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:20]
    assert list(zip(shown["prefix_1"], shown["items"])) == expected
    assert len(counts) <= 20 and sum(shown["items"]) == N_ITEMS  # K = 16: every level-1 group is shown


def test_collisions_and_rejects_are_the_tables(explored, tiny_run) -> None:
    rows = [r for r in _table(tiny_run, SEMANTIC_IDS_TABLE) if r["active"]]
    groups = Counter(r["prefix_3"] for r in rows)
    shared = sorted(((p, n) for p, n in groups.items() if n > 1), key=lambda kv: (-kv[1], kv[0]))[:20]
    assert list(zip(explored[1]["collisions"]["prefix_3"], explored[1]["collisions"]["items"])) == shared
    assert explored[1]["rejects"] == {"reason": [], "n": []}
    assert _table(tiny_run, REJECTS_TABLE) == []
    drift = dict(zip(explored[1]["drift"]["metric"], explored[1]["drift"]["value"]))
    assert drift["ids_added"] == N_ITEMS and drift["id_churn"] == 0


def test_the_model_cells_score_with_the_registered_champion(explored, tiny_run) -> None:
    from rqvae import encode_array, load_checkpoint

    (checkpoint,) = (tiny_run / "checkpoints").glob("*.pt")
    model = load_checkpoint(checkpoint)
    catalog = helpers.read_delta(tiny_run / "demo_catalog").sort_by("item_id")
    ids = np.asarray(catalog["item_id"].to_pylist())
    x = np.stack(catalog["embedding"].to_numpy(zero_copy_only=False)).astype(np.float32)
    nearest = encode_array(model, x).codes.tolist()

    nb, shown = explored
    (predict_cell,) = [c for c in nb.cells if "predict" in c.metadata.get("tags", [])]
    printed = "".join(o.text for o in predict_cell.outputs if o.output_type == "stream")
    assert "catalog-semantic-ids@champion is version 1 (models:/m-" in printed, printed
    predicted = shown["predict"]
    assert predicted["item_id"] == ids[:5].tolist()
    assert predicted["predicted"] == nearest[:5]

    # spark_udf over the whole catalog: every item scored; the items the job moved off a collision differ
    # from the table in the last code only (docs/scoring.md)
    moved = int(helpers.issued_codes(model, x, ids).moved.sum())
    assert moved > 0
    assert shown["spark-udf"] == {"items": [N_ITEMS], "same_codes": [N_ITEMS - moved],
                                        "same_prefix": [N_ITEMS]}

