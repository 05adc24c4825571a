"""edge_agent.settings.load_settings: source priority, and every refusal says what to fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_agent.errors import ConfigError
from edge_agent.settings import load_settings
from tests.unit.agent_fixtures import clean_environment

TOKEN = "0123456789abcdef-token"


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch) -> None:
    clean_environment(monkeypatch)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_defaults_without_any_source() -> None:
    settings = load_settings()
    assert settings.port == 8080
    assert settings.host == "127.0.0.1"
    assert settings.profile == "generic-x86-64-avx2"
    assert settings.admin_token is None
    assert settings.tls is False
    assert settings.store_dir == Path("/var/lib/lineside/store")


@pytest.mark.parametrize(
    ("sources", "expected"),
    [
        ({"toml"}, 1001),
        ({"toml", "credentials"}, 1002),
        ({"toml", "credentials", "env"}, 1003),
        ({"toml", "credentials", "env", "option"}, 1004),
        ({"credentials", "env", "option"}, 1004),
        ({"toml", "env"}, 1003),
        ({"toml", "option"}, 1004),
    ],
)
def test_priority_options_env_credentials_toml(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sources: set[str], expected: int
) -> None:
    config = write(tmp_path / "agent.toml", "port = 1001\n") if "toml" in sources else None
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    if "credentials" in sources:
        write(credentials / "port", "1002")
    if "env" in sources:
        monkeypatch.setenv("EDGE_AGENT_PORT", "1003")
    overrides = {"port": 1004} if "option" in sources else {}
    settings = load_settings(config, overrides, credentials_dir=credentials)
    assert settings.port == expected


def test_an_option_left_unset_falls_through_to_lower_sources(tmp_path: Path) -> None:
    config = write(tmp_path / "agent.toml", 'port = 1001\nhost = "0.0.0.0"\n')
    settings = load_settings(config, {"port": None, "host": None})
    assert (settings.port, settings.host) == (1001, "0.0.0.0")


def test_admin_token_from_the_credentials_directory_wins_over_the_toml_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = write(tmp_path / "agent.toml", 'admin_token = "from-the-toml-file-0000"\n')
    credentials = tmp_path / "credentials"
    write(credentials / "admin_token", TOKEN)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(credentials))  # as systemd sets it
    settings = load_settings(config)
    assert settings.admin_token is not None
    assert settings.admin_token.get_secret_value() == TOKEN
    assert TOKEN not in repr(settings)


def test_unknown_toml_key_is_refused_by_name(tmp_path: Path) -> None:
    config = write(tmp_path / "agent.toml", "prot = 8081\n")
    with pytest.raises(ConfigError) as caught:
        load_settings(config)
    message = caught.value.message
    assert "prot" in message
    assert "is not a setting" in message
    assert str(config) in message


def test_invalid_value_names_the_field_and_its_environment_variable(tmp_path: Path) -> None:
    config = write(tmp_path / "agent.toml", "port = 70000\n")
    with pytest.raises(ConfigError, match=r"port \(EDGE_AGENT_PORT\)"):
        load_settings(config)


def test_toml_syntax_error_is_a_config_error(tmp_path: Path) -> None:
    config = write(tmp_path / "agent.toml", "port = \n")
    with pytest.raises(ConfigError, match="cannot read the settings"):
        load_settings(config)


def test_missing_config_file(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.toml"
    with pytest.raises(ConfigError) as caught:
        load_settings(missing)
    assert str(missing) in caught.value.message
    assert "--config" in caught.value.message


@pytest.mark.parametrize("given", ["tls_certfile", "tls_keyfile"])
def test_tls_certificate_and_key_go_together(tmp_path: Path, given: str) -> None:
    with pytest.raises(ConfigError, match="tls_certfile and tls_keyfile go together"):
        load_settings(overrides={given: tmp_path / "x.pem"})


def test_tls_with_both_files(tmp_path: Path) -> None:
    settings = load_settings(
        overrides={"tls_certfile": tmp_path / "cert.pem", "tls_keyfile": tmp_path / "key.pem"}
    )
    assert settings.tls is True


def test_admin_token_shorter_than_16_characters_is_refused_without_echoing_it() -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(overrides={"admin_token": "short-secret"})
    assert "admin_token" in caught.value.message
    assert "16" in caught.value.message
    assert "short-secret" not in caught.value.message


def test_admin_token_of_16_characters_is_accepted() -> None:
    settings = load_settings(overrides={"admin_token": "x" * 16})
    assert settings.admin_token is not None


def test_trusted_keys_dir_adds_its_pub_files_after_the_listed_keys(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    for name in ("b.pub", "a.pub", "signer.key", "notes.txt"):
        write(keys / name, "")
    write(keys / "nested" / "c.pub", "")
    listed = tmp_path / "elsewhere" / "z.pub"
    settings = load_settings(overrides={"trusted_keys": [listed], "trusted_keys_dir": keys})
    assert settings.key_files() == [listed, keys / "a.pub", keys / "b.pub"]


def test_trusted_keys_dir_that_is_not_a_directory(tmp_path: Path) -> None:
    settings = load_settings(overrides={"trusted_keys_dir": tmp_path / "missing"})
    with pytest.raises(ConfigError, match="is not a directory"):
        settings.key_files()


def test_lists_from_the_environment_are_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGE_AGENT_TRUSTED_KEYS", '["/etc/lineside/a.pub", "/etc/lineside/b.pub"]')
    monkeypatch.setenv("EDGE_AGENT_REVOKED_KEY_IDS", '["0123abcd"]')
    settings = load_settings()
    assert settings.trusted_keys == (Path("/etc/lineside/a.pub"), Path("/etc/lineside/b.pub"))
    assert settings.revoked_key_ids == ("0123abcd",)


def test_a_list_in_the_environment_that_is_not_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGE_AGENT_REVOKED_KEY_IDS", "0123abcd,4567")
    with pytest.raises(ConfigError, match="revoked_key_ids"):
        load_settings()


def test_settings_are_frozen() -> None:
    settings = load_settings()
    with pytest.raises(ValueError, match="frozen"):
        settings.port = 9000
