"""Telemetry: one snapshot of how the box is doing, for MQTT and for /metrics.

Latency percentiles over the recent answered predictions per transport, counts by outcome, the
active model versions and their last self-test, process and system figures (CPU, memory, disk
where the state lives, the hottest temperature sensor where the platform exposes one), and the
depth of the MQTT queue and of the outbox. The same figures are set on the Prometheus gauges.
"""

from __future__ import annotations

import shutil
import time
from typing import TYPE_CHECKING, Any

import numpy as np
import psutil

from edge_agent import __version__

if TYPE_CHECKING:
    from edge_agent.agent import Agent


def snapshot(agent: Agent) -> dict[str, Any]:
    """Gather the figures (blocking calls: run it off the event loop)."""
    ready, reasons = agent.readiness()
    figures: dict[str, Any] = {
        "at": time.time(),
        "agent_version": __version__,
        "site": agent.settings.site,
        "device": agent.settings.device,
        "profile": agent.profile.name,
        "ready": ready,
        "reasons": reasons,
        "uptime_s": round(time.time() - agent.started_at, 1),
        "latency_ms": _percentiles(agent),
        "outcomes": _outcomes(agent),
        "models": [
            {
                "name": m["name"],
                "version": m.get("version"),
                "status": m["status"],
                "bundle_sha256": m.get("bundle_sha256"),
                "selftest": m.get("selftest"),
            }
            for m in agent.describe_models()
        ],
        "system": _system(agent),
        "drift": drift_scores(agent),
        "shadow": agent.core.shadow.describe(),
        "in_flight": agent.core.admission.in_flight,
    }
    if agent.mqtt is not None:
        depth = agent.mqtt.outbox.depth()
        figures["mqtt"] = {
            "connected": agent.mqtt.link.connected,
            "queued": agent.mqtt.queue.qsize(),
            "shed": agent.mqtt.shed,
            "outbox": depth,
        }
        agent.metrics.outbox_messages.set(depth["messages"])
        agent.metrics.outbox_bytes.set(depth["bytes"])
    return figures


def drift_scores(agent: Agent) -> dict[str, Any]:
    """Drift per active model, also set on the Prometheus gauges."""
    result: dict[str, Any] = {}
    for name, state in list(agent.core.models.items()):
        if state.classifier is None:
            continue
        monitor = agent.core.drift_monitor(state.classifier)
        scores = monitor.scores() if monitor is not None else None
        if scores is None:
            continue
        for feature, value in scores["psi"].items():
            agent.metrics.drift_psi.labels(name, feature).set(value)
        alert = scores["score"] > agent.settings.drift_alert_psi
        agent.metrics.drift_alert.labels(name).set(1 if alert else 0)
        result[name] = {**scores, "alert": alert}
    return result


def _percentiles(agent: Agent) -> dict[str, dict[str, float]]:
    result = {}
    for transport, window in list(agent.core.latencies.items()):
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


def _outcomes(agent: Agent) -> dict[str, dict[str, int]]:
    counts: dict[str, dict[str, int]] = {}
    for (transport, outcome), count in list(agent.core.outcomes.items()):
        counts.setdefault(transport, {})[outcome] = count
    return counts


def _system(agent: Agent) -> dict[str, Any]:
    process = psutil.Process()
    memory = psutil.virtual_memory()
    disk = shutil.disk_usage(agent.settings.state_dir)
    system: dict[str, Any] = {
        "cpu_percent": psutil.cpu_percent(interval=None),
        "load_average": list(psutil.getloadavg()),
        "memory_available_mb": round(memory.available / 2**20, 1),
        "process_rss_mb": round(process.memory_info().rss / 2**20, 1),
        "disk_free_mb": round(disk.free / 2**20, 1),
    }
    agent.metrics.disk_free.set(disk.free)
    temperature = _hottest()
    if temperature is not None:
        system["temperature_c"] = temperature
        agent.metrics.temperature.set(temperature)
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
