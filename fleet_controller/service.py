"""`fleet-controller serve`: the wiring, the controller loop and the HTTP server.

One thread, the controller loop, owns the order of things: it takes what the MQTT link
received, stores it (registry, then the rollout it belongs to), acknowledges it to the broker,
and every `tick_s` advances the rollouts (which publish their notices through the link). The API
runs in uvicorn's threads beside it; the rollouts runner serialises its own mutations. SIGTERM
stops the HTTP server, then the loop, then the link: anything not yet acknowledged is
redelivered by the broker at the next start (the session is persistent).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any

import uvicorn
from sqlalchemy.engine import Engine

from fleet_controller import __version__, db
from fleet_controller.api import create_app
from fleet_controller.config import Config
from fleet_controller.errors import BadMessageError
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

    @classmethod
    def build(cls, config: Config) -> Controller:
        engine = db.connect(config.database.url)
        db.create_tables(engine)
        registry = Registry(engine, samples_per_model=config.controller.samples_per_model)
        link = Link(config.mqtt, password=config.mqtt_password())
        rollouts = Rollouts(
            engine,
            registry,
            key=config.release_key(),
            bundle_trust=config.bundle_trust(),
            publish=link.publish,
        )
        metrics = FleetMetrics(registry, rollouts, stale_after_s=config.controller.stale_after_s)
        return cls(config, engine, registry, rollouts, link, metrics)

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
        """Ingest what arrives; tick the rollouts every `tick_s`; until `stop` is set."""
        tick_s = self.config.controller.tick_s
        next_tick = 0.0
        while not stop.is_set():
            timeout = max(0.0, next_tick - time.monotonic())
            try:
                message: Inbound | None = self.link.inbox.get(timeout=min(timeout, 0.5))
            except queue.Empty:
                message = None
            if message is not None:
                self._handle(message)
            if time.monotonic() >= next_tick:
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
        return {
            "status": "ok" if self.link.connected.is_set() else "degraded",
            "broker_connected": self.link.connected.is_set(),
            "version": __version__,
        }


def serve(config: Config) -> None:
    """Run the controller until SIGTERM or SIGINT."""
    controller = Controller.build(config)
    app = create_app(
        controller.registry,
        controller.rollouts,
        config.api_tokens(),
        metrics=controller.metrics.render,
        ready=controller.ready,
    )
    stop = threading.Event()
    loop = threading.Thread(target=controller.run_loop, args=(stop,), name="controller")
    controller.link.start()
    loop.start()
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=config.http.host,
            port=config.http.port,
            log_level="info",
            access_log=False,
            lifespan="off",
        )
    )
    try:
        server.run()
    finally:
        stop.set()
        loop.join(30)
        controller.link.stop()
        controller.engine.dispose()
