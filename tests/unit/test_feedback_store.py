"""The feedback store's durability, quota policy and export, without a running agent."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edge_agent.device.feedback import FeedbackStore, export, make_record
from edge_agent.errors import BadRequestError, FeedbackFullError

REQUEST = {
    "request_id": "a" * 32,
    "label": "scratch",
    "score": 0.81,
    "top_k": [{"label": "scratch", "score": 0.81}, {"label": "dent", "score": 0.1}],
    "model": {"name": "defects", "version": 1, "bundle_sha256": "b" * 64},
    "created_at": 1.0,
    "image": {"format": "jpeg", "width": 10, "height": 10},
}
LABELS = ("ok", "scratch", "dent")


def record(
    verdict: str = "corrected", label: str | None = "dent", **extra: object
) -> dict[str, object]:
    return make_record(REQUEST, {"verdict": verdict, "corrected_label": label, **extra}, LABELS)


@pytest.mark.parametrize(
    ("submitted", "words"),
    [
        ({"verdict": "maybe"}, "verdict must be"),
        ({"verdict": "corrected", "corrected_label": "bent"}, "one of the model's labels"),
        ({"verdict": "corrected", "corrected_label": "scratch"}, "equals the prediction"),
        ({"verdict": "confirmed", "corrected_label": "dent"}, "only with verdict 'corrected'"),
        ({"verdict": "rejected", "note": "x" * 600}, "at most 500"),
        ({"verdict": "rejected", "station": 7}, "station must be a string"),
    ],
)
def test_bad_feedback_is_refused_with_the_reason(submitted: dict[str, object], words: str) -> None:
    with pytest.raises(BadRequestError, match=words):
        make_record(REQUEST, submitted, LABELS)


def test_records_survive_a_new_store(tmp_path: Path) -> None:
    store = FeedbackStore(tmp_path, max_bytes=10_000_000, max_count=100)
    stored = store.add(
        record(note="burr on rail 3", station="s1", operator="op7"), b"\xff\xd8image"
    )
    again = FeedbackStore(tmp_path, max_bytes=10_000_000, max_count=100)
    [loaded] = again.records()
    assert loaded == stored
    assert loaded["prediction"]["label"] == "scratch" and loaded["corrected_label"] == "dent"
    assert loaded["model"]["bundle_sha256"] == "b" * 64 and loaded["image_sha256"]
    assert again.image(stored["feedback_id"]) == b"\xff\xd8image"


def test_quota_drops_forwarded_records_first_and_refuses_the_rest(tmp_path: Path) -> None:
    store = FeedbackStore(tmp_path, max_bytes=10_000_000, max_count=3)
    first = store.add(record(), b"1")
    second = store.add(record(), b"2")
    store.add(record(), b"3")
    with pytest.raises(FeedbackFullError, match="not yet forwarded"):
        store.add(record(), b"4")
    store.mark_forwarded(second["feedback_id"])
    fourth = store.add(record(), b"4")  # the forwarded one made room
    ids = [r["feedback_id"] for r in store.records()]
    assert second["feedback_id"] not in ids and first["feedback_id"] in ids
    assert fourth["feedback_id"] in ids and len(ids) == 3


def test_export_writes_a_dataset_and_a_summary(tmp_path: Path) -> None:
    store = FeedbackStore(tmp_path / "store", max_bytes=10_000_000, max_count=100)
    store.add(record("corrected", "dent"), b"jpeg-a")
    store.add(record("corrected", "dent"), b"jpeg-b")
    store.add(record("confirmed", None), b"jpeg-c")
    store.add(record("rejected", None), b"jpeg-d")
    summary = export(store, tmp_path / "out")
    assert summary["records"] == 4 and summary["images"] == 3
    assert summary["corrections"] == [{"predicted": "scratch", "corrected_to": "dent", "count": 2}]
    assert len(list((tmp_path / "out" / "dent").glob("*.jpg"))) == 2
    assert len(list((tmp_path / "out" / "scratch").glob("*.jpg"))) == 1
    lines = (tmp_path / "out" / "records.jsonl").read_text().splitlines()
    assert len(lines) == 4 and json.loads(lines[0])["verdict"] == "corrected"
    assert json.loads((tmp_path / "out" / "summary.json").read_text()) == summary
