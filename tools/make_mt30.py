"""Synthetic MT30-format datasets: `tools make-mt30`.

Writes `chunk_0.pt` .. `chunk_{K-1}.pt` exactly as the official release does (a torch-saved
`tensordict.TensorDict` of batch [N, T] with obs f32 [N,T,O], action f32 [N,T,A],
reward f32 [N,T], task i32 [N,T]; NaN action/reward at row 0; per-task dims zero-padded;
episodes of one task in a contiguous run). The values are not physics, but are structured
like it: each task is a damped linear system driven by smooth, bounded actions, with a
reward in [0, 2] that depends on the state and the action, so a world model can learn it.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from datapipe.options import setting
from datapipe.progress import Progress
from datapipe.tasksets import TASK_SETS, TaskSet, get_task_set
from tools.chunkfile import STREAMS, chunk_shapes, write_chunk
from tools.errors import ToolError

BLOCK = 1024  # episodes generated at once: ~66 MB of MT30 rows


@dataclass(frozen=True)
class MakeConfig:
    """Settings of `tools make-mt30` (one field per flag; the options are generated from them)."""

    dst: Path = setting(help="Folder to write chunk_K.pt into.")
    episodes_per_task: int = setting(4, "Episodes of every task.")
    chunks: int = setting(1, "Number of chunk files; episodes are split evenly, tasks in order.")
    seed: int = setting(0, "Generation seed; the same seed and settings give the same bytes.")
    task_set: str = setting("mt30", "mt30: 501-row episodes, obs 24; mt80: 101-row, obs 39.")
    episode_length: int | None = setting(
        None, "Rows per episode (synthetic only); default 501 (mt30) or 101 (mt80)."
    )
    physics: str = setting(
        "synthetic",
        "synthetic: smooth linear dynamics (fast); dmc: real DMControl rollouts (mt30 only).",
    )
    policy: str = setting(
        "random", "With --physics dmc: random, noise, or the path of a world-model checkpoint."
    )
    workers: int = setting(
        -1, "With --physics dmc: rollout processes; 0: this process; -1: one per core."
    )
    noise: str = setting(
        "0.3",
        "With a checkpoint --policy: exploration std(s), comma-separated; episode k of every "
        "task uses the (k mod n)-th.",
    )
    tasks: str = setting("mt30", "With --physics dmc: mt30 or comma-separated task names.")
    progress: bool = setting(True, "Episodes done, rate, ETA (one line a minute off a terminal).")
    like: str | None = setting(
        None,
        "mt30: exactly the released layout: 4 chunks of 200,000/200,000/200,000/90,000 "
        "episodes (23,000 per task) of 501 rows, 44 GB (synthetic only).",
    )

    @property
    def rows(self) -> int:
        if self.episode_length is not None:
            return self.episode_length
        return get_task_set(self.task_set).rows

    @property
    def noise_stds(self) -> tuple[float, ...]:
        try:
            return tuple(float(x) for x in self.noise.split(","))
        except ValueError:
            raise ToolError(f"--noise {self.noise!r}: give numbers, e.g. 0.1,0.3,1.0") from None


def make_dataset(cfg: MakeConfig) -> list[Path]:
    """`tools make-mt30`: the chunk files of `cfg`, synthetic or rolled out in DMControl."""
    if cfg.physics == "synthetic":
        return make_mt30(cfg)
    if cfg.physics != "dmc":
        raise ToolError(f"--physics must be synthetic or dmc (got {cfg.physics!r})")
    if cfg.like is not None:
        raise ToolError("--like makes synthetic data only (a real-physics MT30 takes months)")
    if cfg.task_set != "mt30" or cfg.episode_length is not None:
        raise ToolError("--physics dmc makes the 30 MT30 tasks' 501-row episodes only")
    from tools.rollouts import make_mt30_dmc

    return make_mt30_dmc(
        cfg.dst, cfg.episodes_per_task, cfg.chunks, cfg.seed, cfg.policy, cfg.workers,
        cfg.tasks, cfg.noise_stds, cfg.progress,
    )  # fmt: skip


def _task_system(task_set: TaskSet, task: int, seed: int):
    """Per-task dynamics (M, Bm), reward weights (w) and step size, fixed by (seed, task)."""
    rng = np.random.default_rng([seed, task, 0])
    n_obs, n_act = task_set.obs_dims[task], task_set.action_dims[task]
    skew = rng.normal(size=(n_obs, n_obs))
    skew = (skew - skew.T) / np.sqrt(n_obs)
    M = skew - 0.15 * np.eye(n_obs)
    Bm = rng.normal(size=(n_obs, n_act)) / np.sqrt(n_act)
    w = rng.normal(size=n_obs) / np.sqrt(n_obs)
    return M, Bm, w, 0.05


def _episodes(task_set: TaskSet, task: int, n: int, rows: int, seed: int, rng) -> dict:
    """`n` episodes of `task`, padded to the set's widths, in the official row layout."""
    M, Bm, w, dt = _task_system(task_set, task, seed)
    n_obs, n_act = M.shape[0], Bm.shape[1]
    obs = np.zeros((n, rows, task_set.obs_dim), np.float32)
    action = np.zeros((n, rows, task_set.action_dim), np.float32)
    reward = np.zeros((n, rows), np.float32)
    # Exploration level per episode: early episodes of a replay buffer are nearly random.
    noise = rng.uniform(0.2, 1.0, size=(n, 1))
    x = rng.normal(scale=0.5, size=(n, n_obs))
    u = np.zeros((n, n_act))
    obs[:, 0, :n_obs] = x
    for k in range(1, rows):
        u = 0.85 * u + noise * rng.normal(scale=0.6, size=u.shape)
        a = np.tanh(u + 0.3 * np.tanh(x[:, :n_act] if n_obs >= n_act else 0.0))
        x = x + dt * (x @ M.T + 2.0 * a @ Bm.T)
        effort = np.mean(a * a, axis=1)
        obs[:, k, :n_obs] = x
        action[:, k, :n_act] = a
        reward[:, k] = 2.0 / (1.0 + np.exp(-2.0 * (x @ w))) * (1.0 - 0.5 * effort)
    action[:, 0] = np.nan
    reward[:, 0] = np.nan
    task_ids = np.full((n, rows), task, np.int32)
    return {"obs": obs, "action": action, "reward": reward, "task": task_ids}


