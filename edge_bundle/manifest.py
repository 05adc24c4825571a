"""The bundle manifest: a versioned, strict pydantic schema, its canonical bytes, and `BundleId`.

`ManifestBody` is everything the packager decides; `Manifest` adds the `files` list that
`edge_bundle.bundle.write_bundle` fills from the hashed files. Both are frozen and refuse unknown
fields. `Manifest.to_bytes` is the one serialisation (sorted keys, UTF-8, indent 2, trailing
newline); `Manifest.from_bytes` refuses a newer schema with a message to upgrade the agent before
it looks at any other field, and reports schema errors as one line naming each field path.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, Literal, Self

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    StrictInt,
    StringConstraints,
    ValidationError,
    model_validator,
)

from edge_bundle.errors import BundleIdError, ManifestError, UnsupportedSchemaError
from edge_bundle.hashing import SHA256_HEX_PATTERN
from edge_bundle.tar_layout import member_name_problem

SCHEMA_VERSION = 1
MANIFEST_FILE = "manifest.json"
SIGNATURES_FILE = "manifest.sig"
RESERVED_PATHS = frozenset({MANIFEST_FILE, SIGNATURES_FILE})
MAX_MANIFEST_BYTES = 4 * 1024 * 1024
NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,63}$"
_SEMVER = re.compile(r"^(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)$")
_SYMBOLIC_DIM = re.compile(r"^[A-Za-z_][A-Za-z0-9_.:-]{0,63}$")
_BUNDLE_ID = re.compile(r"^([a-z0-9][a-z0-9_-]{0,63})@([1-9][0-9]*)$")
_BUNDLE_FILE = re.compile(r"^([a-z0-9][a-z0-9_-]{0,63})-([1-9][0-9]*)\.bundle$")


def _relative_path(value: str) -> str:
    problem = member_name_problem(value)
    if problem is not None:
        raise ValueError(f"path {value!r} {problem}; use a relative POSIX path inside the bundle")
    return value


def _utc(value: datetime) -> datetime:
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError("created_at needs a timezone; give it in UTC, e.g. 2025-01-31T12:00:00Z")
    return value.astimezone(UTC)


def _dimension(value: object) -> int | str:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    if isinstance(value, str) and _SYMBOLIC_DIM.fullmatch(value):
        return value
    raise ValueError(f"{value!r} is not a dimension: use an int >= 1 or a symbolic name")


def _semver(value: str) -> str:
    if _SEMVER.fullmatch(value) is None:
        raise ValueError(f"{value!r} is not a version of the form X.Y.Z (e.g. 0.1.0)")
    return value


Name = Annotated[str, StringConstraints(pattern=NAME_PATTERN)]
Sha256Hex = Annotated[str, StringConstraints(pattern=SHA256_HEX_PATTERN)]
RelativePath = Annotated[str, AfterValidator(_relative_path)]
Text = Annotated[str, StringConstraints(min_length=1, max_length=1024)]
SemVer = Annotated[str, AfterValidator(_semver)]
UtcDatetime = Annotated[datetime, AfterValidator(_utc)]
Count = Annotated[StrictInt, Field(ge=1)]
Millis = Annotated[float, Field(ge=0)]
Dim = Annotated[int | str, PlainValidator(_dimension)]
Task = Literal["image-classification", "text-generation", "vision-language", "anomaly-detection"]
Runtime = Literal["onnx", "llama"]
FileRole = Literal[
    "model",
    "model-data",
    "mmproj",
    "tokenizer",
    "knowledge",
    "golden",
    "reference",
    "report",
    "other",
]
DType = Literal[
    "float32", "float16", "bfloat16", "float64", "int8", "uint8", "int16", "int32", "int64",
    "bool", "string",
]  # fmt: skip


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class FileEntry(_Strict):
    """One file of the bundle, pinned by size and sha256."""

    path: RelativePath
    sha256: Sha256Hex
    size: Annotated[StrictInt, Field(ge=0)]
    role: FileRole


class TensorSpec(_Strict):
    """A model input or output: name, element type and shape (ints or symbolic names)."""

    name: Text
    dtype: DType
    shape: tuple[Dim, ...]


class QuantRecipe(_Strict):
    """The knobs of an int8-static quantization (see docs/quantization.md)."""

    name: Text
    per_channel: bool = True
    reduce_range: bool = False
    symmetric_activations: bool = False
    # Weight scales chosen so that no two adjacent same-sign int8 weights sum past 128: exact
    # on CPUs whose int8 kernels add pairs of products in 16 bits (no VNNI).
    pair_safe_scales: bool = False
    float_nodes: tuple[Text, ...] = ()


class Gate(_Strict):
    """One acceptance gate of validation: a metric against its threshold."""

    name: Text
    threshold: float
    value: float
    passed: bool
    # What the value was counted on and how it was judged (absent in bundles before 2026-12).
    hits: Annotated[StrictInt, Field(ge=0)] | None = None
    count: Annotated[StrictInt, Field(ge=0)] | None = None
    interval: tuple[float, float] | None = None
    judged: bool = True
    basis: str | None = None


EvaluationHow = Literal["native", "exact-arithmetic", "emulated", "not-evaluated"]


class ClassEvaluation(_Strict):
    """The candidate's figures on one CPU class (see `edge_bundle.cpu_class`), and how they were
    obtained: on this class's own hardware, with exact int8 arithmetic (what VNNI/AMX compute),
    under emulation, or not at all."""

    cpu_class: Text
    how: EvaluationHow
    metrics: dict[str, float] = Field(default_factory=dict)
    gates: tuple[Gate, ...] = ()
    note: str | None = None


class RecipeTrial(_Strict):
    """One recipe tried at build time: its figures on each CPU class it was evaluated on."""

    recipe: Text
    evaluations: tuple[ClassEvaluation, ...] = ()
    speedup_vs_fp32: float | None = None
    passed: bool
    note: str | None = None


class Quantization(_Strict):
    """How the model was quantized, and on what calibration data."""

    method: Text
    weight_type: Text | None = None
    activation_type: Text | None = None
    per_channel: bool = False
    calibration_set_sha256: Sha256Hex | None = None
    calibration_method: Text | None = None
    notes: str | None = None
    # The int8 recipe chosen by measurement, and every recipe tried with its figures.
    recipe: QuantRecipe | None = None
    trials: tuple[RecipeTrial, ...] = ()


class Validation(_Strict):
    """Reference-vs-bundle metrics, the gates applied, and any waiver."""

    metrics: dict[str, float] = Field(default_factory=dict)
    gates: tuple[Gate, ...] = ()
    waived_reason: Text | None = None
    dataset: str | None = None
    # Per CPU class: the figures, and which class the gates above judged.
    cpu_classes: tuple[ClassEvaluation, ...] = ()
    judged_class: Text | None = None


class GateThreshold(_Strict):
    """A gate the box re-applies to the reference outputs: threshold and minimum input count."""

    name: Literal["top1_agreement", "confident_top1_agreement", "top5_containment"]
    minimum: Annotated[float, Field(ge=0, le=1)]
    min_count: Annotated[StrictInt, Field(ge=1)]


class ReferenceCheck(_Strict):
    """fp32 reference outputs of small validation images (thumbnails chosen at packaging).

    The box runs the bundle's model on `inputs` with its own kernels before it serves, compares
    its probabilities with `outputs_path` (a float32 .npy of shape (len(inputs), classes), read
    without pickle) and refuses the bundle when agreement is below a gate's interval.
    `expected` holds the build's own figures on these inputs, per CPU class evaluated.
    """

    inputs: tuple[RelativePath, ...] = Field(min_length=1)
    outputs_path: RelativePath
    confident: Annotated[float, Field(gt=0, lt=1)] = 0.5
    gates: tuple[GateThreshold, ...] = Field(min_length=1)
    expected: tuple[ClassEvaluation, ...] = ()


class MachineInfo(_Strict):
    """The machine a benchmark ran on."""

    cpu: Text
    cores: Count
    arch: Text
    os: Text
    library_versions: dict[str, str] = Field(default_factory=dict)


class Benchmark(_Strict):
    """Latency of the bundle under one firmware profile."""

    profile: Name
    machine: MachineInfo
    measured_on_target: bool
    threads: Count
    p50_ms: Millis
    p95_ms: Millis
    samples: Count
    metrics: dict[str, float] = Field(default_factory=dict)


class Lineage(_Strict):
    """Where the model came from."""

    base_model_sha256: Sha256Hex | None = None
    adapter_sha256: Sha256Hex | None = None
    source: str | None = None
    packager_version: SemVer | None = None


class GoldenSample(_Strict):
    """An input shipped in the bundle and the top-k it must produce."""

    input_path: RelativePath
    expected_topk: tuple[tuple[str, float], ...]


class Golden(_Strict):
    """The on-device self-test: samples and the probability tolerance."""

    tolerance: Annotated[float, Field(ge=0)]
    samples: tuple[GoldenSample, ...]


class TextGolden(_Strict):
    """A greedy completion the shipped language model must reproduce on the device."""

    prompt: Annotated[str, StringConstraints(min_length=1, max_length=4000)]
    max_tokens: Annotated[StrictInt, Field(ge=1, le=256)]
    expected_text: Annotated[str, StringConstraints(max_length=4000)]


class ChatTemplate(_Strict):
    """The chat template, pinned: a file of the bundle and its sha256 (rendered sandboxed)."""

    path: RelativePath
    sha256: Sha256Hex
    source: Annotated[str, StringConstraints(min_length=1, max_length=200)]


class VisionGolden(_Strict):
    """A greedy completion of a rendered prompt with images (one marker per image) that the
    shipped text model and projector must reproduce on the device."""

    prompt: Annotated[str, StringConstraints(min_length=1, max_length=4000)]
    images: tuple[RelativePath, ...] = Field(min_length=1, max_length=4)
    max_tokens: Annotated[StrictInt, Field(ge=1, le=256)]
    expected_text: Annotated[str, StringConstraints(max_length=4000)]
    # For a bundle that classifies: the label the photo was given and every label's score (in
    # the order of the manifest's labels), as `Vision.classify_prompt` asked.
    label: Text | None = None
    scores: tuple[Annotated[float, Field(ge=0.0, le=1.0)], ...] = ()


class Vision(_Strict):
    """The image side of a vision-language bundle (task "vision-language"): the projector
    (mmproj GGUF) that turns a photo into the text model's embeddings, how a photo is scaled
    before it (longest side), what one photo costs in context positions, and the marker the chat
    template writes where an image goes."""

    projector: RelativePath
    projector_type: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    embedding_width: Count  # the text model's, which the projector's output must equal
    image_side: Annotated[StrictInt, Field(ge=16, le=4096)]
    image_tokens: Count  # context positions one photo takes (measured when packaged)
    marker: Annotated[str, StringConstraints(min_length=1, max_length=64)] = "<__media__>"
    golden: tuple[VisionGolden, ...] = ()
    # A bundle that classifies: the rendered prompt (one marker) that a label answers; the label
    # is chosen among the manifest's labels by the model's own probabilities.
    classify_prompt: Annotated[str, StringConstraints(min_length=1, max_length=4000)] | None = None


class Generation(_Strict):
    """How a text-generation bundle is run: context, template (None = plain completion only),
    the golden completions, the stop strings, and for a vision-language bundle its projector."""

    context_size: Annotated[StrictInt, Field(ge=128, le=131072)]
    chat_template: ChatTemplate | None = None
    golden: tuple[TextGolden, ...] = ()
    stop: tuple[Annotated[str, StringConstraints(min_length=1, max_length=64)], ...] = ()
    vision: Vision | None = None


Side = Annotated[StrictInt, Field(ge=1, le=8192)]
Rate = Annotated[float, Field(ge=0, le=1)]
ANOMALY_LABELS = ("normal", "anomalous")
ANOMALY_GOLDEN_KEY = "score"


class MemoryBank(_Strict):
    """An anomaly bundle's memory bank: how it is stored and how it was chosen."""

    precision: Literal["float32", "float16"]
    size: Count  # bank entries (patch features) after the coreset
    dim: Count  # channels of one patch feature
    patches_seen: Count  # patches of the good images the coreset was chosen from
    images: Count  # good images whose patches were offered to the coreset
    coreset: Literal["greedy-k-center"] = "greedy-k-center"
    projection_dim: Count | None = None  # random projection the selection ran on


