"""MT30 envs: dims, padding, masking and episode length for all 30 tasks, and the 11 custom
rewards checked on hand-set physics states (docs/tdmpc2.md#tasks, #environments, #custom-tasks)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("dm_control")

from datapipe.tasksets import MT30
from trainer.evaluation.envs import EPISODE_LENGTH, make_env
from trainer.evaluation.envs.custom import CUSTOM_TASKS
from trainer.evaluation.envs.headless import (
    choose_gl_backend,
    headless_backend,
    mujoco_deprecations_silenced,
)


def reward_at(env, qpos=None, qvel=None) -> float:
    """The task's dm_control reward in a hand-set state (the rest at the model's rest pose)."""
    physics = env.dm_env.physics
    with physics.reset_context():  # reset to qpos0 on entry, recompute kinematics on exit
        for name, value in (qpos or {}).items():
            physics.named.data.qpos[name] = value
        for name, value in (qvel or {}).items():
            physics.named.data.qvel[name] = value
    return env.dm_env.task.get_reward(physics)


def test_custom_tasks_are_the_spec_eleven():
    assert sorted(CUSTOM_TASKS) == sorted(MT30.names[19:])


def test_unknown_task_lists_valid_names():
    with pytest.raises(ValueError, match="walker-walk-backwards"):
        make_env("walker-fly")


@pytest.mark.parametrize("task", MT30.names)
def test_task_dims_padding_and_rewards(task):
    env = make_env(task, seed=1)
    i = MT30.names.index(task)
    assert (env.task, env.task_id) == (task, i)
    assert (env.obs_dim, env.action_dim) == (MT30.obs_dims[i], MT30.action_dims[i])
    assert (env.padded_obs_dim, env.padded_action_dim) == (24, 6)
    assert env.dm_env.physics.model.nu == env.action_dim
    obs = env.reset()
    assert obs.shape == (24,) and obs.dtype == np.float32
    assert not obs[env.obs_dim :].any()
    rng = np.random.default_rng(0)
    for _ in range(10):
        action = rng.uniform(-1, 1, 6)
        obs, reward, done, _ = env.step(action)
        assert 0.0 <= reward <= 2.0 and not done
        assert np.isfinite(obs).all() and not obs[env.obs_dim :].any()
    np.testing.assert_allclose(env.dm_env.physics.data.ctrl, action[: env.action_dim])


def test_same_seed_same_episode_and_padding_ignored():
    a, b = make_env("pendulum-spin", seed=3), make_env("pendulum-spin", seed=3)
    np.testing.assert_array_equal(a.reset(), b.reset())
    act = np.array([0.5, 0, 0, 0, 0, 0])
    junk = np.array([0.5, 1, -1, 1, -1, 1])
    for _ in range(5):
        np.testing.assert_array_equal(a.step(act)[0], b.step(junk)[0])
    assert not np.array_equal(a.reset(), make_env("pendulum-spin", seed=4).reset())


def test_obs_is_the_flat_dict_in_order():
    env = make_env("walker-walk")
    obs = env.reset()
    physics = env.dm_env.physics
    np.testing.assert_allclose(obs[:14], physics.orientations(), rtol=1e-6)
    assert obs[14] == np.float32(physics.torso_height())
    np.testing.assert_allclose(obs[15:], physics.velocity(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("task", sorted(CUSTOM_TASKS))
def test_episode_ends_after_500_steps(task):
    env = make_env(task)
    env.reset()
    zero = np.zeros(6)
    dones = [env.step(zero)[2] for _ in range(EPISODE_LENGTH)]
    assert dones == [False] * (EPISODE_LENGTH - 1) + [True]
    with pytest.raises(RuntimeError, match="reset"):
        env.step(zero)
    env.reset()
    assert not env.step(zero)[2]


def test_pendulum_spin_rewards_angular_speed():
    env = make_env("pendulum-spin")
    at = [reward_at(env, qvel={"hinge": w}) for w in (9, -12, 4.5, -4.5, 0)]
    np.testing.assert_allclose(at, [1, 1, 0.5, 0.5, 0], atol=1e-9)


def test_cup_spin_pays_nothing_in_the_cup():
    env = make_env("cup-spin")
    in_cup = {"ball_x": 0.0, "ball_z": 0.35}  # the ball's centre on the cup's target site
    assert reward_at(env, in_cup, {"ball_x": 10, "ball_z": 10}) == 0
    out = {"ball_x": 0.2, "ball_z": 0.2}  # 0.25 from the target: distance term 0.5
    assert reward_at(env, out, {"ball_x": 6}) == pytest.approx((0.5 + 2) / 3)
    assert reward_at(env, out) == pytest.approx(0.5 / 3)
    starts = []
    for _ in range(10):
        env.reset()
        starts.append(env.dm_env.physics.in_target())
    assert sum(starts) >= 6  # the ball starts in the cup with probability 0.9


@pytest.mark.parametrize(("task", "speed"), [("walker-walk", 1), ("walker-run", 8)])
def test_walker_backwards_mirrors_the_move_term(task, speed):
    back, fwd = make_env(f"{task}-backwards"), make_env(task)
    # standing still and upright at the rest pose (torso at 1.3 m): stand term 1
    assert reward_at(back, qvel={"rootx": -speed}) == pytest.approx(1)
    assert reward_at(back, qvel={"rootx": speed}) == pytest.approx(1 / 6)
    assert reward_at(fwd, qvel={"rootx": -speed}) == pytest.approx(1 / 6)
    assert back.dm_env.physics.named.model.geom_size["floor", 0] == 500


def test_cheetah_run_backwards():
    env = make_env("cheetah-run-backwards")
    at = [reward_at(env, qvel={"rootx": v}) for v in (-8, -12, -4, 0, 10)]
    np.testing.assert_allclose(at, [1, 1, 0.5, 0, 0], atol=1e-9)
    assert env.dm_env.physics.named.model.geom_size["ground", 0] == 200


def test_cheetah_raised_foot_tasks():
    front, back = make_env("cheetah-run-front"), make_env("cheetah-run-back")
    lifted = {"rootz": 1.0}  # torso at 1.7 m, both feet above 1.2 m
    for env in (front, back):
        assert reward_at(env, lifted, {"rootx": 6}) == pytest.approx(1)
        assert reward_at(env, lifted) == pytest.approx(1 / 6)
    nose_down = {"rooty": 0.8, "rootz": 0.5}  # back foot up, front foot down
    nose_up = {"rooty": -0.8, "rootz": 0.5}
    assert reward_at(front, nose_down, {"rootx": 6}) > 2 * reward_at(back, nose_down, {"rootx": 6})
    assert reward_at(back, nose_up, {"rootx": 6}) > 2 * reward_at(front, nose_up, {"rootx": 6})


def test_cheetah_jump_rewards_height_while_still():
    env = make_env("cheetah-jump")
    assert reward_at(env, {"rootz": 1.0}) == pytest.approx(1)
    assert reward_at(env, {"rootz": 1.0}, {"rootx": 6}) == pytest.approx(5 / 6)
    assert reward_at(env) < 0.3  # resting on the ground


def test_hopper_hop_backwards():
    env = make_env("hopper-hop-backwards")
    at = [reward_at(env, qvel={"rootx": v}) for v in (-1, -2, -0.5, 0, 1)]
    np.testing.assert_allclose(at, [1, 1, 0.5, 0, 0], atol=1e-9)
    assert reward_at(env, {"rootz": 5.0}, {"rootx": -1}) == 1  # height is torso over foot
    assert reward_at(env, {"knee": 2.6, "hip": -2.9}, {"rootx": -1}) == 0  # folded: too low


@pytest.mark.parametrize(
    ("task", "radius"), [("reacher-three-easy", 0.05), ("reacher-three-hard", 0.015)]
)
def test_reacher_three(task, radius):
    env = make_env(task)
    env.reset()
    physics = env.dm_env.physics
    assert (physics.model.nu, physics.model.njnt, env.obs_dim) == (3, 3, 8)
    assert physics.named.model.geom_size["target", 0] == radius
    np.testing.assert_allclose(physics.named.model.jnt_range["wrist"], np.deg2rad([-80, 80]))
    np.testing.assert_allclose(physics.named.model.actuator_gear[:, 0], 0.05)
    # straight arm along +x: the finger at 0.09 + 0.09 + 0.09
    physics.named.model.geom_pos["target", :2] = [0.27, 0.0]
    assert reward_at(env) == 1
    np.testing.assert_allclose(physics.named.data.geom_xpos["finger", :2], [0.27, 0], atol=1e-12)
    physics.named.model.geom_pos["target", :2] = [-0.1, 0.1]
    assert reward_at(env) == 0


# -- headless: no GLFW/X11 error, no MuJoCo deprecation notices --------------------------------

STEP_AND_RENDER = """
import os
import numpy as np
from trainer.evaluation.envs import make_env
for task in ("cheetah-run", "cheetah-jump", "walker-walk"):  # cheetah.xml: settotalmass
    env = make_env(task)
    env.reset()
    env.step(np.zeros(6))
