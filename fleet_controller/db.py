"""The controller's database: one SQLAlchemy `MetaData`, the engine, and transactions.

Every table is declared on `METADATA` by the module that owns it (the registry its device
tables, the rollouts theirs, the leader its own) for its queries; the schema itself is made by
the versioned steps of `migrations`, which `migrate` runs (and then checks that every declared
table and column exists). SQLite (the embedded default,
`sqlite:///PATH`) runs in WAL mode with foreign keys on and a busy timeout, so the API's
threads and the controller's loop can share it; PostgreSQL (`postgresql+psycopg://...`) is
the multi-process choice (#17).
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from fleet_controller import migrations

METADATA = sa.MetaData()
BUSY_TIMEOUT_MS = 30_000


def connect(url: str) -> Engine:
    """An engine for `url` (`sqlite:///path`, or a PostgreSQL URL). The schema is made by
    `migrate`."""
    if url.startswith("sqlite:///"):
        path = url.removeprefix("sqlite:///")
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(
            url, connect_args={"timeout": BUSY_TIMEOUT_MS / 1000, "check_same_thread": False}
        )
        sa.event.listen(engine, "connect", _sqlite_pragmas)
    else:
        engine = sa.create_engine(url, pool_pre_ping=True)
    return engine


def migrate(engine: Engine) -> int:
    """Run the schema migrations that are missing (`migrations.migrate`), then check that every
    table and column declared on METADATA exists; return the schema version."""
    return migrations.migrate(engine, declared=METADATA)


#: The name of `migrate` before the schema was versioned (issue #16).
create_tables = migrate


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    _write_ahead_log(cursor)
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _write_ahead_log(cursor: Any) -> None:
    """Switch the database file to WAL (once: the mode is stored in the file).

    The switch needs a moment when no other connection uses the file, and SQLite answers
    "database is locked" at once instead of calling the busy handler; two processes opening a
    new database together (a leader and a standby) would then fail to start. So it is retried
    for up to the busy timeout.
    """
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    delay = 0.005
    while True:
        try:
            if str(cursor.execute("PRAGMA journal_mode").fetchone()[0]).lower() == "wal":
                return
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 0.1)


@contextmanager
def transaction(engine: Engine) -> Iterator[Connection]:
    """One transaction: committed when the block ends, rolled back when it raises."""
    with engine.begin() as connection:
        yield connection


def dumps(value: Any) -> str:
    """JSON for a TEXT column (sorted keys, so equal values store equal text)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def loads(text: str | None) -> Any:
    return json.loads(text) if text else None
