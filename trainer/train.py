"""`trainer train` and `trainer distill`: offline TD-MPC2 training on a store, optionally with
a frozen teacher whose rewards the student is distilled towards (spec D.5).

Owns `TrainConfig` (the settings of one run, with the values derived from them), the checks
that the store, the student and the teacher fit together, and `train(cfg)`: the training
loop, one function read top to bottom. The update itself is `TDMPC2Agent.update`; the
checkpoint format is `trainer.runstate`, the log files `trainer.runlog`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from datapipe.loader import SliceLoader
from datapipe.progress import Progress
from datapipe.store import Store, open_store
from trainer.agent import TDMPC2Agent, prepare_teacher
from trainer.checkpoint import (
    CheckpointError,
    detect_model_size,
    load_checkpoint,
    load_model_state,
)
from trainer.distributed import (
    DataParallelUpdate,
    Ranks,
    check_replicas,
    process_group,
    stream_seed,
)
from trainer.errors import DivergedError, IncompatibleDataError, ResumeError, TrainConfigError
from trainer.evaluate import resolve_tasks
from trainer.model import WorldModel
from trainer.presets import PRESETS, ModelConfig
from trainer.runlog import (
    DISTILL_METRICS,
    RUN_LOG_FILES,
    TENSORBOARD_DIR,
    UPDATE_METRICS,
    WANDB_DIR,
    EvalLog,
    MetricsLog,
    NullLog,
    StepTimer,
    peak_rss_bytes,
    peak_vram_bytes,
    read_evals,
    read_metrics,
    summary_writer_class,
    wandb_module,
)
from trainer.runstate import (
    CHECKPOINT_FILE,
    official_dims,
    read_official,
    read_training_checkpoint,
    rng_state,
    set_rng_state,
    store_identity,
    teacher_identity,
    write_json,
    write_training_checkpoint,
)
from trainer.stop import Interrupted, StopRequest
from trainer.traineval import BEST_FILE, BEST_INFO_FILE, EvalProtocol, TrainingEval

CONFIG_FILE = "config.json"
SUMMARY_FILE = "summary.json"
DEVICES = ("auto", "cpu", "cuda")
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
        default=False, metadata={"help": "torch.compile the student's networks (CUDA only)."}
    )
    amp: bool = field(
        default=False, metadata={"help": "bfloat16 autocast in the update (CUDA only)."}
    )
    cache_gb: float = field(
        default=1.0,
        metadata={"help": "RAM for the loader's pool of decoded episodes, GB (per rank)."},
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
            "help": "Also log to this Weights & Biases project (pip install -e '.[wandb]'; "
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
        if self.cache_gb <= 0:
            problems.append(f"cache_gb must be > 0 (got {self.cache_gb})")
        if problems:
            raise TrainConfigError("invalid training settings: " + "; ".join(problems))

    # -- derived values (all of them, here) -----------------------------------------------

    def resolve(self) -> TrainConfig:
        """This config with the device chosen (auto -> cuda when available), and the
        CUDA-only options checked against it. Called once, by `train`."""
        cuda = torch.cuda.is_available()
        if self.device == "cuda" and not cuda:
            raise TrainConfigError(
                "--device cuda, but torch sees no CUDA device (torch.cuda.is_available() is "
                "False); use --device cpu or auto, or install a CUDA build of torch"
            )
        device = ("cuda" if cuda else "cpu") if self.device == "auto" else self.device
        if device == "cpu":
            on_gpu_only = [
                name
                for name, on in (
                    ("--compile", self.compile),
                    ("--amp", self.amp),
                    (f"--teacher-dtype {self.teacher_dtype}", self.teacher_dtype != "float32"),
                )
                if on
            ]
            if on_gpu_only:
                raise TrainConfigError(
                    f"{', '.join(on_gpu_only)}: only on CUDA, and this run is on the CPU; "
                    f"leave them out (on CPU the update runs in float32, uncompiled)"
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
        of ranks may change: the data streams are then re-derived (see `_rank_stream`)."""
        fields = (
            "batch_size", "horizon", "seed", "model_size", "init", "teacher_size", "d_coef",
            "d_schedule", "distill", "teacher_dtype", "compile", "amp", "cache_gb",
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

    def to_dict(self) -> dict[str, Any]:
        """Plain values (paths as strings), as saved in config.json and checkpoints."""
        return {
            f.name: str(v) if isinstance(v, Path) else v
            for f in dataclasses.fields(self)
            for v in [getattr(self, f.name)]
        }


def train(cfg: TrainConfig) -> Path:
    """Run (or resume) the training described by `cfg`; return the last checkpoint's path.

    Without a teacher this is plain offline TD-MPC2 training; with one, the student's loss
    gains `d_coef * MSE(r_student, r_teacher)` (spec D.5). Metrics go to OUT/metrics.csv and
    .jsonl (and TensorBoard), checkpoints to OUT/checkpoint.pt every save_every steps.

    Started by torchrun (WORLD_SIZE > 1), every rank runs this function: DDP keeps the student
    identical on all ranks, each rank loads the teacher and samples its own batches, and only
    rank 0 reads and writes OUT (`trainer.distributed`).
    """
    cfg = cfg.resolve()
    ranks = Ranks.from_env()
    device = ranks.device(cfg.device)
    with process_group(ranks, device):
        return _train(cfg, ranks, device)


def _train(cfg: TrainConfig, ranks: Ranks, device: torch.device) -> Path:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)  # process-wide; on a shared CPU 1 can beat 2-3x
    if cfg.tensorboard:
        summary_writer_class()  # fail now, not after loading everything
    if cfg.wandb:
        wandb_module()
    _check_out_beside_store(cfg)
    previous = ranks.on_main(lambda: _previous_run(cfg))  # rank 0 owns OUT; all get its answer

    # The store decides the dims; an --init student or a teacher must have been built for them.
    store = open_store(cfg.shards)
    dims = store_dims(store)
    model_cfg = dataclasses.replace(
        ModelConfig.for_size(cfg.model_size, **dims), horizon=cfg.horizon
    )
    store_id = store_identity(store)
    teacher_id = None
    if cfg.teacher is not None:
        check_fits("teacher", cfg.teacher, read_official(cfg.teacher), store)
        teacher_id = teacher_identity(cfg.teacher)
    if previous is not None:
        _check_resumable(cfg, previous, store_id, teacher_id)
    init_state = None
    if cfg.init is not None and previous is None:
        init_state = read_official(cfg.init)
        check_fits("--init student", cfg.init, init_state, store)

    # Student (seeded alike on every rank), teacher (frozen; its construction leaves the
    # student's random stream alone, so a distillation run with d_coef=0 is plain training),
    # loader (seeded per rank, see _rank_stream).
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    random.seed(cfg.seed)
    agent = TDMPC2Agent(model_cfg, device)
    if init_state is not None:
        _load_into(agent.model, init_state, cfg.init, dims)
    teacher = None
    if cfg.teacher is not None:
        with torch.random.fork_rng(devices=[]):
            teacher = _load_teacher(cfg.teacher, cfg.teacher_size, dims)
        teacher = prepare_teacher(teacher.to(device), TEACHER_DTYPES[cfg.teacher_dtype])
        teacher_id["size"] = teacher.cfg.model_size
    if cfg.compile:
        _compile(agent.model)
    stream = _rank_stream(cfg, ranks, previous)
    loader = SliceLoader(
        store,
        batch_size=cfg.batch_size,
        horizon=cfg.horizon,
        device=device,
        seed=stream.seed,
        cache_gb=cfg.cache_gb,
    )
    start = 0
    if previous is not None:
        agent.load_state_dict(previous["agent"])
        start = previous["step"]
    if stream.loader is not None:
        loader.load_state_dict(stream.loader)
    if stream.rng is not None:
        set_rng_state(stream.rng, device)
    elif stream.reseed:
        _seed_all(stream.seed)
    update = DataParallelUpdate(agent, teacher, ranks) if ranks.distributed else agent.update

    description = {
        "config": cfg.to_dict(),
        "model_config": dataclasses.asdict(model_cfg),
        "store": store_id,
        "teacher": teacher_id,
        "world_size": ranks.world_size,
        "global_batch_size": cfg.batch_size * ranks.world_size,
    }
    if ranks.is_main:
        write_json(
            cfg.out / CONFIG_FILE,
            {**description, "start_step": start, "torch": str(torch.__version__)},
        )
        if stream.notice:
            print(stream.notice)
        print(_start_line(cfg, ranks, start))

    def save(step: int) -> None:
        """Every rank hands its stream position to rank 0, which writes the checkpoint."""
        streams = ranks.gather({"loader": loader.state_dict(), "rng": rng_state(device)})
        if ranks.is_main:
            write_training_checkpoint(
                cfg.checkpoint_path,
                step=step,
                agent=agent.state_dict(),
                loader=streams[0]["loader"],
                rng=streams[0]["rng"],
                other_ranks=streams[1:],
                eval=None if evals is None else evals.state_dict(),
                **description,
            )
        ranks.barrier()  # no rank runs ahead of a checkpoint that may yet fail

    # The loop. On CUDA the loader copies batch k+1 while the update runs on batch k.
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16) if cfg.amp else contextlib.nullcontext()
    )
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    last_saved = start if previous is not None else None
    timer = StepTimer(start)
    checked = 0
    resume_step = start if previous is not None else None
    log = (
        MetricsLog(cfg.out, cfg.tensorboard, resume_step, cfg.wandb, description)
        if ranks.is_main
        else NullLog()
    )
    evals = None
    protocol = cfg.eval_protocol
    if protocol is not None and ranks.is_main:
        eval_log = EvalLog(cfg.out, protocol.tasks, log, resume_step)
        saved = None if previous is None else previous.get("eval")
        evals = TrainingEval(protocol, cfg.out, eval_log, saved)

    def evaluate_now(step: int) -> None:
        """Rank 0 evaluates the student; the other ranks wait for it."""
        if evals is not None:
            row = evals.run(agent.model, step)
            bar.write(f"{cfg.out}: step {step}: normalized score {row['normalized_score']:.2f}")
        ranks.barrier()

    with (
        StopRequest("finishing this step, then writing a checkpoint") as stop,
        loader,
        log,
        Progress(
            cfg.steps,
            "distill" if cfg.teacher is not None else "train",
            "step",
            enabled=cfg.progress and ranks.is_main,
            initial=start,
        ) as bar,
    ):
        if protocol is not None and previous is None:
            evaluate_now(0)
        for step in range(start + 1, cfg.steps + 1):
            t0 = time.perf_counter()
            batch = next(loader)
            t1 = time.perf_counter()
            d_coef = cfg.d_coef_at(step - 1)
            with autocast:
                info = update(*batch, teacher, d_coef, cfg.distill)
            info["stop"] = float(stop.requested)  # reduced with the losses: all ranks agree
            info = ranks.mean(info, device)  # the losses of the global batch, on every rank
            stopping = info.pop("stop") > 0 and step < cfg.steps
            timer.add(wait=t1 - t0, busy=time.perf_counter() - t1)
            if cfg.ddp_check:
                check_replicas(agent, tuple(batch), step, ranks)
                checked += 1
            if teacher is not None:
                info["d_coef"] = d_coef
            bad = {k: v for k, v in info.items() if not math.isfinite(v)}
            if bad or step % cfg.log_every == 0 or step == cfg.steps:
                info |= timer.close_window(step)
                log.write(step, info)
                bar.postfix = (
                    f"reward loss {info['reward_loss']:.3f}, total {info['total_loss']:.3f}, "
                    f"data wait {info['data_wait']:.0%}"
                )
            if bad:
                raise DivergedError(_diverged_message(step, bad, cfg, last_saved))
            if protocol is not None and (step % cfg.eval_every == 0 or step == cfg.steps):
                evaluate_now(step)
            if stopping or step % cfg.save_every == 0 or step == cfg.steps:
                save(step)
                last_saved = step
            bar.update(1, bar.postfix)
            if stopping:
                raise Interrupted(_interrupted_message(cfg, ranks, step), stop.signum or 15)

    peaks = ranks.gather((peak_rss_bytes(), peak_vram_bytes(device)))
    if not ranks.is_main:
        return cfg.checkpoint_path
    summary = {
        **timer.totals(),
        "world_size": ranks.world_size,
        "batch_size": cfg.batch_size,
        "global_batch_size": cfg.batch_size * ranks.world_size,
        "peak_rss_bytes": max(rss for rss, _ in peaks),
        "peak_vram_bytes": None if peaks[0][1] is None else max(v for _, v in peaks),
        "device": cfg.device,
        **_final_rows(cfg.out),
    }
    if evals is not None:
        train_s = summary["seconds"] or 0.0
        summary["eval_seconds"] = evals.seconds
        summary["eval_share"] = evals.seconds / (train_s + evals.seconds) if evals.seconds else 0.0
    if ranks.distributed:
        summary["peak_rss_bytes_per_rank"] = [rss for rss, _ in peaks]
    if cfg.ddp_check:
        summary["ddp_check"] = {"steps": checked, "ranks": ranks.world_size, "passed": True}
    write_json(cfg.out / SUMMARY_FILE, summary)
    print(_summary_line(summary, cfg))
    return cfg.checkpoint_path


