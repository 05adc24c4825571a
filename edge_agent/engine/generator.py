"""A language model as the agent serves it: bundle + llama session + pinned chat template.

Prompts for chat are rendered with the bundle's pinned template in a sandboxed Jinja
environment (`edge_bundle.chat_template`); a bundle without one serves plain completion only.
The text self-test replays the bundle's golden greedy completions and requires them exactly.

A vision-language bundle (task "vision-language", `generation.vision`) is a generator that also
takes photos: its conversations are rendered as lists of parts (`as_parts`, an image part
written as the image marker), a photo is decoded by the hardened decoder and scaled to the
projector's side here (`fit_photo`, the one way for requests and the self-test alike), and the
self-test also replays the bundle's golden completions with photos.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from edge_agent.engine.selftest import SelfTestReport
from edge_agent.errors import BadRequestError, RuntimeLoadError
from edge_agent.runtimes import runtime_for
from edge_agent.runtimes.base import TextRequest, TextSession, VisionSession
from edge_bundle.bundle import VerifiedBundle
from edge_bundle.errors import BundleError
from edge_bundle.hashing import sha256_file
from edge_bundle.imaging import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS, decode_image
from edge_bundle.llama_vision import IMAGE_MARKER, Pixels, fit_image
from edge_bundle.manifest import Generation, Vision, VisionGolden
from edge_bundle.profiles import HardwareProfile

#: The tasks a generator serves.
GENERATIVE_TASKS = ("text-generation", "vision-language")
#: Photos one request may carry (each takes `image_tokens` of the context and an encode).
MAX_IMAGES = 4


@dataclass
class Generator:
    """A loaded text-generation (or vision-language) bundle."""

    bundle: VerifiedBundle
    session: TextSession
    generation: Generation
    template: str | None

    @property
    def name(self) -> str:
        return self.bundle.manifest.name

    @property
    def version(self) -> int:
        return self.bundle.manifest.version

    @property
    def chat(self) -> bool:
        return self.template is not None

    @property
    def vision(self) -> Vision | None:
        """The image side of a vision-language bundle; None for a text-only model."""
        return self.generation.vision

    def chat_prompt(self, messages: list[dict[str, Any]]) -> str:
        """The prompt for a conversation, rendered with the pinned template (sandboxed); for a
        vision-language model every content is a list of parts, an image part its marker."""
        if self.template is None:
            raise BadRequestError(
                f"{self.name} has no chat template (plain completion only); send a prompt to "
                f"/v1/models/{self.name}/generate or /v1/completions instead"
            )
        from edge_bundle.chat_template import as_parts, render_chat

        if self.vision is not None:
            messages = as_parts(messages, self.vision.marker)
        try:
            return render_chat(self.template, messages)
        except BundleError as exc:
            raise BadRequestError(f"the conversation cannot be rendered: {exc}") from exc

    def prompt_positions(self, prompt: str, images: int) -> int:
        """Context positions `prompt` with `images` photos takes: its text tokens (markers
        left out) and, per photo, what the session measured at load (image and wrapper tokens,
        at least the manifest's `image_tokens`) plus one for a token split at the photo."""
        if images == 0 or self.vision is None:
            return self.session.count_tokens(prompt)
        text = self.session.count_tokens(prompt.replace(self.vision.marker, ""))
        measured = cast(VisionSession, self.session).image_positions
        return text + images * (max(measured, self.vision.image_tokens) + 1)

    def fit_photo(
        self,
        data: bytes,
        *,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> Pixels:
        """Photo bytes -> RGB pixels at most `image_side` on the longer side, through the
        hardened decoder (a large JPEG decodes reduced); raises `ImageError` subclasses."""
        if self.vision is None:
            raise BadRequestError(f"{self.name} takes no images (it is a text-only model)")
        side = self.vision.image_side
        decoded = decode_image(
            data, max_pixels=max_pixels, max_bytes=max_bytes, target_hw=(side, side)
        )
        return fit_image(decoded.pixels, side)

    def stops(self, extra: tuple[str, ...] = ()) -> tuple[str, ...]:
        return tuple(dict.fromkeys((*self.generation.stop, *extra)))

    def describe(self) -> dict[str, Any]:
        manifest = self.bundle.manifest
        return {
            "name": manifest.name,
            "version": manifest.version,
            "bundle_sha256": self.bundle.bundle_sha256,
            "task": manifest.task,
            "runtime": manifest.runtime,
            "context_size": self.generation.context_size,
            "chat": self.chat,
            "signed_by": self.bundle.signer_key_id,
            "created_at": manifest.created_at.isoformat(),
        } | self._describe_images()

    def _describe_images(self) -> dict[str, Any]:
        if self.vision is None:
            return {}
        return {
            "images": {
                "image_side": self.vision.image_side,
                "image_tokens": self.vision.image_tokens,
                "max_per_request": MAX_IMAGES,
            }
        }

    def close(self) -> None:
        self.session.close()


def load_generator(bundle: VerifiedBundle, profile: HardwareProfile, cache_dir: Path) -> Generator:
    manifest = bundle.manifest
    if manifest.task not in GENERATIVE_TASKS or manifest.generation is None:
        raise RuntimeLoadError(
            f"{bundle.bundle_id} is not a text-generation bundle with a generation section; "
            "rebuild it with model-packager"
        )
    vision = manifest.generation.vision
    _check_vision(bundle, vision)
    template = None
    pinned = manifest.generation.chat_template
    if pinned is not None:
        path = bundle.path(pinned.path)
        if sha256_file(path) != pinned.sha256:
            raise RuntimeLoadError(f"{bundle.bundle_id}: the chat template does not match its pin")
        template = path.read_text(encoding="utf-8")
        from edge_bundle.chat_template import check_template

        try:
            check_template(template, image_marker=vision.marker if vision else None)
        except BundleError as exc:
            raise RuntimeLoadError(f"{bundle.bundle_id}: chat template refused: {exc}") from exc
    session = runtime_for(manifest.runtime).load(bundle, profile, cache_dir)
    if not hasattr(session, "stream"):
        session.close()
        raise RuntimeLoadError(
            f"{bundle.bundle_id}: runtime {manifest.runtime} does not generate text"
        )
    return Generator(bundle, cast(TextSession, session), manifest.generation, template)


def _check_vision(bundle: VerifiedBundle, vision: Vision | None) -> None:
    """What a vision-language bundle needs beyond a text one, checked before anything loads."""
    if vision is None:
        return
    if bundle.manifest.generation is None or bundle.manifest.generation.chat_template is None:
        raise RuntimeLoadError(
            f"{bundle.bundle_id} is a vision-language bundle without a chat template; photos "
            "reach the model only through chat, so rebuild it with one pinned"
        )
    if vision.marker != IMAGE_MARKER:
        raise RuntimeLoadError(
            f"{bundle.bundle_id}: its image marker {vision.marker!r} is not llama.cpp's "
            f"{IMAGE_MARKER!r}; rebuild it with model-packager"
        )


#: How far a golden photo's label score may move on the box (the packager's machine computed
#: it); the label itself must not change.
SCORE_TOLERANCE = 0.02


def _check_scores(
    generator: Generator,
    prompt: str,
    photos: tuple[Pixels, ...],
    golden: VisionGolden,
    number: int,
) -> list[str]:
    labels = generator.bundle.manifest.labels
    scores = cast(VisionSession, generator.session).label_scores(prompt, photos, labels)
    label = max(labels, key=scores.__getitem__)
    worst = max(abs(scores[name] - golden.scores[i]) for i, name in enumerate(labels))
    if label != golden.label or worst > SCORE_TOLERANCE:
        return [
            f"golden photo {number} is classified {label!r} (scores differ by up to {worst:.4f}), "
            f"packaged as {golden.label!r} within {SCORE_TOLERANCE}"
        ]
    return []


def run_text_selftest(generator: Generator) -> SelfTestReport:
    """Replay every golden greedy completion (with its photos, for a vision-language bundle);
    each must come out exactly as packaged."""
    started = time.perf_counter()
    failures = []
    samples: list[tuple[str, TextRequest, str]] = [
        (
            f"golden completion {number}",
            TextRequest(sample.prompt, max_tokens=sample.max_tokens, temperature=0.0),
            sample.expected_text,
        )
        for number, sample in enumerate(generator.generation.golden)
    ]
    vision = generator.vision
    for number, golden in enumerate(vision.golden if vision else ()):
        photos = tuple(
            generator.fit_photo(generator.bundle.path(path).read_bytes()) for path in golden.images
        )
        request = TextRequest(
            golden.prompt, max_tokens=golden.max_tokens, temperature=0.0, images=photos
        )
        samples.append((f"golden completion with photos {number}", request, golden.expected_text))
        if golden.scores and vision is not None and vision.classify_prompt is not None:
            failures += _check_scores(generator, vision.classify_prompt, photos, golden, number)
    for what, request, expected in samples:
        text = "".join(
            chunk.text
            for chunk in generator.session.stream(
                request, cancelled=lambda: False, between_tokens=lambda: None
            )
        )
        if text != expected:
            failures.append(f"{what} differs: got {text[:60]!r}, expected {expected[:60]!r}")
    if not samples:
        failures.append("the bundle has no golden completions")
    return SelfTestReport(
        str(generator.bundle.bundle_id),
        len(samples),
        0.0,
        0.0,
        time.perf_counter() - started,
        tuple(failures),
    )
