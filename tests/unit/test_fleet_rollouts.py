"""The rollouts runner on a temporary SQLite file, with the real registry filled from parsed box
messages, a fake broker link that records (topic, bytes) and can fail, simulated update reports
and an injected clock (no sleeps).

The bundle's verification is `notices.inspect_bundle`'s own business (tested there): here it is
replaced by the facts it would return, so these tests need no packaged model.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import Engine

from edge_bundle.release import ReleaseNotice, decode_notice
from edge_bundle.signing import KeyRole, SigningKey, TrustStore
from fleet_controller import db, rollouts
from fleet_controller.errors import BadMessageError, ConflictError, FleetError, NotFoundError
from fleet_controller.notices import BundleFacts
from fleet_controller.plan import RolloutPlan
from fleet_controller.registry import Registry, UpdateReport, parse
from fleet_controller.rollouts import Rollouts
from fleet_controller.sending import NOTICE_BATCH

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
KEY = SigningKey.generate(KeyRole.RELEASE)
RELEASE_TRUST = TrustStore((KEY.public,))
BUNDLES = {
    "defects-1.bundle": BundleFacts("defects", 1, "11" * 32, 1000),
    "defects-2.bundle": BundleFacts("defects", 2, "22" * 32, 2000),
}


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


class Crash(BaseException):
    """Stands in for a SIGKILL: nothing in the runner catches it."""


@dataclass
class Broker:
    """Records what was published (acknowledged); `fail` refuses, `crash_after` dies after."""

    published: list[tuple[str, bytes]] = field(default_factory=list)
    fail: bool = False
    crash_after: int | None = None

    def __call__(self, topic: str, payload: bytes) -> None:
        if self.fail:
            raise ConnectionError("broker unreachable")
        self.published.append((topic, payload))
        if self.crash_after is not None and len(self.published) >= self.crash_after:
            self.crash_after = None
            raise Crash

    def notices(self) -> list[ReleaseNotice]:
        found = []
        for _, payload in self.published:
            notice, _ = decode_notice(payload, RELEASE_TRUST)
            assert isinstance(notice, ReleaseNotice)
            found.append(notice)
        return found

    def devices(self, *, rollback: bool = False) -> list[str]:
        return [n.target.device or "" for n in self.notices() if n.rollback == rollback]


@dataclass
class Fleet:
    engine: Engine
    registry: Registry
    clock: Clock
    broker: Broker
    tmp: Path

    def runner(self) -> Rollouts:
        """A controller process: a new one after a crash, on the same database."""
        return Rollouts(
            self.engine,
            self.registry,
            key=KEY,
            bundle_trust=TrustStore(),
            publish=self.broker,
            clock=self.clock,
        )

    def box(
        self,
        ref: str,
        *,
        version: int | None = 1,
        agent: str = "0.2.0",
        groups: tuple[str, ...] = ("line1",),
    ) -> None:
        site, device = ref.split("/")
        models = (
            [] if version is None else [{"name": "defects", "version": version, "status": "ready"}]
        )
        body = {
            "site": site,
            "device": device,
            "agent_version": agent,
            "models": models,
            "groups": list(groups),
        }
        self.registry.record(
            parse(f"lineside/v1/{ref}/telemetry", json.dumps(body).encode()), now=self.clock()
        )

    def plan(self, bundle: str = "defects-2.bundle", **fields: Any) -> RolloutPlan:
        data: dict[str, Any] = {
            "name": bundle.removesuffix(".bundle"),
            "bundle": bundle,
            "url": f"https://files.plant.example/{bundle}",
            "cohort": {"group": "line1"},
            "waves": {"counts": [1, 2]},
            "soak_s": 60,
            "deadline_s": 3600,
            "gates": {"min_installs": 1},
        }
        data.update(fields)
        return RolloutPlan.parse(data, self.tmp)

    def report(
        self, runner: Rollouts, ref: str, outcome: str, *, rollback: bool = False, **changes: Any
    ) -> str | None:
        """The box answers its latest notice as an agent would, through the service's path."""
        site, device = ref.split("/")
        notice = [
            n for n in self.broker.notices() if n.target.device == ref and n.rollback == rollback
        ][-1]
        values: dict[str, Any] = {
            "site": site, "device": device, "sequence": notice.sequence, "phase": outcome,
            "outcome": outcome, "reason": None, "name": notice.name, "version": notice.version,
            "at": self.clock(), "rollout_id": notice.rollout.id if notice.rollout else None,
            "wave": notice.rollout.wave if notice.rollout else None,
        }  # fmt: skip
        values.update(changes)
        report = UpdateReport(**values)
        rollout_id = runner.attribute(report)
        self.registry.record(report, rollout_id=rollout_id, now=self.clock())
        runner.on_report(report, rollout_id)
        return rollout_id


