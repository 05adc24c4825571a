"""Prometheus metrics of one agent, in a registry the agent owns (no module-level state).

Names follow Prometheus conventions (`_total` counters, `_seconds` histograms). Process CPU,
memory and file descriptors come from prometheus-client's process collector; Python GC and
platform info from its own collectors.
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client import (
    gc_collector as _gc,
)
from prometheus_client import (
    platform_collector as _platform,
)
from prometheus_client import (
    process_collector as _process,
)

#: From 1 ms to 2.5 s, dense around the 100-200 ms budget.
LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.125, 0.15,
    0.2, 0.3, 0.5, 1.0, 2.5,
)  # fmt: skip
STAGES = ("receive", "decode", "preprocess", "infer", "postprocess")


class AgentMetrics:
    """Every metric the agent exports."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        _process.ProcessCollector(registry=self.registry)
        _platform.PlatformCollector(registry=self.registry)
        _gc.GCCollector(registry=self.registry)
        r = self.registry
        self.requests = Counter(
            "lineside_predictions_total",
            "Prediction requests by model, transport and outcome (ok or an error code)",
            ["model", "transport", "outcome"],
            registry=r,
        )
        self.stage_seconds = Histogram(
            "lineside_stage_seconds",
            "Time per pipeline stage of successful predictions",
            ["model", "stage"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.request_seconds = Histogram(
            "lineside_http_request_seconds",
            "Server-side time from request received to response sent, by route and status class",
            ["route", "status"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge(
            "lineside_in_flight", "Predictions admitted and not yet answered", registry=r
        )
        self.queued = Gauge(
            "lineside_queued",
            "Admitted predictions waiting for the inference thread",
            registry=r,
        )
        self.capacity = Gauge(
            "lineside_in_flight_capacity", "Most predictions admitted at once", registry=r
        )
        self.model_info = Gauge(
            "lineside_model_info",
            "Active model versions (value 1), with bundle hash and providers",
            ["model", "version", "bundle_sha256", "runtime", "providers"],
            registry=r,
        )
        self.ready = Gauge("lineside_ready", "1 when the agent is ready to serve", registry=r)
        self.selftests = Counter(
            "lineside_selftests_total",
            "Golden self-tests by model and outcome",
            ["model", "outcome"],
            registry=r,
        )
        self.installs = Counter(
            "lineside_bundle_installs_total",
            "Bundle installs by outcome (activated, rejected)",
            ["outcome"],
            registry=r,
        )

        self.mqtt_connected = Gauge(
            "lineside_mqtt_connected", "1 while connected to the MQTT broker", registry=r
        )
        self.mqtt_queued = Gauge(
            "lineside_mqtt_queued", "MQTT messages waiting for a worker", registry=r
        )
        self.mqtt_shed = Counter(
            "lineside_mqtt_shed_total",
            "MQTT messages dropped because the inbound queue was full",
            registry=r,
        )
        self.mqtt_errors = Counter(
            "lineside_mqtt_errors_total",
            "MQTT requests and events answered with an error, by code",
            ["code"],
            registry=r,
        )
        self.outbox_messages = Gauge(
            "lineside_outbox_messages",
            "Messages in the durable outbox, not yet acknowledged",
            registry=r,
        )
        self.outbox_bytes = Gauge(
            "lineside_outbox_bytes", "Bytes in the durable outbox", registry=r
        )
        self.outbox_dropped = Counter(
            "lineside_outbox_dropped_total",
            "Outbox messages dropped to stay within its bounds, by kind",
            ["kind"],
            registry=r,
        )
        self.disk_free = Gauge(
            "lineside_state_disk_free_bytes",
            "Free space where the state directory lives",
            registry=r,
        )
        self.disk_full = Gauge(
            "lineside_disk_full",
            "1 while the state directory's disk is full (answers wait unacknowledged, 507s)",
            registry=r,
        )
        self.mqtt_held = Gauge(
            "lineside_mqtt_held",
            "MQTT messages held unacknowledged: waiting for their model, or for disk space",
            ["reason"],
            registry=r,
        )
        self.mqtt_redelivered = Counter(
            "lineside_mqtt_redelivered_total",
            "Redelivered MQTT messages answered again from the answers already given",
            registry=r,
        )
        self.temperature = Gauge(
            "lineside_temperature_celsius", "Hottest temperature sensor reading", registry=r
        )

        self.updates = Counter(
            "lineside_update_reports_total",
            "Updater reports by outcome (progress, refused, committed, rolled_back, ignored)",
            ["outcome"],
            registry=r,
        )
        self.update_chunks = Counter(
            "lineside_update_chunks_total",
            "Bundle chunks and manifest pages over MQTT by outcome (requested, resent, fetched, "
            "refused: failed their check, ignored: not asked for or already held)",
            ["outcome"],
            registry=r,
        )

        self.feedback = Counter(
            "lineside_feedback_total", "Technicians' feedback by verdict", ["verdict"], registry=r
        )

        self.drift_psi = Gauge(
            "lineside_drift_psi",
            "Population stability index of live inputs against the bundle's baseline",
            ["model", "feature"],
            registry=r,
        )
        self.drift_alert = Gauge(
            "lineside_drift_alert",
            "1 when a model's drift score is over drift_alert_psi",
            ["model"],
            registry=r,
        )

        self.shadow = Counter(
            "lineside_shadow_total",
            "Shadow runs of a candidate by outcome (agree, disagree, dropped, failed)",
            ["model", "outcome"],
            registry=r,
        )
        self.shadow_disagreements = Counter(
            "lineside_shadow_disagreements_total",
            "Shadow disagreements by the active and the candidate label",
            ["model", "active", "candidate"],
            registry=r,
        )
        self.shadow_seconds = Histogram(
            "lineside_shadow_seconds",
            "The candidate's preprocess + inference time in shadow runs",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )

    def set_model(self, name: str, version: int, sha256: str, runtime: str, providers: str) -> None:
        """Replace the info series of `name` with this version's."""
        for labels in list(self._model_series(name)):
            self.model_info.remove(*labels)
        self.model_info.labels(name, str(version), sha256, runtime, providers).set(1)

    def _model_series(self, name: str) -> list[tuple[str, ...]]:
        found = []
        for metric in self.model_info.collect():
            for sample in metric.samples:
                if sample.labels.get("model") == name:
                    found.append(
                        tuple(
                            sample.labels[k]
                            for k in ("model", "version", "bundle_sha256", "runtime", "providers")
                        )
                    )
        return found

    def render(self) -> bytes:
        return generate_latest(self.registry)