class AnomalyCalibration(_Strict):
    """How the threshold was set: a target false-alarm rate on held-out good images, the
    alarms counted there, and the rate's exact binomial interval at `confidence`."""

    method: Literal["held-out-quantile"] = "held-out-quantile"
    target_false_alarm_rate: Annotated[float, Field(gt=0, lt=1)]
    held_out_good: Count
    false_alarms: Annotated[StrictInt, Field(ge=0)]
    false_alarm_interval: tuple[Rate, Rate]
    confidence: Annotated[float, Field(gt=0, lt=1)] = 0.95
    good_score_p50: Annotated[float, Field(ge=0)]
    good_score_max: Annotated[float, Field(ge=0)]

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        low, high = self.false_alarm_interval
        if self.false_alarms > self.held_out_good:
            raise ValueError("false_alarms cannot exceed held_out_good")
        if low > high:
            raise ValueError("false_alarm_interval must be (low, high) with low <= high")
        return self


class AnomalyEvaluation(_Strict):
    """Figures on labelled defect folders (build-time evaluation only, never in the bank)."""

    good_images: Count
    defect_images: Count
    image_auroc: Rate
    recall: dict[str, Rate]  # per defect folder, at the threshold
    peak_on_mask: Rate | None = None  # share of masked defects whose map peaks on the mask
    masked_images: Annotated[StrictInt, Field(ge=0)] = 0


