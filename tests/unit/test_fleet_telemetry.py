"""Telemetry for a fleet controller (#16): who the box is, and per model the latency and outcomes
of its active version since it became active; snapshots on demand besides the periodic ones.

Against the device as the agent wires it (real bundles, the real ONNX runtime), no agent process.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from edge_agent import __version__
from edge_agent.device.api import Device
from edge_agent.device.predictions import Photo
from edge_agent.errors import AgentError, error_code
from edge_agent.metrics import AgentMetrics
from edge_bundle.errors import BundleError
from tests.agent_support import Keys, build_bundle, jpeg, make_keys
from tests.unit.agent_fixtures import agent_settings, clean_environment
from tests.unit.device_fakes import FakePublisher, close_device, make_device, wait_until


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    return make_keys(tmp_path / "keys")


def device_for(
    tmp_path: Path, keys: Keys, monkeypatch: pytest.MonkeyPatch, **overrides: Any
) -> tuple[Device, FakePublisher]:
    clean_environment(monkeypatch)
    settings = agent_settings(tmp_path / "state", keys, **overrides)
    publisher = FakePublisher()
    return make_device(settings, publisher, AgentMetrics()), publisher


async def predict(device: Device, photo: bytes) -> str:
    """Classify once; the outcome the core counts ("ok" or the error code)."""
    try:
        await device.predict("defects", Photo(photo), transport="http")
    except (AgentError, BundleError) as exc:
        return error_code(exc)
    return "ok"


def entry(device: Device, name: str = "defects") -> dict[str, Any]:
    [model] = [m for m in device.telemetry.snapshot()["models"] if m["name"] == name]
    return model


def test_the_snapshot_says_who_the_box_is(
    tmp_path: Path, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    device, _ = device_for(
        tmp_path,
        keys,
        monkeypatch,
        site="plant-a",
        device="box7",
        line="line3",
        labels={"camera": "v2", "shift": "night"},
        update_groups=("line3", "canary"),
    )
    try:
        figures = device.telemetry.snapshot()
    finally:
        close_device(device)
    assert (figures["site"], figures["device"], figures["line"]) == ("plant-a", "box7", "line3")
    assert figures["labels"] == {"camera": "v2", "shift": "night"}
    assert figures["groups"] == ["line3", "canary"]


def test_no_line_labels_or_groups_are_sent_as_null_and_empty(
    tmp_path: Path, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    device, _ = device_for(tmp_path, keys, monkeypatch)
    try:
        figures = device.telemetry.snapshot()
    finally:
        close_device(device)
    assert (figures["line"], figures["labels"], figures["groups"]) == (None, {}, [])


def test_model_figures_are_of_the_active_version_since_it_became_active(
    tmp_path: Path, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    device, _ = device_for(tmp_path, keys, monkeypatch)

    async def scenario() -> tuple[dict[str, Any], dict[str, Any], list[str]]:
        await device.install(build_bundle(tmp_path / "v1", keys).path)
        seen = [await predict(device, jpeg(i)) for i in range(5)]
        seen.append(await predict(device, b"not a photo"))
        first = entry(device)
        await device.install(build_bundle(tmp_path / "v2", keys, version=2, seed=3).path)
        await predict(device, jpeg(9))
        return first, entry(device), seen

    try:
        first, second, seen = asyncio.run(scenario())
    finally:
        close_device(device)
    error = seen[-1]
    assert seen[:5] == ["ok"] * 5 and error != "ok"
    assert first["version"] == 1
    assert first["outcomes"] == {"ok": 5, error: 1}
    latency = first["latency_ms"]
    assert latency["samples"] == 5
    assert 0 < latency["p50"] <= latency["p95"]
    # Version 2 starts from zero: nothing of version 1 is carried over, nor kept.
    assert second["version"] == 2
    assert second["outcomes"] == {"ok": 1}
    assert second["latency_ms"]["samples"] == 1
    core = device.models.core
    assert set(core.version_outcomes) == {("defects", 2)}
    assert {key for key in core.model_latencies if key[0] == "defects"} == {("defects", 2)}


def test_a_version_without_answers_has_empty_figures(
    tmp_path: Path, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    device, _ = device_for(tmp_path, keys, monkeypatch)

    async def scenario() -> dict[str, Any]:
        await device.install(build_bundle(tmp_path / "v1", keys).path)
        return entry(device)

    try:
        model = asyncio.run(scenario())
    finally:
        close_device(device)
    assert model["latency_ms"] == {"p50": None, "p95": None, "samples": 0}
    assert model["outcomes"] == {}


def test_publish_soon_sends_a_snapshot_without_waiting_for_the_period(
    tmp_path: Path, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    device, publisher = device_for(tmp_path, keys, monkeypatch, telemetry_interval_s=3600)

    async def scenario() -> None:
        loop = asyncio.create_task(device.telemetry.loop(publisher))
        try:
            await asyncio.sleep(0.05)
            assert publisher.telemetry == []  # nothing before the period, unless asked
            device.telemetry.publish_soon()
            device.telemetry.publish_soon()  # requests made together share one snapshot
            await wait_until(lambda: len(publisher.telemetry) == 1, "a snapshot", timeout=30)
            device.telemetry.publish_soon()
            await wait_until(lambda: len(publisher.telemetry) == 2, "a second one", timeout=30)
        finally:
            loop.cancel()
            with pytest.raises(asyncio.CancelledError):
                await loop

    try:
        asyncio.run(scenario())
    finally:
        close_device(device)
    assert publisher.telemetry[0]["agent_version"] == __version__
