"""A language model as the agent serves it: bundle + llama session + pinned chat template.

Prompts for chat are rendered with the bundle's pinned template in a sandboxed Jinja
environment (`edge_bundle.chat_template`); a bundle without one serves plain completion only.
The text self-test replays the bundle's golden greedy completions and requires them exactly.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from edge_agent.engine.selftest import SelfTestReport
from edge_agent.errors import BadRequestError, RuntimeLoadError
from edge_agent.runtimes import runtime_for
from edge_agent.runtimes.base import TextRequest, TextSession
from edge_bundle.bundle import VerifiedBundle
from edge_bundle.errors import BundleError
from edge_bundle.hashing import sha256_file
from edge_bundle.manifest import Generation
from edge_bundle.profiles import HardwareProfile


@dataclass
class Generator:
    """A loaded text-generation bundle."""

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

    def chat_prompt(self, messages: list[dict[str, str]]) -> str:
        """The prompt for a conversation, rendered with the pinned template (sandboxed)."""
        if self.template is None:
            raise BadRequestError(
                f"{self.name} has no chat template (plain completion only); send a prompt to "
                f"/v1/models/{self.name}/generate or /v1/completions instead"
            )
        from edge_bundle.chat_template import render_chat

        try:
            return render_chat(self.template, messages)
        except BundleError as exc:
            raise BadRequestError(f"the conversation cannot be rendered: {exc}") from exc

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
        }

    def close(self) -> None:
        self.session.close()


def load_generator(bundle: VerifiedBundle, profile: HardwareProfile, cache_dir: Path) -> Generator:
    manifest = bundle.manifest
    if manifest.task != "text-generation" or manifest.generation is None:
        raise RuntimeLoadError(
            f"{bundle.bundle_id} is not a text-generation bundle with a generation section; "
            "rebuild it with model-packager"
        )
    template = None
    pinned = manifest.generation.chat_template
    if pinned is not None:
        path = bundle.path(pinned.path)
        if sha256_file(path) != pinned.sha256:
            raise RuntimeLoadError(f"{bundle.bundle_id}: the chat template does not match its pin")
        template = path.read_text(encoding="utf-8")
        from edge_bundle.chat_template import check_template

        try:
            check_template(template)
        except BundleError as exc:
            raise RuntimeLoadError(f"{bundle.bundle_id}: chat template refused: {exc}") from exc
    session = runtime_for(manifest.runtime).load(bundle, profile, cache_dir)
    if not hasattr(session, "stream"):
        session.close()
        raise RuntimeLoadError(
            f"{bundle.bundle_id}: runtime {manifest.runtime} does not generate text"
        )
    return Generator(bundle, cast(TextSession, session), manifest.generation, template)


def run_text_selftest(generator: Generator) -> SelfTestReport:
    """Replay every golden greedy completion; each must come out exactly as packaged."""
    started = time.perf_counter()
    failures = []
    golden = generator.generation.golden
    for number, sample in enumerate(golden):
        request = TextRequest(sample.prompt, max_tokens=sample.max_tokens, temperature=0.0)
        text = "".join(
            chunk.text
            for chunk in generator.session.stream(
                request, cancelled=lambda: False, between_tokens=lambda: None
            )
        )
        if text != sample.expected_text:
            failures.append(
                f"golden completion {number} differs: got {text[:60]!r}, expected "
                f"{sample.expected_text[:60]!r}"
            )
    if not golden:
        failures.append("the bundle has no golden completions")
    return SelfTestReport(
        str(generator.bundle.bundle_id),
        len(golden),
        0.0,
        0.0,
        time.perf_counter() - started,
        tuple(failures),
    )
