"""The load generator of bench/bench_agent.py, run as its own process so that the client never
shares the server's (or the benchmark's) interpreter, event loop or GIL.

It reads one JSON command per line on stdin and answers one JSON line on stdout:

    {"op": "run", "target": "agent"|"naive"|"bare"|"floor", "form": "raw"|"multipart", "count": N,
     "concurrency": C}
    -> {"latency_s": [...], "server_ms": [...], "stages_ms": {...}, "status": {...},
        "errors": [...], "wall_s": S, "cpu_s": S}
    {"op": "quit"}

Each of the C worker threads owns a keep-alive `httpx.Client` per target, kept across commands,
and takes requests from a shared count until N have been sent. Latency is client side: from
handing a fully built request to httpx (first byte sent) to the last byte of the response read.
`cpu_s` is this client process's own CPU time for the command. `server_ms` is the agent's `Server-Timing: app;dur=MS` header (request received to response
start); `stages_ms` the agent's own `timings_ms` per stage. The photo is read once from --image,
so every request carries the same bytes.

    python -m bench.http_client --image photo.jpg --agent-url http://127.0.0.1:8080 \
        --naive-url http://127.0.0.1:8081 --model lite0
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

#: A pooled connection idle longer than this may be closed by uvicorn (keep-alive 5 s): refresh it
#: with a cheap untimed GET first, so that no timed request pays for a reconnect.
REFRESH_IDLE_S = 2.0
MAX_ERROR_MESSAGES = 5


@dataclass
class Results:
    """What one command measured; filled by several worker threads under `lock`."""

    latency_s: list[float] = field(default_factory=list)
    server_ms: list[float] = field(default_factory=list)
    stages_ms: dict[str, list[float]] = field(default_factory=dict)
    status: Counter[str] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def to_json(self, wall_s: float) -> dict[str, Any]:
        return {
            "latency_s": self.latency_s,
            "server_ms": self.server_ms,
            "stages_ms": self.stages_ms,
            "status": dict(self.status),
            "errors": self.errors,
            "wall_s": wall_s,
        }


class Target:
    """One server: its prediction URL, a keep-alive client per worker slot, how to build a request."""

    def __init__(self, name: str, base_url: str, predict_path: str, file_field: str) -> None:
        self.name = name
        self.base_url = base_url.rstrip("/")
        self.predict_path = predict_path
        self.file_field = file_field
        self.clients: list[httpx.Client] = []
        self.last_used: list[float] = []

    def client(self, slot: int) -> httpx.Client:
        while len(self.clients) <= slot:
            self.clients.append(
                httpx.Client(
                    base_url=self.base_url,
                    timeout=60,
                    limits=httpx.Limits(max_connections=1, max_keepalive_connections=1),
                )
            )
            self.last_used.append(0.0)
        if time.monotonic() - self.last_used[slot] > REFRESH_IDLE_S:
            # Untimed: opens (or re-opens) the keep-alive connection outside the measurement.
            self.clients[slot].get("/openapi.json")
            self.last_used[slot] = time.monotonic()
        return self.clients[slot]

    def request(self, client: httpx.Client, form: str, image: bytes) -> httpx.Request:
        if form == "raw":
            if self.file_field != "image":
                raise ValueError(f"{self.name} takes multipart uploads only; use form=multipart")
            return client.build_request(
                "POST", self.predict_path, content=image, headers={"content-type": "image/jpeg"}
            )
        if form == "multipart":
            files = {self.file_field: ("photo.jpg", image, "image/jpeg")}
            return client.build_request("POST", self.predict_path, files=files)
        raise ValueError(f"unknown form {form!r}; use raw or multipart")

    def close(self) -> None:
        for client in self.clients:
            client.close()


def server_timing_ms(header: str | None) -> float | None:
    """The `dur` of the `app` entry of a Server-Timing header, in milliseconds."""
    if not header:
        return None
    for entry in header.split(","):
        parts = [part.strip() for part in entry.split(";")]
        if parts[0] != "app":
            continue
        for part in parts[1:]:
            if part.startswith("dur="):
                return float(part.removeprefix("dur="))
    return None


def one_request(target: Target, slot: int, form: str, image: bytes, results: Results) -> None:
    client = target.client(slot)
    request = target.request(client, form, image)
    try:
        started = time.perf_counter()
        response = client.send(request)  # reads the whole body (not streamed)
        elapsed = time.perf_counter() - started
    except httpx.HTTPError as exc:
        with results.lock:
            results.status[f"transport:{type(exc).__name__}"] += 1
            if len(results.errors) < MAX_ERROR_MESSAGES:
                results.errors.append(f"{type(exc).__name__}: {exc}")
        return
    finally:
        target.last_used[slot] = time.monotonic()
    server = server_timing_ms(response.headers.get("server-timing"))
    stages: dict[str, float] = {}
    if response.status_code == 200 and target.name == "agent":
        stages = {k: float(v) for k, v in response.json().get("timings_ms", {}).items()}
    with results.lock:
        results.status[str(response.status_code)] += 1
        if response.status_code != 200:
            if len(results.errors) < MAX_ERROR_MESSAGES:
                results.errors.append(f"HTTP {response.status_code}: {response.text[:300]}")
            return
        results.latency_s.append(elapsed)
        if server is not None:
            results.server_ms.append(server)
        for stage, value in stages.items():
            results.stages_ms.setdefault(stage, []).append(value)


def run(target: Target, form: str, count: int, concurrency: int, image: bytes) -> dict[str, Any]:
    """Send `count` requests from `concurrency` closed-loop workers; wall time covers them all."""
    results = Results()
    remaining = count
    tickets = threading.Lock()

    def worker(slot: int) -> None:
        nonlocal remaining
        while True:
            with tickets:
                if remaining <= 0:
                    return
                remaining -= 1
            one_request(target, slot, form, image, results)

    cpu_started = time.process_time()
    for slot in range(concurrency):
        target.client(slot)  # connections open before the clock starts
    threads = [threading.Thread(target=worker, args=(slot,)) for slot in range(concurrency)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    return {**results.to_json(wall), "cpu_s": time.process_time() - cpu_started}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", type=Path, required=True, help="the photo every request sends")
    parser.add_argument("--agent-url", required=True, help="base URL of `edge-agent serve`")
    parser.add_argument("--naive-url", help="base URL of bench/naive_app.py under uvicorn")
    parser.add_argument("--bare-url", help="base URL of bench/bare_peer.py (reads, answers 16 B)")
    parser.add_argument("--floor-url", help="base URL of bench/classify_peer.py")
    parser.add_argument("--model", required=True, help="the agent's model name")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    image = args.image.read_bytes()
    targets = {
        "agent": Target("agent", args.agent_url, f"/v1/models/{args.model}/predict", "image")
    }
    if args.naive_url:
        targets["naive"] = Target("naive", args.naive_url, "/predict", "file")
    if args.bare_url:
        targets["bare"] = Target("bare", args.bare_url, "/", "image")
    if args.floor_url:
        targets["floor"] = Target("floor", args.floor_url, "/", "image")
    print(json.dumps({"ready": True, "image_bytes": len(image)}), flush=True)
    try:
        for line in sys.stdin:
            command = json.loads(line)
            if command.get("op") == "quit":
                break
            if command.get("op") != "run" or command.get("target") not in targets:
                reply: dict[str, Any] = {
                    "error": f"bad command {command!r}; send op=run with target in "
                    f"{sorted(targets)}, or op=quit"
                }
            else:
                reply = run(
                    targets[command["target"]],
                    command["form"],
                    int(command["count"]),
                    int(command.get("concurrency", 1)),
                    image,
                )
            print(json.dumps(reply), flush=True)
    finally:
        for target in targets.values():
            target.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
