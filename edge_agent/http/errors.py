"""Errors -> HTTP responses, in one table.

Every error answer has the same JSON shape, `{"error": {"code", "message", "request_id"}}`, says
what was wrong and what to do, and carries `Retry-After` when retrying later can succeed.
"""

from __future__ import annotations

import math

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from edge_agent import errors as agent
from edge_agent.http.redact import public_message
from edge_bundle import errors as bundle

#: Answers after which the connection is closed: the request body was not read to its end.
CLOSES = frozenset({408, 413, 431})
#: Most specific class first; the first match wins. Codes come from `agent.error_code`.
STATUS: tuple[tuple[type[Exception], int], ...] = (
    (agent.BadRequestError, 400),
    (agent.RequestTimeoutError, 408),
    (agent.UnauthorizedError, 401),
    (agent.UnknownModelError, 404),
    (agent.UnknownRequestError, 404),
    (agent.PayloadTooLargeError, 413),
    (agent.UnsupportedMediaError, 415),
    (agent.BundleRejectedError, 422),
    (agent.FeedbackFullError, 507),
    (agent.DiskFullError, 507),
    (agent.NotReadyError, 503),
    (agent.OverloadedError, 503),
    (agent.DrainingError, 503),
    (agent.ConfigError, 500),
    (agent.RuntimeLoadError, 500),
    (agent.InferenceError, 500),
    (agent.SelfTestError, 500),
    (bundle.ImageTooLargeError, 413),
    (bundle.UnsupportedImageError, 415),
    (bundle.ImageError, 422),
    (bundle.PreprocessError, 422),
)


def status_for(exc: Exception) -> tuple[int, str]:
    """(HTTP status, error code) for an agent or bundle error."""
    for cls, status in STATUS:
        if isinstance(exc, cls):
            return status, agent.error_code(exc)
    return 500, "internal_error"


def error_response(
    status: int,
    code: str,
    message: str,
    request_id: str | None,
    retry_after_s: float | None = None,
) -> JSONResponse:
    headers = {}
    if status in CLOSES:  # the client may still be sending: do not read on into its next request
        headers["Connection"] = "close"
    if retry_after_s is not None:
        headers["Retry-After"] = str(max(1, math.ceil(retry_after_s)))
    if request_id:
        headers["X-Request-ID"] = request_id
    body = {"error": {"code": code, "message": message, "request_id": request_id}}
    return JSONResponse(body, status_code=status, headers=headers)


def request_id_of(request: Request) -> str | None:
    value = getattr(request.state, "request_id", None)
    return value if isinstance(value, str) else None


async def handle_known(request: Request, exc: Exception) -> JSONResponse:
    status, code = status_for(exc)
    message = public_message(getattr(exc, "message", None) or str(exc), request)
    retry = getattr(exc, "retry_after_s", None)
    return error_response(status, code, message, request_id_of(request), retry)


async def handle_http(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    cause = exc.__cause__  # FastAPI wraps whatever failed while it read a body into a 400
    if isinstance(cause, agent.AgentError | bundle.BundleError):
        return await handle_known(request, cause)
    codes = {400: "bad_request", 404: "not_found", 405: "method_not_allowed"}
    message = {
        400: _unreadable_body(cause) if cause is not None else str(exc.detail),
        404: f"there is no route {request.url.path}; see /docs for the API",
        405: f"{request.method} is not allowed on {request.url.path}; see /docs for the API",
    }.get(exc.status_code, str(exc.detail))
    response = error_response(
        exc.status_code, codes.get(exc.status_code, "http_error"), message, request_id_of(request)
    )
    response.headers.update(exc.headers or {})
    if exc.status_code == 405:
        response.headers["Allow"] = ", ".join(allowed_methods(request))
    return response


def _unreadable_body(cause: BaseException | None) -> str:
    if isinstance(cause, RecursionError):
        return "the JSON body is nested too deeply; send a flat JSON object as /docs describes"
    return "the request body could not be read; send JSON as /docs describes"


def allowed_methods(request: Request) -> list[str]:
    """Every method some route serves at this path (routes are registered one per method)."""
    methods: set[str] = set()
    for route in request.app.router.routes:
        match, _ = route.matches(request.scope)
        if match is not Match.NONE:
            methods.update(getattr(route, "methods", None) or ())
    return sorted(methods)


async def handle_validation(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    problems = []
    for error in exc.errors():
        where = ".".join(str(p) for p in error.get("loc", ()))
        problems.append(f"{where}: {error.get('msg', 'invalid')}")
    return error_response(
        400, "bad_request", "invalid request: " + "; ".join(problems), request_id_of(request)
    )


async def handle_unexpected(request: Request, exc: Exception) -> JSONResponse:
    import logging

    logging.getLogger(__name__).exception("unexpected error on %s", request.url.path)
    return error_response(
        500,
        "internal_error",
        "the agent hit an unexpected error; it keeps serving. Retry, and report the request id "
        "if it persists",
        request_id_of(request),
    )
