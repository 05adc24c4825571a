"""Resumable, bounded bundle downloads over HTTP(S).

The file grows as `NAME-VERSION-SHA.part` beside a small JSON note of where it came from and the
validator the server gave (ETag or Last-Modified). A restart resumes with a range request guarded
by `If-Range`, so content that changed on the server starts over instead of mixing two files. The
download aborts as soon as more bytes arrive than the notice declared, and the finished file must
have exactly the declared size and sha256. (A bundle fetched in chunks over MQTT grows in the same
`.part` file, with side files of its own: `chunk_files`; `discard` removes them too.)
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import httpx

from edge_agent import faults
from edge_agent.updater.machine import Release

CHUNK = 256 * 1024


class DownloadError(Exception):
    """A download failed; `retry` when trying again later can succeed (network, server busy)."""

    def __init__(self, message: str, *, retry: bool) -> None:
        super().__init__(message)
        self.retry = retry


@dataclass(frozen=True)
class Downloaded:
    path: Path
    resumed_from: int


def part_path(directory: Path, release: Release) -> Path:
    return directory / f"{release.name}-{release.version}-{release.sha256[:12]}.part"


def download(
    release: Release,
    directory: Path,
    *,
    timeout: float = 30.0,
    transport: httpx.BaseTransport | None = None,
) -> Downloaded:
    """Fetch `release.url` into `directory`, resuming a partial file; check size and sha256.
    `transport` replaces the network (an `httpx.MockTransport` in tests)."""
    if release.url is None:
        raise DownloadError(
            "the notice has no URL (its bundle comes only over MQTT); set update_fetch to "
            "'auto' or 'mqtt'",
            retry=False,
        )
    url = release.url
    directory.mkdir(parents=True, exist_ok=True)
    part = part_path(directory, release)
    note = part.with_suffix(".json")
    # A chunked fetch's record says nothing about what HTTP writes into the same file.
    part.with_suffix(".have").unlink(missing_ok=True)
    offset, validator = _resume_point(part, note, release)
    headers = {}
    if offset:
        headers["Range"] = f"bytes={offset}-"
        if validator:
            headers["If-Range"] = validator
    digest = hashlib.sha256()
    try:
        with (
            httpx.Client(transport=transport, timeout=timeout, follow_redirects=True) as client,
            client.stream("GET", url, headers=headers) as response,
        ):
            if response.status_code >= 500 or response.status_code == 429:
                raise DownloadError(f"the server answered {response.status_code}", retry=True)
            if response.status_code not in (200, 206):
                raise DownloadError(
                    f"the server answered {response.status_code} for {url}; check the URL "
                    "in the release notice",
                    retry=False,
                )
            if response.status_code == 200 or not _range_matches(response, offset):
                offset = 0  # no range support, or the content changed: start over
            _write_note(note, release, response)
            mode = "ab" if offset else "wb"
            if offset:
                _hash_prefix(part, offset, digest)
            with part.open(mode) as handle:
                if not offset:
                    handle.truncate(0)
                received = offset
                for chunk in response.iter_bytes():  # as received: a cut keeps what arrived
                    received += len(chunk)
                    if received > release.size:
                        raise DownloadError(
                            f"the server sent more than the {release.size:,} bytes the notice "
                            "declares; the download was aborted",
                            retry=False,
                        )
                    faults.hit("download.write")
                    handle.write(chunk)
                    digest.update(chunk)
                handle.flush()
                os.fsync(handle.fileno())
    except httpx.HTTPError as exc:
        raise DownloadError(f"the download from {url} failed: {exc}", retry=True) from exc
    except DownloadError as exc:
        if not exc.retry:
            _discard(part, note)
        raise
    if received != release.size:
        raise DownloadError(
            f"the download stopped at {received:,} of {release.size:,} bytes", retry=True
        )
    if digest.hexdigest() != release.sha256:
        _discard(part, note)
        raise DownloadError(
            "the downloaded file's sha256 does not match the release notice (a wrong or "
            "tampered file on the server)",
            retry=False,
        )
    return Downloaded(part, offset)


def discard(directory: Path, release: Release) -> None:
    """Remove a download and whatever was kept beside it (an HTTP note, a chunked fetch's
    manifest and record)."""
    part = part_path(directory, release)
    _discard(part, part.with_suffix(".json"))
    for suffix in (".manifest", ".have"):
        part.with_suffix(suffix).unlink(missing_ok=True)


def _resume_point(part: Path, note: Path, release: Release) -> tuple[int, str | None]:
    if not part.exists():
        return 0, None
    try:
        meta = json.loads(note.read_text())
    except (OSError, ValueError):
        return 0, None
    size = part.stat().st_size
    if meta.get("url") != release.url or size > release.size:
        return 0, None
    return size, meta.get("validator")


def _write_note(note: Path, release: Release, response: httpx.Response) -> None:
    validator = response.headers.get("etag") or response.headers.get("last-modified")
    note.write_text(json.dumps({"url": release.url, "validator": validator}))


def _range_matches(response: httpx.Response, offset: int) -> bool:
    content_range = str(response.headers.get("content-range", ""))
    return content_range.startswith(f"bytes {offset}-")


def _hash_prefix(part: Path, offset: int, digest: hashlib._Hash) -> None:
    with part.open("rb") as handle:
        remaining = offset
        while remaining:
            chunk = handle.read(min(CHUNK, remaining))
            if not chunk:
                break
            digest.update(chunk)
            remaining -= len(chunk)
    with part.open("r+b") as handle:
        handle.truncate(offset)


def _discard(part: Path, note: Path) -> None:
    part.unlink(missing_ok=True)
    note.unlink(missing_ok=True)
