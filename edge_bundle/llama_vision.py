"""Photos into a llama.cpp language model: the projector (mmproj) opened beside a loaded text
model, a prompt with image markers evaluated with its images, and per-label scores.

The packager records golden multimodal completions with this module and the agent replays and
serves them with it, so both evaluate a prompt the same way. It follows what llama-cpp-python's
own `MTMDChatHandler` does (an empty state, text chunks through `Llama.eval`, image chunks through
`mtmd_helper_eval_chunk_single`, then `create_completion` on the evaluated tokens) with one
difference: images arrive as RGB pixels, already decoded by `edge_bundle.imaging`'s hardened
decoder and scaled to the projector's size (`fit_image`), never as bytes for llama.cpp's own
image loader, and never fetched from a URL. The same pixels as a lossless PNG given to
`MTMDChatHandler` produce the same completion; the tests hold that.

`Llama` and the projector are not thread-safe: one caller at a time, as for text.
"""

from __future__ import annotations

import ctypes
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from numpy.typing import NDArray

from edge_bundle.errors import BundleError
from edge_bundle.llama_state import clear_state

#: What a chat template writes where an image goes: llama.cpp's default media marker.
IMAGE_MARKER = "<__media__>"
Pixels = NDArray[np.uint8]  # H x W x 3 RGB


class VisionError(BundleError):
    """The projector cannot be opened, or a prompt with images cannot be evaluated."""


class EndsWithImageError(VisionError):
    """A prompt's last position is an image's: it has no next-token logits to answer from."""

    def __init__(self) -> None:
        super().__init__(
            "the prompt ends with a photo, and the model answers only after text: put text "
            "after the last photo (the question, or the chat template's answer prefix)"
        )


@dataclass(frozen=True)
class Evaluated:
    """A prompt evaluated into the model's state: every position (text and image), and how many
    of them the images took."""

    tokens: list[int]
    image_tokens: int
    ends_with_text: bool  # the last position's logits are the next token's (not an image's)

    def completion_prompt(self) -> list[int]:
        """`tokens`, to continue with `create_completion`; raises `EndsWithImageError` when the
        prompt ends with an image. llama-cpp-python evaluates a prompt's last token again for
        its logits, and an image position holds no token id (`Llama.input_ids` keeps whatever
        was there), so it would feed llama.cpp a stray token in the image's place."""
        if not self.ends_with_text:
            raise EndsWithImageError()
        return self.tokens


def fit_image(pixels: Pixels, side: int) -> Pixels:
    """`pixels` scaled (area-averaged) so the longer side is at most `side`; never enlarged.
    The projector sees an image of its own size as one tile, so a 12-MP photo costs the same
    encode as a 0.3-MP one."""
    height, width = pixels.shape[:2]
    longest = max(height, width)
    if longest <= side:
        return np.ascontiguousarray(pixels, dtype=np.uint8)
    scale = side / longest
    size = (max(1, math.floor(width * scale + 0.5)), max(1, math.floor(height * scale + 0.5)))
    return np.ascontiguousarray(cv2.resize(pixels, size, interpolation=cv2.INTER_AREA))


def png_data_url(pixels: Pixels) -> str:
    """The pixels as a lossless PNG `data:` URL (what a client, or `MTMDChatHandler`, sends)."""
    import base64

    ok, encoded = cv2.imencode(".png", cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR))
    if not ok:
        raise VisionError("the image could not be encoded as PNG")
    return "data:image/png;base64," + base64.b64encode(encoded.tobytes()).decode("ascii")


