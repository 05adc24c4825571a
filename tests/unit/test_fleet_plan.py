"""The rollout plan: the TOML of docs/fleet.md, every refusal with its message, wave sizes for
many cohorts, deterministic wave assignment, and site windows across midnight and DST."""

from __future__ import annotations

import itertools
import re
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from fleet_controller.errors import FleetError
from fleet_controller.plan import (
    Exponential,
    GatesSpec,
    RolloutPlan,
    WavesSpec,
    Window,
    assign_waves,
    wave_sizes,
)

DOCS = Path(__file__).resolve().parents[2] / "docs" / "fleet.md"
BASE = Path("/srv/plans")
MINIMAL = """
name = "defects-4"
bundle = "dist/defects-4.bundle"
url = "https://files.plant.example/defects-4.bundle"
cohort = { group = "line1" }
"""


def documented_plan() -> str:
    """The example plan of docs/fleet.md "Rollouts", as written there."""
    text = DOCS.read_text(encoding="utf-8")
    section = text.split("## Rollouts", 1)[1]
    return section.split("```toml", 1)[1].split("```", 1)[0]


def plan(extra: str = "", waves: str = "[waves]\npercent = [100]\n") -> RolloutPlan:
    return RolloutPlan.from_toml(MINIMAL + extra + "\n" + waves, BASE)


# --- parsing --------------------------------------------------------------------------------


def test_the_documented_plan_parses_as_documented() -> None:
    parsed = RolloutPlan.from_toml(documented_plan(), BASE)
    assert parsed.name == "defects-4"
    assert parsed.bundle == BASE / "dist" / "defects-4.bundle"
    assert parsed.url == "https://files.plant.example/defects-4.bundle"
    assert parsed.cohort == {"group": "line1"}
    assert parsed.waves == WavesSpec(percent=[5, 25, 100], min_per_wave=1)
    assert (parsed.soak_s, parsed.deadline_s) == (900, 86400)
    assert parsed.windows == {"plant-a": Window(tz="Europe/Berlin", open=["22:00-05:00"])}
    assert parsed.gates == GatesSpec()
    assert parsed.rollback_on_halt is True
    assert parsed.notes is None


def test_defaults_and_the_gates_of_the_docs() -> None:
    parsed = plan()
    assert (parsed.soak_s, parsed.deadline_s, parsed.windows) == (900, 86400, {})
    assert parsed.rollback_on_halt is True
    assert GatesSpec().model_dump() == {
        "max_failure_ratio": 0.2,
        "min_installs": 3,
        "max_p95_ratio": 1.5,
        "max_error_rate_increase": 0.02,
        "max_selftest_failures": 0,
        "max_drift_alerts": 0,
        "min_boxes": 2,
        "min_samples": 50,
    }


def test_every_table_is_read(tmp_path: Path) -> None:
    parsed = RolloutPlan.from_toml(
        """
name = "defects-5"
bundle = "/abs/defects-5.bundle"
url = "http://files/defects-5.bundle"
cohort = { site = ["plant-a", "plant-b"], labels = { camera = "v2" } }
notes = "fixes the shiny parts"
soak_s = 60
deadline_s = 3600.5

[waves]
exponential = { start = 2, factor = 4 }
min_per_wave = 3

[windows]
plant-a = { tz = "Europe/Berlin", open = ["22:00-05:00", "12:00-13:00"] }
plant-b = { tz = "America/New_York", open = ["00:00-24:00"] }

[gates]
max_failure_ratio = 0
min_installs = 10
max_p95_ratio = 2
min_samples = 1

[on_halt]
rollback = false
""",
        tmp_path,
    )
    assert parsed.bundle == Path("/abs/defects-5.bundle")
    assert parsed.cohort == {"site": ["plant-a", "plant-b"], "labels": {"camera": "v2"}}
    assert parsed.waves.exponential == Exponential(start=2, factor=4)
    assert parsed.waves.min_per_wave == 3
    assert (parsed.soak_s, parsed.deadline_s) == (60, 3600.5)
    assert parsed.windows["plant-b"].tz == "America/New_York"
    assert parsed.gates.max_failure_ratio == 0
    assert parsed.gates.min_installs == 10
    assert parsed.gates.min_boxes == 2  # untouched defaults stay
    assert parsed.rollback_on_halt is False
    assert parsed.notes == "fixes the shiny parts"


