"""The class-evaluation worker: run an ONNX classifier over stacked inputs, one at a time.

Run in process for the native and exact-arithmetic classes, and as
`python -m model_packager.class_worker MODEL INPUTS.npy OUTPUTS.npy --threads N [--exact]` under
the emulator (`model_packager.class_eval`), with the packager's own pinned sessions
(`onnx_tools.make_session`). It imports nothing heavier than numpy and onnxruntime, so the
emulated Python starts as fast as it can.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from edge_bundle.scores import to_probabilities
from model_packager.onnx_tools import make_session


def predict_file(
    model: Path, inputs: NDArray[np.float32], threads: int, *, exact: bool = False
) -> NDArray[np.float32]:
    """Probabilities (N, classes), one input at a time as the device runs them."""
    run = make_session(model, threads, exact=exact)
    name = run.get_inputs()[0].name
    rows = []
    for index in range(inputs.shape[0]):
        scores = np.asarray(run.run(None, {name: inputs[index : index + 1]})[0], np.float32)
        rows.append(to_probabilities(scores.reshape(1, -1))[0])
    return np.stack(rows).astype(np.float32)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model_packager.class_worker")
    parser.add_argument("model", type=Path)
    parser.add_argument("inputs", type=Path)
    parser.add_argument("outputs", type=Path)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--exact", action="store_true")
    args = parser.parse_args(argv)
    inputs = np.load(args.inputs, allow_pickle=False).astype(np.float32, copy=False)
    probs = predict_file(args.model, inputs, args.threads, exact=args.exact)
    np.save(args.outputs, probs, allow_pickle=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
