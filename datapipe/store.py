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
    IncompleteStoreError,
    StoreNotFoundError,
    StoreVersionError,
)


def _load_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CorruptStoreError(
            f"{path}: unreadable ({type(e).__name__}: {e}); run `tools verify-shards "
            f"{path.parent}` and rebuild the store with `datapipe build`."
        ) from e


def check_complete(root: Path) -> dict:
    """The metadata of the complete store at `root`, or an error saying how to get one."""
    meta_path = root / fmt.META_FILE
    if not meta_path.exists():
        plan_path = root / fmt.PLAN_FILE
        if plan_path.exists():
            command = _load_json(plan_path).get("command", "datapipe build --src SRC --dst DST")
            raise IncompleteStoreError(
                f"{root}: the build of this store did not finish. Run `{command}` again to "
                f"finish it; only the missing parts are built."
            )
        if not root.exists():
            raise StoreNotFoundError(f"{root}: no such store; build one with `datapipe build`.")
        raise StoreNotFoundError(
            f"{root}: not a datapipe store (no {fmt.META_FILE}); build one with `datapipe build`."
        )
    meta = _load_json(meta_path)
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
        """Open the store at `path`; `meta`/`index` skip the checks (for verify-shards only)."""
        self.path = Path(path)
        self.meta = check_complete(self.path) if meta is None else meta
        self.index = _load_json(self.path / fmt.INDEX_FILE) if index is None else index
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
            f"Store({str(self.path)!r}, episodes={self.n_episodes}, "
            f"rows={self.episode_length}, tasks={len(self.task_names)})"
        )

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
                f"{self.path}: was built without the Zarr arrays (formats {self.formats}); "
                f"rebuild with `datapipe build --format zarr` or read its WebDataset shards."
            )
        return zarr.open_group(self.path / fmt.ZARR_DIR, mode="r")

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
                f"{self.path}: array {name!r}, episodes [{lo}, {hi}) in shard file(s) "
                f"{', '.join(files)}: {e}. Run `tools verify-shards {self.path}` and rebuild "
                f"the damaged shards from the source."
            ) from e

    def read_episode(self, i: int) -> dict[str, np.ndarray]:
        """Episode `i` in the source layout: obs [T,O], action [T,A], reward [T], task [T]."""
        if not 0 <= i < self.n_episodes:
            raise IndexError(f"episode {i} outside [0, {self.n_episodes}) of {self.path}")
        out = {name: self.read_array(name, i, i + 1)[0] for name in ("obs", "action", "reward")}
        task = self.read_array("task", i, i + 1)[0]
        out["task"] = np.full(self.episode_length, task, np.int32)
        return out


def open_store(path: str | Path) -> Store:
    """Open the complete store at `path` (see Store)."""
    return Store(path)
