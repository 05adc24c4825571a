"""`fleet-controller`: run the controller, and talk to a running one.

    fleet-controller serve --config /etc/lineside/fleet.toml
    fleet-controller devices [--site S] [--line L] [--group G] [--json]
    fleet-controller cohort preview cohort.toml | --select site=plant-a --select line=line1
    fleet-controller rollout create plan.toml [--dry-run]
    fleet-controller rollout status [ID]
    fleet-controller rollout pause|resume|cancel|halt|rollback ID [--why TEXT]
    fleet-controller rollout audit ID
    fleet-controller simulate --config sim.toml
    fleet-controller chunk-server --config /etc/lineside/fleet.toml
    fleet-controller chunks add BUNDLE [--chunk-size N] [--config fleet.toml | --store DIR]

Every command but `serve`, `simulate`, `chunk-server` and `chunks` is a client of the HTTP API: `--api` (or
`FLEET_CONTROLLER_API`, default http://127.0.0.1:8700) and a token from `--token-file` (or
`FLEET_CONTROLLER_TOKEN_FILE`, a file holding the bare token). Exit status: 0 done, 1 the
controller refused (the message says why), 2 bad usage or unreachable controller.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tomllib
from pathlib import Path
from typing import Any

import httpx

from fleet_controller.errors import FleetError

DEFAULT_API = "http://127.0.0.1:8700"
COMMANDS = ("pause", "resume", "cancel", "halt", "rollback")


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    # The service logs what it does; a client command prints its answer and nothing else.
    service = args.run in (_serve, _simulate, _chunk_server)
    logging.basicConfig(
        level=logging.INFO if service else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.run(args))
    except FleetError as exc:
        print(f"fleet-controller: {exc.message}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fleet-controller", description="Lineside fleet controller (central IT)"
    )
    sub = parser.add_subparsers(required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the controller (MQTT, rollouts, HTTP API)")
    serve.add_argument("--config", type=Path, required=True, help="the TOML config")
    serve.add_argument("--check", action="store_true", help="validate the config and exit")
    serve.set_defaults(run=_serve)

    simulate = sub.add_parser("simulate", help="run simulated boxes against a broker")
    simulate.add_argument("--config", type=Path, required=True, help="the simulator's TOML")
    simulate.set_defaults(run=_simulate)

    chunk_server = sub.add_parser(
        "chunk-server", help="serve bundles in chunks over MQTT from the chunk store"
    )
    chunk_server.add_argument("--config", type=Path, required=True, help="the TOML config")
    chunk_server.set_defaults(run=_chunk_server)

    chunks = sub.add_parser("chunks", help="the chunk store of bundles delivered over MQTT")
    chunks_sub = chunks.add_subparsers(required=True, metavar="ACTION")
    chunks_add = chunks_sub.add_parser(
        "add", help="copy a bundle into the chunk store; print its mqtt_chunks extension"
    )
    chunks_add.add_argument("bundle", type=Path)
    chunks_add.add_argument(
        "--chunk-size", type=int, default=None, help="bytes per chunk (default 262144)"
    )
    where = chunks_add.add_mutually_exclusive_group(required=True)
    where.add_argument("--config", type=Path, help="the TOML config naming [chunks] store")
    where.add_argument("--store", type=Path, help="the chunk store directory")
    chunks_add.set_defaults(run=_chunks_add)

    devices = sub.add_parser("devices", help="list the boxes the controller knows")
    _client_options(devices)
    for name in ("site", "line", "group", "profile", "model"):
        devices.add_argument(f"--{name}", help=f"only boxes with this {name}")
    devices.set_defaults(run=_devices)

    cohort = sub.add_parser("cohort", help="cohort selectors")
    cohort_sub = cohort.add_subparsers(required=True, metavar="ACTION")
    preview = cohort_sub.add_parser("preview", help="the boxes a selector picks now")
    _client_options(preview)
    preview.add_argument("file", nargs="?", type=Path, help="a TOML selector (or [cohort] table)")
    preview.add_argument(
        "--select", action="append", default=[], metavar="FIELD=VALUE",
        help="a criterion, e.g. site=plant-a or devices=plant-a/box1,plant-a/box2 (repeatable)",
    )  # fmt: skip
    preview.set_defaults(run=_cohort_preview)

    rollout = sub.add_parser("rollout", help="create, watch and steer rollouts")
    rollout_sub = rollout.add_subparsers(required=True, metavar="ACTION")
    create = rollout_sub.add_parser("create", help="start a rollout from a TOML plan")
    _client_options(create)
    create.add_argument("plan", type=Path)
    create.add_argument("--dry-run", action="store_true", help="show cohort and waves only")
    create.set_defaults(run=_rollout_create)
    status = rollout_sub.add_parser("status", help="one rollout, or all of them")
    _client_options(status)
    status.add_argument("id", nargs="?")
    status.set_defaults(run=_rollout_status)
    audit = rollout_sub.add_parser("audit", help="a rollout's audit trail")
    _client_options(audit)
    audit.add_argument("id")
    audit.set_defaults(run=_rollout_audit)
    for command in COMMANDS:
        action = rollout_sub.add_parser(command, help=f"{command} a rollout")
        _client_options(action)
        action.add_argument("id")
        action.add_argument("--why", default="", help="recorded in the audit trail")
        action.set_defaults(run=_rollout_command, command=command)
    return parser


def _client_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--api", default=os.environ.get("FLEET_CONTROLLER_API", DEFAULT_API))
    parser.add_argument(
        "--token-file",
        type=Path,
        default=os.environ.get("FLEET_CONTROLLER_TOKEN_FILE"),
        help="file holding the API token",
    )
    parser.add_argument("--json", action="store_true", help="print the JSON answer")


# ---- serve / simulate ------------------------------------------------------------------------
def _serve(args: argparse.Namespace) -> int:
    from fleet_controller.config import Config, as_dict

    config = Config.load(args.config)
    if args.check:
        config.release_key()
        config.bundle_trust()
        config.api_tokens()
        print(json.dumps(as_dict(config), indent=2))
        return 0
    from fleet_controller.service import serve

    serve(config)
    return 0


def _simulate(args: argparse.Namespace) -> int:
    from fleet_controller.simulator.cli import main as simulate

    return int(simulate(["--config", str(args.config)]))


# ---- chunks --------------------------------------------------------------------------------
def _chunk_server(args: argparse.Namespace) -> int:
    from fleet_controller.chunks.run import run_chunk_server
    from fleet_controller.config import Config

    return run_chunk_server(Config.load(args.config))


def _chunks_add(args: argparse.Namespace) -> int:
    from edge_bundle.chunks import DEFAULT_CHUNK_SIZE, MQTT_CHUNKS_EXTENSION
    from fleet_controller.chunks.store import ChunkStore
    from fleet_controller.config import Config

    directory = args.store if args.store is not None else Config.load(args.config).chunks.store
    chunk_size = args.chunk_size if args.chunk_size is not None else DEFAULT_CHUNK_SIZE
    bundle, delivery = ChunkStore(directory).publish(args.bundle, chunk_size)
    print(
        json.dumps(
            {
                "bundle_sha256": bundle.sha256,
                "bundle_size": bundle.size,
                "extensions": {
                    "critical": [MQTT_CHUNKS_EXTENSION],
                    MQTT_CHUNKS_EXTENSION: delivery.to_json(),
                },
            },
            indent=2,
        )
    )
    return 0


# ---- API clients -----------------------------------------------------------------------------
def _call(
    args: argparse.Namespace,
    method: str,
    path: str,
    body: Any = None,
    params: dict[str, str] | None = None,
) -> Any:
    if args.token_file is None:
        raise FleetError("no API token: pass --token-file FILE or set FLEET_CONTROLLER_TOKEN_FILE")
    try:
        token = Path(args.token_file).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise FleetError(f"cannot read the token file {args.token_file}: {exc.strerror}") from exc
    try:
        response = httpx.request(
            method,
            args.api.rstrip("/") + path,
            json=body,
            params=params,
            headers={"Authorization": f"Bearer {token}"},
            timeout=60,
        )
    except httpx.HTTPError as exc:
        raise FleetError(f"cannot reach the controller at {args.api}: {exc}") from exc
    try:
        answer = response.json()
    except ValueError:
        answer = {"detail": response.text[:500]}
    if response.status_code >= 400:
        print(f"fleet-controller: {answer.get('detail', answer)}", file=sys.stderr)
        raise SystemExit(1)
    return answer


def _devices(args: argparse.Namespace) -> int:
    query = {n: getattr(args, n) for n in ("site", "line", "group", "profile", "model")}
    params = {name: value for name, value in query.items() if value}
    answer = _call(args, "GET", "/v1/devices", params=params)
    if args.json:
        _print_json(answer)
        return 0
    print(f"{'BOX':32} {'ONLINE':6} {'AGENT':8} {'PROFILE':24} MODELS")
    for box in answer["devices"]:
        models = ", ".join(f"{n}@{m.get('version')}" for n, m in sorted(box["models"].items()))
        print(
            f"{box['ref']:32} {'yes' if box['online'] else 'no':6} "
            f"{box.get('agent_version') or '?':8} {box.get('profile') or '?':24} {models}"
        )
    print(f"{answer['count']} boxes")
    return 0


def _cohort_preview(args: argparse.Namespace) -> int:
    selector: dict[str, Any] = {}
    if args.file is not None:
        data = _read_toml(args.file)
        selector = data.get("cohort", data)
    for item in args.select:
        field, sep, value = item.partition("=")
        if not sep:
            raise FleetError(f"--select {item!r}: write FIELD=VALUE, e.g. site=plant-a")
        values = [v for v in value.split(",") if v]
        selector[field] = values if len(values) > 1 or field in ("devices", "exclude") else value
    if not selector:
        raise FleetError("give a selector: a TOML file or --select FIELD=VALUE")
    _print_json(_call(args, "POST", "/v1/cohorts/preview", selector))
    return 0


def _rollout_create(args: argparse.Namespace) -> int:
    plan = _read_toml(args.plan)
    body = {"plan": plan, "base_dir": str(args.plan.resolve().parent), "dry_run": args.dry_run}
    _print_json(_call(args, "POST", "/v1/rollouts", body))
    return 0


def _rollout_status(args: argparse.Namespace) -> int:
    path = f"/v1/rollouts/{args.id}" if args.id else "/v1/rollouts"
    _print_json(_call(args, "GET", path))
    return 0


def _rollout_audit(args: argparse.Namespace) -> int:
    _print_json(_call(args, "GET", f"/v1/rollouts/{args.id}/audit"))
    return 0


def _rollout_command(args: argparse.Namespace) -> int:
    _print_json(_call(args, "POST", f"/v1/rollouts/{args.id}/{args.command}", {"why": args.why}))
    return 0


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise FleetError(f"cannot read {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise FleetError(f"{path} is not valid TOML: {exc}") from exc


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, sort_keys=True))


if __name__ == "__main__":
    raise SystemExit(main())
