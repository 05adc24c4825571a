"""A prompt with photos must end in text before llama.cpp continues it: llama-cpp-python evaluates
a prompt's last token again for its logits, and an image position holds no token id. Fakes stand
in for llama.cpp and the projector (the real pair is in tests/integration/test_agent_vlm.py)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from edge_agent.errors import BadRequestError
from edge_agent.runtimes import llama as llama_runtime
from edge_agent.runtimes.base import TextRequest
from edge_bundle.llama_vision import IMAGE_MARKER, EndsWithImageError, Evaluated

BOS, NEWLINE, IMAGE = 1, 13, -7  # an image position's "token" is whatever the buffer held
GREY = np.full((8, 8, 3), 128, dtype=np.uint8)


class FakeLlama:
    def __init__(self) -> None:
        self.completions: list[list[int]] = []

    def tokenize(self, text: bytes, add_bos: bool = True, special: bool = False) -> list[int]:
        return ([BOS] if add_bos else []) + [NEWLINE] * text.count(b"\n")

    def create_completion(self, prompt: list[int], **options: Any) -> Any:
        self.completions.append(list(prompt))
        piece = {"choices": [{"text": "ok", "finish_reason": "stop"}]}
        return (p for p in [piece]) if options.get("stream") else piece


class LayoutProjector:
    """Lays a photo out as LLaVA's projector does: image positions only, no wrapper text."""

    def __init__(self, image_tokens: int = 4) -> None:
        self.image_tokens = image_tokens
        self.texts: list[str] = []

    def evaluate(self, llama: Any, text: str, images: Any) -> Evaluated:
        self.texts.append(text)
        tokens, ends_with_text = [BOS], True
        for index, part in enumerate(text.split(IMAGE_MARKER)):
            if index:
                tokens += [IMAGE] * self.image_tokens
                ends_with_text = False
            if part:
                tokens += [NEWLINE] * part.count("\n")
                ends_with_text = True
        return Evaluated(tokens, self.image_tokens * len(images), ends_with_text)

    def label_scores(self, llama: Any, text: str, images: Any, labels: Any) -> dict[str, float]:
        if not self.evaluate(llama, text, images).ends_with_text:
            raise EndsWithImageError()
        return {label: 1.0 / len(labels) for label in labels}


@pytest.fixture(autouse=True)
def no_llama_cpp(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(llama_runtime, "clear_state", lambda llama: None)


def test_a_prompt_that_ends_with_a_photo_has_no_completion_prompt() -> None:
    with pytest.raises(EndsWithImageError, match="put text after the last photo"):
        Evaluated([BOS, IMAGE, IMAGE], 2, ends_with_text=False).completion_prompt()
    assert Evaluated([BOS, IMAGE, NEWLINE], 1, ends_with_text=True).completion_prompt() == [
        BOS,
        IMAGE,
        NEWLINE,
    ]


def test_the_agent_refuses_a_prompt_ending_with_a_photo_and_never_feeds_llama_cpp() -> None:
    llama = FakeLlama()
    session = llama_runtime.LlamaSession(llama, LayoutProjector(), image_positions=4)  # type: ignore[arg-type]
    request = TextRequest(prompt=f"Look: {IMAGE_MARKER}", images=(GREY,))
    with pytest.raises(BadRequestError, match="ends with a photo"):
        list(session.stream(request, cancelled=lambda: False, between_tokens=lambda: None))
    assert llama.completions == []
    with pytest.raises(BadRequestError, match="ends with a photo"):
        session.label_scores(request.prompt, request.images, ("dent", "scratch"))

    answered = TextRequest(prompt=f"Look: {IMAGE_MARKER}\n", images=(GREY,))
    chunks = list(session.stream(answered, cancelled=lambda: False, between_tokens=lambda: None))
    assert "".join(chunk.text for chunk in chunks) == "ok"
    assert llama.completions == [[BOS, IMAGE, IMAGE, IMAGE, IMAGE, NEWLINE]]


def test_the_warm_up_photo_is_followed_by_text_and_counts_only_the_photo() -> None:
    llama, projector = FakeLlama(), LayoutProjector(image_tokens=6)
    positions = llama_runtime._warm_image_path(llama, projector, 16)  # type: ignore[arg-type]
    assert positions == 6
    assert projector.texts[0].startswith(IMAGE_MARKER) and projector.texts[0] != IMAGE_MARKER
    assert llama.completions[0][-1] == NEWLINE  # what llama.cpp evaluates again is a token