@pytest.fixture
def fleet(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Fleet]:
    def inspect(path: Path, trust: TrustStore) -> BundleFacts:
        if path.name not in BUNDLES:
            raise FleetError(f"the bundle {path} is refused: it is not signed")
        return BUNDLES[path.name]

    monkeypatch.setattr(rollouts, "inspect_bundle", inspect)
    engine = db.connect(f"sqlite:///{tmp_path / 'fleet.db'}")
    db.create_tables(engine)
    yield Fleet(engine, Registry(engine), Clock(), Broker(), tmp_path)
    engine.dispose()


def three_boxes(fleet: Fleet) -> None:
    for ref in ("plant-a/box1", "plant-a/box2", "plant-b/box3"):
        fleet.box(ref)


def commit_all(fleet: Fleet, runner: Rollouts, refs: list[str], version: int = 2) -> None:
    for ref in refs:
        fleet.report(runner, ref, "progress")
        fleet.report(runner, ref, "committed")
        fleet.box(ref, version=version)


def waves_of(status: dict[str, Any]) -> list[list[str]]:
    waves: list[list[str]] = [[] for _ in status["per_wave"]]
    for box in status["boxes"]:
        waves[box["wave"] - 1].append(box["ref"])
    return waves


# ---- the happy path ---------------------------------------------------------------------
def test_a_good_release_goes_through_three_waves(fleet: Fleet) -> None:
    for number in range(7):
        fleet.box(f"plant-a/box{number}")
    runner = fleet.runner()
    created = runner.create(fleet.plan(waves={"counts": [1, 2]}), actor="alice")
    assert created["id"] == "defects-2" and created["status"] == "running"
    assert [wave["total"] for wave in created["per_wave"]] == [1, 2, 4]
    assert fleet.broker.published == []  # create sends nothing
    waves = waves_of(created)
    for number, wave in enumerate(waves, start=1):
        runner.tick()
        assert sorted(fleet.broker.devices()) == sorted(ref for w in waves[:number] for ref in w)
        status = runner.status("defects-2")
        assert (status["wave"], status["phase"]) == (number, "installing")
        commit_all(fleet, runner, wave)
        runner.tick()
        assert runner.status("defects-2")["phase"] == "soaking"
        fleet.clock.advance(60)
    runner.tick()
    status = runner.status("defects-2")
    assert status["status"] == "completed"
    assert status["counts"]["committed"] == 7
    assert {gate["name"] for gate in status["gates"]} >= {"install", "p95"}
    notices = fleet.broker.notices()
    assert len({n.sequence for n in notices}) == 7
    assert all(n.rollout is not None and n.schema_version == 2 and n.version == 2 for n in notices)
    assert [n.rollout.wave for n in notices if n.rollout] == [1, 2, 2, 3, 3, 3, 3]
    whats = [entry["what"] for entry in runner.audit("defects-2")]
    assert whats[0] == "created" and whats[-1] == "completed" and whats.count("wave-passed") == 2
    assert runner.active_refs() == set()
    assert runner.list()[0]["counts"]["committed"] == 7


