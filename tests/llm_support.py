"""Test helpers for language-model bundles: a tiny Llama-architecture causal LM made from a config
(hubs are unreachable), with a SentencePiece tokenizer trained offline on our own prose, briefly
trained so that its predictions are not uniform, and a LoRA adapter for it.

llama.cpp's converter recognises SentencePiece tokenizers by their `tokenizer.model`; a random BPE
tokenizer would be refused (it fingerprints BPE pre-tokenizers), hence SentencePiece here.
"""

from __future__ import annotations

import io
from pathlib import Path

from model_packager.llm.eval import DEFAULT_EVAL_TEXT

# Our own prose about the shop floor: the tokenizer's training corpus and the model's lessons.
CORPUS = """\
The press on line three stamps brackets from cold rolled steel at forty strokes a minute.
Each bracket is checked for burrs, cracks and scratches before it goes to the paint booth.
When the die wears, the edges of the parts grow sharp and the operator files a report.
The maintenance crew changes the die every two weeks and logs the hours it has run.
A scratch on a painted panel is usually caused by a worn guide rail or a loose fixture.
A dent near the corner of a part often means the gripper at the transfer station closed too hard.
Stains on a blasted surface come from oil that drips from the conveyor chain above the line.
The quality engineer compares the defect counts of each shift and looks for a common cause.
Operators clean the lens of the inspection camera at the start of every shift.
If the camera sees a crack, the part is set aside and the press is stopped for inspection.
The foreman reads the daily report and decides which machine needs attention first.
Spare parts for the press are kept in the store room next to the tool crib.
A new operator learns the line by shadowing an experienced colleague for a week.
The line stops for ten minutes at noon so that the crew can eat and rest.
Every pallet of finished brackets is labelled with the date, the shift and the press number.
"""


def train_tokenizer(directory: Path, vocab_size: int = 400) -> Path:
    """A BPE SentencePiece model trained on our prose, saved as `tokenizer.model`."""
    import sentencepiece as spm

    stream = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_text().splitlines() * 4),
        model_writer=stream,
        vocab_size=vocab_size,
        model_type="bpe",
        character_coverage=1.0,
        # llama.cpp looks up byte tokens (<0x0A> for a newline) when it loads a SentencePiece vocab.
        byte_fallback=True,
        bos_id=1,
        eos_id=2,
        unk_id=0,
        pad_id=-1,
        minloglevel=2,
        num_threads=1,
    )
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "tokenizer.model"
    path.write_bytes(stream.getvalue())
    return path


def make_tiny_llama(
    directory: Path, *, train_steps: int = 40, chat_template: str | None = None
) -> Path:
    """A 2-layer, 64-wide Llama causal LM with its tokenizer, trained a little on our prose (the
    packager's default evaluation text included: a model fine-tuned on its domain)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaTokenizer

    torch.manual_seed(0)
    train_tokenizer(directory)
    tokenizer = LlamaTokenizer(
        vocab_file=str(directory / "tokenizer.model"), legacy=False, add_bos_token=True
    )
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(directory)
    config = LlamaConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    _train(model, tokenizer, train_steps)
    model.save_pretrained(directory, safe_serialization=True)
    return directory


def _train(model: object, tokenizer: object, steps: int) -> None:
    import torch

    ids = tokenizer(_text(), return_tensors="pt").input_ids  # type: ignore[operator]
    rows = ids.shape[1] // 128
    ids = ids[0, : rows * 128].reshape(rows, 128)  # sequences within the 256-token context
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-2)  # type: ignore[attr-defined]
    model.train()  # type: ignore[attr-defined]
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss  # type: ignore[operator]
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    model.eval()  # type: ignore[attr-defined]


def _text() -> str:
    return CORPUS + DEFAULT_EVAL_TEXT


def make_causal_lora(base: Path, directory: Path) -> Path:
    """A LoRA adapter (random, small, non-zero) on the attention projections of the tiny Llama."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    torch.manual_seed(1)
    model = LlamaForCausalLM.from_pretrained(base)
    config = LoraConfig(
        r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False, task_type="CAUSAL_LM"
    )
    peft_model = get_peft_model(model, config)
    with torch.no_grad():  # a small delta: visible in the merged weights, the model still works
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.mul_(0.05)
    peft_model.save_pretrained(directory)
    return directory
