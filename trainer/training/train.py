"""`trainer train` and `trainer distill`: offline TD-MPC2 training on a store, optionally with
a frozen teacher whose rewards the student is distilled towards (docs/distillation.md#loss).

Owns `train(cfg)`, read top to bottom: `_Run.setup` (store, student, teacher, loader, resume
state, logs), `_loop` (the steps, on one screen), `_summary`; and the checks that the store,
the student and the teacher fit together. The settings are `trainer.training.config.TrainConfig`;
whether a run may start or continue in its folder, `trainer.training.runfolder`; each rank's random
stream, `trainer.training.distributed`; the update, `TDMPC2Agent.update`; the checkpoint format,
`trainer.training.runstate`; the log files, `trainer.training.runlog`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from datapipe.loader import SliceLoader
from datapipe.location import only_writer
from datapipe.progress import Progress
from datapipe.store import Store, open_store
from trainer.errors import DivergedError, IncompatibleDataError, ResumeError, TrainConfigError
from trainer.model.checkpoint import (
    CheckpointError,
    detect_model_size,
    load_model_state,
    model_from_state,
    official_dims,
    read_checkpoint,
)
from trainer.model.presets import ModelConfig
from trainer.model.world import WorldModel
from trainer.stop import Interrupted, StopRequest
from trainer.training.agent import TDMPC2Agent, metric_floats, prepare_teacher, stack_metrics
from trainer.training.config import TEACHER_DTYPES, TrainConfig
from trainer.training.distributed import (
    DataParallelUpdate,
    Ranks,
    check_replicas,
    process_group,
    rank_stream,
)
from trainer.training.runfolder import (
    CONFIG_FILE,
    SUMMARY_FILE,
    check_out_beside_store,
    check_resumable,
    discard_run,
    previous_run,
)
from trainer.training.runlog import (
    DISTILL_METRICS,
    UPDATE_METRICS,
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
from trainer.training.runstate import (
    rng_state,
    set_rng_state,
    store_identity,
    teacher_identity,
    write_json,
    write_training_checkpoint,
)
from trainer.training.traineval import TrainingEval


def train(cfg: TrainConfig) -> Path:
    """Run (or resume) the training described by `cfg`; return the last checkpoint's path.

    Without a teacher this is plain offline TD-MPC2 training; with one, the student's loss
    gains `d_coef * MSE(r_student, r_teacher)` (docs/distillation.md#loss). Metrics go to
    OUT/metrics.csv and .jsonl (and TensorBoard), checkpoints to OUT/checkpoint.pt every
    save_every steps.

    Started by torchrun (WORLD_SIZE > 1), every rank runs this function: DDP keeps the student
    identical on all ranks, each rank loads the teacher and samples its own batches, and only
    rank 0 reads and writes OUT (`trainer.training.distributed`).
    """
    cfg = cfg.resolve()
    ranks = Ranks.from_env()
    device = ranks.device(cfg.device)
    protocol = cfg.eval_protocol  # evaluated on rank 0 while the other ranks wait for it
    check_out_beside_store(cfg)
    with (
        process_group(ranks, device, None if protocol is None else protocol.wait()),
        contextlib.ExitStack() as held,
    ):
        lock = only_writer(cfg.out, "another `trainer train/distill`", ResumeError)
        ranks.on_main(lambda: held.enter_context(lock))  # one run per folder; rank 0 writes
        try:
            return _train(cfg, ranks, device)
        except (MemoryError, RuntimeError) as e:
            if not _out_of_memory(e):
                raise
            kept = cfg.checkpoint_path.is_file()
            if not kept:
                ranks.on_main(lambda: discard_run(cfg.out))  # never trained a step: nothing lost
            raise TrainConfigError(
                f"--batch-size {cfg.batch_size}: {cfg.device} ran out of memory ({_first_line(e)})"
                f". Use a smaller --batch-size; "
                + (
                    f"{cfg.out} keeps its last checkpoint."
                    if kept
                    else f"nothing was kept in {cfg.out}, so the same command with a smaller "
                    f"batch starts it."
                )
            ) from None


def _out_of_memory(e: BaseException) -> bool:
    """An allocation failure: MemoryError (numpy), torch's OutOfMemoryError (CUDA) or the CPU
    allocator's RuntimeError."""
    text = str(e)
    return (
        isinstance(e, MemoryError)
        or type(e).__name__ == "OutOfMemoryError"
        or "can't allocate memory" in text
        or "out of memory" in text.lower()
    )


def _first_line(e: BaseException) -> str:
    line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return line.split("DefaultCPUAllocator: ", 1)[-1]  # not the "[enforce fail at ...]" part


def _train(cfg: TrainConfig, ranks: Ranks, device: torch.device) -> Path:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)  # process-wide; on a shared CPU 1 can beat 2-3x
    if device.type == "cuda":  # the official code's default is TF32 on
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = cfg.tf32
    if cfg.tensorboard:
        summary_writer_class()  # fail now, not after loading everything
    if cfg.wandb:
        wandb_module()
    previous = ranks.on_main(lambda: previous_run(cfg))  # rank 0 owns OUT; all get its answer
    run = _Run.setup(cfg, ranks, device, previous)
    with (
        StopRequest("finishing this step, then writing a checkpoint") as stop,
        run.loader,
        run.log,
        Progress(
            cfg.steps,
            "distill" if cfg.teacher is not None else "train",
            "step",
            enabled=cfg.progress and ranks.is_main,
            initial=run.start,
        ) as bar,
    ):
        _loop(cfg, run, stop, bar)
    summary = _summary(cfg, run)  # every rank takes part: it gathers their memory peaks
    if ranks.is_main:
        write_json(cfg.out / SUMMARY_FILE, summary)
        print(_summary_line(summary, cfg))
    return cfg.checkpoint_path


