"""The controller's error tree: every refusal says what was wrong and what to do.

`status` is the HTTP status the API answers with; the CLI prints the message and exits 2.
"""

from __future__ import annotations


class FleetError(Exception):
    """Something the operator asked for cannot be done as asked (400)."""

    status = 400

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class NotFoundError(FleetError):
    """A rollout or box that does not exist (404)."""

    status = 404


class ConflictError(FleetError):
    """Asked for something the current state forbids: overlapping rollouts, resuming a finished
    one (409)."""

    status = 409


class BadMessageError(FleetError):
    """A message from the broker that is refused and counted; `kind` and `reason` label the
    counter (`reason` is a short slug, the message the full explanation)."""

    def __init__(self, kind: str, reason: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.reason = reason
