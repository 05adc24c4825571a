"""The updater's pure state machine: every transition and every refusal, without I/O."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from edge_agent.updater.machine import (
    Activate,
    Commit,
    Discard,
    Download,
    NoticeReceived,
    Probation,
    Release,
    Report,
    Restarted,
    Resubmit,
    RollBack,
    RolloutRef,
    Stage,
    StepDone,
    StepFailed,
    UpdateState,
    Verify,
    transition,
)

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)


def release(version: int = 2, sequence: int = 10, **changes: object) -> Release:
    base = Release(
        name="defects",
        version=version,
        sha256="a" * 64,
        size=1000,
        url="http://files/defects-2.bundle",
        sequence=sequence,
        issued_at=NOW - timedelta(minutes=1),
        expires_at=NOW + timedelta(days=1),
    )
    return replace(base, **changes)  # type: ignore[arg-type]


def notice(r: Release, active: int | None = 1, now: datetime = NOW) -> NoticeReceived:
    return NoticeReceived(r, now, active)


def kinds(actions: list[object]) -> list[type]:
    return [type(a) for a in actions]


def test_happy_path_walks_every_phase_and_commits() -> None:
    state, actions = transition(UpdateState(), notice(release()))
    assert state.phase == "downloading" and state.previous_version == 1
    assert kinds(actions) == [Report, Download]
    expected = [
        ("downloading", "verifying", Verify),
        ("verifying", "staging", Stage),
        ("staging", "activating", Activate),
        ("activating", "probation", Probation),
    ]
    for phase, next_phase, action in expected:
        state, actions = transition(state, StepDone(phase))  # type: ignore[arg-type]
        assert state.phase == next_phase
        assert isinstance(actions[-1], action)
    state, actions = transition(state, StepDone("probation"))
    assert state.phase == "committed"
    assert kinds(actions) == [Commit, Report]
    assert actions[1].outcome == "committed"  # type: ignore[attr-defined]
    assert state.last_sequence == 10


@pytest.mark.parametrize(
    ("state", "event", "words"),
    [
        (UpdateState(last_sequence=10), notice(release(sequence=10)), "not newer"),
        (UpdateState(), notice(release(expires_at=NOW - timedelta(seconds=1))), "expired"),
        (UpdateState(), notice(release(version=1)), "already active"),
        (UpdateState(), notice(release(version=1), active=3), "older than the active"),
        (UpdateState(bad_versions=(("defects", 2),)), notice(release()), "already failed"),
    ],
)
def test_refusals_name_their_reason(state: UpdateState, event: NoticeReceived, words: str) -> None:
    new, actions = transition(state, event)
    assert new.phase == state.phase
    [report] = actions
    assert isinstance(report, Report) and words in (report.reason or "")


def test_a_clock_set_back_cannot_revive_an_expired_notice() -> None:
    # The box has seen a notice issued at NOW; its clock is then set back by a week.
    seen = UpdateState(clock_floor=NOW, last_sequence=5)
    stale = release(
        sequence=6, issued_at=NOW - timedelta(days=8), expires_at=NOW - timedelta(days=6)
    )
    new, actions = transition(seen, notice(stale, now=NOW - timedelta(days=7)))
    assert "expired" in (actions[0].reason or "")  # type: ignore[attr-defined]
    assert new.phase == "idle"


def test_a_box_without_a_clock_is_not_frozen() -> None:
    # Clock at 1970: a notice issued "in the future" still goes ahead and moves the floor.
    new, _ = transition(UpdateState(), notice(release(), now=datetime(1970, 1, 1, tzinfo=UTC)))
    assert new.phase == "downloading"
    assert new.clock_floor == release().issued_at


def test_signed_rollback_may_go_back() -> None:
    new, _ = transition(UpdateState(), notice(release(version=1, rollback=True), active=3))
    assert new.phase == "downloading"


def test_a_refused_stale_notice_does_not_move_the_sequence_back() -> None:
    state = UpdateState(last_sequence=20)
    new, actions = transition(state, notice(release(sequence=3)))
    assert new.last_sequence == 20 and actions[0].outcome == "ignored"  # type: ignore[attr-defined]


def test_failure_at_staging_refuses_and_remembers_the_version() -> None:
    state, _ = transition(UpdateState(), notice(release()))
    state, _ = transition(state, StepDone("downloading"))
    state, _ = transition(state, StepDone("verifying"))
    state, actions = transition(state, StepFailed("staging", "golden self-test failed"))
    assert state.phase == "refused" and state.reason == "golden self-test failed"
    assert ("defects", 2) in state.bad_versions
    assert kinds(actions) == [Discard, Report]


def test_a_failed_download_or_verification_does_not_mark_the_version_bad() -> None:
    state, _ = transition(UpdateState(), notice(release()))
    state, _ = transition(state, StepDone("downloading"))
    state, _ = transition(state, StepFailed("verifying", "bad signature"))
    assert state.phase == "refused" and state.bad_versions == ()
    again, _ = transition(state, notice(release(sequence=11)))
    assert again.phase == "downloading"


def test_failure_in_probation_rolls_back_to_the_previous_version() -> None:
    state, _ = transition(UpdateState(), notice(release()))
    for phase in ("downloading", "verifying", "staging", "activating"):
        state, _ = transition(state, StepDone(phase))  # type: ignore[arg-type]
    state, actions = transition(state, StepFailed("probation", "NaN on live traffic"))
    assert state.phase == "rolled_back"
    rollback = actions[0]
    assert isinstance(rollback, RollBack) and rollback.to_version == 1
    assert actions[1].outcome == "rolled_back"  # type: ignore[attr-defined]


def test_network_failures_retry_the_download() -> None:
    state, _ = transition(UpdateState(), notice(release()))
    same, actions = transition(state, StepFailed("downloading", "connection reset", retry=True))
    assert same.phase == "downloading" and isinstance(actions[-1], Download)


def test_restart_resumes_the_step_in_progress() -> None:
    for phase, action in (("downloading", Download), ("verifying", Verify), ("staging", Stage),
                          ("activating", Activate), ("probation", Probation)):  # fmt: skip
        state = UpdateState(phase=phase, release=release(), previous_version=1)  # type: ignore[arg-type]
        same, actions = transition(state, Restarted())
        assert same == state and isinstance(actions[-1], action)
    assert transition(UpdateState(phase="committed"), Restarted()) == (
        UpdateState(phase="committed"),
        [],
    )


def test_a_newer_notice_supersedes_a_download_but_waits_for_probation() -> None:
    state, _ = transition(UpdateState(), notice(release()))
    newer = release(version=3, sequence=11)
    state2, actions = transition(state, notice(newer))
    assert state2.release == newer and kinds(actions)[:2] == [Discard, Report]
    probation = UpdateState(
        phase="probation", release=release(), previous_version=1, last_sequence=10
    )
    waiting, _ = transition(probation, notice(newer, active=2))
    assert waiting.phase == "probation" and waiting.pending == newer
    done, actions = transition(waiting, StepDone("probation"))
    assert done.phase == "committed" and isinstance(actions[-1], Resubmit)


def test_late_events_from_an_old_step_are_ignored() -> None:
    state, _ = transition(UpdateState(), notice(release()))
    assert transition(state, StepDone("staging")) == (state, [])


def test_state_round_trips_through_json() -> None:
    state = UpdateState(
        phase="probation", release=release(), previous_version=1, reason=None, last_sequence=10,
        clock_floor=NOW, bad_versions=(("defects", 7),), pending=release(version=3, sequence=11),
    )  # fmt: skip
    assert UpdateState.from_json(state.to_json()) == state


# --- the fleet rollout a release came with ------------------------------------------------
WAVE = RolloutRef("defects-4", 2)


def reports(actions: list[object]) -> list[Report]:
    return [a for a in actions if isinstance(a, Report)]


def test_every_report_on_a_rollout_release_names_the_rollout() -> None:
    state, actions = transition(UpdateState(), notice(release(rollout=WAVE)))
    seen = reports(actions)
    for phase in ("downloading", "verifying", "staging", "activating"):
        state, actions = transition(state, StepDone(phase))  # type: ignore[arg-type]
        seen += reports(actions)
    probation = state
    _, actions = transition(probation, StepDone("probation"))
    seen += reports(actions)
    _, actions = transition(probation, StepFailed("probation", "self-test failed"))
    seen += reports(actions)
    _, actions = transition(probation, Restarted())
    seen += reports(actions)
    assert {r.outcome for r in seen} == {"progress", "committed", "rolled_back"}
    assert all(r.rollout == WAVE for r in seen)


@pytest.mark.parametrize(
    ("state", "event"),
    [
        (UpdateState(last_sequence=10), notice(release(sequence=10, rollout=WAVE))),
        (UpdateState(), notice(release(rollout=WAVE, expires_at=NOW - timedelta(seconds=1)))),
        (UpdateState(), notice(release(version=1, rollout=WAVE), active=3)),
    ],
)
def test_refusals_of_a_verified_notice_name_its_rollout(
    state: UpdateState, event: NoticeReceived
) -> None:
    _, actions = transition(state, event)
    [report] = reports(actions)
    assert report.outcome in ("refused", "ignored") and report.rollout == WAVE


def test_a_superseded_release_is_reported_with_its_own_rollout() -> None:
    state, _ = transition(UpdateState(), notice(release(rollout=WAVE)))
    other = RolloutRef("defects-5", 1)
    _, actions = transition(state, notice(release(version=3, sequence=11, rollout=other)))
    superseded, started = reports(actions)
    assert (superseded.outcome, superseded.rollout) == ("refused", WAVE)
    assert (started.outcome, started.rollout) == ("progress", other)


def test_a_release_without_a_rollout_reports_none() -> None:
    _, actions = transition(UpdateState(), notice(release()))
    assert [r.rollout for r in reports(actions)] == [None]


def test_the_rollout_is_persisted_and_old_state_files_still_load() -> None:
    state = UpdateState(phase="probation", release=release(rollout=WAVE), last_sequence=10)
    saved = state.to_json()
    assert saved["release"]["rollout"] == {"id": "defects-4", "wave": 2}
    assert UpdateState.from_json(saved) == state
    # A state.json from an agent before 0.2.0: no "rollout" key at all.
    del saved["release"]["rollout"]
    assert UpdateState.from_json(saved).release == release()
