"""The box's update rules, reimplemented without `edge_agent` (pure: no I/O, no clock).

`BoxUpdates` holds what a box remembers about releases (active versions, the newest sequence
seen, the signed clock floor, versions that failed, the install in progress and one waiting
behind it) and decides, like the agent's updater (`edge_agent/updater/machine.py`), what a
verified notice leads to: refused or ignored with the agent's own reasons, queued behind an
activation or probation, or started (superseding an install still downloading, verifying or
staging, or shadowing). Every notice a box starts installing is recorded in `acted`. A box from
agent 0.3.0 reads a shadow notice (`Release.shadow_s`) and refuses one whose critical extensions
it does not know; older boxes ignore the extensions, exactly as the real agents do. A box from
0.4.0 also understands `mqtt_chunks` (`Release.chunked`: the bundle comes in chunks over MQTT).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from edge_bundle.chunks import MQTT_CHUNKS_EXTENSION, ChunkedDelivery
from edge_bundle.release import SHADOW_EXTENSION, ReleaseNotice

#: The steps of an install, in order; a box may be superseded only in the first three.
STEPS: tuple[str, ...] = ("downloading", "verifying", "staging", "activating", "probation")
#: A shadow notice's steps: staged, then shadowing instead of activating.
SHADOW_STEPS: tuple[str, ...] = ("downloading", "verifying", "staging")
SUPERSEDABLE = frozenset({*STEPS[:3], "shadowing"})
#: The notice extensions an agent from 0.3.0 understands.
UNDERSTOOD_EXTENSIONS = frozenset({SHADOW_EXTENSION})
#: ... and one from 0.4.0.
CHUNK_AGENT_EXTENSIONS = frozenset({SHADOW_EXTENSION, MQTT_CHUNKS_EXTENSION})


@dataclass(frozen=True)
class Release:
    """What a box needs of a verified release notice."""

    name: str
    version: int
    sha256: str
    size: int
    url: str | None  # None: the bundle comes over MQTT only (`chunked`)
    sequence: int
    issued_at: datetime
    expires_at: datetime
    rollback: bool
    rollout: dict[str, Any] | None  # {"id", "wave"} of a v2 notice, else None
    critical: tuple[str, ...] = ()  # read only by boxes that understand extensions (0.3.0)
    shadow_s: float | None = None  # a shadow notice, for a box that understands it
    chunked: ChunkedDelivery | None = None  # chunks over MQTT, for a box that understands it

    @classmethod
    def of(
        cls, notice: ReleaseNotice, *, extensions: bool = False, chunks: bool = False
    ) -> Release:
        """What a box keeps of a notice; `extensions`: the box reads them (agent 0.3.0);
        `chunks`: it fetches over MQTT too (agent 0.4.0)."""
        rollout = notice.rollout.model_dump(mode="json") if notice.rollout is not None else None
        shadow = notice.shadow if extensions else None
        return cls(
            name=notice.name,
            version=notice.version,
            sha256=notice.bundle_sha256,
            size=notice.bundle_size,
            url=notice.url,
            sequence=notice.sequence,
            issued_at=notice.issued_at,
            expires_at=notice.expires_at,
            rollback=notice.rollback,
            rollout=rollout,
            critical=notice.critical if extensions else (),
            shadow_s=shadow.max_s if shadow is not None else None,
            chunked=notice.chunked if chunks else None,
        )


@dataclass(frozen=True)
class Decision:
    """What a notice leads to. `kind` start: install `release` (after reporting `superseded`
    refused); queued: report progress, it runs after the current install; refused / ignored:
    report `reason`."""

    kind: Literal["start", "queued", "refused", "ignored"]
    release: Release
    reason: str | None = None
    superseded: Release | None = None
    superseded_phase: str | None = None


def targets(notice: ReleaseNotice, site: str, device: str, groups: tuple[str, ...]) -> bool:
    """Whether the notice is for this box: its `SITE/DEVICE`, or one of its groups."""
    target = notice.target
    return (target.device is not None and target.device == f"{site}/{device}") or (
        target.group is not None and target.group in groups
    )


@dataclass
class BoxUpdates:
    """One box's release state; see the module docstring."""

    active: dict[str, int]
    last_sequence: int = 0
    clock_floor: datetime | None = None
    bad: set[tuple[str, int]] = field(default_factory=set)
    current: Release | None = None
    phase: str = "idle"
    previous: int | None = None
    pending: Release | None = None
    acted: list[tuple[int, str, int, bool]] = field(default_factory=list)
    # The critical extensions this box knows, and the agent version its refusals name.
    understood: frozenset[str] = UNDERSTOOD_EXTENSIONS
    agent_version: str = "0.3.0"

    def refusal(self, release: Release, now: datetime) -> str | None:
        """Why the box refuses `release` (the agent's `check_notice` wording), or None."""
        if release.sequence <= self.last_sequence:
            return (
                f"sequence {release.sequence} is not newer than {self.last_sequence}, the newest "
                "already seen (a replayed or stale notice)"
            )
        unknown = [name for name in release.critical if name not in self.understood]
        if unknown:
            return (
                f"this notice needs the {unknown[0]!r} extension, which agent "
                f"{self.agent_version} does not understand; upgrade the agent"
            )
        floor = self.clock_floor
        judged = max(now, floor) if floor is not None else now
        if judged >= release.expires_at:
            return (
                f"the notice expired at {release.expires_at.isoformat()} (judged at "
                f"{judged.isoformat()}, the later of this box's clock and the newest signed issue "
                "time it has seen)"
            )
        if (release.name, release.version) in self.bad:
            return (
                f"{release.name}@{release.version} already failed on this device and is not retried"
            )
        active = self.active.get(release.name)
        if active is not None:
            if release.version == active:
                return f"{release.name}@{release.version} is already active"
            if release.version < active and not release.rollback:
                return (
                    f"{release.name}@{release.version} is older than the active version "
                    f"{active}; going back needs a notice published with --rollback"
                )
        return None

    def decide(self, release: Release, now: datetime) -> Decision:
        """Check a verified notice meant for this box and update the state accordingly."""
        floors = [f for f in (self.clock_floor, release.issued_at) if f is not None]
        self.clock_floor = max(floors)
        reason = self.refusal(release, now)
        if reason is not None:
            ignored = release.sequence <= self.last_sequence
            self.last_sequence = max(self.last_sequence, release.sequence)
            return Decision("ignored" if ignored else "refused", release, reason)
        if self.phase in ("activating", "probation"):
            self.pending = release
            return Decision("queued", release, "queued behind the current update")
        superseded = self.current if self.phase in SUPERSEDABLE else None
        superseded_phase = self.phase if superseded is not None else None
        self._start(release)
        return Decision("start", release, None, superseded, superseded_phase)

    def _start(self, release: Release) -> None:
        self.current = release
        self.phase = "downloading"
        self.previous = self.active.get(release.name)
        self.last_sequence = release.sequence
        self.pending = None
        self.acted.append((release.sequence, release.name, release.version, release.rollback))

    def advance(self, phase: str) -> None:
        """The install moved on to `phase`; activation makes the new version the active one."""
        self.phase = phase
        if phase == "probation" and self.current is not None:
            self.active[self.current.name] = self.current.version

    def finish(self, outcome: str, *, bad: bool) -> Release | None:
        """The install ended (committed, refused or rolled back); returns a queued release."""
        release = self.current
        if release is not None:
            if bad:
                self.bad.add((release.name, release.version))
            if outcome == "rolled_back":
                if self.previous is None:
                    self.active.pop(release.name, None)
                else:
                    self.active[release.name] = self.previous
        self.phase = outcome
        self.current = None
        pending, self.pending = self.pending, None
        return pending

    def describe(self) -> dict[str, Any]:
        return {
            "active": dict(self.active),
            "last_sequence": self.last_sequence,
            "phase": self.phase,
            "installing": None if self.current is None else self.current.version,
            "bad_versions": sorted(self.bad),
        }
