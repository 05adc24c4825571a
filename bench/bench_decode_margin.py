"""What the decoder's quality margin costs and buys, on the real model and real photographs.

The agent decodes a big JPEG at 1/2, 1/4 or 1/8 size by libjpeg's DCT scaling, choosing the
largest factor that keeps the reduced short side at least `MIN_REDUCED_RATIO` (2) times the
model's decode target, so the final antialiased resize still has detail to work from. This bench
measures that margin against a margin of 1 (the reduced short side only has to cover the
target), for a 12-megapixel phone photo (4000x3000, where the margin picks 1/4 and no margin
1/8) and the station page's 2-megapixel upload (1600x1200: 1/2 against 1/4):

1. **Output parity** on the real EfficientNet-Lite0 (fp32 ONNX, `tests/realdata.py`) over the
   real photographs in scikit-image's wheel, each made a phone photo (4:3 centre crop, upscaled,
   sensor-like noise, JPEG quality 90) and also mirrored: top-1 agreement and mean top-5 overlap
   of each margin with a full-size decode of the same bytes, and the largest logit difference.
2. **Speed**: decode + preprocess with each margin against the naive full `cv2.imdecode` +
   `cv2.resize`, interleaved rounds, the median of the per-round p50 ratios.

    python -m bench.bench_decode_margin [--rounds 8] [--per-round 5]

Writes bench/results/decode_margin.json with the machine's description.
"""

from __future__ import annotations

import argparse
import functools
import statistics
from collections.abc import Callable
from typing import Any

import cv2
import numpy as np
import onnxruntime as ort
from numpy.typing import NDArray

from bench.common import flatten, interleaved, round_ratios, summarize_ms, write_json
from edge_bundle.imaging import MIN_REDUCED_RATIO, choose_reduction, decode_image
from edge_bundle.preprocess import preprocess
from tests import realdata

SIZES = {"12mp": (4000, 3000), "2mp": (1600, 1200)}
QUALITY = 90
NOISE_SIGMA = 5.0
MARGINS = (MIN_REDUCED_RATIO, 1.0)


def photos(size: tuple[int, int]) -> list[bytes]:
    images = []
    for index, photo in enumerate(realdata.photos()):
        mirrored = np.ascontiguousarray(photo[:, ::-1])
        for seed, image in ((index, photo), (100 + index, mirrored)):
            images.append(
                realdata.phone_jpeg(
                    image, size, quality=QUALITY, noise_sigma=NOISE_SIGMA, seed=seed
                )
            )
    return images


def prepared(data: bytes, min_ratio: float | None) -> NDArray[Any]:
    """Decode (reduced by `min_ratio`, or full size for None) and preprocess for Lite0."""
    spec = realdata.LITE0_SPEC
    if min_ratio is None:
        return preprocess(decode_image(data).pixels, spec)
    decoded = decode_image(data, target_hw=spec.decode_target(), min_ratio=min_ratio)
    return preprocess(decoded.pixels, spec)


def parity(session: ort.InferenceSession, images: list[bytes]) -> dict[str, Any]:
    def logits(data: bytes, min_ratio: float | None) -> NDArray[np.float32]:
        out = session.run(None, {realdata.INPUT_NAME: prepared(data, min_ratio)})[0]
        return np.asarray(out[0], dtype=np.float32)

    found: dict[str, Any] = {}
    reference = [logits(data, None) for data in images]
    for margin in MARGINS:
        agree, overlap, worst = 0, [], 0.0
        for data, full in zip(images, reference, strict=True):
            reduced = logits(data, margin)
            agree += int(np.argmax(reduced) == np.argmax(full))
            top_full, top_reduced = set(np.argsort(full)[-5:]), set(np.argsort(reduced)[-5:])
            overlap.append(len(top_full & top_reduced) / 5)
            worst = max(worst, float(np.max(np.abs(reduced - full))))
        found[f"margin_{margin:g}"] = {
            "top1_agreement_with_full_decode": round(agree / len(images), 4),
            "top5_overlap_with_full_decode": round(statistics.mean(overlap), 4),
            "max_abs_logit_difference": round(worst, 3),
        }
    return found


def speed(data: bytes, args: argparse.Namespace) -> dict[str, Any]:
    side = 224

    def naive() -> object:
        image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
        if image is None:
            raise RuntimeError("OpenCV could not decode the benchmark JPEG")
        return cv2.resize(image, (side, side))

    cases: dict[str, Callable[[], object]] = {"naive_full_imdecode_resize": naive}
    for margin in MARGINS:
        cases[f"margin_{margin:g}"] = functools.partial(prepared, data, margin)
    samples = interleaved(cases, rounds=args.rounds, per_round=args.per_round, warmup=2)
    base = samples["naive_full_imdecode_resize"]
    return {
        "p50_ms": {
            name: summarize_ms(flatten(rounds))["p50_ms"] for name, rounds in samples.items()
        },
        "speedup_over_naive_p50": {
            f"margin_{m:g}": round_ratios(base, samples[f"margin_{m:g}"], 50) for m in MARGINS
        },
        "margin_1_over_margin_2_p50": round_ratios(
            samples[f"margin_{MIN_REDUCED_RATIO:g}"], samples["margin_1"], 50
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--per-round", type=int, default=5)
    args = parser.parse_args()
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(
        str(realdata.real_model_onnx()), options, providers=["CPUExecutionProvider"]
    )
    results: dict[str, Any] = {
        "model": "EfficientNet-Lite0 fp32 (tests/realdata.py)",
        "decode_target": list(realdata.LITE0_SPEC.decode_target() or ()),
        "jpeg_quality": QUALITY,
        "noise_sigma": NOISE_SIGMA,
        "rounds": args.rounds,
        "per_round": args.per_round,
    }
    target = realdata.LITE0_SPEC.decode_target()
    for name, size in SIZES.items():
        images = photos(size)
        results[name] = {
            "size": list(size),
            "images": len(images),
            "reduction": {f"margin_{m:g}": choose_reduction(*size, target, m) for m in MARGINS},
            "parity": parity(session, images),
            "speed": speed(images[0], args),
        }
        print(name, results[name])
    path = write_json("decode_margin", results)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
