"""`model-packager trust`: sign a trust notice (keys to add, key ids to revoke) with a root key and
send it to the whole fleet."""

from __future__ import annotations

import argparse
from pathlib import Path

from edge_bundle.release import TRUST_TOPIC, PublicKeyEntry, TrustNotice, encode_notice
from edge_bundle.signing import KeyRole, check_key_id, read_public_key
from model_packager.commands import Subparsers
from model_packager.commands.publish import (
    add_delivery_arguments,
    check_delivery,
    deliver,
    notice_window,
    signing_key,
)


def register(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "trust",
        help="sign a trust notice (add or revoke keys) with a root key and publish it",
        description=(
            "Sign a trust notice with a root key: devices add the listed public keys, then "
            f"revoke the listed key ids. Written to --out and/or published retained to "
            f"{TRUST_TOPIC}. A root key cannot revoke itself."
        ),
    )
    parser.add_argument(
        "--root-key", required=True, type=Path, help="root private key (keygen --role root)"
    )
    parser.add_argument(
        "--add",
        action="append",
        default=[],
        type=Path,
        metavar="PUB",
        help="a public key file (.pub) to trust, with the role it was made with; repeat",
    )
    parser.add_argument(
        "--revoke", action="append", default=[], metavar="KEYID", help="a key id to revoke; repeat"
    )
    parser.add_argument("--notes", help="why the keys change (up to 2000 chars)")
    add_delivery_arguments(parser, default_expiry="365d")
    parser.set_defaults(run=run, usage_error=parser.error)


def run(args: argparse.Namespace) -> int:
    check_delivery(args)
    if not args.add and not args.revoke:
        args.usage_error("give at least one --add PUB or --revoke KEYID")
    key = signing_key(args.root_key, KeyRole.ROOT, "model-packager keygen --role root")
    notice = TrustNotice.create(
        add=tuple(PublicKeyEntry.of(read_public_key(path)) for path in args.add),
        revoke=tuple(check_key_id(key_id) for key_id in args.revoke),
        notes=args.notes,
        **notice_window(args),
    )
    data = encode_notice(notice, key)
    deliver(args, TRUST_TOPIC, data, notice.expires_at)
    print(f"trust notice signed by root key {key.key_id}")
    for entry in notice.add:
        print(f"add      {entry.key_id} ({entry.role.value})")
    for key_id in notice.revoke:
        print(f"revoke   {key_id}")
    print(f"topic    {TRUST_TOPIC}")
    print(f"sequence {notice.sequence}")
    return 0
