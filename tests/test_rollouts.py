"""tools.rollouts: real dm_control rollouts in exactly the official MT30 chunk format."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("dm_control")

from tensordict import TensorDict

from datapipe.build import BuildConfig, build
from datapipe.store import open_store
from datapipe.tasksets import MT30
from tools.rollouts import make_mt30_dmc, rollout_task
from trainer.evaluation.envs import make_env
from trainer.model.checkpoint import save_official
from trainer.model.presets import ModelConfig
from trainer.model.world import WorldModel

TASKS = "walker-walk,reacher-easy,cartpole-swingup"  # 6, 2 and 1 action dims; obs 24, 6, 5


def load(path) -> TensorDict:
    return torch.load(path, weights_only=False)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    dst = tmp_path_factory.mktemp("dmc")
    make_mt30_dmc(
        dst, episodes_per_task=2, chunks=2, seed=3, policy="noise", workers=0, tasks=TASKS
    )
    return dst


def test_official_chunk_layout(source):
    tds = [load(source / f"chunk_{k}.pt") for k in range(2)]
    assert all(isinstance(td, TensorDict) for td in tds)
    assert [td.batch_size for td in tds] == [torch.Size([3, 501])] * 2
    td = torch.cat(tds)
    assert {k: td[k].dtype for k in td.keys()} == {  # noqa: SIM118
        "obs": torch.float32, "action": torch.float32,
        "reward": torch.float32, "task": torch.int32,
    }  # fmt: skip
    obs, action = td["obs"].numpy(), td["action"].numpy()
    reward, task = td["reward"].numpy(), td["task"].numpy()
    assert obs.shape == (6, 501, 24) and action.shape == (6, 501, 6)
    np.testing.assert_array_equal(task[:, 0], [1, 1, 4, 4, 10, 10])  # runs, in index order
    assert (task == task[:, :1]).all()
    assert np.isnan(action[:, 0]).all() and np.isnan(reward[:, 0]).all()
    assert np.isfinite(action[:, 1:]).all() and np.isfinite(obs).all()
    assert (np.abs(action[:, 1:]) <= 1).all()
    assert reward[:, 1:].min() >= 0 and reward[:, 1:].max() <= 2
    for e in range(6):
        t = task[e, 0]
        assert not obs[e, :, MT30.obs_dims[t] :].any()
        assert not action[e, 1:, MT30.action_dims[t] :].any()
        assert action[e, 1:, : MT30.action_dims[t]].std() > 0.05


def test_rows_hold_the_action_that_led_to_the_obs(source):
    """Replaying row k's action from obs_{k-1} gives obs_k and reward_k (row semantics)."""
    td = load(source / "chunk_0.pt")
    from tools.rollouts import _task_seed

    env = make_env("walker-walk", _task_seed(3, 1))
    np.testing.assert_array_equal(env.reset(), td["obs"][0, 0].numpy())
    for k in range(1, 30):
        obs, reward, _, _ = env.step(td["action"][0, k].numpy())
        np.testing.assert_array_equal(obs, td["obs"][0, k].numpy())
        assert reward == pytest.approx(float(td["reward"][0, k]), rel=1e-6)


def test_episodes_do_not_depend_on_chunking(source, tmp_path):
    make_mt30_dmc(
        tmp_path, episodes_per_task=2, chunks=1, seed=3, policy="noise", workers=0, tasks=TASKS
    )
    one = load(tmp_path / "chunk_0.pt")
    two = torch.cat([load(source / f"chunk_{k}.pt") for k in range(2)])
    for key in ("obs", "action", "reward", "task"):
        assert torch.equal(one[key].nan_to_num(-9), two[key].nan_to_num(-9)), key
    second = rollout_task("reacher-easy", 1, 2, seed=3, policy="noise")
    np.testing.assert_array_equal(second["obs"][0], one["obs"][3].numpy())


def test_datapipe_build_accepts_the_rollouts(source, tmp_path):
    store = build(BuildConfig(src=source, dst=tmp_path / "store", workers=0, progress=False))
    s = open_store(store)
    assert (s.n_episodes, s.episode_length, s.task_names[4]) == (6, 501, "reacher-easy")


def test_checkpoint_policy_in_worker_processes(tmp_path):
    torch.manual_seed(0)
    ckpt = tmp_path / "tiny.pt"
    save_official(WorldModel(ModelConfig.for_size(1)), ckpt)
    paths = make_mt30_dmc(
        tmp_path / "out", episodes_per_task=1, chunks=2, policy=str(ckpt), workers=2,
        tasks="pendulum-spin,acrobot-swingup",
    )  # fmt: skip
    td = torch.cat([load(p) for p in paths])
    np.testing.assert_array_equal(td["task"][:, 0].numpy(), [6, 29])
    assert (td["action"][:, 1:, 1:] == 0).all() and td["action"][:, 1:, 0].std() > 0.1


def test_bad_arguments():
    with pytest.raises(ValueError, match="random, noise or a checkpoint file"):
        make_mt30_dmc("/nonexistent", policy="greedy")
    with pytest.raises(ValueError, match="walker-walk-backwards"):
        make_mt30_dmc("/nonexistent", tasks="walker-fly")


def test_checkpoint_policy_noise_levels_cycle_over_episodes(tmp_path):
    """Episode k uses noise[k % n]: with stds (0, 1) episodes 0 and 2 act with the policy
    mean alone, episode 1 is far from it."""
    torch.manual_seed(0)
    ckpt = tmp_path / "tiny.pt"
    save_official(WorldModel(ModelConfig.for_size(1)), ckpt)
    from tools.rollouts import _set_policy

    _set_policy(str(ckpt))
    data = rollout_task("pendulum-spin", 0, 3, seed=0, policy=str(ckpt), noise=(0.0, 1.0))
    again = rollout_task("pendulum-spin", 2, 3, seed=0, policy=str(ckpt), noise=(0.0, 1.0))
    np.testing.assert_array_equal(data["action"][2], again["action"][0])  # a function of k
    mean = data["action"][0, 1:, 0]
    assert np.abs(mean).max() < 1 and data["action"][1, 1:, 0].std() > 2 * mean.std()
    _set_policy("random")
    with pytest.raises(ValueError, match="--noise needs one or more finite stds"):
        make_mt30_dmc(tmp_path / "x", policy=str(ckpt), noise=(-0.1,))
