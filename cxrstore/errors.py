"""One exception hierarchy for cxrstore.

Every error raised on bad input derives from :class:`CxrStoreError` and from the
built-in exception that best describes it, so callers can catch either. Messages
say what was wrong, where (file, row, key) and what to do about it.
"""

from __future__ import annotations


class CxrStoreError(Exception):
    """Base class of every error cxrstore raises on purpose."""


class UsageError(CxrStoreError, ValueError):
    """An option or argument has a value that is not allowed."""


class ImageReadError(CxrStoreError, ValueError):
    """A file could not be read as a chest X-ray image.

    Attributes
    ----------
    path : str or None
        The file that failed, when known.
    reason : str
        Why it failed, in words a user can act on.
    """

    def __init__(self, reason: str, *, path: str | None = None) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"{path}: {reason}" if path else reason)


class ManifestError(CxrStoreError, ValueError):
    """A manifest (CSV) or one of its rows is malformed."""


class StoreError(CxrStoreError, OSError):
    """The store on disk is missing, of an unknown format, or inconsistent."""


class StoreFormatError(StoreError):
    """The store's format or format version is not one this version can read."""


class StoreLockedError(StoreError):
    """Another process holds the store's write lock."""


class ProvenanceError(StoreError):
    """Vectors from a different encoder configuration were appended to a model."""


class IntegrityError(StoreError):
    """`verify` found a checksum, shape or count that does not match."""
