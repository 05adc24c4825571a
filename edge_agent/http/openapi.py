"""What the OpenAPI document says about answers other than success, so that it tells the truth.

Every route lists the error statuses it can answer, each with the one error shape
(`edge_agent.http.errors`); statuses that retrying later can cure say so with `Retry-After`.
FastAPI's automatic `422 Validation Error` is dropped: this API answers malformed requests 400.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, Field

#: What each status means here, as the document says it.
MEANING: dict[int, str] = {
    400: "Malformed request (query, path, JSON or multipart) or JSON nested too deeply",
    401: "Missing or wrong token",
    404: "No such model, record or route",
    408: "The request body arrived too slowly (deadline and minimum rate); the connection closes",
    413: "Body over the size limit, or image over the pixel limit",
    415: "Content type or image format not accepted",
    422: "The image cannot be read, or the bundle was refused",
    431: "Request line and headers over the size or count limit; the connection closes",
    500: "The agent hit an unexpected error or the runtime failed; it keeps serving",
    503: "Overloaded, shutting down or not ready; retry after Retry-After seconds",
    507: "No space left to keep what was sent; retry after Retry-After seconds",
}
RETRYABLE = frozenset({503, 507})
#: Statuses any route can answer: the header limits (checked before routing) and a crash.
ALWAYS = (431, 500)
#: Statuses any route reading a request body can answer.
BODY = (400, 408, 413)


class ErrorDetail(BaseModel):
    code: str = Field(description="stable machine-readable code, e.g. overloaded")
    message: str = Field(description="what was wrong and what to do about it")
    request_id: str | None = Field(description="the request's id, when it had one")


class ErrorBody(BaseModel):
    """Every error answer of the agent."""

    error: ErrorDetail


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The `responses=` of a route answering `statuses` (plus `ALWAYS`) with the error shape."""
    answers: dict[int | str, dict[str, Any]] = {}
    for status in sorted({*statuses, *ALWAYS}):
        answer: dict[str, Any] = {"model": ErrorBody, "description": MEANING[status]}
        if status in RETRYABLE:
            answer["headers"] = {
                "Retry-After": {
                    "description": "seconds to wait before retrying",
                    "schema": {"type": "integer", "minimum": 1},
                }
            }
        answers[status] = answer
    return answers


def install_openapi(app: FastAPI) -> None:
    """Make `app.openapi()` build the document without FastAPI's default 422 answers."""

    def build() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = get_openapi(
                title=app.title,
                version=app.version,
                description=app.description,
                routes=app.routes,
            )
            _drop_default_validation_answers(document)
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = build  # type: ignore[method-assign]


def _drop_default_validation_answers(document: dict[str, Any]) -> None:
    generated = "#/components/schemas/HTTPValidationError"
    for operations in document.get("paths", {}).values():
        for operation in operations.values():
            answer = operation.get("responses", {}).get("422", {})
            schema = answer.get("content", {}).get("application/json", {}).get("schema", {})
            if schema.get("$ref") == generated:
                del operation["responses"]["422"]
    schemas = document.get("components", {}).get("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
