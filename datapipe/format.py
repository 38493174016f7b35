"""The on-disk store format, version 1: the one place that spells paths, dtypes and codecs.

A store directory holds:

    meta.json           dataset facts and provenance; written last, it marks the store complete
    index.json          per task: episode ranges, episode and row counts
    manifest.json       size and sha256 of every data file, for verification
    chunks.crc32c       the crc32c of every Zarr chunk at its place (CHUNK_CRC_FILE), bound to
                        manifest.json by its sha256: readers check which file they read
                        from the chunks they read anyway (stores built since 2026-12-06)
    build_config.json   the resolved build command that wrote the store
    episodes.zarr/      Zarr v3 group: obs [E,T,O] f32, action [E,T,A] f32, reward [E,T] f32,
                        task [E] i32 (one id per episode)
    webdataset/         optional: shard-NNNNNN.tar, one sample per episode
    _build/             only while a build is unfinished: plan and one record per done unit

The integrity chain: manifest.json names the sha256 of every data file; meta.json, written
last, names the sha256 of every other metadata file (METADATA, stores built since
2026-12-06) and carries the sha256 of its own canonical form (SEAL_KEY), so that an edit of
any file a reader trusts is detected and the file named.

Episode e of the store lives in shard e // EPISODES_PER_SHARD of every array and in the
WebDataset tar of the same number. Rows keep the source layout exactly (row 0 holds the NaN
action/reward fillers), so every stored value equals its source value bit for bit.

Layout and codec were chosen from `tools bench-codecs` (BENCHMARKS.md): one episode per
chunk, transposed to [D, T] for obs and action (2.8x vs 2.2x row-major on MT30-like data),
blosc lz4hc-5 with byte shuffle (decodes ~1.6x faster than zstd-3 at a similar ratio),
crc32c on every chunk and every shard index, and 256 episodes per shard file (~2,700 files
for all of MT30).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from zarr.codecs import BloscCodec, Crc32cCodec, TransposeCodec

FORMAT_VERSION = 1
EPISODES_PER_SHARD = 256

META_FILE = "meta.json"
INDEX_FILE = "index.json"
MANIFEST_FILE = "manifest.json"
CHUNK_CRC_FILE = "chunks.crc32c"
CONFIG_FILE = "build_config.json"
ZARR_DIR = "episodes.zarr"
WDS_DIR = "webdataset"
BUILD_DIR = "_build"
PLAN_FILE = f"{BUILD_DIR}/plan.json"
UNITS_DIR = f"{BUILD_DIR}/units"  # one record per finished work unit
SOURCES_DIR = f"{BUILD_DIR}/sources"  # one record per hashed source file

SEAL_KEY = "self_sha256"  # meta.json's checksum of itself (see seal)

ARRAYS = ("obs", "action", "reward", "task")
ARRAY_NDIM = {"obs": 3, "action": 3, "reward": 2, "task": 1}  # store arrays: [E,T,O] .. [E]
SOURCE_KEYS = frozenset(ARRAYS)
SOURCE_DTYPES = {"obs": "float32", "action": "float32", "reward": "float32", "task": "int32"}
FORMATS = ("zarr", "webdataset")

BLOSC = {"cname": "lz4hc", "clevel": 5, "shuffle": "shuffle"}
WDS_GZIP_LEVEL = 1


def metadata_files(formats) -> list[str]:
    """The metadata files whose sha256 meta.json records: every file a reader trusts
    (build_config.json, which names the store's own path, only feeds advice)."""
    files = [INDEX_FILE, MANIFEST_FILE]
    if "zarr" in formats:
        files += [CHUNK_CRC_FILE, f"{ZARR_DIR}/zarr.json"]
        files += [f"{ZARR_DIR}/{name}/zarr.json" for name in ARRAYS]
    return files


def _canonical(doc: dict) -> bytes:
    body = {k: v for k, v in doc.items() if k != SEAL_KEY}
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def seal(doc: dict) -> dict:
    """meta.json's document with the sha256 of its canonical form (every other key, sorted,
    compact) under SEAL_KEY."""
    return {**doc, SEAL_KEY: hashlib.sha256(_canonical(doc)).hexdigest()}


def check_seal(doc: dict) -> bool | None:
    """Whether meta.json's document is the one its build sealed; None for a store built
    before the seal existed."""
    if SEAL_KEY not in doc:
        return None
    return doc[SEAL_KEY] == hashlib.sha256(_canonical(doc)).hexdigest()


def n_shards(n_episodes: int) -> int:
    return -(-n_episodes // EPISODES_PER_SHARD)


def shard_episodes(shard: int, n_episodes: int) -> range:
    """The store episodes held by `shard`."""
    lo = shard * EPISODES_PER_SHARD
    return range(lo, min(lo + EPISODES_PER_SHARD, n_episodes))


def array_shape(name: str, n_episodes: int, rows: int, obs_dim: int, action_dim: int) -> tuple:
    return {
        "obs": (n_episodes, rows, obs_dim),
        "action": (n_episodes, rows, action_dim),
        "reward": (n_episodes, rows),
        "task": (n_episodes,),
    }[name]


def zarr_array_kwargs(name: str, shape: tuple) -> dict:
    """Arguments of `zarr.Group.create_array` for array `name` of `shape`."""
    episode_chunk = (1, *shape[1:])
    filters = [TransposeCodec(order=(0, 2, 1))] if len(shape) == 3 else []
    if name == "task":
        episode_chunk = (EPISODES_PER_SHARD,)
    return {
        "name": name,
        "shape": shape,
        "dtype": SOURCE_DTYPES[name],
        "chunks": episode_chunk,
        "shards": (EPISODES_PER_SHARD, *shape[1:]),
        "filters": filters,
        "compressors": [BloscCodec(**BLOSC), Crc32cCodec()],
        "fill_value": 0,
    }


# Runtime config for zarr-python writers: write every chunk, even all-zero ones (a shard of task-0
# episodes), so that every shard file exists and can be hashed and verified.
ZARR_WRITE_CONFIG = {"array.write_empty_chunks": True}  # for zarr.config.set


def zarr_shard_file(name: str, shard: int) -> str:
    """Path of one shard file of array `name`, relative to the store root."""
    return "/".join([ZARR_DIR, name, "c", str(shard), *["0"] * (ARRAY_NDIM[name] - 1)])


# A Zarr v3 shard file: its inner chunks, each followed by its crc32c, then the shard index
# (one little-endian uint64 (offset, nbytes) pair per inner chunk; SHARD_INDEX_EMPTY for a
# chunk never written) and the index's own crc32c.
SHARD_INDEX_EMPTY = 2**64 - 1


def shard_index_nbytes(n_chunks: int = EPISODES_PER_SHARD) -> int:
    """Bytes at the end of a shard file of `n_chunks` inner chunks: its index and crc32c."""
    return n_chunks * 16 + 4


def shard_index(tail: bytes, n_chunks: int = EPISODES_PER_SHARD) -> np.ndarray:
    """The [n_chunks, 2] (offset, nbytes) index from the end of a shard file (`tail`: the
    whole file or its last `shard_index_nbytes` bytes; the crc32c is not checked here)."""
    return np.frombuffer(tail[-shard_index_nbytes(n_chunks) : -4], "<u8").reshape(-1, 2)


def wds_shard_file(shard: int) -> str:
    return f"{WDS_DIR}/shard-{shard:06d}.tar"


def wds_key(episode: int) -> str:
    """The WebDataset sample key of a store episode."""
    return f"{episode:09d}"


# A WebDataset sample is one episode: member `<key>.<suffix>` per array. The float arrays are
# .npy files (no pickle) gzipped at WDS_GZIP_LEVEL with mtime 0, so that a build is
# byte-reproducible; the task id is its decimal text (webdataset's .cls convention).
WDS_MEMBERS = {
    "obs": "obs.npy.gz",
    "action": "action.npy.gz",
    "reward": "reward.npy.gz",
    "task": "task.cls",
}
_WDS_ARRAY_OF = {suffix: name for name, suffix in WDS_MEMBERS.items()}


def wds_encode(name: str, value: np.ndarray | int) -> bytes:
    """The bytes of member `name` of one sample: an episode's array, or its task id."""
    if name == "task":
        return str(int(value)).encode()
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.asarray(value), allow_pickle=False)
    return gzip.compress(buf.getvalue(), compresslevel=WDS_GZIP_LEVEL, mtime=0)


def wds_decode(suffix: str, blob: bytes) -> tuple[str, np.ndarray | int]:
    """(array name, value) of a member with `suffix`; ValueError for a suffix not of ours,
    gzip/npy errors (OSError, EOFError, ValueError, zlib.error) for damaged bytes."""
    name = _WDS_ARRAY_OF.get(suffix)
    if name is None:
        raise ValueError(f"unexpected member suffix {suffix!r}; expected {sorted(_WDS_ARRAY_OF)}")
    if name == "task":
        return name, int(blob)
    return name, np.load(io.BytesIO(gzip.decompress(blob)), allow_pickle=False)


def read_wds_tar(tar: tarfile.TarFile) -> tuple[list[str], dict[str, list]]:
    """A whole WebDataset shard: its sample keys in order and each array's values."""
    keys, arrays = [], {name: [] for name in WDS_MEMBERS}
    for member in tar.getmembers():
        key, suffix = member.name.split(".", 1)
        name, value = wds_decode(suffix, tar.extractfile(member).read())
        arrays[name].append(value)
        if name == "task":
            keys.append(key)
    return keys, arrays


class MetaError(ValueError):
    """meta.json is not a format-1 store's: another version, or a missing or malformed field.
    The readers (store.py, verify.py) add the store's location and the fix."""


class MetaVersionError(MetaError):
    pass


@dataclass(frozen=True)
class StoreSource:
    """One source chunk file of a store: it holds store episodes [start, start + episodes)."""

    name: str
    size: int
    sha256: str
    episodes: int
    start: int


@dataclass(frozen=True)
class StoreMeta:
    """The contents of meta.json: what the store holds and where it came from.

    Written last by a build (its presence marks the store complete), read by every consumer
    through `from_json`; `to_json` gives the exact document. `n_rows` and `n_shards` are
    stored as written so that verify-shards can check them against the counts they follow
    from; `plan` is the build plan (datapipe.build's record of sources, layout and formats).
    """

    created_by: str
    task_set: str
    task_names: tuple[str, ...]
    obs_dims: tuple[int, ...]
    action_dims: tuple[int, ...]
    obs_dim: int
    action_dim: int
    rows_per_episode: int
    n_episodes: int
    n_rows: int
    formats: tuple[str, ...]
    n_shards: int
    sources: tuple[StoreSource, ...]
    plan: dict[str, Any]
    complete: bool = True
    format_version: int = FORMAT_VERSION
    metadata: dict[str, str] = field(default_factory=dict)  # file -> sha256 ({} before 2026-12)

    @property
    def n_tasks(self) -> int:
        return len(self.task_names)

    def array_shape(self, name: str) -> tuple:
        return array_shape(
            name, self.n_episodes, self.rows_per_episode, self.obs_dim, self.action_dim
        )

    def arrays(self) -> dict[str, dict[str, Any]]:
        """Shape, dtype, chunking and codec of each Zarr array (as `zarr_array_kwargs`)."""
        out = {}
        for name in ARRAYS:
            kw = zarr_array_kwargs(name, self.array_shape(name))
            out[name] = {
                "shape": list(kw["shape"]),
                "dtype": kw["dtype"],
                "chunks": list(kw["chunks"]),
                "shards": list(kw["shards"]),
                "codec": f"blosc {BLOSC} + crc32c",
                "transposed": bool(kw["filters"]),
            }
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "complete": self.complete,
            "created_by": self.created_by,
            "dataset": {
                "task_set": self.task_set,
                "n_tasks": self.n_tasks,
                "task_names": list(self.task_names),
                "obs_dims": list(self.obs_dims),
                "action_dims": list(self.action_dims),
                "obs_dim": self.obs_dim,
                "action_dim": self.action_dim,
                "rows_per_episode": self.rows_per_episode,
                "n_episodes": self.n_episodes,
                "n_rows": self.n_rows,
            },
            "formats": list(self.formats),
            "episodes_per_shard": EPISODES_PER_SHARD,
            "n_shards": self.n_shards,
            "arrays": self.arrays(),
            "wds_members": dict(WDS_MEMBERS),
            "sources": [
                {
                    "name": s.name,
                    "size": s.size,
                    "sha256": s.sha256,
                    "episodes": s.episodes,
                    "store_episodes": [s.start, s.start + s.episodes],
                }
                for s in self.sources
            ],
            "plan": self.plan,
            **({"metadata": dict(sorted(self.metadata.items()))} if self.metadata else {}),
        }

    @classmethod
    def from_json(cls, doc: Any) -> StoreMeta:
        """Parse and check a meta.json document: MetaVersionError for another format version,
        MetaError naming a missing or malformed field."""
        if not isinstance(doc, dict):
            raise MetaError(f"not a JSON object but {type(doc).__name__}")
        if doc.get("format_version") != FORMAT_VERSION:
            raise MetaVersionError(f"format version {doc.get('format_version')}")
        if check_seal(doc) is False or (check_seal(doc) is None and "metadata" in doc):
            raise MetaError(
                f"changed after the build: its {SEAL_KEY} is not the sha256 of the rest of it"
            )
        try:
            ds = doc["dataset"]
            meta = cls(
                created_by=str(doc["created_by"]),
                task_set=str(ds["task_set"]),
                task_names=tuple(str(t) for t in ds["task_names"]),
                obs_dims=tuple(int(d) for d in ds["obs_dims"]),
                action_dims=tuple(int(d) for d in ds["action_dims"]),
                obs_dim=int(ds["obs_dim"]),
                action_dim=int(ds["action_dim"]),
                rows_per_episode=int(ds["rows_per_episode"]),
                n_episodes=int(ds["n_episodes"]),
                n_rows=int(ds["n_rows"]),
                formats=tuple(doc["formats"]),
                n_shards=int(doc["n_shards"]),
                sources=tuple(
                    StoreSource(
                        str(s["name"]),
                        int(s["size"]),
                        str(s["sha256"]),
                        int(s["episodes"]),
                        int(s["store_episodes"][0]),
                    )
                    for s in doc["sources"]
                ),
                plan=dict(doc["plan"]),
                complete=doc.get("complete") is True,
                metadata={str(k): str(v) for k, v in doc.get("metadata", {}).items()},
            )
            wrong = {
                "dataset.n_tasks": (ds["n_tasks"], meta.n_tasks),
                "episodes_per_shard": (doc["episodes_per_shard"], EPISODES_PER_SHARD),
            }
        except (KeyError, IndexError, TypeError, ValueError, AttributeError) as e:
            raise MetaError(f"missing or malformed field: {e!r}") from None
        for key, (got, want) in wrong.items():
            if got != want:
                raise MetaError(f"{key} is {got!r}, expected {want!r}")
        if not meta.formats or not set(meta.formats) <= set(FORMATS):
            raise MetaError(f"formats {list(meta.formats)}: expected a subset of {list(FORMATS)}")
        return meta