def _final_rows(out: Path) -> dict[str, Any]:
    """The run's last losses and last evaluation, read back from its logs (so that a run
    resumed at its last step reports them too)."""
    rows = read_metrics(out)
    last = rows[-1] if rows else {}
    evals = read_evals(out)
    return {
        "final_step": last.get("step"),
        "final_losses": {k: last[k] for k in (*UPDATE_METRICS, *DISTILL_METRICS) if k in last},
        "final_eval": evals[-1] if evals else None,
    }


@dataclass(frozen=True)
class _Stream:
    """Where one rank's random draws come from (see `_rank_stream`)."""

    seed: int  # of the rank's loader, and of its update noise when `reseed`
    loader: dict[str, Any] | None  # loader state to continue, or None: a fresh stream
    rng: dict[str, Any] | None  # generator states to continue
    reseed: bool  # seed torch/numpy/python with `seed` before the first update
    notice: str | None = None  # what rank 0 says about it


def _rank_stream(cfg: TrainConfig, ranks: Ranks, previous: dict[str, Any] | None) -> _Stream:
    """This rank's data and update-noise stream.

    A new run: `stream_seed(seed, rank, world size)`, which for a single rank is the run's
    seed and its generators as model init left them (so one process draws what it always
    did). A resume with the checkpoint's number of ranks: each rank continues its own saved
    stream exactly. A resume with another number of ranks: the model, optimisers and step
    continue, and every rank starts a fresh stream derived from (seed, rank, world size,
    step), which no earlier stream of the run shares.
    """
    if previous is None:
        seed = stream_seed(cfg.seed, ranks.rank, ranks.world_size)
        return _Stream(seed, None, None, reseed=ranks.distributed)
    saved = [{"loader": previous["loader"], "rng": previous["rng"]}, *previous["other_ranks"]]
    if len(saved) == ranks.world_size:
        mine = saved[ranks.rank]
        return _Stream(mine["loader"]["seed"], mine["loader"], mine["rng"], reseed=False)
    step = previous["step"]
    notice = (
        f"{cfg.checkpoint_path}: written by {len(saved)} rank(s), resumed by "
        f"{ranks.world_size}: model, optimisers and step {step} continue; each rank's data "
        f"stream is re-derived from (seed {cfg.seed}, rank, {ranks.world_size} ranks, step "
        f"{step}), so the batches differ from those of an uninterrupted run"
    )
    seed = stream_seed(cfg.seed, ranks.rank, ranks.world_size, step)
    return _Stream(seed, None, None, reseed=True, notice=notice)


