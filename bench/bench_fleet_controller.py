"""The fleet controller at 1,000 and 10,000 boxes, in-process (no broker): what ingest and a
rollout's steps cost per box, and how fast the fleet page's queries answer.

For each fleet size, on a fresh SQLite registry:

1. every box's telemetry is ingested through `Controller.ingest_batch` (batches of 500, as the
   controller loop takes them): CPU seconds per message and messages per CPU second;
2. a rollout of a real signed bundle to every box, waves 1 / 10 / 50 / 100 %, soak 0, runs to
   completion: `Rollouts.tick` publishes each wave's notices (to a recorder standing in for the
   broker), and each box answers its notice with synthetic reports (downloading → committed) and
   a telemetry message on the new version, ingested like the broker's messages. The controller's
   CPU seconds (ticks + ingest of the reports, not the synthetic boxes' work) per box, at each
   size, and their ratio;
3. the page's queries through the real FastAPI app (TestClient): `GET /v1/overview` with the
   page's filters and pages, `GET /v1/rollouts`, `GET /v1/rollouts/{id}?boxes=false` (what the
   page polls, with the gates), the full `GET /v1/rollouts/{id}` with every box, and /metrics:
   p50 / p95 of each, 30 requests each, interleaved.

    python -m bench.bench_fleet_controller [--sizes 1000,10000] [--repeat 30]

Writes bench/results/fleet_controller.json with the machine's description.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

from bench.common import (
    library_versions,
    peak_rss_mib,
    percentile,
    write_json,
)
from edge_bundle.release import decode_notice
from edge_bundle.signing import TrustStore
from fleet_controller import db
from fleet_controller.api import create_app
from fleet_controller.config import ApiTokens, Config
from fleet_controller.link import Inbound, Link
from fleet_controller.metrics import FleetMetrics
from fleet_controller.plan import RolloutPlan
from fleet_controller.registry import Registry
from fleet_controller.rollouts import Rollouts
from fleet_controller.service import Controller
from tests.fleet_support import fleet_keys, signed_bundles

BATCH = 500
SITES = 20
TOKEN = "bench-token-0123456789abcdef"


def box_ref(index: int) -> tuple[str, str]:
    return f"plant-{index % SITES:02d}", f"box{index:05d}"


def telemetry(index: int, version: int, at: float) -> Inbound:
    site, device = box_ref(index)
    body = {
        "site": site,
        "device": device,
        "agent_version": "0.2.0",
        "profile": "generic-x86-64-avx2" if index % 3 else "generic-arm64",
        "line": f"line{index % 4}",
        "labels": {"camera": "v2" if index % 2 else "v1"},
        "groups": [f"line{index % 4}", "all"],
        "ready": True,
        "reasons": [],
        "at": at,
        "message_id": f"t-{index}-{version}-{at}",
        "models": [
            {
                "name": "defects",
                "version": version,
                "status": "ready",
                "latency_ms": {"p50": 8.0, "p95": 12.0 + version, "samples": 200},
                "outcomes": {"ok": 199, "error": 1},
                "selftest": {"passed": True},
            }
        ],
        "drift": {"defects": {"alert": False}},
    }
    topic = f"lineside/v1/{site}/{device}/telemetry"
    return Inbound(topic, json.dumps(body).encode(), 0, 1, time.time())


def report(site: str, device: str, notice: Any, phase: str, outcome: str) -> Inbound:
    body = {
        "phase": phase,
        "outcome": outcome,
        "sequence": notice.sequence,
        "reason": None,
        "name": notice.name,
        "version": notice.version,
        "device": f"{site}/{device}",
        "at": time.time(),
        "message_id": f"r-{site}-{device}-{notice.sequence}-{phase}",
        "rollout": {"id": notice.rollout.id, "wave": notice.rollout.wave},
    }
    topic = f"lineside/v1/{site}/{device}/update"
    return Inbound(topic, json.dumps(body).encode(), 0, 1, time.time())


class Published:
    """Stands in for the broker: records every notice the controller publishes."""

    def __init__(self) -> None:
        self.items: list[tuple[str, bytes]] = []

    def __call__(self, topic: str, payload: bytes) -> None:
        self.items.append((topic, payload))


def ingest(controller: Controller, messages: list[Inbound]) -> float:
    """Ingest `messages` in batches; the controller's CPU seconds."""
    cpu = 0.0
    for start in range(0, len(messages), BATCH):
        began = time.process_time()
        stored = controller.ingest_batch(messages[start : start + BATCH])
        cpu += time.process_time() - began
        assert len(stored) == len(messages[start : start + BATCH])
    return cpu


