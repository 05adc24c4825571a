"""What `model-packager build-anomaly` was asked to do: a fresh build from good images, or an
update that extends an earlier anomaly bundle's memory bank."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from model_packager.errors import PackagerError

DEFAULT_SIDE = 224
DEFAULT_TARGET = 0.01
DEFAULT_CORESET_RATIO = 0.1
DEFAULT_HOLD_OUT = 0.3
DEFAULT_PARITY_TOLERANCE = 0.005
DEFAULT_INT8_TOLERANCE = 0.03
QUANTIZATION_MODES = ("none", "int8", "auto")


@dataclass(frozen=True)
class AnomalyOptions:
    """Everything `build-anomaly` was asked to do."""

    good: Path
    key: Path
    out: Path
    profile: str
    name: str | None = None  # a build needs it; an update takes the old bundle's
    version: int | None = None  # default: 1 for a build, the old version + 1 for an update
    update: Path | None = None  # the earlier bundle whose memory bank is extended
    trust: tuple[Path, ...] = ()  # keys that verify the earlier bundle (default: --key's own)
    defects: Path | None = None
    masks: Path | None = None
    backbone: str = "efficientnet-lite0"
    input_size: int = DEFAULT_SIDE
    target_false_alarm_rate: float = DEFAULT_TARGET
    coreset_ratio: float = DEFAULT_CORESET_RATIO
    max_bank: int = 40_000
    hold_out: float = DEFAULT_HOLD_OUT
    bank_precision: str = "auto"  # auto (measured), float32 or float16
    parity_tolerance: float = DEFAULT_PARITY_TOLERANCE
    # The backbone in int8 when measured safe against the float32 graph (anomaly/int8.py):
    # none, int8 (refused when the gate fails) or auto (float32 kept when it fails).
    quantization: str = "none"
    int8_tolerance: float = DEFAULT_INT8_TOLERANCE
    golden_count: int = 4
    bench_samples: int = 30
    seed: int = 0
    # Tests only: store the bank rounded to this many mantissa bits (a lower precision than the
    # parity gate allows), labelled float16 — the gate must refuse it.
    unsafe_bank_bits: int | None = None

    def check(self) -> None:
        """Refuse impossible values before any slow step."""
        if self.update is None and self.name is None:
            raise PackagerError("a new anomaly bundle needs --name (an update takes the old one's)")
        if not 0 < self.target_false_alarm_rate < 0.5:
            raise PackagerError("--false-alarm-rate must be above 0 and below 0.5, e.g. 0.01")
        if not 0 < self.coreset_ratio <= 1:
            raise PackagerError("--coreset-ratio must be in (0, 1], e.g. 0.1")
        if not 0.05 <= self.hold_out <= 0.8:
            raise PackagerError("--hold-out must be between 0.05 and 0.8 of the good images")
        if not 32 <= self.input_size <= 1024 or self.input_size % 32:
            raise PackagerError("--input-size must be a multiple of 32 from 32 to 1024")
        if self.bank_precision not in ("auto", "float32", "float16"):
            raise PackagerError("--bank-precision is auto, float32 or float16")
        if not 0 < self.parity_tolerance < 0.5:
            raise PackagerError("--parity-tolerance is a fraction of the threshold, e.g. 0.005")
        if self.quantization not in QUANTIZATION_MODES:
            raise PackagerError("--quantization is none, int8 or auto")
        if not 0 < self.int8_tolerance < 0.5:
            raise PackagerError("--int8-tolerance is a fraction of the threshold, e.g. 0.03")
        if self.masks is not None and self.defects is None:
            raise PackagerError("--masks needs --defects: masks belong to defect images")
        if self.golden_count < 1 or self.bench_samples < 1 or self.max_bank < 16:
            raise PackagerError("--golden-count and --bench-samples must be 1 or more")
