"""Work that must leave no thread behind: loading and self-testing bundles.

llama.cpp spreads a generation over OpenMP (libgomp) threads. Each thread that runs OpenMP work
becomes the master of a team of workers, and keeps them, idle, for as long as it lives. libgomp
counts every such thread in the process, and while it counts more than there are CPUs, its
barriers stop spinning after ~100 turns and sleep instead: a generation then switches threads
at every one of its barriers (about 70 per token, against fewer than 1 per token otherwise).
Measured on a 2-core AMD EPYC (Zen 4): one other thread that had once run llama.cpp, kept alive
in a thread pool, took generation on the llm thread from 82 to 70 tokens/s; once it exited,
86 tokens/s again.

So the llm thread (`GenerationService`) is the only long-lived thread that runs llama.cpp, and
whatever else has to run it (loading a new version and replaying its golden completions, while
the old one still serves) runs through `on_own_thread`: a thread started for that work, at the
same lowered priority as the other background work, that exits when the work is done, and its
OpenMP workers with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from typing import TypeVar

from edge_agent.engine.lane import lower_priority

T = TypeVar("T")


async def on_own_thread(work: Callable[[], T], *, nice: int = 0, name: str = "load") -> T:
    """Run `work` on a new thread, `nice` steps below the caller's priority; its result or
    exception is this coroutine's. Cancelling the caller does not stop `work` (as
    `asyncio.to_thread`); its result is then dropped."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, error: BaseException | None) -> None:
        if future.done():  # the caller was cancelled
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)  # type: ignore[arg-type]

    def run() -> None:
        lower_priority(nice)()
        try:
            result = work()
        except BaseException as exc:  # handed to the awaiting caller, raised there
            outcome: tuple[T | None, BaseException | None] = (None, exc)
        else:
            outcome = (result, None)
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody waits any more
            loop.call_soon_threadsafe(settle, *outcome)

    threading.Thread(target=run, name=name).start()
    return await future
