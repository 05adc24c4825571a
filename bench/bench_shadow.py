"""Shadow mode's cost to the active model, one run: p50 and p95 of the active model's answers
at 1 and 4 concurrent clients with a candidate shadowing it and without, in alternating rounds
(target: shadow on <= 1.10x off).

    python -m bench.bench_shadow [--rounds 4] [--requests 40]

Active model: the demo classifier (real EfficientNet-Lite0, int8); candidate: the same network
repackaged as version 2, so the candidate costs what a real candidate would. The photo is a demo
photo; the client runs in this process, the agent in its own. Writes bench/results/shadow.json.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from bench.bench_update_swap import DEMO_BUNDLE, DEMO_KEY, repackage
from bench.common import format_table, library_versions, percentile, write_json
from tests.agent_support import run_agent

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "bench-shadow-token-0123"


def load(url: str, photo: bytes, clients: int, requests: int) -> list[float]:
    times: list[float] = []
    lock = threading.Lock()
    count = iter(range(requests * clients))

    def worker() -> None:
        with httpx.Client(base_url=url, timeout=60) as client:
            while next(count, None) is not None:
                started = time.perf_counter()
                response = client.post(
                    "/v1/models/defects/predict?explain=false",
                    content=photo,
                    headers={"Content-Type": "image/jpeg"},
                )
                assert response.status_code == 200, response.text
                with lock:
                    times.append((time.perf_counter() - started) * 1000)

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return times


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--requests", type=int, default=40, help="per client per round")
    args = parser.parse_args(argv)
    photo = (ROOT / "demo" / "photos" / "scratch.jpg").read_bytes()
    samples: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-shadow-") as tmp:
        work = Path(tmp)
        v2, v2_key = repackage(work, 2)
        state = work / "state"
        for bundle, key, extra in ((DEMO_BUNDLE, DEMO_KEY, []), (v2, v2_key, ["--no-activate"])):
            subprocess.run(
                [sys.executable, "-m", "edge_agent.app.cli", "install", str(bundle), "--state-dir", str(state),
                 "--trusted-key", str(key), *extra],
                check=True, capture_output=True,
            )  # fmt: skip
        env = {
            "EDGE_AGENT_ADMIN_TOKEN": TOKEN,
            "EDGE_AGENT_KEEP_REQUESTS_COUNT": "0",
            # 4 clients must all be answered; the queueing-delay rule (#15) would refuse some.
            "EDGE_AGENT_MAX_QUEUE_DELAY_SERVICES": "1000",
        }
        auth = {"Authorization": f"Bearer {TOKEN}"}
        with run_agent(
            state, "--trusted-key", str(DEMO_KEY), "--trusted-key", str(v2_key), env=env
        ) as agent:
            agent.wait_ready(120)
            load(agent.url, photo, 1, 10)  # warm up
            for round_index in range(args.rounds):
                order = ("off", "on") if round_index % 2 == 0 else ("on", "off")
                for mode in order:
                    if mode == "on":
                        httpx.post(
                            f"{agent.url}/v1/admin/shadow",
                            json={"name": "defects", "version": 2},
                            headers=auth,
                        ).raise_for_status()
                    for clients in (1, 4):
                        samples.setdefault(f"{mode}-c{clients}", []).extend(
                            load(agent.url, photo, clients, args.requests)
                        )
                    if mode == "on":
                        shadow = httpx.get(f"{agent.url}/v1/shadow").json()["shadows"]["defects"]
                        httpx.delete(
                            f"{agent.url}/v1/admin/shadow/defects", headers=auth
                        ).raise_for_status()
    result = summarize(samples, shadow)
    result["libraries"] = library_versions(["onnxruntime", "fastapi", "uvicorn"])
    path = write_json("shadow", result)
    print(f"wrote {path}")
    return 0


def summarize(samples: dict[str, list[float]], shadow: dict[str, Any]) -> dict[str, Any]:
    summary = {
        name: {
            "n": len(v),
            "p50_ms": round(percentile(v, 50), 2),
            "p95_ms": round(percentile(v, 95), 2),
        }
        for name, v in samples.items()
    }
    ratios = {}
    for clients in (1, 4):
        on, off = summary[f"on-c{clients}"], summary[f"off-c{clients}"]
        ratios[f"c{clients}"] = {
            "p50": round(on["p50_ms"] / off["p50_ms"], 3),
            "p95": round(on["p95_ms"] / off["p95_ms"], 3),
        }
    rows = [[name, s["n"], s["p50_ms"], s["p95_ms"]] for name, s in sorted(summary.items())]
    print(format_table(["case", "n", "p50 ms", "p95 ms"], rows))
    print(f"shadow on / off: {ratios} (target <= 1.10); last round's shadow: {shadow}")
    return {
        "summary": summary,
        "on_over_off": ratios,
        "last_shadow_round": shadow,
        "checks": {k: v["p50"] <= 1.10 and v["p95"] <= 1.10 for k, v in ratios.items()},
    }


if __name__ == "__main__":
    sys.exit(main())
