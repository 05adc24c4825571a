"""The updater's rules as a pure state machine: `transition(state, event) -> (state, actions)`.

No I/O happens here: the runner (`edge_agent.updater.runner`) performs the actions, feeds back
events, and persists every new state before acting on it, so a crash at any point resumes from a
state whose actions can simply be performed again (every action is idempotent).

    idle ─notice ok─► downloading ─► verifying ─► staging ─► activating ─► probation ─► committed
      ▲                  │              │            │  │        │             │
      └──────────────────┴──── refused (reason) ─────┘  │        └─ rolled_back (reason) ◄┘
                                                        └─(shadow notice)─► shadowing ─► shadowed

A notice with the `shadow` extension (schema version 2, named critical) installs the version
without activating it: after staging the box shadows the active model with it (`StartShadow`)
until `max_s` has passed or a newer notice arrives, then stops (`StopShadow`) and keeps the
version in its store, so a later ordinary notice for the same bundle activates it without
downloading it again. A notice whose `extensions.critical` names an extension this agent does not
understand is refused, never half-understood.

A notice is checked before anything is fetched (`check_notice`): signed by a trusted release key
(done by the caller), meant for this device or one of its groups, newer than every release
sequence seen, not expired (judged against the later of the local clock and the newest signed
issue time seen, so a clock set back cannot revive an expired notice and a box without a clock is
not frozen), for a version strictly newer than the active one unless the notice is a signed
rollback, and not a version that already failed here.

A release that came with a fleet rollout (schema version 2 notices) remembers it, and every report
about that release names it, so the controller can tie each outcome to its rollout and wave.

A notice with the `mqtt_chunks` extension (agents from 0.4.0) offers the bundle in chunks over
MQTT, with or without a URL. Which path a box takes is `fetch_path` (the setting `update_fetch`:
"auto" takes the URL when there is one, "mqtt" prefers MQTT whenever it is offered, "http" never
uses it); a notice this box has no usable path for is refused before anything is fetched.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, Literal

from edge_agent import __version__
from edge_bundle.chunks import MQTT_CHUNKS_EXTENSION, ChunkedDelivery

Phase = Literal[
    "idle", "downloading", "verifying", "staging", "shadowing", "activating", "probation",
    "committed", "rolled_back", "refused", "shadowed",
]  # fmt: skip
BUSY: frozenset[str] = frozenset(
    {"downloading", "verifying", "staging", "shadowing", "activating", "probation"}
)
#: The notice extensions this agent understands (a critical one it does not: refused).
UNDERSTOOD_EXTENSIONS: frozenset[str] = frozenset({"shadow", MQTT_CHUNKS_EXTENSION})
#: The setting `update_fetch`: how this box prefers to fetch bundles.
FetchSetting = Literal["auto", "http", "mqtt"]
FetchPath = Literal["http", "mqtt"]


@dataclass(frozen=True)
class RolloutRef:
    """The fleet rollout and wave a release notice was sent in (echoed in every report)."""

    id: str
    wave: int

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "wave": self.wave}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RolloutRef:
        return cls(id=str(data["id"]), wave=int(data["wave"]))


@dataclass(frozen=True)
class Release:
    """What the machine needs from a verified release notice."""

    name: str
    version: int
    sha256: str
    size: int
    url: str | None  # None: the bundle comes only in chunks over MQTT (`chunked`)
    sequence: int
    issued_at: datetime
    expires_at: datetime
    rollback: bool = False
    rollout: RolloutRef | None = None
    critical: tuple[str, ...] = ()  # extensions the notice needs understood
    shadow_s: float | None = None  # a shadow notice: shadow for at most this long, not activate
    chunked: ChunkedDelivery | None = None  # the notice offers the bundle in chunks over MQTT

    def to_json(self) -> dict[str, Any]:
        data = dict(self.__dict__)
        data["issued_at"] = self.issued_at.isoformat()
        data["expires_at"] = self.expires_at.isoformat()
        data["rollout"] = self.rollout.to_json() if self.rollout else None
        data["critical"] = list(self.critical)
        data["chunked"] = self.chunked.to_json() if self.chunked else None
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Release:
        values = dict(data)
        values["issued_at"] = datetime.fromisoformat(values["issued_at"])
        values["expires_at"] = datetime.fromisoformat(values["expires_at"])
        # A state.json written before rollouts (or shadow notices) existed lacks their keys.
        rollout = values.pop("rollout", None)
        values["critical"] = tuple(str(name) for name in values.get("critical", ()))
        # ... and one written before chunked delivery lacks `chunked` (and always has a url).
        chunked = values.pop("chunked", None)
        values["url"] = values.get("url")
        return cls(
            **values,
            rollout=RolloutRef.from_json(rollout) if rollout else None,
            chunked=ChunkedDelivery.parse(chunked) if chunked else None,
        )


@dataclass(frozen=True)
class UpdateState:
    """Everything the updater must remember across restarts."""

    phase: Phase = "idle"
    release: Release | None = None
    previous_version: int | None = None  # active before activation; the rollback target
    reason: str | None = None
    last_sequence: int = 0  # highest release sequence acted on (refused ones included)
    clock_floor: datetime | None = None  # newest signed issue time seen
    bad_versions: tuple[tuple[str, int], ...] = ()
    pending: Release | None = None  # a newer notice that arrived during activation/probation

    @property
    def busy(self) -> bool:
        return self.phase in BUSY

    def to_json(self) -> dict[str, Any]:
        return {
            "phase": self.phase,
            "release": self.release.to_json() if self.release else None,
            "previous_version": self.previous_version,
            "reason": self.reason,
            "last_sequence": self.last_sequence,
            "clock_floor": self.clock_floor.isoformat() if self.clock_floor else None,
            "bad_versions": [list(item) for item in self.bad_versions],
            "pending": self.pending.to_json() if self.pending else None,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> UpdateState:
        return cls(
            phase=data["phase"],
            release=Release.from_json(data["release"]) if data.get("release") else None,
            previous_version=data.get("previous_version"),
            reason=data.get("reason"),
            last_sequence=int(data.get("last_sequence", 0)),
            clock_floor=datetime.fromisoformat(data["clock_floor"])
            if data.get("clock_floor")
            else None,
            bad_versions=tuple((str(n), int(v)) for n, v in data.get("bad_versions", ())),
            pending=Release.from_json(data["pending"]) if data.get("pending") else None,
        )


# ---- events -------------------------------------------------------------------------------
@dataclass(frozen=True)
class NoticeReceived:
    release: Release
    now: datetime
    active_version: int | None  # of the release's model name, None if not installed
    fetch: FetchSetting = "auto"  # the setting update_fetch
    mqtt_chunks: bool = False  # whether this agent can fetch chunks over MQTT


@dataclass(frozen=True)
class Restarted:
    """The agent started again: resume whatever was in progress."""


@dataclass(frozen=True)
class StepDone:
    """The current step succeeded (download complete, verified, staged, activated, probation)."""

    phase: Phase


@dataclass(frozen=True)
class StepFailed:
    """The current step failed; `retry` for transient problems (network), else it is refused."""

    phase: Phase
    reason: str
    retry: bool = False


Event = NoticeReceived | Restarted | StepDone | StepFailed


# ---- actions ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Download:
    release: Release


@dataclass(frozen=True)
class Verify:
    release: Release


@dataclass(frozen=True)
class Stage:
    release: Release


@dataclass(frozen=True)
class StartShadow:
    """Shadow the active model with the staged version for `release.shadow_s` seconds, then
    report `StepDone("shadowing")`."""

    release: Release


@dataclass(frozen=True)
class StopShadow:
    """Stop shadowing with the release's version (it stays installed, not active)."""

    release: Release


