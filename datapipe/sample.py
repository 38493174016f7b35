"""Which slices to draw: per-task weights, the stream of episodes admitted to the loader's
pool, and the draw of (pool slot, start row) for every batch. Pure numpy, no I/O.

Everything here is a pure function of the seed and a counter, plus a few integers of state
(`Admissions.state_dict`), so a resumed run draws exactly what the interrupted one would have:

- `task_probabilities`: the share of slices each task gets. By default a task's share is its
  share of episodes, which (all episodes having the same length) makes the draw uniform over
  every valid slice of the selected tasks, as the official sampler is.
- `Admissions`: block b of episodes entering the pool draws each episode's task from those
  shares, then takes that task's next episode from a seeded permutation of its episodes
  (a fresh permutation every pass). Every episode of a task therefore enters once per pass.
- `SliceDraws`: batch `step` draws B pool slots and B start rows uniformly.
- `UniformDraws`: without a pool, batch `step` draws each slice's episode from the whole
  store (the task by its share, then an episode of it uniformly) and its start row: the
  official sampler's draw exactly, for a loader that reads every slice's episode.

Because every admitted episode stays in the pool for the same number of batches and each batch
draws slots uniformly, an episode's long-run share of slices is its admission probability:
uniform over episodes (and start rows) by default, proportional to the task weights otherwise.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np

_TASK_DRAWS, _PERMUTATION, _BATCH, _UNIFORM = 1, 2, 3, 4  # stream tags: no two draws share a seed


def _task_id(task: int | str, task_names: Sequence[str]) -> int:
    if isinstance(task, str):
        if task not in task_names:
            raise ValueError(f"unknown task {task!r}; the store's tasks: {', '.join(task_names)}")
        return task_names.index(task)
    if not 0 <= int(task) < len(task_names):
        raise ValueError(f"task id {task} outside [0, {len(task_names)})")
    return int(task)


def task_probabilities(
    episode_counts: Sequence[int],
    task_names: Sequence[str],
    tasks: Iterable[int | str] | None = None,
    weights: str | Mapping[int | str, float] | None = None,
) -> np.ndarray:
    """Share of slices per task id, summing to 1.

    `tasks` restricts sampling to a subset (names or ids; default all tasks with episodes).
    `weights`: None for uniform over all valid slices (a task's share is its share of
    episodes), "balanced" for equal shares, or a mapping task -> weight (tasks left out of
    the mapping are not sampled).
    """
    counts = np.asarray(episode_counts, np.float64)
    selected = np.zeros(len(counts), bool)
    if tasks is None:
        selected[:] = True
    else:
        selected[[_task_id(t, task_names) for t in tasks]] = True
    if weights is None:
        w = counts.copy()
    elif isinstance(weights, str):
        if weights != "balanced":
            raise ValueError(f"weights={weights!r}: use None, 'balanced' or a task -> weight map")
        w = (counts > 0).astype(np.float64)
    else:
        w = np.zeros(len(counts))
        for task, weight in weights.items():
            if not weight >= 0:
                raise ValueError(f"weight of task {task!r} is {weight}; weights must be >= 0")
            w[_task_id(task, task_names)] = float(weight)
        empty = [task_names[t] for t in np.flatnonzero((w > 0) & (counts == 0))]
        if empty:
            raise ValueError(f"tasks {empty} have a weight but no episodes in this store")
    w = np.where(selected, w, 0.0)
    if not w.sum() > 0:
        raise ValueError("no episodes to sample: the selected tasks have no episodes or weight")
    return w / w.sum()


class Admissions:
    """The episodes entering the pool, `block_size` at a time, as a function of the seed.

    `episodes_by_task[t]` lists the episode ids of task t; `probs[t]` is its share. State is
    the number of blocks produced and how many episodes of each task were taken.
    """

    def __init__(
        self,
        episodes_by_task: Sequence[np.ndarray],
        probs: np.ndarray,
        block_size: int,
        seed: int,
    ):
        self.episodes_by_task = [np.asarray(e, np.int64) for e in episodes_by_task]
        self.probs = np.asarray(probs, np.float64)
        self.block_size = int(block_size)
        self.seed = int(seed)
        self.block_index = 0
        self.taken = np.zeros(len(self.episodes_by_task), np.int64)
        self._perms: dict[int, tuple[int, np.ndarray]] = {}  # task -> (pass, permutation)

    def _permutation(self, task: int, pass_: int) -> np.ndarray:
        cached = self._perms.get(task)
        if cached is None or cached[0] != pass_:
            rng = np.random.default_rng((self.seed, _PERMUTATION, task, pass_))
            cached = (pass_, rng.permutation(self.episodes_by_task[task]))
            self._perms[task] = cached
        return cached[1]

    def next_block(self) -> np.ndarray:
        """Episode ids of the next block, [block_size] int64."""
        rng = np.random.default_rng((self.seed, _TASK_DRAWS, self.block_index))
        tasks = rng.choice(len(self.probs), size=self.block_size, p=self.probs)
        out = np.empty(self.block_size, np.int64)
        for i, t in enumerate(tasks):
            n = len(self.episodes_by_task[t])
            pass_, pos = divmod(int(self.taken[t]), n)
            out[i] = self._permutation(int(t), pass_)[pos]
            self.taken[t] += 1
        self.block_index += 1
        return out

    def state_dict(self) -> dict:
        return {"block": self.block_index, "taken": self.taken.tolist()}

    def load_state_dict(self, state: Mapping) -> None:
        taken = np.asarray(state["taken"], np.int64)
        if taken.shape != self.taken.shape:
            raise ValueError(f"state has {len(taken)} tasks, this sampler {len(self.taken)}")
        self.block_index = int(state["block"])
        self.taken = taken
        self._perms.clear()


class SliceDraws:
    """Pool slots and start rows of every batch, uniform: a pure function of (seed, step).

    Draws are made `chunk` batches at a time (one generator per chunk: constructing a numpy
    generator costs about as much as drawing a whole batch), so `draw(step)` is cheap when
    steps come in order and still exact for any step.
    """

    def __init__(self, seed: int, n_slots: int, n_starts: int, batch_size: int, chunk: int = 64):
        self.seed, self.n_slots, self.n_starts = int(seed), n_slots, n_starts
        self.batch_size, self.chunk = batch_size, chunk
        self._cached: tuple[int, np.ndarray, np.ndarray] | None = None

    def draw(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(slots, starts) of batch `step`: two [batch_size] int64 arrays."""
        c, i = divmod(step, self.chunk)
        if self._cached is None or self._cached[0] != c:
            rng = np.random.default_rng((self.seed, _BATCH, c))
            shape = (self.chunk, self.batch_size)
            self._cached = (
                c,
                rng.integers(0, self.n_slots, shape),
                rng.integers(0, self.n_starts, shape),
            )
        return self._cached[1][i], self._cached[2][i]


