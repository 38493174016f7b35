"""The 11 custom MT30 tasks: dm_control physics and tasks with our own rewards.

What each task rewards: docs/tdmpc2.md#custom-tasks. Each task subclasses the standard
dm_control task of its domain, keeping its physics, initial-state randomisation, observation
and 1000-control-step time limit, and overrides the reward (cup-spin also its
initialisation). `CUSTOM_TASKS` maps an MT30 task name to a builder
`random -> dm_control.rl.control.Environment`; nothing is registered in dm_control's suite.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from dm_control import mujoco
from dm_control.rl import control
from dm_control.suite import ball_in_cup, base, cheetah, hopper, pendulum, reacher, walker
from dm_control.utils import rewards

from trainer.evaluation.envs import models

INF = float("inf")
CONTROL_STEPS = 1000  # every MT30 task's time limit, in dm_control control steps


def linear(x: float, bounds: tuple[float, float], margin: float, at_margin: float = 0.0) -> float:
    """dm_control's `rewards.tolerance` with the linear sigmoid."""
    return float(
        rewards.tolerance(
            x, bounds=bounds, margin=margin, sigmoid="linear", value_at_margin=at_margin
        )
    )


def high(z: float) -> float:
    """1 at height >= 1.2, gaussian fall-off (0.1 at 0.6): the walker/cheetah standing term."""
    return float(rewards.tolerance(z, bounds=(1.2, INF), margin=0.6))


class WalkerBackwards(walker.PlanarWalker):
    """Stand and move in -x at `move_speed` m/s or faster (walker-walk/run-backwards)."""

    def get_reward(self, physics: walker.Physics) -> float:
        upright = (1 + physics.torso_upright()) / 2
        stand = (3 * high(physics.torso_height()) + upright) / 4
        speed = self._move_speed
        move = linear(physics.horizontal_velocity(), (-INF, -speed), speed / 2, 0.5)
        return stand * (5 * move + 1) / 6


class CheetahPhysics(cheetah.Physics):
    """Cheetah physics plus world-frame heights of body origins."""

    def body_height(self, body: str) -> float:
        return float(self.named.data.xpos[body, "z"])


class CheetahBackwards(cheetah.Cheetah):
    """Run in -x at 8 m/s or faster (cheetah-run-backwards)."""

    def get_reward(self, physics: CheetahPhysics) -> float:
        return linear(physics.speed(), (-INF, -8), 8)


class CheetahFootUp(cheetah.Cheetah):
    """Run forward at 6 m/s or faster with torso and `raised_foot` high.

    cheetah-run-front raises the back foot ("bfoot"), cheetah-run-back the front one ("ffoot").
    """

    def __init__(self, raised_foot: str, random: int | np.random.RandomState | None = None):
        self._raised_foot = raised_foot
        super().__init__(random=random)

    def get_reward(self, physics: CheetahPhysics) -> float:
        torso_up = high(physics.body_height("torso"))
        foot_up = high(physics.body_height(self._raised_foot))
        up = (3 * foot_up + 2 * torso_up) / 5
        return up * (5 * linear(physics.speed(), (6, INF), 6) + 1) / 6


class CheetahJump(cheetah.Cheetah):
    """Get torso and feet high while nearly still in x: the mean of the two one-foot rewards."""

    def get_reward(self, physics: CheetahPhysics) -> float:
        still = linear(physics.speed(), (-0.5, 0.5), 0.5)
        torso = physics.body_height("torso")
        one_foot = [
            (5 * high((torso + physics.body_height(foot)) / 2) + still) / 6
            for foot in ("bfoot", "ffoot")
        ]
        return sum(one_foot) / 2


class HopperBackwards(hopper.Hopper):
    """Stand (torso over foot in [0.6, 2]) and hop in -x at 1 m/s or faster."""

    def __init__(self, random: int | np.random.RandomState | None = None):
        super().__init__(hopping=True, random=random)

    def get_reward(self, physics: hopper.Physics) -> float:
        standing = float(rewards.tolerance(physics.height(), (0.6, 2)))
        return standing * linear(physics.speed(), (-INF, -1), 0.5, 0.5)


