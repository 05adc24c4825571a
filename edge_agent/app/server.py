"""Running the agent under uvicorn: binding, TLS, signals, systemd notifications, draining.

On SIGTERM (or the first Ctrl-C) the agent drains instead of stopping at once: readiness turns
false immediately, new predictions get 503 + Retry-After for `drain_grace_s` so load balancers and
clients move on, admitted requests finish, and then uvicorn closes the listener and the remaining
connections. From the signal to exit takes at most `shutdown_timeout_s`; a second signal exits
at once. SIGHUP reloads the active bundles from the store (after an `edge-agent install`).

Under overload the event loop must stay responsive: work handed to threads runs at
`inference_nice` below it (`lower_background_priority`), and HTTP predictions that admission would
refuse are answered before routing (`early_refusal`, for `edge_agent.http.middleware`).
"""

from __future__ import annotations

import asyncio
import logging
import math
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from types import FrameType

import uvicorn
from fastapi import FastAPI

from edge_agent import __version__
from edge_agent.app.agent import Agent
from edge_agent.app.connections import ConnectionLimits, limited_protocol
from edge_agent.app.sdnotify import SystemdNotifier, watchdog_loop
from edge_agent.engine.lane import lower_priority
from edge_agent.errors import AgentError, error_code
from edge_agent.http.app import create_app
from edge_agent.http.middleware import Refusal
from edge_agent.settings import AgentSettings

log = logging.getLogger(__name__)
#: Part of shutdown_timeout_s kept for uvicorn to close connections and the lifespan to stop.
CLOSE_RESERVE_S = 2.0


class AgentServer(uvicorn.Server):
    """uvicorn's server, with a drain phase before it stops."""

    def __init__(self, config: uvicorn.Config, agent: Agent, notifier: SystemdNotifier) -> None:
        super().__init__(config)
        self.agent = agent
        self.notifier = notifier
        self._loop: asyncio.AbstractEventLoop | None = None
        self._draining = False
        self._background: list[asyncio.Task[None]] = []

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        # Before the lifespan starts the agent: model loads already run on the lowered threads.
        lower_background_priority(asyncio.get_running_loop(), self.agent.settings.inference_nice)
        await super().startup(sockets)
        if self.should_exit:
            return
        self._loop = asyncio.get_running_loop()
        self._loop.add_signal_handler(signal.SIGHUP, self._reload)
        self.notifier.ready()
        self.notifier.status("serving; loading installed bundles")
        self._background.append(
            asyncio.create_task(
                watchdog_loop(self.notifier, self.agent.device.healthy), name="watchdog"
            )
        )
        self._background.append(asyncio.create_task(self._report_loaded(), name="status"))
        scheme = "https" if self.agent.settings.tls else "http"
        log.info(
            "edge agent %s listening on %s://%s:%d (profile %s)",
            __version__,
            scheme,
            self.agent.settings.host,
            self.agent.settings.port,
            self.agent.profile.name,
        )

    async def _report_loaded(self) -> None:
        """Tell systemd (`systemctl status`) what is served once loading is over."""
        device = self.agent.device
        while device.models.loading:
            await asyncio.sleep(0.1)
        ready, reasons = device.readiness()
        models = ", ".join(
            f"{m['name']}@{m.get('version', '?')} {m['status']}" for m in device.describe_models()
        )
        self.notifier.status(f"serving {models}" if ready else "not ready: " + "; ".join(reasons))
        if ready:
            log.info("ready: %s", models)
        else:
            log.warning("not ready: %s", "; ".join(reasons))

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._draining or self._loop is None:
            if self.should_exit:
                self.force_exit = True
            self.should_exit = True
            return
        self._draining = True
        self._loop.call_soon_threadsafe(self._start_drain, sig)

    def _start_drain(self, sig: int) -> None:
        self._background.append(asyncio.create_task(self._drain(sig), name="drain"))

    async def _drain(self, sig: int) -> None:
        settings = self.agent.settings
        started = time.monotonic()
        log.info("%s: draining (readiness off, new predictions get 503)", signal.Signals(sig).name)
        self.agent.start_draining()
        self.notifier.stopping()
        budget = max(0.0, settings.shutdown_timeout_s - CLOSE_RESERVE_S)
        await asyncio.sleep(min(settings.drain_grace_s, budget))
        idle = await self.agent.lane.admission.wait_idle(
            max(0.0, budget - (time.monotonic() - started))
        )
        if not idle:
            log.warning(
                "%d predictions still running at the drain deadline",
                self.agent.lane.admission.in_flight,
            )
        remaining = settings.shutdown_timeout_s - (time.monotonic() - started)
        self.config.timeout_graceful_shutdown = max(1, math.floor(remaining - 0.5))
        self.should_exit = True

    def _reload(self) -> None:
        log.info("SIGHUP: loading the bundles the store marks active")
        self._background.append(asyncio.create_task(self.agent.reload(), name="reload"))


def lower_background_priority(loop: asyncio.AbstractEventLoop, nice: int) -> None:
    """Run what `loop` hands to threads (`asyncio.to_thread`) `nice` steps below it, as the
    inference threads are: the threads ONNX Runtime starts for a model inherit the priority of
    the thread that loads it, and under overload must not take the CPU from the event loop's
    health checks and refusals."""
    pool = ThreadPoolExecutor(thread_name_prefix="background", initializer=lower_priority(nice))
    loop.set_default_executor(pool)


def http_app(agent: Agent) -> FastAPI:
    """The HTTP app over the agent's device, its lifespan the agent's start and stop."""
    return create_app(
        agent.device,
        lifespan=agent.lifespan,
        updates=agent.updater,
        refusal=early_refusal(agent),
    )


def early_refusal(agent: Agent) -> Refusal:
    """Whether admission would refuse an HTTP prediction now (counted like one it refuses)."""
    admission, core = agent.lane.admission, agent.device.models.core

    def refusal(model: str) -> AgentError | None:
        error = admission.refusal()
        if error is not None:
            core.record(model, "http", error_code(error))
        return error

    return refusal


def server_config(settings: AgentSettings, app: FastAPI) -> uvicorn.Config:
    """uvicorn's configuration: h11 with the agent's connection limits (`connections`)."""
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        ssl_certfile=str(settings.tls_certfile) if settings.tls_certfile else None,
        ssl_keyfile=str(settings.tls_keyfile) if settings.tls_keyfile else None,
        log_config=None,
        log_level=settings.log_level,
        access_log=settings.access_log,
        # h11, pinned: it caps the request head's size (httptools buffers any header).
        http=limited_protocol(ConnectionLimits.from_settings(settings)),
        h11_max_incomplete_event_size=settings.http_max_header_bytes,
        ws="none",  # no WebSocket routes: an upgrade request is an ordinary request
        # Never uvicorn's limit_concurrency: it counts idle sockets and answers plain text.
        # Connections are bounded by the protocol, predictions by admission control.
        limit_concurrency=None,
        # The protocol closes idle connections itself; uvicorn's own timer is only a backstop.
        timeout_keep_alive=math.ceil(settings.http_idle_timeout_s),
        timeout_graceful_shutdown=math.ceil(settings.shutdown_timeout_s),
        server_header=False,
        lifespan="on",
    )


def serve(settings: AgentSettings) -> None:
    """Run the agent until it is stopped; returns after a clean shutdown."""
    agent = Agent(settings)
    config = server_config(settings, http_app(agent))
    AgentServer(config, agent, SystemdNotifier()).run()
