"""The fleet registry: parsing what real agents publish (0.1.0 and 0.2.0 shapes), every reason a
message is refused, and storage (upserts, bounded tables, queries).

Storage tests run on a temporary SQLite file; with LINESIDE_TEST_POSTGRES set (to `1` for the
local server, or to a PostgreSQL URL) they run on PostgreSQL too, each in a schema of its own.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import Engine

from edge_agent.device.models import selftest_json
from edge_agent.device.predictions import Photo
from edge_agent.engine.selftest import SelfTestReport
from edge_agent.metrics import AgentMetrics
from edge_agent.mqtt.messages import to_json
from fleet_controller import db, messages, registry
from fleet_controller.cohorts import Selector
from fleet_controller.errors import BadMessageError
from fleet_controller.messages import StatusMessage, TelemetryMessage, UpdateReport, parse
from fleet_controller.registry import Registry
from tests.agent_support import build_bundle, jpeg, make_keys
from tests.postgres_support import postgres_schema
from tests.unit.agent_fixtures import agent_settings, clean_environment
from tests.unit.device_fakes import FakePublisher, close_device, make_device

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
BASE = "lineside/v1/plant-a/box1"


# ---- what an agent publishes, built as the agent builds it --------------------------------
def selftest(passed: bool = True) -> dict[str, Any]:
    """`selftest` of a model entry, made by the agent's own function."""
    failures = () if passed else ("sample 1 deviates by 0.5",)
    return selftest_json(SelfTestReport("defects-3", 4, 0.001, 0.01, 0.02, failures))


def status_payload(state: str) -> bytes:
    """edge_agent.mqtt.link.MqttLink._status (also the last will)."""
    return json.dumps(
        {"status": state, "client_id": "lineside-plant-a-box1", "at": time.time()}
    ).encode()


def telemetry_010(**overrides: Any) -> dict[str, Any]:
    """edge_agent.device.telemetry.Telemetry.snapshot of agent 0.1.0, plus the message_id that
    MqttService.publish_telemetry adds."""
    body: dict[str, Any] = {
        "at": T0.timestamp(),
        "agent_version": "0.1.0",
        "site": "plant-a",
        "device": "box1",
        "profile": "generic-x86-64-avx2",
        "ready": True,
        "reasons": [],
        "uptime_s": 81.2,
        "latency_ms": {"http": {"p50": 3.1, "p95": 5.0, "p99": 7.2, "samples": 40}},
        "outcomes": {"http": {"ok": 39, "error": 1}},
        "models": [
            {
                "name": "defects",
                "version": 3,
                "status": "ready",
                "bundle_sha256": "ab" * 32,
                "selftest": selftest(),
            },
            {
                "name": "broken",
                "version": None,
                "status": "failed",
                "bundle_sha256": None,
                "selftest": None,
            },
        ],
        "system": {"cpu_percent": 12.0, "load_average": [0.1, 0.2, 0.3], "disk_free_mb": 900.0},
        "drift": {"defects": {"psi": {"brightness": 0.02}, "score": 0.02, "alert": False}},
        "shadow": {},
        "in_flight": 0,
        "disk_full": False,
        "mqtt": {"connected": True, "queued": 0, "held": {}, "shed": 0, "redelivered": 0},
        "message_id": uuid.uuid4().hex,
    }
    body.update(overrides)
    return body


def telemetry_020(**overrides: Any) -> dict[str, Any]:
    """Agent 0.2.0 adds `line`, `labels`, `groups`, and per model `latency_ms` and `outcomes`."""
    body = telemetry_010(
        agent_version="0.2.0", line="line1", labels={"camera": "v2"}, groups=["line1", "canary"]
    )
    body["models"][0].update(
        latency_ms={"p50": 3.0, "p95": 4.5, "samples": 120},
        outcomes={"ok": 118, "error": 2},
    )
    body.update(overrides)
    return body


def report_body(outcome: str | None = "committed", **overrides: Any) -> dict[str, Any]:
    """edge_agent.updater.runner.Updater._report, plus the message_id publish_update adds."""
    body: dict[str, Any] = {
        "phase": outcome if outcome in ("committed", "rolled_back") else "downloading",
        "outcome": outcome,
        "sequence": 1_770_000_000_000,
        "reason": None,
        "name": "defects",
        "version": 4,
        "device": "plant-a/box1",
        "at": T0.timestamp(),
        "message_id": uuid.uuid4().hex,
    }
    body.update(overrides)
    return body


