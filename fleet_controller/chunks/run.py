"""`fleet-controller chunk-server`: the chunk server as a process, until SIGTERM or SIGINT."""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType

from fleet_controller.chunks.server import ChunkServer
from fleet_controller.chunks.store import ChunkStore
from fleet_controller.config import Config

log = logging.getLogger(__name__)


def run_chunk_server(config: Config) -> int:
    """Serve `config.chunks.store` on the `[mqtt]` broker; returns 0 once told to stop."""
    store = ChunkStore(config.chunks.store).ensure()
    server = ChunkServer(store, config.mqtt, config.chunks, password=config.mqtt_password())
    stop = threading.Event()

    def on_signal(number: int, _frame: FrameType | None) -> None:
        log.info("chunk server stopping (%s)", signal.Signals(number).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    log.info(
        "chunk server serving %s as %s in group %s",
        store.directory,
        config.chunks.client_id,
        config.chunks.group,
    )
    server.start()
    try:
        stop.wait()
    finally:
        server.stop()
        log.info("chunk server stopped: %s", server.stats.snapshot())
    return 0
