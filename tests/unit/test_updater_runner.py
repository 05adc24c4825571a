"""The updater's runner against fakes: the network is an `httpx.MockTransport` serving the bundle,
the model lifecycle is a fake that records activations and roll-backs (over a real store and
real signed bundles), and the publisher a fake that records the reports. No agent, no broker."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from edge_agent.device.install import AnyCandidate, Candidate, prepare
from edge_agent.device.store import BundleStore
from edge_agent.engine.selftest import SelfTestReport
from edge_agent.engine.types import ModelState
from edge_agent.metrics import AgentMetrics
from edge_agent.settings import AgentSettings
from edge_agent.updater.runner import Updater
from edge_bundle.profiles import HardwareProfile, load_profile
from edge_bundle.release import Rollout
from edge_bundle.signing import TrustStore
from tests.agent_support import BuiltBundle, Keys, build_bundle, make_keys
from tests.unit.agent_fixtures import agent_settings, clean_environment, store_for
from tests.unit.device_fakes import FakePublisher, wait_until
from tests.update_support import release_key, signed_notice

URL = "https://fleet.example/bundles/defects-2.bundle"
NOTICE_TOPIC = "lineside/v1/plant/box1/release"


@dataclass
class FakeModels:
    """The model lifecycle as the updater sees it; records what the updater asks of it."""

    settings: AgentSettings
    store: BundleStore
    profile: HardwareProfile
    failures_now: int = 0
    fail_after_activation: int = 0  # inference failures on live traffic per look, once active
    activated: bool = False
    previous: ModelState = field(default_factory=lambda: ModelState("ready", "version 1"))
    calls: list[tuple[Any, ...]] = field(default_factory=list)

    async def prepare(
        self, name: str, version: int, *, check_references: bool = False
    ) -> Candidate:
        self.calls.append(("prepare", name, version))
        bundle = self.store.open(name, version)
        return prepare(bundle, self.profile, self.settings.cache_dir)

    async def activate(
        self, candidate: AnyCandidate, *, by: str, keep_previous: bool = False
    ) -> ModelState | None:
        manifest = candidate.bundle.manifest
        self.calls.append(("activate", manifest.name, manifest.version, by, keep_previous))
        self.store.activate(manifest.name, manifest.version)
        self.activated = True
        assert isinstance(candidate, Candidate)
        candidate.classifier.close()
        return self.previous

    async def roll_back(
        self, name: str, to_version: int | None, previous: ModelState | None
    ) -> None:
        self.calls.append(("roll_back", name, to_version, previous))
        if to_version is not None:
            self.store.activate(name, to_version)

    def retire(self, previous: ModelState | None) -> None:
        self.calls.append(("retire", previous))

    def failures(self, name: str) -> int:
        if self.activated:
            self.failures_now += self.fail_after_activation
        return self.failures_now

    def latencies(self, name: str, version: int) -> Sequence[float] | None:
        return None

    async def selftest(self, name: str) -> SelfTestReport | None:
        return None

    def serving_version(self, name: str) -> int | None:
        return self.store.active_version(name)

    def kinds(self) -> list[str]:
        return [call[0] for call in self.calls]


@dataclass
class Fleet:
    """A release key, the device's settings and store, and the bundle the "server" holds."""

    key: Any
    settings: AgentSettings
    store: BundleStore
    update: BuiltBundle
    requests: list[httpx.Request] = field(default_factory=list)

    def transport(self) -> httpx.MockTransport:
        data = self.update.path.read_bytes()

        def handler(request: httpx.Request) -> httpx.Response:
            self.requests.append(request)
            if str(request.url) != URL:
                return httpx.Response(404)
            return httpx.Response(200, content=data, headers={"ETag": '"v2"'})

        return httpx.MockTransport(handler)

    def notice(self, sequence: int = 1) -> bytes:
        return signed_notice(self.key, self.update.path, URL, sequence=sequence)


