"""The rollouts runner: the loop that feeds the pure machine and performs its actions.

For each event it builds from its tables (`fleet_controller.rollout_tables`: `rollouts`,
`rollout_boxes`, `audit`, `sequences`), registry and clock, it runs `machine.transition`,
persists the new state with its box rows and audit entries in one transaction, and only then
performs the actions (docs/fleet.md "Crash safety"):

- a notice is signed and its bytes stored (with a freshly allocated sequence, in the same
  transaction) before it is first published; `sent_at` is set only after the broker's PUBACK;
  a stored notice without `sent_at` is re-published byte-identical on every tick until it is
  acknowledged, so after a crash a box gets the same sequence and acts on it once. Notices go
  out in batches, stored, published and marked together (`fleet_controller.sending`);
- gates are a read, evaluated again when a restart finds a wave gating.

A plan with a `[shadow]` table gives every wave a shadow phase first (docs/fleet.md "Shadow
phase"): shadow notices (their rows in `rollout_shadows`, see `fleet_controller.shadowing`) are
stored and published exactly like release notices, the shadow gate is a read of the registry's
shadow figures, and only a passed shadow gate lets the machine send the wave's activating notices.

One re-entrant lock serialises every mutation: the API's threads and the tick loop share one
instance.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from edge_bundle.signing import SigningKey, TrustStore
from fleet_controller import db, faults, shadowing
from fleet_controller.chunks.store import ChunkStore
from fleet_controller.cohorts import Selector, preview, select
from fleet_controller.errors import BadMessageError, ConflictError, FleetError, NotFoundError
from fleet_controller.gates import BoxPair, evaluate, shadow_gates
from fleet_controller.machine import (
    ACTIVE,
    Action,
    Audit,
    Command,
    EvaluateGates,
    EvaluateShadowGate,
    Event,
    GatesEvaluated,
    MarkTimedOut,
    Policy,
    RolloutState,
    SendNotices,
    SendRollbacks,
    SendShadowNotices,
    Tick,
    View,
    start,
    transition,
)
from fleet_controller.notices import (
    BundleFacts,
    inspect_bundle,
    put_in_chunk_store,
    refuse_agents_without_mqtt,
    understands_shadow,
)
from fleet_controller.plan import RolloutPlan, assign_waves, wave_sizes
from fleet_controller.registry import Registry, UpdateReport
from fleet_controller.rollout_tables import (
    AUDIT,
    IN_FLIGHT,
    OUTCOMES,
    ROLLOUT_BOXES,
    ROLLOUTS,
    Rollout,
    audit_json,
    box_counts,
    box_ref,
    box_row,
    box_rows,
    brief_status,
    facts_json,
    finished_in_wave,
    full_status,
    insert_audit,
    light_rows,
    mark_timed_out,
    maybe_utc,
    read_rollout,
    ref_device,
    ref_site,
    rollback_counts,
    rollback_rows,
    row_by_sequence,
    summary,
    unfinished_wave_rows,
    update_box,
    wave_counts,
    with_state,
)
from fleet_controller.sending import (
    NotAcknowledgedError,
    NoticeSender,
    PublishMany,
    one_by_one,
)

log = logging.getLogger(__name__)

MAX_STEPS_PER_TICK = 1000  # a rollout moves at most this many transitions in one tick
SHOWN_CONFLICTS = 10
_Actions = list[Action]  # aliases: `Rollouts.list` shadows the builtin in the class body
_Refs = list[str]
_Entries = list[dict[str, Any]]


def utc_now() -> datetime:
    return datetime.now(UTC)


class Rollouts:
    """Create, advance, steer and report rollouts (see the module docstring)."""

    def __init__(
        self,
        engine: Engine,
        registry: Registry,
        *,
        key: SigningKey,
        bundle_trust: TrustStore,
        publish: Callable[[str, bytes], None],
        publish_many: PublishMany | None = None,
        clock: Callable[[], datetime] = utc_now,
        chunk_store: ChunkStore | None = None,
    ) -> None:
        self.engine = engine
        # Where plans with delivery = "mqtt" put their bundles (docs/mqtt-delivery.md).
        self.chunk_store = chunk_store
        self.registry = registry
        self.key = key
        self.bundle_trust = bundle_trust
        self.publish = publish
        self.clock = clock
        self.sender = NoticeSender(
            engine,
            registry,
            key=key,
            publish_many=publish_many or one_by_one(publish),
            clock=lambda: self.clock(),
        )
        self._lock = threading.RLock()
        self._shadow_plans: dict[str, bool] = {}  # rollout id -> whether it has a shadow phase
        db.migrate(engine)

    def serialised(self) -> AbstractContextManager[Any]:
        """The lock every mutation of this runner holds (re-entrant): the controller's batched
        ingest holds it while it applies reports in its own transaction."""
        return self._lock

    # ---- creating ----
    def preview(self, plan: RolloutPlan) -> dict[str, Any]:
        """The cohort `plan` would take now and how it splits into waves; sends nothing."""
        selector = Selector.parse(plan.cohort)
        found = preview(self.registry, selector)
        if plan.over_mqtt and plan.url is None:
            refuse_agents_without_mqtt(select(self.registry.devices(), selector))
        waves = assign_waves(found["refs"], wave_sizes(plan.waves, found["count"]), plan.name)
        return {**found, "wave_sizes": [len(wave) for wave in waves], "waves": waves}

    def create(self, plan: RolloutPlan, *, actor: str) -> dict[str, Any]:
        """Verify the bundle, freeze the cohort into waves and store the rollout, running."""
        facts = inspect_bundle(plan.bundle, self.bundle_trust)
        previous = [
            self._previous(facts, entry.bundle, str(entry.url or ""), plan)
            for entry in plan.previous
        ]
        selector = Selector.parse(plan.cohort)
        found = preview(self.registry, selector)
        if found["missing"]:
            raise FleetError(
                f"the cohort names boxes the registry has never heard of: "
                f"{', '.join(found['missing'])}; check the refs (SITE/DEVICE) or wait until "
                "those boxes have reported"
            )
        chosen = select(self.registry.devices(), selector)
        refs = [device.ref for device in chosen]
        if plan.shadow is not None:
            _refuse_old_agents(chosen)
        if plan.over_mqtt and plan.url is None:
            refuse_agents_without_mqtt(chosen)
        chunked = (
            put_in_chunk_store(self.chunk_store, plan.bundle, facts, plan.chunk_size)
            if plan.over_mqtt
            else {}
        )
        if not refs:
            raise FleetError(
                f"the cohort {db.dumps(selector.to_json())} picks no box; preview it with "
                "`fleet-controller cohort preview` and widen it"
            )
        waves = [
            wave
            for wave in assign_waves(refs, wave_sizes(plan.waves, len(refs)), plan.name)
            if wave
        ]
        now = self.clock()
        policy = Policy(
            len(waves),
            plan.soak_s,
            plan.deadline_s,
            plan.rollback_on_halt,
            shadow_soak_s=plan.shadow.soak_s if plan.shadow is not None else None,
        )
        state = start(policy, now)
        with self._lock, db.transaction(self.engine) as conn:
            self._refuse_overlap(conn, refs, None)
            rollout_id = self._new_id(conn, plan.name)
            conn.execute(
                ROLLOUTS.insert().values(
                    id=rollout_id,
                    name=plan.name,
                    plan=db.dumps(plan.to_json()),
                    # "url": "" when the bundle is delivered over MQTT alone.
                    bundle=db.dumps(
                        {**facts_json(facts), "url": str(plan.url or ""), "previous": previous}
                        | chunked
                    ),
                    state=db.dumps(state.to_json()),
                    status=state.status,
                    created_at=now,
                    updated_at=now,
                    created_by=actor,
                )
            )
            conn.execute(
                ROLLOUT_BOXES.insert(),
                [
                    {"rollout_id": rollout_id, "site": ref_site(ref), "device": ref_device(ref),
                     "wave": number, "state": "pending"}
                    for number, wave in enumerate(waves, start=1)
                    for ref in wave
                ],
            )  # fmt: skip
            if plan.shadow is not None:
                shadowing.insert_rows(conn, rollout_id, waves)
            why = (
                f"{facts.name}@{facts.version} to {len(refs)} boxes in {len(waves)} waves "
                f"({', '.join(str(len(wave)) for wave in waves)})"
            )
            figures = {"wave_sizes": [len(w) for w in waves], "cohort": selector.to_json()}
            insert_audit(conn, rollout_id, now, Audit("created", why, actor, figures))
        faults.hit("rollout.state")
        return self.status(rollout_id)

    def _previous(
        self, facts: BundleFacts, path: Path, url: str, plan: RolloutPlan
    ) -> dict[str, Any]:
        """A verified bundle a rollback may go back to: the same model, an older version (in
        the chunk store too when the plan delivers over MQTT)."""
        older = inspect_bundle(path, self.bundle_trust)
        if older.name != facts.name or older.version >= facts.version:
            raise FleetError(
                f"[on_halt] previous lists {older.name}@{older.version} ({path}); a rollback "
                f"target must be an older version of {facts.name} than {facts.version}"
            )
        chunked = (
            put_in_chunk_store(self.chunk_store, path, older, plan.chunk_size)
            if plan.over_mqtt
            else {}
        )
        return {**facts_json(older), "url": url} | chunked

    def _refuse_overlap(self, conn: Connection, refs: Iterable[str], own: str | None) -> None:
        wanted = set(refs)
        b, r = ROLLOUT_BOXES.c, ROLLOUTS.c
        query = (
            sa.select(b.rollout_id, b.site, b.device)
            .join(ROLLOUTS, r.id == b.rollout_id)
            .where(r.status.in_(sorted(ACTIVE)))
        )
        if own is not None:
            query = query.where(r.id != own)
        clashes = sorted(
            (f"{row.site}/{row.device}", row.rollout_id)
            for row in conn.execute(query)
            if f"{row.site}/{row.device}" in wanted
        )
        if clashes:
            boxes = ", ".join(f"{ref} (in {rollout})" for ref, rollout in clashes[:SHOWN_CONFLICTS])
            more = (
                f" and {len(clashes) - SHOWN_CONFLICTS} more"
                if len(clashes) > SHOWN_CONFLICTS
                else ""
            )
            raise ConflictError(
                f"{len(clashes)} boxes are already in an active rollout: {boxes}{more}; exclude "
                "them from the cohort, or wait until that rollout completes (or cancel it)"
            )

    def _new_id(self, conn: Connection, name: str) -> str:
        taken = {
            row.id for row in conn.execute(sa.select(ROLLOUTS.c.id).where(ROLLOUTS.c.name == name))
        }
        if name not in taken:
            return name
        number = 2
        while f"{name[:56]}-{number}" in taken:
            number += 1
        return f"{name[:56]}-{number}"

    # ---- reading ----
    def list(self) -> list[dict[str, Any]]:
        """Every rollout, newest first, in brief."""
        with db.transaction(self.engine) as conn:
            rows = conn.execute(sa.select(ROLLOUTS).order_by(ROLLOUTS.c.created_at.desc())).all()
            counts = box_counts(conn)
        return [summary(read_rollout(row), counts.get(row.id, {})) for row in rows]

    def status(self, rollout_id: str, *, boxes: bool = True) -> dict[str, Any]:
        """One rollout in full: plan, bundle, state, per-wave counts, gate results, boxes
        (without `boxes`: from counts alone, no box row read out)."""
        if not boxes:
            return self._brief_status(rollout_id)
        with db.transaction(self.engine) as conn:
            rollout = self._load(conn, rollout_id)
            rows = box_rows(conn, rollout_id)
            shadows = shadowing.rows(conn, rollout_id)
        return full_status(
            rollout,
            rows,
            shadow=shadowing.counts(shadows) if shadows else None,
            shadow_boxes={box_ref(shadow): shadowing.box_json(shadow) for shadow in shadows},
        )

    def _brief_status(self, rollout_id: str) -> dict[str, Any]:
        with db.transaction(self.engine) as conn:
            rollout = self._load(conn, rollout_id)
            per_wave = wave_counts(conn, rollout_id)
            rollback = rollback_counts(conn, rollout_id)
            shadows = shadowing.rows(conn, rollout_id) if rollout.plan.shadow is not None else []
        shadow = shadowing.counts(shadows) if shadows else None
        return brief_status(rollout, per_wave, rollback, shadow=shadow)

    def audit(self, rollout_id: str) -> _Entries:
        """The rollout's audit trail, oldest first."""
        with db.transaction(self.engine) as conn:
            self._load(conn, rollout_id)
            rows = conn.execute(
                sa.select(AUDIT).where(AUDIT.c.rollout_id == rollout_id).order_by(AUDIT.c.id)
            ).all()
        return [audit_json(row) for row in rows]

    def active_refs(self) -> set[str]:
        """Boxes held by a running, paused, halted or rolling-back rollout."""
        b, r = ROLLOUT_BOXES.c, ROLLOUTS.c
        query = (
            sa.select(b.site, b.device)
            .join(ROLLOUTS, r.id == b.rollout_id)
            .where(r.status.in_(sorted(ACTIVE)))
        )
        with db.transaction(self.engine) as conn:
            return {f"{row.site}/{row.device}" for row in conn.execute(query)}

    def gates(self, rollout_id: str) -> tuple[dict[str, Any], ...]:
        """The last gate results of a rollout, its shadow gate first (no box rows read)."""
        with db.transaction(self.engine) as conn:
            state = self._load(conn, rollout_id).state
        return tuple(dict(result) for result in (*state.shadow_results, *state.gate_results))

    def _load(self, conn: Connection, rollout_id: str) -> Rollout:
        row = conn.execute(sa.select(ROLLOUTS).where(ROLLOUTS.c.id == rollout_id)).first()
        if row is None:
            raise NotFoundError(
                f"no rollout {rollout_id!r}; `fleet-controller rollout status` lists them"
            )
        return read_rollout(row)

    # ---- steering ----
    def command(self, rollout_id: str, name: str, *, actor: str, why: str = "") -> dict[str, Any]:
        """pause, resume, cancel, halt or rollback; ConflictError when the state forbids it."""
        with self._lock:
            with db.transaction(self.engine) as conn:
                rollout = self._load(conn, rollout_id)
            if name == "rollback" and not rollout.state.active:
                with db.transaction(self.engine) as conn:
                    self._refuse_overlap(conn, self._refs(conn, rollout_id), rollout_id)
            self._step(rollout, Command(name, actor, why, self.clock()))
        return self.status(rollout_id)

    def tick(self) -> None:
        """Advance every active rollout; publish what is due; retry unacknowledged publishes."""
        with self._lock:
            with db.transaction(self.engine) as conn:
                ids = list(
                    conn.execute(
                        sa.select(ROLLOUTS.c.id)
                        .where(ROLLOUTS.c.status.in_(sorted(ACTIVE)))
                        .order_by(ROLLOUTS.c.created_at)
                    ).scalars()
                )
            for rollout_id in ids:
                try:
                    self.sender.republish(rollout_id)
                    self._advance(rollout_id)
                except NotAcknowledgedError as exc:
                    log.warning("rollout %s waits for the broker: %s", rollout_id, exc)
                except FleetError as exc:
                    log.error("rollout %s cannot advance: %s", rollout_id, exc.message)

    def _advance(self, rollout_id: str) -> None:
        for _ in range(MAX_STEPS_PER_TICK):
            with db.transaction(self.engine) as conn:
                rollout = self._load(conn, rollout_id)
                now = self.clock()
                view = self._view(conn, rollout, now)
            if not self._step(rollout, Tick(now, view)):
                return

    def _step(self, rollout: Rollout, event: Event) -> bool:
        """Run one event through the machine: persist, then act. True when anything changed."""
        new, actions = transition(rollout.state, event)
        if new == rollout.state and not actions:
            return False
        self._persist(rollout, new, actions)
        changed = new != rollout.state
        rollout = with_state(rollout, new)
        for action in actions:
            if isinstance(action, SendNotices):
                self.sender.send_notices(rollout, action.refs)
            elif isinstance(action, SendShadowNotices):
                self.sender.send_shadow_notices(rollout, action.refs)
            elif isinstance(action, EvaluateShadowGate):
                results = self._shadow_gate(rollout, action.wave)
                self._step(rollout, GatesEvaluated(action.wave, results, self.clock()))
            elif isinstance(action, SendRollbacks):
                self.sender.send_rollbacks(rollout, action.refs)
            elif isinstance(action, EvaluateGates):
                results = self._gates(rollout, action.wave)
                self._step(rollout, GatesEvaluated(action.wave, results, self.clock()))
            changed = changed or not isinstance(action, Audit)
        return changed

    def _persist(self, rollout: Rollout, new: RolloutState, actions: _Actions) -> None:
        """The new state, its audit entries and its timed-out boxes, in one transaction."""
        now = self.clock()
        with db.transaction(self.engine) as conn:
            conn.execute(
                ROLLOUTS.update()
                .where(ROLLOUTS.c.id == rollout.id)
                .values(state=db.dumps(new.to_json()), status=new.status, updated_at=now)
            )
            for action in actions:
                if isinstance(action, Audit):
                    insert_audit(conn, rollout.id, now, action)
                elif isinstance(action, MarkTimedOut) and action.shadow:
                    shadowing.mark_timed_out(conn, rollout.id, action.refs)
                elif isinstance(action, MarkTimedOut):
                    mark_timed_out(conn, rollout.id, action, now)
        faults.hit("rollout.state")

    # ---- the current view ----
    def _view(self, conn: Connection, rollout: Rollout, now: datetime) -> View:
        state = rollout.state
        sendable: list[str] = []
        waiting = 0
        in_flight: list[tuple[str, datetime | None]] = []
        # Only the wave's unfinished boxes are read; the final ones are counted.
        for row in unfinished_wave_rows(conn, rollout.id, state.wave):
            if row.state == "pending":
                if rollout.plan.site_open(row.site, now):
                    sendable.append(box_ref(row))
                else:
                    waiting += 1
            else:
                in_flight.append((box_ref(row), maybe_utc(row.sent_at)))
        final = finished_in_wave(conn, rollout.id, state.wave)
        rb_sendable: list[str] = []
        rb_in_flight: list[tuple[str, datetime | None]] = []
        rb_final = 0
        if state.status == "rolling_back":
            for row in rollback_rows(conn, rollout.id):
                if row.rollback_state is None:
                    rb_sendable.append(box_ref(row))
                elif row.rollback_state in IN_FLIGHT:
                    rb_in_flight.append((box_ref(row), maybe_utc(row.rollback_sent_at)))
                else:
                    rb_final += 1
        shadow = shadowing.ShadowView((), 0, (), 0)
        if state.status == "running" and state.phase.startswith("shadow_"):
            shadow = shadowing.view(
                conn, rollout.id, state.wave, lambda site: rollout.plan.site_open(site, now)
            )
        return View(
            tuple(sendable), waiting, tuple(in_flight), final,
            tuple(rb_sendable), tuple(rb_in_flight), rb_final,
            shadow.sendable, shadow.waiting, shadow.in_flight, shadow.final,
        )  # fmt: skip

    # ---- gates ----
    def _gates(self, rollout: Rollout, wave: int) -> tuple[dict[str, Any], ...]:
        """Gate results over every wave up to `wave`, from outcomes and telemetry."""
        with db.transaction(self.engine) as conn:
            rows = light_rows(conn, rollout.id, up_to_wave=wave)
        spec = rollout.plan.gates
        name, version = rollout.facts.name, rollout.facts.version
        pairs = []
        for row in rows:
            if row.state != "committed":
                continue
            new = self.registry.latest_sample(
                row.site, row.device, name, version, min_samples=spec.min_samples
            )
            old = None
            if row.old_version is not None:
                old = self.registry.latest_sample(
                    row.site, row.device, name, row.old_version, before=maybe_utc(row.sent_at)
                )
            pairs.append(BoxPair(box_ref(row), old, new))
        outcomes = Counter(row.state for row in rows)
        return tuple(result.to_json() for result in evaluate(outcomes, pairs, spec))

    def _shadow_gate(self, rollout: Rollout, wave: int) -> tuple[dict[str, Any], ...]:
        """The shadow gates over the wave's boxes that shadow the candidate."""
        spec = rollout.plan.shadow
        if spec is None:  # a plan cannot lose its shadow table; kept safe all the same
            return ()
        with db.transaction(self.engine) as conn:
            rows = [row for row in shadowing.rows(conn, rollout.id) if row.wave == wave]
        facts = rollout.facts
        boxes = shadowing.box_figures(
            self.registry, rows, name=facts.name, version=facts.version, sha256=facts.sha256
        )
        results = [result.to_json() for result in shadow_gates(boxes, spec)]
        results[0].setdefault("figures", {})["states"] = shadowing.counts(rows)
        return tuple(results)

    # ---- reports ----
    def attribute(self, report: UpdateReport) -> str | None:
        """The rollout a report belongs to; None for a sequence the controller never issued.
        BadMessageError when it names an unknown rollout, or a sequence that rollout never sent
        to that box."""
        with db.transaction(self.engine) as conn:
            return self.attribute_in(conn, report)

    def attribute_in(self, conn: Connection, report: UpdateReport) -> str | None:
        """`attribute` inside the caller's transaction (a batch of messages stored at once)."""
        if report.rollout_id is None:
            found = row_by_sequence(conn, report.site, report.device, report.sequence)
            return found.rollout_id if found is not None else None
        shadowed = self._shadowed(conn, report.rollout_id)
        if shadowed is None:
            raise BadMessageError(
                "update", "unknown-rollout",
                f"{report.site}/{report.device} reports on rollout {report.rollout_id!r}, "
                "which this controller never created",
            )  # fmt: skip
        row = box_row(conn, report.rollout_id, report.site, report.device)
        shadow = (
            shadowing.row(conn, report.rollout_id, report.site, report.device) if shadowed else None
        )
        if (
            shadow is not None
            and shadow.sequence is not None
            and report.sequence == shadow.sequence
        ):
            return report.rollout_id
        if row is None or report.sequence not in (row.sequence, row.rollback_sequence):
            raise BadMessageError(
                "update", "unknown-sequence",
                f"{report.site}/{report.device} reports sequence {report.sequence} of rollout "
                f"{report.rollout_id!r}, which never sent that sequence to that box",
            )  # fmt: skip
        return report.rollout_id

    def _shadowed(self, conn: Connection, rollout_id: str) -> bool | None:
        """Whether a rollout's plan has a shadow phase; None for no such rollout. A rollout is
        never deleted and its plan never changes, so what was found once is kept."""
        if rollout_id in self._shadow_plans:
            return self._shadow_plans[rollout_id]
        plan = conn.execute(sa.select(ROLLOUTS.c.plan).where(ROLLOUTS.c.id == rollout_id)).scalar()
        if plan is None:
            return None
        shadowed = RolloutPlan.from_json(db.loads(plan)).shadow is not None
        self._shadow_plans[rollout_id] = shadowed
        return shadowed

    def on_report(self, report: UpdateReport, rollout_id: str | None) -> None:
        """Record what an attributed report says about its box (shadow, release or rollback)."""
        if rollout_id is None:
            return
        with self._lock, db.transaction(self.engine) as conn:
            self.apply_report(conn, report, rollout_id)
        faults.hit("report.stored")

    def apply_report(self, conn: Connection, report: UpdateReport, rollout_id: str) -> None:
        """`on_report` inside the caller's transaction, the one that stores the report: a report
        is applied exactly when it is stored. The box's row is locked first (PostgreSQL), so two
        instances applying two reports of one box take turns instead of losing one update."""
        now = self.clock()
        row = box_row(conn, rollout_id, report.site, report.device, lock=True)
        shadow = (
            shadowing.row(conn, rollout_id, report.site, report.device)
            if self._shadowed(conn, rollout_id)
            else None
        )
        if shadow is not None and shadow.sequence == report.sequence:
            state = shadowing.next_state(shadow.state, report.phase, report.outcome)
            if state is not None:
                shadowing.update(
                    conn, rollout_id, report.site, report.device,
                    state=state, reason=report.reason, outcome_at=report.at or now,
                )  # fmt: skip
        elif row is not None:
            _record_box_report(conn, rollout_id, row, report, report.at or now)

    def _refs(self, conn: Connection, rollout_id: str) -> _Refs:
        return [box_ref(row) for row in box_rows(conn, rollout_id)]


