"""The FastAPI application: routes over the device API (`Device`); the composition root hands in
the lifespan that starts and stops the agent, and the updater's status for /v1/updates.

POST /v1/models/{name}/predict   classify a photo (raw image body, multipart, or JSON base64)
GET  /v1/models                  installed models, their state and last self-test
GET  /v1/models/{name}           one of them
GET  /v1/requests/{id}           a kept prediction;  GET .../image (admin) its photo,
                                 GET .../heatmap (admin) an anomaly answer's overlay (PNG)
POST /v1/admin/bundles           install a bundle (admin token)
GET  /healthz  /readyz  /metrics /docs  /openapi.json  and  /  (a small upload page)
"""

from __future__ import annotations

import hmac
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Lifespan

from edge_agent import __version__
from edge_agent.device.api import Device
from edge_agent.device.ports import UpdateStatus
from edge_agent.engine.types import new_request_id
from edge_agent.errors import AgentError, BadRequestError, UnauthorizedError
from edge_agent.http import errors
from edge_agent.http.generate import add_generation_routes
from edge_agent.http.inputs import (
    MAX_NOTE_CHARS,
    QueryOption,
    read_image,
    read_json,
    read_query,
)
from edge_agent.http.middleware import (
    BodyDeadline,
    BodyLimit,
    EarlyRefusal,
    HeaderLimit,
    Refusal,
    Timing,
)
from edge_agent.http.openapi import BODY, error_responses, install_openapi
from edge_agent.http.page import INDEX_HTML, PAGE_HEADERS
from edge_agent.http.redact import public_message, redact_as
from edge_bundle.errors import BundleError

ADMIN_PREFIX = "/v1/admin/"
PREDICT_ROUTE = "/v1/models/{name}/predict"
PREDICT_BODY = {
    "required": True,
    "content": {
        "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
        "image/png": {"schema": {"type": "string", "format": "binary"}},
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "properties": {"image": {"type": "string", "format": "binary"}},
                "required": ["image"],
            }
        },
        "application/json": {
            "schema": {
                "type": "object",
                "properties": {"image": {"type": "string", "contentEncoding": "base64"}},
                "required": ["image"],
            }
        },
    },
}
NAME_PARAMETER = {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}
#: Read with the photo (`inputs.read_image`), as multipart and JSON bodies carry it in a field.
NOTE_PARAMETER = {
    "name": "note",
    "in": "query",
    "required": False,
    "description": "the technician's note for the explanation, with a raw image body",
    "schema": {"type": "string", "maxLength": MAX_NOTE_CHARS},
}
#: The prediction's query options, read by `read_query` (not by FastAPI: see `inputs`).
PREDICT_OPTIONS = (
    QueryOption(
        "top_k",
        "how many classes to return",
        {"type": "integer", "minimum": 1, "maximum": 100, "default": 3},
    ),
    QueryOption(
        "explain",
        "stream an explanation afterwards, if the model has one",
        {"type": "boolean", "default": True},
    ),
    QueryOption(
        "explanation_format",
        "json: the explanation as JSON (root_cause, actions, confidence_note), decoding "
        "constrained to that schema",
        {"type": "string", "enum": ["text", "json"], "default": "text"},
    ),
)
BINARY = {"type": "string", "format": "binary"}
SHADOW_BODY = {
    "required": True,
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "properties": {"name": {"type": "string"}, "version": {"type": "integer"}},
                "required": ["name", "version"],
            }
        }
    },
}
FEEDBACK_BODY = {
    "required": True,
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "properties": {
                    "request_id": {"type": "string"},
                    "verdict": {"enum": ["confirmed", "corrected", "rejected"]},
                    "corrected_label": {"type": ["string", "null"]},
                    "note": {"type": ["string", "null"]},
                    "station": {"type": ["string", "null"]},
                    "operator": {"type": ["string", "null"]},
                },
                "required": ["request_id", "verdict"],
            }
        }
    },
}
METRICS_200 = {
    "description": "The Prometheus text exposition format (not JSON)",
    "content": {"text/plain": {"schema": {"type": "string"}}},
}
READYZ_503 = {
    "description": "Not ready: the reasons, and every model's state",
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "properties": {
                    "ready": {"type": "boolean"},
                    "reasons": {"type": "array", "items": {"type": "string"}},
                    "models": {"type": "array", "items": {"type": "object"}},
                },
                "required": ["ready", "reasons", "models"],
            }
        }
    },
}
BUNDLE_BODY = {
    "required": True,
    "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
}


