"""The bundle format both sides share: manifest schema, hashes, signatures, safe archives, the
image preprocessing spec and its one implementation, and hardware profiles.

This package imports nothing heavy (no torch, optimum, onnxruntime or llama_cpp), so the device,
the packager and the tests can all depend on it.
"""

__all__ = ["__version__"]

__version__ = "0.1.0"
