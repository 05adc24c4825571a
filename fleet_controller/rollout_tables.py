"""The rollouts' tables, their rows and the JSON the API shows of them.

It owns the tables `rollouts` (plan, bundle facts, the machine's state), `rollout_boxes` (one row
per box: its wave, its release notice and outcome, its rollback notice and outcome), `audit`
(every transition: what, when, why, who, with figures) and `sequences` (the last notice sequence
issued), all declared on `db.METADATA` and created by the schema migrations
(`fleet_controller.migrations`); the states a box's row goes through; the small reads and writes
of those rows, each inside the caller's transaction; and the shaping of a rollout and its boxes
into the status JSON. When to read or write them is the runner's (`fleet_controller.rollouts`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from fleet_controller import db
from fleet_controller.machine import Audit, MarkTimedOut, RolloutState
from fleet_controller.notices import BundleFacts, next_sequence
from fleet_controller.plan import RolloutPlan

BOX_STATES = (
    "pending", "sent", "progress", "committed", "refused", "rolled_back", "timed_out", "ignored",
)  # fmt: skip
FINAL = frozenset({"committed", "refused", "rolled_back", "timed_out", "ignored"})
IN_FLIGHT = frozenset({"sent", "progress"})
#: A box not final yet: no notice stored, or one out.
UNFINISHED = ("pending", "progress", "sent")
#: Boxes that never ran the release (or have something newer) get no rollback notice.
NOT_ROLLED_BACK = frozenset({"pending", "refused", "rolled_back", "ignored"})
ROLLBACK_FINAL = frozenset(
    {"committed", "refused", "rolled_back", "timed_out", "ignored", "skipped"}
)
OUTCOMES = frozenset({"committed", "refused", "rolled_back"})

# ---- tables -------------------------------------------------------------------------------
_TIME = sa.DateTime(timezone=True)
_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

ROLLOUTS = sa.Table(
    "rollouts",
    db.METADATA,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("name", sa.String(64), nullable=False, index=True),
    sa.Column("plan", sa.Text, nullable=False),
    sa.Column("bundle", sa.Text, nullable=False),  # facts + url
    sa.Column("state", sa.Text, nullable=False),
    sa.Column("status", sa.String(16), nullable=False, index=True),
    sa.Column("created_at", _TIME, nullable=False),
    sa.Column("updated_at", _TIME, nullable=False),
    sa.Column("created_by", sa.String(200), nullable=False),
)
ROLLOUT_BOXES = sa.Table(
    "rollout_boxes",
    db.METADATA,
    sa.Column("rollout_id", sa.String(64), sa.ForeignKey("rollouts.id"), primary_key=True),
    sa.Column("site", sa.String(64), primary_key=True),
    sa.Column("device", sa.String(64), primary_key=True),
    sa.Column("wave", sa.Integer, nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("v2", sa.Boolean),
    sa.Column("old_version", sa.Integer),
    sa.Column("sequence", sa.BigInteger, index=True),
    sa.Column("notice", sa.LargeBinary),
    sa.Column("sent_at", _TIME),
    sa.Column("outcome_at", _TIME),
    sa.Column("reason", sa.Text),
    sa.Column("rollback_sequence", sa.BigInteger, index=True),
    sa.Column("rollback_notice", sa.LargeBinary),
    sa.Column("rollback_sent_at", _TIME),
    sa.Column("rollback_state", sa.String(16)),
    sa.Column("rollback_reason", sa.Text),
    sa.Index("rollout_boxes_by_device", "site", "device"),
    # A tick reads the current wave's boxes, and the notices not yet acknowledged, through these
    # (schema version 4): its cost follows the wave, not the whole rollout.
    sa.Index("rollout_boxes_by_wave", "rollout_id", "wave", "state"),
    sa.Index("rollout_boxes_unsent", "rollout_id", "sent_at"),
)
AUDIT = sa.Table(
    "audit",
    db.METADATA,
    sa.Column("id", _ID, primary_key=True, autoincrement=True),
    sa.Column(
        "rollout_id", sa.String(64), sa.ForeignKey("rollouts.id"), nullable=False, index=True
    ),
    sa.Column("at", _TIME, nullable=False),
    sa.Column("what", sa.String(64), nullable=False),
    sa.Column("why", sa.Text, nullable=False),
    sa.Column("actor", sa.String(200), nullable=False),
    sa.Column("figures", sa.Text, nullable=False),
)
SEQUENCES = sa.Table(
    "sequences",
    db.METADATA,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("last", sa.BigInteger, nullable=False),
)


@dataclass(frozen=True)
class Rollout:
    """A rollout row, read: its plan and bundle are fixed at creation."""

    id: str
    plan: RolloutPlan
    facts: BundleFacts
    url: str | None  # None: delivered over MQTT alone
    state: RolloutState
    created_at: datetime
    updated_at: datetime
    created_by: str
    # `extensions.mqtt_chunks` of its notices, when the plan delivers over MQTT.
    mqtt_chunks: dict[str, Any] | None = None


# ---- rows -----------------------------------------------------------------------------------
def box_key(rollout_id: str, site: str, device: str) -> tuple[Any, ...]:
    c = ROLLOUT_BOXES.c
    return (c.rollout_id == rollout_id, c.site == site, c.device == device)


def box_row(
    conn: Connection, rollout_id: str, site: str, device: str, *, lock: bool = False
) -> sa.Row[Any] | None:
    """One box's row; with `lock`, locked until the transaction ends (SELECT ... FOR UPDATE on
    PostgreSQL, so two instances applying reports on one box take turns; SQLite's writer lock
    already serialises them)."""
    query = _BOX_ROW_LOCKED if lock else _BOX_ROW
    return conn.execute(
        query, {"b_rollout": rollout_id, "b_site": site, "b_device": device}
    ).first()


def _by_box(table: sa.Table) -> tuple[Any, ...]:
    """WHERE one box of one rollout, with bound parameters (statements built once: SQLAlchemy
    then neither rebuilds nor re-keys them per report)."""
    c = table.c
    return (
        c.rollout_id == sa.bindparam("b_rollout"),
        c.site == sa.bindparam("b_site"),
        c.device == sa.bindparam("b_device"),
    )


_BOX_ROW = sa.select(ROLLOUT_BOXES).where(*_by_box(ROLLOUT_BOXES))
_BOX_ROW_LOCKED = _BOX_ROW.with_for_update()
_BOX_UPDATES: dict[tuple[str, ...], Any] = {}


#: A box row's columns without the stored notices (which are ~1 KiB each): what a tick's view,
#: the status's counts and the gates read.
LIGHT_COLUMNS = tuple(
    column for column in ROLLOUT_BOXES.c if column.name not in ("notice", "rollback_notice")
)


def unfinished_wave_rows(conn: Connection, rollout_id: str, wave: int) -> list[sa.Row[Any]]:
    """The boxes of one wave not yet final (pending or in flight), without their notices: what a
    tick looks at, fewer as the wave's boxes finish (index `rollout_boxes_by_wave`)."""
    c = ROLLOUT_BOXES.c
    query = (
        sa.select(*LIGHT_COLUMNS)
        .where(c.rollout_id == rollout_id, c.wave == wave, c.state.in_(UNFINISHED))
        .order_by(c.site, c.device)
    )
    return list(conn.execute(query).all())