def create_app(
    device: Device,
    *,
    lifespan: Lifespan[FastAPI] | None = None,
    updates: UpdateStatus | None = None,
    refusal: Refusal | None = None,
) -> FastAPI:
    """The HTTP app over `device`; `lifespan` starts and stops what serves it, `updates` is the
    updater's status (None: updates are not configured), `refusal` says which predictions
    admission would refuse now, so that they are answered before routing (None: the endpoint
    refuses them)."""
    app = FastAPI(
        title="Lineside edge agent",
        version=__version__,
        description="Classifies defect photos with signed model bundles, on the box by the line.",
        lifespan=lifespan,
    )
    app.state.device = device
    _add_error_handlers(app)
    _add_routes(app, device, updates)
    add_generation_routes(app, device)
    settings = device.settings
    max_bundle = device.profile.budgets.max_bundle_mb * 1024 * 1024

    def limit_for(path: str) -> int:
        return max_bundle if path.startswith(ADMIN_PREFIX) else settings.max_body_bytes

    app.add_middleware(
        BodyDeadline, timeout_s=settings.http_body_timeout_s, min_rate=settings.http_body_min_rate
    )
    if refusal is not None:
        app.add_middleware(EarlyRefusal, refusal=refusal, route=PREDICT_ROUTE)
    app.add_middleware(BodyLimit, limit_for=limit_for)
    app.add_middleware(HeaderLimit, max_headers=settings.http_max_headers)
    app.add_middleware(Timing, metrics=device.metrics)
    install_openapi(app)
    return app


def openai_model(described: dict[str, Any]) -> dict[str, Any]:
    """A model as OpenAI's `GET /v1/models` lists one, with everything else the agent says."""
    created = described.get("created_at")
    try:
        timestamp = int(datetime.fromisoformat(created).timestamp()) if created else 0
    except (TypeError, ValueError):
        timestamp = 0
    return {
        **described,
        "id": described["name"],
        "object": "model",
        "created": timestamp,
        "owned_by": described.get("signed_by") or "lineside",
    }


def public_reason(model: dict[str, Any], request: Request) -> dict[str, Any]:
    """A model's description with no server path in why it is not served."""
    if isinstance(model.get("reason"), str):
        return {**model, "reason": public_message(model["reason"], request)}
    return model


def _add_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(AgentError, errors.handle_known)
    app.add_exception_handler(BundleError, errors.handle_known)
    app.add_exception_handler(StarletteHTTPException, errors.handle_http)
    app.add_exception_handler(RequestValidationError, errors.handle_validation)
    app.add_exception_handler(Exception, errors.handle_unexpected)


