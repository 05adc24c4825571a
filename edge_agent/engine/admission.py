"""Admission to the inference lane: bounded queueing delay, refusal instead of queueing, draining.

A prediction is decided on when it arrives (`admit`), before its body is read: refused at once
(`OverloadedError`, 503 + Retry-After over HTTP) when every slot is taken or when the predictions
already holding slots would keep it waiting longer than the delay budget; `DrainingError` once
draining has started (SIGTERM). An admitted prediction takes its inference slot (`Entry.slot`)
only once its photo is in, so a slow upload holds nothing scarce; the count and delay rules are
applied again at that moment, so a burst of uploads that all arrived at an idle agent cannot pile
up behind each other. Work admitted before draining began may still take its slot and finish.

The delay rule: expected wait = slots held x the measured service time. The service time is an
exponentially weighted average of the time between departures while the lane is busy (a slot's
finish minus the later of its start and the previous finish): what one more prediction in the
queue costs everyone behind it, whatever overlap decoding and inference achieve on this box.
Until the first prediction has finished only the count applies. The budget is a number of service
times (`DelayBudget.service_times`), optionally capped in milliseconds. The agent's default
(setting `max_queue_delay_services`) is half a service time, which admits a prediction only when
none holds a slot: one inference already spreads over every core of a small box, so a second one
in flight gains little throughput and doubles the wait (bench/bench_overload.py). `refusal`
reads the decision without taking anything, for the HTTP edge to refuse before routing
(`edge_agent.http.middleware`). A slot also carries a deadline: work that is still waiting for
the inference thread long after the budget promised (`LATE_FACTOR`, never sooner than
`LATE_MIN_S`) is dropped before it runs (`raise_if_late`) rather than answered late.

Single event loop, so no lock is needed; the clock is injectable for tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from edge_agent.errors import DrainingError, OverloadedError

RETRY_AFTER_S = 1.0
#: Weight of the newest service-time sample in the moving average.
SERVICE_WEIGHT = 0.2
#: A slot whose work has not started this many times (budget + one service time) after it was
#: taken is dropped: the estimate was badly wrong (a burst of large photos, a slower model swapped
#: in). Generous, so that the ordinary hiccups of a busy box never drop work.
LATE_FACTOR = 4.0
#: ...and never sooner than this after it was taken: with a small model a few service times are a
#: few milliseconds, less than a thread at lowered priority may wait for a core on a shared box,
#: and a lone prediction on an idle lane must never be dropped as late.
LATE_MIN_S = 0.5

Clock = Callable[[], float]


@dataclass(frozen=True)
class DelayBudget:
    """How long an admitted prediction may expect to wait for the ones ahead of it."""

    service_times: float = 1.0
    max_ms: float | None = None

    def seconds(self, service_s: float) -> float:
        budget = self.service_times * service_s
        return budget if self.max_ms is None else min(budget, self.max_ms / 1000)


class ServiceTime:
    """Moving average of the seconds between departures while busy (see the module docstring)."""

    def __init__(self, weight: float = SERVICE_WEIGHT) -> None:
        self.weight = weight
        self.seconds: float | None = None
        self._last_departure = -math.inf

    def observe(self, started: float, finished: float) -> None:
        sample = max(0.0, finished - max(started, self._last_departure))
        self._last_departure = max(self._last_departure, finished)
        if self.seconds is None:
            self.seconds = sample
        else:
            self.seconds += self.weight * (sample - self.seconds)


@dataclass(frozen=True)
class Slot:
    """A held inference slot: when it was taken and when its work must have started."""

    taken_at: float
    deadline: float | None


class Admission:
    """Counts slots against `capacity`, bounds the expected wait, and drains."""

    def __init__(
        self, capacity: int, budget: DelayBudget | None = None, clock: Clock = time.monotonic
    ) -> None:
        self.capacity = capacity
        self.budget = budget or DelayBudget()
        self.clock = clock
        self.service = ServiceTime()
        self.in_flight = 0  # slots held
        self.receiving = 0  # admitted, photo not in yet (no slot)
        self.draining = False
        self._idle = asyncio.Event()
        self._idle.set()

    def expected_wait_s(self) -> float | None:
        """How long a prediction admitted now would wait for the slots already held."""
        service = self.service.seconds
        return None if service is None else self.in_flight * service

    def check(self, *, admitted: bool = False) -> None:
        """Raise `DrainingError` or `OverloadedError` if a newcomer would be refused now."""
        error = self.refusal(admitted=admitted)
        if error is not None:
            raise error

    def refusal(self, *, admitted: bool = False) -> DrainingError | OverloadedError | None:
        """The error a newcomer would be refused with now, or None; changes nothing, so the HTTP
        edge can ask it before routing (the decision that counts is still `admit`'s)."""
        if self.draining and not admitted:
            return DrainingError(
                "the agent is shutting down; send the request again to another agent or in a "
                "few seconds",
                retry_after_s=RETRY_AFTER_S,
            )
        if self.in_flight >= self.capacity:
            return OverloadedError(
                f"all {self.capacity} inference slots are busy; retry after a second",
                retry_after_s=RETRY_AFTER_S,
            )
        wait, service = self.expected_wait_s(), self.service.seconds
        if wait is not None and service is not None and wait > self.budget.seconds(service):
            return OverloadedError(
                f"the {self.in_flight} predictions ahead would keep this one waiting about "
                f"{wait * 1000:.0f} ms, over this agent's queueing budget of "
                f"{self.budget.seconds(service) * 1000:.0f} ms; retry after a second",
                retry_after_s=RETRY_AFTER_S,
            )
        return None

    @contextlib.contextmanager
    def admit(self) -> Iterator[Entry]:
        """Decide now, hold no slot: for the block, the work counts as admitted (draining waits
        for it) while its photo is received; `Entry.slot()` then takes the inference slot."""
        self.check()
        self.receiving += 1
        self._idle.clear()
        try:
            yield Entry(self)
        finally:
            self.receiving -= 1
            self._set_idle_if_idle()

    @contextlib.contextmanager
    def slot(self, *, admitted: bool = False) -> Iterator[Slot]:
        """Hold one slot for the duration of the block, or raise without waiting.

        A block that ends normally is one service-time sample; a failed one is not (a refused or
        dropped prediction says nothing about how fast the lane serves).
        """
        self.check(admitted=admitted)
        taken = self.clock()
        service = self.service.seconds
        deadline = None
        if service is not None:
            late_s = LATE_FACTOR * (self.budget.seconds(service) + service)
            deadline = taken + max(LATE_MIN_S, late_s)
        self.in_flight += 1
        self._idle.clear()
        try:
            yield Slot(taken, deadline)
            self.service.observe(taken, self.clock())
        finally:
            self.in_flight -= 1
            self._set_idle_if_idle()

    def raise_if_late(self, slot_deadline: float | None) -> None:
        """Drop work whose start is past its slot's deadline (503 + Retry-After)."""
        if slot_deadline is not None and self.clock() > slot_deadline:
            raise OverloadedError(
                "this prediction waited longer for the inference thread than the agent's "
                "queueing budget allows (the box is overloaded); retry after a second",
                retry_after_s=RETRY_AFTER_S,
            )

    def _set_idle_if_idle(self) -> None:
        if self.in_flight == 0 and self.receiving == 0:
            self._idle.set()

    def start_draining(self) -> None:
        self.draining = True

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no work is admitted or in flight; False if `timeout` passed first."""
        try:
            async with asyncio.timeout(timeout):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True


@dataclass(frozen=True)
class Entry:
    """Admitted work whose photo is being received; `slot()` takes its inference slot."""

    admission: Admission

    def slot(self) -> contextlib.AbstractContextManager[Slot]:
        """The inference slot (the count and delay rules apply again; draining does not)."""
        return self.admission.slot(admitted=True)
