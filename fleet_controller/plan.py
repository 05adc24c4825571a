"""The rollout plan: which bundle goes to which cohort, in which waves, when, and when to stop.

This module owns the plan's schema (the TOML of docs/fleet.md "Rollouts": waves, soak, deadline,
per-site maintenance windows, gates, rollback policy, and the optional shadow phase of docs/fleet.md
"Shadow phase"), its validation, and the pure arithmetic
the runner needs: how many boxes each wave gets (`wave_sizes`) and which boxes those are
(`assign_waves`, deterministic, so a restarted controller computes the same waves). Every problem
with a plan is a `FleetError` in one line that names the field and says what to write instead.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import re
import tomllib
from collections import defaultdict
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from fractions import Fraction
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Final, Literal, Self
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails

from edge_bundle.chunks import MAX_CHUNK_SIZE, MIN_CHUNK_SIZE
from edge_bundle.release import MAX_SHADOW_S, Notes, Segment, Url
from fleet_controller.errors import FleetError

MAX_WAVES: Final = 1000
MAX_SOAK_S: Final = 30 * 86400.0
# A box's notice is valid for at most 366 days; waiting longer for it makes no sense.
MAX_DEADLINE_S: Final = 366 * 86400.0
MINUTES_PER_DAY: Final = 24 * 60
# Three days covers a window whose ranges fall in a DST gap on one of them.
_HORIZON: Final = timedelta(days=3)
# UTC offsets change at most once in this long (real zones: twice a year at most).
_OFFSET_PROBE: Final = timedelta(hours=1)
_RANGE = re.compile(
    r"^(?P<sh>[01]\d|2[0-3]):(?P<sm>[0-5]\d)-(?P<eh>[01]\d|2[0-4]):(?P<em>[0-5]\d)$"
)
_TOML_KEYS: Final = frozenset(
    {"name", "bundle", "url", "cohort", "notes", "waves", "windows", "gates", "on_halt", "shadow"}
    | {"delivery", "chunk_size"}
)
_MOVABLE = ("soak_s", "deadline_s")  # documented under [waves]; accepted at the top level too
_EXAMPLE_WAVES = (
    "percent = [5, 25, 100], counts = [3, 20] or exponential = { start = 2, factor = 4 }"
)

Percent = Annotated[float, Field(gt=0, le=100, allow_inf_nan=False)]
PositiveCount = Annotated[StrictInt, Field(ge=1)]
Count = Annotated[StrictInt, Field(ge=0)]
Fraction01 = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


class Exponential(_Model):
    """Waves of `start`, `start * factor`, `start * factor**2`, ... boxes until all have one."""

    start: PositiveCount
    factor: Annotated[float, Field(gt=1, le=1000)]


class WavesSpec(_Model):
    """How the cohort is cut into waves: exactly one of percent, counts or exponential."""

    percent: Annotated[list[Percent], Field(min_length=1, max_length=MAX_WAVES)] | None = None
    counts: Annotated[list[PositiveCount], Field(min_length=1, max_length=MAX_WAVES)] | None = None
    exponential: Exponential | None = None
    min_per_wave: PositiveCount = 1

    @model_validator(mode="after")
    def _one_kind(self) -> Self:
        kinds = ("percent", "counts", "exponential")
        given = [kind for kind in kinds if getattr(self, kind) is not None]
        if len(given) != 1:
            got = f" (got {' and '.join(given)})" if given else ""
            raise ValueError(f"give exactly one of {_EXAMPLE_WAVES}{got}")
        if self.percent is not None:
            _check_percent(self.percent)
        return self


def _check_percent(shares: Sequence[float]) -> None:
    if any(later <= earlier for earlier, later in itertools.pairwise(shares)):
        raise ValueError(
            f"percent {list(shares)} must grow from wave to wave: the shares are cumulative, "
            "e.g. percent = [5, 25, 100]"
        )
    if shares[-1] != 100:
        raise ValueError(
            f"a wave plan that does not add up: the last percent is {shares[-1]:g}, not 100 "
            "(the shares are cumulative); end it with 100, e.g. percent = [5, 25, 100]"
        )


class GatesSpec(_Model):
    """When a rollout halts on its own (docs/fleet.md "Gates")."""

    max_failure_ratio: Fraction01 = 0.2
    min_installs: PositiveCount = 3
    max_p95_ratio: Annotated[float, Field(ge=1, le=1000)] = 1.5
    max_error_rate_increase: Fraction01 = 0.02
    max_selftest_failures: Count = 0
    max_drift_alerts: Count = 0
    min_boxes: PositiveCount = 2
    min_samples: PositiveCount = 50


class ShadowSpec(_Model):
    """The shadow phase of every wave (docs/fleet.md "Shadow phase"): the wave's boxes install
    the candidate without activating it and shadow the active model with it for `soak_s`; the
    wave activates only when the candidate agreed on at least `min_agreement` of at least
    `min_compared` photos (and, when given, its p95 is within `max_candidate_p95_ratio` of the
    active version's)."""

    soak_s: Annotated[float, Field(ge=0, le=MAX_SOAK_S)] = 900.0
    min_compared: PositiveCount = 100
    min_agreement: Fraction01 = 0.95
    max_candidate_p95_ratio: Annotated[float, Field(ge=1, le=1000)] | None = None
    # How long a box shadows at most (the notice's max_s); default soak_s + the plan's deadline_s.
    max_s: Annotated[float, Field(gt=0, le=MAX_SHADOW_S)] | None = None

    @model_validator(mode="after")
    def _long_enough(self) -> Self:
        if self.max_s is not None and self.max_s < self.soak_s:
            raise ValueError(
                f"max_s {self.max_s:g} is shorter than soak_s {self.soak_s:g}: boxes would stop "
                "shadowing before the soak ends; raise max_s or leave it out"
            )
        return self


class Window(_Model):
    """When a site takes updates: local time ranges (`HH:MM-HH:MM`, may wrap midnight) in `tz`."""

    tz: StrictStr
    open: Annotated[list[StrictStr], Field(min_length=1, max_length=48)]

    @field_validator("tz")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(
                f"{value!r} is not a time zone name; write an IANA name such as "
                '"Europe/Berlin" or "UTC"'
            ) from None
        return value

    @field_validator("open")
    @classmethod
    def _ranges_parse(cls, value: list[str]) -> list[str]:
        for text in value:
            _parse_range(text)
        return value

    @cached_property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.tz)

    def is_open(self, now: datetime) -> bool:
        """Whether the site's local wall clock at `now` (timezone-aware) is inside a range."""
        return _open_at(_as_utc(now), self.zone, self._minute_ranges)

    def next_open(self, now: datetime) -> datetime:
        """The first instant at or after `now` when the window is open, in UTC.

        The horizon is cut where the zone's UTC offset changes; within one offset the window can
        only open at a range's start, and at a change the wall clock may jump into a range.
        """
        start = _as_utc(now)
        zone, ranges = self.zone, self._minute_ranges
        if _open_at(start, zone, ranges):
            return start
        horizon = start + _HORIZON
        segment = start
        while segment < horizon:
            offset = _offset(segment, zone)
            end = _offset_change(segment, zone, offset, horizon)
            opened = _first_start(segment, offset, ranges)
            if opened < end:
                return opened
            if end < horizon and _open_at(end, zone, ranges):
                return end
            segment = end
        raise FleetError(  # only a window whose every range falls in DST gaps gets here
            f"the window {self.open} in {self.tz} does not open within three days; widen its ranges"
        )

    @cached_property
    def _minute_ranges(self) -> tuple[tuple[int, int], ...]:
        return tuple(_parse_range(text) for text in self.open)


