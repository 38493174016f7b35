"""Codec and layout measurements behind the store format: `tools bench-codecs`.

Compresses episodes spread over a source folder with each candidate codec and layout, as one
chunk per episode, and reports ratio, encode MB/s and decode GB/s (one thread, median of
`repeats`). The store format (datapipe/format.py) cites these figures.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np
from numcodecs import Blosc, Zstd

CANDIDATES = {
    "blosc-zstd3-shuffle": lambda: Blosc("zstd", 3, Blosc.SHUFFLE),
    "blosc-zstd1-shuffle": lambda: Blosc("zstd", 1, Blosc.SHUFFLE),
    "blosc-lz4-shuffle": lambda: Blosc("lz4", 5, Blosc.SHUFFLE),
    "blosc-lz4hc5-shuffle": lambda: Blosc("lz4hc", 5, Blosc.SHUFFLE),
    "zstd3": lambda: Zstd(3),
}


def _episodes(src: Path, key: str, limit: int) -> list[np.ndarray]:
    """`limit` episodes spread evenly over every chunk (so over the whole task mix)."""
    from datapipe.source import read_episodes, scan_sources

    files, _ = scan_sources(src)
    total = sum(f.episodes for f in files)
    out = []
    for i in np.linspace(0, total - 1, min(limit, total)).astype(int):
        f = next(f for f in files if f.start <= i < f.start + f.episodes)
        lo = int(i - f.start)
        out.append(read_episodes(f.path, lo, lo + 1)[key][0])
    return out


def _time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_codecs(src: Path, episodes: int = 300, repeats: int = 3) -> list[dict]:
    """One row per (array, layout, codec): ratio, encode MB/s, decode GB/s."""
    import numcodecs

    numcodecs.blosc.set_nthreads(1)
    rows = []
    for key in ("obs", "action", "reward"):
        eps = _episodes(src, key, episodes)
        layouts = {"row-major": eps}
        if eps[0].ndim == 2:
            layouts["transposed"] = [np.ascontiguousarray(e.T) for e in eps]
        raw = sum(e.nbytes for e in eps)
        for layout, arrays in layouts.items():
            for name, make in CANDIDATES.items():
                codec = make()
                encoded = [codec.encode(a) for a in arrays]
                t_enc = _time(lambda c=codec, a=arrays: [c.encode(x) for x in a], repeats)
                t_dec = _time(lambda c=codec, e=encoded: [c.decode(x) for x in e], repeats)
                rows.append(
                    {
                        "array": key,
                        "layout": layout,
                        "codec": name,
                        "ratio": raw / sum(len(e) for e in encoded),
                        "encode_MBps": raw / t_enc / 1e6,
                        "decode_GBps": raw / t_dec / 1e9,
                    }
                )
    return rows
