"""The registry: what the controller knows of every box, learnt only from what boxes publish.

It owns the device tables on `db.METADATA` (`devices`, `device_updates`, `model_samples`,
`shadow_samples`, `rejections`), recording messages parsed by `fleet_controller.messages`
(`Registry.record`), counting what was refused (`Registry.reject`), and the queries the
rollouts, gates, API and metrics ask. Telemetry's shadow figures are kept as the latest per box
and model in `shadow_samples`, which the rollouts' shadow gate reads.

Times are UTC. A telemetry sample and a box's `last_seen` are stamped with the controller's
clock when the message arrives (gates compare them with when the controller sent a notice); an
update report keeps the box's own `at` as well as when it arrived.

An update report is stored under its idempotency key (`report_key`, unique per box; see
`fleet_controller.messages`): `store` inserts it with ON CONFLICT DO NOTHING and says whether it
was new, so a report delivered twice is stored once, and the caller applies it to its rollout in
the same transaction only when it was. On PostgreSQL a second instance inserting the same key
waits for the first one's transaction and then finds it stored.
"""

from __future__ import annotations

import functools
import threading
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from types import MappingProxyType, SimpleNamespace
from typing import Any, Protocol

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine

from fleet_controller import db
from fleet_controller.errors import BadMessageError, FleetError
from fleet_controller.messages import (
    KINDS,
    MAX_INT,
    MAX_PAYLOAD_BYTES,
    MAX_TOPIC_CHARS,
    OUTCOMES,
    TOPIC_PREFIX,
    Latency,
    Message,
    ModelReport,
    ShadowReport,
    StatusMessage,
    TelemetryMessage,
    UpdateReport,
    parse,
    shorten,
)

# The message names below (KINDS ... parse, from `messages`) are re-exported so that modules and
# tests importing them from the registry, as before the split, keep working.
__all__ = [
    "DEVICES",
    "DEVICE_UPDATES",
    "KINDS",
    "MAX_INT",
    "MAX_PAYLOAD_BYTES",
    "MAX_REJECTION_CHARS",
    "MAX_TOPIC_CHARS",
    "MODEL_SAMPLES",
    "OUTCOMES",
    "REJECTIONS",
    "REJECTIONS_KEPT",
    "SHADOW_SAMPLES",
    "TOPIC_PREFIX",
    "Device",
    "DeviceFilter",
    "Latency",
    "Message",
    "ModelReport",
    "ModelSample",
    "ModelState",
    "Registry",
    "Rejection",
    "ShadowReport",
    "ShadowSample",
    "StatusMessage",
    "TelemetryMessage",
    "UpdateRecord",
    "UpdateReport",
    "parse",
]

REJECTIONS_KEPT = 1000
JSON_CACHE = 4096  # distinct JSON texts of models, labels, groups kept decoded
DEVICE_CACHE = 50_000  # boxes kept built, by their row
MAX_REJECTION_CHARS = 1000


