"""`model-packager keygen` and `verify`: in-process through `main(argv)`, and once through the
installed console script."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

from edge_bundle.bundle import write_bundle
from edge_bundle.errors import KeyFileError
from edge_bundle.manifest import ManifestBody
from edge_bundle.signing import read_signing_key
from model_packager.cli import EXIT_CODES, exit_code_for, main

BODY = ManifestBody(
    name="weld",
    version=2,
    created_at=datetime(2025, 1, 1, tzinfo=UTC),
    task="image-classification",
    runtime="onnx",
)


def keygen(out: Path, name: str, role: str = "bundle") -> tuple[Path, Path]:
    assert main(["keygen", "--role", role, "--out", str(out), "--name", name]) == 0
    return out / f"{name}.key", out / f"{name}.pub"


@pytest.fixture
def signed(tmp_path: Path) -> tuple[Path, Path, str]:
    """A bundle, the public key that signed it, and that key's id."""
    private, public = keygen(tmp_path / "keys", "ci")
    key = read_signing_key(private)
    model = tmp_path / "model.onnx"
    model.write_bytes(b"model bytes")
    bundle = write_bundle(tmp_path / "weld-2.bundle", {"model.onnx": model}, BODY, key)
    return bundle, public, key.key_id


def fail_line(capsys: pytest.CaptureFixture[str], command: str) -> str:
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"model-packager: {command} failed: ")
    return lines[0]


def test_keygen_writes_key_pair_and_prints_id(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    private, public = keygen(tmp_path / "keys", "release-2025", role="release")
    out = capsys.readouterr().out
    key_id = json.loads(public.read_text())["key_id"]
    assert f"created release key {key_id}" in out
    assert str(private) in out
    assert str(public) in out
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert json.loads(private.read_text())["role"] == "release"


def test_keygen_default_name_uses_role_and_key_id(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["keygen", "--role", "root", "--out", str(tmp_path)]) == 0
    capsys.readouterr()
    (public,) = tmp_path.glob("*.pub")
    key_id = json.loads(public.read_text())["key_id"]
    assert public.name == f"root-{key_id}.pub"


def test_keygen_refuses_to_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    private, _ = keygen(tmp_path, "k")
    before = private.read_bytes()
    capsys.readouterr()
    code = main(["keygen", "--role", "bundle", "--out", str(tmp_path), "--name", "k"])
    assert code == EXIT_CODES[KeyFileError][0]
    assert "already exists" in fail_line(capsys, "keygen")
    assert private.read_bytes() == before


def test_keygen_refuses_bad_name_and_role(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["keygen", "--role", "bundle", "--out", str(tmp_path), "--name", "../x"]) == 21
    assert "--name" in fail_line(capsys, "keygen")
    with pytest.raises(SystemExit) as info:
        main(["keygen", "--role", "admin", "--out", str(tmp_path)])
    assert info.value.code == 2
    assert list(tmp_path.iterdir()) == []


def test_verify_ok(signed: tuple[Path, Path, str], capsys: pytest.CaptureFixture[str]) -> None:
    bundle, public, key_id = signed
    assert main(["verify", str(bundle), "--key", str(public)]) == 0
    assert capsys.readouterr().out == f"OK weld@2 signed by {key_id} (role bundle)\n"


def _with_role(public: Path, role: str, dest: Path) -> Path:
    document = json.loads(public.read_text())
    document["role"] = role
    dest.write_text(json.dumps(document))
    return dest


def _flip_last_manifest_byte(bundle: Path) -> Path:
    data = bytearray(bundle.read_bytes())
    data[data.index(b'"version": 2') + len('"version": ')] = ord("3")
    bundle.write_bytes(bytes(data))
    return bundle


@pytest.mark.parametrize(
    ("scenario", "code", "reason"),
    [
        ("untrusted", 14, "not trusted"),
        ("revoked", 15, "revoked"),
        ("wrong-role", 16, "holds role 'release'"),
        ("tampered", 13, "does not match"),
        ("missing", 18, "cannot read archive"),
        ("not-a-tar", 18, "not a readable tar"),
        ("bad-key-file", 21, "not a usable key file"),
    ],
)
def test_verify_failures_have_distinct_exit_codes(
    tmp_path: Path,
    signed: tuple[Path, Path, str],
    capsys: pytest.CaptureFixture[str],
    scenario: str,
    code: int,
    reason: str,
) -> None:
    bundle, public, key_id = signed
    extra: list[str] = []
    if scenario == "untrusted":
        _, public = keygen(tmp_path / "other", "other")
        capsys.readouterr()
    elif scenario == "revoked":
        extra = ["--revoked", key_id]
    elif scenario == "wrong-role":
        public = _with_role(public, "release", tmp_path / "as-release.pub")
    elif scenario == "tampered":
        _flip_last_manifest_byte(bundle)
    elif scenario == "missing":
        bundle = tmp_path / "nope.bundle"
    elif scenario == "not-a-tar":
        bundle.write_bytes(b"hello")
    elif scenario == "bad-key-file":
        public.write_text("{}")
    assert main(["verify", str(bundle), "--key", str(public), *extra]) == code
    assert reason in fail_line(capsys, "verify")
    assert capsys.readouterr().out == ""


def test_exit_codes_are_distinct_and_documented(capsys: pytest.CaptureFixture[str]) -> None:
    codes = [code for code, _ in EXIT_CODES.values()]
    assert len(set(codes)) == len(codes)
    assert 0 not in codes and 2 not in codes
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    help_text = capsys.readouterr().out
    for code, meaning in EXIT_CODES.values():
        assert f"{code:>3}  {meaning}" in help_text


def test_most_specific_error_class_wins() -> None:
    from edge_bundle import errors

    assert exit_code_for(errors.RevokedKeyError("x")) == 15
    assert exit_code_for(errors.SignatureError("x")) == 13
    assert exit_code_for(errors.UnsupportedSchemaError("x")) == 12
    assert exit_code_for(errors.ImageError("x")) == 10  # any other BundleError
    assert exit_code_for(FileNotFoundError("x")) == 3


def test_console_script_round_trip(tmp_path: Path, signed: tuple[Path, Path, str]) -> None:
    bundle, public, key_id = signed
    script = Path(sys.executable).parent / "model-packager"
    assert script.exists(), "the console script is missing: run scripts/install --role dev"
    ok = subprocess.run(
        [str(script), "verify", str(bundle), "--key", str(public)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert (ok.returncode, ok.stdout, ok.stderr) == (
        0,
        f"OK weld@2 signed by {key_id} (role bundle)\n",
        "",
    )
    failed = subprocess.run(
        [str(script), "verify", str(bundle), "--key", str(public), "--revoked", key_id],
        capture_output=True,
        text=True,
        check=False,
    )
    assert failed.returncode == 15
    assert failed.stdout == ""
    assert failed.stderr.startswith("model-packager: verify failed: signed by key")
    assert failed.stderr.count("\n") == 1
