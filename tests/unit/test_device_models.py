"""The model lifecycle's one activation path: `install` and the updater's activate step both swap
through `Models.activate`'s swap (the store's active link, then what serves), and the updater's
roll-back goes through `Models.roll_back`. Real signed bundles and a real store; no agent."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from edge_agent.device.models import Models
from edge_agent.engine.selftest import run_selftest
from edge_agent.engine.types import ModelState
from tests.agent_support import Keys, build_bundle, make_keys
from tests.unit.agent_fixtures import agent_settings, clean_environment
from tests.unit.device_fakes import close_device, make_device


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    return make_keys(tmp_path / "keys")


def test_install_and_update_swap_through_one_path_and_roll_back(
    tmp_path: Path, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    clean_environment(monkeypatch)
    device = make_device(agent_settings(tmp_path / "state", keys))
    models, core, store = device.models, device.models.core, device.models.store
    first = build_bundle(tmp_path / "dist", keys, version=1)
    second = build_bundle(tmp_path / "dist", keys, version=2, seed=5)
    swaps: list[tuple[str, int, str, bool]] = []
    swap = Models._swap

    async def spy(self: Models, candidate: Any, *, by: str, keep_previous: bool) -> Any:
        manifest = candidate.bundle.manifest
        swaps.append((manifest.name, manifest.version, by, keep_previous))
        return await swap(self, candidate, by=by, keep_previous=keep_previous)

    monkeypatch.setattr(Models, "_swap", spy)

    async def scenario() -> None:
        installed = await device.install(first.path)
        assert installed["activated"]["version"] == 1
        assert swaps == [("defects", 1, "install", False)]
        served_first = core.models["defects"]

        # The updater's activate step: stage, prepare (reference check included), activate.
        await asyncio.to_thread(store.stage, second.path)
        candidate = await models.prepare("defects", 2, check_references=True)
        previous = await models.activate(candidate, by="update", keep_previous=True)
        assert swaps[-1] == ("defects", 2, "update", True)
        assert previous is served_first
        assert store.active_version("defects") == 2
        assert core.classifier("defects").version == 2
        assert core.models["defects"].last_selftest is not None
        # Kept open for an instant roll-back: the old classifier still answers.
        assert previous.classifier is not None
        assert run_selftest(previous.classifier).passed

        await models.roll_back("defects", 1, previous)
        assert core.models["defects"] is served_first
        assert store.active_version("defects") == 1

        # Rolling back to a version no longer loaded loads it from the store.
        later = await models.prepare("defects", 2)
        await models.activate(later, by="update", keep_previous=False)
        await models.roll_back("defects", 1, None)
        assert core.classifier("defects").version == 1
        assert core.classifier("defects") is not served_first.classifier

        # Nothing was active before: rolling back removes the model.
        await models.roll_back("defects", None, None)
        assert store.active_version("defects") is None
        assert "defects" not in core.models

    try:
        asyncio.run(scenario())
    finally:
        close_device(device)
    assert [s[2] for s in swaps] == ["install", "update", "update"]


def test_retire_closes_only_a_classifier_that_no_longer_serves(
    tmp_path: Path, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    clean_environment(monkeypatch)
    device = make_device(agent_settings(tmp_path / "state", keys))
    models = device.models
    closed: list[int] = []

    async def scenario() -> None:
        await device.install(build_bundle(tmp_path / "dist", keys, version=1).path)
        await asyncio.to_thread(
            models.store.stage, build_bundle(tmp_path / "dist", keys, version=2, seed=5).path
        )
        previous = await models.activate(
            await models.prepare("defects", 2), by="update", keep_previous=True
        )
        assert previous is not None and previous.classifier is not None
        serving = models.core.models["defects"]
        for state in (previous, serving):
            classifier = state.classifier
            assert classifier is not None
            monkeypatch.setattr(classifier, "close", lambda c=classifier: closed.append(c.version))
        models.retire(serving)  # still serving: left open
        models.retire(ModelState("ready"))  # nothing to close
        models.retire(previous)
        await asyncio.to_thread(models.core.lane.close)

    try:
        asyncio.run(scenario())
    finally:
        close_device(device)
    assert closed[0] == 1
