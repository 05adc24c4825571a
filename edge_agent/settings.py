"""The agent's settings: one typed object, loaded once at start-up and passed in.

Sources, highest priority first: command-line options (passed as overrides), environment variables
(`EDGE_AGENT_<FIELD>`, lists as JSON), secret files in `$CREDENTIALS_DIRECTORY` (systemd
`LoadCredential=`; the file name is the bare field name, e.g. `admin_token`), the TOML config file
(`--config`, keys are the field names), then the defaults below. Unknown keys in the config file
are errors, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal, Self

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SecretsSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from edge_agent.errors import ConfigError

ENV_PREFIX = "EDGE_AGENT_"
MIB = 1024 * 1024


SEGMENT = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
# Fleet identity (#16)
MAX_LABELS = 32
MAX_LABEL_CHARS = 128


class EventMapping(BaseModel):
    """A plant topic whose messages are classified, and where the results go."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    topic: str = Field(
        min_length=1,
        description="topic filter to subscribe to (+ and # allowed; $share/GROUP/... to split a "
        "stream between agents)",
    )
    model: str = Field(min_length=1, description="the model that classifies the images")
    image: str = Field(
        default="raw",
        min_length=1,
        description="'raw' (the payload is the image) or a dotted JSON path to a base64 string",
    )
    carry: tuple[str, ...] = Field(
        default=(), description="dotted JSON paths copied into the result under source.carry"
    )
    result_topic: str = Field(
        default="lineside/v1/{site}/{device}/results/{model}",
        min_length=1,
        description="where results go; {site}, {device} and {model} are filled in",
    )
    top_k: int = Field(default=3, ge=1, le=100)


