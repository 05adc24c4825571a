"""The HTTP app under hostile or careless clients, in-process (issue #15): JSON nested 100,000
deep on every JSON route, too many headers, slow bodies (the `BodyDeadline` middleware against a
scripted `receive`), the feedback listing's token, and an API that tells the truth about itself
(OpenAPI error answers, /metrics as text, Allow, no server paths in refusals, the page's
security headers, the OpenAI list shape of /v1/models). Real sockets are in
tests/integration/test_agent_abuse.py."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Iterator
from typing import Any

import pytest
from starlette.types import Message, Receive, Scope, Send

from edge_agent.errors import RequestTimeoutError
from edge_agent.http.middleware import BodyDeadline
from tests.agent_support import build_bundle, make_keys
from tests.unit.agent_fixtures import ADMIN_TOKEN
from tests.unit.test_agent_http import (
    ADMIN,
    Served,
    assert_error,
    metric_samples,
    serve,
    wait_loaded,
)

DEEP = b"[" * 100_000 + b"]" * 100_000
#: Under the interpreter's recursion limit, over any depth this API reads.
NESTED = json.dumps({"image": json.loads("[" * 40 + "]" * 40)}).encode()
JSON_ROUTES = {
    "/v1/models/defects/predict": "/v1/models/{name}/predict",
    "/v1/feedback": "/v1/feedback",
    "/v1/admin/shadow": "/v1/admin/shadow",
    "/v1/models/defects/generate": "/v1/models/{name}/generate",
    "/v1/completions": "/v1/completions",
    "/v1/chat/completions": "/v1/chat/completions",
}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """One ready agent serving defects@1 with an admin token."""
    work = tmp_path_factory.mktemp("abuse")
    keys = make_keys(work / "keys")
    built = build_bundle(work, keys)
    with serve(work, keys, (built,), admin_token=ADMIN_TOKEN) as agent:
        assert wait_loaded(agent.client).status_code == 200
        yield agent


def count_4xx(served: Served, route: str) -> float:
    return sum(
        value
        for name, labels, value in metric_samples(served.client)
        if name == "lineside_http_request_seconds_count"
        and labels == {"route": route, "status": "4xx"}
    )


# ---- deep JSON -----------------------------------------------------------------------------
@pytest.mark.parametrize("path", list(JSON_ROUTES))
def test_json_nested_100000_deep_is_a_counted_bad_request(served: Served, path: str) -> None:
    before = count_4xx(served, JSON_ROUTES[path])
    headers = {"Content-Type": "application/json", **ADMIN}
    response = served.client.post(path, content=DEEP, headers=headers)
    error = assert_error(response, 400, "bad_request")
    assert "nested" in error["message"]
    assert count_4xx(served, JSON_ROUTES[path]) == before + 1
    assert served.client.get("/healthz").status_code == 200


@pytest.mark.parametrize("path", ["/v1/models/defects/predict", "/v1/feedback", "/v1/admin/shadow"])
def test_json_nested_deeper_than_any_request_is_refused_before_use(
    served: Served, path: str
) -> None:
    headers = {"Content-Type": "application/json", **ADMIN}
    error = assert_error(
        served.client.post(path, content=NESTED, headers=headers), 400, "bad_request"
    )
    assert "nested more than 32 levels" in error["message"]


# ---- header count ---------------------------------------------------------------------------
def test_too_many_header_fields_get_431_in_the_error_shape(served: Served) -> None:
    headers = [(f"x-filler-{i}", "1") for i in range(150)]
    response = served.client.get("/healthz", headers=headers)
    error = assert_error(response, 431, "headers_too_large")
    assert "over the limit of 100" in error["message"]
    assert response.headers["connection"] == "close"
    assert served.client.get("/healthz", headers=headers[:50]).status_code == 200


# ---- slow bodies (the middleware alone, with a scripted client) ------------------------------
async def _echo_length(scope: Scope, receive: Receive, send: Send) -> None:
    """An app that reads the whole body, then listens once more (as streaming answers do)."""
    size = 0
    while True:
        message = await receive()
        size += len(message.get("body", b""))
        if not message.get("more_body", False):
            break
    await receive()
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": str(size).encode()})


def _client(chunks: list[tuple[float, bytes]], then_wait: float = 0.0) -> Receive:
    """A client sending each chunk after its delay, the last one ending the body."""
    queue = list(chunks)

    async def receive() -> Message:
        if not queue:
            await asyncio.sleep(then_wait)
            return {"type": "http.disconnect"}
        delay, body = queue.pop(0)
        await asyncio.sleep(delay)
        return {"type": "http.request", "body": body, "more_body": bool(queue)}

    return receive


def _run(receive: Receive, timeout_s: float = 0.3, min_rate: float = 1000) -> tuple[Any, float]:
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    async def main() -> Any:
        app = BodyDeadline(_echo_length, timeout_s=timeout_s, min_rate=min_rate)
        await app({"type": "http", "path": "/", "headers": []}, receive, send)
        return sent[-1]["body"]

    started = time.perf_counter()
    try:
        result: Any = asyncio.run(main())
    except RequestTimeoutError as exc:
        result = exc
    return result, time.perf_counter() - started


def test_a_stalled_body_times_out_after_the_grace() -> None:
    result, elapsed = _run(_client([(0.0, b"x" * 10), (5.0, b"late")]))
    assert isinstance(result, RequestTimeoutError)
    assert "10 bytes" in result.message
    assert 0.25 < elapsed < 1.0  # 0.3 s + 10 bytes at 1000 bytes/s


def test_a_trickled_body_times_out_at_its_deadline() -> None:
    trickle = [(0.05, b"x" * 20) for _ in range(100)]  # 400 bytes/s against 1000 required
    result, elapsed = _run(_client(trickle))
    assert isinstance(result, RequestTimeoutError)
    assert 0.4 < elapsed < 1.5  # the grace, plus what arrived at the minimum rate


def test_a_body_keeping_up_the_rate_is_read_whole_and_later_reads_are_not_timed() -> None:
    steady = [(0.05, b"x" * 200) for _ in range(20)]  # 4000 bytes/s for 1 s, past the grace
    result, elapsed = _run(_client(steady, then_wait=0.6))
    assert result == b"4000"
    assert elapsed > 1.0


def test_a_read_started_late_gets_a_buffered_chunk_at_once_but_no_wait() -> None:
    sent: list[Message] = []
    chunks = [(0.0, b"x" * 10), (0.0, b"y" * 10), (5.0, b"late")]

    async def busy_reader(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        await asyncio.sleep(0.5)  # past the 0.3 s deadline, between reads
        sent.append(await receive())  # buffered: comes back although late
        await receive()  # would wait: refused within a millisecond or so

    async def main() -> None:
        app = BodyDeadline(busy_reader, timeout_s=0.3, min_rate=1000)
        await app({"type": "http", "path": "/", "headers": []}, _client(chunks), _discard)

    started = time.perf_counter()
    with pytest.raises(RequestTimeoutError, match="20 bytes"):
        asyncio.run(main())
    assert sent[0]["body"] == b"y" * 10
    assert time.perf_counter() - started < 1.5


def test_cancelling_the_request_is_not_a_timeout_and_leaves_no_timer() -> None:
    async def main() -> None:
        app = BodyDeadline(_echo_length, timeout_s=0.3, min_rate=1000)
        scope = {"type": "http", "path": "/", "headers": []}
        loop = asyncio.get_running_loop()
        timers = len(loop._scheduled)  # type: ignore[attr-defined]
        task = asyncio.create_task(app(scope, _client([(0.0, b"x"), (5.0, b"y")]), _discard))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        live = [handle for handle in loop._scheduled if not handle.cancelled()]  # type: ignore[attr-defined]
        assert len(live) <= timers

    asyncio.run(main())


async def _discard(message: Message) -> None:
    pass


# ---- the feedback listing -------------------------------------------------------------------
def test_the_feedback_listing_needs_the_token_when_one_is_set(served: Served) -> None:
    assert_error(served.client.get("/v1/feedback"), 401, "unauthorized")
    wrong = {"Authorization": "Bearer not-the-token-at-all"}
    assert_error(served.client.get("/v1/feedback", headers=wrong), 401, "unauthorized")
    listed = served.client.get("/v1/feedback", headers=ADMIN)
    assert listed.status_code == 200 and "feedback" in listed.json()


# ---- the API tells the truth ------------------------------------------------------------------
def test_options_lists_every_method_the_path_serves(served: Served) -> None:
    response = served.client.options("/v1/feedback")
    assert_error(response, 405, "method_not_allowed")
    assert {m.strip() for m in response.headers["Allow"].split(",")} >= {"GET", "POST"}


def test_openapi_lists_each_routes_error_answers_in_the_error_shape(served: Served) -> None:
    document = served.client.get("/openapi.json").json()
    assert "HTTPValidationError" not in document["components"]["schemas"]
    error_ref = {"$ref": "#/components/schemas/ErrorBody"}
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            answers = operation["responses"]
            errors = {int(s) for s in answers if s[0] in "45"}
            assert {431, 500} <= errors, (method, path)
            for status in errors - ({503} if path == "/readyz" else set()):
                content = answers[str(status)]["content"]
                assert content == {"application/json": {"schema": error_ref}}, (path, status)
    predict = document["paths"]["/v1/models/{name}/predict"]["post"]["responses"]
    assert {"400", "404", "408", "413", "415", "422", "503"} <= set(predict)
    assert "Retry-After" in predict["503"]["headers"]
    assert {"401"} <= set(document["paths"]["/v1/feedback"]["get"]["responses"])
    assert {"401", "422"} <= set(document["paths"]["/v1/admin/bundles"]["post"]["responses"])


def test_metrics_are_documented_and_served_as_prometheus_text(served: Served) -> None:
    document = served.client.get("/openapi.json").json()
    ok = document["paths"]["/metrics"]["get"]["responses"]["200"]
    assert list(ok["content"]) == ["text/plain"]
    response = served.client.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain")


def test_install_refusals_do_not_show_server_paths(served: Served) -> None:
    response = served.client.post("/v1/admin/bundles", content=b"not a bundle" * 100, headers=ADMIN)
    error = assert_error(response, 422, "bundle_rejected")
    assert "the uploaded bundle" in error["message"]
    assert not re.search(r"(^|[\s'\"(])/[\w.-]+/", error["message"]), error["message"]
    assert str(served.work) not in error["message"]


def test_server_paths_are_shortened_in_messages_but_routes_are_kept() -> None:
    from types import SimpleNamespace

    from starlette.requests import Request

    from edge_agent.http.redact import public_message

    request = Request({"type": "http", "app": SimpleNamespace(state=SimpleNamespace())})
    message = (
        "/var/lib/lineside/store/defects/1/model.onnx is missing; see /v1/models/{name}/predict "
        "and GET /v1/models"
    )
    assert public_message(message, request) == (
        "…/model.onnx is missing; see /v1/models/{name}/predict and GET /v1/models"
    )


def test_the_station_page_is_sent_with_security_headers(served: Served) -> None:
    response = served.client.get("/")
    policy = response.headers["Content-Security-Policy"]
    assert "default-src 'none'" in policy and "frame-ancestors 'none'" in policy
    assert "'unsafe-inline'" not in policy and "script-src 'sha256-" in policy
    assert response.headers["X-Frame-Options"] == "DENY"
    assert response.headers["X-Content-Type-Options"] == "nosniff"


def test_models_are_listed_for_our_clients_and_in_openais_list_shape(served: Served) -> None:
    body = served.client.get("/v1/models").json()
    assert body["object"] == "list"
    [model] = body["data"]
    assert (model["id"], model["object"], model["owned_by"]) == (
        "defects",
        "model",
        model["signed_by"],
    )
    assert isinstance(model["created"], int) and model["created"] > 1_600_000_000
    assert (model["name"], model["status"], model["version"]) == ("defects", "ready", 1)
    assert [m["name"] for m in body["models"]] == ["defects"]


def test_the_openai_client_lists_the_models(served: Served) -> None:
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(
        base_url="http://testserver/v1", api_key="unused", http_client=served.client
    )
    assert [m.id for m in client.models.list()] == ["defects"]