def _add_routes(app: FastAPI, device: Device, updater: UpdateStatus | None) -> None:
    def require_admin(request: Request) -> None:
        token = device.settings.admin_token
        if token is None:
            raise UnauthorizedError(
                "admin routes are disabled on this agent; set admin_token (a systemd credential "
                "or EDGE_AGENT_ADMIN_TOKEN) to enable them"
            )
        given = request.headers.get("authorization", "")
        expected = f"Bearer {token.get_secret_value()}"
        if not hmac.compare_digest(given.encode(), expected.encode()):
            raise UnauthorizedError(
                "missing or wrong admin token; send 'Authorization: Bearer <admin_token>'"
            )

    admin = [Depends(require_admin)]

    def described(request: Request) -> list[dict[str, Any]]:
        return [public_reason(model, request) for model in device.describe_models()]

    @app.get("/", include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(INDEX_HTML, headers=PAGE_HEADERS)

    @app.get(
        "/healthz",
        tags=["operations"],
        summary="The process is alive",
        responses=error_responses(),
    )
    async def healthz() -> dict[str, Any]:
        return {
            "status": "alive",
            "version": __version__,
            "uptime_s": round(device.uptime_s(), 1),
        }

    @app.get(
        "/readyz",
        tags=["operations"],
        summary="Models loaded and self-tests passed",
        responses={**error_responses(), 503: READYZ_503},
    )
    async def readyz(request: Request) -> JSONResponse:
        ready, reasons = device.readiness()
        body = {
            "ready": ready,
            "reasons": [public_message(reason, request) for reason in reasons],
            "models": described(request),
        }
        return JSONResponse(body, status_code=200 if ready else 503)

    @app.get(
        "/metrics",
        tags=["operations"],
        summary="Prometheus metrics",
        response_class=Response,
        responses={**error_responses(), 200: METRICS_200},
    )
    async def metrics() -> Response:
        return PlainTextResponse(device.metrics_text(), media_type=CONTENT_TYPE_LATEST)

    @app.post(
        "/v1/admin/shadow",
        tags=["admin"],
        summary="Shadow the active model with an installed candidate version",
        dependencies=admin,
        status_code=201,
        responses=error_responses(*BODY, 401, 404, 422, 503),
        openapi_extra={"requestBody": SHADOW_BODY},
    )
    async def start_shadow(request: Request) -> dict[str, Any]:
        body = await read_json(request, '{"name": "defects", "version": 2}')
        if not isinstance(body, dict):
            raise BadRequestError('send a JSON object: {"name": "defects", "version": 2}')
        name, version = body.get("name"), body.get("version")
        if not isinstance(name, str) or not isinstance(version, int):
            raise BadRequestError('send JSON: {"name": "defects", "version": 2}')
        return await device.start_shadow(name, version)

    @app.delete(
        "/v1/admin/shadow/{name}",
        tags=["admin"],
        summary="Stop shadowing",
        dependencies=admin,
        responses=error_responses(401, 404),
    )
    async def stop_shadow(name: str) -> dict[str, Any]:
        return device.stop_shadow(name)

    @app.get(
        "/v1/shadow",
        tags=["operations"],
        summary="Shadow comparisons per model",
        responses=error_responses(),
    )
    async def shadow_state() -> dict[str, Any]:
        return {"shadows": device.shadows()}

    @app.get(
        "/v1/drift",
        tags=["operations"],
        summary="Drift of live inputs per model",
        responses=error_responses(),
    )
    async def drift() -> dict[str, Any]:
        return {"threshold": device.settings.drift_alert_psi, "models": device.drift()}

    @app.get(
        "/v1/models",
        tags=["models"],
        summary="Installed models and their state (also in the OpenAI list shape, under data)",
        responses=error_responses(),
    )
    async def list_models(request: Request) -> dict[str, Any]:
        models = described(request)
        return {"object": "list", "data": [openai_model(m) for m in models], "models": models}

    @app.get(
        "/v1/models/{name}",
        tags=["models"],
        summary="One installed model",
        responses=error_responses(404),
    )
    async def get_model(name: str, request: Request) -> dict[str, Any]:
        return public_reason(device.describe_model(name), request)

    @app.post(
        PREDICT_ROUTE,
        tags=["models"],
        summary="Classify a photo",
        openapi_extra={
            "requestBody": PREDICT_BODY,
            "parameters": [
                NAME_PARAMETER,
                *(option.openapi() for option in PREDICT_OPTIONS),
                NOTE_PARAMETER,
            ],
        },
        responses=error_responses(*BODY, 404, 415, 422, 503),
    )
    async def predict(request: Request) -> JSONResponse:
        # Parameters read by hand, documented in `openapi_extra` (see `PREDICT_OPTIONS`).
        name = request.path_params["name"]
        options = read_query(request.query_params, PREDICT_OPTIONS)
        request_id = new_request_id()
        request.state.request_id = request_id
        client_id = request.headers.get("x-request-id")
        if not (client_id and len(client_id) <= 128 and client_id.isprintable()):
            client_id = None
        answer = await device.predict(
            name,
            lambda: read_image(request),
            transport="http",
            request_id=request_id,
            top_k=options["top_k"],
            explain=options["explain"],
            client_request_id=client_id,
            structured=options["explanation_format"] == "json",
        )
        body = answer.prediction.to_json()
        body["links"] = {"self": f"/v1/requests/{request_id}"}
        if answer.explanation is not None:
            body["explanation"] = answer.explanation
        headers = {"X-Request-ID": request_id}
        if client_id is not None:
            body["client_request_id"] = client_id
        return JSONResponse(body, headers=headers)

    def require_token_if_set(request: Request) -> None:
        if device.settings.admin_token is not None:
            require_admin(request)

    @app.post(
        "/v1/feedback",
        tags=["feedback"],
        summary="A technician's verdict on a prediction (token required when one is set)",
        dependencies=[Depends(require_token_if_set)],
        status_code=201,
        responses=error_responses(*BODY, 401, 404, 503, 507),
        openapi_extra={"requestBody": FEEDBACK_BODY},
    )
    async def feedback(request: Request) -> dict[str, Any]:
        submitted = await read_json(
            request,
            '{"request_id", "verdict": "confirmed|corrected|rejected", "corrected_label", '
            '"note", "station", "operator"}',
        )
        if not isinstance(submitted, dict):
            raise BadRequestError("the feedback must be a JSON object")
        return await device.submit_feedback(submitted)

    @app.get(
        "/v1/feedback",
        tags=["feedback"],
        summary="Recent feedback at this box (token required when one is set)",
        dependencies=[Depends(require_token_if_set)],
        responses=error_responses(400, 401),
    )
    async def recent_feedback(limit: Annotated[int, Query(ge=1, le=200)] = 20) -> dict[str, Any]:
        return await device.recent_feedback(limit)

    @app.get(
        "/v1/updates",
        tags=["operations"],
        summary="The updater's state and recent reports",
        responses=error_responses(),
    )
    async def updates() -> dict[str, Any]:
        if updater is None:
            return {"enabled": False, "state": None, "reports": []}
        return {"enabled": True, **updater.describe()}

    @app.get(
        "/v1/requests/{request_id}",
        tags=["requests"],
        summary="A kept prediction",
        responses=error_responses(404),
    )
    async def get_request(request_id: str) -> dict[str, Any]:
        return device.request_record(request_id)

    @app.get(
        "/v1/requests/{request_id}/image",
        tags=["requests"],
        summary="The photo of a kept prediction (admin)",
        dependencies=admin,
        response_class=Response,
        responses={
            **error_responses(401, 404),
            200: {"content": {"application/octet-stream": {"schema": BINARY}}},
        },
    )
    async def get_request_image(request_id: str) -> Response:
        return Response(device.request_image(request_id), media_type="application/octet-stream")

    @app.get(
        "/v1/requests/{request_id}/heatmap",
        tags=["requests"],
        summary="The heatmap overlay of a kept anomaly answer, PNG (admin)",
        dependencies=admin,
        response_class=Response,
        responses={
            **error_responses(401, 404, 503),
            200: {"content": {"image/png": {"schema": BINARY}}},
        },
    )
    async def get_request_heatmap(request_id: str) -> Response:
        return Response(await device.request_heatmap(request_id), media_type="image/png")

    @app.post(
        "/v1/admin/bundles",
        tags=["admin"],
        summary="Install and activate a bundle",
        dependencies=admin,
        status_code=201,
        openapi_extra={"requestBody": BUNDLE_BODY},
        responses=error_responses(*BODY, 401, 422, 503, 507),
    )
    async def install_bundle(request: Request) -> dict[str, Any]:
        uploads = device.settings.state_dir / "uploads"
        try:
            uploads.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=uploads, suffix=".bundle", delete=False) as handle:
                path = Path(handle.name)
                redact_as(request, path, "the uploaded bundle")
                try:
                    async for chunk in request.stream():
                        handle.write(chunk)
                    handle.flush()
                except BaseException:
                    path.unlink(missing_ok=True)
                    raise
        except OSError as exc:
            device.raise_if_disk_full(exc, "receive the bundle")  # 507, not 500
            raise
        try:
            if path.stat().st_size == 0:
                raise BadRequestError(
                    "the body is empty; send the .bundle file as the request body"
                )
            return await device.install(path)
        finally:
            path.unlink(missing_ok=True)
