"""Schema migrations: plain versioned steps in Python with SQLAlchemy Core (no Alembic).

The database records its schema version in `schema_version` (one row). `STEPS` is the ordered
list of `Step(version, description, apply)`; `migrate` runs, in order, every step above the
recorded version, each in a transaction of its own that also bumps the version, so a crash
between two steps leaves a database at a known version that the next start continues from.
Both dialects run the same steps (DDL is transactional on both):

- PostgreSQL: each step's transaction first takes `pg_advisory_xact_lock(MIGRATION_LOCK_KEY)`,
  so two controllers starting at once migrate one after the other and the second finds nothing
  left to do;
- SQLite: each step's transaction is `BEGIN IMMEDIATE` (the database's write lock, taken before
  the version is read; the driver's own implicit transactions are switched off meanwhile).

Every step defines the tables it creates or changes itself, frozen as they were at that version:
no step reads the application's `db.METADATA`, whose shape moves on with the code. The modules
that own tables still declare them on `db.METADATA` for their queries; `migrate(declared=...)`
checks after migrating that every declared table and column exists, and the unit tests check
that the steps on an empty database build exactly what `METADATA.create_all` would.

Adding a change: write `def _vN_what(conn: Connection) -> None` (CREATE TABLE through an
`sa.Table` on a private `MetaData`, `add_column`, or `create_index`) and append
`Step(N, "what it does", _vN_what)` to `STEPS`. Never edit a step that has shipped.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from fleet_controller.errors import FleetError

log = logging.getLogger(__name__)

#: The advisory lock migrations take on PostgreSQL ("LSMIGRAT" as a big-endian int64).
MIGRATION_LOCK_KEY = int.from_bytes(b"LSMIGRAT", "big", signed=True)

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")  # SQLite: a rowid alias
_TIME = sa.DateTime(timezone=True)


@dataclass(frozen=True)
class Step:
    """One schema change: `apply` runs inside the step's transaction, under the lock."""

    version: int
    description: str
    apply: Callable[[Connection], None]


_OWN = sa.MetaData()
SCHEMA_VERSION = sa.Table(
    "schema_version",
    _OWN,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),  # always 1
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("migrated_at", _TIME, nullable=False),
)


