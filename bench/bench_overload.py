"""The agent at 10x its sustainable load: accepted latency, shed fraction and time to a shed answer.

One run, against real agents over HTTP. The demo classifier (real EfficientNet-Lite0, int8) is
installed once and served by two `edge-agent serve` processes with the same state, one at a time
under load, in alternating rounds:

  delay   the defaults: admission refuses a prediction when the ones ahead would keep it waiting
          longer than half a measured service time (`max_queue_delay_services` 0.5: admitted
          only when none holds a slot), and the decode and inference threads, ONNX Runtime's
          own included, run at nice +10 (`inference_nice`);
  count   the rule shipped before #15: up to `max_in_flight` (8) admitted however long they wait
          (`max_queue_delay_services` 1000, so it never decides) and no thread priority
          (`inference_nice` 0). Slow uploads hold no slot in either (not exercised here), and
          both refuse at the HTTP edge, before routing, what admission would refuse (no setting
          turns that off).

Each round: the sustainable rate, answers per second to two closed-loop clients from an agent
that admits both (the `count` settings: the box's rate, whatever rule is measured; or
`--sustainable-rate`); then per agent, unloaded latency (one closed-loop client, `--unloaded`
requests) and open-loop Poisson arrivals at `--factor` (10) x that rate for `--seconds`. The
load generator runs in its own process (asyncio, raw HTTP/1.1 keep-alive connections, one per
request in flight), so the client never shares the agent's interpreter; latency is client side,
from the first byte sent to the last byte received; the agent's own `Server-Timing` (app start
to response start) is kept beside it, and so is the CPU the agent and its event loop (main
thread) used under overload, from /proc. The photo is a demo photo (1280x960 JPEG), the same
bytes every time. Request records are off (EDGE_AGENT_KEEP_REQUESTS_COUNT=0).

Targets (#15): accepted p99 under overload <= 2x the unloaded p99; a shed answer in <= 0.1x the
unloaded p50.

The floor (`--floor`): what a refusal costs at the least on this box. A bare ASGI app that answers
every request with a fixed JSON 503 (no framework, no agent) under the same uvicorn h11 server,
offered the delay agent's overload rate with the same photo, measured by the same client: once on
an otherwise idle box, once next to two busy-looping processes at nice +10 (what the inference
threads are under overload). No agent can refuse faster than that.

    python -m bench.bench_overload [--rounds 3] [--seconds 6] [--factor 10] [--floor]

Writes bench/results/overload.json and prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

from bench.common import format_table, library_versions, percentile, write_json
from tests.agent_support import AgentProcess, free_port, run_agent

ROOT = Path(__file__).resolve().parents[1]
DEMO_BUNDLE = ROOT / "demo" / "bundle" / "defects-1.bundle"
DEMO_KEY = ROOT / "demo" / "keys" / "demo.pub"
PHOTO = ROOT / "demo" / "photos" / "pit.jpg"
PATH = "/v1/models/defects/predict?explain=false"
TARGETS = {"accepted_p99_over_unloaded_p99_max": 2.0, "shed_p50_over_unloaded_p50_max": 0.1}
AGENTS = {
    "delay": {},
    "count": {"EDGE_AGENT_MAX_QUEUE_DELAY_SERVICES": "1000", "EDGE_AGENT_INFERENCE_NICE": "0"},
}


# ---- the load generator (its own process) -----------------------------------------------------
class Connections:
    """Idle keep-alive connections to one agent; a request takes one or opens a new one."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def take(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self.idle:
            return self.idle.pop()
        return await asyncio.open_connection(self.host, self.port)

    def give(self, conn: tuple[asyncio.StreamReader, asyncio.StreamWriter], reuse: bool) -> None:
        if reuse:
            self.idle.append(conn)
        else:
            conn[1].close()


