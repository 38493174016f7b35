"""Action selection from a world model: batched MPPI planning (docs/tdmpc2.md#mppi) and policy-only.

This module owns the planner's parameters (`MPPIConfig`, the official values), the planning
computation and the per-environment warm-start state (`Actor`). Everything is batched over a
leading environment axis N, each environment with its own task id, so the episodes of all
tasks can be planned in lockstep as one computation (the fast path on a GPU; the official
loop plans one environment at a time).

Numerics: the networks run in the model's dtype (float32, or float16/bfloat16 for a
quantized model); the planner's own statistics (values, elite weights, mean and std) are
float32. Randomness comes from torch's global generator, which the model's `pi` and `Q`
also use: seed it (`torch.manual_seed`) for reproducible plans.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from trainer.model.math import two_hot_inv
from trainer.model.world import WorldModel


@dataclass(frozen=True)
class MPPIConfig:
    """MPPI parameters (docs/tdmpc2.md#mppi; the official mt30 values are the defaults)."""

    horizon: int = 3  # planning horizon H, in latent steps
    iterations: int = 6  # MPPI iterations per chosen action
    num_samples: int = 512  # trajectories per iteration, the policy ones included
    num_pi_trajs: int = 24  # of those, trajectories sampled from the policy prior
    num_elites: int = 64  # top trajectories that update the sampling distribution
    temperature: float = 0.5  # elite weight = exp(temperature * (value - max value))
    min_std: float = 0.05  # lower clamp of the sampling std
    max_std: float = 2.0  # upper clamp, and the initial std

    def __post_init__(self) -> None:
        if not 0 <= self.num_pi_trajs < self.num_samples:
            raise ValueError("num_pi_trajs must be in [0, num_samples)")
        if not 0 < self.num_elites <= self.num_samples:
            raise ValueError("num_elites must be in (0, num_samples]")


OFFICIAL_MPPI = MPPIConfig()  # the official mt30 planner


@torch.no_grad()
def policy_action(model: WorldModel, obs: Tensor, task: Tensor) -> Tensor:
    """Policy-only action selection: the policy mean tanh(mu) [N, A], float32, padded dims 0."""
    z = model.encode(obs.to(model.dtype), task)
    _, info = model.pi(z, task)
    return info["mean"].float()


@torch.no_grad()
def estimate_value(
    model: WorldModel, z: Tensor, actions: Tensor, task: Tensor, discount: Tensor
) -> Tensor:
    """Value of action sequences: sum_h gamma^h r_h + gamma^H Q_avg(z_H, pi(z_H)).

    z [B, L], actions [H, B, A] (model dtype), task [B], discount [B]; returns float32 [B].
    """
    ret = torch.zeros(z.shape[0], device=z.device)
    weight = torch.ones_like(ret)
    for a in actions.unbind(0):
        reward = two_hot_inv(model.reward(z, a, task), model.cfg.vmin, model.cfg.vmax)
        z = model.next(z, a, task)
        ret = ret + weight * reward.squeeze(-1).float()
        weight = weight * discount
    action, _ = model.pi(z, task)
    value = model.Q(z, action, task, mode="avg").squeeze(-1).float()
    return ret + weight * value


@torch.no_grad()
def _discounts(model: WorldModel, device: torch.device) -> Tensor:
    """Every task's discount on `device`, made once per model and device: building it each
    planning step was a small blocking host-to-device copy on CUDA."""
    cache = model.__dict__.setdefault("_plan_discounts", {})
    if device not in cache:
        cache[device] = torch.tensor(model.cfg.discounts, device=device)
    return cache[device]


def plan(
    model: WorldModel,
    obs: Tensor,
    task: Tensor,
    prev_mean: Tensor | None = None,
    cfg: MPPIConfig = OFFICIAL_MPPI,
    eval_mode: bool = True,
) -> tuple[Tensor, Tensor]:
    """One MPPI step for N environments at once (docs/tdmpc2.md#mppi, official `_plan`).

    obs [N, O], task [N] (long); prev_mean [N, H, A] is the previous step's final mean (the
    warm start), zeros or None at an episode's first step. Returns (action [N, A] in [-1, 1]
    with padded dims exactly 0, mean [N, H, A] to pass back next step). `eval_mode` takes
    the chosen elite's first action as is; otherwise std[0] * N(0, 1) is added, as the
    official standalone `evaluate.py` does.
    """
    n, device, dtype = obs.shape[0], obs.device, model.dtype
    H, S, P, K, A = (
        cfg.horizon,
        cfg.num_samples,
        cfg.num_pi_trajs,
        cfg.num_elites,
        model.cfg.action_dim,
    )
    mask = model._action_masks[task].float()  # [N, A]
    gamma = _discounts(model, device)[task]  # [N]
    z = model.encode(obs.to(dtype), task)  # [N, L]

    # Planner state is float32 and laid out [H, N, ...] like the official [H, ...] tensors
    # (with N = 1 the same random draws and the same reductions, hence the same numbers).
    actions = torch.empty(H, n, S, A, device=device)
    if P:  # the policy prior: P trajectories of sampled policy actions through the dynamics
        zp, tp = z.repeat_interleave(P, 0), task.repeat_interleave(P)
        for t in range(H):
            a, _ = model.pi(zp, tp)
            actions[t, :, :P] = a.float().view(n, P, A)
            if t < H - 1:
                zp = model.next(zp, a, tp)

    mean = torch.zeros(H, n, A, device=device)
    std = torch.full((H, n, A), cfg.max_std, device=device)
    if prev_mean is not None:
        mean[:-1] = prev_mean.transpose(0, 1)[1:]  # warm start: the previous plan, shifted
    zs, ts, gs = z.repeat_interleave(S, 0), task.repeat_interleave(S), gamma.repeat_interleave(S)
    env = torch.arange(n, device=device)[:, None]
    for _ in range(cfg.iterations):
        noise = torch.randn(H, n, S - P, A, device=device)
        actions[:, :, P:] = (mean[:, :, None] + std[:, :, None] * noise).clamp(-1, 1)
        actions = actions * mask[:, None]
        flat = actions.reshape(H, n * S, A).to(dtype)  # sample s of env i is row i * S + s
        value = estimate_value(model, zs, flat, ts, gs).view(n, S).nan_to_num(0)
        elite_value, elite_idx = torch.topk(value, K, dim=1)  # [N, K]
        elite_actions = actions[:, env, elite_idx]  # [H, N, K, A]
        score = torch.exp(cfg.temperature * (elite_value - elite_value.max(1, keepdim=True).values))
        score = score / score.sum(1, keepdim=True)  # [N, K]
        w, denom = score[None, :, :, None], score.sum(1)[None, :, None] + 1e-9
        mean = (w * elite_actions).sum(2) / denom
        std = ((w * (elite_actions - mean[:, :, None]) ** 2).sum(2) / denom).sqrt()
        std = std.clamp(cfg.min_std, cfg.max_std)
        mean, std = mean * mask, std * mask

    # Pick one elite by sampling the categorical `score` (Gumbel-max), take its first action.
    gumbel = -torch.empty_like(score).exponential_().log()
    choice = (score.log() + gumbel).softmax(1).argmax(1)  # [N]; softmax as the official code
    action = elite_actions[0, env.squeeze(1), choice]  # [N, A]
    if not eval_mode:
        action = action + std[0] * torch.randn(n, A, device=device)
    return action.clamp(-1, 1), mean.transpose(0, 1)


_COMPILED: dict[str, Any] = {}  # one compiled plan and policy step per process


def compiled(name: str) -> Any:
    """`plan` or `policy_action` through torch.compile, as the official code compiles its
    `_plan` (CUDA: mode "reduce-overhead"; the device is known at the first call, so CPU and
    CUDA share the default mode here), made once per process. Inductor draws random numbers
    with the eager ops (`fallback_random`): a compiled plan samples the same noise as an
    eager one and differs from it by float32 rounding only."""
    if name not in _COMPILED:
        import torch._inductor.config as inductor

        inductor.fallback_random = True
        _COMPILED[name] = torch.compile({"plan": plan, "policy_action": policy_action}[name])
    return _COMPILED[name]


class Actor:
    """Chooses actions for N environments: MPPI with its warm start, or the policy mean.

    `reset(envs)` marks the start of an episode in those environments (all by default), so
    their next plan starts from mean 0 (docs/tdmpc2.md#mppi). `compile`: both through
    torch.compile (`compiled`).
    """

    def __init__(
        self,
        model: WorldModel,
        n_envs: int,
        mpc: bool = True,
        cfg: MPPIConfig = OFFICIAL_MPPI,
        eval_mode: bool = True,
        compile: bool = False,
    ) -> None:
        self.model, self.mpc, self.cfg, self.eval_mode = model.eval(), mpc, cfg, eval_mode
        self._plan = compiled("plan") if compile else plan
        self._policy = compiled("policy_action") if compile else policy_action
        device = model.device
        self.prev_mean = torch.zeros(n_envs, cfg.horizon, model.cfg.action_dim, device=device)

    def reset(self, envs: Tensor | None = None) -> None:
        """Forget the warm start of `envs` (indices or bool mask; None = all)."""
        if envs is None:
            self.prev_mean.zero_()
        else:
            self.prev_mean[envs] = 0

    @torch.no_grad()
    def __call__(self, obs: Tensor, task: Tensor, envs: Tensor | None = None) -> Tensor:
        """Actions [n, A] (float32, in [-1, 1]) for obs [n, O] of the environments `envs`
        (indices into the N; None = all N, in order)."""
        if not self.mpc:
            return self._policy(self.model, obs, task)
        prev = self.prev_mean if envs is None else self.prev_mean[envs]
        action, mean = self._plan(self.model, obs, task, prev, self.cfg, self.eval_mode)
        if envs is None:
            self.prev_mean.copy_(mean)
        else:
            self.prev_mean[envs] = mean
        return action

    def describe(self) -> dict:
        """The action-selection protocol, for run outputs."""
        return describe_protocol(self.mpc, self.cfg, self.eval_mode)


def describe_protocol(mpc: bool, cfg: MPPIConfig = OFFICIAL_MPPI, eval_mode: bool = True) -> dict:
    """How actions are chosen, as a JSON-ready dict for run outputs."""
    if not mpc:
        return {"mode": "policy", "action": "policy mean tanh(mu): eval_mode, no noise"}
    noise = "no noise (eval_mode)" if eval_mode else "plus noise std[0] * N(0, 1) (not eval_mode)"
    return {
        "mode": "mppi",
        "eval_mode": eval_mode,
        "action": f"first action of a Gumbel-max-sampled elite, {noise}",
        **dataclasses.asdict(cfg),
    }
