"""Loader start-up against store size: `tools bench-startup`.

For each store, in a fresh process (so nothing is cached in Python): seconds to `open_store`,
to the loader's first batch (its pool filled once), and to batch `batches` (the pool refilled
with episodes from all over the store, each from a shard file not opened before), and the
process tree's peak RSS. Run the same command from an older checkout to compare code.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path


def _measure(store: str, batches: int, batch_size: int, cache_gb: float) -> dict:
    """In this process: the timings of one store (see the module docstring)."""
    import resource

    import datapipe
    from datapipe import SliceLoader, open_store

    t0 = time.perf_counter()
    s = open_store(store)
    opened = time.perf_counter() - t0
    loader = SliceLoader(store, batch_size=batch_size, cache_gb=cache_gb, seed=0)
    next(loader)
    first = time.perf_counter() - t0
    for _ in range(batches - 1):
        next(loader)
    last = time.perf_counter() - t0
    loader.close()
    rss = max(resource.getrusage(w).ru_maxrss for w in (resource.RUSAGE_SELF,
                                                         resource.RUSAGE_CHILDREN))  # fmt: skip
    return {
        "code": str(Path(datapipe.__file__).parent), "store": store, "episodes": s.n_episodes, "open_s": opened, "first_batch_s": first,
        f"batch_{batches}_s": last, "peak_rss_mib": rss / 1024,
    }  # fmt: skip


def bench_startup(stores: list[Path], batches: int, batch_size: int, cache_gb: float) -> list:
    """One row per store, each measured in a fresh Python process."""
    rows = []
    for store in stores:
        code = (
            "import json, sys; from tools.bench.startup import _measure; "
            f"print(json.dumps(_measure({str(store)!r}, {batches}, {batch_size}, {cache_gb})))"
        )
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        if run.returncode != 0:
            raise RuntimeError(f"bench-startup on {store} failed:\n{run.stderr[-2000:]}")
        rows.append(json.loads(run.stdout.splitlines()[-1]))
    return rows
