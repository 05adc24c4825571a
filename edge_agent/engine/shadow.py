"""Shadow mode: a candidate version answers the same inputs as the active one, out of sight.

After the active model's answer is sent, the candidate classifies the same decoded photo on the
inference thread, never delaying an answer: a shadow run starts only after an idle gap (no new
prediction for 50 ms), at most one is pending, and anything else is dropped (and counted) — under
steady load shadow runs are dropped first. Agreement, the
per-class disagreements and the candidate's latency go to metrics and telemetry, so central IT can
judge a candidate before activating it (probation, in the updater, judges it after).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from edge_agent.engine.classifier import Classifier
from edge_agent.engine.lane import InferenceLane
from edge_agent.metrics import AgentMetrics
from edge_bundle.imaging import DecodedImage

#: How long the box must stay idle after an answer before the candidate runs on its photo.
IDLE_GAP_S = 0.05


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
    """Shadows by model name; `after_answer` is one of the core's "after answer" hooks."""

    def __init__(self, lane: InferenceLane, metrics: AgentMetrics) -> None:
        self.lane = lane
        self.metrics = metrics
        self.shadows: dict[str, Shadow] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def start(self, name: str, candidate: Classifier) -> None:
        old = self.shadows.pop(name, None)
        if old is not None:
            self.lane.close_later(old.candidate)
        self.shadows[name] = Shadow(candidate)

    def stop(self, name: str) -> Shadow | None:
        shadow = self.shadows.pop(name, None)
        if shadow is not None:
            self.lane.close_later(shadow.candidate)
        return shadow

    def after_answer(self, name: str, image: DecodedImage, active_label: str) -> None:
        shadow = self.shadows.get(name)
        if shadow is None:
            return
        if shadow.pending or self.lane.busy_elsewhere():
            self._drop(name, shadow)
            return
        shadow.pending = True
        task = asyncio.get_running_loop().create_task(
            self._run(name, shadow, image, active_label, time.monotonic())
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _drop(self, name: str, shadow: Shadow) -> None:
        shadow.dropped += 1
        self.metrics.shadow.labels(name, "dropped").inc()

    async def _run(
        self, name: str, shadow: Shadow, image: DecodedImage, active_label: str, answered: float
    ) -> None:
        metrics = self.metrics
        candidate = shadow.candidate
        try:
            # Run only in an idle gap: the answer has been sent, and no prediction started since.
            # A box under steady load drops its shadow runs instead of delaying anyone.
            await asyncio.sleep(IDLE_GAP_S)
            if self.lane.last_started > answered or self.lane.busy_elsewhere():
                shadow.pending = False
                self._drop(name, shadow)
                return

            def classify() -> tuple[str, float]:
                started = time.perf_counter()
                label = candidate.top_label(candidate.infer(candidate.prepare(image)))
                return label, time.perf_counter() - started

            label, seconds = await self.lane.run(classify)
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