def test_relative_bundles_are_taken_from_the_plans_directory(tmp_path: Path) -> None:
    parsed = RolloutPlan.from_toml(MINIMAL + "[waves]\ncounts = [1]\n", tmp_path / "plans")
    assert parsed.bundle == (tmp_path / "plans" / "dist" / "defects-4.bundle").resolve()
    assert parsed.bundle.is_absolute()


def test_json_round_trip_is_exact() -> None:
    parsed = RolloutPlan.from_toml(documented_plan(), BASE)
    stored = parsed.to_json()
    assert stored["bundle"] == "/srv/plans/dist/defects-4.bundle"
    assert stored["rollback_on_halt"] is True
    assert RolloutPlan.from_json(stored) == parsed
    assert RolloutPlan.from_json(stored).to_json() == stored


BAD_PLANS: list[tuple[str, str, str]] = [
    ("", "[waves]\npercent = [5, 50]", "wave plan that does not add up"),
    ("", "[waves]\npercent = [25, 5, 100]", "must grow from wave to wave"),
    ("", "[waves]\npercent = [5, 5, 100]", "must grow from wave to wave"),
    ("", "[waves]\npercent = [0, 100]", r"waves\.percent\.0: .*greater than 0"),
    ("", "[waves]\npercent = [50, 120]", r"waves\.percent\.1: .*100"),
    ("", "[waves]\npercent = []", r"waves\.percent: .*e\.g\. percent = \[5, 25, 100\]"),
    ("", "[waves]\npercent = [100]\ncounts = [3]", "exactly one of .*got percent and counts"),
    ("", "[waves]\nmin_per_wave = 2", "exactly one of percent"),
    ("", "[waves]\ncounts = [3, 0]", r"waves\.counts\.1: .*at least 1"),
    ("", "[waves]\ncounts = [3.5]", r"waves\.counts\.0: .*integer"),
    ("", "[waves]\nexponential = { start = 0, factor = 4 }", r"exponential\.start: .*start = 2"),
    ("", "[waves]\nexponential = { start = 1, factor = 1 }", r"exponential\.factor: .*above 1"),
    ("", "[waves]\nexponential = { start = 1 }", r"exponential\.factor: missing"),
    ("", "[waves]\npercent = [100]\nmin_per_wave = 0", r"waves\.min_per_wave: .*at least 1"),
    ("", "[waves]\npercent = [100]\nsoak_s = -1", r"soak_s: .*soak_s = 900"),
    ("", "[waves]\npercent = [100]\ndeadline_s = 0", r"deadline_s: .*deadline_s = 86400"),
    ("soak_s = 5", "[waves]\npercent = [100]\nsoak_s = 6", "soak_s is given twice"),
    ("", "[waves]\npercent = [100]\nspeed = 3", r"waves\.speed: unknown field.*min_per_wave"),
    ("", "", r"waves: missing; write a \[waves\] table"),
    ("[gates]\nmin_boxes = 0", "[waves]\npercent = [100]", r"gates\.min_boxes: .*min_boxes = 2"),
    (
        "[gates]\nmax_failure_ratio = 1.5",
        "[waves]\npercent = [100]",
        r"max_failure_ratio: .*0 to 1",
    ),
    ("[gates]\nmax_p95_ratio = 0.5", "[waves]\npercent = [100]", r"max_p95_ratio: .*at least 1"),
    (
        "[gates]\nmin_install = 3",
        "[waves]\npercent = [100]",
        r"gates\.min_install: unknown.*min_installs",
    ),
    ("[on_halt]\nrollback = 1", "[waves]\npercent = [100]", r"on_halt\.rollback: .*true or false"),
    (
        "[on_halt]\nrollbak = true",
        "[waves]\npercent = [100]",
        "on_halt holds rollback and previous",
    ),
    ("rollout = 1", "[waves]\npercent = [100]", "unknown field 'rollout'"),
    (
        '[windows]\nplant-a = { tz = "Mars/Olympus", open = ["22:00-05:00"] }',
        "[waves]\npercent = [100]",
        r"windows\.plant-a\.tz: 'Mars/Olympus' is not a time zone name",
    ),
    (
        '[windows]\nplant-a = { tz = "UTC", open = ["22:00-5:00"] }',
        "[waves]\npercent = [100]",
        r"windows\.plant-a\.open: '22:00-5:00' is not a time range; write \"HH:MM-HH:MM\"",
    ),
    (
        '[windows]\nplant-a = { tz = "UTC", open = ["05:00-05:00"] }',
        "[waves]\npercent = [100]",
        "is empty; for the whole day",
    ),
    (
        '[windows]\nplant-a = { tz = "UTC", open = [] }',
        "[waves]\npercent = [100]",
        r"windows\.plant-a\.open: .*open = \[\"22:00-05:00\"\]",
    ),
    (
        '[windows]\n"bad site" = { tz = "UTC", open = ["01:00-02:00"] }',
        "[waves]\npercent = [100]",
        "'bad site' must be 1-64 letters",
    ),
]


