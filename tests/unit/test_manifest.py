"""The manifest schema: canonical round trip, schema versioning, field validation, BundleId."""

from __future__ import annotations

import dataclasses
import json
from datetime import UTC, datetime
from typing import Any

import pytest
from pydantic import ValidationError

from edge_bundle.errors import BundleIdError, ManifestError, UnsupportedSchemaError
from edge_bundle.manifest import (
    SCHEMA_VERSION,
    BundleId,
    FileEntry,
    Manifest,
    ManifestBody,
    semver_tuple,
)

SHA_A = "a" * 64
SHA_B = "b" * 64


def full_manifest_data() -> dict[str, Any]:
    """A manifest with every optional section filled in."""
    return {
        "schema_version": SCHEMA_VERSION,
        "name": "weld-defects",
        "version": 7,
        "created_at": "2025-03-04T05:06:07.123456Z",
        "task": "image-classification",
        "runtime": "onnx",
        "files": [
            {"path": "model.onnx", "sha256": SHA_A, "size": 1234, "role": "model"},
            {"path": "knowledge.json", "sha256": SHA_B, "size": 10, "role": "knowledge"},
            {"path": "golden/ok-1.jpg", "sha256": SHA_B, "size": 0, "role": "golden"},
        ],
        "inputs": [{"name": "pixel_values", "dtype": "float32", "shape": ["batch", 3, 224, 224]}],
        "outputs": [{"name": "logits", "dtype": "float32", "shape": ["batch", 3]}],
        "preprocessing": {"resize": 256, "crop": 224, "mean": [0.5, 0.5, 0.5]},
        "labels": ["ok", "porosity", "crack"],
        "quantization": {
            "method": "static-qdq",
            "weight_type": "int8",
            "activation_type": "uint8",
            "per_channel": True,
            "calibration_set_sha256": SHA_A,
            "calibration_method": "entropy",
            "notes": "quant_pre_process applied",
        },
        "validation": {
            "metrics": {"top1_reference": 0.91, "top1_bundle": 0.905},
            "gates": [{"name": "top1_drop", "threshold": 0.01, "value": 0.005, "passed": True}],
            "waived_reason": None,
            "dataset": "held-out line 3 photos, 2025-02",
        },
        "benchmarks": [
            {
                "profile": "x86-2core",
                "machine": {
                    "cpu": "Xeon",
                    "cores": 2,
                    "arch": "x86_64",
                    "os": "Linux 6.1",
                    "library_versions": {"onnxruntime": "1.20.0"},
                },
                "measured_on_target": False,
                "threads": 2,
                "p50_ms": 3.5,
                "p95_ms": 4.25,
                "samples": 200,
                "metrics": {"rss_mb": 80.0},
            }
        ],
        "compatible_profiles": ["x86-2core", "arm64-4core"],
        "lineage": {
            "base_model_sha256": SHA_A,
            "adapter_sha256": None,
            "source": "vit-tiny fine-tuned on line 3",
            "packager_version": "0.1.0",
        },
        "drift_baseline": {"mean_confidence": 0.87},
        "golden": {
            "tolerance": 0.02,
            "samples": [{"input_path": "golden/ok-1.jpg", "expected_topk": [["ok", 0.97]]}],
        },
        "min_agent_version": "0.1.0",
        "knowledge_path": "knowledge.json",
        "extra": {"ticket": "QA-12", "nested": {"a": [1, 2]}},
    }


def encode(data: dict[str, Any]) -> bytes:
    return json.dumps(data).encode()


def test_round_trip_is_byte_identical() -> None:
    manifest = Manifest.from_bytes(encode(full_manifest_data()))
    stored = manifest.to_bytes()
    again = Manifest.from_bytes(stored)
    assert again == manifest
    assert again.to_bytes() == stored
    assert stored.endswith(b"}\n")
    document = json.loads(stored)
    assert list(document) == sorted(document)
    assert stored.startswith(b'{\n  "benchmarks"')  # indent 2, sorted


def test_parsed_values_are_typed() -> None:
    manifest = Manifest.from_bytes(encode(full_manifest_data()))
    assert manifest.created_at == datetime(2025, 3, 4, 5, 6, 7, 123456, tzinfo=UTC)
    assert manifest.inputs[0].shape == ("batch", 3, 224, 224)
    assert manifest.golden is not None
    assert manifest.golden.samples[0].expected_topk == (("ok", 0.97),)
    assert manifest.bundle_id == BundleId("weld-defects", 7)
    assert manifest.file("model.onnx") == FileEntry(
        path="model.onnx", sha256=SHA_A, size=1234, role="model"
    )


def test_non_utc_time_is_normalised_to_utc() -> None:
    data = full_manifest_data() | {"created_at": "2025-03-04T07:06:07+02:00"}
    manifest = Manifest.from_bytes(encode(data))
    assert manifest.created_at == datetime(2025, 3, 4, 5, 6, 7, tzinfo=UTC)
    assert b'"created_at": "2025-03-04T05:06:07Z"' in manifest.to_bytes()


