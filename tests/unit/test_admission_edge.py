"""Predictions refused at the HTTP edge (#15): when admission would refuse a prediction now, the
`EarlyRefusal` middleware answers the agent's JSON 503 + Retry-After before routing, query
validation and the endpoint run, counts it like any refused prediction, and lets everything else
through; once admission has room, predictions are served again. In-process, over a real `Agent`."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import httpx
import pytest

from tests.agent_support import build_bundle, make_keys
from tests.unit.test_agent_http import (
    Served,
    assert_error,
    metric_samples,
    predict,
    serve,
    wait_loaded,
)

PREDICT_TEMPLATE = "/v1/models/{name}/predict"


@contextlib.contextmanager
def served_agent(work: Path) -> Iterator[Served]:
    keys = make_keys(work / "keys")
    built = build_bundle(work, keys)
    with serve(work, keys, (built,), max_in_flight=2) as agent:
        assert wait_loaded(agent.client).status_code == 200
        yield agent


@pytest.fixture()
def served(tmp_path: Path) -> Iterator[Served]:
    with served_agent(tmp_path) as agent:
        yield agent


@contextlib.contextmanager
def saturated(served: Served) -> Iterator[None]:
    """Every inference slot held, as by predictions running now."""
    admission = served.agent.lane.admission
    with contextlib.ExitStack() as stack:
        for _ in range(admission.capacity):
            stack.enter_context(admission.slot())
        yield


def sample(served: Served, name: str, labels: dict[str, str]) -> float:
    return sum(v for n, lab, v in metric_samples(served.client) if n == name and lab == labels)


def overloaded_count(served: Served, model: str) -> float:
    labels = {"model": model, "transport": "http", "outcome": "overloaded"}
    return sample(served, "lineside_predictions_total", labels)


def refused_timing_count(served: Served) -> float:
    labels = {"route": PREDICT_TEMPLATE, "status": "5xx"}
    return sample(served, "lineside_http_request_seconds_count", labels)


def assert_overloaded(response: httpx.Response) -> None:
    error = assert_error(response, 503, "overloaded")
    assert response.headers["Retry-After"] == "1"
    assert re.fullmatch(r"[0-9a-f]{32}", str(error["request_id"]))
    assert response.headers["X-Request-ID"] == error["request_id"]
    assert "connection" not in response.headers  # kept alive, like the app's own 503
    assert "retry after" in str(error["message"])


def test_a_prediction_admission_would_refuse_is_answered_before_the_app(served: Served) -> None:
    refused, timed = overloaded_count(served, "defects"), refused_timing_count(served)
    with saturated(served):
        # top_k=0 is a 400 once the route validates it: the edge answered first.
        assert_overloaded(predict(served.client, params={"top_k": 0}))
        unknown = served.client.post("/v1/models/nope/predict", content=b"x")
        assert_overloaded(cast(httpx.Response, unknown))
        # Everything else is served as usual.
        assert served.client.get("/healthz").status_code == 200
        assert served.client.get("/v1/models/defects").status_code == 200
        assert served.client.get("/v1/models/defects/predict").status_code == 405
    assert overloaded_count(served, "defects") == refused + 1
    assert overloaded_count(served, "unknown") >= 1
    assert refused_timing_count(served) == timed + 2  # timed under the route's template
    answered = predict(served.client)  # room again: served
    assert answered.status_code == 200, answered.text


def test_a_prediction_the_edge_lets_through_is_still_decided_by_admission(
    served: Served,
) -> None:
    # The edge only reads: when the slots fill up between its look and the endpoint's own
    # admission, the endpoint refuses.
    admission = served.agent.lane.admission
    looks = 0
    with contextlib.ExitStack() as held, pytest.MonkeyPatch.context() as patch:

        def room_then_full(*, admitted: bool = False) -> None:
            nonlocal looks
            looks += 1
            patch.undo()  # from now on the real rule decides
            for _ in range(admission.capacity):
                held.enter_context(admission.slot())

        patch.setattr(admission, "refusal", room_then_full)
        response = predict(served.client)
    assert looks == 1
    assert_overloaded_by_the_app(response)
    assert admission.in_flight == 0


def assert_overloaded_by_the_app(response: httpx.Response) -> None:
    error = assert_error(response, 503, "overloaded")
    assert "all 2 inference slots are busy" in str(error["message"])
    assert response.headers["Retry-After"] == "1"


def test_while_draining_predictions_get_shutting_down_at_the_edge(tmp_path: Path) -> None:
    with served_agent(tmp_path) as served:
        served.agent.start_draining()
        response = predict(served.client)
        assert_error(response, 503, "shutting_down")
        assert int(response.headers["Retry-After"]) >= 1
        assert served.client.get("/healthz").status_code == 200
