"""The HTML report people open: a tiny job run with ``--label-col`` writes it, and headless Chromium opens it.

One module-scoped training run (400 items, 16-d, the tiny model) on a catalog whose ``title`` column holds
markup (``<img ... onerror=...>``, ``&``): the report lists each top prefix's sample titles, chosen as the
job documents (smallest quantization_error, then item_id), checked here against the tables read with
delta-rs; the titles change no ID. Chromium (Debian's ``chromium``, installed by
``tests/chromium_render.py`` when missing and root) then loads the report and must see no broken image,
no console error and no exception, and the titles as text (escaped, so the markup in them never runs).
A deliberately broken copy of the report proves the check fails when it should.
"""
from __future__ import annotations

import html
import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import chromium_render
import helpers
import numpy as np
import pyarrow as pa
import pytest
from chromium_render import Browser, ChromiumMissing

from pipelines.demo import TITLE, catalog_to_arrow
from pipelines.prefix_stats import LABELS_PER_PREFIX, display_label
from pipelines.report import LABEL_SEPARATOR, REPORT_HTML, SUMMARY_JSON
from pipelines.schema import SEMANTIC_ID_COLUMNS, SEMANTIC_IDS_TABLE, prefix_column
from rqvae import load_checkpoint
from rqvae.synthetic import CatalogSpec, make_catalog

pytestmark = [pytest.mark.spark, pytest.mark.usefixtures("job_isolation")]

N_ITEMS, DIM, LEVELS = 400, 16, 3
MODEL = "csid-report-test"
# Markup in every title: escaped, it shows as text; unescaped, it would add a broken image and a console error.
HOSTILE = ' <img src="x.png" onerror="console.error(\'title ran\')"> & co'


@pytest.fixture(scope="module")
def catalog(tmp_path_factory) -> tuple[Path, pa.Table]:
    table = catalog_to_arrow(make_catalog(CatalogSpec(n_items=N_ITEMS, dim=DIM, seed=4)), titles=True)
    titles = [f"{t}{HOSTILE}" for t in table.column(TITLE).to_pylist()]
    table = table.set_column(table.column_names.index(TITLE), TITLE, pa.array(titles, pa.string()))
    path = helpers.write_delta(tmp_path_factory.mktemp("catalog") / "catalog", table)
    return path, table


@pytest.fixture(scope="module")
def run(catalog, tmp_path_factory) -> dict[str, Any]:
    work = tmp_path_factory.mktemp("work")
    rc, out, err = helpers.run_main([
        "--input", catalog[0], "--work-dir", work, "--label-col", TITLE, "--model-name", MODEL,
        "--experiment", MODEL, "--sample-size", "400", "--shuffle-partitions", "2", *helpers.SMALL_MODEL,
        *helpers.GATE_OFF])
    assert rc == 0, f"the run failed (rc {rc}):\n{err[-4000:]}\n{out[-2000:]}"
    report = work / "tables" / "report"
    return {"work": work, "out": out, "report": report,
            "json": json.loads((report / SUMMARY_JSON).read_text(encoding="utf-8"))}


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    try:
        binary = chromium_render.ensure_chromium()
    except ChromiumMissing as e:
        pytest.fail(str(e), pytrace=False)
    with Browser(binary) as b:
        yield b


# --- sample labels in a real report ------------------------------------------------------------------------

def expected_labels(sids: pa.Table, catalog: pa.Table, prefix: str) -> list[str]:
    """The titles the job must show for ``prefix``: its items by (quantization_error, item_id), first few."""
    level = prefix.count("_") + 1
    title = dict(zip(catalog.column("item_id").to_pylist(), catalog.column(TITLE).to_pylist()))
    rows = [r for r in sids.to_pylist() if r["active"] and r[prefix_column(level)] == prefix]
    rows.sort(key=lambda r: (r["quantization_error"], r["item_id"]))
    return [display_label(title[r["item_id"]]) for r in rows[:LABELS_PER_PREFIX]]


def test_report_lists_sample_titles_of_every_top_prefix(run, catalog) -> None:
    sids = helpers.read_delta(run["work"] / "tables" / SEMANTIC_IDS_TABLE)
    document = run["json"]
    labels = document["sample_labels"]
    assert labels["column"] == TITLE and "quantization_error" in labels["chosen_by"]
    top = document["summary"]["top_prefixes"]
    assert [(p["level"], p["prefix"]) for p in labels["prefixes"]] == [(p["level"], p["prefix"]) for p in top]
    assert {p["level"] for p in top} == {1, 2, 3}
    for shown, stats in zip(labels["prefixes"], top):
        assert len(shown["labels"]) == min(LABELS_PER_PREFIX, stats["item_count"]), shown
        assert shown["labels"] == expected_labels(sids, catalog[1], shown["prefix"]), shown["prefix"]
    page = (run["report"] / REPORT_HTML).read_text(encoding="utf-8")
    first = labels["prefixes"][0]
    assert f'<td class="labels">{html.escape(LABEL_SEPARATOR.join(first["labels"]))}</td>' in page
    assert "<img src=\"x.png\"" not in page  # the titles' markup is never markup in the page
    assert re.search(rf"sample '{TITLE}' values for {len(top)} of {len(top)} top prefixes", run["out"])


