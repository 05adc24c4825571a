"""The durable MQTT outbox: messages that must reach the broker, kept in SQLite until PUBACK.

Worker threads `put()` replies, results, feedback, update reports and telemetry; the one thread
that owns the paho client reads `pending()` rows in arrival order, publishes them and `ack()`s a
row when its PUBACK arrives. A row is deleted only then, so delivery is at least once; every row
carries a `message_id` that consumers use to drop duplicates. Row ids come from AUTOINCREMENT, so
they are never reused: the owner's `after_row_id` cursor stays valid even after the table empties.

Durability. WAL journal with synchronous=FULL: `put()` returns only after its commit is fsynced,
so a returned put survives SIGKILL and power loss. Replies to MQTT 5 requests are committed but
not fsynced (`put(fsync=False)`): they survive a killed agent, and on power loss the requester,
which waits online with a timeout, asks again; this keeps an fsync off every round trip. NORMAL (an option, for slow flash) survives a
killed process but may lose the last commits on power loss. `ack()` is not fsynced on its own: a
power cut may bring back a few acknowledged rows, which are sent again and deduplicated by their
message_id. The file is opened with an exclusive lock: a second agent on the same outbox would publish every row twice and break the totals.

Bounds. A message's `size` is its payload + topic + properties JSON bytes; the outbox holds at
most `max_bytes` of them and `max_messages` rows (the file itself is larger by SQLite's page
overhead and reuses freed pages, so it stays near its high-water mark instead of growing). When
a put would go over either bound, the oldest rows are dropped in this kind order, oldest first
within a kind, until the new row fits:

    telemetry  periodic and superseded by the next report
    reply      MQTT 5 request/response: a requester that waited this long has timed out and retries
    update     progress reports are superseded by later ones; the updater re-reports its state
    feedback   technician corrections: human work, kept ahead of everything but results
    result     what the plant's systems act on: dropped last

The row being put is never dropped (a message larger than `max_bytes` on its own is refused with
`OutboxFullError`), and every drop is counted per kind in `depth()["dropped"]` for telemetry and
metrics. Totals are kept in memory (loaded at open) so `put()` never scans the table.

Threads. One connection (check_same_thread=False) behind one lock: SQLite admits one writer at a
time anyway, so per-thread connections would only add busy retries, and the eviction choice, the
insert and the in-memory totals must change together in one critical section.

Corruption. At open the file is checked (`PRAGMA quick_check`); a file SQLite reports as corrupt
or not a database is moved aside to `PATH.corrupt-<UTC time>` (with its -wal/-shm), an error is
logged, and a fresh outbox is created so the agent keeps running.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, get_args

log = logging.getLogger(__name__)

Kind = Literal["reply", "result", "feedback", "update", "telemetry"]
Synchronous = Literal["FULL", "NORMAL"]
KINDS: tuple[Kind, ...] = get_args(Kind)
DROP_ORDER: tuple[Kind, ...] = ("telemetry", "reply", "update", "feedback", "result")

SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    row_id INTEGER PRIMARY KEY AUTOINCREMENT,
    message_id TEXT NOT NULL,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    qos INTEGER NOT NULL,
    retain INTEGER NOT NULL,
    kind TEXT NOT NULL,
    properties TEXT NOT NULL,
    created_at REAL NOT NULL,
    size INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS outbox_by_kind ON outbox (kind, row_id);
"""
_INSERT = (
    "INSERT INTO outbox (message_id, topic, payload, qos, retain, kind, properties, created_at, size)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_SELECT_PENDING = (
    "SELECT row_id, message_id, topic, payload, qos, retain, kind, properties, created_at, size"
    " FROM outbox WHERE row_id > ? ORDER BY row_id LIMIT ?"
)
_CORRUPT_CODES = {sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB}
# After a checkpoint SQLite truncates the WAL to this size, so a burst does not leave a big file.
_WAL_SIZE_LIMIT = 4 * 1024 * 1024


class OutboxError(Exception):
    """The outbox cannot do what was asked; the message says why and what to do."""


class OutboxFullError(OutboxError):
    """A single message is larger than the whole outbox may hold."""


class _CorruptFileError(Exception):
    """Internal: the file failed its integrity check."""


