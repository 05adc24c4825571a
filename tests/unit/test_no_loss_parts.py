"""The parts under "no answer lost" (#14), one at a time: the outbox's memory of answered
messages (one transaction with the answers, pruned, upgraded from the old file), the disk watch,
the model lifecycle's settled/wait, and the fault plan's ranges and delays."""

from __future__ import annotations

import asyncio
import errno
import sqlite3
import time
from pathlib import Path

import pytest

from edge_agent import faults
from edge_agent.device.models import Models
from edge_agent.disk import DiskWatch, is_disk_full
from edge_agent.engine.types import ModelState
from edge_agent.errors import DiskFullError
from edge_agent.mqtt.outbox import Answered, Draft, Outbox, OutboxDiskFullError
from tests.agent_support import Keys, build_bundle, make_keys
from tests.unit.agent_fixtures import agent_settings, clean_environment
from tests.unit.device_fakes import close_device, make_device


def outbox(path: Path, **options: float) -> Outbox:
    return Outbox(path, max_bytes=1 << 20, max_messages=1000, **options)  # type: ignore[arg-type]


def draft(text: str, message_id: str) -> Draft:
    return Draft("replies/a", text.encode(), "reply", message_id, {"correlation_data": "01"})


def test_answers_and_their_identity_are_stored_together(tmp_path: Path) -> None:
    with outbox(tmp_path / "outbox.sqlite3") as box:
        box.put_many([draft("one", "m1"), draft("two", "m2")], answered=Answered("k", "d1"))
        recalled = box.recall("k")
        assert recalled is not None and recalled.digest == "d1"
        assert [(d.payload, d.message_id, d.properties) for d in recalled.answers] == [
            (b"one", "m1", {"correlation_data": "01"}),
            (b"two", "m2", {"correlation_data": "01"}),
        ]
        assert box.holds("m1") and not box.holds("nope")
        assert box.recall("other") is None
        # All or nothing: a failing put remembers nothing.
        with pytest.raises(ValueError, match="unknown outbox kind"):
            box.put_many(
                [draft("x", "m3"), Draft("t", b"y", "bogus", "m4")],  # type: ignore[arg-type]
                answered=Answered("k2", "d"),
            )
        assert box.recall("k2") is None and not box.holds("m3")


def test_answered_messages_expire_and_are_bounded(tmp_path: Path) -> None:
    with outbox(tmp_path / "outbox.sqlite3", answered_window_s=0.2, answered_max=100) as box:
        box.put_many([draft("old", "m0")], answered=Answered("old", "d"))
        time.sleep(0.3)
        assert box.recall("old") is None  # past the window
        for number in range(300):
            box.put_many([], answered=Answered(f"k{number}", "d"))
        rows = box._live().execute("SELECT COUNT(*) FROM answered")
        assert rows.fetchone()[0] <= 100 + 64  # pruned every 64 puts


def test_pruning_keeps_the_newest_identities_and_memory_matches_the_file(tmp_path: Path) -> None:
    with outbox(tmp_path / "outbox.sqlite3", answered_window_s=3600, answered_max=50) as box:
        for number in range(200):
            box.put_many([], answered=Answered(f"k{number:03d}", "d"))
            stored = {row[0] for row in box._live().execute("SELECT key FROM answered")}
            assert box._answered_keys == stored  # `might_have` answers from memory
        # The last prune (at put 193) kept the newest 50; the 7 puts since are kept too.
        assert stored == {f"k{number:03d}" for number in range(143, 200)}
        assert box.recall("k199") is not None and box.recall("k100") is None


