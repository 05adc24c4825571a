"""`model-packager build`, the driver: the cheap checks shared by every source (output name,
profile, signing key, the source and the options it takes), then the pipeline for the source's
kind in a private work directory (`vision.package_vision` for image classifiers,
`llm.package.package_llm` for language models), then signing and writing what it returns.

The only things written to the output folder are the finished, signed bundle (atomically, by
`edge_bundle.bundle.write_bundle`) and its report beside it. Any failure (a bad input, a refused
gate) leaves the output folder as it was. Cheap checks run before the slow ones.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from edge_bundle.bundle import SourceFile, write_bundle
from edge_bundle.files import write_atomically
from edge_bundle.manifest import BundleId, ManifestBody
from edge_bundle.profile_host import matches_host
from edge_bundle.profiles import HardwareProfile, load_profile
from edge_bundle.signing import KeyRole, SigningKey, read_signing_key
from model_packager.errors import PackagerError
from model_packager.llm.package import package_llm
from model_packager.llm.plan import LlmPlan
from model_packager.options import BuildOptions, OutputPaths, check_options
from model_packager.progress import Progress
from model_packager.sources import AnySource, LlmSource, resolve_source
from model_packager.vision import VisionPlan, package_vision, plan_vision

PACKAGER_VERSION = "0.1.0"


@dataclass(frozen=True)
class BuildResult:
    bundle: Path
    report: Path
    warnings: tuple[str, ...]
    summary: tuple[str, ...]


def build(options: BuildOptions, progress: Progress) -> BuildResult:
    """Run the whole build; raise a `PackagerError` or `BundleError` saying what to fix."""
    bundle_id = BundleId(options.name, options.version)
    paths = OutputPaths(options.out, bundle_id)
    if paths.bundle.exists():
        raise PackagerError(
            f"{paths.bundle} already exists and bundle versions are "
            f"immutable; build --version {options.version + 1}"
        )
    profile = load_profile(options.profile)
    key = _bundle_key(options.key)
    source = _source(options, progress)
    plan = None
    if not isinstance(source, LlmSource):
        plan = plan_vision(options, source, profile, bundle_id, PACKAGER_VERSION)
    options.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="model-packager-") as tmp:
        if plan is not None:
            return _run_vision(plan, paths, key, Path(tmp), progress)
        assert isinstance(source, LlmSource)
        return _run_llm(options, paths, profile, key, source, Path(tmp), progress)


def _source(options: BuildOptions, progress: Progress) -> AnySource:
    """The source, with the options that only one kind of source takes checked against it."""
    progress.step("checking the source")
    source = resolve_source(
        options.source,
        adapter=options.adapter,
        model_config=options.model_config,
        labels=options.labels,
        allow_pickle=options.allow_pickle,
        mmproj=options.mmproj,
    )
    check_options(options, source)
    return source


def _run_vision(
    plan: VisionPlan, paths: OutputPaths, key: SigningKey, work: Path, progress: Progress
) -> BuildResult:
    contents = package_vision(plan, work, progress)
    _write_outputs(paths, key, contents.files, contents.body, contents.report_html, work, progress)
    summary = (f"bundle      {paths.bundle}", f"report      {paths.report}", *contents.summary)
    return BuildResult(paths.bundle, paths.report, tuple(plan.warnings), summary)


def _run_llm(
    options: BuildOptions,
    paths: OutputPaths,
    profile: HardwareProfile,
    key: SigningKey,
    source: LlmSource,
    work: Path,
    progress: Progress,
) -> BuildResult:
    host = matches_host(profile)
    plan = LlmPlan.from_options(options, source, profile, paths.bundle_id, host, PACKAGER_VERSION)
    contents = package_llm(plan, work, progress)
    _write_outputs(paths, key, contents.files, contents.body, contents.report_html, work, progress)
    summary = (f"bundle      {paths.bundle}", f"report      {paths.report}", *contents.summary)
    return BuildResult(paths.bundle, paths.report, (), summary)


def _write_outputs(
    paths: OutputPaths,
    key: SigningKey,
    files: dict[str, Path | SourceFile],
    body: ManifestBody,
    report: str,
    work: Path,
    progress: Progress,
) -> None:
    """Put the report into the bundle, sign and write the bundle, then the report beside it."""
    report_in_bundle = work / "report.html"
    report_in_bundle.write_text(report, encoding="utf-8")
    files = {**files, "report.html": SourceFile(report_in_bundle, "report")}
    progress.step(f"signing and writing {paths.bundle.name}")
    write_bundle(paths.bundle, files, body, key)
    write_atomically(paths.report, report.encode())


def _bundle_key(path: Path) -> SigningKey:
    key = read_signing_key(path)
    if key.role is not KeyRole.BUNDLE:
        raise PackagerError(
            f"{path} is a {key.role.value} key; bundles are signed with a bundle key "
            "(model-packager keygen --role bundle)"
        )
    return key
