"""The rollout's pure state machine: waves, deadlines, soak, gates, rollbacks and every command in
every state, without I/O."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from fleet_controller.errors import ConflictError, FleetError
from fleet_controller.machine import (
    Audit,
    Command,
    EvaluateGates,
    GatesEvaluated,
    MarkTimedOut,
    Policy,
    RolloutState,
    SendNotices,
    SendRollbacks,
    Tick,
    View,
    start,
    transition,
)

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
POLICY = Policy(waves=3, soak_s=600, deadline_s=3600, rollback_on_halt=True)
PASS = ({"name": "install", "status": "pass", "value": 0.0, "threshold": 0.2},)
FAIL = (
    {"name": "install", "status": "pass", "value": 0.0, "threshold": 0.2},
    {
        "name": "p95",
        "status": "fail",
        "value": 2.1,
        "threshold": 1.5,
        "detail": "p95 ratio 2.1 > 1.5",
    },
)
INSUFFICIENT = ({"name": "p95", "status": "insufficient", "value": None, "threshold": 1.5},)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def state(**changes: Any) -> RolloutState:
    return replace(start(POLICY, T0), **changes)


def kinds(actions: list[Any]) -> list[type]:
    return [type(action) for action in actions]


def audits(actions: list[Any]) -> list[Audit]:
    return [action for action in actions if isinstance(action, Audit)]


def command(name: str, now: datetime = T0, why: str = "") -> Command:
    return Command(name, "alice", why, now)


# ---- waves --------------------------------------------------------------------------------
def test_a_new_rollout_runs_its_first_wave_sending() -> None:
    fresh = start(POLICY, T0)
    assert (fresh.status, fresh.wave, fresh.phase, fresh.phase_since) == (
        "running",
        1,
        "sending",
        T0,
    )
    with pytest.raises(FleetError, match="at least one wave"):
        start(replace(POLICY, waves=0), T0)


def test_sendable_boxes_get_notices_and_the_wave_installs() -> None:
    new, actions = transition(state(), Tick(at(1), View(sendable=("a/1", "a/2"))))
    assert actions == [SendNotices(1, ("a/1", "a/2"))]
    assert new.phase == "installing" and new.phase_since == at(1)


def test_a_closed_window_keeps_the_wave_sending() -> None:
    new, actions = transition(state(), Tick(at(1), View(sendable=("a/1",), waiting=2)))
    assert actions == [SendNotices(1, ("a/1",))]
    assert new.phase == "sending"
    # Nothing sendable, still waiting: nothing happens, whatever the boxes in flight do.
    again, actions = transition(new, Tick(at(2), View(waiting=2, final=1)))
    assert (again, actions) == (new, [])


def test_installing_waits_for_every_box_then_soaks() -> None:
    installing = state(phase="installing")
    view = View(in_flight=(("a/1", at(0)),), final=2)
    assert transition(installing, Tick(at(10), view)) == (installing, [])
    new, actions = transition(installing, Tick(at(20), View(final=3)))
    assert (new.phase, new.soak_until) == ("soaking", at(20 + 600))
    assert [a.what for a in audits(actions)] == ["wave-installed"]


def test_an_unpublished_notice_never_times_out() -> None:
    installing = state(phase="installing")
    view = View(in_flight=(("a/1", None),), final=2)
    assert transition(installing, Tick(at(10**6), view)) == (installing, [])


def test_a_silent_box_times_out_at_its_deadline_and_never_blocks() -> None:
    installing = state(phase="installing")
    view = View(in_flight=(("a/1", at(0)), ("a/2", at(100))), final=1)
    assert transition(installing, Tick(at(3599), view)) == (installing, [])
    new, actions = transition(installing, Tick(at(3600), view))
    assert actions == [MarkTimedOut(("a/1",))]
    assert new == installing
    new, actions = transition(installing, Tick(at(3700), view))
    assert actions[0] == MarkTimedOut(("a/1", "a/2"))
    assert new.phase == "soaking"
    assert audits(actions)[0].figures == {"final": 3, "timed_out_now": 2}


def test_soak_ends_in_gating_which_asks_for_gates_again_after_a_restart() -> None:
    soaking = state(phase="soaking", soak_until=at(600))
    assert transition(soaking, Tick(at(599), View(final=3))) == (soaking, [])
    gating, actions = transition(soaking, Tick(at(600), View(final=3)))
    assert gating.phase == "gating" and actions == [EvaluateGates(1)]
    assert transition(gating, Tick(at(700), View(final=3))) == (gating, [EvaluateGates(1)])


def test_zero_soak_goes_from_installed_to_gating_in_one_tick() -> None:
    installing = state(phase="installing", policy=replace(POLICY, soak_s=0))
    new, actions = transition(installing, Tick(at(5), View(final=3)))
    assert new.phase == "gating"
    assert kinds(actions) == [Audit, EvaluateGates]


# ---- gates --------------------------------------------------------------------------------
def test_passing_gates_start_the_next_wave() -> None:
    gating = state(phase="gating")
    new, actions = transition(gating, GatesEvaluated(1, PASS, at(5)))
    assert (new.status, new.wave, new.phase, new.phase_since) == ("running", 2, "sending", at(5))
    assert new.gate_results == PASS
    assert audits(actions)[0].what == "wave-passed"


def test_insufficient_gates_do_not_halt() -> None:
    new, _ = transition(state(phase="gating"), GatesEvaluated(1, INSUFFICIENT, at(5)))
    assert (new.status, new.wave) == ("running", 2)


def test_the_last_wave_passing_completes_the_rollout() -> None:
    gating = state(phase="gating", wave=3)
    new, actions = transition(gating, GatesEvaluated(3, PASS, at(9)))
    assert (new.status, new.finished_at) == ("completed", at(9))
    assert audits(actions)[0].what == "completed"
    assert transition(new, Tick(at(10), View(sendable=("a/9",)))) == (new, [])


def test_a_failed_gate_halts_with_its_figures_and_rolls_back() -> None:
    new, actions = transition(state(phase="gating"), GatesEvaluated(1, FAIL, at(5)))
    assert new.status == "rolling_back"
    assert (
        new.halt_reason is not None and "p95" in new.halt_reason and "2.1 > 1.5" in new.halt_reason
    )
    halted, rolling = audits(actions)
    assert (halted.what, halted.actor) == ("halted", "rule:p95")
    assert halted.figures["gates"] == [dict(result) for result in FAIL]
    assert (rolling.what, rolling.actor) == ("rolling-back", "rule:p95")


def test_a_failed_gate_only_halts_without_the_rollback_policy() -> None:
    gating = state(phase="gating", policy=replace(POLICY, rollback_on_halt=False))
    new, actions = transition(gating, GatesEvaluated(1, FAIL, at(5)))
    assert new.status == "halted"
    assert [a.what for a in audits(actions)] == ["halted"]
    # A halted rollout sends nothing; it still marks silent boxes timed out.
    view = View(sendable=("a/5",), in_flight=(("a/1", at(0)),))
    assert transition(new, Tick(at(4000), view)) == (new, [MarkTimedOut(("a/1",))])


def test_gate_results_that_no_longer_matter_are_ignored() -> None:
    for stale in (
        state(phase="soaking"),
        state(phase="gating", wave=2),
        state(phase="gating", status="paused"),
    ):
        assert transition(stale, GatesEvaluated(1, FAIL, at(5))) == (stale, [])


# ---- rolling back -------------------------------------------------------------------------
def test_rolling_back_sends_rollbacks_and_ends_when_each_is_final_or_timed_out() -> None:
    rolling = state(status="rolling_back", phase="gating")
    new, actions = transition(rolling, Tick(at(1), View(rollback_sendable=("a/1", "a/2"))))
    assert actions == [SendRollbacks(("a/1", "a/2"))] and new == rolling
    view = View(rollback_in_flight=(("a/1", at(1)), ("a/2", at(1))))
    assert transition(rolling, Tick(at(2), view)) == (rolling, [])
    new, actions = transition(rolling, Tick(at(3601), view))
    assert new.status == "rolled_back" and new.finished_at == at(3601)
    assert actions[0] == MarkTimedOut(("a/1", "a/2"), rollback=True)
    assert audits(actions)[0].what == "rolled-back"


def test_rolling_back_nothing_ends_at_once() -> None:
    new, _ = transition(state(status="rolling_back"), Tick(at(1), View(rollback_final=2)))
    assert new.status == "rolled_back"


def test_rolling_back_never_sends_release_notices() -> None:
    rolling = state(status="rolling_back")
    _, actions = transition(rolling, Tick(at(1), View(sendable=("a/3",), rollback_final=1)))
    assert not any(isinstance(action, SendNotices) for action in actions)


# ---- commands -----------------------------------------------------------------------------
def test_pause_sends_nothing_and_resume_goes_on() -> None:
    paused, actions = transition(state(), command("pause", why="line stop"))
    assert (paused.status, paused.paused_from) == ("paused", "running")
    assert audits(actions) == [Audit("paused", "line stop", "alice")]
    view = View(sendable=("a/1",), in_flight=(("a/2", at(0)),))
    assert transition(paused, Tick(at(4000), view)) == (paused, [MarkTimedOut(("a/2",))])
    resumed, actions = transition(paused, command("resume"))
    assert (resumed.status, resumed.paused_from) == ("running", None)
    assert audits(actions)[0].why == "resume asked by alice"
    _, actions = transition(resumed, Tick(at(4001), View(sendable=("a/1",))))
    assert actions == [SendNotices(1, ("a/1",))]


def test_cancel_stops_without_rolling_back() -> None:
    for status in ("running", "paused", "halted"):
        new, actions = transition(state(status=status), command("cancel", at(3)))
        assert (new.status, new.finished_at) == ("cancelled", at(3))
        assert [a.what for a in audits(actions)] == ["cancelled"]
        assert transition(
            new, Tick(at(4), View(sendable=("a/1",), rollback_sendable=("a/2",)))
        ) == (new, [])


def test_an_operator_halt_follows_the_rollback_policy() -> None:
    new, actions = transition(state(), command("halt", why="complaints"))
    assert (new.status, new.halt_reason) == ("rolling_back", "complaints")
    assert [(a.what, a.actor) for a in audits(actions)] == [
        ("halted", "alice"),
        ("rolling-back", "alice"),
    ]
    keep = state(
        policy=replace(POLICY, rollback_on_halt=False), status="paused", paused_from="running"
    )
    new, _ = transition(keep, command("halt"))
    assert (new.status, new.paused_from) == ("halted", None)


def test_rollback_is_allowed_after_completion_and_cancellation() -> None:
    for status in ("running", "paused", "halted", "completed", "cancelled"):
        new, actions = transition(state(status=status, finished_at=at(1)), command("rollback"))
        assert (new.status, new.finished_at) == ("rolling_back", None)
        assert audits(actions)[0].what == "rolling-back"


@pytest.mark.parametrize(
    ("status", "name", "hint"),
    [
        ("completed", "resume", "only a paused rollout can be resumed"),
        ("running", "resume", "only a paused rollout can be resumed"),
        ("halted", "resume", "only a paused rollout can be resumed"),
        ("paused", "pause", "only a running rollout can be paused"),
        ("completed", "pause", "only a running rollout can be paused"),
        ("rolling_back", "cancel", "only a running, paused or halted rollout can be cancelled"),
        ("completed", "cancel", "only a running, paused or halted rollout can be cancelled"),
        ("halted", "halt", "only a running or paused rollout can be halted"),
        ("cancelled", "halt", "only a running or paused rollout can be halted"),
        ("rolling_back", "rollback", "already rolling back or rolled back"),
        ("rolled_back", "rollback", "already rolling back or rolled back"),
    ],
)
def test_commands_the_state_forbids_are_conflicts(status: str, name: str, hint: str) -> None:
    with pytest.raises(ConflictError, match=hint) as caught:
        transition(state(status=status), command(name))
    assert f"cannot {name} a rollout that is {status.replace('_', ' ')}" in caught.value.message


def test_an_unknown_command_names_the_known_ones() -> None:
    with pytest.raises(FleetError, match="pause, resume, cancel, halt, rollback"):
        transition(state(), command("restart"))


# ---- persistence --------------------------------------------------------------------------
def test_the_state_round_trips_through_json() -> None:
    full = state(
        status="paused",
        wave=2,
        phase="soaking",
        soak_until=at(600),
        paused_from="running",
        halt_reason="x",
        gate_results=FAIL,
        finished_at=at(9),
    )
    assert RolloutState.from_json(full.to_json()) == full
    assert RolloutState.from_json(start(POLICY, T0).to_json()) == start(POLICY, T0)
