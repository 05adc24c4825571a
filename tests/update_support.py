"""Helpers for the updater's tests: a local HTTP file server with range requests and injectable
faults, special models (NaN outside the golden set, slow), and signed release notices."""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edge_bundle.release import ReleaseNotice, Rollout, Target, encode_notice
from edge_bundle.signing import KeyRole, SigningKey, write_key_files
from tests.agent_support import LABELS, SIDE


@dataclass
class ServerLog:
    ranges: list[str | None] = field(default_factory=list)
    cut_after: int | None = None  # close the connection after this many bytes, once


class _Handler(http.server.BaseHTTPRequestHandler):
    directory: Path
    log_state: ServerLog

    def do_GET(self) -> None:
        path = self.directory / self.path.lstrip("/")
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        etag = '"' + hashlib.sha256(data).hexdigest()[:16] + '"'
        wanted = self.headers.get("Range")
        self.log_state.ranges.append(wanted)
        start = 0
        if wanted and (self.headers.get("If-Range") in (None, etag)):
            start = int(wanted.removeprefix("bytes=").split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.send_header("ETag", etag)
        self.end_headers()
        cut = self.log_state.cut_after
        if cut is not None:
            self.log_state.cut_after = None
            self.wfile.write(body[:cut])
            self.wfile.flush()
            self.connection.shutdown(2)
            return
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@contextlib.contextmanager
def file_server(directory: Path) -> Iterator[tuple[str, ServerLog]]:
    """Serve `directory` on a free port; yields the base URL and the request log."""
    state = ServerLog()
    handler = type("Handler", (_Handler,), {"directory": directory, "log_state": state})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", state
    finally:
        server.shutdown()
        server.server_close()


def release_key(directory: Path, name: str = "release") -> tuple[SigningKey, Path]:
    key = SigningKey.generate(KeyRole.RELEASE)
    _, public = write_key_files(key, directory, name)
    return key, public


def signed_notice(
    key: SigningKey,
    bundle: Path,
    url: str | None,
    *,
    sequence: int,
    device: str | None = "plant/box1",
    group: str | None = None,
    name: str = "defects",
    version: int = 2,
    expires_in: timedelta = timedelta(days=1),
    issued_at: datetime | None = None,
    rollback: bool = False,
    sha256: str | None = None,
    size: int | None = None,
    rollout: Rollout | None = None,
    extensions: dict[str, Any] | None = None,
) -> bytes:
    """A signed release notice for `bundle`; with a `rollout` or `extensions`, schema version 2."""
    data = bundle.read_bytes()
    issued = issued_at or datetime.now(UTC) - timedelta(seconds=5)
    notice = ReleaseNotice(
        name=name,
        version=version,
        bundle_sha256=sha256 or hashlib.sha256(data).hexdigest(),
        bundle_size=size or len(data),
        url=url,
        target=Target(group=group) if group else Target(device=device),
        sequence=sequence,
        issued_at=issued,
        expires_at=issued + expires_in,
        rollback=rollback,
        schema_version=1 if rollout is None and extensions is None else 2,
        rollout=rollout,
        extensions=extensions,
    )
    return encode_notice(notice, key)


def _classifier_graph(
    extra_nodes: list[onnx.NodeProto], extra_init: list[onnx.TensorProto], output: str, seed: int
) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    w1 = (rng.standard_normal((8, 3, 3, 3)) * 0.4).astype(np.float32)
    w2 = (rng.standard_normal((len(LABELS), 8)) * 0.8).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["h"], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Gemm", ["f", "w2"], ["logits"], transB=1),
        *extra_nodes,
    ]
    graph = helper.make_graph(
        nodes,
        "special",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, SIDE, SIDE])],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, ["N", len(LABELS)])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2"), *extra_init],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def nan_when_bright(path: Path, seed: int) -> Path:
    """Outputs NaN when the image is nearly white (mean input > 0.9); golden photos are not."""
    nodes = [
        helper.make_node("ReduceMean", ["x"], ["m"], keepdims=0),
        helper.make_node("Greater", ["m", "threshold"], ["bright"]),
        helper.make_node("Where", ["bright", "nans", "logits"], ["out"]),
    ]
    init = [
        numpy_helper.from_array(np.array(0.9, dtype=np.float32), "threshold"),
        numpy_helper.from_array(np.full((1, len(LABELS)), np.nan, dtype=np.float32), "nans"),
    ]
    onnx.save(_classifier_graph(nodes, init, "out", seed), str(path))
    return path


def slow_model(path: Path, seed: int, matmuls: int = 12) -> Path:
    """The same answers as the plain model, plus a chain of input-dependent matmuls (slow)."""
    rng = np.random.default_rng(seed + 100)
    weight = (rng.standard_normal((384, 384)) * 0.01).astype(np.float32)
    nodes = [
        helper.make_node("ReduceMean", ["x"], ["m"], keepdims=0),
        helper.make_node("Expand", ["m", "shape"], ["a0"]),
    ]
    for index in range(matmuls):
        nodes.append(helper.make_node("MatMul", [f"a{index}", "w"], [f"a{index + 1}"]))
    nodes += [
        helper.make_node("ReduceMean", [f"a{matmuls}"], ["s"], keepdims=0),
        helper.make_node("Mul", ["s", "zero"], ["z"]),
        helper.make_node("Add", ["logits", "z"], ["out"]),
    ]
    init = [
        numpy_helper.from_array(np.array([384, 384], dtype=np.int64), "shape"),
        numpy_helper.from_array(weight, "w"),
        numpy_helper.from_array(np.array(0.0, dtype=np.float32), "zero"),
    ]
    onnx.save(_classifier_graph(nodes, init, "out", seed), str(path))
    return path


def plain_model(path: Path, seed: int) -> Path:
    onnx.save(_classifier_graph([], [], "logits", seed), str(path))
    return path


def always_nan_bytes(seed: int = 3) -> bytes:
    """An ONNX model that loads fine and outputs NaN for every input."""
    nodes = [helper.make_node("Add", ["logits", "nan"], ["out"])]
    init = [numpy_helper.from_array(np.array(np.nan, dtype=np.float32), "nan")]
    return _classifier_graph(nodes, init, "out", seed).SerializeToString()
