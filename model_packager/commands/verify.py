"""`model-packager verify`: check a bundle's signature, manifest and every file."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from edge_bundle.bundle import open_bundle
from edge_bundle.signing import TrustStore
from model_packager.commands import Subparsers


def register(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "verify",
        help="verify a bundle against trusted public keys",
        description="Verify a bundle: safe extraction, signature, manifest, every file's hash.",
    )
    parser.add_argument("bundle", type=Path, help="the NAME-VERSION.bundle file")
    parser.add_argument(
        "--key",
        dest="keys",
        action="append",
        required=True,
        type=Path,
        metavar="PUBKEY",
        help="a trusted public key file (.pub); repeat for several",
    )
    parser.add_argument(
        "--revoked",
        action="append",
        default=[],
        metavar="KEYID",
        help="a revoked key id; repeat for several (revocation wins over --key)",
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    trust = TrustStore.from_files(args.keys, args.revoked)
    with tempfile.TemporaryDirectory(prefix="model-packager-verify-") as staging:
        verified = open_bundle(args.bundle, trust, Path(staging))
        assert verified.signer_key_id is not None  # open_bundle refuses unsigned bundles here
        signer = trust.key(verified.signer_key_id)
        role = signer.role.value if signer else "unknown"
        print(f"OK {verified.bundle_id} signed by {verified.signer_key_id} (role {role})")
        verified.discard()
    return 0
