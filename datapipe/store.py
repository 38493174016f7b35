"""Opening a finished store: completeness and version checks, metadata, per-task index,
the manifest, and checked reads of whole episodes.

`open_store` is the one door into a store: it refuses a missing, unfinished or wrong-version
store with the command that fixes it, and every read that fails its checksum raises
CorruptStoreError naming the array, shard file and episode range.

Which file: every chunk carries its own crc32c, so a chunk that is intact but sits in the
wrong file (two shard files swapped, a shard copied from another build) would read as valid
data of other episodes. A store's `chunks.crc32c` (format.py) records the crc32c of every
chunk at its place, and is bound to `manifest.json` by the manifest's sha256: a reader checks
each chunk it reads against it, at no extra read, so opening a store and starting a loader
read metadata only, whatever the store's size (BENCHMARKS.md §13). A store built before the
table existed is checked as before: before a reader uses a data file, the file's size and
sha256 must be the ones `manifest.json` names (`Store.check_file`), which reads every byte
of every shard a reader touches, once per process and again whenever the file changes on
disk (local: its inode, size or mtime; object stores: once per Store). A crc32c of the whole
file would not do: a file of chunks that each end in their own crc32c has a whole-file
crc32c that depends only on the chunk lengths and the index, not on the chunks' contents.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
from functools import cached_property
from pathlib import Path

import numpy as np

from datapipe import format as fmt
from datapipe.errors import (
    CorruptStoreError,
    DatapipeError,
    IncompleteStoreError,
    StoreFormatError,
    StoreNotFoundError,
    StoreVersionError,
)
from datapipe.location import Location, is_storage_error


def _load_json(loc: Location, rel: str) -> dict:
    return _load_json_bytes(loc, rel)[0]


def _load_json_bytes(loc: Location, rel: str) -> tuple[dict, bytes]:
    """JSON file `rel` of `loc`, parsed, and its bytes."""
    try:
        blob = loc.read_bytes(rel)
        return json.loads(blob), blob
    except (OSError, ValueError) as e:
        raise CorruptStoreError(
            f"{loc.child(rel)}: unreadable ({type(e).__name__}: {e}). The store's metadata is "
            f"damaged: rebuild it into a new folder: `{rebuild_command(loc)}`."
        ) from e


def _build_config(loc: Location) -> dict:
    """The store's build_config.json, or {} if it is missing or damaged (for advice only)."""
    try:
        config = json.loads(loc.read_bytes(fmt.CONFIG_FILE))
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def rebuild_command(loc: Location, src: str | None = None) -> str:
    """The `datapipe build` that rebuilds the store at `loc` into a new folder beside it, with
    its recorded source (or `src`) and formats."""
    config = _build_config(loc)
    src = src or config.get("src") or "SRC"
    formats = set(config.get("formats") or ["zarr", "webdataset"])
    flag = "both" if len(formats) == 2 else formats.pop()
    command = ["datapipe", "build", "--src", str(src), "--dst", f"{loc.url}-rebuilt"]
    command += ["--format", flag]
    if config.get("task_set", "auto") != "auto":
        command += ["--task-set", config["task_set"]]
    return shlex.join(command)


def repair_command(loc: Location, src: str | None = None) -> str:
    """The `datapipe repair` that rebuilds the damaged shards of the store at `loc` from its
    recorded source (or `src`)."""
    src = src or _build_config(loc).get("src") or "SRC"
    return shlex.join(["datapipe", "repair", loc.url, "--src", str(src)])


def check_metadata_file(loc: Location, meta: fmt.StoreMeta, rel: str, blob: bytes) -> None:
    """CorruptStoreError unless metadata file `rel` has the sha256 meta.json records for it
    (a store built before meta.json recorded them passes)."""
    want = meta.metadata.get(rel)
    if want is not None and hashlib.sha256(blob).hexdigest() != want:
        raise CorruptStoreError(
            f"{loc.child(rel)}: changed after the build (its sha256 is not the one "
            f"{fmt.META_FILE} records), so the store cannot be trusted. Restore the file from "
            f"a copy of the store, or rebuild it into a new folder: `{rebuild_command(loc)}`."
        )