def _loop(cfg: TrainConfig, run: _Run, stop: StopRequest, bar: Progress) -> None:
    """Steps start + 1 .. cfg.steps: update, log, evaluate and save on schedule. On CUDA the
    loader copies batch k + 1 while the update runs on batch k. A step reads no device value:
    the metrics stay on the device until a log step, and a non-finite one is caught there (or
    before an evaluation or a save) and named by its own step. With several ranks, stopping
    is agreed every step, which reads one value."""
    last_saved = run.start if run.resumed else None
    nonfinite = _FirstNonFinite()
    if run.evaluating and not run.resumed:
        run.evaluate(0, bar)
    for step in range(run.start + 1, cfg.steps + 1):
        t0 = time.perf_counter()
        batch = next(run.loader)
        t1 = time.perf_counter()
        d_coef = cfg.d_coef_at(step - 1)
        info = run.update(*batch, run.teacher, d_coef, cfg.distill)
        stopping = stop.requested
        if run.ranks.distributed:  # reduced with the losses: all ranks agree
            info = run.ranks.mean({**info, "stop": float(stop.requested)}, run.device)
            stopping = float(info.pop("stop")) > 0
        stopping = stopping and step < cfg.steps
        run.timer.add(wait=t1 - t0, busy=time.perf_counter() - t1)
        if cfg.ddp_check:
            check_replicas(run.agent, tuple(batch), step, run.ranks)
            run.checked += 1
        nonfinite.add(step, info)
        logging = step % cfg.log_every == 0 or step == cfg.steps
        evaluating = run.evaluating and (step % cfg.eval_every == 0 or step == cfg.steps)
        saving = stopping or step % cfg.save_every == 0 or step == cfg.steps
        if logging or evaluating or saving:
            first = nonfinite.first()
            if first is not None:
                bad_step, values = first
                run.log.write(bad_step, values)
                bad = {k: v for k, v in values.items() if not math.isfinite(v)}
                raise DivergedError(_diverged_message(bad_step, bad, cfg, last_saved))
        if logging:
            row = metric_floats(info)
            if run.teacher is not None:
                row["d_coef"] = d_coef
            row |= run.timer.close_window(step)
            run.log.write(step, row)
            bar.postfix = (
                f"reward loss {row['reward_loss']:.3f}, total {row['total_loss']:.3f}, "
                f"data wait {row['data_wait']:.0%}"
            )
        if evaluating:
            run.evaluate(step, bar)
        if saving:
            run.save(step)
            last_saved = step
        bar.update(1, bar.postfix)
        if stopping:
            raise Interrupted(_interrupted_message(cfg, run.ranks, step), stop.signum or 15)


class _FirstNonFinite:
    """The first step whose metrics were not all finite, and its metrics, kept on the device
    with no read per step; `first()` reads them (one transfer)."""

    def __init__(self) -> None:
        self.step: torch.Tensor | None = None  # int64, 0 while every step was finite
        self.values: torch.Tensor | None = None
        self.names: list[str] = []

    def add(self, step: int, info: dict) -> None:
        v = stack_metrics(info)
        if self.step is None:
            self.step = torch.zeros((), dtype=torch.int64, device=v.device)
            self.values, self.names = torch.zeros_like(v), list(info)
        new = torch.isfinite(v).all().logical_not() & (self.step == 0)
        self.step = self.step.masked_fill(new, step)
        self.values = torch.where(new, v, self.values)

    def first(self) -> tuple[int, dict[str, float]] | None:
        if self.step is None or int(self.step) == 0:
            return None
        return int(self.step), dict(zip(self.names, self.values.tolist(), strict=True))


