"""The official sampler's cost per batch against the data it holds (BENCHMARKS.md §13).

The official offline trainer puts every row of MT30 into a torchrl `ReplayBuffer` over a
`LazyTensorStorage` in RAM and draws each batch with `SliceSampler(num_slices=B,
traj_key="episode", strict_length=True, cache_values=True)`, then prepares it
(`Buffer.sample` + `_prepare_batch`). Here the storage is filled as the official loader fills
it (an int64 `episode` key on every row, rows flattened, `extend`), from the first `episodes`
episodes of the chunk files in `src` (memory-mapped, 10,000 episodes at a time, so the fill
itself needs no second copy), and batches are timed one by one. Run it in an environment
with the torchrl the official code uses:

    python -m tools.bench.sampler SRC EPISODES [EPISODES ...] [--batch-size 256]

One JSON line per size: fill seconds, the first batch (the sampler computes and caches the
trajectory boundaries), the median and p90 of the next `batches`, peak RSS.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time
from pathlib import Path


def _fill(src: Path, episodes: int, piece: int = 10_000):
    import torch
    from torchrl.data.replay_buffers import LazyTensorStorage

    chunks = sorted(src.glob("chunk_*.pt"), key=lambda p: int(p.stem.split("_")[1]))
    first = torch.load(chunks[0], mmap=True, weights_only=False)
    rows = first["reward"].shape[1]
    storage = LazyTensorStorage(episodes * rows, device=torch.device("cpu"))
    done = 0
    for path in chunks:
        td = torch.load(path, mmap=True, weights_only=False)
        for lo in range(0, len(td), piece):
            hi = min(lo + piece, len(td), lo + episodes - done)
            part = td[lo:hi].clone()  # out of the memory map: the rows the official holds
            ids = torch.arange(done, done + hi - lo, dtype=torch.int64)
            part["episode"] = ids.unsqueeze(-1).expand(-1, rows).clone()
            storage.set(torch.arange(done * rows, (done + hi - lo) * rows), part.reshape(-1))
            done += hi - lo
            if done == episodes:
                return storage
    raise ValueError(f"{src} holds {done} episodes, fewer than {episodes}")


def measure(src: Path, episodes: int, batch_size: int, horizon: int, batches: int) -> dict:
    import torch
    from torchrl.data.replay_buffers import ReplayBuffer
    from torchrl.data.replay_buffers.samplers import SliceSampler

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    storage = _fill(src, episodes)
    fill = time.perf_counter() - t0
    sampler = SliceSampler(num_slices=batch_size, end_key=None, traj_key="episode",
                           truncated_key=None, strict_length=True, cache_values=True)  # fmt: skip
    buffer = ReplayBuffer(storage=storage, sampler=sampler, pin_memory=False, prefetch=0,
                          batch_size=batch_size * (horizon + 1))  # fmt: skip

    def sample():  # Buffer.sample + Buffer._prepare_batch
        td = buffer.sample().view(-1, horizon + 1).permute(1, 0)
        td = td.select("obs", "action", "reward", "task")
        return (td["obs"].contiguous(), td["action"][1:].contiguous(),
                td["reward"][1:].unsqueeze(-1).contiguous(), td["task"][0].contiguous())  # fmt: skip

    t1 = time.perf_counter()
    sample()
    first = time.perf_counter() - t1
    times = []
    for _ in range(batches):
        t1 = time.perf_counter()
        sample()
        times.append(time.perf_counter() - t1)
    times.sort()
    return {
        "sampler": "official", "episodes": episodes, "rows": episodes * 501,
        "batch_size": batch_size, "fill_s": fill, "first_batch_s": first,
        "batch_ms_median": 1e3 * statistics.median(times),
        "batch_ms_p90": 1e3 * times[int(0.9 * (len(times) - 1))],
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src", type=Path)
    parser.add_argument("episodes", type=int, nargs="+")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--horizon", type=int, default=3)
    parser.add_argument("--batches", type=int, default=30)
    args = parser.parse_args()
    for n in args.episodes:  # each size in a fresh process: its own peak RSS
        import subprocess
        import sys

        code = (
            "import json; from tools.bench.sampler import measure; from pathlib import Path; "
            f"print(json.dumps(measure(Path({str(args.src)!r}), {n}, {args.batch_size}, "
            f"{args.horizon}, {args.batches})))"
        )
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        if run.returncode != 0:
            print(json.dumps({"episodes": n, "error": run.stderr[-1500:]}))
            continue
        print(run.stdout.splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
