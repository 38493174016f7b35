"""The TD-MPC2 agent: optimisers, the update (docs/tdmpc2.md#update) and reward distillation
(docs/distillation.md#loss).

The losses are pure functions of a model and tensors; `TDMPC2Agent` owns the mutable state
(world model, two Adam optimisers, running Q scale, discounts) and runs one update at a time.
Distillation is one extra loss term against a teacher passed in by the caller.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainer.model.checkpoint import detect_model_size, load_model_state, read_checkpoint
from trainer.model.math import RunningScale, soft_ce, two_hot_inv
from trainer.model.presets import ModelConfig
from trainer.model.world import WorldModel

DistillSteps = Literal["first", "all"]


@torch.no_grad()
def td_targets(
    model: WorldModel, next_z: Tensor, reward: Tensor, discount: Tensor, task: Tensor
) -> Tensor:
    """y_t = r_t + gamma_task * Q_min^target(z'_t, a'_t), a'_t ~ pi(z'_t).

    docs/tdmpc2.md#td-targets. mt30 is not episodic: the official (1 - terminated) factor is
    1 and is left out.
    """
    action, _ = model.pi(next_z, task)
    return reward + discount * model.Q(next_z, action, task, mode="min", target=True)


def model_losses(
    model: WorldModel,
    obs: Tensor,
    action: Tensor,
    reward: Tensor,
    targets: Tensor,
    next_z: Tensor,
    task: Tensor,
    rho: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Latent rollout and the world-model losses (docs/tdmpc2.md#model-loss).

    Returns (zs [H+1, B, L], consistency, reward, value), each loss already divided by H
    (value also by Nq).
    """
    horizon = action.shape[0]
    z = model.encode(obs[0], task)
    zs = torch.empty(horizon + 1, *z.shape, device=z.device, dtype=z.dtype)
    zs[0] = z
    consistency = 0
    for t, (a_t, next_z_t) in enumerate(zip(action.unbind(0), next_z.unbind(0), strict=True)):
        z = model.next(z, a_t, task)
        consistency = consistency + F.mse_loss(z, next_z_t) * rho**t
        zs[t + 1] = z

    rollout = zs[:-1]
    qs = model.Q(rollout, action, task, mode="all")
    reward_logits = model.reward(rollout, action, task)
    vmin, vmax = model.cfg.vmin, model.cfg.vmax
    reward_loss, value_loss = 0, 0
    steps = zip(
        reward_logits.unbind(0), reward.unbind(0), targets.unbind(0), qs.unbind(1), strict=True
    )
    for t, (r_logits_t, r_t, y_t, qs_t) in enumerate(steps):
        reward_loss = reward_loss + soft_ce(r_logits_t, r_t, vmin, vmax).mean() * rho**t
        for q_logits in qs_t.unbind(0):
            value_loss = value_loss + soft_ce(q_logits, y_t, vmin, vmax).mean() * rho**t
    return (
        zs,
        consistency / horizon,
        reward_loss / horizon,
        value_loss / (horizon * len(model._Qs)),
    )


