"""Gate figures: the install ratio, the quality medians over boxes, the counted gates, and
`insufficient` wherever the sample is too small to judge."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import pytest

from fleet_controller.gates import (
    BoxPair,
    GateResult,
    error_rate,
    errors_gate,
    evaluate,
    failed,
    install_gate,
    p95_gate,
    quality_gates,
)
from fleet_controller.plan import GatesSpec

SPEC = GatesSpec()


@dataclass(frozen=True)
class FakeSample:
    """What the registry's ModelSample carries, as far as the gates read it."""

    version: int = 1
    p95: float | None = 10.0
    samples: int | None = 100
    outcomes: Mapping[str, int] = field(default_factory=lambda: {"ok": 100})
    selftest_ok: bool | None = True
    drift_alert: bool | None = False


def pair(
    ref: str,
    *,
    old_p95: float = 10.0,
    new_p95: float = 10.0,
    old_errors: int = 0,
    new_errors: int = 0,
    samples: int = 100,
    selftest_ok: bool | None = True,
    drift_alert: bool | None = False,
) -> BoxPair:
    old = FakeSample(1, old_p95, samples, {"ok": samples, "internal_error": old_errors})
    new = FakeSample(
        2, new_p95, samples, {"ok": samples, "overloaded": new_errors}, selftest_ok, drift_alert
    )
    return BoxPair(ref, old, new)


def by_name(results: list[GateResult]) -> dict[str, GateResult]:
    return {result.name: result for result in results}


# --- install --------------------------------------------------------------------------------


def test_install_gate_passes_within_the_ratio() -> None:
    result = install_gate({"committed": 9, "refused": 1, "timed_out": 4, "sent": 7}, SPEC)
    assert (result.status, result.value, result.sample, result.needed) == ("pass", 0.1, 10, 3)
    assert result.threshold == 0.2
    assert "1 of 10 finished installs failed (1 refused, 0 rolled back)" in result.detail
    assert "4 timed out, not counted" in result.detail
    assert "10.0%, within the limit of 20.0%" in result.detail


def test_install_gate_fails_over_the_ratio_counting_rollbacks() -> None:
    result = install_gate({"committed": 3, "refused": 1, "rolled_back": 1}, SPEC)
    assert result.status == "fail"
    assert result.value == pytest.approx(0.4)
    assert "over the limit of 20.0%" in result.detail


def test_install_gate_at_exactly_the_ratio_passes() -> None:
    assert install_gate({"committed": 4, "refused": 1}, SPEC).status == "pass"


def test_install_gate_is_insufficient_below_min_installs() -> None:
    result = install_gate({"refused": 2, "timed_out": 10, "pending": 40}, SPEC)
    assert (result.status, result.value, result.sample, result.needed) == (
        "insufficient",
        1.0,
        2,
        3,
    )
    assert "at least 3 finished installs are needed" in result.detail
    nothing = install_gate({}, SPEC)
    assert (nothing.status, nothing.value, nothing.sample) == ("insufficient", None, 0)


def test_timed_out_boxes_never_fail_the_install_gate() -> None:
    result = install_gate({"committed": 3, "timed_out": 100}, SPEC)
    assert (result.status, result.value) == ("pass", 0.0)


# --- p95 and errors -------------------------------------------------------------------------


def test_p95_gate_takes_the_median_ratio_over_boxes() -> None:
    pairs = [
        pair("a/1", new_p95=11),  # 1.1
        pair("a/2", new_p95=30),  # 3.0, an outlier the median ignores
        pair("b/1", new_p95=12),  # 1.2
    ]
    result = p95_gate(pairs, SPEC)
    assert result.status == "pass"
    assert result.value == pytest.approx(1.2)
    assert (result.sample, result.needed, result.threshold) == (3, 2, 1.5)
    assert "1.20x, within the limit of 1.50x" in result.detail


def test_p95_gate_fails_when_the_median_box_is_slower() -> None:
    pairs = [pair("a/1", new_p95=16), pair("a/2", new_p95=20)]
    result = p95_gate(pairs, SPEC)
    assert result.status == "fail"
    assert result.value == pytest.approx(1.8)


def test_p95_gate_counts_only_boxes_with_enough_samples_of_both_versions() -> None:
    thin_new = BoxPair("c/1", FakeSample(), FakeSample(version=2, p95=50.0, samples=49))
    thin_old = BoxPair("c/2", FakeSample(samples=10), FakeSample(version=2, p95=50.0))
    no_old = BoxPair("c/3", None, FakeSample(version=2, p95=50.0))
    no_new = BoxPair("c/4", FakeSample(), None)
    no_p95 = BoxPair("c/5", FakeSample(p95=None), FakeSample(version=2, p95=50.0))
    result = p95_gate([thin_new, thin_old, no_old, no_new, no_p95, pair("d/1", new_p95=50)], SPEC)
    assert (result.status, result.sample, result.needed) == ("insufficient", 1, 2)
    assert result.value == pytest.approx(5.0)
    assert "1 boxes have enough telemetry" in result.detail
    assert "2 are needed" in result.detail


