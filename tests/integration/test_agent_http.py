"""The agent end to end: a real `edge-agent serve` process (uvicorn) on a free port.

Covers the three input forms, every kind of bad input, overload, draining on SIGTERM, readiness
gated on the golden self-test, bundle installs (CLI and admin route) that refuse tampering while
the previous version keeps serving, SIGHUP reloads and TLS.
"""

from __future__ import annotations

import base64
import datetime as dt
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import cv2
import httpx
import numpy as np
import psutil
import pytest

from edge_agent.device.store import BundleStore
from edge_bundle.signing import TrustStore
from tests.agent_support import BuiltBundle, Keys, build_bundle, jpeg, make_keys, run_agent

TOKEN = "test-admin-token-0123456789"


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    return make_keys(tmp_path / "keys")


@pytest.fixture
def bundle(tmp_path: Path, keys: Keys) -> BuiltBundle:
    return build_bundle(tmp_path / "dist", keys)


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edge_agent.app.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def install(state: Path, bundle: Path, keys: Keys) -> subprocess.CompletedProcess[str]:
    return cli("install", str(bundle), "--state-dir", str(state), "--trusted-key", str(keys.public))


@pytest.fixture
def state(tmp_path: Path, bundle: BuiltBundle, keys: Keys) -> Path:
    state = tmp_path / "state"
    result = install(state, bundle.path, keys)
    assert result.returncode == 0, result.stderr
    return state