def _chunk_bounds(cfg: MakeConfig, task_set: TaskSet) -> list[int]:
    """Episode boundaries of the chunk files: the released layout with --like, else an even
    split."""
    if cfg.like is None:
        total = task_set.n_tasks * cfg.episodes_per_task
        return [int(b) for b in np.linspace(0, total, cfg.chunks + 1).astype(int)]
    return [0, *np.cumsum(task_set.release_chunks).tolist()]


def _chunk_blocks(cfg: MakeConfig, task_set: TaskSet, k: int, lo: int, hi: int, bar):
    """The episodes [lo, hi) of chunk `k`, in blocks of at most BLOCK episodes of one task.
    Block b of a task draws from the generator seeded (seed, task, k, 1[, b]), so a chunk
    with at most BLOCK episodes of each task has the bytes it had when a task was one block."""
    per_task = cfg.episodes_per_task
    for task in range(task_set.n_tasks):
        t_lo, t_hi = max(lo, task * per_task), min(hi, (task + 1) * per_task)
        for b, start in enumerate(range(t_lo, t_hi, BLOCK)):
            rng = np.random.default_rng([cfg.seed, task, k, 1] + ([b] if b else []))
            n = min(BLOCK, t_hi - start)
            yield _episodes(task_set, task, n, cfg.rows, cfg.seed, rng)
            bar.update(n)


def make_mt30(cfg: MakeConfig) -> list[Path]:
    """Write the chunk files of `cfg` and return their paths. One block of episodes is in
    memory at a time, whatever the chunk size."""
    task_set = get_task_set(cfg.task_set)
    if cfg.like is not None:
        cfg = _like(cfg, task_set)
    if cfg.episodes_per_task < 1 or cfg.chunks < 1:
        raise ToolError("--episodes-per-task and --chunks must be at least 1")
    total = task_set.n_tasks * cfg.episodes_per_task
    if cfg.chunks > total:
        raise ToolError(f"--chunks {cfg.chunks} is more than the {total} episodes to write")
    cfg.dst.mkdir(parents=True, exist_ok=True)
    if not STREAMS:
        print(
            f"make-mt30: torch {torch.__version__} has no torch.serialization.skip_data: each "
            f"chunk is built in memory (torch >= 2.6 writes it in blocks)",
            file=sys.stderr,
        )
    bounds = _chunk_bounds(cfg, task_set)
    paths = []
    bar = Progress(total, "make-mt30", "episode", enabled=cfg.progress)
    try:
        for k in range(cfg.chunks):
            lo, hi = bounds[k], bounds[k + 1]
            shapes = chunk_shapes(hi - lo, cfg.rows, task_set.obs_dim, task_set.action_dim)
            path = cfg.dst / f"chunk_{k}.pt"
            write_chunk(path, shapes, _chunk_blocks(cfg, task_set, k, lo, hi, bar))
            paths.append(path)
    finally:
        bar.close()
    return paths


def _like(cfg: MakeConfig, task_set: TaskSet) -> MakeConfig:
    """`cfg` with the released dataset's layout (--like)."""
    if cfg.like != task_set.name or not task_set.release_chunks:
        known = [ts.name for ts in TASK_SETS.values() if ts.release_chunks]
        raise ToolError(f"--like {cfg.like!r}: the released layout is known for {known} only")
    defaults = {f.name: f.default for f in dataclasses.fields(MakeConfig)}
    if any(
        getattr(cfg, k) != defaults[k] for k in ("episodes_per_task", "chunks", "episode_length")
    ):
        raise ToolError(
            f"--like {cfg.like} fixes the episodes, chunks and rows; leave out "
            f"--episodes-per-task, --chunks and --episode-length"
        )
    total = sum(task_set.release_chunks)
    return dataclasses.replace(
        cfg, episodes_per_task=total // task_set.n_tasks, chunks=len(task_set.release_chunks)
    )
