"""Latency measurements the packager records in the manifest.

`measure_pipeline` times what a request costs on the device — decode + preprocess + infer of one
image — at the profile's thread count; `measure_speedup` compares two models on the same input in
interleaved rounds (A, B, A, B …) so that both see the same machine noise. `machine_info` says
where the numbers were taken, so the manifest never passes off a workstation figure as the
target's.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from edge_bundle.manifest import Benchmark, MachineInfo
from edge_bundle.preprocess import PreprocessSpec, preprocess_bytes
from model_packager.onnx_tools import input_name

LIBRARIES = ("onnxruntime", "onnxruntime-gpu", "numpy", "opencv-python-headless", "lineside")


@dataclass(frozen=True)
class Timing:
    samples_ms: tuple[float, ...]

    @property
    def p50(self) -> float:
        return float(np.percentile(self.samples_ms, 50))

    @property
    def p95(self) -> float:
        return float(np.percentile(self.samples_ms, 95))

    def histogram(self, bins: int = 20) -> tuple[list[int], list[float]]:
        counts, edges = np.histogram(self.samples_ms, bins=bins)
        return [int(c) for c in counts], [float(e) for e in edges]


def machine_info() -> MachineInfo:
    """CPU model, cores, architecture, OS and library versions of this machine."""
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return MachineInfo(
        cpu=cpu_model(),
        cores=os.cpu_count() or 1,
        arch=platform.machine() or "unknown",
        os=f"{platform.system()} {platform.release()}".strip() or "unknown",
        library_versions=versions,
    )


def measure_pipeline(
    session: Any, image: bytes, spec: PreprocessSpec, *, samples: int, warmup: int = 5
) -> Timing:
    """decode + preprocess + infer of `image`, `samples` times after `warmup` runs."""
    name = input_name(session)

    def once() -> None:
        session.run(None, {name: preprocess_bytes(image, spec)})

    return _time(once, samples, warmup)


def measure_speedup(
    reference: Any, candidate: Any, tensor: np.ndarray, *, rounds: int = 5, per_round: int = 20
) -> tuple[float, Timing, Timing]:
    """Median of per-round p50 ratios reference/candidate (>1 means the candidate is faster)."""
    ref_name, cand_name = input_name(reference), input_name(candidate)
    ref_all: list[float] = []
    cand_all: list[float] = []
    ratios = []
    for _ in range(rounds):
        ref = _time(lambda: reference.run(None, {ref_name: tensor}), per_round, 2)
        cand = _time(lambda: candidate.run(None, {cand_name: tensor}), per_round, 2)
        ratios.append(ref.p50 / cand.p50)
        ref_all += ref.samples_ms
        cand_all += cand.samples_ms
    return float(np.median(ratios)), Timing(tuple(ref_all)), Timing(tuple(cand_all))


def benchmark_record(
    profile: str, timing: Timing, *, threads: int, on_target: bool, extra: dict[str, float]
) -> Benchmark:
    return Benchmark(
        profile=profile,
        machine=machine_info(),
        measured_on_target=on_target,
        threads=threads,
        p50_ms=round(timing.p50, 3),
        p95_ms=round(timing.p95, 3),
        samples=len(timing.samples_ms),
        metrics=extra,
    )


def _time(run: Callable[[], object], samples: int, warmup: int) -> Timing:
    for _ in range(warmup):
        run()
    values = []
    for _ in range(samples):
        start = time.perf_counter()
        run()
        values.append((time.perf_counter() - start) * 1000.0)
    return Timing(tuple(values))


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what `platform` knows."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                return line.split(":", 1)[1].strip() or "unknown"
    return platform.processor() or "unknown"
