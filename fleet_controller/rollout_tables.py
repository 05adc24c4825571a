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
from collections.abc import Mapping
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
    url: str
    state: RolloutState
    created_at: datetime
    updated_at: datetime
    created_by: str


# ---- rows -----------------------------------------------------------------------------------
def box_key(rollout_id: str, site: str, device: str) -> tuple[Any, ...]:
    c = ROLLOUT_BOXES.c
    return (c.rollout_id == rollout_id, c.site == site, c.device == device)


def box_row(conn: Connection, rollout_id: str, site: str, device: str) -> sa.Row[Any] | None:
    return conn.execute(sa.select(ROLLOUT_BOXES).where(*box_key(rollout_id, site, device))).first()


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
    conn.execute(ROLLOUT_BOXES.update().where(*box_key(rollout_id, site, device)).values(**values))


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
    last = conn.execute(sa.select(SEQUENCES.c.last).where(SEQUENCES.c.id == 1)).scalar()
    sequence = next_sequence(last, now)
    if last is None:
        conn.execute(SEQUENCES.insert().values(id=1, last=sequence))
    else:
        conn.execute(SEQUENCES.update().where(SEQUENCES.c.id == 1).values(last=sequence))
    return sequence


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
        url=str(bundle["url"]),
        state=RolloutState.from_json(db.loads(row.state)),
        created_at=utc(row.created_at),
        updated_at=utc(row.updated_at),
        created_by=row.created_by,
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
    state = rollout.state
    per_wave = []
    for number in range(1, state.policy.waves + 1):
        wave = [row for row in rows if row.wave == number]
        counts = Counter(row.state for row in wave)
        per_wave.append(
            {
                "wave": number,
                "total": len(wave),
                "counts": {n: counts.get(n, 0) for n in BOX_STATES},
            }
        )
    overall = Counter(row.state for row in rows)
    return {
        **summary(rollout, overall),
        "phase_since": iso(state.phase_since),
        "soak_until": iso(state.soak_until),
        "paused_from": state.paused_from,
        "halt_reason": state.halt_reason,
        "finished_at": iso(state.finished_at),
        "total": len(rows),
        "per_wave": per_wave,
        "rollback": dict(
            sorted(Counter(r.rollback_state for r in rows if r.rollback_state).items())
        ),
        "gates": [dict(result) for result in state.gate_results],
        "shadow_gates": [dict(result) for result in state.shadow_results],
        "shadow": shadow,
        "bundle_facts": {**rollout.facts.to_json(), "url": rollout.url},
        "plan": rollout.plan.to_json(),
        "boxes": [{**box_json(row), **shadow_boxes.get(box_ref(row), {})} for row in rows],
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