@dataclasses.dataclass
class _Run:
    """The parts of one run that the loop drives, built by `setup` in a fixed order (the
    order decides the random streams, so that a resumed run equals an uninterrupted one)."""

    cfg: TrainConfig
    ranks: Ranks
    device: torch.device
    agent: TDMPC2Agent
    teacher: WorldModel | None
    loader: SliceLoader
    update: Any  # agent.update, or its DataParallelUpdate under torchrun
    description: dict[str, Any]  # what config.json and every checkpoint say the run is
    start: int  # the last step done before this process
    resumed: bool
    log: MetricsLog | NullLog
    evals: TrainingEval | None  # rank 0 of a run with --eval-every
    evaluating: bool  # the run evaluates its student during training (every rank: the others wait)
    timer: StepTimer
    checked: int = 0  # steps whose replicas --ddp-check compared

    @classmethod
    def setup(
        cls, cfg: TrainConfig, ranks: Ranks, device: torch.device, previous: dict | None
    ) -> _Run:
        # The store decides the dims; an --init student or a teacher must be built for them.
        store = open_store(cfg.shards)
        dims = store_dims(store)
        model_cfg = dataclasses.replace(
            ModelConfig.for_size(cfg.model_size, **dims), horizon=cfg.horizon
        )
        store_id = store_identity(store)
        teacher_state = teacher_id = None
        if cfg.teacher is not None:
            teacher_state = read_checkpoint(cfg.teacher)
            check_fits("teacher", cfg.teacher, teacher_state, store)
            teacher_id = teacher_identity(cfg.teacher)
        if previous is not None:
            check_resumable(cfg, previous, store_id, teacher_id)
        init_state = None
        if cfg.init is not None and previous is None:
            init_state = read_checkpoint(cfg.init)
            check_fits("--init student", cfg.init, init_state, store)

        # Student (seeded alike on every rank), teacher (frozen; its construction leaves the
        # student's random stream alone, so a distillation run with d_coef=0 is plain
        # training), loader (seeded per rank, see trainer.training.distributed.rank_stream).
        _seed_all(cfg.seed)
        agent = TDMPC2Agent(model_cfg, device)
        agent.amp = torch.bfloat16 if cfg.amp else None
        if init_state is not None:
            _load_into(agent.model, init_state, cfg.init, dims)
        teacher = None
        if teacher_state is not None:
            with torch.random.fork_rng(devices=[]):
                teacher = load_teacher(cfg.teacher, teacher_state, cfg.teacher_size, dims)
            teacher = prepare_teacher(teacher, TEACHER_DTYPES[cfg.teacher_dtype], device)
            teacher_id["size"] = teacher.cfg.model_size
        stream = rank_stream(cfg.seed, cfg.checkpoint_path, ranks, previous)
        try:
            loader = SliceLoader(
                store,
                batch_size=cfg.batch_size,
                horizon=cfg.horizon,
                device=device,
                seed=stream.seed,
                cache_gb=cfg.cache_gb,
                refill_size=cfg.refill_size,
                refill_every=cfg.refill_every,
                sampler=cfg.sampler,
            )
        except ValueError as e:  # a pool too small for this store's episodes, a bad horizon
            raise TrainConfigError(f"{cfg.shards}: {e}") from None
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
        if cfg.compile and ranks.distributed:
            raise TrainConfigError(
                "--compile under torchrun: not supported yet (the compiled update is not "
                "wrapped for data-parallel training); leave out --compile"
            )
        if cfg.compile:
            update = compile_update(update, device)

        description = {
            "config": cfg.to_dict(),
            "model_config": dataclasses.asdict(model_cfg),
            "store": store_id,
            "teacher": teacher_id,
            "world_size": ranks.world_size,
            "global_batch_size": cfg.batch_size * ranks.world_size,
        }
        resume_step = start if previous is not None else None
        log, evals = NullLog(), None
        protocol = cfg.eval_protocol
        if ranks.is_main:
            write_json(
                cfg.out / CONFIG_FILE,
                {**description, "start_step": start, "torch": str(torch.__version__)},
            )
            if stream.notice:
                print(stream.notice)
            print(_start_line(cfg, ranks, start))
            log = MetricsLog(cfg.out, cfg.tensorboard, resume_step, cfg.wandb, description)
            if protocol is not None:
                eval_log = EvalLog(cfg.out, protocol.tasks, log, resume_step)
                saved = None if previous is None else previous.get("eval")
                evals = TrainingEval(protocol, cfg.out, eval_log, saved, compile=cfg.compile)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        return cls(
            cfg, ranks, device, agent, teacher, loader, update, description, start,
            previous is not None, log, evals, protocol is not None, StepTimer(start),
        )  # fmt: skip

    def evaluate(self, step: int, bar: Progress) -> None:
        """Rank 0 evaluates the student; the other ranks wait for it."""
        if self.evals is not None:
            row = self.evals.run(self.agent.model, step)
            bar.write(
                f"{self.cfg.out}: step {step}: normalized score {row['normalized_score']:.2f}"
            )
        self.ranks.barrier()

    def save(self, step: int) -> None:
        """Every rank hands its stream position to rank 0, which writes the checkpoint."""
        streams = self.ranks.gather(
            {"loader": self.loader.state_dict(), "rng": rng_state(self.device)}
        )
        if self.ranks.is_main:
            write_training_checkpoint(
                self.cfg.checkpoint_path,
                step=step,
                agent=self.agent.state_dict(),
                loader=streams[0]["loader"],
                rng=streams[0]["rng"],
                other_ranks=streams[1:],
                eval=None if self.evals is None else self.evals.state_dict(),
                **self.description,
            )
        self.ranks.barrier()  # no rank runs ahead of a checkpoint that may yet fail


