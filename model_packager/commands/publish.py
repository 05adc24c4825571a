"""`model-packager publish`: sign a release notice for a bundle and send it to a group or device.

Also the delivery options that `trust` shares: sequence, expiry, `--out` and the broker.
`--over-mqtt` signs the `mqtt_chunks` extension (docs/mqtt-delivery.md) so boxes fetch the bundle
in chunks over MQTT from a chunk server (`fleet-controller chunks add` puts it in the store); the
notice is then schema version 2, read by agents from 0.4.0, and `--url` becomes optional.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from edge_bundle.archive import extract_archive
from edge_bundle.bundle import open_bundle
from edge_bundle.chunks import (
    DEFAULT_CHUNK_SIZE,
    MAX_CHUNK_SIZE,
    MIN_CHUNK_SIZE,
    MQTT_CHUNKS_EXTENSION,
    ChunkError,
    describe,
)
from edge_bundle.errors import IntegrityError, WrongRoleError
from edge_bundle.files import write_atomically
from edge_bundle.hashing import sha256_and_size
from edge_bundle.manifest import MANIFEST_FILE, Manifest
from edge_bundle.release import ReleaseNotice, Target, encode_notice, release_topic
from edge_bundle.signing import KeyRole, SigningKey, TrustStore, read_signing_key
from model_packager.commands import Subparsers
from model_packager.errors import PublishError
from model_packager.mqtt_publish import BrokerConfig, parse_address, publish_retained

_DURATION = re.compile(r"^([1-9][0-9]{0,5})([smhd])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def register(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "publish",
        help="sign a release notice for a bundle and publish it to a group or one device",
        description=(
            "Sign a release notice (bundle name, version, sha256, size, download URL, target) "
            "with a release key; write it to --out and/or publish it retained with QoS 1 to the "
            "target's release topic. Devices verify the notice, then download the bundle."
        ),
    )
    parser.add_argument("bundle", type=Path, help="the NAME-VERSION.bundle file")
    parser.add_argument(
        "--key",
        required=True,
        type=Path,
        help="release-signing private key (keygen --role release)",
    )
    parser.add_argument(
        "--url", help="where devices download the bundle (http/s); optional with --over-mqtt"
    )
    parser.add_argument(
        "--over-mqtt",
        action="store_true",
        help="also (or, without --url, only) deliver the bundle in chunks over MQTT: boxes from "
        "agent 0.4.0 fetch it from a chunk server (fleet-controller chunks add BUNDLE)",
    )
    parser.add_argument(
        "--chunk-size",
        type=int,
        default=DEFAULT_CHUNK_SIZE,
        metavar="BYTES",
        help=f"with --over-mqtt: chunk size, {MIN_CHUNK_SIZE}..{MAX_CHUNK_SIZE} "
        f"(default {DEFAULT_CHUNK_SIZE}); the broker's max_packet_size must exceed it by 1 KiB",
    )
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--group", help="a fleet group, e.g. line3")
    target.add_argument("--device", metavar="SITE/DEVICE", help="one device, e.g. plant/box1")
    parser.add_argument(
        "--bundle-key",
        type=Path,
        metavar="PUB",
        help="verify the bundle's signature and files against this bundle public key first",
    )
    parser.add_argument(
        "--rollback", action="store_true", help="allow devices to go back to this older version"
    )
    parser.add_argument("--notes", help="release notes shown on the device (up to 2000 chars)")
    add_delivery_arguments(parser, default_expiry="30d")
    parser.set_defaults(run=run, usage_error=parser.error)


def add_delivery_arguments(parser: argparse.ArgumentParser, *, default_expiry: str) -> None:
    """Sequence, expiry, output file and broker options, shared by `publish` and `trust`."""
    notice = parser.add_argument_group("notice")
    notice.add_argument(
        "--sequence",
        type=int,
        help="notice sequence number (default: now in milliseconds, so it grows across runs)",
    )
    notice.add_argument(
        "--expires-in",
        type=parse_duration,
        default=parse_duration(default_expiry),
        metavar="DURATION",
        help=f"validity, e.g. 12h, 30d (at most 366d; default {default_expiry})",
    )
    notice.add_argument("--out", type=Path, metavar="FILE", help="write the signed notice here")
    mqtt = parser.add_argument_group("MQTT broker (publishes retained, QoS 1)")
    mqtt.add_argument("--broker", metavar="HOST[:PORT]", help="port 1883, or 8883 with --tls-ca")
    mqtt.add_argument("--tls-ca", type=Path, metavar="CA", help="the broker's CA (enables TLS)")
    mqtt.add_argument("--tls-cert", type=Path, metavar="CRT", help="client certificate (PEM)")
    mqtt.add_argument("--tls-key", type=Path, metavar="KEY", help="client private key (PEM)")
    mqtt.add_argument("--username", metavar="U")
    mqtt.add_argument(
        "--password-file", type=Path, metavar="F", help="file holding the password (first line)"
    )
    mqtt.add_argument("--timeout", type=float, default=30.0, help="seconds to wait (default 30)")


def parse_duration(text: str) -> timedelta:
    """`90s`, `45m`, `12h` or `30d` as a timedelta (an argparse type)."""
    match = _DURATION.fullmatch(text)
    if match is None:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a duration; write a number and a unit s, m, h or d, e.g. 30d"
        )
    return timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})


def check_delivery(args: argparse.Namespace) -> None:
    """Refuse option combinations that cannot work, before anything is read or signed."""
    if args.out is None and args.broker is None:
        args.usage_error("give --out FILE, --broker HOST[:PORT], or both")
    if args.broker is None and (args.tls_ca or args.tls_cert or args.username):
        args.usage_error("--tls-*, --username and --password-file need --broker")
    if (args.tls_cert is None) != (args.tls_key is None):
        args.usage_error("--tls-cert and --tls-key go together: give both or neither")
    if args.tls_cert is not None and args.tls_ca is None:
        args.usage_error("a client certificate needs --tls-ca (the broker's CA) too")
    if args.password_file is not None and args.username is None:
        args.usage_error("--password-file needs --username")
    if args.sequence is not None and args.sequence < 1:
        args.usage_error("--sequence must be 1 or more")
    if args.timeout <= 0:
        args.usage_error("--timeout must be more than 0 seconds")


def signing_key(path: Path, role: KeyRole, keygen_hint: str) -> SigningKey:
    """The private key at `path`, refused with a clear message unless it holds `role`."""
    key = read_signing_key(path)
    if key.role is not role:
        raise WrongRoleError(
            f"{path} holds a {key.role.value!r} key ({key.key_id}), but this command signs with "
            f"a {role.value!r} key; make one with {keygen_hint}"
        )
    return key


def notice_window(args: argparse.Namespace) -> dict[str, object]:
    """sequence, issued_at and expires_at for a new notice, from the options and the clock."""
    now = datetime.now(UTC).replace(microsecond=0)
    sequence = args.sequence if args.sequence is not None else time.time_ns() // 1_000_000
    return {"sequence": sequence, "issued_at": now, "expires_at": now + args.expires_in}


def deliver(args: argparse.Namespace, topic: str, data: bytes, expires_at: datetime) -> None:
    """Write the signed notice to `--out` and/or publish it retained to `topic`."""
    broker = _broker(args) if args.broker is not None else None
    if args.out is not None:
        write_atomically(args.out, data)
        print(f"wrote {args.out}")
    if broker is not None:
        if broker.tls_ca is None and broker.password is not None:
            print(
                "warning: the password crosses the network in clear; use --tls-ca", file=sys.stderr
            )
        expiry_s = int((expires_at - datetime.now(UTC)).total_seconds())
        publish_retained(broker, topic, data, expiry_s=expiry_s)
        print(f"published to {broker.where} (retained, QoS 1, acknowledged)")


def run(args: argparse.Namespace) -> int:
    check_delivery(args)
    if args.url is None and not args.over_mqtt:
        args.usage_error("give --url, --over-mqtt, or both: how devices get the bundle")
    if not MIN_CHUNK_SIZE <= args.chunk_size <= MAX_CHUNK_SIZE:
        args.usage_error(f"--chunk-size must be {MIN_CHUNK_SIZE}..{MAX_CHUNK_SIZE} bytes")
    key = signing_key(args.key, KeyRole.RELEASE, "model-packager keygen --role release")
    manifest, digest, size = _read_bundle(args.bundle, args.bundle_key)
    target = Target.create(group=args.group, device=args.device)
    over_mqtt: dict[str, object] = {}
    if args.over_mqtt:
        try:
            chunked = describe(args.bundle, args.chunk_size)
        except ChunkError as exc:
            raise PublishError(str(exc)) from exc
        extensions: dict[str, object] = {MQTT_CHUNKS_EXTENSION: chunked.to_json()}
        if args.url is None:  # MQTT alone: a reader that cannot fetch over MQTT must refuse it
            extensions["critical"] = [MQTT_CHUNKS_EXTENSION]
        over_mqtt = {"schema_version": 2, "extensions": extensions}
    notice = ReleaseNotice.create(
        name=manifest.name,
        version=manifest.version,
        bundle_sha256=digest,
        bundle_size=size,
        url=args.url,
        target=target,
        rollback=args.rollback,
        notes=args.notes,
        **over_mqtt,
        **notice_window(args),
    )
    data = encode_notice(notice, key)
    topic = release_topic(notice.target)
    deliver(args, topic, data, notice.expires_at)
    print(f"release {notice.bundle_id} signed by {key.key_id}")
    print(f"topic    {topic}")
    print(f"sequence {notice.sequence}")
    print(f"sha256   {digest}")
    if args.over_mqtt:
        print(
            f"over MQTT: put it in the chunk store with  fleet-controller chunks add {args.bundle}"
        )
    return 0


def _read_bundle(path: Path, bundle_key: Path | None) -> tuple[Manifest, str, int]:
    """The bundle's manifest, sha256 and size; verified against `bundle_key` when given."""
    digest, size = sha256_and_size(path)
    with tempfile.TemporaryDirectory(prefix="model-packager-publish-") as staging:
        if bundle_key is not None:
            verified = open_bundle(path, TrustStore.from_files([bundle_key]), Path(staging))
            manifest, read_digest = verified.manifest, verified.bundle_sha256
        else:
            extracted = extract_archive(path, Path(staging))
            manifest = Manifest.from_bytes((extracted.directory / MANIFEST_FILE).read_bytes())
            read_digest = extracted.sha256
            print(f"warning: {path} NOT verified (pass --bundle-key to verify it)", file=sys.stderr)
    if read_digest != digest:
        raise IntegrityError(f"{path} changed while it was read; publish once it is stable")
    return manifest, digest, size


def _broker(args: argparse.Namespace) -> BrokerConfig:
    host, port = parse_address(args.broker, tls=args.tls_ca is not None)
    password = None
    if args.password_file is not None:
        lines = args.password_file.read_text(encoding="utf-8").splitlines()
        password = lines[0] if lines else ""
        if not password:
            raise PublishError(f"{args.password_file} is empty; put the password on its first line")
    return BrokerConfig(
        host=host,
        port=port,
        tls_ca=args.tls_ca,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        username=args.username,
        password=password,
        timeout_s=args.timeout,
    )
