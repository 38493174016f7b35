"""The settings of one `trainer train` / `trainer distill` run: `TrainConfig`, with every
value derived from them, and the choices its fields take. Each field's help text is the
CLI's (trainer/cli.py generates the options from the fields).
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from trainer.errors import TrainConfigError
from trainer.evaluation.evaluate import resolve_tasks
from trainer.model.presets import PRESETS
from trainer.options import DEVICES, resolve_device
from trainer.training.runstate import CHECKPOINT_FILE
from trainer.training.traineval import EvalProtocol

D_SCHEDULES = ("constant", "linear")
DISTILL_STEPS = ("first", "all")
TEACHER_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class TrainConfig:
    """Settings of one training or distillation run. Defaults run at toy scale on CPU."""

    shards: str = field(
        metadata={
            "help": "Store written by `datapipe build`: a folder or an fsspec URL (s3://b/store)."
        }
    )
    out: Path = field(
        default=Path("runs/train"),
        metadata={"help": "Run folder: checkpoint, config.json, metrics."},
    )
    steps: int = field(
        default=1000,
        metadata={"help": "Gradient updates in the whole run (a resumed run continues to it)."},
    )
    batch_size: int = field(
        default=256,
        metadata={"help": "Slices per batch on each rank (B); N torchrun ranks step on N x B."},
    )
    horizon: int = field(
        default=3, metadata={"help": "Latent rollout length H (the official value is 3)."}
    )
    seed: int = field(
        default=1,
        metadata={"help": "Seed of the student's init, the updates' random draws and the data."},
    )
    device: str = field(
        default="auto", metadata={"help": "auto (cuda when available), cpu or cuda."}
    )
    model_size: int = field(
        default=1, metadata={"help": "Student size, millions of parameters: 1, 5, 19, 48 or 317."}
    )
    init: Path | None = field(
        default=None, metadata={"help": "Start the student from this official checkpoint."}
    )
    teacher: Path | None = field(
        default=None, metadata={"help": "Official checkpoint of the frozen teacher (distill)."}
    )
    teacher_size: int | None = field(
        default=None, metadata={"help": "Teacher size; default: read from its shapes."}
    )
    d_coef: float = field(
        default=0.0,
        metadata={"help": "Weight of the reward-distillation loss (paper's best: 0.4)."},
    )
    d_schedule: str = field(
        default="constant", metadata={"help": "constant, or linear: d_coef falls to 0 at the end."}
    )
    distill: str = field(
        default="first",
        metadata={"help": "first: distil at t=0 only (paper); all: every step of H."},
    )
    teacher_dtype: str = field(
        default="float32", metadata={"help": "Teacher dtype: float32, bfloat16/float16 (CUDA)."}
    )
    threads: int = field(
        default=0,
        metadata={"help": "torch CPU threads per rank; 0: torch's default (one per core)."},
    )
    compile: bool = field(
        default=False,
        metadata={
            "help": "torch.compile the whole update, as the official compile=true (CUDA: "
            "CUDA graphs; CPU too). Minutes of warm-up; the same random draws as eager."
        },
    )
    tf32: bool = field(
        default=True,
        metadata={"help": "TF32 float32 matmuls on CUDA, as the official code (no effect on CPU)."},
    )
    amp: bool = field(
        default=False,
        metadata={"help": "bfloat16 autocast of the update's forward losses (CUDA only)."},
    )
    cache_gb: float = field(
        default=1.0,
        metadata={"help": "RAM for the loader's pool of decoded episodes, GB (per rank)."},
    )
    sampler: str = field(
        default="pool",
        metadata={
            "help": "pool: slices from the loader's RAM pool (fast); uniform: every slice's "
            "episode drawn from the whole store and read for its batch (the official draw, "
            "slower; for checking the pool)."
        },
    )
    refill_size: int = field(
        default=64, metadata={"help": "Episodes the loader's pool admits at once."}
    )
    refill_every: int = field(
        default=16, metadata={"help": "Batches between the pool's refills of --refill-size."}
    )
    log_every: int = field(
        default=100, metadata={"help": "Steps between metric rows (and one at the end)."}
    )
    save_every: int = field(
        default=1000, metadata={"help": "Steps between checkpoints (and one at the end)."}
    )
    resume: bool = field(
        default=False,
        metadata={
            "help": "Continue the run in --out from its checkpoint, with the settings of its "
            "config.json; flags given again must agree (except --steps, logging and progress)."
        },
    )
    overwrite: bool = field(
        default=False,
        metadata={"help": "Delete the run in --out (its checkpoint and logs) and start again."},
    )
    tensorboard: bool = field(
        default=False, metadata={"help": "Also log to OUT/tensorboard (pip install tensorboard)."}
    )
    wandb: str | None = field(
        default=None,
        metadata={
            "help": "Also log to this Weights & Biases project (the wandb extra; "
            "WANDB_MODE=offline keeps it local). Same metric names as metrics.csv."
        },
    )
    eval_every: int = field(
        default=0,
        metadata={
            "help": "Evaluate the student every N steps (and at step 0 and the last step) on "
            "dm_control; 0: never. Keeps best.pt, the best-scoring model."
        },
    )
    eval_tasks: str = field(
        default="mt30",
        metadata={"help": "Tasks of those evaluations: mt30 or comma-separated names."},
    )
    eval_episodes: int = field(default=1, metadata={"help": "Episodes per task per evaluation."})
    eval_mpc: bool = field(
        default=False,
        metadata={
            "help": "Plan with MPPI in those evaluations (about 170 s per episode per CPU core); "
            "default: the policy mean."
        },
    )
    progress: bool = field(
        default=True,
        metadata={"help": "Progress with rate and ETA (off a terminal: one line a minute)."},
    )
    ddp_check: bool = field(
        default=False,
        metadata={
            "help": "torchrun: after every step verify that all ranks hold the same model and "
            "optimiser state and drew different batches (slow; for debugging)."
        },
    )

    def __post_init__(self) -> None:
        # The store may be a URL: a Path would fold "s3://b" into "s3:/b".
        object.__setattr__(self, "shards", os.fspath(self.shards))
        for name in ("out", "init", "teacher"):  # accept str paths
            value = getattr(self, name)
            if value is not None and not isinstance(value, Path):
                object.__setattr__(self, name, Path(value))
        problems = []
        for name in ("steps", "batch_size", "horizon", "log_every", "save_every", "eval_episodes"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1 (got {getattr(self, name)})")
        if self.eval_every < 0:
            problems.append(f"eval_every must be >= 0 (got {self.eval_every})")
        try:
            resolve_tasks(self.eval_tasks)
        except ValueError as e:
            problems.append(f"eval_tasks: {e}")
        if self.threads < 0:
            problems.append(f"threads must be >= 0 (got {self.threads})")
        for name, value, choices in (
            ("device", self.device, DEVICES),
            ("d_schedule", self.d_schedule, D_SCHEDULES),
            ("distill", self.distill, DISTILL_STEPS),
            ("teacher_dtype", self.teacher_dtype, tuple(TEACHER_DTYPES)),
            ("model_size", self.model_size, tuple(PRESETS)),
            ("teacher_size", self.teacher_size, (None, *PRESETS)),
        ):
            if value not in choices:
                problems.append(f"{name} must be one of {choices} (got {value!r})")
        if not (math.isfinite(self.d_coef) and self.d_coef >= 0):
            problems.append(f"d_coef must be a finite number >= 0 (got {self.d_coef})")
        if self.d_coef > 0 and self.teacher is None:
            problems.append("d_coef > 0 needs a teacher checkpoint (--teacher)")
        if self.resume and self.overwrite:
            problems.append("resume and overwrite exclude each other: pick one")
        if not (math.isfinite(self.cache_gb) and self.cache_gb > 0):
            problems.append(f"cache_gb must be a finite number > 0 (got {self.cache_gb})")
        if self.sampler not in ("pool", "uniform"):
            problems.append(f"sampler must be pool or uniform (got {self.sampler!r})")
        if min(self.refill_size, self.refill_every) < 1:
            problems.append("refill_size and refill_every must be >= 1")
        if problems:
            raise TrainConfigError("invalid training settings: " + "; ".join(problems))

    # -- derived values (all of them, here) -----------------------------------------------

    def resolve(self) -> TrainConfig:
        """This config with the device chosen (auto -> cuda when available), and the
        CUDA-only options checked against it. Called once, by `train`."""
        device = resolve_device(self.device)
        if device == "cpu":
            on_gpu_only = [
                name
                for name, on in (
                    ("--amp", self.amp),
                    (f"--teacher-dtype {self.teacher_dtype}", self.teacher_dtype != "float32"),
                )
                if on
            ]
            if on_gpu_only:
                raise TrainConfigError(
                    f"{', '.join(on_gpu_only)}: only on CUDA, and this run is on the CPU; "
                    f"leave them out (on CPU the update runs in float32)"
                )
        return dataclasses.replace(self, device=device)

    @property
    def checkpoint_path(self) -> Path:
        """The run's training checkpoint (the last one written)."""
        return self.out / CHECKPOINT_FILE

    @property
    def math_fields(self) -> tuple[str, ...]:
        """Settings a resumed run must share with the original, because they change the
        numbers (the store and the teacher are compared by content, not by path). The number
        of ranks may change: the data streams are then re-derived
        (`trainer.training.distributed.rank_stream`)."""
        fields = (
            "batch_size", "horizon", "seed", "model_size", "init", "teacher_size", "d_coef",
            "d_schedule", "distill", "teacher_dtype", "compile", "amp", "cache_gb", "sampler",
            "refill_size", "refill_every",
        )  # fmt: skip
        return (*fields, "steps") if self.d_schedule == "linear" else fields

    @property
    def eval_protocol(self) -> EvalProtocol | None:
        """What evaluations during training run (None without --eval-every). The env seed is
        the run's seed, as in the official training loop."""
        if not self.eval_every:
            return None
        return EvalProtocol.of(self.eval_tasks, self.eval_episodes, self.eval_mpc, self.seed)

    def d_coef_at(self, done: int) -> float:
        """Distillation weight of the update that follows `done` finished updates."""
        if self.d_schedule == "linear":
            return self.d_coef * (1 - done / self.steps)
        return self.d_coef

    @staticmethod
    def saved(config: dict[str, Any], key: str) -> Any:
        """Setting `key` of a saved config.json's config; a setting added since it was
        written has its default."""
        if key in config:
            return config[key]
        f = {f.name: f for f in dataclasses.fields(TrainConfig)}.get(key)
        return None if f is None or f.default is dataclasses.MISSING else f.default

    def to_dict(self) -> dict[str, Any]:
        """Plain values (paths as strings), as saved in config.json and checkpoints."""
        return {
            f.name: str(v) if isinstance(v, Path) else v
            for f in dataclasses.fields(self)
            for v in [getattr(self, f.name)]
        }