# ---- records ------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelState:
    """A model on a box, as its latest telemetry said."""

    version: int | None
    status: str
    selftest: Mapping[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return {"version": self.version, "status": self.status, "selftest": self.selftest}


@dataclass(frozen=True)
class Device:
    """A box as the registry knows it (docs/fleet.md "Device record")."""

    site: str
    device: str
    line: str | None
    labels: Mapping[str, str]
    groups: tuple[str, ...]
    profile: str | None
    agent_version: str | None
    models: Mapping[str, ModelState]
    ready: bool | None
    reasons: tuple[str, ...]
    online: bool
    last_seen: datetime | None
    first_seen: datetime
    last_telemetry_at: datetime | None

    @property
    def ref(self) -> str:
        return f"{self.site}/{self.device}"

    def stale(self, now: datetime, stale_after: timedelta) -> bool:
        """Online by its status, but not heard from for `stale_after`."""
        return self.online and (self.last_seen is None or self.last_seen < now - stale_after)

    def to_json(self) -> dict[str, Any]:
        return {
            "ref": self.ref,
            "site": self.site,
            "device": self.device,
            "line": self.line,
            "labels": dict(self.labels),
            "groups": list(self.groups),
            "profile": self.profile,
            "agent_version": self.agent_version,
            "models": {name: state.to_json() for name, state in sorted(self.models.items())},
            "ready": self.ready,
            "reasons": list(self.reasons),
            "online": self.online,
            "last_seen": _iso(self.last_seen),
            "first_seen": _iso(self.first_seen),
            "last_telemetry_at": _iso(self.last_telemetry_at),
        }


@dataclass(frozen=True)
class UpdateRecord:
    """One update report in a box's history; `at` is the box's clock, `received_at` ours."""

    id: int
    site: str
    device: str
    at: datetime
    received_at: datetime
    sequence: int
    rollout_id: str | None
    wave: int | None
    phase: str
    outcome: str
    reason: str | None
    name: str | None
    version: int | None

    def to_json(self) -> dict[str, Any]:
        data = {key: getattr(self, key) for key in self.__dataclass_fields__}
        data["at"] = _iso(self.at)
        data["received_at"] = _iso(self.received_at)
        return data


@dataclass(frozen=True)
class ModelSample:
    """One model's figures from one telemetry message (`at`: when it arrived)."""

    site: str
    device: str
    at: datetime
    model: str
    version: int
    p50: float | None
    p95: float | None
    samples: int
    outcomes: Mapping[str, int]
    selftest_ok: bool | None
    drift_alert: bool | None


@dataclass(frozen=True)
class ShadowSample:
    """A box's latest shadow figures for one model (`at`: when they arrived)."""

    site: str
    device: str
    model: str
    at: datetime
    candidate_version: int
    candidate_sha256: str | None
    compared: int
    agreement: float | None
    disagreements: tuple[tuple[str, str, int], ...]
    candidate_p50: float | None
    candidate_p95: float | None

    def to_json(self) -> dict[str, Any]:
        return {
            "ref": f"{self.site}/{self.device}",
            "model": self.model,
            "at": self.at.isoformat(),
            "candidate": {
                "version": self.candidate_version,
                "bundle_sha256": self.candidate_sha256,
            },
            "compared": self.compared,
            "agreement": self.agreement,
            "disagreements": [
                {"active": a, "candidate": c, "count": n} for a, c, n in self.disagreements
            ],
            "candidate_p50_ms": self.candidate_p50,
            "candidate_p95_ms": self.candidate_p95,
        }


@dataclass(frozen=True)
class Rejection:
    """A refused message, as the `rejections` table keeps the last ones."""

    id: int
    at: datetime
    topic: str
    kind: str
    reason: str
    message: str


class DeviceFilter(Protocol):
    """What `Registry.devices` filters by (`cohorts.Selector`; not imported here, as cohorts
    builds on the registry)."""

    def matches(self, device: Device) -> bool: ...


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


# ---- tables -------------------------------------------------------------------------------
_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")  # SQLite: a rowid alias
_TIME = sa.DateTime(timezone=True)


def _device_key() -> sa.ForeignKeyConstraint:
    """Rows of a box go with its device row."""
    return sa.ForeignKeyConstraint(
        ["site", "device"], ["devices.site", "devices.device"], ondelete="CASCADE"
    )


DEVICES = sa.Table(
    "devices",
    db.METADATA,
    sa.Column("site", sa.String(64), primary_key=True),
    sa.Column("device", sa.String(64), primary_key=True),
    sa.Column("line", sa.Text),
    sa.Column("labels", sa.Text, nullable=False, server_default="{}"),
    sa.Column("groups", sa.Text, nullable=False, server_default="[]"),
    sa.Column("profile", sa.Text),
    sa.Column("agent_version", sa.Text),
    sa.Column("models", sa.Text, nullable=False, server_default="{}"),
    sa.Column("ready", sa.Boolean),
    sa.Column("reasons", sa.Text, nullable=False, server_default="[]"),
    sa.Column("online", sa.Boolean, nullable=False),
    sa.Column("last_seen", _TIME),
    sa.Column("first_seen", _TIME, nullable=False),
    sa.Column("last_telemetry_at", _TIME),
    # When what the fleet page shows of the box last changed (migration step 5): what the page
    # reads again. Not moved by `last_seen` alone (`UNSHOWN_COLUMNS`).
    sa.Column("changed_at", _TIME),
)

DEVICE_UPDATES = sa.Table(
    "device_updates",
    db.METADATA,
    sa.Column("id", _ID, primary_key=True, autoincrement=True),
    sa.Column("site", sa.String(64), nullable=False),
    sa.Column("device", sa.String(64), nullable=False),
    sa.Column("at", _TIME, nullable=False),
    sa.Column("received_at", _TIME, nullable=False),
    sa.Column("sequence", sa.BigInteger, nullable=False),
    sa.Column("rollout_id", sa.String(64)),
    sa.Column("wave", sa.BigInteger),
    sa.Column("phase", sa.Text, nullable=False),
    sa.Column("outcome", sa.String(32), nullable=False),
    sa.Column("reason", sa.Text),
    sa.Column("name", sa.Text),
    sa.Column("version", sa.BigInteger),
    sa.Column("report_key", sa.String(64)),  # NULL before schema version 4, or built in code
    _device_key(),
    sa.Index("device_updates_by_device", "site", "device", "id"),
    sa.Index("device_updates_by_key", "site", "device", "report_key", unique=True),
)

MODEL_SAMPLES = sa.Table(
    "model_samples",
    db.METADATA,
    sa.Column("id", _ID, primary_key=True, autoincrement=True),
    sa.Column("site", sa.String(64), nullable=False),
    sa.Column("device", sa.String(64), nullable=False),
    sa.Column("at", _TIME, nullable=False),
    sa.Column("model", sa.Text, nullable=False),
    sa.Column("version", sa.BigInteger, nullable=False),
    sa.Column("p50", sa.Float),
    sa.Column("p95", sa.Float),
    sa.Column("samples", sa.BigInteger, nullable=False),
    sa.Column("outcomes", sa.Text, nullable=False, server_default="{}"),
    sa.Column("selftest_ok", sa.Boolean),
    sa.Column("drift_alert", sa.Boolean),
    _device_key(),
    sa.Index("model_samples_by_model", "site", "device", "model", "id"),
)

#: The latest shadow figures per box and model (a later telemetry message replaces them; figures
#: stay after the box stops shadowing, so a gate still reads what the box last said).
SHADOW_SAMPLES = sa.Table(
    "shadow_samples",
    db.METADATA,
    sa.Column("site", sa.String(64), primary_key=True),
    sa.Column("device", sa.String(64), primary_key=True),
    sa.Column("model", sa.String(200), primary_key=True),
    sa.Column("at", _TIME, nullable=False),
    sa.Column("candidate_version", sa.BigInteger, nullable=False),
    sa.Column("candidate_sha256", sa.String(64)),
    sa.Column("compared", sa.BigInteger, nullable=False),
    sa.Column("agreement", sa.Float),
    sa.Column("disagreements", sa.Text, nullable=False, server_default="[]"),
    sa.Column("candidate_p50", sa.Float),
    sa.Column("candidate_p95", sa.Float),
    _device_key(),
)


REJECTIONS = sa.Table(
    "rejections",
    db.METADATA,
    sa.Column("id", _ID, primary_key=True, autoincrement=True),
    sa.Column("at", _TIME, nullable=False),
    sa.Column("topic", sa.Text, nullable=False),
    sa.Column("kind", sa.String(32), nullable=False),
    sa.Column("reason", sa.String(64), nullable=False),
    sa.Column("message", sa.Text, nullable=False),
)

#: The dialect's INSERT ... ON CONFLICT, chosen by the engine's dialect name.
_INSERTS: dict[str, Callable[[sa.Table], Any]] = {
    "sqlite": sqlite.insert,
    "postgresql": postgresql.insert,
}


# ---- the registry -------------------------------------------------------------------------
class Registry:
    """The device tables behind a synchronous API; every call is one transaction, so the API's
    threads and the controller's loop may share one instance."""

    def __init__(
        self, engine: Engine, *, samples_per_model: int = 50, history_per_device: int = 1000
    ) -> None:
        if engine.dialect.name not in _INSERTS:
            raise FleetError(
                f"the registry cannot use a {engine.dialect.name} database; use "
                "sqlite:///PATH or postgresql+psycopg://..."
            )
        if samples_per_model < 1 or history_per_device < 1:
            raise FleetError("samples_per_model and history_per_device must be at least 1")
        self.engine = engine
        self.samples_per_model = samples_per_model
        self.history_per_device = history_per_device
        self._insert = _INSERTS[engine.dialect.name]
        self._upserts: dict[tuple[str, ...], Any] = {}
        c = DEVICE_UPDATES.c
        # No row back: the report's key was stored before (rowcount is not reliable for this
        # through every driver).
        self._report_insert = (
            self._insert(DEVICE_UPDATES)
            .on_conflict_do_nothing(index_elements=[c.site, c.device, c.report_key])
            .returning(c.id)
        )
        self._trim_samples = _Trim(MODEL_SAMPLES, ("site", "device", "model"), samples_per_model)
        self._trim_history = _Trim(DEVICE_UPDATES, ("site", "device"), history_per_device)
        self._counts: Counter[tuple[str, str]] = Counter()
        self._lock = threading.Lock()

    # ---- ingesting ----
    def record(
        self,
        message: Message,
        *,
        rollout_id: str | None = None,
        wave: int | None = None,
        now: datetime | None = None,
    ) -> None:
        """Store a parsed message. For a report, `rollout_id`/`wave` (when given) are the
        caller's attribution (a v1 report tied to a rollout by its sequence); otherwise the
        report's own are kept."""
        with db.transaction(self.engine) as conn:
            self.store(conn, message, rollout_id=rollout_id, wave=wave, now=now)

    def store(
        self,
        conn: Connection,
        message: Message,
        *,
        rollout_id: str | None = None,
        wave: int | None = None,
        now: datetime | None = None,
    ) -> bool:
        """`record` inside the caller's transaction. False when `message` is an update report
        whose key this box's history already holds (a duplicate: nothing was written)."""
        now = _utc(now or datetime.now(UTC))
        if isinstance(message, StatusMessage):
            self._record_status(conn, message, now)
        elif isinstance(message, TelemetryMessage):
            self._record_telemetry(conn, message, now)
        else:
            return self._record_report(conn, message, rollout_id, wave, now)
        return True

    def _upsert_device(
        self, conn: Connection, site: str, device: str, now: datetime, changes: dict[str, Any]
    ) -> None:
        changes = {**changes, "changed_at": now}
        statement = self._upserts.get(tuple(changes))
        if statement is None:
            statement = self._upsert_statement(tuple(changes))
        conn.execute(statement, {"site": site, "device": device, "first_seen": now, **changes})

    def _upsert_statement(self, columns: tuple[str, ...]) -> Any:
        """INSERT ... ON CONFLICT (site, device) DO UPDATE of `columns`, built once per set of
        columns and executed with parameters: SQLAlchemy then compiles it once, not per message
        (literal values cost more CPU than the database's own work at 10,000 boxes)."""
        insert = self._insert(DEVICES)
        set_: dict[str, Any] = {column: insert.excluded[column] for column in columns}
        if "changed_at" in set_:
            # Stamped only when something the fleet page shows changed, not `last_seen` alone:
            # a telemetry message that repeats what the box said a minute ago is not a change.
            shown = [
                DEVICES.c[column].is_distinct_from(insert.excluded[column])
                for column in columns
                if column not in UNSHOWN_COLUMNS
            ]
            set_["changed_at"] = (
                sa.case((sa.or_(*shown), insert.excluded.changed_at), else_=DEVICES.c.changed_at)
                if shown
                else DEVICES.c.changed_at
            )
        statement = insert.on_conflict_do_update(
            index_elements=[DEVICES.c.site, DEVICES.c.device], set_=set_
        )
        self._upserts[columns] = statement
        return statement

    def _record_status(self, conn: Connection, message: StatusMessage, now: datetime) -> None:
        # An offline status (often the last will, stamped when the box connected) says nothing
        # about when the box was last heard from.
        changes: dict[str, Any] = {"online": message.online}
        if message.online:
            changes["last_seen"] = now
        self._upsert_device(conn, message.site, message.device, now, changes)

    def _record_telemetry(self, conn: Connection, message: TelemetryMessage, now: datetime) -> None:
        models = {
            model.name: ModelState(model.version, model.status, model.selftest).to_json()
            for model in message.models
        }
        changes = {
            "line": message.line,
            "labels": db.dumps(dict(message.labels or {})),
            "groups": db.dumps(list(message.groups)),
            "profile": message.profile,
            "agent_version": message.agent_version,
            "models": db.dumps(models),
            "ready": message.ready,
            "reasons": db.dumps(list(message.reasons)),
            "online": True,
            "last_seen": now,
            "last_telemetry_at": now,
        }
        self._upsert_device(conn, message.site, message.device, now, changes)
        for model in message.models:
            if model.version is not None:  # a model that never loaded has no figures to keep
                self._add_sample(conn, message, model, now)
        for shadow in message.shadows:
            self._put_shadow(conn, message, shadow, now)

    def _put_shadow(
        self, conn: Connection, message: TelemetryMessage, shadow: ShadowReport, now: datetime
    ) -> None:
        values = {
            "at": now,
            "candidate_version": shadow.candidate_version,
            "candidate_sha256": shadow.candidate_sha256,
            "compared": shadow.compared,
            "agreement": shadow.agreement,
            "disagreements": db.dumps([list(item) for item in shadow.disagreements]),
            "candidate_p50": shadow.candidate_p50,
            "candidate_p95": shadow.candidate_p95,
        }
        statement = self._insert(SHADOW_SAMPLES).values(
            site=message.site, device=message.device, model=shadow.model, **values
        )
        c = SHADOW_SAMPLES.c
        conn.execute(
            statement.on_conflict_do_update(index_elements=[c.site, c.device, c.model], set_=values)
        )

    def _add_sample(
        self, conn: Connection, message: TelemetryMessage, model: ModelReport, now: datetime
    ) -> None:
        latency = model.latency
        key = {"site": message.site, "device": message.device, "model": model.name}
        conn.execute(
            _SAMPLE_INSERT,
            {
                **key,
                "at": now,
                "version": model.version,
                "p50": latency.p50 if latency else None,
                "p95": latency.p95 if latency else None,
                "samples": latency.samples if latency else 0,
                "outcomes": db.dumps(dict(model.outcomes or {})),
                "selftest_ok": model.selftest_ok,
                "drift_alert": model.drift_alert,
            },
        )
        self._trim_samples.run(conn, key)

    def _record_report(
        self,
        conn: Connection,
        report: UpdateReport,
        rollout_id: str | None,
        wave: int | None,
        now: datetime,
    ) -> bool:
        self._upsert_device(
            conn, report.site, report.device, now, {"online": True, "last_seen": now}
        )
        key = {"site": report.site, "device": report.device}
        inserted = conn.execute(
            self._report_insert,
            {
                **key,
                "at": report.at or now,
                "received_at": now,
                "sequence": report.sequence,
                "rollout_id": rollout_id if rollout_id is not None else report.rollout_id,
                "wave": wave if wave is not None else report.wave,
                "phase": report.phase,
                "outcome": report.outcome,
                "reason": report.reason,
                "name": report.name,
                "version": report.version,
                "report_key": report.key,
            },
        )
        if inserted.first() is None:
            return False  # this report was stored before: a redelivery
        self._trim_history.run(conn, key)
        return True

    # ---- rejections ----
    def reject(self, topic: str, exc: BadMessageError, *, now: datetime | None = None) -> None:
        """Count a refused message and keep it among the last `REJECTIONS_KEPT`."""
        with db.transaction(self.engine) as conn:
            self.store_rejection(conn, topic, exc, now=now)
        self.count_rejection(exc)

    def count_rejection(self, exc: BadMessageError) -> None:
        """Count a refused message (once it is stored: a batch rolled back is not counted)."""
        with self._lock:
            self._counts[(exc.kind, exc.reason)] += 1

    def store_rejection(
        self, conn: Connection, topic: str, exc: BadMessageError, *, now: datetime | None = None
    ) -> None:
        """Keep a refused message among the last ones, inside the caller's transaction (the
        caller counts it with `count_rejection` once that transaction committed)."""
        conn.execute(
            REJECTIONS.insert().values(
                at=_utc(now or datetime.now(UTC)),
                topic=shorten(topic),
                kind=exc.kind,
                reason=exc.reason,
                message=shorten(exc.message, MAX_REJECTION_CHARS),
            )
        )
        _keep_newest(conn, REJECTIONS, (), REJECTIONS_KEPT)

    def rejection_counts(self) -> dict[tuple[str, str], int]:
        """(kind, reason) -> refused since this process started."""
        with self._lock:
            return dict(self._counts)

    def rejections(self, limit: int = 100) -> list[Rejection]:
        """The last refused messages, newest first."""
        query = sa.select(REJECTIONS).order_by(REJECTIONS.c.id.desc()).limit(limit)
        with db.transaction(self.engine) as conn:
            return [
                Rejection(row.id, _utc(row.at), row.topic, row.kind, row.reason, row.message)
                for row in conn.execute(query)
            ]

    # ---- queries ----
    def device(self, site: str, device: str) -> Device | None:
        query = sa.select(DEVICES).where(DEVICES.c.site == site, DEVICES.c.device == device)
        with db.transaction(self.engine) as conn:
            row = conn.execute(query).first()
        return _device(row) if row is not None else None

    def devices_at(self, refs: Sequence[str]) -> dict[str, Device]:
        """The known boxes among `refs` ("site/device"), by ref: one query for a batch."""
        if not refs:
            return {}
        wanted = set(refs)
        pairs = [ref.partition("/") for ref in wanted]
        # By the primary key on both dialects (a row value IN scans the table on SQLite); the
        # exact pairs are picked here.
        query = sa.select(DEVICES).where(
            DEVICES.c.site.in_(sorted({site for site, _, _ in pairs})),
            DEVICES.c.device.in_(sorted({device for _, _, device in pairs})),
        )
        with db.transaction(self.engine) as conn:
            found = [_device(row) for row in conn.execute(query)]
        return {device.ref: device for device in found if device.ref in wanted}

    def devices_changed(self, since: datetime | None) -> tuple[list[Device], datetime | None]:
        """The boxes whose rows changed at or after `since` (every box when None), and the
        newest change among them (None when none is stamped): to read again from there."""
        query = sa.select(DEVICES)
        if since is not None:
            query = query.where(DEVICES.c.changed_at >= since)
        newest: datetime | None = None
        found: list[Device] = []
        with db.transaction(self.engine) as conn:
            for row in conn.execute(query):
                found.append(_device(row))
                if row.changed_at is not None:
                    changed = _utc(row.changed_at)
                    newest = changed if newest is None or changed > newest else newest
        return found, newest

    def devices(self, selector: DeviceFilter | None = None) -> list[Device]:
        """Every known box (those `selector` picks, when given), sorted by ref."""
        query = sa.select(DEVICES).order_by(DEVICES.c.site, DEVICES.c.device)
        with db.transaction(self.engine) as conn:
            found = [_device(row) for row in conn.execute(query)]
        return [d for d in found if selector is None or selector.matches(d)]

    def history(self, site: str, device: str, limit: int = 50) -> list[UpdateRecord]:
        """A box's update reports, newest first."""
        c = DEVICE_UPDATES.c
        query = (
            sa.select(DEVICE_UPDATES)
            .where(c.site == site, c.device == device)
            .order_by(c.id.desc())
            .limit(limit)
        )
        with db.transaction(self.engine) as conn:
            return [_update(row) for row in conn.execute(query)]

    def samples(
        self,
        site: str,
        device: str,
        model: str,
        *,
        version: int | None = None,
        since: datetime | None = None,
    ) -> list[ModelSample]:
        """A model's kept samples on a box, newest first (`since` inclusive)."""
        c = MODEL_SAMPLES.c
        query = sa.select(MODEL_SAMPLES).where(c.site == site, c.device == device, c.model == model)
        if version is not None:
            query = query.where(c.version == version)
        if since is not None:
            query = query.where(c.at >= _utc(since))
        with db.transaction(self.engine) as conn:
            return [_sample(row) for row in conn.execute(query.order_by(c.at.desc(), c.id.desc()))]

    def latest_sample(
        self,
        site: str,
        device: str,
        model: str,
        version: int,
        *,
        before: datetime | None = None,
        min_samples: int = 0,
    ) -> ModelSample | None:
        """The newest sample of `model@version` with at least `min_samples` answered requests,
        received strictly before `before` when given."""
        c = MODEL_SAMPLES.c
        query = sa.select(MODEL_SAMPLES).where(
            c.site == site,
            c.device == device,
            c.model == model,
            c.version == version,
            c.samples >= min_samples,
        )
        if before is not None:
            query = query.where(c.at < _utc(before))
        with db.transaction(self.engine) as conn:
            row = conn.execute(query.order_by(c.at.desc(), c.id.desc()).limit(1)).first()
        return _sample(row) if row is not None else None

    def shadow(self, site: str, device: str, model: str) -> ShadowSample | None:
        """A box's latest shadow figures for `model`, if it ever reported any."""
        c = SHADOW_SAMPLES.c
        query = sa.select(SHADOW_SAMPLES).where(
            c.site == site, c.device == device, c.model == model
        )
        with db.transaction(self.engine) as conn:
            row = conn.execute(query).first()
        return _shadow_sample(row) if row is not None else None

    def counts_by_version(self) -> dict[tuple[str, int], int]:
        """(model, version) -> boxes whose latest telemetry reports it."""
        counts: Counter[tuple[str, int]] = Counter()
        with db.transaction(self.engine) as conn:
            for (models,) in conn.execute(sa.select(DEVICES.c.models)):
                for name, state in (db.loads(models) or {}).items():
                    if state.get("version") is not None:
                        counts[(name, int(state["version"]))] += 1
        return dict(counts)

    def counts_by_state(
        self, *, stale_after: timedelta, now: datetime | None = None
    ) -> dict[str, int]:
        """{"online", "offline", "stale"}: stale boxes say online but were not heard from for
        `stale_after`; each box counts in exactly one state."""
        cutoff = _utc(now or datetime.now(UTC)) - stale_after
        counts = {"online": 0, "offline": 0, "stale": 0}
        query = sa.select(DEVICES.c.online, DEVICES.c.last_seen)
        with db.transaction(self.engine) as conn:
            for online, last_seen in conn.execute(query):
                if not online:
                    counts["offline"] += 1
                elif last_seen is None or _utc(last_seen) < cutoff:
                    counts["stale"] += 1
                else:
                    counts["online"] += 1
        return counts


_SAMPLE_INSERT = MODEL_SAMPLES.insert()


class _Trim:
    """`_keep_newest` for one table and key columns, its two statements built once and run with
    parameters (see `Registry._upsert_statement`)."""

    def __init__(self, table: sa.Table, keys: tuple[str, ...], keep: int) -> None:
        where = [table.c[key] == sa.bindparam(f"key_{key}") for key in keys]
        self.keys = keys
        self.find = (
            sa.select(table.c.id).where(*where).order_by(table.c.id.desc()).offset(keep).limit(1)
        )
        self.drop = sa.delete(table).where(*where, table.c.id <= sa.bindparam("key_oldest"))

    def run(self, conn: Connection, values: Mapping[str, Any]) -> None:
        params = {f"key_{key}": values[key] for key in self.keys}
        oldest = conn.execute(self.find, params).scalar()
        if oldest is not None:
            conn.execute(self.drop, {**params, "key_oldest": oldest})


def _keep_newest(
    conn: Connection, table: sa.Table, where: tuple[sa.ColumnElement[bool], ...], keep: int
) -> None:
    """Delete the rows matching `where` older than the newest `keep` (by id)."""
    oldest_dropped = conn.execute(
        sa.select(table.c.id).where(*where).order_by(table.c.id.desc()).offset(keep).limit(1)
    ).scalar()
    if oldest_dropped is not None:
        conn.execute(sa.delete(table).where(*where, table.c.id <= oldest_dropped))


def _utc(value: datetime) -> datetime:
    """Aware UTC (SQLite hands back naive datetimes, which are stored as UTC)."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _maybe_utc(value: datetime | None) -> datetime | None:
    return _utc(value) if value is not None else None


_DEVICE_COLUMNS = tuple(column.name for column in DEVICES.c)
#: Columns whose change alone does not stamp `changed_at` (the page reads them again only at its
#: periodic full read): when the box was last heard from.
UNSHOWN_COLUMNS = frozenset({"last_seen", "last_telemetry_at", "first_seen", "changed_at"})


def _device(row: sa.Row[Any]) -> Device:
    return _device_of(tuple(row))


# A box's row changes only when it reports (once a minute or so): reading 10,000 boxes for the
# fleet page every few seconds then builds again only those that changed (the row is the key).
@functools.lru_cache(maxsize=DEVICE_CACHE)
def _device_of(values: tuple[Any, ...]) -> Device:
    row = SimpleNamespace(**dict(zip(_DEVICE_COLUMNS, values, strict=True)))
    return Device(
        site=row.site,
        device=row.device,
        line=row.line,
        labels=_labels(row.labels),
        groups=_texts(row.groups),
        profile=row.profile,
        agent_version=row.agent_version,
        models=_models(row.models),
        ready=row.ready,
        reasons=_texts(row.reasons),
        online=bool(row.online),
        last_seen=_maybe_utc(row.last_seen),
        first_seen=_utc(row.first_seen),
        last_telemetry_at=_maybe_utc(row.last_telemetry_at),
    )


# A fleet's boxes mostly repeat the same few models, labels and groups: each distinct JSON text is
# decoded once into a read-only value shared by the boxes that store it (reading 10,000 boxes for
# the fleet page is then mostly reading rows, not decoding JSON).
@functools.lru_cache(maxsize=JSON_CACHE)
def _models(text: str | None) -> Mapping[str, ModelState]:
    return MappingProxyType(
        {
            name: ModelState(
                state.get("version"), state.get("status", "unknown"), state.get("selftest")
            )
            for name, state in (db.loads(text) or {}).items()
        }
    )


@functools.lru_cache(maxsize=JSON_CACHE)
def _labels(text: str | None) -> Mapping[str, str]:
    return MappingProxyType(db.loads(text) or {})


@functools.lru_cache(maxsize=JSON_CACHE)
def _texts(text: str | None) -> tuple[str, ...]:
    return tuple(db.loads(text) or ())


def _update(row: sa.Row[Any]) -> UpdateRecord:
    values = dict(row._mapping)
    values.pop("report_key", None)  # the idempotency key is the registry's, not the history's
    values["at"] = _utc(row.at)
    values["received_at"] = _utc(row.received_at)
    return UpdateRecord(**values)


def _sample(row: sa.Row[Any]) -> ModelSample:
    return ModelSample(
        site=row.site,
        device=row.device,
        at=_utc(row.at),
        model=row.model,
        version=row.version,
        p50=row.p50,
        p95=row.p95,
        samples=row.samples,
        outcomes=db.loads(row.outcomes) or {},
        selftest_ok=row.selftest_ok,
        drift_alert=row.drift_alert,
    )


def _shadow_sample(row: sa.Row[Any]) -> ShadowSample:
    return ShadowSample(
        site=row.site,
        device=row.device,
        model=row.model,
        at=_utc(row.at),
        candidate_version=row.candidate_version,
        candidate_sha256=row.candidate_sha256,
        compared=row.compared,
        agreement=row.agreement,
        disagreements=tuple(
            (str(a), str(c), int(n)) for a, c, n in db.loads(row.disagreements) or ()
        ),
        candidate_p50=row.candidate_p50,
        candidate_p95=row.candidate_p95,
    )