class AgentSettings(BaseSettings):
    """Everything the agent can be told; see docs/agent.md for a commented example file."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, extra="forbid", frozen=True, validate_default=True
    )

    # Where things live.
    state_dir: Path = Field(
        default=Path("/var/lib/lineside"),
        description="bundle store, request records and caches (systemd StateDirectory)",
    )
    profile: str = Field(
        default="generic-x86-64-avx2",
        min_length=1,
        description="firmware profile name (firmware_profiles/) or path to a profile TOML",
    )

    # HTTP.
    host: str = Field(default="127.0.0.1", description="address to bind; 0.0.0.0 for the line")
    port: int = Field(default=8080, ge=1, le=65535, description="TCP port to bind")
    tls_certfile: Path | None = Field(default=None, description="PEM certificate (enables TLS)")
    tls_keyfile: Path | None = Field(default=None, description="PEM private key for tls_certfile")
    admin_token: SecretStr | None = Field(
        default=None,
        min_length=16,
        description="bearer token for admin routes; without it admin routes are disabled",
    )
    # HTTP connection limits (#15)
    http_idle_timeout_s: float = Field(
        default=5.0,
        gt=0,
        le=3600,
        description="a connection with no request in progress is closed after this long without "
        "a byte (between keep-alive requests, or one that never sends)",
    )
    http_header_timeout_s: float = Field(
        default=10.0,
        gt=0,
        le=3600,
        description="a request's line and headers must be in this long after their first byte; "
        "else 408 and the connection is closed",
    )
    http_body_timeout_s: float = Field(
        default=10.0,
        gt=0,
        le=3600,
        description="a request body may lag http_body_min_rate by at most this long (so a small "
        "body has this long to arrive); else 408",
    )
    http_body_min_rate: int = Field(
        default=32 * 1024,
        ge=1,
        description="bytes per second a request body must keep up once http_body_timeout_s is over",
    )
    http_max_header_bytes: int = Field(
        default=32 * 1024,
        ge=4096,
        le=MIB,
        description="largest request line plus headers, never buffered beyond; else 431",
    )
    http_max_headers: int = Field(
        default=100, ge=8, le=10_000, description="most header fields in a request; else 431"
    )
    http_max_connections: int = Field(
        default=512,
        ge=8,
        le=10_000,
        description="open HTTP connections; past it the longest-idle one is closed, or, when all "
        "are busy, the newcomer's request gets 503 + Retry-After",
    )

    # Trust.
    trusted_keys: tuple[Path, ...] = Field(
        default=(), description="public key files (*.pub) whose bundle signatures are trusted"
    )
    trusted_keys_dir: Path | None = Field(
        default=None, description="a directory of trusted *.pub files, added to trusted_keys"
    )
    revoked_key_ids: tuple[str, ...] = Field(default=(), description="key ids never trusted")
    allow_unsigned_bundles: bool = Field(
        default=False, description="DEVELOPMENT ONLY: accept bundles that carry no signature"
    )

    # Input limits and overload.
    max_body_bytes: int = Field(
        default=32 * MIB, ge=1024, description="largest request body accepted"
    )
    max_image_pixels: int = Field(
        default=50_000_000, ge=1, description="largest image (width x height) decoded"
    )
    max_in_flight: int = Field(
        default=8,
        ge=1,
        le=1024,
        description="predictions being served or waiting at once; past it, 503 + Retry-After",
    )
    # Admission and decode memory (#15)
    max_queue_delay_services: float = Field(
        default=0.5,
        gt=0,
        le=1000,
        description="refuse a prediction (503 + Retry-After) when the ones ahead would keep it "
        "waiting longer than this many measured service times; under 1, it is admitted only "
        "when no prediction holds a slot (the default: where one inference takes every core, "
        "a second one in flight only waits)",
    )
    max_queue_delay_ms: float | None = Field(
        default=None,
        gt=0,
        description="also refuse when that expected wait is longer than this (milliseconds)",
    )
    decode_pixel_budget: int = Field(
        default=64_000_000,
        ge=1_000_000,
        description="pixels decoded at once across requests (bounds decode memory); a photo that "
        "does not fit waits for decode_wait_ms, then gets 503 + Retry-After",
    )
    decode_wait_ms: float = Field(
        default=1000.0,
        ge=0,
        le=60_000,
        description="how long a photo may wait for room in decode_pixel_budget",
    )
    inference_nice: int = Field(
        default=10,
        ge=0,
        le=19,
        description="nice value added to the decode and inference threads, so that under "
        "overload health checks and refusals still get the CPU at once (0: same priority)",
    )
    decode_threads: int = Field(
        default=2, ge=1, le=64, description="threads decoding and preprocessing images"
    )
    inline_max_ms: float = Field(
        default=1.0,
        ge=0,
        le=20,
        description="a small photo (up to 320x320) to a model whose recent small photos took at "
        "most this long (median) runs on the event loop when nothing else is running, saving "
        "two thread hand-offs (0: always on the inference thread)",
    )

    # Request records (for feedback and explanations that refer to a request later).
    keep_requests_s: float = Field(default=86_400.0, ge=0, description="how long records are kept")
    keep_requests_bytes: int = Field(
        default=512 * MIB, ge=0, description="disk space for request records (images included)"
    )
    keep_requests_count: int = Field(default=10_000, ge=0, description="most records kept")

    # Lifecycle.
    drain_grace_s: float = Field(
        default=1.0,
        ge=0,
        le=60,
        description="after SIGTERM, how long new predictions get 503 before the listener closes",
    )
    shutdown_timeout_s: float = Field(
        default=10.0, gt=0, le=300, description="the most time from SIGTERM to exit"
    )
    selftest_interval_s: float = Field(
        default=3600.0, ge=0, description="golden self-test period while serving (0 = load only)"
    )
    # Drift of live inputs against the bundle's calibration baseline.
    drift_window: int = Field(default=500, ge=10, description="recent requests compared")
    drift_min_samples: int = Field(default=50, ge=5, description="requests before a score")
    drift_alert_psi: float = Field(default=0.25, gt=0, description="drift score that alerts")

    # Technicians' feedback (kept on the box, forwarded to central over MQTT).
    feedback_max_bytes: int = Field(default=256 * MIB, ge=MIB, description="feedback disk quota")
    feedback_max_count: int = Field(default=50_000, ge=1)

    # Identity (MQTT topics and telemetry).
    site: str = Field(default="site", pattern=SEGMENT, description="plant or site id")
    device: str = Field(default="box", pattern=SEGMENT, description="this box's id")
    # Fleet identity (#16): what a fleet controller selects boxes by, sent in telemetry.
    line: str | None = Field(
        default=None, pattern=SEGMENT, description="the production line this box serves"
    )
    labels: dict[str, str] = Field(
        default_factory=dict,
        description=f"free-form NAME = VALUE pairs for fleet cohorts (at most {MAX_LABELS}; "
        f"names like site ids, values up to {MAX_LABEL_CHARS} printable characters)",
    )

    @field_validator("labels")
    @classmethod
    def _check_labels(cls, labels: dict[str, str]) -> dict[str, str]:
        if len(labels) > MAX_LABELS:
            raise ValueError(f"{len(labels)} labels given; at most {MAX_LABELS} are allowed")
        for name, value in labels.items():
            if re.fullmatch(SEGMENT, name) is None:
                raise ValueError(
                    f"label name {name!r} must be 1-64 letters, digits, '_', '.' or '-', "
                    "starting with a letter or digit"
                )
            if len(value) > MAX_LABEL_CHARS:
                raise ValueError(
                    f"label {name!r} is {len(value)} characters long; at most "
                    f"{MAX_LABEL_CHARS} are allowed"
                )
            if not value.isprintable():
                raise ValueError(
                    f"label {name!r} holds a newline, tab or other control character; "
                    "give a value of printable characters only"
                )
        return labels

    # MQTT.
    mqtt_enabled: bool = Field(default=False, description="connect to an MQTT broker")
    mqtt_host: str = Field(default="127.0.0.1", description="broker host")
    mqtt_port: int = Field(default=1883, ge=1, le=65535, description="broker port (8883 for TLS)")
    mqtt_protocol: Literal["5", "3.1.1"] = Field(default="5", description="MQTT version")
    mqtt_client_id: str | None = Field(
        default=None, description="client id (default lineside-SITE-DEVICE); keep it stable"
    )
    mqtt_username: str | None = None
    mqtt_password: SecretStr | None = Field(default=None, description="a systemd credential")
    mqtt_tls_ca: Path | None = Field(default=None, description="CA bundle: enables TLS")
    mqtt_tls_certfile: Path | None = Field(default=None, description="client certificate (PEM)")
    mqtt_tls_keyfile: Path | None = Field(default=None, description="client key (PEM)")
    mqtt_keepalive_s: int = Field(default=30, ge=5, le=3600)
    mqtt_session_expiry_s: int = Field(
        default=86_400, ge=0, description="how long the broker keeps our session while we are away"
    )
    mqtt_reconnect_min_s: float = Field(default=0.5, gt=0, le=60)
    mqtt_reconnect_max_s: float = Field(default=30.0, gt=0, le=3600)
    mqtt_max_payload_bytes: int = Field(default=16 * MIB, ge=1024)
    mqtt_max_correlation_bytes: int = Field(default=256, ge=1, le=65535)
    mqtt_response_topics: tuple[str, ...] = Field(
        default=("lineside/v1/replies/#",),
        description="topic filters MQTT 5 response topics must match (an allow-list)",
    )
    mqtt_inbound_queue: int = Field(
        default=64, ge=1, description="messages waiting for a worker; beyond it they are shed"
    )
    mqtt_workers: int = Field(default=3, ge=1, le=64, description="messages processed at once")
    mqtt_shared_group: str | None = Field(
        default=None,
        pattern=SEGMENT,
        description="also take requests from $share/GROUP/lineside/v1/SITE/shared/infer/+",
    )
    mqtt_events: tuple[EventMapping, ...] = Field(default=(), description="event mappings")
    mqtt_publish_http_results: bool = Field(
        default=False, description="also publish HTTP predictions to the results topic"
    )
    telemetry_interval_s: float = Field(default=60.0, ge=0, description="0 turns telemetry off")
    outbox_max_bytes: int = Field(default=64 * MIB, ge=MIB)
    outbox_max_messages: int = Field(default=100_000, ge=10)
    # No answer lost (#14).
    mqtt_model_wait_s: float = Field(
        default=120.0,
        ge=0,
        description="how long a message waits, unacknowledged, for its model to load (start-up, "
        "reload) before it is answered not_ready / unknown_model",
    )
    mqtt_overload_wait_s: float = Field(
        default=30.0,
        ge=0,
        description="how long a taken MQTT message waits for an inference slot before it is "
        "answered overloaded (the broker queues the rest)",
    )
    mqtt_dedupe_window_s: float = Field(
        default=3600.0,
        ge=0,
        description="a redelivered message within this window gets the answer already given",
    )
    mqtt_dedupe_max: int = Field(
        default=10_000, ge=100, description="answered messages remembered for redeliveries"
    )
    disk_reserve_mb: float = Field(
        default=16.0,
        ge=0,
        description="free space under state_dir below which the disk counts as full",
    )

    # Anomaly gates (#20): an anomaly bundle in front of a classifier (see engine/chain.py).
    anomaly_gates: dict[str, str] = Field(
        default_factory=dict,
        description="CLASSIFIER = ANOMALY_BUNDLE pairs: the gate run in front of each "
        "classifier, overriding the manifest's anomaly_gate; an empty name turns it off",
    )
    anomaly_good_labels: tuple[str, ...] = Field(
        default=("ok",),
        description="a chained classifier's labels for a good part: an anomalous part given one "
        "is answered unknown_defect",
    )
    anomaly_min_confidence: float = Field(
        default=0.5,
        ge=0,
        le=1,
        description="an anomalous part classified below this confidence is an unknown_defect",
    )

    @field_validator("anomaly_gates")
    @classmethod
    def _check_gates(cls, gates: dict[str, str]) -> dict[str, str]:
        for classifier, gate in gates.items():
            for name in (classifier, gate) if gate else (classifier,):
                if re.fullmatch(SEGMENT, name) is None:
                    raise ValueError(
                        f"anomaly_gates: {name!r} is not a model name (1-64 letters, digits, "
                        "'_', '.' or '-')"
                    )
        return gates

    # Language models and explanations.
    max_generations: int = Field(
        default=4, ge=1, le=64, description="generations running or waiting; beyond it 503"
    )
    generation_pause_ms: float = Field(
        default=200.0,
        ge=0,
        description="longest pause between two tokens while classifications are in flight",
    )
    generation_nice: int = Field(
        default=19,
        ge=0,
        le=19,
        description="nice value added to the llm thread and llama.cpp's threads it starts, so "
        "that a classification arriving mid-token takes the CPU from them (0: same priority)",
    )
    max_generation_tokens: int = Field(default=512, ge=1, description="cap on max_tokens")
    explanation_max_tokens: int = Field(default=96, ge=1, le=1024)
    explanation_timeout_s: float = Field(
        default=60.0, gt=0, description="an explanation not finished by then is cut off"
    )
    memory_budget_mb: int | None = Field(
        default=None, ge=16, description="models loaded at once must fit (default: the profile's)"
    )

    # Updates (pulled over MQTT; needs mqtt_enabled and at least one release key).
    release_keys: tuple[Path, ...] = Field(
        default=(), description="public keys (role release) whose release notices are trusted"
    )
    root_keys: tuple[Path, ...] = Field(
        default=(), description="public keys (role root) whose trust notices rotate release keys"
    )
    update_groups: tuple[str, ...] = Field(
        default=(), description="fleet groups this box takes releases for (besides its own id)"
    )
    probation_s: float = Field(
        default=300.0, ge=0, description="how long a new version is watched before it is kept"
    )
    probation_max_errors: int = Field(
        default=3, ge=1, description="inference failures during probation that roll it back"
    )
    probation_latency_factor: float = Field(
        default=2.0, gt=1, description="p95 slower than this x the previous version rolls back"
    )
    probation_min_samples: int = Field(
        default=20, ge=1, description="live predictions needed before latency is judged"
    )
    probation_selftest_s: float = Field(
        default=10.0, gt=0, description="golden self-test period during probation"
    )
    keep_versions: int = Field(default=3, ge=2, description="installed versions kept per model")
    update_min_free_mb: int = Field(
        default=64, ge=0, description="free disk space kept beyond twice the bundle's size"
    )
    update_fetch: Literal["auto", "http", "mqtt"] = Field(
        default="auto",
        description="how bundles are fetched: auto (the URL when the notice has one, else chunks "
        "over MQTT), mqtt (chunks over MQTT whenever offered: boxes that reach only the broker), "
        "or http (URLs only)",
    )
    update_chunk_window: int = Field(
        default=8, ge=1, le=256, description="chunk requests outstanding at once (MQTT delivery)"
    )
    update_chunk_timeout_s: float = Field(
        default=10.0, gt=0, le=600, description="a chunk request unanswered this long is sent "
        "again (doubling each time, up to 60 s)",
    )  # fmt: skip
    update_chunk_expiry_s: int = Field(
        default=60, ge=1, le=86_400, description="MQTT 5 message expiry of chunk requests"
    )
    update_chunk_stall_s: float = Field(
        default=300.0, gt=0, description="no chunk for this long while connected: the download "
        "step fails and is retried (reported)",
    )  # fmt: skip

    log_level: Literal["debug", "info", "warning", "error"] = "info"
    access_log: bool = Field(default=False, description="log every HTTP request (uvicorn)")

    @model_validator(mode="after")
    def _tls_pair(self) -> Self:
        if (self.tls_certfile is None) != (self.tls_keyfile is None):
            raise ValueError("tls_certfile and tls_keyfile go together: set both or neither")
        if (self.mqtt_tls_certfile is None) != (self.mqtt_tls_keyfile is None):
            raise ValueError(
                "mqtt_tls_certfile and mqtt_tls_keyfile go together: set both or neither"
            )
        if self.mqtt_tls_certfile is not None and self.mqtt_tls_ca is None:
            raise ValueError("a client certificate needs mqtt_tls_ca (the broker's CA) too")
        if self.mqtt_reconnect_max_s < self.mqtt_reconnect_min_s:
            raise ValueError("mqtt_reconnect_max_s must be at least mqtt_reconnect_min_s")
        return self

    @property
    def client_id(self) -> str:
        return self.mqtt_client_id or f"lineside-{self.site}-{self.device}"

    @property
    def updater_dir(self) -> Path:
        return self.state_dir / "updater"

    @property
    def outbox_path(self) -> Path:
        return self.state_dir / "outbox.sqlite3"

    @property
    def tls(self) -> bool:
        return self.tls_certfile is not None

    @property
    def store_dir(self) -> Path:
        return self.state_dir / "store"

    @property
    def requests_dir(self) -> Path:
        return self.state_dir / "requests"

    @property
    def feedback_dir(self) -> Path:
        return self.state_dir / "feedback"

    @property
    def cache_dir(self) -> Path:
        return self.state_dir / "cache"

    def key_files(self) -> list[Path]:
        """Every trusted public key file: the listed ones, then *.pub in trusted_keys_dir."""
        files = list(self.trusted_keys)
        if self.trusted_keys_dir is not None:
            if not self.trusted_keys_dir.is_dir():
                raise ConfigError(
                    f"trusted_keys_dir {self.trusted_keys_dir} is not a directory; create it or "
                    "fix the setting"
                )
            files += sorted(self.trusted_keys_dir.glob("*.pub"))
        return files


def load_settings(
    config_file: Path | None = None,
    overrides: dict[str, Any] | None = None,
    *,
    credentials_dir: Path | None = None,
) -> AgentSettings:
    """Settings from every source; `ConfigError` says which value is wrong and where it came from."""
    if config_file is not None and not config_file.is_file():
        raise ConfigError(f"config file {config_file} does not exist; check --config")
    credentials = credentials_dir or _credentials_dir()

    class _Loaded(AgentSettings):
        @classmethod
        def settings_customise_sources(
            cls,
            settings_cls: type[BaseSettings],
            init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource,
            dotenv_settings: PydanticBaseSettingsSource,
            file_secret_settings: PydanticBaseSettingsSource,
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
            if credentials is not None:
                sources.append(
                    SecretsSettingsSource(settings_cls, secrets_dir=credentials, env_prefix="")
                )
            if config_file is not None:
                sources.append(TomlConfigSettingsSource(settings_cls, toml_file=config_file))
            return tuple(sources)

    try:
        loaded = _Loaded(**{k: v for k, v in (overrides or {}).items() if v is not None})
    except ValidationError as exc:
        raise ConfigError(_describe(exc, config_file)) from None
    except ValueError as exc:  # TOML syntax errors and unreadable secret files
        raise ConfigError(f"cannot read the settings: {exc}") from None
    return AgentSettings.model_construct(**dict(loaded))


def _credentials_dir() -> Path | None:
    value = os.environ.get("CREDENTIALS_DIRECTORY")
    return Path(value) if value and Path(value).is_dir() else None


def _describe(exc: ValidationError, config_file: Path | None) -> str:
    problems = []
    for error in exc.errors():
        field = ".".join(str(part) for part in error["loc"])
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = "is not a setting (a typo?); see `edge-agent serve --help` or docs/agent.md"
        problems.append(f"{field} ({ENV_PREFIX}{field.upper()}): {message}" if field else message)
    where = (
        f" (config file {config_file}, environment, credentials or options)" if config_file else ""
    )
    return "invalid settings" + where + ": " + "; ".join(problems)
