"""The controller's shadow phase without I/O: the machine's shadow phases, the shadow gates,
the registry's parsing and keeping of shadow telemetry, the shadow notices and the plan."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import Engine

from edge_bundle.release import ReleaseNotice, decode_notice
from edge_bundle.signing import KeyRole, SigningKey, TrustStore
from fleet_controller import db, rollout_tables
from fleet_controller.errors import BadMessageError, FleetError
from fleet_controller.gates import BoxShadow, shadow_gates
from fleet_controller.machine import (
    Audit,
    EvaluateShadowGate,
    GatesEvaluated,
    MarkTimedOut,
    Policy,
    RolloutState,
    SendNotices,
    SendShadowNotices,
    Tick,
    View,
    start,
    transition,
)
from fleet_controller.notices import BundleFacts, build_notice, understands_shadow
from fleet_controller.plan import RolloutPlan, ShadowSpec
from fleet_controller.registry import Registry, parse
from fleet_controller.shadowing import next_state

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
POLICY = Policy(waves=2, soak_s=60, deadline_s=600, rollback_on_halt=True, shadow_soak_s=30)
SPEC = ShadowSpec(soak_s=30, min_compared=100, min_agreement=0.9)
BASE = "lineside/v1/plant-a/box1"


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def gate(status: str) -> tuple[dict[str, Any], ...]:
    return ({"name": "shadow", "status": status, "value": 0.5, "threshold": 0.9,
             "detail": "the candidate agreed on 50 of 100 photos"},)  # fmt: skip


# ---- the machine --------------------------------------------------------------------------
def test_a_wave_with_a_shadow_phase_shadows_soaks_and_gates_before_sending() -> None:
    state = start(POLICY, T0)
    assert state.phase == "shadow_sending"
    state, actions = transition(state, Tick(at(1), View(shadow_sendable=("a/1", "a/2"))))
    assert actions == [SendShadowNotices(1, ("a/1", "a/2"))]
    assert state.phase == "shadow_sending"  # waits until every box shadows
    state, actions = transition(state, Tick(at(2), View(shadow_in_flight=(("a/1", at(1)),))))
    assert actions == [] and state.phase == "shadow_sending"
    state, actions = transition(state, Tick(at(3), View(shadow_final=2)))
    assert state.phase == "shadow_soaking" and state.soak_until == at(33)
    assert [a.what for a in actions if isinstance(a, Audit)] == ["wave-shadowing"]
    state, actions = transition(state, Tick(at(20), View()))
    assert state.phase == "shadow_soaking" and actions == []
    state, actions = transition(state, Tick(at(33), View()))
    assert state.phase == "shadow_gating" and actions == [EvaluateShadowGate(1)]
    state, actions = transition(state, GatesEvaluated(1, gate("pass"), at(34)))
    assert (state.status, state.phase, state.wave) == ("running", "sending", 1)
    assert state.shadow_results == gate("pass")
    assert [a.what for a in actions if isinstance(a, Audit)] == ["shadow-passed"]
    state, actions = transition(state, Tick(at(35), View(sendable=("a/1", "a/2"))))
    assert SendNotices(1, ("a/1", "a/2")) in actions


def test_a_failed_shadow_gate_halts_and_names_the_disagreements() -> None:
    state = RolloutState(policy=POLICY, phase="shadow_gating", phase_since=at(30))
    state, actions = transition(state, GatesEvaluated(1, gate("fail"), at(31)))
    assert state.status == "rolling_back"  # the plan rolls back: nothing of wave 1 was sent
    halted = next(a for a in actions if isinstance(a, Audit) and a.what == "halted")
    assert "while shadowing" in halted.why and "50 of 100 photos" in halted.why
    assert halted.actor == "rule:shadow"
    assert halted.figures["shadow_gates"][0]["status"] == "fail"


def test_the_next_wave_starts_with_its_own_shadow_phase() -> None:
    state = RolloutState(policy=POLICY, phase="gating", phase_since=at(100))
    passed = ({"name": "install", "status": "pass"},)
    state, _ = transition(state, GatesEvaluated(1, passed, at(101)))
    assert (state.wave, state.phase) == (2, "shadow_sending")


def test_shadow_notices_time_out_at_the_deadline() -> None:
    state = start(POLICY, T0)
    view = View(shadow_in_flight=(("a/1", at(0)), ("a/2", None)))
    state, actions = transition(state, Tick(at(600), view))
    assert MarkTimedOut(("a/1",), shadow=True) in actions
    assert state.phase == "shadow_sending"  # a/2 was never acknowledged: no deadline yet


def test_a_state_stored_before_shadow_phases_reads_back() -> None:
    old = start(Policy(1, 60, 600, True), T0).to_json()
    del old["policy"]["shadow_soak_s"], old["shadow_results"]
    again = RolloutState.from_json(old)
    assert again.policy.shadow_soak_s is None and again.phase == "sending"
    shadowed = start(POLICY, T0)
    assert RolloutState.from_json(json.loads(json.dumps(shadowed.to_json()))) == shadowed


# ---- gates --------------------------------------------------------------------------------
def box(
    ref: str, compared: int, agreement: float | None, *pairs: tuple[str, str, int]
) -> BoxShadow:
    return BoxShadow(ref, compared, agreement, tuple(pairs), candidate_p95=6.0, active_p95=4.0)


def test_the_shadow_gate_weighs_agreement_by_photos_and_sums_disagreements() -> None:
    boxes = [
        box("a/1", 100, 0.5, ("ok", "scratch", 40), ("dent", "ok", 10)),
        box("a/2", 300, 0.9, ("ok", "scratch", 30)),
    ]
    [result] = shadow_gates(boxes, SPEC)
    assert result.status == "fail" and result.value == pytest.approx(320 / 400)
    assert result.sample == 400
    figures = result.to_json()["figures"]
    assert figures["disagreements"][:2] == [
        {"active": "ok", "candidate": "scratch", "count": 70},
        {"active": "dent", "candidate": "ok", "count": 10},
    ]
    assert "ok->scratch 70" in result.detail and "80.0%" in result.detail


def test_the_shadow_gate_passes_an_agreeing_candidate() -> None:
    [result] = shadow_gates([box("a/1", 150, 0.98), box("a/2", 50, 1.0)], SPEC)
    assert result.status == "pass" and result.value == pytest.approx(197 / 200)


def test_too_few_compared_photos_fail_the_shadow_gate() -> None:
    [result] = shadow_gates([box("a/1", 40, 1.0), box("a/2", 0, None)], SPEC)
    assert result.status == "fail" and "only 40 photos were compared" in result.detail


def test_the_candidate_p95_gate_when_the_plan_sets_it() -> None:
    spec = ShadowSpec(soak_s=30, min_compared=1, min_agreement=0.5, max_candidate_p95_ratio=1.2)
    _, p95 = shadow_gates([box("a/1", 10, 1.0)], spec)
    assert (p95.name, p95.status, p95.value) == ("shadow_p95", "fail", 1.5)
    assert "figures" not in p95.to_json()


# ---- the registry -------------------------------------------------------------------------
SHADOW = {
    "defects": {
        "candidate": {"version": 2, "bundle_sha256": "ab" * 32},
        "compared": 120,
        "agreement": 0.625,
        "dropped": 3,
        "failed": 0,
        "disagreements": [
            {"active": "ok", "candidate": "scratch", "count": 30},
            {"active": "dent", "candidate": "ok", "count": 15},
        ],
        "candidate_p50_ms": 3.1,
        "candidate_p95_ms": 5.2,
    }
}


def telemetry(shadow: Any) -> bytes:
    body = {"site": "plant-a", "device": "box1", "agent_version": "0.3.0", "models": [
        {"name": "defects", "version": 1, "status": "ready"}], "shadow": shadow}  # fmt: skip
    return json.dumps(body).encode()


def test_shadow_telemetry_is_parsed() -> None:
    message = parse(f"{BASE}/telemetry", telemetry(SHADOW))
    [shadow] = message.shadows  # type: ignore[union-attr]
    assert (shadow.model, shadow.candidate_version, shadow.compared) == ("defects", 2, 120)
    assert shadow.agreement == 0.625 and shadow.candidate_p95 == 5.2
    assert shadow.disagreements == (("ok", "scratch", 30), ("dent", "ok", 15))
    assert parse(f"{BASE}/telemetry", telemetry({})).shadows == ()  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("shadow", "field"),
    [
        ({"defects": {"compared": 3}}, "shadow.defects.candidate"),
        ({"defects": {**SHADOW["defects"], "agreement": 1.5}}, "shadow.defects.agreement"),
        ({"defects": {**SHADOW["defects"], "compared": -1}}, "shadow.defects.compared"),
        ({"defects": {**SHADOW["defects"], "disagreements": [{"active": "ok"}]}},
         "shadow.defects.disagreements[0].candidate"),
    ],
)  # fmt: skip
def test_bad_shadow_telemetry_is_rejected_naming_the_field(shadow: Any, field: str) -> None:
    with pytest.raises(BadMessageError) as caught:
        parse(f"{BASE}/telemetry", telemetry(shadow))
    assert caught.value.reason == "bad_field" and repr(field) in caught.value.message


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    engine = db.connect(f"sqlite:///{tmp_path / 'fleet.db'}")
    db.create_tables(engine)
    yield engine
    engine.dispose()


def test_the_registry_keeps_the_latest_shadow_figures_per_box(engine: Engine) -> None:
    assert rollout_tables.ROLLOUTS.name in db.METADATA.tables
    reg = Registry(engine)
    reg.record(parse(f"{BASE}/telemetry", telemetry(SHADOW)), now=at(0))
    later = {"defects": {**SHADOW["defects"], "compared": 200, "agreement": 0.6}}
    reg.record(parse(f"{BASE}/telemetry", telemetry(later)), now=at(5))
    reg.record(parse(f"{BASE}/telemetry", telemetry({})), now=at(9))  # the shadow stopped
    found = reg.shadow("plant-a", "box1", "defects")
    assert found is not None and (found.compared, found.agreement, found.at) == (200, 0.6, at(5))
    assert found.to_json()["disagreements"][0] == {"active": "ok", "candidate": "scratch",
                                                   "count": 30}  # fmt: skip
    assert reg.shadow("plant-a", "box1", "other") is None


# ---- notices, box states and the plan ------------------------------------------------------
def test_shadow_notices_name_the_critical_shadow_extension() -> None:
    key = SigningKey.generate(KeyRole.RELEASE)
    facts = BundleFacts("defects", 2, "ab" * 32, 1000)
    payload = build_notice(
        facts=facts, url="https://f/d.bundle", site="plant-a", device="box1", sequence=7,
        issued_at=T0, expires_at=at(3600), rollout_id="r", wave=1, rollback=False, v2=True,
        key=key, shadow_max_s=90.0,
    )  # fmt: skip
    notice, _ = decode_notice(payload, TrustStore((key.public,)))
    assert isinstance(notice, ReleaseNotice)
    assert notice.critical == ("shadow",) and notice.shadow is not None
    assert notice.shadow.max_s == 90.0
    with pytest.raises(FleetError, match="schema version 2"):
        build_notice(
            facts=facts, url="https://f/d.bundle", site="plant-a", device="box1", sequence=8,
            issued_at=T0, expires_at=at(3600), rollout_id="r", wave=1, rollback=False,
            v2=False, key=key, shadow_max_s=90.0,
        )  # fmt: skip


@pytest.mark.parametrize(
    ("version", "understood"),
    [("0.3.0", True), ("0.10.1", True), ("0.3.0rc1", False), ("0.2.0", False), (None, False)],
)
def test_only_agents_from_0_3_0_get_shadow_notices(version: str | None, understood: bool) -> None:
    assert understands_shadow(version) is understood


@pytest.mark.parametrize(
    ("current", "phase", "outcome", "expected"),
    [
        ("sent", "downloading", "progress", "progress"),
        ("progress", "shadowing", "progress", "shadowing"),
        ("timed_out", "shadowing", "progress", "shadowing"),
        ("shadowing", "shadowed", "progress", None),  # the shadow ended: still counted
        ("progress", "staging", "refused", "refused"),
        ("sent", "idle", "ignored", "ignored"),
        ("shadowing", "idle", "ignored", None),
    ],
)
def test_box_shadow_states(current: str, phase: str, outcome: str, expected: str | None) -> None:
    assert next_state(current, phase, outcome) == expected


def test_the_plan_reads_its_shadow_table() -> None:
    text = (
        'name = "d"\nbundle = "b.bundle"\nurl = "https://f/b.bundle"\ncohort = { site = "a" }\n'
        "[waves]\ncounts = [1]\ndeadline_s = 600\n[shadow]\nsoak_s = 30\nmin_compared = 50\n"
    )
    plan = RolloutPlan.from_toml(text, Path("/"))
    assert plan.shadow == ShadowSpec(soak_s=30, min_compared=50)
    assert plan.shadow_max_s == 630
    with pytest.raises(FleetError, match=r"shadow\.min_agreement"):
        RolloutPlan.from_toml(text + "min_agreement = 1.5\n", Path("/"))
