"""Chaining: an anomaly bundle (the gate) in front of a classifier, and how their answers meet.

The gate of a classifier is named by the classifier bundle's manifest (`anomaly_gate`, set by
`model-packager build --anomaly-gate NAME`, as `explainer` names its explainer) or by the
agent's `anomaly_gates` setting, which overrides it per station (an empty name turns the
manifest's gate off). The core runs both on one decoded photo; this module decides the answer:

- the gate says `normal`: the classifier's answer as it is;
- the gate says `anomalous` and the classifier names a defect with at least `min_confidence`:
  that defect, with its knowledge entry;
- the gate says `anomalous` and the classifier says a good label (`good_labels`, e.g. "ok") or
  is unsure (below `min_confidence`): `unknown_defect`, never ok, with the classifier's own
  top-k beside it and the knowledge base's `unknown_defect` entry (or a built-in one).

The answer carries the gate's findings under `anomaly` (model, score, verdict, threshold,
regions, score map); when the gate cannot answer (not installed, not ready, not an anomaly
bundle) it says `{"status": "unavailable", "reason": ...}` and the classifier answers alone.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from edge_agent.engine.anomaly import ANOMALOUS
from edge_agent.engine.classifier import Classifier, Scored
from edge_agent.engine.types import Prediction

UNKNOWN_DEFECT = "unknown_defect"
#: Said of an unknown defect when the classifier's knowledge base has no `unknown_defect` entry.
UNKNOWN_DEFECT_KNOWLEDGE: dict[str, Any] = {
    "title": "Unknown defect",
    "severity": "major",
    "root_causes": [],
    "corrective_actions": [
        "Hold the part: it differs from good parts in the marked regions, and the classifier "
        "does not know this defect.",
        "Mark the photo with the defect's name (feedback), so that the next model learns it.",
    ],
}


@dataclass(frozen=True)
class ChainPolicy:
    """When an anomalous part's classification is not trusted."""

    good_labels: tuple[str, ...] = ("ok",)
    min_confidence: float = 0.5


def chained_label(policy: ChainPolicy, label: str, score: float, verdict: str) -> str:
    """The answer's label: the classifier's, unless the gate says anomalous and the classifier
    calls the part good or is unsure."""
    if verdict != ANOMALOUS:
        return label
    if label in policy.good_labels or score < policy.min_confidence:
        return UNKNOWN_DEFECT
    return label


def unavailable(reason: str) -> dict[str, Any]:
    """The `anomaly` field of an answer whose gate could not run."""
    return {"status": "unavailable", "reason": reason}


def chain_answer(
    policy: ChainPolicy, answer: Prediction, classifier: Classifier, gate: Classifier, found: Scored
) -> Prediction:
    """The `classifier`'s `answer` with the gate's findings (`found`) and the chained label."""
    assert found.detection is not None
    verdict = found.detection.verdict
    label = chained_label(policy, answer.label, answer.score, verdict)
    knowledge = answer.knowledge
    if label == UNKNOWN_DEFECT:
        knowledge = _unknown_knowledge(classifier)
    anomaly = {"model": gate.identity(), **found.detection.to_json()}
    return dataclasses.replace(answer, label=label, knowledge=knowledge, anomaly=anomaly)


def _unknown_knowledge(classifier: Classifier) -> dict[str, Any]:
    """The classifier's own `unknown_defect` entry when its knowledge base has one."""
    entry = classifier.knowledge.entry(UNKNOWN_DEFECT) if classifier.knowledge else None
    return entry.model_dump(mode="json") if entry is not None else dict(UNKNOWN_DEFECT_KNOWLEDGE)
