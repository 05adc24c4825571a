"""Reading an image out of a prediction request, in the three forms the API accepts.

- a raw body with an `image/*` (or `application/octet-stream`) content type: the fastest path;
- `multipart/form-data` with one file field named `image` (what an HTML form or `curl -F` sends);
- `application/json` with `{"image": "<base64>"}` (a data: URL is accepted too).

The content type only picks the parser: whether the bytes are an image, and which kind, is decided
from the bytes themselves by the decoder. Body size is capped by `BodyLimit` before any of this.

`parse_json` is the one JSON reader of the routes that take JSON bodies: whatever the client sent
(not JSON, nested 100,000 deep) it returns a document no deeper than `MAX_JSON_DEPTH`, or raises
`BadRequestError`.

`QueryOption` is a query parameter read by hand: the prediction route's options are parsed here
rather than by FastAPI, whose per-request dependency solving and validation cost the event loop
more than the rest of the route's Python on every photo. Each option's JSON schema is both what
the OpenAPI document shows and what the value is checked against.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from starlette.datastructures import UploadFile

from edge_agent.device.predictions import Photo
from edge_agent.errors import AgentError, BadRequestError, UnsupportedMediaError

IMAGE_FIELD = "image"
NOTE_FIELD = "note"
MAX_NOTE_CHARS = 500
ACCEPTED = "image/* (raw body), multipart/form-data (field 'image') or application/json"
#: Deeper documents are refused: no request of this API nests more than a few levels, and code
#: that walks a document recursively later (encoders, validators) must not meet one it cannot.
MAX_JSON_DEPTH = 32


def parse_json(body: bytes, expected: str) -> Any:
    """The JSON document in `body`; `BadRequestError` (saying to send `expected`) if it is not
    JSON or is nested deeper than `MAX_JSON_DEPTH`."""
    try:
        document = json.loads(body)
    except RecursionError:
        document = _TOO_DEEP
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequestError(f"the body is not valid JSON ({exc}); send {expected}") from None
    if document is _TOO_DEEP or _deeper_than(document, MAX_JSON_DEPTH):
        raise BadRequestError(
            f"the JSON body is nested more than {MAX_JSON_DEPTH} levels deep; send {expected}"
        )
    return document


async def read_json(request: Request, expected: str) -> Any:
    """The request's body as JSON (see `parse_json`)."""
    return parse_json(await request.body(), expected)


_TOO_DEEP = object()

#: What a boolean query value may be, as FastAPI (pydantic) reads one.
_TRUE = frozenset({"1", "on", "t", "true", "y", "yes"})
_FALSE = frozenset({"0", "off", "f", "false", "n", "no"})
_INTEGER = re.compile(r"\s*[+-]?[0-9]{1,18}\s*")


@dataclass(frozen=True)
class QueryOption:
    """A query parameter with a default: `schema` is a JSON schema of type integer (with
    `minimum` and `maximum`), boolean, or string with an `enum`."""

    name: str
    description: str
    schema: Mapping[str, Any]

    def parse(self, text: str) -> Any:
        """The value `text` stands for; `BadRequestError` saying what is allowed if none."""
        kind = self.schema["type"]
        if kind == "integer":
            low, high = self.schema["minimum"], self.schema["maximum"]
            if _INTEGER.fullmatch(text) and low <= int(text) <= high:
                return int(text)
            allowed = f"a whole number from {low} to {high}"
        elif kind == "boolean":
            if text.lower() in _TRUE:
                return True
            if text.lower() in _FALSE:
                return False
            allowed = "true or false"
        else:
            if text in self.schema["enum"]:
                return text
            allowed = " or ".join(self.schema["enum"])
        raise BadRequestError(f"invalid request: query.{self.name} must be {allowed}, not {text!r}")

    def openapi(self) -> dict[str, Any]:
        """The parameter as the OpenAPI document describes it."""
        return {
            "name": self.name,
            "in": "query",
            "required": False,
            "description": self.description,
            "schema": dict(self.schema),
        }


def read_query(query: Mapping[str, str], options: Sequence[QueryOption]) -> dict[str, Any]:
    """Each option's value in `query` (the last one given), or its default when absent."""
    return {
        option.name: option.parse(query[option.name])
        if option.name in query
        else option.schema["default"]
        for option in options
    }


def _deeper_than(document: Any, limit: int) -> bool:
    """Whether `document` nests containers more than `limit` deep (iterative: any depth)."""
    level: list[Any] = [document]
    for _ in range(limit):
        level = [
            child
            for node in level
            if isinstance(node, dict | list)
            for child in (node.values() if isinstance(node, dict) else node)
            if isinstance(child, dict | list)
        ]
        if not level:
            return False
    return True


async def read_image(request: Request) -> Photo:
    """The image (and note) of a prediction request; `AgentError`s say what to send instead."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    note = request.query_params.get("note")
    if content_type.startswith("image/") or content_type == "application/octet-stream":
        return Photo(await request.body(), _note(note))
    if content_type == "multipart/form-data":
        return await _from_multipart(request)
    if content_type == "application/json":
        return _from_json(await request.body())
    shown = content_type or "no Content-Type"
    raise UnsupportedMediaError(f"cannot read an image from {shown}; send {ACCEPTED}")


async def _from_multipart(request: Request) -> Photo:
    try:
        form = await request.form(max_files=1, max_fields=16)
    except AgentError:  # the body cap, raised from inside the parser's reads
        raise
    except Exception as exc:  # starlette's parser errors differ across versions
        raise BadRequestError(
            f"the multipart body could not be parsed ({exc}); send one file field named '{IMAGE_FIELD}'"
        ) from exc
    try:
        upload = form.get(IMAGE_FIELD)
        if not isinstance(upload, UploadFile):
            files = [key for key, value in form.multi_items() if isinstance(value, UploadFile)]
            hint = f" (found file fields {files})" if files else ""
            raise BadRequestError(
                f"the multipart upload has no file field named '{IMAGE_FIELD}'{hint}; send the "
                f"photo as -F {IMAGE_FIELD}=@photo.jpg"
            )
        field = form.get(NOTE_FIELD)
        return Photo(await upload.read(), _note(field if isinstance(field, str) else None))
    finally:
        await form.close()


def _from_json(body: bytes) -> Photo:
    document = parse_json(body, '{"image": "<base64>"}')
    encoded = document.get(IMAGE_FIELD) if isinstance(document, dict) else None
    if not isinstance(encoded, str) or not encoded:
        raise BadRequestError(
            f"the JSON body needs a string field '{IMAGE_FIELD}' holding the base64-encoded photo"
        )
    if encoded.startswith("data:"):
        _, _, encoded = encoded.partition(",")
    note = document.get(NOTE_FIELD)
    if note is not None and not isinstance(note, str):
        raise BadRequestError(f"'{NOTE_FIELD}' must be a string")
    try:
        return Photo(base64.b64decode(encoded, validate=True), _note(note))
    except (binascii.Error, ValueError):
        raise BadRequestError(
            f"the '{IMAGE_FIELD}' field is not valid base64 (standard alphabet, with padding); "
            "encode the file's bytes with base64"
        ) from None


def _note(value: str | None) -> str | None:
    if value is None or not value.strip():
        return None
    if len(value) > MAX_NOTE_CHARS:
        raise BadRequestError(
            f"the note is {len(value)} characters; keep it under {MAX_NOTE_CHARS}"
        )
    return value.strip()
