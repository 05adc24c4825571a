"""Bounded in-flight work and draining: the agent never queues without limit.

A prediction takes a slot before its body is read and gives it back when the answer is sent. With
every slot taken, the caller gets `OverloadedError` at once (503 + Retry-After over HTTP) instead
of joining an unbounded queue; once draining starts (SIGTERM), every new caller gets
`DrainingError` while the ones already admitted finish. Single event loop, so no lock is needed.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

from edge_agent.errors import DrainingError, OverloadedError

RETRY_AFTER_S = 1.0


class Admission:
    """Counts admitted work against `capacity`; `waiting` is the part not yet running."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.in_flight = 0
        self.draining = False
        self._idle = asyncio.Event()
        self._idle.set()

    @contextlib.contextmanager
    def slot(self) -> Iterator[None]:
        """Hold one slot for the duration of the block, or raise without waiting."""
        if self.draining:
            raise DrainingError(
                "the agent is shutting down; send the request again to another agent or in a "
                "few seconds",
                retry_after_s=RETRY_AFTER_S,
            )
        if self.in_flight >= self.capacity:
            raise OverloadedError(
                f"all {self.capacity} inference slots are busy; retry after a second",
                retry_after_s=RETRY_AFTER_S,
            )
        self.in_flight += 1
        self._idle.clear()
        try:
            yield
        finally:
            self.in_flight -= 1
            if self.in_flight == 0:
                self._idle.set()

    def start_draining(self) -> None:
        self.draining = True

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no work is in flight; False if `timeout` passed first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True
