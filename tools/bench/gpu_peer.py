"""The official TD-MPC2 update timed beside ours (`tools bench-gpu --official PATH`).

PATH is the root of a checkout of the official repository (its code under PATH/tdmpc2/),
run with tensordict 0.8.3 (the version it pins). Nothing is downloaded: without PATH the
part is skipped. The official agent is built from its own `config.yaml` with the mt30 values
its config parser would set (sizes from our preset table, which matches the official one),
without hydra, and fed the batches of our loader, the same batch size and horizon as our
training cells. It runs eager, and with its own `compile: true` path, which compiles the
whole `_update` with `torch.compile(mode="reduce-overhead")` (CUDA graphs), as our
`--compile` does with ours (`trainer.train.compile_update`).

The official agent puts itself on `cuda:0` (hard-coded), so this part needs a GPU.
"""

from __future__ import annotations

import dataclasses
import inspect
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from datapipe.store import open_store
from trainer.errors import TrainConfigError
from trainer.presets import ModelConfig
from trainer.train import store_dims


class OfficialConfig(dict):
    """The official code reads its (OmegaConf) config by attribute, by key and with .get."""

    __getattr__ = dict.__getitem__
    __setattr__ = dict.__setitem__


def official_source(path: str | Path) -> Path:
    """The folder holding the official `tdmpc2.py`, or a TrainConfigError naming the fix."""
    src = Path(path) / "tdmpc2"
    if not (src / "tdmpc2.py").is_file() or not (src / "config.yaml").is_file():
        raise TrainConfigError(
            f"--official {path}: no tdmpc2/tdmpc2.py and tdmpc2/config.yaml under it; pass the "
            f"root of a checkout of the official TD-MPC2 repository"
        )
    return src


def official_config(src: Path, model: ModelConfig, tasks: list[str], batch: int, compile: bool):
    """The official config for mt30 at our model size and batch, as its parser leaves it."""
    import yaml

    raw = yaml.safe_load((src / "config.yaml").read_text())
    raw.pop("defaults", None)
    sizes = ("enc_dim", "mlp_dim", "latent_dim", "num_enc_layers", "num_q", "task_dim")
    episode_length = model.episode_lengths[0]
    raw.update({k: getattr(model, k) for k in sizes})
    raw.update(
        task="mt30", obs="state", multitask=True, tasks=tasks, model_size=model.model_size,
        obs_shape={"state": (model.obs_dim,)}, action_dim=model.action_dim,
        action_dims=list(model.action_dims), episode_length=episode_length,
        episode_lengths=list(model.episode_lengths), horizon=model.horizon, batch_size=batch,
        bin_size=(model.vmax - model.vmin) / (model.num_bins - 1), compile=compile,
        episodic=False, task_title="MT30", work_dir=".", seed_steps=0,
    )  # fmt: skip
    return OfficialConfig(raw)


class _Buffer:
    """What `TDMPC2.update(buffer)` samples from: our loader's batches, in the official
    return order (with zero terminations where that version's update takes them)."""

    def __init__(self, loader, with_terminated: bool) -> None:
        self.loader, self.with_terminated = loader, with_terminated

    def sample(self):
        obs, action, reward, task = next(self.loader)
        if self.with_terminated:
            return obs, action, reward, torch.zeros_like(reward), task
        return obs, action, reward, task


def official_updates(args, make_loader, accel) -> dict[str, Any]:
    """Median official update time, eager and compiled, on our batches."""
    if not accel.cuda:
        return {"status": "skipped", "reason": "the official agent runs on cuda:0 only"}
    src = official_source(args.official)
    sys.path.insert(0, str(src))
    from tdmpc2 import TDMPC2  # the official agent, from the checkout

    store = open_store(args.store)
    sizes = args.sizes
    model = dataclasses.replace(
        ModelConfig.for_size(sizes.student, **store_dims(store)), horizon=sizes.horizon
    )
    with_terminated = "terminated" in inspect.signature(TDMPC2._update).parameters
    batch, rows = sizes.batch_sizes[0], {}
    for mode, compile in (("eager", False), ("compile reduce-overhead", True)):
        cfg = official_config(src, model, list(store.task_names), batch, compile)
        agent = TDMPC2(cfg)
        with make_loader(args, batch, accel.device) as loader:
            buffer = _Buffer(loader, with_terminated)
            t0 = time.perf_counter()
            for _ in range(sizes.warmup_steps):
                agent.update(buffer)
            accel.sync()
            warmup_s = time.perf_counter() - t0
            times = []
            for _ in range(sizes.windows):
                t0 = time.perf_counter()
                for _ in range(sizes.window_steps):
                    agent.update(buffer)
                accel.sync()
                times.append((time.perf_counter() - t0) / sizes.window_steps)
        rows[mode] = {"steps_per_s": 1 / statistics.median(times), "warmup_s": warmup_s}
    return {"status": "ok", "batch": batch, "modes": rows, "source": str(src)}
