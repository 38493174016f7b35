"""One official chunk file written in bounded memory: `write_chunk`.

A chunk is `torch.save` of a TensorDict of batch [N, T] (datapipe/torchzip.py reads it). A
full MT30 chunk is 11 GB; torch.save needs all of it in RAM. Here torch.save still lays the
file out, so that every header is torch's own: under `torch.serialization.skip_data` it writes
the zip records (data.pkl, the version records, one record per tensor, the serialization id)
and leaves each tensor's bytes as a hole, from tensors that are allocated but never touched.
The episodes are then written into the holes block by block, and what depends on their bytes
is set in place: each tensor record's CRC-32 (in its data descriptor and in the central
directory) and the serialization id, whose second half combines every record's CRC-32. The
file is byte for byte what torch.save of the whole TensorDict writes (tests/test_chunkfile.py).
"""

from __future__ import annotations

import os
import struct
import tempfile
import zipfile
import zlib
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from datapipe.location import TMP_SUFFIX
from tools.errors import ToolError

KEYS = ("obs", "action", "reward", "task")  # the official key order
STREAMS = hasattr(torch.serialization, "skip_data")  # torch >= 2.6: bounded memory
_SERIALIZATION_ID = ".data/serialization_id"
_DESCRIPTOR = b"PK\x07\x08"
_CENTRAL = b"PK\x01\x02"
_ZIP64_END = b"PK\x06\x06"
_MASK = (1 << 64) - 1


def chunk_shapes(n: int, rows: int, obs_dim: int, action_dim: int) -> dict[str, tuple]:
    """Shape of every tensor of a chunk of `n` episodes of `rows` rows."""
    return {
        "obs": (n, rows, obs_dim),
        "action": (n, rows, action_dim),
        "reward": (n, rows),
        "task": (n, rows),
    }


_DTYPES = {"obs": np.float32, "action": np.float32, "reward": np.float32, "task": np.int32}


def save_chunk(parts: list[dict], path: Path) -> None:
    """Write episodes held in memory (dicts of obs/action/reward/task arrays, concatenated in
    order) as the chunk file `path`."""
    n = sum(len(p["task"]) for p in parts)
    _, rows, obs_dim = parts[0]["obs"].shape
    write_chunk(path, chunk_shapes(n, rows, obs_dim, parts[0]["action"].shape[2]), parts)


def write_chunk(path: Path, shapes: dict[str, tuple], blocks: Iterable[dict]) -> None:
    """Write the official chunk file `path` (atomically) from `blocks`: dicts of obs, action,
    reward and task arrays of consecutive episodes, in order, that together fill `shapes`
    (chunk_shapes). One block is in memory at a time. torch before 2.6 has no `skip_data`:
    there the chunk is gathered in memory and saved whole (the same bytes, the whole chunk's
    memory, as make-mt30 always did before; `tools make-mt30` says so)."""
    n = shapes["task"][0]
    # torch.save names the zip records after the file it writes ("chunk_0.pt/data.pkl", as
    # the released chunks), so it writes a path: in a unique temporary folder beside `path`,
    # flushed to disk, then renamed into place.
    with tempfile.TemporaryDirectory(prefix=f".{path.name}{TMP_SUFFIX}", dir=path.parent) as tmp:
        part = Path(tmp) / f"{path.name}.tmp"
        if STREAMS:
            _save_skeleton(part, shapes)
            records = _records(part)
            with open(part, "rb+") as f:
                crcs = _fill(f.fileno(), records, shapes, blocks, n)
                _set_crcs(f.fileno(), records, crcs)
                os.fsync(f.fileno())
        else:
            _save_whole(part, shapes, blocks)
        os.replace(part, path)


def _save_whole(part: Path, shapes: dict[str, tuple], blocks: Iterable[dict]) -> None:
    """torch.save of the whole chunk, gathered in memory (torch < 2.6)."""
    from tensordict import TensorDict

    blocks = list(blocks)
    arrays = {k: np.concatenate([np.asarray(b[k], _DTYPES[k]) for b in blocks]) for k in KEYS}
    for key, arr in arrays.items():
        if arr.shape != shapes[key]:
            raise ToolError(
                f"the blocks held {arr.shape[0]} episodes, the chunk has {shapes[key][0]}"
            )
    n, rows = shapes["task"]
    td = TensorDict({k: torch.from_numpy(v) for k, v in arrays.items()}, batch_size=[n, rows])
    torch.save(td, part)
    with open(part, "rb+") as f:
        os.fsync(f.fileno())


def _save_skeleton(part: Path, shapes: dict[str, tuple]) -> None:
    """torch.save of the chunk's TensorDict with every tensor's bytes left as a hole. The
    tensors are allocated, never touched: the kernel gives them no memory."""
    from tensordict import TensorDict

    n, rows = shapes["task"]
    tensors = {k: torch.empty(shapes[k], dtype=getattr(torch, _DTYPES[k].__name__)) for k in KEYS}
    with torch.serialization.skip_data():
        torch.save(TensorDict(tensors, batch_size=[n, rows]), part)


