"""What boxes publish, parsed: the three message kinds and `parse`, which turns a topic and
payload into one of them or raises `BadMessageError` (docs/fleet.md "What boxes publish").

Pure: no storage, no clock. The registry records what is parsed here; the service counts what is
refused. Parsing is strict about the types of the fields it reads and lenient about fields it does
not know (newer agents add some); fields that agents before 0.2.0 do not send (`line`, `labels`,
`groups`, per-model `latency_ms` and `outcomes`, a report's `rollout`) are simply absent.
Telemetry's `shadow` (per model: the candidate's version and bundle digest, photos compared,
agreement, per-class disagreements, the candidate's p50/p95) becomes `ShadowReport`s.

A telemetry message's and an update report's `at` is the box's own clock.

An update report carries an idempotency `key` (`report_key`): the digest of the box's
`message_id` (agents and the simulator give every report one, kept across their outbox's
re-publications) or, from a box that sends none, of the payload's bytes (a QoS 1 redelivery is
byte-identical). The registry stores it under a unique constraint per box, so a report delivered
twice (a redelivery, or a second controller instance behind a shared subscription) is applied
once.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from edge_bundle.encoding import strict_json
from edge_bundle.release import SEGMENT_PATTERN
from fleet_controller.errors import BadMessageError

TOPIC_PREFIX = "lineside/v1"
KINDS = ("status", "telemetry", "update")
OUTCOMES = frozenset({"progress", "refused", "committed", "rolled_back", "ignored"})
MAX_PAYLOAD_BYTES = 256 * 1024
#: Sequences, versions and counts are stored as signed 64-bit integers.
MAX_INT = 2**63 - 1
#: Topics (and other text from a box) quoted in an error are cut to this many characters.
MAX_TOPIC_CHARS = 200
_SEGMENT = re.compile(SEGMENT_PATTERN)


# ---- messages -----------------------------------------------------------------------------
@dataclass(frozen=True)
class StatusMessage:
    """A box's retained status: online, or offline (its last will, or a cleared status)."""

    site: str
    device: str
    online: bool


@dataclass(frozen=True)
class Latency:
    """Latency of one model version since it became active (agent ≥ 0.2.0); the percentiles
    are None before it has answered anything."""

    p50: float | None
    p95: float | None
    samples: int


@dataclass(frozen=True)
class ModelReport:
    """One model as a telemetry message reports it."""

    name: str
    version: int | None
    status: str
    selftest: Mapping[str, Any] | None
    latency: Latency | None = None
    outcomes: Mapping[str, int] | None = None
    drift_alert: bool | None = None

    @property
    def selftest_ok(self) -> bool | None:
        """Whether its last self-test passed; None when none ran or it says nothing."""
        passed = self.selftest.get("passed") if self.selftest is not None else None
        return passed if isinstance(passed, bool) else None


@dataclass(frozen=True)
class ShadowReport:
    """One model's shadow comparison as a telemetry message reports it (`GET /v1/shadow`)."""

    model: str
    candidate_version: int
    candidate_sha256: str | None
    compared: int
    agreement: float | None
    disagreements: tuple[tuple[str, str, int], ...] = ()  # (active, candidate, photos)
    candidate_p50: float | None = None
    candidate_p95: float | None = None


@dataclass(frozen=True)
class TelemetryMessage:
    """A telemetry snapshot; `at` is the box's own clock (None when it sent none)."""

    site: str
    device: str
    at: datetime | None
    agent_version: str | None
    profile: str | None
    ready: bool | None
    reasons: tuple[str, ...]
    models: tuple[ModelReport, ...]
    line: str | None = None
    labels: Mapping[str, str] | None = None
    groups: tuple[str, ...] = ()
    shadows: tuple[ShadowReport, ...] = ()


@dataclass(frozen=True)
class UpdateReport:
    """An updater report; `rollout_id`/`wave` only when the notice carried a rollout (v2)."""

    site: str
    device: str
    sequence: int
    phase: str
    outcome: str
    reason: str | None
    name: str | None
    version: int | None
    at: datetime | None
    rollout_id: str | None = None
    wave: int | None = None
    #: The idempotency key (`report_key`); None for a report built in code, never deduplicated.
    key: str | None = field(default=None, compare=False)


Message = StatusMessage | TelemetryMessage | UpdateReport


# ---- parsing ------------------------------------------------------------------------------
def parse(topic: str, payload: bytes) -> Message:
    """The message a box published on `topic`; raises `BadMessageError` when it is not one."""
    kind, site, device = _parse_topic(topic)
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise BadMessageError(
            kind,
            "too_large",
            f"{kind} on {shorten(topic)}: {len(payload)} bytes is more than the "
            f"{MAX_PAYLOAD_BYTES} a box message may have; publish a smaller one",
        )
    if kind == "status" and not payload:
        return StatusMessage(site, device, online=False)  # a cleared retained status
    fields = _Fields(kind, topic, _decode(kind, topic, payload))
    if kind == "status":
        return _status(fields, site, device)
    if kind == "telemetry":
        return _telemetry(fields, site, device)
    return _report(fields, site, device, payload)


