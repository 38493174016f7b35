"""Real-physics MT30 data: `tools make-mt30 --physics dmc`.

Runs the 30 MT30 dm_control tasks (`trainer.evaluation.envs`) and writes the rollouts in exactly the
official chunk format, with the chunk writer of `tools.chunkfile`: row k of an episode holds
obs_k, the action that led to it and its reward; row 0's action and reward are NaN; obs are
zero-padded to 24 and actions to 6; task is int32 on every row; the episodes of a task form
one run, tasks in index order, split evenly over the chunks.

Every episode is a pure function of (seed, task, episode index), whatever the chunking or the
number of workers: a task's env is built with seed (seed, task) and reset once per earlier
episode (resets alone draw from its RandomState), and the policy's noise is seeded with
(seed, task, episode).

Policies: `random` (uniform in [-1, 1] on the active dims), `noise` (smooth AR(1) noise, its
level drawn per episode), or a checkpoint path (policy mean plus Gaussian noise, clipped to
[-1, 1]). With a checkpoint, `noise` lists exploration stds: episode k of every task uses
`noise[k % len(noise)]`, so one dataset mixes near-expert and near-random behaviour, as MT30
mixes replay data from agents of every quality. The std of each episode is a pure function of
its index too.
"""

from __future__ import annotations

import multiprocessing as mp
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from datapipe.progress import Progress
from datapipe.tasksets import MT30
from tools.chunkfile import save_chunk
from tools.errors import ToolError

POLICIES = ("random", "noise")
CHECKPOINT_NOISE_STD = (0.3,)  # default exploration std(s) around the checkpoint's policy mean


def _task_seed(seed: int, task_id: int) -> int:
    return int(np.random.SeedSequence([seed, task_id]).generate_state(1)[0])


def _set_policy(policy: str) -> None:
    """Load the checkpoint policy of this process (or clear it for random/noise)."""
    from trainer.evaluation.evaluate import set_worker_model

    if policy in POLICIES:
        set_worker_model(None)
    else:
        from trainer.model.checkpoint import load_any

        set_worker_model(load_any(policy))


def _init_worker(policy: str) -> None:
    """Worker process start: one torch thread, the policy loaded once."""
    import torch

    torch.set_num_threads(1)
    _set_policy(policy)


def _actions(policy: str, rng: np.random.Generator, steps: int, dims: int) -> np.ndarray | None:
    """Open-loop actions [steps, dims] for the random and noise policies (None otherwise)."""
    if policy == "random":
        return rng.uniform(-1.0, 1.0, (steps, dims))
    if policy == "noise":
        level, rho = rng.uniform(0.3, 1.0), 0.9
        u, out = np.zeros(dims), np.empty((steps, dims))
        for k in range(steps):
            u = rho * u + np.sqrt(1 - rho**2) * rng.normal(size=dims)
            out[k] = np.clip(level * u, -1.0, 1.0)
        return out
    return None


def rollout_task(
    task: str,
    lo: int,
    hi: int,
    seed: int,
    policy: str,
    noise: tuple[float, ...] = CHECKPOINT_NOISE_STD,
) -> dict[str, np.ndarray]:
    """Episodes lo..hi-1 of `task` in the official row layout (arrays [n, 501, .])."""
    import torch

    from trainer.evaluation.envs import EPISODE_LENGTH, make_env

    env = make_env(task, _task_seed(seed, MT30.names.index(task)))
    for _ in range(lo):  # replay the resets of the episodes before lo
        env.reset()
    n, rows = hi - lo, EPISODE_LENGTH + 1
    obs = np.zeros((n, rows, env.padded_obs_dim), np.float32)
    action = np.zeros((n, rows, env.padded_action_dim), np.float32)
    reward = np.zeros((n, rows), np.float32)
    task_id = torch.tensor([env.task_id])
    for i in range(n):
        rng = np.random.default_rng([seed, env.task_id, lo + i])
        plan = _actions(policy, rng, EPISODE_LENGTH, env.action_dim)
        std = noise[(lo + i) % len(noise)]
        obs[i, 0] = env.reset()
        for k in range(1, rows):
            if plan is not None:
                a = plan[k - 1]
            else:
                a = _policy_mean(obs[i, k - 1], task_id)[: env.action_dim]
                a = np.clip(a + std * rng.normal(size=a.shape), -1.0, 1.0)
            action[i, k, : env.action_dim] = a
            obs[i, k], reward[i, k], _, _ = env.step(action[i, k])
    action[:, 0] = np.nan
    reward[:, 0] = np.nan
    return {
        "obs": obs,
        "action": action,
        "reward": reward,
        "task": np.full((n, rows), env.task_id, np.int32),
    }


