"""What the loader's pool changes against uniform draws: `tools bench-pool` (pure numpy).

The loader draws each batch's slices uniformly from the episodes live in its RAM pool, and
the pool turns over: every `refill_every` batches its oldest group of `refill_size` episodes
retires and a new group, drawn by `datapipe.sample.Admissions`, goes live. This replays that
schedule exactly (Admissions, SliceDraws and the loader's slot arithmetic, no I/O) for a
store of `episodes` episodes in `tasks` equal tasks, next to the official sampler's draw
(every slice's episode uniform over the whole store), and measures over `steps` batches:

- per-task share of slices in windows of `window` batches: its spread around the task's
  share (relative standard deviation, and the largest deviation seen);
- distinct episodes among the slices of one window (how wide the shuffle is);
- per-episode coverage: episodes never drawn, and the spread of slices per episode;
- residence: batches an episode stays live, and slices it gives per stay.
"""

from __future__ import annotations

import math
import time

import numpy as np

from datapipe.loader import _SPARE
from datapipe.sample import Admissions, SliceDraws


def _pool_size(cache_gb: float, rows: int, width: int, refill_size: int, episodes: int):
    """Live groups of the loader for this budget (SliceLoader's own arithmetic)."""
    episode_bytes = rows * width * 4 + 8
    groups = int(cache_gb * 1e9 // (episode_bytes * refill_size))
    return min(groups - _SPARE, math.ceil(episodes / refill_size))


class _Stats:
    """Counts of one sampler's draws: per episode, per task per window, distinct per window."""

    def __init__(self, episodes: int, tasks: int, task_of: np.ndarray, window: int):
        self.per_episode = np.zeros(episodes, np.int64)
        self.task_of, self.tasks, self.window = task_of, tasks, window
        self.shares: list[np.ndarray] = []
        self.distinct: list[int] = []
        self._held: list[np.ndarray] = []
        self._n = 0

    def add(self, eps: np.ndarray) -> None:
        """The episode ids of one batch's slices."""
        self._held.append(eps)
        self._n += 1
        if self._n % self.window == 0:
            window = np.concatenate(self._held)
            self._held = []
            self.per_episode += np.bincount(window, minlength=len(self.per_episode))
            counts = np.bincount(self.task_of[window], minlength=self.tasks)
            self.shares.append(counts / counts.sum())
            self.distinct.append(len(np.unique(window)))

    def summary(self, probs: np.ndarray) -> dict:
        shares = np.array(self.shares)
        rel = (shares - probs) / probs
        counts = self.per_episode
        return {
            "task_share_rel_std": float(rel.std()),
            "task_share_max_rel_dev": float(np.abs(rel).max()),
            "distinct_episodes_per_window": float(np.median(self.distinct)),
            "episodes_never_drawn": int((counts == 0).sum()),
            "slices_per_episode_mean": float(counts.mean()),
            "slices_per_episode_cv": float(counts.std() / counts.mean()),
        }


def bench_pool(
    episodes: int = 690_000,
    tasks: int = 30,
    rows: int = 501,
    width: int = 31,
    cache_gb: float = 1.0,
    steps: int = 1_000_000,
    batch_size: int = 256,
    horizon: int = 3,
    refill_size: int = 64,
    refill_every: int = 16,
    window: int = 1000,
    seed: int = 0,
) -> dict:
    """The pool's draw and the uniform one over `steps` batches; see the module docstring."""
    t0 = time.perf_counter()
    task_of = np.repeat(np.arange(tasks), -(-episodes // tasks))[:episodes]
    by_task = [np.flatnonzero(task_of == t) for t in range(tasks)]
    probs = np.array([len(e) for e in by_task], np.float64) / episodes
    live = _pool_size(cache_gb, rows, width, refill_size, episodes)
    n_live, n_slots = live * refill_size, (live + _SPARE) * refill_size
    admissions = Admissions(by_task, probs, refill_size, seed)
    draws = SliceDraws(seed, n_live, rows - horizon, batch_size)
    slot_episode = np.full(n_slots, -1, np.int64)
    slot_draws = np.zeros(n_slots, np.int64)  # slices drawn from the episode in each slot
    per_stay: list[np.ndarray] = []

    def admit(block: int) -> None:
        first = (block % (live + _SPARE)) * refill_size
        slot_episode[first : first + refill_size] = admissions.next_block()
        slot_draws[first : first + refill_size] = 0

    for block in range(live + _SPARE):
        admit(block)
    pool = _Stats(episodes, tasks, task_of, window)
    uniform = _Stats(episodes, tasks, task_of, window)
    rng = np.random.default_rng((seed, 99))
    epoch = 0
    for step in range(steps):
        if step // refill_every != epoch:  # the oldest group retires, the next goes live
            old = (epoch % (live + _SPARE)) * refill_size
            per_stay.append(slot_draws[old : old + refill_size].copy())
            epoch += 1
            admit(epoch + live + _SPARE - 1)
        slots, _ = draws.draw(step)
        slots = (slots + (epoch % (live + _SPARE)) * refill_size) % n_slots
        np.add.at(slot_draws, slots, 1)
        pool.add(slot_episode[slots])
        uniform.add(rng.integers(0, episodes, batch_size))
    stays = np.concatenate(per_stay[live:])  # groups admitted after the start
    return {
        "episodes": episodes, "cache_gb": cache_gb, "pool_episodes": n_live,
        "store_to_pool": episodes / n_live, "steps": steps, "batch_size": batch_size,
        "window": window, "passes": admissions.taken.sum() / episodes,
        "stay_batches": live * refill_every,
        "slices_per_stay_mean": float(stays.mean()),
        "slices_per_stay_p5_p95": [float(np.percentile(stays, 5)),
                                   float(np.percentile(stays, 95))],
        "pool": pool.summary(probs), "uniform": uniform.summary(probs),
        "seconds": time.perf_counter() - t0,
    }  # fmt: skip
