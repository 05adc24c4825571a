"""Content parts of chat messages (`edge_agent.device.content`): photos only as base64 data: URLs,
every other URL refused unfetched, at most four photos, text parts kept in order."""

from __future__ import annotations

import base64

import pytest

from edge_agent.device.content import IMAGE_PART, data_url_bytes, read_conversation
from edge_agent.errors import BadRequestError

PNG = b"\x89PNG\r\n\x1a\n fake"
URL = "data:image/png;base64," + base64.b64encode(PNG).decode()


def user(*parts: object) -> dict[str, object]:
    return {"role": "user", "content": list(parts)}


def test_parts_become_image_placeholders_and_bytes_in_order() -> None:
    other = b"second photo"
    conversation = read_conversation(
        [
            {"role": "system", "content": "Be brief."},
            user(
                {"type": "image_url", "image_url": {"url": URL, "detail": "low"}},
                {"type": "text", "text": "and"},
                {
                    "type": "image_url",
                    "image_url": "data:;base64," + base64.b64encode(other).decode(),
                },
            ),
        ]
    )
    assert conversation.images == (PNG, other)
    assert conversation.messages[0] == {"role": "system", "content": "Be brief."}
    assert conversation.messages[1]["content"] == [
        IMAGE_PART,
        {"type": "text", "text": "and"},
        IMAGE_PART,
    ]


def test_text_parts_join_for_a_text_only_template() -> None:
    conversation = read_conversation(
        [user({"type": "text", "text": "Why "}, {"type": "text", "text": "burrs?"})]
    )
    assert conversation.images == ()
    assert conversation.text_only() == ({"role": "user", "content": "Why burrs?"},)


@pytest.mark.parametrize(
    "url",
    [
        "https://example.com/part.jpg",
        "http://10.0.0.1/part.jpg",
        "file:///etc/passwd",
        "ftp://example.com/x.png",
        "//example.com/x.png",
        "part.jpg",
    ],
)
def test_every_url_but_data_is_refused(url: str) -> None:
    with pytest.raises(BadRequestError, match="never fetched; send the photo as a data: URL"):
        read_conversation([user({"type": "image_url", "image_url": {"url": url}})])


@pytest.mark.parametrize(
    ("url", "match"),
    [
        ("data:image/png;base64,@@@", "not valid base64"),
        ("data:image/png;base64,abc", "not valid base64"),
        ("data:image/png,rawbytes", "only base64 data: URLs"),
        ("data:image/png;base64", "only base64 data: URLs"),
    ],
)
def test_malformed_data_urls_are_400(url: str, match: str) -> None:
    with pytest.raises(BadRequestError, match=match):
        data_url_bytes(url)


def test_at_most_four_photos() -> None:
    part = {"type": "image_url", "image_url": {"url": URL}}
    assert len(read_conversation([user(part, part), user(part, part)]).images) == 4
    with pytest.raises(BadRequestError, match="at most 4"):
        read_conversation([user(part, part, part), user(part, part)])


@pytest.mark.parametrize(
    "message",
    [
        {"role": 3, "content": "x"},
        {"role": "user", "content": 5},
        user({"type": "audio", "data": "x"}),
        user({"type": "text", "text": 7}),
        user("just a string"),
        user({"type": "image_url", "image_url": {"href": URL}}),
    ],
)
def test_malformed_messages_are_400(message: dict[str, object]) -> None:
    with pytest.raises(BadRequestError):
        read_conversation([message])
