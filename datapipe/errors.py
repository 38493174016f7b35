"""The datapipe error hierarchy.

Every error names the file (and where it applies the array, chunk and episode range) and
says how to fix the problem. Each class also subclasses the matching built-in, so callers
can catch `ValueError` or `FileNotFoundError` without knowing ours.
"""


class DatapipeError(Exception):
    """Base class of every error raised on purpose by datapipe."""


class BuildConfigError(DatapipeError, ValueError):
    """A build setting out of range (the value and what is allowed)."""


class SourceError(DatapipeError, ValueError):
    """A source file (an MT30 chunk) is missing, unreadable or not in the official layout.
    `path`: the file whose bytes are bad, where one is (set by the readers of its episodes)."""

    def __init__(self, message: str, path: str | None = None):
        super().__init__(message)
        self.path = path

    def __reduce__(self):  # keeps `path` across processes (dask workers)
        return type(self), (str(self), self.path)


class DestinationError(DatapipeError, FileExistsError):
    """The build destination holds something other than this build's store."""


class BuildWriteError(DatapipeError, OSError):
    """Writing the store failed (disk full, file size limit); finished units are kept."""


class StoreNotFoundError(DatapipeError, FileNotFoundError):
    """No store at the given path."""


class IncompleteStoreError(DatapipeError, FileNotFoundError):
    """The store was never finished (an interrupted or running build)."""


class StoreVersionError(DatapipeError, ValueError):
    """The store was written in a format version this code does not read."""


class StoreFormatError(DatapipeError, ValueError):
    """The store was built without the format (Zarr or WebDataset) a reader needs."""


class CorruptStoreError(DatapipeError, ValueError):
    """Stored bytes fail their checksum or do not decode."""


class StorageAccessError(DatapipeError, OSError):
    """Object storage could not be reached or refused a request (no bucket, no credentials)."""
