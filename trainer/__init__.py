"""TD-MPC2 world model, update and checkpoints for offline multi-task (mt30) training.

presets    -- model-size table and the frozen ModelConfig
math       -- symlog / two-hot regression and the running Q scale
model      -- WorldModel: networks and forward passes (no losses)
checkpoint -- official checkpoint files: read, convert old API, detect size, save
agent      -- TDMPC2Agent: optimisers, the update step, reward distillation
train      -- the training loop behind `trainer train` / `trainer distill`
runstate   -- our training checkpoints (exact resume) and export to the official format
runlog     -- metrics files, step timing, peak memory
distributed -- data-parallel training under torchrun (DDP, per-rank streams)
envs       -- the 30 MT30 environments
cli        -- the `trainer` command
"""

from trainer.agent import TDMPC2Agent, prepare_teacher, reward_distillation_loss
from trainer.checkpoint import (
    CheckpointError,
    QuantizedCheckpointError,
    detect_model_size,
    load_checkpoint,
    load_model_state,
    read_checkpoint,
    save_atomic,
    save_official,
)
from trainer.model import WorldModel, parameter_counts
from trainer.presets import PRESETS, ModelConfig

__all__ = [
    "PRESETS",
    "CheckpointError",
    "ModelConfig",
    "QuantizedCheckpointError",
    "TDMPC2Agent",
    "WorldModel",
    "detect_model_size",
    "load_checkpoint",
    "load_model_state",
    "parameter_counts",
    "prepare_teacher",
    "read_checkpoint",
    "reward_distillation_loss",
    "save_atomic",
    "save_official",
]