async def one(pool: Connections, request: bytes) -> tuple[str, float, float | None]:
    """Send one request: status (or error name), seconds from first byte sent to last received,
    and the agent's Server-Timing in seconds (None without one)."""
    try:
        reader, writer = await pool.take()
    except OSError as exc:
        return type(exc).__name__, 0.0, None
    started = time.perf_counter()
    try:
        writer.write(request)
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = dict(line.split(":", 1) for line in lines[1:] if ":" in line)
        headers = {k.strip().lower(): v.strip() for k, v in headers.items()}
        await reader.readexactly(int(headers.get("content-length", "0")))
        elapsed = time.perf_counter() - started
        pool.give((reader, writer), headers.get("connection", "").lower() != "close")
        timing = headers.get("server-timing", "")
        server = float(timing.split("dur=")[1]) / 1000 if "dur=" in timing else None
        return lines[0].split(" ")[1], elapsed, server
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
        writer.close()
        return type(exc).__name__, time.perf_counter() - started, None


async def closed_loop(pool: Connections, request: bytes, count: int, clients: int) -> list[Any]:
    remaining = iter(range(count))
    results: list[Any] = []

    async def worker() -> None:
        while next(remaining, None) is not None:
            results.append(await one(pool, request))

    await asyncio.gather(*(worker() for _ in range(clients)))
    return results


async def open_loop(pool: Connections, request: bytes, rate: float, seconds: float) -> list[Any]:
    """Poisson arrivals at `rate`/s for `seconds`, each sent when due (late ones are counted)."""
    rng = random.Random(15)
    tasks, lags = [], []
    start = time.perf_counter()
    due = start
    while due - start < seconds:
        now = time.perf_counter()
        if due > now:
            await asyncio.sleep(due - now)
        lags.append(time.perf_counter() - due)
        tasks.append(asyncio.create_task(one(pool, request)))
        due += rng.expovariate(rate)
    results = list(await asyncio.gather(*tasks))
    return [*results, ("lag", statistics.median(lags), None)]


