"""The commented example config shipped for boxes loads, and its defaults are the real defaults."""

from __future__ import annotations

import tomllib
from pathlib import Path

from edge_agent.settings import AgentSettings, load_settings

EXAMPLE = Path(__file__).resolve().parents[2] / "systemd" / "agent.toml"


def test_example_config_loads() -> None:
    settings = load_settings(EXAMPLE)
    assert settings.host == "0.0.0.0"
    assert settings.trusted_keys_dir == Path("/etc/lineside/keys")


def test_example_config_states_the_real_defaults() -> None:
    text = EXAMPLE.read_text()
    values = tomllib.loads(text)
    examples = {line.split("=", 1)[0].strip() for line in text.splitlines() if "# example" in line}
    for key, value in values.items():
        if key in examples:
            continue
        default = AgentSettings.model_fields[key].default
        assert (str(default) if isinstance(default, Path) else default) == value, key
