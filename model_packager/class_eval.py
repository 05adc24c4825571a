"""Running a candidate model the way each CPU class computes it.

The build machine's own class is always run natively. Another x86 class is run where it can be
reproduced here:

- **exact int8 arithmetic** (`x86-64-vnni`: AVX-VNNI, AVX-512 VNNI, AMX): their kernels add every
  u8 x s8 product exactly in 32 bits. ONNX Runtime's `session.x64quantprecision = 1` computes the
  same exact sums on any x86 CPU, so the class is evaluated with that option ("exact-arithmetic").
- **16-bit pair sums** (`x86-64-avx2`, and `x86-64-avx512` whose kernels saturate the same way):
  on a machine of another class, the same Python and ONNX Runtime run under user-mode emulation,
  `qemu-x86_64 -cpu Haswell` (Debian's qemu-user), whose CPUID offers AVX2 and nothing newer, so
  ONNX Runtime picks its AVX2 kernels ("emulated"). It is slow: its outputs are cached on disk by
  the hash of the model, the inputs and the ONNX Runtime version, and it runs once per build.

Any other class (ARM, or x86 without qemu) is recorded as not evaluated, with the reason. Speed is
never measured here: only on the build machine's own class, by the benchmark step.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

from edge_bundle.cpu_class import CpuClass
from model_packager.errors import QuantizationError

How = Literal["native", "exact-arithmetic", "emulated", "not-evaluated"]
EMULATOR = "qemu-x86_64"
EMULATED_CPU = "Haswell"  # AVX2, FMA, F16C; no AVX-512, no VNNI
#: Emulation is roughly this many times slower than native; a generous timeout per input.
EMULATION_SECONDS_PER_INPUT = 20.0
EMULATION_STARTUP_SECONDS = 300.0


@dataclass(frozen=True)
class ClassPlan:
    """How one CPU class will be (or cannot be) evaluated on this machine."""

    cpu_class: CpuClass
    how: How
    note: str


def plan(target: CpuClass, host: CpuClass) -> list[ClassPlan]:
    """The classes to evaluate: this machine's own, then the target's (when it differs)."""
    plans = [ClassPlan(host, "native", "this machine's own kernels")]
    if target != host:
        plans.append(_plan_other(target, host))
    return plans


def _plan_other(target: CpuClass, host: CpuClass) -> ClassPlan:
    x86 = host.value.startswith("x86-64")
    if target is CpuClass.X86_VNNI and x86:
        return ClassPlan(
            target,
            "exact-arithmetic",
            "exact int8 sums (session.x64quantprecision=1), which VNNI and AMX kernels compute",
        )
    if target.saturates and host.saturates:
        return ClassPlan(
            target, "native", f"{host.value} kernels add int8 products in the same 16-bit pairs"
        )
    if target.saturates and x86:
        if shutil.which(EMULATOR) is None:
            return ClassPlan(
                target,
                "not-evaluated",
                f"{EMULATOR} not found: install Debian's qemu-user to evaluate {target.value} "
                "on this machine",
            )
        return ClassPlan(target, "emulated", f"{EMULATOR} -cpu {EMULATED_CPU} (AVX2 kernels)")
    return ClassPlan(
        target,
        "not-evaluated",
        f"{target.value} cannot be run on a {host.value} machine; the box checks the bundle's "
        "reference outputs before it serves",
    )


def run(
    plan: ClassPlan, model: Path, inputs: NDArray[np.float32], threads: int
) -> NDArray[np.float32]:
    """Probabilities (N, classes) of `model` on `inputs` (N, C, H, W), one input at a time, as
    the class computes them."""
    if plan.how == "native":
        return _run_in_process(model, inputs, threads, exact=False)
    if plan.how == "exact-arithmetic":
        return _run_in_process(model, inputs, threads, exact=True)
    if plan.how == "emulated":
        return _run_emulated(model, inputs, threads)
    raise ValueError(f"{plan.cpu_class.value} is not evaluated here: {plan.note}")


def _run_in_process(
    model: Path, inputs: NDArray[np.float32], threads: int, *, exact: bool
) -> NDArray[np.float32]:
    from model_packager.class_worker import predict_file

    return predict_file(model, inputs, threads, exact=exact)


def cache_dir() -> Path:
    """Where emulated outputs are kept ($LINESIDE_EVAL_CACHE, default ~/.cache/lineside/class-eval)."""
    root = os.environ.get("LINESIDE_EVAL_CACHE")
    path = Path(root) if root else Path.home() / ".cache" / "lineside" / "class-eval"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _cache_key(model: Path, inputs: NDArray[np.float32], threads: int) -> str:
    import onnxruntime

    digest = hashlib.sha256()
    digest.update(model.read_bytes())
    digest.update(np.ascontiguousarray(inputs).tobytes())
    digest.update(f"{inputs.shape}|{threads}|{onnxruntime.__version__}|{EMULATED_CPU}".encode())
    return digest.hexdigest()


def _run_emulated(model: Path, inputs: NDArray[np.float32], threads: int) -> NDArray[np.float32]:
    cached = cache_dir() / f"{_cache_key(model, inputs, threads)}.npy"
    if cached.is_file():
        return _read_outputs(cached, len(inputs))
    with tempfile.TemporaryDirectory(prefix="lineside-emulated-") as tmp:
        source, target = Path(tmp) / "inputs.npy", Path(tmp) / "outputs.npy"
        np.save(source, np.ascontiguousarray(inputs, dtype=np.float32), allow_pickle=False)
        command = [
            EMULATOR, "-cpu", EMULATED_CPU, sys.executable, "-m", "model_packager.class_worker",
            str(model), str(source), str(target), "--threads", str(threads),
        ]  # fmt: skip
        timeout = EMULATION_STARTUP_SECONDS + EMULATION_SECONDS_PER_INPUT * len(inputs)
        try:
            done = subprocess.run(
                command, capture_output=True, text=True, timeout=timeout, env=_worker_env()
            )
        except subprocess.TimeoutExpired as exc:
            raise QuantizationError(
                f"the emulated {CpuClass.X86_AVX2.value} evaluation took over {timeout:.0f} s; "
                "evaluate on fewer images or build on an AVX2 machine"
            ) from exc
        if done.returncode != 0:
            raise QuantizationError(
                f"the emulated {CpuClass.X86_AVX2.value} evaluation failed "
                f"(exit {done.returncode}): {done.stderr.strip()[-800:]}"
            )
        outputs = _read_outputs(target, len(inputs))
        partial = cached.with_suffix(f".{os.getpid()}.partial")
        shutil.copyfile(target, partial)
        partial.replace(cached)
        return outputs


def _worker_env() -> dict[str, str]:
    env = dict(os.environ)
    # The worker must find this package however the packager was started.
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    return env


def _read_outputs(path: Path, rows: int) -> NDArray[np.float32]:
    array: Any = np.load(path, allow_pickle=False)
    if array.ndim != 2 or array.shape[0] != rows or not np.isfinite(array).all():
        raise QuantizationError(f"the class evaluation wrote unusable outputs {array.shape}")
    return np.asarray(array, dtype=np.float32)
