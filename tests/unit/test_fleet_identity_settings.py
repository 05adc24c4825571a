"""The fleet identity settings (#16): `line` and `labels`, from every source, and their refusals."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_agent.errors import ConfigError
from edge_agent.settings import load_settings
from tests.unit.agent_fixtures import clean_environment


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch) -> None:
    clean_environment(monkeypatch)


def test_no_line_and_no_labels_by_default() -> None:
    settings = load_settings()
    assert settings.line is None
    assert settings.labels == {}


def test_line_and_labels_from_the_config_file(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text('line = "line3"\n[labels]\ncamera = "v2"\nshift = "night crew / B"\n')
    settings = load_settings(config)
    assert settings.line == "line3"
    assert settings.labels == {"camera": "v2", "shift": "night crew / B"}


def test_labels_from_the_environment_are_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGE_AGENT_LINE", "line1")
    monkeypatch.setenv("EDGE_AGENT_LABELS", '{"camera": "v2", "lens": "12mm"}')
    settings = load_settings()
    assert settings.line == "line1"
    assert settings.labels == {"camera": "v2", "lens": "12mm"}


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        ({"line": "line 3"}, "line (EDGE_AGENT_LINE)"),
        ({"line": "-line3"}, "line (EDGE_AGENT_LINE)"),
        ({"labels": {"has space": "x"}}, "label name 'has space' must be 1-64 letters"),
        ({"labels": {"k" * 65: "x"}}, "must be 1-64 letters"),
        ({"labels": {"camera": "v" * 129}}, "129 characters long; at most 128"),
        ({"labels": {"camera": "v2\nrm -rf"}}, "control character"),
        ({"labels": {f"k{i}": "x" for i in range(33)}}, "33 labels given; at most 32"),
        ({"labels": {"camera": 2}}, "labels.camera"),
    ],
)
def test_bad_fleet_identity_is_refused_with_what_to_fix(
    overrides: dict[str, object], words: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(overrides=overrides)
    assert words in str(caught.value)


def test_labels_at_the_limits_are_accepted() -> None:
    labels = {f"k{i}": "v" * 128 for i in range(32)}
    assert load_settings(overrides={"labels": labels}).labels == labels


def test_labels_in_the_environment_that_are_not_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGE_AGENT_LABELS", "camera=v2")
    with pytest.raises(ConfigError, match="labels"):
        load_settings()
