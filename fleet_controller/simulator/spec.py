"""What one simulated box is and how it behaves: `BoxSpec` and `Behaviour`, from Python or TOML.

A spec is plain, frozen data. Everything a box invents (latency, errors, self-test and drift
results, the outcome of an install) is a pure function of its behaviour and the model version it
runs, so a test can predict every figure it will see.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from edge_bundle.release import SEGMENT_PATTERN
from fleet_controller.errors import FleetError

Outcome = Literal["commit", "refuse", "fail_probation", "fail_staging"]
OUTCOMES: tuple[str, ...] = get_args(Outcome)
#: Where a box fetches a bundle when its notice offers both a URL and chunks over MQTT.
Fetch = Literal["http", "mqtt"]
#: The agent versions the simulator speaks like: 0.2.0 reads v2 notices, 0.1.0 refuses them,
#: 0.3.0 also understands the critical `shadow` extension (0.2.0 ignores it and activates),
#: 0.4.0 also the critical `mqtt_chunks` extension (bundles fetched in chunks over MQTT).
AGENT_VERSIONS: tuple[str, ...] = ("0.1.0", "0.2.0", "0.3.0", "0.4.0")
OLD_AGENT = "0.1.0"
SHADOW_AGENTS: frozenset[str] = frozenset({"0.3.0", "0.4.0"})
CHUNK_AGENTS: frozenset[str] = frozenset({"0.4.0"})

#: An offline window, in seconds after the simulator started; an end of None: never back.
Window = tuple[float, float | None]


class SpecError(FleetError):
    """A box spec or simulator config that cannot be used as written."""


@dataclass(frozen=True)
class Behaviour:
    """How a simulated box answers release notices and what its telemetry says.

    `outcome` applies to every version not named in `outcome_by_version`; a rollback notice
    commits unless its version is named there (going back to a known-good version works).
    """

    outcome: Outcome = "commit"
    outcome_by_version: Mapping[int, Outcome] = field(default_factory=dict)
    install_s: float = 0.5  # from notice to final report, spread evenly over the five steps
    offline: tuple[Window, ...] = ()
    base_p95_ms: float = 40.0
    p95_factor: Mapping[int, float] = field(default_factory=dict)  # version -> x base
    p95_ms: Mapping[int, float] = field(default_factory=dict)  # version -> absolute, wins
    error_rate: float = 0.0
    error_rate_by_version: Mapping[int, float] = field(default_factory=dict)
    selftest_fail: frozenset[int] = frozenset()
    drift_alert: frozenset[int] = frozenset()
    requests_per_s: float = 5.0
    download: bool = False
    reason: str | None = None  # overrides the refusal / roll-back reason the outcome implies
    # Shadowing a candidate: the share of photos it agrees on with the active model (per
    # version), and the one class pair its disagreements fall on (active, candidate).
    agreement: float = 1.0
    agreement_by_version: Mapping[int, float] = field(default_factory=dict)
    disagreement: tuple[str, str] = ("ok", "scratch")
    # With `download`: over MQTT or HTTP when the notice offers both (agent 0.4.0; a notice
    # offering one way is fetched that way).
    fetch: Fetch = "mqtt"

    def __post_init__(self) -> None:
        if self.fetch not in get_args(Fetch):
            raise SpecError(f"fetch {self.fetch!r} is not one of {', '.join(get_args(Fetch))}")
        for outcome in (self.outcome, *self.outcome_by_version.values()):
            if outcome not in OUTCOMES:
                raise SpecError(f"outcome {outcome!r} is not one of {', '.join(OUTCOMES)}")
        if self.install_s < 0 or self.requests_per_s < 0 or self.base_p95_ms <= 0:
            raise SpecError("install_s and requests_per_s must be >= 0 and base_p95_ms > 0")
        for start, end in self.offline:
            if start < 0 or (end is not None and end <= start):
                raise SpecError(
                    f"offline window ({start}, {end}) must start at >= 0 s and end after it starts"
                )
        rates = [self.error_rate, *self.error_rate_by_version.values()]
        if any(not 0.0 <= rate <= 1.0 for rate in rates):
            raise SpecError("error rates must be between 0 and 1")
        agreements = [self.agreement, *self.agreement_by_version.values()]
        if any(not 0.0 <= share <= 1.0 for share in agreements):
            raise SpecError("agreements must be between 0 and 1")

    def outcome_for(self, version: int, *, rollback: bool) -> Outcome:
        if version in self.outcome_by_version:
            return self.outcome_by_version[version]
        return "commit" if rollback else self.outcome

    def p95_for(self, version: int) -> float:
        if version in self.p95_ms:
            return float(self.p95_ms[version])
        return self.base_p95_ms * float(self.p95_factor.get(version, 1.0))

    def error_rate_for(self, version: int) -> float:
        return float(self.error_rate_by_version.get(version, self.error_rate))

    def agreement_for(self, version: int) -> float:
        return float(self.agreement_by_version.get(version, self.agreement))


@dataclass(frozen=True)
class BoxSpec:
    """One simulated box: who it is, what it runs, and how it behaves."""

    site: str
    device: str
    line: str | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    groups: tuple[str, ...] = ()
    profile: str = "generic-x86-64-avx2"
    agent_version: str = "0.2.0"
    models: Mapping[str, int] = field(default_factory=lambda: {"defects": 1})
    behaviour: Behaviour = field(default_factory=Behaviour)

    def __post_init__(self) -> None:
        for what, value in (("site", self.site), ("device", self.device), *_groups(self.groups)):
            if re.fullmatch(SEGMENT_PATTERN, value) is None:
                raise SpecError(
                    f"{what} {value!r} must be 1-64 letters, digits, '_', '.' or '-', starting "
                    "with a letter or digit"
                )
        if self.agent_version not in AGENT_VERSIONS:
            raise SpecError(
                f"agent_version {self.agent_version!r} is not one the simulator speaks like "
                f"({', '.join(AGENT_VERSIONS)})"
            )

    @property
    def ref(self) -> str:
        return f"{self.site}/{self.device}"

    @property
    def old_agent(self) -> bool:
        """An agent before 0.2.0: refuses v2 notices, publishes 0.1.0 telemetry."""
        return self.agent_version == OLD_AGENT

    @property
    def understands_shadow(self) -> bool:
        """An agent from 0.3.0: acts on the critical `shadow` extension (others ignore it)."""
        return self.agent_version in SHADOW_AGENTS

    @property
    def understands_chunks(self) -> bool:
        """An agent from 0.4.0: fetches bundles in chunks over MQTT (`mqtt_chunks`)."""
        return self.agent_version in CHUNK_AGENTS

    @classmethod
    def from_toml(cls, table: Mapping[str, Any]) -> BoxSpec:
        """A spec from a `[[boxes]]` table (its `behaviour` a sub-table)."""
        values = dict(table)
        behaviour = behaviour_from_toml(values.pop("behaviour", {}))
        _known(values, {f for f in cls.__dataclass_fields__ if f != "behaviour"}, "[[boxes]]")
        try:
            if "groups" in values:
                values["groups"] = tuple(values["groups"])
            if "models" in values:
                values["models"] = {str(k): int(v) for k, v in values["models"].items()}
            if "labels" in values:
                values["labels"] = {str(k): str(v) for k, v in values["labels"].items()}
            return cls(**values, behaviour=behaviour)
        except (TypeError, ValueError, AttributeError) as exc:
            raise SpecError(f"a [[boxes]] table is not valid ({exc}): {dict(table)!r}") from exc


def behaviour_from_toml(table: Mapping[str, Any]) -> Behaviour:
    """A `Behaviour` from TOML: version keys are strings, windows arrays of one or two numbers."""
    values = dict(table)
    _known(values, set(Behaviour.__dataclass_fields__), "behaviour")
    try:
        for name in (
            "outcome_by_version", "p95_factor", "p95_ms", "error_rate_by_version",
            "agreement_by_version",
        ):  # fmt: skip
            if name in values:
                values[name] = {int(k): v for k, v in values[name].items()}
        for name in ("selftest_fail", "drift_alert"):
            if name in values:
                values[name] = frozenset(int(v) for v in values[name])
        if "offline" in values:
            values["offline"] = tuple(_window(w) for w in values["offline"])
        if "disagreement" in values:
            active, candidate = values["disagreement"]
            values["disagreement"] = (str(active), str(candidate))
        return Behaviour(**values)
    except (TypeError, ValueError, AttributeError) as exc:
        raise SpecError(f"a behaviour table is not valid ({exc}): {dict(table)!r}") from exc


def _window(value: Any) -> Window:
    items = list(value)
    if len(items) == 1:
        return float(items[0]), None
    if len(items) == 2:
        return float(items[0]), float(items[1])
    raise ValueError(f"an offline window is [start_s] or [start_s, end_s], not {value!r}")


def _groups(groups: tuple[str, ...]) -> list[tuple[str, str]]:
    return [("group", group) for group in groups]


def _known(values: Mapping[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(values) - allowed)
    if unknown:
        raise SpecError(f"unknown keys {unknown} in {where}; allowed: {', '.join(sorted(allowed))}")


def generate(table: Mapping[str, Any]) -> list[BoxSpec]:
    """`count` boxes from a `[generate]` table; behaviours in the given fractions.

    Keys: `count`, `site` (a pattern with `{site}`, `sites` of them, boxes spread round-robin),
    `device` (a pattern with `{n}`), `sites`, `groups`, `line`, `profile`, `models`,
    `agent_version` (of every box but the old ones, default 0.2.0), `old_agents` (a fraction), `fractions` ({outcome or "offline": fraction}), `behaviour`
    (a base behaviour table) and `offline` (the windows of the "offline" fraction).
    Assignment is by index, so the same table always gives the same fleet.
    """
    values = dict(table)
    allowed = {
        "count",
        "site",
        "device",
        "sites",
        "groups",
        "line",
        "profile",
        "models",
        "agent_version",
        "old_agents",
        "fractions",
        "behaviour",
        "offline",
    }
    _known(values, allowed, "[generate]")
    count = int(values.get("count", 0))
    if count < 1:
        raise SpecError("[generate] needs count >= 1")
    kinds = _spread(dict(values.get("fractions", {"commit": 1.0})), count)
    olds = set(_evenly(float(values.get("old_agents", 0.0)), count))
    base = dict(values.get("behaviour", {}))
    offline = values.get("offline", [[5.0, 15.0]])
    agent_version = str(values.get("agent_version", "0.2.0"))
    boxes = []
    for n in range(count):
        behaviour = dict(base)
        if kinds[n] == "offline":
            behaviour["offline"] = offline
        else:
            behaviour["outcome"] = kinds[n]
        site = str(values.get("site", "site-{site}")).format(site=n % int(values.get("sites", 1)))
        boxes.append(
            BoxSpec.from_toml(
                {
                    "site": site,
                    "device": str(values.get("device", "box-{n:04d}")).format(n=n),
                    "line": values.get("line"),
                    "groups": list(values.get("groups", [])),
                    "profile": values.get("profile", "generic-x86-64-avx2"),
                    "agent_version": OLD_AGENT if n in olds else agent_version,
                    "models": values.get("models", {"defects": 1}),
                    "behaviour": behaviour,
                }
            )
        )
    return boxes


def _spread(fractions: dict[str, float], count: int) -> list[str]:
    """One kind per box index: each kind's share by largest remainder, interleaved evenly."""
    for kind in fractions:
        if kind not in (*OUTCOMES, "offline"):
            raise SpecError(f"fraction {kind!r} is not one of {', '.join((*OUTCOMES, 'offline'))}")
    total = sum(fractions.values())
    if total <= 0:
        raise SpecError("[generate] fractions must add up to more than 0")
    shares = {kind: count * value / total for kind, value in fractions.items()}
    counts = {kind: math.floor(share) for kind, share in shares.items()}
    by_remainder = sorted(shares, key=lambda k: shares[k] - counts[k], reverse=True)
    for kind in by_remainder[: count - sum(counts.values())]:
        counts[kind] += 1
    kinds = ["commit"] * count
    taken: set[int] = set()
    for kind, number in counts.items():
        if kind == "commit":
            continue
        for index in _evenly(number / count, count, skip=taken):
            kinds[index] = kind
            taken.add(index)
    return kinds


def _evenly(fraction: float, count: int, *, skip: set[int] | None = None) -> list[int]:
    """About `fraction * count` indexes spread over range(count), avoiding `skip`."""
    number = round(fraction * count)
    free = [i for i in range(count) if not skip or i not in skip]
    if number <= 0 or not free:
        return []
    step = len(free) / number
    return [free[int(i * step)] for i in range(min(number, len(free)))]
