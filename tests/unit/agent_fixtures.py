"""Shared helpers for the edge agent's unit tests.

Trust stores and bundle stores over `tests.agent_support` keys, doctored bundle files (a flipped
byte, no signature, a re-signed manifest with other fields), settings isolated from the developer's
environment, and a directory listing for "nothing was left behind" checks. Plain functions, not
fixtures, so each test module states the fixtures it uses.
"""

from __future__ import annotations

import tarfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from edge_agent.settings import ENV_PREFIX, AgentSettings, load_settings
from edge_agent.store import BundleStore
from edge_bundle.archive import write_archive
from edge_bundle.bundle import write_bundle
from edge_bundle.manifest import MANIFEST_FILE, SIGNATURES_FILE, Manifest, ManifestBody
from edge_bundle.signing import TrustStore
from tests.agent_support import BuiltBundle, Keys

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
    built: BuiltBundle, out: Path, files: dict[str, Path] | None = None, **changes: Any
) -> Path:
    """`built` with manifest fields (and `files`) changed, hashed and signed by its own key."""
    manifest = Manifest.from_bytes(members(built.path)[MANIFEST_FILE])
    data = {k: getattr(manifest, k) for k in ManifestBody.model_fields}
    body = ManifestBody.model_validate({**data, **changes})
    return write_bundle(out, {**built.files, **(files or {})}, body, built.keys.key)


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
