"""The fleet page at `/fleet` and the one JSON view of the fleet it reads (`overview`).

The page is three static files from `fleet_controller/static/` (HTML, CSS, script): it holds no
data and needs no token to load. In the browser it asks for an API token, keeps it in the tab's
session storage, and calls the JSON API with `Authorization: Bearer`. Nothing comes from another
origin (the plant may have no internet), so the Content-Security-Policy allows same-origin script,
style and `fetch` only, no inline code at all (`PAGE_HEADERS`); the page must not be framed and is
never sniffed. docs/fleet.md "Fleet page" describes what it shows.

`overview` is pure: from the registry's boxes it counts boxes per model version (online and
offline), lists the values each filter can take, and returns one page of boxes, offline first, so
that a fleet of 10,000 boxes is summarised without sending every box to a phone. What does not
depend on the request (reading and decoding every box, their order, the filters' values) is done
once per `Snapshot`, and `Snapshots` shares one snapshot between the requests of the next
`OVERVIEW_MAX_AGE_S` (one read at a time; the others wait for it): the page refreshes every 5 s,
so several operators' pages, or one page's several calls, cost one read of the registry, and the
view is at most that old (`as_of` says when it was read), or, while the next read runs behind it,
a little older: a request is never kept waiting for a read it does not need (`Snapshots`). That read is of the boxes changed
since the one before (`devices.changed_at`, stamped when something shown here changes), with
every box read again each `FULL_READ_EVERY_S`: a box's `last_seen` alone, which moves with every
message, is at most that old in the list.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from importlib import resources
from typing import Any, Literal

from fastapi import FastAPI
from fastapi.responses import Response

from fleet_controller.registry import Device, DeviceFilter

log = logging.getLogger(__name__)

BoxState = Literal["all", "online", "offline"]
#: The most boxes one overview page lists.
MAX_PAGE = 500
#: How old the registry read behind an overview may be (the page refreshes every 5 s).
OVERVIEW_MAX_AGE_S = 1.0
#: How often the overview reads every box again, not only those changed since its last read.
FULL_READ_EVERY_S = 60.0
#: Up to how old a snapshot is still answered at once while the next one is read behind it.
OVERVIEW_STALE_S = 30.0

CONTENT_SECURITY_POLICY = "; ".join(
    (
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    )
)
PAGE_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
#: URL path -> (file in static/, media type).
FILES = {
    "/fleet": ("fleet.html", "text/html; charset=utf-8"),
    "/fleet/fleet.css": ("fleet.css", "text/css; charset=utf-8"),
    "/fleet/fleet.js": ("fleet.js", "text/javascript; charset=utf-8"),
}


def add_fleet_page(app: FastAPI) -> None:
    """Serve the page's static files on `app` (read once, here), each with `PAGE_HEADERS`."""
    static = resources.files("fleet_controller") / "static"
    for path, (name, media_type) in FILES.items():
        _serve(app, path, (static / name).read_bytes(), media_type)


def _serve(app: FastAPI, path: str, body: bytes, media_type: str) -> None:
    def static_file() -> Response:
        return Response(body, media_type=media_type, headers=PAGE_HEADERS)

    app.add_api_route(path, static_file, methods=["GET"], include_in_schema=False)


@dataclass(frozen=True)
class Snapshot:
    """Every box, offline first then by ref, the filters' values, and when they were read."""

    devices: tuple[Device, ...]
    facets: dict[str, list[str]]
    as_of: datetime
    #: The whole fleet's online count and versions (the page's unfiltered view), made once.
    online: int = 0
    versions: tuple[dict[str, Any], ...] = ()

    @classmethod
    def of(cls, devices: Sequence[Device]) -> Snapshot:
        ordered = tuple(sorted(devices, key=lambda d: (d.online, d.site, d.device)))
        return cls(
            ordered,
            _facets(ordered),
            datetime.now(UTC),
            online=sum(1 for d in ordered if d.online),
            versions=tuple(_versions(ordered)),
        )


#: Reads the boxes changed at or after a time (all of them for None), and the newest change.
ReadChanged = Callable[[datetime | None], tuple[Sequence[Device], datetime | None]]