def test_unicode_is_stored_as_utf8() -> None:
    data = full_manifest_data() | {"labels": ["ok", "Porosität", "裂纹"]}
    stored = Manifest.from_bytes(encode(data)).to_bytes()
    assert "Porosität".encode() in stored
    assert Manifest.from_bytes(stored).labels == ("ok", "Porosität", "裂纹")


def test_newer_schema_is_refused_with_upgrade_advice() -> None:
    data = full_manifest_data() | {"schema_version": SCHEMA_VERSION + 1, "new_field": 1}
    with pytest.raises(UnsupportedSchemaError, match="upgrade the agent"):
        Manifest.from_bytes(encode(data))


@pytest.mark.parametrize("value", [0, -1, "1", True, None])
def test_other_schema_versions_are_refused(value: object) -> None:
    with pytest.raises(ManifestError, match="schema_version"):
        Manifest.from_bytes(encode(full_manifest_data() | {"schema_version": value}))


def _set(path: str, value: object) -> dict[str, Any]:
    data = full_manifest_data()
    target: Any = data
    keys = path.split(".")
    for key in keys[:-1]:
        target = target[int(key)] if isinstance(target, list) else target[key]
    last = keys[-1]
    if isinstance(target, list):
        target[int(last)] = value
    else:
        target[last] = value
    return data


BAD_FIELDS = [
    ("name", "Weld Defects", "name"),
    ("name", "-leading-dash", "name"),
    ("name", "x" * 65, "name"),
    ("version", 0, "version"),
    ("version", "7", "version"),
    ("created_at", "2025-03-04T05:06:07", "created_at"),
    ("task", "object-detection", "task"),
    ("runtime", "tflite", "runtime"),
    ("files.0.sha256", "A" * 64, "files[0].sha256"),
    ("files.0.sha256", "a" * 63, "files[0].sha256"),
    ("files.0.path", "../model.onnx", "files[0].path"),
    ("files.0.path", "/model.onnx", "files[0].path"),
    ("files.0.path", "models\\model.onnx", "files[0].path"),
    ("files.0.path", "a//b", "files[0].path"),
    ("files.0.size", -1, "files[0].size"),
    ("files.0.role", "weights", "files[0].role"),
    ("files.0.extra", "x", "files[0].extra"),
    ("inputs.0.dtype", "float", "inputs[0].dtype"),
    ("inputs.0.shape", [0, 3], "inputs[0].shape[0]"),
    ("quantization.calibration_set_sha256", "nope", "quantization.calibration_set_sha256"),
    ("benchmarks.0.threads", 0, "benchmarks[0].threads"),
    ("benchmarks.0.p95_ms", -1.0, "benchmarks[0].p95_ms"),
    ("min_agent_version", "1.2", "min_agent_version"),
    ("lineage.packager_version", "v1", "lineage.packager_version"),
    ("golden.tolerance", -0.1, "golden.tolerance"),
    ("surprise", 1, "surprise"),
]


@pytest.mark.parametrize(("path", "value", "named"), BAD_FIELDS)
def test_bad_field_is_refused_naming_the_field(path: str, value: object, named: str) -> None:
    with pytest.raises(ManifestError) as info:
        Manifest.from_bytes(encode(_set(path, value)))
    message = str(info.value)
    assert "\n" not in message
    assert f"{named}:" in message


@pytest.mark.parametrize(
    ("data_change", "reason"),
    [
        ({"labels": ["ok", "ok"]}, "labels must be unique"),
        ({"compatible_profiles": ["a", "a"]}, "compatible_profiles must be unique"),
        ({"knowledge_path": "kb.json"}, "not listed in files"),
        ({"files": []}, "role 'model'"),
    ],
)
def test_cross_field_rules(data_change: dict[str, Any], reason: str) -> None:
    with pytest.raises(ManifestError, match=reason):
        Manifest.from_bytes(encode(full_manifest_data() | data_change))


def test_duplicate_and_reserved_file_paths_are_refused() -> None:
    data = full_manifest_data()
    data["files"].append(dict(data["files"][0]))
    with pytest.raises(ManifestError, match="files must be unique"):
        Manifest.from_bytes(encode(data))
    data = full_manifest_data()
    data["files"].append({"path": "manifest.sig", "sha256": SHA_A, "size": 1, "role": "other"})
    with pytest.raises(ManifestError, match="reserved"):
        Manifest.from_bytes(encode(data))


@pytest.mark.parametrize(
    "raw",
    [
        b"\xff\xfe{}",
        b"[1, 2]",
        b"not json",
        b'{"schema_version": 1, "schema_version": 1}',
        json.dumps(full_manifest_data()).encode("utf-16"),
        b'{"schema_version": 1, "validation": {"metrics": {"x": NaN}}}',
    ],
)
def test_malformed_documents_are_manifest_errors(raw: bytes) -> None:
    with pytest.raises(ManifestError):
        Manifest.from_bytes(raw)


