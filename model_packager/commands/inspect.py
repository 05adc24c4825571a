"""`model-packager inspect`: what a bundle holds, readable or as JSON."""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from edge_bundle.archive import extract_archive
from edge_bundle.bundle import open_bundle
from edge_bundle.manifest import MANIFEST_FILE, Manifest
from edge_bundle.signing import TrustStore
from model_packager.commands import Subparsers


def register(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "inspect",
        help="show a bundle's manifest (readable, or --json)",
        description=(
            "Show what a bundle holds. With --key the signature and every file are verified "
            "first; without, the manifest is read from a safe extraction and marked unverified."
        ),
    )
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--json", action="store_true", help="print the manifest as JSON")
    parser.add_argument(
        "--key", dest="keys", action="append", type=Path, default=[], metavar="PUBKEY"
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="model-packager-inspect-") as staging:
        if args.keys:
            verified = open_bundle(args.bundle, TrustStore.from_files(args.keys), Path(staging))
            manifest, status = verified.manifest, f"verified, signed by {verified.signer_key_id}"
        else:
            extracted = extract_archive(args.bundle, Path(staging))
            data = (extracted.directory / MANIFEST_FILE).read_bytes()
            manifest, status = Manifest.from_bytes(data), "NOT verified (pass --key to verify)"
    if args.json:
        print(
            json.dumps({"status": status, "manifest": manifest.model_dump(mode="json")}, indent=2)
        )
    else:
        print("\n".join(describe(manifest, status)))
    return 0


def describe(manifest: Manifest, status: str) -> list[str]:
    """A readable summary of a manifest."""
    lines = [
        f"{manifest.bundle_id}  ({status})",
        f"  task        {manifest.task} on {manifest.runtime}, created {manifest.created_at:%Y-%m-%d %H:%M} UTC",
        f"  profiles    {', '.join(manifest.compatible_profiles) or '-'}",
    ]
    if manifest.labels:
        lines.insert(
            2,
            f"  labels      {len(manifest.labels)}: {', '.join(manifest.labels[:8])}"
            + (" ..." if len(manifest.labels) > 8 else ""),
        )
    if manifest.quantization:
        q = manifest.quantization
        types = f"weights {q.weight_type}" + (
            f", activations {q.activation_type}" if q.activation_type else ""
        )
        lines.append(f"  quantized   {q.method} ({types})")
    if manifest.validation:
        v = manifest.validation
        for name in (
            "reference_perplexity",
            "candidate_perplexity",
            "perplexity_increase_pct",
            "top1_token_agreement",
            "top1_agreement",
            "confident_top1_agreement",
            "top5_containment",
            "reference_accuracy",
            "candidate_accuracy",
        ):
            if name in v.metrics:
                lines.append(f"  {name:<26} {v.metrics[name]:.4f}")
        for gate in v.gates:
            lines.append(
                f"  gate {gate.name:<21} {'pass' if gate.passed else 'FAIL'} ({gate.value:.4f} vs {gate.threshold:.4f})"
            )
        if v.waived_reason:
            lines.append(f"  WAIVED      {v.waived_reason}")
    for bench in manifest.benchmarks:
        where = "on target" if bench.measured_on_target else "not on target"
        per = " per token" if manifest.generation else ""
        lines.append(
            f"  latency     {bench.profile}: p50 {bench.p50_ms:.2f} ms, p95 {bench.p95_ms:.2f} ms{per} ({where}, {bench.machine.cpu})"
        )
        if "generation_tokens_per_s" in bench.metrics:
            m = bench.metrics
            lines.append(
                f"  speed       {m['generation_tokens_per_s']:.1f} tokens/s generation, "
                f"{m.get('prompt_tokens_per_s', 0.0):.1f} tokens/s prompt, first token "
                f"{m.get('ttft_ms', 0.0):.0f} ms at {bench.threads} thread(s)"
            )
    if manifest.golden:
        lines.append(
            f"  golden      {len(manifest.golden.samples)} samples, tolerance {manifest.golden.tolerance}"
        )
    if manifest.generation:
        lines += _generation(manifest)
    lines.append(
        f"  files       {len(manifest.files)}, {sum(f.size for f in manifest.files) / 1e6:.2f} MB"
    )
    for entry in manifest.files:
        lines.append(f"    {entry.path:<24} {entry.role:<10} {entry.size:>10} {entry.sha256[:16]}")
    return lines


def _generation(manifest: Manifest) -> list[str]:
    """The text-generation section: context, template, stop strings, golden completions."""
    generation = manifest.generation
    assert generation is not None
    template = generation.chat_template
    lines = [
        f"  context     {generation.context_size} tokens",
        "  template    "
        + (
            f"{template.path} ({template.source}, sha256 {template.sha256[:16]})"
            if template
            else "none: plain completion only"
        ),
        f"  stop        {', '.join(repr(s) for s in generation.stop) or '-'}",
    ]
    for number, golden in enumerate(generation.golden):
        prompt = " ".join(golden.prompt.split())
        lines.append(
            f"  golden {number}    {prompt[:48]!r}{'...' if len(prompt) > 48 else ''} -> "
            f"{golden.expected_text[:48]!r} ({golden.max_tokens} tokens, greedy)"
        )
    return lines