class Snapshots:
    """One `Snapshot` at a time, thread-safe, read again once older than `max_age_s`.

    A request never waits for a read while the snapshot is younger than `stale_s`: it gets the
    current one, and a background thread reads the next (one at a time). Only a first request,
    or one after `stale_s` without any, reads while it waits. So the page's requests cost their
    own answer, not the registry read, and a snapshot is read only while someone looks.

    After the first read of every box, a new snapshot reads only the boxes whose rows changed
    since the newest change already seen (less `OVERLAP_S`, for transactions that commit a
    little after they stamped), and every `full_every_s` all of them again (a controller whose
    clock lags more than the overlap, a box removed, `last_seen`): at 10,000 boxes, telemetry
    that repeats itself changes nothing, and a rollout changes the boxes it moves."""

    OVERLAP_S = 5.0

    def __init__(
        self,
        read: ReadChanged,
        max_age_s: float = OVERVIEW_MAX_AGE_S,
        clock: Callable[[], float] = time.monotonic,
        *,
        full_every_s: float = FULL_READ_EVERY_S,
        stale_s: float = OVERVIEW_STALE_S,
        background: bool = True,
    ) -> None:
        self.read = read
        self.max_age_s = max_age_s
        self.clock = clock
        self.full_every_s = full_every_s
        self.stale_s = max(stale_s, max_age_s)
        self.background = background
        self._lock = threading.Lock()  # guards _current and _reading
        self._read_lock = threading.Lock()  # one registry read at a time
        self._current: tuple[float, Snapshot] | None = None
        self._reading = False
        self._boxes: dict[str, Device] = {}
        self._newest: datetime | None = None
        self._full_at: float | None = None

    def get(self) -> Snapshot:
        now = self.clock()
        with self._lock:
            current = self._current
            if current is not None and now - current[0] <= self.max_age_s:
                return current[1]
            if current is not None and now - current[0] <= self.stale_s and self.background:
                if not self._reading:
                    self._reading = True
                    threading.Thread(
                        target=self._read_in_background, name="overview-snapshot", daemon=True
                    ).start()
                return current[1]
        return self._read_now()

    def _read_in_background(self) -> None:
        try:
            self._read_now()
        except Exception:  # the next request reads again (and raises to its caller)
            log.exception("reading the fleet overview's snapshot failed")
        finally:
            with self._lock:
                self._reading = False

    def _read_now(self) -> Snapshot:
        with self._read_lock:
            now = self.clock()
            with self._lock:
                if self._current is not None and now - self._current[0] <= self.max_age_s:
                    return self._current[1]  # read meanwhile by another request
            snapshot = Snapshot.of(self._refresh(now))
            with self._lock:
                self._current = (now, snapshot)
            return snapshot

    def _refresh(self, now: float) -> Sequence[Device]:
        since: datetime | None = None
        if (
            self._full_at is not None
            and self._newest is not None
            and now - self._full_at <= self.full_every_s
        ):
            since = self._newest - timedelta(seconds=self.OVERLAP_S)
        full = since is None
        devices, newest = self.read(since)
        if full:
            self._boxes = {device.ref: device for device in devices}
            self._full_at = now
        else:
            self._boxes.update((device.ref, device) for device in devices)
        if newest is not None and (self._newest is None or newest > self._newest):
            self._newest = newest
        return list(self._boxes.values())


def overview(
    devices: Sequence[Device] | Snapshot,
    selector: DeviceFilter | None = None,
    *,
    state: BoxState = "all",
    query: str = "",
    offset: int = 0,
    limit: int = 50,
) -> dict[str, Any]:
    """The fleet at a glance: boxes per model version among those `selector` picks, the filters'
    possible values over the whole fleet, and boxes `offset`.. of those picked (narrowed further
    by online `state` and a `query` substring of their ref), offline first."""
    snapshot = devices if isinstance(devices, Snapshot) else Snapshot.of(devices)
    everyone = snapshot.devices
    picked = everyone if selector is None else [d for d in everyone if selector.matches(d)]
    online = snapshot.online if selector is None else sum(1 for d in picked if d.online)
    needle = query.lower()
    listed = [
        d
        for d in picked
        if (state == "all" or d.online == (state == "online"))
        and (not needle or needle in d.ref.lower())
    ]
    limit = max(1, min(limit, MAX_PAGE))
    return {
        "fleet": len(everyone),
        "as_of": snapshot.as_of.isoformat(),
        "total": len(picked),
        "online": online,
        "offline": len(picked) - online,
        "versions": list(snapshot.versions) if selector is None else _versions(picked),
        "facets": snapshot.facets,
        "boxes": {
            "count": len(listed),
            "offset": offset,
            "limit": limit,
            "items": [_box(d) for d in listed[offset : offset + limit]],
        },
    }


def _versions(devices: Sequence[Device]) -> list[dict[str, Any]]:
    boxes: Counter[tuple[str, int | None]] = Counter()
    offline: Counter[tuple[str, int | None]] = Counter()
    for device in devices:
        for name, model in device.models.items():
            key = (name, model.version)
            boxes[key] += 1
            offline[key] += 0 if device.online else 1
    return [
        {
            "model": name,
            "version": version,
            "boxes": count,
            "online": count - offline[(name, version)],
            "offline": offline[(name, version)],
        }
        for (name, version), count in sorted(
            boxes.items(), key=lambda item: (item[0][0], -(item[0][1] or 0))
        )
    ]


def _facets(devices: Sequence[Device]) -> dict[str, list[str]]:
    return {
        "site": sorted({d.site for d in devices}),
        "line": sorted({d.line for d in devices if d.line}),
        "group": sorted({g for d in devices for g in d.groups}),
        "profile": sorted({d.profile for d in devices if d.profile}),
    }


def _box(device: Device) -> dict[str, Any]:
    return {
        "ref": device.ref,
        "online": device.online,
        "line": device.line,
        "profile": device.profile,
        "agent_version": device.agent_version,
        "ready": device.ready,
        "models": {name: model.version for name, model in sorted(device.models.items())},
        "last_seen": device.last_seen.isoformat() if device.last_seen else None,
    }
