"""Fault injection points for the crash-consistency tests; inert unless LINESIDE_FAULTS is set.

    LINESIDE_FAULTS="point=action[@n[-m]],..."
        e.g. "update.activating=kill", "persist.fsync=enospc@2", "outbox.put=enospc@1-20",
             "models.load.defects=delay:5"

`hit(point)` is called at places where a crash, an I/O error or a slow step matters (persisting
the updater's state, writing a download, each update step, storing an MQTT answer, the outbox's
checkpoint, loading a model). The action runs the n-th time (default the first) the point is reached in this process,
or every time from the n-th to the m-th: `kill` sends SIGKILL to this process (a power cut, as
far as the process can tell), `enospc` and `eio` raise the OSError a full or failing disk would,
`delay:S` sleeps S seconds (a model that loads slowly). The variable is read once; production
settings never set it.
"""

from __future__ import annotations

import errno
import os
import signal
import time
from collections import Counter

_ACTIONS = ("kill", "enospc", "eio", "delay")


def _parse(text: str) -> dict[str, tuple[str, float, int, int]]:
    """point -> (action, seconds for delay, first hit, last hit)."""
    plan: dict[str, tuple[str, float, int, int]] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        point, _, rest = item.partition("=")
        action, _, hits = rest.partition("@")
        action, _, seconds = action.partition(":")
        if action not in _ACTIONS:
            raise ValueError(f"LINESIDE_FAULTS: unknown action {action!r} in {item!r}")
        first, _, last = hits.partition("-")
        plan[point] = (action, float(seconds or 0), int(first or 1), int(last or first or 1))
    return plan


_PLAN = _parse(os.environ.get("LINESIDE_FAULTS", ""))
_SEEN: Counter[str] = Counter()


def hit(point: str) -> None:
    """Reach a fault point: do nothing, or the planned fault."""
    if not _PLAN or point not in _PLAN:
        return
    _SEEN[point] += 1
    action, seconds, first, last = _PLAN[point]
    if not first <= _SEEN[point] <= last:
        return
    if action == "delay":
        time.sleep(seconds)
        return
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    code = errno.ENOSPC if action == "enospc" else errno.EIO
    raise OSError(code, f"{os.strerror(code)} (injected at {point})")
