"""Reading the knowledge base a classifying bundle carries (`--knowledge FILE`): YAML checked
against the bundle's labels. Both pipelines take it: image classifiers and vision-language
models that classify."""

from __future__ import annotations

from pathlib import Path

from edge_bundle.knowledge import KnowledgeBase
from model_packager.errors import KnowledgeError


def read_knowledge(
    path: Path | None, labels: tuple[str, ...]
) -> tuple[KnowledgeBase | None, list[str]]:
    """The knowledge base at `path` (None when not given) and warnings for labels it misses."""
    if path is None:
        return None, ["no knowledge base given (--knowledge): answers will carry no root causes"]
    import yaml

    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise KnowledgeError(f"knowledge base {path} is not readable YAML: {exc}") from exc
    try:
        knowledge = KnowledgeBase.from_mapping(document, str(path))
        missing = knowledge.check_labels(labels)
    except Exception as exc:
        raise KnowledgeError(str(exc)) from exc
    return knowledge, [f"no knowledge base entry for label: {label}" for label in missing]
