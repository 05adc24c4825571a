"""Talking to systemd: the sd_notify(3) protocol and the watchdog keep-alive loop.

`SystemdNotifier` sends READY=1, STOPPING=1, STATUS=..., EXTEND_TIMEOUT_USEC=... and WATCHDOG=1 to
the socket named by $NOTIFY_SOCKET, and reads the watchdog interval the way sd_watchdog_enabled(3)
does. Outside systemd (a container, a terminal, a test) every method is a no-op. A failed send never
raises: the agent must keep serving even when the service manager cannot be told about it.

`watchdog_loop` pings at half the watchdog interval, but only while the agent reports itself healthy,
so a wedged agent stops pinging and systemd restarts it (WatchdogSec= and Restart= in the unit).

Dependency-free on purpose (no libsystemd, no python-systemd): it is imported by the agent's
composition root on every platform.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Mapping

_log = logging.getLogger(__name__)

Sleep = Callable[[float], Awaitable[None]]


class SystemdNotifier:
    """Sends sd_notify(3) messages when started by systemd with Type=notify, else does nothing."""

    def __init__(self, environ: Mapping[str, str] | None = None, pid: int | None = None) -> None:
        env = os.environ if environ is None else environ
        self._pid = os.getpid() if pid is None else pid
        self._address = _socket_address(env.get("NOTIFY_SOCKET", ""))
        self._watchdog_usec = _watchdog_usec(env, self._pid)
        self._warned = False

    @property
    def enabled(self) -> bool:
        """Whether there is a notification socket to talk to."""
        return self._address is not None

    def ready(self) -> None:
        """Start-up finished: systemd marks the unit active and starts the watchdog clock."""
        self._send("READY=1")

    def stopping(self) -> None:
        """Shutdown began: systemd stops expecting watchdog pings and waits TimeoutStopSec=."""
        self._send("STOPPING=1")

    def status(self, text: str) -> None:
        """A one-line status shown by `systemctl status`."""
        # A newline would start a second assignment (e.g. a model name ending in "\nREADY=1").
        self._send("STATUS=" + " ".join(text.splitlines()))

    def extend_timeout(self, seconds: float) -> None:
        """Ask for `seconds` more before the current start/stop timeout fires (systemd >= 236).

        For slow but healthy start-ups, such as building a TensorRT engine on first start.
        """
        self._send(f"EXTEND_TIMEOUT_USEC={max(0, round(seconds * 1_000_000))}")

    def watchdog(self) -> None:
        """The keep-alive ping; send it at least once per `watchdog_interval()`."""
        self._send("WATCHDOG=1")

    def watchdog_interval(self) -> float | None:
        """The watchdog timeout in seconds, or None when systemd expects no pings from us."""
        return None if self._watchdog_usec is None else self._watchdog_usec / 1_000_000

    def _send(self, message: str) -> None:
        if self._address is None:
            return
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                # Never block the event loop: a full queue loses one message, the next one follows.
                sock.setblocking(False)
                sock.sendto(message.encode(), self._address)
        except OSError as exc:
            self._send_failed(message, exc)

    def _send_failed(self, message: str, exc: OSError) -> None:
        first = message.split("=", 1)[0]
        if self._warned:
            _log.debug("could not send %s to systemd: %s", first, exc)
            return
        self._warned = True
        _log.warning(
            "could not send %s to systemd through NOTIFY_SOCKET (%s); systemd may mark the "
            "service as failed. Check that the unit has NotifyAccess=main and that the agent is "
            "the unit's main process (ExecStart= runs it directly, not through a shell). "
            "Further failures are logged at debug level.",
            first,
            exc,
        )


async def watchdog_loop(
    notifier: SystemdNotifier,
    healthy: Callable[[], bool],
    *,
    sleep: Sleep = asyncio.sleep,
) -> None:
    """Ping the watchdog every half interval while `healthy()` is true; run until cancelled.

    Returns at once when systemd expects no pings. `healthy()` raising counts as unhealthy.
    """
    interval = notifier.watchdog_interval()
    if interval is None:
        return
    period = interval / 2
    was_healthy = True
    while True:
        is_healthy = _check(healthy)
        if is_healthy:
            notifier.watchdog()
            if not was_healthy:
                _log.warning("agent healthy again: watchdog pings resumed")
        elif was_healthy:
            _log.warning(
                "agent unhealthy: watchdog pings stopped; systemd restarts the service if it "
                "stays unhealthy for %.0f s",
                interval,
            )
        was_healthy = is_healthy
        await sleep(period)


def _check(healthy: Callable[[], bool]) -> bool:
    try:
        return bool(healthy())
    except Exception:
        _log.exception("health check for the watchdog raised; treating the agent as unhealthy")
        return False


def _socket_address(value: str) -> str | bytes | None:
    """The sendto() address for $NOTIFY_SOCKET, or None when there is none we can use."""
    if not value:
        return None
    if value.startswith("@"):
        # Linux abstract namespace: a leading NUL byte instead of the '@'.
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    # systemd >= 254 may also hand out "vsock:CID:PORT" (to VMs); the agent never runs that way.
    _log.warning(
        "NOTIFY_SOCKET=%r is neither a path nor an abstract socket ('@name'); systemd will not "
        "be notified. Run the agent as a systemd service with Type=notify, or unset NOTIFY_SOCKET.",
        value,
    )
    return None


def _watchdog_usec(env: Mapping[str, str], pid: int) -> int | None:
    """sd_watchdog_enabled(3): WATCHDOG_USEC, if set and WATCHDOG_PID is unset or our pid."""
    raw_usec = env.get("WATCHDOG_USEC")
    if raw_usec is None:
        return None
    try:
        usec = int(raw_usec)
    except ValueError:
        usec = 0
    # 0 and UINT64_MAX (infinity) mean "no watchdog" to systemd as well.
    if not 0 < usec < 2**64 - 1:
        _log.warning("ignoring WATCHDOG_USEC=%r: not a positive number of microseconds", raw_usec)
        return None
    raw_pid = env.get("WATCHDOG_PID")
    if raw_pid is None:
        return usec
    try:
        watchdog_pid = int(raw_pid)
    except ValueError:
        _log.warning("ignoring the watchdog: WATCHDOG_PID=%r is not a process id", raw_pid)
        return None
    # The variables were meant for another process (we were started by it and inherited them).
    return usec if watchdog_pid == pid else None
