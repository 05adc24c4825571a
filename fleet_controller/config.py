"""The controller's configuration: one TOML file, secrets from systemd credentials.

```toml
[mqtt]
host = "broker.plant.example"
port = 8883
username = "fleet-controller"        # the password is the credential `mqtt_password`
tls_ca = "/etc/lineside/ca.crt"      # TLS on when tls_ca is given (client cert/key optional)

[database]
url = "sqlite:////var/lib/lineside-fleet/fleet.db"

[http]
host = "127.0.0.1"
port = 8700

[keys]
bundle_keys = ["/etc/lineside/bundle.pub"]   # bundles must be signed by one of these
release_key = "release.key"                  # fallback path; the credential `release_key` wins

[chunks]                                     # bundles delivered over MQTT (docs/mqtt-delivery.md)
store = "/var/lib/lineside-fleet/chunks"     # shared by the controller and the chunk server
```

Secrets never live in the file: the release signing key, the MQTT password and the API tokens
are read from `$CREDENTIALS_DIRECTORY` (systemd `LoadCredential=`), or from the paths the file
names when that variable is unset (development and tests). API tokens are lines of
`OPERATOR TOKEN`: the operator's name goes into the audit trail of what that token does.
"""

from __future__ import annotations

import hmac
import os
import tomllib
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edge_bundle.chunks import SERVER_GROUP
from edge_bundle.signing import KeyRole, SigningKey, TrustStore, read_signing_key
from fleet_controller.errors import FleetError

CREDENTIALS = "CREDENTIALS_DIRECTORY"
Port = Annotated[int, Field(ge=1, le=65535)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class MqttConfig(_Section):
    host: str = "127.0.0.1"
    port: Port = 1883
    client_id: str = Field(default="fleet-controller", min_length=1, max_length=64)
    username: str | None = None
    password_file: Path | None = None
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    keepalive_s: int = Field(default=30, ge=5, le=3600)
    # How long the broker keeps the controller's session (and queues the boxes' reports) while
    # the controller is down: a restart loses no report.
    session_expiry_s: int = Field(default=7 * 86400, ge=0)
    publish_timeout_s: float = Field(default=10.0, gt=0)
    # Notices in flight at once (published, PUBACK awaited) when a wave goes out: not above the
    # broker's Receive Maximum (Mosquitto's max_inflight_messages, 20 by default).
    max_inflight: int = Field(default=20, ge=1, le=65535)
    # Several controller instances consuming the boxes' reports (docs/fleet-scale.md): each
    # subscribes as `$share/GROUP/...`, under its own client id `CLIENT_ID-INSTANCE`.
    shared_group: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    # This instance's stable name in the group (default: HOSTNAME-HTTPPORT), so that a restart
    # resumes its own session and the reports the broker kept for it.
    instance: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_.-]{1,64}$")


class DatabaseConfig(_Section):
    url: str = "sqlite:///fleet.db"


class HttpConfig(_Section):
    host: str = "127.0.0.1"
    port: Port = 8700


class KeysConfig(_Section):
    bundle_keys: tuple[Path, ...] = ()
    release_key: Path | None = None
    api_tokens: Path | None = None


class ControllerConfig(_Section):
    tick_s: float = Field(default=1.0, gt=0, le=60)
    stale_after_s: float = Field(default=600.0, gt=0)
    samples_per_model: int = Field(default=50, ge=1, le=10_000)
    # Ingest: up to this many messages waiting are stored in one transaction, then acknowledged.
    batch_max: int = Field(default=500, ge=1, le=10_000)
    # ... after waiting at most this long for more to arrive behind the first one.
    batch_wait_s: float = Field(default=0.005, ge=0, le=1)


