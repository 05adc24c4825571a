"""edge_agent.engine.records.RequestRecords: bounded by age, count and bytes, oldest first, and rebuilt
from disk on restart."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from edge_agent.engine import records as records_module
from edge_agent.engine.records import RequestRecords

HOUR = 3600.0


def rid(n: int) -> str:
    return f"{n:032x}"


class Clock:
    """Stands in for the `time` module inside edge_agent.engine.records."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def time(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(records_module, "time", fake)
    return fake


def make(
    directory: Path,
    *,
    max_age_s: float = HOUR,
    max_bytes: int = 1_000_000,
    max_count: int = 100,
) -> RequestRecords:
    return RequestRecords(directory, max_age_s=max_age_s, max_bytes=max_bytes, max_count=max_count)


def answer(n: int) -> dict[str, object]:
    return {"request_id": rid(n), "label": "scratch", "score": 0.75}


def test_put_then_get_and_image(tmp_path: Path) -> None:
    records = make(tmp_path)
    records.put(rid(1), answer(1), b"jpeg bytes")
    assert records.get(rid(1)) == answer(1)
    assert records.image(rid(1)) == b"jpeg bytes"
    assert len(records) == 1
    body = len(json.dumps(answer(1), separators=(",", ":")))
    assert records.total_bytes == body + len(b"jpeg bytes")
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{rid(1)}.img", f"{rid(1)}.json"]


def test_a_record_without_an_image(tmp_path: Path) -> None:
    records = make(tmp_path)
    records.put(rid(1), answer(1), None)
    assert records.get(rid(1)) == answer(1)
    assert records.image(rid(1)) is None


def test_unknown_and_invalid_ids_read_as_none(tmp_path: Path) -> None:
    records = make(tmp_path)
    kept = rid(0xABCDEF)
    records.put(kept, answer(0xABCDEF), b"x")
    (tmp_path / "notes.json").write_text("{}")
    for request_id in (rid(2), "notes", "../" + kept, kept.upper(), kept + "0", kept[1:], ""):
        assert records.get(request_id) is None
        assert records.image(request_id) is None


@pytest.mark.parametrize("bad", ["", "abc", "../" + "0" * 29, "G" * 32, "0" * 31 + "/"])
def test_put_refuses_an_invalid_id(tmp_path: Path, bad: str) -> None:
    records = make(tmp_path)
    with pytest.raises(ValueError, match="32 lowercase hex digits"):
        records.put(bad, {}, b"x")
    assert list(tmp_path.iterdir()) == []


def test_eviction_by_count_drops_the_oldest(tmp_path: Path) -> None:
    records = make(tmp_path, max_count=3)
    for n in range(5):
        records.put(rid(n), answer(n), b"img")
    assert len(records) == 3
    assert [records.get(rid(n)) is not None for n in range(5)] == [False, False, True, True, True]
    assert not (tmp_path / f"{rid(0)}.json").exists()
    assert not (tmp_path / f"{rid(0)}.img").exists()


def test_eviction_by_bytes_keeps_the_total_under_the_limit(tmp_path: Path) -> None:
    image = b"i" * 400
    records = make(tmp_path, max_bytes=1500)
    for n in range(6):
        records.put(rid(n), answer(n), image)
        assert records.total_bytes <= 1500
    kept = [n for n in range(6) if records.get(rid(n)) is not None]
    assert kept == [3, 4, 5]  # each record is ~460 bytes, so three fit
    on_disk = sum(p.stat().st_size for p in tmp_path.iterdir())
    assert on_disk == records.total_bytes


def test_an_image_that_alone_breaks_the_byte_limit_is_not_kept(tmp_path: Path) -> None:
    records = make(tmp_path, max_bytes=1024)
    records.put(rid(1), answer(1), b"x" * 2000)
    assert records.get(rid(1)) == answer(1)
    assert records.image(rid(1)) is None
    assert not (tmp_path / f"{rid(1)}.img").exists()