class CupSpin(ball_in_cup.BallInCup):
    """Swing the ball fast and far from the cup; nothing while it is in the cup.

    Episodes start with the ball in the cup, except with probability 0.1 anywhere (as
    cup-catch). Either way the start is collision-free.
    """

    def initialize_episode(self, physics: ball_in_cup.Physics) -> None:
        anywhere = self.random.rand() < 0.1
        while True:
            physics.named.data.qpos["ball_x"] = self.random.uniform(-0.2, 0.2)
            physics.named.data.qpos["ball_z"] = self.random.uniform(0.2, 0.5)
            physics.after_reset()
            if physics.data.ncon == 0 and (anywhere or physics.in_target()):
                break
        base.Task.initialize_episode(self, physics)  # skips cup-catch's own placement

    def get_reward(self, physics: ball_in_cup.Physics) -> float:
        if physics.in_target():
            return 0.0
        far = linear(np.linalg.norm(physics.ball_to_target()), (0.5, INF), 0.25, 0.5)
        ball_velocity = physics.named.data.qvel[["ball_x", "ball_z"]]
        fast = linear(np.linalg.norm(ball_velocity), (6, INF), 3, 0.5)
        return (far + 2 * fast) / 3


class PendulumSpin(pendulum.SwingUp):
    """Spin the pole at |omega| >= 9 rad/s: 1 there, 0.5 at 4.5 rad/s, 0 at rest."""

    def get_reward(self, physics: pendulum.Physics) -> float:
        return linear(abs(physics.angular_velocity().item()), (9, INF), 4.5, 0.5)


def _env(
    physics_cls: type[mujoco.Physics], model: models.Model, task: base.Task, control_dt: float
) -> control.Environment:
    physics = physics_cls.from_xml_string(*model)
    return control.Environment(
        physics, task, time_limit=CONTROL_STEPS * control_dt, control_timestep=control_dt
    )


Builder = Callable[[int | np.random.RandomState | None], control.Environment]

CUSTOM_TASKS: dict[str, Builder] = {
    "walker-walk-backwards": lambda random: _env(
        walker.Physics, models.walker_long_floor(), WalkerBackwards(1, random=random), 0.025
    ),
    "walker-run-backwards": lambda random: _env(
        walker.Physics, models.walker_long_floor(), WalkerBackwards(8, random=random), 0.025
    ),
    "cheetah-run-backwards": lambda random: _env(
        CheetahPhysics, models.cheetah_long_ground(), CheetahBackwards(random=random), 0.01
    ),
    "cheetah-run-front": lambda random: _env(
        CheetahPhysics, models.cheetah_long_ground(), CheetahFootUp("bfoot", random), 0.01
    ),
    "cheetah-run-back": lambda random: _env(
        CheetahPhysics, models.cheetah_long_ground(), CheetahFootUp("ffoot", random), 0.01
    ),
    "cheetah-jump": lambda random: _env(
        CheetahPhysics, models.cheetah_long_ground(), CheetahJump(random=random), 0.01
    ),
    "hopper-hop-backwards": lambda random: _env(
        hopper.Physics, models.standard("hopper.xml"), HopperBackwards(random=random), 0.02
    ),
    "reacher-three-easy": lambda random: _env(
        reacher.Physics, models.reacher_three_links(), reacher.Reacher(0.05, random=random), 0.02
    ),
    "reacher-three-hard": lambda random: _env(
        reacher.Physics, models.reacher_three_links(), reacher.Reacher(0.015, random=random), 0.02
    ),
    "cup-spin": lambda random: _env(
        ball_in_cup.Physics, models.standard("ball_in_cup.xml"), CupSpin(random=random), 0.02
    ),
    "pendulum-spin": lambda random: _env(
        pendulum.Physics, models.standard("pendulum.xml"), PendulumSpin(random=random), 0.02
    ),
}
