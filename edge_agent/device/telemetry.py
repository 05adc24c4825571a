"""Telemetry: one snapshot of how the box is doing, for MQTT and for /metrics.

Latency percentiles over the recent answered predictions per transport, counts by outcome, the
active model versions and their last self-test, process and system figures (CPU, memory, disk
where the state lives, the hottest temperature sensor where the platform exposes one), drift and
shadow comparisons, and what the publisher reports of its connection, queue and outbox. For a
fleet controller it also says who the box is (site, device, line, labels, update groups) and, per
model, the latency and outcomes of its active version since that version became active. The same
figures are set on the Prometheus gauges. `loop` publishes a snapshot every
`telemetry_interval_s` through the publisher, and at once when `publish_soon` asks for one (the
MQTT link connected, an update was committed or rolled back), so central learns of a change
without waiting a whole period.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import time
from collections.abc import Iterable
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
        self._wanted = asyncio.Event()

    def publish_soon(self) -> None:
        """Ask `loop` for a snapshot now, besides the periodic ones (call on the event loop).

        Requests made before the snapshot goes out share it; with telemetry off it does nothing.
        """
        self._wanted.set()

    def snapshot(self) -> dict[str, Any]:
        """Gather the figures (blocking calls: run it off the event loop)."""
        ready, reasons = self.models.readiness()
        figures: dict[str, Any] = {
            "at": time.time(),
            "agent_version": __version__,
            "site": self.settings.site,
            "device": self.settings.device,
            "line": self.settings.line,
            "labels": dict(self.settings.labels),
            "groups": list(self.settings.update_groups),
            "profile": self.models.profile.name,
            "ready": ready,
            "reasons": reasons,
            "uptime_s": round(time.time() - self.started_at, 1),
            "latency_ms": self._percentiles(),
            "outcomes": self._outcomes(),
            "models": [self._model(m) for m in self.models.describe()],
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
        """Publish a snapshot every `telemetry_interval_s`, and whenever `publish_soon` asks."""
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.telemetry_interval_s):
                    await self._wanted.wait()
            self._wanted.clear()
            figures = await asyncio.to_thread(self.snapshot)
            await publisher.publish_telemetry(figures)

    def _model(self, described: dict[str, Any]) -> dict[str, Any]:
        """One entry of `models`: what serves, and how its active version has done so far."""
        name, version = described["name"], described.get("version")
        key = (name, version) if isinstance(version, int) else None
        latencies = self.core.model_latencies.get(key) if key else None
        outcomes = self.core.version_outcomes.get(key) if key else None
        return {
            "name": name,
            "version": version,
            "status": described["status"],
            "bundle_sha256": described.get("bundle_sha256"),
            "selftest": described.get("selftest"),
            "latency_ms": _latency(latencies),
            "outcomes": dict(outcomes) if outcomes else {},
        }

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


def _latency(samples: Iterable[float] | None) -> dict[str, Any]:
    """p50 and p95 (ms) of recent samples, and how many; the percentiles are None without any."""
    # One C-level copy first: the event loop appends to the window while this thread reads it.
    values = np.array(list(samples or ()), dtype=np.float64)
    if not values.size:
        return {"p50": None, "p95": None, "samples": 0}
    p50, p95 = np.percentile(values, [50, 95])
    return {"p50": round(float(p50), 2), "p95": round(float(p95), 2), "samples": int(values.size)}


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
