"""`tools bench-loader`: SliceLoader against the official TD-MPC2 data path and a plain
in-RAM numpy gather, in one run, on the same data.

- ours: `datapipe.SliceLoader` over the store, pool of `cache_gb`.
- official: torchrl `ReplayBuffer(LazyTensorStorage, SliceSampler(num_slices=B,
  traj_key='episode', strict_length=True, cache_values=True))`, filled as the official
  offline trainer fills it (`torch.load` of every chunk_K.pt the store was built from, an
  int64 `episode` key, reshape to rows, `extend`), sampled as `Buffer.sample` does, plus its
  batch preparation (`_prepare_batch`: obs, action[1:], reward[1:, ..., None], task[0]). The
  official code is quoted here rather than imported (it is not a package); storage on CPU.
- numpy: every episode of the store decoded into RAM, then uniform (episode, start) draws and
  fancy indexing into the same batch layout: the ceiling of batch assembly.

Each approach runs in its own fresh process (spawned), so its memory is its own. Memory is
sampled 10 times a second over that process and its children (our refill worker) during setup
and timing: peak RSS summed over the processes (an upper bound: the pool, shared between the
loader and its worker, counts twice) and peak PSS summed (shared pages split between them:
the true total). The approach process's own `ru_maxrss` is reported too; torch runs `threads` intra-op threads in each (default 1: on a shared
2-core machine two OpenMP threads made torch's indexing 100x slower, 11 ms vs 42 us). batches/s is the median of 1-second windows after a warm-up;
transitions/s = batches/s x B x H (each slice holds H transitions).
"""

from __future__ import annotations

import multiprocessing
import resource
import statistics
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from datapipe.extras import install_hint

APPROACHES = ("ours", "official", "numpy")


@dataclass(frozen=True)
class BenchLoaderConfig:
    store: Path  # a store built with `datapipe build` (Zarr arrays)
    src: Path | None = None  # its chunk_K.pt folder, for the official approach
    batch_sizes: tuple[int, ...] = (256, 1024)  # B values to time
    horizon: int = 3  # H
    cache_gb: float = 0.25  # our pool's RAM budget
    seconds: float = 10.0  # timed seconds per approach and batch size
    approaches: tuple[str, ...] = APPROACHES  # which to run
    seed: int = 0
    threads: int = 1  # torch intra-op threads in every approach (2+ thrash on a loaded box)
    refill_every: int = 16  # our loader: batches between refills of 64 episodes


def _time(next_batch, seconds: float) -> tuple[float, list[float]]:
    """Median batches/s over 1-second windows, after a 1-second warm-up."""
    end = time.perf_counter() + 1.0
    while time.perf_counter() < end:
        next_batch()
    rates = []
    for _ in range(max(1, round(seconds))):
        n, t0 = 0, time.perf_counter()
        while (dt := time.perf_counter() - t0) < 1.0:
            next_batch()
            n += 1
        rates.append(n / dt)
    return statistics.median(rates), rates


