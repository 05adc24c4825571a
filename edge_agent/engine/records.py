"""Request records: each prediction's image and answer, kept for a bounded time and space.

Feedback from a technician, an explanation streamed later, or an operator's question ("what did
the box say about that part?") refer to a request by its id. Records live on disk under the state
directory (`ID.json` for the answer, `ID.img` for the uploaded bytes), written off the request
path, each file atomically. The oldest go first when the age, count or byte limit is reached; the
index is rebuilt from disk at start-up, so records survive a restart.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_bundle.files import write_atomically

log = logging.getLogger(__name__)

REQUEST_ID = re.compile(r"^[0-9a-f]{32}$")


@dataclass
class _Entry:
    created: float
    size: int


class RequestRecords:
    """A bounded on-disk store of recent requests, safe to call from several threads."""

    def __init__(
        self, directory: Path, *, max_age_s: float, max_bytes: int, max_count: int
    ) -> None:
        self.directory = directory
        self.max_age_s = max_age_s
        self.max_bytes = max_bytes
        self.max_count = max_count
        self._index: OrderedDict[str, _Entry] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        if self.enabled:
            directory.mkdir(parents=True, exist_ok=True)
            self._load_index()

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0 and self.max_count > 0 and self.max_age_s > 0

    def __len__(self) -> int:
        return len(self._index)

    @property
    def total_bytes(self) -> int:
        return self._bytes

    def put(self, request_id: str, record: dict[str, Any], image: bytes | None) -> None:
        """Store a record (and its image, unless it alone would break the byte limit)."""
        if not self.enabled:
            return
        _check_id(request_id)
        body = json.dumps(record, separators=(",", ":")).encode()
        if image is not None and len(image) + len(body) > self.max_bytes:
            image = None
        size = len(body) + (len(image) if image is not None else 0)
        try:
            if image is not None:
                write_atomically(self.directory / f"{request_id}.img", image, durable=False)
            write_atomically(
                self.directory / f"{request_id}.json", body, durable=False
            )  # last: its presence is the record
        except OSError as exc:
            log.warning("could not keep request %s: %s", request_id, exc)
            self._delete_files(request_id)
            return
        with self._lock:
            replaced = self._index.pop(request_id, None)
            if replaced is not None:
                self._bytes -= replaced.size
            self._index[request_id] = _Entry(time.time(), size)
            self._bytes += size
            self._prune_locked(time.time())

    def get(self, request_id: str) -> dict[str, Any] | None:
        if not REQUEST_ID.match(request_id) or request_id not in self._index:
            return None
        try:
            loaded: dict[str, Any] = json.loads(
                (self.directory / f"{request_id}.json").read_bytes()
            )
        except (OSError, ValueError):
            return None
        return loaded

    def image(self, request_id: str) -> bytes | None:
        if not REQUEST_ID.match(request_id) or request_id not in self._index:
            return None
        try:
            return (self.directory / f"{request_id}.img").read_bytes()
        except OSError:
            return None

    def prune(self) -> None:
        with self._lock:
            self._prune_locked(time.time())

    def _prune_locked(self, now: float) -> None:
        while self._index:
            oldest_id, oldest = next(iter(self._index.items()))
            expired = now - oldest.created > self.max_age_s
            if not (expired or len(self._index) > self.max_count or self._bytes > self.max_bytes):
                return
            del self._index[oldest_id]
            self._bytes -= oldest.size
            self._delete_files(oldest_id)

    def _delete_files(self, request_id: str) -> None:
        for suffix in (".json", ".img"):
            (self.directory / f"{request_id}{suffix}").unlink(missing_ok=True)

    def _load_index(self) -> None:
        found = []
        for path in self.directory.glob("*.json"):
            request_id = path.stem
            if not REQUEST_ID.match(request_id):
                continue
            stat = path.stat()
            image = path.with_suffix(".img")
            size = stat.st_size + (image.stat().st_size if image.exists() else 0)
            found.append((stat.st_mtime, request_id, size))
        for leftover in self.directory.glob(".*.tmp"):
            leftover.unlink(missing_ok=True)
        for orphan in self.directory.glob("*.img"):  # a crash between the two writes
            if not orphan.with_suffix(".json").exists():
                orphan.unlink(missing_ok=True)
        for created, request_id, size in sorted(found):
            self._index[request_id] = _Entry(created, size)
            self._bytes += size
        self._prune_locked(time.time())


def _check_id(request_id: str) -> None:
    if not REQUEST_ID.match(request_id):
        raise ValueError(f"request id {request_id!r} is not 32 lowercase hex digits")