def test_old_agents_get_v1_notices_and_their_reports_are_tied_by_sequence(fleet: Fleet) -> None:
    fleet.box("plant-a/old", agent="0.1.0")
    runner = fleet.runner()
    runner.create(fleet.plan(waves={"counts": [1]}), actor="alice")
    runner.tick()
    (notice,) = fleet.broker.notices()
    assert (notice.schema_version, notice.rollout) == (1, None)
    assert fleet.report(runner, "plant-a/old", "committed") == "defects-2"
    assert runner.status("defects-2")["boxes"][0]["state"] == "committed"


# ---- halting and rolling back -----------------------------------------------------------
def test_a_bad_canary_halts_and_rolls_back_and_later_waves_never_get_the_release(
    fleet: Fleet,
) -> None:
    refs = [f"plant-a/box{number}" for number in range(8)]
    for ref in refs:
        fleet.box(ref)
    runner = fleet.runner()
    # The baseline: defects@1 is already everywhere, so nothing is sent, but its bundle is known.
    runner.create(fleet.plan("defects-1.bundle", waves={"counts": [8]}), actor="alice")
    runner.tick()
    fleet.clock.advance(60)
    runner.tick()
    baseline = runner.status("defects-1")
    assert baseline["status"] == "completed" and fleet.broker.published == []
    assert baseline["boxes"][0]["reason"].endswith("already runs defects@1; nothing was sent")

    status = runner.create(
        fleet.plan(waves={"counts": [4]}, gates={"min_installs": 3}), actor="alice"
    )
    canary = waves_of(status)[0]
    runner.tick()
    assert sorted(fleet.broker.devices()) == sorted(canary)
    commit_all(fleet, runner, canary[:2])
    for ref in canary[2:]:
        fleet.report(runner, ref, "rolled_back", reason="probation: p95 over budget")
    runner.tick()
    fleet.clock.advance(60)
    runner.tick()
    status = runner.status("defects-2")
    assert status["status"] == "rolling_back"
    assert "install" in status["halt_reason"]
    install = next(gate for gate in status["gates"] if gate["name"] == "install")
    assert install["status"] == "fail" and install["value"] == 0.5
    # What /metrics reads: the same results, without the box rows.
    assert list(runner.gates("defects-2")) == [*status["shadow_gates"], *status["gates"]]
    halted = next(entry for entry in runner.audit("defects-2") if entry["what"] == "halted")
    assert halted["actor"] == "rule:install" and halted["figures"]["gates"]
    # Rollbacks go to the two that committed, not to those that rolled back on their own.
    assert sorted(fleet.broker.devices(rollback=True)) == sorted(canary[:2])
    rollback = next(n for n in fleet.broker.notices() if n.rollback)
    assert (rollback.version, rollback.bundle_sha256) == (1, BUNDLES["defects-1.bundle"].sha256)
    assert rollback.url.endswith("defects-1.bundle")
    for ref in canary[:2]:
        fleet.report(runner, ref, "committed", rollback=True)
    runner.tick()
    status = runner.status("defects-2")
    assert status["status"] == "rolled_back" and status["rollback"] == {"committed": 2}
    assert set(fleet.broker.devices()) == set(canary)  # later waves never saw the release
    assert status["per_wave"][1]["counts"]["pending"] == 4


def test_a_rollback_without_a_known_previous_bundle_is_skipped_and_audited(fleet: Fleet) -> None:
    fleet.box("plant-a/new", version=None)
    fleet.box("plant-a/v1")
    runner = fleet.runner()
    runner.create(fleet.plan(waves={"counts": [2]}), actor="alice")
    runner.tick()
    runner.command("defects-2", "rollback", actor="bob", why="wrong labels")
    runner.tick()
    status = runner.status("defects-2")
    assert status["status"] == "rolled_back"
    reasons = {box["ref"]: box["rollback_reason"] for box in status["boxes"]}
    assert "no version of defects" in reasons["plant-a/new"]
    assert "nor was it rolled out by this controller" in reasons["plant-a/v1"]
    skipped = [entry for entry in runner.audit("defects-2") if entry["what"] == "rollback-skipped"]
    assert len(skipped) == 2
    assert fleet.broker.devices(rollback=True) == []