def _load_manifest(loc: Location, meta: fmt.StoreMeta) -> tuple[dict[str, dict], str]:
    """manifest.json's {file: {"size", "sha256"}}, checked against meta.json and for that
    shape, and the sha256 of the file."""
    doc, blob = _load_json_bytes(loc, fmt.MANIFEST_FILE)
    check_metadata_file(loc, meta, fmt.MANIFEST_FILE, blob)
    files = doc.get("files") if isinstance(doc, dict) else None
    if not isinstance(files, dict) or not all(
        isinstance(v, dict) and {"size", "sha256"} <= v.keys() for v in files.values()
    ):
        raise CorruptStoreError(
            f"{loc.child(fmt.MANIFEST_FILE)}: has no size and sha256 for every data file. The "
            f"store's metadata is damaged: rebuild it into a new folder: `{rebuild_command(loc)}`."
        )
    return files, hashlib.sha256(blob).hexdigest()


def _load_crc_table(loc: Location, n_shards: int, manifest_sha256: str):
    """The store's chunk crc32c table ({array: [n_shards, chunks]}), or None for a store
    built before it existed (its readers hash whole files instead)."""
    if not loc.exists(fmt.CHUNK_CRC_FILE):
        return None
    try:
        return fmt.decode_crc_table(loc.read_bytes(fmt.CHUNK_CRC_FILE), n_shards, manifest_sha256)
    except fmt.MetaError as e:
        raise CorruptStoreError(
            f"{loc.child(fmt.CHUNK_CRC_FILE)}: {e}. The store's metadata is damaged: rebuild it "
            f"into a new folder: `{rebuild_command(loc)}`."
        ) from None


def check_complete(root: Location) -> fmt.StoreMeta:
    """The metadata of the complete store at `root`, or an error saying how to get one."""
    if root.local and os.path.isfile(root.path("")):
        raise StoreNotFoundError(
            f"{root}: a file, not a store; give the store's folder (the one holding "
            f"{fmt.META_FILE}), or build one with `datapipe build`."
        )
    if not root.exists(fmt.META_FILE):
        if root.exists(fmt.PLAN_FILE):
            plan = _load_json(root, fmt.PLAN_FILE)
            command = plan.get("command", "datapipe build --src SRC --dst DST")
            raise IncompleteStoreError(
                f"{root}: the build of this store did not finish. Run `{command}` again to "
                f"finish it; only the missing parts are built."
            )
        if root.is_empty():
            raise StoreNotFoundError(f"{root}: no such store; build one with `datapipe build`.")
        raise StoreNotFoundError(
            f"{root}: not a datapipe store (no {fmt.META_FILE}); build one with `datapipe build`."
        )
    try:
        meta = fmt.StoreMeta.from_json(_load_json(root, fmt.META_FILE))
    except fmt.MetaVersionError as e:
        raise StoreVersionError(
            f"{root}: store {e}, this datapipe reads version {fmt.FORMAT_VERSION}. Rebuild it: "
            f"`datapipe build --src SRC --dst NEW_DST`."
        ) from None
    except fmt.MetaError as e:
        raise CorruptStoreError(
            f"{root.child(fmt.META_FILE)}: {e}. The store's metadata is damaged: rebuild it "
            f"into a new folder: `{rebuild_command(root)}`."
        ) from None
    if not meta.complete:
        raise IncompleteStoreError(f"{root}: {fmt.META_FILE} does not mark the store complete.")
    return meta


