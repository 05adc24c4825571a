"""Shared helpers for the benchmarks in bench/: machine info, interleaved timing, percentiles, JSON.

Benchmarks here compare things side by side in one run (see shared BENCHMARKING.md): every case is
warmed up, then timed in alternating rounds whose order rotates, so all cases see the same noise.
Results are summarised as p50/p95 plus the median and spread of per-round ratios, and written as
JSON together with the machine and library versions. Run benchmarks from the repository root as
modules, e.g. `python -m bench.bench_quantization`.
"""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import json
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from model_packager.benchmark import cpu_model

RESULTS_DIR = Path(__file__).resolve().parent / "results"

Case = Callable[[], object]


def machine_info() -> dict[str, Any]:
    """CPU model, core counts, memory, OS and Python: what a reader needs to compare two runs."""
    return {
        "cpu_model": cpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_gib": _memory_gib(),
        "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "env": {
            name: os.environ[name]
            for name in ("OMP_NUM_THREADS", "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
            if name in os.environ
        },
    }


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / (1024 * 1024), 1)
    except OSError:
        pass
    return None


def library_versions(names: Sequence[str]) -> dict[str, str | None]:
    """Installed versions of the named distributions (None where one is not installed)."""
    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far, in MiB."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between closest ranks."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100.0
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summarize_ms(samples_s: Sequence[float]) -> dict[str, float]:
    """p50/p95/mean/min/max of timings given in seconds, reported in milliseconds."""
    millis = [sample * 1000.0 for sample in samples_s]
    return {
        "n": len(millis),
        "p50_ms": round(percentile(millis, 50), 4),
        "p95_ms": round(percentile(millis, 95), 4),
        "mean_ms": round(statistics.fmean(millis), 4),
        "min_ms": round(min(millis), 4),
        "max_ms": round(max(millis), 4),
    }


@dataclass(frozen=True)
class Timed:
    """What a case returns when it times itself: only part of its call is the measured work."""

    seconds: float


def time_once(case: Case) -> float:
    """Seconds one call of `case` took (perf_counter), or the `Timed` seconds it returned."""
    start = time.perf_counter()
    result = case()
    if isinstance(result, Timed):
        return result.seconds
    return time.perf_counter() - start


def interleaved(
    cases: Mapping[str, Case],
    *,
    rounds: int,
    per_round: int | Mapping[str, int],
    warmup: int,
) -> dict[str, list[list[float]]]:
    """Time every case in alternating rounds; per case, one list of samples (seconds) per round.

    Each case is first called `warmup` times. Then, in each round, each case runs `per_round` times
    back to back (as a device would run one model), and the order of the cases rotates from round
    to round so that no case always follows the same neighbour. `per_round` may be a mapping
    from case name to count, so that a very slow case does not stretch the run.
    """
    names = list(cases)
    counts = {n: per_round if isinstance(per_round, int) else per_round[n] for n in names}
    for name in names:
        for _ in range(min(warmup, counts[name])):
            cases[name]()
    samples: dict[str, list[list[float]]] = {name: [] for name in names}
    for round_index in range(rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            samples[name].append([time_once(cases[name]) for _ in range(counts[name])])
    return samples


def flatten(rounds: Sequence[Sequence[float]]) -> list[float]:
    """All samples of all rounds in one list."""
    return [sample for round_samples in rounds for sample in round_samples]


def round_ratios(
    baseline: Sequence[Sequence[float]], candidate: Sequence[Sequence[float]], q: float = 50
) -> dict[str, float]:
    """Speed-up of `candidate` over `baseline` (>1 is faster) per round at percentile q.

    Reports the median of the per-round ratios, their spread, and the ratio of the pooled
    percentiles.
    """
    ratios = [
        percentile(base, q) / percentile(cand, q)
        for base, cand in zip(baseline, candidate, strict=True)
    ]
    pooled = percentile(flatten(baseline), q) / percentile(flatten(candidate), q)
    return {
        "median_of_rounds": round(statistics.median(ratios), 3),
        "min_round": round(min(ratios), 3),
        "max_round": round(max(ratios), 3),
        "pooled": round(pooled, 3),
    }


def write_json(name: str, payload: Mapping[str, Any], directory: Path = RESULTS_DIR) -> Path:
    """Write `payload` plus date and machine info to `directory/NAME.json`; returns the path."""
    directory.mkdir(parents=True, exist_ok=True)
    document = {
        "benchmark": name,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
        **payload,
    }
    path = directory / f"{name}.json"
    path.write_text(json.dumps(document, indent=2, sort_keys=False) + "\n")
    return path


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain-text table with left-aligned columns."""
    cells = [[str(header) for header in headers], *[[str(cell) for cell in row] for row in rows]]
    widths = [max(len(row[column]) for row in cells) for column in range(len(headers))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        for row in cells
    ]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)