@pytest.mark.parametrize(("extra", "waves", "message"), BAD_PLANS)
def test_bad_plans_are_refused_with_what_to_write(extra: str, waves: str, message: str) -> None:
    with pytest.raises(FleetError) as caught:
        plan(extra, waves)
    assert re.search(message, caught.value.message), caught.value.message
    assert "\n" not in caught.value.message
    assert caught.value.message.startswith("rollout plan: ")


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("name", '"bad name"', "'bad name' must be 1-64 letters"),
        ("url", '"ftp://host/x.bundle"', "url: must be an http:// or https:// URL"),
        ("url", '"https://user:pw@host/x"', "must not carry a user name or password"),
        ("bundle", "3", r"bundle: write the bundle file's path"),
        ("cohort", '"line1"', r"cohort: .*cohort = \{ group = \"line1\" \}"),
        ("notes", "4", r"notes: .*short text"),
    ],
)
def test_bad_top_level_fields(field: str, value: str, message: str) -> None:
    lines = [line for line in MINIMAL.splitlines() if not line.startswith(f"{field} =")]
    text = "\n".join([*lines, f"{field} = {value}", "[waves]", "percent = [100]"])
    with pytest.raises(FleetError, match=message):
        RolloutPlan.from_toml(text, BASE)


def test_missing_fields_are_named() -> None:
    with pytest.raises(FleetError) as caught:
        RolloutPlan.from_toml('bundle = "b"\n[waves]\npercent = [100]', BASE)
    message = caught.value.message
    for field in ("name: missing", "url: missing", "cohort: missing"):
        assert field in message


def test_broken_toml_is_a_fleet_error() -> None:
    with pytest.raises(FleetError, match="not valid TOML"):
        RolloutPlan.from_toml('name = "x\n', BASE)


def test_from_json_refuses_what_it_did_not_store() -> None:
    stored = plan().to_json()
    with pytest.raises(FleetError, match=r"waves: give exactly one"):
        RolloutPlan.from_json({**stored, "waves": {"min_per_wave": 1}})
    with pytest.raises(FleetError, match="unknown field"):
        RolloutPlan.from_json({**stored, "extra": 1})


# --- wave sizes -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("waves", "total", "sizes"),
    [
        (WavesSpec(percent=[5, 25, 100]), 100, [5, 20, 75]),
        (WavesSpec(percent=[5, 25, 100]), 10, [1, 2, 7]),  # ceil(0.5) = 1, ceil(2.5) = 3
        (WavesSpec(percent=[5, 25, 100]), 1, [1]),
        (WavesSpec(percent=[5, 25, 100]), 2, [1, 1]),
        (WavesSpec(percent=[5, 25, 100]), 3, [1, 2]),  # 5% and 25% of 3 both round up to 1
        (WavesSpec(percent=[29, 100]), 100, [29, 71]),  # 29% is 29, not a float's 29.000001
        (WavesSpec(percent=[100]), 7, [7]),
        (WavesSpec(percent=[5, 25, 100], min_per_wave=3), 10, [3, 7]),
        (WavesSpec(percent=[5, 25, 100], min_per_wave=3), 100, [5, 20, 75]),
        (WavesSpec(percent=[50, 100], min_per_wave=4), 7, [7]),  # a 3-box last wave joins
        (WavesSpec(percent=[5, 100], min_per_wave=10), 4, [4]),  # fewer boxes than the minimum
        (WavesSpec(counts=[3, 20]), 100, [3, 20, 77]),
        (WavesSpec(counts=[3, 20]), 23, [3, 20]),
        (WavesSpec(counts=[3, 20]), 10, [3, 7]),
        (WavesSpec(counts=[3, 20]), 2, [2]),
        (WavesSpec(counts=[3, 5], min_per_wave=3), 10, [3, 7]),
        (WavesSpec(exponential=Exponential(start=2, factor=4)), 100, [2, 8, 32, 58]),
        (WavesSpec(exponential=Exponential(start=2, factor=4)), 42, [2, 8, 32]),
        (WavesSpec(exponential=Exponential(start=1, factor=2)), 10, [1, 2, 4, 3]),
        (WavesSpec(exponential=Exponential(start=2, factor=1.5)), 20, [2, 3, 5, 7, 3]),
        (WavesSpec(exponential=Exponential(start=1, factor=2), min_per_wave=3), 10, [3, 4, 3]),
    ],
)
def test_wave_sizes(waves: WavesSpec, total: int, sizes: list[int]) -> None:
    assert wave_sizes(waves, total) == sizes