def test_error_rate_is_everything_not_ok_over_all_requests() -> None:
    sample = FakeSample(outcomes={"ok": 90, "overloaded": 6, "invalid_image": 4})
    assert error_rate(sample) == pytest.approx(0.1)
    assert error_rate(FakeSample(outcomes={})) is None


def test_errors_gate_fails_on_the_median_increase() -> None:
    # Rates of new minus old on 100 ok requests each: +0.0, +0.048, +0.091.
    pairs = [pair("a/1"), pair("a/2", new_errors=5), pair("a/3", new_errors=10)]
    result = errors_gate(pairs, SPEC)
    assert result.status == "fail"
    assert result.value == pytest.approx(5 / 105)
    assert "+4.8%, over the limit of +2.0%" in result.detail


def test_errors_gate_passes_when_the_old_version_was_as_bad() -> None:
    pairs = [pair("a/1", old_errors=10, new_errors=10), pair("a/2", old_errors=20, new_errors=5)]
    result = errors_gate(pairs, SPEC)
    assert result.status == "pass"
    assert result.value is not None and result.value < 0


def test_a_version_that_answers_nothing_still_trips_the_errors_gate() -> None:
    """Requests, not answered latencies, decide whether a box has enough telemetry."""
    broken = FakeSample(version=2, p95=None, samples=0, outcomes={"internal_error": 80})
    pairs = [BoxPair("a/1", FakeSample(), broken), BoxPair("a/2", FakeSample(), broken)]
    results = by_name(quality_gates(pairs, SPEC))
    assert results["errors"].status == "fail"
    assert results["errors"].value == pytest.approx(1.0)
    assert results["p95"].status == "insufficient"


def test_errors_gate_is_insufficient_below_min_boxes() -> None:
    spec = GatesSpec(min_boxes=3, min_samples=10)
    result = errors_gate([pair("a/1", new_errors=50), pair("a/2", new_errors=50)], spec)
    assert (result.status, result.sample, result.needed) == ("insufficient", 2, 3)


# --- self-test and drift --------------------------------------------------------------------


def test_selftest_and_drift_count_boxes_on_the_new_version() -> None:
    pairs = [
        pair("a/1", selftest_ok=False),
        pair("a/2", drift_alert=True),
        pair("a/3", selftest_ok=None, drift_alert=None),  # not reported yet
        BoxPair("a/4", FakeSample(selftest_ok=False, drift_alert=True), None),  # old only
    ]
    results = by_name(quality_gates(pairs, SPEC))
    selftest, drift = results["selftest"], results["drift"]
    assert (selftest.status, selftest.value, selftest.threshold, selftest.sample) == (
        "fail",
        1.0,
        0.0,
        2,
    )
    assert "1 of 2 boxes reporting on the new version failed its self-test (a/1)" in selftest.detail
    assert (drift.status, drift.value, drift.sample) == ("fail", 1.0, 2)
    assert "(a/2)" in drift.detail


def test_selftest_and_drift_allow_what_the_plan_allows() -> None:
    spec = GatesSpec(max_selftest_failures=1, max_drift_alerts=2)
    pairs = [pair("a/1", selftest_ok=False, drift_alert=True), pair("a/2", drift_alert=True)]
    results = by_name(quality_gates(pairs, spec))
    assert results["selftest"].status == "pass"
    assert results["drift"].status == "pass"


def test_counted_gates_pass_with_nothing_reported() -> None:
    results = by_name(quality_gates([], SPEC))
    assert results["selftest"].status == "pass" and results["selftest"].sample == 0
    assert results["p95"].status == "insufficient" and results["p95"].value is None


# --- together -------------------------------------------------------------------------------


def test_evaluate_gives_every_gate_in_order_and_failed_picks_the_halting_ones() -> None:
    pairs = [pair("a/1", new_p95=20), pair("b/1", new_p95=21)]
    results = evaluate({"committed": 2}, pairs, SPEC)
    assert [r.name for r in results] == ["install", "p95", "errors", "selftest", "drift"]
    assert [r.status for r in results] == ["insufficient", "fail", "pass", "pass", "pass"]
    assert [r.name for r in failed(results)] == ["p95"]
    assert failed(evaluate({"committed": 5}, [pair("a/1"), pair("b/1")], SPEC)) == []


def test_results_serialise_to_plain_json() -> None:
    result = install_gate({"committed": 3}, SPEC)
    assert result.to_json() == {
        "name": "install",
        "status": "pass",
        "value": 0.0,
        "threshold": 0.2,
        "sample": 3,
        "needed": 3,
        "detail": result.detail,
    }


def test_many_failing_boxes_are_listed_briefly() -> None:
    pairs = [pair(f"s/{index:02d}", selftest_ok=False) for index in range(15)]
    detail = by_name(quality_gates(pairs, SPEC))["selftest"].detail
    assert detail.startswith("15 of 15 boxes")
    assert "s/00, s/01" in detail and ", ..." in detail and "s/14" not in detail
