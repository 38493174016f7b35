"""Build throughput and memory: `tools bench-build`.

In one run on the same source: the time to merely read every source episode (as the build
reads them, in 256-episode blocks, no checks, no encoding), then `datapipe build` with each
worker count as a subprocess: on a dask LocalCluster, or with `cluster=True` on a real
`dask scheduler` with that many `dask worker` processes started for it (tools.bench.dask_cluster).
For each build: wall time, rows/s, raw MB/s, the peak summed RSS of every process involved
(sampled every 20 ms) and the largest single process's peak RSS.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil

from datapipe.format import EPISODES_PER_SHARD
from datapipe.source import read_episodes, scan_sources


def read_pass(src: Path) -> tuple[float, int, int]:
    """(seconds, rows, raw bytes) to read every episode of every chunk once."""
    files, layout = scan_sources(src)
    t0, nbytes = time.perf_counter(), 0
    for f in files:
        for lo in range(0, f.episodes, EPISODES_PER_SHARD):
            arrays = read_episodes(f.path, lo, min(lo + EPISODES_PER_SHARD, f.episodes))
            nbytes += sum(a.nbytes for a in arrays.values())
    rows = sum(f.episodes for f in files) * layout.rows
    return time.perf_counter() - t0, rows, nbytes


def _rss(roots: list[psutil.Process], peaks: dict[int, int]) -> int:
    """Summed RSS of `roots` and their descendants now; updates each process's peak."""
    total = 0
    for root in roots:
        with contextlib.suppress(psutil.NoSuchProcess):
            for p in [root, *root.children(recursive=True)]:
                with contextlib.suppress(psutil.NoSuchProcess):
                    rss = p.memory_info().rss
                    total += rss
                    peaks[p.pid] = max(peaks.get(p.pid, 0), rss)
    return total


def timed_build(src: Path, dst: Path, workers: int, formats: str, cluster: bool = False) -> dict:
    """One `datapipe build` subprocess, timed and sampled."""
    shutil.rmtree(dst, ignore_errors=True)
    if not cluster:
        return _timed(src, dst, ["--workers", str(workers)], workers, formats, [])
    from tools.bench.dask_cluster import local_dask_cluster

    with local_dask_cluster(workers) as (address, pids):
        return _timed(src, dst, ["--scheduler", address], workers, formats, pids)


def _timed(src: Path, dst: Path, how: list[str], workers: int, formats: str, pids) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "datapipe.cli",
        "build",
        "--src",
        str(src),
        "--dst",
        str(dst),
        *how,
        "--format",
        formats,
        "--no-progress",
    ]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd)
    roots = [psutil.Process(pid) for pid in (proc.pid, *pids)]
    peak_tree, peaks = 0, {}
    while proc.poll() is None:
        peak_tree = max(peak_tree, _rss(roots, peaks))
        time.sleep(0.02)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed with exit code {proc.returncode}")
    return {
        "workers": workers,
        "seconds": wall,
        "peak_tree_rss": peak_tree,
        "peak_proc_rss": max(peaks.values()),
    }


def bench_build(
    src: Path, work: Path, workers=(1, 2), formats: str = "zarr", cluster: bool = False
) -> dict:
    read_s, rows, nbytes = read_pass(src)
    builds = [timed_build(src, work / f"store-w{w}", w, formats, cluster) for w in workers]
    for b in builds:
        b["rows_per_s"] = rows / b["seconds"]
        b["MB_per_s"] = nbytes / b["seconds"] / 1e6
        b["build_over_read"] = b["seconds"] / read_s
    return {"rows": rows, "raw_bytes": nbytes, "read_seconds": read_s, "builds": builds}
