"""The simulator: many simulated boxes on one asyncio loop, and a thread around it for tests.

`Simulator` owns the boxes, the shared HTTP client for downloads, and the offline windows of
each box's behaviour (timers relative to its start). It connects the boxes in batches, and with
`connect_per_s` paces the batches with jitter so thousands of CONNECTs do not reach the broker at
once; `stats` sums what its boxes did. `SimulatorThread` runs a simulator's loop in one background
thread and hands calls to it thread-safely.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import random
import threading
import time
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import Any, TypeVar

import httpx

from edge_bundle.signing import TrustStore
from fleet_controller.simulator.box import SimBox
from fleet_controller.simulator.fetch import FetchSettings
from fleet_controller.simulator.spec import BoxSpec, SpecError

T = TypeVar("T")
CONNECT_BATCH = 20  # connects between yields to the loop, so CONNACKs are read as they come


class Simulator:
    """Simulated boxes speaking the box side of the protocol to the broker at `host:port`."""

    def __init__(
        self,
        host: str,
        port: int,
        boxes: Iterable[BoxSpec],
        release_trust: TrustStore,
        *,
        telemetry_interval_s: float = 5.0,
        clock: Callable[[], float] = time.time,
        fetch: FetchSettings | None = None,
        connect_per_s: float | None = None,
        keepalive_s: int = 30,
    ) -> None:
        if connect_per_s is not None and connect_per_s <= 0:
            raise SpecError(f"connect_per_s must be > 0 (or left out), not {connect_per_s}")
        self.host = host
        self.port = port
        self.specs = list(boxes)
        refs = [spec.ref for spec in self.specs]
        duplicates = sorted({ref for ref in refs if refs.count(ref) > 1})
        if duplicates:
            raise SpecError(f"boxes must be unique; listed more than once: {duplicates}")
        self.release_trust = release_trust
        self.telemetry_interval_s = telemetry_interval_s
        self.clock = clock
        self.fetch = fetch or FetchSettings()
        self.connect_per_s = connect_per_s
        self.keepalive_s = keepalive_s
        self.boxes: dict[str, SimBox] = {}
        self._http: httpx.AsyncClient | None = None
        self._timers: list[asyncio.TimerHandle] = []
        self._stopped: asyncio.Event | None = None

    # ---- lifecycle -----------------------------------------------------------------------
    async def start(self) -> None:
        """Connect every box that is not offline at time 0; schedule the offline windows."""
        loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        self._http = httpx.AsyncClient(timeout=30.0, follow_redirects=True)
        for index, spec in enumerate(self.specs):
            box = SimBox(
                spec,
                (self.host, self.port),
                self.release_trust,
                self._http,
                telemetry_interval_s=self.telemetry_interval_s,
                clock=self.clock,
                fetch=self.fetch,
                keepalive_s=self.keepalive_s,
            )
            self.boxes[spec.ref] = box
            if not _offline_at_start(spec):
                box.go_online()
            for start, end in spec.behaviour.offline:
                self._timers.append(loop.call_later(start, box.go_offline))
                if end is not None:
                    self._timers.append(loop.call_later(end, box.go_online))
            if index % CONNECT_BATCH == CONNECT_BATCH - 1:
                await asyncio.sleep(self._pause())

    def _pause(self) -> float:
        """Between two batches of connects: the paced gap with +-50 % jitter, or just a yield."""
        if self.connect_per_s is None:
            return 0.0
        return CONNECT_BATCH / self.connect_per_s * random.uniform(0.5, 1.5)  # noqa: S311 (jitter)

    async def stop(self) -> None:
        """Every box says offline and disconnects cleanly."""
        for timer in self._timers:
            timer.cancel()
        self._timers.clear()
        await asyncio.gather(*(box.stop() for box in self.boxes.values()))
        if self._http is not None:
            await self._http.aclose()
            self._http = None
        if self._stopped is not None:
            self._stopped.set()

    async def run(self, until: asyncio.Event | None = None) -> None:
        """Start, run until `until` is set (or forever), stop."""
        await self.start()
        try:
            await (until or asyncio.Event()).wait()
        finally:
            await self.stop()

    # ---- control and inspection (on the loop) --------------------------------------------
    def box(self, ref: str) -> SimBox:
        try:
            return self.boxes[ref]
        except KeyError:
            raise SpecError(f"no simulated box {ref!r}; boxes are named SITE/DEVICE") from None

    def set_online(self, ref: str, online: bool) -> None:
        """Bring a box online, or take it offline ungracefully (its last will is published)."""
        box = self.box(ref)
        if online:
            box.go_online()
        else:
            box.go_offline()

    def acted(self, ref: str) -> list[tuple[int, str, int, bool]]:
        """(sequence, name, version, rollback) of every notice the box started installing."""
        return list(self.box(ref).updates.acted)

    def box_state(self, ref: str) -> dict[str, Any]:
        """Active versions, last sequence, install phase, online."""
        return self.box(ref).describe()

    def online_count(self) -> int:
        return sum(1 for box in self.boxes.values() if box.online)

    def stats(self) -> dict[str, Any]:
        """What the boxes did, summed: messages, chunk fetches, phases, releases, versions."""
        boxes = list(self.boxes.values())
        chunks: dict[str, int] = {}
        for box in boxes:
            for name, value in vars(box.mqtt.totals).items():
                chunks[name] = chunks.get(name, 0) + value
        phases: dict[str, int] = {}
        releases: dict[str, int] = {}
        active: dict[str, int] = {}
        for box in boxes:
            phases[box.updates.phase] = phases.get(box.updates.phase, 0) + 1
            for name, version in box.releases:
                releases[f"{name}@{version}"] = releases.get(f"{name}@{version}", 0) + 1
            for name, version in box.updates.active.items():
                active[f"{name}@{version}"] = active.get(f"{name}@{version}", 0) + 1
        return {
            "boxes": len(boxes),
            "online": sum(1 for box in boxes if box.online),
            "sent": sum(box.sent for box in boxes),
            "received": sum(box.received for box in boxes),
            "chunks": chunks,
            "phases": phases,
            "boxes_sent_release": releases,
            "active": active,
        }


def _offline_at_start(spec: BoxSpec) -> bool:
    return any(start <= 0 for start, _ in spec.behaviour.offline)


class SimulatorThread:
    """Runs a `Simulator` on its own event loop in one background thread."""

    def __init__(self, simulator: Simulator, *, start_timeout_s: float = 60.0) -> None:
        self.simulator = simulator
        self.start_timeout_s = start_timeout_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._until: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def start(self) -> SimulatorThread:
        """Start the loop and the boxes' connections; returns once every box was started."""
        if self._thread is not None:
            raise RuntimeError("this SimulatorThread was already started")
        self._thread = threading.Thread(target=self._main, name="fleet-simulator", daemon=True)
        self._thread.start()
        if not self._ready.wait(self.start_timeout_s):
            raise TimeoutError(f"the simulator did not start within {self.start_timeout_s} s")
        if self._error is not None:
            raise RuntimeError(f"the simulator failed to start: {self._error}") from self._error
        return self

    def stop(self, timeout_s: float = 30.0) -> None:
        loop, until, thread = self._loop, self._until, self._thread
        if loop is None or until is None or thread is None:
            return
        if thread.is_alive():
            loop.call_soon_threadsafe(until.set)
            thread.join(timeout_s)
        self._thread = None

    def __enter__(self) -> SimulatorThread:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def _main(self) -> None:
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._until = asyncio.Event()
        try:
            await self.simulator.start()
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            raise
        self._ready.set()
        try:
            await self._until.wait()
        finally:
            await self.simulator.stop()

    def call(self, function: Callable[..., T], *args: Any, timeout_s: float = 10.0) -> T:
        """Run `function(*args)` on the simulator's loop and return its result."""
        loop = self._loop
        if loop is None or self._thread is None:
            raise RuntimeError("the simulator thread is not running; start() it first")
        future: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            try:
                future.set_result(function(*args))
            except BaseException as exc:  # handed to the caller's thread
                future.set_exception(exc)

        loop.call_soon_threadsafe(run)
        return future.result(timeout_s)

    def set_online(self, ref: str, online: bool) -> None:
        self.call(self.simulator.set_online, ref, online)

    def acted(self, ref: str) -> list[tuple[int, str, int, bool]]:
        return self.call(self.simulator.acted, ref)

    def box_state(self, ref: str) -> dict[str, Any]:
        return self.call(self.simulator.box_state, ref)

    def online_count(self) -> int:
        return self.call(self.simulator.online_count)
