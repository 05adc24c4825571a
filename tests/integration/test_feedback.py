"""Feedback end to end: a technician corrects a prediction over HTTP and over MQTT; the record
survives a restart, is forwarded to central through the outbox with its photo, needs the token
when one is set, and `edge-agent export-feedback` turns it into a retraining dataset."""

from __future__ import annotations

import base64
import json
import subprocess
import time
from pathlib import Path

import httpx

from tests.agent_support import build_bundle, jpeg, make_keys, run_agent
from tests.mqtt_support import TestClient, body, running_broker

TOKEN = "feedback-token-0123456789"


def test_feedback_is_kept_forwarded_and_exported(tmp_path: Path) -> None:
    keys = make_keys(tmp_path / "keys")
    bundle = build_bundle(tmp_path / "dist", keys)
    state = tmp_path / "state"
    subprocess.run(
        [".venv/bin/edge-agent", "install", str(bundle.path), "--state-dir", str(state),
         "--trusted-key", str(keys.public)],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    photo = jpeg(5)
    with running_broker(tmp_path / "broker") as broker:
        env = {
            "EDGE_AGENT_MQTT_ENABLED": "true",
            "EDGE_AGENT_MQTT_PORT": str(broker.port),
            "EDGE_AGENT_SITE": "plant",
            "EDGE_AGENT_DEVICE": "box1",
            "EDGE_AGENT_TELEMETRY_INTERVAL_S": "0",
            "EDGE_AGENT_MQTT_RESPONSE_TOPICS": json.dumps(["replies/#"]),
            "EDGE_AGENT_ADMIN_TOKEN": TOKEN,
        }
        central = TestClient(broker.port, "central", clean=False)
        central.subscribe("lineside/v1/plant/box1/feedback")
        with run_agent(state, "--trusted-key", str(keys.public), env=env) as agent:
            agent.wait_ready()
            answer = httpx.post(
                f"{agent.url}/v1/models/defects/predict",
                content=photo,
                headers={"Content-Type": "image/jpeg"},
            ).json()
            wrong = next(label for label in ("ok", "scratch", "dent") if label != answer["label"])
            submitted = {
                "request_id": answer["request_id"], "verdict": "corrected", "corrected_label": wrong,
                "note": "burr on the guide rail", "station": "line3-s2", "operator": "op17",
            }  # fmt: skip
            time.sleep(0.3)  # the request record is written off the request path
            assert httpx.post(f"{agent.url}/v1/feedback", json=submitted).status_code == 401
            auth = {"Authorization": f"Bearer {TOKEN}"}
            stored = httpx.post(f"{agent.url}/v1/feedback", json=submitted, headers=auth)
            assert stored.status_code == 201, stored.text
            bad = httpx.post(
                f"{agent.url}/v1/feedback", headers=auth,
                json={**submitted, "corrected_label": "bent"},
            )  # fmt: skip
            assert bad.status_code == 400 and "labels" in bad.json()["error"]["message"]
            gone = httpx.post(
                f"{agent.url}/v1/feedback", headers=auth, json={**submitted, "request_id": "f" * 32}
            )
            assert gone.status_code == 404
            # The same over MQTT, with a reply.
            second = httpx.post(
                f"{agent.url}/v1/models/defects/predict",
                content=jpeg(6),
                headers={"Content-Type": "image/jpeg"},
            ).json()
            time.sleep(0.3)
            plant = TestClient(broker.port, "station")
            plant.subscribe("replies/fb")
            plant.publish(
                "lineside/v1/plant/box1/feedback/submit",
                json.dumps({"request_id": second["request_id"], "verdict": "confirmed"}).encode(),
                response_topic="replies/fb", correlation=b"f1",
            )  # fmt: skip
            [reply] = plant.wait_for(1, topic="replies/fb")
            plant.close()
            assert body(reply)["stored"] is True
            forwarded = central.wait_for(2, timeout=30)
        central.close()
        sent = [body(m) for m in forwarded]
        corrected = next(f for f in sent if f["verdict"] == "corrected")
        assert corrected["corrected_label"] == wrong and corrected["station"] == "line3-s2"
        assert base64.b64decode(corrected["image_base64"]) == photo
        assert corrected["model"]["bundle_sha256"] == answer["model"]["bundle_sha256"]
        # Survives a restart.
        with run_agent(state, "--trusted-key", str(keys.public), env=env) as agent:
            agent.wait_ready()
            assert httpx.get(f"{agent.url}/v1/feedback").status_code == 401
            recent = httpx.get(f"{agent.url}/v1/feedback", headers=auth).json()
            assert recent["stored"] == 2
            assert {f["verdict"] for f in recent["feedback"]} == {"corrected", "confirmed"}
    out = tmp_path / "dataset"
    result = subprocess.run(
        [".venv/bin/edge-agent", "export-feedback", "--state-dir", str(state), "--out", str(out)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["corrections"] == [
        {"predicted": answer["label"], "corrected_to": wrong, "count": 1}
    ]
    assert (out / wrong).is_dir() and len(list((out / wrong).iterdir())) == 1
    assert len((out / "records.jsonl").read_text().splitlines()) == 2