def finished_in_wave(conn: Connection, rollout_id: str, wave: int) -> int:
    """How many boxes of one wave are final (counted by the index, no row read out)."""
    c = ROLLOUT_BOXES.c
    query = sa.select(sa.func.count()).where(
        c.rollout_id == rollout_id, c.wave == wave, c.state.not_in(UNFINISHED)
    )
    return int(conn.execute(query).scalar_one())


def light_rows(
    conn: Connection, rollout_id: str, *, up_to_wave: int | None = None
) -> list[sa.Row[Any]]:
    """Every box of the rollout (of waves up to `up_to_wave`), without their notices."""
    c = ROLLOUT_BOXES.c
    query = sa.select(*LIGHT_COLUMNS).where(c.rollout_id == rollout_id)
    if up_to_wave is not None:
        query = query.where(c.wave <= up_to_wave)
    return list(conn.execute(query.order_by(c.wave, c.site, c.device)).all())


def rollback_rows(conn: Connection, rollout_id: str) -> list[sa.Row[Any]]:
    """The boxes a rollback concerns (sent the release, and not themselves refusing or rolling
    back), without their notices."""
    c = ROLLOUT_BOXES.c
    query = sa.select(*LIGHT_COLUMNS).where(
        c.rollout_id == rollout_id,
        c.sequence.is_not(None),
        c.state.not_in(sorted(NOT_ROLLED_BACK)),
    )
    return list(conn.execute(query.order_by(c.site, c.device)).all())


