"""The transport floor for bench/bench_mqtt.py: a process that answers over MQTT and over HTTP
and does no work at all.

Over MQTT it subscribes to `bench/bare/#` with the agent's own receiving client
(`edge_agent.mqtt.wire.PublishClient`, paho on its own thread) and answers each request on its
Response Topic with its Correlation Data and a 16-byte payload. Over HTTP it is a bare ASGI app
under uvicorn (h11, as the agent) that reads the whole body and answers a 16-byte JSON. The
difference between the agent and this process is what the agent's work costs; the difference
between its two transports is what MQTT itself costs a request of that size. It sets the same
allocator thresholds as the agent (`engine.memory.map_large_blocks`): without them, receiving a
photo page-faults its buffers in again every time, and the floor would be slower than the agent.

    python -m bench.bare_peer BROKER_PORT HTTP_PORT

With BROKER_PORT 0 it serves HTTP only (bench/bench_agent.py). It prints `ready` once subscribed
and serving, and runs until SIGTERM or SIGINT.
"""

from __future__ import annotations

import asyncio
import sys
import threading
from typing import Any

import uvicorn
from paho.mqtt.client import MQTTMessage
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge_agent.engine.memory import map_large_blocks
from edge_agent.mqtt.wire import PublishClient

ANSWER = b'{"label":"bare"}'
TOPIC = "bench/bare/#"


def start_mqtt(port: int) -> PublishClient:
    client = PublishClient(
        callback_api_version=CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5
    )

    def on_message(_c: Any, _u: Any, message: MQTTMessage) -> None:
        request = message.properties
        properties = Properties(PacketTypes.PUBLISH)
        properties.CorrelationData = request.CorrelationData
        client.publish(request.ResponseTopic, ANSWER, qos=1, properties=properties)

    subscribed = threading.Event()
    client.on_message = on_message
    client.on_subscribe = lambda *_args: subscribed.set()
    client.on_socket_open = lambda _c, _u, sock: sock.setsockopt(6, 1, 1)  # TCP_NODELAY
    client.connect("127.0.0.1", port)
    client.loop_start()
    client.subscribe(TOPIC, 1)
    if not subscribed.wait(10):
        raise SystemExit(f"no SUBACK from the broker on port {port}")
    return client


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Read the whole body, answer 16 bytes."""
    if scope["type"] != "http":
        return
    more = True
    while more:
        message = await receive()
        more = message.get("more_body", False)
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": ANSWER})


async def serve(http_port: int) -> None:
    """uvicorn until SIGTERM or SIGINT (its own handlers)."""
    config = uvicorn.Config(app, port=http_port, http="h11", log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started and not task.done():
        await asyncio.sleep(0.01)
    print("ready", flush=True)
    await task


def main(argv: list[str]) -> int:
    broker_port, http_port = int(argv[0]), int(argv[1])
    map_large_blocks()
    client = start_mqtt(broker_port) if broker_port else None
    try:
        asyncio.run(serve(http_port))
    finally:
        if client is not None:
            client.disconnect()
            client.loop_stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
