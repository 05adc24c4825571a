"""Drift: the score stays low on fresh photos like the calibration set and rises on darkened or
blurred ones, measured with the committed demo bundle and its recorded baseline, through the
agent's own pipeline."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from edge_agent.engine.classifier import load_classifier
from edge_agent.engine.core import InferenceCore
from edge_agent.engine.records import RequestRecords
from edge_agent.engine.types import ModelState
from edge_agent.metrics import AgentMetrics
from edge_agent.settings import AgentSettings
from edge_bundle.bundle import open_bundle
from edge_bundle.profiles import load_profile
from edge_bundle.signing import TrustStore

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "demo"))
import make_demo  # noqa: E402

COUNT = 100


def photos(transform: str) -> list[bytes]:
    out = []
    for index in range(COUNT):
        data = make_demo.seeded_photo(9, index % len(make_demo.LABELS), index)
        if transform != "none":
            image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
            if transform == "dark":
                image = (image * 0.35).astype(np.uint8)
            else:
                image = cv2.GaussianBlur(image, (0, 0), 6)
            ok, encoded = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 90])
            assert ok
            data = encoded.tobytes()
        out.append(data)
    return out


def drift_of(tmp_path: Path, images: list[bytes]) -> dict[str, object]:
    settings = AgentSettings(state_dir=tmp_path, drift_min_samples=COUNT, keep_requests_count=0)
    bundle = open_bundle(
        ROOT / "demo" / "bundle" / "defects-1.bundle",
        TrustStore.from_files([ROOT / "demo" / "keys" / "demo.pub"]),
        tmp_path / "staging",
    )
    classifier = load_classifier(bundle, load_profile("generic-x86-64-avx2"), tmp_path / "cache")
    records = RequestRecords(tmp_path / "requests", max_age_s=0, max_bytes=0, max_count=0)
    core = InferenceCore(settings, AgentMetrics(), records)
    core.set_model("defects", ModelState("ready", classifier=classifier))

    async def run() -> None:
        for number, data in enumerate(images):
            await core.predict("defects", data, request_id=f"{number:032x}", keep=False)

    asyncio.run(run())
    core.close()
    monitor = core.drift_monitor(classifier)
    assert monitor is not None
    scores = monitor.scores()
    assert scores is not None
    return scores


@pytest.mark.slow
def test_drift_score_rises_on_dark_or_blurred_photos_only(tmp_path: Path) -> None:
    like = drift_of(tmp_path / "like", photos("none"))
    dark = drift_of(tmp_path / "dark", photos("dark"))
    blurred = drift_of(tmp_path / "blur", photos("blur"))
    # With 100 baseline and 100 live samples in 10 bins, sampling noise alone gives PSI around
    # 9 x (1/100 + 1/100) = 0.18 (seen up to ~0.3); real changes score several times that.
    assert like["score"] < 0.5, like
    assert dark["psi"]["brightness"] > 1.0 and dark["score"] > 3 * like["score"], (like, dark)
    assert blurred["psi"]["sharpness"] > 1.0 and blurred["score"] > 3 * like["score"], (
        like,
        blurred,
    )
