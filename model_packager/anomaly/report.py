"""The HTML report of an anomaly bundle: threshold and its uncertainty, the memory bank, good vs
defect score histograms with the threshold, and example heatmaps as inline PNGs. Rendered by
the packager's report module (sandboxed Jinja, shared style sheet)."""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np
from markupsafe import Markup
from numpy.typing import NDArray

from edge_bundle.manifest import Anomaly
from model_packager.report import render_template

TEMPLATE = "templates/report_anomaly.html.j2"


@dataclass(frozen=True)
class Heatmap:
    title: str
    pixels: NDArray[np.uint8]  # RGB, the model's input size
    score_map: NDArray[np.floating]
    threshold: float

    def png_base64(self) -> str:
        height, width = self.pixels.shape[:2]
        scaled = np.clip(self.score_map / (2 * self.threshold), 0, 1).astype(np.float32)
        upsampled = cv2.resize(scaled, (width, height), interpolation=cv2.INTER_LINEAR)
        colours = cv2.applyColorMap((upsampled * 255).astype(np.uint8), cv2.COLORMAP_JET)
        photo = cv2.cvtColor(self.pixels, cv2.COLOR_RGB2BGR)
        blend = cv2.addWeighted(photo, 0.55, colours, 0.45, 0)
        ok, data = cv2.imencode(".png", blend)
        if not ok:
            raise RuntimeError("OpenCV could not encode a heatmap PNG")
        return base64.b64encode(data.tobytes()).decode("ascii")


@dataclass(frozen=True)
class AnomalyReport:
    bundle_id: str
    profile: str
    created_at: str
    anomaly: Anomaly
    precision_reason: str
    parity: str
    model_size: int
    latency: tuple[float, float]
    threads: int
    machine: str
    build_seconds: float
    good_scores: tuple[float, ...]
    defect_scores: dict[str, tuple[float, ...]]
    heatmaps: tuple[Heatmap, ...]
    notes: tuple[str, ...] = field(default_factory=tuple)


def render(data: AnomalyReport) -> str:
    anomaly = data.anomaly
    calibration, bank = anomaly.calibration, anomaly.memory_bank
    low, high = calibration.false_alarm_interval
    view: dict[str, Any] = {
        "bundle_id": data.bundle_id,
        "backbone": anomaly.backbone,
        "profile": data.profile,
        "created_at": data.created_at,
        "updated_from": anomaly.updated_from,
        "parity": data.parity,
        "threshold": f"{anomaly.threshold:.4f}",
        "target": f"{100 * calibration.target_false_alarm_rate:.1f} %",
        "false_alarms": calibration.false_alarms,
        "held_out": calibration.held_out_good,
        "confidence": f"{100 * calibration.confidence:.0f} %",
        "interval": f"{100 * low:.1f} – {100 * high:.1f} %",
        "bank_size": bank.size,
        "bank_dim": bank.dim,
        "bank_precision": bank.precision,
        "precision_reason": data.precision_reason,
        "patches_seen": bank.patches_seen,
        "bank_images": bank.images,
        "input_size": "×".join(map(str, anomaly.input_size)),
        "map_size": "×".join(map(str, anomaly.score_map_size)),
        "model_size": f"{data.model_size / 1e6:.2f} MB",
        "latency": f"{data.latency[0]:.2f} / {data.latency[1]:.2f} ms",
        "threads": data.threads,
        "machine": data.machine,
        "build_seconds": f"{data.build_seconds:.1f}",
        "evaluation": _evaluation(anomaly),
        "histogram": score_histogram(data.good_scores, data.defect_scores, anomaly.threshold),
        "heatmaps": [{"title": h.title, "png": h.png_base64()} for h in data.heatmaps],
        "notes": data.notes,
    }
    return render_template(TEMPLATE, view)


def _evaluation(anomaly: Anomaly) -> dict[str, Any] | None:
    evaluation = anomaly.evaluation
    if evaluation is None:
        return None
    peak = evaluation.peak_on_mask
    return {
        "auroc": f"{evaluation.image_auroc:.4f}",
        "good": evaluation.good_images,
        "defects": evaluation.defect_images,
        "peak": None if peak is None else f"{100 * peak:.0f} %",
        "masked": evaluation.masked_images,
        "rows": [
            {"name": name, "recall": f"{100 * recall:.0f} %"}
            for name, recall in sorted(evaluation.recall.items())
        ],
    }


def score_histogram(
    good: tuple[float, ...],
    defects: dict[str, tuple[float, ...]],
    threshold: float,
    bins: int = 30,
    width: int = 560,
    height: int = 160,
) -> Markup:
    """Inline SVG: good (blue) and defect (red) score histograms on one axis, the threshold."""
    bad = tuple(value for values in defects.values() for value in values)
    everything = (*good, *bad, threshold)
    low, high = min(everything), max(everything)
    span = (high - low) or 1.0
    counts = {
        "#0969da": np.histogram(good, bins=bins, range=(low, high))[0],
        "#cf222e": np.histogram(bad, bins=bins, range=(low, high))[0] if bad else np.zeros(bins),
    }
    top = max(1, *(int(c.max()) for c in counts.values()))
    bar = (width - 40) / bins
    parts = [
        f'<svg role="img" aria-label="score histogram" width="{width}" height="{height + 30}">'
    ]
    for colour, values in counts.items():
        for i, count in enumerate(values):
            h = (height - 10) * int(count) / top
            parts.append(
                f'<rect x="{30 + i * bar:.1f}" y="{height - h:.1f}" width="{bar - 2:.1f}" '
                f'height="{h:.1f}" fill="{colour}" fill-opacity="0.6"><title>{int(count)} '
                f"image(s) from {low + i * span / bins:.3f}</title></rect>"
            )
    x = 30 + (threshold - low) / span * (width - 40)
    parts.append(
        f'<line x1="{x:.1f}" x2="{x:.1f}" y1="0" y2="{height}" stroke="#000" stroke-width="2"/>'
    )
    parts.append(f'<text x="30" y="{height + 16}">{low:.3f}</text>')
    parts.append(f'<text x="{width - 70}" y="{height + 16}">{high:.3f}</text></svg>')
    return Markup("".join(parts))  # noqa: S704 - built from numbers only
