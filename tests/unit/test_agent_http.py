"""The HTTP app in-process (FastAPI TestClient, lifespan included) over a real `Agent` with real
signed bundles in a temporary state directory: predictions, records, admin installs, errors and
metrics as a client sees them."""

from __future__ import annotations

import base64
import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from edge_agent import errors as agent_errors
from edge_agent.app.agent import Agent
from edge_agent.app.server import http_app
from edge_agent.http.errors import error_response, status_for
from edge_bundle import errors as bundle_errors
from edge_bundle.cpu_class import host_class
from tests.agent_support import BuiltBundle, Keys, build_bundle, jpeg, make_keys
from tests.unit.agent_fixtures import (
    ADMIN_TOKEN,
    agent_settings,
    clean_environment,
    flip_byte,
    resigned,
    store_for,
    wait_for,
    with_references,
)

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
MAX_BODY = 64 * 1024
PHOTO = jpeg(7)


@dataclass
class Served:
    client: TestClient
    agent: Agent
    keys: Keys
    work: Path


@contextlib.contextmanager
def serve(
    work: Path, keys: Keys, installed: tuple[BuiltBundle, ...] = (), **overrides: Any
) -> Iterator[Served]:
    """An agent over `work/state` with `installed` staged and activated before it starts."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        clean_environment(monkeypatch)
        settings = agent_settings(work / "state", keys, **overrides)
    store = store_for(settings.store_dir, keys)
    for built in installed:
        store.stage(built.path)
        store.activate(built.name, built.version)
    agent = Agent(settings)
    with TestClient(http_app(agent)) as client:
        yield Served(client, agent, keys, work)


def wait_loaded(client: TestClient) -> httpx.Response:
    """/readyz once the background load has finished (ready or not)."""

    def probe() -> httpx.Response | None:
        response = client.get("/readyz")
        loading = "loading the installed bundles" in response.json()["reasons"]
        return None if loading else response

    return wait_for(probe, "the agent finishing its background load")


def predict(
    client: TestClient, data: bytes | Iterator[bytes] = PHOTO, **kwargs: Any
) -> httpx.Response:
    headers = {"Content-Type": "image/jpeg", **kwargs.pop("headers", {})}
    response: httpx.Response = client.post(
        "/v1/models/defects/predict", content=data, headers=headers, **kwargs
    )
    return response


def answer(response: httpx.Response) -> tuple[str, list[dict[str, Any]], int]:
    """What must not change between input forms: label, scores, model version."""
    assert response.status_code == 200, response.text
    body = response.json()
    return body["label"], body["top_k"], body["model"]["version"]


def assert_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"error"}
    error: dict[str, Any] = body["error"]
    assert set(error) == {"code", "message", "request_id"}
    assert error["code"] == code
    assert error["message"]
    return error


def metric_samples(client: TestClient) -> list[tuple[str, dict[str, str], float]]:
    response = client.get("/metrics")
    assert response.status_code == 200
    return [
        (sample.name, sample.labels, sample.value)
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    ]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """One ready agent serving defects@1, with an admin token, shared by read-only tests."""
    work = tmp_path_factory.mktemp("served")
    keys = make_keys(work / "keys")
    built = build_bundle(work, keys)
    with serve(work, keys, (built,), admin_token=ADMIN_TOKEN, max_body_bytes=MAX_BODY) as agent:
        assert wait_loaded(agent.client).status_code == 200
        yield agent


@pytest.fixture
def fresh(tmp_path: Path) -> Iterator[Served]:
    """An agent with an admin token and nothing installed."""
    keys = make_keys(tmp_path / "keys")
    with serve(tmp_path, keys, admin_token=ADMIN_TOKEN) as agent:
        wait_loaded(agent.client)
        yield agent


# ---- the error table ---------------------------------------------------------------------------
EXPECTED_STATUS: dict[type[Exception], tuple[int, str]] = {
    agent_errors.BadRequestError: (400, "bad_request"),
    agent_errors.RequestTimeoutError: (408, "request_timeout"),
    agent_errors.UnauthorizedError: (401, "unauthorized"),
    agent_errors.UnknownModelError: (404, "unknown_model"),
    agent_errors.UnknownRequestError: (404, "unknown_request"),
    agent_errors.PayloadTooLargeError: (413, "payload_too_large"),
    agent_errors.UnsupportedMediaError: (415, "unsupported_media_type"),
    agent_errors.BundleRejectedError: (422, "bundle_rejected"),
    agent_errors.FeedbackFullError: (507, "feedback_quota_full"),
    agent_errors.DiskFullError: (507, "disk_full"),
    agent_errors.NotReadyError: (503, "not_ready"),
    agent_errors.OverloadedError: (503, "overloaded"),
    agent_errors.DrainingError: (503, "shutting_down"),
    agent_errors.ConfigError: (500, "config_error"),
    agent_errors.RuntimeLoadError: (500, "runtime_load_failed"),
    agent_errors.InferenceError: (500, "inference_failed"),
    agent_errors.SelfTestError: (500, "self_test_failed"),
    bundle_errors.ImageTooLargeError: (413, "image_too_large"),
    bundle_errors.UnsupportedImageError: (415, "unsupported_image"),
    bundle_errors.ImageError: (422, "invalid_image"),
    bundle_errors.PreprocessError: (422, "invalid_image"),
}


@pytest.mark.parametrize("cls", list(EXPECTED_STATUS), ids=lambda cls: cls.__name__)
def test_status_for_every_error_class(cls: type[Exception]) -> None:
    assert status_for(cls("what went wrong; what to do")) == EXPECTED_STATUS[cls]


def test_every_agent_error_class_has_a_status_of_its_own() -> None:
    defined = {
        value
        for value in vars(agent_errors).values()
        if isinstance(value, type)
        and issubclass(value, agent_errors.AgentError)
        and value is not agent_errors.AgentError
    }
    assert defined == {cls for cls in EXPECTED_STATUS if issubclass(cls, agent_errors.AgentError)}


@pytest.mark.parametrize(
    "exc",
    [
        agent_errors.AgentError("base"),
        bundle_errors.SignatureError("bad signature"),
        RuntimeError("anything else"),
    ],
    ids=type,
)
def test_errors_outside_the_table_are_internal(exc: Exception) -> None:
    assert status_for(exc) == (500, "internal_error")


def test_error_response_rounds_retry_after_up_to_whole_seconds() -> None:
    response = error_response(503, "overloaded", "busy; retry", "ab" * 16, retry_after_s=0.2)
    assert response.headers["Retry-After"] == "1"
    assert response.headers["X-Request-ID"] == "ab" * 16
    assert error_response(503, "x", "y", None, retry_after_s=2.5).headers["Retry-After"] == "3"
    assert "Retry-After" not in error_response(400, "x", "y", None).headers


# ---- predictions ----------------------------------------------------------------------------
def test_readyz_describes_the_loaded_model(served: Served) -> None:
    body = served.client.get("/readyz").json()
    assert body["ready"] is True
    assert body["reasons"] == []
    [model] = body["models"]
    assert (model["name"], model["version"], model["status"]) == ("defects", 1, "ready")
    assert model["selftest"]["passed"] is True
    assert model["signed_by"] == served.keys.key.key_id


def test_a_model_without_references_is_listed_with_a_warning(served: Served) -> None:
    model = served.client.get("/v1/models/defects").json()
    check = model["reference_check"]
    assert check["status"] == "not-carried"
    assert "defects@1 carries no fp32 reference outputs" in check["warning"]
    [listed] = served.client.get("/v1/models").json()["models"]
    assert listed["reference_check"] == check


def test_healthz(served: Served) -> None:
    response = served.client.get("/healthz")
    assert response.status_code == 200
    assert response.json()["status"] == "alive"


def test_raw_multipart_and_json_bodies_give_the_same_answer(served: Served) -> None:
    client = served.client
    raw = predict(client)
    multipart = client.post(
        "/v1/models/defects/predict", files={"image": ("part.jpg", PHOTO, "image/jpeg")}
    )
    encoded = base64.b64encode(PHOTO).decode()
    as_json = client.post("/v1/models/defects/predict", json={"image": encoded})
    data_url = client.post(
        "/v1/models/defects/predict", json={"image": f"data:image/jpeg;base64,{encoded}"}
    )
    octets = predict(client, headers={"Content-Type": "application/octet-stream"})
    expected = answer(raw)
    assert expected[0] in {"ok", "scratch", "dent"}
    assert len(expected[1]) == 3
    for response in (multipart, as_json, data_url, octets):
        assert answer(response) == expected


def test_prediction_body(served: Served) -> None:
    body = predict(served.client).json()
    assert body["model"]["name"] == "defects"
    assert body["score"] == body["top_k"][0]["score"]
    assert body["label"] == body["top_k"][0]["label"]
    assert sum(entry["score"] for entry in body["top_k"]) == pytest.approx(1.0, abs=1e-5)
    assert body["image"]["format"] == "jpeg"
    assert (body["image"]["width"], body["image"]["height"]) == (160, 120)
    assert set(body["timings_ms"]) == {"receive", "decode", "preprocess", "infer", "postprocess"}
    assert body["knowledge"]["title"]  # every label of the test bundle has an entry
    assert body["links"] == {"self": f"/v1/requests/{body['request_id']}"}


def test_request_id_header_matches_the_body(served: Served) -> None:
    response = predict(served.client)
    request_id = response.json()["request_id"]
    assert response.headers["X-Request-ID"] == request_id
    assert len(request_id) == 32
    assert int(request_id, 16) >= 0
    assert predict(served.client).json()["request_id"] != request_id


def test_a_client_request_id_is_echoed_but_never_used_as_ours(served: Served) -> None:
    response = predict(served.client, headers={"X-Request-ID": "station-4/shot-17"})
    body = response.json()
    assert body["client_request_id"] == "station-4/shot-17"
    assert response.headers["X-Request-ID"] == body["request_id"] != "station-4/shot-17"


def test_top_k(served: Served) -> None:
    assert len(predict(served.client, params={"top_k": 1}).json()["top_k"]) == 1
    assert len(predict(served.client, params={"top_k": 2}).json()["top_k"]) == 2
    # More than the model has labels gives every label once.
    assert len(predict(served.client, params={"top_k": 100}).json()["top_k"]) == 3


@pytest.mark.parametrize("top_k", ["0", "101", "-1", "three"])
def test_top_k_out_of_bounds_is_a_bad_request(served: Served, top_k: str) -> None:
    error = assert_error(predict(served.client, params={"top_k": top_k}), 400, "bad_request")
    assert "top_k" in error["message"]


def test_the_predict_routes_parameters_are_documented_as_they_are_checked(served: Served) -> None:
    # Read by hand (edge_agent.http.inputs.QueryOption), not by FastAPI: documented by hand too.
    document = served.client.get("/openapi.json").json()
    operation = document["paths"]["/v1/models/{name}/predict"]["post"]
    parameters = {p["name"]: (p["in"], p["required"], p["schema"]) for p in operation["parameters"]}
    assert parameters == {
        "name": ("path", True, {"type": "string"}),
        "top_k": ("query", False, {"type": "integer", "minimum": 1, "maximum": 100, "default": 3}),
        "explain": ("query", False, {"type": "boolean", "default": True}),
        "explanation_format": (
            "query", False, {"type": "string", "enum": ["text", "json"], "default": "text"}
        ),
        "note": ("query", False, {"type": "string", "maxLength": 500}),
    }  # fmt: skip
    bad = predict(served.client, params={"explain": "perhaps", "top_k": "2"})
    assert assert_error(bad, 400, "bad_request")["message"] == (
        "invalid request: query.explain must be true or false, not 'perhaps'"
    )


def test_the_kept_record_and_its_image(served: Served) -> None:
    client = served.client
    body = predict(client).json()
    request_id = body["request_id"]

    def kept() -> dict[str, Any] | None:
        response = client.get(f"/v1/requests/{request_id}")
        return dict(response.json()) if response.status_code == 200 else None

    record = wait_for(kept, "the request record")
    assert record["request_id"] == request_id
    assert (record["label"], record["top_k"], record["model"]) == (
        body["label"],
        body["top_k"],
        body["model"],
    )
    image_url = f"/v1/requests/{request_id}/image"
    assert_error(client.get(image_url), 401, "unauthorized")
    wrong = {"Authorization": "Bearer not-the-admin-token-at-all"}
    assert_error(client.get(image_url, headers=wrong), 401, "unauthorized")
    image = client.get(image_url, headers=ADMIN)
    assert image.status_code == 200
    assert image.content == PHOTO


def test_unknown_request_record(served: Served) -> None:
    error = assert_error(served.client.get(f"/v1/requests/{'0' * 32}"), 404, "unknown_request")
    assert "0" * 32 in error["message"]
    assert_error(served.client.get("/v1/requests/not-an-id"), 404, "unknown_request")
    response = served.client.get(f"/v1/requests/{'0' * 32}/image", headers=ADMIN)
    assert_error(response, 404, "unknown_request")


def test_unknown_model(served: Served) -> None:
    response = served.client.post(
        "/v1/models/nothing/predict", content=PHOTO, headers={"Content-Type": "image/jpeg"}
    )
    error = assert_error(response, 404, "unknown_model")
    assert "'nothing'" in error["message"]
    assert "defects" in error["message"]  # says what is installed
    assert_error(served.client.get("/v1/models/nothing"), 404, "unknown_model")
    assert served.client.get("/v1/models/defects").json()["version"] == 1


def test_a_body_that_is_not_an_image(served: Served) -> None:
    response = predict(served.client, b"certainly not a photo" * 10)
    error = assert_error(response, 415, "unsupported_image")
    assert response.headers["X-Request-ID"] == error["request_id"]
    assert len(error["request_id"]) == 32


@pytest.mark.parametrize(
    ("kwargs", "status", "code"),
    [
        (
            {"content": PHOTO, "headers": {"Content-Type": "text/plain"}},
            415,
            "unsupported_media_type",
        ),
        ({"content": PHOTO}, 415, "unsupported_media_type"),
        ({"json": {"picture": "AAAA"}}, 400, "bad_request"),
        ({"json": {"image": "not base64!"}}, 400, "bad_request"),
        (
            {"content": b"{oops", "headers": {"Content-Type": "application/json"}},
            400,
            "bad_request",
        ),
        ({"files": {"photo": ("a.jpg", PHOTO, "image/jpeg")}}, 400, "bad_request"),
    ],
    ids=["text-plain", "no-type", "json-no-image", "json-bad-base64", "bad-json", "wrong-field"],
)
def test_malformed_prediction_requests(
    served: Served, kwargs: dict[str, Any], status: int, code: str
) -> None:
    response = served.client.post("/v1/models/defects/predict", **kwargs)
    assert_error(response, status, code)


def test_a_declared_body_over_the_limit_is_refused_before_reading(served: Served) -> None:
    error = assert_error(predict(served.client, b"\xff" * (MAX_BODY + 1)), 413, "payload_too_large")
    assert f"{MAX_BODY:,}" in error["message"]


def test_a_streamed_body_over_the_limit_is_refused(served: Served) -> None:
    def chunks() -> Iterator[bytes]:
        for _ in range(8):
            yield b"\xff" * (MAX_BODY // 4)

    assert_error(predict(served.client, chunks()), 413, "payload_too_large")


def test_unknown_route_has_the_json_error_shape(served: Served) -> None:
    error = assert_error(served.client.get("/v2/nothing/here"), 404, "not_found")
    assert "/v2/nothing/here" in error["message"]
    assert error["request_id"] is None


def test_wrong_method_has_the_json_error_shape(served: Served) -> None:
    error = assert_error(served.client.get("/v1/models/defects/predict"), 405, "method_not_allowed")
    assert "GET" in error["message"]


def test_wrong_method_says_which_methods_are_allowed(served: Served) -> None:
    response = served.client.get("/v1/models/defects/predict")
    assert response.headers.get("Allow") == "POST"


def test_metrics(served: Served) -> None:
    client = served.client
    assert predict(client).status_code == 200
    assert predict(client, b"not an image at all").status_code == 415
    client.post("/v1/models/nothing/predict", content=PHOTO, headers={"Content-Type": "image/jpeg"})
    samples = metric_samples(client)
    outcomes = {
        (labels["model"], labels["outcome"]): value
        for name, labels, value in samples
        if name == "lineside_predictions_total" and labels["transport"] == "http"
    }
    assert outcomes[("defects", "ok")] >= 1
    assert outcomes[("defects", "unsupported_image")] >= 1
    assert outcomes[("unknown", "unknown_model")] >= 1
    stages = {
        labels["stage"]
        for name, labels, value in samples
        if name == "lineside_stage_seconds_count" and labels["model"] == "defects" and value >= 1
    }
    assert stages == {"receive", "decode", "preprocess", "infer", "postprocess"}
    assert ("lineside_ready", {}, 1.0) in samples
    info = [labels for name, labels, _ in samples if name == "lineside_model_info"]
    assert [(i["model"], i["version"]) for i in info] == [("defects", "1")]
    routes = {
        labels["route"]
        for name, labels, _ in samples
        if name == "lineside_http_request_seconds_count"
    }
    assert "/v1/models/{name}/predict" in routes  # the template, never the raw path
    assert "/v1/models/nothing/predict" not in routes


# ---- readiness and admin ------------------------------------------------------------------------
def test_readyz_is_503_with_a_reason_when_nothing_is_installed(tmp_path: Path) -> None:
    with serve(tmp_path, make_keys(tmp_path / "keys")) as agent:
        response = wait_loaded(agent.client)
        assert response.status_code == 503
        body = response.json()
        assert body["ready"] is False
        assert body["models"] == []
        assert any("no model is installed" in reason for reason in body["reasons"])
        assert any("/v1/admin/bundles" in reason for reason in body["reasons"])


def test_a_bundle_damaged_on_disk_is_not_served(tmp_path: Path) -> None:
    keys = make_keys(tmp_path / "keys")
    built = build_bundle(tmp_path, keys)
    with pytest.MonkeyPatch.context() as monkeypatch:
        clean_environment(monkeypatch)
        settings = agent_settings(tmp_path / "state", keys)
    store = store_for(settings.store_dir, keys)
    store.stage(built.path)
    store.activate("defects", 1)
    model = settings.store_dir / "bundles" / "defects" / "1" / "model.onnx"
    damaged = bytearray(model.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    model.write_bytes(bytes(damaged))
    with serve(tmp_path, keys) as agent:
        response = wait_loaded(agent.client)
        assert response.status_code == 503
        [reason] = response.json()["reasons"]
        assert reason.startswith(
            "model defects is failed: installed bundle defects@1 failed checks"
        )
        predicted = predict(agent.client)
        assert "failed checks" in assert_error(predicted, 503, "not_ready")["message"]
        assert predicted.headers["Retry-After"] == "5"


def test_an_active_bundle_whose_golden_sample_cannot_be_decoded_is_failed(tmp_path: Path) -> None:
    keys = make_keys(tmp_path / "keys")
    built = build_bundle(tmp_path, keys)
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"not an image at all")
    broken = resigned(built, tmp_path / "broken.bundle", files={"golden/00.png": garbage})
    with pytest.MonkeyPatch.context() as monkeypatch:
        clean_environment(monkeypatch)
        settings = agent_settings(tmp_path / "state", keys)
    store = store_for(settings.store_dir, keys)
    store.stage(broken)
    store.activate("defects", 1)
    with serve(tmp_path, keys) as agent:
        response = wait_loaded(agent.client)
        assert response.status_code == 503
        assert response.json()["models"][0]["status"] == "failed"


def test_admin_routes_are_disabled_without_an_admin_token(tmp_path: Path) -> None:
    keys = make_keys(tmp_path / "keys")
    built = build_bundle(tmp_path, keys)
    with serve(tmp_path, keys) as agent:
        response = agent.client.post("/v1/admin/bundles", content=built.path.read_bytes())
        error = assert_error(response, 401, "unauthorized")
        assert "admin_token" in error["message"]
        assert agent.agent.store.versions("defects") == []


def test_install_route_needs_the_admin_token(fresh: Served, tmp_path: Path) -> None:
    data = build_bundle(tmp_path, fresh.keys).path.read_bytes()
    client = fresh.client
    assert_error(client.post("/v1/admin/bundles", content=data), 401, "unauthorized")
    for wrong in ("Bearer wrong-token-of-enough-length", ADMIN_TOKEN, f"Basic {ADMIN_TOKEN}"):
        response = client.post("/v1/admin/bundles", content=data, headers={"Authorization": wrong})
        assert_error(response, 401, "unauthorized")
    assert fresh.agent.store.versions("defects") == []
    assert_error(predict(client), 404, "unknown_model")


def test_install_route_activates_a_bundle(fresh: Served, tmp_path: Path) -> None:
    built = build_bundle(tmp_path, fresh.keys)
    response = fresh.client.post(
        "/v1/admin/bundles", content=built.path.read_bytes(), headers=ADMIN
    )
    assert response.status_code == 201, response.text
    body = response.json()
    assert (body["activated"]["name"], body["activated"]["version"]) == ("defects", 1)
    assert body["selftest"]["passed"] is True
    assert fresh.client.get("/readyz").status_code == 200
    assert answer(predict(fresh.client))[2] == 1
    assert fresh.agent.store.active_version("defects") == 1
    assert list((fresh.work / "state" / "uploads").iterdir()) == []  # the upload is not kept


def test_a_refused_install_keeps_the_previous_version_serving(
    fresh: Served, tmp_path: Path
) -> None:
    client = fresh.client
    first = build_bundle(tmp_path, fresh.keys, version=1)
    assert client.post(
        "/v1/admin/bundles", content=first.path.read_bytes(), headers=ADMIN
    ).is_success
    before = answer(predict(client))
    second = build_bundle(tmp_path, fresh.keys, version=2, seed=11)
    tampered = flip_byte(second.path, "model.onnx", tmp_path / "tampered.bundle")
    response = client.post("/v1/admin/bundles", content=tampered.read_bytes(), headers=ADMIN)
    assert_error(response, 422, "bundle_rejected")
    failing = build_bundle(tmp_path / "failing", fresh.keys, version=3, golden_offset=0.05)
    response = client.post("/v1/admin/bundles", content=failing.path.read_bytes(), headers=ADMIN)
    assert "self-test" in assert_error(response, 422, "bundle_rejected")["message"]
    assert answer(predict(client)) == before
    assert client.get("/readyz").status_code == 200
    assert fresh.agent.store.versions("defects") == [1]
    assert fresh.agent.store.active_version("defects") == 1
    installs = {
        labels["outcome"]: value
        for name, labels, value in metric_samples(client)
        if name == "lineside_bundle_installs_total"
    }
    assert installs == {"activated": 1.0, "rejected": 2.0}


def test_installing_version_2_swaps_the_served_model(fresh: Served, tmp_path: Path) -> None:
    client = fresh.client
    for version, seed in ((1, 3), (2, 11)):
        built = build_bundle(tmp_path, fresh.keys, version=version, seed=seed)
        response = client.post("/v1/admin/bundles", content=built.path.read_bytes(), headers=ADMIN)
        assert response.status_code == 201, response.text
        assert answer(predict(client))[2] == version
    model = client.get("/v1/models/defects").json()
    assert model["version"] == 2
    assert model["installed_versions"] == [1, 2]
    assert fresh.agent.store.active_version("defects") == 2
    info = [
        labels["version"]
        for name, labels, _ in metric_samples(client)
        if name == "lineside_model_info" and labels["model"] == "defects"
    ]
    assert info == ["2"]


def test_an_empty_install_body_is_a_bad_request(fresh: Served) -> None:
    response = fresh.client.post("/v1/admin/bundles", content=b"", headers=ADMIN)
    assert "empty" in assert_error(response, 400, "bad_request")["message"]


# ---- the reference check ------------------------------------------------------------------------
def test_install_route_runs_the_reference_check_and_models_show_it(
    fresh: Served, tmp_path: Path
) -> None:
    checked = with_references(build_bundle(tmp_path, fresh.keys), tmp_path / "checked.bundle")
    response = fresh.client.post("/v1/admin/bundles", content=checked.read_bytes(), headers=ADMIN)
    assert response.status_code == 201, response.text
    shown = response.json()["reference_check"]
    assert shown["status"] == "passed"
    assert shown["cpu_class"] == str(host_class())
    assert shown["figures"]["top1_agreement"]["value"] == 1.0
    assert shown["figures"]["top1_agreement"]["count"] == 12
    assert "warning" not in shown
    assert fresh.client.get("/v1/models/defects").json()["reference_check"] == shown


def test_a_bundle_disagreeing_with_its_references_is_refused_over_http(
    fresh: Served, tmp_path: Path
) -> None:
    client = fresh.client
    first = build_bundle(tmp_path, fresh.keys)
    assert client.post("/v1/admin/bundles", content=first.path.read_bytes(), headers=ADMIN)
    before = answer(predict(client))
    second = build_bundle(tmp_path, fresh.keys, version=2, seed=11)
    bad = with_references(second, tmp_path / "bad.bundle", outputs=lambda p: p[:, [1, 2, 0]])
    response = client.post("/v1/admin/bundles", content=bad.read_bytes(), headers=ADMIN)
    message = assert_error(response, 422, "bundle_rejected")["message"]
    assert "defects@2 disagrees with its fp32 reference outputs" in message
    assert "top1_agreement 0.0000 (0/12" in message
    assert "the build did not evaluate this class" in message
    assert answer(predict(client)) == before
    assert fresh.agent.store.versions("defects") == [1]
    assert client.get("/v1/models/defects").json()["reference_check"]["status"] == "not-carried"


def test_the_check_recorded_at_install_is_shown_after_a_restart(tmp_path: Path) -> None:
    """Start-up does not run the check again; it shows the one recorded when it was installed."""
    from edge_agent.device.install import stage_and_prepare
    from edge_bundle.profiles import load_profile

    keys = make_keys(tmp_path / "keys")
    checked = with_references(build_bundle(tmp_path, keys), tmp_path / "checked.bundle")
    with pytest.MonkeyPatch.context() as monkeypatch:
        clean_environment(monkeypatch)
        settings = agent_settings(tmp_path / "state", keys)
    store = store_for(settings.store_dir, keys)
    candidate = stage_and_prepare(
        store, checked, load_profile(settings.profile), settings.cache_dir
    )
    candidate.classifier.close()  # type: ignore[union-attr]
    store.activate("defects", 1)
    recorded = store.reference_check("defects", 1)
    assert recorded is not None and recorded["status"] == "passed"
    with serve(tmp_path, keys) as agent:
        assert wait_loaded(agent.client).status_code == 200
        model = agent.client.get("/v1/models/defects").json()
        assert model["reference_check"] == recorded
