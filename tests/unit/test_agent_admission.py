"""edge_agent.engine.admission.Admission: a fixed number of slots, refusal instead of queueing, and
draining that lets admitted work finish."""

from __future__ import annotations

import asyncio

import pytest

from edge_agent.engine.admission import Admission
from edge_agent.errors import DrainingError, OverloadedError


def test_up_to_capacity_is_admitted_then_overloaded() -> None:
    admission = Admission(2)
    with admission.slot(), admission.slot():
        assert admission.in_flight == 2
        with pytest.raises(OverloadedError) as caught, admission.slot():
            pass
        assert caught.value.retry_after_s is not None
        assert caught.value.retry_after_s > 0
        assert "all 2 inference slots are busy" in caught.value.message
        assert admission.in_flight == 2  # the refused caller took nothing
    assert admission.in_flight == 0
    with admission.slot():  # slots come back
        assert admission.in_flight == 1


def test_a_slot_is_given_back_when_the_work_fails() -> None:
    admission = Admission(1)
    with pytest.raises(RuntimeError), admission.slot():
        raise RuntimeError("inference blew up")
    assert admission.in_flight == 0
    with admission.slot():
        pass


def test_draining_refuses_new_work_and_lets_admitted_work_finish() -> None:
    admission = Admission(4)
    with admission.slot():
        admission.start_draining()
        with pytest.raises(DrainingError) as caught, admission.slot():
            pass
        assert caught.value.retry_after_s is not None
        assert "shutting down" in caught.value.message
        assert admission.in_flight == 1
    assert admission.in_flight == 0
    with pytest.raises(DrainingError), admission.slot():
        pass


def test_draining_wins_over_overload() -> None:
    admission = Admission(1)
    with admission.slot():
        admission.start_draining()
        with pytest.raises(DrainingError), admission.slot():
            pass


def test_wait_idle_with_nothing_in_flight_is_immediate() -> None:
    async def scenario() -> bool:
        return await Admission(1).wait_idle(timeout=0.01)

    assert asyncio.run(scenario()) is True


def test_wait_idle_times_out_while_work_is_in_flight() -> None:
    async def scenario() -> bool:
        admission = Admission(1)
        with admission.slot():
            return await admission.wait_idle(timeout=0.05)

    assert asyncio.run(scenario()) is False


def test_wait_idle_returns_once_the_last_slot_is_given_back() -> None:
    async def scenario() -> tuple[bool, bool]:
        admission = Admission(2)
        release = asyncio.Event()

        async def work() -> None:
            with admission.slot():
                await release.wait()

        tasks = [asyncio.create_task(work()) for _ in range(2)]
        await asyncio.sleep(0)
        assert admission.in_flight == 2
        admission.start_draining()
        before = await admission.wait_idle(timeout=0.02)
        release.set()
        after = await admission.wait_idle(timeout=5)
        await asyncio.gather(*tasks)
        return before, after

    assert asyncio.run(scenario()) == (False, True)
