"""`python -m fleet_controller.simulator --config sim.toml`: simulated boxes from a TOML file.

`--boxes N` replaces the `[generate]` count, `--processes P` spreads the fleet over P processes
(`processes.run_processes`), `--stats FILE` writes a process's figures as JSON.

```toml
release_keys = ["keys/release.pub"]     # relative to this file
telemetry_interval_s = 5
connect_per_s = 500                      # optional: pace the connects (per process), with jitter
keepalive_s = 60
fetch = { window = 4, timeout_s = 10 }   # chunks over MQTT: requests in flight, re-request after

[broker]
host = "127.0.0.1"
port = 1883

[[boxes]]                                # any number; and/or a [generate] table
site = "plant-a"
device = "box1"
groups = ["line1"]
models = { defects = 3 }
behaviour = { outcome = "fail_probation", install_s = 2, offline = [[30, 60]] }

[generate]
count = 200
site = "plant-{site}"
sites = 4
device = "sim-{n:04d}"
groups = ["line1"]
old_agents = 0.1
fractions = { commit = 0.85, fail_probation = 0.05, refuse = 0.05, offline = 0.05 }
```
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from edge_bundle.errors import BundleError
from edge_bundle.signing import TrustStore
from fleet_controller.simulator.fetch import FetchSettings
from fleet_controller.simulator.processes import (
    StatsWriter,
    check_fd_limit,
    parse_slice,
    raise_fd_limit,
    run_processes,
)
from fleet_controller.simulator.runner import Simulator
from fleet_controller.simulator.spec import BoxSpec, SpecError, generate

TOP_KEYS = {
    "broker",
    "release_keys",
    "telemetry_interval_s",
    "boxes",
    "generate",
    "connect_per_s",
    "keepalive_s",
    "fetch",
}


@dataclass(frozen=True)
class SimulatorConfig:
    host: str
    port: int
    release_trust: TrustStore
    boxes: list[BoxSpec]
    telemetry_interval_s: float
    connect_per_s: float | None = None
    keepalive_s: int = 30
    fetch: FetchSettings = field(default_factory=FetchSettings)

    def simulator(self) -> Simulator:
        return Simulator(
            self.host,
            self.port,
            self.boxes,
            self.release_trust,
            telemetry_interval_s=self.telemetry_interval_s,
            fetch=self.fetch,
            connect_per_s=self.connect_per_s,
            keepalive_s=self.keepalive_s,
        )


def load_config(path: Path, *, boxes: int | None = None) -> SimulatorConfig:
    """Read and check a simulator TOML file; every problem is a `SpecError` naming it.

    `boxes` replaces the `[generate]` table's count."""
    try:
        document = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise SpecError(f"cannot read the simulator config {path}: {exc}") from exc
    if boxes is not None:
        if "generate" not in document:
            raise SpecError(f"--boxes needs a [generate] table in {path} to make the boxes from")
        document["generate"] = {**document["generate"], "count": boxes}
    return config_from(document, path.parent)


def config_from(document: dict[str, Any], base: Path) -> SimulatorConfig:
    unknown = sorted(set(document) - TOP_KEYS)
    if unknown:
        raise SpecError(
            f"unknown keys {unknown} in the simulator config; allowed: {sorted(TOP_KEYS)}"
        )
    broker = dict(document.get("broker", {}))
    keys = [base / str(p) for p in document.get("release_keys", [])]
    if not keys:
        raise SpecError("the simulator config needs release_keys = [paths of release .pub files]")
    try:
        trust = TrustStore.from_files(keys)
    except (BundleError, OSError) as exc:
        raise SpecError(f"cannot read the release keys {keys}: {exc}") from exc
    boxes = [BoxSpec.from_toml(table) for table in document.get("boxes", [])]
    if "generate" in document:
        boxes += generate(document["generate"])
    if not boxes:
        raise SpecError("the simulator config lists no boxes: add [[boxes]] or a [generate] table")
    fetch = dict(document.get("fetch", {}))
    try:
        settings = FetchSettings(**fetch)
        rate = document.get("connect_per_s")
        return SimulatorConfig(
            host=str(broker.get("host", "127.0.0.1")),
            port=int(broker.get("port", 1883)),
            release_trust=trust,
            boxes=boxes,
            telemetry_interval_s=float(document.get("telemetry_interval_s", 5.0)),
            connect_per_s=None if rate is None else float(rate),
            keepalive_s=int(document.get("keepalive_s", 30)),
            fetch=settings,
        )
    except (TypeError, ValueError) as exc:
        raise SpecError(
            f"the simulator config is not valid ({exc}); fetch takes window and timeout_s, "
            "connect_per_s and keepalive_s are numbers"
        ) from exc


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fleet-controller simulate",
        description="Simulated Lineside boxes: status, telemetry, release notices, update reports.",
    )
    parser.add_argument("--config", type=Path, required=True, help="the simulator TOML file")
    parser.add_argument("--host", help="the broker host (overrides [broker] host)")
    parser.add_argument("--port", type=int, help="the broker port (overrides [broker] port)")
    parser.add_argument("--verbose", action="store_true", help="log every box's connection")
    parser.add_argument("--boxes", type=int, help="how many boxes [generate] makes (its count)")
    parser.add_argument(
        "--processes", type=int, default=1, help="spread the boxes over this many processes"
    )
    parser.add_argument("--slice", help="K/P: run boxes K, K+P, ... only (set by --processes)")
    parser.add_argument("--stats", type=Path, help="write this process's figures here (JSON)")
    parser.add_argument("--telemetry-interval", type=float, help="seconds between telemetry")
    parser.add_argument("--connect-per-s", type=float, help="connects per second, per process")
    return parser


async def _serve(simulator: Simulator, stats: StatsWriter | None) -> None:
    until = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, until.set)
    writer = asyncio.create_task(stats.run()) if stats is not None else None
    try:
        await simulator.run(until)
    finally:
        if writer is not None:
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await writer
        if stats is not None:
            stats.write()


def _child_argv(args: argparse.Namespace) -> list[str]:
    """The options every process of a `--processes` run gets (all but the fan-out ones)."""
    argv = ["--config", str(args.config)]
    for flag, value in (
        ("--host", args.host),
        ("--port", args.port),
        ("--boxes", args.boxes),
        ("--telemetry-interval", args.telemetry_interval),
        ("--connect-per-s", args.connect_per_s),
    ):
        if value is not None:
            argv += [flag, str(value)]
    return argv + (["--verbose"] if args.verbose else [])


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO)
    raise_fd_limit()
    if args.processes > 1 and args.slice is None:
        stats_dir = args.stats.parent if args.stats is not None else None
        return run_processes(_child_argv(args), args.processes, stats_dir)
    try:
        config = load_config(args.config, boxes=args.boxes)
        slice_ = parse_slice(args.slice) if args.slice else (0, 1)
        config = replace(
            config,
            host=args.host or config.host,
            port=args.port or config.port,
            boxes=config.boxes[slice_[0] :: slice_[1]],
            telemetry_interval_s=args.telemetry_interval or config.telemetry_interval_s,
            connect_per_s=args.connect_per_s or config.connect_per_s,
        )
        check_fd_limit(len(config.boxes))
    except SpecError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    logging.getLogger(__name__).info(
        "simulating %d boxes against %s:%d", len(config.boxes), config.host, config.port
    )
    simulator = config.simulator()
    stats = StatsWriter(args.stats, simulator, slice_) if args.stats is not None else None
    asyncio.run(_serve(simulator, stats))
    return 0
