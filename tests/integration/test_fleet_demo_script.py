"""The README's fleet quick start, end to end: `scripts/fleet-demo` starts its own Mosquitto, a
file server for the demo bundle, a dozen simulated boxes and the controller, and prints how to try
it; the printed commands list the boxes and roll the demo bundle out to completion, and Ctrl-C
leaves no process behind."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.agent_support import free_port
from tests.demo_support import banner_and_rest, read_banner, start_script

ROOT = Path(__file__).resolve().parents[2]
BOXES = [f"{site}/box{n}" for site in ("plant-a", "plant-b", "plant-c") for n in range(1, 5)]


@pytest.mark.slow
def test_scripts_fleet_demo_rolls_the_demo_bundle_out(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "LINESIDE_SKIP_INSTALL": "1",
        "LINESIDE_FLEET_DEMO_DIR": str(tmp_path / "fleet-demo"),
        # Nothing listens there, so the script starts (and must stop) its own Mosquitto.
        "EDGE_AGENT_MQTT_HOST": "127.0.0.1",
        "EDGE_AGENT_MQTT_PORT": str(free_port()),
    }
    process = start_script("fleet-demo", env, "--port", str(free_port()))
    lines: list[str] = []
    try:
        banner = read_banner(process, lines)
        client = {**os.environ, **exported(banner)}

        listing = run(printed(banner, "devices"), client)
        assert all(re.search(rf"^{box} +yes ", listing, re.M) for box in BOXES), listing
        assert "12 boxes" in listing, listing

        created = json.loads(run(printed(banner, "rollout create", "--dry-run"), client))
        assert created["id"] == "defects-1", created
        status_command = printed(banner, "rollout status")
        deadline = time.monotonic() + 90
        while True:
            status: dict[str, Any] = json.loads(run(status_command, client))
            if status["status"] not in ("created", "running", "paused"):
                break
            assert time.monotonic() < deadline, status
            time.sleep(0.5)
        assert status["status"] == "completed", status
        boxes = {box["ref"]: box for box in status["boxes"]}
        assert sorted(boxes) == sorted(BOXES)
        assert boxes.pop("plant-c/box2")["state"] == "refused"
        assert all(box["state"] == "committed" for box in boxes.values()), boxes
        assert boxes["plant-b/box3"]["v2"] is False  # the 0.1.0 agent got a v1 notice
    finally:
        os.killpg(process.pid, signal.SIGINT)
        process.wait(60)
    output = banner_and_rest(lines, process)
    assert process.returncode == 0, output
    assert group_members(process.pid) == [], output


def exported(banner: str) -> dict[str, str]:
    """The variables of the printed `export A=... B=...` line."""
    line = next(line for line in banner.splitlines() if line.strip().startswith("export "))
    pairs = (word.partition("=") for word in shlex.split(line)[1:])
    found = {name: value for name, _, value in pairs}
    assert set(found) == {"FLEET_CONTROLLER_API", "FLEET_CONTROLLER_TOKEN_FILE"}, line
    return found


def printed(banner: str, command: str, without: str | None = None) -> list[str]:
    """The printed `fleet-controller COMMAND ...` line as arguments (its comment dropped)."""
    for line in banner.splitlines():
        if f"fleet-controller {command}" in line:
            words = shlex.split(line, comments=True)
            if without is None or without not in words:
                return words
    raise AssertionError(f"no `fleet-controller {command}` line in:\n{banner}")


def run(command: list[str], env: dict[str, str]) -> str:
    done = subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, (command, done.stdout, done.stderr)
    return done.stdout


def group_members(pgid: int) -> list[str]:
    """Processes still in the script's process group (its children, had it left any)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        fields = text.rsplit(")", 1)[1].split()  # after the command name: state, ppid, pgrp
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(text.split(")", 1)[0] + ")")
    return members
