"""render_html / write_report on a hand-built summary (no Spark), and the sample labels per top prefix
(``--label-col``): their HTML/JSON on a hand-built summary, and how the Spark stage chooses them."""
from __future__ import annotations

import json
import re

import pytest

from pipelines.prefix_stats import (
    LABEL_MAX_CHARS,
    LevelUsage,
    PrefixRow,
    PrefixSummary,
    catalog_labels,
    check_label_column,
    sample_labels,
)
from pipelines.report import REPORT_HTML, SUMMARY_JSON, SampleLabels, render_html, write_report
from pipelines.validate import SchemaError


def _usage(level: int, counts: tuple[int, ...], perplexity: float) -> LevelUsage:
    used = sum(c > 0 for c in counts)
    return LevelUsage(level=level, codebook_size=len(counts), used_codes=used, utilization=used / len(counts),
                      dead_codes=len(counts) - used, entropy=0.6, perplexity=perplexity, gini=0.8,
                      counts=counts)


SUMMARY = PrefixSummary(
    n_items=7, distinct_tuples=4, unique_rate=4 / 7, collision_rate=3 / 7, items_in_collisions=5 / 7,
    max_group_size=3, suffix_budget=2, suffix_overflow=1, num_levels=2, codebook_size=8,
    levels=(_usage(1, (0, 5, 0, 0, 0, 0, 0, 2), 1.8), _usage(2, (0, 0, 6, 0, 0, 1, 0, 0), 1.5)),
    group_size_histogram=((1, 2), (2, 1), (3, 1)),
    top_prefixes=(PrefixRow(1, "1", 5, 2, 1, 2), PrefixRow(1, "7", 2, 1, 1, 1),
                  PrefixRow(2, "1_2", 4, 2, 1, 2), PrefixRow(2, "<b>odd</b>", 2, 1, 1, 1)),
)
EXTRA = {"model_name": "rqvae <catalog>", "model_version": 3, "table": "s3://bucket/semantic_ids"}


def test_html_is_self_contained_with_plots():
    page = render_html(SUMMARY, title="Prefix report & <stats>", extra=EXTRA)
    assert "http://" not in page and "https://" not in page
    assert not re.search(r"""(src|href)=["'](?!data:)""", page)  # every resource is inline
    assert page.count('src="data:image/png;base64,') == 2  # code usage + group-size histogram
    assert "<title>Prefix report &amp; &lt;stats&gt;</title>" in page


def test_html_shows_tables_and_escapes_text():
    page = render_html(SUMMARY, title="t", extra=EXTRA)
    assert "rqvae &lt;catalog&gt;" in page and "s3://bucket/semantic_ids" in page
    assert "&lt;b&gt;odd&lt;/b&gt;" in page and "<b>odd</b>" not in page
    assert "<h3>Level 1</h3>" in page and "<h3>Level 2</h3>" in page
    for text in ("unique_rate", "0.5714", "suffix_overflow", "perplexity", "gini", "1_2", "collision_groups"):
        assert text in page


def test_html_without_extra_has_no_run_table():
    assert "<h2>Run</h2>" not in render_html(SUMMARY, title="t")


def test_write_report_files_and_json_round_trip(tmp_path):
    out = tmp_path / "report"
    paths = write_report(SUMMARY, out, title="t", extra=EXTRA)
    assert paths == {"html": str(out / REPORT_HTML), "json": str(out / SUMMARY_JSON)}
    document = json.loads((out / SUMMARY_JSON).read_text(encoding="utf-8"))
    assert document["title"] == "t" and document["extra"] == EXTRA
    assert PrefixSummary.from_dict(document["summary"]) == SUMMARY
    assert "data:image/png;base64," in (out / REPORT_HTML).read_text(encoding="utf-8")


# --- sample labels ----------------------------------------------------------------------------------

LABELS = SampleLabels("title <t>", {"1": ["Parmigiano", "<script>alert(1)</script>", "A & B"], "1_2": ["Brie"],
                                    "not-shown": ["x"]}, chosen_by="smallest error first")


def test_html_lists_escaped_sample_labels_per_top_prefix():
    page = render_html(SUMMARY, title="t", labels=LABELS)
    assert "<script>" not in page and "A & B" not in page
    assert page.count("<th class=\"key\">sample title &lt;t&gt;</th>") == 2  # a column in both levels' tables
    row = re.search(r"<tr><td class=\"key\">1</td>(<td>[^<]*</td>){4}<td class=\"labels\">([^<]*)</td></tr>", page)
    assert row and row.group(2) == "Parmigiano · &lt;script&gt;alert(1)&lt;/script&gt; · A &amp; B"
    assert re.search(r"<td class=\"key\">1_2</td>(<td>[^<]*</td>){4}<td class=\"labels\">Brie</td>", page)
    assert re.search(r"<td class=\"key\">7</td>(<td>[^<]*</td>){4}<td class=\"labels\"></td>", page)  # none
    assert "not-shown" not in page  # only the top prefixes the report shows
    assert "(smallest error first)" in page


