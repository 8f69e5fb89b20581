"""render_html / write_report on a hand-built summary (no Spark)."""
from __future__ import annotations

import json
import re

from pipelines.prefix_stats import LevelUsage, PrefixRow, PrefixSummary
from pipelines.report import REPORT_HTML, SUMMARY_JSON, render_html, write_report


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