def _parse_range(text: str) -> tuple[int, int]:
    """`"22:00-05:00"` as minutes of the day (start, end); the end may be 24:00."""
    match = _RANGE.fullmatch(text)
    hint = 'write "HH:MM-HH:MM" in local time, e.g. "22:00-05:00" (may wrap midnight)'
    if match is None:
        raise ValueError(f"{text!r} is not a time range; {hint}")
    start = int(match["sh"]) * 60 + int(match["sm"])
    end = int(match["eh"]) * 60 + int(match["em"])
    if end > MINUTES_PER_DAY:
        raise ValueError(f"{text!r} ends after 24:00; {hint}")
    if start == end:
        raise ValueError(f'{text!r} is empty; for the whole day write "00:00-24:00"')
    return start, end


def _open_at(now: datetime, zone: ZoneInfo, ranges: Sequence[tuple[int, int]]) -> bool:
    local = now.astimezone(zone)
    minute = local.hour * 60 + local.minute
    return any(
        start <= minute < end if start < end else minute >= start or minute < end
        for start, end in ranges
    )


def _offset(now: datetime, zone: ZoneInfo) -> timedelta:
    offset = now.astimezone(zone).utcoffset()
    assert offset is not None  # a ZoneInfo always has one
    return offset


def _offset_change(
    start: datetime, zone: ZoneInfo, offset: timedelta, horizon: datetime
) -> datetime:
    """The first instant after `start` (before `horizon`) with another UTC offset, or `horizon`."""
    low = start
    while low < horizon:
        high = min(low + _OFFSET_PROBE, horizon)
        if _offset(high, zone) != offset:
            return _bisect_change(low, high, zone, offset)
        low = high
    return horizon


