"""The image side of a vision-language build: the projector (converted from the Hugging Face
checkpoint with llama.cpp's converter, or given beside a GGUF; the adapter is merged by
`gguf.merge_adapter`), the check that it fits the text
model, the golden multimodal completions and the image benchmark.

The projector ships as it was converted (f16): no gate measures what quantizing it would cost,
and it is a small share of the bundle. Golden photos are scaled to the projector's side
(`edge_bundle.llama_vision.fit_image`) and stored as lossless PNGs, so the device replays exactly
the pixels the packager used; each completion is generated twice and must repeat.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from edge_bundle.chat_template import as_parts, render_chat
from edge_bundle.errors import BundleError, ImageError
from edge_bundle.gguf_fields import ProjectorMismatchError, ProjectorPair, projector_pair
from edge_bundle.imaging import decode_image
from edge_bundle.llama_vision import IMAGE_MARKER, Pixels, Projector, fit_image
from edge_bundle.manifest import VisionGolden
from model_packager.errors import PackagerError, SourceError
from model_packager.llm.template import PinnedTemplate

VISION_QUESTION = "Describe the defect in this photo."
CLASSIFY_QUESTION = "Which defect does this photo show? Answer with one of: {labels}."
SCORE_REPEAT_TOLERANCE = 1e-4
VISION_GOLDEN_TOKENS = 16
GOLDEN_DIR = "golden"
MIN_GOLDEN_PHOTOS, MAX_GOLDEN_PHOTOS = 2, 4
BENCH_ROUNDS = 3
_PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


@dataclass(frozen=True)
class VisionOutcome:
    """What the build measured on the image side, for the manifest, report and summary."""

    projector: Path
    pair: ProjectorPair
    image_side: int
    image_tokens: int
    golden: tuple[VisionGolden, ...]
    golden_files: dict[str, Path]  # bundle path -> PNG written in the work folder
    timing: dict[str, float]
    classify_prompt: str | None = None


def check_pair(text_model: Path, projector: Path) -> ProjectorPair:
    """The pair, or `SourceError` when the projector was made for another text model."""
    try:
        return projector_pair(text_model, projector)
    except ProjectorMismatchError as exc:
        raise SourceError(f"the bundle was not written: {exc}") from exc


def golden_photos(directory: Path | None, side: int) -> list[Pixels]:
    """The golden photos scaled to the projector's side: the user's 2-4 photos (decoded with the
    agent's own decoder), or two built-in pictures of parts."""
    if directory is None:
        return [fit_image(photo, side) for photo in _built_in_photos(side)]
    if not directory.is_dir():
        raise PackagerError(f"--golden-images {directory} is not a folder of photos")
    paths = sorted(p for p in directory.iterdir() if p.suffix.lower() in _PHOTO_SUFFIXES)
    if not MIN_GOLDEN_PHOTOS <= len(paths) <= MAX_GOLDEN_PHOTOS:
        raise PackagerError(
            f"--golden-images {directory} holds {len(paths)} photos (.jpg, .png, .webp, .bmp); "
            f"give {MIN_GOLDEN_PHOTOS} to {MAX_GOLDEN_PHOTOS} photos like the line's"
        )
    photos = []
    for path in paths:
        try:
            decoded = decode_image(path.read_bytes(), target_hw=(side, side))
        except ImageError as exc:
            raise PackagerError(f"--golden-images {path.name}: {exc}") from exc
        photos.append(fit_image(decoded.pixels, side))
    return photos


def _built_in_photos(side: int) -> list[Pixels]:
    """A grey part with a dark scratch, and a warm part with a round dent (our own drawings)."""
    size = max(side, 64)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    scratch = np.clip(150 + 0.2 * x[..., None] - 0.1 * y[..., None], 0, 255)
    scratch = np.repeat(scratch, 3, axis=2).astype(np.uint8)
    cv2.line(scratch, (size // 8, size // 4), (7 * size // 8, 3 * size // 4), (40, 40, 40), 2)
    dent = np.zeros((size, size, 3), np.uint8)
    dent[:] = (190, 120, 60)
    cv2.circle(dent, (size // 2, size // 2), size // 5, (90, 50, 20), -1)
    return [scratch, dent]


def golden_prompt(template: PinnedTemplate) -> str:
    """The rendered prompt of a golden: one photo and the question, as a technician asks."""
    message = {
        "role": "user",
        "content": [{"type": "image"}, {"type": "text", "text": VISION_QUESTION}],
    }
    return render_chat(template.text, as_parts([message], IMAGE_MARKER))


def classify_prompt(template: PinnedTemplate, labels: tuple[str, ...]) -> str:
    """The rendered prompt a label answers: one photo and the question naming every label."""
    question = CLASSIFY_QUESTION.format(labels=", ".join(labels))
    message = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}
    return render_chat(template.text, as_parts([message], IMAGE_MARKER))


def check_labels(labels: tuple[str, ...]) -> None:
    """A vision-language model classifies among at least two distinct, non-empty labels."""
    if labels and (len(labels) < 2 or len(set(labels)) != len(labels) or not all(labels)):
        raise PackagerError(
            f"--labels {','.join(labels)}: give at least two distinct, non-empty labels"
        )


def vision_outcome(
    llm: Any,
    projector_path: Path,
    pair: ProjectorPair,
    template: PinnedTemplate,
    photos: list[Pixels],
    work: Path,
    *,
    threads: int,
    labels: tuple[str, ...] = (),
) -> VisionOutcome:
    """Open the projector beside `llm`, record the goldens (with every label's score when the
    bundle classifies) and measure the image path."""
    side = pair.image_size
    try:
        projector = Projector(llm, projector_path, threads=threads)
    except BundleError as exc:
        raise SourceError(f"the bundle was not written: {exc}") from exc
    try:
        prompt = golden_prompt(template)
        asked = classify_prompt(template, labels) if labels else None
        golden, files, tokens = [], {}, 0
        for number, photo in enumerate(photos):
            text, tokens = _completion(llm, projector, prompt, photo)
            again, _ = _completion(llm, projector, prompt, photo)
            if text != again:
                raise PackagerError(
                    f"greedy decoding with a photo is not deterministic on this machine ({text!r} "
                    f"then {again!r}); check the llama-cpp-python build before packaging"
                )
            name = f"{GOLDEN_DIR}/vision-{number}.png"
            path = work / f"vision-{number}.png"
            cv2.imwrite(str(path), cv2.cvtColor(photo, cv2.COLOR_RGB2BGR))
            files[name] = path
            label, scores = _classified(llm, projector, asked, photo, labels)
            golden.append(
                VisionGolden(
                    prompt=prompt,
                    images=(name,),
                    max_tokens=VISION_GOLDEN_TOKENS,
                    expected_text=text,
                    label=label,
                    scores=scores,
                )
            )
        timing = _measure(llm, projector, prompt, photos[0])
        if asked is not None:
            timing["classify_ms"] = _classify_ms(llm, projector, asked, photos[0], labels)
    except BundleError as exc:
        raise PackagerError(f"the photo could not be evaluated: {exc}") from exc
    finally:
        projector.close()
    return VisionOutcome(projector_path, pair, side, tokens, tuple(golden), files, timing, asked)


def _classified(
    llm: Any, projector: Projector, asked: str | None, photo: Pixels, labels: tuple[str, ...]
) -> tuple[str | None, tuple[float, ...]]:
    """The golden's label and scores, computed twice: they must repeat."""
    if asked is None:
        return None, ()
    first = projector.label_scores(llm, asked, [photo], labels)
    again = projector.label_scores(llm, asked, [photo], labels)
    if max(abs(first[label] - again[label]) for label in labels) > SCORE_REPEAT_TOLERANCE:
        raise PackagerError(
            "the label scores of a photo differ between two runs on this machine; check the "
            "llama-cpp-python build before packaging"
        )
    return max(labels, key=first.__getitem__), tuple(round(first[label], 6) for label in labels)


def _classify_ms(
    llm: Any, projector: Projector, asked: str, photo: Pixels, labels: tuple[str, ...]
) -> float:
    rounds = []
    for _ in range(BENCH_ROUNDS):
        start = time.perf_counter()
        projector.label_scores(llm, asked, [photo], labels)
        rounds.append(time.perf_counter() - start)
    return round(1000 * statistics.median(rounds), 3)


def _completion(llm: Any, projector: Projector, prompt: str, photo: Pixels) -> tuple[str, int]:
    evaluated = projector.evaluate(llm, prompt, [photo])
    out = llm.create_completion(
        prompt=evaluated.completion_prompt(),
        max_tokens=VISION_GOLDEN_TOKENS,
        temperature=0.0,
        repeat_penalty=1.0,
        stream=False,
    )
    return str(out["choices"][0]["text"]), evaluated.image_tokens


def _measure(llm: Any, projector: Projector, prompt: str, photo: Pixels) -> dict[str, float]:
    """Milliseconds, medians of `BENCH_ROUNDS`: the prompt with and without the photo (their
    difference is the image's encode and decode), and the first token after the photo."""
    text_only = prompt.replace(IMAGE_MARKER, "")
    with_photo, without, first = [], [], []
    projector.evaluate(llm, prompt, [photo])  # warm-up: first-call allocations
    for _ in range(BENCH_ROUNDS):
        start = time.perf_counter()
        evaluated = projector.evaluate(llm, prompt, [photo])
        with_photo.append(time.perf_counter() - start)
        # `generate` evaluates the prompt's last token again, then yields the first new one
        for _ in llm.generate(evaluated.completion_prompt(), temp=0.0, top_k=1):
            break
        first.append(time.perf_counter() - start)
        start = time.perf_counter()
        projector.evaluate(llm, text_only, [])
        without.append(time.perf_counter() - start)
    image_ms = 1000 * statistics.median(with_photo)
    text_ms = 1000 * statistics.median(without)
    return {
        "image_prompt_ms": round(image_ms, 3),
        "text_prompt_ms": round(text_ms, 3),
        "image_encode_ms": round(max(0.0, image_ms - text_ms), 3),
        "ttft_image_ms": round(1000 * statistics.median(first), 3),
    }


def kv_cache_mb(fields: dict[str, Any], context: int) -> float:
    """The f16 KV cache of `context` tokens, from the text model's header."""
    architecture = fields.get("general.architecture")
    layers = fields.get(f"{architecture}.block_count")
    heads = fields.get(f"{architecture}.attention.head_count")
    kv_heads = fields.get(f"{architecture}.attention.head_count_kv") or heads
    width = fields.get(f"{architecture}.embedding_length")
    key_length = fields.get(f"{architecture}.attention.key_length")
    if not (
        isinstance(layers, int)
        and isinstance(heads, int)
        and isinstance(kv_heads, int)
        and isinstance(width, int)
    ):
        return 0.0
    head_dim = key_length if isinstance(key_length, int) else width // heads
    return 2 * layers * context * kv_heads * head_dim * 2 / 1e6
