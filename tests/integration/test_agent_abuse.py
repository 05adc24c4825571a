"""The agent under hostile clients on real sockets (issue #15): a real `edge-agent serve`
(uvicorn) with its connection limits shortened, against idle sockets, half-sent headers, trickled
bodies, header bombs and saturated inference. Health and readiness must keep answering; every
refusal is the agent's JSON error shape."""

from __future__ import annotations

import contextlib
import json
import socket
import statistics
import threading
import time
from collections.abc import Iterator
from urllib.parse import urlsplit

import httpx
import psutil
import pytest

from tests.agent_support import (
    AgentProcess,
    build_bundle,
    install_bundle,
    jpeg,
    make_keys,
    run_agent,
)

IDLE_S = 1.0
HEADER_S = 1.0
BODY_S = 1.0
MIN_RATE = 20_000
MAX_HEADER_BYTES = 8192
MAX_CONNECTIONS = 48
LIMITS = {
    "EDGE_AGENT_HTTP_IDLE_TIMEOUT_S": str(IDLE_S),
    "EDGE_AGENT_HTTP_HEADER_TIMEOUT_S": str(HEADER_S),
    "EDGE_AGENT_HTTP_BODY_TIMEOUT_S": str(BODY_S),
    "EDGE_AGENT_HTTP_BODY_MIN_RATE": str(MIN_RATE),
    "EDGE_AGENT_HTTP_MAX_HEADER_BYTES": str(MAX_HEADER_BYTES),
    "EDGE_AGENT_HTTP_MAX_CONNECTIONS": str(MAX_CONNECTIONS),
}
PREDICT = "/v1/models/defects/predict"


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    work = tmp_path_factory.mktemp("abuse")
    keys = make_keys(work / "keys")
    bundle = build_bundle(work / "dist", keys)
    state = work / "state"
    install_bundle(state, bundle.path, keys.public)
    args = ("--trusted-key", str(keys.public), "--max-in-flight", "2")
    with run_agent(state, *args, env=LIMITS) as running:
        running.wait_ready()
        yield running


def address(agent: AgentProcess) -> tuple[str, int]:
    parts = urlsplit(agent.url)
    assert parts.hostname and parts.port
    return parts.hostname, parts.port


def read_until_closed(sock: socket.socket, timeout: float) -> bytes:
    """Everything the agent sends before it closes the connection (or `timeout` passes)."""
    sock.settimeout(timeout)
    data = b""
    with contextlib.suppress(TimeoutError, ConnectionResetError):
        while chunk := sock.recv(65536):
            data += chunk
    return data


def json_error(response: bytes, status: int, code: str) -> dict[str, object]:
    head, _, body = response.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    assert lines[0].startswith(f"HTTP/1.1 {status} "), response[:300]
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    assert headers["content-type"] == "application/json"
    assert headers["connection"] == "close"
    error: dict[str, object] = json.loads(body)["error"]
    assert error["code"] == code and error["message"]
    return error


def assert_json_answer(response: httpx.Response, *statuses: int) -> None:
    assert response.status_code in statuses, response.text
    assert response.headers["content-type"] == "application/json", response.text
    if response.status_code == 503:
        assert response.json()["error"]["code"] == "overloaded"
        assert int(response.headers["Retry-After"]) >= 1


def test_idle_sockets_neither_take_the_agent_down_nor_stay_open(agent: AgentProcess) -> None:
    idle = [socket.create_connection(address(agent)) for _ in range(70)]
    try:
        with agent.client() as http:
            for path in ("/healthz", "/readyz"):
                assert_json_answer(http.get(path), 200)
            photo = jpeg(1)
            assert_json_answer(
                http.post(PREDICT, content=photo, headers={"Content-Type": "image/jpeg"}), 200
            )
        started = time.monotonic()
        for sock in idle:  # every one is closed by the agent: past the cap at once, else idle
            remaining = IDLE_S + 3 - (time.monotonic() - started)
            assert read_until_closed(sock, max(remaining, 0.01)) == b""
        assert time.monotonic() - started < IDLE_S + 3
    finally:
        for sock in idle:
            sock.close()


def test_past_the_connection_cap_with_every_one_busy_a_newcomer_gets_json_503(
    agent: AgentProcess,
) -> None:
    busy = [socket.create_connection(address(agent)) for _ in range(MAX_CONNECTIONS)]
    try:
        for sock in busy:  # each one a request whose body has not come yet
            sock.sendall(
                f"POST {PREDICT} HTTP/1.1\r\nHost: box\r\nContent-Type: image/jpeg\r\n"
                "Content-Length: 5000\r\n\r\n".encode()
            )
        time.sleep(0.2)
        with socket.create_connection(address(agent)) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: box\r\n\r\n")
            response = read_until_closed(sock, BODY_S)
        json_error(response, 503, "overloaded")
        assert b"\r\nretry-after: 1\r\n" in response.lower()
    finally:
        for sock in busy:
            sock.close()
    with agent.client() as http:
        assert_json_answer(http.get("/healthz"), 200)


def test_a_half_sent_request_head_gets_408_at_the_header_timeout(agent: AgentProcess) -> None:
    with socket.create_connection(address(agent)) as sock:
        started = time.monotonic()
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: box\r\n")
        for _ in range(3):  # a byte now and then, well inside the idle timeout (slow loris)
            time.sleep(IDLE_S / 3)
            with contextlib.suppress(OSError):
                sock.sendall(b"X")
        response = read_until_closed(sock, HEADER_S + 3)
        elapsed = time.monotonic() - started
    json_error(response, 408, "request_timeout")
    assert HEADER_S - 0.2 < elapsed < HEADER_S + 2


