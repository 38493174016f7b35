"""`tools make-teacher`: an official-format world-model file of any size, made here.

Everything that takes a teacher (or an --init student) runs without the official downloads
on a file from `make_teacher`: either freshly initialised exactly as the official code does
(docs/tdmpc2.md#init; note the reward head's last layer starts at zero, so such a teacher
predicts a reward of 0 everywhere, unless `nonzero_reward` draws that layer like the others),
or after `train_steps` updates of `trainer train` on a store, which gives a teacher with a
reward signal to distil.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path

import torch

from datapipe.store import open_store
from tools.errors import ToolError
from trainer.model.checkpoint import export, save_official
from trainer.model.presets import PRESETS, ModelConfig
from trainer.model.world import WorldModel, weight_init
from trainer.training.config import TrainConfig
from trainer.training.train import store_dims, train


def make_teacher(
    size: int,
    out: str | os.PathLike,
    seed: int = 0,
    train_steps: int = 0,
    shards: str | os.PathLike | None = None,
    batch_size: int = 256,
    device: str = "auto",
    nonzero_reward: bool = False,
    progress: bool = False,
) -> Path:
    """Write an official new-API file `{"model": state_dict}` of a `size`M world model.

    With `train_steps` = 0 the model is a fresh, seeded init for the dims of `shards` (mt30
    when no store is given); `nonzero_reward` draws the reward head's last layer from the
    init of the other Linear layers instead of zeros, so that the teacher predicts rewards
    other than 0 (for timing distillation with a teacher of any size). Otherwise it is
    trained for `train_steps` updates on `shards` with `trainer train`, in a temporary run
    folder beside `out` that is removed once the model is exported (use `trainer train` and
    `trainer export` to keep the run).
    """
    out = Path(out)
    if size not in PRESETS:
        raise ToolError(f"unknown model size {size}; choose one of {sorted(PRESETS)}")
    if nonzero_reward and train_steps:
        raise ToolError("nonzero_reward applies to a random init: drop it or train_steps")
    if train_steps < 0:
        raise ToolError(f"train_steps must be >= 0 (got {train_steps})")
    if train_steps == 0:
        dims = {} if shards is None else store_dims(open_store(shards))
        torch.manual_seed(seed)
        model = WorldModel(ModelConfig.for_size(size, **dims))
        if nonzero_reward:
            weight_init(model._reward[-1])
        save_official(model, out)
        return out
    if shards is None:
        raise ToolError("train_steps > 0 needs a store to train on: pass shards (--shards)")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.stem}-run.", dir=out.parent) as run:
        cfg = _teacher_run(size, Path(run), train_steps, shards, batch_size, seed, device)
        return export(train(dataclasses.replace(cfg, progress=progress)), out)


def _teacher_run(
    size: int,
    run: Path,
    train_steps: int,
    shards: str | os.PathLike,
    batch_size: int,
    seed: int,
    device: str,
) -> TrainConfig:
    return TrainConfig(
        shards=os.fspath(shards),
        out=run,
        steps=train_steps,
        batch_size=batch_size,
        seed=seed,
        device=device,
        model_size=size,
        log_every=max(1, train_steps // 20),
        save_every=train_steps,
    )
