"""The controller's HTTP API and ingest path over a real registry and rollouts runner (temporary
SQLite, real signed bundles, a recording stand-in for the broker): bad input gets a clear error
with the right status and changes nothing; forged and malformed reports are rejected and
counted; the metrics show the fleet."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pytest
from fastapi.testclient import TestClient

from edge_bundle.signing import KeyRole, SigningKey, TrustStore, write_key_files
from fleet_controller import db
from fleet_controller.api import create_app
from fleet_controller.config import ApiTokens, Config
from fleet_controller.errors import FleetError
from fleet_controller.metrics import FleetMetrics
from fleet_controller.registry import Registry
from fleet_controller.rollouts import Rollouts
from fleet_controller.service import Controller
from tests.agent_support import Keys, build_bundle, make_keys

TOKEN = "t" * 32
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@dataclass
class Api:
    client: TestClient
    controller: Controller
    published: list[tuple[str, bytes]]
    bundles: dict[str, Path]


def telemetry(site: str, device: str, version: int = 1) -> bytes:
    return json.dumps(
        {"site": site, "device": device, "agent_version": "0.2.0", "profile": "generic",
         "ready": True, "reasons": [], "line": "line1", "labels": {}, "groups": ["line1"],
         "models": [{"name": "defects", "version": version, "status": "active"}]}
    ).encode()  # fmt: skip


@pytest.fixture(scope="module")
def bundle_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Keys, dict[str, Path]]:
    work = tmp_path_factory.mktemp("bundles")
    keys = make_keys(work / "keys")
    foreign = make_keys(work / "foreign", "foreign")
    return keys, {
        "good": build_bundle(work / "good", keys, version=2).path,
        "foreign": build_bundle(work / "foreign-built", foreign, version=2).path,
    }


@pytest.fixture
def api(tmp_path: Path, bundle_files: tuple[Keys, dict[str, Path]]) -> Iterator[Api]:
    keys, bundles = bundle_files
    engine = db.connect(f"sqlite:///{tmp_path / 'fleet.db'}")
    db.create_tables(engine)
    registry = Registry(engine)
    published: list[tuple[str, bytes]] = []
    rollouts = Rollouts(
        engine,
        registry,
        key=SigningKey.generate(KeyRole.RELEASE),
        bundle_trust=TrustStore.from_files([keys.public]),
        publish=lambda topic, payload: published.append((topic, payload)),
    )
    metrics = FleetMetrics(registry, rollouts, stale_after_s=600)
    controller = Controller(Config(), engine, registry, rollouts, cast(Any, None), metrics)
    for n in range(6):
        controller.ingest(f"lineside/v1/plant-a/box{n}/telemetry", telemetry("plant-a", f"box{n}"))
    app = create_app(
        registry,
        rollouts,
        ApiTokens({TOKEN: "alice"}),
        metrics=metrics.render,
        ready=lambda: {"status": "ok"},
    )
    with TestClient(app) as client:
        yield Api(client, controller, published, bundles)
    engine.dispose()


def plan(bundle: Path, **changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "name": "defects-2",
        "bundle": str(bundle),
        "url": "https://files.plant.example/defects-2.bundle",
        "cohort": {"site": "plant-a"},
        "waves": {"counts": [2], "soak_s": 0},
    }
    body.update(changes)
    return {"plan": body}


def refused(response: Any, status: int, *words: str) -> None:
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    for word in words:
        assert word in detail, detail


def test_every_v1_route_needs_a_known_token(api: Api) -> None:
    for method, path in (("GET", "/v1/devices"), ("GET", "/v1/rollouts"),
                         ("POST", "/v1/rollouts"), ("POST", "/v1/rollouts/x/pause")):  # fmt: skip
        for headers in ({}, {"Authorization": "Bearer wrong-token-000000000000"}):
            answer = api.client.request(method, path, headers=headers, json={})
            refused(answer, 401, "Authorization: Bearer")
            assert answer.headers["WWW-Authenticate"] == "Bearer"
    assert api.client.get("/healthz").status_code == 200


def test_devices_and_a_cohort_preview(api: Api) -> None:
    devices = api.client.get("/v1/devices", headers=AUTH, params={"site": "plant-a"}).json()
    assert devices["count"] == 6
    box = api.client.get("/v1/devices/plant-a/box0", headers=AUTH).json()
    assert box["models"]["defects"]["version"] == 1 and box["history"] == []
    refused(api.client.get("/v1/devices/plant-a/nobox", headers=AUTH), 404, "plant-a/nobox")
    preview = api.client.post(
        "/v1/cohorts/preview", headers=AUTH, json={"devices": ["plant-a/box1", "plant-z/x"]}
    ).json()
    assert preview["count"] == 1 and preview["missing"] == ["plant-z/x"]
    refused(api.client.post("/v1/cohorts/preview", headers=AUTH, json={}), 400, "selector")


def test_bad_rollouts_are_refused_and_change_nothing(api: Api) -> None:
    good = api.bundles["good"]
    cases = [
        (plan(api.bundles["foreign"]), 400, "not trusted"),
        (plan(good.with_name("missing.bundle")), 400, "missing.bundle"),
        (plan(good, cohort={"site": "plant-nowhere"}), 400, "picks no box"),
        (plan(good, cohort={}), 400, "selector"),
        (plan(good, waves={"percent": [50, 40]}), 400, "waves"),
        (plan(good, waves={"percent": [10, 50]}), 400, "100"),
        (plan(good, url="ftp://files/x.bundle"), 400, "url"),
        ({"plan": {"name": "x"}, "surprise": 1}, 400, "surprise"),
    ]
    for body, status, word in cases:
        refused(api.client.post("/v1/rollouts", headers=AUTH, json=body), status, word)
    assert api.client.get("/v1/rollouts", headers=AUTH).json() == {"rollouts": []}
    assert api.published == []


def test_overlapping_rollouts_and_impossible_commands_are_conflicts(api: Api) -> None:
    good = api.bundles["good"]
    created = api.client.post("/v1/rollouts", headers=AUTH, json=plan(good))
    assert created.status_code == 201, created.text
    rollout = created.json()["id"]
    assert created.json()["created_by"] == "alice"
    again = api.client.post(
        "/v1/rollouts",
        headers=AUTH,
        json=plan(good, name="other", cohort={"devices": ["plant-a/box0"]}),
    )
    refused(again, 409, "plant-a/box0", rollout)
    refused(api.client.post(f"/v1/rollouts/{rollout}/resume", headers=AUTH), 409, "resume")
    refused(api.client.post("/v1/rollouts/nope/pause", headers=AUTH), 404, "nope")
    refused(api.client.post(f"/v1/rollouts/{rollout}/explode", headers=AUTH), 400, "command")
    paused = api.client.post(f"/v1/rollouts/{rollout}/pause", headers=AUTH, json={"why": "lunch"})
    assert paused.json()["status"] == "paused"
    audit = api.client.get(f"/v1/rollouts/{rollout}/audit", headers=AUTH).json()["audit"]
    assert [(e["what"], e["actor"]) for e in audit][-1] == ("paused", "alice")
    assert audit[-1]["why"] == "lunch"


def test_a_dry_run_shows_waves_and_sends_nothing(api: Api) -> None:
    body = {**plan(api.bundles["good"]), "dry_run": True}
    answer = api.client.post("/v1/rollouts", headers=AUTH, json=body)
    assert answer.status_code == 201 and answer.json()["dry_run"] is True
    assert answer.json()["wave_sizes"] == [2, 4]
    assert api.client.get("/v1/rollouts", headers=AUTH).json() == {"rollouts": []}


def test_forged_and_malformed_reports_are_rejected_counted_and_change_nothing(api: Api) -> None:
    before = api.client.get("/v1/devices/plant-a/box1", headers=AUTH).json()
    report = {"phase": "committed", "outcome": "committed", "sequence": 5, "name": "defects",
              "version": 2, "device": "plant-a/box2", "at": "2026-12-06T00:00:00Z"}  # fmt: skip
    forged = [
        ("lineside/v1/plant-a/box1/update", json.dumps(report).encode()),  # box2 on box1's topic
        ("lineside/v1/plant-a/box1/update", b"[[[[[[" * 20_000),
        ("lineside/v1/plant-a/box1/update", b"not json"),
        ("lineside/v1/plant-a/box1/telemetry", telemetry("plant-a", "box9", version=7)),
        ("lineside/v1/plant-a/box1/update",
         json.dumps({**report, "device": "plant-a/box1", "rollout": {"id": "ghost", "wave": 1}}).encode()),
    ]  # fmt: skip
    for topic, payload in forged:
        api.controller.ingest(topic, payload)
    after = api.client.get("/v1/devices/plant-a/box1", headers=AUTH).json()
    assert after["models"] == before["models"] and after["history"] == []
    counts = api.controller.registry.rejection_counts()
    assert counts[("update", "device_mismatch")] == 1
    assert counts[("update", "not_json")] == 2
    assert counts[("telemetry", "device_mismatch")] == 1
    assert sum(n for (kind, _), n in counts.items() if kind == "update") == 4
    metrics = api.client.get("/metrics").text
    assert 'fleet_rejected_total{kind="update",reason="device_mismatch"} 1.0' in metrics
    assert 'fleet_boxes_by_version{model="defects",version="1"} 6.0' in metrics


def test_the_config_reads_secrets_from_systemd_credentials(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    release = SigningKey.generate(KeyRole.RELEASE)
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    private, public = write_key_files(release, tmp_path / "k", "release")
    (credentials / "release_key").write_bytes(private.read_bytes())
    (credentials / "api_tokens").write_text(f"# operators\nalice {TOKEN}\n")
    (credentials / "mqtt_password").write_text("s3cret\n")
    config_path = tmp_path / "fleet.toml"
    config_path.write_text(f'[keys]\nbundle_keys = ["{public}"]\n[mqtt]\nusername = "fleet"\n')
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(credentials))
    config = Config.load(config_path)
    assert config.release_key().key_id == release.key_id
    assert config.api_tokens().operator(TOKEN) == "alice"
    assert config.mqtt_password() == "s3cret"
    (credentials / "api_tokens").write_text("alice short\n")
    with pytest.raises(FleetError, match="at least 16"):
        config.api_tokens()
    config_path.write_text("[mqtt]\nport = 99999\n")
    with pytest.raises(FleetError, match=r"mqtt\.port"):
        Config.load(config_path)
