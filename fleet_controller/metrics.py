"""The controller's Prometheus figures: boxes by state and version, rollout progress, gates.

Fleet figures are read from the database at scrape time (a custom collector), so they are never
stale and a restarted controller shows them at once; message counters live in this process.

    fleet_boxes{state}                         online / offline / stale
    fleet_boxes_by_version{model,version}      boxes reporting that version active
    fleet_rollout_boxes{rollout,state}         boxes of a rollout by their state in it
    fleet_rollout_info{rollout,status,phase}   1 per rollout (status and phase as labels)
    fleet_rollout_wave{rollout}                the current wave (of fleet_rollout_waves)
    fleet_gate_value{rollout,gate}             the gate's last figure
    fleet_gate_failed{rollout,gate}            1 when the gate's last verdict was fail
    fleet_messages_total{kind}                 messages stored, by kind
    fleet_rejected_total{kind,reason}          messages rejected, by why
    fleet_leader                               1 while this process leads, 0 on a standby
    fleet_ingest_lag_seconds                   histogram: stored (committed) minus received
                                               from the broker, per message
    fleet_ingest_age_seconds                   histogram: stored minus the box's own `at`
                                               (telemetry and reports that carry one)
    fleet_ingest_lag_p95_seconds               p95 of the ingest lag over the last 1000
    fleet_ingest_batch_messages                histogram: messages per ingest transaction
    fleet_duplicates_total{kind}               reports already stored, skipped (redeliveries)
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterator
from datetime import timedelta

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from fleet_controller.errors import BadMessageError
from fleet_controller.registry import Message, Registry, StatusMessage, TelemetryMessage
from fleet_controller.rollouts import Rollouts

ACTIVE = ("running", "paused", "halted", "rolling_back")
#: Seconds: from a few milliseconds (keeping up) to past the telemetry period (falling behind).
LAG_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 5000)
RECENT_LAGS = 1000


class FleetMetrics:
    """One per controller: its own Prometheus registry, rendered by the API's /metrics."""

    def __init__(
        self,
        registry: Registry,
        rollouts: Rollouts,
        *,
        stale_after_s: float,
        leading: Callable[[], bool] = lambda: True,
    ) -> None:
        self.prometheus = CollectorRegistry()
        self.leader = Gauge(
            "fleet_leader", "1 while this process leads, 0 on a standby", registry=self.prometheus
        )
        self.leader.set_function(lambda: 1.0 if leading() else 0.0)
        self.messages = Counter(
            "fleet_messages", "Messages stored, by kind", ["kind"], registry=self.prometheus
        )
        self.rejections = Counter(
            "fleet_rejected",
            "Messages rejected, by kind and why",
            ["kind", "reason"],
            registry=self.prometheus,
        )
        self.lag = Histogram(
            "fleet_ingest_lag_seconds",
            "Stored minus received from the broker, per message",
            buckets=LAG_BUCKETS,
            registry=self.prometheus,
        )
        self.age = Histogram(
            "fleet_ingest_age_seconds",
            "Stored minus the box's own timestamp, per message that carries one",
            buckets=LAG_BUCKETS,
            registry=self.prometheus,
        )
        self.batches = Histogram(
            "fleet_ingest_batch_messages",
            "Messages stored per ingest transaction",
            buckets=BATCH_BUCKETS,
            registry=self.prometheus,
        )
        self.duplicates = Counter(
            "fleet_duplicates",
            "Reports already stored, skipped (redeliveries)",
            ["kind"],
            registry=self.prometheus,
        )
        self._recent: deque[float] = deque(maxlen=RECENT_LAGS)
        self._recent_lock = threading.Lock()
        recent = Gauge(
            "fleet_ingest_lag_p95_seconds",
            f"p95 of the ingest lag over the last {RECENT_LAGS} messages",
            registry=self.prometheus,
        )
        recent.set_function(self.recent_lag_p95)
        self.prometheus.register(_FleetCollector(registry, rollouts, stale_after_s))

    def ingested(self, lag_s: float | None, age_s: float | None) -> None:
        """One message stored: its lag since it arrived, and since the box stamped it."""
        if lag_s is not None:
            self.lag.observe(max(0.0, lag_s))
            with self._recent_lock:
                self._recent.append(max(0.0, lag_s))
        if age_s is not None:
            self.age.observe(max(0.0, age_s))

    def batch(self, size: int) -> None:
        self.batches.observe(size)

    def duplicate(self, kind: str) -> None:
        self.duplicates.labels(kind).inc()

    def recent_lag_p95(self) -> float:
        """p95 of the last `RECENT_LAGS` ingest lags (0 before any)."""
        with self._recent_lock:
            lags = sorted(self._recent)
        if not lags:
            return 0.0
        return lags[min(len(lags) - 1, int(0.95 * len(lags)))]

    def received(self, message: Message) -> None:
        if isinstance(message, StatusMessage):
            kind = "status"
        elif isinstance(message, TelemetryMessage):
            kind = "telemetry"
        else:
            kind = "update"
        self.messages.labels(kind).inc()

    def rejected(self, exc: BadMessageError) -> None:
        self.rejections.labels(exc.kind, exc.reason).inc()

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.prometheus), CONTENT_TYPE_LATEST


class _FleetCollector(Collector):
    def __init__(self, registry: Registry, rollouts: Rollouts, stale_after_s: float) -> None:
        self.registry = registry
        self.rollouts = rollouts
        self.stale_after = timedelta(seconds=stale_after_s)

    def collect(self) -> Iterator[Metric]:
        boxes = GaugeMetricFamily("fleet_boxes", "Boxes by connection state", labels=["state"])
        for state, count in self.registry.counts_by_state(stale_after=self.stale_after).items():
            boxes.add_metric([state], count)
        yield boxes
        versions = GaugeMetricFamily(
            "fleet_boxes_by_version", "Boxes by active model version", labels=["model", "version"]
        )
        for (model, version), count in sorted(self.registry.counts_by_version().items()):
            versions.add_metric([model, str(version)], count)
        yield versions
        yield from self._rollouts()

    def _rollouts(self) -> Iterator[Metric]:
        info = GaugeMetricFamily(
            "fleet_rollout_info", "One per rollout", labels=["rollout", "status", "phase"]
        )
        boxes = GaugeMetricFamily(
            "fleet_rollout_boxes", "Boxes of a rollout by state", labels=["rollout", "state"]
        )
        wave = GaugeMetricFamily("fleet_rollout_wave", "Current wave", labels=["rollout"])
        waves = GaugeMetricFamily("fleet_rollout_waves", "Number of waves", labels=["rollout"])
        value = GaugeMetricFamily("fleet_gate_value", "Gate figure", labels=["rollout", "gate"])
        failed = GaugeMetricFamily(
            "fleet_gate_failed", "1 when the gate failed", labels=["rollout", "gate"]
        )
        for summary in self.rollouts.list():
            rollout = str(summary["id"])
            info.add_metric([rollout, str(summary["status"]), str(summary["phase"])], 1)
            for state, count in summary["counts"].items():
                boxes.add_metric([rollout, state], count)
            wave.add_metric([rollout], summary["wave"])
            waves.add_metric([rollout], summary["waves"])
            if summary["status"] not in ACTIVE:
                continue
            for gate in self.rollouts.gates(rollout):
                if gate.get("value") is not None:
                    value.add_metric([rollout, gate["name"]], float(gate["value"]))
                failed.add_metric([rollout, gate["name"]], 1 if gate["status"] == "fail" else 0)
        yield from (info, boxes, wave, waves, value, failed)
