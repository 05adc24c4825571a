"""The updater's state on disk: written atomically, read back after a restart.

A new state is written to a temporary file, fsynced, renamed over the old one, and the directory
is fsynced, so after a power cut the file holds the old state or the new one, never a mix. A
write that fails (disk full, I/O error) leaves the old file in place and raises, and the runner
does not act on a state it could not persist.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from edge_agent import faults
from edge_agent.updater.machine import UpdateState
from edge_bundle.files import fsync_directory

log = logging.getLogger(__name__)


def save(path: Path, state: UpdateState) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = json.dumps(state.to_json(), indent=1, sort_keys=True).encode()
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        with temporary.open("wb") as handle:
            faults.hit("persist.write")
            handle.write(data)
            handle.flush()
            faults.hit("persist.fsync")
            os.fsync(handle.fileno())
        faults.hit("persist.rename")
        temporary.replace(path)
        fsync_directory(path.parent)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def load(path: Path) -> UpdateState:
    """The saved state; a fresh one if there is none. A damaged file is kept aside and reset."""
    try:
        data = json.loads(path.read_bytes())
        return UpdateState.from_json(data)
    except FileNotFoundError:
        return UpdateState()
    except (OSError, ValueError, KeyError, TypeError) as exc:
        aside = path.with_name(path.name + ".damaged")
        log.error(
            "updater state %s is unreadable (%s); kept as %s, starting idle", path, exc, aside
        )
        path.replace(aside)
        return UpdateState()