class _Record:
    """Where one zip record's bytes, data descriptor and central directory entry are."""

    def __init__(self, name: str, data: int, size: int, central: int):
        self.name, self.data, self.size, self.central = name, data, size, central

    @property
    def descriptor_crc(self) -> int:
        """File offset of the CRC-32 in the data descriptor that follows the bytes."""
        return self.data + self.size + len(_DESCRIPTOR)

    @property
    def central_crc(self) -> int:
        """File offset of the CRC-32 in the record's central directory entry."""
        return self.central + 16


def _records(part: Path) -> list[_Record]:
    """Every record of the zip file `part`, in file order (torch writes the central directory
    in the same order as the records)."""
    with open(part, "rb") as f, zipfile.ZipFile(f) as archive:
        infos = archive.infolist()
        size = os.fstat(f.fileno()).st_size
        f.seek(max(0, size - (1 << 16)))
        tail = f.read()
        end = tail.rfind(_ZIP64_END)  # torch always writes the zip64 end of central directory
        if end < 0:
            raise ToolError(f"{part}: torch.save wrote no zip64 directory; cannot fill it")
        central = struct.unpack_from("<Q", tail, end + 48)[0]
        records = []
        for info in infos:
            f.seek(info.header_offset + 26)
            name_len, extra_len = struct.unpack("<HH", f.read(4))
            data = info.header_offset + 30 + name_len + extra_len
            f.seek(central)
            entry = f.read(46)
            if entry[:4] != _CENTRAL:
                raise ToolError(f"{part}: unexpected zip layout at {central}")
            n, x, c = struct.unpack_from("<HHH", entry, 28)
            records.append(_Record(info.filename.split("/", 1)[1], data, info.file_size, central))
            central += 46 + n + x + c
    return records


def _fill(fd: int, records: list[_Record], shapes: dict, blocks: Iterable[dict], n: int) -> dict:
    """Write `blocks` into the tensors' holes; the CRC-32 of every tensor record."""
    where = _tensor_records(records, shapes)
    crcs = {k: 0 for k in KEYS}
    done = 0
    for block in blocks:
        m = len(block["task"])
        for key in KEYS:
            arr = np.ascontiguousarray(block[key], dtype=_DTYPES[key])
            if arr.shape != (m, *shapes[key][1:]):
                raise ToolError(f"block {key} of shape {arr.shape}, not (m, *{shapes[key][1:]})")
            rec = where[key]
            data = memoryview(arr).cast("B")
            _pwrite_all(fd, data, rec.data + done * (rec.size // n))
            crcs[key] = zlib.crc32(data, crcs[key])
        done += m
    if done != n:  # also guards the rec.size // n above: n == 0 has no blocks to write
        raise ToolError(f"the blocks held {done} episodes, the chunk has {n}")
    return {where[k].name: crcs[k] for k in KEYS}


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        done = os.pwrite(fd, data, offset)
        data, offset = data[done:], offset + done


def _tensor_records(records: list[_Record], shapes: dict) -> dict[str, _Record]:
    """The data record of each key. torch numbers storages in the order it pickles them,
    which is the TensorDict's key order (KEYS); sizes are checked against the shapes."""
    data = [r for r in records if r.name.startswith("data/")]
    out = dict(zip(KEYS, sorted(data, key=lambda r: int(r.name.split("/")[1])), strict=True))
    for key, rec in out.items():
        want = int(np.prod(shapes[key])) * 4
        if rec.size != want:
            raise ToolError(f"torch.save laid out {rec.name} as {rec.size} bytes, not {want}")
    return out


def _hash_combine(seed: int, value: int) -> int:
    """c10::hash_combine on 64-bit integers (torch's serialization id)."""
    return seed ^ ((value + 0x9E3779B9 + ((seed << 6) & _MASK) + (seed >> 2)) & _MASK)


def _set_crcs(fd: int, records: list[_Record], crcs: dict[str, int]) -> None:
    """Write the tensor records' CRC-32s and the serialization id that combines them all.
    Its first half hashes the record names only and is kept as torch.save wrote it."""
    combined = 0
    for rec in records:
        if rec.name == _SERIALIZATION_ID:
            old = os.pread(fd, rec.size, rec.data)
            new = old[:20] + b"%020d" % combined
            os.pwrite(fd, new, rec.data)
            crcs[rec.name] = zlib.crc32(new)
        elif rec.name not in crcs:
            crcs[rec.name] = struct.unpack("<I", os.pread(fd, 4, rec.descriptor_crc))[0]
        combined = _hash_combine(combined, crcs[rec.name])
        crc = struct.pack("<I", crcs[rec.name])
        os.pwrite(fd, crc, rec.descriptor_crc)
        os.pwrite(fd, crc, rec.central_crc)
