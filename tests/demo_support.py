"""The committed demo network and the demo's own photos, for tests that need the real thing.

`resign_demo` repackages demo/bundle/defects-1.bundle (EfficientNet-Lite0 int8, classes ok,
scratch, crack, pit, stain) under a test's bundle key — the demo key's private half is not in
the repository — as any version, optionally relabelled: the same network with some of its label
names permuted in the manifest, its golden expectations renamed the same way, so it still passes
the golden self-test and installs fine, yet answers another class wherever the permutation
moves one. `demo_photos` draws photos with demo/make_demo.py's generator, at the demo's size.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from types import ModuleType

from edge_bundle.bundle import SourceFile, open_bundle, write_bundle
from edge_bundle.manifest import Golden, GoldenSample, ManifestBody
from edge_bundle.signing import SigningKey, TrustStore

ROOT = Path(__file__).resolve().parents[1]
DEMO_BUNDLE = ROOT / "demo" / "bundle" / "defects-1.bundle"
DEMO_KEY = ROOT / "demo" / "keys" / "demo.pub"


@cache
def make_demo() -> ModuleType:
    """demo/make_demo.py as a module (demo/ is a folder of scripts, not a package)."""
    if "make_demo" in sys.modules:
        return sys.modules["make_demo"]
    spec = importlib.util.spec_from_file_location("make_demo", ROOT / "demo" / "make_demo.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["make_demo"] = module
    spec.loader.exec_module(module)
    return module


def demo_photos(seed: int, count: int) -> list[tuple[str, bytes]]:
    """`count` JPEG photos (label drawn, bytes), the classes in turn, from the demo's generator.

    make_demo draws its training, validation, calibration and eval sets with seeds 1-4; use
    another seed."""
    demo = make_demo()
    labels: tuple[str, ...] = tuple(demo.LABELS)
    return [
        (labels[n % len(labels)], demo.seeded_photo(seed, n % len(labels), n)) for n in range(count)
    ]


def resign_demo(
    out_dir: Path,
    key: SigningKey,
    version: int,
    relabel: Mapping[str, str] | None = None,
) -> Path:
    """The demo bundle as `defects-<version>.bundle` signed with `key`; `relabel` (old name ->
    new name, a permutation of the demo's labels) renames its classes and golden expectations."""
    staging = out_dir / f"demo-{version}-src"
    staging.mkdir(parents=True, exist_ok=True)
    demo = open_bundle(DEMO_BUNDLE, TrustStore.from_files([DEMO_KEY]), staging)
    manifest = demo.manifest
    rename = dict(relabel or {})
    assert sorted(rename) == sorted(rename.values()), f"{rename} is not a permutation"
    assert set(rename) <= set(manifest.labels), f"{rename} names labels the demo lacks"

    def renamed(label: str) -> str:
        return rename.get(label, label)

    golden = manifest.golden
    if golden is not None:
        golden = Golden(
            tolerance=golden.tolerance,
            samples=tuple(
                GoldenSample(
                    input_path=sample.input_path,
                    expected_topk=tuple((renamed(a), p) for a, p in sample.expected_topk),
                )
                for sample in golden.samples
            ),
        )
    fields = {name: getattr(manifest, name) for name in ManifestBody.model_fields}
    body = ManifestBody.from_data(
        {
            **fields,
            "version": version,
            "labels": tuple(renamed(label) for label in manifest.labels),
            "golden": golden,
        }
    )
    files = {entry.path: SourceFile(demo.path(entry.path), entry.role) for entry in manifest.files}
    return write_bundle(out_dir / f"defects-{version}.bundle", files, body, key)
