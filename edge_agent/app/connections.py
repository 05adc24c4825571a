"""uvicorn's h11 protocol with the connection limits a box on a plant network needs (#15).

uvicorn times out a keep-alive connection only after it has answered a request, never a
connection that opened and sent nothing or stopped half-way through its headers; its
`limit_concurrency` counts such idle sockets and then answers everyone, `/healthz` included, with
a plain-text 503. So the agent does not use it, and this protocol adds:

- idle: a connection with no request in progress is closed after `idle_timeout_s` without a
  byte, from the moment it opens as well as between keep-alive requests;
- head: once a request's first byte is in, its line and headers must be in within
  `header_timeout_s`, else 408 and close (a slow-loris client);
- size: the request line and headers are never buffered beyond `max_header_bytes` (h11's
  incomplete-event limit, which is why h11 and not httptools serves), else 431 and close;
- room: past `max_connections`, the connection idle the longest is closed for the newcomer;
  when every connection is busy with a request, the newcomer's request gets the JSON 503 +
  Retry-After the agent answers overload with.

The answers made here (400, 408, 431) have the agent's JSON error shape. The header count is
capped in the app (`edge_agent.http.middleware.HeaderLimit`), the body's pace too (`BodyDeadline`).
"""

from __future__ import annotations

import asyncio
import http
from dataclasses import dataclass
from typing import Any, ClassVar

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from edge_agent.http.middleware import error_json, send_error
from edge_agent.settings import AgentSettings


@dataclass(frozen=True)
class ConnectionLimits:
    idle_timeout_s: float
    header_timeout_s: float
    max_header_bytes: int
    max_connections: int

    @classmethod
    def from_settings(cls, settings: AgentSettings) -> ConnectionLimits:
        return cls(
            idle_timeout_s=settings.http_idle_timeout_s,
            header_timeout_s=settings.http_header_timeout_s,
            max_header_bytes=settings.http_max_header_bytes,
            max_connections=settings.http_max_connections,
        )


def limited_protocol(limits: ConnectionLimits) -> type[LimitedH11Protocol]:
    """The protocol class to hand uvicorn (`Config(http=...)`), bound to `limits`."""
    return type("LimitedH11Protocol", (LimitedH11Protocol,), {"limits": limits})


class LimitedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with idle, head and room limits (see the module)."""

    limits: ClassVar[ConnectionLimits]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._timer: asyncio.TimerHandle | None = None
        self._waiting_since = 0.0
        self._head_started: float | None = None

    # ---- uvicorn's protocol hooks ---------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._await_request()
        if len(self.connections) > self.limits.max_connections:
            self._make_room()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._between_requests() and self._head_started is None:
            self._head_started = self.loop.time()
            self._schedule(self.limits.header_timeout_s, self._head_timed_out)
        super().data_received(data)
        if not self._between_requests():  # a request's head is in: the app times its body
            self._cancel_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._between_requests() and not self.transport.is_closing():
            self._await_request()

    def send_400_response(self, msg: str) -> None:
        """h11 refused what it received: a head over the size limit (431), or not HTTP."""
        if len(self.conn.trailing_data[0]) > self.limits.max_header_bytes:
            self._refuse(
                431,
                "headers_too_large",
                f"the request line and headers are over {self.limits.max_header_bytes:,} "
                "bytes; send smaller headers",
            )
        else:
            self._refuse(400, "bad_request", f"{msg.rstrip('.')}: send a valid HTTP/1.1 request")

    # ---- the limits ------------------------------------------------------------------------
    def _between_requests(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def _await_request(self) -> None:
        self._waiting_since = self.loop.time()
        self._head_started = None
        self._schedule(self.limits.idle_timeout_s, self._idle_timed_out)

    def _idle_timed_out(self) -> None:
        self._timer = None
        if self._between_requests():
            self.transport.close()

    def _head_timed_out(self) -> None:
        self._timer = None
        if not self._between_requests() or self.transport.is_closing():
            return
        if self.conn.their_state is h11.IDLE:  # part of a request line or headers is in
            self._refuse(
                408,
                "request_timeout",
                f"the request line and headers took over {self.limits.header_timeout_s:g} s "
                "to arrive; send them at once",
            )
        else:  # the rest of a body whose request was already answered
            self.transport.close()

    def _make_room(self) -> None:
        idle = [
            other
            for other in self.connections
            if isinstance(other, LimitedH11Protocol)
            and other is not self
            and other._between_requests()
            and not other.transport.is_closing()
        ]
        if idle:
            min(idle, key=lambda other: other._waiting_since).transport.close()
        else:
            self.app = _too_many_connections

    def _refuse(self, status: int, code: str, message: str) -> None:
        """Answer with the agent's error shape outside any request, and close."""
        self._cancel_timer()
        if self.transport.is_closing():
            return
        body = error_json(code, message)
        head = (
            f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}\r\n"
            "content-type: application/json\r\n"
            f"content-length: {len(body)}\r\n"
            "connection: close\r\n\r\n"
        )
        self.transport.write(head.encode() + body)
        self.transport.close()

    def _schedule(self, delay_s: float, callback: Any) -> None:
        self._cancel_timer()
        self._timer = self.loop.call_later(delay_s, callback)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


async def _too_many_connections(scope: Any, receive: Any, send: Any) -> None:
    await send_error(
        send,
        503,
        "overloaded",
        "the agent has too many open connections; retry after Retry-After seconds, and reuse "
        "one connection",
        headers=((b"retry-after", b"1"),),
    )