def test_an_outbox_of_the_previous_schema_is_upgraded(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"
    with outbox(path) as box:
        box.put("t/1", b"kept", kind="result")
    conn = sqlite3.connect(path)
    conn.execute("DROP TABLE answered")
    conn.execute("PRAGMA user_version = 1")
    conn.commit()
    conn.close()
    with outbox(path) as box:
        assert [m.payload for m in box.pending()] == [b"kept"]
        box.put_many([draft("new", "m9")], answered=Answered("k", "d"))
        assert box.recall("k") is not None


def test_a_full_disk_is_its_own_outbox_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(faults, "_PLAN", faults._parse("outbox.put=enospc@2-3"))
    monkeypatch.setattr(faults, "_SEEN", faults.Counter())
    with outbox(tmp_path / "outbox.sqlite3") as box:
        box.put("t", b"1", kind="result")
        for _ in range(2):
            with pytest.raises(OutboxDiskFullError, match="disk is full") as info:
                box.put("t", b"2", kind="result")
            assert is_disk_full(info.value)
        box.put("t", b"3", kind="result")
        assert [m.payload for m in box.pending()] == [b"1", b"3"]


def test_the_fault_plan_reads_ranges_and_delays() -> None:
    plan = faults._parse("a=kill,b=enospc@2,c=eio@3-5,d=delay:0.5")
    assert plan == {
        "a": ("kill", 0.0, 1, 1),
        "b": ("enospc", 0.0, 2, 2),
        "c": ("eio", 0.0, 3, 5),
        "d": ("delay", 0.5, 1, 1),
    }
    with pytest.raises(ValueError, match="unknown action"):
        faults._parse("a=explode")


def test_the_disk_watch_reports_full_until_space_comes_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    free = {"bytes": 100 << 20}
    watch = DiskWatch(tmp_path, reserve_bytes=4 << 20)
    monkeypatch.setattr(watch, "free_bytes", lambda: free["bytes"])
    assert not watch.full()
    free["bytes"] = 1 << 20
    assert watch.full()  # under the reserve
    free["bytes"] = 10 << 20
    assert not watch.full()
    with pytest.raises(DiskFullError, match="disk of the agent's state directory is full"):
        watch.raise_if_full(OSError(errno.ENOSPC, "No space left on device"), "store a thing")
    assert watch.full() and "disk_full" in watch.reason()
    free["bytes"] += 2 << 20
    assert watch.full()  # not yet a reserve's worth more than when the write failed
    free["bytes"] += 4 << 20
    assert not watch.full()
    watch.raise_if_full(OSError(errno.EACCES, "Permission denied"), "store a thing")  # not full
    assert is_disk_full(sqlite3.OperationalError("database or disk is full")) is False
    wrapped = RuntimeError("outer")
    wrapped.__cause__ = OSError(errno.EDQUOT, "Disk quota exceeded")
    assert is_disk_full(wrapped)


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    return make_keys(tmp_path / "keys")


def test_a_model_settles_when_it_serves_or_is_known_not_to(
    tmp_path: Path, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    clean_environment(monkeypatch)
    settings = agent_settings(tmp_path / "state", keys)
    device = make_device(settings)
    models: Models = device.models

    async def scenario() -> None:
        assert models.loading and not models.settled("defects")  # may still come
        assert not await models.wait_settled("defects", 0.05)
        models.core.set_model("defects", ModelState("loading", "loading version 1"))
        waiter = asyncio.create_task(models.wait_settled("defects", 5))
        await models.install(build_bundle(tmp_path / "dist", keys).path)
        assert await waiter  # woken by the swap, not by the timeout
        assert models.settled("defects") and not models.settled("ghost")
        models.finish_loading()
        assert models.settled("ghost")  # not installed, and loading is over
        models.core.set_model("broken", ModelState("failed", "self-test failed"))
        assert models.settled("broken")

    try:
        asyncio.run(scenario())
    finally:
        close_device(device)


def test_loading_shows_not_ready_rather_than_unknown(
    tmp_path: Path, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    clean_environment(monkeypatch)
    settings = agent_settings(tmp_path / "state", keys)
    device = make_device(settings)
    seen: list[str] = []

    def slow_prepare(name: str, version: int) -> object:
        seen.append(device.models.core.models[name].status)
        raise RuntimeError("stop here")

    async def scenario() -> None:
        await device.install(build_bundle(tmp_path / "dist", keys).path)
        device.models.core.remove_model("defects")  # as after a restart: installed, not served
        monkeypatch.setattr(device.models, "_prepare_installed", slow_prepare)
        await device.models.load_active()

    try:
        asyncio.run(scenario())
    finally:
        close_device(device)
    assert seen == ["loading"]
    assert device.models.core.models["defects"].status == "failed"
