"""The MQTT link on the event loop, against a real Mosquitto: callbacks on the loop, answers
woken from any thread, large payloads both ways, and connections that fail or never answer."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

import edge_agent.mqtt.link as link_module
from edge_agent.mqtt.link import Inbound, MqttLink
from edge_agent.mqtt.outbox import Draft, Outbox
from edge_agent.mqtt.topics import Topic, TopicFilter
from edge_agent.settings import AgentSettings
from tests.agent_support import free_port
from tests.mqtt_support import Broker, TestClient, running_broker
from tests.unit.agent_fixtures import agent_settings
from tests.unit.device_fakes import HeldCheckpoint

REQUESTS = "plant/line1/requests"
ANSWERS = "plant/line1/answers"
STATUS = "plant/line1/status"


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    with running_broker(tmp_path / "broker") as broker:
        yield broker


def settings_for(tmp_path: Path, port: int) -> AgentSettings:
    return agent_settings(
        tmp_path / "state",
        mqtt_enabled=True,
        mqtt_port=port,
        mqtt_reconnect_min_s=0.05,
        mqtt_reconnect_max_s=0.2,
    )


def make_link(
    settings: AgentSettings, received: list[tuple[Inbound, int]]
) -> tuple[MqttLink, Outbox]:
    outbox = Outbox(
        settings.outbox_path,
        max_bytes=settings.outbox_max_bytes,
        max_messages=settings.outbox_max_messages,
    )
    link = MqttLink(
        settings,
        outbox,
        [TopicFilter(REQUESTS)],
        Topic(STATUS),
        lambda message: received.append((message, threading.get_ident())),
    )
    return link, outbox


async def subscribed(peer: TestClient, received: list[tuple[Inbound, int]]) -> None:
    """Once the link's subscription is in place: probes until one arrives, then until the last
    one sent has (a topic keeps its order); the probes are then taken out of `received`."""
    sent = 0
    async with asyncio.timeout(10):
        while not received:
            sent += 1
            await asyncio.to_thread(peer.publish, REQUESTS, f"probe-{sent}".encode())
            await asyncio.sleep(0.05)
        last = f"probe-{sent}".encode()
        while last not in [m.payload for m, _ in received]:
            await asyncio.sleep(0.01)
    received.clear()


async def until(condition: object, what: str, timeout: float = 10.0) -> None:
    assert callable(condition)
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)
    assert condition(), what


def test_messages_arrive_on_the_loop_and_answers_woken_from_a_thread_go_out(
    tmp_path: Path, broker: Broker
) -> None:
    peer = TestClient(broker.port, "peer")
    peer.subscribe(ANSWERS)
    peer.subscribe(STATUS)
    received: list[tuple[Inbound, int]] = []
    settings = settings_for(tmp_path, broker.port)

    async def scenario() -> None:
        link, outbox = make_link(settings, received)
        link.start()
        loop_thread = threading.get_ident()
        await until(lambda: link.connected, "connected")
        await subscribed(peer, received)
        await asyncio.to_thread(peer.publish, REQUESTS, b"small")
        photo = bytes(range(256)) * (4 * 1024 * 1024 // 256)  # 4 MiB: many reads
        await asyncio.to_thread(peer.publish, REQUESTS, photo)
        await until(lambda: len(received) == 2, "both messages handed over")
        assert [m.payload for m, _ in received] == [b"small", photo]
        assert {thread for _, thread in received} == {loop_thread}

        def answer_from_a_thread() -> None:  # as the service stores feedback, in a thread
            answers = [
                Draft(ANSWERS, b"answer", "reply", "m1"),
                Draft(ANSWERS, photo, "reply", "m2"),
            ]
            outbox.put_many(answers)
            for message, _ in received:
                link.ack(message, wake=False)
            link.wake()

        await asyncio.to_thread(answer_from_a_thread)
        got = await asyncio.to_thread(peer.wait_for, 2, 10, ANSWERS)
        assert [m.payload for m in got] == [b"answer", photo]
        await until(lambda: outbox.depth()["messages"] == 0, "PUBACKs delete the rows")
        await link.stop()
        outbox.close()

    try:
        asyncio.run(scenario())
        statuses = [m.payload for m in peer.wait_for(2, 10, STATUS)]
        assert b'"online"' in statuses[0] and b'"offline"' in statuses[-1]
    finally:
        peer.close()


def test_rows_woken_during_a_checkpoint_go_out_once_it_is_done(
    tmp_path: Path, broker: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The outbox's thread holds the outbox for a checkpoint: a wake then publishes nothing and
    the event loop does not wait for the outbox's lock; the checkpoint's end wakes the link."""
    peer = TestClient(broker.port, "peer")
    peer.subscribe(ANSWERS)
    settings = settings_for(tmp_path, broker.port)

    async def scenario() -> None:
        link, outbox = make_link(settings, [])
        link.start()
        await until(lambda: link.connected, "connected")
        outbox.put(ANSWERS, b"answer", kind="reply")
        checkpoint = HeldCheckpoint(outbox, monkeypatch)
        await until(lambda: outbox.checkpointing, "the checkpoint running")
        link.wake()
        await asyncio.sleep(0.1)
        assert outbox.checkpointing, "the event loop waited for the checkpoint"
        assert peer.messages == []
        checkpoint.release()
        got = await asyncio.to_thread(peer.wait_for, 1, 10, ANSWERS)
        assert [m.payload for m in got] == [b"answer"]
        await until(lambda: outbox.depth()["messages"] == 0, "its PUBACK deletes the row")
        checkpoint.join()
        await link.stop()
        outbox.close()

    try:
        asyncio.run(scenario())
    finally:
        peer.close()


