"""Anomaly answers in the agent (#20): what an anomaly bundle, and a classifier chained behind
one, cost against the classifier alone, on a 12-megapixel phone photo.

Three cases through the agent's own inference core (`InferenceCore.predict`: the hardened
decode with its reduction, the bundle's preprocessing, ONNX Runtime with the profile's threads,
postprocess; no HTTP, no request records), interleaved in rounds:

- `classifier`: bench_agent's int8-static EfficientNet-Lite0 bundle (224 px), alone;
- `anomaly`: an anomaly bundle (`build-anomaly`, 20 good synthetic parts at 224 px, the fp32
  Lite0 backbone, PatchCore) answering score, verdict, regions and the score map;
- `chained`: the classifier with the anomaly bundle as its gate (one decode, both models).

Reported: p50/p95 of each, and the median of per-round ratios anomaly / classifier (target <=
1.5) and chained / classifier (target <= 1.6), at p50 and p95.

    python -m bench.bench_anomaly_agent [--rounds 6] [--per-round 25]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.bench_agent import MODEL_NAME, PROFILE, ensure_bundle, phone_jpeg
from bench.common import format_table, interleaved, library_versions, percentile, write_json
from edge_agent.app.agent import build_profile, build_store
from edge_agent.engine.anomaly import load_served
from edge_agent.engine.core import InferenceCore
from edge_agent.engine.records import RequestRecords
from edge_agent.engine.types import ModelState, new_request_id
from edge_agent.metrics import AgentMetrics
from edge_agent.settings import AgentSettings
from edge_bundle.signing import KeyRole, SigningKey, write_key_files
from model_packager.cli import main as packager
from tests.anomaly_parts import write_photos

GATE = "surface-ad"
SIDE = 224
GOOD = 20


def _anomaly_bundle(root: Path) -> tuple[Path, Path]:
    private, public = write_key_files(SigningKey.generate(KeyRole.BUNDLE), root, "bench-ad")
    write_photos(root / "good", 51, "ok", GOOD, side=SIDE)
    code = packager(
        ["build-anomaly", "--good", str(root / "good"), "--name", GATE, "--profile", PROFILE,
         "--key", str(private), "--out", str(root / "out"), "--input-size", str(SIDE),
         "--bench-samples", "3", "--quiet"]
    )  # fmt: skip
    if code != 0:
        raise RuntimeError("build-anomaly failed")
    private.unlink()
    return root / "out" / f"{GATE}-1.bundle", public


def _install(state: Path, bundle: Path, public: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "edge_agent.app.cli", "install", str(bundle), "--state-dir",
         str(state), "--trusted-key", str(public), "--profile", PROFILE],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip


def _core(state: Path, keys: tuple[Path, ...]) -> InferenceCore:
    settings = AgentSettings(
        state_dir=state,
        profile=PROFILE,
        trusted_keys=keys,
        keep_requests_s=0,
        keep_requests_bytes=0,
        keep_requests_count=0,
    )
    records = RequestRecords(settings.requests_dir, max_age_s=0, max_bytes=0, max_count=0)
    core = InferenceCore(settings, AgentMetrics(), records)
    store, profile = build_store(settings), build_profile(settings)
    for name in (MODEL_NAME, GATE):
        version = store.active_version(name)
        assert version is not None, name
        served = load_served(store.open(name, version), profile, settings.cache_dir)
        core.set_model(name, ModelState("ready", classifier=served))
    return core


def _cases(core: InferenceCore, data: bytes, loop: asyncio.AbstractEventLoop) -> dict[str, Any]:
    def case(name: str, gate: str | None) -> Callable[[], None]:
        def run() -> None:
            loop.run_until_complete(
                core.predict(name, data, request_id=new_request_id(), keep=False, gate=gate)
            )

        return run

    return {
        "classifier": case(MODEL_NAME, None),
        "anomaly": case(GATE, None),
        "chained": case(MODEL_NAME, GATE),
    }


def _ratios(samples: dict[str, list[list[float]]], name: str, q: float) -> dict[str, float]:
    per_round = [
        percentile(cand, q) / percentile(base, q)
        for base, cand in zip(samples["classifier"], samples[name], strict=True)
    ]
    return {
        "median_of_rounds": round(statistics.median(per_round), 3),
        "min_round": round(min(per_round), 3),
        "max_round": round(max(per_round), 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--per-round", type=int, default=25)
    args = parser.parse_args(argv)
    classifier = ensure_bundle()
    data = phone_jpeg()
    with tempfile.TemporaryDirectory(prefix="bench-anomaly-agent-") as tmp:
        root = Path(tmp)
        bundle, public = _anomaly_bundle(root / "anomaly")
        state = root / "state"
        _install(state, classifier.bundle, classifier.public_key)
        _install(state, bundle, public)
        core = _core(state, (classifier.public_key, public))
        loop = asyncio.new_event_loop()
        try:
            samples = interleaved(
                _cases(core, data, loop), rounds=args.rounds, per_round=args.per_round, warmup=5
            )
        finally:
            core.close()
            loop.close()
    summary: dict[str, Any] = {}
    rows = []
    for name, rounds in samples.items():
        pooled = [s * 1000 for r in rounds for s in r]
        p50, p95 = percentile(pooled, 50), percentile(pooled, 95)
        summary[name] = {"p50_ms": round(p50, 2), "p95_ms": round(p95, 2), "n": len(pooled)}
        rows.append((name, f"{p50:.1f}", f"{p95:.1f}"))
    ratios = {
        name: {"p50": _ratios(samples, name, 50), "p95": _ratios(samples, name, 95)}
        for name in ("anomaly", "chained")
    }
    targets = {"anomaly": 1.5, "chained": 1.6}
    print(format_table(("case", "p50 ms", "p95 ms"), rows))
    for name, ratio in ratios.items():
        print(
            f"{name} / classifier: p50 {ratio['p50']['median_of_rounds']}x, p95 "
            f"{ratio['p95']['median_of_rounds']}x (target <= {targets[name]}x)"
        )
    path = write_json(
        "anomaly_agent",
        {
            "photo": {"jpeg_bytes": len(data), "size": "4000x3000"},
            "pinned": {
                "profile": PROFILE,
                "classifier": f"{MODEL_NAME} int8-static, 224 px",
                "anomaly": f"{GATE}: {GOOD} good parts at {SIDE} px, fp32 Lite0 backbone",
                "path": "InferenceCore.predict in process, no records, no HTTP",
                "rounds": args.rounds,
                "per_round": args.per_round,
            },
            "cases": summary,
            "ratios_to_classifier": ratios,
            "targets": targets,
            "libraries": library_versions(["onnxruntime", "numpy", "opencv-python-headless"]),
        },
    )
    print(f"written {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
