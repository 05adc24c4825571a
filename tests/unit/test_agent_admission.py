"""edge_agent.engine.admission.Admission: a fixed number of slots, refusal instead of queueing, and
draining that lets admitted work finish; the queueing-delay rule (expected wait = slots held x
measured service time, against a budget), late work dropped, and admission before the photo is in
with the slot taken after, and the inference threads' lower CPU priority (#15)."""

from __future__ import annotations

import asyncio
import os
import re
import sys
import threading

import pytest

from edge_agent.engine.admission import (
    LATE_FACTOR,
    LATE_MIN_S,
    RETRY_AFTER_S,
    SERVICE_WEIGHT,
    Admission,
    DelayBudget,
)
from edge_agent.errors import DrainingError, OverloadedError
from edge_agent.settings import AgentSettings


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


# ---- queueing delay (#15): a fake clock and made-up service times, so no machine speed enters ----
class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def served(admission: Admission, clock: FakeClock, seconds: float) -> None:
    """One prediction alone on the lane, taking `seconds`."""
    with admission.slot():
        clock.now += seconds


def test_until_a_service_time_is_measured_only_the_count_applies() -> None:
    admission = Admission(4, DelayBudget(service_times=1.0), clock=FakeClock())
    assert admission.expected_wait_s() is None
    with admission.slot() as first, admission.slot(), admission.slot(), admission.slot():
        assert first.deadline is None  # nothing to judge lateness by yet
        with pytest.raises(OverloadedError, match="all 4 inference slots are busy"):
            admission.check()


def test_a_prediction_is_refused_when_the_ones_ahead_would_exceed_the_budget() -> None:
    clock = FakeClock()
    admission = Admission(8, DelayBudget(service_times=1.0), clock=clock)
    served(admission, clock, 0.100)
    assert admission.service.seconds == pytest.approx(0.100)
    with admission.slot():  # nobody ahead: no wait
        assert admission.expected_wait_s() == pytest.approx(0.100)
        with admission.slot():  # one ahead: 1 service time, within the budget of 1
            assert admission.expected_wait_s() == pytest.approx(0.200)
            with pytest.raises(OverloadedError) as caught, admission.slot():
                pass
            assert caught.value.retry_after_s == RETRY_AFTER_S
            assert "about 200 ms" in caught.value.message
            assert "budget of 100 ms" in caught.value.message
            assert admission.in_flight == 2  # far below the count of 8: the delay decided
            with pytest.raises(OverloadedError):
                admission.check()  # the arrival-time decision is the same rule
    assert admission.in_flight == 0


def test_the_budget_scales_with_the_service_time_and_has_an_optional_cap_in_ms() -> None:
    clock = FakeClock()
    roomy = Admission(64, DelayBudget(service_times=3.0), clock=clock)
    served(roomy, clock, 0.010)
    with roomy.slot(), roomy.slot(), roomy.slot():  # 3 ahead x 10 ms = 30 ms: within 3 x 10 ms
        roomy.check()
        with roomy.slot(), pytest.raises(OverloadedError):
            roomy.check()
    capped = Admission(64, DelayBudget(service_times=3.0, max_ms=15.0), clock=clock)
    served(capped, clock, 0.010)
    with capped.slot():  # 10 ms ahead: under the 15 ms cap
        capped.check()
        with capped.slot(), pytest.raises(OverloadedError, match="budget of 15 ms"):
            capped.check()


def test_the_service_time_is_the_time_between_departures_while_busy() -> None:
    clock = FakeClock()
    admission = Admission(8, DelayBudget(), clock=clock)
    served(admission, clock, 0.100)  # alone: its whole time in the slot
    assert admission.service.seconds == pytest.approx(0.100)
    # Two overlapping predictions that leave 30 ms apart: the lane serves one every 30 ms, not
    # one every 60 ms (what the second spent in its slot).
    first, second = admission.slot(), admission.slot()
    first.__enter__()
    second.__enter__()
    clock.now += 0.030
    first.__exit__(None, None, None)  # sample: 30 ms
    clock.now += 0.030
    second.__exit__(None, None, None)  # sample: 30 ms after the first left, although it held 60
    expected = 0.100 + SERVICE_WEIGHT * (0.030 - 0.100)
    expected += SERVICE_WEIGHT * (0.030 - expected)
    assert admission.service.seconds == pytest.approx(expected)
    clock.now += 5.0  # an idle gap is not service time
    served(admission, clock, 0.050)
    assert admission.service.seconds == pytest.approx(
        expected + SERVICE_WEIGHT * (0.050 - expected)
    )


def test_failed_work_is_not_a_service_time_sample() -> None:
    clock = FakeClock()
    admission = Admission(2, DelayBudget(), clock=clock)
    with pytest.raises(RuntimeError), admission.slot():
        clock.now += 3.0
        raise RuntimeError("bad photo")
    assert admission.service.seconds is None


def test_work_still_waiting_past_its_slots_deadline_is_dropped() -> None:
    clock = FakeClock()
    admission = Admission(8, DelayBudget(service_times=1.0), clock=clock)
    served(admission, clock, 0.100)
    with admission.slot() as slot:
        assert slot.deadline == pytest.approx(clock.now + LATE_FACTOR * (0.100 + 0.100))
        admission.raise_if_late(slot.deadline)  # on time
        clock.now = slot.deadline + 0.001
        with pytest.raises(OverloadedError, match="waited longer") as caught:
            admission.raise_if_late(slot.deadline)
        assert caught.value.retry_after_s == RETRY_AFTER_S
    admission.raise_if_late(None)  # no deadline, never late


