"""Firmware (hardware) profiles: the schema and the TOML loader.

A profile says, for one class of box, which ONNX Runtime execution providers to try and in what
order, how many threads the runtimes get, which quantizations a bundle may use, and the memory,
latency and size budgets a bundle must meet. The packager benchmarks and validates against a
profile; the agent configures its runtimes from one. The files live in `firmware_profiles/`;
`firmware_profiles/README.md` is the field reference.

Everything that can go wrong while loading a profile is raised as `ProfileError` with one message
naming the file, the field path (e.g. `onnx.intra_op_threads`) and the reason. Comparing a
profile with the machine at hand is `edge_bundle.profile_host`.
"""

from __future__ import annotations

import difflib
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails

from edge_bundle.errors import ProfileError
from firmware_profiles import PROFILE_DIR

FIELD_REFERENCE = "firmware_profiles/README.md"

Arch = Literal["x86_64", "aarch64"]
# Only features that change which kernels ONNX Runtime / llama.cpp dispatch to.
X86_FEATURES = (
    "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx_vnni",
    "amx_tile", "amx_int8", "amx_bf16",
)  # fmt: skip
ARM_FEATURES = ("neon", "dotprod", "fp16", "i8mm", "sve", "bf16")
FEATURES_BY_ARCH: dict[str, tuple[str, ...]] = {"x86_64": X86_FEATURES, "aarch64": ARM_FEATURES}

ExecutionProvider = Literal[
    "TensorrtExecutionProvider",
    "CUDAExecutionProvider",
    "ROCMExecutionProvider",
    "MIGraphXExecutionProvider",
    "OpenVINOExecutionProvider",
    "DnnlExecutionProvider",
    "QNNExecutionProvider",
    "ACLExecutionProvider",
    "ArmNNExecutionProvider",
    "XnnpackExecutionProvider",
    "CoreMLExecutionProvider",
    "DmlExecutionProvider",
    "CPUExecutionProvider",
]
CPU_PROVIDER = "CPUExecutionProvider"
# Providers that only run with a GPU of this vendor present.
PROVIDER_GPU_VENDOR = {
    "TensorrtExecutionProvider": "nvidia",
    "CUDAExecutionProvider": "nvidia",
    "ROCMExecutionProvider": "amd",
    "MIGraphXExecutionProvider": "amd",
}

OnnxQuantization = Literal["int8-static", "int8-dynamic", "fp16", "none"]
GgufQuantization = Literal["q4_k_m", "q5_k_m", "q8_0", "f16"]
Quantization = Literal[OnnxQuantization, GgufQuantization]

PositiveInt = Annotated[int, Field(gt=0)]
NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9-]*$")


