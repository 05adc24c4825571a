"""The test helper `run_agent` starts an agent again when the port it was given is taken before
the agent binds it (the kernel hands the same range to outgoing connections), instead of
failing whichever test was unlucky."""

from __future__ import annotations

import socket
from pathlib import Path

import httpx
import pytest

from tests import agent_support


def test_a_port_taken_before_the_agent_binds_it_is_replaced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        ports = iter([busy])
        real = agent_support.free_port
        monkeypatch.setattr(agent_support, "free_port", lambda: next(ports, None) or real())
        with agent_support.run_agent(tmp_path / "state") as agent:
            assert not agent.url.endswith(f":{busy}")
            assert httpx.get(f"{agent.url}/healthz", timeout=5).status_code == 200
    assert "address already in use" in (tmp_path / f"agent-{busy}.log").read_text()
