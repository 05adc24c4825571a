"""Helpers for the fleet controller's tests: keys, signed bundles, a config, the controller
in-process or as a real `fleet-controller serve` process, simulated boxes and a rollout plan for
them, waiting on its figures, and the checks every crash and failover test makes at the end."""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx

from edge_bundle.signing import KeyRole, SigningKey, TrustStore, write_key_files
from fleet_controller.simulator import Behaviour, BoxSpec, Simulator
from tests.agent_support import BuiltBundle, Keys, build_bundle, free_port
from tests.mqtt_support import TestClient

T = TypeVar("T")


@dataclass(frozen=True)
class FleetKeys:
    """The bundle key boxes and controller trust, and the release key notices are signed with."""

    bundle: SigningKey
    bundle_public: Path
    bundle_private: Path
    release: SigningKey
    release_public: Path
    release_private: Path


def fleet_keys(directory: Path) -> FleetKeys:
    bundle = SigningKey.generate(KeyRole.BUNDLE)
    bundle_private, bundle_public = write_key_files(bundle, directory, "bundle")
    release = SigningKey.generate(KeyRole.RELEASE)
    release_private, release_public = write_key_files(release, directory, "release")
    return FleetKeys(
        bundle, bundle_public, bundle_private, release, release_public, release_private
    )


def signed_bundles(directory: Path, keys: FleetKeys, *versions: int) -> dict[int, BuiltBundle]:
    """defects@N for each of `versions`, signed with the fleet's bundle key, in a new `directory`
    (the folder a file server serves)."""
    directory.mkdir()
    signer = Keys(keys.bundle, keys.bundle_private, keys.bundle_public)
    return {v: build_bundle(directory, signer, version=v, seed=3) for v in versions}


@dataclass(frozen=True)
class FleetConfig:
    path: Path
    token: str
    token_file: Path
    api: str
    database: Path


def write_config(
    directory: Path, keys: FleetKeys, broker_port: int, *, tick_s: float = 0.2, **sections: str
) -> FleetConfig:
    """A controller config in `directory`; `sections` adds raw TOML lines per section name."""
    directory.mkdir(parents=True, exist_ok=True)
    token = secrets.token_hex(24)
    tokens = directory / "api_tokens"
    tokens.write_text(f"ops {token}\n")
    token_file = directory / "token"
    token_file.write_text(token)
    port = free_port()
    database = directory / "fleet.db"
    extra = {name: lines for name, lines in sections.items()}
    text = (
        '[mqtt]\nhost = "127.0.0.1"\n'
        f'port = {broker_port}\nclient_id = "fleet-{secrets.token_hex(4)}"\n'
        f"{extra.get('mqtt', '')}\n"
        f'[database]\nurl = "sqlite:///{database}"\n\n'
        f'[http]\nhost = "127.0.0.1"\nport = {port}\n\n'
        f'[keys]\nbundle_keys = ["{keys.bundle_public}"]\n'
        f'release_key = "{keys.release_private}"\napi_tokens = "{tokens}"\n\n'
        f"[controller]\ntick_s = {tick_s}\n{extra.get('controller', '')}\n"
    )
    path = directory / "fleet.toml"
    path.write_text(text)
    return FleetConfig(path, token, token_file, f"http://127.0.0.1:{port}", database)


@contextlib.contextmanager
def in_process(config: FleetConfig) -> Iterator[Any]:
    """The controller's loop and link in this process (no HTTP): yields the Controller."""
    from fleet_controller.config import Config
    from fleet_controller.service import Controller

    controller = Controller.build(Config.load(config.path))
    stop = threading.Event()
    controller.link.start()
    assert controller.link.wait_connected(20), "the controller did not connect to the broker"
    thread = threading.Thread(target=controller.run_loop, args=(stop,), daemon=True)
    thread.start()
    try:
        yield controller
    finally:
        stop.set()
        thread.join(30)
        controller.link.stop()
        controller.engine.dispose()


