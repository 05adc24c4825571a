"""The telemetry a simulated box publishes, shaped like the real agent's snapshot.

Agent 0.2.0 telemetry carries `line`, `labels`, `groups`, and per model `latency_ms`
{p50, p95, samples} and `outcomes` {ok, error} of that version since it became active; an old
agent (0.1.0) leaves all of these out. Every figure comes from the box's `Behaviour`: p95 and
the error rate per version, `requests_per_s` for how many samples have accumulated. A box that
shadows a candidate reports `shadow` like the agent's `GET /v1/shadow`: photos compared
(`requests_per_s` times how long it has shadowed), the behaviour's agreement for that version,
its disagreements on one class pair, and the candidate's p95.
"""

from __future__ import annotations

import uuid
from typing import Any

from fleet_controller.simulator.spec import BoxSpec

P50_OF_P95 = 0.7
P99_OF_P95 = 1.2


def snapshot(
    spec: BoxSpec,
    active: dict[str, int],
    active_for_s: dict[str, float],
    *,
    now: float,
    uptime_s: float,
    shadows: dict[str, tuple[int, str, float]] | None = None,
) -> dict[str, Any]:
    """One telemetry message; `active_for_s` is how long each model's version has served."""
    new = not spec.old_agent
    models = [
        _model(spec, name, version, active_for_s.get(name, 0.0), per_model=new)
        for name, version in sorted(active.items())
    ]
    samples = sum(_samples(spec, active_for_s.get(name, 0.0)) for name in active)
    errors = sum(
        _errors(spec, version, active_for_s.get(name, 0.0)) for name, version in active.items()
    )
    figures: dict[str, Any] = {
        "at": now,
        "agent_version": spec.agent_version,
        "site": spec.site,
        "device": spec.device,
        "profile": spec.profile,
        "ready": bool(active),
        "reasons": [] if active else ["no model is active"],
        "uptime_s": round(uptime_s, 1),
        "latency_ms": {"mqtt": _percentiles(spec, active, samples)} if samples else {},
        "outcomes": {"mqtt": {"ok": samples - errors, "error": errors}} if samples else {},
        "models": models,
        "system": {"cpu_percent": 20.0, "memory_available_mb": 2048.0, "disk_free_mb": 20480.0},
        "drift": _drift(spec, active),
        "shadow": {
            name: _shadow(spec, version, sha256, seconds)
            for name, (version, sha256, seconds) in sorted((shadows or {}).items())
        },
        "in_flight": 0,
        "disk_full": False,
        "mqtt": {"connected": True, "queued": 0, "shed": 0, "redelivered": 0},
        "message_id": uuid.uuid4().hex,
    }
    if new:
        figures["line"] = spec.line
        figures["labels"] = dict(spec.labels)
        figures["groups"] = list(spec.groups)
    return figures


def _model(
    spec: BoxSpec, name: str, version: int, active_for_s: float, *, per_model: bool
) -> dict[str, Any]:
    behaviour = spec.behaviour
    entry: dict[str, Any] = {
        "name": name,
        "version": version,
        "status": "ready",
        "bundle_sha256": None,
        "selftest": {
            "passed": version not in behaviour.selftest_fail,
            "samples": 4,
            "agent_version": spec.agent_version,
        },
    }
    if per_model:
        samples = _samples(spec, active_for_s)
        p95 = behaviour.p95_for(version)
        entry["latency_ms"] = {
            "p50": round(p95 * P50_OF_P95, 2),
            "p95": round(p95, 2),
            "samples": samples,
        }
        errors = _errors(spec, version, active_for_s)
        entry["outcomes"] = {"ok": samples - errors, "error": errors}
    return entry


def _shadow(spec: BoxSpec, version: int, sha256: str, seconds: float) -> dict[str, Any]:
    behaviour = spec.behaviour
    compared = _samples(spec, seconds)
    agree = round(compared * behaviour.agreement_for(version))
    active, candidate = behaviour.disagreement
    p95 = behaviour.p95_for(version)
    return {
        "candidate": {"version": version, "bundle_sha256": sha256},
        "compared": compared,
        "agreement": round(agree / compared, 4) if compared else None,
        "dropped": 0,
        "failed": 0,
        "disagreements": (
            [{"active": active, "candidate": candidate, "count": compared - agree}]
            if compared > agree
            else []
        ),
        "candidate_p50_ms": round(p95 * P50_OF_P95, 2) if compared else None,
        "candidate_p95_ms": round(p95, 2) if compared else None,
    }


def _samples(spec: BoxSpec, active_for_s: float) -> int:
    return int(spec.behaviour.requests_per_s * max(0.0, active_for_s))


def _errors(spec: BoxSpec, version: int, active_for_s: float) -> int:
    return round(_samples(spec, active_for_s) * spec.behaviour.error_rate_for(version))


def _percentiles(spec: BoxSpec, active: dict[str, int], samples: int) -> dict[str, float]:
    p95 = max(spec.behaviour.p95_for(version) for version in active.values())
    return {
        "p50": round(p95 * P50_OF_P95, 2),
        "p95": round(p95, 2),
        "p99": round(p95 * P99_OF_P95, 2),
        "samples": samples,
    }


def _drift(spec: BoxSpec, active: dict[str, int]) -> dict[str, dict[str, Any]]:
    """An alert (a high PSI score) on the versions the behaviour names, none on the others."""
    alerts = spec.behaviour.drift_alert
    return {
        name: {"score": 0.5 if version in alerts else 0.01, "alert": version in alerts}
        for name, version in active.items()
    }
