"""Rollouts delivered over MQTT (`delivery = "mqtt"`): the plan's fields, the bundle put in the
chunk store at creation, notices with the critical `mqtt_chunks` extension (with or without a
URL, by agent version), and the refusal of cohorts with agents before 0.4.0 when there is no URL.

Runs the rollouts runner of tests/unit/test_fleet_rollouts.py (fake broker link, injected
clock) with a real chunk store on a temporary directory."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from edge_bundle.chunks import MQTT_CHUNKS_EXTENSION, ChunkedDelivery
from edge_bundle.release import decode_notice
from edge_bundle.signing import TrustStore
from fleet_controller import db, rollouts
from fleet_controller.chunks.store import ChunkStore
from fleet_controller.errors import FleetError
from fleet_controller.notices import BundleFacts, build_notice, delivery_for
from fleet_controller.plan import RolloutPlan
from fleet_controller.registry import Registry
from fleet_controller.rollouts import Rollouts
from tests.unit.test_fleet_rollouts import KEY, RELEASE_TRUST, Broker, Clock, Fleet

CHUNK = 8192


@dataclass
class ChunkFleet(Fleet):
    store: ChunkStore

    def runner(self) -> Rollouts:
        return Rollouts(
            self.engine, self.registry, key=KEY, bundle_trust=TrustStore(), publish=self.broker,
            clock=self.clock, chunk_store=self.store,
        )  # fmt: skip


@pytest.fixture
def fleet(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ChunkFleet]:
    versions = {"defects-1.bundle": 1, "defects-2.bundle": 2}
    for name in versions:
        (tmp_path / name).write_bytes(os.urandom(3 * CHUNK + 5))

    def inspect(path: Path, trust: TrustStore) -> BundleFacts:
        data = path.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        return BundleFacts("defects", versions[path.name], digest, len(data))

    monkeypatch.setattr(rollouts, "inspect_bundle", inspect)
    engine = db.connect(f"sqlite:///{tmp_path / 'fleet.db'}")
    db.create_tables(engine)
    store = ChunkStore(tmp_path / "chunks")
    yield ChunkFleet(engine, Registry(engine), Clock(), Broker(), tmp_path, store)
    engine.dispose()


def mqtt_plan(fleet: Fleet, **fields: Any) -> RolloutPlan:
    return fleet.plan(delivery="mqtt", chunk_size=CHUNK, waves={"percent": [100]}, **fields)


def test_the_plan_needs_a_url_unless_it_delivers_over_mqtt(tmp_path: Path) -> None:
    base = 'name = "d"\nbundle = "b"\ncohort = { group = "g" }\n[waves]\npercent = [100]\n'
    plan = RolloutPlan.from_toml('delivery = "mqtt"\n' + base, tmp_path)
    assert plan.url is None and plan.over_mqtt and plan.chunk_size is None
    assert RolloutPlan.from_json(plan.to_json()) == plan
    with pytest.raises(FleetError, match=r'url: missing.*delivery = "mqtt"'):
        RolloutPlan.from_toml(base, tmp_path)
    with pytest.raises(FleetError, match='chunk_size is for delivery = "mqtt"'):
        RolloutPlan.from_toml('url = "https://f/b"\nchunk_size = 65536\n' + base, tmp_path)
    with pytest.raises(FleetError, match="chunk_size: input should be greater"):
        RolloutPlan.from_toml('delivery = "mqtt"\nchunk_size = 10\n' + base, tmp_path)


def test_an_mqtt_rollout_stores_the_bundle_and_signs_its_chunk_manifest(
    fleet: ChunkFleet,
) -> None:
    for ref in ("plant-a/box1", "plant-b/box2"):
        fleet.box(ref, agent="0.4.0")
    runner = fleet.runner()
    runner.create(mqtt_plan(fleet, url=None), actor="alice")
    runner.tick()
    notices = fleet.broker.notices()
    assert sorted(n.target.device or "" for n in notices) == ["plant-a/box1", "plant-b/box2"]
    bundle = fleet.tmp / "defects-2.bundle"
    digest = hashlib.sha256(bundle.read_bytes()).hexdigest()
    assert fleet.store.has(digest)
    assert fleet.store.manifest_path(digest, CHUNK).is_file()
    for notice in notices:
        assert notice.url is None and notice.critical == (MQTT_CHUNKS_EXTENSION,)
        assert notice.chunked == fleet.store.describe(digest, CHUNK)
        assert notice.bundle_sha256 == digest


def test_without_a_url_older_agents_are_refused_at_preview_and_create(fleet: ChunkFleet) -> None:
    fleet.box("plant-a/box1", agent="0.4.0")
    fleet.box("plant-a/box2", agent="0.3.0")
    runner = fleet.runner()
    plan = mqtt_plan(fleet, url=None)
    for attempt in (runner.preview, lambda p: runner.create(p, actor="alice")):
        with pytest.raises(FleetError) as caught:
            attempt(plan)
        message = caught.value.message
        assert "plant-a/box2 (agent 0.3.0)" in message and "0.4.0" in message
        assert "plant-a/box1" not in message and "add a url" in message
    assert runner.list() == [] and list(fleet.store.directory.glob("*.bundle")) == []


def test_with_a_url_too_older_agents_get_the_url_alone(fleet: ChunkFleet) -> None:
    fleet.box("plant-a/box1", agent="0.4.0")
    fleet.box("plant-a/box2", agent="0.3.0")
    runner = fleet.runner()
    assert runner.preview(mqtt_plan(fleet))["count"] == 2
    runner.create(mqtt_plan(fleet), actor="alice")
    runner.tick()
    by_box = {n.target.device: n for n in fleet.broker.notices()}
    new, old = by_box["plant-a/box1"], by_box["plant-a/box2"]
    assert new.url == old.url == "https://files.plant.example/defects-2.bundle"
    assert new.chunked is not None and new.critical == (MQTT_CHUNKS_EXTENSION,)
    assert old.chunked is None and old.critical == ()


def test_previous_bundles_of_an_mqtt_plan_go_into_the_store(fleet: ChunkFleet) -> None:
    fleet.box("plant-a/box1", agent="0.4.0")
    plan = mqtt_plan(fleet, url=None, on_halt={"previous": [{"bundle": "defects-1.bundle"}]})
    fleet.runner().create(plan, actor="alice")
    older = hashlib.sha256((fleet.tmp / "defects-1.bundle").read_bytes()).hexdigest()
    assert fleet.store.manifest_path(older, CHUNK).is_file()


def test_a_shadow_notice_names_both_extensions_critical() -> None:
    facts = BundleFacts("defects", 2, "22" * 32, 3 * CHUNK)
    chunks = ChunkedDelivery(CHUNK, 3, "33" * 32)
    now = datetime(2026, 3, 1, tzinfo=UTC)
    payload = build_notice(
        facts=facts, url=None, site="plant-a", device="box1", sequence=1, issued_at=now,
        expires_at=now.replace(day=2), rollout_id="r", wave=1, rollback=False, v2=True, key=KEY,
        shadow_max_s=60.0, chunks=chunks,
    )  # fmt: skip
    notice, _ = decode_notice(payload, RELEASE_TRUST)
    assert notice.critical == ("mqtt_chunks", "shadow")  # type: ignore[union-attr]
    assert notice.chunked == chunks and notice.url is None  # type: ignore[union-attr]


def test_delivery_by_agent_version() -> None:
    chunks = ChunkedDelivery(CHUNK, 3, "33" * 32)
    assert delivery_for("https://f/b", chunks, "0.4.0") == ("https://f/b", chunks)
    assert delivery_for("https://f/b", chunks, "0.3.9") == ("https://f/b", None)
    assert delivery_for("https://f/b", chunks, None) == ("https://f/b", None)
    assert delivery_for(None, chunks, "0.3.0") == (None, chunks)
    assert delivery_for("https://f/b", None, "0.4.0") == ("https://f/b", None)


def test_a_version_1_notice_cannot_go_over_mqtt_alone() -> None:
    facts = BundleFacts("defects", 2, "22" * 32, 3 * CHUNK)
    now = datetime(2026, 3, 1, tzinfo=UTC)
    with pytest.raises(FleetError, match="upgrade its agent"):
        build_notice(
            facts=facts, url=None, site="plant-a", device="box1", sequence=1, issued_at=now,
            expires_at=now.replace(day=2), rollout_id="r", wave=1, rollback=False, v2=False,
            key=KEY, chunks=ChunkedDelivery(CHUNK, 3, "33" * 32),
        )  # fmt: skip
