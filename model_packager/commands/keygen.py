"""`model-packager keygen`: create an Ed25519 key pair for one role."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from edge_bundle.errors import KeyFileError
from edge_bundle.signing import KeyRole, SigningKey, write_key_files
from model_packager.commands import Subparsers

_STEM = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def register(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "keygen",
        help="create an Ed25519 key pair (NAME.key, NAME.pub) for one role",
        description="Create an Ed25519 key pair for one role. Refuses to overwrite files.",
    )
    parser.add_argument("--role", required=True, choices=[role.value for role in KeyRole])
    parser.add_argument("--out", required=True, type=Path, help="directory for the key files")
    parser.add_argument("--name", help="file name stem (default: ROLE-KEYID)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    key = SigningKey.generate(KeyRole(args.role))
    name: str = args.name or f"{key.role.value}-{key.key_id}"
    if _STEM.fullmatch(name) is None:
        raise KeyFileError(
            f"--name {name!r} is not a usable file stem; use up to 64 letters, digits, '.', '_' "
            f"or '-', starting with a letter or digit"
        )
    private_path, public_path = write_key_files(key, args.out, name)
    print(f"created {key.role.value} key {key.key_id}")
    print(f"private key: {private_path} (mode 0600; keep it secret)")
    print(f"public key:  {public_path}")
    return 0