class AnomalyQuantization(_Strict):
    """The backbone's precision inside an anomaly bundle's one graph (`--quantization`): int8
    (static, calibrated on good images) when its scores matched the float32 graph's within
    `tolerance` x threshold with no verdict changed, and image AUROC fell by at most
    `max_auroc_drop`; the scoring head and the bank stay float. The figures are the build's."""

    backbone: Literal["float32", "int8"]
    requested: Literal["none", "int8", "auto"]
    recipe: Text | None = None
    calibration_images: Annotated[StrictInt, Field(ge=0)] = 0
    compared_images: Annotated[StrictInt, Field(ge=0)] = 0
    tolerance: Annotated[float, Field(gt=0, lt=1)] | None = None
    max_difference: Annotated[float, Field(ge=0)] | None = None  # |int8 - float32| / threshold
    swapped_pairs: Annotated[StrictInt, Field(ge=0)] | None = None
    flipped_verdicts: Annotated[StrictInt, Field(ge=0)] | None = None
    max_auroc_drop: Rate | None = None
    auroc_float32: Rate | None = None
    auroc_int8: Rate | None = None
    p50_ms_float32: Annotated[float, Field(ge=0)] | None = None  # the graph alone, build machine
    p50_ms_int8: Annotated[float, Field(ge=0)] | None = None
    speedup: Annotated[float, Field(gt=0)] | None = None  # median of rounds, float32 / int8 p50
    reason: Text
    inherited_from: Count | None = None  # an update keeps the earlier version's backbone

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.backbone == "int8" and self.requested == "none":
            raise ValueError("an int8 backbone needs --quantization int8 or auto")
        return self


