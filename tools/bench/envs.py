"""Env throughput: agent steps/s of each MT30 task under random actions, in this process.

Every env is built, reset and stepped with uniform random padded actions in [-1, 1], resetting
at episode ends, one task after another on one core (MuJoCo steps single-threaded). An agent
step is 2 dm_control control steps (action repeat); a control step is `n_sub_steps` MuJoCo
steps, so `mujoco_steps_per_s` compares the physics cost across domains.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np

from trainer.evaluation.envs import ACTION_REPEAT, make_env


def bench_env(task: str, steps: int, seed: int = 0) -> dict:
    """Build time and steps/s of `steps` random-action agent steps of one task."""
    t0 = time.perf_counter()
    env = make_env(task)
    build_s = time.perf_counter() - t0
    actions = np.random.default_rng(seed).uniform(-1, 1, (steps, env.padded_action_dim))
    resets = 1
    t0 = time.perf_counter()
    env.reset()
    for action in actions:
        _, _, done, _ = env.step(action)
        if done:
            env.reset()
            resets += 1
    seconds = time.perf_counter() - t0
    sub_steps = round(env.dm_env.control_timestep() / env.dm_env.physics.timestep())
    return {
        "task": task,
        "build_s": build_s,
        "steps": steps,
        "resets": resets,
        "seconds": seconds,
        "steps_per_s": steps / seconds,
        "mujoco_steps_per_s": steps * ACTION_REPEAT * sub_steps / seconds,
    }


def bench_envs(tasks: Sequence[str], steps: int = 1000) -> list[dict]:
    """`bench_env` of every task in `tasks`, in order (timings include resets)."""
    return [bench_env(task, steps) for task in tasks]
