"""Telemetry: one snapshot of how the box is doing, for MQTT and for /metrics.

Latency percentiles over the recent answered predictions per transport, counts by outcome, the
active model versions and their last self-test, process and system figures (CPU, memory, disk
where the state lives, the hottest temperature sensor where the platform exposes one), drift and
shadow comparisons, and what the publisher reports of its connection, queue and outbox. The same
figures are set on the Prometheus gauges. `loop` publishes a snapshot every
`telemetry_interval_s` through the publisher.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from typing import Any

import numpy as np
import psutil

from edge_agent import __version__
from edge_agent.device.models import Models
from edge_agent.device.ports import Publisher
from edge_agent.engine.core import InferenceCore
from edge_agent.engine.shadow import ShadowRunner
from edge_agent.metrics import AgentMetrics
from edge_agent.settings import AgentSettings


class Telemetry:
    """The device's figures, gathered from the engine, the models and the publisher."""

    def __init__(
        self,
        settings: AgentSettings,
        models: Models,
        core: InferenceCore,
        shadow: ShadowRunner,
        metrics: AgentMetrics,
        publisher: Publisher | None,
    ) -> None:
        self.settings = settings
        self.models = models
        self.core = core
        self.shadow = shadow
        self.metrics = metrics
        self.publisher = publisher
        self.started_at = time.time()

    def snapshot(self) -> dict[str, Any]:
        """Gather the figures (blocking calls: run it off the event loop)."""
        ready, reasons = self.models.readiness()
        figures: dict[str, Any] = {
            "at": time.time(),
            "agent_version": __version__,
            "site": self.settings.site,
            "device": self.settings.device,
            "profile": self.models.profile.name,
            "ready": ready,
            "reasons": reasons,
            "uptime_s": round(time.time() - self.started_at, 1),
            "latency_ms": self._percentiles(),
            "outcomes": self._outcomes(),
            "models": [
                {
                    "name": m["name"],
                    "version": m.get("version"),
                    "status": m["status"],
                    "bundle_sha256": m.get("bundle_sha256"),
                    "selftest": m.get("selftest"),
                }
                for m in self.models.describe()
            ],
            "system": self._system(),
            "drift": self.drift_scores(),
            "shadow": self.shadow.describe(),
            "in_flight": self.core.lane.admission.in_flight,
            "disk_full": self.models.disk.full() if self.models.disk is not None else False,
        }
        if self.publisher is not None:
            figures["mqtt"] = self.publisher.health()
        return figures

    def refresh_gauges(self) -> None:
        """Set the gauges /metrics shows that nothing else keeps current."""
        self.metrics.in_flight.set(self.core.lane.admission.in_flight)
        self.models.readiness()
        if self.publisher is not None:
            self.publisher.health()
        self.drift_scores()

    def drift_scores(self) -> dict[str, Any]:
        """Drift per active model, also set on the Prometheus gauges."""
        result: dict[str, Any] = {}
        for name, state in list(self.core.models.items()):
            if state.classifier is None:
                continue
            monitor = self.core.drift_monitor(state.classifier)
            scores = monitor.scores() if monitor is not None else None
            if scores is None:
                continue
            for feature, value in scores["psi"].items():
                self.metrics.drift_psi.labels(name, feature).set(value)
            alert = scores["score"] > self.settings.drift_alert_psi
            self.metrics.drift_alert.labels(name).set(1 if alert else 0)
            result[name] = {**scores, "alert": alert}
        return result

    async def loop(self, publisher: Publisher) -> None:
        """Publish a snapshot every `telemetry_interval_s`."""
        while True:
            await asyncio.sleep(self.settings.telemetry_interval_s)
            figures = await asyncio.to_thread(self.snapshot)
            await publisher.publish_telemetry(figures)

    def _percentiles(self) -> dict[str, dict[str, float]]:
        result = {}
        for transport, window in list(self.core.latencies.items()):
            values = np.array(list(window), dtype=np.float64)
            if values.size:
                p50, p95, p99 = np.percentile(values, [50, 95, 99])
                result[transport] = {
                    "p50": round(float(p50), 2),
                    "p95": round(float(p95), 2),
                    "p99": round(float(p99), 2),
                    "samples": int(values.size),
                }
        return result

    def _outcomes(self) -> dict[str, dict[str, int]]:
        counts: dict[str, dict[str, int]] = {}
        for (transport, outcome), count in list(self.core.outcomes.items()):
            counts.setdefault(transport, {})[outcome] = count
        return counts

    def _system(self) -> dict[str, Any]:
        process = psutil.Process()
        memory = psutil.virtual_memory()
        disk = shutil.disk_usage(self.settings.state_dir)
        system: dict[str, Any] = {
            "cpu_percent": psutil.cpu_percent(interval=None),
            "load_average": list(psutil.getloadavg()),
            "memory_available_mb": round(memory.available / 2**20, 1),
            "process_rss_mb": round(process.memory_info().rss / 2**20, 1),
            "disk_free_mb": round(disk.free / 2**20, 1),
        }
        self.metrics.disk_free.set(disk.free)
        temperature = _hottest()
        if temperature is not None:
            system["temperature_c"] = temperature
            self.metrics.temperature.set(temperature)
        return system


def _hottest() -> float | None:
    reader = getattr(psutil, "sensors_temperatures", None)
    if reader is None:
        return None
    try:
        sensors = reader()
    except (OSError, RuntimeError):
        return None
    readings = [entry.current for entries in sensors.values() for entry in entries if entry.current]
    return round(max(readings), 1) if readings else None
