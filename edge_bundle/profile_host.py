"""Whether this machine is the kind of box a firmware profile describes.

The packager asks this to decide whether a benchmark was "measured on the target". The host is
read from `platform.machine()`, `/proc/cpuinfo` (kernel-relevant CPU features, in the profile's
vocabulary), the CPUs this process may run on, and the GPUs visible in sysfs / the NVIDIA driver.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass, field
from pathlib import Path

from edge_bundle.profiles import FEATURES_BY_ARCH, HardwareProfile

# Linux /proc/cpuinfo spells some aarch64 features differently.
CPUINFO_NAMES = {"neon": "asimd", "dotprod": "asimddp", "fp16": "asimdhp"}
PCI_VENDORS = {"0x10de": "nvidia", "0x8086": "intel", "0x1002": "amd"}


@dataclass(frozen=True)
class HostInfo:
    """What this machine offers, in the profile's vocabulary."""

    arch: str
    features: frozenset[str]
    cores: int
    gpu_vendors: frozenset[str] = frozenset()


@dataclass(frozen=True)
class HostMatch:
    """Whether a host is the profile's target, and why (every difference when it is not)."""

    matches: bool
    reasons: list[str] = field(default_factory=list)


def read_host(cpuinfo: Path = Path("/proc/cpuinfo"), machine: str | None = None) -> HostInfo:
    """Describe this machine: architecture, kernel-relevant CPU features, usable cores, GPUs.

    `cpuinfo` and `machine` (default `platform.machine()`) can be given to describe another box.
    """
    machine = (machine or platform.machine()).lower()
    arch = {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)
    flags = _cpuinfo_flags(cpuinfo)
    vocabulary = FEATURES_BY_ARCH.get(arch, ())
    features = frozenset(f for f in vocabulary if CPUINFO_NAMES.get(f, f) in flags)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return HostInfo(arch, features, cores or 1, _gpu_vendors())


def matches_host(profile: HardwareProfile, host: HostInfo | None = None) -> HostMatch:
    """Is this host (default: this machine) the kind of box `profile` describes?

    Used to decide whether a benchmark was measured on the target. Extra kernel-relevant CPU
    features or more cores also count as a mismatch: they make the numbers optimistic.
    """
    host = host or read_host()
    cpu = profile.cpu
    problems: list[str] = []
    if host.arch != cpu.arch:
        problems.append(f"architecture: host is {host.arch}, profile targets {cpu.arch}")
    else:
        problems += _feature_differences(set(cpu.features), host.features)
    if host.cores != cpu.cores:
        problems.append(f"host has {host.cores} usable cores, profile targets {cpu.cores}")
    if profile.gpu and profile.gpu.vendor not in host.gpu_vendors:
        problems.append(f"no {profile.gpu.vendor} GPU found on the host ({profile.gpu.model})")
    if problems:
        return HostMatch(False, problems)
    gpu = f", {profile.gpu.vendor} GPU present" if profile.gpu else ""
    features = ", ".join(cpu.features) or "none listed"
    summary = f"{cpu.arch}, features {features}, {cpu.cores} cores{gpu}"
    return HostMatch(True, [f"host matches profile '{profile.name}': {summary}"])


def _feature_differences(wanted: set[str], present: frozenset[str]) -> list[str]:
    problems = []
    if missing := sorted(wanted - present):
        problems.append(f"host lacks CPU features {', '.join(missing)}")
    if extra := sorted(present - wanted):
        problems.append(
            f"host has CPU features {', '.join(extra)} that the target lacks; "
            "its kernels would run faster than on the target"
        )
    return problems


def _cpuinfo_flags(cpuinfo: Path) -> set[str]:
    try:
        text = cpuinfo.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in {"flags", "Features"}:
            return set(value.split())
    return set()


def _gpu_vendors() -> frozenset[str]:
    vendors = {
        PCI_VENDORS.get(_read_text(path), "")
        for path in Path("/sys/class/drm").glob("card*/device/vendor")
    }
    # The NVIDIA driver lists its GPUs here; Jetson's integrated GPU is not on PCI and shows up
    # as a device node instead.
    driver_gpus = Path("/proc/driver/nvidia/gpus")
    if driver_gpus.is_dir() and any(driver_gpus.iterdir()):
        vendors.add("nvidia")
    if Path("/dev/nvhost-ctrl-gpu").exists():
        vendors.add("nvidia")
    return frozenset(vendors - {""})


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return ""
