"""Checked, fast reads of whole episodes straight from a store's Zarr shard files.

Owns the byte-level reading of format v1 arrays. A shard file is the standard Zarr v3
`sharding_indexed` layout: the encoded inner chunks (one episode each), then the shard index
((offset, nbytes) little-endian uint64 per inner chunk, C order) followed by the index's
crc32c. An inner chunk is blosc bytes followed by their crc32c; obs and action chunks hold
the episode transposed to [D, T]. The reader checks that the array metadata spells exactly
this layout, verifies the crc32c of every shard index and every chunk it reads, and decodes
with numcodecs' blosc straight into the caller's buffer. Any mismatch raises
CorruptStoreError naming the array, shard file, chunk and episode range.

Which file: with the store's chunk table (`chunks.crc32c`), every chunk read must carry the
crc32c the table records for its place, and the first time a shard is used its task file's
one chunk is read and checked the same way (the loader takes task ids from the index, which
is only right for the task file it was built with): no extra read of the data. A store built
before the table existed is checked the old way: the first time a shard file is opened it is
hashed whole and compared with the manifest (`Store.check_file`, through the open
descriptor that the reads then use), and so is the task shard file of the same number; a
file that passed is not hashed again while it is unchanged on disk (BENCHMARKS.md §11).

Why not zarr-python: on an 80,040-episode store (2-core machine, median of 15, obs + action +
reward), 64 random episodes / one whole 256-episode shard read at 398 / 1,967 episodes/s
through zarr-python 3.1.6, 452 / 2,108 with the `zarrs` 0.2.3 codec pipeline, and 8,843 /
26,189 here (crc32c checked throughout); the loader's pool needs thousands per second.
`Store.read_array` (zarr-python) stays the reference reader, and the tests compare the two.

A store on object storage is read the same way through fsspec: a shard's index with one
ranged request when the shard is first used, then each call's chunks with concurrent ranged
requests (one round trip per call, not one per episode).

One reader serves one thread (it keeps open files and a small cache of shard indexes).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import numpy as np
from crc32c import crc32c
from numcodecs import blosc

from datapipe import format as fmt
from datapipe.errors import CorruptStoreError, StoreVersionError
from datapipe.store import Store, check_metadata_file, repair_command

_INDEX_CODECS = [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}]
_CRC32C_RESIDUE = 0x48674BC7  # crc32c of any buffer followed by its own crc32c (little-endian)


def _crc_ok(data_and_crc: bytes) -> bool:
    """Whether the last 4 bytes are the crc32c of the rest (checked without copying the rest)."""
    return len(data_and_crc) >= 4 and crc32c(data_and_crc) == _CRC32C_RESIDUE


class _Array:
    """Layout facts of one array, read from its zarr.json and checked against format v1."""

    def __init__(self, store: Store, name: str):
        self.name = name
        rel = f"{fmt.ZARR_DIR}/{name}/zarr.json"
        meta_path = store.location.child(rel)
        blob = store.location.read_bytes(rel)
        check_metadata_file(store.location, store.meta, rel, blob)
        meta = json.loads(blob)
        self.shape = tuple(meta["shape"])
        self.fill_value = meta["fill_value"]
        shard_shape = tuple(meta["chunk_grid"]["configuration"]["chunk_shape"])
        (sharding,) = meta["codecs"]
        cfg = sharding["configuration"]
        inner = [c["name"] for c in cfg["codecs"]]
        self.transposed = inner[0] == "transpose"
        if self.transposed and cfg["codecs"][0]["configuration"]["order"] != [0, 2, 1]:
            inner = ["transpose?"]
        expected = ["transpose", "bytes", "blosc", "crc32c"] if self.transposed else inner
        if (
            sharding["name"] != "sharding_indexed"
            or inner != expected
            or inner[-3:] != ["bytes", "blosc", "crc32c"]
            or cfg["index_codecs"] != _INDEX_CODECS
            or cfg["index_location"] != "end"
            or meta["data_type"] != fmt.SOURCE_DTYPES[name]
            or shard_shape[0] != fmt.EPISODES_PER_SHARD
            or list(cfg["chunk_shape"]) != [1, *self.shape[1:]]
        ):
            raise StoreVersionError(
                f"{meta_path}: not the format v{fmt.FORMAT_VERSION} layout this reader decodes; "
                f"rebuild the store: `datapipe build --src SRC --dst NEW_DST`."
            )
        self.row_shape = self.shape[1:]  # one episode: [T, D] or [T]
        self.chunk_shape = self.row_shape[::-1] if self.transposed else self.row_shape
        self.dtype = np.dtype(fmt.SOURCE_DTYPES[name])
        self.chunk_nbytes = int(np.prod(self.row_shape)) * self.dtype.itemsize
        self.n_inner = fmt.EPISODES_PER_SHARD
        self.index_nbytes = fmt.shard_index_nbytes(self.n_inner)


class ShardReader:
    """Reads whole episodes of `arrays` from the store's shard files, checked.

    At most `max_open_shards` shard files are held open (each with its parsed index, 4 KiB),
    the oldest closed first, so memory and descriptors do not grow with the store.
    """

    def __init__(
        self,
        store: Store,
        arrays: Sequence[str] = ("obs", "action", "reward"),
        max_open_shards: int = 512,
    ):
        store.require_format("zarr", "use datapipe.WebDatasetStream")
        self.store = store
        self.arrays = {name: _Array(store, name) for name in arrays}
        self.max_open_shards = max_open_shards
        self._open: dict[tuple[str, int], tuple[int, list]] = {}  # -> (fd, [[offset, nbytes]])
        self._tasks_checked: set[int] = set()
        self._scratch = {
            n: np.empty(a.chunk_shape, a.dtype) for n, a in self.arrays.items() if a.transposed
        }

    def __enter__(self) -> ShardReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        while self._open:
            fd = self._open.popitem()[1][0]
            if fd is not None:
                os.close(fd)

    def _error(self, name: str, shard: int, problem: str, chunk: int | None = None):
        rel = fmt.zarr_shard_file(name, shard)
        eps = fmt.shard_episodes(shard, self.store.n_episodes)
        where = f"chunk {chunk} (episode {eps.start + chunk})" if chunk is not None else "index"
        return CorruptStoreError(
            f"{self.store.url}: array {name!r}, shard file {rel} (episodes "
            f"[{eps.start}, {eps.stop})), {where}: {problem}. Rebuild the damaged shard from "
            f"the source: `{repair_command(self.store.location)}`."
        )

    def _shard(self, name: str, shard: int) -> tuple[int | None, list]:
        """The open file (None for a remote store) and checked index of one shard file."""
        hit = self._open.get((name, shard))
        if hit is not None:
            return hit
        arr, loc, rel = self.arrays[name], self.store.location, fmt.zarr_shard_file(name, shard)
        try:
            fd = os.open(loc.path(rel), os.O_RDONLY) if loc.local else None
            size = os.fstat(fd).st_size if loc.local else loc.size(rel)
        except FileNotFoundError:
            raise self._error(name, shard, "shard file missing") from None
        try:
            if size < arr.index_nbytes:
                raise self._error(name, shard, f"file of {size} bytes is shorter than its index")
            start = size - arr.index_nbytes
            if fd is not None:
                raw = os.pread(fd, arr.index_nbytes, start)
            else:
                raw = loc.read_range(rel, start, size)
            if not _crc_ok(raw):
                raise self._error(name, shard, "crc32c mismatch in the shard index")
            index = fmt.shard_index(raw, arr.n_inner)
            full = index[:, 0] != fmt.SHARD_INDEX_EMPTY
            if np.any(index[full, 0] + index[full, 1] > size - arr.index_nbytes):
                raise self._error(name, shard, "the index points past the end of the file")
            self._check_file(name, shard, fd, index)
        except BaseException:
            if fd is not None:
                os.close(fd)
            raise
        if len(self._open) >= self.max_open_shards:  # close the oldest
            old = self._open.pop(next(iter(self._open)))[0]
            if old is not None:
                os.close(old)
        entry = self._open[(name, shard)] = (fd, index.tolist())
        return entry

    def _check_file(self, name: str, shard: int, fd: int | None, index: np.ndarray) -> None:
        """The shard file (and the task file of its shard) is the one the manifest names; if
        not, the error names its first damaged chunk, or else says it is another file. With
        the store's chunk table, each chunk is checked as it is read (`_check_chunk`), and
        here only the task file's one chunk."""
        if self.store.chunk_crcs is not None:
            self._check_task_file(shard)
            return
        rel = fmt.zarr_shard_file(name, shard)
        try:
            self.store.check_file(rel, fd)
        except CorruptStoreError:
            for k, (offset, nbytes) in enumerate(index.tolist()):
                if offset == fmt.SHARD_INDEX_EMPTY:
                    continue
                raw = os.pread(fd, nbytes, offset) if fd is not None else None
                if raw is None:
                    raw = self.store.location.read_range(rel, offset, offset + nbytes)
                if not _crc_ok(raw):
                    raise self._error(name, shard, "crc32c mismatch", chunk=k) from None
            raise
        self.store.check_file(fmt.zarr_shard_file("task", shard))

    def _check_task_file(self, shard: int) -> None:
        """The task file of `shard` holds the chunk the store was built with: the one whose
        task ids the index records (read once per shard)."""
        if shard in self._tasks_checked:
            return
        rel, loc = fmt.zarr_shard_file("task", shard), self.store.location
        try:
            blob = loc.read_bytes(rel)
        except FileNotFoundError:
            raise self._error("task", shard, "shard file missing") from None
        want = int(self.store.chunk_crcs["task"][shard, 0])
        (offset, nbytes), n = fmt.shard_index(blob, 1)[0], fmt.shard_index_nbytes(1)
        raw = blob[offset : offset + nbytes] if offset + nbytes <= len(blob) - n else b""
        if not (_crc_ok(blob[-n:]) and _crc_ok(raw)):
            raise self._error("task", shard, "crc32c mismatch", chunk=0)
        if int.from_bytes(raw[-4:], "little") != want:
            raise self.store.wrong_file(
                rel, f"its chunk is not the one {fmt.CHUNK_CRC_FILE} records"
            )
        self._tasks_checked.add(shard)

    def _check_chunk(self, name: str, shard: int, k: int, raw: bytes) -> None:
        """Chunk `k` of the shard file (its crc32c already checked) is the chunk the store
        was built with at that place."""
        if int.from_bytes(raw[-4:], "little") != self.store.chunk_crcs[name][shard, k]:
            eps = fmt.shard_episodes(shard, self.store.n_episodes)
            raise self.store.wrong_file(
                fmt.zarr_shard_file(name, shard),
                f"chunk {k} (episode {eps.start + k}) is not the one {fmt.CHUNK_CRC_FILE} records",
            )

    def _fetch(self, name: str, episodes: list[int]) -> list[tuple[int, int, int, bytes | None]]:
        """(shard, chunk, indexed size, encoded bytes or None if never written) of each
        episode. Remote chunks come from concurrent ranged reads: one round trip in all."""
        found, remote = [], []
        for e in episodes:
            shard, k = divmod(e, fmt.EPISODES_PER_SHARD)
            fd, index = self._shard(name, shard)
            offset, nbytes = index[k]
            if offset == fmt.SHARD_INDEX_EMPTY:
                found.append((shard, k, 0, None))
            elif fd is not None:
                found.append((shard, k, nbytes, os.pread(fd, nbytes, offset)))
            else:
                remote.append(len(found))
                found.append((shard, k, nbytes, offset))
        if remote:
            rels = [fmt.zarr_shard_file(name, found[j][0]) for j in remote]
            starts = [found[j][3] for j in remote]
            stops = [found[j][3] + found[j][2] for j in remote]
            blobs = self.store.location.read_ranges(rels, starts, stops)
            for j, blob in zip(remote, blobs, strict=True):
                found[j] = (*found[j][:3], blob)
        return found

    def read(self, name: str, episodes: np.ndarray, out: np.ndarray) -> None:
        """Decode episodes `episodes` of array `name` into `out[j]` ([T, D] or [T] each)."""
        arr = self.arrays[name]
        n, size = self.store.n_episodes, arr.chunk_nbytes
        scratch = self._scratch.get(name)
        checked = self.store.chunk_crcs is not None  # None where files go unchecked
        episodes = np.asarray(episodes, np.int64).tolist()
        for e in episodes:
            if not 0 <= e < n:
                raise IndexError(f"episode {e} outside [0, {n}) of {self.store.url}")
        for j, (shard, k, nbytes, raw) in enumerate(self._fetch(name, episodes)):
            if raw is None:  # never written: the fill value, as zarr-python reads it
                out[j] = arr.fill_value
                continue
            if len(raw) != nbytes or not _crc_ok(raw):
                raise self._error(name, shard, "crc32c mismatch", chunk=k)
            if checked:
                self._check_chunk(name, shard, k, raw)
            if int.from_bytes(raw[4:8], "little") != size or len(raw) < 20:  # blosc header
                raise self._error(name, shard, f"does not decode to {size} bytes", chunk=k)
            try:
                blosc.decompress(memoryview(raw)[:-4], out[j] if scratch is None else scratch)
            except (RuntimeError, ValueError) as err:
                raise self._error(name, shard, f"blosc failed: {err}", chunk=k) from err
            if scratch is not None:
                out[j] = scratch.T

    def read_episodes(self, episodes: np.ndarray) -> dict[str, np.ndarray]:
        """Episodes as new arrays, {name: [len(episodes), T, ...]} (a convenience for tests)."""
        episodes = np.asarray(episodes, np.int64)
        out = {}
        for name, arr in self.arrays.items():
            out[name] = np.empty((len(episodes), *arr.row_shape), arr.dtype)
            self.read(name, episodes, out[name])
        return out
