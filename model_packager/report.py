"""The packaging report: one self-contained HTML page (no external assets), shipped inside the
bundle and written beside it, readable at a glance: verdict, sizes, accuracy, latency before and
after, every gate, a confusion matrix and a latency histogram. Language-model bundles get their
own page (`render_llm_report`): perplexities, tokens/s, the golden completions and whether a chat
template is pinned. Both pages share one style sheet.

Rendered with Jinja2's sandboxed environment and autoescaping, so label names or paths taken from
user files cannot inject markup.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from jinja2.sandbox import ImmutableSandboxedEnvironment
from markupsafe import Markup

from edge_bundle.manifest import ClassEvaluation, Gate, RecipeTrial

MAX_MATRIX_CLASSES = 30


@dataclass(frozen=True)
class ReportData:
    bundle_id: str
    source: str
    profile: str
    created_at: str
    quantization: str
    quantization_reason: str
    size_before: int
    size_after: int
    latency_before: tuple[float, float] | None
    latency_after: tuple[float, float]
    latency_samples: tuple[float, ...]
    machine: str
    threads: int
    on_target: bool
    dataset: str
    metrics: dict[str, float]
    gates: tuple[Gate, ...]
    waived: str | None
    notes: list[str]
    labels: tuple[str, ...]
    confusion: list[list[int]]
    confusion_axis: str
    missing_knowledge: list[str]
    golden_count: int
    golden_tolerance: float
    golden_k: int
    accuracy: tuple[float, float] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    judged_class: str | None = None
    classes: tuple[ClassEvaluation, ...] = ()
    trials: tuple[RecipeTrial, ...] = ()


@dataclass(frozen=True)
class LlmReportData:
    """What the report of a text-generation bundle shows."""

    bundle_id: str
    source: str
    profile: str
    created_at: str
    quantization: str
    quantization_reason: str
    size_reference: int | None
    size_bundle: int
    machine: str
    threads: int
    on_target: bool
    dataset: str
    metrics: dict[str, float]
    gates: tuple[Gate, ...]
    waived: str | None
    notes: list[str]
    context_size: int
    template_origin: str | None  # None: plain completion only
    template_sha256: str | None
    stop: tuple[str, ...]
    golden: tuple[tuple[str, str], ...]  # (prompt, expected greedy completion)
    timing: dict[str, float]  # prompt/generation tokens per second, ttft, p50/p95 per token
    token_samples: tuple[float, ...]


def render_report(data: ReportData) -> str:
    """The report as an HTML document."""
    return _render("templates/report.html.j2", _view(data))


def render_llm_report(data: LlmReportData) -> str:
    """The report of a text-generation bundle as an HTML document."""
    view = {
        **data.__dict__,
        "size_reference": _size(data.size_reference) if data.size_reference else None,
        "size_bundle": _size(data.size_bundle),
        "metrics": [(name, _number(value)) for name, value in sorted(data.metrics.items())],
        "timing": {
            name: str(int(value)) if float(value).is_integer() else f"{value:.1f}"
            for name, value in data.timing.items()
        },
        "histogram_svg": histogram_svg(data.token_samples),
    }
    return _render("templates/report_llm.html.j2", view)


def _class_row(record: ClassEvaluation) -> dict[str, Any]:
    def share(name: str, count: str) -> str:
        value = record.metrics.get(name)
        if value is None:
            return "–"
        return f"{100 * value:.1f} % of {record.metrics.get(count, 0):.0f}"

    return {
        "cpu_class": record.cpu_class,
        "how": record.how,
        "note": record.note,
        "confident": share("confident_top1_agreement", "confident_samples"),
        "top1": share("top1_agreement", "samples"),
        "top5": share("top5_containment", "samples"),
        "passed": all(gate.passed for gate in record.gates),
    }


def render_template(template: str, view: dict[str, Any]) -> str:
    """Another pipeline's page (`templates/NAME.html.j2`) with the shared style sheet."""
    return _render(template, view)


def _render(template: str, view: dict[str, Any]) -> str:
    env = ImmutableSandboxedEnvironment(autoescape=True)
    files = resources.files("model_packager")
    style = Markup(files.joinpath("templates/report_style.css.j2").read_text())  # noqa: S704 - our own file
    return env.from_string(files.joinpath(template).read_text()).render(r=view, style=style)