def report_key(message_id: object, payload: bytes) -> str:
    """A report's idempotency key: sha256 of its `message_id` when it is a non-empty string,
    else of its payload (64 hex digits either way, whatever the box sent)."""
    if isinstance(message_id, str) and message_id:
        return hashlib.sha256(b"message_id:" + message_id.encode()).hexdigest()
    return hashlib.sha256(b"payload:" + payload).hexdigest()


def _parse_topic(topic: str) -> tuple[str, str, str]:
    levels = topic.split("/")
    kind = levels[-1] if levels[-1] in KINDS else "unknown"
    if (
        len(levels) != 5
        or "/".join(levels[:2]) != TOPIC_PREFIX
        or kind == "unknown"
        or not all(_SEGMENT.fullmatch(level) for level in levels[2:4])
    ):
        raise BadMessageError(
            kind,
            "bad_topic",
            f"topic {shorten(topic)!r} is not {TOPIC_PREFIX}/SITE/DEVICE/(status|telemetry|update) "
            "with SITE and DEVICE of 1-64 letters, digits, '_', '.' or '-'; subscribe to those only",
        )
    return kind, levels[2], levels[3]


def _decode(kind: str, topic: str, payload: bytes) -> dict[str, Any]:
    try:
        body = strict_json(payload)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError too
        raise BadMessageError(
            kind,
            "not_json",
            f"{kind} on {shorten(topic)} is not UTF-8 JSON ({shorten(str(exc), 120)}); "
            "publish one JSON object",
        ) from exc
    if not isinstance(body, dict):
        raise BadMessageError(
            kind,
            "not_object",
            f"{kind} on {shorten(topic)} is JSON {_describe(body)}, not an object; "
            "publish one JSON object",
        )
    return body


class _Fields:
    """Typed reads of one JSON object; a field of the wrong type is a `bad_field` rejection
    naming it. A missing or null optional field reads as absent."""

    def __init__(self, kind: str, topic: str, body: Mapping[str, Any], where: str = "") -> None:
        self.kind = kind
        self.topic = topic
        self.body = body
        self.where = where

    def fail(self, key: str, expected: str, reason: str = "bad_field") -> BadMessageError:
        value = self.body.get(key)
        got = "missing" if key not in self.body else f"got {_describe(value)}"
        return BadMessageError(
            self.kind,
            reason,
            f"{self.kind} on {shorten(self.topic)}: {self.where + key!r} must be {expected} "
            f"({got}); the publisher does not follow docs/fleet.md: fix or upgrade it",
        )

    def _get(self, key: str, required: bool, expected: str) -> Any:
        value = self.body.get(key)
        if value is None and required:
            raise self.fail(key, expected)
        return value

    def text(self, key: str, *, required: bool = False) -> str | None:
        value = self._get(key, required, "a string")
        if value is not None and not isinstance(value, str):
            raise self.fail(key, "a string")
        return value

    def flag(self, key: str) -> bool | None:
        value = self.body.get(key)
        if value is not None and not isinstance(value, bool):
            raise self.fail(key, "true or false")
        return value

    def integer(self, key: str, *, required: bool = False, minimum: int = 0) -> int | None:
        expected = f"an integer from {minimum} to {MAX_INT}"
        value = self._get(key, required, expected)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= MAX_INT:
            raise self.fail(key, expected)
        return value

    def number(self, key: str, *, required: bool = False) -> float | None:
        expected = "a finite number ≥ 0"
        value = self._get(key, required, expected)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.fail(key, expected)
        if not math.isfinite(value) or value < 0:
            raise self.fail(key, expected)
        return float(value)

    def time(self, key: str) -> datetime | None:
        seconds = self.number(key)
        if seconds is None:
            return None
        try:
            return datetime.fromtimestamp(seconds, UTC)
        except (OverflowError, OSError, ValueError) as exc:
            raise self.fail(key, "seconds since 1970 (UTC)") from exc

    def obj(self, key: str) -> _Fields | None:
        value = self.body.get(key)
        if value is None:
            return None
        if not isinstance(value, dict):
            raise self.fail(key, "an object")
        return _Fields(self.kind, self.topic, value, f"{self.where}{key}.")

    def raw(self, key: str) -> dict[str, Any] | None:
        nested = self.obj(key)
        return dict(nested.body) if nested is not None else None

    def texts(self, key: str) -> tuple[str, ...]:
        value = self.body.get(key)
        if value is None:
            return ()
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            raise self.fail(key, "a list of strings")
        return tuple(value)

    def text_map(self, key: str) -> dict[str, str] | None:
        nested = self.obj(key)
        if nested is None:
            return None
        if not all(isinstance(value, str) for value in nested.body.values()):
            raise self.fail(key, "an object of strings")
        return dict(nested.body)

    def count_map(self, key: str) -> dict[str, int] | None:
        nested = self.obj(key)
        if nested is None:
            return None
        return {name: nested.integer(name, required=True) or 0 for name in nested.body}

    def objects(self, key: str) -> list[_Fields]:
        value = self.body.get(key)
        if value is None:
            return []
        if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
            raise self.fail(key, "a list of objects")
        return [
            _Fields(self.kind, self.topic, item, f"{self.where}{key}[{index}].")
            for index, item in enumerate(value)
        ]

    def same(self, key: str, expected: str) -> None:
        """The field must equal what the topic says (a box speaks only for itself)."""
        value = self.text(key, required=True)
        if value != expected:
            raise BadMessageError(
                self.kind,
                "device_mismatch",
                f"{self.kind} on {shorten(self.topic)}: {self.where + key!r} is "
                f"{shorten(value or '', 140)!r} "
                f"but the topic says {expected!r}; a box publishes only about itself "
                "(a forged message, or a box configured with another site or device id)",
            )


