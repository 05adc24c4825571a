"""Bundles delivered in chunks over MQTT: the signed extension, the chunk manifest, the wire format.

Where a box reaches nothing but its site's broker, a release notice carries the extension
`mqtt_chunks` instead of (or beside) a URL:

    "extensions": {"critical": ["mqtt_chunks"],
                   "mqtt_chunks": {"chunk_size": 262144, "chunks": 17,
                                   "manifest_sha256": "<hex>"}}

The bundle is cut into `chunks` pieces of `chunk_size` bytes (the last one shorter). The **chunk
manifest** is the concatenation of each chunk's raw 32-byte sha256, in order; the notice signs its
sha256. A box fetches the manifest first (in pages of `chunk_size` bytes, so no message is ever
larger than one chunk), checks it against the signed digest, then checks every chunk against its
manifest entry as it arrives, so a corrupted or forged chunk is refused at once and fetched again,
and the finished file is checked against the notice's sha256 and size as an HTTP download is.

The wire format works through MQTT 3.1.1 bridges too (nothing rides in MQTT 5 properties):

- request, JSON on `REQUEST_TOPIC` (QoS 1), from a box:
  `{"bundle": "<sha256>", "chunk_size": N, "part": "manifest" | "chunk", "index": I,
    "reply": "lineside/v1/{site}/{device}/chunks"}`
- reply, on the request's `reply` topic: one line of JSON, a newline, then the raw bytes:
  `{"bundle": ..., "chunk_size": N, "part": ..., "index": I}\\n<data>`, or for a refusal
  `{"bundle": ..., "chunk_size": N, "part": ..., "index": I, "error": "unknown_bundle",
    "message": "..."}\\n`.

A server answers only to reply topics of the form above (`reply_topic`), so it cannot be made to
publish anywhere else. This module is pure: no I/O beyond reading a bundle file to describe it.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

from edge_bundle.errors import BundleError

#: The notice extension naming MQTT delivery (agents from 0.4.0 understand it).
MQTT_CHUNKS_EXTENSION: Final = "mqtt_chunks"
#: Where boxes send chunk requests; chunk servers subscribe to it (shared: `$share/G/...`).
REQUEST_TOPIC: Final = "lineside/v1/chunks/request"
#: The shared-subscription group chunk servers join by default.
SERVER_GROUP: Final = "lineside-chunks"
DEFAULT_CHUNK_SIZE: Final = 256 * 1024
MIN_CHUNK_SIZE: Final = 4 * 1024
MAX_CHUNK_SIZE: Final = 16 * 1024 * 1024
#: 2**20 chunks: a 32 MiB manifest, at most 8,192 pages at the smallest chunk size.
MAX_CHUNKS: Final = 1 << 20
DIGEST_BYTES: Final = 32
#: Requests and reply headers are small; anything longer is refused unread.
MAX_HEADER_BYTES: Final = 1024
Part = Literal["manifest", "chunk"]
PARTS: Final = ("manifest", "chunk")
ERRORS: Final = ("unknown_bundle", "bad_request", "unavailable")
_SHA = re.compile(r"^[0-9a-f]{64}$")
_SEGMENT = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}"
_REPLY = re.compile(rf"^lineside/v1/{_SEGMENT}/{_SEGMENT}/chunks$")


class ChunkError(BundleError):
    """A chunk request, reply or extension that cannot be used; the message says why."""


def reply_topic(site: str, device: str) -> str:
    """The topic a box receives its chunks on (it subscribes to it, QoS 1)."""
    topic = f"lineside/v1/{site}/{device}/chunks"
    if _REPLY.fullmatch(topic) is None:
        raise ChunkError(f"{site!r}/{device!r} is not a usable SITE/DEVICE for a chunk topic")
    return topic


def chunk_count(size: int, chunk_size: int) -> int:
    """How many chunks a bundle of `size` bytes is cut into."""
    return max(1, math.ceil(size / chunk_size))


@dataclass(frozen=True)
class ChunkedDelivery:
    """`extensions.mqtt_chunks` of a release notice: how the bundle is cut and what signs it."""

    chunk_size: int
    chunks: int
    manifest_sha256: str

    @classmethod
    def parse(cls, value: Any, *, bundle_size: int | None = None) -> ChunkedDelivery:
        """From the notice's JSON; `ValueError` with a one-line reason when it is unusable."""
        example = '{"chunk_size": 262144, "chunks": 17, "manifest_sha256": "<64 hex>"}'
        if not isinstance(value, dict) or set(value) != {"chunk_size", "chunks", "manifest_sha256"}:
            raise ValueError(f"extensions.{MQTT_CHUNKS_EXTENSION} must be an object like {example}")
        size, count, digest = value["chunk_size"], value["chunks"], value["manifest_sha256"]
        if type(size) is not int or not MIN_CHUNK_SIZE <= size <= MAX_CHUNK_SIZE:
            raise ValueError(
                f"extensions.{MQTT_CHUNKS_EXTENSION}.chunk_size must be an integer from "
                f"{MIN_CHUNK_SIZE} to {MAX_CHUNK_SIZE} bytes, not {size!r}"
            )
        if type(count) is not int or not 1 <= count <= MAX_CHUNKS:
            raise ValueError(
                f"extensions.{MQTT_CHUNKS_EXTENSION}.chunks must be an integer from 1 to "
                f"{MAX_CHUNKS}, not {count!r}; use a larger chunk_size"
            )
        if not isinstance(digest, str) or _SHA.fullmatch(digest) is None:
            raise ValueError(
                f"extensions.{MQTT_CHUNKS_EXTENSION}.manifest_sha256 must be 64 lowercase hex digits"
            )
        delivery = cls(size, count, digest)
        if bundle_size is not None and chunk_count(bundle_size, size) != count:
            raise ValueError(
                f"extensions.{MQTT_CHUNKS_EXTENSION}.chunks is {count}, but a bundle of "
                f"{bundle_size} bytes in chunks of {size} bytes has {chunk_count(bundle_size, size)}"
            )
        return delivery

    def to_json(self) -> dict[str, Any]:
        return {
            "chunk_size": self.chunk_size,
            "chunks": self.chunks,
            "manifest_sha256": self.manifest_sha256,
        }

    @property
    def manifest_size(self) -> int:
        return self.chunks * DIGEST_BYTES

    @property
    def manifest_pages(self) -> int:
        return chunk_count(self.manifest_size, self.chunk_size)

    def chunk_length(self, index: int, bundle_size: int) -> int:
        """The exact length chunk `index` must have."""
        if not 0 <= index < self.chunks:
            raise ChunkError(f"chunk {index} is out of range (0..{self.chunks - 1})")
        return min(self.chunk_size, bundle_size - index * self.chunk_size)

    def page_length(self, page: int) -> int:
        """The exact length manifest page `page` must have."""
        if not 0 <= page < self.manifest_pages:
            raise ChunkError(f"manifest page {page} is out of range (0..{self.manifest_pages - 1})")
        return min(self.chunk_size, self.manifest_size - page * self.chunk_size)

    def check_manifest(self, manifest: bytes) -> None:
        """Refuse a manifest that is not the one the notice signed."""
        if len(manifest) != self.manifest_size:
            raise ChunkError(
                f"the chunk manifest is {len(manifest)} bytes, not the {self.manifest_size} the "
                "notice declares"
            )
        if hashlib.sha256(manifest).hexdigest() != self.manifest_sha256:
            raise ChunkError(
                "the chunk manifest's sha256 does not match the signed notice (a wrong or "
                "tampered manifest); it is fetched again"
            )

    def chunk_ok(self, manifest: bytes, index: int, data: bytes, bundle_size: int) -> bool:
        """Whether `data` is exactly chunk `index` of the bundle (length and sha256)."""
        if len(data) != self.chunk_length(index, bundle_size):
            return False
        expected = manifest[index * DIGEST_BYTES : (index + 1) * DIGEST_BYTES]
        return hashlib.sha256(data).digest() == expected


