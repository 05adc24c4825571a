"""A structured explanation is checked against its schema when it ends: parsed into `data`, or
the reason it is not the JSON asked for."""

from __future__ import annotations

import json

from edge_agent.device.explain import EXPLANATION_SCHEMA, Explainer, Explanation


def test_the_schema_asks_for_the_three_fields() -> None:
    schema = json.loads(EXPLANATION_SCHEMA)
    assert set(schema["required"]) == {"root_cause", "actions", "confidence_note"}
    assert schema["properties"]["actions"]["maxItems"] == 8


def test_a_complete_answer_is_parsed_into_data() -> None:
    job = Explanation("r1", "explainer", structured=True)
    job.text = json.dumps(
        {"root_cause": "worn rail", "actions": ["stop the line", "swap the rail"],
         "confidence_note": "the photo shows a long straight scratch"}
    )  # fmt: skip
    Explainer._parse(job)
    assert job.data is not None and job.data["actions"] == ["stop the line", "swap the rail"]
    assert job.to_json()["format"] == "json" and job.reason is None


def test_a_cut_off_or_wrong_answer_says_why() -> None:
    for text in ('{"root_cause": "worn ra', '{"root_cause": "x", "actions": []}'):
        job = Explanation("r2", "explainer", structured=True)
        job.text = text
        Explainer._parse(job)
        assert job.data is None and job.reason is not None
        assert "not the JSON asked for" in job.reason
        assert job.to_json()["data"] is None
