"""edge_agent.mqtt.outbox.Outbox: arrival order, ack, pagination, durability across reopen and
SIGKILL, the bounding/drop policy, oversized messages, corrupt files, concurrent writers."""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import edge_agent.mqtt.outbox as outbox_module
from edge_agent import faults
from edge_agent.mqtt.outbox import (
    Answered,
    Draft,
    Kind,
    Outbox,
    OutboxError,
    OutboxFullError,
)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "outbox.db"


@pytest.fixture
def outbox(path: Path) -> Iterator[Outbox]:
    with Outbox(path, max_bytes=1_000_000, max_messages=1000) as box:
        yield box


def test_pending_returns_every_field_in_put_order(outbox: Outbox) -> None:
    kinds: list[Kind] = ["result", "telemetry", "reply", "feedback", "update"]
    props = {"correlation_data": "ab01", "user_properties": [["k", "v"]]}
    for i, kind in enumerate(kinds):
        outbox.put(
            f"t/{i}", f"p{i}".encode(), kind=kind, qos=i % 3, retain=i == 2, properties=props
        )
    pending = outbox.pending()
    assert [m.topic for m in pending] == [f"t/{i}" for i in range(5)]
    assert [m.kind for m in pending] == kinds
    assert [m.row_id for m in pending] == sorted(m.row_id for m in pending)
    third = pending[2]
    assert (third.payload, third.qos, third.retain, third.properties) == (b"p2", 2, True, props)
    assert third.size == len(b"p2") + len(b"t/2") + len(
        b'{"correlation_data":"ab01","user_properties":[["k","v"]]}'
    )


def test_message_ids_default_to_distinct_uuid_hex_and_can_be_given(outbox: Outbox) -> None:
    first = outbox.put("t", b"x", kind="result").message
    second = outbox.put("t", b"x", kind="result").message
    given = outbox.put("t", b"x", kind="result", message_id="req-42").message
    assert len(first.message_id) == 32 and int(first.message_id, 16) >= 0
    assert first.message_id != second.message_id
    assert given.message_id == "req-42"
    assert [m.message_id for m in outbox.pending()] == [
        first.message_id,
        second.message_id,
        "req-42",
    ]


def test_ack_deletes_the_row_and_is_idempotent(outbox: Outbox) -> None:
    kept = outbox.put("t/a", b"aaaa", kind="result").message
    acked = outbox.put("t/b", b"bb", kind="telemetry").message
    outbox.ack(acked.row_id)
    outbox.ack(acked.row_id)
    outbox.ack(9999)
    assert [m.row_id for m in outbox.pending()] == [kept.row_id]
    depth = outbox.depth()
    assert (depth["messages"], depth["bytes"]) == (1, kept.size)
    assert depth["by_kind"]["telemetry"] == 0 and depth["by_kind"]["result"] == 1


