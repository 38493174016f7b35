"""TD-MPC2 model-size presets for mt30 and the frozen `ModelConfig` built from them.

This module owns every number that shapes the world model or the update: the size table
(docs/tdmpc2.md#sizes: values after the official config parser has run with `task=mt30`) and the
hyperparameters shared by all sizes. Dataset facts (obs/action dims, number of tasks,
episode lengths) are constructor arguments, so they can come from a store's metadata; the
mt30 values below are only defaults.
"""

from __future__ import annotations

from dataclasses import dataclass

from datapipe.tasksets import MT30


@dataclass(frozen=True)
class SizePreset:
    """Network widths of one model size."""

    enc_dim: int
    mlp_dim: int
    latent_dim: int
    num_enc_layers: int
    num_q: int
    task_dim: int


# docs/tdmpc2.md#sizes. The mt30 special cases are already applied:
#   task_dim is 96 for sizes 1 and 317 and 64 otherwise;
#   num_q is 2 for 1M, 8 for 317M and the config default 5 otherwise;
#   19M uses latent_dim 512 on mt30 (the generic size table says 768).
PRESETS: dict[int, SizePreset] = {
    1: SizePreset(enc_dim=256, mlp_dim=384, latent_dim=128, num_enc_layers=2, num_q=2, task_dim=96),
    5: SizePreset(enc_dim=256, mlp_dim=512, latent_dim=512, num_enc_layers=2, num_q=5, task_dim=64),
    19: SizePreset(
        enc_dim=1024, mlp_dim=1024, latent_dim=512, num_enc_layers=3, num_q=5, task_dim=64
    ),
    48: SizePreset(
        enc_dim=1792, mlp_dim=1792, latent_dim=768, num_enc_layers=4, num_q=5, task_dim=64
    ),
    317: SizePreset(
        enc_dim=4096, mlp_dim=4096, latent_dim=1376, num_enc_layers=5, num_q=8, task_dim=96
    ),
}

# docs/tdmpc2.md#tasks: active action dims of the 30 mt30 tasks, in task-index order.
MT30_ACTION_DIMS: tuple[int, ...] = MT30.action_dims
# docs/tdmpc2.md#discount: every mt30 episode lasts 500 agent steps (its 501 rows less row 0).
MT30_EPISODE_LENGTH = MT30.rows - 1


