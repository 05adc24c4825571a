"""Shared helpers for the edge agent's unit tests.

Trust stores and bundle stores over `tests.agent_support` keys, doctored bundle files (a flipped
byte, no signature, a re-signed manifest with other fields, fp32 reference outputs added),
settings isolated from the developer's environment, and a directory listing for "nothing was left
behind" checks. Plain functions, not fixtures, so each test module states the fixtures it uses.
"""

from __future__ import annotations

import tarfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest
from numpy.typing import NDArray

from edge_agent.device.store import BundleStore
from edge_agent.settings import ENV_PREFIX, AgentSettings, load_settings
from edge_bundle.archive import write_archive
from edge_bundle.bundle import SourceFile, write_bundle
from edge_bundle.manifest import (
    MANIFEST_FILE,
    SIGNATURES_FILE,
    ClassEvaluation,
    GateThreshold,
    Manifest,
    ManifestBody,
    ReferenceCheck,
)
from edge_bundle.preprocess import load_spec, preprocess_bytes
from edge_bundle.scores import to_probabilities
from edge_bundle.signing import TrustStore
from tests.agent_support import SPEC, BuiltBundle, Keys, jpeg

GENERIC_PROFILE = "generic-x86-64-avx2"
ADMIN_TOKEN = "an-admin-token-of-some-length"
_T = TypeVar("_T")


def trust(*keys: Keys, revoked: tuple[str, ...] = ()) -> TrustStore:
    return TrustStore.from_files([k.public for k in keys], revoked=revoked)


def store_for(root: Path, *keys: Keys, allow_unsigned: bool = False) -> BundleStore:
    return BundleStore(root, trust(*keys), allow_unsigned=allow_unsigned)


def members(bundle: Path) -> dict[str, bytes]:
    """Every member of a bundle file, by name."""
    with tarfile.open(bundle) as archive:
        found = {}
        for info in archive.getmembers():
            handle = archive.extractfile(info)
            assert handle is not None
            found[info.name] = handle.read()
        return found


def flip_byte(bundle: Path, member: str, out: Path) -> Path:
    """A copy of `bundle` with one byte in the middle of `member`'s data inverted."""
    data = bytearray(bundle.read_bytes())
    with tarfile.open(bundle) as archive:
        info = archive.getmember(member)
    data[info.offset_data + info.size // 2] ^= 0xFF
    out.write_bytes(bytes(data))
    return out


def unsigned_copy(bundle: Path, out: Path) -> Path:
    """The same bundle rebuilt as a canonical archive without `manifest.sig`."""
    content: dict[str, Path | bytes] = dict(members(bundle))
    del content[SIGNATURES_FILE]
    write_archive(out, content)
    return out


def resigned(
    built: BuiltBundle,
    out: Path,
    files: dict[str, Path | SourceFile] | None = None,
    **changes: Any,
) -> Path:
    """`built` with manifest fields (and `files`) changed, hashed and signed by its own key."""
    manifest = Manifest.from_bytes(members(built.path)[MANIFEST_FILE])
    data = {k: getattr(manifest, k) for k in ManifestBody.model_fields}
    body = ManifestBody.model_validate({**data, **changes})
    return write_bundle(out, {**built.files, **(files or {})}, body, built.keys.key)


REFERENCE_GATES = (
    GateThreshold(name="top1_agreement", minimum=0.9, min_count=8),
    GateThreshold(name="top5_containment", minimum=0.95, min_count=8),
    # Never judged on a dozen inputs: reported, not failed.
    GateThreshold(name="confident_top1_agreement", minimum=0.9, min_count=1000),
)


def reference_outputs(built: BuiltBundle, count: int = 12) -> tuple[dict[str, Path], NDArray[Any]]:
    """`count` JPEG thumbnails and the fp32 probabilities of `built`'s model on them, computed
    through `edge_bundle.preprocess` as the packager computes them."""
    import onnxruntime as ort

    folder = built.path.parent / f"{built.name}-{built.version}-reference"
    folder.mkdir(parents=True, exist_ok=True)
    session = ort.InferenceSession(
        str(built.files["model.onnx"]), providers=["CPUExecutionProvider"]
    )
    spec = load_spec(SPEC)
    inputs, rows = {}, []
    for index in range(count):
        data = jpeg(300 + index, (48, 64))
        path = folder / f"{index:02d}.jpg"
        path.write_bytes(data)
        inputs[f"reference/{index:02d}.jpg"] = path
        logits = session.run(None, {"x": preprocess_bytes(data, spec)})[0]
        rows.append(to_probabilities(logits, "logits")[0])
    return inputs, np.stack(rows).astype(np.float32)


def with_references(
    built: BuiltBundle,
    out: Path,
    *,
    outputs: Callable[[NDArray[Any]], NDArray[Any]] | None = None,
    outputs_file: Path | None = None,
    gates: tuple[GateThreshold, ...] = REFERENCE_GATES,
    expected: tuple[ClassEvaluation, ...] = (),
    count: int = 12,
    garbled: tuple[str, ...] = (),
) -> Path:
    """`built` re-signed with a reference check: thumbnails and their fp32 outputs, changed by
    `outputs` (a function of the true ones) or replaced by the file `outputs_file`; the inputs
    named in `garbled` are replaced by bytes that are no image."""
    inputs, true_outputs = reference_outputs(built, count)
    for name in garbled:
        inputs[name].write_bytes(b"not an image at all")
    if outputs_file is None:
        outputs_file = out.parent / f"{out.stem}-reference.npy"
        np.save(outputs_file, outputs(true_outputs) if outputs else true_outputs)
    check = ReferenceCheck(
        inputs=tuple(inputs),
        outputs_path="reference/outputs.npy",
        gates=gates,
        expected=expected,
    )
    files: dict[str, Path | SourceFile] = {
        name: SourceFile(path, "reference") for name, path in inputs.items()
    }
    files["reference/outputs.npy"] = SourceFile(outputs_file, "reference")
    return resigned(built, out, files=files, reference_check=check)


def files_under(root: Path) -> list[str]:
    """Every file and directory below `root`, relative, sorted."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))


def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Drop settings the developer's shell may carry, so only the test's sources count."""
    import os

    for name in list(os.environ):
        if name.startswith(ENV_PREFIX):
            monkeypatch.delenv(name)
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)


def agent_settings(state_dir: Path, *keys: Keys, **overrides: Any) -> AgentSettings:
    """Settings for an in-process agent: no periodic self-test, one decode thread."""
    values: dict[str, Any] = {
        "state_dir": state_dir,
        "trusted_keys": tuple(k.public for k in keys),
        "selftest_interval_s": 0,
        "decode_threads": 1,
        **overrides,
    }
    empty = state_dir.parent / f"{state_dir.name}-no-credentials"
    empty.mkdir(parents=True, exist_ok=True)
    return load_settings(overrides=values, credentials_dir=empty)


def wait_for(probe: Callable[[], _T | None], what: str, timeout: float = 10.0) -> _T:
    """Poll `probe` until it returns something other than None."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value is not None:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not seen within {timeout} s")
        time.sleep(0.02)
