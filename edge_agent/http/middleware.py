"""Pure ASGI middleware: the body-size cap and server-side request timing.

`BodyLimit` refuses a declared `Content-Length` over the cap before reading a byte, and counts the
bytes of bodies sent without one, failing the read as soon as the cap is passed; memory per
request stays bounded whatever a client sends. `Timing` measures from the moment the request
reaches the app to the moment the last response byte is handed to the server, the server-side
latency the budget is about, and records it per route template (never per raw path). It also
reports the time to the response's start in a `Server-Timing: app;dur=MS` header.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from edge_agent.errors import PayloadTooLargeError
from edge_agent.metrics import AgentMetrics


class BodyLimit:
    """Cap request bodies at `limit_for(path)` bytes."""

    def __init__(self, app: ASGIApp, limit_for: Callable[[str], int]) -> None:
        self.app = app
        self.limit_for = limit_for

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope["path"])
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            await _too_large(send, declared, limit)
            return
        seen = 0

        async def capped() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise PayloadTooLargeError(_message(seen, limit, declared=False))
            return message

        await self.app(scope, capped, send)


class Timing:
    """Observe server-side latency into `metrics.request_seconds`."""

    def __init__(self, app: ASGIApp, metrics: AgentMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def timed_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                elapsed_ms = (time.perf_counter() - started) * 1000
                header = (b"server-timing", f"app;dur={elapsed_ms:.2f}".encode())
                message = {**message, "headers": [*message.get("headers", []), header]}
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                route = scope.get("route")
                template = getattr(route, "path", "unmatched")
                self.metrics.request_seconds.labels(template, f"{status // 100}xx").observe(
                    time.perf_counter() - started
                )

        await self.app(scope, receive, timed_send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _message(size: int, limit: int, *, declared: bool) -> str:
    what = "declares" if declared else "sent more than"
    return (
        f"the request body {what} {size:,} bytes, over the limit of {limit:,}; send a smaller "
        "photo (the station page scales photos down before sending)"
    )


async def _too_large(send: Send, size: int, limit: int) -> None:
    body = json.dumps(
        {
            "error": {
                "code": "payload_too_large",
                "message": _message(size, limit, declared=True),
                "request_id": None,
            }
        }
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
