"""The prediction route's query options, read by hand (`edge_agent.http.inputs.QueryOption`):
what FastAPI accepted is accepted, everything else is a 400 that says what is allowed, and the
OpenAPI document describes each option as it is checked."""

from __future__ import annotations

from typing import Any

import pytest
from starlette.datastructures import QueryParams

from edge_agent.errors import BadRequestError
from edge_agent.http.app import PREDICT_OPTIONS
from edge_agent.http.inputs import QueryOption, read_query

TOP_K = QueryOption("top_k", "", {"type": "integer", "minimum": 1, "maximum": 100, "default": 3})
EXPLAIN = QueryOption("explain", "", {"type": "boolean", "default": True})
FORMAT = QueryOption("format", "", {"type": "string", "enum": ["text", "json"], "default": "text"})


@pytest.mark.parametrize(("text", "value"), [("1", 1), ("100", 100), (" 7 ", 7), ("+3", 3)])
def test_integers_in_range_are_read(text: str, value: int) -> None:
    assert TOP_K.parse(text) == value


@pytest.mark.parametrize("text", ["0", "101", "-1", "three", "", "3.5", "3_0", "--1", "²", "1e2"])
def test_other_integers_are_refused_saying_what_is_allowed(text: str) -> None:
    with pytest.raises(BadRequestError) as caught:
        TOP_K.parse(text)
    assert caught.value.message == (
        f"invalid request: query.top_k must be a whole number from 1 to 100, not {text!r}"
    )


@pytest.mark.parametrize(
    ("text", "value"),
    [
        *[("true", True), ("True", True), ("1", True), ("yes", True), ("on", True)],
        *[("false", False), ("FALSE", False), ("0", False), ("no", False), ("off", False)],
    ],
)
def test_booleans_are_read_as_fastapi_read_them(text: str, value: bool) -> None:
    assert EXPLAIN.parse(text) is value


@pytest.mark.parametrize("text", ["", "2", "maybe", "truee"])
def test_other_booleans_are_refused(text: str) -> None:
    with pytest.raises(BadRequestError, match=r"query\.explain must be true or false"):
        EXPLAIN.parse(text)


def test_an_enum_takes_only_its_values() -> None:
    assert FORMAT.parse("json") == "json"
    with pytest.raises(BadRequestError, match=r"query\.format must be text or json, not 'JSON'"):
        FORMAT.parse("JSON")


def test_absent_options_take_their_defaults_and_the_last_value_given_wins() -> None:
    options = (TOP_K, EXPLAIN, FORMAT)
    assert read_query(QueryParams(""), options) == {"top_k": 3, "explain": True, "format": "text"}
    given = QueryParams("top_k=2&top_k=5&explain=false&other=x")
    assert read_query(given, options) == {"top_k": 5, "explain": False, "format": "text"}


def test_each_default_is_a_value_its_own_check_accepts() -> None:
    for option in PREDICT_OPTIONS:
        default: Any = option.schema["default"]
        text = str(default).lower() if isinstance(default, bool) else str(default)
        assert option.parse(text) == default, option.name
        assert option.openapi()["schema"]["default"] == default
