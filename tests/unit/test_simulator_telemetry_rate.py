"""A simulated box publishes its telemetry once per interval (the fleet scale bench's load is
one message per box per minute, as the issue sets it), at its own phase of the interval."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from edge_bundle.signing import TrustStore
from fleet_controller.simulator import box as box_module
from fleet_controller.simulator.box import SimBox
from fleet_controller.simulator.spec import BoxSpec


class StopLoopError(Exception):
    """Ends the telemetry loop after a set number of sleeps."""


def test_one_telemetry_message_per_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    sleeps: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        sleeps.append(seconds)
        if len(sleeps) > 4:  # the phase, then four intervals
            raise StopLoopError

    monkeypatch.setattr(box_module.asyncio, "sleep", fake_sleep)

    async def scenario() -> int:
        async with httpx.AsyncClient() as http:
            sim = SimBox(
                BoxSpec(site="plant-a", device="box1"),
                ("127.0.0.1", 1),
                TrustStore(),
                http,
                telemetry_interval_s=60.0,
            )
            published: list[int] = []
            monkeypatch.setattr(sim, "publish_telemetry", lambda: published.append(1))
            with pytest.raises(StopLoopError):
                await sim._telemetry_loop()
            return len(published)

    assert asyncio.run(scenario()) == 4  # one per interval slept, never two at once
    assert 0 <= sleeps[0] < 60.0 and sleeps[1:] == [60.0] * 4
