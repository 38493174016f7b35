"""Reading MT30-format source chunks: discovery, structure checks and per-episode checks.

A source folder (a local path or an fsspec URL: s3://, gs://, ...) holds `chunk_0.pt` ..
`chunk_{K-1}.pt`, each a torch-saved TensorDict (or dict) with batch [N, T]: obs f32 [N,T,O],
action f32 [N,T,A], reward f32 [N,T], task i32 [N,T]. A chunk saved from the official
trainer's buffer also holds `episode` i64 [N,T]: `Buffer.load` numbers the episodes it is
given on from those it already holds (the official trainer loads the chunk files sorted by
name), the same number on every row. That key is checked to be exactly this numbering (or
0.. for a chunk loaded into a buffer alone), then left out of the store.

A chunk is a zip archive: `<name>/data.pkl` describes every tensor (storage key, dtype, offset,
shape, strides) and `<name>/data/<key>` holds each storage, uncompressed. We read the zip
directory and unpickle data.pkl with an unpickler that imports and runs nothing (the tensor
rebuild becomes a plain record; TensorDict classes, old or new, become inert stand-ins), so
neither torch nor pickle code execution is on the data path. Episodes [lo, hi) of a key are
then one byte range of the file: read from the local file, or with one ranged request from an
object store. Only the episodes being read are ever in RAM. Credentials and endpoints come
from the storage's standard environment (AWS_* variables for s3://) or the fsspec config.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
import shlex
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from datapipe.errors import SourceError
from datapipe.format import SOURCE_DTYPES, SOURCE_KEYS
from datapipe.tasksets import TaskSet
from datapipe.torchzip import REFETCH, ChunkTensor, describe, read_index

_CHUNK_RE = re.compile(r"^chunk_(\d+)\.pt$")
_MIB = 1 << 20
_INDEX_OPEN = {"block_size": 1 << 16, "cache_type": "blockcache"}  # object stores: the zip
# directory, data.pkl and the storage headers come in a few cached 64 KiB reads


@dataclass(frozen=True)
class SourceFile:
    """One chunk file and where its episodes land in the store."""

    name: str
    path: str  # absolute local path or full URL: usable by any worker process
    size: int
    episodes: int
    start: int  # store index of its first episode
    quick_id: str  # sha256 of its size and its first and last MiB: cheap identity for resume
    load_start: int = 0  # its first episode's number in the official trainer's buffer, which
    # loads the chunks sorted by name as text (chunk_10.pt before chunk_2.pt)


EPISODE_KEY = "episode"  # added by the official Buffer.load; checked, then not stored
NOT_PLANNED = ("path", "load_start")  # SourceFile fields that do not decide the store's bytes


@dataclass(frozen=True)
class Layout:
    """Shape facts shared by every chunk of a dataset."""

    rows: int
    obs_dim: int
    action_dim: int


# --- files: local paths and fsspec URLs --------------------------------------------------------


def _filesystem(path: str | Path):
    """(filesystem, path inside it, is local) for a local path or an fsspec URL."""
    from fsspec.core import url_to_fs
    from fsspec.implementations.local import LocalFileSystem

    fs, inner = url_to_fs(str(path))
    return fs, inner, isinstance(fs, LocalFileSystem)


@contextmanager
def _opened(fs, inner: str, local: bool, where: str, **remote):
    """The file open for binary reads; a SourceError naming it if it cannot be opened."""
    try:
        f = open(inner, "rb") if local else fs.open(inner, "rb", **remote)  # noqa: SIM115
    except OSError as e:
        raise SourceError(
            f"{where}: cannot be opened ({type(e).__name__}: {e}). Check that it exists and is "
            f"readable (object stores: credentials and endpoint come from the standard "
            f"environment, e.g. AWS_* variables, or the fsspec config)."
        ) from e
    with f:
        yield f


def _read_local(f, start: int, nbytes: int) -> np.ndarray:
    """Bytes [start, start + nbytes) of an open local file, read straight into a new array."""
    buf = np.empty(nbytes, np.uint8)
    f.seek(start)
    view, done = memoryview(buf), 0
    while done < nbytes and (got := f.readinto(view[done:])):
        done += got
    return buf[:done]


def check_structure(data: dict, path: str | Path) -> tuple[int, Layout]:
    """(episodes, layout) of a chunk index after checking keys, dtypes and shapes."""
    keys = set(data.keys())
    if keys - {EPISODE_KEY} != SOURCE_KEYS:
        missing = sorted(SOURCE_KEYS - keys)
        extra = sorted(keys - SOURCE_KEYS - {EPISODE_KEY}, key=str)
        raise SourceError(
            f"{path}: keys must be exactly {sorted(SOURCE_KEYS)}; missing {missing}, "
            f"unexpected {extra}. This is not an MT30-format chunk: {REFETCH}."
        )
    for key, dtype in SOURCE_DTYPES.items():
        t = data[key]
        if not isinstance(t, ChunkTensor) or t.dtype != dtype:
            got = f"torch.{t.dtype}" if isinstance(t, ChunkTensor) else describe(t)
            raise SourceError(
                f"{path}: {key} must be a torch.{dtype} tensor, got {got}: {REFETCH}."
            )
    obs, action, reward, task = (data[k] for k in ("obs", "action", "reward", "task"))
    if obs.ndim != 3 or action.ndim != 3 or reward.ndim != 2 or task.ndim != 2:
        raise SourceError(
            f"{path}: expected obs [N,T,O], action [N,T,A], reward [N,T], task [N,T]; got "
            f"{list(obs.shape)}, {list(action.shape)}, {list(reward.shape)}, {list(task.shape)}."
        )
    n, rows = obs.shape[:2]
    if EPISODE_KEY in keys:
        _check_episode_key_structure(data[EPISODE_KEY], (n, rows), path)
    for key in ("action", "reward", "task"):
        if tuple(data[key].shape[:2]) != (n, rows):
            raise SourceError(
                f"{path}: {key} has batch shape {list(data[key].shape[:2])} but obs has "
                f"{[n, rows]}: every key must have the same [episodes, rows]: {REFETCH}."
            )
    if n == 0 or rows < 2:
        raise SourceError(f"{path}: holds {n} episodes of {rows} rows; nothing to build.")
    for key in _keys_to_read(data):
        t = data[key]
        if 0 < t.stride[0] < t.span(0, 1)[1] // t.np_dtype.itemsize:
            raise SourceError(
                f"{path}: {key} is stored with its episodes interleaved (strides {list(t.stride)}), "
                f"so an episode is not one byte range. Save it again with every tensor "
                f"contiguous (tensor.contiguous()) or {REFETCH}."
            )
    return n, Layout(rows=rows, obs_dim=obs.shape[2], action_dim=action.shape[2])


def _keys_to_read(data: dict) -> list[str]:
    return [*SOURCE_DTYPES, *([EPISODE_KEY] if EPISODE_KEY in data else [])]


def _check_episode_key_structure(t, batch: tuple[int, int], path) -> None:
    if not isinstance(t, ChunkTensor) or t.dtype != "int64" or tuple(t.shape) != batch:
        got = f"torch.{t.dtype} {list(t.shape)}" if isinstance(t, ChunkTensor) else describe(t)
        raise SourceError(
            f"{path}: its {EPISODE_KEY!r} key is {got}, but the official Buffer.load adds it as "
            f"a torch.int64 tensor of the batch shape {list(batch)}: this is not an MT30 chunk "
            f"saved from the official buffer. Drop the key and save the chunk again: "
            f"{drop_episode_command(str(path))}"
        )


def drop_episode_command(path: str) -> str:
    """The shell line that saves the chunk at `path` again without its `episode` key."""
    quoted = json.dumps(path)  # a Python string literal without single quotes, for the shell
    code = (
        f"import torch; td = torch.load({quoted}, weights_only=False); "
        f'del td["{EPISODE_KEY}"]; torch.save(td, {quoted})'
    )
    return f"python -c {shlex.quote(code)}"


def _cat(fs, inner: str, start: int, end: int) -> bytes:
    """Bytes [start, end) in one ranged request (s3fs takes start/end as keywords only, and
    reads the whole file for an empty range)."""
    return fs.cat_file(inner, start=start, end=end) if end > start else b""


def _quick_id(fs, inner: str, size: int) -> str:
    h = hashlib.sha256(str(size).encode())
    h.update(_cat(fs, inner, 0, min(size, _MIB)))
    h.update(_cat(fs, inner, max(0, size - _MIB), size))
    return h.hexdigest()


def scan_sources(src: str | Path) -> tuple[list[SourceFile], Layout]:
    """Every chunk under `src` (a local folder or a URL), checked for structure and for one
    shared layout."""
    fs, root, local = _filesystem(src)
    fs.invalidate_cache(root)  # list what is there now, not what this process saw before
    if not fs.isdir(root):
        raise SourceError(f"{src}: no such source directory; pass the folder holding chunk_K.pt")
    found = []
    for entry in fs.ls(root, detail=True):
        m = _CHUNK_RE.match(posixpath.basename(entry["name"].rstrip("/")))
        if m and entry["type"] == "file":
            found.append((int(m.group(1)), entry))
    found.sort(key=lambda item: item[0])
    if not found:
        raise SourceError(
            f"{src}: no chunk_K.pt files found. Pass the folder of the MT30 chunks, or make a "
            f"sample with `tools make-mt30 --dst {src}`."
        )
    numbers = [k for k, _ in found]
    if numbers != list(range(len(found))):
        missing = sorted(set(range(max(numbers) + 1)) - set(numbers))
        repeated = sorted({k for k in numbers if numbers.count(k) > 1})
        raise SourceError(
            f"{src}: chunk numbers must run 0..K-1 with none missing or repeated; missing "
            f"{', '.join(f'chunk_{k}.pt' for k in missing)}"
            + (f"; repeated numbers {repeated}" if repeated else "")
            + ". Copy the missing files in."
        )
    files, layout, start = [], None, 0
    for _, entry in found:
        inner, size = entry["name"], int(entry["size"])
        name = posixpath.basename(inner)
        where = str(Path(inner).resolve()) if local else fs.unstrip_protocol(inner)
        with _opened(fs, inner, local, where, **_INDEX_OPEN) as f:
            n, this = check_structure(read_index(f, where), where)
        if layout is None:
            layout, first = this, name
        elif this != layout:
            raise SourceError(
                f"{where}: episodes of {this.rows} rows, obs {this.obs_dim}, action "
                f"{this.action_dim} differ from {first} ({layout.rows} rows, obs "
                f"{layout.obs_dim}, action {layout.action_dim}): every chunk of a dataset "
                f"must share one layout. Build different datasets into different stores."
            )
        files.append(SourceFile(name, where, size, n, start, _quick_id(fs, inner, size)))
        start += n
    return _with_load_starts(files), layout


def _with_load_starts(files: list[SourceFile]) -> list[SourceFile]:
    """`files` with the official trainer's numbering: it loads `sorted(glob("*.pt"))`."""
    out, first = {}, 0
    for f in sorted(files, key=lambda f: f.name):
        out[f.name] = replace(f, load_start=first)
        first += f.episodes
    return [out[f.name] for f in files]


