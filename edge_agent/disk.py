"""Whether the disk under the agent's state directory is full, as writes find it and statvfs confirms.

Every durable write of the agent (the MQTT outbox, feedback, request records, bundle installs)
lands under `state_dir`. When one fails for want of space it tells the watch (`failed`), which
then reports the disk full until the free space has grown by at least the reserve since that
failure, or while the free space is under the reserve anyway. Readiness, telemetry and the
`lineside_disk_full` gauge read `full`; callers turn a disk-full `OSError` into `DiskFullError`
(507 over HTTP, `disk_full` over MQTT) with `raise_if_full`.
"""

from __future__ import annotations

import errno
import logging
import os
import sqlite3
import threading
from pathlib import Path

from edge_agent.errors import DiskFullError

log = logging.getLogger(__name__)

#: The errnos of a full disk (space, or the user's quota).
FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def is_disk_full(exc: BaseException) -> bool:
    """True for an OSError (or an SQLite error) that says the disk is full, at any cause depth."""
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            return False
        if isinstance(seen, OSError) and seen.errno in FULL_ERRNOS:
            return True
        if (
            isinstance(seen, sqlite3.Error)
            and getattr(seen, "sqlite_errorcode", 0) & 0xFF == sqlite3.SQLITE_FULL
        ):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


class DiskWatch:
    """The state directory's free space and the last write that found the disk full."""

    def __init__(self, path: Path, *, reserve_bytes: int) -> None:
        self.path = path
        self.reserve_bytes = reserve_bytes
        self._lock = threading.Lock()
        self._failed_with_free: int | None = None  # free bytes when a write last failed
        self._failed_doing = ""

    def free_bytes(self) -> int | None:
        """Bytes an unprivileged writer may still use there (None when it cannot be read)."""
        path = self.path
        while not path.exists() and path != path.parent:
            path = path.parent
        try:
            stats = os.statvfs(path)
        except OSError:
            return None
        return stats.f_bavail * stats.f_frsize

    def failed(self, doing: str) -> None:
        """A write (`doing`, e.g. "store an MQTT answer") failed because the disk is full."""
        free = self.free_bytes()
        with self._lock:
            if self._failed_with_free is None:
                log.error("the disk under %s is full: could not %s", self.path, doing)
            self._failed_with_free = free or 0
            self._failed_doing = doing

    def full(self) -> bool:
        """Whether the disk counts as full now (clears itself once space has come back)."""
        free = self.free_bytes()
        if free is None:
            return False
        with self._lock:
            if free < self.reserve_bytes:
                return True
            if self._failed_with_free is None:
                return False
            if free >= self._failed_with_free + self.reserve_bytes:
                log.warning("the disk under %s has space again (%d bytes free)", self.path, free)
                self._failed_with_free = None
                return False
            return True

    def reason(self) -> str:
        """What readiness says while the disk is full."""
        free = self.free_bytes()
        doing = f" (could not {self._failed_doing})" if self._failed_doing else ""
        return (
            f"disk_full: {free if free is not None else '?'} bytes free under {self.path}{doing}; "
            "free space there (old request records, feedback already forwarded, logs)"
        )

    def raise_if_full(self, exc: BaseException, doing: str) -> None:
        """Raise `DiskFullError` (507) from `exc` when it is a disk-full error; else return."""
        if not is_disk_full(exc):
            return
        self.failed(doing)
        raise DiskFullError(
            f"could not {doing}: the disk of the agent's state directory is full; free space "
            "there and send it again",
            retry_after_s=30,
        ) from exc
