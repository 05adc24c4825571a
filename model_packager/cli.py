"""The `model-packager` command line: one parser whose subcommands register themselves, and the
one table that maps the error tree to exit codes."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from edge_bundle.errors import (
    ArchiveError,
    ArchiveLimitError,
    BundleError,
    IntegrityError,
    KeyFileError,
    ManifestError,
    NoticeError,
    RevokedKeyError,
    SignatureError,
    UnsafeMemberError,
    UnsupportedSchemaError,
    UntrustedKeyError,
    WrongRoleError,
)
from model_packager import commands
from model_packager.commands import build, build_anomaly, inspect, keygen, publish, trust, verify
from model_packager.errors import (
    CalibrationError,
    ExportError,
    GateError,
    KnowledgeError,
    PackagerError,
    PublishError,
    QuantizationError,
    SourceError,
)

PROG = "model-packager"
USAGE_EXIT = 2

# Adding a subcommand: write model_packager/commands/NAME.py with `register`, list it here.
COMMANDS: tuple[Callable[[commands.Subparsers], None], ...] = (
    keygen.register,
    verify.register,
    build.register,
    build_anomaly.register,
    inspect.register,
    publish.register,
    trust.register,
)

# The one translation from errors to exit codes; the most specific class in an error's MRO wins.
EXIT_CODES: dict[type[BaseException], tuple[int, str]] = {
    OSError: (3, "a file could not be read or written"),
    BundleError: (10, "another bundle-format error"),
    ManifestError: (11, "the manifest is missing or invalid"),
    UnsupportedSchemaError: (12, "the manifest schema version is unsupported (newer: upgrade)"),
    SignatureError: (13, "a signature is missing, malformed or does not match"),
    UntrustedKeyError: (14, "signed by a key that is not trusted"),
    RevokedKeyError: (15, "signed by a revoked key"),
    WrongRoleError: (16, "signed by a key of the wrong role"),
    IntegrityError: (17, "a file's size or sha256 differs, or a file is missing or extra"),
    ArchiveError: (18, "the archive is unreadable, truncated or not canonical"),
    UnsafeMemberError: (19, "the archive holds a link, device, or unsafe name"),
    ArchiveLimitError: (20, "the archive breaks a size, count or compression-ratio cap"),
    KeyFileError: (21, "a key file is unreadable, invalid, or already exists"),
    NoticeError: (22, "a release or trust notice is invalid"),
    PackagerError: (30, "another packaging error"),
    SourceError: (31, "the model source is missing, corrupt, unsupported or a pickle"),
    ExportError: (32, "exporting the model failed"),
    QuantizationError: (33, "quantization failed or is not allowed by the profile"),
    CalibrationError: (34, "calibration or evaluation images are missing or unusable"),
    KnowledgeError: (35, "the knowledge base is unreadable or names unknown labels"),
    GateError: (36, "a validation or latency gate refused the bundle"),
    PublishError: (37, "the MQTT broker was unreachable, refused the notice, or never acked"),
}


def exit_code_for(exc: BaseException) -> int:
    """The exit code for `exc`, from `EXIT_CODES`."""
    for kind in type(exc).__mro__:
        if kind in EXIT_CODES:
            return EXIT_CODES[kind][0]
    return 1


def _epilog() -> str:
    rows = [f"  {USAGE_EXIT:>3}  the command line is wrong"]
    for code, meaning in sorted(EXIT_CODES.values()):
        rows.append(f"  {code:>3}  {meaning}")
    return "exit codes:\n    0  success\n" + "\n".join(rows)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Build, sign, verify and publish Lineside model bundles.",
        epilog=_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in COMMANDS:
        register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.run(args)
    except (BundleError, PackagerError, OSError) as exc:
        reason = _one_line(exc)
        print(f"{PROG}: {args.command} failed: {reason}", file=sys.stderr)
        return exit_code_for(exc)
    return code


def _one_line(exc: BaseException) -> str:
    """The message on one line; a gate refusal keeps its table of numbers on following lines."""
    if isinstance(exc, GateError):
        return str(exc)
    return " ".join(str(exc).split())


if __name__ == "__main__":
    sys.exit(main())
