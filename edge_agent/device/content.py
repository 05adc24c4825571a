"""Conversations with photos, as both transports receive them: OpenAI content parts read into
the messages a chat template renders and the photo bytes, in order.

A message's `content` is a string or a list of parts: `{"type": "text", "text": ...}` and
`{"type": "image_url", "image_url": {"url": ...}}` (the URL also as a plain string). A photo
travels inside the request as a base64 `data:` URL; any other URL (http, https, file, ...) is
refused and never fetched, so a request can neither make the box reach out nor read its files.
Pure: no decoding here (the device decodes the bytes with the hardened decoder, off the event
loop) and no I/O.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from edge_agent.engine.generator import MAX_IMAGES
from edge_agent.errors import BadRequestError

REMOTE_REFUSED = (
    "remote image URLs are never fetched; send the photo as a data: URL "
    "(data:image/jpeg;base64,...)"
)
#: What an image part becomes in the messages a template renders (`as_parts` writes its marker).
IMAGE_PART: dict[str, str] = {"type": "image"}


@dataclass(frozen=True)
class Conversation:
    """Messages whose image parts are `IMAGE_PART`, and the photos' bytes in the same order."""

    messages: tuple[dict[str, Any], ...]
    images: tuple[bytes, ...]

    def text_only(self) -> tuple[dict[str, Any], ...]:
        """The messages for a text-only template: every list of text parts joined into one
        string (what a client that always sends parts means)."""
        return tuple(
            {**m, "content": "".join(p["text"] for p in m["content"])}
            if isinstance(m["content"], list)
            else m
            for m in self.messages
        )


def read_conversation(messages: Sequence[Mapping[str, Any]]) -> Conversation:
    """Read `messages` (dicts with `role` and `content`); `BadRequestError` says what is wrong."""
    if sum(_image_parts(m.get("content")) for m in messages) > MAX_IMAGES:
        raise BadRequestError(
            f"the conversation carries over {MAX_IMAGES} photos; send at most {MAX_IMAGES} per "
            "request"
        )
    shaped: list[dict[str, Any]] = []
    images: list[bytes] = []
    for index, message in enumerate(messages):
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str):
            raise BadRequestError(f"messages[{index}].role must be a string")
        if isinstance(content, str):
            shaped.append({"role": role, "content": content})
            continue
        if not isinstance(content, list):
            raise BadRequestError(
                f"messages[{index}].content must be a string or a list of content parts"
            )
        parts: list[dict[str, Any]] = []
        for number, part in enumerate(content):
            where = f"messages[{index}].content[{number}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                parts.append({"type": "text", "text": part["text"]})
            elif kind == "image_url":
                images.append(data_url_bytes(_url_of(part.get("image_url"), where), where))
                parts.append(dict(IMAGE_PART))
            else:
                raise BadRequestError(
                    f"{where} must be {{'type': 'text', 'text': ...}} or {{'type': 'image_url', "
                    "'image_url': {'url': 'data:image/jpeg;base64,...'}}"
                )
        shaped.append({"role": role, "content": parts})
    return Conversation(tuple(shaped), tuple(images))


def data_url_bytes(url: str, where: str = "the image URL") -> bytes:
    """The bytes of a base64 `data:` URL; any other URL is refused (`REMOTE_REFUSED`)."""
    if url[:5].lower() != "data:":
        raise BadRequestError(f"{where}: {REMOTE_REFUSED}")
    header, comma, payload = url[5:].partition(",")
    if not comma or not header.lower().endswith(";base64"):
        raise BadRequestError(
            f"{where}: only base64 data: URLs are accepted (data:image/jpeg;base64,...)"
        )
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequestError(
            f"{where}: the data: URL is not valid base64 (standard alphabet, with padding); "
            "encode the photo's bytes with base64"
        ) from None


def _url_of(value: Any, where: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("url"), str):
        return str(value["url"])
    raise BadRequestError(f"{where}.image_url must be a URL string or {{'url': ...}}")


def _image_parts(content: Any) -> int:
    if not isinstance(content, list):
        return 0
    return sum(1 for part in content if isinstance(part, dict) and part.get("type") == "image_url")
