"""`model-packager build-anomaly`, the driver: the cheap checks (options, output name, profile,
signing key, the backbone or the earlier bundle), the fit (`build.fit_new` or
`update.fit_update`) and the shared finish in a private work directory, then signing and writing.

The only things written to the output folder are the finished, signed bundle (atomically) and
its report beside it; any refusal leaves the folder as it was.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from edge_bundle.bundle import SourceFile, VerifiedBundle, open_bundle, write_bundle
from edge_bundle.errors import BundleError
from edge_bundle.files import write_atomically
from edge_bundle.manifest import BundleId
from edge_bundle.profiles import load_profile
from edge_bundle.signing import KeyRole, SigningKey, TrustStore, read_signing_key
from model_packager.anomaly.backbone import load_backbone
from model_packager.anomaly.build import fit_new
from model_packager.anomaly.finish import Contents, finish
from model_packager.anomaly.options import AnomalyOptions
from model_packager.anomaly.update import fit_update
from model_packager.errors import PackagerError, SourceError
from model_packager.progress import Progress


@dataclass(frozen=True)
class AnomalyResult:
    bundle: Path
    report: Path
    summary: tuple[str, ...]
    seconds: float


def build_anomaly(
    options: AnomalyOptions, progress: Progress, packager_version: str
) -> AnomalyResult:
    """Build (or update) an anomaly bundle; raise a `PackagerError` or `BundleError` saying
    what to fix, with nothing written."""
    started = time.perf_counter()
    options.check()
    key = _bundle_key(options.key)
    profile = load_profile(options.profile)
    with tempfile.TemporaryDirectory(prefix="model-packager-anomaly-") as tmp:
        work = Path(tmp)
        if options.update is not None:
            old = _open_old(options, key, work / "old")
            bundle_id = _next_id(options, old)
            _check_free(options.out, bundle_id)
            fit = fit_update(options, old, bundle_id, profile, work, progress)
        else:
            assert options.name is not None
            bundle_id = BundleId(options.name, options.version or 1)
            _check_free(options.out, bundle_id)
            progress.step(f"loading the backbone {options.backbone}")
            backbone = load_backbone(options.backbone)
            fit = fit_new(options, backbone, bundle_id, profile, work, progress)
        contents = finish(fit, options, work, progress, packager_version, started)
        bundle, report = _write(options.out, bundle_id, key, contents, work, progress)
    seconds = time.perf_counter() - started
    summary = (f"bundle      {bundle}", f"report      {report}", *contents.summary)
    return AnomalyResult(bundle, report, summary, seconds)


def _open_old(options: AnomalyOptions, key: SigningKey, staging: Path) -> VerifiedBundle:
    assert options.update is not None
    if not options.update.is_file():
        raise SourceError(f"--update {options.update}: no such bundle file")
    trust = TrustStore.from_files(options.trust) if options.trust else TrustStore((key.public,))
    staging.mkdir()
    try:
        return open_bundle(options.update, trust, staging)
    except BundleError as exc:
        raise SourceError(
            f"--update {options.update} cannot be used: {exc}; give the earlier anomaly bundle "
            "as built (and --trust PUB when another key signed it)"
        ) from exc


def _next_id(options: AnomalyOptions, old: VerifiedBundle) -> BundleId:
    previous = old.manifest.bundle_id
    if options.name is not None and options.name != previous.name:
        raise PackagerError(f"--name {options.name}: an update keeps the name {previous.name}")
    version = options.version or previous.version + 1
    if version <= previous.version:
        raise PackagerError(f"--version {version} must be above the earlier {previous.version}")
    return BundleId(previous.name, version)


def _check_free(out: Path, bundle_id: BundleId) -> None:
    if (out / bundle_id.file_name).exists():
        raise PackagerError(
            f"{out / bundle_id.file_name} already exists and bundle versions are immutable; "
            f"use --version {bundle_id.version + 1}"
        )


def _write(
    out: Path,
    bundle_id: BundleId,
    key: SigningKey,
    contents: Contents,
    work: Path,
    progress: Progress,
) -> tuple[Path, Path]:
    """The report into the bundle, then the signed bundle (atomically) and the report beside."""
    report_in_bundle = work / "report.html"
    report_in_bundle.write_text(contents.report_html, encoding="utf-8")
    files = {**contents.files, "report.html": SourceFile(report_in_bundle, "report")}
    out.mkdir(parents=True, exist_ok=True)
    bundle = out / bundle_id.file_name
    report = out / f"{bundle_id.name}-{bundle_id.version}.report.html"
    progress.step(f"signing and writing {bundle.name}")
    write_bundle(bundle, files, contents.body, key)
    write_atomically(report, contents.report_html.encode())
    return bundle, report


def _bundle_key(path: Path) -> SigningKey:
    key = read_signing_key(path)
    if key.role is not KeyRole.BUNDLE:
        raise PackagerError(
            f"{path} is a {key.role.value} key; bundles are signed with a bundle key "
            "(model-packager keygen --role bundle)"
        )
    return key
