"""`--compile`: the whole update compiled (trainer.training.train.compile_update), proven on CPU.

The numerical contract: a compiled update draws the same random numbers as the eager one
(inductor's fallback_random) and differs from it only by float32 rounding, because inductor
fuses and reorders the reductions (sums of the losses, of Adam's moments, of clip_grad_norm's
norm). Over 50 updates of a 1M model at batch 32 (with a teacher, d_coef 0.4) it measured
1.0e-5 at most in any parameter, 1.3e-3 relative in the policy entropy (a sum of logs, the
most sensitive metric) and 7e-5 or less in the others; the test allows 1e-4 and 5e-3
(absolute 1e-6 for values near zero, as the policy loss). Eager stays bit-exact with the
official reference
(tests/test_agent.py); a compiled run resumes exactly from its own checkpoints.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from conftest import store  # noqa: F401 (the module's store fixture)

from trainer.model.presets import ModelConfig
from trainer.model.world import WorldModel
from trainer.training.agent import TDMPC2Agent, prepare_teacher
from trainer.training.config import TrainConfig
from trainer.training.runlog import read_evals
from trainer.training.runstate import read_training_checkpoint
from trainer.training.train import compile_update, train


def _batches(cfg: ModelConfig, n: int, batch: int):
    g = torch.Generator().manual_seed(1)
    for _ in range(n):
        yield (
            torch.randn(cfg.horizon + 1, batch, cfg.obs_dim, generator=g),
            torch.rand(cfg.horizon, batch, cfg.action_dim, generator=g) * 2 - 1,
            torch.randn(cfg.horizon, batch, 1, generator=g),
            torch.randint(0, 30, (batch,), generator=g),
        )


def test_the_compiled_update_equals_the_eager_one_within_float32_rounding():
    torch._dynamo.reset()
    cfg = ModelConfig.for_size(1)
    torch.manual_seed(0)
    eager, compiled = TDMPC2Agent(cfg), TDMPC2Agent(cfg)
    compiled.model.load_state_dict(eager.model.state_dict())
    teacher = WorldModel(cfg)
    torch.nn.init.normal_(teacher._reward[-1].weight, std=0.1)  # a teacher that says something
    teacher = prepare_teacher(teacher)
    update = compile_update(compiled.update, torch.device("cpu"))
    for obs, action, reward, task in _batches(cfg, 50, 32):
        rng = torch.get_rng_state()
        a = eager.update(obs, action, reward, task, teacher, 0.4, "first")
        torch.set_rng_state(rng)  # the same draws for both
        c = update(obs, action, reward, task, teacher, 0.4, "first")
        for name in a:
            torch.testing.assert_close(c[name], a[name], rtol=5e-3, atol=1e-6, msg=name)
    for (name, p), q in zip(
        eager.model.named_parameters(), compiled.model.parameters(), strict=True
    ):
        torch.testing.assert_close(q, p, rtol=0, atol=1e-4, msg=name)


def test_a_compiled_run_neither_recompiles_nor_breaks_its_resume(store, tmp_path, monkeypatch):  # noqa: F811
    """A 30-step compiled run that logs every step, evaluates (compiled policy) and saves every
    10 steps: after the first step nothing recompiles and no new graph break appears (the
    update's breaks are PyTorch's own, at each backward() and optimizer.step(): counted at
    the first log step); and a run stopped at step 10 and resumed ends where the
    uninterrupted one does, exactly."""
    from torch._dynamo.utils import counters

    import trainer.training.train as train_module

    settled = {"n": 0, "breaks": None}
    real = train_module.metric_floats

    def after_warm_up(info):  # called at log steps; the first is step 1
        settled["n"] += 1
        if settled["breaks"] is None:
            settled["breaks"] = dict(counters["graph_break"])
        torch._dynamo.config.error_on_recompile = True
        return real(info)

    monkeypatch.setattr(train_module, "metric_floats", after_warm_up)

    def run(out, steps, resume=False):
        torch._dynamo.config.error_on_recompile = False
        torch._dynamo.reset()  # a new process compiles anew (and no earlier test's graphs count
        # against dynamo's limit of 8 variants per function: past it Adam would run eager)
        counters.clear()
        settled["breaks"] = None
        cfg = TrainConfig(shards=store, out=out, steps=steps, batch_size=8, device="cpu",
                          compile=True, log_every=1, save_every=10, cache_gb=0.05,
                          eval_every=10, eval_tasks="cartpole-balance", eval_episodes=1,
                          eval_mpc=False, progress=False, resume=resume)  # fmt: skip
        train(cfg)
        assert dict(counters["graph_break"]) == settled["breaks"], "a graph break after warm-up"
        return read_training_checkpoint(out / "checkpoint.pt")["agent"]["model"]

    pytest.importorskip("dm_control", reason="evaluation needs the envs extra")
    # dynamo's own patch, which restores the setting after (monkeypatch.setattr's undo would
    # hide the entry from dynamo's later reads in this process)
    with torch._dynamo.config.patch(error_on_recompile=False):
        whole = run(tmp_path / "whole", 30)
        assert settled["n"] >= 30
        assert len(read_evals(tmp_path / "whole")) >= 3
        run(tmp_path / "cut", 10)
        resumed = run(tmp_path / "cut", 30, resume=True)
    for name, value in whole.items():
        same = (
            torch.equal(resumed[name], value) if torch.is_tensor(value) else resumed[name] == value
        )
        assert same, name


def test_compiled_planning_equals_eager_planning_within_float32_rounding():
    """The MPPI step and the policy step through torch.compile (`trainer eval --compile`,
    evaluation during a --compile run): the same noise draws, the same actions up to
    float32 rounding, over a few warm-started steps of 3 environments."""
    from trainer.evaluation.plan import Actor, MPPIConfig

    cfg = ModelConfig.for_size(1)
    torch.manual_seed(0)
    model = WorldModel(cfg).eval()
    small = MPPIConfig(num_samples=64, num_pi_trajs=8, num_elites=16, iterations=2)
    eager = Actor(model, 3, cfg=small)
    compiled = Actor(model, 3, cfg=small, compile=True)
    task = torch.tensor([0, 7, 29])
    g = torch.Generator().manual_seed(2)
    for _ in range(3):
        obs = torch.randn(3, cfg.obs_dim, generator=g)
        rng = torch.get_rng_state()
        a = eager(obs, task)
        torch.set_rng_state(rng)
        c = compiled(obs, task)
        torch.testing.assert_close(c, a, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(compiled.prev_mean, eager.prev_mean, rtol=1e-4, atol=1e-5)
    policy = Actor(model, 3, mpc=False, compile=True)
    obs = torch.randn(3, cfg.obs_dim, generator=g)
    torch.testing.assert_close(policy(obs, task), Actor(model, 3, mpc=False)(obs, task))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_an_update_on_cuda_never_waits_for_the_gpu(compiled):
    """With CUDA's sync debug mode at "error", any device-to-host copy or synchronising call
    inside an update raises: after the first (warm-up, compilation) update, five updates with
    a bf16 teacher (d_coef 0.4) run without one."""
    torch._dynamo.reset()
    device = torch.device("cuda")
    cfg = ModelConfig.for_size(1)
    torch.manual_seed(0)
    agent = TDMPC2Agent(cfg, device)
    teacher = prepare_teacher(WorldModel(cfg), torch.bfloat16, device)
    update = compile_update(agent.update, device) if compiled else agent.update
    batches = [tuple(t.to(device) for t in b) for b in _batches(cfg, 6, 256)]
    update(*batches[0], teacher, 0.4, "first")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for batch in batches[1:]:
            info = update(*batch, teacher, 0.4, "first")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(info["total_loss"])
