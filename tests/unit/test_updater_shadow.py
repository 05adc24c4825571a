"""Shadow notices on the box: the pure rules of the "shadowing" phase and the critical-extension
rule, then the runner against fakes (install without activating, shadow, no second download)."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

from edge_agent import __version__
from edge_agent.engine.shadow import ShadowRunner
from edge_agent.metrics import AgentMetrics
from edge_agent.updater.machine import (
    Activate,
    Discard,
    Download,
    NoticeReceived,
    Release,
    Report,
    Restarted,
    StartShadow,
    StepDone,
    StepFailed,
    StopShadow,
    UpdateState,
    transition,
)
from edge_bundle.profiles import load_profile
from tests.unit.device_fakes import FakePublisher, wait_until
from tests.unit.test_updater_runner import (
    NOTICE_TOPIC,
    URL,
    FakeModels,
    Fleet,
    fleet,  # noqa: F401 (the fixture)
    outcomes,
    updater_for,
)
from tests.update_support import signed_notice

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
SHADOW = {"critical": ["shadow"], "shadow": {"max_s": 600}}


def release(version: int = 2, sequence: int = 10, **changes: Any) -> Release:
    base = Release(
        name="defects",
        version=version,
        sha256="a" * 64,
        size=1000,
        url="http://files/defects-2.bundle",
        sequence=sequence,
        issued_at=NOW - timedelta(minutes=1),
        expires_at=NOW + timedelta(days=1),
        critical=("shadow",),
        shadow_s=600.0,
    )
    return replace(base, **changes)


def staged(r: Release) -> UpdateState:
    state, _ = transition(UpdateState(), NoticeReceived(r, NOW, 1))
    for phase in ("downloading", "verifying"):
        state, _ = transition(state, StepDone(phase))  # type: ignore[arg-type]
    assert state.phase == "staging"
    return state


def kinds(actions: list[Any]) -> list[type]:
    return [type(a) for a in actions]


# ---- the pure rules -----------------------------------------------------------------------
def test_a_shadow_notice_shadows_after_staging_instead_of_activating() -> None:
    state, actions = transition(staged(release()), StepDone("staging"))
    assert state.phase == "shadowing" and state.busy
    assert kinds(actions) == [Report, StartShadow]
    assert (actions[0].phase, actions[0].outcome) == ("shadowing", "progress")


def test_shadowing_ends_after_max_s_and_keeps_the_version_installed() -> None:
    state, _ = transition(staged(release()), StepDone("staging"))
    state, actions = transition(state, StepDone("shadowing"))
    assert state.phase == "shadowed" and not state.busy
    assert kinds(actions) == [StopShadow, Report]  # no Discard: it stays in the store
    assert (actions[1].phase, actions[1].outcome) == ("shadowed", "progress")
    assert "600 s" in actions[1].reason


def test_a_newer_notice_stops_the_shadow_and_starts_without_discarding() -> None:
    shadowing, _ = transition(staged(release()), StepDone("staging"))
    activate = release(sequence=11, critical=(), shadow_s=None)
    state, actions = transition(shadowing, NoticeReceived(activate, NOW, 1))
    assert state.phase == "downloading" and state.release == activate
    assert kinds(actions) == [StopShadow, Report, Report, Download]
    ended = actions[1]
    assert (ended.phase, ended.outcome, ended.sequence) == ("shadowed", "progress", 10)
    assert "superseded by sequence 11" in ended.reason
    assert Discard not in kinds(actions)
    # The activating release then goes through staging to activation, as usual.
    for phase in ("downloading", "verifying"):
        state, _ = transition(state, StepDone(phase))  # type: ignore[arg-type]
    state, actions = transition(state, StepDone("staging"))
    assert state.phase == "activating" and isinstance(actions[-1], Activate)


def test_a_shadow_that_cannot_start_is_refused_but_not_marked_bad() -> None:
    shadowing, _ = transition(staged(release()), StepDone("staging"))
    state, actions = transition(shadowing, StepFailed("shadowing", "nothing to shadow"))
    assert state.phase == "refused" and state.bad_versions == ()
    assert kinds(actions) == [StopShadow, Discard, Report]


def test_a_restart_while_shadowing_shadows_again() -> None:
    shadowing, _ = transition(staged(release()), StepDone("staging"))
    state, actions = transition(shadowing, Restarted())
    assert state == shadowing and kinds(actions) == [Report, StartShadow]


def test_a_notice_naming_an_unknown_critical_extension_is_refused() -> None:
    odd = release(critical=("quorum",), shadow_s=None)
    state, actions = transition(UpdateState(), NoticeReceived(odd, NOW, 1))
    assert state.phase == "idle" and state.last_sequence == 10
    [report] = actions
    assert report.outcome == "refused"  # type: ignore[union-attr]
    assert report.reason == (  # type: ignore[union-attr]
        f"this notice needs the 'quorum' extension, which agent {__version__} does not "
        "understand; upgrade the agent"
    )


def test_shadow_fields_survive_the_state_file() -> None:
    state, _ = transition(staged(release()), StepDone("staging"))
    again = UpdateState.from_json(state.to_json())
    assert again == state
    old = state.to_json()
    for key in ("critical", "shadow_s"):
        del old["release"][key]  # a state.json from agent 0.2.0
    assert UpdateState.from_json(old).release == replace(release(), critical=(), shadow_s=None)


# ---- the runner ---------------------------------------------------------------------------
class FakeLane:
    def close_later(self, classifier: Any) -> None:
        classifier.close()


def test_a_shadow_notice_installs_without_activating_then_a_later_notice_activates(
    fleet: Fleet,  # noqa: F811
) -> None:
    models = FakeModels(fleet.settings, fleet.store, load_profile(fleet.settings.profile))
    publisher = FakePublisher()
    updater = updater_for(fleet, models, publisher)
    runner = ShadowRunner(FakeLane(), AgentMetrics())  # type: ignore[arg-type]
    updater.shadow = runner
    shadow_notice = signed_notice(fleet.key, fleet.update.path, URL, sequence=1, extensions=SHADOW)

    async def scenario() -> None:
        await updater.start()
        await updater.on_notice(NOTICE_TOPIC, shadow_notice)
        await wait_until(lambda: ("shadowing", "progress") in outcomes(publisher), "shadowing")
        await wait_until(lambda: "defects" in runner.shadows, "the shadow runner started")
        assert runner.shadows["defects"].candidate.version == 2
        assert fleet.store.active_version("defects") == 1
        assert fleet.store.versions("defects") == [1, 2]
        assert not models.activated  # installed, shadowing with the staged classifier
        await updater.on_notice(NOTICE_TOPIC, fleet.notice(sequence=2))
        await wait_until(
            lambda: any(r["outcome"] == "committed" for r in publisher.updates), "committed"
        )
        await updater.stop()

    asyncio.run(scenario())
    assert "defects" not in runner.shadows  # stopped when the newer notice came
    assert fleet.store.active_version("defects") == 2
    assert [str(r.url) for r in fleet.requests] == [URL]  # downloaded once, for the shadow
    reports = publisher.updates
    ended = next(r for r in reports if r["phase"] == "shadowed")
    assert ended["sequence"] == 1 and "superseded by sequence 2" in ended["reason"]
    assert outcomes(publisher)[-1] == ("committed", "committed")
    activations = [call for call in models.calls if call[0] == "activate"]
    assert activations == [("activate", "defects", 2, "update", True)]


def test_an_agent_without_a_shadow_runner_refuses_the_shadow(fleet: Fleet) -> None:  # noqa: F811
    models = FakeModels(fleet.settings, fleet.store, load_profile(fleet.settings.profile))
    publisher = FakePublisher()
    updater = updater_for(fleet, models, publisher)
    notice = signed_notice(fleet.key, fleet.update.path, URL, sequence=1, extensions=SHADOW)

    async def scenario() -> None:
        await updater.start()
        await updater.on_notice(NOTICE_TOPIC, notice)
        await wait_until(
            lambda: any(r["outcome"] == "refused" for r in publisher.updates), "refused"
        )
        await updater.stop()

    asyncio.run(scenario())
    assert outcomes(publisher)[-1] == ("shadowing", "refused")
    assert "cannot shadow" in publisher.updates[-1]["reason"]
    assert fleet.store.active_version("defects") == 1
    assert fleet.store.versions("defects") == [1]
