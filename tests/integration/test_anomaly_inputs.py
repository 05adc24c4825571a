"""`model-packager build-anomaly` refuses bad input with a clear message and writes nothing: an
empty good folder, too few good images, mixed sizes, a file that is not an image, a backbone
without spatial feature maps, a corrupt backbone file and a corrupt earlier bundle."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_bundle.signing import KeyRole, SigningKey, write_key_files
from model_packager.anomaly.images import MIN_GOOD
from model_packager.cli import main
from tests import packaging
from tests.anomaly_parts import write_photos
from tests.realdata import missing_packages

pytestmark = [
    pytest.mark.packager,
    pytest.mark.skipif(bool(missing_packages()), reason=f"needs {missing_packages()}"),
]


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("keys")
    write_key_files(SigningKey.generate(KeyRole.BUNDLE), root, "bundle")
    return root / "bundle.key"


def _refused(
    keys: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], good: Path, *extra: str
) -> str:
    out = tmp_path / "out"
    args = ["build-anomaly", "--good", str(good), "--profile", "generic-x86-64-avx2"]
    args += ["--key", str(keys), "--out", str(out), "--input-size", "64", "--quiet", *extra]
    if "--update" not in extra:
        args += ["--name", "parts"]
    code = main(args)
    assert code != 0
    assert not out.exists() or not any(out.iterdir()), "a refused build wrote something"
    return capsys.readouterr().err


def test_an_empty_good_folder(
    keys: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "good").mkdir()
    assert "holds no images" in _refused(keys, tmp_path, capsys, tmp_path / "good")


def test_too_few_good_images_names_the_minimum(
    keys: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_photos(tmp_path / "good", 1, "ok", MIN_GOOD - 1, side=64)
    message = _refused(keys, tmp_path, capsys, tmp_path / "good")
    assert f"at least {MIN_GOOD}" in message


def test_mixed_sizes(keys: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_photos(tmp_path / "good", 1, "ok", MIN_GOOD, side=64)
    write_photos(tmp_path / "good", 1, "ok", 2, side=96, start=50)
    message = _refused(keys, tmp_path, capsys, tmp_path / "good")
    assert "more than one size" in message and "96x96" in message


def test_a_file_that_is_not_an_image(
    keys: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_photos(tmp_path / "good", 1, "ok", MIN_GOOD, side=64)
    (tmp_path / "good" / "notes.pdf").write_bytes(b"%PDF-1.4 not an image")
    assert "notes.pdf is not a usable image" in _refused(keys, tmp_path, capsys, tmp_path / "good")


def test_a_backbone_without_spatial_features(
    keys: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_photos(tmp_path / "good", 1, "ok", MIN_GOOD, side=64)
    classifier = packaging.make_onnx_classifier(tmp_path / "classifier.onnx", image_size=64)
    message = _refused(keys, tmp_path, capsys, tmp_path / "good", "--backbone", str(classifier))
    assert "no spatial feature map" in message


def test_a_corrupt_backbone_file(
    keys: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_photos(tmp_path / "good", 1, "ok", MIN_GOOD, side=64)
    (tmp_path / "broken.onnx").write_bytes(b"\x08\x07garbage" * 20)
    message = _refused(
        keys, tmp_path, capsys, tmp_path / "good", "--backbone", str(tmp_path / "broken.onnx")
    )
    assert "not a loadable ONNX model" in message


def test_a_corrupt_earlier_bundle(
    keys: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_photos(tmp_path / "good", 1, "ok", MIN_GOOD, side=64)
    (tmp_path / "parts-1.bundle").write_bytes(b"\x1f\x8b truncated")
    message = _refused(
        keys, tmp_path, capsys, tmp_path / "good", "--update", str(tmp_path / "parts-1.bundle")
    )
    assert "cannot be used" in message