def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


# -- checks ------------------------------------------------------------------------------------


def store_dims(store: Store) -> dict[str, Any]:
    """`ModelConfig.for_size` dims from a store's metadata. An episode of R stored rows holds
    R - 1 agent steps (row 0 is the reset observation), which sets the discount (spec A.3)."""
    n_tasks = len(store.task_names)
    return {
        "obs_dim": store.obs_dim,
        "action_dim": store.action_dim,
        "action_dims": tuple(store.action_dims),
        "episode_lengths": (store.episode_length - 1,) * n_tasks,
    }


def check_fits(what: str, path: Path, state: dict[str, Any], store: Store) -> None:
    """Refuse an official state_dict built for another task set or other dims than `store`."""
    found = official_dims(state)
    wanted = {
        "n_tasks": len(store.task_names),
        "obs_dim": store.obs_dim,
        "action_dim": store.action_dim,
        "action_dims": tuple(store.action_dims),
    }
    differ = [f"{k} {found[k]} vs {v}" for k, v in wanted.items() if k in found and found[k] != v]
    if differ:
        task_set = store.meta.get("dataset", {}).get("task_set", "?")
        raise IncompatibleDataError(
            f"{what} {path} was built for another dataset than the store {store.url} "
            f"(task set {task_set}, {wanted['n_tasks']} tasks): {'; '.join(differ)} "
            f"(checkpoint vs store). Use a checkpoint trained on this task set, or a store "
            f"built from the matching data with `datapipe build`."
        )


