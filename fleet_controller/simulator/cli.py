"""`python -m fleet_controller.simulator --config sim.toml`: simulated boxes from a TOML file.

```toml
release_keys = ["keys/release.pub"]     # relative to this file
telemetry_interval_s = 5

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
import logging
import signal
import sys
import tomllib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from edge_bundle.errors import BundleError
from edge_bundle.signing import TrustStore
from fleet_controller.simulator.runner import Simulator
from fleet_controller.simulator.spec import BoxSpec, SpecError, generate

TOP_KEYS = {"broker", "release_keys", "telemetry_interval_s", "boxes", "generate"}


@dataclass(frozen=True)
class SimulatorConfig:
    host: str
    port: int
    release_trust: TrustStore
    boxes: list[BoxSpec]
    telemetry_interval_s: float

    def simulator(self) -> Simulator:
        return Simulator(
            self.host,
            self.port,
            self.boxes,
            self.release_trust,
            telemetry_interval_s=self.telemetry_interval_s,
        )


def load_config(path: Path) -> SimulatorConfig:
    """Read and check a simulator TOML file; every problem is a `SpecError` naming it."""
    try:
        document = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise SpecError(f"cannot read the simulator config {path}: {exc}") from exc
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
    return SimulatorConfig(
        host=str(broker.get("host", "127.0.0.1")),
        port=int(broker.get("port", 1883)),
        release_trust=trust,
        boxes=boxes,
        telemetry_interval_s=float(document.get("telemetry_interval_s", 5.0)),
    )


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fleet-controller simulate",
        description="Simulated Lineside boxes: status, telemetry, release notices, update reports.",
    )
    parser.add_argument("--config", type=Path, required=True, help="the simulator TOML file")
    parser.add_argument("--host", help="the broker host (overrides [broker] host)")
    parser.add_argument("--port", type=int, help="the broker port (overrides [broker] port)")
    parser.add_argument("--verbose", action="store_true", help="log every box's connection")
    return parser


async def _serve(simulator: Simulator) -> None:
    until = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, until.set)
    await simulator.run(until)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO)
    try:
        config = load_config(args.config)
    except SpecError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    if args.host or args.port:
        config = replace(config, host=args.host or config.host, port=args.port or config.port)
    logging.getLogger(__name__).info(
        "simulating %d boxes against %s:%d", len(config.boxes), config.host, config.port
    )
    simulator = config.simulator()
    asyncio.run(_serve(simulator))
    return 0
