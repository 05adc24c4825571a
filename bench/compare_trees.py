"""Two checkouts of Lineside side by side: the same benchmark run in each, in alternating rounds.

For a refactor that must not cost speed: check out the commit before it (with its own virtual
environment) next to this one, then

    python -m bench.compare_trees --before /tmp/before --after . [--rounds 4]

Each round runs `bench.bench_agent` and `bench.bench_mqtt` (short settings) once in each tree,
before and after in alternating order, each with its own `.venv/bin/python`, and reads back the
JSON each run wrote. It reports, per metric, every round's after/before ratio and their median,
and writes bench/results/compare_trees.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench.common import write_json

Metric = Callable[[dict[str, Any]], float]

AGENT_ARGS = ["--rounds", "2", "--per-round", "15", "--warmup", "3", "--batch-sizes", "1"]
MQTT_ARGS = ["--rounds", "2", "--per-round", "20"]

METRICS: dict[str, dict[str, Metric]] = {
    "bench_agent": {
        "in_process_p50_ms": lambda d: d["latency"]["cases"]["a_in_process"]["client"]["p50_ms"],
        "http_raw_p50_ms": lambda d: d["latency"]["cases"]["b_http_raw"]["client"]["p50_ms"],
        "http_raw_server_p95_ms": lambda d: d["latency"]["cases"]["b_http_raw"]["server_timing"][
            "p95_ms"
        ],
        "http_multipart_p50_ms": lambda d: d["latency"]["cases"]["b_http_multipart"]["client"][
            "p50_ms"
        ],
    },
    "bench_mqtt": {
        "small_round_trip_p50_ms": lambda d: d["summary"]["small_round_trip"]["p50_ms"],
        "photo_mqtt_p50_ms": lambda d: d["summary"]["photo_mqtt"]["p50_ms"],
        "photo_http_p50_ms": lambda d: d["summary"]["photo_http"]["p50_ms"],
    },
}


def run(tree: Path, bench: str, name: str) -> dict[str, Any]:
    args = AGENT_ARGS if bench == "bench_agent" else MQTT_ARGS
    command = [str(tree / ".venv" / "bin" / "python"), "-m", f"bench.{bench}", *args]
    if bench == "bench_agent":
        command += ["--name", name]
    done = subprocess.run(command, cwd=tree, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"{bench} in {tree} failed: {done.stderr[-2000:]}")
    result = (
        tree / "bench" / "results" / (f"{name}.json" if bench == "bench_agent" else "mqtt.json")
    )
    data: dict[str, Any] = json.loads(result.read_text())
    return data


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, required=True)
    parser.add_argument("--after", type=Path, default=Path())
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--name", default="compare_trees", help="results file name, no .json")
    args = parser.parse_args(argv)
    trees = {"before": args.before.resolve(), "after": args.after.resolve()}
    samples: dict[str, dict[str, list[float]]] = {}
    for index in range(args.rounds):
        order = ("before", "after") if index % 2 == 0 else ("after", "before")
        for bench, metrics in METRICS.items():
            for side in order:
                data = run(trees[side], bench, f"compare-{side}")
                for metric, read in metrics.items():
                    samples.setdefault(f"{bench}.{metric}", {}).setdefault(side, []).append(
                        read(data)
                    )
                print(f"round {index + 1} {bench} {side} done", flush=True)
    summary = {}
    for metric, sides in samples.items():
        ratios = [a / b for a, b in zip(sides["after"], sides["before"], strict=True)]
        summary[metric] = {
            "before": sides["before"],
            "after": sides["after"],
            "after_over_before_per_round": [round(r, 3) for r in ratios],
            "median_ratio": round(statistics.median(ratios), 3),
        }
        print(f"{metric:45s} median after/before {statistics.median(ratios):.3f}  {ratios}")
    out = write_json(
        args.name,
        {
            "trees": {side: str(path) for side, path in trees.items()},
            "rounds": args.rounds,
            "agent_args": AGENT_ARGS,
            "mqtt_args": MQTT_ARGS,
            "metrics": summary,
            "no_regression_over_5_percent": all(
                s["median_ratio"] <= 1.05 for s in summary.values()
            ),
        },
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