def run_size(boxes: int, work: Path, repeat: int) -> dict[str, Any]:
    keys = fleet_keys(work / "keys")
    bundle = signed_bundles(work / "files", keys, 2)[2]
    engine = db.connect(f"sqlite:///{work / 'fleet.db'}")
    db.migrate(engine)
    registry = Registry(engine)
    published = Published()
    rollouts = Rollouts(
        engine,
        registry,
        key=keys.release,
        bundle_trust=TrustStore.from_files([keys.bundle_public]),
        publish=published,
    )
    metrics = FleetMetrics(registry, rollouts, stale_after_s=600)
    config = Config()
    controller = Controller(config, engine, registry, rollouts, Link(config.mqtt), metrics)
    trust = TrustStore.from_files([keys.release_public])

    # 1. every box's first telemetry
    now = time.time()
    first = [telemetry(i, 1, now) for i in range(boxes)]
    began = time.perf_counter()
    ingest_cpu = ingest(controller, first)
    ingest_wall = time.perf_counter() - began

    # 2. a rollout to every box
    plan = RolloutPlan.parse(
        {
            "name": "defects-2",
            "bundle": str(bundle.path),
            "url": f"https://files.plant.example/{bundle.path.name}",
            "cohort": {"group": "all"},
            "waves": {"percent": [1, 10, 50, 100]},
            "soak_s": 0,
            "deadline_s": 3600,
            "gates": {"min_installs": 1, "min_boxes": 1, "min_samples": 50},
        },
        work,
    )
    began_cpu = time.process_time()
    created = rollouts.create(plan, actor="bench")
    create_cpu = time.process_time() - began_cpu
    rollout_id = created["id"]
    tick_cpu = report_cpu = 0.0
    ticks = reports = 0
    seen = 0
    began = time.perf_counter()
    while True:
        t0 = time.process_time()
        rollouts.tick()
        tick_cpu += time.process_time() - t0
        ticks += 1
        fresh, seen = published.items[seen:], len(published.items)
        answers: list[Inbound] = []
        stamp = time.time()
        for _topic, payload in fresh:
            notice, _signer = decode_notice(payload, trust)
            site, _, device = (notice.target.device or "").partition("/")
            index = int(device.removeprefix("box"))
            answers.append(report(site, device, notice, "downloading", "progress"))
            answers.append(report(site, device, notice, "committed", "committed"))
            answers.append(telemetry(index, 2, stamp))
        reports += len(answers)
        report_cpu += ingest(controller, answers)
        status = rollouts.status(rollout_id, boxes=False)
        if status["status"] not in ("running",) or ticks > 200:
            break
    rollout_wall = time.perf_counter() - began
    assert status["status"] == "completed", status
    assert status["counts"]["committed"] == boxes, status["counts"]
    controller_cpu = tick_cpu + report_cpu

    queries = page_queries(registry, rollouts, metrics, rollout_id, repeat)
    engine.dispose()
    return {
        "boxes": boxes,
        "telemetry_ingest": {
            "messages": boxes,
            "cpu_s": round(ingest_cpu, 3),
            "wall_s": round(ingest_wall, 3),
            "cpu_ms_per_message": round(1000 * ingest_cpu / boxes, 4),
            "messages_per_cpu_s": round(boxes / ingest_cpu, 1),
            "messages_per_s": round(boxes / ingest_wall, 1),
        },
        "rollout": {
            "waves": [w["total"] for w in status["per_wave"]],
            "create_cpu_s": round(create_cpu, 3),
            "ticks": ticks,
            "tick_cpu_s": round(tick_cpu, 3),
            "report_messages": reports,
            "report_ingest_cpu_s": round(report_cpu, 3),
            "controller_cpu_s": round(controller_cpu, 3),
            "cpu_ms_per_box": round(1000 * controller_cpu / boxes, 4),
            "tick_cpu_ms_per_box": round(1000 * tick_cpu / boxes, 4),
            "wall_s": round(rollout_wall, 3),
            "gates": [
                {"name": g["name"], "status": g["status"], "sample": g["sample"]}
                for g in status["gates"]
            ],
        },
        "queries_ms": queries,
        "peak_rss_mib": peak_rss_mib(),
    }


