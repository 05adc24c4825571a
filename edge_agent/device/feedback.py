"""Technicians' feedback on predictions: stored durably on the box, forwarded to central.

A feedback record says what a technician made of one prediction — confirmed, corrected to another
of the model's labels, or rejected — with an optional note, station and operator. It is stored
with the photo, the prediction and the bundle hash (everything needed to retrain), each record
written atomically and fsynced, and survives restarts.

Quota policy: at most `max_bytes` and `max_count` records. When full, the oldest records already
handed to the MQTT outbox (and so on their way to central) are removed first; if none is, new
feedback is refused with a clear error (507) rather than dropping what was never forwarded. An
export (`edge-agent export-feedback`) writes a retraining dataset and changes nothing.

`FeedbackDesk` is the one way in, for HTTP and MQTT alike: it finds the kept prediction, checks
the verdict against the model's labels, stores the record and forwards it through the publisher.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from edge_agent.device.ports import Publisher
from edge_agent.disk import DiskWatch, is_disk_full
from edge_agent.engine.core import InferenceCore
from edge_agent.engine.records import RequestRecords
from edge_agent.errors import (
    BadRequestError,
    DiskFullError,
    FeedbackFullError,
    UnknownRequestError,
)
from edge_agent.metrics import AgentMetrics
from edge_bundle.files import write_atomically

log = logging.getLogger(__name__)
Verdict = Literal["confirmed", "corrected", "rejected"]
IMAGE_SUFFIX = {"jpeg": ".jpg", "png": ".png", "webp": ".webp", "bmp": ".bmp"}


@dataclass(frozen=True)
class Stored:
    feedback_id: str
    size: int
    created: float
    forwarded: bool


class FeedbackStore:
    """Feedback records under `directory`: `ID.json` (+ `ID.img`), bounded by the quota."""

    def __init__(self, directory: Path, *, max_bytes: int, max_count: int) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self.max_count = max_count
        self._lock = threading.Lock()
        self._index: dict[str, Stored] = {}
        directory.mkdir(parents=True, exist_ok=True)
        for path in directory.glob("*.json"):
            try:
                record = json.loads(path.read_bytes())
            except (OSError, ValueError):
                continue
            image = path.with_suffix(".img")
            size = path.stat().st_size + (image.stat().st_size if image.exists() else 0)
            self._index[path.stem] = Stored(
                path.stem, size, float(record.get("created_at", 0)), bool(record.get("forwarded"))
            )

    def __len__(self) -> int:
        return len(self._index)

    def add(self, record: dict[str, Any], image: bytes | None) -> dict[str, Any]:
        """Store a record (its id and time are set here); refuse it when the quota is full."""
        feedback_id = uuid.uuid4().hex
        record = {
            **record,
            "feedback_id": feedback_id,
            "created_at": time.time(),
            "forwarded": False,
        }
        if image is not None:
            record["image_sha256"] = hashlib.sha256(image).hexdigest()
        body = json.dumps(record, sort_keys=True).encode()
        size = len(body) + (len(image) if image is not None else 0)
        with self._lock:
            self._make_room(size)
            try:
                if image is not None:
                    write_atomically(self.directory / f"{feedback_id}.img", image)
                write_atomically(self.directory / f"{feedback_id}.json", body)
            except OSError:
                self._delete(feedback_id)  # nothing half-written stays behind
                raise
            self._index[feedback_id] = Stored(feedback_id, size, record["created_at"], False)
        return record

    def discard(self, feedback_id: str) -> None:
        """Delete a record that could not be forwarded after all (its submit failed)."""
        with self._lock:
            self._delete(feedback_id)
            self._index.pop(feedback_id, None)

    def _delete(self, feedback_id: str) -> None:
        for suffix in (".json", ".img"):
            (self.directory / f"{feedback_id}{suffix}").unlink(missing_ok=True)

    def mark_forwarded(self, feedback_id: str) -> None:
        with self._lock:
            path = self.directory / f"{feedback_id}.json"
            try:
                record = json.loads(path.read_bytes())
            except (OSError, ValueError):
                return
            record["forwarded"] = True
            write_atomically(path, json.dumps(record, sort_keys=True).encode())
            old = self._index.get(feedback_id)
            if old is not None:
                self._index[feedback_id] = Stored(feedback_id, old.size, old.created, True)

    def records(self) -> list[dict[str, Any]]:
        """Every record, oldest first."""
        found = []
        for stored in sorted(self._index.values(), key=lambda s: s.created):
            try:
                found.append(
                    json.loads((self.directory / f"{stored.feedback_id}.json").read_bytes())
                )
            except (OSError, ValueError):
                continue
        return found

    def image(self, feedback_id: str) -> bytes | None:
        try:
            return (self.directory / f"{feedback_id}.img").read_bytes()
        except OSError:
            return None

    def _make_room(self, size: int) -> None:
        total = sum(s.size for s in self._index.values())
        if size > self.max_bytes:
            raise FeedbackFullError(
                f"this feedback ({size:,} bytes with its photo) is larger than the whole feedback "
                f"quota ({self.max_bytes:,} bytes); raise feedback_max_bytes"
            )
        forwarded = sorted(
            (s for s in self._index.values() if s.forwarded), key=lambda s: s.created
        )
        while total + size > self.max_bytes or len(self._index) + 1 > self.max_count:
            if not forwarded:
                raise FeedbackFullError(
                    "the feedback quota is full of records not yet forwarded to central; connect "
                    "the box to its broker or export them (edge-agent export-feedback), then retry",
                    retry_after_s=60.0,
                )
            victim = forwarded.pop(0)
            for suffix in (".json", ".img"):
                (self.directory / f"{victim.feedback_id}{suffix}").unlink(missing_ok=True)
            del self._index[victim.feedback_id]
            total -= victim.size


class FeedbackDesk:
    """Technicians' verdicts on kept predictions: checked, stored, forwarded."""

    def __init__(
        self,
        store: FeedbackStore,
        records: RequestRecords,
        core: InferenceCore,
        metrics: AgentMetrics,
        publisher: Publisher | None,
        disk: DiskWatch | None = None,
    ) -> None:
        self.disk = disk
        self.store = store
        self.records = records
        self.core = core
        self.metrics = metrics
        self.publisher = publisher

    async def submit(self, submitted: dict[str, Any]) -> dict[str, Any]:
        """Store a technician's verdict on a kept prediction and forward it to central."""
        request_id = submitted.get("request_id")
        request = self.records.get(request_id) if isinstance(request_id, str) else None
        if request is None:
            raise UnknownRequestError(
                f"no kept prediction with request_id {request_id!r}: it is unknown or older than "
                "the keep limits (keep_requests_s); feedback must refer to a recent prediction"
            )
        state = self.core.models.get(request["model"]["name"])
        labels = state.classifier.labels if state is not None and state.classifier else ()
        record = make_record(request, submitted, labels)
        image = self.records.image(request["request_id"])
        try:
            stored = await asyncio.to_thread(self.store.add, record, image)
        except OSError as exc:
            self._raise_if_full(exc)
            raise
        if self.publisher is not None:
            try:
                await self.publisher.publish_feedback(stored, image)
            except Exception as exc:
                # Stored but not queued for central: take it back, so a retry is not a duplicate.
                await asyncio.to_thread(self.store.discard, stored["feedback_id"])
                self._raise_if_full(exc)
                raise
            try:
                await asyncio.to_thread(self.store.mark_forwarded, stored["feedback_id"])
            except OSError as exc:  # it is queued; only the mark is missing
                log.warning(
                    "feedback %s is queued but could not be marked: %s", stored["feedback_id"], exc
                )
        self.metrics.feedback.labels(stored["verdict"]).inc()
        return stored

    def _raise_if_full(self, exc: BaseException) -> None:
        if self.disk is not None:
            self.disk.raise_if_full(exc, "store the feedback")
        elif is_disk_full(exc):
            raise DiskFullError(
                "could not store the feedback: the disk is full; free space and send it again"
            ) from exc

    async def recent(self, limit: int) -> dict[str, Any]:
        """The latest `limit` records, newest first, and how many are stored."""
        records = await asyncio.to_thread(self.store.records)
        return {"feedback": records[-limit:][::-1], "stored": len(self.store)}


