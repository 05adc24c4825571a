"""The inference lane: the one thread models run on, admission to it, and what is running now.

Classification (`core`), shadow runs (`shadow`) and the periodic and probation self-tests all run
their model calls here, one after another, because a runtime already spreads one inference over
the profile's intra-op threads. Every prediction, whatever transport brought it, holds an
admission slot (`admission`) from the moment its photo is in until it is answered, which bounds
what the box can be asked to do at once (in slots and in expected queueing delay) and tells text
generation (`classifying`) when to yield the CPU. A prediction's work carries its slot's deadline
(`run(..., deadline=)`): work still queued past it is dropped before it runs. The inference and
decode threads run at a lower CPU priority (`lower_priority`, setting `inference_nice`), so that
under overload the event loop still answers health checks and refusals at once. The busy state
(`busy_since`, `last_started`, `active`) lets shadow runs wait for idle gaps and the watchdog
notice a wedged runtime.

A prediction the core knows to be tiny (`run(..., inline=True)`: a small photo to a model that
answers it in about a millisecond) runs on the calling thread, the event loop, when the lane is
idle: the two thread hand-offs it saves cost about as much as the work itself. It keeps the
lane's bookkeeping (busy state, deadline), and nothing else can start meanwhile, since the event
loop is what submits work here; work already submitted (a queued close, a self-test) sends it to
the thread as usual.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol, TypeVar

from edge_agent.engine.admission import Admission, DelayBudget
from edge_agent.metrics import AgentMetrics
from edge_agent.settings import AgentSettings

_T = TypeVar("_T")


class Closable(Protocol):
    def close(self) -> None: ...


def lower_priority(nice: int) -> Callable[[], None]:
    """A thread-pool initializer that lowers its thread's CPU priority by `nice` (Linux, where
    the nice value belongs to each thread; elsewhere, or when `nice` is 0, it does nothing)."""

    def initializer() -> None:
        if nice <= 0 or sys.platform != "linux":
            return
        with contextlib.suppress(OSError):
            thread = threading.get_native_id()
            current = os.getpriority(os.PRIO_PROCESS, thread)
            os.setpriority(os.PRIO_PROCESS, thread, min(19, current + nice))

    return initializer


class InferenceLane:
    """The single inference thread, its admission, and its busy state."""

    def __init__(
        self,
        capacity: int,
        metrics: AgentMetrics,
        budget: DelayBudget | None = None,
        nice: int = 0,
    ) -> None:
        self.metrics = metrics
        self.admission = Admission(capacity, budget)
        metrics.capacity.set(capacity)
        self._pool = ThreadPoolExecutor(1, "infer", initializer=lower_priority(nice))
        self.busy_since: float | None = None  # when the running inference started (monotonic)
        self.last_started = 0.0  # when the latest prediction started (monotonic)
        self.active = 0  # predictions inside the core now (any transport)
        self._submitted = 0  # calls submitted to the thread and not done (closes included)
        self._submitted_lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: AgentSettings, metrics: AgentMetrics) -> InferenceLane:
        budget = DelayBudget(settings.max_queue_delay_services, settings.max_queue_delay_ms)
        return cls(settings.max_in_flight, metrics, budget, settings.inference_nice)

    async def run(
        self, function: Callable[[], _T], *, deadline: float | None = None, inline: bool = False
    ) -> _T:
        """Run `function` on the inference thread, after whatever is queued there; past
        `deadline` (a slot's) it is not run and `OverloadedError` is raised instead.

        `inline`: run it here, on the calling thread, when nothing is running or queued on the
        inference thread (for work of about a millisecond; see the module)."""
        if inline and self._submitted == 0 and self.busy_since is None:
            self.admission.raise_if_late(deadline)
            return self._timed(function)
        self.metrics.queued.inc()
        started = threading.Event()

        def call() -> _T:
            started.set()
            self.metrics.queued.dec()  # running now, no longer waiting
            self.admission.raise_if_late(deadline)
            return self._timed(function)

        try:
            return await asyncio.wrap_future(self._submit(call))
        finally:
            if not started.is_set():  # cancelled before it ran
                self.metrics.queued.dec()

    def _submit(self, call: Callable[[], _T]) -> concurrent.futures.Future[_T]:
        """`call` on the inference thread, counted until it is done (run, failed or cancelled)."""
        with self._submitted_lock:
            self._submitted += 1
        future = self._pool.submit(call)
        # Registered before any other callback, so the count is down before anyone is told.
        future.add_done_callback(self._done)
        return future

    def _done(self, _future: concurrent.futures.Future[Any]) -> None:
        with self._submitted_lock:
            self._submitted -= 1

    def _timed(self, function: Callable[[], _T]) -> _T:
        self.busy_since = time.monotonic()
        try:
            return function()
        finally:
            self.busy_since = None

    @contextlib.contextmanager
    def prediction(self) -> Iterator[None]:
        """Count one prediction as inside the engine for the duration of the block."""
        self.last_started = time.monotonic()
        self.active += 1
        try:
            yield
        finally:
            self.active -= 1

    def alone(self) -> bool:
        """True when the calling prediction is the only one and the inference thread is idle."""
        return self.active == 1 and self.busy_since is None

    def busy_elsewhere(self) -> bool:
        """True while another prediction is in flight or inference work is queued."""
        return self.active > 1 or self.admission.in_flight > 1 or self.busy_since is not None

    def classifying(self) -> bool:
        """True while any prediction is admitted or running (text generation yields to it)."""
        return self.admission.in_flight > 0 or self.active > 0

    def wedged(self, after_s: float) -> bool:
        """True when one inference has been running for longer than `after_s`."""
        busy = self.busy_since
        return busy is not None and time.monotonic() - busy >= after_s

    def close_later(self, model: Closable) -> None:
        """Close a model after whatever the inference thread has queued for it."""
        self._submit(model.close)

    def close(self) -> None:
        """Finish what is queued, then stop the thread."""
        self._pool.shutdown(wait=True, cancel_futures=False)