def encode(body: Any) -> bytes:
    return json.dumps(body, separators=(",", ":")).encode()


# ---- parsing ------------------------------------------------------------------------------
def test_status_online_offline_and_cleared() -> None:
    assert parse(f"{BASE}/status", status_payload("online")) == StatusMessage(
        "plant-a", "box1", True
    )
    assert parse(f"{BASE}/status", status_payload("offline")) == StatusMessage(
        "plant-a", "box1", False
    )
    assert parse(f"{BASE}/status", b"") == StatusMessage("plant-a", "box1", False)


def test_telemetry_of_agent_010_has_no_fleet_fields() -> None:
    message = parse(f"{BASE}/telemetry", encode(telemetry_010()))
    assert isinstance(message, TelemetryMessage)
    assert (message.site, message.device, message.agent_version) == ("plant-a", "box1", "0.1.0")
    assert message.at == T0
    assert (message.profile, message.ready, message.reasons) == ("generic-x86-64-avx2", True, ())
    assert (message.line, message.labels, message.groups) == (None, None, ())
    defects, broken = message.models
    assert (defects.name, defects.version, defects.status) == ("defects", 3, "ready")
    assert defects.selftest_ok is True and defects.drift_alert is False
    assert defects.latency is None and defects.outcomes is None
    assert (broken.version, broken.selftest_ok, broken.drift_alert) == (None, None, None)


def test_telemetry_of_agent_020_carries_fleet_fields_and_model_figures() -> None:
    message = parse(f"{BASE}/telemetry", encode(telemetry_020(future_field={"x": 1})))
    assert isinstance(message, TelemetryMessage)
    assert (message.line, message.labels, message.groups) == (
        "line1",
        {"camera": "v2"},
        ("line1", "canary"),
    )
    defects = message.models[0]
    assert defects.latency == messages.Latency(p50=3.0, p95=4.5, samples=120)
    assert defects.outcomes == {"ok": 118, "error": 2}


def test_a_version_that_has_not_answered_yet_has_no_percentiles() -> None:
    """What agent 0.2.0 sends for a model version with no answered request yet."""
    body = telemetry_020()
    body["models"][0].update(latency_ms={"p50": None, "p95": None, "samples": 0}, outcomes={})
    message = parse(f"{BASE}/telemetry", encode(body))
    assert isinstance(message, TelemetryMessage)
    assert message.models[0].latency == messages.Latency(p50=None, p95=None, samples=0)
    assert message.models[0].outcomes == {}


