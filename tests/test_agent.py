"""Tests for trainer.training.agent: optimisers, the update and distillation.

The facts tested: docs/tdmpc2.md#optimisers, #update, #exactness; docs/distillation.md#loss.
"""

import copy
import math

import pytest
import torch

from trainer.model.math import two_hot_inv
from trainer.model.presets import ModelConfig
from trainer.model.world import WorldModel
from trainer.training.agent import (
    TDMPC2Agent,
    metric_floats,
    prepare_teacher,
    reward_distillation_loss,
)

H = 3
LOGGED = (
    "consistency_loss",
    "reward_loss",
    "value_loss",
    "termination_loss",
    "total_loss",
    "grad_norm",
    "pi_loss",
    "pi_grad_norm",
    "pi_entropy",
    "pi_scaled_entropy",
    "pi_scale",
)


def make_agent(seed: int = 0) -> TDMPC2Agent:
    torch.manual_seed(seed)
    return TDMPC2Agent(ModelConfig.for_size(1), device="cpu")


def make_batch(B: int = 16, seed: int = 0, generator: torch.Generator | None = None):
    """A learnable synthetic batch: reward = 1 + tanh(obs_0 + action_0), in [0, 2]."""
    g = generator or torch.Generator().manual_seed(seed)
    obs = torch.randn(H + 1, B, 24, generator=g)
    action = torch.rand(H, B, 6, generator=g) * 2 - 1
    reward = 1 + torch.tanh(obs[:-1, :, :1] + action[..., :1])
    task = torch.randint(0, 30, (B,), generator=g)
    return obs, action, reward, task


def make_teacher(seed: int = 1) -> WorldModel:
    torch.manual_seed(seed)
    teacher = WorldModel(ModelConfig.for_size(1))
    with torch.no_grad():
        teacher._reward[-1].weight.normal_(0, 0.5)
    return prepare_teacher(teacher)


