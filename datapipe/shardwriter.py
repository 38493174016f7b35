"""Encoding one shard file of a format-v1 Zarr array directly, byte-identical to zarr-python.

Why: `zarr.Array.__setitem__` spent ~0.37 s per 256-episode shard on this machine, ~5x the
codec's own encoding time (`tools bench-codecs`; BENCHMARKS.md), and writes files in place.
Here each inner chunk is encoded with the same numcodecs Blosc and crc32c that zarr uses,
in zarr's chunk order, followed by zarr's shard index, so the build can write each file
atomically (temp file, then rename). tests/test_shardwriter.py proves the bytes equal what
zarr-python writes for the same data, and zarr reads them back.
"""

from __future__ import annotations

import numpy as np
from crc32c import crc32c
from numcodecs import Blosc

from datapipe import format as fmt


def _crc(data: bytes) -> bytes:
    return crc32c(data).to_bytes(4, "little")


def _blosc(itemsize: int) -> Blosc:
    shuffle = {"noshuffle": 0, "shuffle": 1, "bitshuffle": 2}[fmt.BLOSC["shuffle"]]
    return Blosc(
        cname=fmt.BLOSC["cname"], clevel=fmt.BLOSC["clevel"], shuffle=shuffle, typesize=itemsize
    )


def encode_shard(name: str, data: np.ndarray) -> bytes:
    """The shard file bytes of array `name` holding `data` (the shard's episodes; fewer than
    EPISODES_PER_SHARD only in the last shard)."""
    n, per_shard = len(data), fmt.EPISODES_PER_SHARD
    data = np.ascontiguousarray(data, dtype=fmt.SOURCE_DTYPES[name])
    codec = _blosc(data.itemsize)
    if name == "task":  # one chunk of a whole shard, padded with the fill value
        chunks = [np.concatenate([data, np.zeros(per_shard - n, data.dtype)])]
        n_chunks = 1
    else:  # one chunk per episode; obs and action transposed to [D, T]
        chunks = [ep.T if ep.ndim == 2 else ep for ep in data]
        n_chunks = per_shard
    index = np.full((n_chunks, 2), fmt.SHARD_INDEX_EMPTY, dtype="<u8")
    parts, offset = [], 0
    for i, chunk in enumerate(chunks):
        encoded = codec.encode(np.ascontiguousarray(chunk))
        blob = bytes(encoded) + _crc(encoded)
        parts.append(blob)
        index[i] = (offset, len(blob))
        offset += len(blob)
    index_bytes = index.tobytes()
    return b"".join(parts) + index_bytes + _crc(index_bytes)
