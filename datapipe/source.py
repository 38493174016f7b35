"""Reading MT30-format source chunks: discovery, structure checks and per-episode checks.

A source directory holds `chunk_0.pt` .. `chunk_{K-1}.pt`, each a torch-saved TensorDict
(or dict) with batch [N, T]: obs f32 [N,T,O], action f32 [N,T,A], reward f32 [N,T],
task i32 [N,T]. Files are always opened memory-mapped, so only the episodes being read
are ever in RAM.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from datapipe.errors import SourceError
from datapipe.format import SOURCE_DTYPES, SOURCE_KEYS
from datapipe.tasksets import TaskSet

_CHUNK_RE = re.compile(r"^chunk_(\d+)\.pt$")
_REFETCH = "re-download or regenerate it"


@dataclass(frozen=True)
class SourceFile:
    """One chunk file and where its episodes land in the store."""

    name: str
    path: str
    size: int
    episodes: int
    start: int  # store index of its first episode
    quick_id: str  # sha256 of its size and its first and last MiB: cheap identity for resume


@dataclass(frozen=True)
class Layout:
    """Shape facts shared by every chunk of a dataset."""

    rows: int
    obs_dim: int
    action_dim: int


def open_chunk(path: str | Path) -> Mapping:
    """The chunk at `path`, memory-mapped; a clear SourceError if it cannot be read."""
    import torch

    path = Path(path)
    try:
        data = torch.load(path, mmap=True, weights_only=False, map_location="cpu")
    except ModuleNotFoundError as e:
        raise SourceError(
            f"{path}: reading it needs the module {e.name!r}: pip install {e.name}"
        ) from e
    except Exception as e:
        raise SourceError(
            f"{path}: cannot be read as a torch-saved TensorDict ({type(e).__name__}: {e}). "
            f"It may be truncated or not an MT30 chunk: {_REFETCH}."
        ) from e
    if not isinstance(data, Mapping) and not hasattr(data, "keys"):
        raise SourceError(
            f"{path}: holds a {type(data).__name__}, not a TensorDict of obs/action/reward/task: "
            f"is this an MT30 chunk?"
        )
    return data


def check_structure(data: Mapping, path: str | Path) -> tuple[int, Layout]:
    """(episodes, layout) of an opened chunk after checking keys, dtypes and shapes."""
    import torch

    keys = set(data.keys())
    if keys != SOURCE_KEYS:
        missing, extra = sorted(SOURCE_KEYS - keys), sorted(keys - SOURCE_KEYS)
        raise SourceError(
            f"{path}: keys must be exactly {sorted(SOURCE_KEYS)}; missing {missing}, "
            f"unexpected {extra}. This is not an MT30-format chunk: {_REFETCH}."
        )
    for key, dtype in SOURCE_DTYPES.items():
        t = data[key]
        if not isinstance(t, torch.Tensor) or str(t.dtype) != f"torch.{dtype}":
            got = getattr(t, "dtype", type(t).__name__)
            raise SourceError(
                f"{path}: {key} must be a torch.{dtype} tensor, got {got}: {_REFETCH}."
            )
    obs, action, reward, task = (data[k] for k in ("obs", "action", "reward", "task"))
    if obs.ndim != 3 or action.ndim != 3 or reward.ndim != 2 or task.ndim != 2:
        raise SourceError(
            f"{path}: expected obs [N,T,O], action [N,T,A], reward [N,T], task [N,T]; got "
            f"{list(obs.shape)}, {list(action.shape)}, {list(reward.shape)}, {list(task.shape)}."
        )
    n, rows = obs.shape[:2]
    for key in ("action", "reward", "task"):
        if tuple(data[key].shape[:2]) != (n, rows):
            raise SourceError(
                f"{path}: {key} has batch shape {list(data[key].shape[:2])} but obs has "
                f"{[n, rows]}: every key must have the same [episodes, rows]: {_REFETCH}."
            )
    if n == 0 or rows < 2:
        raise SourceError(f"{path}: holds {n} episodes of {rows} rows; nothing to build.")
    return n, Layout(rows=rows, obs_dim=obs.shape[2], action_dim=action.shape[2])


def _quick_id(path: Path, size: int) -> str:
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, size - (1 << 20)))
        h.update(f.read(1 << 20))
    return h.hexdigest()


def scan_sources(src: str | Path) -> tuple[list[SourceFile], Layout]:
    """Every chunk under `src`, checked for structure and for one shared layout."""
    src = Path(src)
    if not src.is_dir():
        raise SourceError(f"{src}: no such source directory; pass the folder holding chunk_K.pt")
    found = sorted((int(m.group(1)), p) for p in src.iterdir() if (m := _CHUNK_RE.match(p.name)))
    if not found:
        raise SourceError(
            f"{src}: no chunk_K.pt files found. Pass the folder of the MT30 chunks, or make a "
            f"sample with `tools make-mt30 --dst {src}`."
        )
    numbers = [k for k, _ in found]
    if numbers != list(range(len(found))):
        missing = sorted(set(range(max(numbers) + 1)) - set(numbers))
        raise SourceError(
            f"{src}: chunk numbers must run 0..K-1 with none missing; missing "
            f"{', '.join(f'chunk_{k}.pt' for k in missing)}. Copy the missing files in."
        )
    files, layout, start = [], None, 0
    for _, path in found:
        n, this = check_structure(open_chunk(path), path)
        if layout is None:
            layout, first = this, path.name
        elif this != layout:
            raise SourceError(
                f"{path}: episodes of {this.rows} rows, obs {this.obs_dim}, action "
                f"{this.action_dim} differ from {first} ({layout.rows} rows, obs "
                f"{layout.obs_dim}, action {layout.action_dim}): every chunk of a dataset "
                f"must share one layout. Build different datasets into different stores."
            )
        size = path.stat().st_size
        files.append(
            SourceFile(path.name, str(path.resolve()), size, n, start, _quick_id(path, size))
        )
        start += n
    return files, layout


def read_episodes(path: str | Path, lo: int, hi: int) -> dict[str, np.ndarray]:
    """Episodes [lo, hi) of one chunk as owned numpy arrays; the mapping is released after."""
    data = open_chunk(path)
    out = {key: np.array(data[key][lo:hi].numpy(), copy=True) for key in SOURCE_KEYS}
    del data
    return out


def validate_episodes(arrays: dict, file: SourceFile, lo: int, task_set: TaskSet) -> None:
    """Raise SourceError on the first bad episode of `arrays` (episodes lo.. of `file`)."""

    def fail(i: int, what: str, fix: str) -> None:
        raise SourceError(
            f"{file.path}, episode {lo + i} (store episode {file.start + lo + i}): {what}. {fix}"
        )

    corrupt = f"The file is corrupt: {_REFETCH}."
    bad_obs = ~np.isfinite(arrays["obs"]).all(axis=(1, 2))
    if bad_obs.any():
        i = int(np.argmax(bad_obs))
        row = int(np.argmax(~np.isfinite(arrays["obs"][i]).all(axis=1)))
        fail(i, f"obs is NaN or infinite at row {row}; obs must be finite everywhere", corrupt)
    for key in ("action", "reward"):
        values = arrays[key][:, 1:]
        finite = np.isfinite(values).reshape(values.shape[0], values.shape[1], -1).all(axis=2)
        if not finite.all():
            i = int(np.argmax(~finite.all(axis=1)))
            row = 1 + int(np.argmax(~finite[i]))
            fail(
                i,
                f"{key} is NaN or infinite at row {row}; only row 0 may hold NaN fillers",
                corrupt,
            )
    task = arrays["task"]
    changes = (task != task[:, :1]).any(axis=1)
    if changes.any():
        i = int(np.argmax(changes))
        row = int(np.argmax(task[i] != task[i, 0]))
        fail(
            i,
            f"task changes from {task[i, 0]} to {task[i, row]} at row {row}; an episode "
            f"has one task",
            corrupt,
        )
    ids = task[:, 0]
    out_of_range = (ids < 0) | (ids >= task_set.n_tasks)
    if out_of_range.any():
        i = int(np.argmax(out_of_range))
        fail(
            i,
            f"task id {ids[i]} is outside [0, {task_set.n_tasks}) of task set {task_set.name}",
            "Pass the right --task-set, or the file is corrupt.",
        )
    obs_dims = np.asarray(task_set.obs_dims)[ids]
    act_dims = np.asarray(task_set.action_dims)[ids]
    for key, dims in (("obs", obs_dims), ("action", act_dims)):
        values = arrays[key][:, 1:] if key == "action" else arrays[key]
        padded = np.arange(values.shape[2])[None, :] >= dims[:, None]  # [n, width]
        nonzero = ((values != 0).any(axis=1) & padded).any(axis=1)
        if nonzero.any():
            i = int(np.argmax(nonzero))
            fail(
                i,
                f"{key} columns from {dims[i]} on must be zero padding for task {ids[i]} "
                f"({task_set.names[ids[i]]}, {dims[i]} dims) but are not",
                "Pass the right --task-set, or the file is corrupt.",
            )


def file_sha256(path: str | Path, block: int = 1 << 24) -> str:
    """sha256 of a file, read in bounded blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()