def build_manifest(path: Path, chunk_size: int) -> bytes:
    """The chunk manifest of the file at `path` (read once, one chunk in memory at a time)."""
    if not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
        raise ChunkError(f"chunk_size must be {MIN_CHUNK_SIZE}..{MAX_CHUNK_SIZE} bytes")
    digests = bytearray()
    with path.open("rb") as stream:
        while data := stream.read(chunk_size):
            digests += hashlib.sha256(data).digest()
    if not digests:
        digests += hashlib.sha256(b"").digest()
    return bytes(digests)


def describe(path: Path, chunk_size: int = DEFAULT_CHUNK_SIZE) -> ChunkedDelivery:
    """The `mqtt_chunks` extension for the bundle at `path`."""
    manifest = build_manifest(path, chunk_size)
    count = len(manifest) // DIGEST_BYTES
    if count > MAX_CHUNKS:
        raise ChunkError(
            f"{path} is {count} chunks of {chunk_size} bytes, over {MAX_CHUNKS}; use a larger "
            "chunk size"
        )
    return ChunkedDelivery(chunk_size, count, hashlib.sha256(manifest).hexdigest())


def manifest_page(manifest: bytes, page: int, chunk_size: int) -> bytes:
    """Page `page` of a manifest, as a server sends it."""
    return manifest[page * chunk_size : (page + 1) * chunk_size]


