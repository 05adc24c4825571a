"""A rollout's rules as a pure state machine: `transition(state, event) -> (state, actions)`.

No I/O and no clock reads happen here: the runner (`fleet_controller.rollouts`) builds each event
from its tables and its clock, persists every new state with its box rows in one transaction, and
only then performs the actions, each of which is idempotent (a stored notice is re-published
byte-identical; marking boxes timed out twice changes nothing; gates are a read).

    running(wave k: sending ─► installing ─► soaking ─► gating) ─pass─► wave k+1 … ─► completed
       │  ▲                                                  └─fail─► halted ─(on_halt)─► rolling_back
     pause resume                                                                        │
       ▼  │                                                                              ▼
      paused          cancel (running, paused, halted) ─► cancelled               rolled_back

With a shadow phase in the plan, every wave starts with it: *shadow_sending* sends shadow notices
(install the candidate without activating it, shadow the active model) and lasts until every box
of the wave shadows, is final (refused, ignored) or timed out; then *shadow_soaking* for the
plan's shadow soak, then *shadow_gating*: the runner's shadow gate is fed back as
`GatesEvaluated`; a failed one halts the rollout (nothing of this wave was activated), a passed
one goes on to *sending* the activating notices of the same wave.

A wave is *sending* while some of its boxes wait for their site's maintenance window, and
*installing* until every box of it is final (committed, refused, rolled back, ignored) or timed out
(`deadline_s` after its notice was published; an offline box never blocks). Then it *soaks* for
`soak_s`, then its gates are evaluated by the runner and fed back as `GatesEvaluated`: a failed
gate halts the rollout (and rolls it back when the plan says so); an insufficient one does not.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any, Literal, get_args

from fleet_controller.errors import ConflictError, FleetError

Status = Literal[
    "running", "paused", "halted", "rolling_back", "rolled_back", "completed", "cancelled"
]  # fmt: skip
WavePhase = Literal[
    "shadow_sending", "shadow_soaking", "shadow_gating", "sending", "installing", "soaking", "gating",
]  # fmt: skip
CommandName = Literal["pause", "resume", "cancel", "halt", "rollback"]
COMMANDS: tuple[str, ...] = get_args(CommandName)
#: Statuses whose boxes are held by the rollout (another rollout may not pick them).
ACTIVE: frozenset[str] = frozenset({"running", "paused", "halted", "rolling_back"})
CONTROLLER = "controller"


@dataclass(frozen=True)
class Policy:
    """What the machine needs from the plan."""

    waves: int
    soak_s: float
    deadline_s: float
    rollback_on_halt: bool
    shadow_soak_s: float | None = None  # None: no shadow phase

    @property
    def first_phase(self) -> WavePhase:
        return "shadow_sending" if self.shadow_soak_s is not None else "sending"

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Policy:
        shadow = data.get("shadow_soak_s")  # absent in rollouts stored before shadow phases
        return cls(
            waves=int(data["waves"]),
            soak_s=float(data["soak_s"]),
            deadline_s=float(data["deadline_s"]),
            rollback_on_halt=bool(data["rollback_on_halt"]),
            shadow_soak_s=float(shadow) if shadow is not None else None,
        )


@dataclass(frozen=True)
class RolloutState:
    """Everything the rollout must remember across restarts (its boxes live in their rows)."""

    policy: Policy
    status: Status = "running"
    wave: int = 1  # 1-based, as in the notices' `rollout.wave`
    phase: WavePhase = "sending"
    phase_since: datetime | None = None
    soak_until: datetime | None = None
    paused_from: Status | None = None
    halt_reason: str | None = None
    gate_results: tuple[dict[str, Any], ...] = ()
    finished_at: datetime | None = None
    shadow_results: tuple[dict[str, Any], ...] = ()  # the current wave's shadow gate

    @property
    def active(self) -> bool:
        return self.status in ACTIVE

    def to_json(self) -> dict[str, Any]:
        return {
            "policy": self.policy.to_json(),
            "status": self.status,
            "wave": self.wave,
            "phase": self.phase,
            "phase_since": _iso(self.phase_since),
            "soak_until": _iso(self.soak_until),
            "paused_from": self.paused_from,
            "halt_reason": self.halt_reason,
            "gate_results": [dict(result) for result in self.gate_results],
            "finished_at": _iso(self.finished_at),
            "shadow_results": [dict(result) for result in self.shadow_results],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RolloutState:
        return cls(
            policy=Policy.from_json(data["policy"]),
            status=data["status"],
            wave=int(data["wave"]),
            phase=data["phase"],
            phase_since=_time(data.get("phase_since")),
            soak_until=_time(data.get("soak_until")),
            paused_from=data.get("paused_from"),
            halt_reason=data.get("halt_reason"),
            gate_results=tuple(dict(result) for result in data.get("gate_results", ())),
            finished_at=_time(data.get("finished_at")),
            shadow_results=tuple(dict(result) for result in data.get("shadow_results", ())),
        )


def start(policy: Policy, now: datetime) -> RolloutState:
    """The state of a rollout just created: running, its first wave sending."""
    if policy.waves < 1:
        raise FleetError("a rollout needs at least one wave")
    return RolloutState(policy=policy, phase=policy.first_phase, phase_since=now)


# ---- events -------------------------------------------------------------------------------
@dataclass(frozen=True)
class View:
    """What the runner's tables say now: the current wave's boxes and the rollback's progress.

    `in_flight` are boxes whose notice is stored but not final, with the time it was published
    (None until the broker acknowledged it, so no deadline runs before that). The `shadow_`
    fields are the same for the current wave's shadow notices; a box that shadows is final."""

    sendable: tuple[str, ...] = ()  # pending, their site's window open
    waiting: int = 0  # pending, their site's window closed
    in_flight: tuple[tuple[str, datetime | None], ...] = ()
    final: int = 0
    rollback_sendable: tuple[str, ...] = ()  # to be rolled back, no rollback notice stored yet
    rollback_in_flight: tuple[tuple[str, datetime | None], ...] = ()
    rollback_final: int = 0
    shadow_sendable: tuple[str, ...] = ()
    shadow_waiting: int = 0
    shadow_in_flight: tuple[tuple[str, datetime | None], ...] = ()
    shadow_final: int = 0


