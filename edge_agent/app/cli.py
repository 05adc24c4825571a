"""The `edge-agent` command line: the device-side entry point.

    edge-agent serve    [--config FILE] [options]   run the agent (HTTP; SIGTERM drains)
    edge-agent install  BUNDLE [--no-activate]      verify, self-test, reference-check, activate
    edge-agent models                               what the store holds and what is active
    edge-agent export-feedback --out DIR            technicians' feedback as a retraining dataset
    edge-agent doctor                               check this installation can run the agent

Every option of `serve`, `install` and `models` is also a setting (config file, EDGE_AGENT_*
environment variables); options win. Exit codes: 0 ok, 1 doctor failed, 2 usage, 3 settings,
4 bundle refused.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edge_agent import __version__
from edge_agent.app.preflight import PreflightError, check_single_ort
from edge_agent.errors import AgentError, BundleRejectedError, ConfigError
from edge_agent.settings import AgentSettings, load_settings

EXIT_SETTINGS = 3
EXIT_REFUSED = 4


def _doctor(_args: argparse.Namespace) -> int:
    try:
        flavour = check_single_ort()
    except PreflightError as exc:
        print(f"edge-agent: {exc}", file=sys.stderr)
        return 1
    print(f"onnx runtime: {flavour.name} {flavour.version}")
    return 0


def _settings(args: argparse.Namespace) -> AgentSettings:
    overrides: dict[str, Any] = {
        "state_dir": args.state_dir,
        "profile": args.profile,
        "trusted_keys": tuple(args.trusted_key) if args.trusted_key else None,
        "allow_unsigned_bundles": True if args.allow_unsigned_bundles else None,
        "log_level": args.log_level,
    }
    for name in ("host", "port", "tls_certfile", "tls_keyfile", "max_in_flight"):
        overrides[name] = getattr(args, name, None)
    return load_settings(args.config, overrides)


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _serve(args: argparse.Namespace) -> int:
    from edge_agent.app.server import serve

    settings = _settings(args)
    _configure_logging(settings.log_level)
    serve(settings)
    return 0


def _install(args: argparse.Namespace) -> int:
    from edge_agent.app.agent import build_profile, build_store
    from edge_agent.device.install import Candidate, stage_and_prepare
    from edge_agent.engine.reference_check import not_carried_warning

    settings = _settings(args)
    _configure_logging(settings.log_level)
    store = build_store(settings)
    profile = build_profile(settings)
    candidate = stage_and_prepare(
        store, args.bundle, profile, settings.cache_dir, settings.memory_budget_mb, warn=False
    )
    manifest = candidate.bundle.manifest
    report = candidate.selftest
    print(
        f"verified {manifest.bundle_id} (signed by {candidate.bundle.signer_key_id or 'nobody'}); "
        f"golden self-test passed: {report.samples} samples, max deviation "
        f"{report.max_deviation:.2e} <= {report.tolerance}"
    )
    if isinstance(candidate, Candidate):
        if candidate.reference is not None:
            print(candidate.reference.summary())
        else:
            print(
                f"edge-agent: warning: {not_carried_warning(str(manifest.bundle_id))}",
                file=sys.stderr,
            )
    (candidate.classifier if isinstance(candidate, Candidate) else candidate.generator).close()
    if args.no_activate:
        print(f"installed {manifest.bundle_id}, not activated")
        return 0
    store.activate(manifest.name, manifest.version)
    print(
        f"activated {manifest.bundle_id}; a running agent loads it on SIGHUP "
        "(systemctl reload edge-agent) or restart"
    )
    return 0


def _models(args: argparse.Namespace) -> int:
    from edge_agent.app.agent import build_store

    store = build_store(_settings(args))
    names = sorted({p.name for p in (store.root / "bundles").iterdir() if p.is_dir()})
    listing = [
        {"name": name, "active": store.active_version(name), "installed": store.versions(name)}
        for name in names
    ]
    print(json.dumps({"store": str(store.root), "models": listing}, indent=2))
    return 0


def _export_feedback(args: argparse.Namespace) -> int:
    from edge_agent.device.feedback import FeedbackStore, export

    settings = _settings(args)
    store = FeedbackStore(
        settings.feedback_dir,
        max_bytes=settings.feedback_max_bytes,
        max_count=settings.feedback_max_count,
    )
    summary = export(store, args.out, settings.anomaly_good_labels)
    print(json.dumps(summary, indent=2))
    print(f"dataset written to {args.out} (one folder per label, records.jsonl, summary.json)")
    if summary["anomaly"]["false_alarms"]:
        print(
            f"anomaly false alarms in {args.out / 'anomaly' / 'false_alarms'}: relearn them with "
            f"model-packager build-anomaly --update OLD.bundle --good "
            f"{args.out / 'anomaly' / 'false_alarms'} --profile PROFILE --key KEY --out DIR"
        )
    return 0


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="TOML settings file (keys = setting names)")
    parser.add_argument(
        "--state-dir", type=Path, help="state directory (default /var/lib/lineside)"
    )
    parser.add_argument("--profile", help="firmware profile name or TOML path")
    parser.add_argument(
        "--trusted-key",
        type=Path,
        action="append",
        metavar="PUB",
        help="trust bundles signed by this public key (repeatable)",
    )
    parser.add_argument(
        "--allow-unsigned-bundles",
        action="store_true",
        help="DEVELOPMENT ONLY: accept bundles without a signature",
    )
    parser.add_argument("--log-level", choices=("debug", "info", "warning", "error"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edge-agent", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"edge-agent {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the agent")
    _common(serve)
    serve.add_argument("--host", help="address to bind (default 127.0.0.1; 0.0.0.0 for the line)")
    serve.add_argument("--port", type=int, help="TCP port (default 8080)")
    serve.add_argument("--tls-certfile", type=Path, help="PEM certificate; enables HTTPS")
    serve.add_argument("--tls-keyfile", type=Path, help="PEM private key of --tls-certfile")
    serve.add_argument("--max-in-flight", type=int, help="predictions admitted at once")
    serve.set_defaults(func=_serve)

    install = sub.add_parser("install", help="verify, self-test and activate a bundle")
    _common(install)
    install.add_argument("bundle", type=Path, help="the .bundle file")
    install.add_argument("--no-activate", action="store_true", help="install without activating")
    install.set_defaults(func=_install)

    models = sub.add_parser("models", help="list installed and active bundles")
    _common(models)
    models.set_defaults(func=_models)

    feedback = sub.add_parser(
        "export-feedback", help="write technicians' feedback as a retraining dataset"
    )
    _common(feedback)
    feedback.add_argument("--out", type=Path, required=True, help="folder for the dataset")
    feedback.set_defaults(func=_export_feedback)

    doctor = sub.add_parser("doctor", help="check this installation can run the agent")
    doctor.set_defaults(func=_doctor)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except ConfigError as exc:
        print(f"edge-agent: {exc.message}", file=sys.stderr)
        return EXIT_SETTINGS
    except BundleRejectedError as exc:
        print(f"edge-agent: refused: {exc.message}", file=sys.stderr)
        return EXIT_REFUSED
    except AgentError as exc:
        print(f"edge-agent: {exc.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
