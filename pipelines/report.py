"""Self-contained HTML + JSON report of a :class:`~pipelines.prefix_stats.PrefixSummary` (no Spark).

The HTML file has no external resources: plots are PNG images inlined as base64 ``data:`` URIs
(matplotlib's Agg canvas, used directly so no global pyplot backend is touched), styles are inline,
and every piece of text is escaped with :func:`html.escape`.

With :class:`SampleLabels` (the job's ``--label-col``), each top prefix also lists a few labels of its
items (e.g. ``6_19_32: Parmigiano · Pecorino · Mozzarella``), in the HTML tables and in the JSON.
"""
from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

if TYPE_CHECKING:  # report.py only reads attributes; importing prefix_stats would import pyspark
    from pipelines.prefix_stats import LevelUsage, PrefixSummary

REPORT_HTML = "prefix_report.html"
SUMMARY_JSON = "prefix_summary.json"

_STYLE = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em 0; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f3f3f3; } td.key, th.key { text-align: left; }
td.labels { text-align: left; max-width: 40em; }
img { max-width: 100%; }
"""
LABEL_SEPARATOR = " · "  # between the sample labels of one prefix in the HTML (labels may hold commas)


@dataclass(frozen=True)
class SampleLabels:
    """A few labels of the items under each top prefix (never used for IDs).

    Attributes:
        column: the catalog column they come from (``--label-col``), shown in the headings.
        by_prefix: prefix -> labels, in the order to show them (a missing prefix shows none).
        chosen_by: how the labels were chosen, shown beside them (e.g. "smallest quantization_error first").
    """

    column: str
    by_prefix: Mapping[str, Sequence[str]]
    chosen_by: str = ""

    def of(self, prefix: str) -> list[str]:
        return [str(label) for label in self.by_prefix.get(prefix, ())]

    def to_dict(self, summary: PrefixSummary) -> dict[str, Any]:
        """JSON-able: the column, how they were chosen, and per top prefix of ``summary`` its labels."""
        return {"column": self.column, "chosen_by": self.chosen_by,
                "prefixes": [{"level": p.level, "prefix": p.prefix, "labels": self.of(p.prefix)}
                             for p in summary.top_prefixes]}


def render_html(summary: PrefixSummary, title: str, extra: dict[str, Any] | None = None,
                drift: dict[str, Any] | None = None, comparison: dict[str, Any] | None = None,
                labels: SampleLabels | None = None) -> str:
    """One self-contained HTML page describing ``summary``.

    Sections: run details (``extra`` as a key/value table), overall metrics, per-level metrics,
    code usage per level (bar chart of items per code, most used first), group-size histogram (log
    scale) and the top prefixes of each level.

    Args:
        summary: the statistics to show.
        title: page title and heading (escaped).
        extra: optional details such as model name/version, run id, table locations (escaped).
        drift: optional ``pipelines.drift.Drift.to_dict()`` of the run: a "Drift" section with the
            ID counts, the share of items whose prefix changed per level and the largest flows.
        comparison: the same against another table (``--compare-to``): a "Comparison" section.
        labels: optional sample labels: one more column in the top-prefix tables (escaped).

    Returns:
        The HTML document as a string.
    """
    parts = [
        f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{_esc(title)}</title>",
        f"<style>{_STYLE}</style></head><body>\n<h1>{_esc(title)}</h1>",
    ]
    if extra:
        parts += ["<h2>Run</h2>", _table(["key", "value"], list(extra.items()), key_columns=2)]
    parts += ["<h2>Overall</h2>", _table(["metric", "value"], _overall_rows(summary))]
    parts += ["<h2>Per level</h2>", _level_table(summary.levels)]
    parts += ["<h2>Code usage per level</h2>", _img(_usage_figure(summary.levels), "code usage per level")]
    parts += ["<h2>Collision group sizes</h2>",
              _img(_histogram_figure(summary.group_size_histogram), "group-size histogram")]
    parts += ["<h2>Top prefixes</h2>", _top_prefix_tables(summary, labels)]
    if drift is not None:
        parts += _drift_section("Drift", drift)
    if comparison is not None:
        parts += _drift_section("Comparison", comparison)
    parts.append("</body></html>\n")
    return "\n".join(parts)


def write_report(
    summary: PrefixSummary, out_dir: str | Path, title: str, extra: dict[str, Any] | None = None,
    drift: dict[str, Any] | None = None, comparison: dict[str, Any] | None = None,
    labels: SampleLabels | None = None,
) -> dict[str, str]:
    """Write ``prefix_report.html`` and ``prefix_summary.json`` into ``out_dir`` (created if needed).

    The JSON holds ``{"title": ..., "extra": {...}, "summary": summary.to_dict()}`` (and ``"drift"``,
    ``"comparison"`` when given, and ``"sample_labels"``: :meth:`SampleLabels.to_dict`); values of
    ``extra`` that JSON cannot hold are written as strings.

    Returns:
        ``{"html": path, "json": path}``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    html_path, json_path = out / REPORT_HTML, out / SUMMARY_JSON
    html_path.write_text(render_html(summary, title, extra, drift, comparison, labels), encoding="utf-8")
    document = {"title": title, "extra": extra or {}, "summary": summary.to_dict()}
    document.update({k: v for k, v in (("drift", drift), ("comparison", comparison)) if v is not None})
    if labels is not None:
        document["sample_labels"] = labels.to_dict(summary)
    json_path.write_text(json.dumps(document, indent=2, default=str, allow_nan=False), encoding="utf-8")
    return {"html": str(html_path), "json": str(json_path)}


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value: Any) -> str:
    """Floats with 4 significant decimals, everything else as str."""
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _table(headers: Sequence[str], rows: Iterable[Sequence[Any]], key_columns: int = 1,
           text_last: bool = False) -> str:
    """An escaped HTML table; the first ``key_columns`` columns are left-aligned (and, with ``text_last``,
    the last one, as wrapping text)."""
    def cells(values: Sequence[Any], tag: str) -> str:
        opening = [f'<{tag} class="key">' if i < key_columns else f"<{tag}>" for i in range(len(values))]
        if text_last and values:
            opening[-1] = f'<{tag} class="labels">' if tag == "td" else f'<{tag} class="key">'
        return "".join(f"{o}{_esc(_fmt(v))}</{tag}>" for o, v in zip(opening, values))

    body = "\n".join(f"<tr>{cells(row, 'td')}</tr>" for row in rows)
    return f"<table>\n<tr>{cells(headers, 'th')}</tr>\n{body}\n</table>"


