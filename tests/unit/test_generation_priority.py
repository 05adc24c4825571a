"""The llm thread runs `generation_nice` steps below the caller, so that a classification arriving
mid-token takes the CPU from llama.cpp (its OpenMP workers inherit the thread's priority)."""

from __future__ import annotations

import asyncio
import os
import sys
import threading
from typing import Any, cast

import pytest

from edge_agent.engine.generation import GenerationService
from edge_agent.settings import AgentSettings

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="per-thread nice is Linux's")


def _priority() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


@pytest.mark.parametrize("nice", [0, 7])
def test_the_llm_thread_runs_at_generation_nice(nice: int) -> None:
    service = GenerationService(AgentSettings(generation_nice=nice), cast(Any, None))
    base = _priority()
    try:
        assert asyncio.run(service.call(_priority)) == min(19, base + nice)
    finally:
        service.close()
