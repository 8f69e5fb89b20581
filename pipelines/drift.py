"""Drift between two tokenizations of one catalog: how many IDs and prefixes moved, and where to.

Two sources of the same measurement:

* a run against the table it updates (:func:`drift_of_plan`): the plan already holds every item whose
  ID changes, with its old and new codes, and the counts, so nothing but those pairs is read;
* two tables (``--compare-to``, :func:`compare_tables`): the active rows of both, joined on
  ``item_id``.

Definitions (one each, as in docs/metrics.md):

* ``compared``: items that hold an ID in both tokenizations.
* ``ids_changed``: of those, items whose ``semantic_id`` differs; ``churn`` = ids_changed / compared.
* ``prefix_changed[l-1]``: of those, items whose level-``l`` prefix (first ``l`` codes) differs.
* ``ids_added``: IDs the newer tokenization issued (new items and moved ones); ``ids_retired``: IDs of
  the older one no longer active in the newer one.
* ``flows``: per level the largest groups of items that moved from one prefix to another.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import reduce
from typing import Any

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from pipelines.ledger import Plan
from pipelines.schema import ACTIVE, CODES, ITEM_ID, LEVEL, SEMANTIC_ID
from pipelines.uniquify import code_prefix, require_columns

OLD_CODES, NEW_CODES = "old_codes", "new_codes"
OLD_PREFIX, NEW_PREFIX, ITEMS = "old_prefix", "new_prefix", "items"
METRIC, VALUE = "metric", "value"


@dataclass(frozen=True)
class Flow:
    """``items`` items moved from ``old_prefix`` to ``new_prefix`` at ``level``."""

    level: int
    old_prefix: str
    new_prefix: str
    items: int


@dataclass(frozen=True)
class Drift:
    """Drift of one tokenization against an older one (see the module docstring)."""

    against: str
    compared: int
    ids_changed: int
    ids_added: int
    ids_retired: int
    prefix_changed: tuple[int, ...]
    flows: tuple[Flow, ...]

    @property
    def churn(self) -> float:
        return self.ids_changed / self.compared if self.compared else 0.0

    def prefix_changed_share(self) -> list[float]:
        return [n / self.compared if self.compared else 0.0 for n in self.prefix_changed]

    def metrics(self) -> dict[str, float]:
        """Flat metrics for MLflow: drift_id_churn, drift_l<l>_prefix_changed_share, counts."""
        out = {"drift_compared": float(self.compared), "drift_ids_changed": float(self.ids_changed),
               "drift_ids_added": float(self.ids_added), "drift_ids_retired": float(self.ids_retired),
               "drift_id_churn": self.churn}
        for level, share in enumerate(self.prefix_changed_share(), start=1):
            out[f"drift_l{level}_prefix_changed_share"] = share
        return out

    def rows(self) -> list[dict[str, Any]]:
        """The ``drift`` table: one row per metric, level (null for the whole ID) and, for flows, prefixes."""
        def row(metric: str, value: float, level: int | None = None, old: str | None = None,
                new: str | None = None) -> dict[str, Any]:
            return {METRIC: metric, LEVEL: level, OLD_PREFIX: old, NEW_PREFIX: new, VALUE: float(value)}

        out = [row("compared", self.compared), row("ids_changed", self.ids_changed), row("id_churn", self.churn),
               row("ids_added", self.ids_added), row("ids_retired", self.ids_retired)]
        for level, (n, share) in enumerate(zip(self.prefix_changed, self.prefix_changed_share()), start=1):
            out += [row("prefix_changed", n, level), row("prefix_changed_share", share, level)]
        out += [row("flow", f.items, f.level, f.old_prefix, f.new_prefix) for f in self.flows]
        return out

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "churn": self.churn, "prefix_changed_share": self.prefix_changed_share()}


AGAINST = "against"
DRIFT_SCHEMA = (f"{AGAINST} string, {METRIC} string, {LEVEL} int, {OLD_PREFIX} string, {NEW_PREFIX} string, "
                f"{VALUE} double")


def level_changes(pairs: DataFrame, num_levels: int, top_n: int = 10) -> tuple[tuple[int, ...], tuple[Flow, ...]]:
    """Per level, items whose prefix differs, and the ``top_n`` largest (old prefix -> new prefix) flows.

    Args:
        pairs: ``old_codes`` and ``new_codes`` ARRAY<INT> of each compared item whose codes may differ
            (items with equal codes may be left out: they change no prefix).
        num_levels: L (prefixes of levels 1..L are compared).
    """
    per_level = [
        F.struct(F.lit(level).alias(LEVEL), code_prefix(level, OLD_CODES).alias(OLD_PREFIX),
                 code_prefix(level, NEW_CODES).alias(NEW_PREFIX))
        for level in range(1, num_levels + 1)
    ]
    moved = pairs.select(F.inline(F.array(*per_level))).where(F.col(OLD_PREFIX) != F.col(NEW_PREFIX))
    flows = moved.groupBy(LEVEL, OLD_PREFIX, NEW_PREFIX).agg(F.count(F.lit(1)).alias(ITEMS))
    totals = {int(r[LEVEL]): int(r[ITEMS]) for r in flows.groupBy(LEVEL).agg(F.sum(ITEMS).alias(ITEMS)).collect()}
    order = [F.col(ITEMS).desc(), F.col(OLD_PREFIX).asc(), F.col(NEW_PREFIX).asc()]
    top = reduce(DataFrame.unionByName, [flows.where(F.col(LEVEL) == level).orderBy(*order).limit(top_n)
                                         for level in range(1, num_levels + 1)]).collect()
    ranked = sorted((Flow(int(r[LEVEL]), r[OLD_PREFIX], r[NEW_PREFIX], int(r[ITEMS])) for r in top),
                    key=lambda f: (f.level, -f.items, f.old_prefix, f.new_prefix))
    return tuple(totals.get(level, 0) for level in range(1, num_levels + 1)), tuple(ranked)


def drift_of_plan(plan: Plan, top_n: int = 10) -> Drift:
    """Drift of a run's result against the table version it started from (read from the plan)."""
    counts = plan.counts
    if counts.ids_changed:
        prefix_changed, flows = level_changes(plan.pairs().select(OLD_CODES, NEW_CODES), plan.num_levels, top_n)
    else:  # no active ID is replaced (a first run, most scheduled runs): no pair, and no Spark job to find none
        prefix_changed, flows = (0,) * plan.num_levels, ()
    against = "no previous table" if plan.previous is None else (
        f"previous table ({plan.previous.describe()})")
    return Drift(against=against, compared=counts.compared, ids_changed=counts.ids_changed,
                 ids_added=counts.issued, ids_retired=counts.retired, prefix_changed=prefix_changed, flows=flows)


