"""Large PNGs and the agent's memory (#15), measured on a real `edge-agent serve` process.

Four concurrent 49-megapixel PNGs (under the 50 MP cap, uploads of a few hundred KB) used to take
the agent to 7x its baseline RSS, and about 4x stayed: PNG has no reduced-size decoding, the
decodes ran side by side, and glibc kept the freed heap. Now the decode pixel budget lets one such
photo decode at a time and the memory is given back afterwards. RSS is read from
/proc/PID/status (VmRSS; VmHWM for the peak) and judged as ratios and differences to the agent's
own baseline, so neither the machine's speed nor the model's size decides the verdict.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx

from tests.agent_support import Keys, build_bundle, jpeg, make_keys, run_agent
from tests.images import large_flat_png
from tests.integration.test_agent_http import install

SIDE = 7000
DECODED_BYTES = SIDE * SIDE * 3  # one decoded photo, RGB
BURST = 4
RETAINED_MAX = 1.3  # the target, 30 s after the burst


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def test_a_burst_of_large_pngs_is_bounded_and_its_memory_given_back(tmp_path: Path) -> None:
    keys: Keys = make_keys(tmp_path / "keys")
    state = tmp_path / "state"
    assert install(state, build_bundle(tmp_path / "dist", keys).path, keys).returncode == 0
    png = large_flat_png(SIDE)
    env = {
        "EDGE_AGENT_KEEP_REQUESTS_COUNT": "0",
        "EDGE_AGENT_DECODE_PIXEL_BUDGET": str(SIDE * SIDE),  # one such photo at a time
        "EDGE_AGENT_DECODE_WAIT_MS": "60000",  # the others wait their turn: all are answered
        "EDGE_AGENT_MAX_QUEUE_DELAY_SERVICES": "1000",  # the delay rule must not refuse them
    }
    with run_agent(state, "--trusted-key", str(keys.public), env=env) as agent:
        agent.wait_ready()
        pid = agent.process.pid
        url = f"{agent.url}/v1/models/defects/predict"
        with httpx.Client(timeout=30) as client:
            for seed in range(20):  # warm up on ordinary photos
                response = client.post(url, content=jpeg(seed, (960, 1280)),
                                       headers={"Content-Type": "image/jpeg"})  # fmt: skip
                assert response.status_code == 200
        time.sleep(1.0)
        baseline = rss_kib(pid)
        statuses: list[int] = []
        go = threading.Barrier(BURST)

        def post() -> None:
            with httpx.Client(timeout=120) as client:
                go.wait()
                response = client.post(url, content=png, headers={"Content-Type": "image/png"})
                statuses.append(response.status_code)

        threads = [threading.Thread(target=post) for _ in range(BURST)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(180)
        assert statuses == [200] * BURST
        peak = rss_kib(pid, "VmHWM")
        deadline, retained = time.monotonic() + 30, rss_kib(pid)
        while retained > RETAINED_MAX * baseline and time.monotonic() < deadline:
            time.sleep(0.5)
            retained = rss_kib(pid)
    # One decode at a time: the peak stays under two photos' worth of working memory (pixels plus
    # the resize's copy, ~7 bytes a pixel each); four side by side reached over four.
    assert (peak - baseline) * 1024 < 2 * 7 * SIDE * SIDE, (peak / baseline, baseline)
    assert retained <= RETAINED_MAX * baseline, (retained / baseline, baseline)
