"""Flow control of a chunked fetch over MQTT (`edge_bundle.chunks`), as pure bookkeeping: what
to ask for next and what again. The agent's fetch, the fleet simulator's and the tests' fetcher
all keep their requests with it.

At most `size` parts (manifest pages or chunks) are *open* at once: asked for and not yet
answered, or answered and still being checked and written. That bounds both the broker's queue
for this box and the fetcher's memory (`size` chunks at most). A request unanswered by its
deadline is asked again, each time waiting twice as long (up to `max_timeout_s`); a part refused
for its content goes back to the front of the queue. The clock is passed in, so tests drive it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

MAX_TIMEOUT_S = 60.0


@dataclass
class _Asked:
    deadline: float
    attempts: int


class RequestWindow:
    """The parts still missing, the open ones, and when each open request is due again."""

    def __init__(
        self,
        missing: Iterable[int],
        *,
        size: int,
        timeout_s: float,
        max_timeout_s: float = MAX_TIMEOUT_S,
    ) -> None:
        if size < 1:
            raise ValueError("a request window holds at least one request")
        self.size = size
        self.timeout_s = timeout_s
        self.max_timeout_s = max(max_timeout_s, timeout_s)
        self._waiting: deque[int] = deque(sorted(set(missing)))
        self._asked: dict[int, _Asked] = {}
        self._arrived: set[int] = set()  # answered, being checked and written
        self.resent = 0  # requests sent again after their deadline

    @property
    def open(self) -> int:
        """Parts asked for and not yet stored or refused (never more than `size`)."""
        return len(self._asked) + len(self._arrived)

    @property
    def done(self) -> bool:
        return not self._waiting and not self._asked and not self._arrived

    @property
    def remaining(self) -> int:
        return len(self._waiting) + self.open

    def to_send(self, now: float) -> list[int]:
        """The requests to send now: overdue ones again (backing off), then new ones while the
        window has room. Each is marked as sent at `now`."""
        due = [index for index, asked in self._asked.items() if asked.deadline <= now]
        for index in due:
            asked = self._asked[index]
            asked.attempts += 1
            asked.deadline = now + self._timeout(asked.attempts)
        self.resent += len(due)
        fresh = []
        while self._waiting and self.open < self.size:
            index = self._waiting.popleft()
            self._asked[index] = _Asked(now + self.timeout_s, 1)
            fresh.append(index)
        return due + fresh

    def asking(self, index: int) -> bool:
        """Whether a request for `index` is open and unanswered."""
        return index in self._asked

    def take(self, index: int) -> bool:
        """A reply for `index` arrived: True if it was asked for and is still open (use it),
        False for one not asked for, or answered already (ignore it)."""
        if self._asked.pop(index, None) is None:
            return False
        self._arrived.add(index)
        return True

    def stored(self, index: int) -> None:
        """The part taken was checked and written."""
        self._arrived.discard(index)

    def refused(self, index: int) -> None:
        """The part taken failed its check: ask for it again first."""
        if index in self._arrived:
            self._arrived.discard(index)
            self._waiting.appendleft(index)

    def resend_all(self) -> None:
        """Make every open request due now (the connection came back: requests sent while it
        was down were lost)."""
        for asked in self._asked.values():
            asked.deadline = float("-inf")
            asked.attempts = max(0, asked.attempts - 1)  # an outage is not the server's fault

    def next_deadline(self) -> float | None:
        """When the earliest open request is due again (None when none is)."""
        return min((asked.deadline for asked in self._asked.values()), default=None)

    def _timeout(self, attempts: int) -> float:
        return float(min(self.max_timeout_s, self.timeout_s * 2 ** (attempts - 1)))
