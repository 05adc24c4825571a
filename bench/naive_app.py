"""The baseline for bench/bench_agent.py: the image-classification endpoint a competent user writes
in a hurry, without the agent.

`POST /predict` takes a multipart `file`, reads it whole, decodes it at full size with OpenCV,
squashes it to 224x224, normalises it the way EfficientNet-Lite expects and runs the fp32 ONNX
model in a default `onnxruntime.InferenceSession` (no session options: ONNX Runtime picks its own
threads and spins). It is deliberately plain, not a strawman: one session loaded at start-up,
no per-request model loads, vectorised numpy.

    NAIVE_MODEL_PATH=model.onnx python -m uvicorn bench.naive_app:app --port 8001
"""

from __future__ import annotations

import os
from typing import Any

import cv2
import numpy as np
import onnxruntime as ort
from fastapi import FastAPI, HTTPException, UploadFile

SIDE = 224
MODEL_ENV = "NAIVE_MODEL_PATH"


def _load_session() -> Any:
    path = os.environ.get(MODEL_ENV)
    if not path or not os.path.isfile(path):
        raise RuntimeError(
            f"{MODEL_ENV} must name an ONNX model file (got {path!r}); "
            "bench/bench_agent.py sets it to the fp32 EfficientNet-Lite0 export"
        )
    return ort.InferenceSession(path)


session = _load_session()
input_name = session.get_inputs()[0].name
app = FastAPI(title="naive classifier")


@app.post("/predict")
async def predict(file: UploadFile) -> dict[str, Any]:
    data = await file.read()
    image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise HTTPException(400, "could not decode the image; send a JPEG or PNG file")
    image = cv2.resize(image, (SIDE, SIDE))
    image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    tensor = ((image.astype(np.float32) - 127.0) / 128.0).transpose(2, 0, 1)[np.newaxis]
    logits = session.run(None, {input_name: tensor})[0][0]
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    best = int(probs.argmax())
    return {"class": best, "score": float(probs[best])}