@dataclass(frozen=True)
class Tick:
    now: datetime
    view: View = field(default_factory=View)


@dataclass(frozen=True)
class GatesEvaluated:
    """The runner's gate results for `wave` (each JSON-able, with `name` and `status`)."""

    wave: int
    results: tuple[dict[str, Any], ...]
    now: datetime


@dataclass(frozen=True)
class Command:
    name: str
    actor: str
    why: str
    now: datetime


Event = Tick | GatesEvaluated | Command


# ---- actions ------------------------------------------------------------------------------
@dataclass(frozen=True)
class SendNotices:
    """Build, sign, store and publish release notices to these boxes of `wave`."""

    wave: int
    refs: tuple[str, ...]


@dataclass(frozen=True)
class SendShadowNotices:
    """Build, sign, store and publish shadow notices to these boxes of `wave`."""

    wave: int
    refs: tuple[str, ...]


@dataclass(frozen=True)
class MarkTimedOut:
    """These boxes stayed silent past the deadline (of their rollback notice when `rollback`,
    of their shadow notice when `shadow`)."""

    refs: tuple[str, ...]
    rollback: bool = False
    shadow: bool = False


@dataclass(frozen=True)
class EvaluateGates:
    wave: int


@dataclass(frozen=True)
class EvaluateShadowGate:
    """Judge the current wave's shadow figures; the result comes back as `GatesEvaluated`."""

    wave: int


@dataclass(frozen=True)
class SendRollbacks:
    """Build, sign, store and publish rollback notices to these boxes."""

    refs: tuple[str, ...]


@dataclass(frozen=True)
class Audit:
    what: str
    why: str
    actor: str = CONTROLLER
    figures: dict[str, Any] = field(default_factory=dict)


Action = (
    SendNotices
    | SendShadowNotices
    | MarkTimedOut
    | EvaluateGates
    | EvaluateShadowGate
    | SendRollbacks
    | Audit
)


def transition(state: RolloutState, event: Event) -> tuple[RolloutState, list[Action]]:
    """The next state and what to do, for `event` in `state`. Commands that the state does not
    allow raise ConflictError (unknown ones FleetError) and change nothing."""
    if isinstance(event, Command):
        return _on_command(state, event)
    if isinstance(event, GatesEvaluated):
        return _on_gates(state, event)
    return _on_tick(state, event)


# ---- ticks --------------------------------------------------------------------------------
def _on_tick(state: RolloutState, tick: Tick) -> tuple[RolloutState, list[Action]]:
    if not state.active:
        return state, []
    view = tick.view
    deadline = timedelta(seconds=state.policy.deadline_s)
    late = _overdue(view.in_flight, tick.now, deadline)
    actions: list[Action] = [MarkTimedOut(late)] if late else []
    if state.status == "running":
        state, more = _advance_wave(state, tick, late)
        actions += more
    elif state.status == "rolling_back":
        state, more = _advance_rollback(state, tick, deadline)
        actions += more
    return state, actions