backend = os.environ["MUJOCO_GL"]
if backend != "off":
    assert env.dm_env.physics.render(16, 16).shape == (16, 16, 3)
print(backend)
"""


def run_without_display(script: str, **env: str) -> subprocess.CompletedProcess:
    """`python -c script` as on a headless machine: no display, MUJOCO_GL as given."""
    hidden = ("DISPLAY", "WAYLAND_DISPLAY", "MUJOCO_GL", "PYOPENGL_PLATFORM")
    clean = {k: v for k, v in os.environ.items() if k not in hidden}
    return subprocess.run(
        [sys.executable, "-c", script],
        env=clean | env,
        cwd=Path(__file__).parents[1],
        capture_output=True,
        text=True,
        check=True,
    )


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="headless setup is Linux-only")
def test_env_on_a_headless_machine_prints_no_glfw_or_absl_lines():
    out = run_without_display(STEP_AND_RENDER)
    for noise in ("GLFW", "DISPLAY", "absl", "deprecated"):
        assert noise not in out.stderr, out.stderr
    assert out.stdout.split()[-1] == headless_backend()


def test_a_given_mujoco_gl_is_kept():
    out = run_without_display(STEP_AND_RENDER, MUJOCO_GL="off")
    assert out.stdout.split()[-1] == "off"


def test_gl_backend_left_alone_with_a_display(monkeypatch):
    monkeypatch.delenv("MUJOCO_GL", raising=False)
    monkeypatch.setenv("DISPLAY", ":0")
    assert choose_gl_backend() is None and "MUJOCO_GL" not in os.environ


def test_only_mujoco_deprecation_notices_are_dropped(caplog):
    from absl import logging as absl_logging

    with caplog.at_level(logging.WARNING, logger="absl"):
        with mujoco_deprecations_silenced():
            absl_logging.warning("compiler attribute 'settotalmass' is deprecated and will go")
            absl_logging.warning("Physics state is invalid. Warning(s) raised: mjWARN_BADQACC")
        absl_logging.warning("compiler attribute 'settotalmass' is deprecated and will go")
    assert [r.getMessage() for r in caplog.records] == [
        "Physics state is invalid. Warning(s) raised: mjWARN_BADQACC",
        "compiler attribute 'settotalmass' is deprecated and will go",
    ]
    assert not logging.getLogger("absl").filters