def test_titles_change_no_id(run, catalog) -> None:
    sids = helpers.read_delta(run["work"] / "tables" / SEMANTIC_IDS_TABLE)
    assert sids.column_names == [*SEMANTIC_ID_COLUMNS, *(prefix_column(lv) for lv in range(1, LEVELS + 1))]
    run_id = sids.column("mlflow_run_id")[0].as_py()
    model = load_checkpoint((run["work"] / "checkpoints" / f"{run_id}.pt").read_bytes())
    ids = catalog[1].column("item_id").to_pylist()
    x = np.stack(catalog[1].column("embedding").to_numpy(zero_copy_only=False)).astype(np.float32)
    expected = helpers.issued_codes(model, x, ids)  # the model's codes from the embeddings alone
    rows = helpers.by_item(sids)
    np.testing.assert_array_equal(np.array([rows[i]["codes"] for i in ids], dtype=np.int32), expected.codes)
    assert helpers.assert_suffix_contract(list(rows.values())) == len({tuple(r["codes"]) for r in rows.values()})


@pytest.mark.parametrize(("column", "message"), [
    ("name", "column 'name' not found in the catalog (columns: item_id, embedding, category, title); name the "
             "right column with --label-col"),
    ("category", "column 'category' has type array<string>, expected STRING; convert it (e.g. CAST(category AS "
                 "STRING) in a view) or name another column with --label-col"),
])
def test_a_bad_label_column_fails_at_start_naming_the_flag(catalog, tmp_path, column, message) -> None:
    rc, out, err = helpers.run_main(["--input", catalog[0], "--work-dir", tmp_path, "--label-col", column,
                                     *helpers.SMALL_MODEL])
    assert rc == 2, err[-3000:]
    assert message in err and "Traceback" not in err, err[-3000:]
    assert "==> train" not in out and "==> sample" not in out  # before any training
    assert not (tmp_path / "tables" / SEMANTIC_IDS_TABLE).exists() and not (tmp_path / "checkpoints").exists()


def test_help_explains_the_label_column() -> None:
    from jobs.tokenize_catalog import build_parser

    text = " ".join(build_parser().format_help().split())
    assert "--label-col LABEL_COL optional STRING column" in text
    assert "smallest quantization_error" in text and "never changes an ID" in text and "(exit 2)" in text


# --- the report in a browser -------------------------------------------------------------------------------

def test_report_renders_in_chromium_without_errors(run, browser) -> None:
    page = browser.render(run["report"] / REPORT_HTML)
    assert page.errors == [], "\n".join(page.errors)
    assert page.title == f"Semantic IDs: {MODEL}"
    assert [img["alt"] for img in page.images] == ["code usage per level", "group-size histogram"]
    assert all(img["width"] >= 400 and img["height"] >= 200 for img in page.images), page.images
    assert all(url.startswith(("file:", "data:")) for url in page.requests), page.requests  # self-contained
    first = run["json"]["sample_labels"]["prefixes"][0]
    assert LABEL_SEPARATOR.join(first["labels"]) in page.text  # the titles, markup and all, as text
    assert page.text.count(HOSTILE.strip()) >= LABELS_PER_PREFIX


def test_the_render_check_catches_a_broken_report(run, browser, tmp_path) -> None:
    copy = tmp_path / "broken" / REPORT_HTML
    copy.parent.mkdir()
    html = (run["report"] / REPORT_HTML).read_text(encoding="utf-8")
    assert html.count('src="data:image/png;base64,iVBOR') == 2
    html = html.replace('src="data:image/png;base64,iVBOR', 'src="data:image/png;base64,AAAA', 1)  # corrupt plot
    html = html.replace("</body>", '<img alt="lost plot" src="plots/usage.png">\n'  # a local file that is missing
                        "<script>console.error('report script failed');</script>\n"
                        "<script>window.reportData.levels.forEach(Boolean);</script>\n</body>")
    copy.write_text(html, encoding="utf-8")
    page = browser.render(copy)
    errors = "\n".join(page.errors)
    assert "image did not load (naturalWidth 0): src='data:image/png;base64,AAAA" in errors
    assert "alt='code usage per level'" in errors
    missing = (copy.parent / "plots" / "usage.png").as_uri()
    assert f"image did not load (naturalWidth 0): src='{missing}' alt='lost plot'" in errors
    assert f"load failed: net::ERR_FILE_NOT_FOUND {missing}" in errors
    assert "console.error: report script failed" in errors
    assert re.search(r"uncaught exception: TypeError: Cannot read properties of undefined \(reading 'levels'\)",
                     errors), errors
    assert len(page.errors) >= 5
    # the intact report still passes in the same browser: the failures above are the copy's
    shutil.copy(run["report"] / REPORT_HTML, copy)
    assert browser.render(copy).errors == []