def _trickle(agent: AgentProcess, results: list[tuple[bytes, float]]) -> None:
    """A prediction whose body comes 100 bytes per 0.1 s (1 kB/s), far under the minimum."""
    with socket.create_connection(address(agent)) as sock:
        started = time.monotonic()
        sock.sendall(
            f"POST {PREDICT} HTTP/1.1\r\nHost: box\r\nContent-Type: image/jpeg\r\n"
            "Content-Length: 100000\r\n\r\n".encode()
        )
        sock.settimeout(0.1)
        answer = b""
        for _ in range(100):
            try:
                sock.sendall(b"\xff" * 100)
                answer += sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                break
            if answer:
                break
        answer += read_until_closed(sock, 2)
        results.append((answer, time.monotonic() - started))


def test_trickled_bodies_get_408_and_do_not_starve_predictions(agent: AgentProcess) -> None:
    results: list[tuple[bytes, float]] = []
    tricklers = [threading.Thread(target=_trickle, args=(agent, results)) for _ in range(8)]
    for thread in tricklers:
        thread.start()
    time.sleep(0.3)
    photo = jpeg(2)
    served_at = None
    with agent.client() as http:
        started = time.monotonic()
        while time.monotonic() - started < BODY_S + 4:
            response = http.post(PREDICT, content=photo, headers={"Content-Type": "image/jpeg"})
            assert_json_answer(response, 200, 503)
            if response.status_code == 200:
                served_at = time.monotonic() - started
                break
            time.sleep(0.1)
    for thread in tricklers:
        thread.join(15)
    assert served_at is not None and served_at < BODY_S + 2
    assert len(results) == 8
    timed_out = 0
    for answer, elapsed in results:
        assert elapsed < BODY_S + 3
        if answer.startswith(b"HTTP/1.1 503 "):  # shed when its headers arrived
            continue
        assert "too slowly" in str(json_error(answer, 408, "request_timeout")["message"])
        timed_out += 1
    assert timed_out >= 1


def test_an_oversized_header_gets_431(agent: AgentProcess) -> None:
    with socket.create_connection(address(agent)) as sock:
        sock.sendall(
            b"GET /healthz HTTP/1.1\r\nHost: box\r\nX-Big: " + b"a" * (MAX_HEADER_BYTES + 2000)
        )
        json_error(read_until_closed(sock, 5), 431, "headers_too_large")
    many = "".join(f"X-Filler-{i}: 1\r\n" for i in range(150))
    with socket.create_connection(address(agent)) as sock:
        sock.sendall(f"GET /healthz HTTP/1.1\r\nHost: box\r\n{many}\r\n".encode())
        json_error(read_until_closed(sock, 5), 431, "headers_too_large")


def _header_bomb(agent: AgentProcess, size: int, stop: threading.Event) -> int:
    """Send request heads of `size` bytes over and over until `stop`; how many were cut off."""
    chunk = b"a" * (1 << 20)
    cut = 0
    while not stop.is_set():
        with socket.create_connection(address(agent)) as sock:
            try:
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: box\r\nX-Bomb: ")
                for _ in range(size // len(chunk)):
                    sock.sendall(chunk)
            except OSError:
                cut += 1
    return cut


def _healthz_seconds(http: httpx.Client, count: int) -> list[float]:
    times = []
    for _ in range(count):
        started = time.perf_counter()
        assert http.get("/healthz").status_code == 200
        times.append(time.perf_counter() - started)
        time.sleep(0.01)
    return times


def test_header_bombs_are_cut_off_unbuffered_and_do_not_stall_health(agent: AgentProcess) -> None:
    server = psutil.Process(agent.process.pid)
    with agent.client() as http:
        baseline = _healthz_seconds(http, 50)
        rss_before = server.memory_info().rss
        stop, cut = threading.Event(), []
        bomber = threading.Thread(target=lambda: cut.append(_header_bomb(agent, 60 << 20, stop)))
        bomber.start()
        try:
            attacked = _healthz_seconds(http, 100)
        finally:
            stop.set()
            bomber.join(30)
        rss_after = server.memory_info().rss
    assert cut and cut[0] >= 1  # the agent closed the connection long before 60 MB
    ratio = statistics.median(attacked) / statistics.median(baseline)
    assert ratio < 5 or statistics.median(attacked) < 0.01, (ratio, statistics.median(baseline))
    assert rss_after - rss_before < 16 << 20


def test_health_answers_while_inference_is_saturated(agent: AgentProcess) -> None:
    photo = jpeg(3, (1200, 1600))
    stop = threading.Event()
    answers: list[httpx.Response] = []

    def hammer() -> None:
        with agent.client() as http:
            while not stop.is_set():
                answers.append(
                    http.post(PREDICT, content=photo, headers={"Content-Type": "image/jpeg"})
                )

    hammers = [threading.Thread(target=hammer) for _ in range(8)]
    idle = [socket.create_connection(address(agent)) for _ in range(40)]
    for thread in hammers:
        thread.start()
    try:
        time.sleep(0.5)
        with agent.client() as http:
            for _ in range(10):
                assert_json_answer(http.get("/healthz"), 200)
                assert_json_answer(http.get("/readyz"), 200)
                time.sleep(0.1)
    finally:
        stop.set()
        for thread in hammers:
            thread.join(30)
        for sock in idle:
            sock.close()
    assert answers
    for response in answers:
        assert_json_answer(response, 200, 503)
    assert any(r.status_code == 503 for r in answers), "the load did not saturate inference"