def _bisect_change(low: datetime, high: datetime, zone: ZoneInfo, offset: timedelta) -> datetime:
    """The first second in (low, high] whose offset differs; `high`'s does."""
    while high - low > timedelta(seconds=1):
        middle = low + (high - low) / 2
        if _offset(middle, zone) == offset:
            low = middle
        else:
            high = middle
    return high.replace(microsecond=0) if high.microsecond else high


def _first_start(now: datetime, offset: timedelta, ranges: Sequence[tuple[int, int]]) -> datetime:
    """The first instant at or after `now` at which a range starts, if the offset held."""
    local = (now + offset).replace(tzinfo=None)
    midnight = local.replace(hour=0, minute=0, second=0, microsecond=0)
    starts = []
    for start, _ in ranges:
        at = midnight + timedelta(minutes=start)
        starts.append(at if at >= local else at + timedelta(days=1))
    return (min(starts) - offset).replace(tzinfo=UTC)


def _as_utc(now: datetime) -> datetime:
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError(f"{now!r} has no timezone; pass an aware UTC datetime")
    return now.astimezone(UTC)


class PreviousBundle(_Model):
    """A bundle a rollback may go back to: its file (verified at creation) and its URL (which a
    plan delivering over MQTT may leave out: the bundle then goes into the chunk store too)."""

    bundle: Path
    url: Url | None = None