@dataclass(frozen=True)
class OutboxMessage:
    """One stored message, as the MQTT owner thread publishes it."""

    row_id: int
    message_id: str
    topic: str
    payload: bytes
    qos: int
    retain: bool
    kind: Kind
    properties: dict[str, Any]
    created_at: float
    size: int


@dataclass(frozen=True)
class PutResult:
    """The stored message and how many older rows of each kind were dropped to make room."""

    message: OutboxMessage
    dropped: dict[str, int]


class Outbox:
    """A bounded, durable, ordered message store; see the module docstring for the policy."""

    def __init__(
        self,
        path: Path,
        *,
        max_bytes: int,
        max_messages: int,
        synchronous: Synchronous = "FULL",
    ) -> None:
        if max_bytes < 1 or max_messages < 1:
            raise ValueError(
                f"outbox bounds must be positive (max_bytes={max_bytes}, max_messages={max_messages}); fix the MQTT outbox settings"
            )
        if synchronous not in get_args(Synchronous):
            raise ValueError(f"synchronous must be FULL or NORMAL, not {synchronous!r}")
        self.path = path
        self.max_bytes = max_bytes
        self.max_messages = max_messages
        self._synchronous = synchronous
        self._lock = threading.Lock()
        self._count = dict.fromkeys(KINDS, 0)
        self._bytes = dict.fromkeys(KINDS, 0)
        self._dropped = dict.fromkeys(KINDS, 0)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._conn: sqlite3.Connection | None = _open_checked(path, synchronous)
        try:
            with self._errors("load the outbox totals"):
                for kind, count, size in self._conn.execute(
                    "SELECT kind, COUNT(*), SUM(size) FROM outbox GROUP BY kind"
                ):
                    self._count[_as_kind(kind)] = count
                    self._bytes[_as_kind(kind)] = size
        except BaseException:
            self.close()  # release the file lock for whoever fixes the problem
            raise

    def put(
        self,
        topic: str,
        payload: bytes,
        *,
        kind: Kind,
        qos: int = 1,
        retain: bool = False,
        properties: dict[str, Any] | None = None,
        message_id: str | None = None,
        fsync: bool | None = None,
    ) -> PutResult:
        """Store a message (committed, and fsynced unless `fsync` is False, when this returns).

        `fsync` defaults to True for every kind but "reply": an MQTT 5 requester waits online with
        a timeout and asks again, so a reply that a power cut would lose is not worth an fsync
        (~4 ms) on every round trip. A reply still survives a killed agent (it is committed).
        """
        if fsync is None:
            fsync = kind != "reply"
        props_json = _check_message(topic, kind, qos, properties)
        size = len(payload) + len(topic.encode()) + len(props_json.encode())
        if size > self.max_bytes:
            raise OutboxFullError(
                f"a {kind} message of {size} bytes on {topic!r} is larger than the whole outbox ({self.max_bytes} bytes); send less (e.g. a reference instead of the image) or raise the outbox byte limit"
            )
        message = OutboxMessage(
            row_id=0,
            message_id=message_id or uuid.uuid4().hex,
            topic=topic,
            payload=bytes(payload),
            qos=qos,
            retain=retain,
            kind=kind,
            properties=json.loads(props_json),
            created_at=time.time(),
            size=size,
        )
        with self._lock, self._errors("store a message"):
            conn = self._live()
            if not fsync:
                conn.execute("PRAGMA synchronous = NORMAL")
            try:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    victims = self._choose_victims(conn, size)
                    conn.executemany(
                        "DELETE FROM outbox WHERE row_id = ?", [(v[0],) for v in victims]
                    )
                    cursor = conn.execute(_INSERT, _row_values(message, props_json))
                    conn.execute("COMMIT")
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
            finally:
                if not fsync:
                    conn.execute(f"PRAGMA synchronous = {self._synchronous}")
            # Totals change only once the commit has succeeded.
            dropped: dict[str, int] = {}
            for _, victim_kind, victim_size in victims:
                self._count[victim_kind] -= 1
                self._bytes[victim_kind] -= victim_size
                self._dropped[victim_kind] += 1
                dropped[victim_kind] = dropped.get(victim_kind, 0) + 1
            self._count[kind] += 1
            self._bytes[kind] += size
        if dropped:
            log.warning("outbox full: dropped %s to store a %s message", dropped, kind)
        assert cursor.lastrowid is not None
        return PutResult(message=replace(message, row_id=cursor.lastrowid), dropped=dropped)

    def pending(self, after_row_id: int = 0, limit: int = 64) -> list[OutboxMessage]:
        """Up to `limit` rows with row_id > `after_row_id`, in arrival order."""
        if limit < 1:
            raise ValueError(f"pending() limit must be at least 1, not {limit}")
        with self._lock, self._errors("read pending messages"):
            rows = self._live().execute(_SELECT_PENDING, (after_row_id, limit)).fetchall()
        return [_message(row) for row in rows]

    def ack(self, row_id: int) -> None:
        """Delete a row the broker has acknowledged; acking a row that is gone does nothing."""
        with self._lock, self._errors("delete an acknowledged message"):
            conn = self._live()
            row = conn.execute(
                "SELECT kind, size FROM outbox WHERE row_id = ?", (row_id,)
            ).fetchone()
            if row is None:
                return
            # A lost ack costs one more (deduplicated) delivery, so the delete is not fsynced on
            # its own; the next put's fsync covers it. One fsync per PUBACK would cap a backlog
            # flush at a few hundred messages a second.
            conn.execute("PRAGMA synchronous = NORMAL")
            try:
                conn.execute("DELETE FROM outbox WHERE row_id = ?", (row_id,))
            finally:
                conn.execute(f"PRAGMA synchronous = {self._synchronous}")
            self._count[_as_kind(row[0])] -= 1
            self._bytes[_as_kind(row[0])] -= row[1]

    def depth(self) -> dict[str, Any]:
        """What is waiting, and what was dropped since this outbox was opened."""
        with self._lock:
            return {
                "messages": sum(self._count.values()),
                "bytes": sum(self._bytes.values()),
                "by_kind": dict(self._count),
                "dropped": dict(self._dropped),
            }

    def close(self) -> None:
        """Checkpoint the WAL into the main file and close; closing twice does nothing."""
        with self._lock:
            if self._conn is None:
                return
            with contextlib.suppress(sqlite3.Error):
                self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self._conn.close()
            self._conn = None

    def __enter__(self) -> Outbox:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _choose_victims(self, conn: sqlite3.Connection, size: int) -> list[tuple[int, Kind, int]]:
        """The oldest rows, in drop order, whose removal lets a message of `size` fit."""
        rows_over = sum(self._count.values()) + 1 - self.max_messages
        bytes_over = sum(self._bytes.values()) + size - self.max_bytes
        victims: list[tuple[int, Kind, int]] = []
        for kind in DROP_ORDER:
            if rows_over <= 0 and bytes_over <= 0:
                break
            if self._count[kind] == 0:
                continue
            cursor = conn.execute(
                "SELECT row_id, size FROM outbox WHERE kind = ? ORDER BY row_id", (kind,)
            )
            for row_id, row_size in cursor:
                victims.append((row_id, kind, row_size))
                rows_over -= 1
                bytes_over -= row_size
                if rows_over <= 0 and bytes_over <= 0:
                    break
            cursor.close()
        return victims

    def _live(self) -> sqlite3.Connection:
        if self._conn is None:
            raise OutboxError(f"the outbox {self.path} is closed; open a new Outbox to use it")
        return self._conn

    @contextlib.contextmanager
    def _errors(self, doing: str) -> Iterator[None]:
        """Translate SQLite failures into OutboxError, in one place."""
        try:
            yield
        except sqlite3.Error as exc:
            raise OutboxError(
                f"could not {doing} in the outbox {self.path}: {exc} ({exc.sqlite_errorname}); check the disk (space, permissions, errors) and restart the agent, which checks the file at start-up"
            ) from exc