def _load_into(model: WorldModel, state: dict[str, Any], path: Path, dims: dict[str, Any]) -> None:
    """Load an --init file into the student, saying which --model-size it needs if it does
    not fit."""
    try:
        load_model_state(model, state)
    except CheckpointError as e:
        try:
            size = detect_model_size(state, **dims)
            hint = f"It fits a {size}M model: pass --model-size {size}."
        except CheckpointError as fit:
            hint = str(fit)
        raise CheckpointError(f"--init {path}: {e}. {hint}") from e


def _load_teacher(path: Path, size: int | None, dims: dict[str, Any]) -> WorldModel:
    try:
        teacher = load_checkpoint(path, size=size, **dims)
    except CheckpointError as e:
        raise CheckpointError(f"teacher {path}: {e}") from e
    if not teacher._reward[-1].weight.any():
        raise IncompatibleDataError(
            f"teacher {path}: its reward head was never trained (the output layer's weights "
            f"are all zero, as TD-MPC2 initialises them), so it predicts the same reward for "
            f"every transition and distilling towards it teaches nothing. Give a trained "
            f"teacher (e.g. `tools make-teacher --train-steps N --shards STORE`)"
        )
    return teacher


def _compile(model: WorldModel) -> None:
    """Compile the MLPs in place (state_dict keys unchanged); the Q ensemble stays eager."""
    for module in (model._encoder["state"], model._dynamics, model._reward, model._pi):
        module.compile()