SPECS = [
    WavesSpec(percent=[5, 25, 100]),
    WavesSpec(percent=[1, 2, 3, 50, 99.5, 100]),
    WavesSpec(percent=[33.3, 66.6, 100], min_per_wave=5),
    WavesSpec(percent=[100], min_per_wave=3),
    WavesSpec(counts=[1]),
    WavesSpec(counts=[3, 20], min_per_wave=2),
    WavesSpec(counts=[1, 1, 1, 1], min_per_wave=4),
    WavesSpec(exponential=Exponential(start=1, factor=1.01)),
    WavesSpec(exponential=Exponential(start=2, factor=4), min_per_wave=3),
    WavesSpec(exponential=Exponential(start=50, factor=10)),
]


@pytest.mark.parametrize("waves", SPECS, ids=lambda spec: repr(spec.model_dump(exclude_none=True)))
def test_wave_sizes_properties_for_every_cohort_size(waves: WavesSpec) -> None:
    for total in itertools.chain(range(1, 300), (997, 1000, 4096)):
        sizes = wave_sizes(waves, total)
        assert sum(sizes) == total, (total, sizes)
        assert all(size > 0 for size in sizes), (total, sizes)
        if total >= waves.min_per_wave:
            assert min(sizes) >= waves.min_per_wave, (total, sizes)
        else:
            assert sizes == [total]
        assert wave_sizes(waves, total) == sizes  # a pure function


