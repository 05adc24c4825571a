"""Outbox checkpoints off the event loop: what an MQTT reply's commit costs the event loop when
SQLite's automatic checkpoint runs inside it, against the outbox's checkpoint thread.

    python -m bench.bench_checkpoints [--rounds 16] [--per-round 400]

Two in-process agents (`bench.mqtt_in_process`: the service, handlers and device on the real
ONNX runtime and outbox, with the tiny model) answer small MQTT requests back to back, each on
its own event loop, in alternating rounds whose order rotates:
- `inline`: SQLite's automatic checkpoint (every 1,000 pages), as the outbox had it: whichever
  commit crosses the threshold copies the WAL back and fsyncs twice, on the event loop;
- `thread`: the outbox as shipped (its `outbox-checkpoint` thread, `checkpointing` honoured by
  the reply's commit and the link's deletes).

Beside the requests, a ticker on the same loop sleeps 1 ms at a time and records how late it
wakes: what every other request, health check and MQTT keepalive on that loop would wait. Per
side: the request times (p50 and the tail), the loop's lateness (p99, p99.9, max, and how often
it passed 5 ms), and the checkpoints run; per round, the ratio thread / inline of the request
p50 (the common case must not pay for the tail). Writes bench/results/checkpoints.json.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.bench_mqtt import BASE, DEVICE, SITE, small_jpeg
from bench.common import format_table, percentile, summarize_ms, write_json
from bench.mqtt_in_process import InProcessAgent
from edge_agent.mqtt.outbox import Outbox
from tests.agent_support import build_bundle, make_keys

TOPIC = f"{BASE}/infer/tiny"
LATE_MS = 5.0
TICK_S = 0.001


def sqlite_checkpoints(outbox: Outbox) -> None:
    """Turn `outbox` back into what it was: SQLite checkpoints in the commit, no thread."""
    outbox._closing.set()
    outbox._checkpoint_due.set()
    if outbox._checkpointer is not None:
        outbox._checkpointer.join()
    outbox._live().execute("PRAGMA wal_autocheckpoint = 1000")


async def _round(
    agent: InProcessAgent, photo: bytes, count: int
) -> tuple[list[float], list[float]]:
    """`count` requests back to back, with the ticker beside them: (request s, lateness s)."""
    loop = asyncio.get_running_loop()
    late: list[float] = []
    done = False

    async def ticker() -> None:
        while not done:
            asked = loop.time()
            await asyncio.sleep(TICK_S)
            late.append(max(0.0, loop.time() - asked - TICK_S))

    ticking = asyncio.create_task(ticker())
    times = [await agent.ask(TOPIC, photo, "bench/replies/1") for _ in range(count)]
    done = True
    await ticking
    return times, late


def _tail(samples_s: list[float]) -> dict[str, float]:
    """`summarize_ms` with the far tail: p99, p99.9 and how many samples passed `LATE_MS`."""
    millis = [s * 1000 for s in samples_s]
    return {
        **summarize_ms(samples_s),
        "p99_ms": round(percentile(millis, 99), 4),
        "p99_9_ms": round(percentile(millis, 99.9), 4),
        f"over_{LATE_MS:g}_ms": sum(m > LATE_MS for m in millis),
    }


TABLE_KEYS = ("n", "p50_ms", "p99_ms", "p99_9_ms", "max_ms", f"over_{LATE_MS:g}_ms")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=16)
    parser.add_argument("--per-round", type=int, default=400)
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.per_round = 2, 100
    photo = small_jpeg()
    with tempfile.TemporaryDirectory(prefix="bench-checkpoints-", dir=Path.cwd()) as tmp:
        work = Path(tmp)  # on the repository's disk, as the agent's state is, not a tmpfs
        keys = make_keys(work / "keys")
        tiny = build_bundle(work / "tiny", keys, name="tiny")
        agents = {
            side: InProcessAgent(work / side, tiny.path, keys, SITE, DEVICE)
            for side in ("inline", "thread")
        }
        sqlite_checkpoints(agents["inline"].service.outbox)
        try:
            for agent in agents.values():  # warm-up: the tiny model goes inline after a few
                agent.loop.run_until_complete(_round(agent, photo, 100))
            requests: dict[str, list[list[float]]] = {side: [] for side in agents}
            lateness: dict[str, list[float]] = {side: [] for side in agents}
            sides = list(agents)
            for number in range(args.rounds):
                order = sides[number % 2 :] + sides[: number % 2]
                for side in order:
                    agent = agents[side]
                    times, late = agent.loop.run_until_complete(
                        _round(agent, photo, args.per_round)
                    )
                    requests[side].append(times)
                    lateness[side].extend(late)
            checkpoints = agents["thread"].service.outbox.checkpoints
        finally:
            for agent in agents.values():
                agent.close()
    ratios = [
        statistics.median(thread) / statistics.median(inline)
        for thread, inline in zip(requests["thread"], requests["inline"], strict=True)
    ]
    result: dict[str, Any] = {
        "config": {"rounds": args.rounds, "per_round": args.per_round, "tick_ms": TICK_S * 1e3},
        "requests": {
            side: _tail([s for r in rounds for s in r]) for side, rounds in requests.items()
        },
        "loop_lateness": {side: _tail(late) for side, late in lateness.items()},
        "request_p50_thread_over_inline": {
            "median_of_rounds": round(statistics.median(ratios), 3),
            "min_round": round(min(ratios), 3),
            "max_round": round(max(ratios), 3),
        },
        "checkpoints_by_the_thread": checkpoints,
    }
    path = write_json("checkpoints", result)
    headers = ["n", "p50", "p99", "p99.9", "max", f">{LATE_MS:g} ms"]
    for part, title in (("requests", "requests"), ("loop_lateness", "loop late")):
        rows = [[side, *(result[part][side][key] for key in TABLE_KEYS)] for side in sides]
        print(format_table([title, *headers], rows))
    print(
        "request p50 thread / inline:",
        result["request_p50_thread_over_inline"],
        f"(checkpoints by the thread: {checkpoints})",
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
