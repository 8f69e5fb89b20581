"""Quality gate: thresholds on held-out metrics that decide whether a model becomes champion."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GateThresholds:
    """Minimums a trained model must reach on the held-out sample.

    Attributes:
        min_utilization: every level's share of codes in use over the whole training sample
            (``sample_l<l>_utilization``: a small held-out part cannot show K codes).
        min_unique_rate: distinct full code tuples / items (before suffixes).
        min_recon_cosine: mean cosine between input and reconstruction (``recon_cos_mean``).
    """

    min_utilization: float = 0.5
    min_unique_rate: float = 0.5
    min_recon_cosine: float = 0.5


def gate_failures(metrics: dict[str, float], thresholds: GateThresholds, num_levels: int) -> list[str]:
    """Human-readable failures, empty when the model passes. A missing metric counts as a failure."""
    wanted = [(f"sample_l{lv}_utilization", thresholds.min_utilization, "--gate-min-utilization")
              for lv in range(1, num_levels + 1)]
    wanted += [("unique_rate", thresholds.min_unique_rate, "--gate-min-unique-rate"),
               ("recon_cos_mean", thresholds.min_recon_cosine, "--gate-min-recon-cosine")]
    failures = []
    for key, minimum, flag in wanted:
        value = metrics.get(key)
        if value is None or not value >= minimum:
            failures.append(f"{key} = {value if value is None else round(value, 4)} < {minimum} ({flag})")
    return failures


def churn_failure(ids_changed: int, compared: int, max_churn: float | None) -> str | None:
    """Why a run's ID churn stops it, or None when it may publish.

    Churn is the share of the previously published items (active, and still valid in the catalog)
    whose ``semantic_id`` this run would change (``pipelines.drift``). ``max_churn`` None or 1 lets
    every run through.
    """
    churn = _share_over(ids_changed, compared, max_churn)
    if churn is None:
        return None
    return (f"id churn {churn:.2%} ({ids_changed} of {compared} published items would get another semantic_id) "
            f"is above --max-id-churn {max_churn}")


def away_failure(away: int, compared: int, max_churn: float | None) -> str | None:
    """Why a new generation stops because of the published items its catalog lacks, or None.

    ``away``: items holding IDs of the generation before (active, or retired in it as left the catalog or
    rejected) that are not valid items of its catalog; ``compared``: the active items that are. Within a
    generation such an item keeps its ID and has it back when it returns. A new generation cannot vouch for it:
    back later, it keeps its ID only if the new model, fitted without it, gives it the same codes. So a new
    generation may leave out at most ``max_churn`` of them, as it may change at most that share of the IDs it
    sees (a partial snapshot of the catalog on the day of a retrain, or on the days before it, would otherwise
    pass the churn gate on the few items it holds).
    """
    published = away + compared
    share = _share_over(away, published, max_churn)
    if share is None:
        return None
    return (f"{away} of {published} items with published IDs of the last generation ({share:.2%}) are not valid "
            f"items of this catalog (they left it or were rejected, in this run or earlier), more than --max-id-churn "
            f"{max_churn} allows when a new generation starts: a model fitted without them keeps their IDs when they "
            "come back only where it gives them the same codes")


def _share_over(part: int, whole: int, max_share: float | None) -> float | None:
    """``part / whole`` when it is above ``max_share`` (a gate's limit), else None (also without a limit or a whole)."""
    if max_share is None or whole == 0:
        return None
    share = part / whole
    return share if share > max_share else None
