"""Make the demo defect classifier: synthetic photos of brushed-metal parts with scratches, dents
and stains, a small CNN trained on them for a few seconds, exported to ONNX.

Nothing is downloaded: the images are drawn procedurally and the network is trained here, so the
demo runs offline on a fresh machine. The classifier is small but real — it learns the classes —
so the demo's answers mean something on the demo images.

    python demo/make_demo.py OUT_DIR [--train 480] [--epochs 12]

writes OUT_DIR/model.onnx, OUT_DIR/model.yaml (labels + preprocessing for model-packager),
OUT_DIR/calibration/*.jpg and OUT_DIR/eval/LABEL/*.jpg.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import cv2
import numpy as np
from numpy.typing import NDArray

LABELS = ("ok", "scratch", "dent", "stain")
SIZE = 64
PHOTO = (480, 640)

MODEL_YAML = f"""\
labels: [{", ".join(LABELS)}]
preprocessing:
  resize: exact
  height: {SIZE}
  width: {SIZE}
  interpolation: area
  rescale_factor: 0.00392156862745098
  mean: [0.5, 0.5, 0.5]
  std: [0.25, 0.25, 0.25]
"""


def part_photo(
    rng: np.random.Generator, label: str, shape: tuple[int, int] = PHOTO
) -> NDArray[np.uint8]:
    """A brushed-metal part photographed under uneven light, with one defect (or none)."""
    height, width = shape
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    tone = rng.uniform(110, 170)
    light = tone + rng.uniform(-30, 30) * (x / width) + rng.uniform(-30, 30) * (y / height)
    streak = 2 * (width // 40) + 1
    brushed = cv2.GaussianBlur(
        rng.normal(0, 10, (height, width)).astype(np.float32), (1, streak), 0
    )
    gray = light + brushed + rng.normal(0, 3, (height, width))
    tint = rng.uniform(0.95, 1.05, 3)
    image = np.clip(gray[..., None] * tint, 0, 255).astype(np.uint8)
    if label == "scratch":
        _scratch(rng, image)
    elif label == "dent":
        _dent(rng, image)
    elif label == "stain":
        _stain(rng, image)
    return image


def _scratch(rng: np.random.Generator, image: NDArray[np.uint8]) -> None:
    height, width = image.shape[:2]
    for _ in range(int(rng.integers(1, 3))):
        cx, cy = rng.uniform(0.2, 0.8) * width, rng.uniform(0.2, 0.8) * height
        angle, length = rng.uniform(0, math.pi), rng.uniform(0.3, 0.7) * width
        dx, dy = math.cos(angle) * length / 2, math.sin(angle) * length / 2
        shade = int(rng.choice([25, 235]))
        p1, p2 = (int(cx - dx), int(cy - dy)), (int(cx + dx), int(cy + dy))
        thickness = max(
            2, round(width * rng.uniform(0.012, 0.025))
        )  # scale-free, like a real photo
        cv2.line(image, p1, p2, (shade, shade, shade), thickness, cv2.LINE_AA)


def _dent(rng: np.random.Generator, image: NDArray[np.uint8]) -> None:
    height, width = image.shape[:2]
    cx, cy = rng.uniform(0.25, 0.75) * width, rng.uniform(0.25, 0.75) * height
    radius = rng.uniform(0.08, 0.16) * width
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    dist = np.hypot((x - cx) / radius, (y - cy) / (radius * rng.uniform(0.6, 1.0)))
    bowl = np.exp(-(dist**2) * 2.0)
    shading = bowl * ((x - cx) / radius) * 70 - bowl * 35
    image[:] = np.clip(image.astype(np.float32) + shading[..., None], 0, 255).astype(np.uint8)


def _stain(rng: np.random.Generator, image: NDArray[np.uint8]) -> None:
    height, width = image.shape[:2]
    mask = np.zeros((height, width), np.float32)
    for _ in range(int(rng.integers(3, 7))):
        centre = (int(rng.uniform(0.3, 0.7) * width), int(rng.uniform(0.3, 0.7) * height))
        axes = (int(rng.uniform(0.04, 0.12) * width), int(rng.uniform(0.04, 0.12) * width))
        cv2.ellipse(mask, centre, axes, float(rng.uniform(0, 180)), 0, 360, 1.0, -1)
    mask = cv2.GaussianBlur(mask, (0, 0), width / 100)[..., None]
    colour = np.array(
        [rng.uniform(20, 60), rng.uniform(60, 110), rng.uniform(120, 170)]
    )  # rust, BGR
    blended = image * (1 - 0.75 * mask) + colour * 0.75 * mask
    image[:] = np.clip(blended, 0, 255).astype(np.uint8)


def write_photos(folder: Path, count: int, seed: int, label: str | None = None) -> None:
    """`count` JPEG photos in `folder` (classes cycled unless `label` is given)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        name = label or LABELS[index % len(LABELS)]
        cv2.imwrite(
            str(folder / f"{name}-{index:03d}.jpg"),
            part_photo(rng, name),
            [cv2.IMWRITE_JPEG_QUALITY, 90],
        )