@dataclass
class ControllerProcess:
    """A real `fleet-controller serve` child process."""

    process: subprocess.Popen[bytes]
    config: FleetConfig
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def client(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.config.api,
            headers={"Authorization": f"Bearer {self.config.token}"},
            timeout=30,
        )

    def wait_up(self, timeout: float = 60) -> bool:
        """True once /healthz answers; False when the process died first (a planned crash)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{self.config.api}/healthz", timeout=2).status_code == 200:
                    return True
            time.sleep(0.1)
        raise AssertionError(f"the controller did not come up:\n{self.log()[-4000:]}")

    def stop(self, timeout: float = 30) -> int | None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def spawn_controller(config: FleetConfig, env: dict[str, str] | None = None) -> ControllerProcess:
    log_path = config.path.parent / f"controller-{time.monotonic_ns()}.log"
    environment = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    environment.pop("CREDENTIALS_DIRECTORY", None)
    command = [sys.executable, "-m", "fleet_controller.cli", "serve", "--config", str(config.path)]
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=environment)
    return ControllerProcess(process, config, log_path)


def wait_for(check: Callable[[], T | None], timeout: float, what: str) -> T:
    """Poll `check` until it returns something truthy; fail with `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what} (last: {last!r})")


# ---- simulated boxes and a rollout to them --------------------------------------------------
RELEASES = "lineside/v1/+/+/release"


def mixed_boxes(count: int, install_s: float) -> list[BoxSpec]:
    """`count` boxes on defects@1 over plant-0, -1 and -2; one in ten runs agent 0.1.0 (v1
    notices), the rest 0.2.0."""
    return [
        BoxSpec(
            site=f"plant-{n % 3}",
            device=f"box{n:02d}",
            models={"defects": 1},
            agent_version="0.1.0" if n % 10 == 3 else "0.2.0",
            behaviour=Behaviour(install_s=install_s),
        )
        for n in range(count)
    ]


def simulator(
    broker_port: int, keys: FleetKeys, boxes: list[BoxSpec], telemetry_interval_s: float = 1.0
) -> Simulator:
    """Simulated `boxes` on the broker that trust the fleet's release key."""
    trust = TrustStore.from_files([keys.release_public])
    return Simulator(
        "127.0.0.1", broker_port, boxes, trust, telemetry_interval_s=telemetry_interval_s
    )


def release_watcher(broker_port: int) -> TestClient:
    """A client recording every release notice published to any box."""
    releases = TestClient(broker_port, "releases")
    releases.subscribe(RELEASES)
    return releases


def wave_plan_text(bundle: BuiltBundle, server: str, soak_s: float) -> str:
    """The TOML plan `defects-2`: `bundle` (served at `server`) to plant-0, -1 and -2 in waves
    of 10, 40 and 100%."""
    return (
        f'name = "defects-2"\nbundle = "{bundle.path}"\nurl = "{server}/{bundle.path.name}"\n'
        'cohort = { site = ["plant-0", "plant-1", "plant-2"] }\n\n'
        f"[waves]\npercent = [10, 40, 100]\nsoak_s = {soak_s}\ndeadline_s = 120\n"
    )


def wait_for_boxes(api: httpx.Client, count: int) -> None:
    """Until the registry holds `count` boxes, each with its agent version known."""
    wait_for(
        lambda: (
            (found := api.get("/v1/devices").json())["count"] == count
            and all(d["agent_version"] for d in found["devices"])
        ),
        60,
        "every box in the registry",
    )


def wait_for_end(api: httpx.Client, name: str, what: str) -> dict[str, Any]:
    """The status of rollout `name` once it completed or halted."""

    def ended() -> dict[str, Any] | None:
        status: dict[str, Any] = api.get(f"/v1/rollouts/{name}").json()
        return status if status["status"] in ("completed", "halted") else None

    return wait_for(ended, 120, what)


def wait_for_rollout(controller: Any, rollout_id: str, timeout: float) -> dict[str, Any]:
    """An in-process controller's status of a rollout once it completed, halted or rolled back."""

    def ended() -> dict[str, Any] | None:
        status: dict[str, Any] = controller.rollouts.status(rollout_id)
        return status if status["status"] in ("completed", "halted", "rolled_back") else None

    return wait_for(ended, timeout, f"rollout {rollout_id} to finish")


def assert_each_box_acted_once(
    done: dict[str, Any], acted: dict[str, list[tuple[int, str, int, bool]]], count: int
) -> None:
    """The rollout of defects@2 completed on all `count` boxes, none skipped: each committed and
    installed it once, under its own sequence (`acted` is what each box did)."""
    assert done["status"] == "completed", done
    states = {box["ref"]: box for box in done["boxes"]}
    assert len(states) == count
    assert all(box["state"] == "committed" for box in states.values()), states
    for ref, box in states.items():
        assert acted[ref] == [(box["sequence"], "defects", 2, False)], (ref, acted[ref])


def assert_notices_identical(releases: TestClient, count: int) -> None:
    """One notice topic per box, and every re-sent notice byte-identical to the first one sent
    on its topic."""
    payloads: dict[str, set[bytes]] = defaultdict(set)
    for message in releases.messages:
        payloads[message.topic].add(bytes(message.payload))
    assert len(payloads) == count
    assert all(len(found) == 1 for found in payloads.values()), {
        topic: len(found) for topic, found in payloads.items() if len(found) > 1
    }