def _overdue(
    in_flight: tuple[tuple[str, datetime | None], ...], now: datetime, deadline: timedelta
) -> tuple[str, ...]:
    return tuple(
        ref for ref, sent_at in in_flight if sent_at is not None and now >= sent_at + deadline
    )


def _advance_wave(
    state: RolloutState, tick: Tick, late: tuple[str, ...]
) -> tuple[RolloutState, list[Action]]:
    view, now, actions = tick.view, tick.now, list[Action]()
    if state.phase.startswith("shadow_"):
        return _advance_shadow(state, tick, actions)
    if state.phase in ("sending", "installing"):
        if view.sendable:
            actions.append(SendNotices(state.wave, view.sendable))
        if state.phase == "sending" and view.waiting == 0:  # every box sent, or sent now
            state = _phase(state, "installing", now)
        still_out = len(view.in_flight) - len(late) + len(view.sendable)
        if view.waiting == 0 and still_out == 0:
            soak_until = now + timedelta(seconds=state.policy.soak_s)
            state = replace(_phase(state, "soaking", now), soak_until=soak_until)
            actions.append(
                Audit(
                    "wave-installed",
                    f"wave {state.wave}: every box is final or timed out; soaking until "
                    f"{soak_until.isoformat()}",
                    figures={"final": view.final + len(late), "timed_out_now": len(late)},
                )
            )
    if state.phase == "soaking" and state.soak_until is not None and now >= state.soak_until:
        state = _phase(state, "gating", now)
    if state.phase == "gating":
        actions.append(EvaluateGates(state.wave))  # again after a restart: gates are a read
    return state, actions


def _advance_shadow(
    state: RolloutState, tick: Tick, actions: list[Action]
) -> tuple[RolloutState, list[Action]]:
    """The shadow phase of the current wave: send, wait until every box shadows, soak, gate."""
    view, now = tick.view, tick.now
    if state.phase == "shadow_sending":
        late = _overdue(view.shadow_in_flight, now, timedelta(seconds=state.policy.deadline_s))
        if late:
            actions.append(MarkTimedOut(late, shadow=True))
        if view.shadow_sendable:
            actions.append(SendShadowNotices(state.wave, view.shadow_sendable))
        still_out = len(view.shadow_in_flight) - len(late) + len(view.shadow_sendable)
        if view.shadow_waiting == 0 and still_out == 0:
            soak_s = state.policy.shadow_soak_s or 0.0
            soak_until = now + timedelta(seconds=soak_s)
            state = replace(_phase(state, "shadow_soaking", now), soak_until=soak_until)
            actions.append(
                Audit(
                    "wave-shadowing",
                    f"wave {state.wave}: every box shadows the candidate, is final or timed "
                    f"out; shadow soak until {soak_until.isoformat()}",
                    figures={"final": view.shadow_final + len(late), "timed_out_now": len(late)},
                )
            )
    if state.phase == "shadow_soaking" and state.soak_until is not None and now >= state.soak_until:
        state = _phase(state, "shadow_gating", now)
    if state.phase == "shadow_gating":
        actions.append(EvaluateShadowGate(state.wave))  # again after a restart: a read
    return state, actions


def _advance_rollback(
    state: RolloutState, tick: Tick, deadline: timedelta
) -> tuple[RolloutState, list[Action]]:
    view, actions = tick.view, list[Action]()
    if view.rollback_sendable:
        actions.append(SendRollbacks(view.rollback_sendable))
    late = _overdue(view.rollback_in_flight, tick.now, deadline)
    if late:
        actions.append(MarkTimedOut(late, rollback=True))
    if not view.rollback_sendable and len(view.rollback_in_flight) == len(late):
        state = replace(state, status="rolled_back", finished_at=tick.now)
        actions.append(
            Audit(
                "rolled-back",
                "every box sent a rollback notice is final or timed out",
                figures={"final": view.rollback_final + len(late), "timed_out_now": len(late)},
            )
        )
    return state, actions


def _phase(state: RolloutState, phase: WavePhase, now: datetime) -> RolloutState:
    return replace(state, phase=phase, phase_since=now)


