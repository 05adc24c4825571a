"""The committed demo network and the demo's own photos, for tests that need the real thing.

`resign_demo` repackages demo/bundle/defects-1.bundle (EfficientNet-Lite0 int8, classes ok,
scratch, crack, pit, stain) under a test's bundle key — the demo key's private half is not in
the repository — as any version, optionally relabelled: the same network with some of its label
names permuted in the manifest, its golden expectations renamed the same way, so it still passes
the golden self-test and installs fine, yet answers another class wherever the permutation
moves one. `demo_photos` draws photos with demo/make_demo.py's generator, at the demo's size.
`start_script` and `read_banner` run scripts/demo and scripts/fleet-demo up to their banner.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import time
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


def start_script(script: str, env: Mapping[str, str], *args: str) -> subprocess.Popen[bytes]:
    """scripts/`script` started in the repository, in a process group of its own (to be stopped
    with SIGINT to the group), its output piped."""
    return subprocess.Popen(
        [str(ROOT / "scripts" / script), *args],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip


def read_banner(process: subprocess.Popen[bytes], lines: list[str], timeout: float = 120) -> str:
    """The script's output up to its "Ctrl-C stops it" line, each line also added to `lines`;
    fails when the script exits first or takes longer than `timeout`."""
    assert process.stdout is not None
    deadline = time.monotonic() + timeout
    while not any("Ctrl-C stops it" in line for line in lines):
        line = process.stdout.readline().decode(errors="replace")
        if not line and process.poll() is not None:
            command = process.args if isinstance(process.args, list) else [process.args]
            raise AssertionError(f"scripts/{Path(str(command[0])).name} exited:\n" + "".join(lines))
        lines.append(line)
        assert time.monotonic() < deadline, "".join(lines)
    return "".join(lines)


def banner_and_rest(lines: list[str], process: subprocess.Popen[bytes]) -> str:
    """Everything the script printed: `lines` read so far, then the rest of its output."""
    assert process.stdout is not None
    return "".join(lines) + process.stdout.read().decode(errors="replace")
