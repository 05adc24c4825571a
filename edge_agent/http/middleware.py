"""Pure ASGI middleware: the header-count cap, the body's size cap and read deadline, refusing
predictions early under overload, and server-side request timing.

`HeaderLimit` answers 431 to a request with more header fields than allowed (their total size is
capped before parsing, by the server's protocol). `BodyDeadline` gives the body a deadline that
grows with what has arrived: `timeout_s` plus the bytes received at `min_rate`, so a small body
has `timeout_s` and a large one keeps up a minimum rate; a client lagging behind gets 408, whether
it stalls or trickles, and never holds the request longer than that. `BodyLimit` refuses a
declared `Content-Length` over the cap before reading a byte, and counts the bytes of bodies sent
without one, failing the read as soon as the cap is passed; memory per request stays bounded
whatever a client sends. `Timing` measures from the moment the request
reaches the app to the moment the last response byte is handed to the server, the server-side
latency the budget is about, and records it per route template (never per raw path). It also
reports the time to the response's start in a `Server-Timing: app;dur=MS` header.

`EarlyRefusal` answers a prediction that admission would refuse right now (overloaded, draining)
with the agent's JSON 503 + Retry-After before routing, query validation and the endpoint run:
under overload most requests are refused, and every millisecond of CPU a refusal costs is taken
from the predictions being served and from the refusals queued behind it on the event loop. It
only reads the admission state; a request it lets through is decided on again by admission.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Callable
from typing import Any

from starlette.routing import compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from edge_agent.engine.types import new_request_id
from edge_agent.errors import AgentError, PayloadTooLargeError, RequestTimeoutError
from edge_agent.http.errors import status_for
from edge_agent.metrics import AgentMetrics

#: Scope key naming the route template of a request answered before routing (for `Timing`).
ROUTE_KEY = "edge_agent.route"
#: Why a request to the guarded route, for the model named in its path, would be refused now.
Refusal = Callable[[str], AgentError | None]


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


class HeaderLimit:
    """Answer 431 to requests with more than `max_headers` header fields."""

    def __init__(self, app: ASGIApp, max_headers: int) -> None:
        self.app = app
        self.max_headers = max_headers

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        count = len(scope.get("headers", ())) if scope["type"] == "http" else 0
        if count <= self.max_headers:
            await self.app(scope, receive, send)
            return
        message = (
            f"the request has {count} header fields, over the limit of {self.max_headers}; "
            "send fewer headers"
        )
        await send_error(send, 431, "headers_too_large", message)


class BodyDeadline:
    """Fail body reads with `RequestTimeoutError` (408) once the body lags its deadline: the
    first read starts the clock; by `timeout_s + received / min_rate` seconds the next bytes
    must be in. Reads after the body's end pass through untouched. One timer watches the whole
    body (`_BodyClock`), not one per read: a photo arrives in hundreds of reads over a slow
    link, and a timer per read cost the event loop more than the read itself."""

    def __init__(self, app: ASGIApp, timeout_s: float, min_rate: float) -> None:
        self.app = app
        self.timeout_s = timeout_s
        self.min_rate = min_rate

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        clock = _BodyClock(receive, self.timeout_s, self.min_rate)
        try:
            await self.app(scope, clock.receive, send)
        finally:
            clock.stop()


class _BodyClock:
    """One request body's deadline. While a read waits, a timer set for the deadline cancels it
    (as `asyncio.timeout` would) if the deadline has not moved on meanwhile; bytes arriving only
    move the deadline, so the timer is set again only when it fires early. A read that starts
    late (the app was busy between reads) has a millisecond, as a buffered chunk or a disconnect
    still comes back at once."""

    __slots__ = (
        "_expired", "_min_rate", "_reader", "_receive", "_timeout_s", "_timer", "complete",
        "received", "started",
    )  # fmt: skip

    def __init__(self, receive: Receive, timeout_s: float, min_rate: float) -> None:
        self._receive = receive
        self._timeout_s = timeout_s
        self._min_rate = min_rate
        self._timer: asyncio.TimerHandle | None = None
        self._reader: asyncio.Task[Any] | None = None
        self._expired = False
        self.started: float | None = None
        self.received = 0
        self.complete = False

    def _deadline(self, started: float) -> float:
        return started + self._timeout_s + self.received / self._min_rate

    async def receive(self) -> Message:
        if self.complete:  # e.g. a streaming answer listening for the client going away
            return await self._receive()
        loop = asyncio.get_running_loop()
        now = loop.time()
        if self.started is None:
            self.started = now
        if self._timer is None:
            self._timer = loop.call_at(max(self._deadline(self.started), now + 0.001), self._due)
        reader = self._reader = asyncio.current_task()
        assert reader is not None
        cancelling = reader.cancelling()
        try:
            message = await self._receive()
        except asyncio.CancelledError:
            if self._expired and reader.uncancel() <= cancelling:
                raise RequestTimeoutError(self._message()) from None
            raise
        finally:
            self._reader = None
        if message["type"] == "http.request":
            self.received += len(message.get("body", b""))
        if message["type"] != "http.request" or not message.get("more_body", False):
            self.complete = True
            self.stop()
        return message

    def _due(self) -> None:
        assert self.started is not None
        loop = asyncio.get_running_loop()
        deadline = self._deadline(self.started)
        if loop.time() < deadline:
            self._timer = loop.call_at(deadline, self._due)
        elif self._reader is not None:
            self._timer = None
            self._expired = True
            self._reader.cancel()
        else:  # the app is busy between reads: the next read starts the last millisecond
            self._timer = None

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _message(self) -> str:
        assert self.started is not None
        elapsed = asyncio.get_running_loop().time() - self.started
        return (
            f"the request body arrived too slowly ({self.received:,} bytes in {elapsed:.1f} s; "
            f"the agent waits {self._timeout_s:g} s plus {self._min_rate:,.0f} bytes/s); send it "
            "at once, over a better link"
        )


class EarlyRefusal:
    """Answer `method route` requests with 503 + Retry-After when `refusal(name)` says so, before
    the app sees them (`name` is the route's `{name}` path parameter)."""

    def __init__(self, app: ASGIApp, refusal: Refusal, route: str, method: str = "POST") -> None:
        self.app = app
        self.refusal = refusal
        self.route = route
        self.method = method
        self.pattern = compile_path(route)[0]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == self.method:
            match = self.pattern.match(scope["path"])
            error = self.refusal(match["name"]) if match else None
            if error is not None:
                scope[ROUTE_KEY] = self.route
                await self._refuse(send, error)
                return
        await self.app(scope, receive, send)

    @staticmethod
    async def _refuse(send: Send, error: AgentError) -> None:
        # The answer the app's handler gives the same error (`edge_agent.http.errors`), kept
        # alive like that one: the server skips the unread body.
        status, code = status_for(error)
        request_id = new_request_id()
        headers = [(b"x-request-id", request_id.encode())]
        if error.retry_after_s is not None:
            retry_after = max(1, math.ceil(error.retry_after_s))
            headers.append((b"retry-after", str(retry_after).encode()))
        await send_error(send, status, code, error.message, (*headers,), request_id, close=False)


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
                template = getattr(route, "path", None) or scope.get(ROUTE_KEY, "unmatched")
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
    await send_error(send, 413, "payload_too_large", _message(size, limit, declared=True))


def error_json(code: str, message: str, request_id: str | None = None) -> bytes:
    """The agent's error shape (`edge_agent.http.errors`), for answers made outside the app."""
    error = {"code": code, "message": message, "request_id": request_id}
    return json.dumps({"error": error}).encode()


async def send_error(
    send: Send,
    status: int,
    code: str,
    message: str,
    headers: tuple[tuple[bytes, bytes], ...] = (),
    request_id: str | None = None,
    *,
    close: bool = True,
) -> None:
    """Answer with the agent's error shape and (unless `close` is False) close: for answers made
    before the app (and its exception handlers) ran."""
    body = error_json(code, message, request_id)
    closing = ((b"connection", b"close"),) if close else ()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *closing,
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
