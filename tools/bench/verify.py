"""verify-shards throughput and a fault-injection table: `tools bench-verify`.

Throughput: `tools verify-shards STORE --json` run as a subprocess; GB/s of stored bytes and
the peak RSS of the verifying process. Faults: each kind is injected `per_kind` times (seeded)
into a fresh copy of a small store, and counted as detected only if verify-shards reports a
problem at the damaged location (the file, and the chunk's episode for flipped chunk bytes).
"""

from __future__ import annotations

import random
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from datapipe import format as fmt
from datapipe.verify import verify


def verify_throughput(store: Path) -> dict:
    stored = sum(p.stat().st_size for p in store.rglob("*") if p.is_file())
    cmd = [sys.executable, "-m", "tools.cli", "verify-shards", str(store), "--json"]
    t0 = time.perf_counter()
    run = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if run.returncode != 0:
        raise RuntimeError(f"verify-shards reported problems on {store}:\n{run.stdout[-2000:]}")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    return {
        "stored_bytes": stored,
        "seconds": seconds,
        "GB_per_s": stored / seconds / 1e9,
        "peak_rss": peak,
    }


def _chunk_span(path: Path, i: int) -> tuple[int, int]:
    raw = path.read_bytes()
    index = fmt.shard_index(raw)
    return int(index[i, 0]), int(index[i, 1])


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def _flip_chunk(root: Path, rng: random.Random, meta: fmt.StoreMeta) -> tuple[str, int | None]:
    name = rng.choice(["obs", "action", "reward"])
    episode = rng.randrange(meta.n_episodes)
    rel = fmt.zarr_shard_file(name, episode // fmt.EPISODES_PER_SHARD)
    offset, length = _chunk_span(root / rel, episode % fmt.EPISODES_PER_SHARD)
    _flip(root / rel, offset + rng.randrange(length))
    return rel, episode


def _flip_tar(root: Path, rng: random.Random, meta: fmt.StoreMeta) -> tuple[str, int | None]:
    rel = fmt.wds_shard_file(rng.randrange(meta.n_shards))
    _flip(root / rel, rng.randrange((root / rel).stat().st_size))
    return rel, None


def _delete(kind: str) -> Callable:
    def inject(root: Path, rng: random.Random, meta: fmt.StoreMeta) -> tuple[str, int | None]:
        shard = rng.randrange(meta.n_shards)
        rel = (
            fmt.wds_shard_file(shard)
            if kind == "tar"
            else fmt.zarr_shard_file(rng.choice(fmt.ARRAYS), shard)
        )
        (root / rel).unlink()
        return rel, None

    return inject


def _truncate_metadata(
    root: Path, rng: random.Random, meta: fmt.StoreMeta
) -> tuple[str, int | None]:
    rel = rng.choice([fmt.META_FILE, fmt.INDEX_FILE, fmt.MANIFEST_FILE])
    path = root / rel
    path.write_bytes(path.read_bytes()[: rng.randrange(1, path.stat().st_size)])
    return rel, None


FAULTS = {
    "byte flipped inside a Zarr chunk": _flip_chunk,
    "byte flipped inside a WebDataset tar": _flip_tar,
    "Zarr shard file deleted": _delete("zarr"),
    "WebDataset tar deleted": _delete("tar"),
    "metadata file truncated": _truncate_metadata,
}


def _detected(report, rel: str, episode: int | None) -> bool:
    """A flipped chunk must be named by its episode; any other fault by its file."""
    if episode is not None:
        return any(
            p.kind == "checksum" and p.where == rel and p.episodes == [episode, episode + 1]
            for p in report.problems
        )
    return any(p.where == rel for p in report.problems)


def fault_table(store: Path, work: Path, per_kind: int = 10, seed: int = 0) -> list[dict]:
    """Inject every kind of fault `per_kind` times into copies of `store`; count detections."""
    import json

    meta = fmt.StoreMeta.from_json(json.loads((store / fmt.META_FILE).read_text()))
    rows = []
    for k, (kind, inject) in enumerate(FAULTS.items()):
        detected = 0
        for i in range(per_kind):
            copy = work / f"fault-{k}-{i}"
            shutil.rmtree(copy, ignore_errors=True)
            shutil.copytree(store, copy)
            rel, episode = inject(copy, random.Random(seed * 1000 + k * 100 + i), meta)
            detected += _detected(verify(copy), rel, episode)
            shutil.rmtree(copy)
        rows.append({"fault": kind, "injected": per_kind, "detected": detected})
    return rows
