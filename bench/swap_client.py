"""The load generator of bench/bench_update_swap.py: its own process, so the client shares
nothing with the agent or the benchmark.

    python -m bench.swap_client --url URL --image photo.jpg --seconds 40 --concurrency 2

Sends the same photo continuously from `--concurrency` keep-alive clients for `--seconds`, then
prints one JSON line: for every request its send time (monotonic, seconds since start), latency,
status and the model version that answered.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import httpx


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--image", type=Path, required=True)
    parser.add_argument("--seconds", type=float, default=40)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--model", default="defects")
    args = parser.parse_args(argv)
    photo = args.image.read_bytes()
    start = time.monotonic()
    samples: list[tuple[float, float, int, int]] = []
    lock = threading.Lock()

    def worker() -> None:
        with httpx.Client(base_url=args.url, timeout=60) as client:
            while time.monotonic() - start < args.seconds:
                sent = time.monotonic()
                try:
                    response = client.post(
                        f"/v1/models/{args.model}/predict",
                        content=photo,
                        headers={"Content-Type": "image/jpeg"},
                    )
                    status = response.status_code
                    version = response.json()["model"]["version"] if status == 200 else 0
                except httpx.HTTPError:
                    status, version = -1, 0
                done = time.monotonic()
                with lock:
                    samples.append((sent - start, done - sent, status, version))

    threads = [threading.Thread(target=worker) for _ in range(args.concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    print(json.dumps({"start_wall": time.time() - (time.monotonic() - start), "samples": samples}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
