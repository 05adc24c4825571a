"""Runtimes behind one interface, chosen from a table and imported only when a bundle needs one.

A device without llama-cpp-python, or without a GPU build of ONNX Runtime, still serves ONNX
bundles on the CPU: nothing here imports a backend until `runtime_for` is asked for it.
"""

from __future__ import annotations

import importlib

from edge_agent.errors import RuntimeLoadError
from edge_agent.runtimes.base import Runtime

#: runtime name (the manifest's `runtime`) -> "module:class" implementing `Runtime`.
RUNTIMES: dict[str, str] = {
    "onnx": "edge_agent.runtimes.onnx:OnnxRuntime",
    "llama": "edge_agent.runtimes.llama:LlamaRuntime",
}

_HINTS = {
    "onnx": "install the device role: scripts/install --role device",
    "llama": "install llama-cpp-python: scripts/install --role device (without --no-llama)",
}


def runtime_for(name: str) -> Runtime:
    """The runtime called `name`, imported now; `RuntimeLoadError` says what to install."""
    target = RUNTIMES.get(name)
    if target is None:
        raise RuntimeLoadError(
            f"this agent has no '{name}' runtime (it has {sorted(RUNTIMES)}); "
            "upgrade the agent or rebuild the bundle for a supported runtime"
        )
    module_name, _, class_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise RuntimeLoadError(
            f"the '{name}' runtime cannot be imported ({exc}); {_HINTS.get(name, 'reinstall')}"
        ) from exc
    runtime: Runtime = getattr(module, class_name)()
    return runtime