def test_a_real_agent_snapshot_is_parsed_and_recorded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The snapshot of an in-process agent (real bundle, real runtime) after a few answers, as
    MqttService.publish_telemetry sends it."""
    keys = make_keys(tmp_path / "keys")
    clean_environment(monkeypatch)
    settings = agent_settings(
        tmp_path / "state", keys, site="plant-a", device="box7", line="line3",
        labels={"camera": "v2"}, update_groups=("line3", "canary"),
    )  # fmt: skip
    device = make_device(settings, FakePublisher(), AgentMetrics())

    async def scenario() -> dict[str, Any]:
        await device.install(build_bundle(tmp_path / "v1", keys).path)
        for index in range(3):
            await device.predict("defects", Photo(jpeg(index)), transport="http")
        return await asyncio.to_thread(device.telemetry.snapshot)

    try:
        figures = asyncio.run(scenario())
    finally:
        close_device(device)
    payload = to_json({**figures, "message_id": uuid.uuid4().hex})
    message = parse("lineside/v1/plant-a/box7/telemetry", payload)
    assert isinstance(message, TelemetryMessage)
    assert (message.line, message.labels, message.groups) == (
        "line3",
        {"camera": "v2"},
        ("line3", "canary"),
    )
    (model,) = message.models
    assert (model.name, model.version, model.status) == ("defects", 1, "ready")
    assert model.latency is not None and model.latency.samples == 3
    assert model.outcomes == {"ok": 3}
    engine = db.connect(f"sqlite:///{tmp_path / 'fleet.db'}")
    db.create_tables(engine)
    reg = Registry(engine)
    reg.record(message, now=T0)
    box = reg.device("plant-a", "box7")
    assert box is not None and box.agent_version == figures["agent_version"]
    (sample,) = reg.samples("plant-a", "box7", "defects", version=1)
    assert (sample.samples, sample.p95) == (3, model.latency.p95)
    engine.dispose()


def test_failed_selftest_and_drift_alert_are_read() -> None:
    body = telemetry_010()
    body["models"][0]["selftest"] = selftest(passed=False)
    body["drift"]["defects"]["alert"] = True
    message = parse(f"{BASE}/telemetry", encode(body))
    assert isinstance(message, TelemetryMessage)
    assert message.models[0].selftest_ok is False and message.models[0].drift_alert is True


def test_report_of_agent_010_and_020() -> None:
    old = parse(f"{BASE}/update", encode(report_body()))
    assert old == UpdateReport(
        "plant-a", "box1", 1_770_000_000_000, "committed", "committed", None, "defects", 4, T0
    )
    new = parse(f"{BASE}/update", encode(report_body(rollout={"id": "defects-4", "wave": 2})))
    assert isinstance(new, UpdateReport)
    assert (new.rollout_id, new.wave) == ("defects-4", 2)


def test_report_of_an_unverified_notice_is_kept() -> None:
    """The agent reports a notice it could not verify with what peek_notice could read of it:
    sequence 0 when it had none, no name or version, and extra fields."""
    body = report_body(
        "refused",
        phase="idle",
        sequence=0,
        name=None,
        version=None,
        reason="notice on lineside/v1/plant-a/box1/release refused: bad signature",
        verified=False,
        claimed={},
    )
    message = parse(f"{BASE}/update", encode(body))
    assert isinstance(message, UpdateReport)
    assert (message.sequence, message.outcome, message.name, message.version) == (
        0,
        "refused",
        None,
        None,
    )


def _telemetry_with(path: str, value: Any) -> dict[str, Any]:
    body = telemetry_020()
    target: Any = body
    *parents, last = path.split(".")
    for part in parents:
        target = target[int(part)] if isinstance(target, list) else target[part]
    target[last] = value
    return body


TOO_DEEP = b"[" * 100_000 + b"]" * 100_000

REJECTED = [
    # (topic, payload, kind, reason, words the message must contain)
    ("lineside/v1/plant-a/box1/infer", b"{}", "unknown", "bad_topic", "SITE/DEVICE"),
    ("lineside/v2/plant-a/box1/status", b"{}", "status", "bad_topic", "lineside/v1"),
    ("lineside/v1/plant-a/x/box1/status", b"{}", "status", "bad_topic", "SITE/DEVICE"),
    ("lineside/v1/-plant/box1/telemetry", b"{}", "telemetry", "bad_topic", "letters"),
    ("lineside/v1/plant-a/+/update", b"{}", "update", "bad_topic", "letters"),
    (f"{BASE}/telemetry", b" " * (256 * 1024 + 1), "telemetry", "too_large", "262145 bytes"),
    (f"{BASE}/telemetry", b"\xff{}", "telemetry", "not_json", "UTF-8 JSON"),
    (f"{BASE}/update", b'{"outcome": ', "update", "not_json", "UTF-8 JSON"),
    (f"{BASE}/update", b'{"a": 1, "a": 2}', "update", "not_json", "duplicate"),
    (f"{BASE}/telemetry", TOO_DEEP[: 256 * 1024 - 2] + b"]]", "telemetry", "not_json", "JSON"),
    (f"{BASE}/status", b'"online"', "status", "not_object", "not an object"),
    (f"{BASE}/status", b'{"status": "maybe"}', "status", "bad_field", "'status'"),
    (f"{BASE}/status", b"{}", "status", "bad_field", "missing"),
    (f"{BASE}/telemetry", encode(_telemetry_with("models", {})), "telemetry", "bad_field", "'models'"),
    (f"{BASE}/telemetry", encode(_telemetry_with("models.0.version", "3")), "telemetry", "bad_field", "'models[0].version'"),
    (f"{BASE}/telemetry", encode(_telemetry_with("models.0.version", True)), "telemetry", "bad_field", "got bool"),
    (f"{BASE}/telemetry", encode(_telemetry_with("models.0.name", None)), "telemetry", "bad_field", "'models[0].name' must be a string (got null)"),
    (f"{BASE}/telemetry", encode(_telemetry_with("models.0.selftest", "passed")), "telemetry", "bad_field", "'models[0].selftest'"),
    (f"{BASE}/telemetry", encode(_telemetry_with("models.0.latency_ms.p95", "fast")), "telemetry", "bad_field", "'models[0].latency_ms.p95'"),
    (f"{BASE}/telemetry", encode(_telemetry_with("models.0.latency_ms.p95", float("nan"))), "telemetry", "bad_field", "finite"),
    (f"{BASE}/telemetry", encode(_telemetry_with("models.0.latency_ms.samples", None)), "telemetry", "bad_field", "'models[0].latency_ms.samples'"),
    (f"{BASE}/telemetry", encode(_telemetry_with("models.0.outcomes", {"ok": -1})), "telemetry", "bad_field", "'models[0].outcomes.ok'"),
    (f"{BASE}/telemetry", encode(_telemetry_with("labels", {"camera": 2})), "telemetry", "bad_field", "'labels'"),
    (f"{BASE}/telemetry", encode(_telemetry_with("groups", "line1")), "telemetry", "bad_field", "'groups'"),
    (f"{BASE}/telemetry", encode(_telemetry_with("line", 1)), "telemetry", "bad_field", "'line'"),
    (f"{BASE}/telemetry", encode(_telemetry_with("ready", "yes")), "telemetry", "bad_field", "'ready'"),
    (f"{BASE}/telemetry", encode(_telemetry_with("reasons", [1])), "telemetry", "bad_field", "'reasons' must be a list of strings"),
    (f"{BASE}/telemetry", encode(_telemetry_with("at", 1e20)), "telemetry", "bad_field", "'at'"),
    (f"{BASE}/telemetry", encode(_telemetry_with("drift.defects.alert", "yes")), "telemetry", "bad_field", "'drift.defects.alert'"),
    (f"{BASE}/telemetry", encode(_telemetry_with("models.1.name", "defects")), "telemetry", "bad_field", "each model once"),
    (f"{BASE}/telemetry", encode(_telemetry_with("site", "plant-b")), "telemetry", "device_mismatch", "topic says 'plant-a'"),
    (f"{BASE}/telemetry", encode(_telemetry_with("device", "box2")), "telemetry", "device_mismatch", "'box1'"),
    (f"{BASE}/telemetry", encode(_telemetry_with("device", None)), "telemetry", "bad_field", "'device'"),
    (f"{BASE}/update", encode(report_body(device="plant-a/box2")), "update", "device_mismatch", "'plant-a/box1'"),
    (f"{BASE}/update", encode(report_body(device="box1")), "update", "device_mismatch", "'box1' but the topic says 'plant-a/box1'"),
    (f"{BASE}/update", encode(report_body(outcome="exploded")), "update", "unknown_outcome", "rolled_back"),
    (f"{BASE}/update", encode(report_body(outcome=None)), "update", "bad_field", "'outcome'"),
    (f"{BASE}/update", encode(report_body(sequence=-1)), "update", "bad_field", "'sequence'"),
    (f"{BASE}/update", encode(report_body(sequence=2**63)), "update", "bad_field", "'sequence'"),
    (f"{BASE}/update", encode(report_body(sequence="5")), "update", "bad_field", "'sequence'"),
    (f"{BASE}/update", encode(report_body(phase=None)), "update", "bad_field", "'phase'"),
    (f"{BASE}/update", encode(report_body(reason=["x"])), "update", "bad_field", "'reason'"),
    (f"{BASE}/update", encode(report_body(rollout={"id": "r1", "wave": 0})), "update", "bad_field", "'rollout.wave'"),
    (f"{BASE}/update", encode(report_body(rollout={"id": "../r1", "wave": 1})), "update", "bad_field", "'rollout.id'"),
    (f"{BASE}/update", encode(report_body(rollout="r1")), "update", "bad_field", "'rollout'"),
]  # fmt: skip


@pytest.mark.parametrize(("topic", "payload", "kind", "reason", "words"), REJECTED)
def test_rejected(topic: str, payload: bytes, kind: str, reason: str, words: str) -> None:
    with pytest.raises(BadMessageError) as caught:
        parse(topic, payload)
    assert (caught.value.kind, caught.value.reason) == (kind, reason)
    assert words in caught.value.message
    assert len(caught.value.message) < 1000


# ---- storage ------------------------------------------------------------------------------
@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    if request.param == "sqlite":
        engine = db.connect(f"sqlite:///{tmp_path / 'fleet.db'}")
        db.create_tables(engine)
        yield engine
        engine.dispose()
        return
    with postgres_schema("registry") as engine:
        db.create_tables(engine)
        yield engine


@pytest.fixture
def reg(engine: Engine) -> Registry:
    return Registry(engine, samples_per_model=5, history_per_device=4)


def feed(reg: Registry, kind: str, body: Any, now: datetime, base: str = BASE) -> None:
    payload = body if isinstance(body, bytes) else encode(body)
    reg.record(parse(f"{base}/{kind}", payload), now=now)


def test_status_creates_the_box_and_offline_keeps_last_seen(reg: Registry) -> None:
    feed(reg, "status", status_payload("online"), T0)
    box = reg.device("plant-a", "box1")
    assert box is not None
    assert (box.online, box.last_seen, box.first_seen, box.profile) == (True, T0, T0, None)
    feed(reg, "status", status_payload("offline"), T0 + timedelta(minutes=5))
    box = reg.device("plant-a", "box1")
    assert box is not None
    assert (box.online, box.last_seen, box.first_seen) == (False, T0, T0)
    assert reg.device("plant-a", "nobody") is None


def test_boxes_are_read_by_ref_and_by_when_their_row_changed(reg: Registry) -> None:
    feed(reg, "status", status_payload("online"), T0)
    feed(reg, "status", status_payload("online"), T0, base="lineside/v1/plant-b/box2")
    assert set(reg.devices_at(["plant-a/box1", "plant-b/box2", "plant-c/none"])) == {
        "plant-a/box1",
        "plant-b/box2",
    }
    assert reg.devices_at([]) == {}
    everyone, newest = reg.devices_changed(None)
    assert len(everyone) == 2 and newest == T0
    later = T0 + timedelta(minutes=5)
    # An offline status keeps last_seen, but it changes the row: the page must see it.
    feed(reg, "status", status_payload("offline"), later)
    changed, newest = reg.devices_changed(T0 + timedelta(seconds=1))
    assert [(box.ref, box.online) for box in changed] == [("plant-a/box1", False)]
    assert newest == later
    assert reg.devices_changed(later + timedelta(seconds=1)) == ([], None)
    # Heard from again with nothing new to show: last_seen moves, changed_at does not.
    same = telemetry_020()  # the self-test stamped once, at load, as an agent does
    feed(reg, "telemetry", same, later + timedelta(minutes=1))
    changed, first_telemetry = reg.devices_changed(later + timedelta(seconds=1))
    assert [box.ref for box in changed] == ["plant-a/box1"]
    feed(reg, "telemetry", same, later + timedelta(minutes=2))
    feed(reg, "status", status_payload("online"), later + timedelta(minutes=3))
    assert reg.devices_changed(later + timedelta(minutes=1, seconds=1)) == ([], None)
    box = reg.device("plant-a", "box1")
    assert box is not None and box.last_seen == later + timedelta(minutes=3)
    feed(reg, "telemetry", {**same, "ready": False}, later + timedelta(minutes=4))
    changed, newest = reg.devices_changed(later + timedelta(minutes=1, seconds=1))
    assert [box.ready for box in changed] == [False] and newest == later + timedelta(minutes=4)
    assert first_telemetry == later + timedelta(minutes=1)


def test_telemetry_upserts_the_device_record(reg: Registry) -> None:
    feed(reg, "telemetry", telemetry_020(), T0)
    later = T0 + timedelta(seconds=30)
    feed(
        reg, "telemetry", telemetry_020(ready=False, reasons=["model defects is loading: x"]), later
    )
    box = reg.device("plant-a", "box1")
    assert box is not None
    assert box.ref == "plant-a/box1"
    assert (box.first_seen, box.last_seen, box.last_telemetry_at) == (T0, later, later)
    assert (box.line, box.labels, box.groups) == ("line1", {"camera": "v2"}, ("line1", "canary"))
    assert (box.profile, box.agent_version, box.online) == ("generic-x86-64-avx2", "0.2.0", True)
    assert (box.ready, box.reasons) == (False, ("model defects is loading: x",))
    assert box.models["defects"].version == 3 and box.models["defects"].status == "ready"
    stored = box.models["defects"].selftest
    assert stored is not None and stored["passed"] is True
    assert stored.keys() == selftest().keys()
    assert box.models["broken"] == registry.ModelState(None, "failed", None)
    assert len(reg.devices()) == 1
    data = box.to_json()
    assert data["ref"] == "plant-a/box1" and data["last_seen"] == later.isoformat()
    assert json.loads(json.dumps(data)) == data


def test_a_downgraded_agent_loses_the_fields_it_no_longer_sends(reg: Registry) -> None:
    feed(reg, "telemetry", telemetry_020(), T0)
    feed(reg, "telemetry", telemetry_010(), T0 + timedelta(seconds=30))
    box = reg.device("plant-a", "box1")
    assert box is not None
    assert (box.agent_version, box.line, box.labels, box.groups) == ("0.1.0", None, {}, ())


def test_reports_build_the_history(reg: Registry) -> None:
    received = T0 + timedelta(seconds=2)
    feed(reg, "update", report_body("progress"), received)
    feed(reg, "update", report_body(rollout={"id": "defects-4", "wave": 1}), received)
    v1 = parse(f"{BASE}/update", encode(report_body("rolled_back", reason="probation: p95")))
    reg.record(v1, rollout_id="defects-4", wave=2, now=received)
    newest, middle, oldest = reg.history("plant-a", "box1")
    assert (newest.outcome, newest.rollout_id, newest.wave, newest.reason) == (
        "rolled_back",
        "defects-4",
        2,
        "probation: p95",
    )
    assert (middle.outcome, middle.rollout_id, middle.wave) == ("committed", "defects-4", 1)
    assert (oldest.outcome, oldest.rollout_id, oldest.wave) == ("progress", None, None)
    assert (oldest.at, oldest.received_at, oldest.sequence) == (T0, received, 1_770_000_000_000)
    assert oldest.to_json()["at"] == T0.isoformat()
    box = reg.device("plant-a", "box1")
    assert box is not None and (box.online, box.last_seen) == (True, received)
    assert reg.history("plant-a", "box1", limit=1) == [newest]


def test_history_is_bounded_per_device(reg: Registry) -> None:
    for sequence in range(1, 8):
        feed(reg, "update", report_body(sequence=sequence), T0)
    other = report_body(sequence=1, device="plant-a/box2")
    feed(reg, "update", other, T0, base="lineside/v1/plant-a/box2")
    kept = reg.history("plant-a", "box1", limit=100)
    assert [r.sequence for r in kept] == [7, 6, 5, 4]
    assert len(reg.history("plant-a", "box2")) == 1


def _sample_body(version: int, samples: int, p95: float) -> dict[str, Any]:
    body = telemetry_020()
    body["models"][0].update(
        version=version, latency_ms={"p50": 1.0, "p95": p95, "samples": samples}
    )
    return body


def test_samples_are_kept_per_model_newest_first_and_bounded(reg: Registry) -> None:
    times = [T0 + timedelta(seconds=10 * i) for i in range(8)]
    for i, at in enumerate(times):
        feed(reg, "telemetry", _sample_body(3 if i < 4 else 4, samples=10 * i, p95=float(i)), at)
    kept = reg.samples("plant-a", "box1", "defects")
    assert [s.at for s in kept] == times[:2:-1]  # 5 kept, newest first
    assert [s.version for s in kept] == [4, 4, 4, 4, 3]
    newest = kept[0]
    assert (newest.p95, newest.samples, newest.outcomes) == (7.0, 70, {"ok": 118, "error": 2})
    assert (newest.selftest_ok, newest.drift_alert) == (True, False)
    assert [s.at for s in reg.samples("plant-a", "box1", "defects", version=3)] == [times[3]]
    assert len(reg.samples("plant-a", "box1", "defects", since=times[6])) == 2
    assert reg.samples("plant-a", "box1", "broken") == []  # no version: nothing to compare


def test_latest_sample_before_a_time_with_enough_samples(reg: Registry) -> None:
    times = [T0 + timedelta(seconds=10 * i) for i in range(4)]
    for i, at in enumerate(times):
        feed(reg, "telemetry", _sample_body(3, samples=[60, 20, 70, 10][i], p95=float(i)), at)
    latest = reg.latest_sample("plant-a", "box1", "defects", 3)
    assert latest is not None and latest.at == times[3]
    enough = reg.latest_sample("plant-a", "box1", "defects", 3, min_samples=50)
    assert enough is not None and enough.at == times[2]
    earlier = reg.latest_sample("plant-a", "box1", "defects", 3, before=times[2], min_samples=50)
    assert earlier is not None and earlier.at == times[0]
    assert reg.latest_sample("plant-a", "box1", "defects", 3, before=times[0]) is None
    assert reg.latest_sample("plant-a", "box1", "defects", 9) is None


def test_agent_010_samples_carry_selftest_and_drift_without_latency(reg: Registry) -> None:
    feed(reg, "telemetry", telemetry_010(), T0)
    (sample,) = reg.samples("plant-a", "box1", "defects")
    assert (sample.p50, sample.p95, sample.samples, sample.outcomes) == (None, None, 0, {})
    assert (sample.selftest_ok, sample.drift_alert) == (True, False)


def test_rejections_are_counted_and_the_table_bounded(
    reg: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(registry, "REJECTIONS_KEPT", 3)
    long_topic = "lineside/v1/" + "x" * 5000
    for index in range(5):
        topic = long_topic if index == 4 else f"{BASE}/update"
        payload = encode(report_body(device=f"plant-a/box{index + 2}"))
        with pytest.raises(BadMessageError) as caught:
            parse(topic, payload)
        reg.reject(topic, caught.value, now=T0 + timedelta(seconds=index))
    assert reg.rejection_counts() == {("update", "device_mismatch"): 4, ("unknown", "bad_topic"): 1}
    kept = reg.rejections()
    assert [r.at for r in kept] == [T0 + timedelta(seconds=i) for i in (4, 3, 2)]
    assert kept[0].reason == "bad_topic" and len(kept[0].topic) <= messages.MAX_TOPIC_CHARS
    assert "plant-a/box5" in kept[1].message


def test_counts_by_version_and_state(reg: Registry) -> None:
    for box, version in (("box1", 3), ("box2", 3), ("box3", 4)):
        body = telemetry_010(device=box)
        body["models"][0]["version"] = version
        feed(reg, "telemetry", body, T0, base=f"lineside/v1/plant-a/{box}")
    feed(reg, "status", status_payload("offline"), T0, base="lineside/v1/plant-a/box3")
    feed(
        reg,
        "telemetry",
        telemetry_010(device="box4"),
        T0 + timedelta(minutes=10),
        base="lineside/v1/plant-a/box4",
    )
    assert reg.counts_by_version() == {("defects", 3): 3, ("defects", 4): 1}
    now = T0 + timedelta(minutes=11)
    assert reg.counts_by_state(stale_after=timedelta(minutes=5), now=now) == {
        "online": 1,
        "offline": 1,
        "stale": 2,
    }
    box1 = reg.device("plant-a", "box1")
    assert box1 is not None and box1.stale(now, timedelta(minutes=5))


def test_devices_filtered_by_a_selector(reg: Registry) -> None:
    for site, box in (("plant-b", "box1"), ("plant-a", "box2"), ("plant-a", "box1")):
        feed(
            reg,
            "telemetry",
            telemetry_020(site=site, device=box),
            T0,
            base=f"lineside/v1/{site}/{box}",
        )
    assert [d.ref for d in reg.devices()] == ["plant-a/box1", "plant-a/box2", "plant-b/box1"]
    chosen = reg.devices(Selector(site=("plant-a",), exclude=("plant-a/box2",)))
    assert [d.ref for d in chosen] == ["plant-a/box1"]


def test_concurrent_writers_share_one_registry(reg: Registry) -> None:
    errors: list[BaseException] = []

    def writer(index: int) -> None:
        try:
            for step in range(5):
                feed(
                    reg,
                    "telemetry",
                    _sample_body(3, samples=step, p95=1.0),
                    T0 + timedelta(seconds=index * 10 + step),
                )
                feed(reg, "status", status_payload("online"), T0)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(index,)) for index in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(reg.devices()) == 1
    assert len(reg.samples("plant-a", "box1", "defects")) == 5
