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
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import timedelta

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from fleet_controller.errors import BadMessageError
from fleet_controller.registry import Message, Registry, StatusMessage, TelemetryMessage
from fleet_controller.rollouts import Rollouts

ACTIVE = ("running", "paused", "halted", "rolling_back")


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
        self.prometheus.register(_FleetCollector(registry, rollouts, stale_after_s))

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