# ---- deadlines --------------------------------------------------------------------------
def test_an_offline_box_times_out_without_blocking_and_a_late_outcome_replaces_it(
    fleet: Fleet,
) -> None:
    three_boxes(fleet)
    runner = fleet.runner()
    runner.create(fleet.plan(waves={"counts": [3]}, deadline_s=600), actor="alice")
    runner.tick()
    commit_all(fleet, runner, ["plant-a/box1", "plant-a/box2"])
    runner.tick()
    assert runner.status("defects-2")["phase"] == "installing"
    fleet.clock.advance(599)
    runner.tick()
    assert runner.status("defects-2")["phase"] == "installing"
    fleet.clock.advance(1)
    runner.tick()
    status = runner.status("defects-2")
    assert status["phase"] == "soaking" and status["counts"]["timed_out"] == 1
    fleet.report(runner, "plant-b/box3", "committed")
    fleet.clock.advance(60)
    runner.tick()
    status = runner.status("defects-2")
    assert status["status"] == "completed" and status["counts"]["committed"] == 3


def test_a_closed_window_holds_its_site_back(fleet: Fleet) -> None:
    three_boxes(fleet)
    runner = fleet.runner()
    closed = {"plant-b": {"tz": "UTC", "open": ["22:00-23:00"]}}
    runner.create(fleet.plan(waves={"counts": [3]}, windows=closed), actor="alice")
    runner.tick()
    assert sorted(fleet.broker.devices()) == ["plant-a/box1", "plant-a/box2"]
    assert runner.status("defects-2")["phase"] == "sending"
    fleet.clock.advance(10 * 3600)  # 22:00 UTC
    runner.tick()
    assert "plant-b/box3" in fleet.broker.devices()
    assert runner.status("defects-2")["phase"] == "installing"


# ---- crash safety -----------------------------------------------------------------------
def test_a_restart_mid_wave_republishes_identical_bytes_and_skips_no_box(fleet: Fleet) -> None:
    for number in range(5):
        fleet.box(f"plant-a/box{number}")
    first = fleet.runner()
    first.create(fleet.plan(waves={"counts": [5]}), actor="alice")
    fleet.broker.crash_after = 2  # dies after the broker acknowledged the 2nd, before marking it
    with pytest.raises(Crash):
        first.tick()
    before = list(fleet.broker.published)
    second = fleet.runner()  # a new process on the same database
    second.tick()
    after = fleet.broker.published[len(before) :]
    # A batch is marked sent together: the two the broker acknowledged before the crash were
    # never marked, so they go out again byte for byte (a box ignores a sequence it has seen),
    # then the three never sent; every box's notice once more, none skipped.
    assert after[:2] == before
    assert len(after) == 5
    devices = [topic for topic, _ in fleet.broker.published]
    assert sorted(set(devices)) == sorted(f"lineside/v1/plant-a/box{n}/release" for n in range(5))
    stored = {box["ref"]: box["sequence"] for box in second.status("defects-2")["boxes"]}
    assert {n.target.device: n.sequence for n in fleet.broker.notices()} == stored
    assert all(box["sent_at"] for box in second.status("defects-2")["boxes"])


