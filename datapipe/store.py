"""Opening a finished store: completeness and version checks, metadata, per-task index,
and checked reads of whole episodes.

`open_store` is the one door into a store: it refuses a missing, unfinished or wrong-version
store with the command that fixes it, and every read that fails its checksum raises
CorruptStoreError naming the array, shard file and episode range.
"""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path

import numpy as np

from datapipe import format as fmt
from datapipe.errors import (
    CorruptStoreError,
    DatapipeError,
    IncompleteStoreError,
    StoreNotFoundError,
    StoreVersionError,
)
from datapipe.location import Location, is_storage_error


def _load_json(loc: Location, rel: str) -> dict:
    try:
        return json.loads(loc.read_bytes(rel))
    except (OSError, ValueError) as e:
        raise CorruptStoreError(
            f"{loc.child(rel)}: unreadable ({type(e).__name__}: {e}); run `tools verify-shards "
            f"{loc}` and rebuild the store with `datapipe build`."
        ) from e


def check_complete(root: Location) -> dict:
    """The metadata of the complete store at `root`, or an error saying how to get one."""
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
    meta = _load_json(root, fmt.META_FILE)
    version = meta.get("format_version")
    if version != fmt.FORMAT_VERSION:
        raise StoreVersionError(
            f"{root}: store format version {version}, this datapipe reads version "
            f"{fmt.FORMAT_VERSION}. Rebuild it: `datapipe build --src SRC --dst NEW_DST`."
        )
    if meta.get("complete") is not True:
        raise IncompleteStoreError(f"{root}: {fmt.META_FILE} does not mark the store complete.")
    return meta


class Store:
    """A complete store: dataset facts from its metadata, episodes read on demand."""

    def __init__(self, path: str | Path, meta: dict | None = None, index: dict | None = None):
        """Open the store at `path` (a local path or an fsspec URL such as s3://bucket/store);
        `meta`/`index` skip the checks (for verify-shards only)."""
        self.location = loc = Location(path)
        self.url: str = loc.url  # absolute path, or the URL: what to show or pass on
        try:
            self.meta = check_complete(loc) if meta is None else meta
            self.index = _load_json(loc, fmt.INDEX_FILE) if index is None else index
        except Exception as e:
            if loc.local or isinstance(e, DatapipeError) or not is_storage_error(e):
                raise
            raise loc.access_error(e, "opening the store") from e
        ds = self.meta["dataset"]
        self.n_episodes: int = ds["n_episodes"]
        self.episode_length: int = ds["rows_per_episode"]
        self.task_names: list[str] = ds["task_names"]
        self.obs_dims: list[int] = ds["obs_dims"]
        self.action_dims: list[int] = ds["action_dims"]
        self.obs_dim: int = ds["obs_dim"]
        self.action_dim: int = ds["action_dim"]
        self.formats: list[str] = self.meta["formats"]

    def __repr__(self) -> str:
        return (
            f"Store({self.url!r}, episodes={self.n_episodes}, "
            f"rows={self.episode_length}, tasks={len(self.task_names)})"
        )

    def read_bytes(self, rel: str) -> bytes:
        """File `rel` of the store (e.g. "meta.json"), whole."""
        return self.location.read_bytes(rel)

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
        import zarr

        if "zarr" not in self.formats:
            raise StoreNotFoundError(
                f"{self.url}: was built without the Zarr arrays (formats {self.formats}); "
                f"rebuild with `datapipe build --format zarr` or read its WebDataset shards."
            )
        return zarr.open_group(self.location.child(fmt.ZARR_DIR), mode="r")

    def read_array(self, name: str, lo: int, hi: int) -> np.ndarray:
        """Episodes [lo, hi) of one array; CorruptStoreError if a checksum fails."""
        try:
            return self._zarr[name][lo:hi]
        except CorruptStoreError:
            raise
        except (ValueError, RuntimeError, OSError) as e:
            shards = sorted({e_ // fmt.EPISODES_PER_SHARD for e_ in (lo, max(lo, hi - 1))})
            files = [fmt.zarr_shard_file(name, k) for k in shards]
            raise CorruptStoreError(
                f"{self.url}: array {name!r}, episodes [{lo}, {hi}) in shard file(s) "
                f"{', '.join(files)}: {e}. Run `tools verify-shards {self.url}` and rebuild "
                f"the damaged shards from the source."
            ) from e

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
