"""trainer.evaluation.plan: batched MPPI (docs/tdmpc2.md#mppi) and policy-only action selection."""

from __future__ import annotations

import pytest
import torch

from trainer.evaluation.plan import OFFICIAL_MPPI, Actor, MPPIConfig, plan, policy_action
from trainer.model.presets import ModelConfig
from trainer.model.world import WorldModel

SMALL = MPPIConfig(num_samples=64, num_pi_trajs=8, num_elites=16, iterations=2)
TASKS = torch.tensor([0, 6, 13, 26])  # 6, 1, 2 and 3 active action dims


def make_model(seed: int = 0) -> WorldModel:
    """A random 1M model whose reward and Q heads are not the all-zero init."""
    torch.manual_seed(seed)
    model = WorldModel(ModelConfig.for_size(1))
    with torch.no_grad():
        model._reward[-1].weight.normal_(0, 0.2)
        model._Qs.params.get_submodule("2").weight.normal_(0, 0.2)
    return model.eval()


@pytest.fixture(scope="module")
def model() -> WorldModel:
    return make_model()


def obs_for(tasks: torch.Tensor) -> torch.Tensor:
    return torch.randn(len(tasks), 24, generator=torch.Generator().manual_seed(1))


def check_actions(model: WorldModel, action: torch.Tensor, tasks: torch.Tensor) -> None:
    assert action.shape == (len(tasks), 6) and action.dtype == torch.float32
    assert action.abs().max() <= 1
    padded = model._action_masks[tasks] == 0
    assert (action[padded] == 0).all()  # exactly zero, not just small
    assert (action[~padded] != 0).any()


@pytest.mark.parametrize("eval_mode", [True, False])
def test_plan_range_padding_and_warm_start_shape(model, eval_mode):
    torch.manual_seed(0)
    action, mean = plan(model, obs_for(TASKS), TASKS, cfg=SMALL, eval_mode=eval_mode)
    check_actions(model, action, TASKS)
    assert mean.shape == (len(TASKS), 3, 6)
    assert (mean[model._action_masks[TASKS][:, None].expand_as(mean) == 0] == 0).all()


def test_official_parameters_run_batched(model):
    assert (OFFICIAL_MPPI.horizon, OFFICIAL_MPPI.iterations, OFFICIAL_MPPI.num_samples) == (
        3,
        6,
        512,
    )
    assert (OFFICIAL_MPPI.num_pi_trajs, OFFICIAL_MPPI.num_elites) == (24, 64)
    assert (OFFICIAL_MPPI.temperature, OFFICIAL_MPPI.min_std, OFFICIAL_MPPI.max_std) == (
        0.5,
        0.05,
        2,
    )
    tasks = TASKS[:2]
    torch.manual_seed(0)
    action, _ = plan(model, obs_for(tasks), tasks)
    check_actions(model, action, tasks)


def test_deterministic_under_a_seed(model):
    def run(seed):
        torch.manual_seed(seed)
        actor = Actor(model, len(TASKS), cfg=SMALL, eval_mode=False)
        return torch.stack([actor(obs_for(TASKS), TASKS) for _ in range(3)])

    assert torch.equal(run(3), run(3))
    assert not torch.equal(run(3), run(4))


def test_actor_warm_start_and_reset(model):
    actor = Actor(model, len(TASKS), cfg=SMALL)
    assert not actor.prev_mean.any()
    actor(obs_for(TASKS), TASKS)
    assert actor.prev_mean.any()
    actor.reset(torch.tensor([1]))
    assert not actor.prev_mean[1].any() and actor.prev_mean[0].any()
    # a subset of the environments plans with its own warm start
    actor(obs_for(TASKS[2:]), TASKS[2:], envs=torch.tensor([2, 3]))
    actor.reset()
    assert not actor.prev_mean.any()


def test_nan_values_become_zero(model):
    broken = make_model()
    with torch.no_grad():
        broken._reward[-1].bias.fill_(float("nan"))
    torch.manual_seed(0)
    action, mean = plan(broken, obs_for(TASKS), TASKS, cfg=SMALL)
    assert torch.isfinite(action).all() and torch.isfinite(mean).all()
    check_actions(broken, action, TASKS)


def test_policy_only_is_the_masked_policy_mean(model):
    obs = obs_for(TASKS)
    action = policy_action(model, obs, TASKS)
    check_actions(model, action, TASKS)
    with torch.no_grad():
        mu = model._pi(model.task_emb(model.encode(obs, TASKS), TASKS))[:, :6]
    torch.testing.assert_close(action, torch.tanh(mu) * model._action_masks[TASKS])
    assert torch.equal(Actor(model, 4, mpc=False)(obs, TASKS), action)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_model_plans(dtype):
    model = make_model().to(dtype)
    torch.manual_seed(0)
    action, _ = plan(model, obs_for(TASKS), TASKS, cfg=SMALL)
    check_actions(model, action, TASKS)


def test_discounts_are_built_once_per_device(monkeypatch):
    """Each planning step indexes one device tensor of discounts instead of copying a new
    one from the host."""
    model = make_model()
    made = []
    real = torch.tensor
    monkeypatch.setattr(torch, "tensor", lambda *a, **k: made.append(a) or real(*a, **k))
    actor = Actor(model, len(TASKS), cfg=SMALL)
    for _ in range(3):
        actor(obs_for(TASKS), TASKS)
    assert sum(1 for a in made if a and a[0] == model.cfg.discounts) == 1