def png_bomb(width: int = 30000, height: int = 30000) -> bytes:
    """A valid PNG header declaring a huge image, with a tiny (incomplete) IDAT."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 100_000)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )


def test_predict_in_all_three_forms(state: Path, keys: Keys) -> None:
    photo = jpeg(1, (1200, 1600))
    with run_agent(state, "--trusted-key", str(keys.public)) as agent, agent.client() as http:
        agent.wait_ready()
        url = "/v1/models/defects/predict"
        raw = http.post(url, content=photo, headers={"Content-Type": "image/jpeg"})
        multipart = http.post(url, files={"image": ("part.jpg", photo, "image/jpeg")})
        encoded = http.post(url, json={"image": base64.b64encode(photo).decode()})
        answers = [raw.json(), multipart.json(), encoded.json()]
        assert [r.status_code for r in (raw, multipart, encoded)] == [200, 200, 200]
        for answer in answers:
            assert answer["label"] in ("ok", "scratch", "dent")
            assert answer["top_k"][0] == {"label": answer["label"], "score": answer["score"]}
            assert answer["model"]["name"] == "defects" and answer["model"]["version"] == 1
            assert len(answer["model"]["bundle_sha256"]) == 64
            assert set(answer["timings_ms"]) == {
                "receive",
                "decode",
                "preprocess",
                "infer",
                "postprocess",
            }
            assert answer["image"] == {
                "format": "jpeg",
                "width": 1600,
                "height": 1200,
                "decoded_at_reduction": 8,
            }
        assert answers[0]["top_k"] == answers[1]["top_k"] == answers[2]["top_k"]
        assert answers[0]["knowledge"]["title"]
        assert raw.headers["X-Request-ID"] == answers[0]["request_id"]
        assert len({a["request_id"] for a in answers}) == 3


def test_bad_inputs_get_clear_4xx_and_the_agent_stays_up(state: Path, keys: Keys) -> None:
    photo = jpeg(2, (600, 800))
    url = "/v1/models/defects/predict"
    cases = {
        "truncated jpeg": (photo[: len(photo) // 2], "image/jpeg", 422, "ends before"),
        "zero bytes": (b"", "image/jpeg", 422, "empty"),
        "pdf named .jpg": (b"%PDF-1.7\n" + b"x" * 500, "image/jpeg", 415, "PDF"),
        "svg named .jpg": (
            b'<svg xmlns="http://www.w3.org/2000/svg"/>',
            "image/jpeg",
            415,
            "JPEG, PNG, WebP or BMP",
        ),
        "30000x30000 png": (png_bomb(), "image/png", 413, "pixels"),
    }
    with (
        run_agent(
            state,
            "--trusted-key",
            str(keys.public),
            env={"EDGE_AGENT_MAX_BODY_BYTES": str(4 * 1024 * 1024)},
        ) as agent,
        agent.client() as http,
    ):
        agent.wait_ready()
        process = psutil.Process(agent.process.pid)
        for name, (data, content_type, status, words) in cases.items():
            for form in ("raw", "multipart"):
                if form == "raw":
                    response = http.post(url, content=data, headers={"Content-Type": content_type})
                else:
                    response = http.post(url, files={"image": ("photo.jpg", data, "image/jpeg")})
                assert response.status_code == status, (name, form, response.text)
                error = response.json()["error"]
                assert words in error["message"], (name, error)
                assert error["request_id"] == response.headers["X-Request-ID"]
        oversized = http.post(
            url, content=b"\xff" * (5 * 1024 * 1024), headers={"Content-Type": "image/jpeg"}
        )
        assert oversized.status_code == 413 and "limit" in oversized.json()["error"]["message"]
        unknown = http.post(
            "/v1/models/nope/predict", content=photo, headers={"Content-Type": "image/jpeg"}
        )
        assert unknown.status_code == 404 and "defects" in unknown.json()["error"]["message"]
        # Repeated bad input does not grow memory without bound, and the agent still answers.
        rss_before = process.memory_info().rss
        for _ in range(20):
            http.post(url, content=png_bomb(), headers={"Content-Type": "image/png"})
            http.post(url, content=photo[:-2000], headers={"Content-Type": "image/jpeg"})
        assert process.memory_info().rss - rss_before < 64 * 1024 * 1024
        assert (
            http.post(url, content=photo, headers={"Content-Type": "image/jpeg"}).status_code == 200
        )
        assert http.get("/healthz").status_code == 200


def _hold_slot(
    url: str, started: threading.Event, release: threading.Event, result: dict[str, object]
) -> None:
    """A prediction whose body arrives slowly: it holds an admission slot until `release`."""
    photo = jpeg(3, (240, 320))

    def body():  # type: ignore[no-untyped-def]
        yield photo[:100]
        started.set()
        release.wait(30)
        yield photo[100:]

    try:
        with httpx.Client(timeout=60) as client:
            response = client.post(url, content=body(), headers={"Content-Type": "image/jpeg"})
    except httpx.TransportError as exc:  # the server went away (the stuck-client test)
        result["error"] = exc
        return
    result["status"] = response.status_code
    result["body"] = response.text


def _large_png(size: tuple[int, int] = (3000, 4000)) -> bytes:
    """A 12-megapixel PNG of a few KB: PNG has no reduced decode, so it keeps a slot ~0.1 s+."""
    image = np.full((*size, 3), 200, np.uint8)
    cv2.circle(image, (size[1] // 2, size[0] // 2), size[0] // 3, (30, 90, 160), -1)
    ok, data = cv2.imencode(".png", image)
    assert ok
    return data.tobytes()


def test_overload_answers_503_fast_with_retry_after(state: Path, keys: Keys) -> None:
    # A slot is held by real work now (a slow upload holds none, see the next test): a burst of
    # large photos at one slot, where the photos beyond the first are refused without waiting.
    with run_agent(state, "--trusted-key", str(keys.public), "--max-in-flight", "1") as agent:
        agent.wait_ready()
        url = f"{agent.url}/v1/models/defects/predict"
        photo, answers, lock = _large_png(), [], threading.Lock()
        go = threading.Barrier(6)

        def post() -> None:
            with httpx.Client(timeout=30) as client:
                go.wait()
                begun = time.perf_counter()
                response = client.post(url, content=photo, headers={"Content-Type": "image/png"})
                with lock:
                    answers.append((response, time.perf_counter() - begun))

        threads = [threading.Thread(target=post) for _ in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        refused = [(r, elapsed) for r, elapsed in answers if r.status_code == 503]
        assert len(answers) == 6
        assert {r.status_code for r, _ in answers} == {200, 503}, [r.text for r, _ in answers]
        for response, elapsed in refused:
            assert response.headers["Retry-After"] == "1"
            assert response.json()["error"]["code"] == "overloaded"
            assert elapsed < 1.0
        metrics = httpx.get(f"{agent.url}/metrics").text
        assert 'outcome="overloaded"' in metrics


def test_slow_uploads_hold_no_inference_slot(state: Path, keys: Keys) -> None:
    # #15: eight connections trickling their bodies held every slot (max_in_flight 8), and every
    # real prediction got 503. A prediction takes its slot once its photo is in.
    with run_agent(state, "--trusted-key", str(keys.public), "--max-in-flight", "8") as agent:
        agent.wait_ready()
        url = f"{agent.url}/v1/models/defects/predict"
        release = threading.Event()
        holders = []
        for _ in range(8):
            started, result = threading.Event(), {}
            thread = threading.Thread(target=_hold_slot, args=(url, started, release, result))
            thread.start()
            assert started.wait(10)
            holders.append((thread, result))
        time.sleep(0.3)  # every slow request has arrived and is reading its body
        with httpx.Client(timeout=10) as client:
            statuses = [
                client.post(url, content=jpeg(i), headers={"Content-Type": "image/jpeg"})
                for i in range(5)
            ]
        release.set()
        for thread, _ in holders:
            thread.join(30)
        assert [r.status_code for r in statuses] == [200] * 5, [r.text for r in statuses]
        # Their bodies all end at once: the queueing-delay rule may refuse some at that moment.
        finished = [(result.get("status"), str(result.get("body"))) for _, result in holders]
        assert any(status == 200 for status, _ in finished), finished
        assert all(s == 200 or (s == 503 and '"overloaded"' in b) for s, b in finished), finished


def test_sigterm_drains_then_exits(state: Path, keys: Keys) -> None:
    env = {"EDGE_AGENT_DRAIN_GRACE_S": "1.5", "EDGE_AGENT_SHUTDOWN_TIMEOUT_S": "8"}
    with run_agent(state, "--trusted-key", str(keys.public), env=env) as agent:
        agent.wait_ready()
        url = f"{agent.url}/v1/models/defects/predict"
        started, release, result = threading.Event(), threading.Event(), {}
        holder = threading.Thread(target=_hold_slot, args=(url, started, release, result))
        holder.start()
        assert started.wait(10)
        time.sleep(0.3)
        agent.process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        time.sleep(0.2)
        ready = httpx.get(f"{agent.url}/readyz", timeout=5)
        assert ready.status_code == 503 and "shutting down" in ready.json()["reasons"]
        refused = httpx.post(
            url, content=jpeg(5), headers={"Content-Type": "image/jpeg"}, timeout=5
        )
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "shutting_down"
        assert refused.headers["Retry-After"]
        release.set()  # the in-flight prediction finishes and is answered
        holder.join(30)
        assert result["status"] == 200, result
        agent.process.wait(15)
        assert time.monotonic() - signalled < 8 + 1
        assert agent.process.returncode == 0, agent.log()


def test_sigterm_exits_within_the_timeout_even_with_a_stuck_client(state: Path, keys: Keys) -> None:
    env = {"EDGE_AGENT_DRAIN_GRACE_S": "0.5", "EDGE_AGENT_SHUTDOWN_TIMEOUT_S": "4"}
    with run_agent(state, "--trusted-key", str(keys.public), env=env) as agent:
        agent.wait_ready()
        url = f"{agent.url}/v1/models/defects/predict"
        started, release, result = threading.Event(), threading.Event(), {}
        holder = threading.Thread(
            target=_hold_slot, args=(url, started, release, result), daemon=True
        )
        holder.start()
        assert started.wait(10)
        time.sleep(0.3)
        signalled = time.monotonic()
        agent.process.send_signal(signal.SIGTERM)
        agent.process.wait(15)
        assert time.monotonic() - signalled < 4 + 1.5, agent.log()
        release.set()


def test_not_ready_until_the_golden_self_test_passes(tmp_path: Path, keys: Keys) -> None:
    # Put a bundle whose golden expectations are wrong straight into the store (bypassing the
    # install path, which would refuse it): the agent must load it, fail the test, stay unready.
    broken = build_bundle(tmp_path / "broken", keys, golden_offset=0.05)
    state = tmp_path / "state"
    store = BundleStore(state / "store", TrustStore.from_files([keys.public]))
    store.stage(broken.path)
    store.activate("defects", 1)
    with run_agent(state, "--trusted-key", str(keys.public)) as agent:
        deadline = time.monotonic() + 30
        while True:
            ready = httpx.get(f"{agent.url}/readyz", timeout=5)
            reasons = " ".join(ready.json()["reasons"])
            if "loading" not in reasons or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert ready.status_code == 503
        assert "golden self-test" in reasons
        predict = httpx.post(
            f"{agent.url}/v1/models/defects/predict",
            content=jpeg(6),
            headers={"Content-Type": "image/jpeg"},
        )
        assert predict.status_code == 503 and predict.json()["error"]["code"] == "not_ready"


def test_tampered_bundle_refused_and_previous_keeps_serving(
    tmp_path: Path, state: Path, keys: Keys
) -> None:
    v2 = build_bundle(tmp_path / "v2", keys, version=2, seed=9)
    tampered = tmp_path / "defects-2.bundle"
    data = bytearray(v2.path.read_bytes())
    position = bytes(data).find(b"pytorch") if b"pytorch" in data else len(data) // 3
    data[position] ^= 0x01
    tampered.write_bytes(bytes(data))
    other_keys = make_keys(tmp_path / "other", "other")
    foreign = build_bundle(tmp_path / "foreign", other_keys, version=3)
    env = {"EDGE_AGENT_ADMIN_TOKEN": TOKEN}
    photo = jpeg(7)
    with (
        run_agent(state, "--trusted-key", str(keys.public), env=env) as agent,
        agent.client() as http,
    ):
        agent.wait_ready()
        url = "/v1/models/defects/predict"
        before = http.post(url, content=photo, headers={"Content-Type": "image/jpeg"}).json()
        refused = install(state, tampered, keys)
        assert refused.returncode == 4 and "refused" in refused.stderr
        auth = {"Authorization": f"Bearer {TOKEN}"}
        for bad in (tampered, foreign.path):
            response = http.post("/v1/admin/bundles", content=bad.read_bytes(), headers=auth)
            assert response.status_code == 422, response.text
            assert response.json()["error"]["code"] == "bundle_rejected"
        assert (
            "not among the trusted" in response.json()["error"]["message"]
            or "trusted" in response.json()["error"]["message"]
        )
        unauthorised = http.post("/v1/admin/bundles", content=v2.path.read_bytes())
        assert unauthorised.status_code == 401
        after = http.post(url, content=photo, headers={"Content-Type": "image/jpeg"}).json()
        assert after["model"] == before["model"] and after["top_k"] == before["top_k"]
        assert not list((state / "store" / "staging").iterdir())
        # A good version 2 through the admin route swaps atomically.
        installed = http.post("/v1/admin/bundles", content=v2.path.read_bytes(), headers=auth)
        assert installed.status_code == 201, installed.text
        assert installed.json()["selftest"]["passed"] is True
        swapped = http.post(url, content=photo, headers={"Content-Type": "image/jpeg"}).json()
        assert swapped["model"]["version"] == 2


def test_sighup_loads_a_bundle_installed_by_the_cli(
    tmp_path: Path, state: Path, keys: Keys
) -> None:
    v2 = build_bundle(tmp_path / "v2", keys, version=2, seed=11)
    with run_agent(state, "--trusted-key", str(keys.public)) as agent:
        agent.wait_ready()
        assert install(state, v2.path, keys).returncode == 0
        agent.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            models = httpx.get(f"{agent.url}/v1/models").json()["models"]
            if models and models[0].get("version") == 2:
                break
            time.sleep(0.1)
        assert models[0]["version"] == 2 and models[0]["status"] == "ready"


def _self_signed(directory: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def test_tls(tmp_path: Path, state: Path, keys: Keys) -> None:
    import ssl

    cert, key = _self_signed(tmp_path)
    env = {"EDGE_AGENT_TLS_CERTFILE": str(cert), "EDGE_AGENT_TLS_KEYFILE": str(key)}
    with run_agent(state, "--trusted-key", str(keys.public), env=env, scheme="https") as agent:
        context = ssl.create_default_context(cafile=str(cert))
        url = agent.url.replace("127.0.0.1", "localhost")
        with httpx.Client(base_url=url, verify=context, timeout=30) as http:
            deadline = time.monotonic() + 30
            while http.get("/readyz").status_code != 200 and time.monotonic() < deadline:
                time.sleep(0.1)
            answer = http.post(
                "/v1/models/defects/predict",
                content=jpeg(8),
                headers={"Content-Type": "image/jpeg"},
            )
            assert answer.status_code == 200
        with pytest.raises(httpx.TransportError):
            httpx.get(agent.url.replace("https", "http") + "/healthz", timeout=5)
        with socket.create_connection(("127.0.0.1", int(agent.url.rsplit(":", 1)[1]))):
            pass