class _MemoryWatch(threading.Thread):
    """Peak RSS and PSS, summed over this process and its children, sampled every 0.1 s."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak_rss = self.peak_pss = 0
        self._done = threading.Event()

    def sample(self) -> None:
        import psutil

        me = psutil.Process()
        rss = pss = 0
        for proc in [me, *me.children(recursive=True)]:
            try:
                info = proc.memory_full_info()
            except psutil.Error:
                continue
            rss, pss = rss + info.rss, pss + info.pss
        self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)

    def run(self) -> None:
        while not self._done.wait(0.1):
            self.sample()

    def stop(self) -> None:
        self._done.set()
        self.join()
        self.sample()


def _ours(cfg: BenchLoaderConfig, B: int):
    from datapipe import SliceLoader

    loader = SliceLoader(cfg.store, batch_size=B, horizon=cfg.horizon, seed=cfg.seed,
                         cache_gb=cfg.cache_gb, refill_every=cfg.refill_every)  # fmt: skip
    return lambda: next(loader), loader.close


def _official_storage(cfg: BenchLoaderConfig):
    """LazyTensorStorage filled as the official OfflineTrainer._load_dataset / Buffer.load."""
    import torch
    from torchrl.data.replay_buffers import LazyTensorStorage, ReplayBuffer
    from torchrl.data.replay_buffers.samplers import SliceSampler

    from datapipe import open_store

    store = open_store(cfg.store)
    names = [s.name for s in store.meta.sources]
    fps = [cfg.src / n for n in names]
    missing = [str(p) for p in fps if not p.exists()]
    if missing:
        raise FileNotFoundError(f"--src lacks the store's source chunks: {', '.join(missing)}")
    capacity = store.n_episodes * store.episode_length  # the official: the whole dataset's rows
    storage = LazyTensorStorage(capacity, device=torch.device("cpu"))
    sampler = SliceSampler(num_slices=1, end_key=None, traj_key="episode", truncated_key=None,
                           strict_length=True, cache_values=True)  # fmt: skip
    buffer = ReplayBuffer(storage=storage, sampler=sampler, pin_memory=False, prefetch=0,
                          batch_size=cfg.horizon + 1)  # fmt: skip
    num_eps = 0
    for fp in fps:
        td = torch.load(fp, weights_only=False)
        episode_idx = torch.arange(num_eps, num_eps + len(td), dtype=torch.int64)
        td["episode"] = episode_idx.unsqueeze(-1).expand(-1, td["reward"].shape[1])
        td = td.reshape(td.shape[0] * td.shape[1])
        buffer.extend(td)
        num_eps += len(episode_idx)
        del td
    return storage


def _official(cfg: BenchLoaderConfig, B: int, storage):
    import torch
    from torchrl.data.replay_buffers import ReplayBuffer
    from torchrl.data.replay_buffers.samplers import SliceSampler

    H, device = cfg.horizon, torch.device("cpu")
    sampler = SliceSampler(num_slices=B, end_key=None, traj_key="episode", truncated_key=None,
                           strict_length=True, cache_values=True)  # fmt: skip
    buffer = ReplayBuffer(storage=storage, sampler=sampler, pin_memory=False, prefetch=0,
                          batch_size=B * (H + 1))  # fmt: skip

    def sample():  # Buffer.sample + Buffer._prepare_batch
        td = buffer.sample().view(-1, H + 1).permute(1, 0)
        td = td.select("obs", "action", "reward", "task", strict=False).to(
            device, non_blocking=True
        )
        obs = td.get("obs").contiguous()
        action = td.get("action")[1:].contiguous()
        reward = td.get("reward")[1:].unsqueeze(-1).contiguous()
        task = td.get("task", None)
        if task is not None:
            task = task[0].contiguous()
        return obs, action, reward, task

    return sample, None


def _numpy_data(cfg: BenchLoaderConfig) -> dict:
    import numpy as np

    from datapipe import format as fmt
    from datapipe import open_store
    from datapipe.shardreader import ShardReader

    store = open_store(cfg.store)
    E = store.n_episodes
    with ShardReader(store) as reader:
        data = {n: np.empty((E, *a.row_shape), a.dtype) for n, a in reader.arrays.items()}
        for shard in range(fmt.n_shards(E)):
            held = fmt.shard_episodes(shard, E)
            eps = np.arange(held.start, held.stop)
            for name, arr in data.items():
                reader.read(name, eps, arr[eps[0] : eps[-1] + 1])
    data["task"] = store.episode_tasks.copy()
    return data


def _numpy(cfg: BenchLoaderConfig, B: int, data: dict):
    import numpy as np
    import torch

    E, T = data["obs"].shape[:2]
    H = cfg.horizon
    rng = np.random.default_rng(cfg.seed)
    k = np.arange(H + 1)[:, None]

    def sample():
        e = rng.integers(0, E, B)
        s = rng.integers(0, T - H, B) + k
        return (
            torch.from_numpy(data["obs"][e, s]),
            torch.from_numpy(data["action"][e, s[1:]]),
            torch.from_numpy(data["reward"][e, s[1:]][..., None]),
            torch.from_numpy(data["task"][e]),
        )

    return sample, None


def _run(approach: str, cfg: BenchLoaderConfig) -> list[dict]:
    """One approach, every batch size, in this (fresh) process."""
    import torch

    torch.set_num_threads(cfg.threads)
    watch = _MemoryWatch()
    watch.start()
    t0 = time.perf_counter()
    shared = None
    if approach == "official":
        shared = _official_storage(cfg)
    elif approach == "numpy":
        shared = _numpy_data(cfg)
    setup = time.perf_counter() - t0
    rows = []
    for B in cfg.batch_sizes:
        t1 = time.perf_counter()
        if approach == "ours":
            sample, close = _ours(cfg, B)
        elif approach == "official":
            sample, close = _official(cfg, B, shared)
        else:
            sample, close = _numpy(cfg, B, shared)
        sample()  # the first batch: pool fill, sampler cache
        first = time.perf_counter() - t1
        rate, windows = _time(sample, cfg.seconds)
        watch.sample()
        if close is not None:
            close()
        rows.append({
            "approach": approach, "batch_size": B, "horizon": cfg.horizon,
            "batches_per_s": rate, "transitions_per_s": rate * B * cfg.horizon,
            "windows": windows, "setup_s": setup + first,
        })  # fmt: skip
    watch.stop()
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    for row in rows:
        row["peak_rss_gb"] = watch.peak_rss / 1e9
        row["peak_pss_gb"] = watch.peak_pss / 1e9
        row["own_maxrss_gb"] = own / 1e9
    return rows


def _child(approach: str, cfg_dict: dict, queue) -> None:
    try:
        queue.put(_run(approach, BenchLoaderConfig(**cfg_dict)))
    except BaseException as e:
        queue.put(e)
        raise


def bench_loader(cfg: BenchLoaderConfig) -> list[dict]:
    """Run every approach of `cfg` in its own process; one row per approach and batch size."""
    from datapipe import open_store

    unknown = set(cfg.approaches) - set(APPROACHES)
    if unknown:
        raise ValueError(f"unknown approaches {sorted(unknown)}; choose from {APPROACHES}")
    open_store(cfg.store)  # refuse a bad store before spawning anything
    if "official" in cfg.approaches:
        try:
            import torchrl  # noqa: F401
        except ImportError:
            raise ImportError(
                f"the official approach needs torchrl: `{install_hint('bench')}` "
                "(or leave it out: --approach ours --approach numpy)"
            ) from None
        if cfg.src is None:
            raise ValueError("the official approach loads the source chunks: pass --src")
    ctx = multiprocessing.get_context("spawn")
    rows = []
    for approach in cfg.approaches:
        queue = ctx.Queue()
        proc = ctx.Process(target=_child, args=(approach, asdict(cfg), queue))
        proc.start()
        result = queue.get()
        proc.join()
        if isinstance(result, BaseException):
            raise RuntimeError(f"bench-loader: {approach} failed: {result!r}") from result
        rows.extend(result)
    return rows
