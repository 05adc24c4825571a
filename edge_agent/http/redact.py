"""Keeping the box's file system out of what HTTP clients are told.

Messages written for the operator at the console (`edge-agent install`, the log) name files by
their absolute path; over HTTP the same message names a file under the state directory relative
to it (`<state_dir>/store/...`) and any other server path by its last component only. A route
can name a file more helpfully for the request at hand (`redact_as`: the temporary file of an
upload is "the uploaded bundle").
"""

from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path

from fastapi import Request

#: An absolute path of two or more components, as it appears inside a sentence.
_ABSOLUTE = re.compile(r"(?<![\w.~/-])/(?:[\w.@+~-]+/)+[\w.@+~-]*")
#: Top-level directories of a Linux file system: a path under one is the server's, not a route.
_SYSTEM_ROOTS = frozenset(
    [
        "bin",
        "boot",
        "data",
        "dev",
        "etc",
        "home",
        "lib",
        "lib64",
        "media",
        "mnt",
        "nix",
        "opt",
        "proc",
        "root",
        "run",
        "sbin",
        "snap",
        "srv",
        "sys",
        "tmp",
        "usr",
        "var",
        "work",
    ]
)


def redact_as(request: Request, path: Path, name: str) -> None:
    """Call `path` `name` in the error messages of this request."""
    names: dict[str, str] = getattr(request.state, "redactions", {})
    names[str(path)] = name
    request.state.redactions = names


def public_message(message: str, request: Request) -> str:
    """`message` without absolute server paths: named as the route asked, else shortened."""
    for path, name in getattr(request.state, "redactions", {}).items():
        message = message.replace(path, name)
    state_dirs = _state_dirs(request)
    others = tuple(_as_prefix(root) for root in (tempfile.gettempdir(), sys.prefix, Path.home()))

    def shorten(match: re.Match[str]) -> str:
        path = match.group(0)
        for root in state_dirs:
            if path.startswith(root):
                return "<state_dir>/" + path.removeprefix(root)
        if path.split("/", 2)[1] in _SYSTEM_ROOTS or path.startswith(others):
            return "…/" + path.rstrip("/").rsplit("/", 1)[-1]
        return path

    return _ABSOLUTE.sub(shorten, message)


def _state_dirs(request: Request) -> tuple[str, ...]:
    device = getattr(request.app.state, "device", None)
    state_dir = getattr(getattr(device, "settings", None), "state_dir", None)
    if not isinstance(state_dir, Path):
        return ()
    return tuple({_as_prefix(state_dir), _as_prefix(state_dir.resolve())})


def _as_prefix(path: str | Path) -> str:
    return str(path).rstrip("/") + "/"