@pytest.fixture
def fleet(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Fleet:
    clean_environment(monkeypatch)
    keys: Keys = make_keys(tmp_path / "keys")
    key, public = release_key(tmp_path / "keys")
    settings = agent_settings(
        tmp_path / "state",
        keys,
        mqtt_enabled=True,
        site="plant",
        device="box1",
        release_keys=(public,),
        probation_s=0.3,
        update_min_free_mb=0,
    )
    store = store_for(settings.store_dir, keys)
    installed = build_bundle(tmp_path / "dist", keys, version=1)
    store.stage(installed.path)
    store.activate("defects", 1)
    update = build_bundle(tmp_path / "dist", keys, version=2, seed=5)
    return Fleet(key, settings, store, update)


def updater_for(fleet: Fleet, models: FakeModels, publisher: FakePublisher) -> Updater:
    release = TrustStore.from_files([fleet.settings.release_keys[0]])
    return Updater(
        fleet.settings,
        models,  # type: ignore[arg-type]
        publisher,
        AgentMetrics(),
        release,
        TrustStore.from_files([]),
        transport=fleet.transport(),
    )


def outcomes(publisher: FakePublisher) -> list[tuple[str, str]]:
    return [(r["phase"], r["outcome"]) for r in publisher.updates]


async def run_until(
    updater: Updater, publisher: FakePublisher, outcome: str, notice: bytes
) -> None:
    await updater.start()
    await updater.on_notice(NOTICE_TOPIC, notice)
    await wait_until(
        lambda: any(r["outcome"] == outcome for r in publisher.updates), f"the update {outcome}"
    )
    await updater.stop()


def test_an_update_activates_through_the_model_lifecycle_and_commits(fleet: Fleet) -> None:
    models = FakeModels(fleet.settings, fleet.store, load_profile(fleet.settings.profile))
    publisher = FakePublisher()
    updater = updater_for(fleet, models, publisher)
    asyncio.run(run_until(updater, publisher, "committed", fleet.notice()))
    assert outcomes(publisher) == [
        ("downloading", "progress"),
        ("verifying", "progress"),
        ("staging", "progress"),
        ("activating", "progress"),
        ("probation", "progress"),
        ("committed", "committed"),
    ]
    assert [str(r.url) for r in fleet.requests] == [URL]
    assert models.calls == [
        ("activate", "defects", 2, "update", True),
        ("retire", models.previous),
    ]
    assert fleet.store.active_version("defects") == 2
    assert updater.describe()["state"]["phase"] == "committed"
    assert [r["outcome"] for r in updater.describe()["reports"]][-1] == "committed"
    digest = hashlib.sha256(fleet.update.path.read_bytes()).hexdigest()
    assert updater.state.release is not None and updater.state.release.sha256 == digest


def test_failures_in_probation_roll_back_through_the_model_lifecycle(fleet: Fleet) -> None:
    models = FakeModels(
        fleet.settings,
        fleet.store,
        load_profile(fleet.settings.profile),
        fail_after_activation=fleet.settings.probation_max_errors,
    )
    publisher = FakePublisher()
    updater = updater_for(fleet, models, publisher)
    asyncio.run(run_until(updater, publisher, "rolled_back", fleet.notice()))
    assert models.kinds() == ["activate", "roll_back"]
    assert models.calls[1] == ("roll_back", "defects", 1, models.previous)
    assert fleet.store.active_version("defects") == 1
    assert fleet.store.versions("defects") == [1]  # the failed version is removed
    reason = publisher.updates[-1]["reason"]
    assert "inference failures on live traffic during probation" in reason


def test_a_notice_for_another_device_is_ignored(fleet: Fleet) -> None:
    models = FakeModels(fleet.settings, fleet.store, load_profile(fleet.settings.profile))
    publisher = FakePublisher()
    updater = updater_for(fleet, models, publisher)
    other = signed_notice(fleet.key, fleet.update.path, URL, sequence=1, device="plant/another-box")

    async def scenario() -> None:
        await updater.start()
        await updater.on_notice(NOTICE_TOPIC, other)
        await updater.stop()

    asyncio.run(scenario())
    assert outcomes(publisher) == [("idle", "ignored")]
    assert models.calls == [] and fleet.requests == []


def test_a_notice_refused_for_its_signature_is_reported_with_what_it_claims(
    fleet: Fleet, tmp_path: Path
) -> None:
    """Central IT can tie the refusal to the release: its sequence, name and version, marked
    unverified (an untrusted key signed it)."""
    models = FakeModels(fleet.settings, fleet.store, load_profile(fleet.settings.profile))
    publisher = FakePublisher()
    updater = updater_for(fleet, models, publisher)
    stranger, _ = release_key(tmp_path / "stranger")
    forged = signed_notice(stranger, fleet.update.path, URL, sequence=7)

    async def scenario() -> None:
        await updater.start()
        await updater.on_notice(NOTICE_TOPIC, forged)
        await updater.stop()

    asyncio.run(scenario())
    [report] = publisher.updates
    assert (report["outcome"], report["sequence"]) == ("refused", 7)
    assert (report["name"], report["version"]) == ("defects", 2)
    assert report["verified"] is False and report["claimed"]["sequence"] == 7
    assert models.calls == [] and fleet.requests == []


def test_reports_on_a_rollout_release_echo_the_rollout(fleet: Fleet) -> None:
    """A schema version 2 notice's rollout comes back in every report, the replayed one too."""
    models = FakeModels(fleet.settings, fleet.store, load_profile(fleet.settings.profile))
    publisher = FakePublisher()
    updater = updater_for(fleet, models, publisher)
    notice = signed_notice(
        fleet.key, fleet.update.path, URL, sequence=5, rollout=Rollout(id="defects-4", wave=3)
    )

    async def scenario() -> None:
        await run_until(updater, publisher, "committed", notice)
        await updater.on_notice(NOTICE_TOPIC, notice)  # the retained notice, after a reconnect

    asyncio.run(scenario())
    assert outcomes(publisher)[-2:] == [("committed", "committed"), ("idle", "ignored")]
    assert all(r["rollout"] == {"id": "defects-4", "wave": 3} for r in publisher.updates)
    assert updater.describe()["state"]["release"]["rollout"] == {"id": "defects-4", "wave": 3}


def test_reports_without_a_rollout_have_no_rollout_field(fleet: Fleet) -> None:
    models = FakeModels(fleet.settings, fleet.store, load_profile(fleet.settings.profile))
    publisher = FakePublisher()
    updater = updater_for(fleet, models, publisher)
    asyncio.run(run_until(updater, publisher, "committed", fleet.notice()))
    assert not any("rollout" in r for r in publisher.updates)


def test_the_outcome_hook_runs_once_per_committed_or_rolled_back_update(fleet: Fleet) -> None:
    """The agent sends telemetry through this hook, so central sees the new version at once."""
    models = FakeModels(fleet.settings, fleet.store, load_profile(fleet.settings.profile))
    publisher = FakePublisher()
    updater = updater_for(fleet, models, publisher)
    seen: list[str] = []
    updater.after_outcome = lambda: seen.append(publisher.updates[-1]["outcome"])
    asyncio.run(run_until(updater, publisher, "committed", fleet.notice()))
    assert seen == ["committed"]