def _overall_rows(s: PrefixSummary) -> list[tuple[str, Any]]:
    names = ("n_items", "distinct_tuples", "unique_rate", "collision_rate", "items_in_collisions",
             "max_group_size", "suffix_budget", "suffix_overflow", "num_levels", "codebook_size")
    return [(name, getattr(s, name)) for name in names]


def _level_table(levels: Sequence[LevelUsage]) -> str:
    headers = ["level", "codebook_size", "used_codes", "utilization", "dead_codes", "entropy",
               "perplexity", "gini"]
    return _table(headers, [[getattr(u, h) for h in headers] for u in levels])


def _top_prefix_tables(s: PrefixSummary, labels: SampleLabels | None = None) -> str:
    fields = ["prefix", "item_count", "children", "collision_groups", "max_suffix"]
    headers = fields + ([f"sample {labels.column}"] if labels else [])
    out = []
    if labels:
        how = f" ({labels.chosen_by})" if labels.chosen_by else ""
        out.append(f"<p>Sample values of the catalog column {_esc(labels.column)} per prefix{_esc(how)}.</p>")
    for level in range(1, s.num_levels + 1):
        rows = [[getattr(p, h) for h in fields] + ([LABEL_SEPARATOR.join(labels.of(p.prefix))] if labels else [])
                for p in s.top_prefixes if p.level == level]
        out += [f"<h3>Level {level}</h3>", _table(headers, rows, text_last=labels is not None)]
    return "\n".join(out)


def _drift_section(heading: str, drift: dict[str, Any]) -> list[str]:
    """Drift against another tokenization: ID counts, prefix changes per level, largest flows."""
    counts = [(k, drift[k]) for k in ("against", "compared", "ids_changed", "churn", "ids_added", "ids_retired")]
    levels = [(level, n, share) for level, (n, share) in
              enumerate(zip(drift["prefix_changed"], drift["prefix_changed_share"]), start=1)]
    flows = [(f["level"], f["old_prefix"], f["new_prefix"], f["items"]) for f in drift["flows"]]
    return [f"<h2>{_esc(heading)}</h2>", _table(["metric", "value"], counts),
            _table(["level", "items whose prefix changed", "share"], levels),
            "<h3>Largest flows</h3>", _table(["level", "old prefix", "new prefix", "items"], flows, key_columns=3)]


def _img(fig: Figure, alt: str) -> str:
    """The figure as an inline ``<img>`` with a base64 PNG data URI."""
    buffer = io.BytesIO()
    FigureCanvasAgg(fig)
    fig.savefig(buffer, format="png", dpi=100, metadata={"Software": None})
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f'<img alt="{_esc(alt)}" src="data:image/png;base64,{data}">'


def _usage_figure(levels: Sequence[LevelUsage]) -> Figure:
    """One bar chart per level: items per code, codes sorted from most to least used."""
    fig = Figure(figsize=(9, 2.4 * max(len(levels), 1)), layout="constrained")
    for row, usage in enumerate(levels, start=1):
        ax = fig.add_subplot(len(levels), 1, row)
        counts = sorted(usage.counts, reverse=True)
        ax.stairs(counts, fill=True, color="#4c72b0")  # one polygon: fast even for K = 4096 bars
        ax.set_title(f"level {usage.level}: {usage.used_codes}/{usage.codebook_size} codes used, "
                     f"perplexity {usage.perplexity:.1f}, gini {usage.gini:.3f}", fontsize=10)
        ax.set_xlabel("code rank (most used first)")
        ax.set_ylabel("items")
        ax.set_xlim(0, len(counts))
    return fig


def _histogram_figure(histogram: Sequence[tuple[int, int]]) -> Figure:
    """Number of tuples per group size on a log scale (sizes too when the largest group exceeds 100)."""
    fig = Figure(figsize=(9, 3.2), layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    sizes, tuples = [size for size, _ in histogram], [n for _, n in histogram]
    if sizes and max(sizes) > 100:  # bars get unreadable over wide ranges: markers on log-log axes
        ax.plot(sizes, tuples, "o", color="#dd8452")
        ax.set_xscale("log")
    else:
        ax.bar(sizes, tuples, width=0.8, color="#dd8452")
    ax.set_yscale("log")
    ax.set_xlabel("items sharing one full code tuple (group size)")
    ax.set_ylabel("tuples (log)")
    return fig
