"""A model update under load: zero failed requests, and the p99 during the swap against the
steady p99 (target <= 2x).

    python -m bench.bench_update_swap [--seconds 40] [--concurrency 2]

A real agent serves the demo classifier (real EfficientNet-Lite0, int8) while a client process
sends the same photo continuously. After a steady period, a signed release notice for version 2
(the same network repackaged, so the two versions cost the same) is published to a real
Mosquitto and the agent downloads it from a local HTTP server, verifies it, stages it (loads it
and runs its golden self-test and latency check, beside live traffic), swaps it in, watches it in
probation and commits it. Windows, from the agent's own update reports:
- steady: before the notice;
- update: from the notice to the commit (download, staging and probation included);
- swap: from the "activating" report to one second after the "probation" report.
Writes bench/results/update_swap.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from bench.common import format_table, library_versions, percentile, write_json
from edge_bundle.bundle import SourceFile, open_bundle, write_bundle
from edge_bundle.signing import TrustStore
from tests.agent_support import make_keys, run_agent
from tests.mqtt_support import Broker, TestClient, body
from tests.update_support import file_server, release_key, signed_notice

ROOT = Path(__file__).resolve().parents[1]
DEMO_BUNDLE = ROOT / "demo" / "bundle" / "defects-1.bundle"
DEMO_KEY = ROOT / "demo" / "keys" / "demo.pub"
SITE, DEVICE = "bench", "box"


def repackage(work: Path, version: int) -> tuple[Path, Path]:
    """The demo bundle's files under a new version, signed by a bench key."""
    keys = make_keys(work / "bundle-keys", "bench")
    verified = open_bundle(DEMO_BUNDLE, TrustStore.from_files([DEMO_KEY]), work / "staging")
    files = {e.path: SourceFile(verified.path(e.path), e.role) for e in verified.manifest.files}
    body_fields = {k: v for k, v in verified.manifest.model_dump().items() if k != "files"}
    from edge_bundle.manifest import ManifestBody

    manifest = replace_version(ManifestBody.model_validate(body_fields), version)
    out = write_bundle(work / f"defects-{version}.bundle", files, manifest, keys.key)
    return out, keys.public


def replace_version(body: Any, version: int) -> Any:
    return body.model_copy(update={"version": version})


def phone_photo() -> bytes:
    rng = np.random.default_rng(3)
    base = cv2.resize(
        rng.integers(60, 200, (150, 200, 3), dtype=np.uint8),
        (1600, 1200),
        interpolation=cv2.INTER_CUBIC,
    )
    image = np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8)
    ok, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok
    return data.tobytes()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=40.0)
    parser.add_argument("--steady", type=float, default=12.0, help="seconds before the notice")
    parser.add_argument("--concurrency", type=int, default=2)
    args = parser.parse_args(argv)
    if not DEMO_BUNDLE.is_file():
        print(f"{DEMO_BUNDLE} is missing", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="bench-swap-") as tmp:
        work = Path(tmp)
        v2, v2_key = repackage(work, 2)
        photo = work / "photo.jpg"
        photo.write_bytes(phone_photo())
        state = work / "state"
        subprocess.run(
            [sys.executable, "-m", "edge_agent.app.cli", "install", str(DEMO_BUNDLE), "--state-dir", str(state),
             "--trusted-key", str(DEMO_KEY)],
            check=True, capture_output=True,
        )  # fmt: skip
        signing, release_pub = release_key(work / "release")
        files = work / "files"
        files.mkdir()
        (files / "defects-2.bundle").write_bytes(v2.read_bytes())
        broker = Broker(work / "broker").start()
        try:
            with file_server(files) as (url, _log):
                env = {
                    "EDGE_AGENT_MQTT_ENABLED": "true",
                    "EDGE_AGENT_MQTT_PORT": str(broker.port),
                    "EDGE_AGENT_SITE": SITE,
                    "EDGE_AGENT_DEVICE": DEVICE,
                    "EDGE_AGENT_TELEMETRY_INTERVAL_S": "0",
                    "EDGE_AGENT_KEEP_REQUESTS_COUNT": "0",
                    "EDGE_AGENT_RELEASE_KEYS": json.dumps([str(release_pub)]),
                    "EDGE_AGENT_PROBATION_S": "5",
                }
                trusted = ["--trusted-key", str(DEMO_KEY), "--trusted-key", str(v2_key)]
                with run_agent(state, *trusted, env=env) as agent:
                    agent.wait_ready(120)
                    watcher = TestClient(broker.port, "bench-ops")
                    watcher.subscribe(f"lineside/v1/{SITE}/{DEVICE}/update")
                    client = subprocess.Popen(
                        [sys.executable, "-m", "bench.swap_client", "--url", agent.url, "--image", str(photo),
                         "--seconds", str(args.seconds), "--concurrency", str(args.concurrency)],
                        stdout=subprocess.PIPE, cwd=ROOT,
                    )  # fmt: skip
                    time.sleep(args.steady)
                    notice_at = time.time()
                    central = TestClient(broker.port, "bench-central")
                    notice = signed_notice(
                        signing,
                        v2,
                        f"{url}/defects-2.bundle",
                        sequence=1,
                        device=f"{SITE}/{DEVICE}",
                    )
                    central.publish(f"lineside/v1/{SITE}/{DEVICE}/release", notice, retain=True)
                    central.close()
                    output, _ = client.communicate(timeout=args.seconds + 120)
                    reports = [(m.timestamp, body(m)) for m in watcher.messages]
                    watcher.close()
                    rss = _rss(agent.process.pid)
        finally:
            broker.stop()
    result = analyse(json.loads(output), notice_at, reports)
    result["agent_rss_mib"] = rss
    result["pinned"] = {
        "concurrency": args.concurrency,
        "profile": "generic-x86-64-avx2",
        "probation_s": 5,
    }
    result["libraries"] = library_versions(["onnxruntime", "fastapi", "uvicorn", "paho-mqtt"])
    path = write_json("update_swap", result)
    print(f"wrote {path}")
    return 0


