"""`fleet-controller serve`: the wiring, the controller loop and the HTTP server.

The controller loop takes what the MQTT link received, in batches (whatever is waiting, up to
`[controller] batch_max`), stores each batch in one transaction (registry, and the rollout each
report belongs to), and acknowledges the batch to the broker only once it is committed. Beside
it, a ticking thread advances the rollouts every `tick_s` (they publish their notices through
the link, a batch at a time), so a wave of thousands of notices never stops ingest; the rollouts
runner's lock keeps a tick and a batch holding reports from interleaving their writes. A batch whose transaction fails is stored again message by
message, so one bad message cannot hold the others back; a message that still fails stays
unacknowledged (the broker redelivers it after a reconnect). The API
runs in uvicorn's threads beside it; the rollouts runner serialises its own mutations. SIGTERM
stops the HTTP server, then the loop, then the link: anything not yet acknowledged is
redelivered by the broker at the next start (the session is persistent).

Several `serve` processes may share one database (high availability, docs/fleet.md): an elector
thread (`leader.Elector`) decides which one leads. Only the leader starts the MQTT link and the
loop; a standby serves the API's reads and answers its writes with 503 `not_leader` naming the
leader (`StandbyGuard`). A leader that loses its lock stops its link and loop at once and exits
with an error, for systemd to restart it as a standby.

Behind a shared subscription (`[mqtt] shared_group`, docs/fleet-scale.md) every instance,
leader and standbys alike, connects and ingests the reports and telemetry the broker hands it
(each under its own client id); only the leader ticks the rollouts and publishes notices. A report
is stored under its idempotency key and applied to its rollout in the same transaction, so one
delivered to two instances (a redelivery) is applied once.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import sqlalchemy as sa
import uvicorn
from sqlalchemy.engine import Engine
from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from fleet_controller import __version__, db, faults, leader
from fleet_controller.api import create_app
from fleet_controller.chunks.store import ChunkStore
from fleet_controller.config import Config
from fleet_controller.errors import BadMessageError, FleetError
from fleet_controller.link import Inbound, Link
from fleet_controller.metrics import FleetMetrics
from fleet_controller.registry import (
    Message,
    Registry,
    StatusMessage,
    TelemetryMessage,
    UpdateReport,
    parse,
)
from fleet_controller.rollouts import Rollouts

log = logging.getLogger(__name__)


@dataclass
class Controller:
    """Everything `serve` runs, wired; `ingest` and `tick` are also what tests drive."""

    config: Config
    engine: Engine
    registry: Registry
    rollouts: Rollouts
    link: Link
    metrics: FleetMetrics
    #: Set while this process leads; its loop ingests and ticks only then. A controller alone
    #: (tests, one process) leads from the start; `serve` clears it and lets the elector decide.
    leadership: threading.Event = field(default_factory=lambda: _leading_alone())

    @classmethod
    def build(cls, config: Config) -> Controller:
        engine = db.connect(config.database.url)
        db.migrate(engine)
        leadership = _leading_alone()
        registry = Registry(engine, samples_per_model=config.controller.samples_per_model)
        link = Link(config.mqtt, password=config.mqtt_password(), client_id=client_id(config))
        rollouts = Rollouts(
            engine,
            registry,
            key=config.release_key(),
            bundle_trust=config.bundle_trust(),
            publish=link.publish,
            publish_many=link.publish_many,
            chunk_store=ChunkStore(config.chunks.store),
        )
        metrics = FleetMetrics(
            registry,
            rollouts,
            stale_after_s=config.controller.stale_after_s,
            leading=leadership.is_set,
        )
        return cls(config, engine, registry, rollouts, link, metrics, leadership)

    @property
    def shared(self) -> bool:
        """Whether this instance consumes behind a shared subscription (leading or not)."""
        return self.config.mqtt.shared_group is not None

    def ingest(self, topic: str, payload: bytes) -> None:
        """Store one message from the broker, or reject and count it."""
        self.ingest_batch([Inbound(topic, payload, 0, 0)], fall_back=False)

    def ingest_batch(self, messages: Sequence[Inbound], *, fall_back: bool = True) -> list[Inbound]:
        """Store `messages` in one transaction (rejecting and counting the bad ones) and return
        those now stored, to acknowledge. If the transaction fails, each message is stored on
        its own (`fall_back`); those that fail again are left out and stay unacknowledged.
        Without `fall_back` the failure is raised."""
        try:
            stored = self._store(messages)
        except Exception:
            if not fall_back:
                raise
            log.exception(
                "storing a batch of %d messages failed; storing them one by one", len(messages)
            )
            return [message for message in messages if self._store_alone(message)]
        return stored

    def _store_alone(self, message: Inbound) -> bool:
        try:
            self._store([message])
        except Exception:
            # Not stored: not acknowledged either, so the broker redelivers it after a restart.
            log.exception(
                "storing the message on %s failed; it stays unacknowledged", message.topic[:200]
            )
            return False
        return True

    def _store(self, messages: Sequence[Inbound]) -> list[Inbound]:
        """One transaction for `messages`; counters and metrics only after it committed."""
        parsed: list[tuple[Inbound, Message | BadMessageError]] = []
        for inbound in messages:
            try:
                parsed.append((inbound, parse(inbound.topic, inbound.payload)))
            except BadMessageError as exc:
                parsed.append((inbound, exc))
        # One order for every instance (by box, then arrival): two instances writing the same
        # boxes' rows lock them in the same order on PostgreSQL, never in a deadlock.
        parsed.sort(key=_lock_order)
        outcomes: list[tuple[Inbound, _Outcome]] = []
        reports = any(isinstance(item, UpdateReport) for _inbound, item in parsed)
        lock = self.rollouts.serialised() if reports else _NO_LOCK
        with lock, db.transaction(self.engine) as conn:
            for inbound, item in parsed:
                outcomes.append((inbound, self._store_one(conn, inbound, item)))
        self._count(outcomes)
        return list(messages)

    def _store_one(
        self, conn: sa.Connection, inbound: Inbound, item: Message | BadMessageError
    ) -> _Outcome:
        """Store one parsed message in the batch's transaction; what it turned out to be (a
        report may still be refused by its rollout, or be a duplicate: `_DUPLICATE`)."""
        if isinstance(item, BadMessageError):
            self.registry.store_rejection(conn, inbound.topic, item)
            return item
        try:
            rollout_id = (
                self.rollouts.attribute_in(conn, item) if isinstance(item, UpdateReport) else None
            )
        except BadMessageError as exc:
            self.registry.store_rejection(conn, inbound.topic, exc)
            return exc
        new = self.registry.store(conn, item, rollout_id=rollout_id)
        if not new:
            return _DUPLICATE
        if isinstance(item, UpdateReport) and rollout_id is not None:
            self.rollouts.apply_report(conn, item, rollout_id)
        return item

    def _count(self, outcomes: list[tuple[Inbound, _Outcome]]) -> None:
        now = time.time()
        self.metrics.batch(len(outcomes))
        for inbound, outcome in outcomes:
            if isinstance(outcome, BadMessageError):
                log.warning("rejected a message on %s: %s", inbound.topic[:200], outcome.message)
                self.registry.count_rejection(outcome)
                self.metrics.rejected(outcome)
                continue
            if isinstance(outcome, _Duplicate):
                self.metrics.duplicate("update")
                continue
            self.metrics.received(outcome)
            if isinstance(outcome, UpdateReport):
                faults.hit("report.stored")
            lag = now - inbound.received_at if inbound.received_at else None
            at = getattr(outcome, "at", None)
            self.metrics.ingested(lag, now - at.timestamp() if isinstance(at, datetime) else None)

    def run_loop(self, stop: threading.Event) -> None:
        """Ingest what arrives, in batches, in this thread; while this process leads, advance the
        rollouts every `tick_s` in a second thread (`controller-ticks`), so that sending a wave
        of notices never holds ingest back. Until `stop` is set, or (unless behind a shared
        subscription, where standbys consume too) until this process no longer leads."""
        done = threading.Event()
        ticker = threading.Thread(
            target=self._tick_loop, args=(stop, done), name="controller-ticks", daemon=True
        )
        ticker.start()
        try:
            self._ingest_loop(stop)
        finally:
            done.set()
            ticker.join(60)

    def _ingest_loop(self, stop: threading.Event) -> None:
        while not stop.is_set() and (self.shared or self.leadership.is_set()):
            batch = self._take(0.5)
            if not self.shared and not self.leadership.is_set():
                return  # not acknowledged: the broker gives it to the new leader
            if batch:
                for message in self.ingest_batch(batch):
                    self.link.ack(message)

    def _tick_loop(self, stop: threading.Event, done: threading.Event) -> None:
        tick_s = self.config.controller.tick_s
        while not stop.is_set() and not done.is_set():
            if self.leadership.is_set():
                self._tick()
            done.wait(tick_s)

    def _take(self, timeout: float) -> list[Inbound]:
        """What the link received: the first message within `timeout`, then whatever follows
        within `batch_wait_s`, up to `batch_max`."""
        inbox = self.link.inbox
        try:
            batch = [inbox.get(timeout=timeout)]
        except queue.Empty:
            return []
        limit = self.config.controller.batch_max
        deadline = time.monotonic() + self.config.controller.batch_wait_s
        while len(batch) < limit:
            try:
                batch.append(inbox.get_nowait())
                continue
            except queue.Empty:
                pass
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                batch.append(inbox.get(timeout=remaining))
            except queue.Empty:
                break
        return batch

    def _tick(self) -> None:
        try:
            self.rollouts.tick()
        except Exception:
            log.exception("a rollout step failed; it is tried again at the next tick")

    def ready(self) -> dict[str, Any]:
        """/healthz: this process's role, and for a standby the leader it knows of."""
        if not self.leadership.is_set():
            return {
                "status": "ok",
                "role": "standby",
                "leader": self.leader(),
                "broker_connected": False,
                "version": __version__,
            }
        return {
            "status": "ok" if self.link.connected.is_set() else "degraded",
            "role": "leader",
            "broker_connected": self.link.connected.is_set(),
            "version": __version__,
        }

    def leader(self) -> dict[str, Any] | None:
        """The leader recorded in the database (None if none is, or the database is down)."""
        try:
            return leader.current(self.engine)
        except sa.exc.SQLAlchemyError as exc:
            log.warning("cannot read the leader from the database: %s", exc)
            return None


