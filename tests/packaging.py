"""Test helpers for the packager: tiny random HF image classifiers built from configs (hubs are
unreachable), synthetic photo-like images, and keys."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

LABELS = ("scratch", "dent", "ok")


def write_images(
    folder: Path, count: int, seed: int, size: tuple[int, int] = (96, 128)
) -> list[Path]:
    """`count` JPEGs of smooth gradients, noise and shapes: cheap stand-ins for line photos."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    height, width = size
    for index in range(count):
        y, x = np.mgrid[0:height, 0:width].astype(np.float32)
        base = rng.uniform(40, 200, size=3)
        slope = rng.uniform(-1, 1, size=(2, 3))
        image = base + x[..., None] * slope[0] + y[..., None] * slope[1]
        image += rng.normal(0, 8, size=image.shape)
        image = np.clip(image, 0, 255).astype(np.uint8)
        centre = (int(rng.integers(10, width - 10)), int(rng.integers(10, height - 10)))
        colour = tuple(int(c) for c in rng.integers(0, 255, size=3))
        cv2.circle(image, centre, int(rng.integers(5, 30)), colour, -1)
        path = folder / f"img{index:03d}.jpg"
        cv2.imwrite(str(path), image)
        paths.append(path)
    return paths


def write_eval_set(root: Path, per_label: int, seed: int) -> Path:
    for offset, label in enumerate(LABELS):
        write_images(root / label, per_label, seed + offset)
    return root


def make_hf_vit(directory: Path, *, image_size: int = 32) -> Path:
    """A tiny random ViT image classifier with its image processor, saved as safetensors."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    config = ViTConfig(
        image_size=image_size,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=len(LABELS),
        id2label=dict(enumerate(LABELS)),
        label2id={label: i for i, label in enumerate(LABELS)},
    )
    model = ViTForImageClassification(config)
    model.save_pretrained(directory, safe_serialization=True)
    ViTImageProcessor(size={"height": image_size, "width": image_size}).save_pretrained(directory)
    return directory


def make_lora_adapter(base: Path, directory: Path) -> Path:
    """A LoRA adapter (random, non-zero) on the query/value projections of `base`."""
    from peft import LoraConfig, get_peft_model
    from transformers import ViTForImageClassification

    model = ViTForImageClassification.from_pretrained(base)
    config = LoraConfig(r=4, target_modules=["query", "value"], init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(directory)
    return directory


def make_onnx_classifier(path: Path, *, image_size: int = 32, classes: int = len(LABELS)) -> Path:
    """A tiny conv net exported to ONNX (opset 17), taking (N, 3, H, W) float32."""
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(8, 16, 3, stride=2, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(16, classes),
    ).eval()
    example = torch.randn(1, 3, image_size, image_size)
    torch.onnx.export(
        model,
        (example,),
        str(path),
        input_names=["pixel_values"],
        output_names=["logits"],
        dynamic_axes={"pixel_values": {0: "batch"}, "logits": {0: "batch"}},
        opset_version=17,
        dynamo=False,
    )
    return path


ONNX_MODEL_CONFIG = """\
labels: [scratch, dent, ok]
preprocessing:
  resize: exact
  height: 32
  width: 32
  interpolation: bilinear
  rescale_factor: 0.00392156862745098
  mean: [0.5, 0.5, 0.5]
  std: [0.5, 0.5, 0.5]
"""

KNOWLEDGE = """\
scratch:
  title: Surface scratch
  severity: minor
  root_causes: [Worn conveyor guide rail, Parts stacked without separators]
  corrective_actions: [Inspect guide rail for burrs, Use separator sheets]
dent:
  title: Dent
  severity: major
  root_causes: [Drop at the transfer station]
  corrective_actions: [Check transfer gripper pressure]
"""
