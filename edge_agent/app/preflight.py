"""Start-up checks of the device's installation, run before anything is loaded.

The two ONNX Runtime wheels (`onnxruntime`, `onnxruntime-gpu`) install the same `onnxruntime`
module; with both present, whichever was installed last silently wins, file by file. The agent
refuses to start in that state, and says how to fix it.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import metadata

ORT_FLAVOURS = ("onnxruntime", "onnxruntime-gpu")


class PreflightError(RuntimeError):
    """The installation cannot run the agent; the message says how to fix it."""


@dataclass(frozen=True)
class OrtFlavour:
    name: str
    version: str


def installed_ort_flavours() -> list[OrtFlavour]:
    """Every ONNX Runtime distribution installed in this environment."""
    found = []
    for name in ORT_FLAVOURS:
        try:
            found.append(OrtFlavour(name, metadata.version(name)))
        except metadata.PackageNotFoundError:
            continue
    return found


def check_single_ort(flavours: list[OrtFlavour] | None = None) -> OrtFlavour:
    """Return the one installed ONNX Runtime flavour, or raise `PreflightError` saying what to do."""
    flavours = installed_ort_flavours() if flavours is None else flavours
    if len(flavours) == 1:
        return flavours[0]
    if not flavours:
        raise PreflightError(
            "ONNX Runtime is not installed: run 'scripts/install' (CPU) or "
            "'scripts/install --gpu' (NVIDIA GPU)."
        )
    names = " and ".join(f"{f.name} {f.version}" for f in flavours)
    raise PreflightError(
        f"both {names} are installed; they overwrite each other's files. Keep exactly one: "
        "'pip uninstall -y onnxruntime onnxruntime-gpu' then rerun 'scripts/install' "
        "(add --gpu for the GPU flavour)."
    )
