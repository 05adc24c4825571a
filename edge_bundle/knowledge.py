"""The knowledge base a bundle carries: for each label, what a technician should know.

Stored in the bundle as `knowledge.json` (the packager reads the user's YAML and writes this); the
agent returns the entry of the predicted label with every answer. A label without an entry is
allowed (the packager warns); an entry for a label the model does not have is an error.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from edge_bundle.errors import KnowledgeBaseError

KNOWLEDGE_FILE = "knowledge.json"
Line = Annotated[str, StringConstraints(min_length=1, max_length=2000, strip_whitespace=True)]
Severity = Literal["info", "minor", "major", "critical"]


class KnowledgeEntry(BaseModel):
    """What to tell a technician about one defect class."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    title: Line | None = Field(default=None, description="human-readable name of the class")
    severity: Severity = Field(default="info", description="how urgent the defect is")
    root_causes: tuple[Line, ...] = Field(
        default=(), description="likely causes, most likely first"
    )
    corrective_actions: tuple[Line, ...] = Field(default=(), description="what to do, in order")
    references: tuple[Line, ...] = Field(default=(), description="work instructions, SOP ids")


class KnowledgeBase(BaseModel):
    """label -> entry."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    entries: dict[str, KnowledgeEntry]

    def entry(self, label: str) -> KnowledgeEntry | None:
        return self.entries.get(label)

    def check_labels(self, labels: Sequence[str]) -> list[str]:
        """Raise for entries of unknown labels; return the labels that have no entry."""
        unknown = sorted(set(self.entries) - set(labels))
        if unknown:
            raise KnowledgeBaseError(
                f"knowledge base has entries for {unknown}, which are not labels of the model "
                f"({list(labels)}); fix the spelling or remove them"
            )
        return [label for label in labels if label not in self.entries]

    def to_bytes(self) -> bytes:
        document = {k: v.model_dump(mode="json") for k, v in sorted(self.entries.items())}
        return (json.dumps(document, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode()

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], source: str = "knowledge base") -> KnowledgeBase:
        if not isinstance(data, Mapping):
            raise KnowledgeBaseError(f"{source} must map each label to its entry")
        try:
            return cls.model_validate({"entries": dict(data)})
        except ValidationError as exc:
            problems = "; ".join(
                ".".join(str(p) for p in e["loc"][1:]) + f": {e['msg']}" for e in exc.errors()
            )
            raise KnowledgeBaseError(f"{source}: {problems}") from None

    @classmethod
    def from_bytes(cls, data: bytes, source: str = KNOWLEDGE_FILE) -> KnowledgeBase:
        try:
            document = json.loads(data.decode("utf-8"))
        except ValueError as exc:
            raise KnowledgeBaseError(f"{source} is not UTF-8 JSON: {exc}") from exc
        return cls.from_mapping(document, source)