def _view(data: ReportData) -> dict[str, Any]:
    matrix = data.confusion if len(data.labels) <= MAX_MATRIX_CLASSES else None
    return {
        "bundle_id": data.bundle_id,
        "source": data.source,
        "profile": data.profile,
        "created_at": data.created_at,
        "waived": data.waived,
        "quantization": data.quantization,
        "quantization_reason": data.quantization_reason,
        "size_before": _size(data.size_before),
        "size_after": f"{_size(data.size_after)} ({data.size_before / max(data.size_after, 1):.2f}x smaller)",
        "accuracy_before": f"{100 * data.accuracy[0]:.2f} %" if data.accuracy else None,
        "accuracy_after": f"{100 * data.accuracy[1]:.2f} %" if data.accuracy else None,
        "latency_before": _latency(data.latency_before),
        "latency_after": _latency(data.latency_after),
        "machine": data.machine,
        "threads": data.threads,
        "on_target": data.on_target,
        "dataset": data.dataset,
        "metrics": [(name, _number(value)) for name, value in sorted(data.metrics.items())],
        "gates": data.gates,
        "judged_class": data.judged_class,
        "classes": [_class_row(c) for c in data.classes],
        "trials": data.trials,
        "notes": data.notes,
        "labels": data.labels,
        "confusion_rows": "true label"
        if data.confusion_axis == "label"
        else "reference prediction",
        "confusion_table": _matrix_rows(matrix, data.labels) if matrix else None,
        "top_confusions": _top_confusions(data.confusion, data.labels),
        "histogram_svg": histogram_svg(data.latency_samples),
        "missing_knowledge": data.missing_knowledge,
        "golden_count": data.golden_count,
        "golden_tolerance": data.golden_tolerance,
        "golden_k": data.golden_k,
    }


def histogram_svg(
    samples: tuple[float, ...], bins: int = 24, width: int = 560, height: int = 160
) -> Markup:
    """An inline SVG bar chart of latency samples (ms)."""
    if not samples:
        return Markup("<p>no samples</p>")
    low, high = min(samples), max(samples)
    span = (high - low) or 1.0
    counts = [0] * bins
    for value in samples:
        counts[min(int((value - low) / span * bins), bins - 1)] += 1
    top = max(counts)
    bar = (width - 40) / bins
    parts = [
        f'<svg role="img" aria-label="latency histogram" width="{width}" height="{height + 30}">'
    ]
    for i, count in enumerate(counts):
        h = (height - 10) * count / top
        x = 30 + i * bar
        parts.append(
            f'<rect x="{x:.1f}" y="{height - h:.1f}" width="{bar - 2:.1f}" height="{h:.1f}" fill="#0969da">'
            f"<title>{count} sample(s) from {low + i * span / bins:.2f} ms</title></rect>"
        )
    parts.append(f'<text x="30" y="{height + 16}">{low:.2f} ms</text>')
    parts.append(f'<text x="{width - 70}" y="{height + 16}">{high:.2f} ms</text>')
    parts.append(f'<text x="0" y="12">{top}</text></svg>')
    return Markup("".join(parts))  # noqa: S704 - built from numbers only


def _matrix_rows(matrix: list[list[int]], labels: tuple[str, ...]) -> list[dict[str, Any]]:
    peak = max((max(row) for row in matrix), default=0) or 1
    return [
        {
            "label": label,
            "cells": [
                {"count": n, "alpha": round(0.08 + 0.6 * n / peak, 3) if n else 0} for n in row
            ],
        }
        for label, row in zip(labels, matrix, strict=True)
    ]


def _top_confusions(
    matrix: list[list[int]], labels: tuple[str, ...], limit: int = 20
) -> list[tuple[str, str, int]]:
    pairs = [
        (labels[i], labels[j], n)
        for i, row in enumerate(matrix)
        for j, n in enumerate(row)
        if i != j and n
    ]
    return sorted(pairs, key=lambda p: -p[2])[:limit]


def _size(value: int) -> str:
    return f"{value / 1e6:.2f} MB" if value >= 100_000 else f"{value / 1e3:.1f} kB"


def _latency(value: tuple[float, float] | None) -> str:
    return "not measured" if value is None else f"{value[0]:.2f} / {value[1]:.2f} ms"


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() and abs(value) >= 1 else f"{value:.4f}"


__all__ = [
    "LlmReportData",
    "ReportData",
    "histogram_svg",
    "render_llm_report",
    "render_report",
    "render_template",
]
