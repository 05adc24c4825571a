"""CPU classes: groups of CPUs on which ONNX Runtime's int8 kernels compute the same numbers.

ONNX Runtime multiplies uint8 activations by int8 weights differently by instruction set. Without
VNNI (AVX2, and AVX-512 without VNNI) it adds two adjacent u8 x s8 products in a 16-bit register
that saturates (`vpmaddubsw`); with AVX-VNNI, AVX-512 VNNI or AMX every product is summed exactly
in 32 bits (AMX and AVX-512 VNNI gave bit-identical outputs for every model measured). ARM's
dot-product kernels are exact too, but are a different code path. An int8 model validated on one
class is therefore not validated on another: the packager and the box both name the class a
figure was measured on, with the names below.
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import StrEnum


class CpuClass(StrEnum):
    """How int8 arithmetic behaves on a CPU (the name recorded beside every accuracy figure)."""

    X86_AVX2 = "x86-64-avx2"  # AVX2, no VNNI: 16-bit saturating pair sums
    X86_AVX512 = "x86-64-avx512"  # AVX-512BW, no VNNI: the same saturation, wider registers
    X86_VNNI = "x86-64-vnni"  # AVX-VNNI, AVX-512 VNNI or AMX: exact 32-bit sums
    X86_BASELINE = "x86-64-sse"  # neither AVX2 nor VNNI: SSE kernels
    ARM64_DOTPROD = "arm64-dotprod"
    ARM64 = "arm64"
    OTHER = "other"

    @property
    def saturates(self) -> bool:
        """True where u8 x s8 pair sums saturate at 16 bits (the int8 accuracy trap)."""
        return self in (CpuClass.X86_AVX2, CpuClass.X86_AVX512)


VNNI_FEATURES = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})


def classify(arch: str, features: Iterable[str]) -> CpuClass:
    """The class of a CPU from its architecture and features (profile vocabulary)."""
    present = set(features)
    if arch == "x86_64":
        if present & VNNI_FEATURES:
            return CpuClass.X86_VNNI
        if "avx512bw" in present:
            return CpuClass.X86_AVX512
        if "avx2" in present:
            return CpuClass.X86_AVX2
        return CpuClass.X86_BASELINE
    if arch == "aarch64":
        return CpuClass.ARM64_DOTPROD if "dotprod" in present else CpuClass.ARM64
    return CpuClass.OTHER


def host_class() -> CpuClass:
    """The class of this machine."""
    from edge_bundle.profile_host import read_host

    host = read_host()
    return classify(host.arch, host.features)