def _summary(cfg: TrainConfig, run: _Run) -> dict[str, Any]:
    """summary.json: time, throughput, memory, the final losses and eval (on rank 0)."""
    peaks = run.ranks.gather((peak_rss_bytes(), peak_vram_bytes(run.device)))
    if not run.ranks.is_main:
        return {}
    summary = {
        **run.timer.totals(),
        "world_size": run.ranks.world_size,
        "batch_size": cfg.batch_size,
        "global_batch_size": cfg.batch_size * run.ranks.world_size,
        "peak_rss_bytes": max(rss for rss, _ in peaks),
        "peak_vram_bytes": None if peaks[0][1] is None else max(v for _, v in peaks),
        "device": cfg.device,
        **_final_rows(cfg.out),
    }
    if run.evals is not None:
        train_s = summary["seconds"] or 0.0
        seconds = run.evals.seconds
        summary["eval_seconds"] = seconds
        summary["eval_share"] = seconds / (train_s + seconds) if seconds else 0.0
    if run.ranks.distributed:
        summary["peak_rss_bytes_per_rank"] = [rss for rss, _ in peaks]
    if cfg.ddp_check:
        summary["ddp_check"] = {"steps": run.checked, "ranks": run.ranks.world_size, "passed": True}
    return summary


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


# -- checks ------------------------------------------------------------------------------------


def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def store_dims(store: Store) -> dict[str, Any]:
    """`ModelConfig.for_size` dims from a store's metadata. An episode of R stored rows holds
    R - 1 agent steps (row 0 is the reset observation), which sets the discount
    (docs/tdmpc2.md#discount)."""
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
        raise IncompatibleDataError(
            f"{what} {path} was built for another dataset than the store {store.url} "
            f"(task set {store.meta.task_set}, {wanted['n_tasks']} tasks): {'; '.join(differ)} "
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


def load_teacher(
    path: Path, state: dict[str, Any], size: int | None, dims: dict[str, Any]
) -> WorldModel:
    try:
        teacher = model_from_state(state, path, size=size, **dims)
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


def compile_update(update: Callable[..., dict[str, Tensor]], device: torch.device):
    """The whole update compiled, as the official `compile: true` compiles its `_update`:
    losses, backward, clipping, both Adam steps and the Polyak update. PyTorch itself breaks
    the graph at each `backward()` and around each `optimizer.step()` (torch/optim's
    `_use_grad`), so it runs as a few compiled graphs; nothing of ours breaks it, and none
    recompiles after the first step (tests/test_compile.py). CUDA: mode "reduce-overhead"
    (CUDA graphs; a new graph step is marked before each call and the metrics are copied
    out, since a graph's next replay overwrites its outputs). Inductor draws its random
    numbers with the eager ops (`fallback_random`), so a compiled run uses the same dropout,
    Q-member and policy-noise draws as an eager one and differs from it by float32
    rounding only."""
    import torch._inductor.config as inductor

    inductor.fallback_random = True
    if device.type != "cuda":
        return torch.compile(update)
    compiled = torch.compile(update, mode="reduce-overhead")

    def step(*args: Any) -> dict[str, Tensor]:
        torch.compiler.cudagraph_mark_step_begin()
        return {k: v.clone() for k, v in compiled(*args).items()}

    return step


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
