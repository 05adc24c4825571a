"""edge_agent.app.sdnotify against a real AF_UNIX datagram socket standing in for systemd."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_agent.app.sdnotify import SystemdNotifier, watchdog_loop


class FakeSystemd:
    """The receiving end of $NOTIFY_SOCKET, as PID 1 holds it."""

    def __init__(self, sock: socket.socket, address: str) -> None:
        self.sock = sock
        self.address = address  # what goes into NOTIFY_SOCKET

    def messages(self) -> list[str]:
        """Every datagram received so far."""
        received = []
        while True:
            try:
                received.append(self.sock.recv(4096).decode())
            except BlockingIOError:
                return received


@pytest.fixture
def systemd(tmp_path: Path) -> Iterator[FakeSystemd]:
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.setblocking(False)
        yield FakeSystemd(sock, str(path))


@pytest.fixture
def abstract_systemd() -> Iterator[FakeSystemd]:
    name = f"lineside-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        sock.setblocking(False)
        yield FakeSystemd(sock, "@" + name)


def test_sends_each_notification_to_the_socket(systemd: FakeSystemd) -> None:
    notifier = SystemdNotifier({"NOTIFY_SOCKET": systemd.address})
    assert notifier.enabled

    notifier.ready()
    notifier.status("serving defects-1")
    notifier.watchdog()
    notifier.extend_timeout(90)
    notifier.stopping()

    assert systemd.messages() == [
        "READY=1",
        "STATUS=serving defects-1",
        "WATCHDOG=1",
        "EXTEND_TIMEOUT_USEC=90000000",
        "STOPPING=1",
    ]


def test_abstract_socket_address(abstract_systemd: FakeSystemd) -> None:
    SystemdNotifier({"NOTIFY_SOCKET": abstract_systemd.address}).ready()
    assert abstract_systemd.messages() == ["READY=1"]


def test_status_cannot_inject_other_assignments(systemd: FakeSystemd) -> None:
    SystemdNotifier({"NOTIFY_SOCKET": systemd.address}).status("model x\nREADY=1")
    assert systemd.messages() == ["STATUS=model x READY=1"]


def test_reads_os_environ_by_default(systemd: FakeSystemd, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", systemd.address)
    SystemdNotifier().ready()
    assert systemd.messages() == ["READY=1"]


def test_everything_is_a_no_op_outside_systemd() -> None:
    notifier = SystemdNotifier({})
    assert not notifier.enabled
    assert notifier.watchdog_interval() is None
    notifier.ready()
    notifier.status("x")
    notifier.watchdog()
    notifier.stopping()


def test_unusable_socket_value_disables_notifications(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="edge_agent.app.sdnotify"):
        notifier = SystemdNotifier({"NOTIFY_SOCKET": "vsock:2:1234"})
    assert not notifier.enabled
    assert "neither a path nor an abstract socket" in caplog.text


def test_send_failure_never_raises_and_warns_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    notifier = SystemdNotifier({"NOTIFY_SOCKET": str(tmp_path / "nobody-listens")})
    with caplog.at_level(logging.DEBUG, logger="edge_agent.app.sdnotify"):
        notifier.ready()
        notifier.watchdog()
        notifier.stopping()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    debugs = [r for r in caplog.records if r.levelno == logging.DEBUG]
    assert len(warnings) == 1
    assert "could not send READY" in warnings[0].getMessage()
    assert len(debugs) == 2


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 30.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 30.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "not-a-pid"}, None),
        ({"WATCHDOG_PID": str(os.getpid())}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": str(2**64 - 1)}, None),
        ({"WATCHDOG_USEC": "-5"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval_follows_sd_watchdog_enabled(
    env: dict[str, str], expected: float | None
) -> None:
    assert SystemdNotifier(env).watchdog_interval() == expected


def test_watchdog_pid_is_compared_with_the_given_pid() -> None:
    env = {"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "4242"}
    assert SystemdNotifier(env, pid=4242).watchdog_interval() == 1.0
    assert SystemdNotifier(env, pid=4243).watchdog_interval() is None


def _watchdog_env(systemd: FakeSystemd, usec: int) -> dict[str, str]:
    return {"NOTIFY_SOCKET": systemd.address, "WATCHDOG_USEC": str(usec)}


def test_watchdog_loop_pings_at_half_the_interval_while_healthy(systemd: FakeSystemd) -> None:
    notifier = SystemdNotifier(_watchdog_env(systemd, 30_000_000))
    sleeps: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        sleeps.append(seconds)
        if len(sleeps) == 3:
            raise asyncio.CancelledError

    with pytest.raises(asyncio.CancelledError):
        asyncio.run(watchdog_loop(notifier, lambda: True, sleep=fake_sleep))
    assert sleeps == [15.0, 15.0, 15.0]
    assert systemd.messages() == ["WATCHDOG=1"] * 3


def test_watchdog_loop_stops_pinging_while_unhealthy(
    systemd: FakeSystemd, caplog: pytest.LogCaptureFixture
) -> None:
    notifier = SystemdNotifier(_watchdog_env(systemd, 30_000_000))
    health = iter([True, True, False, False, False, True])
    rounds = 0

    async def fake_sleep(_seconds: float) -> None:
        nonlocal rounds
        rounds += 1
        if rounds == 6:
            raise asyncio.CancelledError

    with (
        caplog.at_level(logging.WARNING, logger="edge_agent.app.sdnotify"),
        pytest.raises(asyncio.CancelledError),
    ):
        asyncio.run(watchdog_loop(notifier, lambda: next(health), sleep=fake_sleep))
    assert systemd.messages() == ["WATCHDOG=1"] * 3
    messages = [r.getMessage() for r in caplog.records]
    assert sum("watchdog pings stopped" in m for m in messages) == 1
    assert sum("pings resumed" in m for m in messages) == 1


def test_watchdog_loop_treats_a_raising_health_check_as_unhealthy(systemd: FakeSystemd) -> None:
    notifier = SystemdNotifier(_watchdog_env(systemd, 30_000_000))

    def broken() -> bool:
        raise RuntimeError("health check broke")

    async def one_round(_seconds: float) -> None:
        raise asyncio.CancelledError

    with pytest.raises(asyncio.CancelledError):
        asyncio.run(watchdog_loop(notifier, broken, sleep=one_round))
    assert systemd.messages() == []


def test_watchdog_loop_returns_when_no_watchdog_is_expected(systemd: FakeSystemd) -> None:
    notifier = SystemdNotifier({"NOTIFY_SOCKET": systemd.address})
    asyncio.run(asyncio.wait_for(watchdog_loop(notifier, lambda: True), timeout=5))
    assert systemd.messages() == []


def test_watchdog_loop_with_real_sleep(systemd: FakeSystemd) -> None:
    """With asyncio.sleep itself: a 0.2 s watchdog is pinged repeatedly, about every 0.1 s."""
    notifier = SystemdNotifier(_watchdog_env(systemd, 200_000))

    async def run_for(seconds: float) -> None:
        task = asyncio.create_task(watchdog_loop(notifier, lambda: True))
        await asyncio.sleep(seconds)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(run_for(0.35))
    # Pings at 0, 0.1, 0.2 and 0.3 s; a loaded machine may fall behind by one or two, and a
    # shorter period than half the interval would send more than four.
    messages = systemd.messages()
    assert set(messages) == {"WATCHDOG=1"}
    assert 2 <= len(messages) <= 4
