"""Reading requests and events out of MQTT payloads, and shaping what goes back.

Pure functions and values, no I/O: a request or event payload is either the raw image bytes or
JSON carrying the image as base64 (at `image`, or at a mapping's dotted path). Every problem is an
`AgentError` whose code and message go back to the sender exactly as over HTTP. What goes back is
an `Outgoing` message, on its way to the outbox.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass
from typing import Any

from edge_agent.errors import BadRequestError, PayloadTooLargeError
from edge_agent.mqtt.outbox import Kind
from edge_agent.mqtt.topics import Topic
from edge_bundle.errors import ImageError

JSON_CONTENT = "application/json"


@dataclass(frozen=True)
class ImageRequest:
    """What a request or event asks for."""

    image: bytes
    client_request_id: str | None = None
    top_k: int = 3
    document: dict[str, Any] | None = None  # the JSON payload, when it was JSON


def looks_like_json(payload: bytes, content_type: str | None) -> bool:
    if content_type is not None:
        return content_type.split(";")[0].strip().lower() == JSON_CONTENT
    return payload[:1] in (b"{", b"[")


def parse_request(
    payload: bytes,
    content_type: str | None,
    *,
    max_bytes: int,
    image_path: str = "image",
    default_top_k: int = 3,
) -> ImageRequest:
    """An image request from a payload: raw image bytes, or JSON with base64 at `image_path`."""
    if not payload:
        raise ImageError("the payload is empty; publish the photo (or JSON with it) again")
    if len(payload) > max_bytes:
        raise PayloadTooLargeError(
            f"the payload is {len(payload):,} bytes, over the limit of {max_bytes:,}; publish a "
            "smaller photo"
        )
    if not looks_like_json(payload, content_type):
        return ImageRequest(payload, top_k=default_top_k)
    try:
        document = json.loads(payload)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequestError(f"the payload is not valid JSON ({exc})") from None
    except RecursionError:
        raise BadRequestError(
            'the JSON payload is nested too deeply; send a flat object like {"image": "<base64>"}'
        ) from None
    if not isinstance(document, dict):
        raise BadRequestError('the JSON payload must be an object, e.g. {"image": "<base64>"}')
    encoded = dig(document, image_path)
    if not isinstance(encoded, str) or not encoded:
        raise BadRequestError(
            f"the JSON payload needs a base64 string at '{image_path}' (found "
            f"{type(encoded).__name__})"
        )
    request_id = document.get("request_id")
    if request_id is not None and (
        not isinstance(request_id, str) or not 0 < len(request_id) <= 128
    ):
        raise BadRequestError("request_id must be a string of 1 to 128 characters")
    top_k = document.get("top_k", default_top_k)
    if not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= 100:
        raise BadRequestError("top_k must be an integer from 1 to 100")
    return ImageRequest(decode_base64(encoded, image_path), request_id, top_k, document)


def decode_base64(encoded: str, where: str) -> bytes:
    if encoded.startswith("data:"):
        encoded = encoded.partition(",")[2]
    try:
        return base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequestError(
            f"'{where}' is not valid base64 (standard alphabet, with padding)"
        ) from None


def dig(document: Any, path: str) -> Any:
    """The value at a dotted path ("a.b.0.c"); None when any step is missing."""
    value = document
    for step in path.split("."):
        if isinstance(value, dict):
            value = value.get(step)
        elif isinstance(value, list) and step.isdigit() and int(step) < len(value):
            value = value[int(step)]
        else:
            return None
    return value


def carry(document: dict[str, Any] | None, paths: tuple[str, ...]) -> dict[str, Any]:
    """The values at `paths` (for results to carry an event's metadata over)."""
    if document is None:
        return {}
    return {path: dig(document, path) for path in paths}


def error_payload(
    code: str, message: str, *, request_id: str | None, message_id: str, extra: dict[str, Any]
) -> bytes:
    body = {
        "error": {"code": code, "message": message, "request_id": request_id},
        "message_id": message_id,
        **extra,
    }
    return json.dumps(body, separators=(",", ":")).encode()


@dataclass(frozen=True)
class Outgoing:
    """A message on its way to the outbox: where, what, of which kind, with which properties."""

    topic: Topic
    payload: bytes
    kind: Kind
    message_id: str
    properties: dict[str, Any]


def to_json(body: dict[str, Any]) -> bytes:
    return json.dumps(body, separators=(",", ":")).encode()


def json_or_none(payload: bytes) -> dict[str, Any] | None:
    """The payload as a JSON object, or None (for carrying metadata over even into errors)."""
    try:
        document = json.loads(payload)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    return document if isinstance(document, dict) else None


#: A top-level-looking "request_id": "..." in a JSON payload, found without parsing it all.
_REQUEST_ID = re.compile(rb'"request_id"\s*:\s*"([^"\\]{1,128})"')


def peek_request_id(payload: bytes) -> str | None:
    """The request id of a JSON payload, read cheaply (for shed replies and dedupe keys); the
    full parse (`parse_request`) checks it properly."""
    if payload[:1] != b"{":
        return None
    found = _REQUEST_ID.search(payload)
    if found is None:
        return None
    try:
        return found.group(1).decode()
    except UnicodeDecodeError:
        return None