class ChunkReader:
    """One chunk (a local path or a URL) held open with its index parsed once, for reading
    many episode ranges: each `read` is one byte range per key, a local read or one ranged
    request to an object store."""

    def __init__(self, path: str | Path):
        fs, self._inner, self._local = _filesystem(path)
        self._fs, self.where = fs, str(path)
        self._opened = _opened(fs, self._inner, self._local, self.where, **_INDEX_OPEN)
        self._file = self._opened.__enter__()
        try:
            self._index = read_index(self._file, self.where)
            self.episodes, self.layout = check_structure(self._index, self.where)
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> ChunkReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._opened.__exit__(None, None, None)

    def read(self, lo: int, hi: int) -> dict[str, np.ndarray]:
        """Episodes [lo, hi) as owned, native-byte-order numpy arrays (with the `episode` key
        if the chunk has one)."""
        where = self.where
        if not 0 <= lo <= hi <= self.episodes:
            raise SourceError(
                f"{where}: episodes [{lo}, {hi}) asked for, but it holds {self.episodes}."
            )
        out = {}
        for key in _keys_to_read(self._index):
            t = self._index[key]
            start, nbytes = t.span(lo, hi)
            if self._local:
                buf = _read_local(self._file, start, nbytes)
            else:
                raw = _cat(self._fs, self._inner, start, start + nbytes)
                buf = np.frombuffer(raw, np.uint8).copy()
            if buf.size != nbytes:
                raise SourceError(
                    f"{where}: {key} of episodes [{lo}, {hi}) runs past the end of the file "
                    f"(truncated or changed since it was scanned): {REFETCH}.",
                    path=self.where,
                )
            view = t.view(buf, hi - lo)
            whole = view.flags.c_contiguous and view.nbytes == buf.nbytes
            array = buf.view(view.dtype).reshape(view.shape) if whole else np.array(view)
            out[key] = array.astype(array.dtype.newbyteorder("="), copy=False)
        return out