class RolloutPlan(_Model):
    """A validated rollout plan; `parse` / `from_toml` read the TOML layout of docs/fleet.md."""

    name: Segment
    bundle: Path
    # "mqtt": the controller puts the bundle in its chunk store and the notices carry the
    # critical `mqtt_chunks` extension (docs/mqtt-delivery.md); boxes need agent 0.4.0.
    delivery: Literal["http", "mqtt"] = "http"
    chunk_size: Annotated[StrictInt, Field(ge=MIN_CHUNK_SIZE, le=MAX_CHUNK_SIZE)] | None = None
    # Required unless delivery is "mqtt"; with both, boxes that reach HTTP may use the URL.
    url: Url | None = Field(default=None, validate_default=True)
    cohort: dict[str, Any]
    waves: WavesSpec
    soak_s: Annotated[float, Field(ge=0, le=MAX_SOAK_S)] = 900.0
    deadline_s: Annotated[float, Field(gt=0, le=MAX_DEADLINE_S)] = 86400.0
    windows: dict[Segment, Window] = Field(default_factory=dict)
    gates: GatesSpec = Field(default_factory=GatesSpec)
    rollback_on_halt: StrictBool = True
    # The versions boxes may be rolled back to ([on_halt] previous = [{bundle, url}, ...]); a
    # version this controller rolled out before is known without being listed.
    previous: list[PreviousBundle] = Field(default_factory=list)
    notes: Notes | None = None
    shadow: ShadowSpec | None = None

    @field_validator("url")
    @classmethod
    def _url_unless_mqtt(cls, value: Url | None, info: ValidationInfo) -> Url | None:
        if value is None and info.data.get("delivery") == "http":  # absent: delivery was wrong
            raise ValueError(f'missing; {_HINTS["url"]}, or deliver over MQTT: delivery = "mqtt"')
        return value

    @model_validator(mode="after")
    def _delivered_somehow(self) -> Self:
        if self.delivery == "http":
            if self.chunk_size is not None:
                raise ValueError(
                    'chunk_size is for delivery = "mqtt"; remove it or add delivery = "mqtt"'
                )
            unreachable = [str(entry.bundle) for entry in self.previous if entry.url is None]
            if unreachable:
                raise ValueError(
                    f"on_halt.previous: {unreachable[0]} has no url; give its url, or deliver "
                    'over MQTT (delivery = "mqtt") so rollbacks come from the chunk store too'
                )
        return self

    @property
    def over_mqtt(self) -> bool:
        return self.delivery == "mqtt"

    @property
    def shadow_max_s(self) -> float | None:
        """How long boxes shadow at most (the shadow notices' `max_s`); None: no shadow phase."""
        if self.shadow is None:
            return None
        if self.shadow.max_s is not None:
            return self.shadow.max_s
        return min(float(MAX_SHADOW_S), self.shadow.soak_s + self.deadline_s)

    @classmethod
    def parse(cls, data: Mapping[str, Any], base_dir: Path) -> RolloutPlan:
        """Validate the plan's TOML tables; a relative `bundle` is taken from `base_dir`."""
        fields = _flatten_toml(data)
        fields["bundle"] = _bundle_path(fields.get("bundle"), base_dir)
        previous = fields.get("previous", ())
        if isinstance(previous, list | tuple):
            fields["previous"] = [
                {**entry, "bundle": _bundle_path(entry.get("bundle"), base_dir)}
                if isinstance(entry, Mapping)
                else entry
                for entry in previous
            ]
        return cls._validated(fields)

    @classmethod
    def from_toml(cls, text: str, base_dir: Path) -> RolloutPlan:
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise FleetError(f"the rollout plan is not valid TOML: {exc}; fix that line") from exc
        return cls.parse(data, base_dir)

    def to_json(self) -> dict[str, Any]:
        """The plan as plain JSON values, for storage; `from_json` reads it back."""
        return self.model_dump(mode="json", exclude_none=True)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RolloutPlan:
        fields = dict(data)
        if isinstance(fields.get("bundle"), str):
            fields["bundle"] = Path(fields["bundle"])
        fields["previous"] = [
            {**entry, "bundle": Path(entry["bundle"])} for entry in fields.get("previous", ())
        ]
        return cls._validated(fields)

    def window(self, site: str) -> Window | None:
        return self.windows.get(site)

    def site_open(self, site: str, now: datetime) -> bool:
        """Whether `site` takes updates at `now`; a site without a window always does."""
        window = self.windows.get(site)
        return window is None or window.is_open(now)

    def site_next_open(self, site: str, now: datetime) -> datetime:
        """When `site` next takes updates (`now`, in UTC, if it does now)."""
        window = self.windows.get(site)
        return _as_utc(now) if window is None else window.next_open(now)

    @classmethod
    def _validated(cls, fields: Mapping[str, Any]) -> RolloutPlan:
        try:
            return cls.model_validate(fields)
        except ValidationError as exc:
            raise FleetError(f"rollout plan: {_describe(exc)}") from exc


def _flatten_toml(data: Mapping[str, Any]) -> dict[str, Any]:
    """The TOML layout as the model's fields: soak/deadline out of [waves], [on_halt] flat."""
    unknown = sorted(set(data) - _TOML_KEYS - set(_MOVABLE))
    if unknown:
        raise FleetError(
            f"rollout plan: unknown field {unknown[0]!r}; a plan has name, bundle, url, delivery, "
            "chunk_size, cohort, notes and the tables [waves], [windows], [gates], [on_halt], [shadow] "
            "(see docs/fleet.md)"
        )
    fields = {key: value for key, value in data.items() if key != "on_halt"}
    waves = data.get("waves")
    if isinstance(waves, Mapping):
        fields["waves"] = {k: v for k, v in waves.items() if k not in _MOVABLE}
        for key in _MOVABLE:
            if key in waves and key in data:
                raise FleetError(
                    f"rollout plan: {key} is given twice, at the top and under [waves]; "
                    "keep the one under [waves]"
                )
            if key in waves:
                fields[key] = waves[key]
    on_halt = data.get("on_halt", {})
    if not isinstance(on_halt, Mapping) or set(on_halt) - {"rollback", "previous"}:
        raise FleetError(
            "rollout plan: on_halt holds rollback and previous; write [on_halt] rollback = true "
            "(or false to leave the boxes on the new version when a rollout halts) and "
            'previous = [{ bundle = "dist/defects-3.bundle", url = "https://..." }]'
        )
    if "rollback" in on_halt:
        fields["rollback_on_halt"] = on_halt["rollback"]
    if "previous" in on_halt:
        fields["previous"] = on_halt["previous"]
    return fields


def _bundle_path(value: Any, base_dir: Path) -> Path:
    if not isinstance(value, str) or not value:
        raise FleetError(f"rollout plan: bundle: {_HINTS['bundle']}")
    path = Path(value)
    return (path if path.is_absolute() else base_dir / path).resolve()


