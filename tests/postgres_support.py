"""PostgreSQL for the fleet controller's tests: the server LINESIDE_TEST_POSTGRES names (`1` for
the local one at 127.0.0.1:5432, or a PostgreSQL URL), skipping when it is unset, and a fresh
schema of a test's own on it."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from fleet_controller import db

LOCAL_POSTGRES = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def postgres_url() -> str:
    """The test server's URL; skips the test when LINESIDE_TEST_POSTGRES is unset."""
    url = os.environ.get("LINESIDE_TEST_POSTGRES")
    if not url:
        pytest.skip("set LINESIDE_TEST_POSTGRES=1 (or a PostgreSQL URL) to test on PostgreSQL")
    return LOCAL_POSTGRES if url == "1" else url


@contextlib.contextmanager
def postgres_schema(prefix: str) -> Iterator[Engine]:
    """An engine on the test server whose tables live in a new, empty schema `PREFIX_<random>`
    (a schema_translate_map), dropped with everything in it afterwards."""
    base = db.connect(postgres_url())
    schema = f"{prefix}_{uuid.uuid4().hex[:12]}"
    with base.begin() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    try:
        yield base.execution_options(schema_translate_map={None: schema})
    finally:
        with base.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        base.dispose()


@contextlib.contextmanager
def postgres_database(prefix: str) -> Iterator[str]:
    """The URL of a new, empty database `PREFIX_<random>` on the test server, for tests whose
    processes each connect on their own (a schema map cannot reach them); dropped afterwards."""
    admin = sa.create_engine(postgres_url(), isolation_level="AUTOCOMMIT")
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    try:
        yield admin.url.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


def schema_of(engine: Engine) -> str | None:
    """The schema an engine from `postgres_schema` puts its tables in (None: the default)."""
    translate = engine.get_execution_options().get("schema_translate_map") or {}
    schema: str | None = translate.get(None)
    return schema
