"""Schemathesis over the agent's own `/openapi.json`, against a real `edge-agent serve` (uvicorn)
with a model installed and the admin token sent: every operation, a fixed seed and a fixed number
of examples. Any 5xx, any status the document does not list, and any answer that does not match
its documented content type, headers or schema fails the test."""

from __future__ import annotations

import collections
from collections.abc import Iterator
from typing import Any

import pytest

schemathesis = pytest.importorskip("schemathesis", reason="install the dev role (schemathesis)")

from hypothesis import HealthCheck, given, seed, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.core.failures import FailureGroup  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.agent_support import build_bundle, install_bundle, make_keys, run_agent  # noqa: E402

TOKEN = "schemathesis-admin-token-0123"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
MAX_EXAMPLES = 50
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    work = tmp_path_factory.mktemp("schemathesis")
    keys = make_keys(work / "keys")
    bundle = build_bundle(work / "dist", keys)
    state = work / "state"
    install_bundle(state, bundle.path, keys.public)
    env = {"EDGE_AGENT_ADMIN_TOKEN": TOKEN}
    with run_agent(state, "--trusted-key", str(keys.public), env=env) as agent:
        agent.wait_ready()
        yield schemathesis.openapi.from_url(f"{agent.url}/openapi.json")


def test_every_answer_is_documented_and_none_is_a_server_error(api: object) -> None:
    failures, calls = [], []
    operations = [result.ok() for result in api.get_all_operations()]  # type: ignore[attr-defined]
    assert len(operations) >= 20
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @seed(15)
            @settings(
                max_examples=MAX_EXAMPLES,
                deadline=None,
                database=None,
                derandomize=True,
                suppress_health_check=list(HealthCheck),
            )
            @given(case=operation.as_strategy(generation_mode=mode))
            def check(case: Any) -> None:
                response = case.call_and_validate(checks=CHECKS, headers=ADMIN, timeout=30)
                calls.append(response.status_code)

            try:
                check()
            except Unsatisfiable:  # nothing to make invalid (no parameters, no body)
                continue
            except (Exception, FailureGroup) as exc:  # run every operation; report all failures
                failures.append(f"{operation.label} ({mode.value}): {exc}")
    assert not failures, "\n\n".join(failures)
    statuses = collections.Counter(calls)
    assert sum(statuses.values()) > 10 * len(operations), statuses
    assert statuses[200] and statuses[400] and statuses[404], statuses