class _RuleError(ValueError):
    """A cross-field rule failed; `path` is relative to the model that checked it."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class _Section(BaseModel):
    # strict: a TOML string "2" where a number belongs is a mistake, not something to coerce.
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)


class CpuSpec(_Section):
    arch: Arch
    features: tuple[str, ...] = Field(strict=False)
    cores: PositiveInt

    @field_validator("features")
    @classmethod
    def _features_fit_arch(cls, features: tuple[str, ...], info: ValidationInfo) -> tuple[str, ...]:
        arch = info.data.get("arch")
        if arch is None:
            return features
        known = FEATURES_BY_ARCH[arch]
        for feature in features:
            if feature in known:
                continue
            other = next((a for a, names in FEATURES_BY_ARCH.items() if feature in names), None)
            what = f"an {other} feature" if other else "not a known feature"
            raise ValueError(f"'{feature}' is {what}; {arch} profiles may list: {', '.join(known)}")
        if len(set(features)) != len(features):
            raise ValueError("a feature is listed twice; list each once")
        return features


class OnnxSpec(_Section):
    execution_providers: tuple[ExecutionProvider, ...] = Field(strict=False, min_length=1)
    intra_op_threads: PositiveInt
    inter_op_threads: PositiveInt
    allow_spinning: bool
    graph_optimization: Literal["disable", "basic", "extended", "all"]
    provider_options: dict[str, dict[str, Any]] = Field(default_factory=dict)

    @field_validator("execution_providers")
    @classmethod
    def _cpu_is_the_last_fallback(
        cls, providers: tuple[ExecutionProvider, ...]
    ) -> tuple[ExecutionProvider, ...]:
        if len(set(providers)) != len(providers):
            raise ValueError("a provider is listed twice; list each once, in order of preference")
        if providers[-1] != CPU_PROVIDER:
            raise ValueError(
                f"'{CPU_PROVIDER}' must come last, as the fallback for operators the other "
                f"providers cannot run (got {list(providers)})"
            )
        return providers

    @field_validator("provider_options")
    @classmethod
    def _options_name_listed_providers(
        cls, options: dict[str, dict[str, Any]], info: ValidationInfo
    ) -> dict[str, dict[str, Any]]:
        listed = info.data.get("execution_providers", ())
        for provider, values in options.items():
            if listed and provider not in listed:
                raise ValueError(
                    f"options given for '{provider}', which is not in execution_providers; "
                    "add it there or remove its options"
                )
            for key, value in values.items():
                if not isinstance(value, str | int | bool):
                    raise ValueError(
                        f"{provider}.{key} = {value!r}: option values must be strings, "
                        "integers or booleans"
                    )
        return options


class LlamaSpec(_Section):
    threads: PositiveInt
    threads_batch: PositiveInt
    gpu_layers: int = Field(ge=-1, description="layers offloaded to the GPU; -1 = all, 0 = none")
    context_size: int = Field(ge=256, le=131072)
    build: Literal["portable", "native", "cuda"]


class QuantizationSpec(_Section):
    allowed: tuple[Quantization, ...] = Field(strict=False, min_length=1)
    preferred_onnx: OnnxQuantization
    preferred_gguf: GgufQuantization

    @field_validator("preferred_onnx", "preferred_gguf")
    @classmethod
    def _preferred_is_allowed(cls, preferred: str, info: ValidationInfo) -> str:
        allowed = info.data.get("allowed")
        if allowed is not None and preferred not in allowed:
            raise ValueError(
                f"'{preferred}' is not in quantization.allowed {list(allowed)}; "
                "add it there or prefer an allowed one"
            )
        return preferred


class BudgetsSpec(_Section):
    memory_mb: PositiveInt
    latency_p95_ms: PositiveInt
    max_bundle_mb: PositiveInt

    @field_validator("max_bundle_mb")
    @classmethod
    def _bundle_fits_in_memory(cls, max_bundle_mb: int, info: ValidationInfo) -> int:
        memory_mb = info.data.get("memory_mb")
        if memory_mb is not None and max_bundle_mb > memory_mb:
            raise ValueError(
                f"{max_bundle_mb} MB exceeds budgets.memory_mb ({memory_mb} MB): a bundle "
                "larger than the memory budget could never be loaded"
            )
        return max_bundle_mb


class GpuSpec(_Section):
    vendor: Literal["nvidia", "intel", "amd"]
    model: str = Field(min_length=1)
    memory_mb: PositiveInt
    unified_memory: bool = False


class HardwareProfile(_Section):
    """One class of box, as the packager targets it and the agent configures itself for it."""

    name: str = Field(pattern=NAME_PATTERN.pattern)
    description: str = Field(min_length=1)
    schema_version: Literal[1]
    cpu: CpuSpec
    onnx: OnnxSpec
    llama: LlamaSpec
    quantization: QuantizationSpec
    budgets: BudgetsSpec
    gpu: GpuSpec | None = None

    @model_validator(mode="after")
    def _cross_section_rules(self) -> HardwareProfile:
        self._check_threads_fit_cores()
        self._check_gpu_is_declared()
        return self

    def _check_threads_fit_cores(self) -> None:
        counts = {
            "onnx.intra_op_threads": self.onnx.intra_op_threads,
            "onnx.inter_op_threads": self.onnx.inter_op_threads,
            "llama.threads": self.llama.threads,
            "llama.threads_batch": self.llama.threads_batch,
        }
        for path, count in counts.items():
            if count > self.cpu.cores:
                raise _RuleError(
                    path,
                    f"{count} threads exceeds cpu.cores ({self.cpu.cores}); oversubscribed "
                    "threads only add contention, use at most one per core",
                )

    def _check_gpu_is_declared(self) -> None:
        vendor = self.gpu.vendor if self.gpu else None
        for provider in self.onnx.execution_providers:
            needed = PROVIDER_GPU_VENDOR.get(provider)
            if needed and vendor != needed:
                raise _RuleError(
                    "onnx.execution_providers",
                    f'{provider} needs a [gpu] section with vendor = "{needed}" (got {vendor})',
                )
        openvino = self.onnx.provider_options.get("OpenVINOExecutionProvider", {})
        ov_device = str(openvino.get("device_type", "CPU"))
        if ov_device.startswith("GPU") and vendor != "intel":
            raise _RuleError(
                "onnx.provider_options.OpenVINOExecutionProvider.device_type",
                f"'{ov_device}' needs a [gpu] section with vendor = \"intel\" (got {vendor})",
            )
        if self.llama.build == "cuda" and vendor != "nvidia":
            raise _RuleError(
                "llama.build",
                f"'cuda' needs a [gpu] section with vendor = \"nvidia\" (got {vendor})",
            )
        if self.llama.gpu_layers != 0 and self.llama.build != "cuda":
            raise _RuleError(
                "llama.gpu_layers",
                f"{self.llama.gpu_layers} offloads layers, but llama.build = "
                f"'{self.llama.build}' has no GPU backend; set gpu_layers = 0 or build = 'cuda'",
            )


# ---------------------------------------------------------------------------- loading


def known_profile_names(directory: Path = PROFILE_DIR) -> list[str]:
    """The names of the profiles shipped in `directory`, sorted."""
    return sorted(path.stem for path in directory.glob("*.toml"))


def load_profile(name_or_path: str | Path, directory: Path = PROFILE_DIR) -> HardwareProfile:
    """Load a profile by name (looked up in `directory`) or from a path to a `.toml` file."""
    path = _resolve(name_or_path, directory)
    data = _read_toml(path)
    profile = parse_profile(data, source=str(path))
    if profile.name != path.stem:
        raise ProfileError(
            f"firmware profile {path} is invalid: name: '{profile.name}' must match the file "
            f"name '{path.stem}'; rename the file or the profile"
        )
    return profile


def load_all_profiles(directory: Path = PROFILE_DIR) -> dict[str, HardwareProfile]:
    """Every profile in `directory`, by name; the first invalid one raises `ProfileError`."""
    return {
        name: load_profile(directory / f"{name}.toml") for name in known_profile_names(directory)
    }


def parse_profile(data: Mapping[str, Any], source: str = "<profile>") -> HardwareProfile:
    """Validate already-parsed TOML data; `source` names it in error messages."""
    try:
        return HardwareProfile.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(_describe(error) for error in exc.errors())
        raise ProfileError(
            f"firmware profile {source} is invalid: {problems}. "
            f"See {FIELD_REFERENCE} for every field and its allowed values."
        ) from None


def _resolve(name_or_path: str | Path, directory: Path) -> Path:
    text = str(name_or_path)
    if isinstance(name_or_path, Path) or "/" in text or text.endswith(".toml"):
        path = Path(name_or_path)
        if not path.is_file():
            raise ProfileError(f"firmware profile file {path} does not exist; check the path")
        return path
    path = directory / f"{text}.toml"
    if not NAME_PATTERN.match(text) or not path.is_file():
        known = ", ".join(known_profile_names(directory)) or "(none)"
        raise ProfileError(
            f"unknown firmware profile '{text}'; known profiles: {known}. "
            "Pass one of these names or a path to a .toml file."
        )
    return path


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as stream:
            return tomllib.load(stream)
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError(
            f"firmware profile {path} is not valid TOML: {exc}; fix the syntax there"
        ) from None
    except OSError as exc:
        raise ProfileError(f"cannot read firmware profile {path}: {exc.strerror}") from None


def _field_path(loc: tuple[int | str, ...]) -> str:
    """`("onnx", "execution_providers", 0)` -> `onnx.execution_providers[0]`."""
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else f".{part}" if path else part
    return path


def _describe(error: ErrorDetails) -> str:
    cause = error.get("ctx", {}).get("error")
    if isinstance(cause, _RuleError):
        return f"{_field_path((*error['loc'], cause.path))}: {cause.reason}"
    path = _field_path(error["loc"]) or "(top level)"
    if error["type"] == "extra_forbidden":
        return f"{path}: unknown field{_suggest(error['loc'])}"
    if error["type"] == "missing":
        return f"{path}: required field is missing"
    if isinstance(cause, ValueError):
        return f"{path}: {cause}"
    return f"{path}: {error['msg']} (got {error['input']!r})"


def _suggest(loc: tuple[int | str, ...]) -> str:
    """'; did you mean ...' for a misspelt field, or the list of fields allowed there."""
    model: type[BaseModel] | None = HardwareProfile
    for part in loc[:-1]:
        model = _nested_model(model, str(part)) if model else None
    if model is None:
        return ""
    allowed = list(model.model_fields)
    close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
    if close:
        return f"; did you mean '{close[0]}'?"
    return f"; allowed here: {', '.join(allowed)}"


def _nested_model(model: type[BaseModel], name: str) -> type[BaseModel] | None:
    """The section model behind `model.name` (unwrapping `X | None`), if it is one."""
    info = model.model_fields.get(name)
    if info is None:
        return None
    for candidate in (info.annotation, *get_args(info.annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None
