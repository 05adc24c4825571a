"""Notices out, in batches: what the rollouts runner sends, stored before it is published.

A wave of 5,000 boxes is sent `NOTICE_BATCH` boxes at a time. For each batch the sender reads
the boxes' registry records and rows at once, allocates the batch's sequences, signs and stores
every notice in one transaction, publishes the batch to the broker pipelined (QoS 1, all in
flight together, then every PUBACK awaited: `PublishMany`), and marks the acknowledged ones sent
in one more transaction. Per box that is a share of three transactions and no round trip of its
own, where sending one box at a time cost three transactions and a broker round trip each.

What crash safety promised (docs/fleet.md "Crash safety") still holds: a notice is stored
before it is first published, `sent_at` is set only after the broker's PUBACK, and a stored
notice without `sent_at` is published again byte-identical (`republish`) until acknowledged. A
batch is marked together, so a crash between its PUBACKs and the mark publishes that batch's
acknowledged notices once more, with the same bytes and sequence, which a box has already seen
and ignores. A batch the broker did not fully acknowledge raises `NotAcknowledgedError` after marking
what was acknowledged; the rest of the wave waits for the next tick.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from edge_bundle.chunks import ChunkedDelivery
from edge_bundle.release import MAX_VALIDITY
from edge_bundle.signing import SigningKey
from fleet_controller import db, faults, shadowing
from fleet_controller.machine import Audit
from fleet_controller.notices import (
    BundleFacts,
    build_notice,
    delivery_for,
    notice_topic,
    speaks_v2,
    stored_delivery,
    understands_shadow,
)
from fleet_controller.registry import Device, Registry
from fleet_controller.rollout_tables import (
    ROLLOUTS,
    Rollout,
    allocate_sequences,
    box_rows_at,
    facts_from_json,
    insert_audit,
    mark_sent,
    read_rollout,
    ref_device,
    ref_site,
    unsent_rows,
    update_box,
)

#: Boxes whose notices are stored in one transaction and published together.
NOTICE_BATCH = 200
NOTICE_VALIDITY = min(MAX_VALIDITY, timedelta(days=30))

#: Per item published: None once the broker acknowledged it, or why it was not.
Published = Sequence[BaseException | None]
#: Publish (topic, payload) pairs retained at QoS 1, all in flight together; wait for the PUBACKs.
PublishMany = Callable[[Sequence[tuple[str, bytes]]], Published]
Kind = Literal["notice", "rollback", "shadow"]
_T = TypeVar("_T")
#: Signs and stores one batch's notices in the caller's transaction; what to publish.
_Store = Callable[[Connection, Rollout, Sequence[str], Mapping[str, Device]], list["Outgoing"]]


class NotAcknowledgedError(Exception):
    """The broker did not acknowledge some notices; they stay stored and go out next tick."""


@dataclass(frozen=True)
class Outgoing:
    """A stored notice on its way to one box."""

    site: str
    device: str
    payload: bytes


def one_by_one(publish: Callable[[str, bytes], None]) -> PublishMany:
    """A `PublishMany` from a publish that waits for its own PUBACK (tests' fake brokers): one
    at a time, and after the first failure the rest are not tried (the broker is away)."""

    def publish_many(items: Sequence[tuple[str, bytes]]) -> Published:
        results: list[BaseException | None] = []
        failed: BaseException | None = None
        for topic, payload in items:
            if failed is None:
                try:
                    publish(topic, payload)
                except Exception as exc:  # the link's failure, whatever its kind
                    failed = exc
            results.append(failed)
        return results

    return publish_many


def batches(items: Sequence[_T], size: int = NOTICE_BATCH) -> Iterator[Sequence[_T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class NoticeSender:
    """Signs, stores, publishes and marks release, shadow and rollback notices in batches."""

    def __init__(
        self,
        engine: Engine,
        registry: Registry,
        *,
        key: SigningKey,
        publish_many: PublishMany,
        clock: Callable[[], datetime],
    ) -> None:
        self.engine = engine
        self.registry = registry
        self.key = key
        self.publish_many = publish_many
        self.clock = clock
        self._chunked: dict[str, ChunkedDelivery | None] = {}  # rollout id -> its mqtt_chunks

    # ---- release notices ----
    def send_notices(self, rollout: Rollout, refs: Sequence[str]) -> None:
        self._send(rollout, refs, self._store_notices, "notice")

    def _send(self, rollout: Rollout, refs: Sequence[str], store: _Store, kind: Kind) -> None:
        """Batch by batch: the boxes' records, then their notices stored in one transaction,
        then published (`_publish`)."""
        for batch in batches(refs):
            known = self.registry.devices_at(batch)
            with db.transaction(self.engine) as conn:
                stored = store(conn, rollout, batch, known)
            self._publish(rollout.id, stored, kind)

    def _store_notices(
        self, conn: Connection, rollout: Rollout, batch: Sequence[str], known: Mapping[str, Device]
    ) -> list[Outgoing]:
        facts, now = rollout.facts, self.clock()
        rows = box_rows_at(conn, rollout.id, batch)
        todo: list[tuple[str, Any, Device | None, int | None]] = []
        for ref in batch:
            row = rows.get(ref)
            if row is None or row.state != "pending" or row.notice is not None:
                continue  # already stored: the republish path owns it
            device = known.get(ref)
            old = active_version(device.models if device else {}, facts.name)
            if old is not None and old >= facts.version:
                # The box would refuse it ("already active", "older"): not a failed install.
                update_box(
                    conn, rollout.id, ref_site(ref), ref_device(ref), state="ignored",
                    reason=f"{ref} already runs {facts.name}@{old}; nothing was sent",
                    outcome_at=now,
                )  # fmt: skip
                continue
            todo.append((ref, row, device, old))
        stored: list[Outgoing] = []
        for (ref, row, device, old), sequence in zip(
            todo, allocate_sequences(conn, now, len(todo)), strict=True
        ):
            site, name = ref_site(ref), ref_device(ref)
            v2 = speaks_v2(device.agent_version if device else None)
            payload = build_notice(
                facts=facts, **self._delivery(rollout, device), site=site, device=name,
                sequence=sequence, issued_at=now, expires_at=now + NOTICE_VALIDITY,
                rollout_id=rollout.id, wave=row.wave, rollback=False, v2=v2, key=self.key,
            )  # fmt: skip
            update_box(
                conn, rollout.id, site, name,
                state="sent", v2=v2, old_version=old, sequence=sequence, notice=payload,
            )  # fmt: skip
            stored.append(Outgoing(site, name, payload))
        return stored

    # ---- shadow notices ----
    def send_shadow_notices(self, rollout: Rollout, refs: Sequence[str]) -> None:
        self._send(rollout, refs, self._store_shadow_notices, "shadow")

    def _store_shadow_notices(
        self, conn: Connection, rollout: Rollout, batch: Sequence[str], known: Mapping[str, Device]
    ) -> list[Outgoing]:
        facts, now = rollout.facts, self.clock()
        rows = shadowing.rows_at(conn, rollout.id, batch)
        todo: list[tuple[str, Any, Device | None, int | None]] = []
        for ref in batch:
            row = rows.get(ref)
            if row is None or row.state != "pending" or row.notice is not None:
                continue  # already stored: the republish path owns it
            device = known.get(ref)
            old = active_version(device.models if device else {}, facts.name)
            skipped = shadow_skip(ref, facts, old, device.agent_version if device else None)
            if skipped is not None:
                state, reason = skipped
                shadowing.update(
                    conn, rollout.id, ref_site(ref), ref_device(ref),
                    state=state, reason=reason, old_version=old, outcome_at=now,
                )  # fmt: skip
                continue
            todo.append((ref, row, device, old))
        stored: list[Outgoing] = []
        for (ref, row, device, old), sequence in zip(
            todo, allocate_sequences(conn, now, len(todo)), strict=True
        ):
            site, name = ref_site(ref), ref_device(ref)
            payload = build_notice(
                facts=facts, **self._delivery(rollout, device), site=site, device=name,
                sequence=sequence, issued_at=now, expires_at=now + NOTICE_VALIDITY,
                rollout_id=rollout.id, wave=row.wave, rollback=False, v2=True, key=self.key,
                shadow_max_s=rollout.plan.shadow_max_s,
            )  # fmt: skip
            shadowing.update(
                conn, rollout.id, site, name,
                state="sent", old_version=old, sequence=sequence, notice=payload,
            )  # fmt: skip
            stored.append(Outgoing(site, name, payload))
        return stored

    # ---- rollback notices ----
    def send_rollbacks(self, rollout: Rollout, refs: Sequence[str]) -> None:
        self._send(rollout, refs, self._store_rollbacks, "rollback")

    def _store_rollbacks(
        self, conn: Connection, rollout: Rollout, batch: Sequence[str], known: Mapping[str, Device]
    ) -> list[Outgoing]:
        now = self.clock()
        rows = box_rows_at(conn, rollout.id, batch)
        targets: dict[int | None, tuple[BundleFacts, Mapping[str, Any]] | str] = {}
        todo: list[tuple[str, Any, BundleFacts, Mapping[str, Any]]] = []
        for ref in batch:
            row = rows.get(ref)
            if row is None or row.sequence is None or row.rollback_state is not None:
                continue
            if row.old_version not in targets:
                targets[row.old_version] = self._rollback_target(conn, rollout, row.old_version)
            target = targets[row.old_version]
            if isinstance(target, str):
                update_box(
                    conn, rollout.id, ref_site(ref), ref_device(ref),
                    rollback_state="skipped", rollback_reason=target,
                )  # fmt: skip
                insert_audit(
                    conn, rollout.id, now,
                    Audit("rollback-skipped", f"{ref}: {target}", figures={"box": ref}),
                )  # fmt: skip
                continue
            todo.append((ref, row, *target))
        stored: list[Outgoing] = []
        for (ref, row, facts, bundle), sequence in zip(
            todo, allocate_sequences(conn, now, len(todo)), strict=True
        ):
            site, name = ref_site(ref), ref_device(ref)
            device = known.get(ref)
            v2 = speaks_v2(device.agent_version if device else None)
            payload = build_notice(
                facts=facts, **_delivery_of(bundle, device), site=site, device=name,
                sequence=sequence, issued_at=now, expires_at=now + NOTICE_VALIDITY,
                rollout_id=rollout.id, wave=row.wave, rollback=True, v2=v2, key=self.key,
            )  # fmt: skip
            update_box(
                conn, rollout.id, site, name,
                rollback_state="sent", rollback_sequence=sequence, rollback_notice=payload,
            )  # fmt: skip
            stored.append(Outgoing(site, name, payload))
        return stored

    def _rollback_target(
        self, conn: Connection, rollout: Rollout, old_version: int | None
    ) -> tuple[BundleFacts, Mapping[str, Any]] | str:
        """The bundle to roll a box back to (its facts and stored JSON), or why there is none."""
        name = rollout.facts.name
        if old_version is None:
            return (
                f"the box reported no version of {name} before its notice, so there is "
                "nothing to roll back to"
            )
        own = db.loads(
            conn.execute(
                sa.select(ROLLOUTS.c.bundle).where(ROLLOUTS.c.id == rollout.id)
            ).scalar_one()
        )
        for bundle in own.get("previous", ()):
            if bundle["name"] == name and bundle["version"] == old_version:
                return facts_from_json(bundle), bundle
        for (text,) in conn.execute(
            sa.select(ROLLOUTS.c.bundle).order_by(ROLLOUTS.c.created_at.desc())
        ):
            bundle = db.loads(text)
            if bundle["name"] == name and bundle["version"] == old_version:
                return facts_from_json(bundle), bundle
        return (
            f"{name}@{old_version} is neither listed in the plan's [on_halt] previous nor was "
            "it rolled out by this controller, so its bundle's URL and digest are unknown; "
            "roll the box back with `model-packager publish --rollback`"
        )

    def _delivery(self, rollout: Rollout, known: Device | None) -> dict[str, Any]:
        """`url` and `chunks` of `build_notice` for one box of `rollout`."""
        if rollout.id not in self._chunked:
            with db.transaction(self.engine) as conn:
                text = conn.execute(
                    sa.select(ROLLOUTS.c.bundle).where(ROLLOUTS.c.id == rollout.id)
                ).scalar_one()
            self._chunked[rollout.id] = stored_delivery(db.loads(text))[1]
        agent = known.agent_version if known else None
        url, chunks = delivery_for(rollout.url or None, self._chunked[rollout.id], agent)
        return {"url": url, "chunks": chunks}

    # ---- publishing ----
    def republish(self, rollout_id: str) -> None:
        """Publish again, byte-identical, every stored notice the broker never acknowledged."""
        # Only the unacknowledged rows are read (by index), not every box: a tick of a rollout
        # to 10,000 boxes costs what its unacknowledged notices cost.
        with db.transaction(self.engine) as conn:
            found = conn.execute(sa.select(ROLLOUTS).where(ROLLOUTS.c.id == rollout_id)).first()
            if found is None:
                return
            rollout = read_rollout(found)
            status = rollout.state.status
            sending = status in ("running", "paused")
            shadows = (
                shadowing.unsent_rows(conn, rollout_id)
                if sending and rollout.plan.shadow is not None
                else []
            )
            releases = unsent_rows(conn, rollout_id, rollback=False) if sending else []
            rollbacks = (
                unsent_rows(conn, rollout_id, rollback=True) if status == "rolling_back" else []
            )
        kinds: tuple[tuple[Kind, Iterable[Any]], ...] = (
            ("shadow", shadows),
            ("notice", releases),
            ("rollback", rollbacks),
        )
        for kind, rows in kinds:
            outgoing = [Outgoing(row.site, row.device, row.payload) for row in rows]
            for batch in batches(outgoing):
                self._publish(rollout_id, batch, kind)

    def _publish(self, rollout_id: str, stored: Sequence[Outgoing], kind: Kind) -> None:
        """Publish stored notices together; mark those the broker acknowledged, in one
        transaction; `NotAcknowledgedError` if any was not."""
        for _ in stored:
            faults.hit(f"{kind}.stored")
        if not stored:
            return
        results = self.publish_many(
            [(notice_topic(item.site, item.device), item.payload) for item in stored]
        )
        acked = [item for item, error in zip(stored, results, strict=True) if error is None]
        for _ in acked:
            faults.hit(f"{kind}.published")
        if acked:
            items = [(item.site, item.device, item.payload) for item in acked]
            with db.transaction(self.engine) as conn:
                if kind == "shadow":
                    shadowing.mark_sent(conn, rollout_id, items, at=self.clock())
                else:
                    mark_sent(conn, rollout_id, items, rollback=kind == "rollback", at=self.clock())
        errors = [error for error in results if error is not None]
        if errors:
            raise NotAcknowledgedError(
                f"{len(errors)} of {len(stored)} notices were not acknowledged by the broker "
                f"({errors[0]}); they stay stored and are published again at the next tick"
            )


# ---- per box ----------------------------------------------------------------------------------
def active_version(models: Mapping[str, Any], name: str) -> int | None:
    model = models.get(name)
    version = getattr(model, "version", None)
    return int(version) if version is not None else None


def shadow_skip(
    ref: str, facts: BundleFacts, old: int | None, agent: str | None
) -> tuple[str, str] | None:
    """(state, reason) for a box that gets no shadow notice, or None to send it one."""
    if old is not None and old >= facts.version:
        return "ignored", f"{ref} already runs {facts.name}@{old}; nothing was sent"
    if not understands_shadow(agent):
        return "refused", (
            f"{ref} reports agent {agent or 'unknown'}, which does not understand shadow "
            "notices (0.3.0 and later do); no shadow notice was sent"
        )
    return None


def _delivery_of(bundle: Mapping[str, Any], known: Device | None) -> dict[str, Any]:
    """`url` and `chunks` of `build_notice` for a box rolled back to a stored bundle."""
    url, chunks = stored_delivery(bundle)
    url, chunks = delivery_for(url, chunks, known.agent_version if known else None)
    return {"url": url, "chunks": chunks}


__all__ = [
    "NOTICE_BATCH",
    "NOTICE_VALIDITY",
    "NotAcknowledgedError",
    "NoticeSender",
    "Outgoing",
    "PublishMany",
    "Published",
    "active_version",
    "batches",
    "one_by_one",
    "shadow_skip",
]
