"""The controller's schema migrations, on SQLite and (with LINESIDE_TEST_POSTGRES) PostgreSQL.

The steps on an empty database build exactly the tables `db.METADATA` declares (so the frozen
steps and the code's tables cannot drift apart); a database at an older version, or one made by
issue #16's `create_all` before migrations existed, is upgraded with its rows kept; two
processes migrating at once apply each step once; a failing step leaves nothing behind.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from fleet_controller import db, leader, migrations, registry, rollouts, service
from fleet_controller.errors import FleetError
from fleet_controller.migrations import STEPS, Step
from tests.postgres_support import postgres_schema, schema_of

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
# Every module that declares tables is imported (service imports them all): METADATA holds all.
DECLARING = (registry, rollouts, leader, service)

# What issue #16's controller created (version 1).
V1_TABLES = frozenset(
    {"devices", "device_updates", "model_samples", "rejections", "rollouts", "rollout_boxes",
     "audit", "sequences"}
)  # fmt: skip
EngineFactory = Callable[[], Engine]


@pytest.fixture(params=["sqlite", "postgresql"])
def engines(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[EngineFactory]:
    """A factory of engines on one fresh, empty database (a new SQLite file, or a new
    PostgreSQL schema): each call is a separate engine, as a separate process would have."""
    made: list[Engine] = []
    if request.param == "sqlite":
        path = tmp_path / f"fleet-{uuid.uuid4().hex[:6]}.db"

        def sqlite_engine() -> Engine:
            made.append(db.connect(f"sqlite:///{path}"))
            return made[-1]

        yield sqlite_engine
        for engine in made:
            engine.dispose()
        return
    with postgres_schema("migrations") as scoped:
        url = scoped.url.render_as_string(hide_password=False)
        schema = schema_of(scoped)

        def postgres_engine() -> Engine:
            made.append(db.connect(url))
            return made[-1].execution_options(schema_translate_map={None: schema})

        try:
            yield postgres_engine
        finally:
            for engine in made:
                engine.dispose()


def shape(engine: Engine) -> dict[str, Any]:
    """Tables, columns (type, nullable, default), primary keys, indexes and foreign keys, as
    the database reports them (the schema's own name taken out)."""
    schema = schema_of(engine)

    def plain(value: Any) -> str:
        return str(value).replace(f"{schema}.", "") if schema else str(value)

    found: dict[str, Any] = {}
    with engine.connect() as conn:
        inspector = sa.inspect(conn)
        for table in sorted(inspector.get_table_names(schema=schema)):
            if table == migrations.SCHEMA_VERSION.name:
                continue
            found[table] = {
                "columns": [
                    (c["name"], str(c["type"]), c["nullable"], plain(c.get("default")))
                    for c in inspector.get_columns(table, schema=schema)
                ],
                "pk": inspector.get_pk_constraint(table, schema=schema)["constrained_columns"],
                "indexes": sorted(
                    (i["name"], tuple(i["column_names"]), bool(i["unique"]))
                    for i in inspector.get_indexes(table, schema=schema)
                ),
                "fks": sorted(
                    (
                        tuple(f["constrained_columns"]),
                        f["referred_table"],
                        tuple(f["referred_columns"]),
                        (f.get("options") or {}).get("ondelete"),
                    )
                    for f in inspector.get_foreign_keys(table, schema=schema)
                ),
            }
    return found


def test_the_steps_build_exactly_the_declared_tables(engines: EngineFactory) -> None:
    migrated = engines()
    assert migrations.migrate(migrated) == migrations.LATEST == STEPS[-1].version
    assert migrations.version(migrated) == migrations.LATEST
    built = shape(migrated)
    with migrated.begin() as conn:  # the same database, emptied, then made by create_all
        for table in reversed(db.METADATA.sorted_tables):
            table.drop(conn)
        migrations.SCHEMA_VERSION.drop(conn)
    db.METADATA.create_all(migrated)
    declared = shape(migrated)
    assert set(built) == {t.name for t in db.METADATA.sorted_tables}
    for table in declared:
        assert built[table] == declared[table], (
            f"the migration steps build {table} differently from its declaration: append a "
            "step to fleet_controller/migrations.py STEPS"
        )


def test_a_version_1_database_is_upgraded_with_its_rows(engines: EngineFactory) -> None:
    engine = engines()
    assert migrations.migrate(engine, steps=STEPS[:1]) == 1
    assert set(shape(engine)) == V1_TABLES
    _insert_v1_rows(engine)

    assert db.migrate(engine) == migrations.LATEST  # what Controller.build runs at start
    assert migrations.version(engine) == migrations.LATEST
    _assert_v1_rows(engine)
    assert "leadership" in shape(engine)


def test_a_database_from_before_migrations_is_adopted(engines: EngineFactory) -> None:
    """Issue #16's controller made its tables with `create_all` and recorded no version."""
    engine = engines()
    v1 = [t for t in db.METADATA.sorted_tables if t.name in V1_TABLES]
    db.METADATA.create_all(engine, tables=v1)
    _insert_v1_rows(engine)
    assert migrations.version(engine) == 0
    assert db.migrate(engine) == migrations.LATEST
    _assert_v1_rows(engine)


def test_migrating_again_changes_nothing(engines: EngineFactory) -> None:
    engine = engines()
    db.migrate(engine)
    _insert_v1_rows(engine)
    before = shape(engine)
    assert db.migrate(engine) == migrations.LATEST
    assert shape(engine) == before
    _assert_v1_rows(engine)


def test_two_processes_migrating_at_once_apply_each_step_once(engines: EngineFactory) -> None:
    log = sa.Table("step_log", sa.MetaData(), sa.Column("step", sa.Integer, nullable=False))
    barrier = threading.Barrier(2)

    def record(number: int) -> Callable[[Connection], None]:
        def apply(conn: Connection) -> None:
            if number == 1:
                log.create(conn)
            conn.execute(log.insert().values(step=number))

        return apply

    steps = [Step(n, f"step {n}", record(n)) for n in (1, 2, 3, 4)]
    first, second = engines(), engines()
    errors: list[BaseException] = []
    results: list[int] = []

    def run(engine: Engine) -> None:
        barrier.wait(10)
        try:
            results.append(migrations.migrate(engine, steps=steps))
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(e,)) for e in (first, second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors
    assert results == [4, 4]
    with first.connect() as conn:
        assert sorted(conn.execute(sa.select(log.c.step)).scalars()) == [1, 2, 3, 4]
        assert conn.scalar(sa.select(sa.func.count()).select_from(migrations.SCHEMA_VERSION)) == 1


def test_a_failing_step_leaves_nothing_behind(engines: EngineFactory) -> None:
    kept = sa.Table("kept", sa.MetaData(), sa.Column("n", sa.Integer))
    undone = sa.Table("undone", sa.MetaData(), sa.Column("n", sa.Integer))

    def fail(conn: Connection) -> None:
        undone.create(conn)
        conn.execute(kept.insert().values(n=2))
        raise RuntimeError("step 2 breaks half-way")

    steps = [Step(1, "kept", lambda conn: kept.create(conn)), Step(2, "breaks", fail)]
    engine = engines()
    with pytest.raises(RuntimeError, match="half-way"):
        migrations.migrate(engine, steps=steps)
    assert migrations.version(engine) == 1
    assert set(shape(engine)) == {"kept"}
    with engine.connect() as conn:
        assert conn.scalar(sa.select(sa.func.count()).select_from(kept)) == 0


def test_later_steps_can_add_columns_and_indexes(engines: EngineFactory) -> None:
    def add(conn: Connection) -> None:
        migrations.add_column(conn, "rollouts", sa.Column("note", sa.Text))
        migrations.add_column(
            conn, "devices", sa.Column("tier", sa.Integer, nullable=False, server_default="0")
        )
        migrations.create_index(conn, "devices_by_tier", "devices", "tier", "site")

    engine = engines()
    migrations.migrate(engine, steps=STEPS[:1])
    _insert_v1_rows(engine)
    later = Step(migrations.LATEST + 1, "notes and tiers", add)
    assert migrations.migrate(engine, steps=(*STEPS, later)) == later.version
    built = shape(engine)
    assert "note" in [c[0] for c in built["rollouts"]["columns"]]
    assert ("devices_by_tier", ("tier", "site"), False) in built["devices"]["indexes"]
    devices = sa.Table("devices", sa.MetaData(), sa.Column("tier", sa.Integer))
    with engine.connect() as conn:
        assert conn.execute(sa.select(devices.c.tier)).scalars().all() == [0]


def test_a_newer_database_is_refused(engines: EngineFactory) -> None:
    engine = engines()
    db.migrate(engine)
    with engine.begin() as conn:
        conn.execute(migrations.SCHEMA_VERSION.update().values(version=migrations.LATEST + 5))
    with pytest.raises(FleetError, match=r"newer than this controller knows"):
        db.migrate(engine)


def test_a_declared_column_no_step_creates_is_refused_at_start(engines: EngineFactory) -> None:
    engine = engines()
    declared = sa.MetaData()
    sa.Table("devices", declared, sa.Column("site", sa.String(64)), sa.Column("shadow", sa.Text))
    sa.Table("fleet_pages", declared, sa.Column("id", sa.Integer))
    with pytest.raises(FleetError) as caught:
        migrations.migrate(engine, declared=declared)
    assert "devices.shadow" in caught.value.message
    assert "table fleet_pages" in caught.value.message
    assert "append a migration step" in caught.value.message


def test_steps_must_be_numbered_in_order(engines: EngineFactory) -> None:
    with pytest.raises(FleetError, match="numbered"):
        migrations.migrate(engines(), steps=[STEPS[1], STEPS[0]])


# ---- rows of a version 1 database -------------------------------------------------------------
def _insert_v1_rows(engine: Engine) -> None:
    with engine.begin() as conn:
        conn.execute(
            registry.DEVICES.insert().values(
                site="plant-a", device="box1", online=True, first_seen=T0, last_seen=T0,
                models='{"defects": {"version": 1}}',
            )
        )  # fmt: skip
        conn.execute(
            rollouts.ROLLOUTS.insert().values(
                id="defects-2", name="defects-2", plan="{}", bundle="{}", state="{}",
                status="running", created_at=T0, updated_at=T0, created_by="ops",
            )
        )  # fmt: skip
        conn.execute(
            rollouts.ROLLOUT_BOXES.insert().values(
                rollout_id="defects-2", site="plant-a", device="box1", wave=1, state="sent",
                sequence=7, notice=b"\x00signed\xff",
            )
        )  # fmt: skip


def _assert_v1_rows(engine: Engine) -> None:
    with engine.connect() as conn:
        device = conn.execute(sa.select(registry.DEVICES)).mappings().one()
        assert (device["site"], device["device"], device["online"]) == ("plant-a", "box1", True)
        box = conn.execute(sa.select(rollouts.ROLLOUT_BOXES)).mappings().one()
        assert (box["sequence"], box["notice"]) == (7, b"\x00signed\xff")
        assert conn.scalar(sa.select(rollouts.ROLLOUTS.c.status)) == "running"
    found = registry.Registry(engine).device("plant-a", "box1")
    assert found is not None and found.online