def analyse(
    client: dict[str, Any], notice_at: float, reports: list[tuple[float, dict[str, Any]]]
) -> dict[str, Any]:
    start_wall = client["start_wall"]
    samples = client["samples"]  # (sent_s, latency_s, status, version)

    def at(phase: str) -> float | None:
        for _, report in reports:
            if report.get("phase") == phase and report.get("sequence") == 1:
                return float(report["at"]) - start_wall
        return None

    notice = notice_at - start_wall
    activating, probation, committed = at("activating"), at("probation"), at("committed")
    failures = [s for s in samples if s[2] != 200]
    windows = {"steady": (0.0, notice)}
    if committed is not None:
        windows["update"] = (notice, committed)
    if activating is not None and probation is not None:
        windows["swap"] = (activating - 0.5, probation + 1.0)
    summary: dict[str, Any] = {}
    for name, (low, high) in windows.items():
        latencies = [s[1] * 1000 for s in samples if low <= s[0] < high and s[2] == 200]
        if latencies:
            summary[name] = {
                "n": len(latencies),
                "p50_ms": round(percentile(latencies, 50), 2),
                "p99_ms": round(percentile(latencies, 99), 2),
                "max_ms": round(max(latencies), 2),
            }
    versions = sorted({s[3] for s in samples if s[2] == 200})
    ratio = None
    if "swap" in summary and "steady" in summary:
        ratio = round(summary["swap"]["p99_ms"] / summary["steady"]["p99_ms"], 3)
    update_ratio = None
    if "update" in summary and "steady" in summary:
        update_ratio = round(summary["update"]["p99_ms"] / summary["steady"]["p99_ms"], 3)
    rows = [[name, s["n"], s["p50_ms"], s["p99_ms"], s["max_ms"]] for name, s in summary.items()]
    print(format_table(["window", "n", "p50 ms", "p99 ms", "max ms"], rows))
    print(f"requests: {len(samples)}, failed: {len(failures)}, versions answering: {versions}")
    print(f"p99 swap / steady: {ratio} (target <= 2.0); whole update / steady: {update_ratio}")
    return {
        "requests": len(samples),
        "failed": len(failures),
        "failures": failures[:20],
        "versions_answering": versions,
        "windows_s": {k: [round(v[0], 2), round(v[1], 2)] for k, v in windows.items()},
        "summary": summary,
        "p99_swap_over_steady": ratio,
        "p99_update_over_steady": update_ratio,
        "checks": {
            "zero_failures": len(failures) == 0,
            "swap_p99_within_2x": ratio is not None and ratio <= 2.0,
            "committed": committed is not None,
        },
        "reports": [r for _, r in reports],
    }


def _rss(pid: int) -> float | None:
    try:
        import psutil

        return round(psutil.Process(pid).memory_info().rss / 2**20, 1)
    except Exception:
        return None


if __name__ == "__main__":
    sys.exit(main())