def unsent_rows(
    conn: Connection, rollout_id: str, *, rollback: bool
) -> list[sa.Row[Any, Any, Any]]:
    """Boxes whose stored release (or rollback) notice the broker has not acknowledged yet,
    with the notice (index `rollout_boxes_unsent` for releases)."""
    c = ROLLOUT_BOXES.c
    notice, sent_at = (c.rollback_notice, c.rollback_sent_at) if rollback else (c.notice, c.sent_at)
    query = sa.select(c.site, c.device, notice.label("payload")).where(
        c.rollout_id == rollout_id, sent_at.is_(None), notice.is_not(None)
    )
    return list(conn.execute(query.order_by(c.site, c.device)).all())


def wave_counts(conn: Connection, rollout_id: str) -> dict[int, dict[str, int]]:
    """wave -> box state -> boxes (one GROUP BY, no rows read out)."""
    c = ROLLOUT_BOXES.c
    counts: dict[int, dict[str, int]] = {}
    query = (
        sa.select(c.wave, c.state, sa.func.count())
        .where(c.rollout_id == rollout_id)
        .group_by(c.wave, c.state)
    )
    for wave, state, count in conn.execute(query):
        counts.setdefault(int(wave), {})[state] = int(count)
    return counts


def rollback_counts(conn: Connection, rollout_id: str) -> dict[str, int]:
    c = ROLLOUT_BOXES.c
    query = (
        sa.select(c.rollback_state, sa.func.count())
        .where(c.rollout_id == rollout_id, c.rollback_state.is_not(None))
        .group_by(c.rollback_state)
    )
    return {str(state): int(count) for state, count in conn.execute(query)}


def box_rows(conn: Connection, rollout_id: str) -> list[sa.Row[Any]]:
    c = ROLLOUT_BOXES.c
    query = (
        sa.select(ROLLOUT_BOXES)
        .where(c.rollout_id == rollout_id)
        .order_by(c.wave, c.site, c.device)
    )
    return list(conn.execute(query).all())


def row_by_sequence(conn: Connection, site: str, device: str, sequence: int) -> sa.Row[Any] | None:
    c = ROLLOUT_BOXES.c
    query = sa.select(ROLLOUT_BOXES).where(
        c.site == site,
        c.device == device,
        sa.or_(c.sequence == sequence, c.rollback_sequence == sequence),
    )
    return conn.execute(query).first()


def update_box(conn: Connection, rollout_id: str, site: str, device: str, **values: Any) -> None:
    columns = tuple(values)
    statement = _BOX_UPDATES.get(columns)
    if statement is None:  # one per set of columns (a handful), kept
        statement = (
            ROLLOUT_BOXES.update()
            .where(*_by_box(ROLLOUT_BOXES))
            .values({column: sa.bindparam(f"v_{column}") for column in columns})
        )
        _BOX_UPDATES[columns] = statement
    conn.execute(
        statement,
        {
            "b_rollout": rollout_id,
            "b_site": site,
            "b_device": device,
            **{f"v_{column}": value for column, value in values.items()},
        },
    )


def box_rows_at(conn: Connection, rollout_id: str, refs: Sequence[str]) -> dict[str, sa.Row[Any]]:
    """The rows of the boxes `refs` (with their notices), by ref: one query for a batch."""
    return rows_at(conn, ROLLOUT_BOXES, rollout_id, refs)


def rows_at(
    conn: Connection, table: sa.Table, rollout_id: str, refs: Sequence[str]
) -> dict[str, sa.Row[Any]]:
    """Rows of a per-box rollout table (`rollout_boxes`, `rollout_shadows`) for `refs`, by ref."""
    if not refs:
        return {}
    c = table.c
    wanted = set(refs)
    # `site IN (..) AND device IN (..)` is searched by the primary key on SQLite, where a row
    # value `(site, device) IN (..)` scans the rollout's rows; the pairs are then picked here.
    query = sa.select(table).where(
        c.rollout_id == rollout_id,
        c.site.in_(sorted({ref_site(ref) for ref in refs})),
        c.device.in_(sorted({ref_device(ref) for ref in refs})),
    )
    return {ref: row for row in conn.execute(query) if (ref := box_ref(row)) in wanted}


def mark_sent(
    conn: Connection,
    rollout_id: str,
    items: Sequence[tuple[str, str, bytes]],
    *,
    rollback: bool,
    at: datetime,
) -> None:
    """Stamp `sent_at` (or `rollback_sent_at`) on the boxes of `items` (site, device, the notice
    the broker acknowledged), where it is unset and the stored notice is still that one."""
    if rollback:
        mark_sent_in(
            conn, ROLLOUT_BOXES, "rollback_sent_at", "rollback_notice", rollout_id, items, at
        )
    else:
        mark_sent_in(conn, ROLLOUT_BOXES, "sent_at", "notice", rollout_id, items, at)


