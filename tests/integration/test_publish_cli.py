"""`model-packager publish` and `trust` against a real Mosquitto: the retained notice is read back
and verified as a device would; TLS client certificates, passwords and ACL refusals; and every
refusal of the command line."""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import paho.mqtt.client as paho
import pytest

from edge_bundle.bundle import write_bundle
from edge_bundle.manifest import ManifestBody
from edge_bundle.release import (
    TRUST_TOPIC,
    ReleaseNotice,
    TrustNotice,
    apply_trust,
    decode_notice,
)
from edge_bundle.signing import TrustStore, read_public_key, read_signing_key
from model_packager.cli import main
from tests.agent_support import free_port
from tests.integration.test_agent_mqtt import _pki  # the one test PKI (CA, broker, clients)
from tests.mqtt_support import TestClient, running_broker

REPO = Path(__file__).resolve().parents[2]
URL = "https://models.plant.local/weld-2.bundle"
GROUP_TOPIC = "lineside/v1/fleet/line3/release"
BODY = ManifestBody(
    name="weld",
    version=2,
    created_at=datetime(2025, 1, 1, tzinfo=UTC),
    task="image-classification",
    runtime="onnx",
)


@pytest.fixture
def ws(tmp_path: Path) -> dict[str, Path]:
    """Key pairs of every role and a bundle signed by the bundle key."""
    keys = tmp_path / "keys"
    for role in ("bundle", "release", "root"):
        assert main(["keygen", "--role", role, "--out", str(keys), "--name", role]) == 0
    model = tmp_path / "model.onnx"
    model.write_bytes(b"model bytes " * 100)
    bundle = write_bundle(
        tmp_path / "weld-2.bundle",
        {"model.onnx": model},
        BODY,
        read_signing_key(keys / "bundle.key"),
    )
    return {"keys": keys, "bundle": bundle}


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    """The installed command line, in a child process, as an operator or CI job runs it."""
    return subprocess.run(
        [sys.executable, "-m", "model_packager.cli", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def retained(port: int, topic: str, **client: object) -> paho.MQTTMessage:
    """The retained message on `topic`, read by a fresh subscriber."""
    reader = TestClient(port, f"reader-{free_port()}", **client)  # type: ignore[arg-type]
    try:
        reader.subscribe(topic)
        (message,) = reader.wait_for(1, timeout=10, topic=topic)
    finally:
        reader.close()
    assert message.retain
    return message


def publish_args(ws: dict[str, Path], *extra: str) -> list[str]:
    keys = ws["keys"]
    return ["publish", str(ws["bundle"]), "--key", str(keys / "release.key"), "--url", URL, *extra]


def release_trust(ws: dict[str, Path]) -> TrustStore:
    return TrustStore((read_public_key(ws["keys"] / "release.pub"),))


def test_publish_to_a_group_and_read_it_back(ws: dict[str, Path], tmp_path: Path) -> None:
    with running_broker(tmp_path / "broker") as broker:
        result = cli(
            *publish_args(ws, "--group", "line3", "--bundle-key", str(ws["keys"] / "bundle.pub")),
            "--notes",
            "fewer false cracks",
            "--broker",
            f"127.0.0.1:{broker.port}",
        )
        assert result.returncode == 0, result.stderr
        message = retained(broker.port, GROUP_TOPIC)
    data = ws["bundle"].read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    assert f"topic    {GROUP_TOPIC}" in result.stdout
    assert f"sha256   {digest}" in result.stdout
    assert "NOT verified" not in result.stderr
    sequence = int(re.search(r"sequence (\d+)", result.stdout).group(1))  # type: ignore[union-attr]
    notice, signer = decode_notice(bytes(message.payload), release_trust(ws))
    assert isinstance(notice, ReleaseNotice)
    assert signer == read_public_key(ws["keys"] / "release.pub").key_id
    assert (notice.name, notice.version, notice.url) == ("weld", 2, URL)
    assert (notice.bundle_sha256, notice.bundle_size) == (digest, len(data))
    assert notice.target.group == "line3" and notice.target.device is None
    assert notice.sequence == sequence and notice.notes == "fewer false cracks"
    assert notice.rollback is False
    assert timedelta(days=30) == notice.expires_at - notice.issued_at
    # The broker drops the retained notice when it expires (MQTT 5 message expiry).
    expiry = message.properties.MessageExpiryInterval  # type: ignore[union-attr]
    assert 29 * 86400 < expiry <= 30 * 86400


def test_publish_to_one_device_to_a_file(
    ws: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "notice.json"
    args = ["--device", "plant/box1", "--out", str(out), "--sequence", "42"]
    assert main(publish_args(ws, *args, "--expires-in", "12h", "--rollback")) == 0
    captured = capsys.readouterr()
    assert "topic    lineside/v1/plant/box1/release" in captured.out
    assert "NOT verified" in captured.err  # no --bundle-key: read and hashed, not verified
    notice, _ = decode_notice(out.read_bytes(), release_trust(ws))
    assert isinstance(notice, ReleaseNotice)
    assert notice.target.device == "plant/box1" and notice.sequence == 42
    assert notice.rollback is True
    assert notice.expires_at - notice.issued_at == timedelta(hours=12)


def test_publish_over_mqtt_signs_the_chunk_manifest(
    ws: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from edge_bundle.chunks import MQTT_CHUNKS_EXTENSION, build_manifest

    keys, out = ws["keys"], tmp_path / "notice.json"
    argv = ["publish", str(ws["bundle"]), "--key", str(keys / "release.key"), "--over-mqtt"]
    argv += ["--chunk-size", "4096", "--group", "line3", "--out", str(out)]
    assert main(argv) == 0
    assert "fleet-controller chunks add" in capsys.readouterr().out
    notice, _ = decode_notice(out.read_bytes(), release_trust(ws))
    assert isinstance(notice, ReleaseNotice) and notice.url is None
    assert notice.schema_version == 2 and notice.critical == (MQTT_CHUNKS_EXTENSION,)
    chunked = notice.chunked
    assert chunked is not None and chunked.chunk_size == 4096
    chunked.check_manifest(build_manifest(ws["bundle"], 4096))
    # With a URL too, MQTT is offered but not required: older agents download from the URL.
    assert main(publish_args(ws, "--over-mqtt", "--group", "line3", "--out", str(out))) == 0
    both, _ = decode_notice(out.read_bytes(), release_trust(ws))
    assert isinstance(both, ReleaseNotice) and both.url == URL and both.critical == ()
    assert both.chunked is not None
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main([*argv[:4], "--group", "line3", "--out", str(out)])  # neither --url nor --over-mqtt
    assert info.value.code == 2 and "give --url, --over-mqtt, or both" in capsys.readouterr().err


def test_default_sequence_grows_across_runs(
    ws: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sequences = []
    for name in ("a.json", "b.json"):
        assert main(publish_args(ws, "--group", "line3", "--out", str(tmp_path / name))) == 0
        notice, _ = decode_notice((tmp_path / name).read_bytes(), release_trust(ws))
        sequences.append(notice.sequence)
    capsys.readouterr()
    assert sequences[0] < sequences[1]
    assert abs(sequences[0] - datetime.now(UTC).timestamp() * 1000) < 60_000


def test_trust_notice_published_and_applied(
    ws: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    keys = ws["keys"]
    assert main(["keygen", "--role", "release", "--out", str(keys), "--name", "release2"]) == 0
    old_release = read_public_key(keys / "release.pub")
    new_release = read_public_key(keys / "release2.pub")
    root = read_public_key(keys / "root.pub")
    with running_broker(tmp_path / "broker") as broker:
        code = main(
            ["trust", "--root-key", str(keys / "root.key"), "--add", str(keys / "release2.pub"),
             "--revoke", old_release.key_id, "--broker", f"127.0.0.1:{broker.port}"]
        )  # fmt: skip
        assert code == 0, capsys.readouterr().err
        message = retained(broker.port, TRUST_TOPIC)
    out = capsys.readouterr().out
    assert f"add      {new_release.key_id} (release)" in out
    assert f"revoke   {old_release.key_id}" in out
    device = TrustStore((root, old_release))
    notice, signer = decode_notice(bytes(message.payload), device)
    assert isinstance(notice, TrustNotice) and signer == root.key_id
    assert notice.expires_at - notice.issued_at == timedelta(days=365)
    updated = apply_trust(device, notice, signer_key_id=signer)
    assert updated.key(new_release.key_id) == new_release
    assert old_release.key_id in updated.revoked


def test_tls_with_client_certificate(ws: dict[str, Path], tmp_path: Path) -> None:
    pki = _pki(tmp_path / "pki")
    config = (
        f"cafile {pki['ca.crt']}\ncertfile {pki['broker.crt']}\nkeyfile {pki['broker.key']}\n"
        "require_certificate true\nuse_identity_as_username true\n"
    )
    with running_broker(tmp_path / "broker", extra_config=config) as broker:
        tls = ["--tls-ca", str(pki["ca.crt"]), "--broker", f"localhost:{broker.port}"]
        client_cert = ["--tls-cert", str(pki["client.crt"]), "--tls-key", str(pki["client.key"])]
        result = cli(*publish_args(ws, "--group", "line3", *tls, *client_cert))
        assert result.returncode == 0, result.stderr
        assert f"published to mqtts://localhost:{broker.port}" in result.stdout
        reader_tls = {
            "ca_certs": str(pki["ca.crt"]),
            "certfile": str(pki["client.crt"]),
            "keyfile": str(pki["client.key"]),
        }
        message = retained(broker.port, GROUP_TOPIC, tls=reader_tls)
        assert decode_notice(bytes(message.payload), release_trust(ws))[0].kind == "release"
        # Without the client certificate the broker refuses the connection.
        refused = cli(*publish_args(ws, "--group", "line3", *tls, "--timeout", "5"))
        assert refused.returncode == 37, refused.stderr
        # TLS 1.3 reports it after the handshake, TLS 1.2 during it; both name the cause.
        assert "client certificate" in refused.stderr


def test_password_and_acl(ws: dict[str, Path], tmp_path: Path) -> None:
    """Only the CI user may write release topics; a wrong password or a user without the right
    to write the topic is refused, and the command says so."""
    directory = tmp_path / "broker"
    directory.mkdir()
    passwords = directory / "passwd"
    for index, (user, secret) in enumerate((("ci", "s3cret"), ("mes", "other"))):
        subprocess.run(
            ["mosquitto_passwd", "-b", *(["-c"] if index == 0 else []), str(passwords), user, secret],
            check=True, capture_output=True,
        )  # fmt: skip
    (directory / "acl").write_text(
        "user ci\ntopic write lineside/v1/fleet/+/release\ntopic read lineside/v1/#\n"
        "user mes\ntopic read lineside/v1/#\n"
    )
    config = f"password_file {passwords}\nacl_file {directory / 'acl'}\nallow_anonymous false\n"
    secret_file = tmp_path / "ci.password"
    secret_file.write_text("s3cret\n")
    wrong_file = tmp_path / "wrong.password"
    wrong_file.write_text("guess\n")
    mes_file = tmp_path / "mes.password"
    mes_file.write_text("other\n")
    with running_broker(directory, extra_config=config) as broker:
        where = ["--group", "line3", "--broker", f"127.0.0.1:{broker.port}", "--timeout", "10"]
        ok = cli(*publish_args(ws, *where, "--username", "ci", "--password-file", str(secret_file)))
        assert ok.returncode == 0, ok.stderr
        assert "in clear" in ok.stderr  # warned: a password without TLS
        wrong = cli(
            *publish_args(ws, *where, "--username", "ci", "--password-file", str(wrong_file))
        )
        assert wrong.returncode == 37
        assert "refused the connection" in wrong.stderr
        denied = cli(
            *publish_args(ws, *where, "--username", "mes", "--password-file", str(mes_file))
        )
        assert denied.returncode == 37
        assert "refused the message" in denied.stderr and "ACL" in denied.stderr


def test_a_broker_that_never_answers_times_out(
    ws: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with running_broker(tmp_path / "broker") as broker:
        broker.pause()  # accepts TCP connections (the kernel does) but never sends a CONNACK
        where = ["--broker", f"127.0.0.1:{broker.port}", "--timeout", "1.5"]
        assert main(publish_args(ws, "--group", "line3", *where)) == 37
        broker.resume()
    assert "no CONNACK from the broker" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "code", "reason"),
    [
        (["--key-role", "bundle"], 16, "keygen --role release"),
        (["--url", "ftp://models/weld-2.bundle"], 22, "http:// or https://"),
        (["--device", "box1"], 22, "SITE/DEVICE"),
        (["--expires-in", "400d"], 22, "at most 366 days"),
        (["--bundle-key", "release.pub"], 14, "not trusted"),
        (["--broker", "unreachable"], 37, "cannot connect to the MQTT broker"),
        (["--broker", "host:notaport"], 37, "not HOST[:PORT]"),
    ],
)
def test_publish_refusals(
    ws: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    extra: list[str],
    code: int,
    reason: str,
) -> None:
    keys = ws["keys"]
    options = {"--key": str(keys / "release.key"), "--url": URL, "--group": "line3"}
    options["--out"] = str(tmp_path / "notice.json")
    for flag, value in zip(extra[::2], extra[1::2], strict=True):
        if flag == "--key-role":
            options["--key"] = str(keys / f"{value}.key")
        elif flag == "--device":
            del options["--group"]
            options[flag] = value
        elif flag == "--bundle-key":
            options[flag] = str(keys / value)
        elif flag == "--broker" and value == "unreachable":
            del options["--out"]
            options[flag] = f"127.0.0.1:{free_port()}"  # nothing listens there
        else:
            options[flag] = value
    argv = ["publish", str(ws["bundle"]), *(part for pair in options.items() for part in pair)]
    assert main(argv) == code
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith("model-packager: publish failed: ")
    assert reason in err
    assert not (tmp_path / "notice.json").exists()


def test_trust_refusals(ws: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    keys = ws["keys"]
    root_id = read_public_key(keys / "root.pub").key_id
    out = str(ws["bundle"].parent / "trust.json")
    with_release = ["trust", "--root-key", str(keys / "release.key"), "--revoke", "0" * 16]
    assert main([*with_release, "--out", out]) == 16
    assert "keygen --role root" in capsys.readouterr().err
    self_revoke = ["trust", "--root-key", str(keys / "root.key"), "--revoke", root_id]
    assert main([*self_revoke, "--out", out]) == 22
    assert "cannot revoke itself" in capsys.readouterr().err
    bad_id = ["trust", "--root-key", str(keys / "root.key"), "--revoke", "nope"]
    assert main([*bad_id, "--out", out]) == 21
    assert "is not a key id" in capsys.readouterr().err
    assert not Path(out).exists()


@pytest.mark.parametrize(
    ("argv", "reason"),
    [
        (["--group", "line3"], "give --out FILE, --broker HOST[:PORT], or both"),
        (["--group", "line3", "--broker", "h", "--tls-cert", "c"], "go together"),
        (["--group", "line3", "--out", "x", "--username", "u"], "need --broker"),
        (["--group", "line3", "--out", "x", "--expires-in", "3w"], "not a duration"),
        (["--out", "x"], "one of the arguments --group --device is required"),
    ],
)
def test_usage_errors_exit_2(
    ws: dict[str, Path], capsys: pytest.CaptureFixture[str], argv: list[str], reason: str
) -> None:
    with pytest.raises(SystemExit) as info:
        main(publish_args(ws, *argv))
    assert info.value.code == 2
    assert reason in capsys.readouterr().err
