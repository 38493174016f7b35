"""MT30Env: one MT30 task as TD-MPC2's evaluation sees it (docs/tdmpc2.md#environments).

The env is built once per task with `task_kwargs={'random': seed}`, so its RandomState carries
over across resets. Observations are the flat dm_control observation dict (dict order) as
float32, zero-padded to the MT30 width (24). Actions arrive padded (6) in [-1, 1]; only the
first `action_dim` entries are executed, rescaled to the actuator range by dm_control's
`action_scale` wrapper, each twice (action repeat 2, reward = sum of the two). Episodes end
after 500 agent steps (1000 dm_control steps).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from datapipe.extras import install_hint

try:
    from dm_control import suite as dm_suite
    from dm_control.suite.wrappers import action_scale
except ModuleNotFoundError as e:
    raise ModuleNotFoundError(
        f"evaluation needs dm_control ({e.name} is missing): {install_hint('envs')}"
    ) from e

from datapipe.tasksets import MT30
from trainer.evaluation.envs.custom import CUSTOM_TASKS
from trainer.evaluation.envs.headless import mujoco_deprecations_silenced
from trainer.model.presets import MT30_EPISODE_LENGTH

EPISODE_LENGTH = MT30_EPISODE_LENGTH  # agent steps
ACTION_REPEAT = 2


def _dm_control_env(task: str, seed: int) -> Any:
    """The raw dm_control environment of an MT30 task (standard or custom), built without
    MuJoCo's deprecation notices for the shipped models (see headless.py)."""
    with mujoco_deprecations_silenced():
        if task in CUSTOM_TASKS:
            return CUSTOM_TASKS[task](seed)
        domain, _, name = task.partition("-")
        domain = {"cup": "ball_in_cup"}.get(domain, domain)
        return dm_suite.load(domain, name.replace("-", "_"), task_kwargs={"random": seed})


class MT30Env:
    """One MT30 task: reset() -> obs [24]; step(action [6]) -> (obs, reward, done, info)."""

    def __init__(self, task: str, seed: int = 1):
        if task not in MT30.names:
            raise ValueError(f"unknown MT30 task {task!r}; valid: {', '.join(MT30.names)}")
        self.task = task
        self.task_id = MT30.names.index(task)
        self.obs_dim = MT30.obs_dims[self.task_id]
        self.action_dim = MT30.action_dims[self.task_id]
        self.padded_obs_dim = MT30.obs_dim
        self.padded_action_dim = MT30.action_dim
        self.seed = seed
        # The dm_control environment behind the [-1, 1] action scaling (.physics, .task).
        self.dm_env = action_scale.Wrapper(_dm_control_env(task, seed), minimum=-1.0, maximum=1.0)
        self._check_dims()
        self._t: int | None = None  # agent steps into the episode; None before reset/after end

    def _check_dims(self) -> None:
        obs = sum(int(np.prod(s.shape)) for s in self.dm_env.observation_spec().values())
        act = self.dm_env.action_spec().shape
        if (obs, act) != (self.obs_dim, (self.action_dim,)):
            raise RuntimeError(
                f"{self.task}: dm_control gives obs {obs}, action {act}; MT30 says "
                f"{self.obs_dim}, ({self.action_dim},). Install the pinned dm-control/mujoco "
                f"({install_hint('envs')})."
            )

    def _obs(self, observation: dict[str, Any]) -> np.ndarray:
        out = np.zeros(self.padded_obs_dim, dtype=np.float32)
        flat = np.concatenate(
            [np.asarray(v, dtype=np.float64).ravel() for v in observation.values()]
        )
        out[: flat.size] = flat
        return out

    def reset(self) -> np.ndarray:
        """Start a new episode; returns the padded float32 observation."""
        self._t = 0
        return self._obs(self.dm_env.reset().observation)

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, dict[str, Any]]:
        """Apply `action` (padded or unpadded, in [-1, 1]) for ACTION_REPEAT dm_control steps."""
        if self._t is None:
            raise RuntimeError(f"{self.task}: call reset() before step() (and after done)")
        action = np.asarray(action, dtype=np.float64)
        if action.ndim != 1 or action.size not in (self.action_dim, self.padded_action_dim):
            raise ValueError(
                f"{self.task}: action of shape {action.shape}; expected "
                f"({self.padded_action_dim},) or ({self.action_dim},)"
            )
        reward = 0.0
        for repeat in range(ACTION_REPEAT):
            ts = self.dm_env.step(action[: self.action_dim])
            reward += ts.reward
            if ts.last() and repeat < ACTION_REPEAT - 1:
                break  # reported below: dm_control must end on a whole agent step
        self._t += 1
        done = self._t >= EPISODE_LENGTH
        if ts.last() != done or repeat < ACTION_REPEAT - 1:
            raise RuntimeError(
                f"{self.task}: dm_control's episode end (last={ts.last()}) disagrees with "
                f"{EPISODE_LENGTH} agent steps x {ACTION_REPEAT} at agent step {self._t}"
            )
        if done:
            self._t = None
        return self._obs(ts.observation), float(reward), done, {"truncated": done}


def make_env(task_name: str, seed: int = 1) -> MT30Env:
    """The MT30 env of `task_name`, seeded as in the official evaluation (seed 1)."""
    return MT30Env(task_name, seed)