def test_ack_many_deletes_recent_and_older_rows_in_one_go(
    outbox: Outbox, path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows still in memory and rows only in the file, duplicates and unknown ids, over more
    than one DELETE statement: the right rows go, the totals follow, and a reopen agrees."""
    monkeypatch.setattr(outbox_module, "RECENT_MAX_MESSAGES", 4)  # the older rows: file only
    monkeypatch.setattr(outbox_module, "ACK_BATCH", 3)
    stored = [outbox.put(f"t/{i}", b"x" * i, kind="reply").message for i in range(10)]
    acked = [m.row_id for m in stored[::2]]  # 0, 2, 4 from the file; 6, 8 from memory
    outbox.ack_many([*acked, acked[0], 99999])
    kept = stored[1::2]
    assert [m.row_id for m in outbox.pending(limit=100)] == [m.row_id for m in kept]
    depth = outbox.depth()
    assert (depth["messages"], depth["bytes"]) == (5, sum(m.size for m in kept))
    outbox.ack_many([])
    outbox.close()
    with Outbox(path, max_bytes=1_000_000, max_messages=1000) as again:
        assert [m.row_id for m in again.pending(limit=100)] == [m.row_id for m in kept]
        assert again.depth()["bytes"] == sum(m.size for m in kept)


def test_every_commit_runs_in_the_synchronous_mode_it_needs(outbox: Outbox) -> None:
    """Replies and acks commit with NORMAL, everything else with FULL (fsynced); the mode is
    switched only when it changes, not twice around every reply."""
    conn = outbox._conn
    assert conn is not None
    statements: list[str] = []
    conn.set_trace_callback(statements.append)

    def committed_with() -> int:  # the mode of the last commit is still in effect after it
        return int(conn.execute("PRAGMA synchronous").fetchone()[0])

    normal, full = 1, 2
    first = outbox.put("t/r", b"1", kind="reply")
    assert committed_with() == normal
    outbox.put("t/r", b"2", kind="reply")
    outbox.ack(first.message.row_id)
    assert committed_with() == normal
    outbox.put("t/x", b"3", kind="result")
    assert committed_with() == full
    outbox.ack(first.message.row_id + 1)
    assert committed_with() == normal
    outbox.put("t/r", b"4", kind="reply", fsync=True)
    assert committed_with() == full
    switches = [s for s in statements if s.startswith("PRAGMA synchronous =")]
    assert switches == [
        "PRAGMA synchronous = NORMAL",
        "PRAGMA synchronous = FULL",
        "PRAGMA synchronous = NORMAL",
        "PRAGMA synchronous = FULL",
    ]


def test_pending_after_pages_through_the_rows(outbox: Outbox) -> None:
    ids = [outbox.put("t", str(i).encode(), kind="result").message.row_id for i in range(10)]
    pages: list[list[int]] = []
    cursor = 0
    while page := outbox.pending(after_row_id=cursor, limit=4):
        pages.append([m.row_id for m in page])
        cursor = page[-1].row_id
    assert pages == [ids[0:4], ids[4:8], ids[8:10]]


def test_row_ids_are_not_reused_after_the_outbox_empties(path: Path) -> None:
    with Outbox(path, max_bytes=10_000, max_messages=10) as box:
        last = box.put("t", b"x", kind="result").message.row_id
        box.ack(last)
    with Outbox(path, max_bytes=10_000, max_messages=10) as box:
        # The link's cursor is `last`; a reused id would be skipped by pending(after=last).
        assert [m.payload for m in box.pending(after_row_id=last)] == []
        box.put("t", b"new", kind="result")
        assert [m.payload for m in box.pending(after_row_id=last)] == [b"new"]


def test_rows_and_totals_survive_reopen(path: Path) -> None:
    with Outbox(path, max_bytes=10_000, max_messages=10) as box:
        for i in range(3):
            box.put("t", bytes(100), kind="result" if i else "telemetry", message_id=f"m{i}")
        before = box.depth()
    with Outbox(path, max_bytes=10_000, max_messages=10) as box:
        assert [m.message_id for m in box.pending()] == ["m0", "m1", "m2"]
        after = box.depth()
        assert {k: after[k] for k in ("messages", "bytes", "by_kind")} == {
            k: before[k] for k in ("messages", "bytes", "by_kind")
        }


def _writer(path: Path, body: str) -> list[str]:
    """python -c source that opens the outbox at `path` and runs `body` (indented code)."""
    head = f"""
        import os, signal, sys
        from pathlib import Path
        from edge_agent.mqtt.outbox import Outbox
        box = Outbox(Path({str(path)!r}), max_bytes=10_000_000, max_messages=100_000)
    """
    return [sys.executable, "-c", textwrap.dedent(head) + textwrap.dedent(body)]


def test_a_writer_sigkilled_right_after_put_loses_nothing(path: Path) -> None:
    body = """
        for i in range(40):
            message = box.put("t/kill", b"x" * 512, kind="result").message
            print(message.message_id, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """
    done = subprocess.run(_writer(path, body), cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == -signal.SIGKILL, done.stderr
    returned = done.stdout.split()
    assert len(returned) == 40
    with Outbox(path, max_bytes=10_000_000, max_messages=100_000) as box:
        assert [m.message_id for m in box.pending(limit=100)] == returned


def test_a_writer_killed_mid_stream_keeps_every_put_that_returned(path: Path) -> None:
    body = """
        while True:
            print(box.put("t/kill", b"y" * 1024, kind="result").message.message_id, flush=True)
    """
    child = subprocess.Popen(_writer(path, body), cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    returned = [child.stdout.readline().strip() for _ in range(25)]
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    returned += child.stdout.read().split()
    with Outbox(path, max_bytes=10_000_000, max_messages=100_000) as box:
        stored = [m.message_id for m in box.pending(limit=100_000)]
    # The put in flight at the kill may or may not have committed; every returned one has.
    assert stored[: len(returned)] == returned
    assert len(stored) - len(returned) in (0, 1)


def test_message_bound_drops_telemetry_first_then_the_oldest_by_kind_order(path: Path) -> None:
    with Outbox(path, max_bytes=1_000_000, max_messages=5) as box:
        for kind in ("result", "feedback", "telemetry", "reply", "telemetry"):
            box.put(f"t/{kind}", b"x", kind=kind)  # type: ignore[arg-type]
        first = box.put("t/new", b"1", kind="result")
        second = box.put("t/new", b"2", kind="result")
        third = box.put("t/new", b"3", kind="update")
        fourth = box.put("t/new", b"4", kind="telemetry")
        assert first.dropped == {"telemetry": 1}
        assert second.dropped == {"telemetry": 1}
        assert third.dropped == {"reply": 1}  # no telemetry left: reply is next in drop order
        assert fourth.dropped == {"update": 1}  # the row being put is never the one dropped
        assert [m.topic + ":" + m.payload.decode() for m in box.pending()] == [
            "t/result:x",
            "t/feedback:x",
            "t/new:1",
            "t/new:2",
            "t/new:4",
        ]
        depth = box.depth()
        assert depth["messages"] == 5
        assert depth["dropped"] == {
            "telemetry": 2,
            "reply": 1,
            "update": 1,
            "feedback": 0,
            "result": 0,
        }


def test_byte_bound_drops_as_many_old_rows_as_the_new_one_needs(path: Path) -> None:
    with Outbox(path, max_bytes=1000, max_messages=100) as box:
        old = [box.put("r", bytes(197), kind="result").message for _ in range(5)]
        # size = payload + topic + "{}" (the empty properties): 200 bytes each, 1000 in all
        put = box.put("r", bytes(447), kind="result")  # 450 bytes: three old rows must go
        assert put.dropped == {"result": 3}
        assert [m.row_id for m in box.pending()] == [
            old[3].row_id,
            old[4].row_id,
            put.message.row_id,
        ]
        assert box.depth()["bytes"] == 850


def test_a_message_larger_than_the_outbox_is_refused_and_changes_nothing(path: Path) -> None:
    with Outbox(path, max_bytes=1000, max_messages=10) as box:
        box.put("t", bytes(100), kind="telemetry")
        with pytest.raises(OutboxFullError, match="larger than the whole outbox"):
            box.put("t", bytes(1000), kind="result")
        assert box.depth()["messages"] == 1
        assert box.depth()["dropped"]["telemetry"] == 0


def test_bad_arguments_are_refused_with_what_to_use(outbox: Outbox) -> None:
    with pytest.raises(ValueError, match="unknown outbox kind"):
        outbox.put("t", b"x", kind="alarm")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="QoS must be 0, 1 or 2"):
        outbox.put("t", b"x", kind="result", qos=3)
    with pytest.raises(ValueError, match="JSON-serialisable"):
        outbox.put("t", b"x", kind="result", properties={"correlation_data": b"\x01"})
    assert outbox.depth()["messages"] == 0


def test_a_closed_outbox_says_so(path: Path) -> None:
    box = Outbox(path, max_bytes=1000, max_messages=10)
    box.close()
    box.close()
    with pytest.raises(OutboxError, match="is closed"):
        box.put("t", b"x", kind="result")


def test_a_file_that_is_not_a_database_is_moved_aside(
    path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not sqlite at all " * 500)
    with caplog.at_level(logging.ERROR), Outbox(path, max_bytes=1000, max_messages=10) as box:
        assert box.depth()["messages"] == 0
        box.put("t", b"x", kind="result")
    aside = list(path.parent.glob("outbox.db.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_bytes().startswith(b"not sqlite at all")
    assert "is corrupt" in caplog.text and str(aside[0]) in caplog.text


def test_a_database_with_a_damaged_page_is_moved_aside(
    path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with Outbox(path, max_bytes=10_000_000, max_messages=1000) as box:
        for _ in range(50):
            box.put("t", bytes(1000), kind="result")
    page_size = 4096
    with path.open("r+b") as raw:  # page 2 holds the outbox table's root b-tree page
        raw.seek(page_size)
        raw.write(b"\xff" * page_size)
    with caplog.at_level(logging.ERROR), Outbox(path, max_bytes=1000, max_messages=10) as box:
        assert box.pending() == []
    assert len(list(path.parent.glob("outbox.db.corrupt-*"))) == 1
    assert "is corrupt" in caplog.text


def test_concurrent_puts_from_four_threads_keep_every_row_exactly_once(outbox: Outbox) -> None:
    per_thread = 40
    start = threading.Barrier(4)

    def write(thread: int) -> None:
        start.wait()
        for i in range(per_thread):
            outbox.put("t", b"x", kind="result", message_id=f"{thread}-{i}")

    threads = [threading.Thread(target=write, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    ids = [m.message_id for m in outbox.pending(limit=1000)]
    assert sorted(ids) == sorted(f"{t}-{i}" for t in range(4) for i in range(per_thread))
    for t in range(4):  # each writer's own messages keep their order
        mine = [i for i in ids if i.startswith(f"{t}-")]
        assert mine == [f"{t}-{i}" for i in range(per_thread)]
    assert outbox.depth()["messages"] == 4 * per_thread


@pytest.mark.parametrize("recent_max", [1, 3, 256])
def test_pending_from_memory_is_what_the_file_holds(
    path: Path, monkeypatch: pytest.MonkeyPatch, recent_max: int
) -> None:
    """Recent messages are served from memory; whatever the mix of puts, drops, acks, reopening
    and cursors, `pending()` returns exactly the rows the file holds, in order."""
    import random

    from edge_agent.mqtt import outbox as module

    monkeypatch.setattr(module, "RECENT_MAX_MESSAGES", recent_max)
    rng = random.Random(7)
    kinds: list[Kind] = ["reply", "result", "telemetry", "feedback"]
    box = Outbox(path, max_bytes=4000, max_messages=12)
    try:
        for step in range(400):
            action = rng.random()
            if action < 0.5:
                kind = rng.choice(kinds)
                box.put("t/x", bytes(rng.randrange(10, 600)), kind=kind, fsync=False)
            elif action < 0.75:
                rows = box.pending(limit=50)
                if rows:
                    box.ack(rng.choice(rows).row_id)
            elif action < 0.78:
                box.close()
                box = Outbox(path, max_bytes=4000, max_messages=12)
            stored = [
                row[0] for row in box._live().execute("SELECT row_id FROM outbox ORDER BY row_id")
            ]
            for after in {0, *stored[:1], *stored[-2:], *(r - 1 for r in stored[-2:])}:
                limit = rng.randrange(1, 6)
                expected = [
                    module._message(row)
                    for row in box._live().execute(module._SELECT_PENDING, (after, limit))
                ]
                assert box.pending(after_row_id=after, limit=limit) == expected, (step, after)
    finally:
        box.close()


# ---- checkpoints -------------------------------------------------------------------------
def _replies_and_acks(box: Outbox, count: int) -> None:
    """What the agent writes for `count` answered MQTT requests: a reply with its identity,
    then the delete its PUBACK brings."""
    for n in range(count):
        draft = Draft("replies/1", b"r" * 600, "reply", f"m{n:031d}")
        stored = box.put_many([draft], answered=Answered(f"k{n}", "d" * 32))
        box.ack(stored[0].message.row_id)


def _wait(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def test_checkpoints_run_on_the_outbox_thread_and_keep_the_wal_bounded(path: Path) -> None:
    """No commit runs a checkpoint (SQLite's automatic one would, in whichever commit crossed
    its threshold: on the event loop for a reply). The outbox's own thread does, so the WAL
    stays near the threshold however much is written."""
    threads: list[str] = []
    with Outbox(path, max_bytes=10_000_000, max_messages=10_000) as box:
        conn = box._live()
        assert conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 0
        box.after_checkpoint.append(lambda: threads.append(threading.current_thread().name))
        # ~10 pages per request: five times the threshold in all, a checkpoint after each part
        for done in range(1, 6):
            _replies_and_acks(box, outbox_module.CHECKPOINT_PAGES // 10 + 5)
            _wait(lambda done=done: box.checkpoints >= done, "a checkpoint by the outbox thread")
        assert set(threads) == {"outbox-checkpoint"}
        assert box.checkpoint_failures == 0
        wal = path.with_name(path.name + "-wal").stat().st_size
        assert wal < 3 * outbox_module.CHECKPOINT_PAGES * 4096, wal
        thread = box._checkpointer
    assert thread is not None and not thread.is_alive()  # close() ends it


def test_a_failed_checkpoint_is_logged_and_tried_again(
    path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(faults, "_PLAN", faults._parse("outbox.checkpoint=eio@1"))
    monkeypatch.setattr(faults, "_SEEN", faults.Counter())
    monkeypatch.setattr(outbox_module, "CHECKPOINT_RETRY_S", 0.05)
    with (
        caplog.at_level(logging.WARNING),
        Outbox(path, max_bytes=10_000_000, max_messages=10_000) as box,
    ):
        _replies_and_acks(box, outbox_module.CHECKPOINT_PAGES // 10 + 5)
        _wait(lambda: box.checkpoint_failures == 1, "the injected failure")
        _replies_and_acks(box, 1)  # the next commit asks again
        _wait(lambda: box.checkpoints == 1, "the checkpoint tried again")
        assert len(box.pending(limit=1000)) == 0  # nothing was lost or left behind
    assert "could not checkpoint the outbox" in caplog.text
    assert "check the disk" in caplog.text


def test_depth_answers_while_the_outbox_is_held(outbox: Outbox) -> None:
    """A health check reads the totals without waiting for a commit's fsync or a checkpoint."""
    outbox.put("t/r", b"1", kind="reply")
    answers: list[dict[str, object]] = []
    with outbox._lock:  # as a checkpoint holds it
        reader = threading.Thread(target=lambda: answers.append(outbox.depth()))
        reader.start()
        reader.join(timeout=5)
    assert answers and answers[0]["messages"] == 1