# ---- gates --------------------------------------------------------------------------------
def _on_gates(state: RolloutState, event: GatesEvaluated) -> tuple[RolloutState, list[Action]]:
    if state.status != "running" or event.wave != state.wave:
        return state, []  # a late evaluation that no longer matters
    if state.phase == "shadow_gating":
        return _on_shadow_gate(state, event)
    if state.phase != "gating":
        return state, []
    state = replace(state, gate_results=event.results)
    figures = {"wave": state.wave, "gates": [dict(result) for result in event.results]}
    failed = [result for result in event.results if result.get("status") == "fail"]
    if failed:
        names = [str(result.get("name")) for result in failed]
        reason = f"wave {state.wave} failed the {', '.join(names)} gate(s): " + "; ".join(
            _describe(result) for result in failed
        )
        return _halt(state, reason, f"rule:{names[0]}", figures, event.now)
    if state.wave < state.policy.waves:
        state = replace(
            _phase(state, state.policy.first_phase, event.now),
            wave=state.wave + 1,
            soak_until=None,
        )
        why = f"wave {state.wave - 1} passed its gates; wave {state.wave} starts"
        return state, [Audit("wave-passed", why, figures=figures)]
    state = replace(state, status="completed", finished_at=event.now)
    return state, [
        Audit("completed", f"the last wave ({state.wave}) passed its gates", figures=figures)
    ]


def _on_shadow_gate(
    state: RolloutState, event: GatesEvaluated
) -> tuple[RolloutState, list[Action]]:
    state = replace(state, shadow_results=event.results)
    figures = {"wave": state.wave, "shadow_gates": [dict(result) for result in event.results]}
    failed = [result for result in event.results if result.get("status") == "fail"]
    if failed:
        names = [str(result.get("name")) for result in failed]
        reason = (
            f"wave {state.wave} failed the {', '.join(names)} gate(s) while shadowing, so the "
            "candidate was not activated on its boxes: "
            + "; ".join(_describe(result) for result in failed)
        )
        return _halt(state, reason, f"rule:{names[0]}", figures, event.now)
    state = replace(_phase(state, "sending", event.now), soak_until=None)
    why = f"wave {state.wave} passed its shadow gate; its boxes are sent the activating notices"
    return state, [Audit("shadow-passed", why, figures=figures)]


def _describe(result: dict[str, Any]) -> str:
    detail = result.get("detail")
    if detail:
        return str(detail)
    return f"{result.get('name')} = {result.get('value')} over {result.get('threshold')}"


def _halt(
    state: RolloutState, reason: str, actor: str, figures: dict[str, Any], now: datetime
) -> tuple[RolloutState, list[Action]]:
    halted = replace(state, status="halted", halt_reason=reason, paused_from=None)
    actions: list[Action] = [Audit("halted", reason, actor, figures)]
    if not state.policy.rollback_on_halt:
        return halted, actions
    why = "the plan rolls back on halt: rollback notices go to every box that received the release"
    actions.append(Audit("rolling-back", why, actor))
    return replace(halted, status="rolling_back"), actions


# ---- commands -----------------------------------------------------------------------------
_ALLOWED: dict[str, frozenset[str]] = {
    "pause": frozenset({"running"}),
    "resume": frozenset({"paused"}),
    "cancel": frozenset({"running", "paused", "halted"}),
    "halt": frozenset({"running", "paused"}),
    "rollback": frozenset({"running", "paused", "halted", "completed", "cancelled"}),
}
_HINTS: dict[str, str] = {
    "pause": "only a running rollout can be paused",
    "resume": "only a paused rollout can be resumed; create a new rollout to go on",
    "cancel": "only a running, paused or halted rollout can be cancelled",
    "halt": "only a running or paused rollout can be halted",
    "rollback": "it is already rolling back or rolled back",
}


def _on_command(state: RolloutState, command: Command) -> tuple[RolloutState, list[Action]]:
    if command.name not in _ALLOWED:
        raise FleetError(
            f"unknown rollout command {command.name!r}; use one of {', '.join(COMMANDS)}"
        )
    if state.status not in _ALLOWED[command.name]:
        raise ConflictError(
            f"cannot {command.name} a rollout that is {state.status.replace('_', ' ')}: "
            f"{_HINTS[command.name]}"
        )
    why = command.why or f"{command.name} asked by {command.actor}"
    now = command.now
    if command.name == "pause":
        paused = replace(state, status="paused", paused_from=state.status)
        return paused, [Audit("paused", why, command.actor)]
    if command.name == "resume":
        resumed = replace(state, status=state.paused_from or "running", paused_from=None)
        return resumed, [Audit("resumed", why, command.actor)]
    if command.name == "cancel":
        cancelled = replace(state, status="cancelled", paused_from=None, finished_at=now)
        return cancelled, [Audit("cancelled", why, command.actor)]
    if command.name == "halt":
        return _halt(state, why, command.actor, {"wave": state.wave}, now)
    rolling = replace(state, status="rolling_back", paused_from=None, finished_at=None)
    return rolling, [Audit("rolling-back", why, command.actor)]


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def _time(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None