def page_queries(
    registry: Registry, rollouts: Rollouts, metrics: FleetMetrics, rollout_id: str, repeat: int
) -> dict[str, Any]:
    """p50/p95 of each of the page's requests, interleaved round by round."""
    app = create_app(
        registry,
        rollouts,
        ApiTokens({TOKEN: "bench"}),
        metrics=metrics.render,
        ready=lambda: {"status": "ok"},
    )
    paths = {
        "overview": "/v1/overview",
        "overview_site": "/v1/overview?site=plant-03",
        "overview_line_profile": "/v1/overview?line=line1&profile=generic-arm64",
        "overview_offline_search": "/v1/overview?state=offline&q=box01",
        "overview_page_40": "/v1/overview?offset=2000&limit=50",
        "rollouts": "/v1/rollouts",
        "rollout_with_gates": f"/v1/rollouts/{rollout_id}?boxes=false",
        "rollout_full_boxes": f"/v1/rollouts/{rollout_id}",
        "metrics": "/metrics",
    }
    timings: dict[str, list[float]] = {name: [] for name in paths}
    headers = {"Authorization": f"Bearer {TOKEN}"}
    with TestClient(app) as client:
        for name, path in paths.items():  # warm-up
            assert client.get(path, headers=headers).status_code == 200, name
        names = list(paths)
        for round_ in range(repeat):
            order = names[round_ % len(names) :] + names[: round_ % len(names)]
            for name in order:
                began = time.perf_counter()
                answer = client.get(paths[name], headers=headers)
                timings[name].append(time.perf_counter() - began)
                assert answer.status_code == 200, (name, answer.text[:200])
    page = [t for name, values in timings.items() if name != "rollout_full_boxes" for t in values]
    summary: dict[str, Any] = {
        name: {
            "p50": round(1000 * percentile(values, 50), 2),
            "p95": round(1000 * percentile(values, 95), 2),
        }
        for name, values in timings.items()
    }
    summary["page_requests_p95"] = round(1000 * percentile(page, 95), 2)
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1000,10000")
    parser.add_argument("--repeat", type=int, default=30)
    args = parser.parse_args(argv)
    sizes = [int(size) for size in args.sizes.split(",")]
    results = []
    for size in sizes:
        with tempfile.TemporaryDirectory(prefix=f"fleet-bench-{size}-") as work:
            print(f"{size} boxes ...", flush=True)
            result = run_size(size, Path(work), args.repeat)
            print(json.dumps(result, indent=1), flush=True)
            results.append(result)
    per_box: Callable[[dict[str, Any]], float] = lambda r: r["rollout"]["cpu_ms_per_box"]  # noqa: E731
    document = {
        "libraries": library_versions(["sqlalchemy", "fastapi", "paho-mqtt", "prometheus-client"]),
        "database": "sqlite (WAL, synchronous=FULL), one file",
        "sizes": results,
        "cpu_per_box_ratio": (
            round(per_box(results[-1]) / per_box(results[0]), 3) if len(results) > 1 else None
        ),
        "target": "page queries p95 < 200 ms at 10,000 boxes; CPU per box ratio about 1",
    }
    path = write_json("fleet_controller", document)
    print(f"cpu per box ratio {document['cpu_per_box_ratio']}; written to {path}")


if __name__ == "__main__":
    main()