def client_main(url: str, photo: Path) -> int:
    """Answer JSON commands from stdin: closed_loop / open_loop, then quit."""
    host, port = url.removeprefix("http://").split(":")
    body = photo.read_bytes()
    request = (
        f"POST {PATH} HTTP/1.1\r\nHost: {host}\r\nContent-Type: image/jpeg\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body

    async def serve() -> None:
        pool = Connections(host, int(port))
        for line in sys.stdin:
            command = json.loads(line)
            cpu = time.process_time()
            wall = time.perf_counter()
            if command["op"] == "quit":
                return
            if command["op"] == "closed":
                results = await closed_loop(pool, request, command["count"], command["clients"])
                lag = 0.0
            else:
                *results, (_, lag, _) = await open_loop(
                    pool, request, command["rate"], command["seconds"]
                )
            answer = {
                "results": results,
                "wall_s": time.perf_counter() - wall,
                "cpu_s": time.process_time() - cpu,
                "median_lag_s": lag,
            }
            print(json.dumps(answer), flush=True)

    asyncio.run(serve())
    return 0


# ---- the floor: the cheapest refusal this box can serve ---------------------------------------
FLOOR_BODY = json.dumps(
    {"error": {"code": "overloaded", "message": "busy; retry after a second", "request_id": None}}
).encode()


async def bare_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Refuse every request with a fixed JSON 503 + Retry-After, the body unread (as the agent)."""
    if scope["type"] != "http":
        return
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(FLOOR_BODY)).encode()),
        (b"retry-after", b"1"),
    ]
    await send({"type": "http.response.start", "status": 503, "headers": headers})
    await send({"type": "http.response.body", "body": FLOOR_BODY})


@contextlib.contextmanager
def busy_loops(count: int, nice: int) -> Any:
    """`count` processes spinning at `nice`, standing in for the inference threads."""
    spin = f"import os; os.nice({nice})\nwhile True: pass"
    loops = [subprocess.Popen([sys.executable, "-c", spin]) for _ in range(count)]
    try:
        yield
    finally:
        for loop in loops:
            loop.kill()
            loop.wait()


@contextlib.contextmanager
def bare_server() -> Any:
    """uvicorn (h11, as the agent) serving `bare_app` on a free port; yields its URL."""
    port = free_port()
    command = [sys.executable, "-m", "uvicorn", "bench.bench_overload:bare_app", "--http", "h11",
               "--port", str(port), "--log-level", "warning", "--no-access-log", "--lifespan", "off"]  # fmt: skip
    server = subprocess.Popen(command, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError("the bare uvicorn server did not start")
            time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(10)


def floor(rate: float, seconds: float, unloaded_p50_ms: float) -> dict[str, Any]:
    """Time to a bare 503 at `rate`, idle and next to nice +10 busy loops, against the agent."""
    measured: dict[str, Any] = {"offered_rate_per_s": round(rate, 1)}
    with bare_server() as url:
        client = Client(url)
        try:
            client.ask(op="open", rate=rate, seconds=1.0)  # warm up
            for name, loops in (("idle", 0), ("busy", 2)):
                with busy_loops(loops, nice=10):
                    results = client.ask(op="open", rate=rate, seconds=seconds)["results"]
                shed = [t for status, t, _ in results if status == "503"]
                p50 = ms(shed, 50)
                measured[name] = {
                    "answered": len(shed),
                    "sent": len(results),
                    "shed_p50_ms": p50,
                    "shed_p99_ms": ms(shed, 99),
                    "shed_p50_over_agent_unloaded_p50": round(p50 / unloaded_p50_ms, 3),
                }
        finally:
            client.close()
    return measured


# ---- the benchmark ----------------------------------------------------------------------------
class Sustained(NamedTuple):
    """The sustainable rate a round offers `--factor` times, and how it was answered."""

    per_s: float
    statuses: dict[str, int]


class Client:
    """The load generator process, spoken to over pipes."""

    def __init__(self, url: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bench.bench_overload", "--client", url],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT,
        )  # fmt: skip

    def ask(self, **command: Any) -> dict[str, Any]:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()
        return dict(json.loads(self.process.stdout.readline()))

    def close(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps({"op": "quit"}) + "\n")
        self.process.stdin.close()
        self.process.wait(30)


def cpu_seconds(pid: int) -> tuple[float, float]:
    """CPU seconds (user + system) of process `pid`'s main thread (the agent's event loop) and of
    the whole process, from /proc (zeros where there is none)."""

    def read(path: str) -> float:
        try:
            fields = Path(path).read_text().rsplit(")", 1)[1].split()
        except OSError:
            return 0.0
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    return read(f"/proc/{pid}/task/{pid}/stat"), read(f"/proc/{pid}/stat")


def ms(values: Sequence[float], q: float) -> float:
    return round(percentile(values, q) * 1000, 2) if values else float("nan")


def sustainable_rate(state: Path, env: dict[str, str], args: argparse.Namespace) -> Sustained:
    """Answers per second to two closed-loop clients, from an agent that admits both (the
    `count` agent's settings): the box's rate, the same whatever admission rule is measured."""
    with run_agent(state, "--trusted-key", str(DEMO_KEY), env={**env, **AGENTS["count"]}) as agent:
        agent.wait_ready(120)
        client = Client(agent.url)
        try:
            client.ask(op="closed", count=50, clients=2)  # warm up
            capacity = client.ask(op="closed", count=args.unloaded, clients=2)
        finally:
            client.close()
    statuses = Counter(status for status, *_ in capacity["results"])
    return Sustained(statuses["200"] / capacity["wall_s"], dict(statuses))


def one_round(
    client: Client, args: argparse.Namespace, pid: int, sustained: Sustained
) -> dict[str, Any]:
    unloaded = client.ask(op="closed", count=args.unloaded, clients=1)["results"]
    assert all(status == "200" for status, *_ in unloaded), Counter(s for s, *_ in unloaded)
    rate, statuses = sustained
    loop_before, agent_before = cpu_seconds(pid)
    overload = client.ask(op="open", rate=args.factor * rate, seconds=args.seconds)
    loop_after, agent_after = cpu_seconds(pid)
    results = overload["results"]
    accepted = [t for status, t, _ in results if status == "200"]
    accepted_server = [s for status, _, s in results if status == "200" and s is not None]
    shed = [t for status, t, _ in results if status == "503"]
    latencies = [t for _, t, _ in unloaded]
    unloaded_server = [s for _, _, s in unloaded if s is not None]
    return {
        "unloaded_p50_ms": ms(latencies, 50),
        "unloaded_p99_ms": ms(latencies, 99),
        "unloaded_server_p99_ms": ms(unloaded_server, 99),
        "sustainable_rate_per_s": round(rate, 1),
        "sustainable_status": statuses,
        "offered_rate_per_s": round(args.factor * rate, 1),
        "sent": len(results),
        "status": dict(Counter(status for status, *_ in results)),
        "goodput_per_s": round(len(accepted) / overload["wall_s"], 1),
        "accepted_p50_ms": ms(accepted, 50),
        "accepted_p99_ms": ms(accepted, 99),
        "accepted_server_p99_ms": ms(accepted_server, 99),
        "shed_fraction": round(len(shed) / len(results), 3),
        "shed_p50_ms": ms(shed, 50),
        "shed_p99_ms": ms(shed, 99),
        "client_median_lag_ms": round(overload["median_lag_s"] * 1000, 2),
        "client_cpu_share": round(overload["cpu_s"] / overload["wall_s"], 2),
        "agent_cpu_share": round((agent_after - agent_before) / overload["wall_s"], 2),
        "event_loop_cpu_share": round((loop_after - loop_before) / overload["wall_s"], 2),
        "event_loop_cpu_ms_per_request": round((loop_after - loop_before) * 1000 / len(results), 3),
        "accepted_p99_over_unloaded_p99": round(percentile(accepted, 99) / percentile(latencies, 99), 3) if accepted else None,
        "shed_p50_over_unloaded_p50": round(percentile(shed, 50) / percentile(latencies, 50), 3) if shed else None,
    }  # fmt: skip


def summarize(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    keys = ("accepted_p99_over_unloaded_p99", "shed_p50_over_unloaded_p50", "shed_fraction",
            "unloaded_p50_ms", "unloaded_p99_ms", "accepted_p99_ms", "shed_p50_ms", "shed_p99_ms",
            "unloaded_server_p99_ms", "accepted_server_p99_ms", "accepted_p50_ms",
            "goodput_per_s", "sustainable_rate_per_s", "event_loop_cpu_share",
            "event_loop_cpu_ms_per_request", "agent_cpu_share")  # fmt: skip
    summary: dict[str, Any] = {}
    for key in keys:
        values = [r[key] for r in rounds if r[key] is not None]
        if values:
            summary[key] = {
                "median": round(statistics.median(values), 3),
                "min": min(values),
                "max": max(values),
            }
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=6.0, help="overload per round")
    parser.add_argument("--factor", type=float, default=10.0, help="offered / sustainable")
    parser.add_argument("--unloaded", type=int, default=200, help="requests, unloaded")
    parser.add_argument("--agents", nargs="+", choices=list(AGENTS), default=list(AGENTS))
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="agent setting for every agent (repeatable), e.g. EDGE_AGENT_INFERENCE_NICE=0",
    )
    parser.add_argument(
        "--sustainable-rate",
        type=float,
        metavar="PER_S",
        help="take this as the sustainable rate instead of measuring it (one offered load for "
        "agents whose admission refuses a second closed-loop client)",
    )
    parser.add_argument(
        "--floor", action="store_true", help="also time a bare uvicorn 503 at the same rate"
    )
    parser.add_argument("--client", metavar="URL", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.client:
        return client_main(args.client, PHOTO)
    extra = dict(item.split("=", 1) for item in args.env)
    rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in args.agents}
    with tempfile.TemporaryDirectory(prefix="bench-overload-") as tmp:
        state = Path(tmp) / "state"
        subprocess.run(
            [sys.executable, "-m", "edge_agent.app.cli", "install", str(DEMO_BUNDLE),
             "--state-dir", str(state), "--trusted-key", str(DEMO_KEY)],
            check=True, capture_output=True,
        )  # fmt: skip
        base = {"EDGE_AGENT_KEEP_REQUESTS_COUNT": "0", **extra}
        for index in range(args.rounds):
            if args.sustainable_rate is not None:
                sustained = Sustained(args.sustainable_rate, {})
            else:
                sustained = sustainable_rate(state, base, args)
            print(f"round {index + 1} sustainable: {sustained.per_s:.1f}/s", flush=True)
            order = args.agents if index % 2 == 0 else list(reversed(args.agents))
            for name in order:
                env = {**base, **AGENTS[name]}
                with run_agent(state, "--trusted-key", str(DEMO_KEY), env=env) as agent:
                    rounds[name].append(measure(agent, args, sustained))
                result = rounds[name][-1]
                print(f"round {index + 1} {name}: {json.dumps(result)}", flush=True)
    summary = {name: summarize(r) for name, r in rounds.items()}
    delay = summary["delay"]
    verdicts = {
        "accepted_p99_over_unloaded_p99": delay["accepted_p99_over_unloaded_p99"]["median"]
        <= TARGETS["accepted_p99_over_unloaded_p99_max"],
        "shed_p50_over_unloaded_p50": delay.get("shed_p50_over_unloaded_p50", {}).get("median", 0)
        <= TARGETS["shed_p50_over_unloaded_p50_max"],
    }
    if args.floor and "delay" in rounds:
        rate = statistics.median(r["offered_rate_per_s"] for r in rounds["delay"])
        payload_floor = floor(rate, args.seconds, delay["unloaded_p50_ms"]["median"])
        print(f"floor: {json.dumps(payload_floor)}", flush=True)
    else:
        payload_floor = None
    payload = {
        "photo": PHOTO.name,
        "factor": args.factor,
        "seconds": args.seconds,
        "agents": {name: {"env": {**extra, **AGENTS[name]}} for name in args.agents},
        "pinned": "demo bundle (int8, profile generic-x86-64-avx2: 2 intra-op threads, spinning "
        "off), same photo bytes, request records off, client in its own process",
        "targets": TARGETS,
        "summary": summary,
        "verdicts": verdicts,
        "floor": payload_floor,
        "rounds": rounds,
        "libraries": library_versions(["onnxruntime", "fastapi", "starlette", "uvicorn"]),
    }
    path = write_json("overload", payload)
    rows = [
        [name, s["unloaded_p50_ms"]["median"], s["unloaded_p99_ms"]["median"],
         s["accepted_p99_ms"]["median"], s["accepted_p99_over_unloaded_p99"]["median"],
         s["shed_fraction"]["median"], s.get("shed_p50_over_unloaded_p50", {}).get("median")]
        for name, s in summary.items()
    ]  # fmt: skip
    print(format_table(["agent", "unl p50 ms", "unl p99 ms", "acc p99 ms", "acc p99/unl p99",
                        "shed frac", "shed p50/unl p50"], rows))  # fmt: skip
    print(f"verdicts (delay agent): {verdicts}\nwrote {path}")
    return 0


def measure(agent: AgentProcess, args: argparse.Namespace, sustained: Sustained) -> dict[str, Any]:
    agent.wait_ready(120)
    client = Client(agent.url)
    try:
        client.ask(op="closed", count=50, clients=1)  # warm up
        return one_round(client, args, agent.process.pid, sustained)
    finally:
        client.close()


if __name__ == "__main__":
    sys.exit(main())
