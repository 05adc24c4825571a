"""The agent's one error tree.

Every failure the agent reports to a caller is an `AgentError` with a stable machine-readable
`code` and a message saying what was wrong and what to do. Transports translate them in one
place each (`edge_agent.http.errors` for HTTP status codes); runtimes translate their library's
exceptions into `InferenceError` / `RuntimeLoadError` before they reach the core.
"""

from __future__ import annotations


class AgentError(Exception):
    """Base of every error the agent reports."""

    code = "agent_error"

    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_s = retry_after_s


class ConfigError(AgentError):
    """The settings, a profile or a key file cannot be used."""

    code = "config_error"


class BadRequestError(AgentError):
    """The request itself is malformed (not the image in it)."""

    code = "bad_request"


class RequestTimeoutError(AgentError):
    """The client sent its request too slowly (a body lagging the minimum rate)."""

    code = "request_timeout"


class PayloadTooLargeError(AgentError):
    """The request body is over the configured cap."""

    code = "payload_too_large"


class UnsupportedMediaError(AgentError):
    """The request's content type is not one the endpoint accepts."""

    code = "unsupported_media_type"


class UnknownModelError(AgentError):
    """No model of that name is installed and active."""

    code = "unknown_model"


class UnknownRequestError(AgentError):
    """No record is kept for that request id (never seen, or already expired)."""

    code = "unknown_request"


class NotReadyError(AgentError):
    """The model is still loading or failed its self-test."""

    code = "not_ready"


class OverloadedError(AgentError):
    """All inference slots are taken; the caller should retry shortly."""

    code = "overloaded"


class DrainingError(AgentError):
    """The agent is shutting down and takes no new work."""

    code = "shutting_down"


class UnauthorizedError(AgentError):
    """An admin route was called without the right token."""

    code = "unauthorized"


class BundleRejectedError(AgentError):
    """A bundle was refused at install: bad signature or hash, wrong profile, failed self-test."""

    code = "bundle_rejected"


class FeedbackFullError(AgentError):
    """The feedback quota is full of records not yet forwarded to central."""

    code = "feedback_quota_full"


class DiskFullError(AgentError):
    """The state directory has no space left: what was asked cannot be made durable."""

    code = "disk_full"


class RuntimeLoadError(AgentError):
    """The runtime cannot load the bundle's model."""

    code = "runtime_load_failed"


class InferenceError(AgentError):
    """The runtime failed while running a model (the input was accepted)."""

    code = "inference_failed"


class SelfTestError(AgentError):
    """The golden self-test did not reproduce the bundle's expected outputs."""

    code = "self_test_failed"


def error_code(exc: BaseException) -> str:
    """The stable code of an error, the same on every transport."""
    # Imported here: the agent's error tree must not depend on edge_bundle at import time.
    from edge_bundle import errors as bundle

    if isinstance(exc, AgentError):
        return exc.code
    if isinstance(exc, bundle.ImageTooLargeError):
        return "image_too_large"
    if isinstance(exc, bundle.UnsupportedImageError):
        return "unsupported_image"
    if isinstance(exc, bundle.ImageError | bundle.PreprocessError):
        return "invalid_image"
    return "internal_error"