@dataclass(frozen=True)
class Activate:
    release: Release


@dataclass(frozen=True)
class Probation:
    release: Release


@dataclass(frozen=True)
class RollBack:
    release: Release
    to_version: int | None
    reason: str


@dataclass(frozen=True)
class Commit:
    """Keep the new version, prune old ones, forget the download."""

    release: Release


@dataclass(frozen=True)
class Discard:
    """Remove what a refused or superseded release left behind (download, staged copy)."""

    release: Release


Outcome = Literal["progress", "refused", "committed", "rolled_back", "ignored"]


@dataclass(frozen=True)
class Report:
    phase: str
    outcome: Outcome
    sequence: int
    reason: str | None = None
    name: str | None = None
    version: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    rollout: RolloutRef | None = None

    @classmethod
    def about(
        cls, release: Release, phase: str, outcome: Outcome, reason: str | None = None
    ) -> Report:
        """A report on `release`: its sequence, name, version and rollout."""
        return cls(
            phase,
            outcome,
            release.sequence,
            reason,
            release.name,
            release.version,
            rollout=release.rollout,
        )


@dataclass(frozen=True)
class Resubmit:
    """Feed a release that waited behind the finished update back in as a fresh notice."""

    release: Release


Action = (
    Download
    | Verify
    | Stage
    | StartShadow
    | StopShadow
    | Activate
    | Probation
    | RollBack
    | Commit
    | Discard
    | Report
    | Resubmit
)