def read_episodes(path: str | Path, lo: int, hi: int) -> dict[str, np.ndarray]:
    """Episodes [lo, hi) of one chunk (a local path or a URL) as owned numpy arrays."""
    with ChunkReader(path) as chunk:
        return chunk.read(lo, hi)


def validate_episodes(arrays: dict, file: SourceFile, lo: int, task_set: TaskSet) -> None:
    """Raise SourceError on the first bad episode of `arrays` (episodes lo.. of `file`)."""

    def fail(i: int, what: str, fix: str) -> None:
        raise SourceError(
            f"{file.path}, episode {lo + i} (store episode {file.start + lo + i}): {what}. {fix}",
            path=file.path,
        )

    corrupt = f"The file is corrupt: {REFETCH}."
    if EPISODE_KEY in arrays:
        _check_episode_numbers(arrays[EPISODE_KEY], file, lo, fail)
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


def _check_episode_numbers(numbers: np.ndarray, file: SourceFile, lo: int, fail) -> None:
    """The `episode` key of episodes lo.. of `file` is Buffer.load's numbering: load order, or
    from 0 for a chunk loaded alone; the same number on every row."""
    own = lo + np.arange(len(numbers))[:, None]
    if (numbers == own + file.load_start).all() or (numbers == own).all():
        return
    wrong = numbers != own + file.load_start
    i = int(np.argmax(wrong.any(axis=1)))
    row = int(np.argmax(wrong[i]))
    fail(
        i,
        f"its {EPISODE_KEY!r} key is {numbers[i, row]} at row {row}, but the official "
        f"Buffer.load writes {file.load_start + lo + i} there ({lo + i} for a chunk loaded "
        f"alone), on every row of the episode: the key does not number these episodes (were "
        f"they reordered or cut after loading?)",
        f"Drop the key and save the chunk again: {drop_episode_command(file.path)}",
    )


def file_sha256(path: str | Path, block: int = 1 << 24) -> str:
    """sha256 of a file (a local path or a URL), read in bounded blocks."""
    fs, inner, local = _filesystem(path)
    with _opened(fs, inner, local, str(path), block_size=block, cache_type="none") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
