"""The floor of bench/bench_agent.py's HTTP ratio: the agent's own classifier behind a bare ASGI
app, with none of the agent around it.

It serves the installed bundle under uvicorn as the agent does (h11, uvloop, the agent's
allocator thresholds), and for every request does only what classifying a photo over HTTP cannot
do without: read the whole body and join it, hand the photo to one inference thread (the
agent's lane makes the same single hop for a request that is alone), decode, prepare, infer and
postprocess there, and answer a small JSON. No routing, middleware, admission, metrics or
records. The agent over this peer is what the agent's own code costs a photo; this peer over the
in-process pipeline is what serving over HTTP costs it at all.

    python -m bench.classify_peer STATE_DIR PUBLIC_KEY PORT

It answers GET (any path) with `{}` once the model is loaded, and runs until SIGTERM or SIGINT.
"""

from __future__ import annotations

import asyncio
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench.bench_agent import TOP_K, in_process_settings, load_in_process
from bench.peers import read_body, serve
from edge_agent.engine.memory import map_large_blocks


def make_app(state: Path, public_key: Path) -> Any:
    settings = in_process_settings(state, public_key)
    classifier = load_in_process(settings)
    pool = ThreadPoolExecutor(1, thread_name_prefix="inference")

    def classify(data: bytes) -> dict[str, Any]:
        image = classifier.decode(
            data, max_pixels=settings.max_image_pixels, max_bytes=settings.max_body_bytes
        )
        scored = classifier.postprocess(classifier.infer(classifier.prepare(image)), TOP_K)
        return {"label": scored.label, "score": float(scored.score)}

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = await read_body(receive)
        answer: dict[str, Any] = {}
        if scope["method"] == "POST":
            loop = asyncio.get_running_loop()
            answer = await loop.run_in_executor(pool, classify, body)
        reply = json.dumps(answer).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(reply))]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": reply})

    return app


def main(argv: list[str]) -> int:
    state, public_key, port = Path(argv[0]), Path(argv[1]), int(argv[2])
    map_large_blocks()
    app = make_app(state, public_key)
    serve(app, port)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
