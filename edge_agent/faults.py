"""Fault injection points for the crash-consistency tests; inert unless LINESIDE_FAULTS is set.

    LINESIDE_FAULTS="point=action[@n],..."   e.g. "update.activating=kill", "persist.fsync=enospc@2"

`hit(point)` is called at places where a crash or an I/O error matters (persisting the updater's
state, writing a download, each update step). The action runs the n-th time (default the first)
the point is reached in this process: `kill` sends SIGKILL to this process (a power cut, as far as
the process can tell), `enospc` and `eio` raise the OSError a full or failing disk would. The
variable is read once; production settings never set it.
"""

from __future__ import annotations

import errno
import os
import signal
from collections import Counter

_ACTIONS = ("kill", "enospc", "eio")


def _parse(text: str) -> dict[str, tuple[str, int]]:
    plan: dict[str, tuple[str, int]] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        point, _, rest = item.partition("=")
        action, _, nth = rest.partition("@")
        if action not in _ACTIONS:
            raise ValueError(f"LINESIDE_FAULTS: unknown action {action!r} in {item!r}")
        plan[point] = (action, int(nth or 1))
    return plan


_PLAN = _parse(os.environ.get("LINESIDE_FAULTS", ""))
_SEEN: Counter[str] = Counter()


def hit(point: str) -> None:
    """Reach a fault point: do nothing, or the planned fault."""
    if not _PLAN or point not in _PLAN:
        return
    _SEEN[point] += 1
    action, nth = _PLAN[point]
    if _SEEN[point] != nth:
        return
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    code = errno.ENOSPC if action == "enospc" else errno.EIO
    raise OSError(code, f"{os.strerror(code)} (injected at {point})")
