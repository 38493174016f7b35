"""Where a store lives: a local folder or a folder of an fsspec file system (s3://, gs://, ...).

`Location` is the one place that turns store-relative names ("meta.json",
"episodes.zarr/obs/c/3/0/0") into reads and writes, so that the build, the readers and
verify-shards treat a local store and one on object storage alike. Local folders keep the
fast paths they had (os.replace for atomic writes, plain files for reads); remote ones use
fsspec, with credentials and endpoints from the usual places (for S3: the AWS_* environment
variables or ~/.aws, which dask workers and torchrun ranks inherit or read likewise).

Atomic writes: locally a temp file beside the target is flushed to disk and renamed into
place (`atomic_file`, which every local writer of the project uses). An object store
publishes an object whole or not at all (a single PUT, or a multipart upload at its
completion), so a remote write goes straight to its name; nothing half-written is ever
visible under a final name either way.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import fsspec
from fsspec.implementations.local import LocalFileSystem

from datapipe.errors import StorageAccessError

TMP_SUFFIX = ".tmp."  # local temp files are ".{name}.tmp.XXXXXXXX" beside their target
# Where the exceptions of remote file systems' client libraries come from (they are not all
# OSErrors: botocore's connection and credential errors, for one).
_STORAGE_CLIENTS = ("botocore", "aiobotocore", "aiohttp", "google", "gcsfs", "azure", "adlfs")


def is_storage_error(e: BaseException) -> bool:
    """Whether `e` came from talking to a file system (rather than from a bug or bad data)."""
    return isinstance(e, OSError) or type(e).__module__.split(".")[0] in _STORAGE_CLIENTS


class Location:
    """A folder given as a local path or an fsspec URL; file names below it are relative."""

    def __init__(self, url: str | os.PathLike):
        text = os.fspath(url)
        fs, root = fsspec.core.url_to_fs(text)
        self._fs, self._pid = fs, os.getpid()
        self.local = isinstance(fs, LocalFileSystem)
        self.root = root.rstrip("/") or root
        # How to name it to a person or to another process (a dask worker, a torchrun rank).
        self.url = self.root if self.local else fs.unstrip_protocol(self.root)

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        """The file system object, made anew in a forked child (fsspec's async file systems,
        s3fs among them, cannot be used across a fork)."""
        if self._pid != os.getpid():
            self._fs, self._pid = fsspec.core.url_to_fs(self.url)[0], os.getpid()
        return self._fs

    def __repr__(self) -> str:
        return f"Location({self.url!r})"

    def __str__(self) -> str:
        return self.url

    def access_error(self, e: BaseException, doing: str) -> StorageAccessError:
        """A StorageAccessError for failure `e` of a remote location while `doing`."""
        return StorageAccessError(
            f"{self.url}: {doing} failed ({type(e).__name__}: {e}). Check that the bucket "
            f"exists and that credentials and endpoint are set where this runs (s3://: the "
            f"AWS_* environment variables or ~/.aws, AWS_ENDPOINT_URL for S3-compatible "
            f"servers; other protocols: their fsspec configuration)."
        )

    def path(self, rel: str) -> str:
        """The file system path of `rel` (for local locations, an ordinary path)."""
        return f"{self.root}/{rel}" if rel else self.root

    def child(self, rel: str) -> str:
        """The full name of `rel`, as `url` names the folder."""
        return f"{self.url}/{rel}"

    def exists(self, rel: str = "") -> bool:
        if self.local:
            return os.path.exists(self.path(rel))
        return self.fs.exists(self.path(rel))

    def is_file(self) -> bool:
        """True if this location is a file, not a folder."""
        if self.local:
            return os.path.isfile(self.root)
        return self.fs.isfile(self.root)

    def is_empty(self) -> bool:
        """True if nothing is stored under this folder (or it does not exist)."""
        if self.local:
            root = Path(self.root)
            return not root.exists() or not any(root.iterdir())
        self.fs.invalidate_cache(self.root)
        return not self.fs.exists(self.root) or not self.fs.ls(self.root, detail=False)

    def listdir(self, rel: str) -> set[str]:
        """Names of the files directly in folder `rel`; empty if it does not exist."""
        if self.local:
            folder = Path(self.path(rel))
            return {p.name for p in folder.iterdir()} if folder.is_dir() else set()
        self.fs.invalidate_cache(self.path(rel))  # other processes (workers) write here
        try:
            return {p.rsplit("/", 1)[-1] for p in self.fs.ls(self.path(rel), detail=False)}
        except FileNotFoundError:
            return set()

    def find(self, rel: str) -> list[str]:
        """Every file below folder `rel`, as names relative to this location."""
        base = self.path(rel)
        if self.local:
            folder = Path(base)
            if not folder.is_dir():
                return []
            return [str(p.relative_to(self.root)) for p in folder.rglob("*") if p.is_file()]
        self.fs.invalidate_cache(base)
        n = len(self.root) + 1
        return [p[n:] for p in self.fs.find(base)]

    def size(self, rel: str) -> int:
        return os.path.getsize(self.path(rel)) if self.local else self.fs.size(self.path(rel))

    def read_bytes(self, rel: str) -> bytes:
        if self.local:
            return Path(self.path(rel)).read_bytes()
        return self.fs.cat_file(self.path(rel))

    def read_range(self, rel: str, start: int, stop: int) -> bytes:
        """Bytes [start, stop) of file `rel` (one ranged request remotely)."""
        if self.local:
            with open(self.path(rel), "rb") as f:
                return os.pread(f.fileno(), stop - start, start)
        return self.fs.cat_file(self.path(rel), start=start, end=stop)

    def read_ranges(self, rels: list[str], starts: list[int], stops: list[int]) -> list[bytes]:
        """Many byte ranges at once; remotely they are fetched concurrently."""
        if self.local:
            return [self.read_range(r, a, b) for r, a, b in zip(rels, starts, stops, strict=True)]
        paths = [self.path(r) for r in rels]
        return self.fs.cat_ranges(paths, starts, stops, on_error="raise")

    def open(self, rel: str, mode: str = "rb"):
        return open(self.path(rel), mode) if self.local else self.fs.open(self.path(rel), mode)

    def write_atomic(self, rel: str, blob: bytes) -> None:
        """Publish `blob` as file `rel` so that no reader ever sees part of it."""
        if not self.local:
            self.fs.pipe_file(self.path(rel), blob)
            return
        with atomic_file(self.path(rel)) as f:
            f.write(blob)

    def remove(self, rel: str) -> None:
        """Delete file `rel`, if it exists."""
        if self.local:
            Path(self.path(rel)).unlink(missing_ok=True)
        elif self.fs.exists(self.path(rel)):
            self.fs.rm_file(self.path(rel))

    def remove_tree(self, rel: str) -> None:
        """Delete folder `rel` and everything in it, if it exists."""
        path = self.path(rel)
        if self.local:
            import shutil

            shutil.rmtree(path, ignore_errors=True)
        elif self.fs.exists(path):
            self.fs.rm(path, recursive=True)

    def remove_stale_temps(self) -> None:
        """Delete temp files left by killed local writers (their units are redone)."""
        if self.local and os.path.isdir(self.root):
            for stale in Path(self.root).rglob(f".*{TMP_SUFFIX}*"):
                stale.unlink()


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """A local binary file to write that appears at `path` complete or not at all: written
    under a unique temporary name beside `path`, flushed to disk, given the mode `open`
    gives a new file (0666 less the umask; mkstemp's is 0600) and renamed over `path`. An
    exception (Ctrl-C too) removes the temporary file; a full disk raises its OSError naming
    `path` (a write to an open file names none)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}{TMP_SUFFIX}", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno in DISK_FULL and e.filename is None:
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise


DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # a write failed for want of space


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return mask


@contextlib.contextmanager
def only_writer(folder: str | os.PathLike, what: str, error: type[Exception]):
    """Hold an exclusive lock on the folder itself (created if missing; no file is added to
    it) while the block runs: one writer per folder (a store being built, a run, an
    experiment, an evaluation's outputs). If another process holds it, raise `error` naming
    that process's pid (from /proc/locks, on Linux). The kernel releases it with the
    process, however that ends: no stale locks. Local folders only: object stores have no
    such lock."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY)
    try:
        _lock(fd, folder, what, error)
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def only_writer_of_file(path: str | os.PathLike, what: str, error: type[Exception]):
    """`only_writer` for one output file (an exported or quantized model): the lock is held
    on a hidden `.NAME.lock` beside it, removed when the block ends (a crash leaves the empty
    file, whose lock the kernel has dropped)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = path.parent / f".{path.name}.lock"
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            _lock(fd, path, what, error)
            if _same_file(fd, lock):  # not removed by a writer that finished meanwhile
                break
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)
        os.close(fd)


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


def _lock(fd: int, target, what: str, error: type[Exception]) -> None:
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise error(
            f"{target}: {what} (pid {_flock_holder(fd)}) is writing here; wait for it to end "
            f"or stop it, or write elsewhere"
        ) from None


def _flock_holder(fd: int) -> str:
    """The pid holding a flock on the file open as `fd`, or "?" where /proc/locks cannot say."""
    st = os.fstat(fd)
    inode = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        with open("/proc/locks") as f:
            for line in f:
                parts = line.split()
                if "FLOCK" in parts and inode in parts:
                    return parts[parts.index(inode) - 1]
    except OSError:
        pass
    return "?"
