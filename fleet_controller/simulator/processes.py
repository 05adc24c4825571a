"""A large simulated fleet over several processes, each with its own asyncio loop and slice.

One process of paho clients on one loop holds a few thousand boxes; past that the loop itself
(one core) is the limit, so `run_processes` starts `processes` copies of the simulator, each
given `--slice K/P` (boxes K, K+P, K+2P, ... of the same generated fleet), forwards SIGINT and
SIGTERM to them, and returns when all have stopped. Every process raises its open-file soft
limit to the hard limit first (one socket per box). `StatsWriter` writes a process's figures
(its boxes' `Simulator.stats`, its RSS before and after connecting, its CPU seconds) to a JSON
file every few seconds and at exit, which is how a benchmark reads what the boxes saw.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fleet_controller.simulator.runner import Simulator
from fleet_controller.simulator.spec import SpecError

STATS_EVERY_S = 2.0


def raise_fd_limit() -> tuple[int, int]:
    """Raise this process's open-file soft limit to its hard limit; returns (soft, hard)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass  # keep the old limit; `check_fd_limit` says what to do if it is too low
    return soft, hard


def check_fd_limit(boxes: int) -> None:
    """Refuse to start more boxes than this process can open sockets for."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = boxes + 64  # the sockets, plus the interpreter's own files and the HTTP client
    if soft < needed:
        raise SpecError(
            f"{boxes} boxes need about {needed} open files in one process, but the limit is "
            f"{soft} (hard {hard}); use more --processes or raise the limit (ulimit -n)"
        )


def parse_slice(text: str) -> tuple[int, int]:
    """`K/P` -> (K, P), checked."""
    index, _, count = text.partition("/")
    try:
        k, p = int(index), int(count)
    except ValueError:
        raise SpecError(f"--slice must be K/P with whole numbers, like 0/4, not {text!r}") from None
    if not 0 <= k < p:
        raise SpecError(f"--slice {text}: K must be from 0 to P-1")
    return k, p


def rss_kib() -> int:
    """This process's resident set size now (Linux /proc; 0 elsewhere)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class StatsWriter:
    """Writes a simulator process's figures to `path` every `STATS_EVERY_S` and at the end."""

    def __init__(self, path: Path, simulator: Simulator, slice_: tuple[int, int]) -> None:
        self.path = path
        self.simulator = simulator
        self.slice = slice_
        self.rss_before_kib = rss_kib()
        self.started = time.monotonic()
        self.connected_after_s: float | None = None
        self.rss_connected_kib: int | None = None
        self.cpu_connected_s: float | None = None

    def figures(self) -> dict[str, Any]:
        stats = self.simulator.stats()
        times = os.times()
        cpu = times.user + times.system
        if self.connected_after_s is None and stats["online"] == stats["boxes"]:
            self.connected_after_s = time.monotonic() - self.started
            self.rss_connected_kib = rss_kib()
            self.cpu_connected_s = cpu
        return {
            "pid": os.getpid(),
            "slice": list(self.slice),
            "at": time.time(),
            "rss_before_kib": self.rss_before_kib,
            "rss_kib": rss_kib(),
            "rss_connected_kib": self.rss_connected_kib,
            "connected_after_s": self.connected_after_s,
            "cpu_s": cpu,
            "cpu_connected_s": self.cpu_connected_s,
            "fd_limit": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
            **stats,
        }

    def write(self) -> None:
        partial = self.path.with_suffix(".tmp")
        partial.write_text(json.dumps(self.figures()))
        partial.replace(self.path)

    async def run(self) -> None:
        while True:
            self.write()
            await asyncio.sleep(STATS_EVERY_S)


def run_processes(argv: Sequence[str], processes: int, stats_dir: Path | None) -> int:
    """`processes` simulator processes, each with `argv` and its own `--slice`; waits for all."""
    raise_fd_limit()
    children: list[subprocess.Popen[bytes]] = []
    for k in range(processes):
        command = [sys.executable, "-m", "fleet_controller.simulator", *argv]
        command += ["--slice", f"{k}/{processes}"]
        if stats_dir is not None:
            stats_dir.mkdir(parents=True, exist_ok=True)
            command += ["--stats", str(stats_dir / f"sim-{k}.json")]
        children.append(subprocess.Popen(command))

    def forward(number: int, _frame: object) -> None:
        for child in children:
            if child.poll() is None:
                child.send_signal(number)

    for number in (signal.SIGINT, signal.SIGTERM):
        signal.signal(number, forward)
    codes = []
    for child in children:
        code = child.wait()
        if code != 0:
            forward(signal.SIGTERM, None)  # one slice failed: stop the others too
        codes.append(code)
    return max((abs(code) for code in codes), default=0)
