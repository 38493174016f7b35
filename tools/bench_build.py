"""Build throughput and memory: `tools bench-build`.

In one run on the same source: the time to merely read every source episode (memory-mapped,
in the build's 256-episode blocks, no checks, no encoding), then `datapipe build` with each
worker count as a subprocess. For each build: wall time, rows/s, raw MB/s, the peak summed RSS
of the whole process tree (sampled every 20 ms) and the largest single process's peak RSS
(getrusage of the waited-for children).
"""

from __future__ import annotations

import contextlib
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil

from datapipe.format import EPISODES_PER_SHARD, SOURCE_KEYS
from datapipe.source import open_chunk, scan_sources


def read_pass(src: Path) -> tuple[float, int, int]:
    """(seconds, rows, raw bytes) to read every episode of every chunk once."""
    files, layout = scan_sources(src)
    t0, nbytes = time.perf_counter(), 0
    for f in files:
        for lo in range(0, f.episodes, EPISODES_PER_SHARD):
            data = open_chunk(f.path)
            for key in SOURCE_KEYS:
                nbytes += data[key][lo : lo + EPISODES_PER_SHARD].numpy().copy().nbytes
            del data
    rows = sum(f.episodes for f in files) * layout.rows
    return time.perf_counter() - t0, rows, nbytes


def _tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            total += p.memory_info().rss
    return total


def timed_build(src: Path, dst: Path, workers: int, formats: str) -> dict:
    shutil.rmtree(dst, ignore_errors=True)
    cmd = [
        sys.executable,
        "-m",
        "datapipe.cli",
        "build",
        "--src",
        str(src),
        "--dst",
        str(dst),
        "--workers",
        str(workers),
        "--format",
        formats,
        "--no-progress",
    ]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd)
    ps, peak_tree = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        peak_tree = max(peak_tree, _tree_rss(ps))
        time.sleep(0.02)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed with exit code {proc.returncode}")
    peak_single = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    return {
        "workers": workers,
        "seconds": wall,
        "peak_tree_rss": peak_tree,
        "peak_proc_rss": peak_single,
    }


def bench_build(src: Path, work: Path, workers=(1, 2), formats: str = "zarr") -> dict:
    read_s, rows, nbytes = read_pass(src)
    builds = [timed_build(src, work / f"store-w{w}", w, formats) for w in workers]
    for b in builds:
        b["rows_per_s"] = rows / b["seconds"]
        b["MB_per_s"] = nbytes / b["seconds"] / 1e6
        b["build_over_read"] = b["seconds"] / read_s
    return {"rows": rows, "raw_bytes": nbytes, "read_seconds": read_s, "builds": builds}
