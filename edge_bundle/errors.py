"""The one error tree of the bundle format.

Every failure the format can report is a `BundleError`; callers at a boundary (CLI, HTTP, updater)
translate these to exit codes, status codes or update outcomes in one place. Each message says what
was wrong and, where it helps, what to do about it.
"""

from __future__ import annotations


class BundleError(Exception):
    """Base of every error raised by `edge_bundle`."""


class ManifestError(BundleError):
    """The manifest is missing, not JSON, or does not match the schema."""


class SignatureError(BundleError):
    """A signature is missing, malformed, or does not verify."""


class UntrustedKeyError(SignatureError):
    """The signing key is not among the trusted keys."""


class RevokedKeyError(SignatureError):
    """The signing key was revoked."""


class WrongRoleError(SignatureError):
    """The signing key exists but holds a different role (e.g. a release key signed a bundle)."""


class KeyFileError(BundleError):
    """A key file cannot be read or parsed."""


class IntegrityError(BundleError):
    """A file's size or sha256 differs from the manifest, or a file is missing or extra."""


class ArchiveError(BundleError):
    """The archive is not a readable tar, or breaks a safety rule."""


class UnsafeMemberError(ArchiveError):
    """A member is a link, a device, an absolute path or climbs out with `..`."""


class ArchiveLimitError(ArchiveError):
    """Too many members, too large, or a suspicious compression ratio."""


class ImageError(BundleError):
    """An image cannot be decoded or is not acceptable (type, size, pixel count)."""


class UnsupportedImageError(ImageError):
    """The bytes are not an image in an accepted format (JPEG, PNG, WebP, BMP)."""


class ImageTooLargeError(ImageError):
    """The image has more bytes or more pixels than allowed (decompression-bomb guard)."""


class PreprocessError(BundleError):
    """The preprocessing spec is invalid or cannot be applied."""


class ProfileError(BundleError):
    """A firmware profile is missing or does not validate."""


class UnsupportedSchemaError(ManifestError):
    """The manifest's schema_version is newer (or older) than this code understands."""


class BundleIdError(ManifestError):
    """A bundle id (`name@version`) or bundle file name (`NAME-VERSION.bundle`) is malformed."""


class KnowledgeBaseError(BundleError):
    """The knowledge base is malformed or names labels the model does not have."""


class NoticeError(BundleError):
    """A release or trust notice is malformed, oversized, of the wrong kind, or cannot apply."""


class TemplateError(BundleError):
    """A chat template was refused: it reaches for Python internals (`unsafe`), does not parse or
    render, is too large, or renders without bound."""

    def __init__(self, message: str, *, unsafe: bool = False) -> None:
        super().__init__(message)
        self.unsafe = unsafe
