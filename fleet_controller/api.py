"""The controller's HTTP JSON API (FastAPI): devices, cohorts, rollouts, audit, metrics.

Every route under `/v1` needs `Authorization: Bearer TOKEN`; the token's operator is the actor
the audit trail records. `/healthz` and `/metrics` are open (read-only figures, no box data
beyond counts). Errors are `{"error": CODE, "detail": MESSAGE}` with the status of the
`FleetError` that caused them: 400 bad input, 401 no or wrong token, 404 unknown, 409 the state
forbids it. The fleet page (`/fleet`, `fleet_controller.page`) is static and open; it reads
`/v1/overview` (boxes per version, one page of boxes) and the rollout routes with its token.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from fleet_controller import __version__
from fleet_controller.cohorts import Selector, preview
from fleet_controller.config import ApiTokens
from fleet_controller.errors import FleetError, NotFoundError
from fleet_controller.page import (
    OVERVIEW_MAX_AGE_S,
    BoxState,
    Snapshots,
    add_fleet_page,
    overview,
)
from fleet_controller.plan import RolloutPlan
from fleet_controller.registry import Registry
from fleet_controller.rollouts import Rollouts

COMMANDS = ("pause", "resume", "cancel", "halt", "rollback")


class CommandBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    why: str = Field(default="", max_length=2000)


class CreateBody(BaseModel):
    """A rollout plan as JSON (the TOML layout of docs/fleet.md); `bundle` is a path on the
    controller's machine, absolute or relative to `base_dir`."""

    model_config = ConfigDict(extra="forbid")
    plan: dict[str, Any]
    base_dir: str = "/"
    dry_run: bool = False


class UnauthorizedError(FleetError):
    status = 401


def create_app(
    registry: Registry,
    rollouts: Rollouts,
    tokens: ApiTokens,
    *,
    metrics: Callable[[], tuple[bytes, str]],
    ready: Callable[[], dict[str, Any]],
    overview_max_age_s: float = OVERVIEW_MAX_AGE_S,
) -> FastAPI:
    """The API over one registry and one rollouts runner."""
    app = FastAPI(title="Lineside fleet controller", version=__version__)
    app.state.tokens = tokens
    add_fleet_page(app)
    snapshots = Snapshots(registry.devices_changed, overview_max_age_s)

    @app.exception_handler(FleetError)
    async def fleet_error(_request: Request, exc: FleetError) -> JSONResponse:
        code = {400: "bad_request", 401: "unauthorized", 404: "not_found", 409: "conflict"}
        return JSONResponse(
            {"error": code.get(exc.status, "error"), "detail": exc.message},
            status_code=exc.status,
            headers={"WWW-Authenticate": "Bearer"} if exc.status == 401 else None,
        )

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
        )
        return JSONResponse({"error": "bad_request", "detail": problems}, status_code=400)

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        return ready()

    @app.get("/metrics")
    def prometheus() -> Response:
        body, content_type = metrics()
        return Response(body, media_type=content_type)

    @app.get("/v1/devices")
    def devices(
        _who: Operator,
        site: str | None = None,
        line: str | None = None,
        group: str | None = None,
        profile: str | None = None,
        model: str | None = None,
    ) -> dict[str, Any]:
        criteria = {
            k: v
            for k, v in {
                "site": site, "line": line, "group": group, "profile": profile, "model": model,
            }.items()
            if v is not None
        }  # fmt: skip
        selector = _selector(criteria) if criteria else None
        found = registry.devices(selector)
        return {"count": len(found), "devices": [d.to_json() for d in found]}

    @app.get("/v1/overview")
    def fleet_overview(
        _who: Operator,
        site: str | None = None,
        line: str | None = None,
        group: str | None = None,
        profile: str | None = None,
        state: BoxState = "all",
        q: Annotated[str, Query(max_length=256)] = "",
        offset: Annotated[int, Query(ge=0)] = 0,
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
    ) -> dict[str, Any]:
        criteria = {"site": site, "line": line, "group": group, "profile": profile}
        given = {k: v for k, v in criteria.items() if v}
        selector = _selector(given) if given else None
        return overview(snapshots.get(), selector, state=state, query=q, offset=offset, limit=limit)

    @app.get("/v1/devices/{site}/{device}")
    def device(site: str, device: str, _who: Operator) -> dict[str, Any]:
        found = registry.device(site, device)
        if found is None:
            raise NotFoundError(f"no box {site}/{device} has reported to this controller")
        return {
            **found.to_json(),
            "history": [r.to_json() for r in registry.history(site, device)],
        }

    @app.post("/v1/cohorts/preview")
    def cohort_preview(selector: dict[str, Any], _who: Operator) -> dict[str, Any]:
        return preview(registry, _selector(selector))

    @app.get("/v1/rollouts")
    def rollout_list(_who: Operator) -> dict[str, Any]:
        return {"rollouts": rollouts.list()}

    @app.post("/v1/rollouts", status_code=201)
    def rollout_create(body: CreateBody, who: Operator) -> dict[str, Any]:
        plan = RolloutPlan.parse(body.plan, Path(body.base_dir))
        if body.dry_run:
            return {"dry_run": True, **rollouts.preview(plan)}
        return rollouts.create(plan, actor=who)

    @app.get("/v1/rollouts/{rollout_id}")
    def rollout_status(rollout_id: str, _who: Operator, boxes: bool = True) -> dict[str, Any]:
        # Without boxes (what the fleet page polls) the status is made from counts alone.
        return rollouts.status(rollout_id, boxes=boxes)

    @app.get("/v1/rollouts/{rollout_id}/audit")
    def rollout_audit(rollout_id: str, _who: Operator) -> dict[str, Any]:
        rollouts.status(rollout_id)  # 404 for an unknown id
        return {"rollout": rollout_id, "audit": rollouts.audit(rollout_id)}

    @app.post("/v1/rollouts/{rollout_id}/{command}")
    def rollout_command(
        rollout_id: str,
        command: Literal["pause", "resume", "cancel", "halt", "rollback"],
        who: Operator,
        body: CommandBody | None = None,
    ) -> dict[str, Any]:
        why = body.why if body is not None else ""
        return rollouts.command(rollout_id, command, actor=who, why=why)

    return app


def _operator(request: Request, authorization: Annotated[str | None, Header()] = None) -> str:
    """The operator a bearer token belongs to (401 without a known token)."""
    tokens: ApiTokens = request.app.state.tokens
    scheme, _, token = (authorization or "").partition(" ")
    name = tokens.operator(token.strip()) if scheme.lower() == "bearer" else None
    if name is None:
        raise UnauthorizedError(
            "missing or unknown token: send `Authorization: Bearer TOKEN` with a token "
            "from the controller's api_tokens credential"
        )
    return name


Operator = Annotated[str, Depends(_operator)]


def _selector(data: dict[str, Any]) -> Selector:
    return Selector.parse(data)