def _rollout_job(args: tuple) -> dict[str, np.ndarray]:
    return rollout_task(*args)


def _policy_mean(obs: np.ndarray, task_id) -> np.ndarray:
    import torch

    from trainer.evaluation.evaluate import worker_model
    from trainer.evaluation.plan import policy_action

    with torch.inference_mode():
        return policy_action(worker_model(), torch.from_numpy(obs)[None], task_id)[0].numpy()


def _chunk_jobs(names: list[str], per_task: int, chunks: int) -> list[list[tuple[str, int, int]]]:
    """Per chunk, the (task, lo, hi) episode ranges it holds, tasks in order."""
    total = len(names) * per_task
    bounds = np.linspace(0, total, chunks + 1).astype(int)
    out = []
    for k in range(chunks):
        jobs = []
        for t, name in enumerate(names):
            lo = max(bounds[k], t * per_task) - t * per_task
            hi = min(bounds[k + 1], (t + 1) * per_task) - t * per_task
            if lo < hi:
                jobs.append((name, int(lo), int(hi)))
        out.append(jobs)
    return out


def make_mt30_dmc(
    dst: str | os.PathLike,
    episodes_per_task: int = 4,
    chunks: int = 1,
    seed: int = 0,
    policy: str = "random",
    workers: int = -1,
    tasks: str | list[str] | None = None,
    noise: tuple[float, ...] = CHECKPOINT_NOISE_STD,
    progress: bool = False,
) -> list[Path]:
    """Roll out `policy` on the MT30 tasks and write chunk_0.pt .. into `dst`; returns the paths.

    `workers` processes (spawned, one torch thread each) run one job per (task, chunk);
    0 runs everything in this process; -1 uses one process per CPU core.
    """
    from trainer.evaluation.evaluate import one_torch_thread, resolve_tasks

    names = resolve_tasks(tasks or "mt30")
    names.sort(key=MT30.names.index)
    if episodes_per_task < 1 or chunks < 1:
        raise ToolError("--episodes-per-task and --chunks must be at least 1")
    if chunks > len(names) * episodes_per_task:
        raise ToolError(
            f"--chunks {chunks} is more than the {len(names) * episodes_per_task} episodes"
        )
    noise = tuple(float(x) for x in noise)
    if not noise or not all(np.isfinite(x) and x >= 0 for x in noise):
        raise ToolError(f"--noise needs one or more finite stds >= 0; got {noise}")
    if policy not in POLICIES and not Path(policy).is_file():
        raise ToolError(
            f"--policy must be one of {', '.join(POLICIES)} or a checkpoint file; got {policy!r}"
        )
    if policy not in POLICIES:
        from trainer.evaluation.evaluate import check_task_set
        from trainer.model.checkpoint import load_any

        check_task_set(load_any(policy).cfg)  # fail here, not inside every worker
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    if workers < 0:
        workers = os.cpu_count() or 1
    per_chunk = _chunk_jobs(names, episodes_per_task, chunks)
    paths = []
    bar = Progress(len(names) * episodes_per_task, "make-mt30", "episode", enabled=progress)
    pool = (
        ProcessPoolExecutor(workers, mp.get_context("spawn"), _init_worker, (policy,))
        if workers
        else None
    )
    try:
        if pool is None:
            _set_policy(policy)
        for k, jobs in enumerate(per_chunk):
            if pool is not None:
                parts = []
                for part in pool.map(_rollout_job, [(*job, seed, policy, noise) for job in jobs]):
                    parts.append(part)
                    bar.update(len(part["reward"]))
            else:
                with one_torch_thread():
                    parts = []
                    for job in jobs:
                        parts.append(rollout_task(*job, seed, policy, noise))
                        bar.update(len(parts[-1]["reward"]))
            path = dst / f"chunk_{k}.pt"
            save_chunk(parts, path)
            paths.append(path)
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown()
    return paths
