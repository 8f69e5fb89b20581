"""Quality gate: which held-out metrics pass, and failures that name the metric and the flag."""
from __future__ import annotations

import pytest

from pipelines.gate import GateThresholds, gate_failures

THRESHOLDS = GateThresholds(min_utilization=0.5, min_unique_rate=0.9, min_recon_cosine=0.8)
GOOD = {"sample_l1_utilization": 0.9, "sample_l2_utilization": 0.5, "unique_rate": 0.95, "recon_cos_mean": 0.8,
        "l1_nmi": 0.1}  # metrics the gate does not look at are ignored


def test_defaults_match_the_job_flags() -> None:
    assert GateThresholds() == GateThresholds(min_utilization=0.5, min_unique_rate=0.5, min_recon_cosine=0.5)


def test_a_model_at_or_above_every_minimum_passes() -> None:
    assert gate_failures(GOOD, THRESHOLDS, num_levels=2) == []


@pytest.mark.parametrize(("key", "value", "flag"), [
    ("sample_l1_utilization", 0.49, "--gate-min-utilization"),
    ("sample_l2_utilization", 0.0, "--gate-min-utilization"),
    ("unique_rate", 0.8999, "--gate-min-unique-rate"),
    ("recon_cos_mean", -0.2, "--gate-min-recon-cosine"),
    ("unique_rate", float("nan"), "--gate-min-unique-rate"),
])
def test_each_threshold_failure_names_its_metric_and_flag(key, value, flag) -> None:
    failures = gate_failures({**GOOD, key: value}, THRESHOLDS, num_levels=2)
    assert len(failures) == 1
    assert failures[0].startswith(f"{key} = ") and failures[0].endswith(f"({flag})")


def test_failure_shows_the_rounded_value_and_the_minimum() -> None:
    (failure,) = gate_failures({**GOOD, "unique_rate": 0.123456}, THRESHOLDS, num_levels=2)
    assert failure == "unique_rate = 0.1235 < 0.9 (--gate-min-unique-rate)"


def test_a_missing_metric_fails() -> None:
    metrics = {k: v for k, v in GOOD.items() if k != "recon_cos_mean"}
    assert gate_failures(metrics, THRESHOLDS, num_levels=2) == ["recon_cos_mean = None < 0.8 (--gate-min-recon-cosine)"]


def test_every_level_is_checked() -> None:
    failures = gate_failures(GOOD, THRESHOLDS, num_levels=3)  # GOOD has no level-3 utilization
    assert failures == ["sample_l3_utilization = None < 0.5 (--gate-min-utilization)"]
    assert len(gate_failures({}, THRESHOLDS, num_levels=3)) == 5


def test_churn_gate() -> None:
    from pipelines.gate import churn_failure

    assert churn_failure(5, 100, 0.05) is None  # at the limit: passes
    failure = churn_failure(6, 100, 0.05)
    assert failure is not None and "6 of 100" in failure and "--max-id-churn 0.05" in failure
    assert churn_failure(100, 100, None) is None and churn_failure(1, 0, 0.0) is None