class Projector:
    """An mmproj file opened for a loaded `llama_cpp.Llama` (its text model)."""

    def __init__(self, llama: Any, path: Path, *, threads: int, use_gpu: bool = False) -> None:
        from llama_cpp import mtmd_cpp

        _quiet_logs()
        self._mtmd = mtmd_cpp
        params = mtmd_cpp.mtmd_context_params_default()
        params.use_gpu = use_gpu
        params.print_timings = False
        params.n_threads = threads
        self._ctx = mtmd_cpp.mtmd_init_from_file(str(path).encode(), llama.model, params)
        if self._ctx is None:
            raise VisionError(
                f"llama.cpp could not open the projector {path.name} for this text model; the "
                "projector was made for another model (its output width differs from the text "
                "model's embedding width) or the file is damaged"
            )
        if not mtmd_cpp.mtmd_support_vision(self._ctx):
            self.close()
            raise VisionError(f"{path.name} is a projector without a vision encoder")

    def evaluate(self, llama: Any, text: str, images: Sequence[Pixels]) -> Evaluated:
        """Evaluate `text` (with one `IMAGE_MARKER` per image) and `images` from an empty
        state; what follows is `llama.create_completion(prompt=evaluated.tokens, ...)`."""
        mtmd = self._mtmd
        if text.count(IMAGE_MARKER) != len(images):
            raise VisionError(
                f"the prompt has {text.count(IMAGE_MARKER)} image markers for {len(images)} "
                "images; the chat template must write one marker per image part"
            )
        bitmaps = [self._bitmap(image) for image in images]
        chunks = mtmd.mtmd_input_chunks_init()
        try:
            encoded = text.encode("utf-8")
            source = mtmd.mtmd_input_text()
            source.text, source.text_len = encoded, len(encoded)
            source.add_special, source.parse_special = True, True
            array = (mtmd.mtmd_bitmap_p_ctypes * len(bitmaps))(*bitmaps)
            code = mtmd.mtmd_tokenize(self._ctx, chunks, ctypes.byref(source), array, len(bitmaps))
            if code != 0:
                raise VisionError(f"llama.cpp could not tokenize the prompt (error {code})")
            clear_state(llama)
            image_tokens, ends_with_text = 0, False
            for index in range(mtmd.mtmd_input_chunks_size(chunks)):
                chunk = mtmd.mtmd_input_chunks_get(chunks, index)
                if chunk is None:
                    continue
                if mtmd.mtmd_input_chunk_get_type(chunk) == mtmd.MTMD_INPUT_CHUNK_TYPE_TEXT:
                    count = ctypes.c_size_t()
                    pointer = mtmd.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(count))
                    tokens = [pointer[i] for i in range(count.value)]
                    self._fits(llama, len(tokens))
                    if tokens:
                        llama.eval(tokens)
                        ends_with_text = True
                    continue
                size = mtmd.mtmd_input_chunk_get_n_tokens(chunk)
                self._fits(llama, size)
                image_tokens += size
                self._eval_image(llama, chunk)
                ends_with_text = False
            tokens = llama.input_ids[: llama.n_tokens].tolist()
            return Evaluated(tokens, image_tokens, ends_with_text)
        finally:
            mtmd.mtmd_input_chunks_free(chunks)
            for bitmap in bitmaps:
                mtmd.mtmd_bitmap_free(bitmap)

    def label_scores(
        self, llama: Any, text: str, images: Sequence[Pixels], labels: Sequence[str]
    ) -> dict[str, float]:
        """The probability of each label as the answer to the prompt, from the model's own
        log-probabilities of the label's tokens, normalised over the labels. Every label is
        scored (constrained decoding by enumeration): the answer is always one of them."""
        evaluated = self.evaluate(llama, text, images)
        if not evaluated.ends_with_text:
            raise EndsWithImageError()
        start = llama.n_tokens
        first = _last_log_probabilities(llama)
        totals = []
        for label in labels:
            tokens = label_tokens(llama, text, label)
            total = float(first[tokens[0]])
            llama.n_tokens = start  # `eval` drops the cache from n_tokens on
            for previous, token in itertools.pairwise(tokens):
                llama.eval([previous])
                total += float(_last_log_probabilities(llama)[token])
            totals.append(total)
        llama.n_tokens = start
        llama.input_ids[:start] = evaluated.tokens
        values = np.asarray(totals)
        probabilities = np.exp(values - values.max())
        probabilities /= probabilities.sum()
        return {label: float(p) for label, p in zip(labels, probabilities, strict=True)}

    def close(self) -> None:
        ctx, self._ctx = self._ctx, None
        if ctx is not None:
            self._mtmd.mtmd_free(ctx)

    def _bitmap(self, image: Pixels) -> Any:
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise VisionError("an image must be H x W x 3 RGB bytes")
        height, width = image.shape[:2]
        data = np.ascontiguousarray(image)
        buffer = (ctypes.c_uint8 * data.nbytes).from_buffer_copy(data.tobytes())
        bitmap = self._mtmd.mtmd_bitmap_init(width, height, buffer)
        if bitmap is None:
            raise VisionError(f"llama.cpp refused a {width} x {height} image")
        return bitmap

    def _eval_image(self, llama: Any, chunk: Any) -> None:
        import llama_cpp

        past = llama_cpp.llama_pos(0)
        code = self._mtmd.mtmd_helper_eval_chunk_single(
            self._ctx,
            llama._ctx.ctx,
            chunk,
            llama_cpp.llama_pos(llama.n_tokens),
            llama_cpp.llama_seq_id(0),
            llama.n_batch,
            False,
            ctypes.byref(past),
        )
        if code != 0:
            raise VisionError(f"llama.cpp could not encode the image (error {code})")
        llama.n_tokens = past.value

    @staticmethod
    def _fits(llama: Any, count: int) -> None:
        if llama.n_tokens + count > llama.n_ctx():
            raise VisionError(
                f"the prompt with its images is over the model's context of {llama.n_ctx()} "
                "tokens; send fewer images or a shorter prompt"
            )


def label_tokens(llama: Any, prompt: str, label: str) -> list[int]:
    """The tokens `label` is written with right after `prompt`: after a space when the prompt
    ends without one ("Assistant:" -> " scratch"), tokenized in the context of the prompt's
    last line so that SentencePiece and BPE vocabularies both get the in-context spelling."""
    separator = "" if not prompt or prompt[-1].isspace() else " "
    tail = prompt.rsplit("\n", 1)[-1][-32:]
    before = llama.tokenize(tail.encode("utf-8"), add_bos=False, special=True)
    joined = llama.tokenize((tail + separator + label).encode("utf-8"), add_bos=False, special=True)
    if tail and joined[: len(before)] == before and len(joined) > len(before):
        return list(joined[len(before) :])
    tokens = llama.tokenize((separator + label).encode("utf-8"), add_bos=False, special=False)
    if not tokens:
        raise VisionError(f"the label {label!r} has no tokens in this model's vocabulary")
    return list(tokens)


def _quiet_logs() -> None:
    """Send the multimodal library's log lines (one per image and chunk, at INFO) through
    llama-cpp-python's own log callback, which prints only errors unless a model is verbose."""
    from llama_cpp import _logger, mtmd_cpp

    mtmd_cpp.mtmd_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))
    mtmd_cpp.mtmd_helper_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))


def _last_log_probabilities(llama: Any) -> NDArray[np.float64]:
    """log softmax of the logits of the last evaluated position."""
    row = np.ctypeslib.as_array(llama._ctx.get_logits(), shape=(llama.n_vocab(),))
    row = row.astype(np.float64)
    peak = row.max()
    result: NDArray[np.float64] = row - peak - math.log(float(np.exp(row - peak).sum()))
    return result