class _Duplicate:
    """A report this box's history already held: stored and applied before, skipped now."""


_DUPLICATE = _Duplicate()
_Outcome = Message | BadMessageError | _Duplicate
_NO_LOCK = contextlib.nullcontext()


def _lock_order(entry: tuple[Inbound, Message | BadMessageError]) -> tuple[int, str, str]:
    item = entry[1]
    if isinstance(item, StatusMessage | TelemetryMessage | UpdateReport):
        return (0, item.site, item.device)
    return (1, "", "")  # rejections last: they lock no box


def client_id(config: Config) -> str:
    """The MQTT client id: the configured one, or behind a shared subscription the configured
    one and this instance's name (its own session: two clients with one id drop each other)."""
    mqtt = config.mqtt
    if mqtt.shared_group is None:
        return mqtt.client_id
    instance = mqtt.instance or f"{socket.gethostname()}-{config.http.port}"
    return f"{mqtt.client_id}-{instance}"[:128]


def _leading_alone() -> threading.Event:
    leadership = threading.Event()
    leadership.set()
    return leadership


class StandbyGuard:
    """ASGI middleware: while this process stands by, writes (every method but GET, HEAD and
    OPTIONS, except read-only POSTs) get 503 `not_leader` saying where the leader is."""

    READS = frozenset({"GET", "HEAD", "OPTIONS"})
    READ_ONLY_POSTS = frozenset({"/v1/cohorts/preview"})

    def __init__(self, app: ASGIApp, controller: Controller) -> None:
        self.app = app
        self.controller = controller

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] == "http"
            and scope["method"] not in self.READS
            and scope["path"] not in self.READ_ONLY_POSTS
            and not self.controller.leadership.is_set()
        ):
            where = await run_in_threadpool(self.controller.leader)
            response = JSONResponse(
                {"error": "not_leader", "detail": not_leader_detail(where), "leader": where},
                status_code=503,
                headers={"Retry-After": str(int(leader.RETRY_S))},
            )
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