def test_stopping_while_the_broker_is_down_ends_the_link_at_once(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, free_port())  # nothing listens there

    async def scenario() -> None:
        link, outbox = make_link(settings, [])
        link.start()
        await asyncio.sleep(0.3)  # a few refused connects and backoffs
        assert not link.connected
        runner = link._runner
        await link.stop(timeout=5)
        assert runner is not None and runner.done() and not runner.cancelled()
        outbox.close()

    asyncio.run(scenario())


def test_a_broker_that_never_answers_connect_is_left_and_tried_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(link_module, "CONNECT_TIMEOUT_S", 0.3)
    monkeypatch.setattr(link_module, "MISC_INTERVAL_S", 0.05)
    silent = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                connection, _ = silent.accept()
            except OSError:
                return
            accepted.append(connection)  # read nothing, answer nothing

    threading.Thread(target=accept, daemon=True).start()
    settings = settings_for(tmp_path, silent.getsockname()[1])
    ticks = 0

    async def scenario() -> None:
        nonlocal ticks
        link, outbox = make_link(settings, [])
        link.start()
        async with asyncio.timeout(10):
            while len(accepted) < 2:  # gave up on the first and connected again
                await asyncio.sleep(0.01)
                ticks += 1  # the loop keeps turning meanwhile
        assert not link.connected
        await link.stop(timeout=5)
        outbox.close()

    try:
        asyncio.run(scenario())
    finally:
        silent.close()
        for connection in accepted:
            connection.close()
    assert len(accepted) >= 2 and ticks > 0


def test_a_dropped_connection_is_made_again_and_what_was_stored_meanwhile_goes_out(
    tmp_path: Path, broker: Broker
) -> None:
    peer = TestClient(broker.port, "peer", clean=False)  # its subscription survives the restart
    peer.subscribe(ANSWERS)
    settings = settings_for(tmp_path, broker.port)

    async def scenario() -> None:
        link, outbox = make_link(settings, [])
        link.start()
        await until(lambda: link.connected, "connected")
        first = link.connects
        broker.stop()
        await until(lambda: not link.connected, "the drop noticed")
        outbox.put_many([Draft(ANSWERS, b"stored while away", "reply", "k1")])
        link.wake()
        broker.start()
        await until(lambda: link.connects > first, "connected again", timeout=20)
        await until(lambda: outbox.depth()["messages"] == 0, "published and acknowledged")
        await link.stop()
        outbox.close()

    try:
        asyncio.run(scenario())
        got = peer.wait_for(1, 20, ANSWERS)
        assert [m.payload for m in got] == [b"stored while away"]
    finally:
        peer.close()


def test_the_broker_keeps_a_message_far_over_the_payload_limit(
    tmp_path: Path, broker: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MQTT 5 Maximum Packet Size: a message somewhat over `mqtt_max_payload_bytes` still
    arrives (to be answered `payload_too_large`); one over the stated bound never does, and what
    follows it does."""
    monkeypatch.setattr(link_module, "MAX_CHUNK_SIZE", 1024)  # the bound follows the payload
    settings = settings_for(tmp_path, broker.port).model_copy(
        update={"mqtt_max_payload_bytes": 4096}
    )
    bound = link_module.max_packet_size(settings)
    assert bound == 2 * 4096 + link_module.PACKET_HEADROOM
    peer = TestClient(broker.port, "peer")
    received: list[tuple[Inbound, int]] = []

    async def scenario() -> None:
        link, outbox = make_link(settings, received)
        link.start()
        await until(lambda: link.connected, "connected")
        await subscribed(peer, received)
        over = b"o" * (4096 + 1000)  # over the payload limit, well under the bound
        far_over = b"f" * (bound + 1)
        for payload in (over, far_over, b"after"):
            await asyncio.to_thread(peer.publish, REQUESTS, payload)
        await until(lambda: len(received) >= 2, "the messages under the bound")
        await asyncio.sleep(0.3)  # nothing else comes
        assert [m.payload for m, _ in received] == [over, b"after"]
        await link.stop()
        outbox.close()

    try:
        asyncio.run(scenario())
    finally:
        peer.close()


@pytest.mark.parametrize("qos", [0, 1])
def test_a_backlog_larger_than_the_window_all_goes_out_in_order(
    tmp_path: Path, broker: Broker, qos: int
) -> None:
    """More rows than the window of unacknowledged messages: QoS 1 ones follow their PUBACKs,
    QoS 0 ones (never acknowledged) do not wait for any."""
    peer = TestClient(broker.port, "peer")
    peer.subscribe(ANSWERS)
    count = 3 * link_module.PUBLISH_WINDOW + 5
    settings = settings_for(tmp_path, broker.port)

    async def scenario() -> None:
        link, outbox = make_link(settings, [])
        link.start()
        await until(lambda: link.connected, "connected")
        drafts = [Draft(ANSWERS, str(n).encode(), "reply", f"m{n}", qos=qos) for n in range(count)]
        outbox.put_many(drafts)
        link.wake()
        await until(lambda: outbox.depth()["messages"] == 0, "every row published and deleted")
        await link.stop()
        outbox.close()

    try:
        asyncio.run(scenario())
        got = peer.wait_for(count, 20, ANSWERS)
        assert [m.payload for m in got] == [str(n).encode() for n in range(count)]
    finally:
        peer.close()
