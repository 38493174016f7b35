"""A real dask.distributed cluster on this machine: one `dask scheduler` and N `dask worker`
processes, started as separate commands exactly as on a cluster's nodes (for the tests and
`tools bench-build --cluster`). They inherit this process's environment, object-storage
credentials included."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path


def _dask() -> str:
    exe = shutil.which("dask")
    if exe is None:
        raise RuntimeError("the `dask` command is missing: pip install 'dask[distributed]'")
    return exe


@contextlib.contextmanager
def local_dask_cluster(n_workers: int, timeout: float = 60) -> Iterator[tuple[str, list[int]]]:
    """(scheduler address, pids of scheduler and workers) of a fresh cluster, torn down after."""
    from dask.distributed import Client

    dask = _dask()
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    with tempfile.TemporaryDirectory() as tmp:
        info = Path(tmp) / "scheduler.json"
        scheduler = [dask, "scheduler", "--host", "127.0.0.1", "--port", "0",
                     "--dashboard-address", ":0", "--scheduler-file", str(info)]  # fmt: skip
        procs = [subprocess.Popen(scheduler, **quiet)]
        try:
            deadline = time.monotonic() + timeout
            while not info.exists() and time.monotonic() < deadline:
                time.sleep(0.2)
            if not info.exists():
                raise RuntimeError(f"dask scheduler did not start in {timeout:.0f} s")
            worker = [dask, "worker", "--scheduler-file", str(info), "--nworkers", "1",
                      "--nthreads", "1", "--no-dashboard", "--host", "127.0.0.1"]  # fmt: skip
            procs += [subprocess.Popen(worker, **quiet) for _ in range(n_workers)]
            address = json.loads(info.read_text())["address"]
            with Client(address, timeout=timeout) as client:
                client.wait_for_workers(n_workers, timeout=timeout)
            yield address, [p.pid for p in procs]
        finally:
            for p in reversed(procs):
                p.terminate()
            for p in procs:
                try:
                    p.wait(timeout=2)
                except subprocess.TimeoutExpired:  # a worker waiting on a scheduler now gone
                    p.kill()
                    p.wait()