def test_nan_metric_is_refused() -> None:
    data = _set("validation.metrics", {"x": float("nan")})
    with pytest.raises(ManifestError, match=r"validation\.metrics\.x"):
        Manifest.from_bytes(encode(data))


def test_models_are_frozen() -> None:
    manifest = Manifest.from_bytes(encode(full_manifest_data()))
    with pytest.raises(ValidationError):
        manifest.version = 8


def test_body_plus_files_makes_a_manifest() -> None:
    full = Manifest.from_bytes(encode(full_manifest_data()))
    body = ManifestBody.from_data({k: getattr(full, k) for k in ManifestBody.model_fields})
    assert Manifest.from_body(body, full.files) == full
    with pytest.raises(ManifestError, match="not listed in files"):
        Manifest.from_body(body, full.files[:1])


def test_from_data_reports_manifest_errors() -> None:
    with pytest.raises(ManifestError, match="version"):
        ManifestBody.from_data(
            {
                "name": "m",
                "version": 0,
                "created_at": datetime.now(UTC),
                "task": "text-generation",
                "runtime": "llama",
            }
        )


def test_bundle_id_parse_format_and_file_name() -> None:
    bundle_id = BundleId.parse("weld-defects@12")
    assert bundle_id == BundleId("weld-defects", 12)
    assert str(bundle_id) == "weld-defects@12"
    assert bundle_id.file_name == "weld-defects-12.bundle"
    assert BundleId.from_file_name("weld-defects-12.bundle") == bundle_id
    with pytest.raises(dataclasses.FrozenInstanceError):
        bundle_id.version = 13  # type: ignore[misc]


@pytest.mark.parametrize("text", ["m", "m@", "@3", "m@0", "m@03", "M@3", "m@3@4", "m@-1", "m@x"])
def test_bad_bundle_ids_are_refused(text: str) -> None:
    with pytest.raises(BundleIdError):
        BundleId.parse(text)


def test_bad_bundle_id_values_are_refused() -> None:
    with pytest.raises(BundleIdError):
        BundleId("m", 0)
    with pytest.raises(BundleIdError):
        BundleId("m", True)
    with pytest.raises(BundleIdError):
        BundleId("Bad Name", 1)
    with pytest.raises(BundleIdError):
        BundleId.from_file_name("m-1.tar")


def test_semver_tuple() -> None:
    assert semver_tuple("0.10.2") == (0, 10, 2)
    assert semver_tuple("0.10.2") > semver_tuple("0.9.9")
    with pytest.raises(ManifestError):
        semver_tuple("1.2")


def _vision_language(**vision: Any) -> dict[str, Any]:
    data = full_manifest_data()
    data.update(task="vision-language", runtime="llama", labels=["scratch", "dent"])
    data["files"] = [
        {"path": "model.gguf", "sha256": "a" * 64, "size": 1, "role": "model"},
        {"path": "mmproj.gguf", "sha256": "b" * 64, "size": 1, "role": "mmproj"},
        {"path": "golden/v0.png", "sha256": "c" * 64, "size": 1, "role": "golden"},
    ]
    for key in ("golden", "knowledge_path", "reference_check", "inputs", "outputs"):
        data.pop(key, None)
    golden = {"prompt": "U: <__media__>?", "images": ["golden/v0.png"], "max_tokens": 4,
              "expected_text": " dent", "label": "dent", "scores": [0.2, 0.8]}  # fmt: skip
    data["generation"] = {
        "context_size": 512,
        "vision": {"projector": "mmproj.gguf", "projector_type": "idefics3",
                   "embedding_width": 64, "image_side": 64, "image_tokens": 8,
                   "golden": [golden], "classify_prompt": "U: <__media__>? A:", **vision},
    }  # fmt: skip
    return data


def test_a_vision_language_manifest_names_its_projector_and_goldens() -> None:
    manifest = Manifest.from_bytes(encode(_vision_language()))
    assert manifest.generation is not None and manifest.generation.vision is not None
    assert manifest.generation.vision.golden[0].scores == (0.2, 0.8)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"task": "text-generation"}, r"a vision-language bundle \(and only one\)"),
        ({"labels": []}, "that classifies needs its labels"),
        ({"labels": ["scratch", "dent", "crack"]}, "one score per label"),
        ({"files": "no-projector"}, "are referenced but not listed"),
    ],
)
def test_vision_language_rules(change: dict[str, Any], reason: str) -> None:
    data = _vision_language()
    if change.get("files") == "no-projector":
        data["files"] = [f for f in data["files"] if f["role"] != "mmproj"]
    else:
        data.update(change)
    with pytest.raises(ManifestError, match=reason):
        Manifest.from_bytes(encode(data))
