"""Crash points for the controller's crash-safety tests; inert unless FLEET_CONTROLLER_CRASH_AT is set.

    FLEET_CONTROLLER_CRASH_AT="point:N"   SIGKILL this process at the N-th hit of `point`
    FLEET_CONTROLLER_CRASH_AT="any:N"     ... at the N-th hit of any point

The runner calls `hit(point)` where a crash matters: after each persisted transition
(`rollout.state`), after a notice is stored and before it is published (`notice.stored`,
`rollback.stored`, `shadow.stored`), after a publish and before it is marked sent
(`notice.published`, `rollback.published`, `shadow.published`), and after each update report is stored (`report.stored`). Hits are
counted in this process; the variable is read once, and production settings never set it.
"""

from __future__ import annotations

import os
import signal
from collections import Counter

ENV = "FLEET_CONTROLLER_CRASH_AT"


def _parse(text: str) -> tuple[str, int] | None:
    text = text.strip()
    if not text:
        return None
    point, sep, count = text.rpartition(":")
    if not sep or not point or not count.isdigit() or int(count) < 1:
        raise ValueError(f'{ENV}={text!r}: expected "point:N" or "any:N" with N >= 1')
    return point, int(count)


_PLAN = _parse(os.environ.get(ENV, ""))
_SEEN: Counter[str] = Counter()


def hit(point: str) -> None:
    """Reach a crash point: do nothing, or kill this process when the plan says so."""
    if _PLAN is None:
        return
    target, count = _PLAN
    if target not in ("any", point):
        return
    _SEEN[target] += 1
    if _SEEN[target] == count:
        os.kill(os.getpid(), signal.SIGKILL)
