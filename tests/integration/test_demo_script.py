"""The README's run command, end to end: `scripts/demo` installs the committed demo bundle, serves
it over HTTP and MQTT, prints how to try it, and answers a demo photo correctly both ways."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.agent_support import free_port
from tests.demo_support import banner_and_rest, read_banner, start_script
from tests.mqtt_support import running_broker

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_scripts_demo_serves_the_demo_bundle(tmp_path: Path) -> None:
    port = free_port()
    with running_broker(tmp_path / "broker") as broker:
        env = {
            **os.environ,
            "LINESIDE_SKIP_INSTALL": "1",
            "LINESIDE_DEMO_DIR": str(tmp_path / "demo"),
            "EDGE_AGENT_MQTT_PORT": str(broker.port),
        }
        process = start_script("demo", env, "--port", str(port))
        lines: list[str] = []
        try:
            banner = read_banner(process, lines)
            assert f"http://127.0.0.1:{port}/" in banner
            curl = re.search(r"curl: +(curl .*)", banner)
            assert curl is not None, banner
            photo = ROOT / "demo" / "photos" / "scratch.jpg"
            answer = httpx.post(
                f"http://127.0.0.1:{port}/v1/models/defects/predict",
                content=photo.read_bytes(),
                headers={"Content-Type": "image/jpeg"},
                timeout=30,
            ).json()
            assert answer["label"] == "scratch", answer
            assert answer["knowledge"]["corrective_actions"]
            publish = re.search(r"(mosquitto_pub .* -t (\S+) -f (\S+))", banner)
            assert publish is not None, banner
            base = publish.group(2).rsplit("/infer/", 1)[0]
            listener = subprocess.Popen(
                ["mosquitto_sub", "-p", str(broker.port), "-t", f"{base}/results/defects", "-C", "1", "-W", "30"],
                stdout=subprocess.PIPE,
            )  # fmt: skip
            time.sleep(0.5)
            subprocess.run(
                ["mosquitto_pub", "-p", str(broker.port), "-t", publish.group(2), "-f", publish.group(3)],
                check=True, cwd=ROOT, timeout=30,
            )  # fmt: skip
            result, _ = listener.communicate(timeout=40)
            assert json.loads(result)["label"] == "crack", result
        finally:
            os.killpg(process.pid, signal.SIGINT)
            process.wait(30)
        assert process.returncode == 0, banner_and_rest(lines, process)