def state_equal(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    for key in a:
        x, y = a[key], b[key]
        if isinstance(x, dict):
            if not state_equal(x, y):
                return False
        elif isinstance(x, list):
            if not all(state_equal({"v": u}, {"v": v}) for u, v in zip(x, y, strict=True)):
                return False
        elif isinstance(x, torch.Tensor):
            if not torch.equal(x, y):
                return False
        elif x != y:
            return False
    return True


def test_optimisers_follow_spec():
    agent = make_agent()
    m = agent.model
    groups = agent.optim.param_groups
    assert len(groups) == 6
    owners = [m._encoder, m._dynamics, m._reward, None, m._Qs, m._task_emb]
    for group, owner in zip(groups, owners, strict=True):
        expected = [] if owner is None else list(owner.parameters())
        assert [id(p) for p in group["params"]] == [id(p) for p in expected]
    assert groups[0]["lr"] == 3e-4 * 0.3 == 8.999999999999999e-05
    assert all(g["lr"] == 3e-4 and g["eps"] == 1e-8 for g in groups[1:])
    assert not any(g["capturable"] for g in groups)
    (pi_group,) = agent.pi_optim.param_groups
    assert pi_group["eps"] == 1e-5 and pi_group["lr"] == 3e-4
    assert [id(p) for p in pi_group["params"]] == [id(p) for p in m._pi.parameters()]


def test_discounts_are_099_float32_per_task():
    agent = make_agent()
    assert agent.discount.dtype == torch.float32 and agent.discount.shape == (30,)
    assert torch.all(agent.discount == torch.tensor(0.99))


def test_update_logs_the_official_names_and_initial_losses_are_ln101():
    agent = make_agent()
    tensors = agent.update(*make_batch())
    assert set(tensors) == set(LOGGED)  # detached 0-dim tensors, read when logged
    assert all(t.shape == () and not t.requires_grad for t in tensors.values())
    info = metric_floats(tensors)
    assert all(isinstance(v, float) and math.isfinite(v) for v in info.values())
    expected = math.log(101) * (1 + 0.5 + 0.25) / 3
    assert expected == pytest.approx(2.692154, abs=1e-6)
    assert info["reward_loss"] == pytest.approx(expected, abs=1e-5)
    assert info["value_loss"] == pytest.approx(expected, abs=1e-5)
    assert info["termination_loss"] == 0.0
    assert not agent.model.training  # back in eval mode after the update


def test_policy_step_leaves_q_alone_and_keeps_the_embedding_gradient():
    agent = make_agent()
    agent.update(*make_batch(seed=1))  # make the Q heads non-zero
    obs, _, _, task = make_batch(seed=2)
    zs = torch.stack([agent.model.encode(o, task) for o in obs]).detach()
    q_before = {k: v.clone() for k, v in agent.model._Qs.params.tensors().items()}
    emb_before = agent.model._task_emb.weight.detach().clone()
    agent.model.train()
    agent.update_pi(zs, task)
    for name, t in agent.model._Qs.params.tensors().items():
        assert torch.equal(t, q_before[name]) and t.grad is None
    # docs/tdmpc2.md#exactness: pi_optim does not own the embedding, so its gradient stays
    # for the next step.
    assert torch.equal(agent.model._task_emb.weight, emb_before)
    assert agent.model._task_emb.weight.grad is not None
    assert agent.model._task_emb.weight.grad.abs().sum() > 0


def test_target_q_is_polyak_averaged():
    agent = make_agent()
    before = {k: v.clone() for k, v in agent.model._target_Qs_params.tensors().items()}
    agent.update(*make_batch())
    online = agent.model._Qs.params.tensors()
    for name, t in agent.model._target_Qs_params.tensors().items():
        assert torch.allclose(t, before[name].lerp(online[name].detach(), 0.01), atol=1e-7)


def test_distillation_with_zero_coefficient_equals_plain_training():
    batches = [make_batch(seed=s) for s in range(3)]
    plain, distilled = make_agent(), make_agent()
    teacher = make_teacher()
    torch.manual_seed(5)
    plain_infos = [plain.update(*b) for b in batches]
    torch.manual_seed(5)
    distill_infos = [distilled.update(*b, teacher=teacher, d_coef=0.0) for b in batches]
    assert state_equal(plain.state_dict(), distilled.state_dict())
    for p, d in zip(plain_infos, distill_infos, strict=True):
        p, d = metric_floats(p), metric_floats(d)
        assert {k: d[k] for k in p} == p
        assert d["distill_loss"] > 0 and d["reward_mae_teacher"] > 0


def test_distillation_trains_the_student_and_never_the_teacher():
    teacher = make_teacher()
    teacher_state = copy.deepcopy(teacher.state_dict())
    plain, distilled = make_agent(), make_agent()
    batch = make_batch()
    torch.manual_seed(5)
    plain.update(*batch)
    torch.manual_seed(5)
    info = distilled.update(*batch, teacher=teacher, d_coef=0.45, distill="all")
    assert info["distill_loss"] > 0
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert state_equal(teacher.state_dict(), teacher_state)
    # At init only the reward head's last layer can feel the distillation gradient.
    assert not torch.equal(plain.model._reward[-1].weight, distilled.model._reward[-1].weight)


def test_distillation_loss_is_zero_against_itself_and_handles_low_precision_teachers():
    student = make_teacher(seed=3).train().requires_grad_(True)
    obs, action, _, task = make_batch(B=8)
    with pytest.raises(ValueError, match="prepare_teacher"):
        reward_distillation_loss(student, student, obs, action, task, "first")
    twin = prepare_teacher(copy.deepcopy(student))
    loss, agreement = reward_distillation_loss(student, twin, obs, action, task, "first")
    assert loss.item() == 0.0 and agreement.item() == 0.0
    loss.backward()
    assert student._reward[-1].weight.grad is not None and twin._reward[-1].weight.grad is None
    teacher = prepare_teacher(copy.deepcopy(student), dtype=torch.bfloat16)
    for steps in ("first", "all"):
        loss, agreement = reward_distillation_loss(student, teacher, obs, action, task, steps)
        with torch.no_grad():
            steps_obs = obs[0] if steps == "first" else obs[:-1]
            steps_action = action[0] if steps == "first" else action
            r = two_hot_inv(student.reward(student.encode(steps_obs, task), steps_action, task))
        assert loss.dtype == torch.float32
        assert 0 < agreement.item() < 0.05 * r.abs().mean().item()  # bfloat16 rounding only
    with pytest.raises(ValueError, match="'first' or 'all'"):
        reward_distillation_loss(student, teacher, obs, action, task, "last")


def test_only_the_distilled_parts_of_a_teacher_go_to_its_device_and_dtype():
    """A 317M teacher is 1.88 GiB in float32 with its Q ensemble; distillation runs only the
    task embedding, encoder and reward head (0.30 GiB): only those are cast and moved."""
    from trainer.training.agent import DISTILLED_PARTS

    teacher = prepare_teacher(make_teacher(), dtype=torch.bfloat16, device="meta")
    for name, module in teacher.named_children():
        for p in module.parameters():
            moved = name in DISTILLED_PARTS
            assert (p.device.type, p.dtype) == (
                ("meta", torch.bfloat16) if moved else ("cpu", torch.float32)
            ), name
    with torch.device("meta"):
        big = WorldModel(ModelConfig.for_size(317))
    size = lambda ms: sum(t.numel() * 4 for m in ms for t in [*m.parameters(), *m.buffers()])  # noqa: E731
    moved = size([getattr(big, n) for n in DISTILLED_PARTS])
    assert moved / 2**30 == pytest.approx(0.30, abs=0.01)
    assert size([big]) / 2**30 == pytest.approx(1.88, abs=0.01)  # with the target Qs


def test_first_step_distillation_only_sees_t0():
    student, teacher = make_teacher(seed=3), make_teacher(seed=4)
    obs, action, _, task = make_batch(B=8)
    loss, _ = reward_distillation_loss(student, teacher, obs, action, task, "first")
    obs2, action2 = obs.clone(), action.clone()
    obs2[1:] += 1.0
    action2[1:] *= -1
    loss2, _ = reward_distillation_loss(student, teacher, obs2, action2, task, "first")
    assert torch.equal(loss, loss2)


def test_agent_state_dict_resumes_exactly():
    g = torch.Generator().manual_seed(0)
    batches = [make_batch(generator=g) for _ in range(4)]
    agent = make_agent()
    torch.manual_seed(7)
    for b in batches[:2]:
        agent.update(*b)
    saved = copy.deepcopy(agent.state_dict())
    rng = torch.get_rng_state()
    for b in batches[2:]:
        agent.update(*b)

    resumed = make_agent(seed=123)
    resumed.load_state_dict(saved)
    torch.set_rng_state(rng)
    for b in batches[2:]:
        resumed.update(*b)
    assert state_equal(agent.state_dict(), resumed.state_dict())


def test_a_checkpoint_written_on_cuda_resumes_on_cpu():
    """A CUDA run's Adam is capturable and the flag is saved; loaded on CPU it must not stay
    capturable (the first step would stop: state steps are not on a supported device)."""
    g = torch.Generator().manual_seed(0)
    batches = [make_batch(generator=g) for _ in range(3)]
    agent = make_agent()
    torch.manual_seed(7)
    agent.update(*batches[0])
    saved = copy.deepcopy(agent.state_dict())
    rng = torch.get_rng_state()
    agent.update(*batches[1])
    for key in ("optim", "pi_optim"):  # as written on CUDA
        for group in saved[key]["param_groups"]:
            group["capturable"] = True
    resumed = make_agent(seed=123)
    resumed.load_state_dict(saved)
    assert all(not g["capturable"] for g in resumed.optim.param_groups)
    torch.set_rng_state(rng)
    resumed.update(*batches[1])
    assert state_equal(agent.state_dict(), resumed.state_dict())


def test_bad_batch_shapes_are_refused():
    agent = make_agent()
    obs, action, reward, task = make_batch()
    with pytest.raises(ValueError, match=r"wrong shapes.*obs"):
        agent.update(obs[:-1], action, reward, task)
    agent.update(obs, action, reward.squeeze(-1), task)  # [H, B] rewards are accepted


def test_a_few_hundred_updates_learn_the_reward():
    agent = make_agent()
    g = torch.Generator().manual_seed(0)
    losses = [float(agent.update(*make_batch(generator=g))["reward_loss"]) for _ in range(150)]
    assert losses[0] == pytest.approx(2.692154, abs=1e-5)
    assert sum(losses[-20:]) / 20 < 0.5 * losses[0]


def test_amp_autocasts_the_forward_losses_only(monkeypatch):
    """--amp: bf16 autocast around the forward losses; the backward, clipping and Adam run
    outside it, the teacher runs in its own dtype outside it, and the bins of two_hot_inv are
    float32 whatever the logits' dtype. Checked with CPU autocast (the same code path)."""
    cfg = ModelConfig.for_size(1)
    torch.manual_seed(0)
    agent = TDMPC2Agent(cfg)
    agent.amp = torch.bfloat16
    teacher = WorldModel(cfg)
    torch.nn.init.normal_(teacher._reward[-1].weight, std=0.1)
    teacher = prepare_teacher(teacher)
    seen = {}

    def watch(name, fn):
        def wrapped(*args, **kw):
            seen.setdefault(name, set()).add(torch.is_autocast_enabled("cpu"))
            return fn(*args, **kw)

        return wrapped

    monkeypatch.setattr(teacher, "reward", watch("teacher", teacher.reward))
    monkeypatch.setattr(agent.model, "reward", watch("student", agent.model.reward))
    for optim in (agent.optim, agent.pi_optim):
        monkeypatch.setattr(optim, "step", watch("adam", optim.step))
    monkeypatch.setattr(torch.Tensor, "backward", watch("backward", torch.Tensor.backward))
    H, B = cfg.horizon, 8
    info = agent.update(torch.randn(H + 1, B, cfg.obs_dim), torch.rand(H, B, cfg.action_dim),
                        torch.randn(H, B, 1), torch.randint(0, 30, (B,)), teacher, 0.4)  # fmt: skip
    assert seen == {"student": {True}, "teacher": {False}, "adam": {False}, "backward": {False}}
    assert all(torch.isfinite(v) for v in info.values())
    assert all(p.dtype == torch.float32 for p in agent.model.parameters())
    logits = torch.randn(5, cfg.num_bins).to(torch.bfloat16)
    got = two_hot_inv(logits, cfg.vmin, cfg.vmax)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, two_hot_inv(logits.float(), cfg.vmin, cfg.vmax), rtol=0, atol=0)
