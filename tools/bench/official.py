"""The official TD-MPC2 agent, built from a checkout and timed beside ours (`tools bench-gpu
--official PATH`, `tools bench-update --official PATH`).

PATH is the root of a checkout of the official repository (its code under PATH/tdmpc2/),
run with tensordict 0.8.3 (the version it pins). Nothing is downloaded: without PATH the
official cells are skipped. The official agent is built from its own `config.yaml` with the
mt30 values its config parser would set (sizes from our preset table, which matches the
official one), without hydra. It runs eager, and with its own `compile: true` path, which
compiles the whole `_update` (and `_plan`) with `torch.compile(mode="reduce-overhead")`, as
our `--compile` does with ours (`trainer.training.train.compile_update`).

The official agent puts itself on `cuda:0` (hard-coded in its constructor and in
RunningScale's) and makes its Adams `capturable`. On CPU, `official_agent` builds it with
those two constructors seeing `cpu` and a plain Adam (capturable state needs a GPU); every
other line of its code already follows the device of its tensors. Nothing in the checkout is
edited.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import statistics
import sys
import time
import types
from pathlib import Path
from typing import Any

import torch

from datapipe.store import open_store
from trainer.errors import TrainConfigError
from trainer.model.presets import ModelConfig
from trainer.training.train import store_dims


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


def import_official(path: str | Path) -> Any:
    """The official agent class `TDMPC2` from the checkout at `path` (appended to sys.path, so
    that its `trainer` package never shadows ours)."""
    src = official_source(path)
    if str(src) not in sys.path:
        sys.path.append(str(src))
    try:
        from tdmpc2 import TDMPC2  # the official agent, from the checkout
    except ImportError as exc:
        raise TrainConfigError(
            f"--official {path}: the official code does not import ({exc}); it needs "
            f"tensordict 0.8.3 (pip install tensordict==0.8.3) and PyYAML"
        ) from None
    return TDMPC2


def official_agent(TDMPC2: Any, cfg: OfficialConfig, device: torch.device) -> Any:
    """The official agent on `device`: as its code builds it on cuda:0; elsewhere with its two
    hard-coded `cuda:0` constructors (the agent's and RunningScale's) seeing `device` and
    a plain Adam (see the module docstring)."""
    if device == torch.device("cuda:0") or device == torch.device("cuda"):
        return TDMPC2(cfg)
    if device.type == "cuda":
        raise TrainConfigError(f"the official agent runs on cuda:0 only, not {device}")
    modules = [sys.modules[TDMPC2.__module__], sys.modules["common.scale"]]
    with _constructors_on(device, modules):
        return TDMPC2(cfg)


@contextlib.contextmanager
def _constructors_on(device: torch.device, modules: list[types.ModuleType]):
    """While the official constructors run, their modules' `torch` places what names
    cuda:0 on `device` and builds Adam without `capturable`; torch itself is untouched."""
    real = torch

    class Placed(types.ModuleType):
        def __getattr__(self, name: str) -> Any:
            return getattr(real, name)

    placed = Placed("torch")
    placed.device = lambda *args, **kwargs: device
    placed.tensor = lambda *args, device=None, **kwargs: real.tensor(*args, **kwargs).to(
        placed.device()
    )
    placed.optim = types.SimpleNamespace(
        Adam=lambda *args, capturable=False, **kwargs: real.optim.Adam(*args, **kwargs)
    )
    saved = [m.torch for m in modules]
    for m in modules:
        m.torch = placed
    try:
        yield
    finally:
        for m, s in zip(modules, saved, strict=True):
            m.torch = s


def official_config(src: Path, model: ModelConfig, tasks: list[str], batch: int, compile: bool):
    """The official config for mt30 at our model size and batch, as its parser leaves it."""
    import yaml

    raw = yaml.safe_load((src / "config.yaml").read_text())
    raw.pop("defaults", None)
    for key, value in raw.items():  # OmegaConf reads `3e-4` as a number, PyYAML as a string
        with contextlib.suppress(ValueError):
            raw[key] = float(value) if isinstance(value, str) else value
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


class OfficialBuffer:
    """What `TDMPC2.update(buffer)` samples from: our batches (obs, action, reward, task; a
    loader or any iterator of them), in the official return order, with zero terminations
    where the checkout's `_update` takes them."""

    def __init__(self, batches, TDMPC2: Any) -> None:
        self.batches = batches
        self.with_terminated = "terminated" in inspect.signature(TDMPC2._update).parameters

    def sample(self):
        obs, action, reward, task = next(self.batches)
        if self.with_terminated:
            return obs, action, reward, torch.zeros_like(reward), task
        return obs, action, reward, task


def official_updates(args, make_loader, accel) -> dict[str, Any]:
    """Median official update time, eager and compiled, on our batches."""
    if not accel.cuda:
        return {"status": "skipped", "reason": "on CPU: tools bench-update times it"}
    src = official_source(args.official)
    TDMPC2 = import_official(args.official)

    store = open_store(args.store)
    sizes = args.sizes
    model = dataclasses.replace(
        ModelConfig.for_size(sizes.student, **store_dims(store)), horizon=sizes.horizon
    )
    batch, rows = sizes.batch_sizes[0], {}
    for mode, compile in (("eager", False), ("compile reduce-overhead", True)):
        cfg = official_config(src, model, list(store.task_names), batch, compile)
        torch._dynamo.reset()  # no graphs or limits carried over from an earlier cell
        agent = official_agent(TDMPC2, cfg, accel.device)
        with make_loader(args, batch, accel.device) as loader:
            buffer = OfficialBuffer(loader, TDMPC2)
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