def mark_sent_in(
    conn: Connection,
    table: sa.Table,
    sent_column: str,
    notice_column: str,
    rollout_id: str,
    items: Sequence[tuple[str, str, bytes]],
    at: datetime,
) -> None:
    """In a per-box rollout table, stamp `sent_column` on the boxes of `items` (site, device,
    the notice the broker acknowledged) where it is unset and `notice_column` still holds that
    notice: one statement, executed for every item."""
    c = table.c
    statement = (
        table.update()
        .where(
            c.rollout_id == rollout_id,
            c.site == sa.bindparam("b_site"),
            c.device == sa.bindparam("b_device"),
            c[sent_column].is_(None),
            c[notice_column] == sa.bindparam("b_notice"),
        )
        .values({sent_column: at})
    )
    conn.execute(
        statement,
        [
            {"b_site": site, "b_device": device, "b_notice": payload}
            for site, device, payload in items
        ],
    )


def mark_timed_out(conn: Connection, rollout_id: str, action: MarkTimedOut, now: datetime) -> None:
    c = ROLLOUT_BOXES.c
    column, reason_column = (
        ("rollback_state", "rollback_reason") if action.rollback else ("state", "reason")
    )
    what = "rollback notice" if action.rollback else "notice"
    for ref in action.refs:
        conn.execute(
            ROLLOUT_BOXES.update()
            .where(
                *box_key(rollout_id, ref_site(ref), ref_device(ref)),
                c[column].in_(sorted(IN_FLIGHT)),
            )
            .values(
                {
                    column: "timed_out",
                    reason_column: f"no final outcome within the deadline after its {what}",
                }
            )
        )


def allocate_sequence(conn: Connection, now: datetime) -> int:
    """`max(now_ms, last + 1)`, recorded in the caller's transaction (with the notice it signs)."""
    (sequence,) = allocate_sequences(conn, now, 1)
    return sequence


def allocate_sequences(conn: Connection, now: datetime, count: int) -> list[int]:
    """`count` consecutive sequences from `max(now_ms, last + 1)`, recorded in the caller's
    transaction (with the notices they sign): what `count` calls of `allocate_sequence` give."""
    if count <= 0:
        return []
    last = conn.execute(sa.select(SEQUENCES.c.last).where(SEQUENCES.c.id == 1)).scalar()
    first = next_sequence(last, now)
    final = next_sequence(first + count - 2, now) if count > 1 else first
    if last is None:
        conn.execute(SEQUENCES.insert().values(id=1, last=final))
    else:
        conn.execute(SEQUENCES.update().where(SEQUENCES.c.id == 1).values(last=final))
    return list(range(first, final + 1))


def insert_audit(conn: Connection, rollout_id: str, now: datetime, audit: Audit) -> None:
    conn.execute(
        AUDIT.insert().values(
            rollout_id=rollout_id, at=now, what=audit.what, why=audit.why,
            actor=audit.actor, figures=db.dumps(audit.figures),
        )
    )  # fmt: skip


def box_counts(conn: Connection) -> dict[str, dict[str, int]]:
    c = ROLLOUT_BOXES.c
    counts: dict[str, dict[str, int]] = {}
    for rollout_id, state, count in conn.execute(
        sa.select(c.rollout_id, c.state, sa.func.count()).group_by(c.rollout_id, c.state)
    ):
        counts.setdefault(rollout_id, {})[state] = count
    return counts


# ---- reading rows ---------------------------------------------------------------------------
def read_rollout(row: sa.Row[Any]) -> Rollout:
    bundle = db.loads(row.bundle)
    return Rollout(
        id=row.id,
        plan=RolloutPlan.from_json(db.loads(row.plan)),
        facts=facts_from_json(bundle),
        url=str(bundle["url"]) if bundle.get("url") else None,
        state=RolloutState.from_json(db.loads(row.state)),
        created_at=utc(row.created_at),
        updated_at=utc(row.updated_at),
        created_by=row.created_by,
        mqtt_chunks=bundle.get("mqtt_chunks"),
    )


def with_state(rollout: Rollout, state: RolloutState) -> Rollout:
    return replace(rollout, state=state)


