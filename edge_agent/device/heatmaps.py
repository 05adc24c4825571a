"""`GET /v1/requests/{id}/heatmap`: the heatmap overlay of a kept anomaly answer.

Nothing extra is kept: the request record holds the answer's score map, threshold and regions
(an anomaly bundle's at the top level, a chained classifier's under `anomaly`) and the photo, so
a heatmap lives and goes with its record (the same age, count and byte limits). It is drawn on
demand: the kept photo decoded with the hardened decoder within the decode memory budget (reduced
at decode time towards the overlay's size) and rendered off the event loop.
"""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np

from edge_agent.engine.heatmap import MAX_SIDE, render_heatmap
from edge_agent.engine.memory import PixelBudget
from edge_agent.engine.records import RequestRecords
from edge_agent.errors import UnknownRequestError
from edge_agent.settings import AgentSettings
from edge_bundle.imaging import decode_image, decoded_pixels


def findings(record: dict[str, Any]) -> dict[str, Any] | None:
    """The anomaly findings of a kept answer (None when it has none)."""
    for candidate in (record, record.get("anomaly")):
        if isinstance(candidate, dict) and isinstance(candidate.get("score_map"), dict):
            return candidate
    return None


class Heatmaps:
    """Draws the overlay of a kept anomaly answer."""

    def __init__(self, settings: AgentSettings, records: RequestRecords, pixels: PixelBudget):
        self.settings = settings
        self.records = records
        self.pixels = pixels

    async def render(self, request_id: str) -> bytes:
        record = self.records.get(request_id)
        found = findings(record) if record is not None else None
        if record is None or found is None:
            raise UnknownRequestError(
                f"no heatmap for request {request_id}: unknown, older than the keep limits, or "
                "not answered by an anomaly bundle"
            )
        data = self.records.image(request_id)
        if data is None:
            raise UnknownRequestError(f"no image kept for request {request_id}")
        target = (MAX_SIDE, MAX_SIDE)
        limit = self.settings.max_image_pixels
        cost = decoded_pixels(data, max_pixels=limit, target_hw=target)
        async with self.pixels.reserve(cost, self.settings.decode_wait_ms / 1000):
            return await asyncio.to_thread(self._draw, data, record, found, target)

    def _draw(
        self,
        data: bytes,
        record: dict[str, Any],
        found: dict[str, Any],
        target: tuple[int, int],
    ) -> bytes:
        image = decode_image(
            data,
            max_pixels=self.settings.max_image_pixels,
            max_bytes=self.settings.max_body_bytes,
            target_hw=target,
        )
        score_map = np.asarray(found["score_map"]["values"], dtype=np.float32)
        return render_heatmap(
            image.pixels,
            score_map,
            float(found["threshold"]),
            found.get("regions") or [],
            (image.width, image.height),
        )
