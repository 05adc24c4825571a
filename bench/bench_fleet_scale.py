"""The fleet at scale: N simulated boxes through one Mosquitto and one fleet controller.

    python -m bench.bench_fleet_scale --boxes 1000
    python -m bench.bench_fleet_scale --boxes 200 --soak 1 --no-restart   # a smoke run, < 1 min

It starts its own Mosquitto on a free port (configured for the load: no connection cap, deep
queues, packets big enough for a chunk, $SYS every second), one `fleet-controller serve` (SQLite),
one `fleet-controller chunk-server` (bundles in chunks over MQTT; `--delivery http` serves them
from a local `http.server` process instead), and the simulator over `--processes` processes
(`python -m fleet_controller.simulator --processes P`, agent 0.4.0 boxes that fetch and verify
every chunk, telemetry once per `--telemetry-interval`). Then, each phase optional:

1. **rollout**: defects@2 to every box in waves 1 / 10 / 50 / 100 % with `--soak` s soaks; the
   time from its start to 95 % of boxes committed and to `completed`, broker messages per box
   ($SYS/broker/messages/received and /sent before and after, summed across a restart), the
   controller's CPU seconds per box and peak memory (/proc), p50/p95 of the fleet page's queries
   (`GET /v1/overview?limit=50`, `GET /v1/rollouts`, `GET /v1/rollouts/ID?boxes=false`: what
   fleet.js polls) sampled through the rollout, and the controller's ingest lag p95 (/metrics);
   with **restart** the broker is stopped and started again once the third wave begins, and the
   rollout must still complete;
2. **bad release**: defects@3, which every box rolls back in probation, in waves 1 / 100 %:
   the rollout must halt after the canary, and no box outside the canary may have been sent it
   (counted at the boxes: each simulated box records every release notice it receives).

The machine, the versions and every figure go to bench/results/fleet_scale_N.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx

from bench.common import format_table, library_versions, percentile, write_json
from fleet_controller.simulator.processes import raise_fd_limit
from tests.agent_support import free_port
from tests.fleet_support import (
    fleet_keys,
    signed_bundles,
    spawn_controller,
    write_config,
)
from tests.mqtt_support import Broker

REPO = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
BROKER_EXTRA = (
    "max_connections -1\n"
    "max_inflight_messages 100\n"
    "max_packet_size 2097152\n"  # a chunk (up to 1 MiB here) plus its header line
    "sys_interval 1\n"
    "autosave_interval 60\n"
)
SAMPLE_EVERY_S = 2.0
TICK_S = 1.0  # the controller's default [controller] tick_s (the tests tick every 0.2 s)
QUERIES = ("/v1/overview?limit=50", "/v1/rollouts", "/v1/rollouts/{id}?boxes=false")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    soft, hard = raise_fd_limit()
    if soft < args.boxes + 200:
        print(f"error: {args.boxes} boxes need ~{args.boxes + 200} open files; the limit is {soft}")
        return 2
    with tempfile.TemporaryDirectory(prefix="fleet-scale-") as tmp, Fleet(Path(tmp), args) as fleet:
        results = fleet.run()
    results["fd_limit"] = [soft, hard]
    path = write_json(f"fleet_scale_{args.boxes}", results)
    _print(results)
    print(f"wrote {path}")
    return 0 if results.get("ok") else 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--boxes", type=int, default=1000)
    parser.add_argument(
        "--processes", type=int, help="simulator processes (default: N/2500, at least 2)"
    )
    parser.add_argument("--telemetry-interval", type=float, default=60.0, help="s per box")
    parser.add_argument("--connect-per-s", type=float, default=400.0, help="per simulator process")
    parser.add_argument("--soak", type=float, default=3.0, help="soak after each wave, s")
    parser.add_argument("--install-s", type=float, default=2.0, help="a box's install, s")
    parser.add_argument("--delivery", choices=("mqtt", "http"), default="mqtt")
    parser.add_argument("--chunk-size", type=int, default=16 * 1024)
    parser.add_argument("--window", type=int, default=2, help="chunk requests in flight per box")
    parser.add_argument("--note", action="append", default=[], help="a line for the JSON's notes")
    parser.add_argument("--no-rollout", action="store_true", help="only connect the fleet")
    parser.add_argument("--no-restart", action="store_true", help="no broker restart mid-rollout")
    parser.add_argument("--no-bad", action="store_true", help="skip the bad release")
    parser.add_argument("--timeout", type=float, default=900.0, help="per rollout, s")
    return parser


class Fleet:
    """Every process of one run, started in order and stopped in reverse."""

    def __init__(self, directory: Path, args: argparse.Namespace) -> None:
        self.dir = directory
        self.args = args
        self.processes = args.processes or max(2, -(-args.boxes // 2500))
        self.stack = contextlib.ExitStack()
        self.notes: list[str] = list(args.note)
        if args.delivery == "http":
            self.notes.append(
                "bundles delivered over HTTP from a local http.server process, not in chunks "
                "over MQTT (--delivery http)"
            )

    def __enter__(self) -> Fleet:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stack.close()

    # ---- start-up ------------------------------------------------------------------------------
    def start(self) -> None:
        args = self.args
        self.broker = Broker(self.dir / "broker", extra_config=BROKER_EXTRA).start()
        self.stack.callback(self.broker.stop)
        self.keys = fleet_keys(_mkdir(self.dir / "keys"))
        self.bundles = signed_bundles(self.dir / "files", self.keys, 2, 3)
        store = self.dir / "chunks"
        self.config = write_config(
            self.dir / "controller",
            self.keys,
            self.broker.port,
            tick_s=TICK_S,
            mqtt="max_inflight = 100",  # the broker's max_inflight_messages (BROKER_EXTRA)
        )
        with self.config.path.open("a") as config:
            config.write(f'\n[chunks]\nstore = "{store}"\nworkers = 4\n')
        self.controller = spawn_controller(self.config)
        self.stack.callback(self.controller.stop)
        self.controller.wait_up(120)
        self.api = self.stack.enter_context(self.controller.client())
        if args.delivery == "mqtt":
            self._start_chunk_server()
        else:
            self._start_file_server()
        self._start_simulator()

    def _start_chunk_server(self) -> None:
        log = self.dir / "chunk-server.log"
        command = [
            sys.executable,
            "-m",
            "fleet_controller.cli",
            "chunk-server",
            "--config",
            str(self.config.path),
        ]
        process = _spawn(command, log)
        self.stack.callback(_stop, process)
        _wait(
            lambda: "subscribed" in log.read_text(errors="replace"),
            60,
            "the chunk server subscribed",
        )
        self.file_url: str | None = None

    def _start_file_server(self) -> None:
        port = free_port()
        command = [
            sys.executable,
            "-m",
            "http.server",
            "--bind",
            "127.0.0.1",
            "--directory",
            str(self.dir / "files"),
            str(port),
        ]
        process = _spawn(command, self.dir / "files.log")
        self.stack.callback(_stop, process)
        self.file_url = f"http://127.0.0.1:{port}"
        _wait(lambda: _reachable(self.file_url or ""), 30, "the file server")

    def _start_simulator(self) -> None:
        args = self.args
        sim = self.dir / "sim.toml"
        sites = max(1, args.boxes // 100)
        sim.write_text(
            f'release_keys = ["{self.keys.release_public}"]\n'
            f"telemetry_interval_s = {args.telemetry_interval}\nkeepalive_s = 120\n"
            f"connect_per_s = {args.connect_per_s}\n"
            f"fetch = {{ window = {args.window}, timeout_s = 15 }}\n"
            f'[broker]\nhost = "127.0.0.1"\nport = {self.broker.port}\n'
            f'[generate]\ncount = {args.boxes}\nsite = "plant-{{site}}"\nsites = {sites}\n'
            'device = "box-{n:05d}"\nagent_version = "0.4.0"\nmodels = { defects = 1 }\n'
            f"behaviour = {{ download = true, install_s = {args.install_s}, "
            'outcome_by_version = { "3" = "fail_probation" } }\n'
        )
        self.stats_dir = self.dir / "stats"
        command = [
            sys.executable, "-m", "fleet_controller.simulator", "--config", str(sim),
            "--processes", str(self.processes), "--stats", str(self.stats_dir / "sim.json"),
        ]  # fmt: skip
        process = _spawn(command, self.dir / "simulator.log", session=True)
        self.stack.callback(_stop, process)
        self.simulator = process

    # ---- the run -------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        args = self.args
        started = time.monotonic()
        self.start()
        results: dict[str, Any] = {
            "boxes": args.boxes,
            "simulator_processes": self.processes,
            "delivery": args.delivery,
            "pinned": {
                "telemetry_interval_s": args.telemetry_interval,
                "connect_per_s_per_process": args.connect_per_s,
                "install_s": args.install_s,
                "soak_s": args.soak,
                "chunk_size": args.chunk_size,
                "window": args.window,
                "bundle_bytes": self.bundles[2].path.stat().st_size,
                "database": "sqlite",
                "controller_tick_s": TICK_S,
            },
            "versions": library_versions(["paho-mqtt", "fastapi", "uvicorn", "sqlalchemy"]),
            "mosquitto": _mosquitto_version(),
        }
        _wait(lambda: self._sim_total("online") >= args.boxes, 300, f"{args.boxes} boxes online")
        connected_s = time.monotonic() - started
        _wait(lambda: self._registry_total() >= args.boxes, 300, "every box in the registry")
        results["connect"] = self._connect_figures(connected_s)
        ok = True
        if not args.no_rollout:
            results["rollout"] = self.good_rollout()
            ok = ok and results["rollout"]["status"] == "completed"
            if not args.no_bad:
                results["bad_release"] = self.bad_rollout()
                ok = ok and results["bad_release"]["ok"]
        results["controller"] = _proc_figures(self.controller.process.pid)
        results["ok"] = ok
        results["notes"] = self.notes
        return results

    def _connect_figures(self, connected_s: float) -> dict[str, Any]:
        figures = self._sim_figures()
        per_box = [
            (f["rss_connected_kib"] - f["rss_before_kib"]) / max(1, f["boxes"])
            for f in figures
            if f.get("rss_connected_kib")
        ]
        time.sleep(
            max(5.0, min(30.0, self.args.telemetry_interval))
        )  # steady state: telemetry only
        before = self._sim_figures()
        controller_before = _cpu_s(self.controller.process.pid)
        time.sleep(10.0)
        after = self._sim_figures()
        self.controller_idle_cores = (_cpu_s(self.controller.process.pid) - controller_before) / 10
        cpu = sum(a["cpu_s"] - b["cpu_s"] for a, b in zip(after, before, strict=True)) / 10.0
        return {
            "all_online_after_s": round(connected_s, 1),
            "per_process_boxes": [f["boxes"] for f in figures],
            "rss_per_connection_kib": round(statistics.mean(per_box), 1) if per_box else None,
            "simulator_rss_mib": [round(f["rss_kib"] / 1024, 1) for f in figures],
            "simulator_idle_cpu_cores": round(cpu, 3),
            "simulator_idle_cpu_us_per_box_s": round(cpu / self.args.boxes * 1e6, 2),
            # The controller with telemetry and status only (no rollout): its ingest's share.
            "controller_idle_cpu_cores": round(self.controller_idle_cores, 3),
        }

    def good_rollout(self) -> dict[str, Any]:
        args = self.args
        plan = self._plan("fleet-scale", self.bundles[2], [1, 10, 50, 100], gates=False)
        cpu_before = _cpu_s(self.controller.process.pid)
        broker_cpu, broker_before = 0.0, self._broker_cpu_s()
        sys_before = _sys_counts(self.broker.port)
        sampler = QuerySampler(self.api)
        restart: dict[str, Any] = {}
        sys_after_restart = (0, 0)  # the broker's counters start again at 0
        sys_segments: list[tuple[int, int]] = []
        with sampler.running():
            created = time.monotonic()
            rollout_id = self._create(plan)
            sampler.rollout_id = rollout_id
            at_95: float | None = None
            status: dict[str, Any] = {}
            deadline = created + args.timeout
            while time.monotonic() < deadline:
                status = self.api.get(f"/v1/rollouts/{rollout_id}?boxes=false").json()
                now = time.monotonic() - created
                if at_95 is None and status["counts"]["committed"] >= 0.95 * args.boxes:
                    at_95 = now
                if not args.no_restart and not restart and status["wave"] >= 3:
                    sys_segments.append(_sys_counts(self.broker.port))
                    broker_cpu += self._broker_cpu_s() - broker_before
                    restart = self._restart_broker(now)
                    broker_before = self._broker_cpu_s()
                if status["status"] in ("completed", "halted", "cancelled"):
                    break
                time.sleep(0.5)
            finished = time.monotonic() - created
        sys_end = _sys_counts(self.broker.port)
        messages = _delta(sys_before, sys_end)
        if restart:
            first, second = _delta(sys_before, sys_segments[0]), _delta(sys_after_restart, sys_end)
            messages = (first[0] + second[0], first[1] + second[1])
        cpu = _cpu_s(self.controller.process.pid) - cpu_before
        broker_cpu += self._broker_cpu_s() - broker_before
        return {
            "id": rollout_id,
            "status": status.get("status"),
            "waves_percent": [1, 10, 50, 100],
            "wave_sizes": [w["total"] for w in status.get("per_wave", [])],
            "counts": status.get("counts"),
            "to_95_percent_committed_s": None if at_95 is None else round(at_95, 1),
            "to_completed_s": round(finished, 1),
            "broker_messages_per_box": {
                "received": round(messages[0] / args.boxes, 1),
                "sent": round(messages[1] / args.boxes, 1),
            },
            "controller_cpu_s": round(cpu, 2),
            "controller_cpu_ms_per_box": round(cpu / args.boxes * 1000, 2),
            # Less what telemetry alone costs over as long (measured before the rollout): the
            # rollout's own steps, reports and page queries, per box.
            "controller_rollout_cpu_ms_per_box": round(
                max(0.0, cpu - self.controller_idle_cores * finished) / args.boxes * 1000, 2
            ),
            # Mosquitto is single-threaded: its mean share of one core over the rollout.
            "broker_cpu_s": round(broker_cpu, 2),
            "broker_core_share": round(broker_cpu / finished, 3),
            "page_queries_ms": sampler.summary(),
            "ingest_lag_p95_s": sampler.lag_summary(),
            "broker_restart": restart or None,
            "simulator": self._sim_rollup(),
        }

    def _broker_cpu_s(self) -> float:
        assert self.broker.process is not None
        return _cpu_s(self.broker.process.pid)

    def _restart_broker(self, at_s: float) -> dict[str, Any]:
        self.broker.stop()
        stopped = time.monotonic()
        time.sleep(2.0)
        self.broker.start()
        back = time.monotonic()
        _wait(lambda: self._sim_total("online") >= self.args.boxes, 300, "every box back online")
        return {
            "at_s": round(at_s, 1),
            "down_s": round(back - stopped, 1),
            "all_online_again_after_s": round(time.monotonic() - back, 1),
        }

    def bad_rollout(self) -> dict[str, Any]:
        plan = self._plan("fleet-bad", self.bundles[3], [1, 100], gates=True)
        before = self._sim_rollup()["boxes_sent_release"].get("defects@3", 0)
        created = time.monotonic()
        rollout_id = self._create(plan)
        status = _wait(
            lambda: self._ended(rollout_id), self.args.timeout, "the bad release to halt"
        )
        time.sleep(max(2.0, self.args.soak))  # anything sent late would arrive by now
        canary = status["per_wave"][0]["total"]
        received = self._sim_rollup()["boxes_sent_release"].get("defects@3", 0) - before
        beyond = received - canary
        return {
            "id": rollout_id,
            "status": status["status"],
            "halt_reason": status.get("halt_reason"),
            "halted_after_s": round(time.monotonic() - created, 1),
            "canary_boxes": canary,
            "boxes_sent_it": received,
            "boxes_beyond_canary_sent_it": beyond,
            "ok": status["status"] in ("halted", "rolled_back") and beyond == 0,
        }

    # ---- helpers -------------------------------------------------------------------------------
    def _ended(self, rollout_id: str) -> dict[str, Any] | None:
        status: dict[str, Any] = self.api.get(f"/v1/rollouts/{rollout_id}?boxes=false").json()
        ended = status["status"] in ("halted", "completed", "rolled_back", "cancelled")
        return status if ended else None

    def _plan(self, name: str, bundle: Any, percent: list[int], *, gates: bool) -> dict[str, Any]:
        plan: dict[str, Any] = {
            "name": name,
            "bundle": str(bundle.path),
            "cohort": {"site": [f"plant-{n}" for n in range(max(1, self.args.boxes // 100))]},
            "waves": {"percent": percent, "soak_s": self.args.soak, "deadline_s": 600},
        }
        if self.args.delivery == "mqtt":
            plan |= {"delivery": "mqtt", "chunk_size": self.args.chunk_size}
        else:
            plan["url"] = f"{self.file_url}/{bundle.path.name}"
        if gates:
            plan["gates"] = {"max_failure_ratio": 0.2, "min_installs": 1}
            plan["on_halt"] = {"rollback": False}
        return plan

    def _create(self, plan: dict[str, Any]) -> str:
        response = self.api.post("/v1/rollouts", json={"plan": plan, "base_dir": str(self.dir)})
        if response.status_code != 201:
            raise RuntimeError(
                f"the controller refused the plan: {response.status_code} {response.text}"
            )
        return str(response.json()["id"])

    def _registry_total(self) -> int:
        with contextlib.suppress(httpx.HTTPError, KeyError, ValueError):
            return int(self.api.get("/v1/overview?limit=1").json()["total"])
        return 0

    def _sim_figures(self) -> list[dict[str, Any]]:
        figures = []
        for path in sorted(self.stats_dir.glob("sim-*.json")):
            with contextlib.suppress(OSError, ValueError):
                figures.append(json.loads(path.read_text()))
        if self.simulator.poll() is not None:
            raise RuntimeError(
                f"the simulator exited: {(self.dir / 'simulator.log').read_text()[-3000:]}"
            )
        return figures

    def _sim_total(self, key: str) -> int:
        figures = self._sim_figures()
        return sum(int(f[key]) for f in figures) if len(figures) == self.processes else 0

    def _sim_rollup(self) -> dict[str, Any]:
        time.sleep(2.5)  # one more round of the stats files
        figures = self._sim_figures()
        merged: dict[str, Any] = {
            "sent": 0,
            "received": 0,
            "chunks": {},
            "boxes_sent_release": {},
            "active": {},
        }
        for f in figures:
            merged["sent"] += f["sent"]
            merged["received"] += f["received"]
            for key in ("chunks", "boxes_sent_release", "active"):
                for name, value in f[key].items():
                    merged[key][name] = merged[key].get(name, 0) + value
        return merged


class QuerySampler:
    """The fleet page's queries, one round every `SAMPLE_EVERY_S`, plus /metrics every 5 s, in a
    thread: the page itself refreshes every 5 s, so this is two or three operators with it open
    (an earlier version polled every 0.5 s, ten operators' worth, and at 10,000 boxes its own
    overview requests took a large share of the controller's one core)."""

    def __init__(self, api: httpx.Client) -> None:
        self.api = httpx.Client(base_url=str(api.base_url), headers=dict(api.headers), timeout=30)
        self.rollout_id: str | None = None
        self.samples: dict[str, list[float]] = {q: [] for q in QUERIES}
        self.lags: list[float] = []
        self._stop = threading.Event()

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        thread = threading.Thread(target=self._loop, daemon=True)
        thread.start()
        try:
            yield
        finally:
            self._stop.set()
            thread.join(30)
            self.api.close()

    def _loop(self) -> None:
        last_metrics = 0.0
        while not self._stop.wait(SAMPLE_EVERY_S):
            for query in QUERIES:
                if "{id}" in query and self.rollout_id is None:
                    continue
                path = query.replace("{id}", self.rollout_id or "")
                with contextlib.suppress(httpx.HTTPError):
                    began = time.perf_counter()
                    if self.api.get(path).status_code == 200:
                        self.samples[query].append(time.perf_counter() - began)
            if time.monotonic() - last_metrics >= 5.0:
                last_metrics = time.monotonic()
                with contextlib.suppress(httpx.HTTPError, ValueError):
                    lag = _metric(self.api.get("/metrics").text, "fleet_ingest_lag_p95_seconds")
                    if lag is not None:
                        self.lags.append(lag)

    def summary(self) -> dict[str, Any]:
        return {
            query: {
                "samples": len(values),
                "p50": round(percentile(values, 50) * 1000, 1),
                "p95": round(percentile(values, 95) * 1000, 1),
            }
            for query, values in self.samples.items()
            if values
        }

    def lag_summary(self) -> dict[str, Any] | None:
        if not self.lags:
            return None  # the controller exposes no fleet_ingest_lag_p95_seconds
        return {
            "scrapes": len(self.lags),
            "max": round(max(self.lags), 3),
            "last": round(self.lags[-1], 3),
        }


# ---- small helpers ---------------------------------------------------------------------------
def _metric(text: str, name: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return None


def _sys_counts(port: int) -> tuple[int, int]:
    """$SYS/broker/messages/received and /sent now (a fresh mosquitto_sub each time)."""
    command = [
        shutil.which("mosquitto_sub") or "mosquitto_sub", "-p", str(port), "-v", "-C", "2",
        "-W", "10", "-t", "$SYS/broker/messages/received", "-t", "$SYS/broker/messages/sent",
    ]  # fmt: skip
    found = {}
    with contextlib.suppress(subprocess.SubprocessError):
        out = subprocess.run(command, capture_output=True, text=True, timeout=15).stdout
        for line in out.splitlines():
            topic, _, value = line.partition(" ")
            found[topic.rsplit("/", 1)[1]] = int(value)
    return found.get("received", 0), found.get("sent", 0)


def _delta(before: tuple[int, int], after: tuple[int, int]) -> tuple[int, int]:
    return after[0] - before[0], after[1] - before[1]


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def _proc_figures(pid: int) -> dict[str, Any]:
    status = Path(f"/proc/{pid}/status").read_text()
    values = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return {
        "cpu_s_total": round(_cpu_s(pid), 1),
        "peak_rss_mib": round(int(values["VmHWM"].split()[0]) / 1024, 1),
        "rss_mib": round(int(values["VmRSS"].split()[0]) / 1024, 1),
    }


def _mosquitto_version() -> str | None:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["mosquitto", "-h"], capture_output=True, text=True, timeout=5).stdout
        return out.splitlines()[0] if out else None
    return None


def _spawn(command: list[str], log: Path, *, session: bool = False) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with log.open("ab") as out:
        return subprocess.Popen(
            command,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            env=env,
            start_new_session=session,
        )


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def _wait(check: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.5)
    raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")


def _reachable(url: str) -> bool:
    with contextlib.suppress(httpx.HTTPError):
        return httpx.get(url, timeout=2).status_code < 500
    return False


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _print(results: dict[str, Any]) -> None:
    rows: list[tuple[str, object]] = [
        ("boxes", results["boxes"]),
        ("delivery", results["delivery"]),
    ]
    rows += [(f"connect {k}", v) for k, v in results["connect"].items()]
    rollout = results.get("rollout") or {}
    for key in ("status", "wave_sizes", "to_95_percent_committed_s", "to_completed_s",
                "broker_messages_per_box", "controller_cpu_s", "controller_cpu_ms_per_box",
                "broker_cpu_s", "broker_core_share",
                "ingest_lag_p95_s", "broker_restart"):  # fmt: skip
        if key in rollout:
            rows.append((f"rollout {key}", rollout[key]))
    for query, figures in (rollout.get("page_queries_ms") or {}).items():
        rows.append((f"query {query} p50/p95 ms", f"{figures['p50']} / {figures['p95']}"))
    for key, value in (results.get("bad_release") or {}).items():
        rows.append((f"bad {key}", value))
    rows += [(f"controller {k}", v) for k, v in results["controller"].items()]
    print(format_table(["figure", "value"], rows))


if __name__ == "__main__":
    sys.exit(main())
