"""The packager's error tree. Bundle-format failures stay `edge_bundle.errors.BundleError`s; these
cover what happens before a bundle exists: sources, export, quantization, validation gates.
Each message says what was wrong and what to try."""

from __future__ import annotations


class PackagerError(Exception):
    """Base of every error the packager reports to its user."""


class SourceError(PackagerError):
    """The model source is missing, corrupt, unsupported, or a pickle without --allow-pickle."""


class ExportError(PackagerError):
    """Exporting the source to ONNX (or GGUF) failed or produced a model that does not validate."""


class QuantizationError(PackagerError):
    """Quantization failed or is not allowed for the chosen profile."""


class CalibrationError(PackagerError):
    """The calibration or evaluation images are missing, empty, unreadable or inconsistent."""


class KnowledgeError(PackagerError):
    """The knowledge base file is unreadable or names labels the model does not have."""


class GateError(PackagerError):
    """A validation or latency gate refused the bundle; the message carries the numbers."""


class PublishError(PackagerError):
    """A notice could not be published: the broker is unreachable, refused it, or never acked."""