class Anomaly(_Strict):
    """What an anomaly-detection bundle needs beside its model: PatchCore over a backbone's
    mid-level features. The model takes `preprocessing` (top level) at `input_size` and
    outputs `score_output` (N,) and `score_map_output` (N, h, w) of `score_map_size`, each
    map cell covering input_size / score_map_size pixels; a score above `threshold` is
    anomalous. Golden samples (top-level `golden`) carry one pair ("score", value)."""

    method: Literal["patchcore"] = "patchcore"
    backbone: Text
    backbone_sha256: Sha256Hex
    feature_layers: tuple[Text, ...] = Field(min_length=1)
    aggregation: Literal["avgpool3x3"] = "avgpool3x3"
    input_size: tuple[Side, Side]
    source_size: tuple[Side, Side] | None = None  # the (h, w) every training photo had
    score_map_size: tuple[Side, Side]
    score_output: Text = "score"
    score_map_output: Text = "score_map"
    threshold: Annotated[float, Field(gt=0)]
    memory_bank: MemoryBank
    calibration: AnomalyCalibration
    evaluation: AnomalyEvaluation | None = None
    # Parity of the bundle (ONNX Runtime) with the reference scorer, relative to the threshold.
    parity_tolerance: Annotated[float, Field(gt=0, lt=1)]
    parity_max_difference: Annotated[float, Field(ge=0)]
    # The held-out good images' patch features (float16 .npy), for `build-anomaly --update`.
    calibration_features: RelativePath | None = None
    updated_from: Count | None = None  # the version this one extended
    quantization: AnomalyQuantization | None = None  # None: built before the option existed

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if any(m > i for m, i in zip(self.score_map_size, self.input_size, strict=True)):
            raise ValueError("score_map_size cannot exceed input_size")
        if self.score_output == self.score_map_output:
            raise ValueError("score_output and score_map_output must differ")
        return self


