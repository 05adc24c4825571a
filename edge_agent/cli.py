"""The `edge-agent` command line: the device-side entry point."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from edge_agent import __version__
from edge_agent.preflight import PreflightError, check_single_ort


def _doctor(_args: argparse.Namespace) -> int:
    try:
        flavour = check_single_ort()
    except PreflightError as exc:
        print(f"edge-agent: {exc}", file=sys.stderr)
        return 1
    print(f"onnx runtime: {flavour.name} {flavour.version}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edge-agent", description=__doc__)
    parser.add_argument("--version", action="version", version=f"edge-agent {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    doctor = sub.add_parser("doctor", help="check this installation can run the agent")
    doctor.set_defaults(func=_doctor)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
