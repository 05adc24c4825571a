"""Anomaly bundles (task "anomaly-detection"): a PatchCore memory bank of good parts' patch
features, exported as one ONNX graph, calibrated, gated and signed. `package` is the pipeline
(`build_anomaly`, `update_anomaly`); the modules below it are its parts."""