def test_percent_waves_follow_the_cumulative_shares() -> None:
    waves = WavesSpec(percent=[5, 25, 100])
    for total in range(1, 500):
        done = list(itertools.accumulate(wave_sizes(waves, total)))
        assert done[0] == -(-total * 5 // 100)  # ceil of 5%
        assert done[-1] == total


def test_an_empty_cohort_is_refused() -> None:
    with pytest.raises(FleetError, match="the cohort is empty: "):
        wave_sizes(WavesSpec(percent=[100]), 0)


# --- wave assignment ------------------------------------------------------------------------


def refs(sites: dict[str, int]) -> list[str]:
    return [f"{site}/box{index:03d}" for site, count in sites.items() for index in range(count)]


def test_waves_are_deterministic_and_ignore_the_input_order() -> None:
    boxes = refs({"plant-a": 30, "plant-b": 20, "plant-c": 5})
    sizes = wave_sizes(WavesSpec(percent=[5, 25, 100]), len(boxes))
    first = assign_waves(boxes, sizes, "rollout-1")
    assert assign_waves(list(reversed(boxes)), sizes, "rollout-1") == first
    assert [len(wave) for wave in first] == sizes
    assert sorted(itertools.chain.from_iterable(first)) == sorted(boxes)
    assert assign_waves(boxes, sizes, "rollout-2") != first  # another rollout, another canary


def test_a_canary_spans_the_sites_not_the_alphabet() -> None:
    boxes = refs({"plant-a": 50, "plant-b": 50, "plant-c": 50})
    canary, rest = assign_waves(boxes, [3, 147], "defects-4")
    assert {ref.split("/")[0] for ref in canary} == {"plant-a", "plant-b", "plant-c"}
    assert len(rest) == 147
    # Within a site the boxes are not taken in name order either.
    first_a = [ref for ref in itertools.chain(canary, rest) if ref.startswith("plant-a/")][:5]
    assert first_a != sorted(first_a) or first_a[0] != "plant-a/box000"


def test_every_wave_mixes_sites_while_they_last() -> None:
    boxes = refs({"a": 10, "b": 10, "c": 2})
    waves = assign_waves(boxes, [6, 6, 10], "seed")
    assert Counter(ref.split("/")[0] for ref in waves[0]) == {"a": 2, "b": 2, "c": 2}
    assert Counter(ref.split("/")[0] for ref in waves[1]) == {"a": 3, "b": 3}


@pytest.mark.parametrize(
    ("boxes", "sizes"),
    [(["a/1", "a/1"], [2]), (["a/1", "a/2"], [1]), (["a/1", "a/2"], [2, 0])],
)
def test_assignment_refuses_inconsistent_input(boxes: list[str], sizes: list[int]) -> None:
    with pytest.raises(ValueError):
        assign_waves(boxes, sizes, "seed")


# --- windows --------------------------------------------------------------------------------


def utc(
    year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0
) -> datetime:
    return datetime(year, month, day, hour, minute, second, tzinfo=UTC)


NIGHT = Window(tz="Europe/Berlin", open=["22:00-05:00"])


@pytest.mark.parametrize(
    ("now", "is_open"),
    [
        (utc(2025, 1, 15, 20, 59), False),  # 21:59 in Berlin (CET, UTC+1)
        (utc(2025, 1, 15, 21, 0), True),  # 22:00
        (utc(2025, 1, 15, 23, 30), True),  # 00:30, across midnight
        (utc(2025, 1, 16, 3, 59, 59), True),  # 04:59:59
        (utc(2025, 1, 16, 4, 0), False),  # 05:00: the end is not in the window
        (utc(2025, 7, 15, 20, 0), True),  # 22:00 in summer (CEST, UTC+2)
        (utc(2025, 7, 15, 3, 0), False),  # 05:00 CEST
    ],
)
def test_a_window_across_midnight(now: datetime, is_open: bool) -> None:
    assert NIGHT.is_open(now) is is_open


def test_next_open_is_now_when_open_and_the_next_start_otherwise() -> None:
    inside = utc(2025, 1, 15, 23, 30, 12)
    assert NIGHT.next_open(inside) == inside
    assert NIGHT.next_open(utc(2025, 1, 15, 12, 0, 30)) == utc(2025, 1, 15, 21, 0)
    assert NIGHT.next_open(utc(2025, 1, 16, 4, 0)) == utc(2025, 1, 16, 21, 0)
    assert NIGHT.next_open(utc(2025, 7, 15, 12, 0)) == utc(2025, 7, 15, 20, 0)


def test_next_open_takes_local_time_in_other_zones() -> None:
    opened = NIGHT.next_open(datetime.fromisoformat("2025-01-15T13:00:00+01:00"))
    assert opened == utc(2025, 1, 15, 21, 0)
    assert opened.tzinfo is UTC


def test_windows_across_the_spring_dst_change() -> None:
    # Berlin, 30 March 2025: 02:00 CET jumps to 03:00 CEST (01:00 UTC).
    night = NIGHT
    assert night.next_open(utc(2025, 3, 29, 12, 0)) == utc(2025, 3, 29, 21, 0)  # CET
    assert night.is_open(utc(2025, 3, 30, 2, 59))  # 04:59 CEST
    assert not night.is_open(utc(2025, 3, 30, 3, 0))  # 05:00 CEST, an hour earlier in UTC
    assert night.next_open(utc(2025, 3, 30, 3, 0)) == utc(2025, 3, 30, 20, 0)  # 22:00 CEST
    # A window starting inside the skipped hour opens when the clock jumps past its start.
    gap = Window(tz="Europe/Berlin", open=["02:30-04:00"])
    assert gap.next_open(utc(2025, 3, 29, 23, 0)) == utc(2025, 3, 30, 1, 0)  # 03:00 CEST
    assert not gap.is_open(utc(2025, 3, 30, 0, 59))  # 01:59 CET
    # A window that lies wholly in the skipped hour opens the next day.
    lost = Window(tz="Europe/Berlin", open=["02:10-02:50"])
    assert lost.next_open(utc(2025, 3, 29, 23, 0)) == utc(2025, 3, 31, 0, 10)  # 02:10 CEST


def test_windows_across_the_autumn_dst_change() -> None:
    # Berlin, 26 October 2025: 03:00 CEST falls back to 02:00 CET (01:00 UTC).
    early = Window(tz="Europe/Berlin", open=["01:00-02:30"])
    assert early.next_open(utc(2025, 10, 25, 12, 0)) == utc(2025, 10, 25, 23, 0)  # 01:00 CEST
    assert early.is_open(utc(2025, 10, 26, 0, 29))  # 02:29 CEST
    assert not early.is_open(utc(2025, 10, 26, 0, 30))  # 02:30 CEST
    # 02:00 comes round again at the fall-back: the window reopens for its second 02:00-02:30.
    assert early.next_open(utc(2025, 10, 26, 0, 30)) == utc(2025, 10, 26, 1, 0)
    assert not early.is_open(utc(2025, 10, 26, 1, 30))  # 02:30 CET
    # The night window is an hour longer in UTC that night: 22:00 CEST to 05:00 CET.
    assert NIGHT.is_open(utc(2025, 10, 26, 3, 59))
    assert not NIGHT.is_open(utc(2025, 10, 26, 4, 0))


def test_a_whole_day_window_and_several_ranges() -> None:
    always = Window(tz="America/New_York", open=["00:00-24:00"])
    now = utc(2025, 5, 1, 8, 17, 3)
    assert always.is_open(now) and always.next_open(now) == now
    lunch = Window(tz="UTC", open=["12:00-13:00", "18:00-18:30"])
    assert lunch.next_open(utc(2025, 5, 1, 13, 0)) == utc(2025, 5, 1, 18, 0)
    assert lunch.next_open(utc(2025, 5, 1, 18, 30)) == utc(2025, 5, 2, 12, 0)


@pytest.mark.parametrize(
    ("window", "start"),
    [
        (NIGHT, utc(2025, 3, 29)),
        (NIGHT, utc(2025, 10, 25)),
        (Window(tz="Europe/Berlin", open=["02:30-02:45", "03:10-03:20"]), utc(2025, 3, 29)),
        (Window(tz="Europe/Berlin", open=["01:00-02:30"]), utc(2025, 10, 25)),
        (Window(tz="America/New_York", open=["01:30-01:40", "23:00-02:10"]), utc(2025, 3, 8)),
        (Window(tz="America/New_York", open=["01:30-01:40"]), utc(2025, 11, 1)),
        (Window(tz="Australia/Lord_Howe", open=["01:45-02:15"]), utc(2025, 4, 5)),  # 30-min DST
        (Window(tz="Asia/Kolkata", open=["09:15-09:45", "23:50-00:10"]), utc(2025, 6, 1)),
    ],
    ids=lambda value: getattr(value, "tz", None) or value.date().isoformat(),
)
def test_next_open_is_really_the_first_open_minute(window: Window, start: datetime) -> None:
    """Against a plain table of every minute over three days around a DST change."""
    minutes = [start + timedelta(minutes=step) for step in range(3 * 24 * 60)]
    table = [window.is_open(minute) for minute in minutes]
    for index in range(0, 2 * 24 * 60, 11):
        now = minutes[index] + timedelta(seconds=13)
        first = next(i for i in range(index + 1, len(table)) if table[i])
        expected = now if table[index] else minutes[first]
        assert window.next_open(now) == expected, now


def test_sites_without_a_window_are_always_open() -> None:
    parsed = plan('[windows]\nplant-a = { tz = "UTC", open = ["22:00-05:00"] }')
    noon = utc(2025, 1, 1, 12, 0)
    assert parsed.site_open("plant-b", noon)
    assert parsed.site_next_open("plant-b", noon) == noon
    assert not parsed.site_open("plant-a", noon)
    assert parsed.site_next_open("plant-a", noon) == utc(2025, 1, 1, 22, 0)
    assert parsed.window("plant-a") is not None and parsed.window("plant-b") is None


def test_naive_times_are_refused() -> None:
    with pytest.raises(ValueError, match="no timezone"):
        NIGHT.is_open(datetime(2025, 1, 1, 12, 0))