def test_eviction_by_age(tmp_path: Path, clock: Clock) -> None:
    records = make(tmp_path, max_age_s=HOUR)
    records.put(rid(1), answer(1), b"old")
    clock.now += HOUR / 2
    records.put(rid(2), answer(2), b"newer")
    clock.now += HOUR / 2 + 1  # rid(1) is now just over an hour old
    records.prune()
    assert records.get(rid(1)) is None
    assert not (tmp_path / f"{rid(1)}.img").exists()
    assert records.get(rid(2)) == answer(2)
    clock.now += HOUR
    records.put(rid(3), answer(3), None)  # a put prunes too
    assert records.get(rid(2)) is None
    assert len(records) == 1


def test_index_is_rebuilt_from_disk_on_a_new_instance(tmp_path: Path) -> None:
    first = make(tmp_path)
    for n in range(3):
        first.put(rid(n), answer(n), b"img%d" % n)
    again = make(tmp_path)
    assert len(again) == 3
    assert again.total_bytes == first.total_bytes
    assert again.get(rid(1)) == answer(1)
    assert again.image(rid(2)) == b"img2"


def test_a_restart_with_smaller_limits_drops_the_oldest_by_file_time(tmp_path: Path) -> None:
    first = make(tmp_path)
    for n in range(4):
        first.put(rid(n), answer(n), None)
    # File times decide the order at start-up; make rid(2) the oldest and rid(0) the newest.
    now = os.stat(tmp_path / f"{rid(0)}.json").st_mtime
    for n, age in ((0, 0), (1, 100), (2, 300), (3, 200)):
        os.utime(tmp_path / f"{rid(n)}.json", (now - age, now - age))
    again = make(tmp_path, max_count=2)
    assert [again.get(rid(n)) is not None for n in range(4)] == [True, True, False, False]


def test_a_restart_drops_records_older_than_the_age_limit(tmp_path: Path) -> None:
    make(tmp_path).put(rid(1), answer(1), b"img")
    make(tmp_path).put(rid(2), answer(2), b"img")
    old = os.stat(tmp_path / f"{rid(1)}.json").st_mtime - 2 * HOUR
    os.utime(tmp_path / f"{rid(1)}.json", (old, old))
    again = make(tmp_path, max_age_s=HOUR)
    assert again.get(rid(1)) is None
    assert not (tmp_path / f"{rid(1)}.img").exists()
    assert again.get(rid(2)) == answer(2)


def test_orphan_images_and_temporary_files_are_removed_at_start(tmp_path: Path) -> None:
    make(tmp_path).put(rid(1), answer(1), b"kept")
    (tmp_path / f"{rid(2)}.img").write_bytes(b"crash before the record was written")
    (tmp_path / f".{rid(3)}.json.tmp").write_bytes(b'{"half":')
    (tmp_path / f".{rid(3)}.img.tmp").write_bytes(b"half")
    again = make(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{rid(1)}.img", f"{rid(1)}.json"]
    assert len(again) == 1
    assert again.image(rid(1)) == b"kept"


@pytest.mark.parametrize(
    "limits",
    [
        {"max_count": 0},
        {"max_bytes": 0},
        {"max_age_s": 0},
    ],
)
def test_disabled_when_a_limit_is_zero(tmp_path: Path, limits: dict[str, Any]) -> None:
    directory = tmp_path / "requests"
    records = make(directory, **limits)
    assert not records.enabled
    records.put(rid(1), answer(1), b"img")
    assert records.get(rid(1)) is None
    assert len(records) == 0
    assert not directory.exists()


def test_keeping_the_same_id_again_replaces_the_record(tmp_path: Path) -> None:
    records = make(tmp_path)
    records.put(rid(1), answer(1), b"first image")
    records.put(rid(1), {"request_id": rid(1), "label": "dent"}, b"second")
    assert len(records) == 1
    assert records.get(rid(1)) == {"request_id": rid(1), "label": "dent"}
    assert records.image(rid(1)) == b"second"
    assert records.total_bytes == sum(p.stat().st_size for p in tmp_path.iterdir())