MAX_TEXT = 500


def make_record(
    request: dict[str, Any], submitted: dict[str, Any], labels: tuple[str, ...]
) -> dict[str, Any]:
    """A feedback record from the kept request and what the technician submitted; refuses
    anything malformed with a message that says what to send."""
    verdict = submitted.get("verdict")
    if verdict not in ("confirmed", "corrected", "rejected"):
        raise BadRequestError("verdict must be 'confirmed', 'corrected' or 'rejected'")
    corrected = submitted.get("corrected_label")
    if verdict == "corrected":
        if corrected not in labels:
            raise BadRequestError(
                f"corrected_label must be one of the model's labels {list(labels)}, got {corrected!r}"
            )
        if corrected == request["label"]:
            raise BadRequestError("corrected_label equals the prediction; send verdict 'confirmed'")
    elif corrected is not None:
        raise BadRequestError("corrected_label goes only with verdict 'corrected'")
    fields: dict[str, str | None] = {}
    for name in ("note", "station", "operator"):
        value = submitted.get(name)
        if value is not None and (not isinstance(value, str) or len(value) > MAX_TEXT):
            raise BadRequestError(f"{name} must be a string of at most {MAX_TEXT} characters")
        fields[name] = value
    return {
        "request_id": request["request_id"],
        "verdict": verdict,
        "corrected_label": corrected,
        **fields,
        "prediction": {
            "label": request["label"],
            "score": request["score"],
            "top_k": request["top_k"],
            **_anomaly_verdict(request),
        },
        "model": request["model"],
        "predicted_at": request.get("created_at"),
        "image_format": request.get("image", {}).get("format"),
    }


