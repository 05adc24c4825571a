"""Leadership: the locks are exclusive (SQLite's flock, across processes too; PostgreSQL's
advisory lock), a standby takes over when the leader lets go or dies, a leader whose lock is
lost stops at once, and a standby answers writes with 503 naming the leader.

The PostgreSQL cases run with LINESIDE_TEST_POSTGRES set, each with a lock key of its own.
"""

from __future__ import annotations

import random
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import sqlalchemy as sa
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy.engine import Engine

from fleet_controller import db, leader
from fleet_controller.leader import AdvisoryLock, Elector, FileLock, Identity, SoleLock
from fleet_controller.service import StandbyGuard
from tests.fleet_support import wait_for
from tests.postgres_support import postgres_url


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    engine = db.connect(f"sqlite:///{tmp_path / 'fleet.db'}")
    db.migrate(engine)
    yield engine
    engine.dispose()


# ---- the locks --------------------------------------------------------------------------------
def test_the_sqlite_lock_is_exclusive_across_processes(tmp_path: Path) -> None:
    path = tmp_path / "fleet.db.leader"
    first, second = FileLock(path), FileLock(path)
    assert first.try_acquire() and first.holding()
    assert not second.try_acquire()
    probe = (
        "import fcntl, os, sys\n"
        f"fd = os.open({str(path)!r}, os.O_RDWR)\n"
        "try:\n    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
        "except BlockingIOError:\n    sys.exit(3)\n"
    )
    assert subprocess.run([sys.executable, "-c", probe], timeout=30).returncode == 3
    first.release()
    assert not first.holding()
    assert second.try_acquire()
    second.release()


def test_the_sqlite_lock_is_lost_when_its_file_is_removed(tmp_path: Path) -> None:
    path = tmp_path / "fleet.db.leader"
    lock = FileLock(path)
    assert lock.try_acquire()
    path.unlink()
    assert not lock.holding()
    lock.release()


def test_each_database_gets_its_lock(tmp_path: Path) -> None:
    on_file = leader.lock_for(sa.create_engine(f"sqlite:///{tmp_path / 'fleet.db'}"))
    assert isinstance(on_file, FileLock) and on_file.path == tmp_path / "fleet.db.leader"
    assert isinstance(leader.lock_for(sa.create_engine("sqlite://")), SoleLock)
    postgres = sa.create_engine("postgresql+psycopg://u@db.example:5432/fleet")
    assert isinstance(leader.lock_for(postgres), AdvisoryLock)


def test_the_postgres_lock_is_exclusive_and_dies_with_its_session() -> None:
    url = postgres_url()
    key = random.randrange(1, 2**31)  # classid 0, objid key in pg_locks
    first, second = AdvisoryLock(url, key=key), AdvisoryLock(url, key=key)
    admin = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    try:
        assert first.try_acquire() and first.holding()
        assert not second.try_acquire()
        # The leader's session ends (its host died, or a DBA ended it): the lock goes with it.
        with admin.connect() as conn:
            ended = conn.execute(
                sa.text(
                    "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' "
                    "AND classid = 0 AND objid = CAST(:key AS bigint)::oid AND granted"
                ),
                {"key": key},
            ).scalars()
            assert list(ended) == [True]
        assert not first.holding()
        assert wait_for(second.try_acquire, 10, "the standby to take the lock")
        assert not first.try_acquire()
    finally:
        first.release()
        second.release()
        admin.dispose()


# ---- the election -----------------------------------------------------------------------------
class Running:
    """An elector in a thread, with what its callbacks saw."""

    def __init__(self, elector: Elector) -> None:
        self.elector = elector
        self.stop = threading.Event()
        self.led = threading.Event()
        self.lost = threading.Event()
        self.thread = threading.Thread(
            target=elector.run, args=(self.stop, self.led.set, self.lost.set), daemon=True
        )
        self.thread.start()

    def end(self) -> None:
        self.stop.set()
        self.thread.join(10)
        assert not self.thread.is_alive()


def elector(engine: Engine, lock: leader.LeaderLock, name: str) -> Elector:
    identity = Identity(f"{name}:1", f"http://127.0.0.1:{8700 + len(name)}")
    return Elector(lock, engine, identity, threading.Event(), retry_s=0.1, check_s=0.05)


def test_a_standby_takes_over_when_the_leader_stops(engine: Engine, tmp_path: Path) -> None:
    path = tmp_path / "fleet.db.leader"
    a = Running(elector(engine, FileLock(path), "a"))
    assert a.led.wait(10) and a.elector.leading.is_set()
    b = Running(elector(engine, FileLock(path), "bb"))
    try:
        assert not b.led.wait(0.5)
        assert not b.elector.leading.is_set()
        assert leader.current(engine) is not None
        assert cast(dict[str, Any], leader.current(engine))["holder"] == "a:1"
        a.end()
        assert not a.elector.leading.is_set() and not a.lost.is_set()
        assert b.led.wait(10)
        found = cast(dict[str, Any], leader.current(engine))
        assert (found["holder"], found["api"]) == ("bb:1", "http://127.0.0.1:8702")
    finally:
        a.end()
        b.end()


def test_a_leader_that_loses_its_lock_stops_at_once(engine: Engine, tmp_path: Path) -> None:
    path = tmp_path / "fleet.db.leader"
    a = Running(elector(engine, FileLock(path), "a"))
    try:
        assert a.led.wait(10)
        path.unlink()
        assert a.lost.wait(10)
        assert not a.elector.leading.is_set() and a.elector.lost.is_set()
        a.thread.join(10)
        assert not a.thread.is_alive()  # it does not try again: the process ends
    finally:
        a.end()


# ---- the API of a standby ---------------------------------------------------------------------
class FakeController:
    def __init__(self, leading: bool, where: dict[str, Any] | None) -> None:
        self.leadership = threading.Event()
        if leading:
            self.leadership.set()
        self.where = where

    def leader(self) -> dict[str, Any] | None:
        return self.where


def guarded(controller: FakeController) -> TestClient:
    app = FastAPI()

    @app.get("/v1/rollouts")
    def read() -> dict[str, str]:
        return {"read": "ok"}

    @app.post("/v1/rollouts")
    def write() -> dict[str, str]:
        return {"written": "ok"}

    @app.post("/v1/cohorts/preview")
    def preview() -> dict[str, str]:
        return {"preview": "ok"}

    return TestClient(StandbyGuard(app, cast(Any, controller)))


def test_a_standby_serves_reads_and_answers_writes_with_503() -> None:
    where = {"holder": "ctl-a:41", "api": "http://ctl-a:8700", "since": None, "heartbeat_at": None}
    client = guarded(FakeController(False, where))
    assert client.get("/v1/rollouts").json() == {"read": "ok"}
    assert client.post("/v1/cohorts/preview").json() == {"preview": "ok"}
    for method in ("POST", "PUT", "DELETE", "PATCH"):
        answer = client.request(method, "/v1/rollouts", json={})
        assert answer.status_code == 503
        assert answer.headers["retry-after"] == "2"
        body = answer.json()
        assert body["error"] == "not_leader"
        assert "the leader is ctl-a:41 at http://ctl-a:8700" in body["detail"]
        assert body["leader"] == where


def test_a_standby_without_a_recorded_leader_says_so() -> None:
    answer = guarded(FakeController(False, None)).post("/v1/rollouts", json={})
    assert answer.status_code == 503
    assert "no leader is recorded yet" in answer.json()["detail"]


def test_the_leader_takes_writes() -> None:
    client = guarded(FakeController(True, None))
    assert client.post("/v1/rollouts", json={}).json() == {"written": "ok"}
