"""The shadow phase of a rollout, on the runner's side: its table, its view and its shadow gate.

It owns the table `rollout_shadows` (one row per box of a rollout whose plan has a `[shadow]`
table: its wave, its shadow notice and what the box said about it) and the pure reads the runner
(`fleet_controller.rollouts`) needs around it: which boxes of a wave still need a shadow notice,
which are out, which are final (docs/fleet.md "Shadow phase"); how a report on a shadow notice
moves its box; and the per-box shadow figures the shadow gate judges (`gates.shadow_gates`).
Sending and publishing are `fleet_controller.sending`'s, which does them for release and rollback
notices too; this module gives it the rows of a batch and marks what the broker acknowledged.

A box's shadow state: `pending` (no notice yet), `sent`, `progress` (downloading, verifying,
staging), `shadowing` (it shadows the active model with the candidate: final for the phase),
`refused`, `ignored` (it already runs the version), `timed_out`.

The table is declared on `db.METADATA` with a foreign key to `rollouts.id`, so it imports
`fleet_controller.rollout_tables` (which declares that table); it is created by the schema
migration step 3 (`fleet_controller.migrations`), with `shadow_samples`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from fleet_controller import db, rollout_tables
from fleet_controller.gates import BoxShadow
from fleet_controller.registry import Registry
from fleet_controller.rollout_tables import ROLLOUTS

SHADOW_STATES = (
    "pending", "sent", "progress", "shadowing", "refused", "ignored", "timed_out",
)  # fmt: skip
IN_FLIGHT = frozenset({"sent", "progress"})
#: The phase a box reports once it shadows the candidate.
SHADOWING_PHASE = "shadowing"

_TIME = sa.DateTime(timezone=True)

ROLLOUT_SHADOWS = sa.Table(
    "rollout_shadows",
    db.METADATA,
    sa.Column("rollout_id", sa.String(64), sa.ForeignKey(ROLLOUTS.c.id), primary_key=True),
    sa.Column("site", sa.String(64), primary_key=True),
    sa.Column("device", sa.String(64), primary_key=True),
    sa.Column("wave", sa.Integer, nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("old_version", sa.Integer),
    sa.Column("sequence", sa.BigInteger, index=True),
    sa.Column("notice", sa.LargeBinary),
    sa.Column("sent_at", _TIME),
    sa.Column("outcome_at", _TIME),
    sa.Column("reason", sa.Text),
    sa.Index("rollout_shadows_by_device", "site", "device"),
)


@dataclass(frozen=True)
class ShadowView:
    """The current wave's shadow notices, as the machine's `View` wants them."""

    sendable: tuple[str, ...]
    waiting: int
    in_flight: tuple[tuple[str, datetime | None], ...]
    final: int


def insert_rows(conn: Connection, rollout_id: str, waves: Iterable[list[str]]) -> None:
    """One pending row per box of a new rollout with a shadow phase."""
    rows = [
        {"rollout_id": rollout_id, "site": _site(ref), "device": _device(ref), "wave": number,
         "state": "pending"}
        for number, wave in enumerate(waves, start=1)
        for ref in wave
    ]  # fmt: skip
    if rows:
        conn.execute(ROLLOUT_SHADOWS.insert(), rows)


def rows(conn: Connection, rollout_id: str) -> list[sa.Row[Any]]:
    c = ROLLOUT_SHADOWS.c
    query = (
        sa.select(ROLLOUT_SHADOWS)
        .where(c.rollout_id == rollout_id)
        .order_by(c.wave, c.site, c.device)
    )
    return list(conn.execute(query).all())


def row(conn: Connection, rollout_id: str, site: str, device: str) -> sa.Row[Any] | None:
    return conn.execute(sa.select(ROLLOUT_SHADOWS).where(*key(rollout_id, site, device))).first()


def rows_at(conn: Connection, rollout_id: str, refs: Sequence[str]) -> dict[str, sa.Row[Any]]:
    """The shadow rows of the boxes `refs`, by ref: one query for a batch."""
    return rollout_tables.rows_at(conn, ROLLOUT_SHADOWS, rollout_id, refs)


def unsent_rows(conn: Connection, rollout_id: str) -> list[sa.Row[Any, Any, Any]]:
    """Shadow notices stored but not acknowledged by the broker (site, device, payload)."""
    c = ROLLOUT_SHADOWS.c
    query = sa.select(c.site, c.device, c.notice.label("payload")).where(
        c.rollout_id == rollout_id, c.sent_at.is_(None), c.notice.is_not(None)
    )
    return list(conn.execute(query.order_by(c.site, c.device)).all())


def mark_sent(
    conn: Connection, rollout_id: str, items: Sequence[tuple[str, str, bytes]], *, at: datetime
) -> None:
    """Stamp `sent_at` on the shadow rows of `items` (site, device, the notice the broker
    acknowledged), where it is unset and the stored notice is still that one."""
    rollout_tables.mark_sent_in(conn, ROLLOUT_SHADOWS, "sent_at", "notice", rollout_id, items, at)


def key(rollout_id: str, site: str, device: str) -> tuple[Any, ...]:
    c = ROLLOUT_SHADOWS.c
    return (c.rollout_id == rollout_id, c.site == site, c.device == device)


def update(conn: Connection, rollout_id: str, site: str, device: str, **values: Any) -> None:
    conn.execute(ROLLOUT_SHADOWS.update().where(*key(rollout_id, site, device)).values(**values))


def view(
    conn: Connection, rollout_id: str, wave: int, site_open: Callable[[str], bool]
) -> ShadowView:
    sendable: list[str] = []
    in_flight: list[tuple[str, datetime | None]] = []
    waiting = final = 0
    for found in rows(conn, rollout_id):
        if found.wave != wave:
            continue
        if found.state == "pending":
            if site_open(found.site):
                sendable.append(_ref(found))
            else:
                waiting += 1
        elif found.state in IN_FLIGHT:
            in_flight.append((_ref(found), _maybe_utc(found.sent_at)))
        else:
            final += 1
    return ShadowView(tuple(sendable), waiting, tuple(in_flight), final)


def mark_timed_out(conn: Connection, rollout_id: str, refs: Iterable[str]) -> None:
    c = ROLLOUT_SHADOWS.c
    for ref in refs:
        conn.execute(
            ROLLOUT_SHADOWS.update()
            .where(*key(rollout_id, _site(ref), _device(ref)), c.state.in_(sorted(IN_FLIGHT)))
            .values(state="timed_out", reason="no shadowing report within the deadline")
        )


def next_state(current: str, phase: str, outcome: str) -> str | None:
    """A box's shadow state after a report on its shadow notice, or None to keep it.

    Shadowing is reached from any non-final state (a late report after a time-out too); a
    refusal is final; progress moves only a box just sent; `ignored` only a box that never
    reported acting on the notice; the report that the shadow ended (phase `shadowed`) keeps
    the state."""
    if outcome == "progress" and phase == SHADOWING_PHASE:
        return "shadowing" if current in (*IN_FLIGHT, "timed_out") else None
    if outcome == "progress":
        return "progress" if current == "sent" else None
    if outcome == "ignored":
        return "ignored" if current == "sent" else None
    if outcome in ("refused", "committed", "rolled_back"):
        # committed / rolled_back: an agent that ignored the shadow extension and activated
        # the version (a downgraded box): recorded as it is, never hidden.
        return outcome if outcome != current else None
    return None


def box_figures(
    registry: Registry,
    found: Iterable[sa.Row[Any]],
    *,
    name: str,
    version: int,
    sha256: str,
) -> list[BoxShadow]:
    """The latest shadow figures of the boxes that shadow `name@version` (this bundle), taken
    only when they arrived after the box's shadow notice was sent; with the active version's
    p95 from the same box's telemetry."""
    boxes = []
    for box in found:
        if box.state != "shadowing":
            continue
        sample = registry.shadow(box.site, box.device, name)
        sent_at = _maybe_utc(box.sent_at)
        if (
            sample is None
            or sample.candidate_version != version
            or sample.candidate_sha256 not in (None, sha256)
            or (sent_at is not None and sample.at < sent_at)
        ):
            continue
        active_p95 = None
        if box.old_version is not None:
            latest = registry.latest_sample(box.site, box.device, name, box.old_version)
            active_p95 = latest.p95 if latest is not None else None
        boxes.append(
            BoxShadow(
                ref=_ref(box),
                compared=sample.compared,
                agreement=sample.agreement,
                disagreements=sample.disagreements,
                candidate_p95=sample.candidate_p95,
                active_p95=active_p95,
            )
        )
    return boxes


def counts(found: Iterable[sa.Row[Any]]) -> dict[str, int]:
    tally = Counter(box.state for box in found)
    return {state: tally.get(state, 0) for state in SHADOW_STATES}


def box_json(found: sa.Row[Any] | None) -> dict[str, Any]:
    if found is None:
        return {}
    return {
        "shadow_state": found.state,
        "shadow_sequence": found.sequence,
        "shadow_reason": found.reason,
    }


def _ref(found: sa.Row[Any]) -> str:
    return f"{found.site}/{found.device}"


def _site(ref: str) -> str:
    return ref.partition("/")[0]


def _device(ref: str) -> str:
    return ref.partition("/")[2]


def _maybe_utc(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
