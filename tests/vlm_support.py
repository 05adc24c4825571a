"""Test helpers for vision-language bundles: a tiny SmolVLM made from a `transformers` config
(hubs are unreachable and no small vision-language weights ship on PyPI), with a LoRA adapter.

The text side is the tiny Llama of `llm_support` (SentencePiece, briefly trained on our prose);
its tokenizer gains the tokens llama.cpp's multimodal library looks up around an Idefics3/SmolVLM
image: `<fake_token_around_image>`, `<global-img>` and the paragraph break `\\n\\n` as one token,
plus `<image>` (the image token the transformers model expects). The vision tower is random,
64 x 64 pixels in 16-pixel patches with a pixel-shuffle factor of 2: four image tokens per photo.

The chat template is our own, in SmolVLM's shape: a message's content is a string or a list of
parts, and an image part becomes the image marker. The tiny model's text is gibberish; what the
tests check is that it is the same gibberish everywhere, and that the photo changes it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.llm_support import _train, train_tokenizer

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


def make_tiny_smolvlm(directory: Path, *, train_steps: int = 30, text_width: int = 64) -> Path:
    """A SmolVLM checkpoint directory (config, safetensors, tokenizer, preprocessor config)."""
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
    _teach_colours(model, tokenizer, train_steps)
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


def _teach_colours(model: Any, tokenizer: Any, steps: int) -> None:
    """A few steps so that the answer depends on the photo: reddish parts are "scratch",
    bluish ones "dent" (the image tokens laid out as transformers' SmolVLM processor does)."""
    import torch

    image = "<fake_token_around_image><global-img>" + "<image>" * IMAGE_TOKENS
    rows, pixels, answers = [], [], []
    for seed in range(16):
        answer = list(ANSWERS)[seed % 2]
        prompt = f"User: {image}<fake_token_around_image>{QUESTION}<end_of_utterance>\nAssistant:"
        ids = tokenizer(prompt).input_ids
        target = tokenizer(" " + answer, add_special_tokens=False).input_ids
        rows.append((ids, target))
        photo = torch.tensor(colour_photo(answer, seed), dtype=torch.float32) / 255.0
        pixels.append(((photo - 0.5) / 0.5).permute(2, 0, 1))
        answers.append(answer)
    width = max(len(ids) + len(target) for ids, target in rows)
    input_ids = torch.full((len(rows), width), tokenizer.eos_token_id)
    labels = torch.full((len(rows), width), -100)
    for row, (ids, target) in enumerate(rows):
        input_ids[row, : len(ids) + len(target)] = torch.tensor(ids + target)
        labels[row, len(ids) : len(ids) + len(target)] = torch.tensor(target)
    pixel_values = torch.stack(pixels)[:, None]
    optimiser = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=input_ids, pixel_values=pixel_values, labels=labels).loss
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
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
