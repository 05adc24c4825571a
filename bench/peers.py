"""What the bench's model peers (`classify_peer`, `generate_peer`) share: an ASGI request's body
read and joined, and uvicorn run as the agent runs it (h11, uvloop, no lifespan, no access log)."""

from __future__ import annotations

from typing import Any

import uvicorn


async def read_body(receive: Any) -> bytes:
    """The request's whole body, read chunk by chunk as the server hands it over, then joined."""
    chunks, more = [], True
    while more:
        message = await receive()
        chunks.append(message.get("body", b""))
        more = message.get("more_body", False)
    return b"".join(chunks)


def serve(app: Any, port: int) -> None:
    """`app` on 127.0.0.1:`port` until SIGTERM or SIGINT."""
    uvicorn.run(
        app, host="127.0.0.1", port=port, http="h11", loop="uvloop", lifespan="off",
        log_level="warning", access_log=False,
    )  # fmt: skip