class Store:
    """A complete store: dataset facts from its metadata, episodes read on demand."""

    def __init__(
        self,
        path: str | Path,
        meta: fmt.StoreMeta | None = None,
        index: dict | None = None,
        check_files: bool = True,
    ):
        """Open the store at `path` (a local path or an fsspec URL such as s3://bucket/store);
        `meta`/`index` skip the checks, and check_files=False skips checking data files
        against the manifest (for verify-shards only, which hashes every file itself)."""
        self.location = loc = Location(path)
        self.url: str = loc.url  # absolute path, or the URL: what to show or pass on
        self.check_files = check_files
        self._checked: dict[str, tuple] = {}  # file -> its stamp when it last passed
        try:
            self.meta = check_complete(loc) if meta is None else meta
            if index is None:
                index, blob = _load_json_bytes(loc, fmt.INDEX_FILE)
                check_metadata_file(loc, self.meta, fmt.INDEX_FILE, blob)
            self.index = index
            self._manifest, self.chunk_crcs = {}, None
            if check_files:
                self._manifest, manifest_sha256 = _load_manifest(loc, self.meta)
                if "zarr" in self.meta.formats:
                    n_shards = fmt.n_shards(self.meta.n_episodes)
                    self.chunk_crcs = _load_crc_table(loc, n_shards, manifest_sha256)
        except Exception as e:
            if loc.local or isinstance(e, DatapipeError) or not is_storage_error(e):
                raise
            raise loc.access_error(e, "opening the store") from e
        meta = self.meta
        self.n_episodes: int = meta.n_episodes
        self.episode_length: int = meta.rows_per_episode
        self.task_names: list[str] = list(meta.task_names)
        self.obs_dims: list[int] = list(meta.obs_dims)
        self.action_dims: list[int] = list(meta.action_dims)
        self.obs_dim: int = meta.obs_dim
        self.action_dim: int = meta.action_dim
        self.formats: list[str] = list(meta.formats)

    def __repr__(self) -> str:
        return (
            f"Store({self.url!r}, episodes={self.n_episodes}, "
            f"rows={self.episode_length}, tasks={len(self.task_names)})"
        )

    def require_format(self, name: str, instead: str) -> None:
        """StoreFormatError unless the store was built with format `name` ("zarr" or
        "webdataset"); `instead` says what else can read it."""
        if name not in self.formats:
            flag = "both" if set(self.formats) | {name} == set(fmt.FORMATS) else name
            raise StoreFormatError(
                f"{self.url}: was built without its {name} format (formats {self.formats}); "
                f"rebuild with `datapipe build --format {flag}`, or {instead}."
            )

    def read_bytes(self, rel: str) -> bytes:
        """File `rel` of the store (e.g. "meta.json"), whole."""
        return self.location.read_bytes(rel)

    # -- which file ---------------------------------------------------------------------------

    def check_file(self, rel: str, fd: int | None = None) -> None:
        """Raise CorruptStoreError unless data file `rel` is the file the manifest names (size
        and sha256). `fd`: the file open for reading, hashed through that descriptor so that
        later reads through it read the very bytes checked. A file that passed is hashed again
        only once it changes on disk."""
        if not self.check_files:
            return
        stamp = self._stamp(rel, fd)
        if self._checked.get(rel) == stamp:
            return
        self.check_bytes(rel, *self._digest(rel, fd))
        self._checked[rel] = stamp

    def check_bytes(self, rel: str, size: int, sha256: str) -> None:
        """Raise CorruptStoreError unless (size, sha256) are those the manifest names for `rel`."""
        if not self.check_files:
            return
        want = self._manifest.get(rel)
        if want is None:
            problem = f"{fmt.MANIFEST_FILE} does not list it"
        elif size != want["size"]:
            problem = f"{size} bytes where {fmt.MANIFEST_FILE} names a file of {want['size']}"
        elif sha256 != want["sha256"]:
            problem = f"its sha256 differs from the one {fmt.MANIFEST_FILE} names"
        else:
            return
        raise self.wrong_file(rel, problem)

    def wrong_file(self, rel: str, problem: str) -> CorruptStoreError:
        """The error for data file `rel` that is not the one the store was built with."""
        return CorruptStoreError(
            f"{self.location.child(rel)}: not the file this store was built with ({problem}): "
            f"it was swapped with another shard, copied from another build or changed. Rebuild "
            f"it from the source: `{repair_command(self.location)}`."
        )

    def _stamp(self, rel: str, fd: int | None) -> tuple:
        """What identifies the file on disk now: (device, inode, size, mtime) locally; its
        name alone on an object store (checked once per Store)."""
        if not self.location.local:
            return (rel,)
        try:
            st = os.fstat(fd) if fd is not None else os.stat(self.location.path(rel))
        except FileNotFoundError:
            raise CorruptStoreError(
                f"{self.location.child(rel)}: data file missing. Rebuild it from the source: "
                f"`{repair_command(self.location)}`."
            ) from None
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)

    def _digest(self, rel: str, fd: int | None, block: int = 1 << 22) -> tuple[int, str]:
        """(size, sha256) of data file `rel` (through `fd` if given), read in bounded blocks."""
        h, size = hashlib.sha256(), 0
        if fd is not None:
            while data := os.pread(fd, block, size):
                h.update(data)
                size += len(data)
            return size, h.hexdigest()
        with self.location.open(rel) as f:
            while data := f.read(block):
                h.update(data)
                size += len(data)
        return size, h.hexdigest()

    def episodes_of_task(self, task: int | str) -> np.ndarray:
        """Store episode ids of one task (by id or name), ascending."""
        tid = self.task_names.index(task) if isinstance(task, str) else int(task)
        ranges = self.index["tasks"][tid]["ranges"]
        if not ranges:
            return np.zeros(0, np.int64)
        return np.concatenate([np.arange(a, b, dtype=np.int64) for a, b in ranges])

    @cached_property
    def episode_tasks(self) -> np.ndarray:
        """Task id of every episode, [n_episodes] int64, from the index."""
        out = np.full(self.n_episodes, -1, np.int64)
        for task in self.index["tasks"]:
            for a, b in task["ranges"]:
                out[a:b] = task["id"]
        return out

    @cached_property
    def _zarr(self):
        """The Zarr group, opened once its metadata files passed `check_metadata_file`."""
        import zarr

        for rel in fmt.metadata_files(["zarr"]):
            if rel.startswith(fmt.ZARR_DIR) and rel in self.meta.metadata:
                check_metadata_file(self.location, self.meta, rel, self.location.read_bytes(rel))
        return zarr.open_group(self.location.child(fmt.ZARR_DIR), mode="r")

    def read_array(self, name: str, lo: int, hi: int) -> np.ndarray:
        """Episodes [lo, hi) of one array; CorruptStoreError if a checksum fails or a shard file
        is not the one the manifest names."""
        self.require_format("zarr", "read its WebDataset shards")
        try:
            out = self._zarr[name][lo:hi]
        except CorruptStoreError:
            raise
        except (ValueError, RuntimeError, OSError) as e:
            shards = sorted({e_ // fmt.EPISODES_PER_SHARD for e_ in (lo, max(lo, hi - 1))})
            files = [fmt.zarr_shard_file(name, k) for k in shards]
            raise CorruptStoreError(
                f"{self.url}: array {name!r}, episodes [{lo}, {hi}) in shard file(s) "
                f"{', '.join(files)}: {e}. Rebuild the damaged shards from the source: "
                f"`{repair_command(self.location)}`."
            ) from e
        stop = min(hi, self.n_episodes)  # the chunks decoded; now: were they the right files?
        for shard in range(lo // fmt.EPISODES_PER_SHARD, -(-stop // fmt.EPISODES_PER_SHARD)):
            self.check_file(fmt.zarr_shard_file(name, shard))
        return out

    def read_episode(self, i: int) -> dict[str, np.ndarray]:
        """Episode `i` in the source layout: obs [T,O], action [T,A], reward [T], task [T]."""
        if not 0 <= i < self.n_episodes:
            raise IndexError(f"episode {i} outside [0, {self.n_episodes}) of {self.url}")
        out = {name: self.read_array(name, i, i + 1)[0] for name in ("obs", "action", "reward")}
        task = self.read_array("task", i, i + 1)[0]
        out["task"] = np.full(self.episode_length, task, np.int32)
        return out


def open_store(path: str | Path) -> Store:
    """Open the complete store at `path` (see Store)."""
    return Store(path)