class ManifestBody(_Strict):
    """Everything in a manifest except `files`: what the packager decides before hashing."""

    schema_version: StrictInt = SCHEMA_VERSION
    name: Name
    version: Count
    created_at: UtcDatetime
    task: Task
    runtime: Runtime
    inputs: tuple[TensorSpec, ...] = ()
    outputs: tuple[TensorSpec, ...] = ()
    # Slot for `edge_bundle.preprocess.PreprocessSpec`, wired in once that module lands.
    preprocessing: dict[str, Any] | None = None
    labels: tuple[str, ...] = ()
    quantization: Quantization | None = None
    validation: Validation | None = None
    benchmarks: tuple[Benchmark, ...] = ()
    compatible_profiles: tuple[Name, ...] = ()
    lineage: Lineage | None = None
    drift_baseline: dict[str, Any] | None = None
    golden: Golden | None = None
    reference_check: ReferenceCheck | None = None
    min_agent_version: SemVer = "0.1.0"
    knowledge_path: RelativePath | None = None
    # Text generation (runtime "llama"): how to run it and what it must reproduce.
    generation: Generation | None = None
    # A classifier may name the text-generation bundle that explains its answers.
    explainer: Name | None = None
    # A classifier may name the anomaly-detection bundle that runs in front of it (its gate):
    # the agent's `anomaly_gates` setting overrides it per station.
    anomaly_gate: Name | None = None
    # Anomaly detection (task "anomaly-detection"): threshold, score map, memory bank.
    anomaly: Anomaly | None = None
    extra: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check_body(self) -> Self:
        if self.schema_version != SCHEMA_VERSION:
            raise ValueError(f"schema_version must be {SCHEMA_VERSION} for this packager")
        _check_unique("labels", self.labels)
        _check_unique("compatible_profiles", self.compatible_profiles)
        vision = self.generation.vision if self.generation is not None else None
        if (self.task == "vision-language") != (vision is not None):
            raise ValueError(
                "a vision-language bundle (and only one) has generation.vision: its projector"
            )
        if vision is not None and (self.runtime != "llama" or self.generation is None):
            raise ValueError("a vision-language bundle runs on runtime 'llama'")
        if vision is not None and vision.classify_prompt is not None and not self.labels:
            raise ValueError("a vision-language bundle that classifies needs its labels")
        for golden in vision.golden if vision is not None else ():
            if golden.scores and len(golden.scores) != len(self.labels):
                raise ValueError("a golden's scores must give one score per label")
        _check_anomaly(self)
        return self

    @property
    def bundle_id(self) -> BundleId:
        return BundleId(self.name, self.version)

    @classmethod
    def from_data(cls, data: Mapping[str, Any]) -> Self:
        """Validate plain data; schema problems raise `ManifestError` in one line."""
        try:
            return cls.model_validate(dict(data))
        except ValidationError as exc:
            raise ManifestError(f"invalid manifest: {describe_errors(exc)}") from exc


