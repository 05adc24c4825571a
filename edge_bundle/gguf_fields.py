"""Reading a GGUF file's header without llama.cpp or the `gguf` package: its scalar fields and
tensor types, and the check that a projector (mmproj) fits a text model.

The agent has neither the converter's `gguf` module nor any reason to load a model to learn
that a bundle's projector was made for another text model, so both sides read the header here:
the packager before it writes a vision-language bundle, the agent before it installs one.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from edge_bundle.errors import BundleError


class ProjectorMismatchError(BundleError):
    """A projector whose output does not fit the text model (or a file that is not one)."""


@dataclass(frozen=True)
class ProjectorPair:
    """A text model and the projector that feeds it photos, as their headers describe them."""

    projector_type: str
    embedding_width: int  # the text model's; the projector writes vectors of this width
    image_size: int  # the vision encoder's input side, in pixels


def read_fields(path: Path) -> tuple[dict[str, Any], list[tuple[int, int]]]:
    """`path`'s scalar header fields (arrays read as None) and (type, dimensions) per tensor."""
    with path.open("rb") as stream, mmap.mmap(stream.fileno(), 0, access=mmap.ACCESS_READ) as data:
        return GgufHeader(data).read()


def projector_pair(text_model: Path, projector: Path) -> ProjectorPair:
    """Check that `projector` (an mmproj GGUF) was made for `text_model` (a GGUF language model);
    raise `ProjectorMismatchError` saying what differs."""
    try:
        text, _ = read_fields(text_model)
        vision, _ = read_fields(projector)
    except (ValueError, struct.error, OSError) as exc:
        raise ProjectorMismatchError(f"a GGUF header cannot be read ({exc})") from exc
    architecture = text.get("general.architecture")
    width = text.get(f"{architecture}.embedding_length")
    if vision.get("general.architecture") != "clip" or not vision.get("clip.has_vision_encoder"):
        raise ProjectorMismatchError(
            f"{projector.name} is not a vision projector (an mmproj GGUF with a vision encoder); "
            "convert the model again with convert_hf_to_gguf --mmproj"
        )
    output = vision.get("clip.vision.projection_dim")
    if not isinstance(width, int) or not isinstance(output, int):
        raise ProjectorMismatchError(
            f"{text_model.name} or {projector.name} does not record its embedding width"
        )
    if output != width:
        raise ProjectorMismatchError(
            f"the projector {projector.name} writes {output}-wide embeddings but the text model "
            f"{text_model.name} reads {width}-wide ones: the projector was made for another "
            "model; convert both files from the same checkpoint"
        )
    side = vision.get("clip.vision.image_size")
    return ProjectorPair(
        projector_type=str(vision.get("clip.projector_type") or "unknown"),
        embedding_width=width,
        image_size=int(side) if isinstance(side, int) else 0,
    )


class GgufHeader:
    """A GGUF header parser that skips array values: `gguf.GGUFReader` builds every vocabulary
    entry (30 s for a 262k-token vocabulary), while the packager only needs scalars."""

    _SCALARS: ClassVar[dict[int, str]] = {
        0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q",
        11: "<q", 12: "<d",
    }  # fmt: skip
    _STRING, _ARRAY = 8, 9

    def __init__(self, data: mmap.mmap) -> None:
        self.data = data
        self.offset = 0

    def read(self) -> tuple[dict[str, Any], list[tuple[int, int]]]:
        if self.data[:4] != b"GGUF":
            raise ValueError("no GGUF magic at the start")
        self.offset = 4
        version = self._scalar("<I")
        if version < 2:
            raise ValueError(f"GGUF version {version} is too old; convert it again")
        tensor_count, field_count = self._scalar("<Q"), self._scalar("<Q")
        fields: dict[str, Any] = {}
        for _ in range(field_count):
            key = self._string()
            fields[key] = self._value(self._scalar("<I"))
        tensors = []
        for _ in range(tensor_count):
            self._string()
            dims = self._scalar("<I")
            self.offset += 8 * dims
            tensors.append((self._scalar("<I"), dims))
            self.offset += 8
        return fields, tensors

    def _scalar(self, fmt: str) -> Any:
        (value,) = struct.unpack_from(fmt, self.data, self.offset)
        self.offset += struct.calcsize(fmt)
        return value

    def _string(self) -> str:
        length = self._scalar("<Q")
        if self.offset + length > len(self.data):
            raise ValueError("a string runs past the end of the file")
        text = bytes(self.data[self.offset : self.offset + length]).decode("utf-8", "replace")
        self.offset += length
        return text

    def _value(self, kind: int) -> Any:
        if kind == self._STRING:
            return self._string()
        if kind in self._SCALARS:
            return self._scalar(self._SCALARS[kind])
        if kind != self._ARRAY:
            raise ValueError(f"unknown value type {kind}")
        item_kind, count = self._scalar("<I"), self._scalar("<Q")
        if item_kind in self._SCALARS:
            self.offset += count * struct.calcsize(self._SCALARS[item_kind])
        else:
            for _ in range(count):
                self._value(item_kind)
        if self.offset > len(self.data):
            raise ValueError("an array runs past the end of the file")
        return None