def test_json_lists_sample_labels_in_top_prefix_order(tmp_path):
    write_report(SUMMARY, tmp_path, title="t", labels=LABELS)
    document = json.loads((tmp_path / SUMMARY_JSON).read_text(encoding="utf-8"))
    assert document["sample_labels"] == {"column": "title <t>", "chosen_by": "smallest error first", "prefixes": [
        {"level": 1, "prefix": "1", "labels": ["Parmigiano", "<script>alert(1)</script>", "A & B"]},
        {"level": 1, "prefix": "7", "labels": []},
        {"level": 2, "prefix": "1_2", "labels": ["Brie"]},
        {"level": 2, "prefix": "<b>odd</b>", "labels": []}]}
    assert PrefixSummary.from_dict(document["summary"]) == SUMMARY  # the statistics are unchanged


def test_without_labels_there_is_no_label_column_or_key(tmp_path):
    write_report(SUMMARY, tmp_path, title="t")
    assert "sample_labels" not in json.loads((tmp_path / SUMMARY_JSON).read_text(encoding="utf-8"))
    page = (tmp_path / REPORT_HTML).read_text(encoding="utf-8")
    assert 'class="labels"' not in page and "<th class=\"key\">sample" not in page


# item, codes, quantization_error, active; labels by item (None: no label row at all)
LABELLED = [
    ("a", [1, 2, 3], 0.30, True, "Parmigiano"),
    ("b", [1, 2, 3], 0.10, True, "  Pecorino \n Romano  "),  # whitespace collapsed
    ("c", [1, 2, 4], 0.10, True, "Mozzarella"),  # same error as b: ties by item_id (b < c)
    ("d", [1, 5, 3], 0.05, False, "Retired cheese"),  # inactive: never shown
    ("e", [1, 5, 3], 0.01, True, None),  # no label: skipped
    ("f", [1, 5, 3], 0.02, True, "   "),  # blank: skipped
    ("g", [1, 2, 4], 0.90, True, "x" * (LABEL_MAX_CHARS + 5)),  # cut
    ("h", [7, 2, 3], 0.50, True, None),
]


@pytest.mark.spark
def test_sample_labels_order_filters_and_cut(spark):
    sids = spark.createDataFrame([(i, c, e, a) for i, c, e, a, _ in LABELLED],
                                 "item_id string, codes array<int>, quantization_error float, active boolean")
    catalog = spark.createDataFrame([(i, label, [0.0]) for i, _, _, _, label in LABELLED],
                                    "id string, title string, embedding array<float>")
    top = [PrefixRow(1, "1", 6, 2, 0, 0), PrefixRow(1, "7", 1, 1, 0, 0), PrefixRow(2, "1_2", 4, 2, 0, 0),
           PrefixRow(2, "1_5", 2, 1, 0, 0), PrefixRow(3, "1_2_4", 2, 2, 0, 0)]
    found = sample_labels(sids, catalog_labels(catalog, "id", "title"), top, per_prefix=3)
    cut = "x" * (LABEL_MAX_CHARS - 1) + "…"
    assert found == {
        "1": ("Pecorino Romano", "Mozzarella", "Parmigiano"),  # errors 0.10 (b), 0.10 (c), 0.30 (a)
        "7": (),  # its only item has no label
        "1_2": ("Pecorino Romano", "Mozzarella", "Parmigiano"),
        "1_5": (),  # d is retired, e and f have none
        "1_2_4": ("Mozzarella", cut),
    }
    assert sample_labels(sids, catalog_labels(catalog, "id", "title"), top, per_prefix=1)["1"] == ("Pecorino Romano",)


@pytest.mark.spark
def test_integer_ids_match_the_tables_bigint_ids(spark):
    sids = spark.createDataFrame([(5, [1, 2], 0.1)], "item_id bigint, codes array<int>, quantization_error float")
    catalog = spark.createDataFrame([(5, "Gouda")], "sku int, name string")
    assert sample_labels(sids, catalog_labels(catalog, "sku", "name"), [PrefixRow(1, "1", 1, 1, 0, 0)]) == {
        "1": ("Gouda",)}


@pytest.mark.spark
def test_a_missing_or_non_string_label_column_names_the_flag(spark):
    catalog = spark.createDataFrame([("a", 3, ["x"])], "item_id string, price int, tags array<string>")
    with pytest.raises(SchemaError, match=r"column 'title' not found in the catalog \(columns: item_id, price, "
                                          r"tags\); name the right column with --label-col"):
        check_label_column(catalog, "title")
    for column, kind in (("price", "int"), ("tags", "array<string>")):
        with pytest.raises(SchemaError, match=rf"column '{column}' has type {re.escape(kind)}, expected STRING; "
                                              r".*name another column with --label-col"):
            catalog_labels(catalog, "item_id", column)
