"""The device simulator: many simulated boxes speaking the box side of Lineside's protocol.

Each box has its own MQTT 5 connection (retained status with a last will, telemetry, update
reports), verifies release notices with `edge_bundle` and applies the agent's rules to them,
and installs, refuses, fails or goes offline as its `Behaviour` says. All boxes share one asyncio
event loop; a large fleet is spread over several processes. It imports `edge_bundle` and never
`edge_agent`.

- `spec`: `BoxSpec` and `Behaviour` (from Python or TOML), `generate` for a fleet.
- `rules`: the box's update rules, pure.
- `link`: one paho MQTT connection on the running asyncio loop.
- `telemetry`: the telemetry message of a box.
- `fetch`: one bundle's chunk fetch over MQTT, pure (window, timeouts, every chunk checked).
- `download`: a box's downloads, over HTTP or driving a `fetch` on its connection.
- `processes`: a fleet over several processes, the file limit, per-process statistics.
- `box`: one simulated box.
- `runner`: `Simulator` and `SimulatorThread`.
- `cli`: the TOML config and `main`.
"""

from fleet_controller.simulator.cli import SimulatorConfig, load_config, main
from fleet_controller.simulator.rules import BoxUpdates, Release
from fleet_controller.simulator.runner import Simulator, SimulatorThread
from fleet_controller.simulator.spec import Behaviour, BoxSpec, SpecError, generate

__all__ = [
    "Behaviour",
    "BoxSpec",
    "BoxUpdates",
    "Release",
    "Simulator",
    "SimulatorConfig",
    "SimulatorThread",
    "SpecError",
    "generate",
    "load_config",
    "main",
]
