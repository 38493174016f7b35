"""The loader's episode pool and its background refill.

Owns where decoded episodes live (`Pool`: one anonymous shared-memory mapping, so forked
workers write into the very pages the loader reads) and who decodes them (`Refiller`: worker
processes, or one thread with `workers=0`).

Workers are forked processes by default. A refill thread shares the interpreter lock with the
training loop: measured on the 2-core development machine, a thread left the pool starved
(main loop 2,150 batches/s beside 1,660 episodes/s of refill, versus 3,190 and 2,120 with a
process), and a training loop that launches many small kernels holds the lock even more.
Jobs and replies travel over pipes; a worker's error (CorruptStoreError naming the shard,
chunk and episodes) is raised in the loader at the next batch that needs its group.
"""

from __future__ import annotations

import contextlib
import mmap
import multiprocessing
import os
import signal
import threading
import time
from multiprocessing.connection import Connection, wait

import numpy as np
from numcodecs import blosc

from datapipe.errors import DatapipeError
from datapipe.shardreader import ShardReader
from datapipe.store import Store


class Pool:
    """n_slots decoded episodes: obs [N,T,O], action [N,T,A], reward [N,T] f32, task [N] i64."""

    def __init__(self, n_slots: int, rows: int, obs_dim: int, action_dim: int):
        layout = {
            "obs": ((n_slots, rows, obs_dim), np.float32),
            "action": ((n_slots, rows, action_dim), np.float32),
            "reward": ((n_slots, rows), np.float32),
            "task": ((n_slots,), np.int64),
        }
        sizes = {k: int(np.prod(s)) * np.dtype(d).itemsize for k, (s, d) in layout.items()}
        self.nbytes = sum(sizes.values())
        self._map = mmap.mmap(-1, self.nbytes)  # anonymous and MAP_SHARED: seen by forks
        self.arrays: dict[str, np.ndarray] = {}
        offset = 0
        for k, (shape, dtype) in layout.items():
            count = int(np.prod(shape))
            self.arrays[k] = np.frombuffer(self._map, dtype, count, offset).reshape(shape)
            offset += sizes[k]


def fill_slots(
    reader: ShardReader, pool: Pool, tasks: np.ndarray, first: int, episodes: np.ndarray
):
    """Decode `episodes` into the pool's slots from `first` on (their task ids from `tasks`)."""
    rows = slice(first, first + len(episodes))
    for name in ("obs", "action", "reward"):
        reader.read(name, episodes, pool.arrays[name][rows])
    pool.arrays["task"][rows] = tasks[episodes]


def _next_job(conn: Connection, parent: int):
    """The next job, or None once the loader says stop, closes the pipe or dies."""
    while not conn.poll(1.0):
        if os.getppid() != parent:
            return None
    return conn.recv()


def _work(store: Store, pool: Pool, tasks: np.ndarray, conn: Connection, own_process: bool):
    """A worker's loop: jobs (key, first slot, episodes) in, ("done", key, busy s) out."""
    parent = os.getppid() if own_process else None
    if own_process:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the loader's to handle
        blosc.use_threads = False  # this process decodes one chunk at a time, on one core
    reader = ShardReader(store)
    try:
        while (job := _next_job(conn, parent) if own_process else conn.recv()) is not None:
            key, first, episodes = job
            t0 = time.perf_counter()
            fill_slots(reader, pool, tasks, first, episodes)
            conn.send(("done", key, time.perf_counter() - t0))
    except EOFError:
        pass  # the loader went away
    except BaseException as e:
        try:
            conn.send(("error", e))
        except Exception:  # not picklable: keep the message
            conn.send(("error", RuntimeError(f"{type(e).__name__}: {e}")))
    finally:
        reader.close()


class Refiller:
    """Fills pool groups in the background with `workers` forked processes (0, or no fork on
    this platform: one thread).

    `submit(key, first, episodes)` has slots first.. filled with `episodes`, split across the
    workers; `wait(key)` returns once every part of that job is done, or raises its error.
    """

    def __init__(self, store: Store, pool: Pool, tasks: np.ndarray, workers: int = 1):
        self.busy_s = 0.0  # summed over workers
        self._error: BaseException | None = None
        self._pending: dict[object, int] = {}
        self._conns: list[Connection] = []
        self._runners: list = []
        forkable = "fork" in multiprocessing.get_all_start_methods()
        ctx = multiprocessing.get_context("fork") if workers > 0 and forkable else None
        for _ in range(max(1, workers)):
            mine, theirs = multiprocessing.Pipe()
            args = (store, pool, tasks, theirs, ctx is not None)
            if ctx is None:
                runner = threading.Thread(target=_work, args=args, daemon=True)
            else:
                runner = ctx.Process(target=_work, args=args, daemon=True)
            runner.start()
            if ctx is not None:
                theirs.close()
            self._conns.append(mine)
            self._runners.append(runner)

    def submit(self, key, first: int, episodes: np.ndarray) -> None:
        # Take the replies already waiting first: a worker whose reply pipe is full stops
        # reading jobs, and this send would then block for ever (a 4 GB pool over all of
        # MT30 submits ~1,000 groups at start and hung so before this).
        for conn in wait(self._conns, timeout=0):
            while self._error is None and conn.poll():
                self._take(conn)
        parts = np.array_split(np.arange(len(episodes)), len(self._conns))
        self._pending[key] = 0
        for conn, part in zip(self._conns, parts, strict=True):
            if len(part):
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    conn.send((key, first + int(part[0]), episodes[part]))
                    # a worker that stopped on an error: wait() raises that error
                self._pending[key] += 1

    def wait(self, key) -> None:
        while self._pending.get(key, 0) > 0:
            if self._error is not None:
                raise self._error
            for conn in wait(self._conns):
                if not self._take(conn):
                    break
        self._pending.pop(key, None)

    def _take(self, conn: Connection) -> bool:
        """Receive one reply from a worker; False (and the error kept) if it failed."""
        try:
            reply = conn.recv()
        except EOFError:
            self._error = RuntimeError("a datapipe refill worker died; see its output")
            return False
        if reply[0] == "error":
            error = reply[1]
            if not isinstance(error, DatapipeError):
                error = RuntimeError(f"datapipe refill worker failed: {error!r}")
            self._error = error
            return False
        _, done, busy = reply
        self._pending[done] -= 1
        self.busy_s += busy
        return True

    def close(self) -> None:
        for conn in self._conns:
            with contextlib.suppress(BrokenPipeError, OSError):
                conn.send(None)
        for runner in self._runners:
            runner.join(timeout=10)
            if isinstance(runner, multiprocessing.process.BaseProcess) and runner.is_alive():
                runner.terminate()
                runner.join()
        for conn in self._conns:
            conn.close()
        self._conns, self._runners = [], []
