"""Helpers for the fleet controller's tests: keys, a config, the controller in-process or as a
real `fleet-controller serve` process, and waiting on its figures."""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx

from edge_bundle.signing import KeyRole, SigningKey, write_key_files
from tests.agent_support import free_port

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


@dataclass(frozen=True)
class FleetConfig:
    path: Path
    token: str
    token_file: Path
    api: str
    database: Path


def write_config(
    directory: Path, keys: FleetKeys, broker_port: int, **sections: str
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
        f"[controller]\ntick_s = 0.2\n{extra.get('controller', '')}\n"
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
