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

Recent messages. What was stored lately is also kept in memory (`RECENT_MAX_MESSAGES`,
`RECENT_MAX_BYTES`), in row order, until the broker acknowledges it: while the link keeps
up, `pending()` is answered from there, without a query, which is how a reply goes straight from
its commit to the wire. Older rows (after a reconnect, or a backlog larger than the bound) are
read from the file as before.

Threads. One connection (check_same_thread=False) behind one lock: SQLite admits one writer at a
time anyway, so per-thread connections would only add busy retries, and the eviction choice, the
insert and the in-memory totals must change together in one critical section.

Checkpoints. Copying the WAL back into the main file costs two fsyncs (8-16 ms on a VM's disk).
SQLite's automatic checkpoint would run them inside whichever commit crossed 1,000 pages: about
every 100th MQTT reply, on the event loop, where a reply is committed, stalling every request in
flight. So it is off, and the outbox's own thread (`outbox-checkpoint`) runs the checkpoint once
about `CHECKPOINT_PAGES` were written since the last one, holding the lock like any writer. While
it runs, `checkpointing` is True: callers on the event loop (the reply commit, the link's publish
and delete) check it and go to a thread or wait for the `after_checkpoint` callbacks instead of
blocking on the lock. A checkpoint that fails (a full disk) is tried again after
`CHECKPOINT_RETRY_S`; the WAL only grows meanwhile, as it would have anyway.

Answered messages. Beside the rows, the file remembers which incoming messages were answered
(`answered`: a dedupe key, a digest of the message, and copies of the answers with their
message_ids), written in the same transaction as the answers themselves (`put_many(answered=)`).
A redelivered message is then recognised (`recall`) and answered again with the very same
messages instead of being computed twice, even across a restart. Entries older than the window
or beyond its count are pruned as new ones arrive.

Disk full. A write that fails because the disk is full raises `OutboxDiskFullError` (an
`OutboxError`), so callers can keep the incoming message unacknowledged and try again later.

Corruption. At open the file is checked (`PRAGMA quick_check`); a file SQLite reports as corrupt
or not a database is moved aside to `PATH.corrupt-<UTC time>` (with its -wal/-shm), an error is
logged, and a fresh outbox is created so the agent keeps running.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import json
import logging
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, get_args

from edge_agent import faults

log = logging.getLogger(__name__)

Kind = Literal["reply", "result", "feedback", "update", "telemetry"]
Synchronous = Literal["FULL", "NORMAL"]
KINDS: tuple[Kind, ...] = get_args(Kind)
DROP_ORDER: tuple[Kind, ...] = ("telemetry", "reply", "update", "feedback", "result")

SCHEMA_VERSION = 2
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
CREATE INDEX IF NOT EXISTS outbox_by_message ON outbox (message_id);
CREATE TABLE IF NOT EXISTS answered (
    key TEXT PRIMARY KEY,
    digest TEXT NOT NULL,
    answers TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS answered_by_age ON answered (created_at);
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
#: Stored messages also kept in memory for `pending()` (see "Recent messages").
RECENT_MAX_MESSAGES = 256
RECENT_MAX_BYTES = 8 * 1024 * 1024
#: Row ids per DELETE statement of `ack_many` (SQLite's bound on a statement's parameters).
ACK_BATCH = 500
# After a checkpoint SQLite truncates the WAL to this size, so a burst does not leave a big file.
_WAL_SIZE_LIMIT = 4 * 1024 * 1024
#: The checkpoint thread copies the WAL into the main file once about this many pages were
#: written since the last time (SQLite's own automatic threshold, which is turned off).
CHECKPOINT_PAGES = 1000
#: How long the checkpoint thread waits after a failed checkpoint before it tries again.
CHECKPOINT_RETRY_S = 5.0
_PAGE_BYTES = 4096  # SQLite's default page size, for the estimate of pages a commit writes
# Pages a commit writes besides its rows' bytes (measured: a reply with its identity and the
# delete its PUBACK brings wrote 10.4 WAL frames, against 4 + 3 + 3 here).
_PAGES_PER_INSERT = 4  # the table's leaf, its two indexes' leaves, the row id sequence
_PAGES_PER_DELETE = 3  # the table's leaf and its two indexes' leaves
_PAGES_PER_ANSWERED = 3  # the identity's leaf, its key's index and its age index


class OutboxError(Exception):
    """The outbox cannot do what was asked; the message says why and what to do."""


class OutboxFullError(OutboxError):
    """A single message is larger than the whole outbox may hold."""


class OutboxDiskFullError(OutboxError):
    """The disk under the outbox is full: nothing was stored; try again once there is space."""


class _CorruptFileError(Exception):
    """Internal: the file failed its integrity check."""


@dataclass(frozen=True)
class OutboxMessage:
    """One stored message, as the MQTT link publishes it."""

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
class Draft:
    """A message to store: `put_many` takes these."""

    topic: str
    payload: bytes
    kind: Kind
    message_id: str
    properties: dict[str, Any] = field(default_factory=dict)
    qos: int = 1
    retain: bool = False


@dataclass(frozen=True)
class Answered:
    """An incoming message's dedupe key and the digest of what it carried."""

    key: str
    digest: str


@dataclass(frozen=True)
class Recalled:
    """What was answered to an earlier copy of a message, and whether that copy was the same."""

    digest: str
    answers: tuple[Draft, ...]
    created_at: float


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
        answered_window_s: float = 3600.0,
        answered_max: int = 10_000,
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
        #: The connection's synchronous mode now: switched only when a commit needs another one
        #: (a run of replies and acks stays NORMAL without two PRAGMAs each, ~25 us).
        self._sync_now: str | None = synchronous
        self.answered_window_s = answered_window_s
        self.answered_max = answered_max
        self._answered_puts = 0
        self._lock = threading.Lock()
        self._count = dict.fromkeys(KINDS, 0)
        self._bytes = dict.fromkeys(KINDS, 0)
        self._dropped = dict.fromkeys(KINDS, 0)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._conn: sqlite3.Connection | None = _open_checked(path, synchronous)
        self._answered_keys: set[str] = set()
        # Every row stored with a row id above `_recent_after` is in `_recent` unless deleted.
        self._recent: dict[int, OutboxMessage] = {}
        self._recent_bytes = 0
        self._recent_after = 0
        #: True while the checkpoint thread holds the lock (see "Checkpoints").
        self.checkpointing = False
        #: Called (on the checkpoint thread) after each checkpoint: what waited for it goes on.
        self.after_checkpoint: list[Callable[[], None]] = []
        #: Checkpoints done (and failed) by the checkpoint thread since the outbox was opened.
        self.checkpoints = 0
        self.checkpoint_failures = 0
        self._pages = 0  # about how many pages were written since the last checkpoint
        self._checkpoint_due = threading.Event()
        self._closing = threading.Event()
        self._checkpointer: threading.Thread | None = None
        try:
            with self._errors("load the outbox totals"):
                self._answered_keys = {
                    row[0] for row in self._conn.execute("SELECT key FROM answered")
                }
                for kind, count, size in self._conn.execute(
                    "SELECT kind, COUNT(*), SUM(size) FROM outbox GROUP BY kind"
                ):
                    self._count[_as_kind(kind)] = count
                    self._bytes[_as_kind(kind)] = size
                row = self._conn.execute(
                    "SELECT seq FROM sqlite_sequence WHERE name = 'outbox'"
                ).fetchone()
                self._recent_after = int(row[0]) if row is not None else 0
        except BaseException:
            self.close()  # release the file lock for whoever fixes the problem
            raise
        self._checkpointer = threading.Thread(
            target=self._checkpoints, name="outbox-checkpoint", daemon=True
        )
        self._checkpointer.start()

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
        draft = Draft(
            topic,
            payload,
            kind,
            message_id or uuid.uuid4().hex,
            properties or {},
            qos,
            retain,
        )
        return self.put_many([draft], fsync=fsync)[0]

    def put_many(
        self,
        drafts: list[Draft],
        *,
        answered: Answered | None = None,
        fsync: bool | None = None,
    ) -> list[PutResult]:
        """Store messages in one transaction, and remember `answered` with them when given.

        All or nothing: a failure stores none of them. `fsync` defaults to False only when every
        draft is a "reply" (see `put`). A draft larger than the whole outbox raises
        `OutboxFullError` before anything is written.
        """
        if fsync is None:
            fsync = any(d.kind != "reply" for d in drafts)
        prepared: list[tuple[OutboxMessage, str]] = []
        now = time.time()
        for draft in drafts:
            props_json = _check_message(draft.topic, draft.kind, draft.qos, draft.properties)
            size = len(draft.payload) + len(draft.topic.encode()) + len(props_json.encode())
            if size > self.max_bytes:
                raise OutboxFullError(
                    f"a {draft.kind} message of {size} bytes on {draft.topic!r} is larger than the whole outbox ({self.max_bytes} bytes); send less (e.g. a reference instead of the image) or raise the outbox byte limit"
                )
            message = OutboxMessage(
                row_id=0,
                message_id=draft.message_id,
                topic=draft.topic,
                payload=bytes(draft.payload),
                qos=draft.qos,
                retain=draft.retain,
                kind=draft.kind,
                properties=json.loads(props_json),
                created_at=now,
                size=size,
            )
            prepared.append((message, props_json))
        results: list[PutResult] = []
        with self._lock, self._errors("store a message"):
            conn = self._live()
            faults.hit("outbox.put")
            self._sync(conn, self._synchronous if fsync else "NORMAL")
            conn.execute("BEGIN IMMEDIATE")
            try:
                count = dict(self._count)
                sizes = dict(self._bytes)
                chosen: list[tuple[OutboxMessage, list[tuple[int, Kind, int]], int]] = []
                for message, props_json in prepared:
                    victims = self._choose_victims(conn, message.size, count, sizes)
                    conn.executemany(
                        "DELETE FROM outbox WHERE row_id = ?", [(v[0],) for v in victims]
                    )
                    cursor = conn.execute(_INSERT, _row_values(message, props_json))
                    assert cursor.lastrowid is not None
                    for _, victim_kind, victim_size in victims:
                        count[victim_kind] -= 1
                        sizes[victim_kind] -= victim_size
                    count[message.kind] += 1
                    sizes[message.kind] += message.size
                    chosen.append((message, victims, cursor.lastrowid))
                forgotten = (
                    self._remember(conn, answered, drafts, now) if answered is not None else []
                )
                conn.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):  # SQLite may have rolled back itself
                    conn.execute("ROLLBACK")
                raise
            # Totals change only once the commit has succeeded.
            all_dropped: dict[str, int] = {}
            for message, victims, row_id in chosen:
                dropped: dict[str, int] = {}
                for _, victim_kind, _size in victims:
                    self._dropped[victim_kind] += 1
                    dropped[victim_kind] = dropped.get(victim_kind, 0) + 1
                    all_dropped[victim_kind] = all_dropped.get(victim_kind, 0) + 1
                stored = replace(message, row_id=row_id)
                results.append(PutResult(stored, dropped))
                for victim_row, _kind, _size in victims:
                    self._forget(victim_row)
                self._recent[row_id] = stored
                self._recent_bytes += stored.size
            self._count = count
            self._bytes = sizes
            self._bound_recent()
            size = sum(message.size for message, _ in prepared)
            self._wrote(
                len(chosen) * _PAGES_PER_INSERT
                + sum(len(victims) for _, victims, _ in chosen) * _PAGES_PER_DELETE
                + (_PAGES_PER_ANSWERED + size // _PAGE_BYTES if answered is not None else 0)
                + size // _PAGE_BYTES
            )
            if answered is not None:
                self._answered_keys.add(answered.key)
                self._answered_keys.difference_update(forgotten)
        if all_dropped:
            log.warning("outbox full: dropped %s to store new messages", all_dropped)
        return results

    def fits(self, draft: Draft) -> bool:
        """Whether a draft is small enough to be stored at all (not larger than the outbox)."""
        props_json = _check_message(draft.topic, draft.kind, draft.qos, draft.properties)
        size = len(draft.payload) + len(draft.topic.encode()) + len(props_json.encode())
        return size <= self.max_bytes

    def might_have(self, key: str) -> bool:
        """False when nothing was answered under `key` (an in-memory check: no query, no lock);
        True means `recall` may find it."""
        return key in self._answered_keys

    def recall(self, key: str) -> Recalled | None:
        """What was answered under `key` within the window, or None."""
        with self._lock, self._errors("look up an answered message"):
            row = (
                self._live()
                .execute(
                    "SELECT digest, answers, created_at FROM answered WHERE key = ? AND created_at >= ?",
                    (key, time.time() - self.answered_window_s),
                )
                .fetchone()
            )
        if row is None:
            return None
        digest, answers, created_at = row
        return Recalled(digest, tuple(_draft(item) for item in json.loads(answers)), created_at)

    def holds(self, message_id: str) -> bool:
        """Whether a message with this id still waits for its PUBACK."""
        with self._lock, self._errors("look up a pending message"):
            row = (
                self._live()
                .execute("SELECT 1 FROM outbox WHERE message_id = ? LIMIT 1", (message_id,))
                .fetchone()
            )
        return row is not None

    def _remember(
        self, conn: sqlite3.Connection, answered: Answered, drafts: list[Draft], now: float
    ) -> list[str]:
        """Store `answered` in the open transaction; the keys a prune deleted with it (the
        in-memory set follows once the transaction commits)."""
        answers = json.dumps([_draft_json(d) for d in drafts], separators=(",", ":"))
        conn.execute(
            "INSERT OR REPLACE INTO answered (key, digest, answers, created_at) VALUES (?, ?, ?, ?)",
            (answered.key, answered.digest, answers, now),
        )
        self._answered_puts += 1
        if self._answered_puts % 64 == 1:  # prune now and then, not on every put
            return self._prune_answered(conn, now)
        return []

    def _prune_answered(self, conn: sqlite3.Connection, now: float) -> list[str]:
        """Delete identities older than the window, then the oldest beyond `answered_max`;
        their keys.

        Only the rows that go are read (by the age index): at 10,000 identities, reading all
        the keys back after each prune had cost 3 ms every 64th put."""
        cutoff = now - self.answered_window_s
        gone = [
            row[0]
            for row in conn.execute("SELECT key FROM answered WHERE created_at < ?", (cutoff,))
        ]
        (count,) = conn.execute("SELECT COUNT(*) FROM answered").fetchone()
        excess = count - len(gone) - self.answered_max
        if excess > 0:
            gone += [
                row[0]
                for row in conn.execute(
                    "SELECT key FROM answered WHERE created_at >= ? ORDER BY created_at LIMIT ?",
                    (cutoff, excess),
                )
            ]
        if gone:
            conn.executemany("DELETE FROM answered WHERE key = ?", ((key,) for key in gone))
        return gone

    def pending(self, after_row_id: int = 0, limit: int = 64) -> list[OutboxMessage]:
        """Up to `limit` rows with row_id > `after_row_id`, in arrival order."""
        if limit < 1:
            raise ValueError(f"pending() limit must be at least 1, not {limit}")
        with self._lock, self._errors("read pending messages"):
            conn = self._live()
            if after_row_id >= self._recent_after:  # all of them are in memory
                found = []
                for row_id, message in self._recent.items():
                    if row_id > after_row_id:
                        found.append(message)
                        if len(found) == limit:
                            break
                return found
            rows = conn.execute(_SELECT_PENDING, (after_row_id, limit)).fetchall()
        return [_message(row) for row in rows]

    def ack(self, row_id: int) -> None:
        """Delete a row the broker has acknowledged; acking a row that is gone does nothing."""
        self.ack_many([row_id])

    def ack_many(self, row_ids: Iterable[int]) -> None:
        """Delete rows the broker has acknowledged, in one statement (the PUBACKs of one read
        of the socket); rows already gone are skipped."""
        wanted = list(dict.fromkeys(row_ids))
        if not wanted:
            return
        with self._lock, self._errors("delete an acknowledged message"):
            conn = self._live()
            found: dict[int, tuple[Kind, int]] = {}
            for row_id in wanted:
                recent = self._recent.get(row_id)  # stored lately: no need to look it up
                if recent is not None:
                    found[row_id] = (recent.kind, recent.size)
                    continue
                row = conn.execute(
                    "SELECT kind, size FROM outbox WHERE row_id = ?", (row_id,)
                ).fetchone()
                if row is not None:
                    found[row_id] = (_as_kind(row[0]), row[1])
            if not found:
                return
            # A lost ack costs one more (deduplicated) delivery, so the delete is not fsynced on
            # its own; the next put's fsync covers it. One fsync per PUBACK would cap a backlog
            # flush at a few hundred messages a second.
            self._sync(conn, "NORMAL")
            ids = list(found)
            batches = [ids[start : start + ACK_BATCH] for start in range(0, len(ids), ACK_BATCH)]
            if len(batches) > 1:
                conn.execute("BEGIN IMMEDIATE")
            try:
                for batch in batches:
                    marks = ",".join("?" * len(batch))
                    conn.execute(f"DELETE FROM outbox WHERE row_id IN ({marks})", batch)  # noqa: S608
                if len(batches) > 1:
                    conn.execute("COMMIT")
            except BaseException:
                if len(batches) > 1:
                    with contextlib.suppress(sqlite3.Error):
                        conn.execute("ROLLBACK")
                raise
            count, sizes = dict(self._count), dict(self._bytes)
            for row_id, (kind, size) in found.items():
                count[kind] -= 1
                sizes[kind] -= size
                self._forget(row_id)
            self._count, self._bytes = count, sizes  # whole, for `depth()` without the lock
            self._wrote(len(found) * _PAGES_PER_DELETE)

    def depth(self) -> dict[str, Any]:
        """What is waiting, and what was dropped since this outbox was opened.

        Read without the lock, so a health check never waits for a commit's fsync or a
        checkpoint. Every commit replaces the totals whole (never one kind at a time), so
        `messages` and `by_kind` always describe a state some commit left; `bytes` and
        `dropped` may be one commit apart from them."""
        count, size = self._count, self._bytes
        return {
            "messages": sum(count.values()),
            "bytes": sum(size.values()),
            "by_kind": dict(count),
            "dropped": dict(self._dropped),
        }

    # ---- checkpoints ---------------------------------------------------------------------
    def checkpoint(self) -> bool:
        """Copy the WAL into the main file now; False when that failed (logged). The checkpoint
        thread calls this by itself once enough was written (see "Checkpoints")."""
        failed: Exception | None = None
        with self._lock:
            conn = self._conn
            if conn is None:
                return True
            self.checkpointing = True
            try:
                faults.hit("outbox.checkpoint")
                conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            except (sqlite3.Error, OSError) as exc:
                failed = exc
                self.checkpoint_failures += 1
            else:
                self._pages = 0
                self._checkpoint_due.clear()  # what commits asked for meanwhile is done too
                self.checkpoints += 1
            finally:
                self.checkpointing = False
        for callback in self.after_checkpoint:
            try:
                callback()
            except Exception:  # one waiter's bug must not stop the checkpoints
                log.exception("a callback after the outbox checkpoint failed")
        if failed is not None:
            log.warning(
                "could not checkpoint the outbox %s (%s); the WAL keeps growing until a "
                "checkpoint succeeds (next try in %.0f s): check the disk's space and health",
                self.path,
                failed,
                CHECKPOINT_RETRY_S,
            )
        return failed is None

    def _wrote(self, pages: int) -> None:
        """Count about the pages a commit wrote (under the lock), and wake the checkpoint
        thread when a checkpoint is due."""
        self._pages += pages
        if self._pages >= CHECKPOINT_PAGES and not self._checkpoint_due.is_set():
            self._checkpoint_due.set()

    def _checkpoints(self) -> None:
        """The checkpoint thread: a checkpoint each time one is due, until the outbox closes."""
        while not self._closing.is_set():
            self._checkpoint_due.wait()
            if self._closing.is_set():
                return
            if not self.checkpoint():
                self._checkpoint_due.clear()  # the next commit asks again
                self._closing.wait(CHECKPOINT_RETRY_S)

    def close(self) -> None:
        """Checkpoint the WAL into the main file and close; closing twice does nothing."""
        self._closing.set()
        self._checkpoint_due.set()
        thread = self._checkpointer
        if thread is not None and thread is not threading.current_thread():
            thread.join()
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

    def _choose_victims(
        self,
        conn: sqlite3.Connection,
        size: int,
        count: dict[Kind, int],
        sizes: dict[Kind, int],
    ) -> list[tuple[int, Kind, int]]:
        """The oldest rows, in drop order, whose removal lets a message of `size` fit (given the
        totals `count` and `sizes` of what the transaction holds so far)."""
        rows_over = sum(count.values()) + 1 - self.max_messages
        bytes_over = sum(sizes.values()) + size - self.max_bytes
        victims: list[tuple[int, Kind, int]] = []
        for kind in DROP_ORDER:
            if rows_over <= 0 and bytes_over <= 0:
                break
            if count[kind] == 0:
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

    def _forget(self, row_id: int) -> None:
        """A deleted row leaves the in-memory recent messages (under the lock)."""
        message = self._recent.pop(row_id, None)
        if message is not None:
            self._recent_bytes -= message.size

    def _bound_recent(self) -> None:
        """Keep the recent messages within their bounds: the oldest go back to being read from
        the file (under the lock)."""
        while self._recent and (
            len(self._recent) > RECENT_MAX_MESSAGES or self._recent_bytes > RECENT_MAX_BYTES
        ):
            row_id = next(iter(self._recent))
            self._forget(row_id)
            self._recent_after = row_id

    def _sync(self, conn: sqlite3.Connection, mode: str) -> None:
        """Set the synchronous mode of the next commit (under the lock)."""
        if self._sync_now != mode:
            self._sync_now = None  # unknown until the PRAGMA has run
            conn.execute(f"PRAGMA synchronous = {mode}")
            self._sync_now = mode

    def _live(self) -> sqlite3.Connection:
        if self._conn is None:
            raise OutboxError(f"the outbox {self.path} is closed; open a new Outbox to use it")
        return self._conn

    @contextlib.contextmanager
    def _errors(self, doing: str) -> Iterator[None]:
        """Translate SQLite failures into OutboxError, in one place."""
        try:
            yield
        except OSError as exc:  # only the fault injection raises these here
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise OutboxDiskFullError(
                    f"could not {doing} in the outbox {self.path}: the disk is full; free space "
                    "under the agent's state directory"
                ) from exc
            raise OutboxError(f"could not {doing} in the outbox {self.path}: {exc}") from exc
        except sqlite3.Error as exc:
            if _disk_full(exc):
                raise OutboxDiskFullError(
                    f"could not {doing} in the outbox {self.path}: the disk is full; free space "
                    "under the agent's state directory"
                ) from exc
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


def _disk_full(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", 0) & 0xFF
    if code == sqlite3.SQLITE_FULL:
        return True
    cause = exc.__cause__ or exc.__context__
    return isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT)


def _draft_json(draft: Draft) -> dict[str, Any]:
    return {
        "topic": draft.topic,
        "payload": base64.b64encode(draft.payload).decode(),
        "kind": draft.kind,
        "message_id": draft.message_id,
        "properties": draft.properties,
        "qos": draft.qos,
        "retain": draft.retain,
    }


def _draft(item: dict[str, Any]) -> Draft:
    return Draft(
        topic=item["topic"],
        payload=base64.b64decode(item["payload"]),
        kind=_as_kind(item["kind"]),
        message_id=item["message_id"],
        properties=item["properties"],
        qos=item["qos"],
        retain=item["retain"],
    )


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
        conn.execute("PRAGMA wal_autocheckpoint = 0")  # the checkpoint thread's work
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