# ---- reports and boxes ----------------------------------------------------------------------
def _record_box_report(
    conn: Connection, rollout_id: str, row: sa.Row[Any], report: UpdateReport, at: datetime
) -> None:
    """What a report on a box's release or rollback notice says, on its row."""
    if report.sequence == row.sequence:
        state = _next_box_state(row.state, report.outcome)
        if state is not None:
            update_box(
                conn, rollout_id, report.site, report.device,
                state=state, reason=report.reason, outcome_at=at,
            )  # fmt: skip
    elif report.sequence == row.rollback_sequence:
        state = _next_box_state(row.rollback_state, report.outcome)
        if state is not None:
            update_box(
                conn, rollout_id, report.site, report.device,
                rollback_state=state, rollback_reason=report.reason,
            )  # fmt: skip


def _refuse_old_agents(devices: Iterable[Any]) -> None:
    """A shadow phase needs every box to understand shadow notices (agent 0.3.0 and later)."""
    old = sorted(
        f"{device.ref} (agent {device.agent_version or 'unknown'})"
        for device in devices
        if not understands_shadow(device.agent_version)
    )
    if old:
        shown = ", ".join(old[:SHOWN_CONFLICTS])
        more = f" and {len(old) - SHOWN_CONFLICTS} more" if len(old) > SHOWN_CONFLICTS else ""
        raise FleetError(
            f"the plan has a [shadow] phase, but {len(old)} boxes of the cohort run agents "
            f"before 0.3.0, which ignore shadow notices and would activate the version at once: "
            f"{shown}{more}; upgrade their agents, exclude them from the cohort, or remove "
            "the [shadow] table"
        )


def _next_box_state(current: str | None, outcome: str) -> str | None:
    """The box's new state after a report with `outcome`, or None to keep it.

    A final outcome always wins (a late one replaces `timed_out`); progress moves only a box
    just sent; `ignored` (the box had seen a newer or the same sequence: a re-published notice
    it already acted on) is final only for a box that never reported acting on it."""
    if outcome in OUTCOMES:
        return outcome if outcome != current else None
    if outcome == "progress":
        return "progress" if current == "sent" else None
    if outcome == "ignored":
        return "ignored" if current == "sent" else None
    return None