class Manifest(ManifestBody):
    """A complete manifest: the body plus every file of the bundle."""

    files: tuple[FileEntry, ...]

    @model_validator(mode="after")
    def _check_files(self) -> Self:
        paths = [entry.path for entry in self.files]
        _check_unique("files", paths)
        reserved = RESERVED_PATHS.intersection(paths)
        if reserved:
            raise ValueError(f"files may not list {sorted(reserved)}; those names are reserved")
        if not any(entry.role == "model" for entry in self.files):
            raise ValueError("files must include at least one file with role 'model'")
        referenced = [self.knowledge_path] if self.knowledge_path else []
        if self.generation is not None and self.generation.chat_template is not None:
            referenced.append(self.generation.chat_template.path)
        vision = self.generation.vision if self.generation is not None else None
        if vision is not None:
            referenced.append(vision.projector)
            referenced += [path for golden in vision.golden for path in golden.images]
        referenced += [s.input_path for s in (self.golden.samples if self.golden else ())]
        if self.reference_check is not None:
            referenced += [*self.reference_check.inputs, self.reference_check.outputs_path]
        if self.anomaly is not None and self.anomaly.calibration_features is not None:
            referenced.append(self.anomaly.calibration_features)
        missing = sorted(set(referenced) - set(paths))
        if missing:
            raise ValueError(f"{missing} are referenced but not listed in files; add them")
        return self

    @classmethod
    def from_body(cls, body: ManifestBody, files: tuple[FileEntry, ...]) -> Manifest:
        """`body` completed with `files` (any files already in `body` are replaced)."""
        data = {k: getattr(body, k) for k in ManifestBody.model_fields}
        return cls.from_data({**data, "files": files})

    def file(self, path: str) -> FileEntry | None:
        return next((entry for entry in self.files if entry.path == path), None)

    def to_bytes(self) -> bytes:
        """The canonical JSON of this manifest: sorted keys, UTF-8, indent 2, final newline."""
        data = self.model_dump(mode="json")
        for newer in ("anomaly", "anomaly_gate"):  # earlier manifests stay byte-for-byte
            if data.get(newer) is None:
                data.pop(newer, None)
        text = json.dumps(data, sort_keys=True, indent=2, ensure_ascii=False)
        return (text + "\n").encode("utf-8")

    @classmethod
    def from_bytes(cls, data: bytes) -> Manifest:
        """Parse stored manifest bytes; any problem raises `ManifestError` in one line."""
        if len(data) > MAX_MANIFEST_BYTES:
            raise ManifestError(f"{MANIFEST_FILE} is over {MAX_MANIFEST_BYTES} bytes; rebuild it")
        try:
            document = json.loads(data.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
        except ValueError as exc:
            raise ManifestError(f"{MANIFEST_FILE} is not UTF-8 JSON ({exc}); rebuild it") from exc
        if not isinstance(document, dict):
            raise ManifestError(f"{MANIFEST_FILE} must hold a JSON object; rebuild the bundle")
        check_schema_version(document.get("schema_version"))
        try:
            return cls.model_validate_json(data)
        except ValidationError as exc:
            raise ManifestError(f"invalid {MANIFEST_FILE}: {describe_errors(exc)}") from exc


def _check_anomaly(body: ManifestBody) -> None:
    """An anomaly-detection bundle (and only one) has an `anomaly` section, runs on ONNX, has
    its preprocessing, labels normal/anomalous, the outputs it names, and golden scores."""
    anomaly = body.anomaly
    if (body.task == "anomaly-detection") != (anomaly is not None):
        raise ValueError("an anomaly-detection bundle (and only one) has an 'anomaly' section")
    if anomaly is None:
        return
    if body.runtime != "onnx":
        raise ValueError("an anomaly-detection bundle runs on runtime 'onnx'")
    if body.preprocessing is None:
        raise ValueError("an anomaly-detection bundle needs its preprocessing")
    if body.labels not in ((), ANOMALY_LABELS):
        raise ValueError(f"an anomaly-detection bundle's labels are {list(ANOMALY_LABELS)}")
    names = {spec.name for spec in body.outputs}
    wanted = {anomaly.score_output, anomaly.score_map_output}
    if body.outputs and not wanted <= names:
        raise ValueError(f"outputs must include {sorted(wanted)} (the anomaly section names them)")
    for sample in body.golden.samples if body.golden is not None else ():
        if [key for key, _ in sample.expected_topk] != [ANOMALY_GOLDEN_KEY]:
            raise ValueError(
                f"an anomaly golden sample expects exactly one ({ANOMALY_GOLDEN_KEY!r}, value)"
            )


def check_schema_version(value: object) -> int:
    """Accept the current schema version; refuse newer ones with a message to upgrade."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise ManifestError(f"schema_version must be an integer, got {value!r}; rebuild the bundle")
    if value > SCHEMA_VERSION:
        raise UnsupportedSchemaError(
            f"manifest schema_version {value} is newer than this agent understands "
            f"({SCHEMA_VERSION}); upgrade the agent to open this bundle"
        )
    if value < SCHEMA_VERSION:
        raise UnsupportedSchemaError(
            f"manifest schema_version {value} is not supported (this agent reads "
            f"{SCHEMA_VERSION}); rebuild the bundle with a current model-packager"
        )
    return value


def describe_errors(exc: ValidationError) -> str:
    """Pydantic errors as one line: `field.path: reason; other.path: reason`."""
    return "; ".join(f"{_location(e['loc'])}: {e['msg']}" for e in exc.errors())


def _location(loc: tuple[int | str, ...]) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else f".{part}" if text else str(part)
    return text or "manifest"


def _check_unique(field: str, values: list[str] | tuple[str, ...]) -> None:
    duplicates = sorted({v for v in values if values.count(v) > 1})
    if duplicates:
        raise ValueError(f"{field} must be unique; repeated: {duplicates}")


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise ValueError("duplicate keys in a JSON object")
    return result


def semver_tuple(text: str) -> tuple[int, int, int]:
    """`"1.2.3"` as `(1, 2, 3)`, for comparing `min_agent_version` with an agent's version."""
    match = _SEMVER.fullmatch(text)
    if match is None:
        raise ManifestError(f"{text!r} is not a version of the form X.Y.Z")
    major, minor, patch = (int(part) for part in match.groups())
    return major, minor, patch


@dataclass(frozen=True)
class BundleId:
    """A bundle's identity, `name@version`; its file is `NAME-VERSION.bundle`."""

    name: str
    version: int

    def __post_init__(self) -> None:
        if re.fullmatch(NAME_PATTERN, self.name) is None:
            raise BundleIdError(
                f"bundle name {self.name!r} must be 1-64 lowercase letters, digits, '-' or '_', "
                f"starting with a letter or digit"
            )
        if isinstance(self.version, bool) or not isinstance(self.version, int):
            raise BundleIdError(f"bundle version must be an integer, got {self.version!r}")
        if self.version < 1:
            raise BundleIdError(f"bundle version must be 1 or more, got {self.version}")

    @classmethod
    def parse(cls, text: str) -> BundleId:
        """Parse `name@3`."""
        match = _BUNDLE_ID.fullmatch(text)
        if match is None:
            raise BundleIdError(f"{text!r} is not a bundle id; write it as NAME@VERSION, e.g. m@3")
        return cls(match.group(1), int(match.group(2)))

    @classmethod
    def from_file_name(cls, file_name: str) -> BundleId:
        """Parse `name-3.bundle`."""
        match = _BUNDLE_FILE.fullmatch(file_name)
        if match is None:
            raise BundleIdError(f"{file_name!r} is not a bundle file name (NAME-VERSION.bundle)")
        return cls(match.group(1), int(match.group(2)))

    @property
    def file_name(self) -> str:
        return f"{self.name}-{self.version}.bundle"

    def __str__(self) -> str:
        return f"{self.name}@{self.version}"
