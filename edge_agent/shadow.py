"""Shadow mode: a candidate version answers the same inputs as the active one, out of sight.

After the active model's answer is sent, the candidate classifies the same decoded photo on the
inference thread, never delaying an answer: a shadow run starts only when no other prediction is
in flight, at most one is pending, and anything else is dropped (and counted). Agreement, the
per-class disagreements and the candidate's latency go to metrics and telemetry, so central IT can
judge a candidate before activating it (probation, in the updater, judges it after).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from edge_agent.classifier import Classifier
from edge_bundle.imaging import DecodedImage

if TYPE_CHECKING:
    from edge_agent.core import InferenceCore


@dataclass
class Shadow:
    """A candidate classifier shadowing the active model of the same name."""

    candidate: Classifier
    agree: int = 0
    disagree: int = 0
    dropped: int = 0
    failed: int = 0
    disagreements: Counter[tuple[str, str]] = field(default_factory=Counter)
    latencies_ms: list[float] = field(default_factory=list)
    pending: bool = False

    def describe(self) -> dict[str, Any]:
        compared = self.agree + self.disagree
        latencies = sorted(self.latencies_ms[-1000:])
        return {
            "candidate": {
                "version": self.candidate.version,
                "bundle_sha256": self.candidate.bundle.bundle_sha256,
            },
            "compared": compared,
            "agreement": round(self.agree / compared, 4) if compared else None,
            "dropped": self.dropped,
            "failed": self.failed,
            "disagreements": [
                {"active": a, "candidate": c, "count": n}
                for (a, c), n in self.disagreements.most_common(20)
            ],
            "candidate_p50_ms": round(latencies[len(latencies) // 2], 2) if latencies else None,
            "candidate_p95_ms": round(latencies[int(len(latencies) * 0.95)], 2)
            if latencies
            else None,
        }


class ShadowRunner:
    """Shadows by model name; the core calls `after_answer` once an answer is ready."""

    def __init__(self, core: InferenceCore) -> None:
        self.core = core
        self.shadows: dict[str, Shadow] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def start(self, name: str, candidate: Classifier) -> None:
        old = self.shadows.pop(name, None)
        if old is not None:
            self.core.close_later(old.candidate)
        self.shadows[name] = Shadow(candidate)

    def stop(self, name: str) -> Shadow | None:
        shadow = self.shadows.pop(name, None)
        if shadow is not None:
            self.core.close_later(shadow.candidate)
        return shadow

    def after_answer(self, name: str, image: DecodedImage, active_label: str) -> None:
        shadow = self.shadows.get(name)
        if shadow is None:
            return
        metrics = self.core.metrics
        if shadow.pending or self.core.busy_elsewhere():
            shadow.dropped += 1
            metrics.shadow.labels(name, "dropped").inc()
            return
        shadow.pending = True
        task = asyncio.get_running_loop().create_task(self._run(name, shadow, image, active_label))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, name: str, shadow: Shadow, image: DecodedImage, active_label: str) -> None:
        metrics = self.core.metrics
        candidate = shadow.candidate
        try:
            # Yield first: the active answer is sent before the candidate starts.
            await asyncio.sleep(0)

            def classify() -> tuple[str, float]:
                started = time.perf_counter()
                probabilities = candidate.infer(candidate.prepare(image))
                label = candidate.labels[int(probabilities[0].argmax())]
                return label, time.perf_counter() - started

            label, seconds = await self.core.run_inference(classify)
        except Exception:  # a broken candidate must not disturb the active model
            shadow.failed += 1
            metrics.shadow.labels(name, "failed").inc()
            return
        finally:
            shadow.pending = False
        shadow.latencies_ms.append(seconds * 1000)
        del shadow.latencies_ms[:-5000]
        metrics.shadow_seconds.labels(name).observe(seconds)
        if label == active_label:
            shadow.agree += 1
            metrics.shadow.labels(name, "agree").inc()
        else:
            shadow.disagree += 1
            shadow.disagreements[(active_label, label)] += 1
            metrics.shadow.labels(name, "disagree").inc()
            metrics.shadow_disagreements.labels(name, active_label, label).inc()

    def describe(self) -> dict[str, Any]:
        return {name: shadow.describe() for name, shadow in self.shadows.items()}