def not_leader_detail(where: dict[str, Any] | None) -> str:
    if where is None:
        return (
            "this controller is a standby and no leader is recorded yet: retry in a few "
            "seconds (a standby takes over within 15 s of the leader's death)"
        )
    return (
        f"this controller is a standby: the leader is {where['holder']} at {where['api']}; "
        "send writes there (a standby takes over within 15 s of the leader's death)"
    )


class _LeaderDuties:
    """The MQTT link and the controller loop: started when this process becomes leader (or at
    once behind a shared subscription, where standbys consume too and the loop ticks only while
    leading), stopped when it shuts down or loses the leadership."""

    def __init__(self, controller: Controller) -> None:
        self.controller = controller
        self.stop = threading.Event()
        self._lock = threading.Lock()
        self._loop: threading.Thread | None = None
        self._closed = False

    def start(self) -> None:
        with self._lock:
            if self._closed or self._loop is not None:
                return  # a consuming standby that now leads: its loop starts ticking
            self.controller.link.start()
            self._loop = threading.Thread(
                target=self.controller.run_loop, args=(self.stop,), name="controller"
            )
            self._loop.start()

    def lost(self) -> None:
        """Leadership is gone: cut the broker first, so nothing more is published or acked."""
        with self._lock:
            self._closed = True
            self.stop.set()
            if self._loop is not None:
                self.controller.link.stop()
                self._loop.join(30)

    def close(self) -> None:
        """Shutdown: let the loop finish its step (and ack it), then disconnect."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self.stop.set()
            if self._loop is not None:
                self._loop.join(30)
                self.controller.link.stop()


def serve(config: Config) -> None:
    """Run the controller until SIGTERM or SIGINT (or until it loses the leadership)."""
    controller = Controller.build(config)
    controller.leadership.clear()
    identity = leader.Identity.of_this_process(
        leader.api_address(config.http.host, config.http.port)
    )
    elector = leader.Elector(
        leader.lock_for(controller.engine), controller.engine, identity, controller.leadership
    )
    app = create_app(
        controller.registry,
        controller.rollouts,
        config.api_tokens(),
        metrics=controller.metrics.render,
        ready=controller.ready,
    )
    server = uvicorn.Server(
        uvicorn.Config(
            StandbyGuard(app, controller),
            host=config.http.host,
            port=config.http.port,
            log_level="info",
            access_log=False,
            lifespan="off",
        )
    )
    duties = _LeaderDuties(controller)
    if controller.shared:
        duties.start()

    def lose() -> None:
        duties.lost()
        server.should_exit = True

    stop_election = threading.Event()
    election = threading.Thread(
        target=elector.run, args=(stop_election, duties.start, lose), name="leader-election"
    )
    election.start()
    try:
        server.run()
    finally:
        duties.close()
        stop_election.set()
        election.join(30)
        controller.engine.dispose()
    if elector.lost.is_set():
        raise FleetError(
            "this controller lost the leadership (its database lock); it stopped acting and "
            "exits so that it restarts as a standby"
        )
