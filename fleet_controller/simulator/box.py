"""One simulated box on the broker: its connection, its notices, its installs, its reports.

It publishes what a real agent publishes under `lineside/v1/{site}/{device}/`: the retained
status (online at connect; the last will says offline), telemetry (at connect and after each
final outcome from agent 0.2.0, and every interval), and update reports through a small outbox
(QoS 1, kept until the broker acknowledges them, sent again after a reconnect — like the agent's
durable outbox, though only in memory). Notices are verified with `edge_bundle`, checked by
`rules.BoxUpdates`, and installed by a task that walks the agent's steps in `install_s` and ends
as the box's `Behaviour` says. A box from agent 0.3.0 shadows the active model with a shadow
notice's version after staging (its telemetry then carries `shadow` figures) until `max_s` has
passed or a newer notice arrives; older boxes ignore the shadow extension and activate. A box
from agent 0.4.0 subscribes to its chunk topic and, with `download`, fetches a bundle offered in
chunks over MQTT (`download.MqttFetcher`) when its behaviour's `fetch` says so or the notice has
no URL. Each box counts the messages it publishes and receives, and the releases it was sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
import zlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx

from edge_bundle.chunks import reply_topic
from edge_bundle.errors import BundleError
from edge_bundle.release import ReleaseNotice, decode_notice, peek_notice
from edge_bundle.signing import TrustStore
from fleet_controller.simulator.download import MqttFetcher, MqttPort, RetryError, fetch_http
from fleet_controller.simulator.fetch import FetchSettings
from fleet_controller.simulator.link import AsyncLink, LinkEvents, Will
from fleet_controller.simulator.rules import (
    CHUNK_AGENT_EXTENSIONS,
    SHADOW_STEPS,
    STEPS,
    BoxUpdates,
    Decision,
    Release,
    targets,
)
from fleet_controller.simulator.spec import Behaviour, BoxSpec
from fleet_controller.simulator.telemetry import snapshot

log = logging.getLogger(__name__)
RECONNECT_S = (0.5, 1.0, 2.0, 5.0)
DOWNLOAD_RETRY_S = (1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
PROBATION_LATENCY_FACTOR = 2.0  # the agent's default probation_latency_factor


@dataclass(frozen=True)
class _Failure:
    """Where an outcome fails: the step, the reported phase and outcome, and whether the box
    remembers the version as bad (staging and later: yes; verification: no)."""

    step: str
    phase: str
    outcome: str
    bad: bool
    reason: str


FAILURES: dict[str, _Failure] = {
    "refuse": _Failure(
        "verifying",
        "verifying",
        "refused",
        False,
        "the bundle's signature does not verify against the trusted bundle keys (simulated box)",
    ),
    "fail_staging": _Failure(
        "staging",
        "staging",
        "refused",
        True,
        "the staged model failed its golden self-test (simulated box)",
    ),
    "fail_probation": _Failure(
        "probation",
        "rolled_back",
        "rolled_back",
        True,
        "12 inference failures on live traffic during probation (simulated box)",
    ),
}


def probation_reason(behaviour: Behaviour, version: int, previous: int | None) -> str | None:
    """The agent's reason for a roll-back the behaviour's figures explain, if any."""
    if version in behaviour.selftest_fail:
        return "golden self-test failed during probation: outputs differ (simulated box)"
    if previous is not None:
        new, old = behaviour.p95_for(version), behaviour.p95_for(previous)
        if new > PROBATION_LATENCY_FACTOR * old:
            return (
                f"p95 latency {new:.1f} ms on live traffic is over {PROBATION_LATENCY_FACTOR}x "
                f"the previous version's {old:.1f} ms"
            )
    return None


class SimBox:
    """One box; every method runs on the simulator's event loop."""

    def __init__(
        self,
        spec: BoxSpec,
        broker: tuple[str, int],
        trust: TrustStore,
        http: httpx.AsyncClient,
        *,
        telemetry_interval_s: float,
        clock: Callable[[], float] = time.time,
        fetch: FetchSettings | None = None,
        keepalive_s: int = 30,
    ) -> None:
        self.spec = spec
        self.broker = broker
        self.trust = trust
        self.http = http
        self.telemetry_interval_s = telemetry_interval_s
        self.clock = clock
        self.base = f"lineside/v1/{spec.site}/{spec.device}"
        self.keepalive_s = keepalive_s
        self.updates = BoxUpdates(active=dict(spec.models))
        if spec.understands_chunks:
            self.updates.understood = CHUNK_AGENT_EXTENSIONS
            self.updates.agent_version = spec.agent_version
        self.chunk_topic = reply_topic(spec.site, spec.device)
        port = MqttPort(lambda: self.online, self._publish_request, self._stalled)
        self.mqtt = MqttFetcher(self.chunk_topic, port, fetch or FetchSettings())
        # What this box published / received, and the releases (name, version) it was sent.
        self.sent = 0
        self.received = 0
        self.releases: set[tuple[str, int]] = set()
        self.link: AsyncLink | None = None
        self.want_online = False
        self._loop = asyncio.get_running_loop()
        self._started = self._loop.time()
        self._active_since = {name: self._started for name in spec.models}
        self._outbox: deque[tuple[str, bytes]] = deque()
        self._inflight: dict[int, tuple[str, bytes]] = {}
        self._install: asyncio.Task[None] | None = None
        self._retry: asyncio.TimerHandle | None = None
        self._attempts = 0
        self._ticker: asyncio.Task[None] | None = None
        # name -> (candidate version, its bundle sha256, when shadowing started: loop time)
        self._shadows: dict[str, tuple[int, str, float]] = {}

    @property
    def online(self) -> bool:
        return self.link is not None and self.link.connected

    # ---- the connection ------------------------------------------------------------------
    def go_online(self) -> None:
        self.want_online = True
        if self._ticker is None and self.telemetry_interval_s > 0:
            self._ticker = asyncio.create_task(self._telemetry_loop())
        self._connect()

    def go_offline(self) -> None:
        """Lose the connection ungracefully: the broker publishes the retained offline will."""
        self.want_online = False
        self._cancel_retry()
        link, self.link = self.link, None
        if link is not None:
            link.drop()
        self._requeue()

    async def stop(self) -> None:
        """Say offline and disconnect cleanly; cancel the install and the telemetry."""
        self.want_online = False
        self._cancel_retry()
        for task in (self._install, self._ticker):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        link, self.link = self.link, None
        if link is not None and link.connected:
            mid = self._publish(link, f"{self.base}/status", self._status("offline"), retain=True)
            await self._acknowledged(mid, timeout=2.0)
            link.close()
        elif link is not None:
            link.drop()

    async def _acknowledged(self, mid: int, *, timeout: float) -> None:
        deadline = self._loop.time() + timeout
        self._inflight[mid] = ("", b"")
        while mid in self._inflight and self._loop.time() < deadline:
            await asyncio.sleep(0.01)
        self._inflight.pop(mid, None)

    def _connect(self) -> None:
        if self.link is not None or not self.want_online:
            return
        events = LinkEvents(self._connected, self._message, self._published, self._lost)
        will = Will(f"{self.base}/status", self._status("offline"))
        client_id = f"lineside-sim-{self.spec.site}-{self.spec.device}"
        link = AsyncLink(client_id, will, events, keepalive_s=self.keepalive_s)
        self.link = link
        try:
            link.connect(*self.broker)
        except OSError as exc:
            log.debug("%s cannot reach the broker (%s); retrying", self.spec.ref, exc)
            self.link = None
            self._retry_later()

    def _connected(self) -> None:
        link = self.link
        assert link is not None
        self._attempts = 0
        topics = [f"{self.base}/release"]
        topics += [f"lineside/v1/fleet/{group}/release" for group in self.spec.groups]
        if self.spec.understands_chunks:
            topics.append(self.chunk_topic)
        link.subscribe(topics)
        self._publish(link, f"{self.base}/status", self._status("online"), retain=True)
        self._flush()
        if not self.spec.old_agent:
            self.publish_telemetry()

    def _lost(self) -> None:
        self.link = None
        self.mqtt.on_lost()
        self._requeue()
        self._retry_later()

    def _retry_later(self) -> None:
        if not self.want_online or self._retry is not None:
            return
        delay = RECONNECT_S[min(self._attempts, len(RECONNECT_S) - 1)]
        self._attempts += 1
        self._retry = self._loop.call_later(delay, self._retry_now)

    def _retry_now(self) -> None:
        self._retry = None
        self._connect()

    def _cancel_retry(self) -> None:
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None

    def _status(self, state: str) -> bytes:
        client_id = f"lineside-sim-{self.spec.site}-{self.spec.device}"
        return json.dumps({"status": state, "client_id": client_id, "at": self.clock()}).encode()

    # ---- outgoing ------------------------------------------------------------------------
    def _publish(self, link: AsyncLink, topic: str, payload: bytes, *, retain: bool = False) -> int:
        self.sent += 1
        return link.publish(topic, payload, retain=retain)

    def _publish_request(self, topic: str, payload: bytes) -> None:
        """A chunk request (QoS 1; a lost one is asked for again after its timeout)."""
        link = self.link
        if link is not None and link.connected:
            self._publish(link, topic, payload)

    def _stalled(self, reason: str) -> None:
        release = self.updates.current
        if release is not None:
            self._report("downloading", "progress", release.sequence, reason, release)

    def _send(self, topic: str, body: dict[str, Any]) -> None:
        self._outbox.append((topic, json.dumps(body).encode()))
        self._flush()

    def _flush(self) -> None:
        link = self.link
        while self._outbox and link is not None and link.connected:
            topic, payload = self._outbox.popleft()
            self._inflight[self._publish(link, topic, payload)] = (topic, payload)

    def _published(self, mid: int) -> None:
        self._inflight.pop(mid, None)

    def _requeue(self) -> None:
        """Messages the broker never acknowledged go out again after the next connect."""
        unacknowledged = [item for item in self._inflight.values() if item[0]]
        self._inflight.clear()
        self._outbox.extendleft(reversed(unacknowledged))

    def publish_telemetry(self) -> None:
        link = self.link
        if link is None or not link.connected:
            return  # like a stale snapshot, not worth sending later
        now = self._loop.time()
        since = {name: now - started for name, started in self._active_since.items()}
        shadows = {
            name: (version, sha256, now - started)
            for name, (version, sha256, started) in self._shadows.items()
        }
        figures = snapshot(
            self.spec,
            self.updates.active,
            since,
            now=self.clock(),
            uptime_s=now - self._started,
            shadows=shadows,
        )
        self._publish(link, f"{self.base}/telemetry", json.dumps(figures).encode())

    async def _telemetry_loop(self) -> None:
        # Each box at its own phase of the interval, so a large fleet does not publish at once.
        phase = (zlib.crc32(self.spec.ref.encode()) % 1000) / 1000
        await asyncio.sleep(self.telemetry_interval_s * phase)
        while True:  # one message per interval
            self.publish_telemetry()
            await asyncio.sleep(self.telemetry_interval_s)

    def _report(
        self,
        phase: str,
        outcome: str,
        sequence: int,
        reason: str | None,
        release: Release | None = None,
        **extra: Any,
    ) -> None:
        body: dict[str, Any] = {
            "phase": phase,
            "outcome": outcome,
            "sequence": sequence,
            "reason": reason,
            "name": release.name if release else extra.pop("name", None),
            "version": release.version if release else extra.pop("version", None),
            "device": self.spec.ref,
            "at": self.clock(),
            **extra,
        }
        if release is not None and release.rollout is not None and not self.spec.old_agent:
            body["rollout"] = release.rollout
        body["message_id"] = uuid.uuid4().hex
        self._send(f"{self.base}/update", body)

    # ---- notices -------------------------------------------------------------------------
    def _message(self, topic: str, payload: bytes) -> None:
        self.received += 1
        if topic == self.chunk_topic:
            self.mqtt.on_reply(payload)
            return
        if not payload:
            return  # a cleared retained notice
        try:
            notice, _signer = decode_notice(payload, self.trust)
            if self.spec.old_agent and notice.schema_version > 1:
                raise BundleError(
                    f"notice schema_version {notice.schema_version} is newer than this code "
                    "understands (1); upgrade the agent"
                )
            if isinstance(notice, ReleaseNotice) and notice.url is None:
                self._needs_url()
        except BundleError as exc:
            self._refuse_unverified(topic, payload, exc)
            return
        if not isinstance(notice, ReleaseNotice):
            return  # trust notices are not simulated
        self.releases.add((notice.name, notice.version))
        if not targets(notice, self.spec.site, self.spec.device, self.spec.groups):
            reason = f"for another target ({notice.target})"
            self._report("idle", "ignored", notice.sequence, reason, Release.of(notice))
            return
        self.consider(
            Release.of(
                notice,
                extensions=self.spec.understands_shadow,
                chunks=self.spec.understands_chunks,
            )
        )

    def _needs_url(self) -> None:
        """Agents before 0.3.0 read no extensions: a notice without a URL is invalid to them."""
        if not self.spec.understands_shadow:
            raise BundleError(
                "the release notice is not valid: url is required (agent "
                f"{self.spec.agent_version} cannot fetch over MQTT); upgrade the agent"
            )

    def _refuse_unverified(self, topic: str, payload: bytes, exc: BundleError) -> None:
        claimed = peek_notice(payload)
        if self.spec.old_agent:
            claimed.pop("rollout", None)  # 0.1.0 does not read it
        self._report(
            "idle",
            "refused",
            claimed.get("sequence", 0),
            f"notice on {topic} refused: {exc}",
            name=claimed.get("name"),
            version=claimed.get("version"),
            verified=False,
            claimed=claimed,
        )

    def consider(self, release: Release) -> None:
        """A verified notice for this box: refuse, queue or start installing it."""
        phase_before = self.updates.phase
        busy = phase_before if phase_before in STEPS else "idle"
        decision = self.updates.decide(release, datetime.fromtimestamp(self.clock(), UTC))
        if decision.kind in ("refused", "ignored"):
            self._report(busy, decision.kind, release.sequence, decision.reason, release)
        elif decision.kind == "queued":
            self._report(busy, "progress", release.sequence, decision.reason, release)
        else:
            self._start(decision)

    def _start(self, decision: Decision) -> None:
        old = decision.superseded
        if old is not None:
            if self._install is not None:
                self._install.cancel()
            reason = f"superseded by sequence {decision.release.sequence}"
            if decision.superseded_phase == "shadowing":
                self._shadows.pop(old.name, None)
                ended = f"shadowing ended: {reason}"
                self._report("shadowed", "progress", old.sequence, ended, old)
            else:
                phase = decision.superseded_phase or "idle"
                self._report(phase, "refused", old.sequence, reason, old)
        self._install = asyncio.create_task(self._run_install(decision.release))

    # ---- one install ---------------------------------------------------------------------
    async def _run_shadow(self, release: Release, shadow_s: float) -> None:
        """Download, verify and stage like an install, then shadow instead of activating."""
        step_s = self.spec.behaviour.install_s / len(STEPS)
        for step in SHADOW_STEPS:
            if step != "downloading":
                self.updates.advance(step)
            self._report(step, "progress", release.sequence, None, release)
            if step == "downloading" and self.spec.behaviour.download:
                refusal = await self._download(release)
                if refusal is not None:
                    self._end(release, "downloading", "refused", refusal, bad=False)
                    return
            await asyncio.sleep(step_s)
        self.updates.advance("shadowing")
        self._shadows[release.name] = (release.version, release.sha256, self._loop.time())
        self._report("shadowing", "progress", release.sequence, None, release)
        self.publish_telemetry()
        await asyncio.sleep(shadow_s)
        self._shadows.pop(release.name, None)
        self.updates.finish("shadowed", bad=False)
        ended = f"shadowing ended after {shadow_s:g} s; the version stays installed, not active"
        self._report("shadowed", "progress", release.sequence, ended, release)
        self._install = None

    async def _run_install(self, release: Release) -> None:
        if release.shadow_s is not None:
            await self._run_shadow(release, release.shadow_s)
            return
        behaviour = self.spec.behaviour
        outcome = behaviour.outcome_for(release.version, rollback=release.rollback)
        failure = FAILURES.get(outcome)
        step_s = behaviour.install_s / len(STEPS)
        for step in STEPS:
            if step != "downloading":
                self.updates.advance(step)
                if step == "probation":
                    self._active_since[release.name] = self._loop.time()
            self._report(step, "progress", release.sequence, None, release)
            if step == "downloading" and behaviour.download:
                refusal = await self._download(release)
                if refusal is not None:
                    self._end(release, "downloading", "refused", refusal, bad=False)
                    return
            await asyncio.sleep(step_s)
            if failure is not None and failure.step == step:
                reason = behaviour.reason or failure.reason
                if step == "probation":
                    explained = probation_reason(behaviour, release.version, self.updates.previous)
                    reason = behaviour.reason or explained or failure.reason
                self._end(release, failure.phase, failure.outcome, reason, bad=failure.bad)
                return
        self._end(release, "committed", "committed", None, bad=False)

    def _end(
        self, release: Release, phase: str, outcome: str, reason: str | None, *, bad: bool
    ) -> None:
        pending = self.updates.finish(outcome, bad=bad)
        if outcome == "rolled_back":
            self._active_since[release.name] = self._loop.time()
        self._report(phase, outcome, release.sequence, reason, release)
        if not self.spec.old_agent:
            self.publish_telemetry()
        self._install = None
        if pending is not None:
            self.consider(pending)

    async def _download(self, release: Release) -> str | None:
        """Fetch the bundle and check it like the box: None when good, else the refusal."""
        chunked = release.chunked
        if chunked is not None and (release.url is None or self.spec.behaviour.fetch == "mqtt"):
            return await self.mqtt.fetch(release, chunked)
        attempt = 0
        while True:
            try:
                return await fetch_http(self.http, release)
            except (RetryError, httpx.HTTPError) as exc:
                reason = (
                    str(exc)
                    if isinstance(exc, RetryError)
                    else (f"the download from {release.url} failed: {exc}")
                )
                self._report(
                    "downloading", "progress", release.sequence, f"retrying: {reason}", release
                )
                await asyncio.sleep(DOWNLOAD_RETRY_S[min(attempt, len(DOWNLOAD_RETRY_S) - 1)])
                attempt += 1

    def describe(self) -> dict[str, Any]:
        return {**self.updates.describe(), "online": self.online, "want_online": self.want_online}