_NEXT: dict[str, tuple[Phase, type]] = {
    "downloading": ("verifying", Verify),
    "verifying": ("staging", Stage),
    "staging": ("activating", Activate),
    "activating": ("probation", Probation),
}
_STEP_ACTION: dict[str, type] = {
    "downloading": Download,
    "verifying": Verify,
    "staging": Stage,
    "shadowing": StartShadow,
    "activating": Activate,
    "probation": Probation,
}


def check_notice(state: UpdateState, event: NoticeReceived) -> str | None:
    """Why a release must be refused, or None when it may go ahead."""
    release = event.release
    if release.sequence <= state.last_sequence:
        return (
            f"sequence {release.sequence} is not newer than {state.last_sequence}, the newest "
            "already seen (a replayed or stale notice)"
        )
    unknown = [name for name in release.critical if name not in UNDERSTOOD_EXTENSIONS]
    if unknown:
        return (
            f"this notice needs the {unknown[0]!r} extension, which agent {__version__} does not "
            "understand; upgrade the agent"
        )
    if fetch_path(release, event.fetch, event.mqtt_chunks) is None:
        return no_path_reason(release, event.fetch, event.mqtt_chunks)
    floor = state.clock_floor
    now = max(event.now, floor) if floor is not None else event.now
    if now >= release.expires_at:
        return (
            f"the notice expired at {release.expires_at.isoformat()} (judged at {now.isoformat()}, "
            "the later of this box's clock and the newest signed issue time it has seen)"
        )
    if (release.name, release.version) in state.bad_versions:
        return f"{release.name}@{release.version} already failed on this device and is not retried"
    active = event.active_version
    if active is not None:
        if release.version == active:
            return f"{release.name}@{release.version} is already active"
        if release.version < active and not release.rollback:
            return (
                f"{release.name}@{release.version} is older than the active version {active}; "
                "going back needs a notice published with --rollback"
            )
    return None


def fetch_path(release: Release, setting: FetchSetting, mqtt_chunks: bool) -> FetchPath | None:
    """How this box fetches `release`'s bundle, or None when it has no usable path."""
    over_mqtt = release.chunked is not None and mqtt_chunks and setting != "http"
    if over_mqtt and (setting == "mqtt" or release.url is None):
        return "mqtt"
    if release.url is not None:
        return "http"
    return None


def no_path_reason(release: Release, setting: FetchSetting, mqtt_chunks: bool) -> str:
    """Why `fetch_path` found no path (a notice that offers the bundle only over MQTT)."""
    if release.chunked is None:
        return "the notice offers the bundle neither by URL nor over MQTT; publish it with one"
    if setting == "http":
        return (
            "the notice offers the bundle only in chunks over MQTT, but update_fetch is 'http'; "
            "set update_fetch to 'auto' or 'mqtt', or publish the bundle with a URL"
        )
    return (
        "the notice offers the bundle only in chunks over MQTT, which this agent cannot fetch "
        "(MQTT is off); enable MQTT or publish the bundle with a URL"
    )


def transition(state: UpdateState, event: Event) -> tuple[UpdateState, list[Action]]:
    """The next state and what to do, for `event` in `state`."""
    if isinstance(event, NoticeReceived):
        return _on_notice(state, event)
    if isinstance(event, Restarted):
        return _on_restart(state)
    if state.release is None or event.phase != state.phase:
        return state, []  # a late report from a step that no longer matters
    if isinstance(event, StepDone):
        return _on_done(state, state.release)
    return _on_failed(state, state.release, event)


