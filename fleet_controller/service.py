"""`fleet-controller serve`: the wiring, the controller loop and the HTTP server.

One thread, the controller loop, owns the order of things: it takes what the MQTT link
received, stores it (registry, then the rollout it belongs to), acknowledges it to the broker,
and every `tick_s` advances the rollouts (which publish their notices through the link). The API
runs in uvicorn's threads beside it; the rollouts runner serialises its own mutations. SIGTERM
stops the HTTP server, then the loop, then the link: anything not yet acknowledged is
redelivered by the broker at the next start (the session is persistent).

Several `serve` processes may share one database (high availability, docs/fleet.md): an elector
thread (`leader.Elector`) decides which one leads. Only the leader starts the MQTT link and the
loop; a standby serves the API's reads and answers its writes with 503 `not_leader` naming the
leader (`StandbyGuard`). A leader that loses its lock stops its link and loop at once and exits
with an error, for systemd to restart it as a standby.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
import uvicorn
from sqlalchemy.engine import Engine
from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from fleet_controller import __version__, db, leader
from fleet_controller.api import create_app
from fleet_controller.config import Config
from fleet_controller.errors import BadMessageError, FleetError
from fleet_controller.link import Inbound, Link
from fleet_controller.metrics import FleetMetrics
from fleet_controller.registry import Registry, UpdateReport, parse
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
        link = Link(config.mqtt, password=config.mqtt_password())
        rollouts = Rollouts(
            engine,
            registry,
            key=config.release_key(),
            bundle_trust=config.bundle_trust(),
            publish=link.publish,
        )
        metrics = FleetMetrics(
            registry,
            rollouts,
            stale_after_s=config.controller.stale_after_s,
            leading=leadership.is_set,
        )
        return cls(config, engine, registry, rollouts, link, metrics, leadership)

    def ingest(self, topic: str, payload: bytes) -> None:
        """Store one message from the broker, or reject and count it."""
        try:
            message = parse(topic, payload)
            rollout_id = None
            if isinstance(message, UpdateReport):
                rollout_id = self.rollouts.attribute(message)
            self.registry.record(message, rollout_id=rollout_id)
            if isinstance(message, UpdateReport):
                self.rollouts.on_report(message, rollout_id)
            self.metrics.received(message)
        except BadMessageError as exc:
            log.warning("rejected a message on %s: %s", topic[:200], exc.message)
            self.registry.reject(topic, exc)
            self.metrics.rejected(exc)

    def run_loop(self, stop: threading.Event) -> None:
        """Ingest what arrives; tick the rollouts every `tick_s`; until `stop` is set or this
        process no longer leads (checked before every step)."""
        tick_s = self.config.controller.tick_s
        next_tick = 0.0
        while not stop.is_set() and self.leadership.is_set():
            timeout = max(0.0, next_tick - time.monotonic())
            try:
                message: Inbound | None = self.link.inbox.get(timeout=min(timeout, 0.5))
            except queue.Empty:
                message = None
            if not self.leadership.is_set():
                return  # not acknowledged: the broker gives it to the new leader
            if message is not None:
                self._handle(message)
            if time.monotonic() >= next_tick and self.leadership.is_set():
                self._tick()
                next_tick = time.monotonic() + tick_s

    def _handle(self, message: Inbound) -> None:
        try:
            self.ingest(message.topic, message.payload)
        except Exception:
            # Not stored: not acknowledged either, so the broker redelivers it after a restart.
            log.exception(
                "storing the message on %s failed; it stays unacknowledged", message.topic
            )
            return
        self.link.ack(message)

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
    """What only the leader runs: the MQTT link and the controller loop, started when this
    process becomes leader and stopped when it shuts down or loses the leadership."""

    def __init__(self, controller: Controller) -> None:
        self.controller = controller
        self.stop = threading.Event()
        self._lock = threading.Lock()
        self._loop: threading.Thread | None = None
        self._closed = False

    def start(self) -> None:
        with self._lock:
            if self._closed:
                return
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