def test_a_fast_models_slot_is_never_late_sooner_than_the_floor() -> None:
    # 5 ms per prediction: four times (budget + service) is 30 ms, less than a lowered-priority
    # thread may wait for a core on a shared box; a lone prediction must not be dropped for it.
    clock = FakeClock()
    admission = Admission(8, DelayBudget(service_times=0.5), clock=clock)
    served(admission, clock, 0.005)
    with admission.slot() as slot:
        assert slot.deadline == pytest.approx(clock.now + LATE_MIN_S)
        clock.now += 0.100
        admission.raise_if_late(slot.deadline)  # 100 ms late to start: still served


def test_admitted_work_holds_no_slot_until_its_photo_is_in() -> None:
    admission = Admission(1, clock=FakeClock())
    receiving = [admission.admit() for _ in range(3)]
    entries = [cm.__enter__() for cm in receiving]  # three slow uploads, admitted at once
    assert (admission.receiving, admission.in_flight) == (3, 0)
    # A photo that is in takes the one slot; an upload that finishes now finds it taken.
    with admission.slot(), pytest.raises(OverloadedError), entries[0].slot():
        pass
    with entries[1].slot():
        assert admission.in_flight == 1
    for cm in receiving:
        cm.__exit__(None, None, None)
    assert (admission.receiving, admission.in_flight) == (0, 0)


def test_arrivals_are_refused_while_draining_but_admitted_uploads_still_get_their_slot() -> None:
    async def scenario() -> tuple[bool, bool]:
        admission = Admission(2)
        with admission.admit() as entry:
            admission.start_draining()
            with pytest.raises(DrainingError), admission.admit():
                pass
            before = await admission.wait_idle(timeout=0.02)  # draining waits for the upload
            with entry.slot():
                assert admission.in_flight == 1
        return before, await admission.wait_idle(timeout=1)

    assert asyncio.run(scenario()) == (False, True)


def test_by_default_a_prediction_is_admitted_only_when_none_holds_a_slot() -> None:
    # #15: at 10x load on 2 cores a second prediction in flight only waited; the default budget
    # (half a service time) admits one only when the lane is free.
    default = AgentSettings.model_fields["max_queue_delay_services"].default
    clock = FakeClock()
    admission = Admission(8, DelayBudget(service_times=default), clock=clock)
    served(admission, clock, 0.100)
    assert admission.refusal() is None
    with admission.slot():
        error = admission.refusal()
        assert isinstance(error, OverloadedError)
        assert "budget of 50 ms" in error.message
    assert admission.refusal() is None


def test_refusal_reads_what_admission_would_decide_and_changes_nothing() -> None:
    # The HTTP edge asks `refusal()` before routing (#15); it must agree with `admit`.
    clock = FakeClock()
    admission = Admission(8, DelayBudget(service_times=1.0), clock=clock)
    assert admission.refusal() is None
    served(admission, clock, 0.100)
    with admission.slot(), admission.slot():  # 200 ms ahead, over the 100 ms budget
        before = (admission.in_flight, admission.receiving, admission.service.seconds)
        error = admission.refusal()
        assert isinstance(error, OverloadedError)
        assert error.retry_after_s == RETRY_AFTER_S
        assert "budget of 100 ms" in error.message
        assert (admission.in_flight, admission.receiving, admission.service.seconds) == before
        with pytest.raises(OverloadedError, match=re.escape(error.message)), admission.admit():
            pass
    assert admission.refusal() is None
    admission.start_draining()
    assert isinstance(admission.refusal(), DrainingError)
    assert admission.refusal(admitted=True) is None  # an admitted upload still gets its slot


@pytest.mark.skipif(sys.platform != "linux", reason="the nice value is per thread on Linux only")
def test_inference_threads_run_below_the_event_loops_priority() -> None:
    from concurrent.futures import ThreadPoolExecutor

    from edge_agent.engine.lane import lower_priority

    def own_nice() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    base = own_nice()
    with ThreadPoolExecutor(1, initializer=lower_priority(5)) as lowered:
        assert lowered.submit(own_nice).result() == min(19, base + 5)
    with ThreadPoolExecutor(1, initializer=lower_priority(0)) as same:
        assert same.submit(own_nice).result() == base
    assert own_nice() == base  # the caller's own priority is untouched


@pytest.mark.skipif(sys.platform != "linux", reason="the nice value is per thread on Linux only")
def test_work_the_event_loop_hands_to_threads_runs_below_its_priority() -> None:
    # ONNX Runtime's own threads inherit the priority of the thread that loads the model (#15).
    from edge_agent.app.server import lower_background_priority

    def own_nice() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    async def scenario() -> tuple[int, int]:
        lower_background_priority(asyncio.get_running_loop(), 5)
        return own_nice(), await asyncio.to_thread(own_nice)

    base = own_nice()
    assert asyncio.run(scenario()) == (base, min(19, base + 5))
