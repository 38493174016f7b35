"""TD-MPC2 world model, training, evaluation and studies for offline multi-task (mt30) data.

Four rooms, imports pointing one way (study -> training -> evaluation -> model -> datapipe):

model      -- the world model and its files: presets, math, WorldModel, checkpoints, quantize
training   -- `trainer train` / `distill`: config, agent (the update), the loop, run folders,
              data-parallel training, evaluation during training
evaluation -- `trainer eval`: the MT30 environments, MPPI planning, per-episode evaluation
study      -- `trainer experiment` / `report` / `curve`: specs, statistics, figures

and the command itself: cli (with options, the flags generated from the config dataclasses),
errors (every error the commands turn into one line), stop (Ctrl-C / SIGTERM handling).
The names below are the public API.
"""

from trainer.model.checkpoint import (
    CheckpointError,
    QuantizedCheckpointError,
    detect_model_size,
    load_checkpoint,
    load_model_state,
    read_checkpoint,
    save_atomic,
    save_official,
)
from trainer.model.presets import PRESETS, ModelConfig
from trainer.model.world import WorldModel, parameter_counts
from trainer.training.agent import TDMPC2Agent, prepare_teacher, reward_distillation_loss

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
