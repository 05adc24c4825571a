"""Which chat template a language-model bundle pins, decided before any slow step.

The candidates are the template that came with the model (a GGUF's `tokenizer.chat_template`, a
Hugging Face tokenizer's `chat_template`) and one given with `--chat-template FILE|NAME`; a given
one wins. Every template is checked in the sandbox (`edge_bundle.chat_template.check_template`).
A model's own template that is *unsafe* refuses the build even when another one is given: it
would still travel inside the model file to every device, where any tool that renders it without
a sandbox is exposed. A model without a template, and none given, serves plain completion only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edge_bundle.chat_template import (
    KNOWN_TEMPLATES,
    MAX_TEMPLATE_BYTES,
    check_template,
    end_of_turn_markers,
    known_template,
)
from edge_bundle.errors import TemplateError
from edge_bundle.hashing import sha256_bytes
from edge_bundle.llama_vision import IMAGE_MARKER
from model_packager.errors import SourceError
from model_packager.sources import LlmSource

TEMPLATE_FILE = "chat_template.jinja"


@dataclass(frozen=True)
class PinnedTemplate:
    """A checked template, where it came from, and the stop strings it implies."""

    text: str
    origin: str
    stop: tuple[str, ...]

    @property
    def sha256(self) -> str:
        return sha256_bytes(self.text.encode("utf-8"))


def choose_template(
    source: LlmSource, given: str | None
) -> tuple[PinnedTemplate | None, list[str]]:
    """The template to pin (None: plain completion only) and notes for the report."""
    notes: list[str] = []
    embedded = source.chat_template
    # A vision-language template reads contents as lists of parts and writes the image marker.
    marker = IMAGE_MARKER if source.vision else None
    if embedded is not None:
        try:
            check_template(embedded, image_marker=marker)
        except TemplateError as exc:
            if exc.unsafe or given is None:
                raise SourceError(_embedded_refusal(source, exc)) from exc
            notes.append(f"the model's own chat template was replaced: it was refused ({exc})")
    if given is not None:
        text, origin = _given(given)
        try:
            check_template(text, image_marker=marker)
        except TemplateError as exc:
            raise SourceError(f"--chat-template {given}: {exc}") from exc
        return PinnedTemplate(text, origin, end_of_turn_markers(text)), notes
    if embedded is not None:
        origin = f"embedded in {source.path.name}"
        return PinnedTemplate(embedded, origin, end_of_turn_markers(embedded)), notes
    if source.vision:
        raise SourceError(
            f"{source.path.name} has no chat template, and a vision-language bundle needs one to "
            "place the photo in the prompt; supply it with --chat-template FILE"
        )
    notes.append(
        "no chat template: plain completion only (give one with --chat-template FILE|"
        f"{'|'.join(KNOWN_TEMPLATES)} to serve chat)"
    )
    return None, notes


def _given(value: str) -> tuple[str, str]:
    known = known_template(value)
    if known is not None:
        return known, f"built-in {value.strip().lower()}"
    path = Path(value)
    if not path.is_file():
        raise SourceError(
            f"--chat-template {value!r} is neither a file nor a known template "
            f"({', '.join(KNOWN_TEMPLATES)}); pass a Jinja file or one of those names"
        )
    if path.stat().st_size > MAX_TEMPLATE_BYTES:
        raise SourceError(
            f"--chat-template {path} is over {MAX_TEMPLATE_BYTES} bytes; a chat template needs "
            "a few kilobytes: check that this is the right file"
        )
    try:
        return path.read_text(encoding="utf-8"), f"file {path.name}"
    except UnicodeDecodeError as exc:
        raise SourceError(f"--chat-template {path} is not UTF-8 text; save it as UTF-8") from exc


def _embedded_refusal(source: LlmSource, exc: TemplateError) -> str:
    where = (
        "remove tokenizer.chat_template from the file (gguf_new_metadata.py "
        "--remove-metadata tokenizer.chat_template)"
        if source.kind == "gguf"
        else "remove chat_template from tokenizer_config.json (and chat_template.jinja)"
    )
    if exc.unsafe:
        return (
            f"the chat template that comes with {source.path.name} was refused: {exc}. It would "
            f"travel inside the model file to every device; {where}, then supply a template you "
            "trust with --chat-template"
        )
    return (
        f"the chat template that comes with {source.path.name} was refused: {exc}. Supply a "
        f"working one with --chat-template FILE|{'|'.join(KNOWN_TEMPLATES)}, or {where}"
    )