class UniformDraws:
    """Episodes and start rows of every batch drawn over the whole store: a pure function of
    (seed, step). Slice i's task is drawn by `probs`, its episode uniformly from that task's
    episodes, so with the default shares every valid slice of the store is equally likely."""

    def __init__(
        self, episodes_by_task: Sequence[np.ndarray], probs: np.ndarray, n_starts: int,
        batch_size: int, seed: int,
    ):  # fmt: skip
        self.episodes = np.concatenate([np.asarray(e, np.int64) for e in episodes_by_task])
        counts = np.array([len(e) for e in episodes_by_task], np.int64)
        self.first = np.concatenate([[0], np.cumsum(counts)[:-1]])
        self.counts, self.probs = counts, np.asarray(probs, np.float64)
        self.n_starts, self.batch_size, self.seed = n_starts, batch_size, int(seed)

    def draw(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(episodes, starts) of batch `step`: two [batch_size] int64 arrays."""
        rng = np.random.default_rng((self.seed, _UNIFORM, step))
        tasks = rng.choice(len(self.probs), size=self.batch_size, p=self.probs)
        within = (rng.random(self.batch_size) * self.counts[tasks]).astype(np.int64)
        starts = rng.integers(0, self.n_starts, self.batch_size)
        return self.episodes[self.first[tasks] + within], starts