def test_a_failing_broker_keeps_the_notice_stored_and_it_goes_out_unchanged_later(
    fleet: Fleet,
) -> None:
    fleet.box("plant-a/box1")
    runner = fleet.runner()
    runner.create(fleet.plan(waves={"counts": [1]}), actor="alice")
    fleet.broker.fail = True
    runner.tick()
    box = runner.status("defects-2")["boxes"][0]
    assert (box["state"], box["sent_at"]) == ("sent", None)
    fleet.clock.advance(10 * 3600)  # no deadline runs for a notice never acknowledged
    runner.tick()
    assert runner.status("defects-2")["boxes"][0]["state"] == "sent"
    fleet.broker.fail = False
    runner.tick()
    (notice,) = fleet.broker.notices()
    assert notice.sequence == box["sequence"] and notice.issued_at == T0
    assert runner.status("defects-2")["boxes"][0]["sent_at"] is not None


def test_a_wave_goes_out_in_batches_and_a_partly_acknowledged_batch_resends_only_the_rest(
    fleet: Fleet,
) -> None:
    boxes = NOTICE_BATCH + 50
    with db.transaction(fleet.engine) as conn:  # a wave larger than a batch, quickly
        for number in range(boxes):
            fleet.registry.store(
                conn,
                parse(
                    f"lineside/v1/plant-a/b{number:04d}/telemetry",
                    json.dumps(
                        {"site": "plant-a", "device": f"b{number:04d}", "agent_version": "0.2.0",
                         "groups": ["line1"],
                         "models": [{"name": "defects", "version": 1, "status": "ready"}]}
                    ).encode(),
                ),
            )  # fmt: skip
    calls: list[list[tuple[str, bytes]]] = []
    refused = {f"lineside/v1/plant-a/b{number:04d}/release" for number in (3, 7)}

    def publish_many(items: Sequence[tuple[str, bytes]]) -> list[BaseException | None]:
        calls.append(list(items))
        return [ConnectionError("quota") if topic in refused else None for topic, _ in items]

    runner = Rollouts(
        fleet.engine, fleet.registry, key=KEY, bundle_trust=TrustStore(),
        publish=fleet.broker, publish_many=publish_many, clock=fleet.clock,
    )  # fmt: skip
    runner.create(fleet.plan(waves={"counts": [boxes]}), actor="alice")
    runner.tick()
    # The first batch went out whole; two were not acknowledged, so the wave waits there.
    assert [len(call) for call in calls] == [NOTICE_BATCH]
    rows = {box["ref"]: box for box in runner.status("defects-2")["boxes"]}
    unsent = sorted(
        ref for ref, box in rows.items() if box["state"] == "sent" and not box["sent_at"]
    )
    assert unsent == ["plant-a/b0003", "plant-a/b0007"]
    assert sum(1 for box in rows.values() if box["state"] == "pending") == 50
    first = dict(calls[0])
    refused.clear()
    runner.tick()
    # The two again, byte-identical, alone; then the rest of the wave in its own batch.
    assert [len(call) for call in calls[1:]] == [2, 50]
    assert all(first[topic] == payload for topic, payload in calls[1])
    rows = {box["ref"]: box for box in runner.status("defects-2")["boxes"]}
    assert all(box["state"] == "sent" and box["sent_at"] for box in rows.values())
    sequences = [box["sequence"] for box in rows.values()]
    assert len(set(sequences)) == boxes  # one sequence per box, never shared


def test_sequences_grow_past_the_clock_and_never_repeat(fleet: Fleet) -> None:
    three_boxes(fleet)
    runner = fleet.runner()
    runner.create(fleet.plan(waves={"counts": [3]}), actor="alice")
    runner.tick()
    sequences = [n.sequence for n in fleet.broker.notices()]
    now_ms = int(T0.timestamp() * 1000)
    assert sequences == [now_ms, now_ms + 1, now_ms + 2]


# ---- refusals ---------------------------------------------------------------------------
def test_overlapping_rollouts_are_refused_naming_boxes_and_rollout(fleet: Fleet) -> None:
    three_boxes(fleet)
    runner = fleet.runner()
    runner.create(fleet.plan(), actor="alice")
    with pytest.raises(ConflictError, match=r"plant-a/box1 \(in defects-2\)"):
        runner.create(fleet.plan(cohort={"devices": ["plant-a/box1"]}), actor="bob")
    assert [item["id"] for item in runner.list()] == ["defects-2"]
    runner.command("defects-2", "cancel", actor="alice")
    again = runner.create(fleet.plan(), actor="bob")
    assert again["id"] == "defects-2-2"


