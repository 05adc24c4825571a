"""Leadership: of the controller processes that share one database, exactly one acts.

The leader alone connects to the broker (with the shared client_id, so it resumes the
persistent session and the reports queued in it), ingests and ticks the rollouts. The others
stand by: they serve the API's reads, answer writes with 503 naming the leader, and try to take
over every `retry_s`. Leadership is a lock the database's side releases when the leader dies:

- PostgreSQL: a session-level `pg_try_advisory_lock(LEADER_LOCK_KEY)` held on a connection of its
  own (not from the pool; autocommit, so it never sits in a transaction; TCP keepalives on both
  ends, so a vanished host's session is ended by the server within about 15 s). A SIGKILLed
  leader's socket closes at once and PostgreSQL releases the lock; a standby's next try wins.
  The leader checks its connection every `check_s`: if it has failed the lock is gone, and the
  leader stops acting at once.
- SQLite: an exclusive `flock` on `DATABASE.leader`, beside the database file; the kernel
  releases it when the process dies. A second process on the same file stands by the same way.
- An in-memory SQLite database cannot be shared, so its one process always leads.

The leader records who it is in the `leadership` table (holder, API address, since, heartbeat)
so a standby can say where writes go. Leadership lasts at most the life of a process: once lost
it is not taken again by the same process (`service.serve` exits, and systemd restarts it as a
standby), because nothing that process held in memory can be trusted after the loss.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.pool import NullPool

from fleet_controller import db

log = logging.getLogger(__name__)

#: The advisory lock the leader holds on PostgreSQL ("LSLEADER" as a big-endian int64).
LEADER_LOCK_KEY = int.from_bytes(b"LSLEADER", "big", signed=True)
RETRY_S = 2.0  # how often a standby tries to take over
CHECK_S = 1.0  # how often the leader checks that its lock is still held
HEARTBEAT_S = 5.0  # how often the leader refreshes its row in `leadership`

LEADERSHIP = sa.Table(
    "leadership",
    db.METADATA,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),  # always 1
    sa.Column("holder", sa.String(200), nullable=False),
    sa.Column("api", sa.Text, nullable=False),
    sa.Column("since", sa.DateTime(timezone=True), nullable=False),
    sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=False),
)

# The lock's own connection: give up connecting after 5 s, notice a dead peer within ~15 s on
# both ends (client keepalives and tcp_user_timeout; the server's keepalives through `options`).
_LOCK_CONNECT_ARGS: dict[str, Any] = {
    "connect_timeout": 5,
    "keepalives": 1,
    "keepalives_idle": 5,
    "keepalives_interval": 2,
    "keepalives_count": 3,
    "tcp_user_timeout": 5_000,  # < the server's ~11 s: the leader knows first
    "application_name": "lineside-fleet-leader",
    "options": (
        "-c tcp_keepalives_idle=5 -c tcp_keepalives_interval=2 -c tcp_keepalives_count=3 "
        "-c statement_timeout=5000"
    ),
}


class LeaderLock(Protocol):
    """A lock that at most one process holds, and that its holder's death releases. One thread
    uses it (the elector's)."""

    def try_acquire(self) -> bool:
        """Take the lock if it is free; never blocks for long."""
        ...

    def holding(self) -> bool:
        """Whether the lock is still held (False once it has been lost)."""
        ...

    def release(self) -> None: ...


class AdvisoryLock:
    """PostgreSQL: a session-level advisory lock on a dedicated connection."""

    def __init__(self, url: sa.URL | str, *, key: int = LEADER_LOCK_KEY) -> None:
        self.key = key
        self._engine = sa.create_engine(
            url, poolclass=NullPool, isolation_level="AUTOCOMMIT", connect_args=_LOCK_CONNECT_ARGS
        )
        self._conn: Connection | None = None
        self._held = False

    def try_acquire(self) -> bool:
        try:
            if self._conn is None:
                self._conn = self._engine.connect()
                # A server-wide idle_session_timeout must not end the leader's idle session.
                self._conn.exec_driver_sql(
                    "SELECT set_config('idle_session_timeout', '0', false) "
                    "WHERE current_setting('server_version_num')::int >= 140000"
                )
            query = sa.select(sa.func.pg_try_advisory_lock(self.key))
            self._held = bool(self._conn.execute(query).scalar())
        except sa.exc.SQLAlchemyError as exc:
            log.warning("cannot reach PostgreSQL to try for the leadership: %s", _first_line(exc))
            self._close()
        return self._held

    def holding(self) -> bool:
        if not self._held or self._conn is None:
            return False
        try:
            # The lock lives as long as this session: a round trip proves both.
            self._conn.exec_driver_sql("SELECT 1")
        except sa.exc.SQLAlchemyError as exc:
            log.error("the leader's PostgreSQL session failed: %s", _first_line(exc))
            self._close()
        return self._held

    def release(self) -> None:
        if self._conn is not None and self._held:
            # Closing the session below releases it anyway.
            with contextlib.suppress(sa.exc.SQLAlchemyError):
                self._conn.execute(sa.select(sa.func.pg_advisory_unlock(self.key)))
        self._close()
        self._engine.dispose()

    def _close(self) -> None:
        self._held = False
        if self._conn is not None:
            conn, self._conn = self._conn, None
            with contextlib.suppress(sa.exc.SQLAlchemyError):  # it may be broken already
                conn.close()


class FileLock:
    """SQLite: an exclusive `flock` on a file beside the database."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def try_acquire(self) -> bool:
        if self._fd is not None:
            return True
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._fd = fd
        return True

    def holding(self) -> bool:
        if self._fd is None:
            return False
        try:
            # Someone who deleted or replaced the file would let a second process lock a new
            # one: the lock counts only while it is on the file at `path`.
            same = os.fstat(self._fd).st_ino == self.path.stat().st_ino
        except FileNotFoundError:
            same = False
        if not same:
            log.error("the leader's lock file %s was removed or replaced", self.path)
        return same

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)  # closing the last descriptor releases the flock


class SoleLock:
    """An in-memory SQLite database: only this process can see it, so it always leads."""

    def try_acquire(self) -> bool:
        return True

    def holding(self) -> bool:
        return True

    def release(self) -> None:
        pass


def lock_for(engine: Engine) -> LeaderLock:
    """The leadership lock for the database behind `engine`."""
    url = engine.url
    if url.get_backend_name() == "postgresql":
        return AdvisoryLock(url)
    database = url.database or ""
    if not database or database == ":memory:":
        return SoleLock()
    return FileLock(Path(database).with_name(Path(database).name + ".leader"))


# ---- who leads --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Identity:
    """A controller process: `holder` is host:pid, `api` where its HTTP API answers."""

    holder: str
    api: str

    @classmethod
    def of_this_process(cls, api: str) -> Identity:
        return cls(f"{socket.gethostname()}:{os.getpid()}", api)


def api_address(host: str, port: int) -> str:
    """The API's address as another machine would use it."""
    if host in ("0.0.0.0", "::", ""):  # noqa: S104 (a wildcard, not a bind)
        host = socket.getfqdn()
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def current(engine: Engine) -> dict[str, Any] | None:
    """The leader last recorded (holder, api, since, heartbeat_at), or None."""
    with engine.connect() as conn:
        row = conn.execute(sa.select(LEADERSHIP).where(LEADERSHIP.c.id == 1)).mappings().first()
    if row is None:
        return None
    return {
        "holder": row["holder"],
        "api": row["api"],
        "since": _iso(row["since"]),
        "heartbeat_at": _iso(row["heartbeat_at"]),
    }


def _record(engine: Engine, identity: Identity, now: datetime, *, new: bool) -> None:
    values: dict[str, Any] = {"heartbeat_at": now}
    if new:
        values.update(holder=identity.holder, api=identity.api, since=now)
    with db.transaction(engine) as conn:
        updated = conn.execute(
            LEADERSHIP.update().where(LEADERSHIP.c.id == 1).values(**values)
        ).rowcount
        if not updated and new:
            conn.execute(LEADERSHIP.insert().values(id=1, **values))


# ---- the election -----------------------------------------------------------------------------
class Elector:
    """Tries for the lock until it has it; then leads until stopped or until the lock is lost.

    `leading` is set while this process leads: the controller's loop acts only while it is set.
    """

    def __init__(
        self,
        lock: LeaderLock,
        engine: Engine,
        identity: Identity,
        leading: threading.Event,
        *,
        retry_s: float = RETRY_S,
        check_s: float = CHECK_S,
        heartbeat_s: float = HEARTBEAT_S,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.lock = lock
        self.engine = engine
        self.identity = identity
        self.leading = leading
        self.lost = threading.Event()
        self.retry_s = retry_s
        self.check_s = check_s
        self.heartbeat_s = heartbeat_s
        self.clock = clock

    def run(
        self,
        stop: threading.Event,
        on_lead: Callable[[], None] = lambda: None,
        on_loss: Callable[[], None] = lambda: None,
    ) -> None:
        """Stand by, lead, and return when `stop` is set or the leadership is lost."""
        self.leading.clear()
        try:
            waited = False
            while not stop.is_set():
                if self.lock.try_acquire():
                    self._lead(stop, on_lead, on_loss)
                    return
                if not waited:
                    log.info(
                        "standing by: another controller leads; trying every %gs", self.retry_s
                    )
                    waited = True
                stop.wait(self.retry_s)
        finally:
            self.leading.clear()
            self.lock.release()

    def _lead(
        self, stop: threading.Event, on_lead: Callable[[], None], on_loss: Callable[[], None]
    ) -> None:
        self._write(new=True)
        log.warning("this controller (%s, %s) now leads", self.identity.holder, self.identity.api)
        self.leading.set()
        on_lead()
        beat = time.monotonic()
        while not stop.wait(self.check_s):
            if not self.lock.holding():
                self.leading.clear()
                self.lost.set()
                log.error("this controller lost the leadership: it stops acting now")
                on_loss()
                return
            if time.monotonic() - beat >= self.heartbeat_s:
                self._write(new=False)
                beat = time.monotonic()

    def _write(self, *, new: bool) -> None:
        # The row only tells standbys where the leader is: failing to write it is logged, and
        # never decides who leads (the lock alone does).
        try:
            _record(self.engine, self.identity, self.clock(), new=new)
        except sa.exc.SQLAlchemyError as exc:
            log.warning("cannot record the leader in the database: %s", _first_line(exc))


def _iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    return (value if value.tzinfo else value.replace(tzinfo=UTC)).isoformat()


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
