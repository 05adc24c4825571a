"""The fleet page's overview (`fleet_controller.page.overview`), pure: counts per model version,
the filters' values, one page of boxes with offline ones first; and the page's own files and
headers through the API app."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from typing import Any

from fleet_controller.cohorts import Selector
from fleet_controller.page import CONTENT_SECURITY_POLICY, FILES, Snapshots, overview
from fleet_controller.registry import Device, ModelState

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def box(n: int, *, online: bool = True, version: int = 1, **models: int) -> Device:
    site = ("plant-a", "plant-b")[n % 2]
    return Device(
        site=site,
        device=f"box{n:05d}",
        line=f"line{n % 3}",
        labels={},
        groups=(f"g{n % 2}",),
        profile="jetson-orin" if n % 5 == 0 else "generic-x86-64-avx2",
        agent_version="0.2.0",
        models={
            "defects": ModelState(version, "active"),
            **{name: ModelState(v, "active") for name, v in models.items()},
        },
        ready=True,
        reasons=(),
        online=online,
        last_seen=NOW,
        first_seen=NOW,
        last_telemetry_at=NOW,
    )


def test_versions_are_counted_online_and_offline_newest_version_first() -> None:
    fleet = [box(0, version=2), box(1, online=False), box(2), box(3, scratches=4)]
    found = overview(fleet)
    assert (found["fleet"], found["total"], found["online"], found["offline"]) == (4, 4, 3, 1)
    assert found["versions"] == [
        {"model": "defects", "version": 2, "boxes": 1, "online": 1, "offline": 0},
        {"model": "defects", "version": 1, "boxes": 3, "online": 2, "offline": 1},
        {"model": "scratches", "version": 4, "boxes": 1, "online": 1, "offline": 0},
    ]


def test_a_selector_narrows_the_counts_but_not_the_filters_values() -> None:
    fleet = [box(n) for n in range(10)]
    found = overview(fleet, Selector.parse({"site": "plant-b", "line": "line1"}))
    assert found["total"] == sum(1 for d in fleet if d.site == "plant-b" and d.line == "line1")
    assert found["facets"] == {
        "site": ["plant-a", "plant-b"],
        "line": ["line0", "line1", "line2"],
        "group": ["g0", "g1"],
        "profile": ["generic-x86-64-avx2", "jetson-orin"],
    }


def test_ten_thousand_boxes_give_one_page_offline_first() -> None:
    fleet = [box(n, online=n % 100 != 7) for n in range(10_000)]
    found = overview(fleet, limit=50)
    page: dict[str, Any] = found["boxes"]
    assert page["count"] == 10_000 and len(page["items"]) == 50
    assert all(not item["online"] for item in page["items"])  # the 100 offline boxes lead
    second = overview(fleet, state="offline", offset=50, limit=500)["boxes"]
    assert second["count"] == 100 and len(second["items"]) == 50
    assert overview(fleet, limit=10_000)["boxes"]["limit"] == 500
    searched = overview(fleet, query="PLANT-B/BOX0000")["boxes"]
    assert [item["ref"] for item in searched["items"]] == [
        f"plant-b/box0000{n}" for n in (7, 1, 3, 5, 9)
    ]


def test_the_page_is_three_same_origin_files_under_a_strict_policy() -> None:
    assert set(FILES) == {"/fleet", "/fleet/fleet.css", "/fleet/fleet.js"}
    assert "script-src 'self'" in CONTENT_SECURITY_POLICY
    assert "unsafe" not in CONTENT_SECURITY_POLICY


def test_requests_within_the_max_age_share_one_registry_read() -> None:
    reads: list[datetime | None] = []
    now = [0.0]

    def read(since: datetime | None) -> tuple[list[Device], datetime | None]:
        reads.append(since)
        return [box(n, online=bool(len(reads) % 2)) for n in range(4)], NOW

    snapshots = Snapshots(read, max_age_s=1.0, clock=lambda: now[0], background=False)
    first = snapshots.get()
    now[0] = 0.9
    assert snapshots.get() is first and len(reads) == 1  # shared: no second read
    now[0] = 1.5
    second = snapshots.get()
    assert second is not first and len(reads) == 2  # older than the max age: read again
    found = overview(second)
    assert found["as_of"] == second.as_of.isoformat() and found["offline"] == 4
    assert found["facets"]["site"] == ["plant-a", "plant-b"]


def test_after_the_first_read_only_changed_boxes_are_read_and_all_again_now_and_then() -> None:
    fleet = {n: box(n) for n in range(6)}
    changed: dict[int, datetime] = dict.fromkeys(fleet, NOW)
    reads: list[datetime | None] = []
    now = [0.0]

    def read(since: datetime | None) -> tuple[list[Device], datetime | None]:
        reads.append(since)
        picked = [n for n in fleet if since is None or changed[n] >= since]
        return [fleet[n] for n in picked], max((changed[n] for n in picked), default=None)

    snapshots = Snapshots(
        read, max_age_s=1.0, clock=lambda: now[0], full_every_s=60, background=False
    )
    assert overview(snapshots.get())["offline"] == 0 and reads == [None]
    later = NOW + timedelta(seconds=30)
    fleet[4], changed[4] = box(4, online=False), later  # box 4 went offline
    now[0] = 2.0
    assert overview(snapshots.get())["offline"] == 1
    assert reads[-1] == NOW - timedelta(seconds=Snapshots.OVERLAP_S)  # since the newest seen
    fleet[5], changed[5] = box(5, version=2), later + timedelta(seconds=1)
    now[0] = 4.0
    found = overview(snapshots.get())
    assert reads[-1] == later - timedelta(seconds=Snapshots.OVERLAP_S)
    assert {(v["version"], v["boxes"]) for v in found["versions"]} == {(1, 5), (2, 1)}
    assert found["total"] == 6  # the unchanged boxes are kept, not dropped
    del fleet[0]  # a box gone from the registry: seen at the next full read
    now[0] = 70.0
    assert overview(snapshots.get())["total"] == 5 and reads[-1] is None


def test_a_request_gets_the_current_snapshot_while_the_next_is_read_behind_it() -> None:
    now = [0.0]
    reads: list[datetime | None] = []
    release = threading.Event()
    read_started = threading.Event()
    read_done = threading.Event()

    def read(since: datetime | None) -> tuple[list[Device], datetime | None]:
        reads.append(since)
        if len(reads) > 1:
            read_started.set()
            assert release.wait(30)
            read_done.set()
        return [box(n, online=len(reads) == 1) for n in range(3)], NOW

    snapshots = Snapshots(read, max_age_s=1.0, clock=lambda: now[0], stale_s=30)
    first = snapshots.get()  # the first request reads while it waits
    assert overview(first)["offline"] == 0
    now[0] = 2.0
    assert snapshots.get() is first  # stale: answered at once, the next read started behind it
    assert read_started.wait(30)
    assert snapshots.get() is first and len(reads) == 2  # one background read at a time
    release.set()
    assert read_done.wait(30)
    for thread in threading.enumerate():  # until the background read has put its snapshot in
        if thread.name == "overview-snapshot":
            thread.join(30)
    assert overview(snapshots.get())["offline"] == 3
    now[0] = 100.0  # nobody asked for longer than stale_s: this request waits for a fresh read
    release.set()
    assert overview(snapshots.get())["offline"] == 3 and len(reads) == 3