def _anomaly_verdict(request: dict[str, Any]) -> dict[str, Any]:
    """An anomaly bundle's (or a chained classifier's gate's) verdict on the kept request."""
    nested = request.get("anomaly")
    found: dict[str, Any] = nested if isinstance(nested, dict) else request
    verdict = found.get("verdict")
    if verdict not in ("normal", "anomalous"):
        return {}
    return {"anomaly_verdict": verdict, "anomaly_score": found.get("score")}


def anomaly_folder(record: dict[str, Any], truth: str | None, good: tuple[str, ...]) -> str | None:
    """Where an anomaly answer's photo goes for `build-anomaly --update`: `false_alarms` (the
    verdict was anomalous, the technician corrected it to a good label or to `normal`),
    `missed_defects` (normal, corrected to a defect), else None."""
    verdict = record["prediction"].get("anomaly_verdict")
    if record["verdict"] != "corrected" or verdict is None or truth is None:
        return None
    is_good = truth == "normal" or truth in good
    if verdict == "anomalous" and is_good:
        return "false_alarms"
    if verdict == "normal" and not is_good:
        return "missed_defects"
    return None


def export(store: FeedbackStore, out: Path, good: tuple[str, ...] = ("ok",)) -> dict[str, Any]:
    """A retraining dataset: `LABEL/ID.ext` for confirmed and corrected photos (by the label the
    technician gave), `records.jsonl` with every record, and a summary of corrections.

    Anomaly answers corrected by a technician also go, flat, to `anomaly/false_alarms/` (good
    parts the detector flagged: `model-packager build-anomaly --update OLD --good` that folder)
    and `anomaly/missed_defects/` (defects it called normal: evaluation folders for the next
    build). `good` are the classifier labels of a good part (setting `anomaly_good_labels`).
    A `rejected` photo (not a valid photo of a part) goes to neither: it is no good part."""
    out.mkdir(parents=True, exist_ok=True)
    anomaly: Counter[str] = Counter()
    corrections: Counter[tuple[str, str]] = Counter()
    verdicts: Counter[str] = Counter()
    written = 0
    with (out / "records.jsonl").open("w", encoding="utf-8") as lines:
        for record in store.records():
            lines.write(json.dumps(record, sort_keys=True) + "\n")
            verdicts[record["verdict"]] += 1
            predicted = record["prediction"]["label"]
            truth = record.get("corrected_label") or (
                predicted if record["verdict"] == "confirmed" else None
            )
            if record["verdict"] == "corrected" and truth is not None:
                corrections[(predicted, truth)] += 1
            image = store.image(record["feedback_id"])
            if truth is None or image is None:
                continue
            folder = out / truth
            folder.mkdir(exist_ok=True)
            suffix = IMAGE_SUFFIX.get(record.get("image_format", ""), ".img")
            (folder / f"{record['feedback_id']}{suffix}").write_bytes(image)
            written += 1
            kind = anomaly_folder(record, truth, good)
            if kind is not None:
                (out / "anomaly" / kind).mkdir(parents=True, exist_ok=True)
                (out / "anomaly" / kind / f"{record['feedback_id']}{suffix}").write_bytes(image)
                anomaly[kind] += 1
    summary = {
        "records": sum(verdicts.values()),
        "verdicts": dict(verdicts),
        "images": written,
        "corrections": [
            {"predicted": predicted, "corrected_to": truth, "count": count}
            for (predicted, truth), count in corrections.most_common()
        ],
        "anomaly": {
            "false_alarms": anomaly["false_alarms"],
            "missed_defects": anomaly["missed_defects"],
        },
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