# ---- the steps --------------------------------------------------------------------------------
def _v1_initial(conn: Connection) -> None:
    """The schema of issue #16: the registry's device tables and the rollouts' tables."""
    v1 = sa.MetaData()

    def device_key() -> sa.ForeignKeyConstraint:
        return sa.ForeignKeyConstraint(
            ["site", "device"], ["devices.site", "devices.device"], ondelete="CASCADE"
        )

    sa.Table(
        "devices", v1,
        sa.Column("site", sa.String(64), primary_key=True),
        sa.Column("device", sa.String(64), primary_key=True),
        sa.Column("line", sa.Text),
        sa.Column("labels", sa.Text, nullable=False, server_default="{}"),
        sa.Column("groups", sa.Text, nullable=False, server_default="[]"),
        sa.Column("profile", sa.Text),
        sa.Column("agent_version", sa.Text),
        sa.Column("models", sa.Text, nullable=False, server_default="{}"),
        sa.Column("ready", sa.Boolean),
        sa.Column("reasons", sa.Text, nullable=False, server_default="[]"),
        sa.Column("online", sa.Boolean, nullable=False),
        sa.Column("last_seen", _TIME),
        sa.Column("first_seen", _TIME, nullable=False),
        sa.Column("last_telemetry_at", _TIME),
    )  # fmt: skip
    sa.Table(
        "device_updates", v1,
        sa.Column("id", _ID, primary_key=True, autoincrement=True),
        sa.Column("site", sa.String(64), nullable=False),
        sa.Column("device", sa.String(64), nullable=False),
        sa.Column("at", _TIME, nullable=False),
        sa.Column("received_at", _TIME, nullable=False),
        sa.Column("sequence", sa.BigInteger, nullable=False),
        sa.Column("rollout_id", sa.String(64)),
        sa.Column("wave", sa.BigInteger),
        sa.Column("phase", sa.Text, nullable=False),
        sa.Column("outcome", sa.String(32), nullable=False),
        sa.Column("reason", sa.Text),
        sa.Column("name", sa.Text),
        sa.Column("version", sa.BigInteger),
        device_key(),
        sa.Index("device_updates_by_device", "site", "device", "id"),
    )  # fmt: skip
    sa.Table(
        "model_samples", v1,
        sa.Column("id", _ID, primary_key=True, autoincrement=True),
        sa.Column("site", sa.String(64), nullable=False),
        sa.Column("device", sa.String(64), nullable=False),
        sa.Column("at", _TIME, nullable=False),
        sa.Column("model", sa.Text, nullable=False),
        sa.Column("version", sa.BigInteger, nullable=False),
        sa.Column("p50", sa.Float),
        sa.Column("p95", sa.Float),
        sa.Column("samples", sa.BigInteger, nullable=False),
        sa.Column("outcomes", sa.Text, nullable=False, server_default="{}"),
        sa.Column("selftest_ok", sa.Boolean),
        sa.Column("drift_alert", sa.Boolean),
        device_key(),
        sa.Index("model_samples_by_model", "site", "device", "model", "id"),
    )  # fmt: skip
    sa.Table(
        "rejections", v1,
        sa.Column("id", _ID, primary_key=True, autoincrement=True),
        sa.Column("at", _TIME, nullable=False),
        sa.Column("topic", sa.Text, nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("reason", sa.String(64), nullable=False),
        sa.Column("message", sa.Text, nullable=False),
    )  # fmt: skip
    sa.Table(
        "rollouts", v1,
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("name", sa.String(64), nullable=False, index=True),
        sa.Column("plan", sa.Text, nullable=False),
        sa.Column("bundle", sa.Text, nullable=False),
        sa.Column("state", sa.Text, nullable=False),
        sa.Column("status", sa.String(16), nullable=False, index=True),
        sa.Column("created_at", _TIME, nullable=False),
        sa.Column("updated_at", _TIME, nullable=False),
        sa.Column("created_by", sa.String(200), nullable=False),
    )  # fmt: skip
    sa.Table(
        "rollout_boxes", v1,
        sa.Column("rollout_id", sa.String(64), sa.ForeignKey("rollouts.id"), primary_key=True),
        sa.Column("site", sa.String(64), primary_key=True),
        sa.Column("device", sa.String(64), primary_key=True),
        sa.Column("wave", sa.Integer, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("v2", sa.Boolean),
        sa.Column("old_version", sa.Integer),
        sa.Column("sequence", sa.BigInteger, index=True),
        sa.Column("notice", sa.LargeBinary),
        sa.Column("sent_at", _TIME),
        sa.Column("outcome_at", _TIME),
        sa.Column("reason", sa.Text),
        sa.Column("rollback_sequence", sa.BigInteger, index=True),
        sa.Column("rollback_notice", sa.LargeBinary),
        sa.Column("rollback_sent_at", _TIME),
        sa.Column("rollback_state", sa.String(16)),
        sa.Column("rollback_reason", sa.Text),
        sa.Index("rollout_boxes_by_device", "site", "device"),
    )  # fmt: skip
    sa.Table(
        "audit", v1,
        sa.Column("id", _ID, primary_key=True, autoincrement=True),
        sa.Column(
            "rollout_id", sa.String(64), sa.ForeignKey("rollouts.id"), nullable=False, index=True
        ),
        sa.Column("at", _TIME, nullable=False),
        sa.Column("what", sa.String(64), nullable=False),
        sa.Column("why", sa.Text, nullable=False),
        sa.Column("actor", sa.String(200), nullable=False),
        sa.Column("figures", sa.Text, nullable=False),
    )  # fmt: skip
    sa.Table(
        "sequences", v1,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("last", sa.BigInteger, nullable=False),
    )  # fmt: skip
    # checkfirst: a database created by `create_all` before migrations existed (issue #16's
    # controller) already holds exactly these tables; it is adopted at version 1 as it is.
    v1.create_all(conn, checkfirst=True)


def _v2_leadership(conn: Connection) -> None:
    """Who leads (issue #17 high availability): one row, written by the leader."""
    v2 = sa.MetaData()
    sa.Table(
        "leadership", v2,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),  # always 1
        sa.Column("holder", sa.String(200), nullable=False),
        sa.Column("api", sa.Text, nullable=False),
        sa.Column("since", _TIME, nullable=False),
        sa.Column("heartbeat_at", _TIME, nullable=False),
    )  # fmt: skip
    v2.create_all(conn)


def _v3_shadow_phase(conn: Connection) -> None:
    """The shadow phase (issue #17): each box's latest shadow figures per model, and each
    rollout's shadow notices per box."""
    v3 = sa.MetaData()
    # Stand-ins for the tables referred to, so the foreign keys resolve; not created here.
    sa.Table("devices", v3, sa.Column("site", sa.String(64)), sa.Column("device", sa.String(64)))
    sa.Table("rollouts", v3, sa.Column("id", sa.String(64)))
    shadow_samples = sa.Table(
        "shadow_samples", v3,
        sa.Column("site", sa.String(64), primary_key=True),
        sa.Column("device", sa.String(64), primary_key=True),
        sa.Column("model", sa.String(200), primary_key=True),
        sa.Column("at", _TIME, nullable=False),
        sa.Column("candidate_version", sa.BigInteger, nullable=False),
        sa.Column("candidate_sha256", sa.String(64)),
        sa.Column("compared", sa.BigInteger, nullable=False),
        sa.Column("agreement", sa.Float),
        sa.Column("disagreements", sa.Text, nullable=False, server_default="[]"),
        sa.Column("candidate_p50", sa.Float),
        sa.Column("candidate_p95", sa.Float),
        sa.ForeignKeyConstraint(
            ["site", "device"], ["devices.site", "devices.device"], ondelete="CASCADE"
        ),
    )  # fmt: skip
    rollout_shadows = sa.Table(
        "rollout_shadows", v3,
        sa.Column("rollout_id", sa.String(64), sa.ForeignKey("rollouts.id"), primary_key=True),
        sa.Column("site", sa.String(64), primary_key=True),
        sa.Column("device", sa.String(64), primary_key=True),
        sa.Column("wave", sa.Integer, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("old_version", sa.Integer),
        sa.Column("sequence", sa.BigInteger, index=True),
        sa.Column("notice", sa.LargeBinary),
        sa.Column("sent_at", _TIME),
        sa.Column("outcome_at", _TIME),
        sa.Column("reason", sa.Text),
        sa.Index("rollout_shadows_by_device", "site", "device"),
    )  # fmt: skip
    v3.create_all(conn, tables=[shadow_samples, rollout_shadows], checkfirst=False)


def _v4_scale(conn: Connection) -> None:
    """10,000 boxes and several consuming instances (issue #18): update reports' idempotency
    key, unique per box (a report delivered twice is stored and applied once); the rollout
    boxes by wave and state (a tick reads only the current wave), and by unacknowledged notice
    (a tick re-publishes without reading every box)."""
    # Each change only where missing: a database adopted at version 1 (made by `create_all`
    # before migrations existed) may already have them.
    inspector = sa.inspect(conn)
    schema = _schema(conn)
    columns = {c["name"] for c in inspector.get_columns("device_updates", schema=schema)}
    if "report_key" not in columns:
        add_column(conn, "device_updates", sa.Column("report_key", sa.String(64)))
    indexes = {
        str(index["name"])
        for table in ("device_updates", "rollout_boxes")
        for index in inspector.get_indexes(table, schema=schema)
    }
    wanted = (
        ("device_updates_by_key", "device_updates", ("site", "device", "report_key"), True),
        ("rollout_boxes_by_wave", "rollout_boxes", ("rollout_id", "wave", "state"), False),
        ("rollout_boxes_unsent", "rollout_boxes", ("rollout_id", "sent_at"), False),
    )
    for name, table, listed, unique in wanted:
        if name not in indexes:
            create_index(conn, name, table, *listed, unique=unique)


def _v5_device_changes(conn: Connection) -> None:
    """When each box's row last changed (`devices.changed_at`): the fleet page then reads only
    the boxes changed since its last read, not all 10,000 every second."""
    columns = {c["name"] for c in sa.inspect(conn).get_columns("devices", schema=_schema(conn))}
    if "changed_at" not in columns:
        add_column(conn, "devices", sa.Column("changed_at", _TIME))


STEPS: tuple[Step, ...] = (
    Step(1, "the registry's and the rollouts' tables (issue #16)", _v1_initial),
    Step(2, "the leadership table (high availability)", _v2_leadership),
    Step(3, "the shadow phase's tables: shadow_samples, rollout_shadows", _v3_shadow_phase),
    Step(4, "report idempotency keys; rollout box indexes for 10,000 boxes", _v4_scale),
    Step(5, "when each box's row last changed, for the fleet page", _v5_device_changes),
)
LATEST = STEPS[-1].version


# ---- helpers for later steps ------------------------------------------------------------------
def add_column(conn: Connection, table: str, column: sa.Column[Any]) -> None:
    """`ALTER TABLE table ADD COLUMN column`, rendered by the dialect (for a later step).

    SQLite adds a column only if it is nullable or has a server default."""
    rendered = sa.schema.CreateColumn(column).compile(dialect=conn.dialect)
    conn.exec_driver_sql(f"ALTER TABLE {_target(conn, table)} ADD COLUMN {rendered}")


def create_index(
    conn: Connection, name: str, table: str, *columns: str, unique: bool = False
) -> None:
    """`CREATE [UNIQUE] INDEX name ON table (columns)` (for a later step)."""
    quote = conn.dialect.identifier_preparer.quote
    listed = ", ".join(quote(column) for column in columns)
    kind = "UNIQUE INDEX" if unique else "INDEX"
    conn.exec_driver_sql(f"CREATE {kind} {quote(name)} ON {_target(conn, table)} ({listed})")


def _target(conn: Connection, table: str) -> str:
    """`table`, quoted, in the schema the connection's tables land in."""
    preparer = conn.dialect.identifier_preparer
    schema = _schema(conn)
    name = preparer.quote(table)
    return f"{preparer.quote_schema(schema)}.{name}" if schema else name


# ---- running them -----------------------------------------------------------------------------
def migrate(
    engine: Engine, *, steps: Sequence[Step] = STEPS, declared: sa.MetaData | None = None
) -> int:
    """Bring the database up to the last of `steps`; return the version it is at.

    With `declared`, then check that every table and column it declares exists (a table or
    column the code uses but no step creates is refused at start, not mid-rollout)."""
    _check_steps(steps)
    latest = steps[-1].version if steps else 0
    while True:
        with _write_locked(engine) as conn:
            current = _current_version(conn)
            if current > latest:
                raise FleetError(
                    f"the database is at schema version {current}, newer than this controller "
                    f"knows (version {latest}): run the controller version that migrated it, "
                    "or a newer one"
                )
            pending = [step for step in steps if step.version > current]
            if not pending:
                break
            step = pending[0]
            log.info(
                "migrating the database from version %d to %d: %s",
                current,
                step.version,
                step.description,
            )
            step.apply(conn)
            _set_version(conn, step.version)
    if declared is not None:
        missing = missing_from(engine, declared)
        if missing:
            raise FleetError(
                f"the database at schema version {latest} lacks {', '.join(missing)}, which "
                "the code declares: append a migration step that creates them to "
                "fleet_controller/migrations.py STEPS"
            )
    return latest


def version(engine: Engine) -> int:
    """The schema version recorded in the database (0 for one never migrated)."""
    with engine.connect() as conn:
        if not sa.inspect(conn).has_table(SCHEMA_VERSION.name, schema=_schema(conn)):
            return 0
        return int(conn.execute(sa.select(SCHEMA_VERSION.c.version)).scalar_one_or_none() or 0)


def missing_from(engine: Engine, declared: sa.MetaData) -> list[str]:
    """The tables and `table.column`s declared in `declared` that the database lacks."""
    with engine.connect() as conn:
        schema = _schema(conn)
        inspector = sa.inspect(conn)
        existing = set(inspector.get_table_names(schema=schema))
        missing: list[str] = []
        for table in declared.sorted_tables:
            if table.name not in existing:
                missing.append(f"table {table.name}")
                continue
            columns = {c["name"] for c in inspector.get_columns(table.name, schema=schema)}
            missing += [f"{table.name}.{c.name}" for c in table.columns if c.name not in columns]
        return missing


def _check_steps(steps: Sequence[Step]) -> None:
    versions = [step.version for step in steps]
    if versions != list(range(1, len(steps) + 1)):
        raise FleetError(f"migration steps must be numbered 1, 2, 3, ... in order; got {versions}")


def _current_version(conn: Connection) -> int:
    SCHEMA_VERSION.create(conn, checkfirst=True)
    return int(conn.execute(sa.select(SCHEMA_VERSION.c.version)).scalar_one_or_none() or 0)


def _set_version(conn: Connection, number: int) -> None:
    now = datetime.now(UTC)
    updated = conn.execute(SCHEMA_VERSION.update().values(version=number, migrated_at=now)).rowcount
    if not updated:
        conn.execute(SCHEMA_VERSION.insert().values(id=1, version=number, migrated_at=now))


@contextmanager
def _write_locked(engine: Engine) -> Iterator[Connection]:
    """One transaction holding the migration lock; committed when the block ends."""
    dialect = engine.dialect.name
    if dialect == "postgresql":
        with engine.begin() as conn:
            conn.execute(sa.select(sa.func.pg_advisory_xact_lock(MIGRATION_LOCK_KEY)))
            yield conn
    elif dialect == "sqlite":
        with engine.connect() as conn:
            raw = conn.connection.driver_connection
            saved = raw.isolation_level  # type: ignore[union-attr]
            # The sqlite3 module must neither open nor commit transactions on its own (it
            # would run DDL outside any transaction): this one is ours, BEGIN IMMEDIATE.
            raw.isolation_level = None  # type: ignore[union-attr]
            try:
                conn.exec_driver_sql("BEGIN IMMEDIATE")
                try:
                    yield conn
                except BaseException:
                    conn.rollback()
                    raise
                conn.commit()
            finally:
                raw.isolation_level = saved  # type: ignore[union-attr]
    else:
        raise FleetError(
            f"cannot migrate a {dialect} database; use sqlite:///PATH or postgresql+psycopg://..."
        )


def _schema(conn: Connection) -> str | None:
    """The schema unqualified tables land in (a `schema_translate_map` of None), if any."""
    translate = conn.get_execution_options().get("schema_translate_map") or {}
    schema = translate.get(None)
    return str(schema) if schema is not None else None