def pi_loss(
    model: WorldModel,
    zs: Tensor,
    task: Tensor,
    scale: RunningScale,
    entropy_coef: float,
    rho: float,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Policy loss on detached latents; updates `scale` from Q at t = 0.

    docs/tdmpc2.md#policy-update. Q comes from the detached online ensemble: gradients reach
    the actions and the task embedding, never the Q weights.
    """
    action, info = model.pi(zs, task)
    q = model.Q(zs, action, task, mode="avg", detach=True)
    scale.update(q[0])
    q = scale(q)
    weights = torch.pow(rho, torch.arange(len(q), device=q.device))
    loss = (-(entropy_coef * info["scaled_entropy"] + q).mean(dim=(1, 2)) * weights).mean()
    return loss, info


def reward_distillation_loss(
    student: WorldModel,
    teacher: WorldModel,
    obs: Tensor,
    action: Tensor,
    task: Tensor,
    steps: DistillSteps = "first",
) -> tuple[Tensor, Tensor]:
    """MSE between student and teacher scalar rewards on real data (docs/distillation.md#loss).

    r = two_hot_inv(reward(encode(obs_t), action_t)) with the student's bins for both.
    `steps="first"`: t = 0 only (the paper's variant); `"all"`: t = 0..H-1, plain mean.
    The teacher runs under no_grad in its own dtype and device; its reward comes back as
    float32. Returns (loss with gradient into the student, mean |r_S - r_T| detached).
    """
    if steps == "first":
        obs_s, action_s = obs[0], action[0]
    elif steps == "all":
        obs_s, action_s = obs[:-1], action
    else:
        raise ValueError(f"distill steps must be 'first' or 'all', got {steps!r}")
    if teacher.training or any(p.requires_grad for p in teacher.parameters()):
        raise ValueError("the teacher must be frozen and in eval mode: pass prepare_teacher(model)")
    vmin, vmax = student.cfg.vmin, student.cfg.vmax
    ref = teacher._task_emb.weight  # where prepare_teacher put the distilled parts
    with torch.no_grad(), torch.autocast(ref.device.type, enabled=False):  # its own dtype
        t_obs, t_action = (x.to(device=ref.device, dtype=ref.dtype) for x in (obs_s, action_s))
        t_task = task.to(ref.device)
        logits = teacher.reward(teacher.encode(t_obs, t_task), t_action, t_task)
        # the bins in float32 whatever the teacher's dtype (bf16 bins round the reward)
        r_teacher = two_hot_inv(logits.float(), vmin, vmax).to(obs.device)
    logits = student.reward(student.encode(obs_s, task), action_s, task)
    r_student = two_hot_inv(logits, vmin, vmax)
    loss = F.mse_loss(r_student, r_teacher)
    return loss, (r_student.detach() - r_teacher).abs().mean()


def world_model_loss(
    model: WorldModel,
    obs: Tensor,
    action: Tensor,
    reward: Tensor,
    targets: Tensor,
    next_z: Tensor,
    task: Tensor,
    teacher: WorldModel | None = None,
    d_coef: float = 0.0,
    distill: DistillSteps = "first",
) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """The loss of the model step (docs/tdmpc2.md#model-loss), plus d_coef times the reward-
    distillation loss (docs/distillation.md#loss) with a teacher (with d_coef = 0 that loss
    is only computed for the log).

    Returns (total, zs [H+1, B, L], the logged losses as tensors).
    """
    cfg = model.cfg
    zs, consistency, reward_loss, value_loss = model_losses(
        model, obs, action, reward, targets, next_z, task, cfg.rho
    )
    total = (
        cfg.consistency_coef * consistency
        + cfg.reward_coef * reward_loss
        + cfg.value_coef * value_loss
    )
    logged = {"consistency_loss": consistency, "reward_loss": reward_loss, "value_loss": value_loss}
    if teacher is not None:
        if d_coef:
            distill_loss, agreement = reward_distillation_loss(
                model, teacher, obs, action, task, distill
            )
            total = total + d_coef * distill_loss
        else:
            with torch.no_grad():
                distill_loss, agreement = reward_distillation_loss(
                    model, teacher, obs, action, task, distill
                )
        logged |= {"distill_loss": distill_loss, "reward_mae_teacher": agreement}
    return total, zs, logged


class UpdateLosses(nn.Module):
    """The two losses of an update that are back-propagated, as the forward of one module.

    DistributedDataParallel averages a backward pass's gradients across ranks only when the
    loss came out of the forward of the module it wraps, and the world model is used through
    its methods (encode, next, Q, ...), never a forward. This module's forward is that entry:
    `losses("model", ...)` is `world_model_loss`, `losses("pi", ...)` is `pi_loss`. In one
    process it is called directly: the same operations in the same order.
    """

    def __init__(self, model: WorldModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, kind: str, *args: Any) -> Any:
        if kind == "model":
            return world_model_loss(self.model, *args)
        if kind == "pi":
            return pi_loss(self.model, *args)
        raise ValueError(f"kind must be 'model' or 'pi', got {kind!r}")


DISTILLED_PARTS = ("_task_emb", "_encoder", "_reward")  # what reward distillation runs


def prepare_teacher(
    model: WorldModel, dtype: torch.dtype | None = None, device: str | torch.device | None = None
) -> WorldModel:
    """Freeze a world model for use as a teacher: eval mode, no gradients; the parts that
    reward distillation runs (task embedding, encoder, reward head) cast to `dtype` and
    moved to `device`, each in turn, so that no full-size copy is made on the device; the
    dynamics, policy and Q ensemble stay where they are (most of a 317M model)."""
    model.eval().requires_grad_(False)
    for name in DISTILLED_PARTS:
        part = getattr(model, name)
        if dtype is not None:
            part.to(dtype)
        if device is not None:
            part.to(device)
    return model


def stack_metrics(info: dict[str, Tensor | float]) -> Tensor:
    """An update's metrics as one float32 vector on their device (a value given as a number
    joins them there), in `info`'s order; reading it is one transfer."""
    device = next((v.device for v in info.values() if isinstance(v, Tensor)), None)
    return torch.stack(
        [torch.as_tensor(v, dtype=torch.float32, device=device).reshape(()) for v in info.values()]
    )


def metric_floats(info: dict[str, Tensor | float]) -> dict[str, float]:
    """An update's metrics as Python floats, read from the device in one transfer (the
    update returns device tensors so that a step never waits for the device: the training
    loop reads them only when it logs)."""
    return dict(zip(info, stack_metrics(info).tolist(), strict=True))


class TDMPC2Agent:
    """World model + optimisers + running Q scale; `update` is one official training step."""

    def __init__(self, model_config: ModelConfig, device: str | torch.device = "cpu") -> None:
        cfg = self.cfg = model_config
        self.device = torch.device(device)
        self.model = WorldModel(cfg).to(self.device)
        capturable = self.device.type == "cuda"  # CPU Adam cannot be capturable (spec caveats)
        m = self.model
        self.optim = torch.optim.Adam(
            [
                {"params": m._encoder.parameters(), "lr": cfg.lr * cfg.enc_lr_scale},
                {"params": m._dynamics.parameters()},
                {"params": m._reward.parameters()},
                {"params": []},  # termination head: absent, mt30 is not episodic
                {"params": m._Qs.parameters()},
                {"params": m._task_emb.parameters()},
            ],
            lr=cfg.lr,
            capturable=capturable,
        )
        self.pi_optim = torch.optim.Adam(
            m._pi.parameters(), lr=cfg.lr, eps=1e-5, capturable=capturable
        )
        self.scale = RunningScale(cfg.tau).to(self.device)
        self.amp: torch.dtype | None = None  # autocast dtype of the forward losses (--amp)
        self.discount = torch.tensor(cfg.discounts, dtype=torch.float32, device=self.device)
        self.model.eval()
        # Both backward passes start from a call of this module (DDP wraps it, see
        # trainer.training.distributed); `self.model` stays the plain world model.
        self.losses: nn.Module = UpdateLosses(self.model)

    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike,
        device: str | torch.device = "cpu",
        allow_quantized: bool = False,
        **dims: Any,
    ) -> TDMPC2Agent:
        """An agent whose world model (online and target Q included) comes from an official
        file; the size is detected from the shapes, optimisers and scale start fresh."""
        state = read_checkpoint(path, allow_quantized=allow_quantized)
        agent = cls(ModelConfig.for_size(detect_model_size(state, **dims), **dims), device)
        load_model_state(agent.model, state)
        return agent

    def update(
        self,
        obs: Tensor,
        action: Tensor,
        reward: Tensor,
        task: Tensor,
        teacher: WorldModel | None = None,
        d_coef: float = 0.0,
        distill: DistillSteps = "first",
    ) -> dict[str, Tensor]:
        """One update (docs/tdmpc2.md#update) on obs [H+1, B, O], action [H, B, A], reward
        [H, B, 1] (or [H, B]) and task [B]. With a teacher and d_coef > 0 the reward-
        distillation loss (docs/distillation.md#loss) enters the same backward pass; with
        d_coef = 0 it is only logged. Returns the logged metrics as detached 0-dim device
        tensors: nothing here waits for the device (`metric_floats` reads them)."""
        cfg, model = self.cfg, self.model
        obs, action, reward, task = self._check_batch(obs, action, reward, task)

        with torch.no_grad(), self._autocast():
            next_z = model.encode(obs[1:], task)
            targets = td_targets(model, next_z, reward, self.discount[task].unsqueeze(-1), task)

        model.train()
        with self._autocast():  # the forward losses only: backward, clipping, Adam in float32
            total, zs, logged = self.losses(
                "model", obs, action, reward, targets, next_z, task, teacher, d_coef, distill
            )
        total.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip_norm)
        self.optim.step()
        self.optim.zero_grad(set_to_none=True)

        pi_info = self.update_pi(zs.detach(), task)
        model.soft_update_target_Q(cfg.tau)
        model.eval()
        info = {k: v.detach() for k, v in logged.items()}
        return {
            "consistency_loss": info.pop("consistency_loss"),
            "reward_loss": info.pop("reward_loss"),
            "value_loss": info.pop("value_loss"),
            "termination_loss": torch.zeros((), device=total.device),
            "total_loss": total.detach(),
            "grad_norm": grad_norm.detach(),
            **pi_info,
            **info,
        }

    def update_pi(self, zs: Tensor, task: Tensor) -> dict[str, Tensor]:
        """Policy step on detached latents [H+1, B, L] (docs/tdmpc2.md#policy-update).

        The task-embedding gradient it leaves behind is not cleared: as in the official
        code it is added to the next model step (docs/tdmpc2.md#exactness).
        """
        cfg = self.cfg
        with self._autocast():
            loss, info = self.losses("pi", zs, task, self.scale, cfg.entropy_coef, cfg.rho)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model._pi.parameters(), cfg.grad_clip_norm)
        self.pi_optim.step()
        self.pi_optim.zero_grad(set_to_none=True)
        return {
            "pi_loss": loss.detach(),
            "pi_grad_norm": grad_norm.detach(),
            "pi_entropy": info["entropy"].detach().mean(),
            "pi_scaled_entropy": info["scaled_entropy"].detach().mean(),
            "pi_scale": self.scale.value.detach().clone().reshape(()),  # updated in place later
        }

    def _autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast of a forward pass when `amp` is set (--amp), else nothing."""
        if self.amp is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp)

    def _check_batch(
        self, obs: Tensor, action: Tensor, reward: Tensor, task: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        cfg = self.cfg
        if reward.ndim == 2:
            reward = reward.unsqueeze(-1)
        horizon, batch = action.shape[:2]
        expected = {
            "obs": ((horizon + 1, batch, cfg.obs_dim), obs.shape),
            "action": ((cfg.horizon, batch, cfg.action_dim), action.shape),
            "reward": ((horizon, batch, 1), reward.shape),
            "task": ((batch,), task.shape),
        }
        wrong = [
            f"{k} {tuple(got)} (want {want})"
            for k, (want, got) in expected.items()
            if tuple(got) != want
        ]
        if wrong:
            raise ValueError(
                f"batch has wrong shapes: {', '.join(wrong)}; expected obs [H+1, B, obs_dim], "
                f"action [H, B, action_dim], reward [H, B, 1], task [B] with H={cfg.horizon}"
            )
        on = {"device": self.device}
        return (
            obs.to(**on, dtype=torch.float32),
            action.to(**on, dtype=torch.float32),
            reward.to(**on, dtype=torch.float32),
            task.to(**on, dtype=torch.long),
        )

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume training exactly: model, optimisers, running scale and
        the leftover task-embedding gradient (docs/tdmpc2.md#exactness)."""
        grad = self.model._task_emb.weight.grad
        return {
            "model": self.model.state_dict(),
            "optim": self.optim.state_dict(),
            "pi_optim": self.pi_optim.state_dict(),
            "scale": self.scale.state_dict(),
            "task_emb_grad": None if grad is None else grad.detach().clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned (strict)."""
        missing = {"model", "optim", "pi_optim", "scale", "task_emb_grad"} - set(state)
        if missing:
            raise KeyError(f"agent state lacks {sorted(missing)}; was it written by state_dict()?")
        self.model.load_state_dict(state["model"])
        for optim, key in ((self.optim, "optim"), (self.pi_optim, "pi_optim")):
            optim.load_state_dict(state[key])
            _fit_capturable(optim, self.device)
        self.scale.load_state_dict(state["scale"])
        grad = state["task_emb_grad"]
        weight = self.model._task_emb.weight
        weight.grad = None if grad is None else grad.to(weight.device, weight.dtype).clone()


def _fit_capturable(optim: torch.optim.Optimizer, device: torch.device) -> None:
    """Make a loaded Adam's `capturable` that of this device (loading restores the saved
    flag: a checkpoint written on CUDA, capturable, would stop a CPU run at its first step
    with "params and state_steps must be on supported devices", and the reverse would run
    a CUDA run's steps on the host); capturable Adam keeps its step counts on the device."""
    capturable = device.type == "cuda"
    for group in optim.param_groups:
        group["capturable"] = capturable
        for p in group["params"]:
            step = optim.state.get(p, {}).get("step")
            if step is not None:
                optim.state[p]["step"] = step.to(p.device if capturable else "cpu", torch.float32)
