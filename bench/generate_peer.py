"""The floor of bench/bench_llm.py's tokens/s ratio: the same GGUF streamed over HTTP by a bare
ASGI app, with none of the agent around it.

It serves under uvicorn as the agent does (h11, uvloop) and runs llama.cpp as the agent does: one
thread for every generation, at the agent's `generation_nice` (its OpenMP workers inherit it),
libgomp's spin count at the agent's `OPENMP_SPIN_COUNT`, the state emptied after each answer.
Those two settings are what keeps a classification's latency while a generation streams (its own
target in bench_llm), so the floor keeps them too. For every request it does only what streaming
tokens over HTTP cannot do without: read the JSON body, hand the request to the llm thread, take
each token back on the event loop and write it as a server-sent event in the agent's format
(`{"text": ...}`, then `{"done": true, ...}` with the usage). No routing, middleware, admission,
cancellation, pauses for classifications, metrics or records. The agent over this peer is what
the agent's own code costs a stream; this peer over llama-cpp-python in a plain process is what
streaming over HTTP on the same cores costs it at all.

    python -m bench.generate_peer GGUF THREADS CONTEXT PORT

It answers GET (any path) with `{}` once the model is loaded, and runs until SIGTERM or SIGINT.
"""

from __future__ import annotations

import asyncio
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench.peers import read_body, serve
from edge_agent.engine.lane import lower_priority
from edge_agent.runtimes.llama import tune_openmp
from edge_agent.settings import AgentSettings

_END = object()


def make_app(gguf: Path, threads: int, context: int) -> Any:
    tune_openmp()  # the agent's spin count, set before llama_cpp is first imported
    from llama_cpp import Llama

    from edge_bundle.llama_state import clear_state

    nice = AgentSettings.model_fields["generation_nice"].default
    pool = ThreadPoolExecutor(1, thread_name_prefix="llm", initializer=lower_priority(nice))

    def load() -> Any:  # on the llm thread, which keeps llama.cpp's workers (as the agent's)
        return Llama(
            model_path=str(gguf), n_ctx=context, n_threads=threads, n_threads_batch=threads,
            seed=0, verbose=False,
        )  # fmt: skip

    llama = pool.submit(load).result()

    def generate(ask: dict[str, Any], put: Any) -> None:
        tokens, finish = 0, None
        try:
            for piece in llama.create_completion(
                ask["prompt"], max_tokens=int(ask["max_tokens"]), temperature=0.0,
                repeat_penalty=1.0, stream=True,
            ):  # fmt: skip
                tokens += 1
                choice = piece["choices"][0]
                finish = choice.get("finish_reason") or finish
                if choice["text"]:
                    put(choice["text"])
            usage = {"completion_tokens": tokens}
            put({"done": True, "finish_reason": finish or "length", "usage": usage})
        finally:
            put(_END)
            clear_state(llama)

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = await read_body(receive)
        if scope["method"] != "POST":
            headers = [(b"content-type", b"application/json"), (b"content-length", b"2")]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": b"{}"})
            return
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[object] = asyncio.Queue()

        def put(item: object) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        done = loop.run_in_executor(pool, generate, json.loads(body), put)
        headers = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        while (item := await queue.get()) is not _END:
            event = {"text": item} if isinstance(item, str) else item
            line = f"data: {json.dumps(event, separators=(',', ':'))}\n\n".encode()
            await send({"type": "http.response.body", "body": line, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
        await done

    return app


def main(argv: list[str]) -> int:
    gguf, threads, context, port = Path(argv[0]), int(argv[1]), int(argv[2]), int(argv[3])
    app = make_app(gguf, threads, context)
    serve(app, port)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
