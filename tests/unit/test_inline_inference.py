"""Tiny predictions on the event loop: the lane runs `inline` work on the calling thread only
while nothing is running or queued on the inference thread, and the core asks for it only for a
small photo to a model whose recent small photos were fast."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

import cv2
import pytest

from edge_agent.device.predictions import Photo
from edge_agent.engine.classifier import Classifier
from edge_agent.engine.core import INLINE_MAX_PIXELS, SMALL_MIN_SEEN
from edge_agent.engine.lane import InferenceLane
from edge_agent.errors import OverloadedError
from edge_agent.metrics import AgentMetrics
from edge_bundle.errors import ImageError
from tests.agent_support import Keys, build_bundle, jpeg, make_keys, photo
from tests.unit.agent_fixtures import agent_settings, clean_environment
from tests.unit.device_fakes import FakePublisher, close_device, make_device

SMALL = jpeg(3, size=(120, 160))
# Over INLINE_MAX_PIXELS (a PNG: a JPEG this size would be decoded reduced, and small).
LARGE = cv2.imencode(".png", photo(4, (400, 400)))[1].tobytes()


def where() -> str:
    return threading.current_thread().name


def test_inline_work_runs_on_the_calling_thread_only_when_the_lane_is_idle() -> None:
    lane = InferenceLane(4, AgentMetrics())
    release = threading.Event()
    closed: list[str] = []

    class Model:
        def close(self) -> None:
            closed.append(where())

    async def scenario() -> None:
        assert await lane.run(where, inline=True) == "MainThread"
        assert (await lane.run(where)).startswith("infer")
        busy = asyncio.ensure_future(lane.run(lambda: release.wait(10)))
        queued = asyncio.ensure_future(lane.run(where))
        await asyncio.sleep(0.05)
        # Something runs on the thread, a call and a close wait there: inline work queues behind.
        lane.close_later(Model())
        inline = asyncio.ensure_future(lane.run(where, inline=True))
        await asyncio.sleep(0.05)
        assert not inline.done()
        release.set()
        assert (await busy, await queued) == (True, "infer_0")
        assert await inline == "infer_0" and closed == ["infer_0"]
        # Done, failed or cancelled before it ran, submitted work stops counting.
        release.clear()
        blocker = asyncio.ensure_future(lane.run(lambda: release.wait(10)))
        cancelled = asyncio.ensure_future(lane.run(where))
        failing = asyncio.ensure_future(lane.run(lambda: 1 / 0))
        await asyncio.sleep(0.05)
        cancelled.cancel()
        release.set()
        await blocker
        with pytest.raises(ZeroDivisionError):
            await failing
        assert await lane.run(where, inline=True) == "MainThread"

    try:
        asyncio.run(scenario())
    finally:
        lane.close()


def test_inline_work_keeps_the_lane_busy_state_and_the_deadline() -> None:
    lane = InferenceLane(4, AgentMetrics())

    async def scenario() -> None:
        seen = await lane.run(lambda: lane.busy_since is not None and not lane.alone(), inline=True)
        assert seen and lane.busy_since is None
        with pytest.raises(OverloadedError):
            await lane.run(where, inline=True, deadline=time.monotonic() - 1)

    try:
        with lane.prediction():
            asyncio.run(scenario())
    finally:
        lane.close()


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    return make_keys(tmp_path / "keys")


def predictions_on(
    tmp_path: Path,
    keys: Keys,
    monkeypatch: pytest.MonkeyPatch,
    photos: list[bytes],
    **overrides: Any,
) -> list[str]:
    """The thread each of `photos`' inferences ran on, predicted one after another."""
    clean_environment(monkeypatch)
    threads: list[str] = []
    infer = Classifier.infer

    def recorded(self: Classifier, tensor: Any) -> Any:
        threads.append(where())
        return infer(self, tensor)

    monkeypatch.setattr(Classifier, "infer", recorded)
    settings = agent_settings(tmp_path / "state", keys, **overrides)
    device = make_device(settings, FakePublisher(), AgentMetrics())

    async def scenario() -> None:
        await device.install(build_bundle(tmp_path / "dist", keys).path)
        device.models.loading = False
        threads.clear()  # the install's self-test
        for data in photos:
            await device.predict("defects", Photo(data), transport="mqtt")

    try:
        asyncio.run(scenario())
    finally:
        close_device(device)
    return threads


def test_small_photos_to_a_fast_model_run_inline_once_timed(
    tmp_path: Path, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert 160 * 120 <= INLINE_MAX_PIXELS < 400 * 400
    # The bound is the largest allowed, so that a slow machine's timings cannot change the verdict.
    threads = predictions_on(
        tmp_path, keys, monkeypatch, [SMALL] * (SMALL_MIN_SEEN + 3) + [LARGE], inline_max_ms=20
    )
    assert threads == ["infer_0"] * SMALL_MIN_SEEN + ["MainThread"] * 3 + ["infer_0"]


def test_inline_max_ms_0_keeps_every_inference_on_its_thread(
    tmp_path: Path, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    threads = predictions_on(
        tmp_path, keys, monkeypatch, [SMALL] * (SMALL_MIN_SEEN + 3), inline_max_ms=0
    )
    assert threads == ["infer_0"] * (SMALL_MIN_SEEN + 3)


def test_a_model_slower_than_inline_max_ms_stays_on_its_thread(
    tmp_path: Path, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    infer = Classifier.infer

    def slow(self: Classifier, tensor: Any) -> Any:
        time.sleep(0.005)  # 5 ms: at least that, whatever the machine
        return infer(self, tensor)

    monkeypatch.setattr(Classifier, "infer", slow)
    threads = predictions_on(
        tmp_path, keys, monkeypatch, [SMALL] * (SMALL_MIN_SEEN + 3), inline_max_ms=2
    )
    assert threads == ["infer_0"] * (SMALL_MIN_SEEN + 3)


def test_a_bad_small_photo_inline_is_refused_and_the_next_one_still_served(
    tmp_path: Path, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    clean_environment(monkeypatch)
    settings = agent_settings(tmp_path / "state", keys, inline_max_ms=20)
    device = make_device(settings, FakePublisher(), AgentMetrics())
    truncated = SMALL[: len(SMALL) // 2]  # its header says small: it goes inline

    async def scenario() -> None:
        await device.install(build_bundle(tmp_path / "dist", keys).path)
        device.models.loading = False
        for _ in range(SMALL_MIN_SEEN):
            await device.predict("defects", Photo(SMALL), transport="mqtt")
        with pytest.raises(ImageError, match="ends before the image does"):
            await device.predict("defects", Photo(truncated), transport="mqtt")
        lane = device.models.core.lane
        assert lane.busy_since is None and lane.active == 0  # nothing left running
        answer = await device.predict("defects", Photo(SMALL), transport="mqtt")
        assert answer.prediction.label

    try:
        asyncio.run(scenario())
    finally:
        close_device(device)