def resume_config(out: Path, given: dict[str, Any], command: str) -> TrainConfig:
    """The settings of the run in `out` (its config.json), for `trainer <command> --out OUT
    --resume`, with the settings in `given` given again: those that change the math must
    agree with the run's; the others (--steps, logging, progress, threads) replace them."""
    path = Path(out) / CONFIG_FILE
    if not path.is_file():
        raise ResumeError(
            f"--resume: {out} holds no {CONFIG_FILE}, so no run to continue; start the run "
            f"without --resume"
        )
    try:
        saved = json.loads(path.read_text())["config"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ResumeError(
            f"{path} is damaged ({e!r}); give every setting again together with --resume"
        ) from e
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    saved = {k: v for k, v in saved.items() if k in known}
    if (command == "distill") != (saved.get("teacher") is not None):
        kind = "a distillation run" if saved.get("teacher") is not None else "a training run"
        other = "distill" if saved.get("teacher") is not None else "train"
        raise ResumeError(f"{out} holds {kind}: resume it with `trainer {other} --resume`")
    cfg = TrainConfig(**{**saved, **given, "out": out, "resume": True, "overwrite": False})
    old = TrainConfig(**{**saved, "out": out, "resume": True, "overwrite": False})
    differ = [
        f"--{k.replace('_', '-')} {getattr(old, k)} (the run's) vs {getattr(cfg, k)} (given)"
        for k in cfg.math_fields
        if k in given and getattr(cfg, k) != getattr(old, k)
    ]
    if differ:
        raise ResumeError(
            f"--resume: {'; '.join(differ)}: these change the math of the run in {out}; leave "
            f"them out to take the run's settings from {path}, or start a new run elsewhere"
        )
    return cfg


def _check_out_beside_store(cfg: TrainConfig) -> None:
    """Refuse a run folder inside the store (or the store inside the run folder): run files
    would mix with the store's, and --overwrite would delete from it."""
    if "://" in cfg.shards:
        return
    out, store = cfg.out.resolve(), Path(cfg.shards).resolve()
    if out == store or store in out.parents or out in store.parents:
        raise TrainConfigError(
            f"--out {cfg.out} and the store {cfg.shards} overlap: run files would be written "
            f"among the store's; give an --out outside the store, e.g. runs/<name>"
        )


def _previous_run(cfg: TrainConfig) -> dict[str, Any] | None:
    """The checkpoint to resume from, or None for a new run; refuses to overwrite a run
    unless told to (--overwrite), and then removes the old run's files first."""
    path = cfg.checkpoint_path
    if cfg.resume:
        if not path.is_file():
            raise ResumeError(
                f"--resume: {cfg.out} holds no {CHECKPOINT_FILE} to continue from (the run "
                f"stopped before its first checkpoint); start it again with --overwrite"
            )
        return read_training_checkpoint(path)
    found = [p for p in _run_files(cfg.out) if p.exists()]
    if found and not cfg.overwrite:
        raise ResumeError(
            f"{cfg.out} already holds a run ({', '.join(p.name for p in found)}); pass "
            f"--resume to continue it, --overwrite to delete it and start again, or choose "
            f"another --out"
        )
    for p in found:
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    return None


def _run_files(out: Path) -> list[Path]:
    """What a run writes into its folder (all of it: --overwrite deletes these)."""
    names = (
        CHECKPOINT_FILE, CONFIG_FILE, SUMMARY_FILE, *RUN_LOG_FILES, TENSORBOARD_DIR,
        WANDB_DIR, BEST_FILE, BEST_INFO_FILE,
    )  # fmt: skip
    return [out / name for name in names]


def _check_resumable(
    cfg: TrainConfig,
    previous: dict[str, Any],
    store_id: dict[str, Any],
    teacher_id: dict[str, Any] | None,
) -> None:
    old, new = previous["config"], cfg.to_dict()
    differ = [f"{k} {old.get(k)!r} -> {new[k]!r}" for k in cfg.math_fields if old.get(k) != new[k]]
    if previous["store"]["meta_sha256"] != store_id["meta_sha256"]:
        differ.append(
            f"store {previous['store']['path']} -> {store_id['path']} (other data: "
            f"meta.json sha256 {previous['store']['meta_sha256'][:12]} vs "
            f"{store_id['meta_sha256'][:12]})"
        )
    old_teacher = previous.get("teacher")
    if (old_teacher is None) != (teacher_id is None) or (
        teacher_id is not None and old_teacher["sha256"] != teacher_id["sha256"]
    ):
        describe = lambda t: "none" if t is None else f"{t['path']} (sha256 {t['sha256'][:12]})"  # noqa: E731
        differ.append(f"teacher {describe(old_teacher)} -> {describe(teacher_id)}")
    if differ:
        raise ResumeError(
            f"cannot resume {cfg.checkpoint_path}: settings that change the math differ from "
            f"the run's: {'; '.join(differ)}. Resume with the run's settings (see "
            f"{cfg.out / CONFIG_FILE}) or start a new run in another --out."
        )
    if cfg.steps < previous["step"]:
        raise ResumeError(
            f"cannot resume {cfg.checkpoint_path}: it is at step {previous['step']}, past "
            f"--steps {cfg.steps}; give --steps >= {previous['step']}"
        )


# -- reporting ---------------------------------------------------------------------------------


def _diverged_message(
    step: int, bad: dict[str, float], cfg: TrainConfig, last_saved: int | None
) -> str:
    values = ", ".join(f"{k}={v}" for k, v in bad.items())
    if last_saved is None:
        where = f"no checkpoint was written before it (save_every={cfg.save_every})"
    else:
        where = (
            f"the last good checkpoint is {cfg.checkpoint_path} (step {last_saved}); "
            f"`trainer export` turns it into a file a new run can start from with --init"
        )
    return f"non-finite loss at step {step} ({values}): the run stopped; {where}"


def _interrupted_message(cfg: TrainConfig, ranks: Ranks, step: int) -> str:
    command = "distill" if cfg.teacher is not None else "train"
    launcher = "trainer"
    if ranks.distributed:
        launcher = f"torchrun --nproc-per-node {ranks.world_size} -m trainer"
    return (
        f"{cfg.out}: stopped at step {step} of {cfg.steps}; checkpoint {cfg.checkpoint_path}. "
        f"Resume with: {launcher} {command} --out {cfg.out} --resume"
    )


def _start_line(cfg: TrainConfig, ranks: Ranks, start: int) -> str:
    what = "distill" if cfg.teacher is not None else "train"
    batch = f"batch {cfg.batch_size}"
    if ranks.distributed:
        batch = (
            f"batch {cfg.batch_size} per rank x {ranks.world_size} ranks = global batch "
            f"{cfg.batch_size * ranks.world_size}"
        )
    return f"{cfg.out}: {what} from step {start} to {cfg.steps}, {batch}, on {cfg.device}"


def _summary_line(summary: dict[str, Any], cfg: TrainConfig) -> str:
    if not summary["steps"]:
        return f"{cfg.out}: already at step {cfg.steps}, nothing to do"
    vram = summary["peak_vram_bytes"]
    where = cfg.device
    if summary["world_size"] > 1:
        where += f" x {summary['world_size']} ranks (global batch {summary['global_batch_size']})"
    return (
        f"{cfg.out}: {summary['steps']} steps in {summary['seconds']:.1f} s on {where}: "
        f"{summary['steps_per_s']:.2f} steps/s, {summary['data_wait']:.1%} waiting for data, "
        f"peak RSS {summary['peak_rss_bytes'] / 2**30:.2f} GiB"
        + ("" if vram is None else f", peak VRAM {vram / 2**30:.2f} GiB")
        + f"; checkpoint {cfg.checkpoint_path}"
    )