_HINTS: Final[dict[str, str]] = {
    "name": 'write 1-64 letters, digits, "_", "." or "-", e.g. name = "defects-4"',
    "bundle": 'write the bundle file\'s path, relative to the plan, e.g. bundle = "dist/defects-4.bundle"',
    "url": 'write where boxes download it, e.g. url = "https://files.plant.example/defects-4.bundle"',
    "delivery": 'write delivery = "http" (the url) or delivery = "mqtt" (chunks over the broker)',
    "chunk_size": f"write bytes per chunk from {MIN_CHUNK_SIZE} to {MAX_CHUNK_SIZE}, e.g. chunk_size = 262144",
    "cohort": 'write a selector table, e.g. cohort = { group = "line1" }',
    "waves": f"write a [waves] table with {_EXAMPLE_WAVES}",
    "percent": "write cumulative shares ending at 100, e.g. percent = [5, 25, 100]",
    "counts": "write box counts of at least 1, e.g. counts = [3, 20] (the rest is the last wave)",
    "exponential": "write exponential = { start = 2, factor = 4 }",
    "start": "write a whole number of boxes of at least 1, e.g. start = 2",
    "factor": "write a number above 1 (at most 1000), e.g. factor = 4",
    "min_per_wave": "write a whole number of at least 1, e.g. min_per_wave = 1",
    "soak_s": "write seconds from 0 to 30 days, e.g. soak_s = 900",
    "deadline_s": "write seconds above 0, at most 366 days, e.g. deadline_s = 86400",
    "windows": 'write one entry per site, e.g. plant-a = { tz = "Europe/Berlin", open = ["22:00-05:00"] }',
    "tz": 'write an IANA time zone name, e.g. tz = "Europe/Berlin"',
    "open": 'write local time ranges, e.g. open = ["22:00-05:00"]',
    "max_failure_ratio": "write a fraction from 0 to 1, e.g. max_failure_ratio = 0.2",
    "min_installs": "write a whole number of at least 1, e.g. min_installs = 3",
    "max_p95_ratio": "write a ratio of at least 1, e.g. max_p95_ratio = 1.5",
    "max_error_rate_increase": "write a fraction from 0 to 1, e.g. max_error_rate_increase = 0.02",
    "max_selftest_failures": "write a whole number of at least 0, e.g. max_selftest_failures = 0",
    "max_drift_alerts": "write a whole number of at least 0, e.g. max_drift_alerts = 0",
    "min_boxes": "write a whole number of at least 1, e.g. min_boxes = 2",
    "min_samples": "write a whole number of at least 1, e.g. min_samples = 50",
    "rollback_on_halt": "write [on_halt] rollback = true or false",
    "shadow": "write a [shadow] table, e.g. soak_s = 900, min_compared = 200, min_agreement = 0.95",
    "min_compared": "write a whole number of photos of at least 1, e.g. min_compared = 200",
    "min_agreement": "write a fraction from 0 to 1, e.g. min_agreement = 0.95",
    "max_candidate_p95_ratio": "write a ratio of at least 1, e.g. max_candidate_p95_ratio = 1.5",
    "max_s": "write seconds above 0, at most 7 days, e.g. max_s = 3600",
    "notes": "write a short text of at most 2000 characters",
}
# What the model calls a field, as the TOML spells it.
_TOML_NAMES: Final = {"rollback_on_halt": "on_halt.rollback"}
_MODELS_AT: Final[dict[str, type[BaseModel]]] = {
    "": RolloutPlan,
    "waves": WavesSpec,
    "exponential": Exponential,
    "gates": GatesSpec,
    "windows": Window,
    "shadow": ShadowSpec,
}


def _describe(exc: ValidationError) -> str:
    """Pydantic's errors as one line: `waves.percent: why; what to write instead`."""
    return "; ".join(_describe_one(error) for error in exc.errors())