@dataclass(frozen=True)
class ChunkRequest:
    """One request from a box: a manifest page or a chunk of bundle `bundle`."""

    bundle: str
    chunk_size: int
    part: Part
    index: int
    reply: str

    def encode(self) -> bytes:
        return json.dumps(
            {
                "bundle": self.bundle,
                "chunk_size": self.chunk_size,
                "part": self.part,
                "index": self.index,
                "reply": self.reply,
            },
            separators=(",", ":"),
        ).encode()

    @classmethod
    def decode(cls, payload: bytes) -> ChunkRequest:
        """Parse and check a request; `ChunkError` says what is wrong with it."""
        if len(payload) > MAX_HEADER_BYTES:
            raise ChunkError(f"a chunk request is at most {MAX_HEADER_BYTES} bytes")
        fields = _json_object(payload, "chunk request")
        expected = {"bundle", "chunk_size", "part", "index", "reply"}
        if set(fields) != expected:
            raise ChunkError(f"a chunk request has exactly the fields {sorted(expected)}")
        request = cls(**fields)
        _check_common(request.bundle, request.chunk_size, request.part, request.index)
        if not isinstance(request.reply, str) or _REPLY.fullmatch(request.reply) is None:
            raise ChunkError(
                f"reply {request.reply!r} is not a chunk topic; it must be "
                "lineside/v1/SITE/DEVICE/chunks"
            )
        return request


@dataclass(frozen=True)
class ChunkReply:
    """A server's answer: the bytes of one manifest page or chunk, or an error."""

    bundle: str
    chunk_size: int
    part: Part
    index: int
    data: bytes = b""
    error: str | None = None
    message: str | None = None

    @classmethod
    def refusal(cls, request: ChunkRequest, error: str, message: str) -> ChunkReply:
        return cls(
            request.bundle, request.chunk_size, request.part, request.index, b"", error, message
        )

    def encode(self) -> bytes:
        header: dict[str, Any] = {
            "bundle": self.bundle,
            "chunk_size": self.chunk_size,
            "part": self.part,
            "index": self.index,
        }
        if self.error is not None:
            header["error"] = self.error
            header["message"] = (self.message or "")[:400]
        return json.dumps(header, separators=(",", ":")).encode() + b"\n" + self.data

    @classmethod
    def decode(cls, payload: bytes) -> ChunkReply:
        """Split header and data; `ChunkError` if the header is malformed (data unchecked)."""
        line, newline, data = payload.partition(b"\n")
        if not newline or len(line) > MAX_HEADER_BYTES:
            raise ChunkError("a chunk reply starts with one line of JSON and a newline")
        fields = _json_object(line, "chunk reply header")
        allowed = {"bundle", "chunk_size", "part", "index", "error", "message"}
        if not {"bundle", "chunk_size", "part", "index"} <= set(fields) <= allowed:
            raise ChunkError(f"a chunk reply header has the fields {sorted(allowed)}")
        reply = cls(data=data, **fields)
        _check_common(reply.bundle, reply.chunk_size, reply.part, reply.index)
        if reply.error is not None and reply.error not in ERRORS:
            raise ChunkError(f"unknown chunk error {reply.error!r}")
        return reply


def _json_object(data: bytes, what: str) -> dict[str, Any]:
    try:
        value = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ChunkError(f"the {what} is not UTF-8 JSON ({exc})") from exc
    if not isinstance(value, dict):
        raise ChunkError(f"the {what} must be a JSON object")
    return value


def _check_common(bundle: Any, chunk_size: Any, part: Any, index: Any) -> None:
    if not isinstance(bundle, str) or _SHA.fullmatch(bundle) is None:
        raise ChunkError("bundle must be the bundle's sha256, 64 lowercase hex digits")
    if type(chunk_size) is not int or not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
        raise ChunkError(f"chunk_size must be an integer from {MIN_CHUNK_SIZE} to {MAX_CHUNK_SIZE}")
    if part not in PARTS:
        raise ChunkError(f"part must be one of {list(PARTS)}, not {part!r}")
    if type(index) is not int or not 0 <= index < MAX_CHUNKS:
        raise ChunkError(f"index must be an integer from 0 to {MAX_CHUNKS - 1}")
