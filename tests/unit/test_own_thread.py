"""`on_own_thread`: the work's result or error comes back, the thread that ran it is gone once it
has, it runs at the lowered priority, and a cancelled caller leaves nothing broken."""

from __future__ import annotations

import asyncio
import os
import sys
import threading

import pytest

from edge_agent.engine.threads import on_own_thread


def test_the_result_comes_back_and_the_thread_has_exited() -> None:
    ran_on: list[threading.Thread] = []

    def work() -> int:
        ran_on.append(threading.current_thread())
        return 42

    assert asyncio.run(on_own_thread(work)) == 42
    (thread,) = ran_on
    assert thread is not threading.main_thread()
    thread.join(5)
    assert not thread.is_alive()


def test_an_error_is_raised_to_the_caller() -> None:
    def work() -> None:
        raise ValueError("the bundle is broken")

    with pytest.raises(ValueError, match="the bundle is broken"):
        asyncio.run(on_own_thread(work))


def test_each_call_gets_a_new_thread() -> None:
    async def run() -> set[int]:
        return {await on_own_thread(threading.get_ident) for _ in range(3)}

    main = threading.get_ident()
    idents = asyncio.run(run())
    assert main not in idents


@pytest.mark.skipif(sys.platform != "linux", reason="the nice value is per thread on Linux only")
def test_the_work_runs_at_the_lowered_priority() -> None:
    def priority() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    base = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    assert asyncio.run(on_own_thread(priority, nice=5)) == min(19, base + 5)
    assert asyncio.run(on_own_thread(priority)) == base


def test_a_cancelled_caller_drops_the_result_and_the_loop_carries_on() -> None:
    release = threading.Event()
    finished = threading.Event()

    def work() -> str:
        release.wait(5)
        finished.set()
        return "late"

    async def run() -> str:
        task = asyncio.create_task(on_own_thread(work))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        release.set()
        await asyncio.to_thread(finished.wait, 5)
        await asyncio.sleep(0.05)  # the dropped result reaches the loop
        return await on_own_thread(lambda: "next")

    assert asyncio.run(run()) == "next"
    assert finished.is_set()
