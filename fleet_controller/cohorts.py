"""Cohorts: which boxes a selector picks, and the preview shown before anything is sent.

A `Selector` is the TOML/JSON object of docs/fleet.md "Cohorts": every given criterion must
match (AND), a list is any-of, `labels` must all be equal, `devices` is an explicit list of
SITE/DEVICE refs (alone, or intersected with the other criteria) and `exclude` removes boxes.
An empty selector is refused (it would pick the whole fleet by accident); `all = true` says so
on purpose. Matching is pure: `Selector.matches`, `select`; `preview` reads the registry.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    StringConstraints,
    ValidationError,
    model_validator,
)
from pydantic_core import ErrorDetails

from edge_bundle.release import DeviceRef, Segment
from fleet_controller.errors import FleetError
from fleet_controller.registry import Device, Registry

#: Largest explicit device list a selector takes (a whole fleet is 10,000 boxes).
MAX_DEVICES = 20_000
CRITERIA = ("site", "line", "group", "profile", "model", "labels", "devices")


def _any_of(value: Any) -> Any:
    """A single string is a list of one; a list becomes a tuple (the model is frozen)."""
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list | tuple):
        return tuple(value)
    raise ValueError(f"must be a string or a list of strings, not {type(value).__name__}")


def _not_empty(value: tuple[str, ...]) -> tuple[str, ...]:
    if not value:
        raise ValueError("an empty list picks nothing; name at least one, or leave the key out")
    return tuple(dict.fromkeys(value))  # duplicates removed, order kept


Text = Annotated[str, StringConstraints(min_length=1, max_length=256)]
AnyOf = Annotated[tuple[Text, ...], BeforeValidator(_any_of), AfterValidator(_not_empty)]
Sites = Annotated[tuple[Segment, ...], BeforeValidator(_any_of), AfterValidator(_not_empty)]
Refs = Annotated[tuple[DeviceRef, ...], BeforeValidator(_any_of), AfterValidator(_not_empty)]


class Selector(BaseModel):
    """Which boxes a cohort takes (docs/fleet.md "Cohorts")."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    all: bool = False
    site: Sites | None = None
    line: AnyOf | None = None
    group: AnyOf | None = None
    profile: AnyOf | None = None
    model: AnyOf | None = None
    labels: dict[Text, Text] | None = None
    devices: Refs | None = None
    exclude: Refs | None = None

    @model_validator(mode="after")
    def _one_criterion(self) -> Selector:
        given = [name for name in CRITERIA if getattr(self, name) is not None]
        if self.labels == {}:
            raise ValueError(
                "labels = {} picks by nothing; name at least one label, or leave it out"
            )
        if not given and not self.all:
            raise ValueError(
                "an empty selector would pick the whole fleet: say `site = [...]` or "
                "`devices = [...]` (or any other criterion), or `all = true` to mean every box"
            )
        if given and self.all:
            raise ValueError(
                f"`all = true` picks every box and cannot be combined with {', '.join(given)}; "
                "drop one of them (`exclude` may go with `all`)"
            )
        return self

    @classmethod
    def parse(cls, data: Mapping[str, Any]) -> Selector:
        """A selector from a TOML/JSON object; a `FleetError` says what is wrong with it."""
        try:
            return cls.model_validate(dict(data))
        except ValidationError as exc:
            problems = "; ".join(_problem(error) for error in exc.errors())
            raise FleetError(
                f'the cohort selector is not valid: {problems}. See docs/fleet.md "Cohorts".'
            ) from exc

    def to_json(self) -> dict[str, Any]:
        """The criteria given, as JSON (what a rollout stores with its frozen cohort)."""
        data = self.model_dump(exclude_defaults=True)
        return {
            key: list(value) if isinstance(value, tuple) else value for key, value in data.items()
        }

    def matches(self, device: Device) -> bool:
        """Whether `device` meets every criterion given."""
        if self.exclude is not None and device.ref in self.exclude:
            return False
        checks = (
            self.site is None or device.site in self.site,
            self.line is None or device.line in self.line,
            self.group is None or any(group in device.groups for group in self.group),
            self.profile is None or device.profile in self.profile,
            self.model is None or any(name in device.models for name in self.model),
            self.labels is None
            or all(device.labels.get(key) == value for key, value in self.labels.items()),
            self.devices is None or device.ref in self.devices,
        )
        return all(checks)


def _problem(error: ErrorDetails) -> str:
    where = ".".join(str(part) for part in error["loc"]) or "selector"
    if error["type"] == "extra_forbidden":
        return f"{where}: not a selector key; use {', '.join(Selector.model_fields)}"
    return f"{where}: {error['msg'].removeprefix('Value error, ')}"


def select(devices: Iterable[Device], selector: Selector) -> list[Device]:
    """The boxes `selector` picks, sorted by ref."""
    return sorted((d for d in devices if selector.matches(d)), key=lambda d: d.ref)


def preview(registry: Registry, selector: Selector) -> dict[str, Any]:
    """What a rollout to `selector` would take now: the boxes, how they split, and explicit
    devices the registry has never heard of (`missing`: an error at rollout creation) or that
    the other criteria leave out (`unmatched`)."""
    known = registry.devices()
    chosen = select(known, selector)
    refs = [d.ref for d in chosen]
    explicit = selector.devices or ()
    known_refs = {d.ref for d in known}
    return {
        "selector": selector.to_json(),
        "count": len(chosen),
        "refs": refs,
        "online": sum(1 for d in chosen if d.online),
        "by_site": _tally(d.site for d in chosen),
        "by_profile": _tally(d.profile or "unknown" for d in chosen),
        "by_agent_version": _tally(d.agent_version or "unknown" for d in chosen),
        "missing": sorted(ref for ref in explicit if ref not in known_refs),
        "unmatched": sorted(ref for ref in explicit if ref in known_refs and ref not in set(refs)),
    }


def _tally(values: Iterable[str]) -> dict[str, int]:
    return dict(sorted(Counter(values).items()))