# --- the chunk crc32c table ------------------------------------------------------------------
# chunks.crc32c: one JSON line (what the table holds, the sha256 of manifest.json and of the
# payload), then the payload: for each array in ARRAYS order, [n_shards, chunks_per_shard]
# little-endian uint32, the crc32c that ends each inner chunk (0 where a chunk was never
# written). A chunk read from shard s, position k of array a is the chunk the store was built
# with when its own crc32c checks and equals table[a][s, k]: a file swapped with another
# shard, copied from another build or with chunks in another order fails, at no extra read.

_CRC_MAGIC = "datapipe chunk crc32c table"


def chunks_per_shard(name: str) -> int:
    """Inner chunks in one shard file of array `name` (task: one chunk of the whole shard)."""
    return 1 if name == "task" else EPISODES_PER_SHARD


def chunk_crcs(shard_file: bytes, name: str) -> list[int]:
    """The crc32c ending each inner chunk of one shard file (0: never written)."""
    out = []
    for offset, nbytes in shard_index(shard_file, chunks_per_shard(name)).tolist():
        end = offset + nbytes
        empty = offset == SHARD_INDEX_EMPTY
        out.append(0 if empty else int.from_bytes(shard_file[end - 4 : end], "little"))
    return out


def encode_crc_table(tables: dict[str, np.ndarray], manifest_sha256: str) -> bytes:
    """chunks.crc32c from {array: [n_shards, chunks_per_shard] crc32c}."""
    payload = b"".join(np.ascontiguousarray(tables[a], "<u4").tobytes() for a in ARRAYS)
    header = {
        "format": _CRC_MAGIC,
        "arrays": list(ARRAYS),
        "n_shards": len(tables[ARRAYS[0]]),
        "manifest_sha256": manifest_sha256,
        "payload_sha256": hashlib.sha256(payload).hexdigest(),
    }
    return json.dumps(header, sort_keys=True).encode() + b"\n" + payload


