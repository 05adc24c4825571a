"""Cohort selectors: what they accept and refuse, what they pick, and the preview."""

from __future__ import annotations

import tomllib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from fleet_controller import db
from fleet_controller.cohorts import Selector, preview, select
from fleet_controller.errors import FleetError
from fleet_controller.registry import Device, ModelState, Registry, TelemetryMessage

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def box(ref: str, **fields: Any) -> Device:
    site, device = ref.split("/")
    values: dict[str, Any] = {
        "site": site,
        "device": device,
        "line": None,
        "labels": {},
        "groups": (),
        "profile": "generic-x86-64-avx2",
        "agent_version": "0.2.0",
        "models": {"defects": ModelState(3, "ready")},
        "ready": True,
        "reasons": (),
        "online": True,
        "last_seen": T0,
        "first_seen": T0,
        "last_telemetry_at": T0,
    }
    values.update(fields)
    return Device(**values)


FLEET = [
    box("plant-b/box1", line="line2", groups=("line2",), profile="jetson-orin"),
    box("plant-a/box2", line="line1", groups=("line1", "canary"), labels={"camera": "v2"}),
    box("plant-a/box1", line="line1", groups=("line1",), labels={"camera": "v1"}),
    box("plant-c/box1", models={"ocr": ModelState(1, "ready")}, agent_version="0.1.0"),
]


def refs(selector: Selector) -> list[str]:
    return [d.ref for d in select(FLEET, selector)]


# ---- what a selector accepts --------------------------------------------------------------
def test_the_documented_toml_example_parses() -> None:
    text = """
    [cohort]
    site = ["plant-a", "plant-b"]
    line = "line1"
    group = "line1"
    profile = "generic-x86-64-avx2"
    labels = { camera = "v2" }
    model = "defects"
    devices = ["plant-a/box2"]
    exclude = ["plant-a/box9"]
    """
    selector = Selector.parse(tomllib.loads(text)["cohort"])
    assert selector.site == ("plant-a", "plant-b") and selector.line == ("line1",)
    assert refs(selector) == ["plant-a/box2"]
    assert Selector.parse(selector.to_json()) == selector


@pytest.mark.parametrize(
    ("data", "words"),
    [
        ({}, "an empty selector would pick the whole fleet"),
        ({"exclude": ["plant-a/box1"]}, "an empty selector would pick the whole fleet"),
        ({"all": True, "site": "plant-a"}, "cannot be combined with site"),
        ({"sites": ["plant-a"]}, "sites: not a selector key; use all, site, line"),
        ({"site": []}, "an empty list picks nothing"),
        ({"site": "plant a"}, "site.0"),
        ({"site": 1}, "site: must be a string or a list of strings, not int"),
        ({"line": ["line1", 2]}, "line.1"),
        ({"labels": {}}, "labels = {} picks by nothing"),
        ({"labels": {"camera": 2}}, "labels.camera"),
        ({"devices": ["box1"]}, "must be SITE/DEVICE"),
        ({"devices": ["plant-a/box1/x"]}, "must be SITE/DEVICE"),
        ({"all": "yes"}, "all"),
    ],
)
def test_refused_selectors_say_what_is_wrong(data: dict[str, Any], words: str) -> None:
    with pytest.raises(FleetError) as caught:
        Selector.parse(data)
    assert words in caught.value.message
    assert caught.value.message.startswith("the cohort selector is not valid")


def test_all_picks_every_box_less_the_excluded() -> None:
    assert refs(Selector(all=True)) == sorted(d.ref for d in FLEET)
    assert refs(Selector.parse({"all": True, "exclude": "plant-c/box1"})) == [
        "plant-a/box1",
        "plant-a/box2",
        "plant-b/box1",
    ]


def test_duplicates_are_dropped_and_to_json_keeps_only_what_was_given() -> None:
    selector = Selector.parse({"devices": ["plant-a/box1", "plant-a/box1"]})
    assert selector.devices == ("plant-a/box1",)
    assert selector.to_json() == {"devices": ["plant-a/box1"]}


# ---- what a selector picks ----------------------------------------------------------------
@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"site": "plant-a"}, ["plant-a/box1", "plant-a/box2"]),
        ({"site": ["plant-b", "plant-c"]}, ["plant-b/box1", "plant-c/box1"]),
        ({"line": "line1"}, ["plant-a/box1", "plant-a/box2"]),
        ({"group": "canary"}, ["plant-a/box2"]),
        ({"group": ["canary", "line2"]}, ["plant-a/box2", "plant-b/box1"]),
        ({"profile": "jetson-orin"}, ["plant-b/box1"]),
        ({"model": "ocr"}, ["plant-c/box1"]),
        ({"model": ["ocr", "defects"]}, sorted(d.ref for d in FLEET)),
        ({"labels": {"camera": "v2"}}, ["plant-a/box2"]),
        ({"labels": {"camera": "v2", "lens": "wide"}}, []),
        ({"devices": ["plant-c/box1", "plant-a/box1"]}, ["plant-a/box1", "plant-c/box1"]),
        ({"devices": ["plant-c/box1", "plant-a/box1"], "site": "plant-a"}, ["plant-a/box1"]),
        ({"site": "plant-a", "exclude": ["plant-a/box2"]}, ["plant-a/box1"]),
        ({"site": "plant-a", "line": "line2"}, []),
        ({"devices": ["plant-z/box1"]}, []),
    ],
)
def test_selection(data: dict[str, Any], expected: list[str]) -> None:
    assert refs(Selector.parse(data)) == expected


def test_a_box_without_line_or_profile_never_matches_one() -> None:
    bare = box("plant-a/new", profile=None, models={})
    assert not Selector(line=("line1",)).matches(bare)
    assert not Selector(profile=("generic-x86-64-avx2",)).matches(bare)
    assert not Selector(model=("defects",)).matches(bare)
    assert Selector(site=("plant-a",)).matches(bare)


# ---- preview ------------------------------------------------------------------------------
def test_preview_from_the_registry(tmp_path: Path) -> None:
    engine = db.connect(f"sqlite:///{tmp_path / 'fleet.db'}")
    db.create_tables(engine)
    registry = Registry(engine)
    for site, device, version, profile in (
        ("plant-a", "box1", "0.2.0", "generic-x86-64-avx2"),
        ("plant-a", "box2", "0.1.0", "generic-x86-64-avx2"),
        ("plant-b", "box1", "0.2.0", "jetson-orin"),
    ):
        registry.record(TelemetryMessage(site, device, T0, version, profile, True, (), ()), now=T0)
    selector = Selector.parse(
        {
            "devices": ["plant-a/box1", "plant-b/box1", "plant-a/box9", "plant-z/box1"],
            "site": "plant-a",
        }
    )
    shown = preview(registry, selector)
    assert shown == {
        "selector": selector.to_json(),
        "count": 1,
        "refs": ["plant-a/box1"],
        "online": 1,
        "by_site": {"plant-a": 1},
        "by_profile": {"generic-x86-64-avx2": 1},
        "by_agent_version": {"0.2.0": 1},
        "missing": ["plant-a/box9", "plant-z/box1"],
        "unmatched": ["plant-b/box1"],
    }
    whole = preview(registry, Selector(all=True))
    assert whole["count"] == 3 and whole["missing"] == []
    assert whole["by_agent_version"] == {"0.1.0": 1, "0.2.0": 2}
    assert whole["by_profile"] == {"generic-x86-64-avx2": 2, "jetson-orin": 1}
    engine.dispose()