class ChunksConfig(_Section):
    """`[chunks]`: the chunk store, and the chunk server that serves it over MQTT
    (docs/mqtt-delivery.md). The server connects with the `[mqtt]` section's broker, TLS and
    password, under its own client id."""

    store: Path = Path("chunks")
    group: str = Field(default=SERVER_GROUP, pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    # Each server instance needs its own (a second connection with the same id drops the first).
    client_id: str = Field(default="fleet-chunk-server", min_length=1, max_length=64)
    # The broker user of the chunk server (default: [mqtt] username); its password is the
    # chunk server unit's credential `mqtt_password`.
    username: str | None = None
    workers: int = Field(default=4, ge=1, le=64)
    # Requests the broker may have in flight to this server (MQTT 5 Receive Maximum): the rest
    # wait at the broker, so the server's memory stays bounded.
    receive_maximum: int = Field(default=32, ge=1, le=65535)
    # How long the broker keeps the server's session and queues requests while it is down.
    session_expiry_s: int = Field(default=3600, ge=0)


class Config(_Section):
    mqtt: MqttConfig = MqttConfig()
    database: DatabaseConfig = DatabaseConfig()
    http: HttpConfig = HttpConfig()
    keys: KeysConfig = KeysConfig()
    controller: ControllerConfig = ControllerConfig()
    chunks: ChunksConfig = ChunksConfig()

    @classmethod
    def load(cls, path: Path) -> Config:
        """Read and validate `path`; relative paths in it are relative to its directory."""
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise FleetError(f"cannot read the config {path}: {exc.strerror}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise FleetError(f"the config {path} is not valid TOML: {exc}") from exc
        try:
            config = cls.model_validate(data)
        except ValidationError as exc:
            raise FleetError(f"the config {path} is invalid: {describe(exc)}") from exc
        return config.resolved(path.parent)

    def resolved(self, base: Path) -> Config:
        """This config with its relative paths made absolute against `base`."""

        def fix(value: Path | None) -> Path | None:
            return None if value is None else (base / value).resolve()

        keys = self.keys.model_copy(
            update={
                "bundle_keys": tuple(base / p for p in self.keys.bundle_keys),
                "release_key": fix(self.keys.release_key),
                "api_tokens": fix(self.keys.api_tokens),
            }
        )
        mqtt = self.mqtt.model_copy(
            update={
                name: fix(getattr(self.mqtt, name))
                for name in ("password_file", "tls_ca", "tls_cert", "tls_key")
            }
        )
        chunks = self.chunks.model_copy(update={"store": (base / self.chunks.store).resolve()})
        return self.model_copy(update={"keys": keys, "mqtt": mqtt, "chunks": chunks})

    # ---- secrets --------------------------------------------------------------------------
    def release_key(self) -> SigningKey:
        path = credential("release_key", self.keys.release_key)
        if path is None:
            raise FleetError(
                "no release signing key: pass it as the systemd credential `release_key` "
                "(LoadCredential=release_key:...) or set [keys] release_key in the config"
            )
        key = read_signing_key(path)
        if key.role is not KeyRole.RELEASE:
            raise FleetError(
                f"{path} is a {key.role.value!r} key; release notices are signed with a "
                "'release' key (model-packager keygen --role release)"
            )
        return key

    def bundle_trust(self) -> TrustStore:
        if not self.keys.bundle_keys:
            raise FleetError(
                "no trusted bundle keys: list the public keys bundles are signed with in "
                "[keys] bundle_keys, so the controller refuses foreign or unsigned bundles"
            )
        return TrustStore.from_files(self.keys.bundle_keys)

    def mqtt_password(self) -> str | None:
        path = credential("mqtt_password", self.mqtt.password_file)
        return None if path is None else path.read_text(encoding="utf-8").strip()

    def api_tokens(self) -> ApiTokens:
        path = credential("api_tokens", self.keys.api_tokens)
        if path is None:
            raise FleetError(
                "no API tokens: pass the systemd credential `api_tokens` or set [keys] "
                "api_tokens to a file of `OPERATOR TOKEN` lines"
            )
        return ApiTokens.parse(path.read_text(encoding="utf-8"), str(path))


class ApiTokens:
    """Bearer tokens and the operator each belongs to (compared in constant time)."""

    def __init__(self, tokens: dict[str, str]) -> None:
        self._tokens = tokens  # token -> operator

    @classmethod
    def parse(cls, text: str, where: str) -> ApiTokens:
        tokens: dict[str, str] = {}
        for number, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.split()
            if len(parts) != 2 or len(parts[1]) < 16:
                raise FleetError(
                    f"{where}:{number}: expected `OPERATOR TOKEN` with a token of at least 16 "
                    "characters (e.g. `alice $(openssl rand -hex 24)`)"
                )
            tokens[parts[1]] = parts[0]
        if not tokens:
            raise FleetError(f"{where} holds no token: add a line `OPERATOR TOKEN`")
        return cls(tokens)

    def operator(self, token: str) -> str | None:
        found = None
        for known, operator in self._tokens.items():
            if hmac.compare_digest(known.encode(), token.encode()):
                found = operator
        return found


def credential(name: str, fallback: Path | None) -> Path | None:
    """`$CREDENTIALS_DIRECTORY/name` when systemd passed it, else `fallback` (may be None)."""
    directory = os.environ.get(CREDENTIALS)
    if directory:
        path = Path(directory) / name
        if path.is_file():
            return path
    if fallback is not None and not fallback.is_file():
        raise FleetError(f"{fallback} (for {name}) does not exist or is not a file")
    return fallback


def describe(exc: ValidationError) -> str:
    """Pydantic errors as one line: `mqtt.port: reason; http.host: reason`."""
    problems = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error["loc"])
        reason = str(error["msg"]).removeprefix("Value error, ")
        problems.append(f"{where}: {reason}" if where else reason)
    return "; ".join(problems)


def as_dict(config: Config) -> dict[str, Any]:
    """The config as JSON, for `serve --check` (no secrets are ever part of it)."""
    return config.model_dump(mode="json")