# ---- status JSON ----------------------------------------------------------------------------
def summary(rollout: Rollout, counts: Mapping[str, int]) -> dict[str, Any]:
    state = rollout.state
    return {
        "id": rollout.id,
        "name": rollout.plan.name,
        "bundle": f"{rollout.facts.name}@{rollout.facts.version}",
        "status": state.status,
        "wave": state.wave,
        "waves": state.policy.waves,
        "phase": state.phase,
        "created_at": rollout.created_at.isoformat(),
        "created_by": rollout.created_by,
        "updated_at": rollout.updated_at.isoformat(),
        "counts": {name: counts.get(name, 0) for name in BOX_STATES},
    }


def full_status(
    rollout: Rollout,
    rows: list[sa.Row[Any]],
    *,
    shadow: dict[str, int] | None,
    shadow_boxes: Mapping[str, dict[str, Any]],
) -> dict[str, Any]:
    """The rollout in full; `shadow` and `shadow_boxes` (by ref) are the shadow phase's counts
    and per-box fields (`fleet_controller.shadowing`), merged in as they are."""
    per_wave: dict[int, Counter[str]] = {}
    for row in rows:
        per_wave.setdefault(row.wave, Counter())[row.state] += 1
    rollback = Counter(r.rollback_state for r in rows if r.rollback_state)
    return {
        **brief_status(rollout, per_wave, rollback, shadow=shadow),
        "boxes": [{**box_json(row), **shadow_boxes.get(box_ref(row), {})} for row in rows],
    }


def brief_status(
    rollout: Rollout,
    per_wave: Mapping[int, Mapping[str, int]],
    rollback: Mapping[str, int],
    *,
    shadow: dict[str, int] | None,
) -> dict[str, Any]:
    """`full_status` without `boxes`, from counts alone (`wave_counts`, `rollback_counts`):
    what the fleet page asks for every few seconds, at the same cost for any fleet's size."""
    state = rollout.state
    overall: Counter[str] = Counter()
    waves = []
    for number in range(1, state.policy.waves + 1):
        counts = per_wave.get(number, {})
        overall.update(counts)
        waves.append(
            {
                "wave": number,
                "total": sum(counts.values()),
                "counts": {n: counts.get(n, 0) for n in BOX_STATES},
            }
        )
    return {
        **summary(rollout, overall),
        "phase_since": iso(state.phase_since),
        "soak_until": iso(state.soak_until),
        "paused_from": state.paused_from,
        "halt_reason": state.halt_reason,
        "finished_at": iso(state.finished_at),
        "total": sum(overall.values()),
        "per_wave": waves,
        "rollback": dict(sorted(rollback.items())),
        "gates": [dict(result) for result in state.gate_results],
        "shadow_gates": [dict(result) for result in state.shadow_results],
        "shadow": shadow,
        "bundle_facts": {
            **rollout.facts.to_json(),
            "url": rollout.url,
            "mqtt_chunks": rollout.mqtt_chunks,
        },
        "plan": rollout.plan.to_json(),
    }


def box_json(row: sa.Row[Any]) -> dict[str, Any]:
    return {
        "ref": box_ref(row), "wave": row.wave, "state": row.state, "v2": row.v2,
        "old_version": row.old_version, "sequence": row.sequence,
        "sent_at": iso(maybe_utc(row.sent_at)), "outcome_at": iso(maybe_utc(row.outcome_at)),
        "reason": row.reason, "rollback_state": row.rollback_state,
        "rollback_sequence": row.rollback_sequence, "rollback_reason": row.rollback_reason,
    }  # fmt: skip


def audit_json(row: sa.Row[Any]) -> dict[str, Any]:
    return {
        "at": utc(row.at).isoformat(), "what": row.what, "why": row.why,
        "actor": row.actor, "figures": db.loads(row.figures) or {},
    }  # fmt: skip


def facts_from_json(bundle: Mapping[str, Any]) -> BundleFacts:
    return BundleFacts(
        str(bundle["name"]), int(bundle["version"]), str(bundle["sha256"]), int(bundle["size"])
    )


def facts_json(facts: BundleFacts) -> dict[str, Any]:
    return facts.to_json()


# ---- refs and times -------------------------------------------------------------------------
def box_ref(row: sa.Row[Any]) -> str:
    return f"{row.site}/{row.device}"


def ref_site(ref: str) -> str:
    return ref.partition("/")[0]


def ref_device(ref: str) -> str:
    return ref.partition("/")[2]


def utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def maybe_utc(value: datetime | None) -> datetime | None:
    return utc(value) if value is not None else None


def iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None
