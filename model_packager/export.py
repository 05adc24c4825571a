"""Export a source to the fp32 ONNX reference model that every later step starts from.

Hugging Face checkpoints go through optimum's exporter, which validates the ONNX outputs against
PyTorch after export; a LoRA adapter is merged into the base weights first (peft), so the device
runs one plain graph. ONNX sources are copied as they are (they were checked in `sources.py`).
torch, transformers, peft and optimum are imported here only, lazily.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from model_packager.errors import ExportError
from model_packager.sources import HfSource, OnnxSource, Source

ONNX_OPSET = 17


def export_reference(source: Source, workdir: Path) -> Path:
    """The fp32 ONNX model for `source`, written under `workdir`."""
    if isinstance(source, OnnxSource):
        target = workdir / "reference.onnx"
        shutil.copyfile(source.path, target)
        return target
    model_dir = merge_adapter(source, workdir / "merged") if source.adapter else source.directory
    return _optimum_export(model_dir, workdir / "onnx", allow_pickle=source.uses_pickle)


def merge_adapter(source: HfSource, out: Path) -> Path:
    """Merge the LoRA adapter into the base model and save the result (safetensors) in `out`."""
    assert source.adapter is not None
    try:
        from peft import PeftModel
        from transformers import AutoModelForImageClassification

        base = AutoModelForImageClassification.from_pretrained(
            source.directory, use_safetensors=not source.uses_pickle
        )
        merged = PeftModel.from_pretrained(base, source.adapter).merge_and_unload()
        merged.save_pretrained(out, safe_serialization=True)
    except Exception as exc:
        raise ExportError(
            f"merging adapter {source.adapter} into {source.directory} failed: {_reason(exc)}; "
            "check the adapter was trained on this base model"
        ) from exc
    shutil.copyfile(source.directory / "preprocessor_config.json", out / "preprocessor_config.json")
    return out


def _optimum_export(model_dir: Path, out: Path, *, allow_pickle: bool) -> Path:
    try:
        from optimum.exporters.onnx import main_export
    except ImportError as exc:
        raise ExportError(
            "exporting a Hugging Face model needs the packager role: scripts/install --role packager"
        ) from exc
    model_kwargs: dict[str, Any] = {} if allow_pickle else {"use_safetensors": True}
    try:
        main_export(
            str(model_dir),
            output=out,
            task="image-classification",
            opset=ONNX_OPSET,
            device="cpu",
            do_validation=True,
            model_kwargs=model_kwargs,
        )
    except Exception as exc:
        raise ExportError(
            f"exporting {model_dir} to ONNX failed: {_reason(exc)}; check the checkpoint loads "
            "with transformers and its architecture is supported by optimum"
        ) from exc
    model = out / "model.onnx"
    if not model.is_file():
        raise ExportError(f"optimum wrote no model.onnx into {out}; the export is incomplete")
    return model


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"
