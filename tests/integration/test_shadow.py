"""Shadow mode: a candidate version runs beside the active one on the same photos and changes
none of the active answers; its agreement, disagreements and latency are reported."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from tests.agent_support import build_bundle, jpeg, make_keys, run_agent

TOKEN = "shadow-token-0123456789"


def test_shadow_leaves_active_answers_unchanged(tmp_path: Path) -> None:
    keys = make_keys(tmp_path / "keys")
    v1 = build_bundle(tmp_path / "v1", keys, version=1, seed=3)
    v2 = build_bundle(tmp_path / "v2", keys, version=2, seed=9)
    state = tmp_path / "state"
    for bundle, extra in ((v1, []), (v2, ["--no-activate"])):
        subprocess.run(
            [".venv/bin/edge-agent", "install", str(bundle.path), "--state-dir", str(state),
             "--trusted-key", str(keys.public), *extra],
            check=True, capture_output=True, timeout=120,
        )  # fmt: skip
    photos = [jpeg(seed, (240, 320)) for seed in range(12)]
    env = {"EDGE_AGENT_ADMIN_TOKEN": TOKEN}
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with (
        run_agent(state, "--trusted-key", str(keys.public), env=env) as agent,
        agent.client() as http,
    ):
        agent.wait_ready()

        def answers() -> list[list[dict[str, object]]]:
            out = []
            for photo in photos:
                out.append(
                    http.post(
                        "/v1/models/defects/predict",
                        content=photo,
                        headers={"Content-Type": "image/jpeg"},
                    ).json()["top_k"]
                )
                time.sleep(0.2)  # an idle gap: the shadow runs between requests
            return out

        before = answers()
        refused = http.post(
            "/v1/admin/shadow", json={"name": "defects", "version": 1}, headers=auth
        )
        assert refused.status_code == 400 and "active version" in refused.json()["error"]["message"]
        started = http.post(
            "/v1/admin/shadow", json={"name": "defects", "version": 2}, headers=auth
        )
        assert started.status_code == 201, started.text
        during = answers()
        time.sleep(0.5)
        shadow = http.get("/v1/shadow").json()["shadows"]["defects"]
        metrics = http.get("/metrics").text
        stopped = http.delete("/v1/admin/shadow/defects", headers=auth)
        after = answers()
    assert before == during == after  # the active answers did not change
    assert shadow["candidate"]["version"] == 2
    assert shadow["compared"] + shadow["dropped"] == len(photos) and shadow["compared"] >= 6
    assert shadow["agreement"] is not None and shadow["candidate_p50_ms"] is not None
    if shadow["agreement"] < 1.0:
        assert shadow["disagreements"]
    assert 'lineside_shadow_total{model="defects",outcome=' in metrics
    assert stopped.status_code == 200
