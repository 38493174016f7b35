"""One build work unit: source episodes -> one shard of every array, then a commit record.

A unit reads its episodes (byte ranges of one chunk file at a time: memory-mapped locally,
ranged reads remotely), checks them, writes the Zarr shard file of each array (encoded by
datapipe.shardwriter) and the WebDataset tar of the same number, each atomically, and last
writes its record. A unit without a record is redone from scratch on the next run, so a crash
at any point loses at most the units in flight. The destination is a path or an fsspec URL
(see datapipe.location); units run on dask workers, which get it as a string.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from dataclasses import dataclass

import numpy as np

from datapipe import format as fmt
from datapipe.location import Location
from datapipe.shardwriter import encode_shard
from datapipe.source import SourceFile, read_episodes, validate_episodes
from datapipe.tasksets import get_task_set


@dataclass(frozen=True)
class Piece:
    """Episodes [lo, hi) of one source file."""

    file: SourceFile
    lo: int
    hi: int


def write_json_atomic(loc: Location, rel: str, obj) -> dict:
    """Publish `obj` as JSON file `rel` of `loc` atomically; its manifest entry."""
    return _write_atomic(loc, rel, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _task_runs(ids: np.ndarray, first: int) -> list[list[int]]:
    """[[task, start, stop], ...] runs of equal task ids, in store episode numbers."""
    cuts = np.flatnonzero(np.diff(ids)) + 1
    starts = np.concatenate([[0], cuts])
    stops = np.concatenate([cuts, [len(ids)]])
    return [
        [int(ids[a]), first + int(a), first + int(b)] for a, b in zip(starts, stops, strict=True)
    ]


def _write_atomic(loc: Location, rel: str, blob: bytes) -> dict:
    """Publish `blob` as file `rel` of `loc` atomically; its manifest entry."""
    loc.write_atomic(rel, blob)
    return {"size": len(blob), "sha256": _sha256(blob)}


def _write_zarr(root: Location, shard: int, arrays: dict) -> tuple[dict, dict]:
    """Write the shard file of every array; their manifest entries and chunk crc32c lists."""
    files, crcs = {}, {}
    for name in fmt.ARRAYS:
        data = arrays[name][:, 0] if name == "task" else arrays[name]
        rel = fmt.zarr_shard_file(name, shard)
        blob = encode_shard(name, data)
        files[rel] = _write_atomic(root, rel, blob)
        crcs[name] = fmt.chunk_crcs(blob, name)
    return files, crcs


def _write_webdataset(root: Location, shard: int, first: int, arrays: dict) -> dict:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for i in range(len(arrays["task"])):
            key = fmt.wds_key(first + i)
            for name, suffix in fmt.WDS_MEMBERS.items():
                value = arrays[name][i, 0] if name == "task" else arrays[name][i]
                payload = fmt.wds_encode(name, value)
                info = tarfile.TarInfo(f"{key}.{suffix}")
                info.size, info.mtime, info.mode = len(payload), 0, 0o644
                tar.addfile(info, io.BytesIO(payload))
    rel = fmt.wds_shard_file(shard)
    return {rel: _write_atomic(root, rel, buf.getvalue())}


def build_shard(
    dst: str, shard: int, pieces: list[Piece], task_set: str, formats: list[str]
) -> dict:
    """Build shard `shard` of the store at `dst` (a path or URL) from `pieces`; returns its
    commit record."""
    root = Location(dst)
    parts = []
    for p in pieces:
        arrays = read_episodes(p.file.path, p.lo, p.hi)
        validate_episodes(arrays, p.file, p.lo, get_task_set(task_set))
        parts.append(arrays)
    arrays = {k: np.concatenate([a[k] for a in parts]) for k in fmt.SOURCE_KEYS}
    first = pieces[0].file.start + pieces[0].lo
    files, crcs = {}, {}
    if "zarr" in formats:
        zarr_files, crcs = _write_zarr(root, shard, arrays)
        files.update(zarr_files)
    if "webdataset" in formats:
        files.update(_write_webdataset(root, shard, first, arrays))
    n = len(arrays["task"])
    record = {
        "shard": shard,
        "episodes": [first, first + n],
        "rows": int(arrays["task"].size),
        "task_runs": _task_runs(arrays["task"][:, 0], first),
        "files": files,
        "chunk_crc32c": crcs,
    }
    write_json_atomic(root, fmt.unit_record_file(shard), record)
    return record


def hash_source(dst: str, index: int, path: str) -> dict:
    """sha256 of source file `index`, recorded for the store's provenance."""
    from datapipe.source import file_sha256

    record = {"index": index, "sha256": file_sha256(path)}
    write_json_atomic(Location(dst), fmt.source_record_file(index), record)
    return record
