"""Topic value objects, the topic scheme, and reading requests out of MQTT payloads."""

from __future__ import annotations

import base64
import json

import pytest

from edge_agent.errors import BadRequestError, PayloadTooLargeError
from edge_agent.mqtt.messages import carry, dig, parse_request
from edge_agent.mqtt.topics import Topic, TopicFilter, TopicScheme
from edge_bundle.errors import ImageError


@pytest.mark.parametrize(
    ("pattern", "topic", "expected"),
    [
        ("a/b/c", "a/b/c", True),
        ("a/+/c", "a/x/c", True),
        ("a/+/c", "a/x/y/c", False),
        ("a/#", "a", True),
        ("a/#", "a/b/c", True),
        ("+/b", "a/b", True),
        ("#", "$SYS/broker", False),
        ("$share/line1/factory/+/camera", "factory/l1/camera", True),
        ("$share/line1/factory/+/camera", "factory/l1/other", False),
    ],
)
def test_filters_match_like_a_broker(pattern: str, topic: str, expected: bool) -> None:
    assert TopicFilter(pattern).matches(topic) is expected


@pytest.mark.parametrize("bad", ["a/b+/c", "a/#/c", "", "$share/group", "a\x00b"])
def test_bad_filters_are_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        TopicFilter(bad)


def test_topics_refuse_wildcards() -> None:
    with pytest.raises(ValueError, match="wildcard"):
        Topic("a/+/b")
    assert str(Topic("a/b")) == "a/b"


def test_shared_group_and_scheme() -> None:
    assert TopicFilter("$share/g1/x/y").shared_group == "g1"
    assert TopicFilter("x/y").shared_group is None
    scheme = TopicScheme("plant", "box1")
    assert str(scheme.results("defects")) == "lineside/v1/plant/box1/results/defects"
    assert scheme.model_of_request("lineside/v1/plant/box1/infer/defects") == "defects"
    assert scheme.model_of_request("lineside/v1/plant/shared/infer/defects") == "defects"
    assert scheme.model_of_request("lineside/v1/plant/box2/infer/defects") is None
    assert scheme.model_of_request("lineside/v1/plant/box1/infer/") is None
    assert (
        str(scheme.shared_infer_filter("line1")) == "$share/line1/lineside/v1/plant/shared/infer/+"
    )


def test_parse_raw_and_json_requests() -> None:
    raw = parse_request(b"\xff\xd8\xffdata", None, max_bytes=1000)
    assert raw.image == b"\xff\xd8\xffdata" and raw.client_request_id is None
    encoded = base64.b64encode(b"\x89PNG....").decode()
    document = json.dumps({"image": encoded, "request_id": "r1", "top_k": 2}).encode()
    parsed = parse_request(document, None, max_bytes=1000)
    assert parsed.image == b"\x89PNG...." and parsed.client_request_id == "r1" and parsed.top_k == 2
    data_url = json.dumps({"image": "data:image/png;base64," + encoded}).encode()
    assert parse_request(data_url, "application/json", max_bytes=1000).image == b"\x89PNG...."
    nested = json.dumps({"frame": {"jpeg": encoded}}).encode()
    assert (
        parse_request(nested, None, max_bytes=1000, image_path="frame.jpeg").image == b"\x89PNG...."
    )


@pytest.mark.parametrize(
    ("payload", "content_type", "error", "words"),
    [
        (b"", None, ImageError, "empty"),
        (b"x" * 2000, None, PayloadTooLargeError, "over the limit"),
        (b"{nope", None, BadRequestError, "not valid JSON"),
        (b"[1, 2]", None, BadRequestError, "must be an object"),
        (b'{"image": 7}', None, BadRequestError, "base64 string at 'image'"),
        (b'{"image": "%%%"}', None, BadRequestError, "not valid base64"),
        (b'{"image": "aGk=", "top_k": true}', None, BadRequestError, "top_k"),
        (b'{"image": "aGk=", "request_id": 5}', None, BadRequestError, "request_id"),
        (b"not json at all", "application/json", BadRequestError, "not valid JSON"),
    ],
)
def test_bad_payloads_say_what_is_wrong(
    payload: bytes, content_type: str | None, error: type[Exception], words: str
) -> None:
    with pytest.raises(error, match=words):
        parse_request(payload, content_type, max_bytes=1000)


def test_dig_and_carry() -> None:
    document = {"a": {"b": [10, {"c": "x"}]}, "part": 7}
    assert dig(document, "a.b.1.c") == "x"
    assert dig(document, "a.b.5") is None and dig(document, "a.z") is None
    assert carry(document, ("part", "a.b.0", "missing")) == {
        "part": 7,
        "a.b.0": 10,
        "missing": None,
    }
    assert carry(None, ("part",)) == {}
