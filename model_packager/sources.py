"""Model sources: what `model-packager build` accepts, checked before any heavy work starts.

A source is one of
- a Hugging Face image-classification directory (`config.json`, safetensors weights, and
  `preprocessor_config.json`), optionally with a PEFT LoRA adapter directory to merge;
- a plain ONNX file, with its labels and preprocessing in a small YAML file (or given as options);
- a language model (`LlmSource`): a Hugging Face causal-LM directory (`…ForCausalLM`, safetensors
  weights, tokenizer files; optionally a LoRA adapter), or a `.gguf` file;
- a vision-language model (`LlmSource` with `vision`): a Hugging Face checkpoint whose config has a
  `vision_config` and a `text_config` (SmolVLM, Idefics3, ...; optionally a LoRA adapter), or a
  `.gguf` text model with its projector (`--mmproj FILE`).

This module only inspects files (JSON, YAML, ONNX and GGUF headers: `gguf_header.py`); exporting
lives in `export.py` and `llm/gguf.py`.
Pickle checkpoints (`.bin`, `.pt`, `.pth`, `.ckpt`) execute code when loaded, so they are refused
unless the user passes `--allow-pickle`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from edge_bundle.errors import PreprocessError
from edge_bundle.hashing import sha256_file
from edge_bundle.preprocess import PreprocessSpec, load_spec
from model_packager.errors import SourceError
from model_packager.gguf_header import GgufInfo, read_gguf_info

SAFETENSORS_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.pth")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
ADAPTER_WEIGHTS = ("adapter_model.safetensors",)
ADAPTER_PICKLE = ("adapter_model.bin",)
TOKENIZER_VOCABULARIES = ("tokenizer.model", "tokenizer.json")


@dataclass(frozen=True)
class HfSource:
    """A Hugging Face image-classification checkpoint directory (plus an optional LoRA adapter)."""

    directory: Path
    architecture: str
    labels: tuple[str, ...]
    preprocessing: PreprocessSpec
    weights: Path
    adapter: Path | None
    adapter_weights: Path | None
    uses_pickle: bool

    def lineage_hashes(self) -> tuple[str, str | None]:
        """sha256 of the base weights and of the adapter weights (None without an adapter)."""
        adapter = sha256_file(self.adapter_weights) if self.adapter_weights else None
        return sha256_file(self.weights), adapter

    def describe(self) -> str:
        text = f"Hugging Face {self.architecture} from {self.directory.name}"
        return text + (f" + LoRA adapter {self.adapter.name}" if self.adapter else "")


@dataclass(frozen=True)
class OnnxSource:
    """A plain ONNX classifier with labels and preprocessing supplied by the user."""

    path: Path
    labels: tuple[str, ...]
    preprocessing: PreprocessSpec

    def lineage_hashes(self) -> tuple[str, str | None]:
        return sha256_file(self.path), None

    def describe(self) -> str:
        return f"ONNX file {self.path.name}"


@dataclass(frozen=True)
class LlmSource:
    """A language model: a HF causal-LM directory (+ LoRA adapter) or a GGUF file."""

    kind: Literal["hf", "gguf"]
    path: Path  # the HF directory or the .gguf file
    architecture: str
    weights: Path
    adapter: Path | None
    adapter_weights: Path | None
    uses_pickle: bool
    context_length: int | None  # what the model was trained for, when it says
    chat_template: str | None  # the template that came with the model, unchecked
    gguf: GgufInfo | None = None  # for GGUF files
    vision: bool = False  # a vision-language model: the bundle also ships a projector
    projector: Path | None = None  # the mmproj GGUF given with a GGUF source

    @property
    def quantized(self) -> bool:
        return self.gguf is not None and self.gguf.quantized

    def lineage_hashes(self) -> tuple[str, str | None]:
        adapter = sha256_file(self.adapter_weights) if self.adapter_weights else None
        return sha256_file(self.weights), adapter

    def describe(self) -> str:
        if self.gguf is not None:
            text = f"GGUF {self.architecture} ({self.gguf.file_type}) from {self.path.name}"
            return text + (f" + projector {self.projector.name}" if self.projector else "")
        text = f"Hugging Face {self.architecture} from {self.path.name}"
        return text + (f" + LoRA adapter {self.adapter.name}" if self.adapter else "")


Source = HfSource | OnnxSource  # the image classifiers
AnySource = Source | LlmSource


def resolve_source(
    path: Path,
    *,
    adapter: Path | None = None,
    model_config: Path | None = None,
    labels: Sequence[str] | None = None,
    allow_pickle: bool = False,
    mmproj: Path | None = None,
) -> AnySource:
    """Inspect `path` and return the source it holds, or raise `SourceError` saying what to fix."""
    if not path.exists():
        raise SourceError(
            f"model source {path} does not exist; pass a Hugging Face directory, .onnx or .gguf"
        )
    if path.is_dir():
        if model_config is not None:
            raise SourceError(
                "--model-config is for ONNX files; a HF directory carries its own config"
            )
        config = _read_json(path / "config.json", "the model's config.json")
        if mmproj is not None:
            raise SourceError(
                "--mmproj goes with a .gguf text model; a Hugging Face vision-language "
                "directory is converted to both files by the packager"
            )
        if _is_vision_language(config):
            return _hf_llm_source(path, config, adapter, allow_pickle, vision=True)
        if _is_causal_lm(config):
            return _hf_llm_source(path, config, adapter, allow_pickle)
        return _hf_source(path, adapter, allow_pickle)
    if adapter is not None:
        raise SourceError(
            "--adapter needs a Hugging Face directory as the source, not a file "
            "(merge the adapter before converting to GGUF, or pass the HF base model)"
        )
    if path.suffix.lower() == ".gguf":
        return _gguf_source(path, mmproj)
    if mmproj is not None:
        raise SourceError("--mmproj goes with a .gguf text model as the source")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise SourceError(
            f"{path.name} is a pickle checkpoint; convert it to safetensors or ONNX first "
            "(pickles run code when loaded)"
        )
    if path.suffix.lower() != ".onnx":
        raise SourceError(
            f"{path.name} is not a model source: use a HF directory, a .onnx or a .gguf file"
        )
    return _onnx_source(path, model_config, labels)


def _hf_source(directory: Path, adapter: Path | None, allow_pickle: bool) -> HfSource:
    config = _read_json(directory / "config.json", "the model's config.json")
    architecture = _image_classification_architecture(config, directory)
    weights, pickled = _weights(directory, allow_pickle)
    labels = _hf_labels(config, directory)
    processor_file = directory / "preprocessor_config.json"
    processor = _read_json(processor_file, "preprocessor_config.json (the image processor)")
    from model_packager.hf_preprocess import spec_from_hf_config

    try:
        spec = spec_from_hf_config(processor)
    except PreprocessError as exc:
        raise SourceError(f"{processor_file}: {exc}") from exc
    adapter_weights = None
    if adapter is not None:
        adapter_weights, adapter_pickled = _adapter_weights(adapter, allow_pickle)
        pickled = pickled or adapter_pickled
    return HfSource(
        directory, architecture, labels, spec, weights, adapter, adapter_weights, pickled
    )


def _image_classification_architecture(config: Mapping[str, Any], directory: Path) -> str:
    architectures = config.get("architectures") or []
    if not isinstance(architectures, list) or not architectures:
        raise SourceError(
            f"{directory}/config.json names no architecture; save the model with save_pretrained()"
        )
    name = str(architectures[0])
    if not name.endswith("ForImageClassification"):
        raise SourceError(
            f"{directory} holds a {name}; model-packager build takes image-classification "
            "checkpoints (an architecture ending in ForImageClassification), causal language "
            "models (ForCausalLM), an ONNX file or a GGUF file"
        )
    return name


def _is_causal_lm(config: Mapping[str, Any]) -> bool:
    architectures = config.get("architectures")
    return (
        isinstance(architectures, list)
        and bool(architectures)
        and str(architectures[0]).endswith("ForCausalLM")
    )


def _is_vision_language(config: Mapping[str, Any]) -> bool:
    """A vision-language checkpoint: a vision tower and a language model in one config."""
    architectures = config.get("architectures")
    return (
        isinstance(architectures, list)
        and bool(architectures)
        and isinstance(config.get("vision_config"), dict)
        and isinstance(config.get("text_config"), dict)
    )


def _hf_llm_source(
    directory: Path,
    config: Mapping[str, Any],
    adapter: Path | None,
    allow_pickle: bool,
    *,
    vision: bool = False,
) -> LlmSource:
    weights, pickled = _weights(directory, allow_pickle)
    if not any((directory / name).is_file() for name in TOKENIZER_VOCABULARIES):
        raise SourceError(
            f"{directory} has no tokenizer (tokenizer.model or tokenizer.json); save it beside "
            "the model with tokenizer.save_pretrained()"
        )
    adapter_weights = None
    if adapter is not None:
        adapter_weights, adapter_pickled = _adapter_weights(adapter, allow_pickle)
        pickled = pickled or adapter_pickled
    text_config = config.get("text_config") if vision else config
    context = text_config.get("max_position_embeddings") if text_config else None
    return LlmSource(
        kind="hf",
        path=directory,
        architecture=str(config["architectures"][0]),
        weights=weights,
        adapter=adapter,
        adapter_weights=adapter_weights,
        uses_pickle=pickled,
        context_length=context if isinstance(context, int) and context > 0 else None,
        chat_template=_hf_chat_template(directory),
        vision=vision,
    )


def _hf_chat_template(directory: Path) -> str | None:
    """The template saved with the tokenizer: chat_template.jinja or tokenizer_config.json."""
    standalone = directory / "chat_template.jinja"
    if standalone.is_file():
        return standalone.read_text(encoding="utf-8")
    config_file = directory / "tokenizer_config.json"
    if not config_file.is_file():
        return None
    template = _read_json(config_file, "tokenizer_config.json").get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}]
        named = {str(t.get("name")): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) and template.strip() else None


def _gguf_source(path: Path, mmproj: Path | None) -> LlmSource:
    info = read_gguf_info(path)
    if info.architecture == "clip":
        raise SourceError(
            f"{path.name} is a projector (mmproj), not a language model; pass the text model "
            f"as the source and this file as --mmproj"
        )
    if mmproj is not None:
        if not mmproj.is_file() or mmproj.suffix.lower() != ".gguf":
            raise SourceError(f"--mmproj {mmproj} is not a .gguf file")
        projector = read_gguf_info(mmproj)
        if projector.architecture != "clip":
            raise SourceError(
                f"--mmproj {mmproj.name} is a {projector.architecture} model, not a projector; "
                "convert the vision tower with convert_hf_to_gguf --mmproj"
            )
    return LlmSource(
        kind="gguf",
        path=path,
        architecture=info.architecture,
        weights=path,
        adapter=None,
        adapter_weights=None,
        uses_pickle=False,
        context_length=info.context_length,
        chat_template=info.chat_template,
        gguf=info,
        vision=mmproj is not None,
        projector=mmproj,
    )


def _weights(directory: Path, allow_pickle: bool) -> tuple[Path, bool]:
    for name in SAFETENSORS_WEIGHTS:
        if (directory / name).is_file():
            return directory / name, False
    for name in PICKLE_WEIGHTS:
        if (directory / name).is_file():
            if not allow_pickle:
                raise SourceError(
                    f"{directory / name} is a pickle checkpoint, which runs code when loaded; "
                    "convert it to safetensors (save_pretrained(safe_serialization=True)) or, "
                    "if you trust its origin, pass --allow-pickle"
                )
            return directory / name, True
    raise SourceError(
        f"{directory} has no model weights (model.safetensors); is the export complete?"
    )


def _adapter_weights(adapter: Path, allow_pickle: bool) -> tuple[Path, bool]:
    if not adapter.is_dir():
        raise SourceError(f"adapter {adapter} is not a directory; pass a PEFT adapter directory")
    config = _read_json(adapter / "adapter_config.json", "the adapter's adapter_config.json")
    if str(config.get("peft_type", "")).upper() != "LORA":
        raise SourceError(
            f"{adapter} is a {config.get('peft_type')!r} adapter; only LoRA is merged"
        )
    for name in ADAPTER_WEIGHTS:
        if (adapter / name).is_file():
            return adapter / name, False
    for name in ADAPTER_PICKLE:
        if (adapter / name).is_file():
            if not allow_pickle:
                raise SourceError(
                    f"{adapter / name} is a pickle; save the adapter with safetensors "
                    "or pass --allow-pickle if you trust it"
                )
            return adapter / name, True
    raise SourceError(f"{adapter} has no adapter weights (adapter_model.safetensors)")


def _hf_labels(config: Mapping[str, Any], directory: Path) -> tuple[str, ...]:
    id2label = config.get("id2label")
    if not isinstance(id2label, Mapping) or not id2label:
        raise SourceError(f"{directory}/config.json has no id2label; set the model's labels")
    try:
        ordered = sorted((int(key), str(value)) for key, value in id2label.items())
    except (TypeError, ValueError) as exc:
        raise SourceError(f"{directory}/config.json: id2label keys must be integers") from exc
    if [index for index, _ in ordered] != list(range(len(ordered))):
        raise SourceError(f"{directory}/config.json: id2label must number labels 0..N-1")
    return _checked_labels([label for _, label in ordered], f"{directory}/config.json")


def _onnx_source(path: Path, model_config: Path | None, labels: Sequence[str] | None) -> OnnxSource:
    _check_onnx_header(path)
    document: dict[str, Any] = {}
    if model_config is not None:
        document = _read_yaml(model_config)
        unknown = set(document) - {"labels", "preprocessing"}
        if unknown:
            raise SourceError(
                f"{model_config}: unknown keys {sorted(unknown)}; use 'labels' and 'preprocessing'"
            )
    chosen = list(labels) if labels else document.get("labels")
    if not chosen:
        raise SourceError(
            f"{path.name}: an ONNX source needs its labels: --labels a,b,c or 'labels:' in --model-config"
        )
    if not isinstance(chosen, list):
        raise SourceError("labels must be a list of strings")
    if "preprocessing" not in document:
        raise SourceError(
            f"{path.name}: an ONNX source needs its preprocessing: 'preprocessing:' in --model-config "
            "(resize, size, crop, rescale, mean/std; see docs/packager.md)"
        )
    try:
        spec = load_spec(document["preprocessing"])
    except PreprocessError as exc:
        raise SourceError(f"{model_config}: {exc}") from exc
    return OnnxSource(path, _checked_labels([str(v) for v in chosen], "labels"), spec)


def _check_onnx_header(path: Path) -> None:
    import onnx
    from onnx.external_data_helper import uses_external_data

    try:
        model = onnx.load(str(path), load_external_data=False)
        onnx.checker.check_model(model)
    except Exception as exc:
        raise SourceError(f"{path.name} is not a valid ONNX model ({exc}); re-export it") from exc
    # External data paths can point anywhere on disk (onnx #3991); a bundle carries one file.
    if any(uses_external_data(tensor) for tensor in model.graph.initializer):
        raise SourceError(
            f"{path.name} keeps weights in external data files; save it as one file "
            "(onnx.save_model(model, path, save_as_external_data=False))"
        )


def _checked_labels(labels: list[str], where: str) -> tuple[str, ...]:
    cleaned = [label.strip() for label in labels]
    if any(not label for label in cleaned):
        raise SourceError(f"{where}: labels may not be empty")
    repeated = sorted({label for label in cleaned if cleaned.count(label) > 1})
    if repeated:
        raise SourceError(f"{where}: labels must be unique; repeated: {repeated}")
    return tuple(cleaned)


def _read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise SourceError(f"{path} is missing: {what} is needed")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SourceError(
            f"{path} is not readable JSON ({exc}); the checkpoint looks corrupt"
        ) from exc
    if not isinstance(value, dict):
        raise SourceError(f"{path} must hold a JSON object")
    return value


def _read_yaml(path: Path) -> dict[str, Any]:
    import yaml

    try:
        value = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise SourceError(f"{path} is not readable YAML ({exc})") from exc
    if not isinstance(value, dict):
        raise SourceError(f"{path} must hold a YAML mapping")
    return value