def decode_crc_table(blob: bytes, n_shards: int, manifest_sha256: str) -> dict[str, np.ndarray]:
    """{array: [n_shards, chunks_per_shard] crc32c} of chunks.crc32c; MetaError if it is
    damaged, of another shape or made for another manifest.json."""
    line, _, payload = blob.partition(b"\n")
    try:
        header = json.loads(line)
        ok = header["format"] == _CRC_MAGIC and header["arrays"] == list(ARRAYS)
    except (ValueError, KeyError, TypeError):
        ok = False
    if not ok:
        raise MetaError("not a chunk crc32c table")
    if header["n_shards"] != n_shards:
        raise MetaError(f"a table of {header['n_shards']} shards, the store has {n_shards}")
    if header["manifest_sha256"] != manifest_sha256:
        raise MetaError(f"made for another {MANIFEST_FILE}")
    want = 4 * n_shards * sum(chunks_per_shard(a) for a in ARRAYS)
    if len(payload) != want or hashlib.sha256(payload).hexdigest() != header["payload_sha256"]:
        raise MetaError("its checksum fails (damaged or truncated)")
    tables, at = {}, 0
    for a in ARRAYS:
        n = n_shards * chunks_per_shard(a)
        tables[a] = np.frombuffer(payload, "<u4", n, at).reshape(n_shards, -1)
        at += 4 * n
    return tables


def unit_record_file(shard: int) -> str:
    return f"{UNITS_DIR}/shard-{shard:06d}.json"


def source_record_file(index: int) -> str:
    return f"{SOURCES_DIR}/source-{index:04d}.json"