def test_empty_cohorts_unknown_devices_and_bad_bundles_are_refused(fleet: Fleet) -> None:
    three_boxes(fleet)
    runner = fleet.runner()
    with pytest.raises(FleetError, match="picks no box"):
        runner.create(fleet.plan(cohort={"group": "nowhere"}), actor="alice")
    with pytest.raises(FleetError, match="never heard of: plant-z/box9"):
        runner.create(
            fleet.plan(cohort={"devices": ["plant-a/box1", "plant-z/box9"]}), actor="alice"
        )
    with pytest.raises(FleetError, match="not signed"):
        runner.create(fleet.plan("forged.bundle"), actor="alice")
    assert runner.list() == []


def test_reports_naming_an_unknown_rollout_or_sequence_are_rejected(fleet: Fleet) -> None:
    three_boxes(fleet)
    runner = fleet.runner()
    runner.create(fleet.plan(waves={"counts": [3]}), actor="alice")
    runner.tick()
    with pytest.raises(BadMessageError) as caught:
        fleet.report(runner, "plant-a/box1", "committed", rollout_id="ghost")
    assert (caught.value.kind, caught.value.reason) == ("update", "unknown-rollout")
    with pytest.raises(BadMessageError) as caught:
        fleet.report(runner, "plant-a/box1", "committed", sequence=5)
    assert caught.value.reason == "unknown-sequence"
    # No rollout named, a sequence the controller never issued: kept, unattributed.
    assert fleet.report(runner, "plant-a/box1", "committed", sequence=5, rollout_id=None) is None
    assert runner.status("defects-2")["counts"]["committed"] == 0


def test_a_replayed_notice_reported_ignored_never_undoes_an_outcome(fleet: Fleet) -> None:
    fleet.box("plant-a/box1")
    fleet.box("plant-a/box2")
    runner = fleet.runner()
    runner.create(fleet.plan(waves={"counts": [2]}), actor="alice")
    runner.tick()
    fleet.report(runner, "plant-a/box1", "committed")
    fleet.report(runner, "plant-a/box1", "ignored")
    fleet.report(runner, "plant-a/box2", "progress")
    fleet.report(runner, "plant-a/box2", "ignored")
    states = {box["ref"]: box["state"] for box in runner.status("defects-2")["boxes"]}
    assert states == {"plant-a/box1": "committed", "plant-a/box2": "progress"}


# ---- steering ---------------------------------------------------------------------------
def test_pause_holds_the_next_wave_and_commands_are_audited(fleet: Fleet) -> None:
    three_boxes(fleet)
    runner = fleet.runner()
    status = runner.create(fleet.plan(soak_s=0), actor="alice")
    runner.tick()
    runner.command("defects-2", "pause", actor="bob", why="line stop")
    commit_all(fleet, runner, waves_of(status)[0])
    runner.tick()
    assert len(fleet.broker.published) == 1
    with pytest.raises(ConflictError, match="only a running rollout can be paused"):
        runner.command("defects-2", "pause", actor="bob")
    runner.command("defects-2", "resume", actor="bob")
    runner.tick()
    assert len(fleet.broker.published) == 3
    entries = [(e["what"], e["actor"], e["why"]) for e in runner.audit("defects-2")]
    assert [what for what, _, _ in entries] == [
        "created",
        "paused",
        "resumed",
        "wave-installed",
        "wave-passed",
    ]
    assert entries[1] == ("paused", "bob", "line stop")
    with pytest.raises(NotFoundError):
        runner.status("nope")
    with pytest.raises(NotFoundError):
        runner.command("nope", "pause", actor="bob")