def _status(fields: _Fields, site: str, device: str) -> StatusMessage:
    status = fields.text("status", required=True)
    if status not in ("online", "offline"):
        raise fields.fail("status", "'online' or 'offline'")
    return StatusMessage(site, device, status == "online")


def _telemetry(fields: _Fields, site: str, device: str) -> TelemetryMessage:
    fields.same("site", site)
    fields.same("device", device)
    drift = fields.obj("drift")
    models = tuple(_model(entry, drift) for entry in fields.objects("models"))
    names = [model.name for model in models]
    if len(set(names)) != len(names):
        raise fields.fail("models", "a list naming each model once")
    return TelemetryMessage(
        site=site,
        device=device,
        at=fields.time("at"),
        agent_version=fields.text("agent_version"),
        profile=fields.text("profile"),
        ready=fields.flag("ready"),
        reasons=fields.texts("reasons"),
        models=models,
        line=fields.text("line"),
        labels=fields.text_map("labels"),
        groups=fields.texts("groups"),
        shadows=_shadows(fields.obj("shadow")),
    )


def _shadows(shadow: _Fields | None) -> tuple[ShadowReport, ...]:
    if shadow is None:
        return ()
    reports = []
    for name in sorted(shadow.body):
        entry = shadow.obj(name)
        if entry is None:
            continue  # a null entry says nothing
        candidate = entry.obj("candidate")
        if candidate is None:
            raise entry.fail("candidate", "an object with the candidate's version")
        agreement = entry.number("agreement")
        if agreement is not None and agreement > 1:
            raise entry.fail("agreement", "a fraction from 0 to 1")
        reports.append(
            ShadowReport(
                model=name,
                candidate_version=candidate.integer("version", required=True, minimum=1) or 0,
                candidate_sha256=candidate.text("bundle_sha256"),
                compared=entry.integer("compared", required=True) or 0,
                agreement=agreement,
                disagreements=tuple(
                    (
                        item.text("active", required=True) or "",
                        item.text("candidate", required=True) or "",
                        item.integer("count", required=True) or 0,
                    )
                    for item in entry.objects("disagreements")
                ),
                candidate_p50=entry.number("candidate_p50_ms"),
                candidate_p95=entry.number("candidate_p95_ms"),
            )
        )
    return tuple(reports)


def _model(entry: _Fields, drift: _Fields | None) -> ModelReport:
    name = entry.text("name", required=True) or ""
    latency = entry.obj("latency_ms")
    alert = drift.obj(name) if drift is not None else None
    return ModelReport(
        name=name,
        version=entry.integer("version"),
        status=entry.text("status") or "unknown",
        selftest=entry.raw("selftest"),
        latency=_latency(latency) if latency is not None else None,
        outcomes=entry.count_map("outcomes"),
        drift_alert=alert.flag("alert") if alert is not None else None,
    )


def _latency(fields: _Fields) -> Latency:
    return Latency(
        p50=fields.number("p50"),
        p95=fields.number("p95"),
        samples=fields.integer("samples", required=True) or 0,
    )


def _report(fields: _Fields, site: str, device: str, payload: bytes) -> UpdateReport:
    fields.same("device", f"{site}/{device}")
    outcome = fields.text("outcome", required=True)
    if outcome not in OUTCOMES:
        raise fields.fail("outcome", f"one of {', '.join(sorted(OUTCOMES))}", "unknown_outcome")
    rollout = fields.obj("rollout")
    rollout_id = rollout.text("id", required=True) if rollout is not None else None
    if rollout is not None and not _SEGMENT.fullmatch(rollout_id or ""):
        raise rollout.fail("id", "a rollout id (1-64 letters, digits, '_', '.' or '-')")
    return UpdateReport(
        site=site,
        device=device,
        sequence=fields.integer("sequence", required=True) or 0,
        phase=fields.text("phase", required=True) or "",
        outcome=outcome,
        reason=fields.text("reason"),
        name=fields.text("name"),
        version=fields.integer("version"),
        at=fields.time("at"),
        rollout_id=rollout_id,
        wave=rollout.integer("wave", required=True, minimum=1) if rollout is not None else None,
        key=report_key(fields.body.get("message_id"), payload),
    )


def _describe(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def shorten(text: str, limit: int = MAX_TOPIC_CHARS) -> str:
    """`text`, cut to `limit` characters (an ellipsis marks the cut)."""
    return text if len(text) <= limit else text[: limit - 1] + "…"