def compare_tables(old: DataFrame, new: DataFrame, num_levels: int | None, against: str, top_n: int = 10) -> Drift:
    """Drift of semantic-ID table ``new`` against ``old`` (their active rows; a table without the
    ``active`` column counts every row as active). ``num_levels`` None reads L from ``new``."""
    def current(df: DataFrame, which: str) -> DataFrame:
        require_columns(df, (ITEM_ID, SEMANTIC_ID, CODES), f"compare_tables({which})")
        return df.where(F.col(ACTIVE)) if ACTIVE in df.columns else df

    a = current(old, f"--compare-to {against}").select(ITEM_ID, F.col(SEMANTIC_ID).alias("old_id"),
                                                       F.col(CODES).alias(OLD_CODES))
    b = current(new, "the new table").select(ITEM_ID, F.col(SEMANTIC_ID).alias("new_id"), F.col(CODES).alias(NEW_CODES))
    both = a.join(b, ITEM_ID, "full_outer")
    counted = both.agg(
        F.sum((F.col("old_id").isNotNull() & F.col("new_id").isNotNull()).cast("long")).alias("compared"),
        F.sum((F.col("old_id") != F.col("new_id")).cast("long")).alias("changed"),
        F.sum(F.col("old_id").isNull().cast("long")).alias("added_items"),
        F.sum(F.col("new_id").isNull().cast("long")).alias("retired_items"),
    ).first()
    assert counted is not None
    changed = int(counted["changed"] or 0)
    if num_levels is None:
        first = b.select(F.size(NEW_CODES)).first()
        num_levels = int(first[0]) if first else 0
    pairs = both.where(F.col("old_id") != F.col("new_id")).select(OLD_CODES, NEW_CODES)
    prefix_changed, flows = level_changes(pairs, num_levels, top_n)
    return Drift(against=against, compared=int(counted["compared"] or 0), ids_changed=changed,
                 ids_added=int(counted["added_items"] or 0) + changed,
                 ids_retired=int(counted["retired_items"] or 0) + changed,
                 prefix_changed=prefix_changed, flows=flows)


def drift_table(spark: Any, drifts: list[Drift]) -> DataFrame:
    """The ``drift`` table's rows as a DataFrame (schema :data:`DRIFT_SCHEMA`): each drift's rows, with
    what it was measured against (the table version the run started from; a ``--compare-to`` table)."""
    rows = [(d.against, *(r[c] for c in (METRIC, LEVEL, OLD_PREFIX, NEW_PREFIX, VALUE))) for d in drifts
            for r in d.rows()]
    return spark.createDataFrame(rows, DRIFT_SCHEMA)