def test_resuming_a_completed_rollout_is_a_conflict(fleet: Fleet) -> None:
    fleet.box("plant-a/box1")
    runner = fleet.runner()
    runner.create(fleet.plan(waves={"counts": [1]}, soak_s=0), actor="alice")
    runner.tick()
    commit_all(fleet, runner, ["plant-a/box1"])
    runner.tick()
    assert runner.status("defects-2")["status"] == "completed"
    with pytest.raises(ConflictError, match="cannot resume a rollout that is completed"):
        runner.command("defects-2", "resume", actor="bob")


def test_preview_sends_nothing_and_shows_the_waves(fleet: Fleet) -> None:
    three_boxes(fleet)
    runner = fleet.runner()
    preview = runner.preview(fleet.plan())
    assert preview["count"] == 3 and preview["wave_sizes"] == [1, 2]
    assert runner.list() == [] and fleet.broker.published == []


# ---- a real SIGKILL at each crash point -------------------------------------------------
CRASHING_CONTROLLER = """
import json, sys
from datetime import datetime
from pathlib import Path
from edge_bundle.signing import SigningKey, KeyRole, TrustStore
from fleet_controller import db, rollouts
from fleet_controller.notices import BundleFacts
from fleet_controller.plan import RolloutPlan
from fleet_controller.registry import Registry

tmp = Path(sys.argv[1])
key = SigningKey(KeyRole.RELEASE, bytes.fromhex(sys.argv[2]))
rollouts.inspect_bundle = lambda path, trust: BundleFacts("defects", 2, "22" * 32, 2000)

def publish(topic, payload):
    with open(tmp / "published.jsonl", "a") as out:
        out.write(json.dumps([topic, payload.hex()]) + "\\n")

engine = db.connect(f"sqlite:///{tmp / 'fleet.db'}")
runner = rollouts.Rollouts(engine, Registry(engine), key=key, bundle_trust=TrustStore(),
                           publish=publish, clock=lambda: datetime.fromisoformat(sys.argv[3]))
if not runner.list():
    plan = {"name": "defects-2", "bundle": "defects-2.bundle", "url": "https://f/defects-2.bundle",
            "cohort": {"group": "line1"}, "waves": {"counts": [2]}, "soak_s": 0}
    runner.create(RolloutPlan.parse(plan, tmp), actor="alice")
runner.tick()
"""


@pytest.mark.parametrize("point", ["notice.stored:2", "notice.published:2", "any:3"])
def test_a_controller_killed_at_a_crash_point_resumes_without_skipping_or_changing_a_notice(
    fleet: Fleet, point: str
) -> None:
    for number in range(4):
        fleet.box(f"plant-a/box{number}")
    script = fleet.tmp / "controller.py"
    script.write_text(CRASHING_CONTROLLER)
    args = [sys.executable, str(script), str(fleet.tmp), KEY.private_raw.hex(), T0.isoformat()]
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "FLEET_CONTROLLER_CRASH_AT": point, "PYTHONPATH": root}
    killed = subprocess.run(args, env=env, capture_output=True, timeout=120, check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()[-2000:]
    env.pop("FLEET_CONTROLLER_CRASH_AT")
    done = subprocess.run(args, env=env, capture_output=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    published = [
        json.loads(line) for line in (fleet.tmp / "published.jsonl").read_text().splitlines()
    ]
    by_topic: dict[str, set[str]] = {}
    for topic, payload in published:
        by_topic.setdefault(topic, set()).add(payload)
    resumed_again = fleet.runner()
    resumed_again.tick()
    assert fleet.broker.published == []  # nothing was left to publish
    boxes = resumed_again.status("defects-2")["boxes"]
    first = [box for box in boxes if box["wave"] == 1]
    assert sorted(by_topic) == sorted(f"lineside/v1/{box['ref']}/release" for box in first)
    assert all(box["sent_at"] and box["state"] == "sent" for box in first)  # none skipped
    assert all(len(payloads) == 1 for payloads in by_topic.values())  # re-sent byte-identical