def _training_set(count: int, seed: int) -> tuple[NDArray[np.float32], NDArray[np.int64]]:
    rng = np.random.default_rng(seed)
    images, targets = [], []
    for index in range(count):
        label = index % len(LABELS)
        photo = part_photo(rng, LABELS[label], (SIZE * 2, SIZE * 2))
        small = cv2.resize(photo, (SIZE, SIZE), interpolation=cv2.INTER_AREA)
        rgb = cv2.cvtColor(small, cv2.COLOR_BGR2RGB).astype(np.float32) / 255.0
        images.append(((rgb - 0.5) / 0.25).transpose(2, 0, 1))
        targets.append(label)
    return np.stack(images), np.array(targets)


def train_and_export(out: Path, count: int, epochs: int) -> float:
    """Train the CNN on synthetic photos and export it; returns held-out accuracy."""
    import torch

    torch.manual_seed(0)
    torch.set_num_threads(1)  # tiny convs: threading costs more than it gives
    x, y = _training_set(count, seed=1)
    x_test, y_test = _training_set(200, seed=2)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 12, 3, stride=2, padding=1), torch.nn.BatchNorm2d(12), torch.nn.ReLU(),
        torch.nn.Conv2d(12, 24, 3, stride=2, padding=1), torch.nn.BatchNorm2d(24), torch.nn.ReLU(),
        torch.nn.Conv2d(24, 32, 3, padding=1), torch.nn.BatchNorm2d(32), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(32, len(LABELS)),
    )  # fmt: skip
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    inputs, targets = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(epochs):
        model.train()
        for batch in torch.randperm(len(inputs)).split(24):
            optimiser.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(inputs[batch]), targets[batch])
            loss.backward()
            optimiser.step()
    model.eval()
    with torch.no_grad():
        accuracy = float((model(torch.from_numpy(x_test)).argmax(1).numpy() == y_test).mean())
    torch.onnx.export(
        model, (torch.zeros(1, 3, SIZE, SIZE),), str(out / "model.onnx"),
        input_names=["pixel_values"], output_names=["logits"],
        dynamic_axes={"pixel_values": {0: "batch"}, "logits": {0: "batch"}},
        opset_version=17, dynamo=False,
    )  # fmt: skip
    return accuracy


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out", type=Path)
    parser.add_argument("--train", type=int, default=480, help="training images (default 480)")
    parser.add_argument("--epochs", type=int, default=12)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    accuracy = train_and_export(args.out, args.train, args.epochs)
    (args.out / "model.yaml").write_text(MODEL_YAML)
    write_photos(args.out / "calibration", 64, seed=3)
    for offset, label in enumerate(LABELS):
        write_photos(args.out / "eval" / label, 12, seed=100 + offset, label=label)
    print(f"demo model: {args.out / 'model.onnx'} (held-out accuracy {accuracy:.1%})")


if __name__ == "__main__":
    main()
