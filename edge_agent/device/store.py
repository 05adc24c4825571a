"""The bundle store on disk: every installed version side by side, one active per model name.

    STORE/bundles/NAME/VERSION/        an extracted, verified bundle (never modified after install)
    STORE/bundles/NAME/VERSION.json    install record: bundle sha256, signer, when
    STORE/bundles/NAME/VERSION.reference.json   the reference check's outcome at install, if run
    STORE/active/NAME                  symlink -> ../bundles/NAME/VERSION, swapped atomically
    STORE/staging/                     extraction in progress (cleared at start)

`stage` verifies a bundle file (signature, then every file's hash) while extracting it into
staging and only then renames it into place, so a half-written or tampered bundle never appears
under `bundles/`. `activate` replaces the `active` symlink with one `rename`, so readers see the
old version or the new one, never neither. A lock file serialises installs from the CLI and the
running agent. Versions are immutable: the same name and version with different content is refused.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from edge_agent.errors import BundleRejectedError, ConfigError, UnknownModelError
from edge_bundle.archive import ArchiveLimits
from edge_bundle.bundle import VerifiedBundle, open_bundle, verify_directory
from edge_bundle.errors import BundleError
from edge_bundle.files import fsync_directory, write_atomically
from edge_bundle.manifest import BundleId, Manifest
from edge_bundle.signing import TrustStore


@dataclass(frozen=True)
class InstallRecord:
    """What the store remembers about how a version got there."""

    bundle_sha256: str
    signer_key_id: str | None
    installed_at: str

    def to_json(self) -> bytes:
        return json.dumps(self.__dict__, sort_keys=True).encode()


class BundleStore:
    """Installed bundles under `root`; see the module docstring for the layout."""

    def __init__(
        self,
        root: Path,
        trust: TrustStore,
        *,
        allow_unsigned: bool = False,
        limits: ArchiveLimits | None = None,
    ) -> None:
        self.root = root
        self.trust = trust
        self.allow_unsigned = allow_unsigned
        self.limits = limits
        for sub in ("bundles", "active", "staging"):
            (root / sub).mkdir(parents=True, exist_ok=True)

    # ---- reading -------------------------------------------------------------------------
    def active_names(self) -> list[str]:
        return sorted(link.name for link in (self.root / "active").iterdir() if link.is_symlink())

    def active_version(self, name: str) -> int | None:
        link = self.root / "active" / name
        if not link.is_symlink():
            return None
        return int(link.readlink().name)

    def versions(self, name: str) -> list[int]:
        folder = self.root / "bundles" / name
        if not folder.is_dir():
            return []
        return sorted(int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit())

    def open(self, name: str, version: int) -> VerifiedBundle:
        """An installed version, verified again against today's trust (keys may be revoked)."""
        directory = self._directory(BundleId(name, version))
        if not directory.is_dir():
            raise UnknownModelError(
                f"{name}@{version} is not installed; installed versions: {self.versions(name)}"
            )
        record = self.record(name, version)
        try:
            return verify_directory(
                directory, self.trust, record.bundle_sha256, allow_unsigned=self.allow_unsigned
            )
        except BundleError as exc:
            raise BundleRejectedError(
                f"installed bundle {name}@{version} failed checks: {exc}"
            ) from exc

    def installed_manifest(self, name: str, version: int) -> Manifest | None:
        """An installed bundle's manifest, parsed but not verified (for sizes); None if unreadable."""
        path = self._directory(BundleId(name, version)) / "manifest.json"
        try:
            return Manifest.from_bytes(path.read_bytes())
        except (OSError, BundleError):
            return None

    def task_of(self, name: str, version: int) -> str | None:
        """The manifest's task, read without verifying (only to label a failure); None if unreadable."""
        path = self._directory(BundleId(name, version)) / "manifest.json"
        try:
            task = json.loads(path.read_bytes()).get("task")
        except (OSError, ValueError, AttributeError):
            return None
        return task if isinstance(task, str) else None

    def record(self, name: str, version: int) -> InstallRecord:
        path = self._directory(BundleId(name, version)).with_suffix(".json")
        try:
            return InstallRecord(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError) as exc:
            raise BundleRejectedError(
                f"the install record {path} is unreadable ({exc}); install {name}@{version} again"
            ) from exc

    def reference_check(self, name: str, version: int) -> dict[str, Any] | None:
        """The reference check's outcome recorded at install; None when none is (readable)."""
        path = self._reference_path(BundleId(name, version))
        try:
            report = json.loads(path.read_bytes())
        except (OSError, ValueError):
            return None
        return report if isinstance(report, dict) else None

    # ---- writing -------------------------------------------------------------------------
    def save_reference_check(self, name: str, version: int, report: dict[str, Any]) -> None:
        """Record the reference check's outcome beside the install record (the bundle's own
        directory is never modified)."""
        bundle_id = BundleId(name, version)
        if not self._directory(bundle_id).is_dir():
            raise UnknownModelError(f"{bundle_id} is not installed")
        write_atomically(self._reference_path(bundle_id), json.dumps(report).encode())

    def stage(
        self, bundle_file: Path, check: Callable[[VerifiedBundle], None] | None = None
    ) -> VerifiedBundle:
        """Verify `bundle_file` and add it to the store (not active yet); return it. `check`
        looks at the verified contents first: what it raises leaves nothing in the store.

        Installing the very same bundle again is a no-op that returns the installed copy.
        """
        with self._locked():
            try:
                verified = open_bundle(
                    bundle_file,
                    self.trust,
                    self.root / "staging",
                    self.limits,
                    allow_unsigned=self.allow_unsigned,
                )
            except BundleError as exc:
                raise BundleRejectedError(f"{bundle_file.name} refused: {exc}") from exc
            if check is not None:
                try:
                    check(verified)
                except BaseException:
                    verified.discard()
                    raise
            target = self._directory(verified.bundle_id)
            if target.exists():
                verified.discard()
                existing = self.record(verified.manifest.name, verified.manifest.version)
                if existing.bundle_sha256 != verified.bundle_sha256:
                    raise BundleRejectedError(
                        f"{verified.bundle_id} is already installed with different content; "
                        "versions are immutable, so build the new one with a higher --version"
                    )
                return self.open(verified.manifest.name, verified.manifest.version)
            record = InstallRecord(
                verified.bundle_sha256, verified.signer_key_id, datetime.now(UTC).isoformat()
            )
            target.parent.mkdir(parents=True, exist_ok=True)
            write_atomically(target.with_suffix(".json"), record.to_json())
            verified.directory.rename(target)
            fsync_directory(target.parent)
            return VerifiedBundle(
                target,
                verified.manifest,
                verified.manifest_bytes,
                verified.signer_key_id,
                verified.bundle_sha256,
            )

    def activate(self, name: str, version: int) -> None:
        """Make `name@version` the active one with a single atomic rename."""
        with self._locked():
            bundle_id = BundleId(name, version)
            if not self._directory(bundle_id).is_dir():
                raise UnknownModelError(f"{bundle_id} is not installed; install it first")
            link = self.root / "active" / name
            temporary = link.with_name(f".{name}.{os.getpid()}.tmp")
            temporary.unlink(missing_ok=True)
            temporary.symlink_to(Path("..") / "bundles" / name / str(version))
            temporary.replace(link)
            fsync_directory(link.parent)

    def remove(self, name: str, version: int) -> None:
        """Delete an installed version that is not active."""
        with self._locked():
            if self.active_version(name) == version:
                raise ConfigError(f"{name}@{version} is active; activate another version first")
            directory = self._directory(BundleId(name, version))
            shutil.rmtree(directory, ignore_errors=True)
            directory.with_suffix(".json").unlink(missing_ok=True)
            self._reference_path(BundleId(name, version)).unlink(missing_ok=True)

    def deactivate(self, name: str) -> None:
        """Serve no version of `name` any more (a first install that was rolled back)."""
        with self._locked():
            link = self.root / "active" / name
            link.unlink(missing_ok=True)
            fsync_directory(link.parent)

    def prune(self, name: str, keep: int) -> list[int]:
        """Remove all but the newest `keep` versions (never the active one); returns the removed."""
        active = self.active_version(name)
        versions = self.versions(name)
        doomed = [v for v in versions[: max(0, len(versions) - keep)] if v != active]
        for version in doomed:
            self.remove(name, version)
        return doomed

    def clear_staging(self) -> None:
        """Remove leftovers of installs interrupted by a crash or power loss."""
        with self._locked():
            for leftover in (self.root / "staging").iterdir():
                shutil.rmtree(leftover, ignore_errors=True)

    def _directory(self, bundle_id: BundleId) -> Path:
        return self.root / "bundles" / bundle_id.name / str(bundle_id.version)

    def _reference_path(self, bundle_id: BundleId) -> Path:
        return self._directory(bundle_id).with_suffix(".reference.json")

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with (self.root / ".lock").open("a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