def _check_message(topic: str, kind: str, qos: int, properties: dict[str, Any] | None) -> str:
    """Validate a put's arguments; return the properties as compact JSON."""
    if kind not in KINDS:
        raise ValueError(f"unknown outbox kind {kind!r}; use one of {', '.join(KINDS)}")
    if qos not in (0, 1, 2):
        raise ValueError(f"MQTT QoS must be 0, 1 or 2, not {qos!r}")
    if not topic:
        raise ValueError("an outbox message needs a topic")
    try:
        return json.dumps(properties or {}, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(
            f"outbox properties must be JSON-serialisable (bytes as hex strings): {exc}"
        ) from exc


def _row_values(message: OutboxMessage, props_json: str) -> tuple[Any, ...]:
    return (
        message.message_id,
        message.topic,
        message.payload,
        message.qos,
        int(message.retain),
        message.kind,
        props_json,
        message.created_at,
        message.size,
    )


def _as_kind(value: str) -> Kind:
    for kind in KINDS:
        if kind == value:
            return kind
    raise OutboxError(
        f"the outbox holds a message of unknown kind {value!r}, written by another agent version; move the outbox file aside and restart"
    )


def _message(row: tuple[Any, ...]) -> OutboxMessage:
    row_id, message_id, topic, payload, qos, retain, kind, properties, created_at, size = row
    return OutboxMessage(
        row_id=row_id,
        message_id=message_id,
        topic=topic,
        payload=bytes(payload),
        qos=qos,
        retain=bool(retain),
        kind=_as_kind(kind),
        properties=json.loads(properties),
        created_at=created_at,
        size=size,
    )


def _open_checked(path: Path, synchronous: Synchronous) -> sqlite3.Connection:
    """Open and check the outbox file; move a corrupt one aside and start afresh."""
    try:
        return _open(path, synchronous)
    except (sqlite3.DatabaseError, _CorruptFileError) as exc:
        code = getattr(exc, "sqlite_errorcode", sqlite3.SQLITE_CORRUPT) & 0xFF
        if code not in _CORRUPT_CODES:
            raise _open_error(path, exc) from exc
        moved_to = _move_aside(path)
        log.error(
            "the MQTT outbox %s is corrupt (%s); moved it to %s and started an empty outbox. "
            "Messages in it were not delivered: inspect the copy with sqlite3, then delete it",
            path,
            exc,
            moved_to,
        )
    try:
        return _open(path, synchronous)
    except (sqlite3.DatabaseError, _CorruptFileError) as exc:
        raise _open_error(path, exc) from exc


def _open(path: Path, synchronous: Synchronous) -> sqlite3.Connection:
    # isolation_level=None: autocommit, transactions are begun explicitly where needed.
    conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False, timeout=5.0)
    try:
        conn.execute("PRAGMA locking_mode = EXCLUSIVE")
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode != "wal":
            raise sqlite3.OperationalError(f"journal_mode is {mode}, WAL is not available here")
        conn.execute(f"PRAGMA synchronous = {synchronous}")
        conn.execute(f"PRAGMA journal_size_limit = {_WAL_SIZE_LIMIT}")
        problems = [row[0] for row in conn.execute("PRAGMA quick_check")]
        if problems != ["ok"]:
            raise _CorruptFileError("; ".join(problems[:5]))
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise OutboxError(
                f"the outbox {path} has schema version {version}, newer than this agent's {SCHEMA_VERSION}; run the newer agent, or move the file aside to start an empty outbox"
            )
        conn.executescript(_SCHEMA + f"PRAGMA user_version = {SCHEMA_VERSION};")
    except BaseException:
        conn.close()
        raise
    return conn


def _move_aside(path: Path) -> Path:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = path.with_name(f"{path.name}.corrupt-{stamp}")
    serial = 1
    while target.exists():
        target = path.with_name(f"{path.name}.corrupt-{stamp}-{serial}")
        serial += 1
    for suffix in ("", "-wal", "-shm"):
        source = path.with_name(path.name + suffix)
        if source.exists():
            source.rename(target.with_name(target.name + suffix))
    return target


def _open_error(path: Path, exc: BaseException) -> OutboxError:
    if isinstance(exc, OutboxError):
        return exc
    if getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_BUSY:
        return OutboxError(
            f"the outbox {path} is held by another process (another edge-agent?); stop it, or give this agent its own outbox path"
        )
    return OutboxError(
        f"cannot open the outbox {path}: {exc}; check that its directory exists and is writable and that the disk has space"
    )