def _describe_one(error: ErrorDetails) -> str:
    loc = [str(part) for part in error["loc"]]
    where = _TOML_NAMES.get(".".join(loc), ".".join(loc)) or "plan"
    names = [part for part in loc if not part.isdigit()]
    field = names[-1] if names else ""
    if error["type"] == "extra_forbidden":
        parent = next((n for n in reversed(names[:-1]) if n in _MODELS_AT), "")
        known = ", ".join(_toml_fields(_MODELS_AT[parent]))
        return f"{where}: unknown field; remove it or check its spelling (known here: {known})"
    if error["type"] == "value_error":
        return f"{where}: {error['msg'].removeprefix('Value error, ')}"
    reason = "missing" if error["type"] == "missing" else error["msg"].lower()
    hint = _HINTS.get(field)
    return f"{where}: {reason}; {hint}" if hint else f"{where}: {reason}"


def _toml_fields(model: type[BaseModel]) -> list[str]:
    names = [_TOML_NAMES.get(name, name) for name in model.model_fields]
    if model is RolloutPlan:
        names = [n for n in names if n not in _MOVABLE]
    return names


def wave_sizes(waves: WavesSpec, total: int) -> list[int]:
    """How many boxes each wave gets: they sum to `total`, none is empty, and each has at least
    `min_per_wave` except a single wave when the cohort is smaller than that."""
    if total < 0:
        raise ValueError(f"total must be at least 0, got {total}")
    if total == 0:
        raise FleetError(
            "the cohort is empty: no box matches its selector; widen the cohort or check that "
            "the boxes have reported to the controller (fleet-controller devices)"
        )
    return _sizes_from_targets(_cumulative_targets(waves, total), total, waves.min_per_wave)


def _cumulative_targets(waves: WavesSpec, total: int) -> list[int]:
    """Boxes done after each wave, as the plan asks before `min_per_wave` applies."""
    if waves.percent is not None:
        # Decimal shares as written (Fraction of the float's repr), so 29% of 100 is 29, not 30.
        return [min(total, math.ceil(Fraction(repr(p)) * total / 100)) for p in waves.percent]
    if waves.counts is not None:
        return [*(min(total, done) for done in itertools.accumulate(waves.counts)), total]
    assert waves.exponential is not None  # WavesSpec holds exactly one kind
    return _exponential_targets(waves.exponential, total)


def _exponential_targets(spec: Exponential, total: int) -> list[int]:
    targets: list[int] = []
    done, size = 0, float(spec.start)
    while done < total:
        # A hair below the product, so float noise on a whole number (4.0000000001) stays 4.
        done = min(total, done + math.ceil(size * (1 - 1e-12)))
        targets.append(done)
        size *= spec.factor
    return targets


def _sizes_from_targets(targets: Sequence[int], total: int, minimum: int) -> list[int]:
    sizes: list[int] = []
    done = 0
    for target in targets:
        wanted = target - done
        if wanted <= 0:
            continue  # the plan's share was reached already: no empty wave
        size = min(max(wanted, minimum), total - done)
        if 0 < total - done - size < minimum:
            size = total - done  # a last wave below the minimum joins this one
        sizes.append(size)
        done += size
        if done == total:
            break
    return sizes


def assign_waves(refs: Sequence[str], sizes: Sequence[int], seed: str) -> list[list[str]]:
    """Cut `refs` (`SITE/DEVICE`) into waves of `sizes`, spread over sites, deterministically.

    Boxes are ordered by taking one box of each site in turn (sites and the boxes within a site
    in the order of sha256 of `seed` and the name), so an early wave spans as many sites as it
    can, and the same refs, sizes and seed always give the same waves whatever the input order.
    """
    if len(set(refs)) != len(refs):
        raise ValueError("refs must be distinct")
    if sum(sizes) != len(refs) or any(size <= 0 for size in sizes):
        raise ValueError(f"wave sizes {list(sizes)} must be positive and sum to {len(refs)}")
    order = _spread_order(refs, seed)
    bounds = [0, *itertools.accumulate(sizes)]
    return [order[start:end] for start, end in itertools.pairwise(bounds)]


def _spread_order(refs: Sequence[str], seed: str) -> list[str]:
    by_site: defaultdict[str, list[str]] = defaultdict(list)
    for ref in refs:
        by_site[ref.split("/", 1)[0]].append(ref)
    sites = sorted(by_site, key=lambda site: _rank(seed, "site", site))
    queues = [sorted(by_site[site], key=lambda ref: _rank(seed, "box", ref)) for site in sites]
    return [ref for turn in itertools.zip_longest(*queues) for ref in turn if ref is not None]


def _rank(seed: str, kind: str, value: str) -> tuple[str, str]:
    digest = hashlib.sha256(f"{seed}\0{kind}\0{value}".encode()).hexdigest()
    return digest, value
