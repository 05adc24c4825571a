"""The FastAPI application: routes over one `Agent`, which the lifespan starts and stops.

POST /v1/models/{name}/predict   classify a photo (raw image body, multipart, or JSON base64)
GET  /v1/models                  installed models, their state and last self-test
GET  /v1/models/{name}           one of them
GET  /v1/requests/{id}           a kept prediction;  GET .../image (admin) its photo
POST /v1/admin/bundles           install a bundle (admin token)
GET  /healthz  /readyz  /metrics /docs  /openapi.json  and  /  (a small upload page)
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from edge_agent import __version__
from edge_agent.agent import Agent
from edge_agent.core import new_request_id
from edge_agent.errors import (
    AgentError,
    BadRequestError,
    UnauthorizedError,
    UnknownModelError,
    UnknownRequestError,
)
from edge_agent.http import errors
from edge_agent.http.generate import add_generation_routes
from edge_agent.http.inputs import read_image
from edge_agent.http.middleware import BodyLimit, Timing
from edge_agent.http.page import INDEX_HTML
from edge_agent.telemetry import drift_scores
from edge_bundle.errors import BundleError

ADMIN_PREFIX = "/v1/admin/"
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
BUNDLE_BODY = {
    "required": True,
    "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
}


def create_app(agent: Agent) -> FastAPI:
    """The HTTP app for `agent`; its lifespan loads models in the background and stops them."""

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await agent.start()
        try:
            yield
        finally:
            await agent.stop()

    app = FastAPI(
        title="Lineside edge agent",
        version=__version__,
        description="Classifies defect photos with signed model bundles, on the box by the line.",
        lifespan=lifespan,
    )
    app.state.agent = agent
    _add_error_handlers(app)
    _add_routes(app, agent)
    add_generation_routes(app, agent)
    settings = agent.settings
    max_bundle = agent.profile.budgets.max_bundle_mb * 1024 * 1024

    def limit_for(path: str) -> int:
        return max_bundle if path.startswith(ADMIN_PREFIX) else settings.max_body_bytes

    app.add_middleware(BodyLimit, limit_for=limit_for)
    app.add_middleware(Timing, metrics=agent.metrics)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(AgentError, errors.handle_known)
    app.add_exception_handler(BundleError, errors.handle_known)
    app.add_exception_handler(StarletteHTTPException, errors.handle_http)
    app.add_exception_handler(RequestValidationError, errors.handle_validation)
    app.add_exception_handler(Exception, errors.handle_unexpected)


def _add_routes(app: FastAPI, agent: Agent) -> None:
    def require_admin(request: Request) -> None:
        token = agent.settings.admin_token
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

    @app.get("/", include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(INDEX_HTML)

    @app.get("/healthz", tags=["operations"], summary="The process is alive")
    async def healthz() -> dict[str, Any]:
        return {
            "status": "alive",
            "version": __version__,
            "uptime_s": round(time.time() - agent.started_at, 1),
        }

    @app.get("/readyz", tags=["operations"], summary="Models loaded and self-tests passed")
    async def readyz() -> JSONResponse:
        ready, reasons = agent.readiness()
        body = {"ready": ready, "reasons": reasons, "models": agent.describe_models()}
        return JSONResponse(body, status_code=200 if ready else 503)

    @app.get("/metrics", tags=["operations"], summary="Prometheus metrics")
    async def metrics() -> Response:
        agent.metrics.in_flight.set(agent.core.admission.in_flight)
        agent.readiness()
        if agent.mqtt is not None:
            depth = agent.mqtt.outbox.depth()
            agent.metrics.outbox_messages.set(depth["messages"])
            agent.metrics.outbox_bytes.set(depth["bytes"])
        drift_scores(agent)
        return PlainTextResponse(agent.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.post(
        "/v1/admin/shadow",
        tags=["admin"],
        summary="Shadow the active model with an installed candidate version",
        dependencies=admin,
        status_code=201,
    )
    async def start_shadow(request: Request) -> dict[str, Any]:
        try:
            body = await request.json()
        except ValueError:
            raise BadRequestError('send JSON: {"name": "defects", "version": 2}') from None
        name, version = body.get("name"), body.get("version")
        if not isinstance(name, str) or not isinstance(version, int):
            raise BadRequestError('send JSON: {"name": "defects", "version": 2}')
        agent.core.classifier(name)  # the active model must exist and be ready
        if version == agent.store.active_version(name):
            raise BadRequestError(f"{name}@{version} is the active version; shadow another one")
        candidate = await asyncio.to_thread(agent.prepare_candidate, name, version)
        agent.core.shadow.start(name, candidate)
        return {"shadowing": name, "candidate": candidate.describe()}

    @app.delete(
        "/v1/admin/shadow/{name}", tags=["admin"], summary="Stop shadowing", dependencies=admin
    )
    async def stop_shadow(name: str) -> dict[str, Any]:
        shadow = agent.core.shadow.stop(name)
        if shadow is None:
            raise UnknownModelError(f"nothing shadows {name!r}")
        return {"stopped": name, "result": shadow.describe()}

    @app.get("/v1/shadow", tags=["operations"], summary="Shadow comparisons per model")
    async def shadow_state() -> dict[str, Any]:
        return {"shadows": agent.core.shadow.describe()}

    @app.get("/v1/drift", tags=["operations"], summary="Drift of live inputs per model")
    async def drift() -> dict[str, Any]:
        return {"threshold": agent.settings.drift_alert_psi, "models": drift_scores(agent)}

    @app.get("/v1/models", tags=["models"], summary="Installed models and their state")
    async def list_models() -> dict[str, Any]:
        return {"models": agent.describe_models()}

    @app.get("/v1/models/{name}", tags=["models"], summary="One installed model")
    async def get_model(name: str) -> dict[str, Any]:
        for entry in agent.describe_models():
            if entry["name"] == name:
                return entry
        agent.core.classifier(name)  # raises the unknown-model error
        raise AssertionError("unreachable")

    @app.post(
        "/v1/models/{name}/predict",
        tags=["models"],
        summary="Classify a photo",
        openapi_extra={"requestBody": PREDICT_BODY},
    )
    async def predict(
        name: str,
        request: Request,
        top_k: Annotated[int, Query(ge=1, le=100, description="how many classes to return")] = 3,
        explain: Annotated[
            bool, Query(description="stream an explanation afterwards, if the model has one")
        ] = True,
    ) -> JSONResponse:
        request_id = new_request_id()
        request.state.request_id = request_id
        outcome = "error"
        arrived = time.perf_counter()
        try:
            with agent.core.admission.slot():
                agent.metrics.in_flight.set(agent.core.admission.in_flight)
                agent.core.classifier(name)  # unknown or not-ready models fail before the upload
                started = time.perf_counter()
                upload = await read_image(request)
                received = time.perf_counter() - started
                prediction = await agent.core.predict(
                    name, upload.image, request_id=request_id, top_k=top_k, receive_s=received
                )
            outcome = "ok"
        except (AgentError, BundleError) as exc:
            outcome = errors.status_for(exc)[1]
            raise
        finally:
            elapsed = time.perf_counter() - arrived if outcome == "ok" else None
            agent.core.record(name, "http", outcome, elapsed)
            agent.metrics.in_flight.set(agent.core.admission.in_flight)
        if agent.mqtt is not None and agent.settings.mqtt_publish_http_results:
            await agent.mqtt.publish_result(prediction, source={"transport": "http"})
        body = prediction.to_json()
        body["links"] = {"self": f"/v1/requests/{request_id}"}
        if explain:
            explainer = agent.core.classifier(name).bundle.manifest.explainer
            explanation = agent.explainer.start(prediction, explainer, upload.note)
            if explanation is not None:
                body["explanation"] = explanation
        headers = {"X-Request-ID": request_id}
        client_id = request.headers.get("x-request-id")
        if client_id and len(client_id) <= 128 and client_id.isprintable():
            body["client_request_id"] = client_id
        return JSONResponse(body, headers=headers)

    def require_token_if_set(request: Request) -> None:
        if agent.settings.admin_token is not None:
            require_admin(request)

    @app.post(
        "/v1/feedback",
        tags=["feedback"],
        summary="A technician's verdict on a prediction (token required when one is set)",
        dependencies=[Depends(require_token_if_set)],
        status_code=201,
    )
    async def feedback(request: Request) -> dict[str, Any]:
        try:
            submitted = await request.json()
        except ValueError:
            raise BadRequestError(
                'send JSON: {"request_id", "verdict": "confirmed|corrected|rejected", '
                '"corrected_label", "note", "station", "operator"}'
            ) from None
        if not isinstance(submitted, dict):
            raise BadRequestError("the feedback must be a JSON object")
        return await agent.submit_feedback(submitted)

    @app.get("/v1/feedback", tags=["feedback"], summary="Recent feedback at this box")
    async def recent_feedback(limit: Annotated[int, Query(ge=1, le=200)] = 20) -> dict[str, Any]:
        records = await asyncio.to_thread(agent.feedback.records)
        return {"feedback": records[-limit:][::-1], "stored": len(agent.feedback)}

    @app.get("/v1/updates", tags=["operations"], summary="The updater's state and recent reports")
    async def updates() -> dict[str, Any]:
        updater = agent.updater
        if updater is None:
            return {"enabled": False, "state": None, "reports": []}
        return {"enabled": True, "state": updater.state.to_json(), "reports": updater.reports}

    @app.get("/v1/requests/{request_id}", tags=["requests"], summary="A kept prediction")
    async def get_request(request_id: str) -> dict[str, Any]:
        record = agent.records.get(request_id)
        if record is None:
            raise UnknownRequestError(
                f"no record of request {request_id}: unknown, or older than the keep limits"
            )
        return record

    @app.get(
        "/v1/requests/{request_id}/image",
        tags=["requests"],
        summary="The photo of a kept prediction (admin)",
        dependencies=admin,
    )
    async def get_request_image(request_id: str) -> Response:
        data = agent.records.image(request_id)
        if data is None:
            raise UnknownRequestError(f"no image kept for request {request_id}")
        return Response(data, media_type="application/octet-stream")

    @app.post(
        "/v1/admin/bundles",
        tags=["admin"],
        summary="Install and activate a bundle",
        dependencies=admin,
        status_code=201,
        openapi_extra={"requestBody": BUNDLE_BODY},
    )
    async def install_bundle(request: Request) -> dict[str, Any]:
        uploads = agent.settings.state_dir / "uploads"
        uploads.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=uploads, suffix=".bundle", delete=False) as handle:
            path = Path(handle.name)
            try:
                async for chunk in request.stream():
                    handle.write(chunk)
            except BaseException:
                path.unlink(missing_ok=True)
                raise
        try:
            if path.stat().st_size == 0:
                raise BadRequestError(
                    "the body is empty; send the .bundle file as the request body"
                )
            return await agent.install(path)
        finally:
            path.unlink(missing_ok=True)
