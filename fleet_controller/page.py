"""The fleet page at `/fleet` and the one JSON view of the fleet it reads (`overview`).

The page is three static files from `fleet_controller/static/` (HTML, CSS, script): it holds no
data and needs no token to load. In the browser it asks for an API token, keeps it in the tab's
session storage, and calls the JSON API with `Authorization: Bearer`. Nothing comes from another
origin (the plant may have no internet), so the Content-Security-Policy allows same-origin script,
style and `fetch` only, no inline code at all (`PAGE_HEADERS`); the page must not be framed and is
never sniffed. docs/fleet.md "Fleet page" describes what it shows.

`overview` is pure: from the registry's boxes it counts boxes per model version (online and
offline), lists the values each filter can take, and returns one page of boxes, offline first, so
that a fleet of 10,000 boxes is summarised without sending every box to a phone.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from importlib import resources
from typing import Any, Literal

from fastapi import FastAPI
from fastapi.responses import Response

from fleet_controller.registry import Device, DeviceFilter

BoxState = Literal["all", "online", "offline"]
#: The most boxes one overview page lists.
MAX_PAGE = 500

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


def overview(
    devices: Sequence[Device],
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
    picked = [d for d in devices if selector is None or selector.matches(d)]
    online = sum(1 for d in picked if d.online)
    listed = [
        d
        for d in picked
        if (state == "all" or d.online == (state == "online")) and query.lower() in d.ref.lower()
    ]
    listed.sort(key=lambda d: (d.online, d.site, d.device))
    limit = max(1, min(limit, MAX_PAGE))
    return {
        "fleet": len(devices),
        "total": len(picked),
        "online": online,
        "offline": len(picked) - online,
        "versions": _versions(picked),
        "facets": _facets(devices),
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