def _on_notice(state: UpdateState, event: NoticeReceived) -> tuple[UpdateState, list[Action]]:
    release = event.release
    floor = max(filter(None, (state.clock_floor, release.issued_at)))
    state = replace(state, clock_floor=floor)
    reason = check_notice(state, event)
    if reason is not None:
        # A stale notice must not move last_sequence backwards; a newer refused one moves it on.
        sequence = max(state.last_sequence, release.sequence)
        ignored = release.sequence <= state.last_sequence
        report = Report.about(
            release,
            "idle" if not state.busy else state.phase,
            "ignored" if ignored else "refused",
            reason,
        )
        return replace(state, last_sequence=sequence), [report]
    if state.phase in ("activating", "probation"):
        # Never interrupt a swap or a probation: the newer release waits for the outcome.
        return replace(state, pending=release), [
            Report.about(release, state.phase, "progress", "queued behind the current update")
        ]
    actions: list[Action] = []
    if state.phase == "shadowing" and state.release is not None:
        # The shadowed version stays installed: a later notice may activate it without a download.
        actions += [
            StopShadow(state.release),
            Report.about(
                state.release,
                "shadowed",
                "progress",
                f"shadowing ended: superseded by sequence {release.sequence}",
            ),
        ]
    elif state.busy and state.release is not None:
        actions += [
            Discard(state.release),
            Report.about(
                state.release, state.phase, "refused", f"superseded by sequence {release.sequence}"
            ),
        ]
    new = replace(
        state,
        phase="downloading",
        release=release,
        previous_version=event.active_version,
        reason=None,
        last_sequence=release.sequence,
        pending=None,
    )
    actions += [
        Report.about(release, "downloading", "progress"),
        Download(release),
    ]
    return new, actions


def _on_restart(state: UpdateState) -> tuple[UpdateState, list[Action]]:
    release = state.release
    if not state.busy or release is None:
        return state, []
    action = _STEP_ACTION[state.phase](release)
    return state, [
        Report.about(release, state.phase, "progress", "resumed after a restart"),
        action,
    ]


def _on_done(state: UpdateState, release: Release) -> tuple[UpdateState, list[Action]]:
    if state.phase == "probation":
        done = replace(state, phase="committed", reason=None)
        actions: list[Action] = [
            Commit(release),
            Report.about(release, "committed", "committed"),
        ]
        return _then_pending(done, actions)
    if state.phase == "shadowing":
        ended = (
            f"shadowing ended after {release.shadow_s:g} s; the version stays installed, not active"
        )
        return replace(state, phase="shadowed", reason=None), [
            StopShadow(release),
            Report.about(release, "shadowed", "progress", ended),
        ]
    if state.phase == "staging" and release.shadow_s is not None:
        return replace(state, phase="shadowing"), [
            Report.about(release, "shadowing", "progress"),
            StartShadow(release),
        ]
    next_phase, action = _NEXT[state.phase]
    return replace(state, phase=next_phase), [
        Report.about(release, next_phase, "progress"),
        action(release),
    ]


def _on_failed(
    state: UpdateState, release: Release, event: StepFailed
) -> tuple[UpdateState, list[Action]]:
    if event.retry and state.phase == "downloading":
        return state, [
            Report.about(release, "downloading", "progress", f"retrying: {event.reason}"),
            Download(release),
        ]
    # A version that failed to load, test or serve is bad and not retried; a failed download or
    # verification says nothing about the version (a wrong file on a server), so it may come again,
    # and neither does a shadow that could not start (the active model was not ready, say).
    bad = state.bad_versions
    stop: list[Action] = [StopShadow(release)] if state.phase == "shadowing" else []
    if state.phase in ("staging", "activating", "probation"):
        bad = (*bad, (release.name, release.version))
    if state.phase in ("activating", "probation"):
        done = replace(state, phase="rolled_back", reason=event.reason, bad_versions=bad)
        actions: list[Action] = [
            RollBack(release, state.previous_version, event.reason),
            Report.about(release, "rolled_back", "rolled_back", event.reason),
        ]
        return _then_pending(done, actions)
    refused = replace(state, phase="refused", reason=event.reason, bad_versions=bad)
    return refused, [
        *stop,
        Discard(release),
        Report.about(release, state.phase, "refused", event.reason),
    ]


def _then_pending(state: UpdateState, actions: list[Action]) -> tuple[UpdateState, list[Action]]:
    """After an update ends, start the release that arrived meanwhile (if still acceptable)."""
    pending = state.pending
    if pending is None:
        return state, actions
    return replace(state, pending=None), [*actions, Resubmit(pending)]