@dataclass(frozen=True)
class ModelConfig:
    """Everything the world model and its update need; build it with `ModelConfig.for_size`."""

    # Preset (docs/tdmpc2.md#sizes).
    model_size: int = 1  # parameter count in millions; a key of PRESETS
    enc_dim: int = 256  # width of the encoder's hidden layers
    mlp_dim: int = 384  # width of the dynamics/reward/pi/Q hidden layers
    latent_dim: int = 128  # size of z; a multiple of simnorm_dim
    num_enc_layers: int = 2  # number of NormedLinear layers in the encoder
    num_q: int = 2  # members of the Q ensemble
    task_dim: int = 96  # task-embedding width
    # Dataset dims (docs/tdmpc2.md#tasks, #discount; defaults are mt30).
    obs_dim: int = MT30.obs_dim  # padded observation dim
    action_dim: int = MT30.action_dim  # padded action dim
    action_dims: tuple[int, ...] = MT30_ACTION_DIMS  # active action dims per task
    episode_lengths: tuple[int, ...] = (MT30_EPISODE_LENGTH,) * MT30.n_tasks  # per task
    # Shared hyperparameters (docs/tdmpc2.md#settings, #discount).
    simnorm_dim: int = 8  # SimNorm group size
    num_bins: int = 101  # two-hot bins
    vmin: float = -10.0  # lowest bin, symlog space
    vmax: float = 10.0  # highest bin, symlog space
    dropout: float = 0.01  # dropout after the first Q layer
    log_std_min: int = -10  # lower bound of the policy log std
    log_std_max: int = 2  # upper bound of the policy log std
    entropy_coef: float = 1e-4  # weight of the scaled entropy in the pi loss
    horizon: int = 3  # latent rollout length H
    rho: float = 0.5  # per-step loss decay
    lr: float = 3e-4  # learning rate of both optimisers
    enc_lr_scale: float = 0.3  # encoder lr = lr * enc_lr_scale
    grad_clip_norm: float = 20.0  # global grad-norm clip for model and pi
    tau: float = 0.01  # Polyak rate of the target Q and of the running scale
    consistency_coef: float = 20.0  # weight of the latent consistency loss
    reward_coef: float = 0.1  # weight of the reward loss
    value_coef: float = 0.1  # weight of the value loss
    termination_coef: float = 1.0  # weight of the termination loss (unused: not episodic)
    discount_denom: float = 5.0  # discount = (frac-1)/frac with frac = length/discount_denom
    discount_min: float = 0.95  # lower clip of the discount
    discount_max: float = 0.995  # upper clip of the discount

    def __post_init__(self) -> None:
        if self.model_size not in PRESETS:
            raise ValueError(f"model_size {self.model_size} is not one of {sorted(PRESETS)}")
        if len(self.action_dims) != len(self.episode_lengths):
            raise ValueError(
                f"action_dims has {len(self.action_dims)} tasks but episode_lengths has "
                f"{len(self.episode_lengths)}; give one entry per task in both"
            )
        if not self.action_dims or max(self.action_dims) > self.action_dim:
            raise ValueError(
                f"action_dims {self.action_dims} must be non-empty and at most "
                f"action_dim={self.action_dim}"
            )
        if self.latent_dim % self.simnorm_dim:
            raise ValueError(
                f"latent_dim {self.latent_dim} is not a multiple of simnorm_dim {self.simnorm_dim}"
            )

    @classmethod
    def for_size(
        cls,
        size: int,
        obs_dim: int = MT30.obs_dim,
        action_dim: int = MT30.action_dim,
        action_dims: tuple[int, ...] | list[int] | None = None,
        n_tasks: int | None = None,
        episode_lengths: tuple[int, ...] | list[int] | None = None,
    ) -> ModelConfig:
        """The config of preset `size` with the given dataset dims (mt30 where left out)."""
        if size not in PRESETS:
            raise ValueError(f"unknown model size {size}; choose one of {sorted(PRESETS)}")
        if action_dims is None:
            action_dims = MT30_ACTION_DIMS if n_tasks is None else (action_dim,) * n_tasks
        action_dims = tuple(int(d) for d in action_dims)
        if n_tasks is not None and n_tasks != len(action_dims):
            raise ValueError(f"n_tasks={n_tasks} but action_dims lists {len(action_dims)} tasks")
        if episode_lengths is None:
            episode_lengths = (MT30_EPISODE_LENGTH,) * len(action_dims)
        preset = PRESETS[size]
        return cls(
            model_size=size,
            enc_dim=preset.enc_dim,
            mlp_dim=preset.mlp_dim,
            latent_dim=preset.latent_dim,
            num_enc_layers=preset.num_enc_layers,
            num_q=preset.num_q,
            task_dim=preset.task_dim,
            obs_dim=obs_dim,
            action_dim=action_dim,
            action_dims=action_dims,
            episode_lengths=tuple(int(n) for n in episode_lengths),
        )

    @property
    def n_tasks(self) -> int:
        """Number of tasks (rows of the task embedding)."""
        return len(self.action_dims)

    @property
    def bin_size(self) -> float:
        """Width of one two-hot bin in symlog space (0.2 for the defaults)."""
        return (self.vmax - self.vmin) / (self.num_bins - 1)

    @property
    def discounts(self) -> tuple[float, ...]:
        """Per-task discount (docs/tdmpc2.md#discount): clip((frac-1)/frac), frac = length/denom."""
        out = []
        for length in self.episode_lengths:
            frac = length / self.discount_denom
            out.append(min(max((frac - 1) / frac, self.discount_min), self.discount_max))
        return tuple(out)
