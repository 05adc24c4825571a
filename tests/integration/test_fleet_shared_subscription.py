"""Two controller instances behind an MQTT shared subscription, each report applied once.

Two real `fleet-controller serve` processes share one database (a fresh PostgreSQL database
with LINESIDE_TEST_POSTGRES, else one SQLite file) and subscribe to the boxes' topics as
`$share/lineside-controllers/...` on a real Mosquitto, each under its own client id. The first
to start leads (ticks the rollouts, publishes notices); the other stands by but consumes too.
Simulated boxes run a three-wave rollout to completion. Then every update report a watcher saw
is published again (a redelivery, as after an instance stored a report and died before acking
it): the broker hands the copies to either instance, and none is stored or applied twice.

Checked: both instances stored messages (their /metrics), the rollout completed with every box
acting once under its own sequence, the reports in the database are exactly those the boxes
sent (one row each), and every re-published copy was counted as a duplicate and changed nothing.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

from fleet_controller import db
from fleet_controller.registry import DEVICE_UPDATES
from fleet_controller.simulator import SimulatorThread
from tests.fleet_support import (
    ControllerProcess,
    FleetConfig,
    FleetKeys,
    assert_each_box_acted_once,
    fleet_keys,
    mixed_boxes,
    signed_bundles,
    simulator,
    spawn_controller,
    wait_for,
    wait_for_boxes,
    wait_for_end,
    wave_plan_text,
    write_config,
)
from tests.mqtt_support import Broker, TestClient, running_broker
from tests.postgres_support import postgres_database
from tests.update_support import file_server

pytestmark = pytest.mark.slow
BOXES = 12
GROUP = "lineside-controllers"


@pytest.fixture
def database(tmp_path: Path) -> Iterator[str]:
    """A fresh PostgreSQL database when LINESIDE_TEST_POSTGRES is set, else a SQLite file."""
    if not os.environ.get("LINESIDE_TEST_POSTGRES"):
        yield f"sqlite:///{tmp_path / 'shared.db'}"
        return
    with postgres_database("fleet_shared") as url:
        yield url


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    with running_broker(tmp_path / "broker") as running:
        yield running


def instance_config(
    directory: Path, keys: FleetKeys, broker: Broker, url: str, name: str
) -> FleetConfig:
    """An instance of the group: its own HTTP port and client id, the shared database."""
    mqtt = f'shared_group = "{GROUP}"\ninstance = "{name}"\n'
    config = write_config(directory, keys, broker.port, mqtt=mqtt)
    text = re.sub(r'(?m)^url = "sqlite:///.*"$', f'url = "{url}"', config.path.read_text())
    text = re.sub(r'(?m)^client_id = ".*"$', 'client_id = "fleet-controller"', text)
    config.path.write_text(text)
    return config


def stored_messages(controller: ControllerProcess) -> dict[str, float]:
    """fleet_messages_total and fleet_duplicates_total by kind, from the instance's /metrics."""
    text = httpx.get(f"{controller.config.api}/metrics", timeout=10).text
    found: dict[str, float] = {}
    for line in text.splitlines():
        match = re.match(r'fleet_(messages|duplicates)_total\{kind="(\w+)"\} (\S+)', line)
        if match:
            found[f"{match[1]}.{match[2]}"] = float(match[3])
    return found


def role(controller: ControllerProcess) -> str | None:
    try:
        return str(httpx.get(f"{controller.config.api}/healthz", timeout=2).json()["role"])
    except (httpx.TransportError, ValueError, KeyError):
        return None


def test_two_instances_share_the_reports_and_apply_each_once(
    tmp_path: Path, broker: Broker, database: str
) -> None:
    keys = fleet_keys(tmp_path / "keys")
    files = tmp_path / "files"
    bundle = signed_bundles(files, keys, 2)[2]
    boxes = mixed_boxes(BOXES, install_s=0.3)
    watcher = TestClient(broker.port, "report-watcher")
    watcher.subscribe("lineside/v1/+/+/update")
    configs = [
        instance_config(tmp_path / name, keys, broker, database, name) for name in ("a", "b")
    ]
    with (
        file_server(files) as (url, _log),
        SimulatorThread(simulator(broker.port, keys, boxes, telemetry_interval_s=0.5)) as sim,
    ):
        first = spawn_controller(configs[0])
        second = None
        try:
            assert first.wait_up(), first.log()
            wait_for(lambda: role(first) == "leader", 30, "the first instance to lead")
            second = spawn_controller(configs[1])
            assert second.wait_up(), second.log()
            assert role(second) == "standby"
            with first.client() as api:
                wait_for_boxes(api, BOXES)
                plan = tomllib.loads(wave_plan_text(bundle, url, soak_s=0.3))
                created = api.post("/v1/rollouts", json={"plan": plan})
                assert created.status_code == 201, created.text
                done = wait_for_end(api, "defects-2", "the rollout to finish")
            acted = {box.ref: list(sim.acted(box.ref)) for box in boxes}
            assert_each_box_acted_once(done, acted, BOXES)

            # Both instances consumed: the broker shared the boxes' messages between them.
            counts = [stored_messages(c) for c in (first, second)]
            assert all(c.get("messages.update", 0) > 0 for c in counts), counts
            assert all(c.get("messages.telemetry", 0) > 0 for c in counts), counts

            # Every report the boxes sent is stored exactly once.
            sent = list(watcher.messages)
            keys_sent = {bytes(m.payload) for m in sent}
            assert len(keys_sent) == len(sent)  # the boxes sent no copy themselves
            rows = wait_for(lambda: _report_rows(database, len(sent)), 30, "every report stored")
            assert rows == len(sent)

            # Every report again (a redelivery): each copy is a duplicate, nothing changes.
            before = done["boxes"]
            for message in sent:
                watcher.publish(message.topic, bytes(message.payload))
            wait_for(
                lambda: _duplicates(first, second) >= len(sent), 30, "every copy to be skipped"
            )
            assert _duplicates(first, second) >= len(sent)
            assert _report_rows(database, len(sent)) == len(sent)
            with second.client() as api:  # a standby reads the same state
                after = api.get("/v1/rollouts/defects-2").json()["boxes"]
            assert after == before
        finally:
            for controller in (second, first):
                if controller is not None:
                    controller.stop()
            watcher.client.disconnect()


def _report_rows(url: str, expected: int) -> int | None:
    """How many update reports the database holds, once it holds `expected` (else None)."""
    engine = db.connect(url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(sa.select(sa.func.count()).select_from(DEVICE_UPDATES)).scalar()
            distinct = conn.execute(
                sa.select(sa.func.count(sa.distinct(DEVICE_UPDATES.c.report_key)))
            ).scalar()
    finally:
        engine.dispose()
    assert rows == distinct, f"{rows} report rows but {distinct} distinct reports"
    return int(rows or 0) if rows == expected else None


def _duplicates(*controllers: ControllerProcess) -> float:
    return sum(stored_messages(c).get("duplicates.update", 0.0) for c in controllers)
