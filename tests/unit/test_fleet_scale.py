"""The controller at scale, in-process: batched ingest (one transaction per batch, acknowledged
only once committed, a failing batch retried message by message), the ingest lag on /metrics,
reports applied once however often they are delivered (twice to one controller, or at once to
two controllers on one database: SQLite, and PostgreSQL with LINESIDE_TEST_POSTGRES), the shared
subscription's topics and client ids, and rollout ticks whose SQL does not grow with the fleet.

No test here asserts a time: batching is proven by counting transactions, and the tick's cost by
counting its statements at two fleet sizes.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from edge_bundle.release import ReleaseNotice, decode_notice
from edge_bundle.signing import KeyRole, SigningKey, TrustStore
from fleet_controller import db, rollouts
from fleet_controller.config import Config
from fleet_controller.link import Inbound, Link, subscriptions
from fleet_controller.metrics import FleetMetrics
from fleet_controller.notices import BundleFacts
from fleet_controller.plan import RolloutPlan
from fleet_controller.registry import DEVICE_UPDATES, Registry
from fleet_controller.rollout_tables import ROLLOUT_BOXES
from fleet_controller.rollouts import Rollouts
from fleet_controller.service import Controller, client_id
from tests.postgres_support import postgres_schema

KEY = SigningKey.generate(KeyRole.RELEASE)
RELEASE_TRUST = TrustStore((KEY.public,))
FACTS = BundleFacts("defects", 2, "22" * 32, 2000)


# ---- a controller without a broker ---------------------------------------------------------
@dataclass
class Recorder:
    published: list[tuple[str, bytes]] = field(default_factory=list)

    def __call__(self, topic: str, payload: bytes) -> None:
        self.published.append((topic, payload))

    def notices(self) -> list[ReleaseNotice]:
        found = []
        for _topic, payload in self.published:
            notice, _signer = decode_notice(payload, RELEASE_TRUST)
            assert isinstance(notice, ReleaseNotice)
            found.append(notice)
        return found


def controller_on(engine: Engine, config: Config | None = None) -> Controller:
    registry = Registry(engine)
    runner = Rollouts(engine, registry, key=KEY, bundle_trust=TrustStore(), publish=Recorder())
    metrics = FleetMetrics(registry, runner, stale_after_s=600)
    config = config or Config()
    return Controller(config, engine, registry, runner, Link(config.mqtt), metrics)


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    made = db.connect(f"sqlite:///{tmp_path / 'fleet.db'}")
    db.migrate(made)
    yield made
    made.dispose()


@pytest.fixture(autouse=True)
def facts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rollouts, "inspect_bundle", lambda _path, _trust: FACTS)


def telemetry(n: int, version: int = 1) -> Inbound:
    site, device = f"plant-{n % 3}", f"box{n:03d}"
    body = {
        "site": site, "device": device, "agent_version": "0.2.0", "groups": ["line1"],
        "at": time.time(), "message_id": f"t{n}-{version}-{time.monotonic_ns()}",
        "models": [{"name": "defects", "version": version, "status": "ready"}],
    }  # fmt: skip
    return Inbound(
        f"lineside/v1/{site}/{device}/telemetry", json.dumps(body).encode(), n, 1, time.time()
    )


def report(notice: ReleaseNotice, outcome: str, *, message_id: str | None = None) -> Inbound:
    ref = notice.target.device or ""
    body: dict[str, Any] = {
        "phase": outcome, "outcome": outcome, "sequence": notice.sequence, "reason": None,
        "name": notice.name, "version": notice.version, "device": ref, "at": time.time(),
        "rollout": {"id": notice.rollout.id, "wave": notice.rollout.wave}
        if notice.rollout else None,
    }  # fmt: skip
    if message_id is not None:
        body["message_id"] = message_id
    return Inbound(f"lineside/v1/{ref}/update", json.dumps(body).encode(), 0, 1, time.time())


def start_rollout(controller: Controller, boxes: int, tmp: Path, **waves: Any) -> str:
    controller.ingest_batch([telemetry(n) for n in range(boxes)])
    plan = RolloutPlan.parse(
        {
            "name": "defects-2", "bundle": "defects-2.bundle",
            "url": "https://files.plant.example/defects-2.bundle",
            "cohort": {"group": "line1"}, "waves": waves or {"percent": [100]},
            "soak_s": 0, "deadline_s": 3600,
        },
        tmp,
    )  # fmt: skip
    rollout_id: str = controller.rollouts.create(plan, actor="test")["id"]
    controller.rollouts.tick()
    return rollout_id


def recorder(controller: Controller) -> Recorder:
    publish = controller.rollouts.publish
    assert isinstance(publish, Recorder)
    return publish


@contextmanager
def counting(engine: Engine, what: str) -> Iterator[list[str]]:
    """Records every `what` event ("commit", or "statement") on `engine` while inside."""
    seen: list[str] = []

    def on_commit(_conn: Any) -> None:
        seen.append("commit")

    def on_statement(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        seen.append(statement)

    listener: Any = on_commit if what == "commit" else on_statement
    event = "commit" if what == "commit" else "before_cursor_execute"
    sa.event.listen(engine, event, listener)
    try:
        yield seen
    finally:
        sa.event.remove(engine, event, listener)


# ---- batched ingest ------------------------------------------------------------------------
def test_the_loop_stores_what_waits_in_batches_and_acks_only_what_is_committed(
    engine: Engine,
) -> None:
    """A benchmark in shape, not in time: 600 waiting messages go in far fewer transactions than
    messages, and each is acknowledged only after the transaction that stored it committed."""
    controller = controller_on(engine)
    other = db.connect(engine.url.render_as_string())
    observer = Registry(other)
    inbox: queue.Queue[Inbound] = queue.Queue()
    messages = [telemetry(n) for n in range(600)]
    for message in messages:
        inbox.put(message)
    stored_when_acked: list[bool] = []

    class Link:
        def __init__(self) -> None:
            self.inbox = inbox
            self.acked: list[Inbound] = []

        def ack(self, message: Inbound, *, wake: bool = True) -> None:
            site, device = message.topic.split("/")[2:4]
            # Read through another engine: only what is committed is visible to it.
            stored_when_acked.append(observer.device(site, device) is not None)
            self.acked.append(message)

    link = Link()
    controller.link = link  # type: ignore[assignment]
    controller.leadership.clear()  # ingest only: no ticks
    controller.config = Config.model_validate({"mqtt": {"shared_group": "g"}})
    stop = threading.Event()
    with counting(engine, "commit") as commits:
        loop = threading.Thread(target=controller.run_loop, args=(stop,))
        loop.start()
        deadline = time.monotonic() + 60
        while len(link.acked) < len(messages) and time.monotonic() < deadline:
            time.sleep(0.01)
        stop.set()
        loop.join(10)
    other.dispose()
    assert len(link.acked) == len(messages)
    assert all(stored_when_acked)
    assert len(controller.registry.devices()) == 600
    # 600 messages of up to 500 per batch: a handful of transactions, not 600.
    assert len(commits) <= 20, len(commits)
    text = controller.metrics.render()[0].decode()
    assert "fleet_ingest_batch_messages_count" in text
    batches = _sample(text, "fleet_ingest_batch_messages_count")
    assert 2 <= batches <= 20 and _sample(text, "fleet_ingest_batch_messages_sum") == 600


def test_a_failing_batch_is_stored_message_by_message_and_the_bad_one_stays_unacked(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    controller = controller_on(engine)
    messages = [telemetry(n) for n in range(10)]
    poisoned = messages[4]
    real = controller.registry.store

    def store(conn: Any, message: Any, **kwargs: Any) -> bool:
        if getattr(message, "device", None) == "box004":
            raise sa.exc.OperationalError("INSERT", {}, Exception("disk I/O error"))
        return real(conn, message, **kwargs)

    monkeypatch.setattr(controller.registry, "store", store)
    stored = controller.ingest_batch(messages)
    assert poisoned not in stored
    assert stored == [m for m in messages if m is not poisoned]
    assert {d.device for d in controller.registry.devices()} == {
        f"box{n:03d}" for n in range(10) if n != 4
    }


def test_ingest_lag_is_on_metrics(engine: Engine) -> None:
    controller = controller_on(engine)
    old = telemetry(1)
    controller.ingest_batch([Inbound(old.topic, old.payload, 1, 1, time.time() - 3.0)])
    text = controller.metrics.render()[0].decode()
    assert _sample(text, "fleet_ingest_lag_seconds_count") == 1
    assert _sample(text, "fleet_ingest_lag_seconds_sum") >= 3.0
    assert _sample(text, 'fleet_ingest_lag_seconds_bucket{le="1.0"}') == 0
    assert _sample(text, "fleet_ingest_age_seconds_count") == 1  # the box's own `at`
    assert _sample(text, "fleet_ingest_lag_p95_seconds") >= 3.0


def test_a_bad_message_in_a_batch_is_rejected_and_acknowledged_with_the_rest(
    engine: Engine,
) -> None:
    controller = controller_on(engine)
    bad = Inbound("lineside/v1/plant-0/box9/telemetry", b"{not json", 9, 1, time.time())
    messages = [telemetry(1), bad, telemetry(2)]
    assert controller.ingest_batch(messages) == messages
    assert controller.registry.rejection_counts() == {("telemetry", "not_json"): 1}
    assert [r.reason for r in controller.registry.rejections()] == ["not_json"]


# ---- reports applied once ------------------------------------------------------------------
def test_the_same_report_ingested_twice_is_stored_and_applied_once(
    engine: Engine, tmp_path: Path
) -> None:
    controller = controller_on(engine)
    rollout_id = start_rollout(controller, 3, tmp_path)
    notice = recorder(controller).notices()[0]
    committed = report(notice, "committed", message_id="m-1")
    controller.ingest_batch([committed])
    controller.ingest_batch([committed])  # a QoS 1 redelivery: the same bytes
    # A late duplicate of an earlier progress report, after the box committed.
    progress = report(notice, "progress", message_id="m-0")
    controller.ingest_batch([progress, progress])
    ref = notice.target.device or ""
    site, device = ref.split("/")
    history = controller.registry.history(site, device)
    assert [(r.outcome, r.sequence) for r in history] == [
        ("progress", notice.sequence),
        ("committed", notice.sequence),
    ]
    box = _box(controller, rollout_id, ref)
    assert box["state"] == "committed"
    text = controller.metrics.render()[0].decode()
    assert _sample(text, 'fleet_duplicates_total{kind="update"}') == 2
    assert _sample(text, 'fleet_messages_total{kind="update"}') == 2


def test_a_report_without_message_id_is_deduplicated_by_its_bytes(
    engine: Engine, tmp_path: Path
) -> None:
    controller = controller_on(engine)
    start_rollout(controller, 1, tmp_path)
    notice = recorder(controller).notices()[0]
    first = report(notice, "committed")
    controller.ingest_batch([first, first])
    again = report(notice, "committed")  # another report (its own `at`): a new one
    controller.ingest_batch([again])
    site, device = (notice.target.device or "").split("/")
    assert len(controller.registry.history(site, device)) == 2


def two_instances_apply_once(first: Controller, second: Controller, tmp: Path) -> None:
    """Both controllers ingest the same reports at the same moment; each is stored once."""
    start_rollout(first, 12, tmp)
    notices = recorder(first).notices()
    assert len(notices) == 12
    batches = [
        [report(n, "progress", message_id=f"p-{n.sequence}") for n in notices]
        + [report(n, "committed", message_id=f"c-{n.sequence}") for n in notices]
        for _ in range(2)
    ]
    barrier = threading.Barrier(2)
    errors: list[BaseException] = []

    def run(controller: Controller, batch: list[Inbound]) -> None:
        try:
            barrier.wait(10)
            for message in batch:  # one transaction per message: the most interleaving
                assert controller.ingest_batch([message], fall_back=False) == [message]
        except BaseException as exc:
            errors.append(exc)

    threads = [
        threading.Thread(target=run, args=(controller, batch))
        for controller, batch in zip((first, second), batches, strict=True)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors
    with first.engine.connect() as conn:
        rows = conn.execute(
            sa.select(DEVICE_UPDATES.c.report_key, sa.func.count()).group_by(
                DEVICE_UPDATES.c.report_key
            )
        ).all()
        states = conn.execute(sa.select(ROLLOUT_BOXES.c.state)).scalars().all()
    assert len(rows) == 24 and all(count == 1 for _key, count in rows)
    assert states == ["committed"] * 12
    duplicates = [
        _sample(c.metrics.render()[0].decode(), 'fleet_duplicates_total{kind="update"}', 0)
        for c in (first, second)
    ]
    rejected = [c.registry.rejection_counts() for c in (first, second)]
    assert sum(duplicates) == 24, rejected  # every report once stored, once skipped


def test_two_controllers_on_one_sqlite_file_apply_each_report_once(tmp_path: Path) -> None:
    engines = [db.connect(f"sqlite:///{tmp_path / 'shared.db'}") for _ in range(2)]
    db.migrate(engines[0])
    try:
        two_instances_apply_once(controller_on(engines[0]), controller_on(engines[1]), tmp_path)
    finally:
        for made in engines:
            made.dispose()


def test_two_controllers_on_postgresql_apply_each_report_once(tmp_path: Path) -> None:
    with postgres_schema("scale") as scoped:
        url = scoped.url.render_as_string(hide_password=False)
        translate = scoped.get_execution_options()["schema_translate_map"]
        bases = [db.connect(url) for _ in range(2)]
        engines = [base.execution_options(schema_translate_map=translate) for base in bases]
        try:
            db.migrate(engines[0])
            two_instances_apply_once(controller_on(engines[0]), controller_on(engines[1]), tmp_path)
        finally:
            for base in bases:
                base.dispose()


# ---- shared subscription -------------------------------------------------------------------
def test_a_shared_group_subscribes_through_share_and_each_instance_has_its_own_id() -> None:
    assert subscriptions(None) == (
        "lineside/v1/+/+/status", "lineside/v1/+/+/telemetry", "lineside/v1/+/+/update",
    )  # fmt: skip
    assert subscriptions("lineside-controllers") == tuple(
        f"$share/lineside-controllers/lineside/v1/+/+/{kind}"
        for kind in ("status", "telemetry", "update")
    )
    alone = Config.model_validate({"mqtt": {"client_id": "fleet"}})
    assert client_id(alone) == "fleet"
    named = Config.model_validate(
        {"mqtt": {"client_id": "fleet", "shared_group": "g", "instance": "a"}}
    )
    assert client_id(named) == "fleet-a"
    first = Config.model_validate(
        {"mqtt": {"client_id": "fleet", "shared_group": "g"}, "http": {"port": 8701}}
    )
    second = Config.model_validate(
        {"mqtt": {"client_id": "fleet", "shared_group": "g"}, "http": {"port": 8702}}
    )
    assert client_id(first) != client_id(second)


def test_a_bad_shared_group_is_refused_with_the_field_named() -> None:
    with pytest.raises(ValueError, match="shared_group"):
        Config.model_validate({"mqtt": {"shared_group": "a/b#"}})


# ---- ticks that do not grow with the fleet -------------------------------------------------
def statements_of_a_tick(boxes: int, tmp: Path) -> list[str]:
    made = db.connect(f"sqlite:///{tmp / f'tick-{boxes}.db'}")
    db.migrate(made)
    try:
        controller = controller_on(made)
        # A first wave of 2 boxes out and acknowledged; the rest waits for later waves.
        start_rollout(controller, boxes, tmp, counts=[2])
        assert len(recorder(controller).published) == 2
        with counting(made, "statement") as statements:
            controller.rollouts.tick()
        return statements
    finally:
        made.dispose()


def test_a_tick_runs_the_same_statements_for_40_boxes_as_for_400(tmp_path: Path) -> None:
    small = statements_of_a_tick(40, tmp_path)
    large = statements_of_a_tick(400, tmp_path)
    assert len(small) == len(large), (small, large)
    assert not any("rollout_boxes.notice" in s and "sent_at IS NULL" not in s for s in large)


def test_the_status_without_boxes_reads_no_box_row(engine: Engine, tmp_path: Path) -> None:
    controller = controller_on(engine)
    rollout_id = start_rollout(controller, 30, tmp_path, counts=[3, 10])
    full = controller.rollouts.status(rollout_id)
    with counting(engine, "statement") as statements:
        brief = controller.rollouts.status(rollout_id, boxes=False)
    assert brief == {key: value for key, value in full.items() if key != "boxes"}
    assert not any("rollout_boxes.notice" in s for s in statements)


# ---- helpers -------------------------------------------------------------------------------
def _sample(text: str, name: str, default: float | None = None) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    if default is not None:
        return default
    raise AssertionError(f"{name} is not in the metrics:\n{text[:3000]}")


def _box(controller: Controller, rollout_id: str, ref: str) -> dict[str, Any]:
    status = controller.rollouts.status(rollout_id)
    return next(box for box in status["boxes"] if box["ref"] == ref)
