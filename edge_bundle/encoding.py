"""The strict encodings signed documents use: canonical JSON, duplicate-free parsing, base64.

Signatures cover exact bytes, so whatever writes them must produce one canonical form and
whatever reads them must refuse anything two parsers could read differently (duplicate keys,
non-canonical base64).
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any


def canonical_json(value: object) -> bytes:
    """Sorted keys, two-space indent, UTF-8, one trailing newline."""
    return (json.dumps(value, sort_keys=True, indent=2, ensure_ascii=False) + "\n").encode()


def strict_json(data: bytes) -> Any:
    """UTF-8 JSON with duplicate keys refused (two parsers must never disagree)."""
    return json.loads(data.decode("utf-8"), object_pairs_hook=_no_duplicates)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise ValueError("duplicate keys in a JSON object")
    return result


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def unb64(value: Any, what: str) -> bytes:
    """Strict base64: only the canonical encoding of some bytes is accepted."""
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a base64 string, got {type(value).__name__}")
    try:
        raw = base64.b64decode(value, validate=True)
    except binascii.Error as exc:
        raise ValueError(f"{what} is not valid base64") from exc
    if b64(raw) != value:
        raise ValueError(f"{what} is not canonical base64")
    return raw
