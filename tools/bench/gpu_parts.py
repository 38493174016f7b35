"""The measurements of `tools bench-gpu`, one function per part, each run in its own process.

`tools.bench.gpu` starts `python -m tools.bench.gpu_parts PART SETTINGS RESULT` for every
part with its own time cap; the part writes RESULT (JSON, atomically) as it goes, so a part
that runs out of time still leaves what it finished. Everything runs on CPU as well (the dry
run), where the CUDA-only calls of the measurements are answered by `Accel` for the CPU.

The CUDA-only data path (pinned host buffers, the copy one batch ahead on a side stream) is
`datapipe.SliceLoader`'s own, chosen by its `device`; the loader part compares it with the
plain path: a CPU loader whose batches are copied synchronously (`Batch.to`).
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from datapipe.loader import Batch, SliceLoader
from datapipe.store import open_store
from tools.make_teacher import make_teacher
from trainer.evaluation.plan import OFFICIAL_MPPI, MPPIConfig, plan
from trainer.model.checkpoint import load_checkpoint
from trainer.model.presets import ModelConfig
from trainer.model.world import WorldModel
from trainer.training.agent import TDMPC2Agent, prepare_teacher
from trainer.training.config import TEACHER_DTYPES
from trainer.training.runlog import StepTimer
from trainer.training.runstate import write_json
from trainer.training.train import compile_update, store_dims

# Training modes of the grid: (compile the whole update, bf16 autocast of the forward losses,
# teacher dtype).
MODES = {
    "fp32": (False, False, "float32"),
    "bf16-teacher": (False, False, "bfloat16"),
    "amp": (False, True, "float32"),
    "compile": (True, False, "float32"),
    "compile-amp": (True, True, "float32"),
}
FASTEST = "compile-amp"  # expected fastest mode: measured right after eager and compiled fp32
PLAN_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
D_COEF = 0.4  # the paper's best distillation weight


@dataclass(frozen=True)
class Sizes:
    """What one run measures: the device grid, or the dry run's tiny one."""

    episodes_per_task: int  # of the synthetic store the parts read
    teachers: tuple[int | None, ...]  # in priority order; None: no teacher
    batch_sizes: tuple[int, ...]  # in priority order
    modes: tuple[str, ...]  # keys of MODES
    warmup_steps: int  # steps before the timed windows (a compiled model compiles here)
    window_steps: int  # steps per timed window
    windows: int  # timed windows per grid cell (fewer when the part's time runs out)
    loader_steps: int  # steps (and batches) of each loader measurement
    plan_envs: tuple[int, ...]  # environments planned in lockstep
    plan_dtypes: tuple[str, ...]  # model dtypes of the planner
    plan_steps: int  # timed planning steps per (envs, dtype)
    distill_steps: int  # steps of the torchrun run
    plan_samples: int = OFFICIAL_MPPI.num_samples  # MPPI trajectories per iteration
    plan_iterations: int = OFFICIAL_MPPI.iterations  # MPPI iterations per planning step
    student: int = 1
    horizon: int = 3


DEVICE_SIZES = Sizes(
    episodes_per_task=10, teachers=(317, None, 48, 5), batch_sizes=(256, 1024),
    modes=tuple(MODES), warmup_steps=10, window_steps=25, windows=5, loader_steps=100,
    plan_envs=(1, 30, 300), plan_dtypes=tuple(PLAN_DTYPES), plan_steps=5, distill_steps=10,
)  # fmt: skip
DRY_SIZES = Sizes(
    episodes_per_task=2, teachers=(5, None), batch_sizes=(16,),
    modes=("fp32", "bf16-teacher", "amp"), warmup_steps=1, window_steps=2, windows=2,
    loader_steps=4, plan_envs=(1, 4), plan_dtypes=tuple(PLAN_DTYPES), plan_steps=1,
    distill_steps=2, plan_samples=32, plan_iterations=1,
)  # fmt: skip


class Accel:
    """The CUDA-only calls of the measurements, with their CPU answers: a CPU needs no
    synchronisation, frees nothing and has no allocator peaks (None)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        """Wait for the device's queued work (before reading a clock)."""
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def free(self) -> None:
        """Drop what earlier measurements left cached, and start the peaks afresh."""
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)

    def peaks(self) -> dict[str, int | None]:
        """`max_memory_allocated` and `max_memory_reserved` since `free`, in bytes."""
        if not self.cuda:
            return {"max_allocated_bytes": None, "max_reserved_bytes": None}
        return {
            "max_allocated_bytes": torch.cuda.max_memory_allocated(self.device),
            "max_reserved_bytes": torch.cuda.max_memory_reserved(self.device),
        }

    def describe(self) -> dict[str, Any]:
        """The device: name, memory and CUDA versions (CPU: the processor)."""
        if not self.cuda:
            return {"device": "cpu", "name": platform.processor() or platform.machine()}
        props = torch.cuda.get_device_properties(self.device)
        return {
            "device": "cuda",
            "name": props.name,
            "memory_bytes": props.total_memory,
            "multiprocessors": props.multi_processor_count,
            "capability": f"{props.major}.{props.minor}",
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(),
            "driver": _nvidia_smi("driver_version"),
        }


def _nvidia_smi(field: str) -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unknown ({e})"
    return out.stdout.strip() or f"unknown (nvidia-smi exit {out.returncode})"


@dataclass(frozen=True)
class PartArgs:
    """What the orchestrator hands every part (as JSON on its command line)."""

    sizes: Sizes
    store: str  # the synthetic store (made by the `data` part)
    work: str  # scratch folder: teacher files, run folders
    device: str  # cpu or cuda
    deadline: float  # time.time() by which the part must have finished
    official: str | None = None  # the official TD-MPC2 checkout (part `official`)
    env_steps_per_s: float = 7860.0  # physics cost of the evaluation projection

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> PartArgs:
        d = json.loads(text)
        sizes = {k: tuple(v) if isinstance(v, list) else v for k, v in d.pop("sizes").items()}
        return cls(sizes=Sizes(**sizes), **d)

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    def left(self) -> float:
        return self.deadline - time.time()


# -- parts -------------------------------------------------------------------------------------


def machine_part(args: PartArgs, report: Callable[[dict], None]) -> None:
    """The machine: device, torch, Python, cores."""
    report({
        **Accel(args.torch_device).describe(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
    })  # fmt: skip


def data_part(args: PartArgs, report: Callable[[dict], None]) -> None:
    """The synthetic MT30-format store every other part reads (made once, then reused)."""
    from datapipe.build import BuildConfig, build
    from tools.make_mt30 import MakeConfig, make_mt30

    store = Path(args.store)
    if not (store / "meta.json").is_file():
        src = Path(args.work) / "src"
        make_mt30(MakeConfig(dst=src, episodes_per_task=args.sizes.episodes_per_task, chunks=1))
        build(BuildConfig(src=src, dst=store, formats=("zarr",), workers=0, progress=False))
    s = open_store(store)
    report({"store": str(store), "episodes": s.n_episodes, "tasks": len(s.task_names)})


def train_part(args: PartArgs, report: Callable[[dict], None]) -> None:
    """Steps/s, data-wait share and memory of every grid cell, in priority order, until the
    part's time runs out; the cells left out are listed."""
    cells = grid(args.sizes)
    rows: list[dict] = []
    state = {"planned": [c["label"] for c in cells], "cells": rows, "left_out": []}
    teachers = _TeacherCache(args)
    for i, cell in enumerate(cells):
        if args.left() < _min_cell_seconds(cell):
            state["left_out"] = [c["label"] for c in cells[i:]]
            break
        rows.append(_guarded(cell, lambda cell=cell: measure_cell(args, cell, teachers)))
        report(state)
    report(state)


def grid(sizes: Sizes) -> list[dict[str, Any]]:
    """The training cells in the order they are measured: first the paper's setting (first
    teacher, first batch size) eager (sync-free since issue 20), compiled and in the fastest
    mode, then no teacher likewise, then every other mode and teacher, then the other batch
    sizes in the same order."""
    cells = []
    for batch in sizes.batch_sizes:
        first = [m for m in ("fp32", "compile", FASTEST) if m in sizes.modes]
        lead = [t for t in (sizes.teachers[0], None) if t in sizes.teachers]
        ordered = [(t, m) for t in lead for m in first]
        ordered += [(t, m) for t in sizes.teachers for m in sizes.modes if (t, m) not in ordered]
        for teacher, mode in ordered:
            if teacher is None and MODES[mode][2] != "float32":
                continue  # no teacher: the teacher dtype changes nothing
            label = f"B={batch} teacher={teacher or 'none'} {mode}"
            cells.append({"label": label, "batch": batch, "teacher": teacher, "mode": mode})
    return cells


def _min_cell_seconds(cell: dict) -> float:
    """Time a cell needs at least to give one timed window (a compile warm-up is long)."""
    return 90.0 if MODES[cell["mode"]][0] else 15.0


def _guarded(cell: dict, measure: Callable[[], dict]) -> dict:
    """One cell's figures, or its error: a failed cell does not stop the grid."""
    try:
        return {**cell, "status": "ok", **measure()}
    except Exception as e:  # recorded with its type and traceback (in the part's log)
        traceback.print_exc()
        return {**cell, "status": "failed", "error": f"{type(e).__name__}: {e}"}


class _TeacherCache:
    """Teachers of official architecture, random init with a non-zero reward head, written by
    `tools make-teacher` on first use and kept on the host (each cell copies one to the
    device, so a cell's memory peak holds its own teacher only)."""

    def __init__(self, args: PartArgs) -> None:
        self.args, self.models = args, {}

    def get(self, size: int, dtype: str) -> WorldModel:
        if size not in self.models:
            path = teacher_file(Path(self.args.work), size)
            dims = store_dims(open_store(self.args.store))
            self.models[size] = load_checkpoint(path, size=size, **dims)
        device = self.args.torch_device
        return prepare_teacher(copy.deepcopy(self.models[size]), TEACHER_DTYPES[dtype], device)


def teacher_file(work: Path, size: int) -> Path:
    """The teacher file of `size` in `work`, written by `make_teacher` if not there yet."""
    path = work / "teachers" / f"teacher-{size}M.pt"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        make_teacher(size, path, seed=0, nonzero_reward=True)
    return path


def measure_cell(args: PartArgs, cell: dict, teachers: _TeacherCache) -> dict[str, Any]:
    """One grid cell: warm-up (timed apart: compilation happens there), then timed windows."""
    sizes, device, accel = args.sizes, args.torch_device, Accel(args.torch_device)
    compiled, amp, teacher_dtype = MODES[cell["mode"]]
    accel.free()
    agent, teacher = _student(args), None
    if cell["teacher"] is not None:
        teacher = teachers.get(cell["teacher"], teacher_dtype)
    if compiled:
        torch._dynamo.reset()  # each cell compiles its own update: no limits carried across
    update = compile_update(agent.update, device) if compiled else agent.update
    agent.amp = torch.bfloat16 if amp else None

    losses = []

    def step(batch: Batch) -> None:
        info = update(*batch, teacher, D_COEF if teacher is not None else 0.0, "first")
        losses.append(info["total_loss"])

    with _loader(args, cell["batch"], device) as loader:
        t0 = time.perf_counter()
        step(next(loader))
        accel.sync()
        first_step_s = time.perf_counter() - t0
        for _ in range(sizes.warmup_steps - 1):
            step(next(loader))
        accel.sync()
        warmup_s = time.perf_counter() - t0
        windows = _timed_windows(args, loader, step, accel)
    return {
        **summarise(windows, first_step_s, warmup_s, accel.peaks()),
        "last_loss": float(losses[-1]),
    }


def _student(args: PartArgs) -> TDMPC2Agent:
    dims = store_dims(open_store(args.store))
    cfg = ModelConfig.for_size(args.sizes.student, **dims)
    torch.manual_seed(0)
    return TDMPC2Agent(dataclasses.replace(cfg, horizon=args.sizes.horizon), args.torch_device)


def _loader(args: PartArgs, batch: int, device: torch.device) -> SliceLoader:
    return SliceLoader(args.store, batch_size=batch, horizon=args.sizes.horizon, device=device,
                       seed=0, cache_gb=0.25)  # fmt: skip


def _timed_windows(
    args: PartArgs, batches: Iterator[Batch], step: Callable[[Batch], None], accel: Accel
) -> list[dict[str, float]]:
    """Windows of `window_steps` steps (fewer windows when the part's time runs short):
    steps/s and the share of the time spent in `next(batches)`, as `trainer train` logs them."""
    sizes, windows, done = args.sizes, [], 0
    timer = StepTimer(0)
    while len(windows) < sizes.windows and (not windows or args.left() > 10):
        for i in range(sizes.window_steps):
            t0 = time.perf_counter()
            batch = next(batches)
            t1 = time.perf_counter()
            step(batch)
            if i == sizes.window_steps - 1:
                accel.sync()  # the window's queued work counts in its last step
            timer.add(wait=t1 - t0, busy=time.perf_counter() - t1)
            done += 1
        windows.append(timer.close_window(done))
    return windows


def summarise(
    windows: list[dict[str, float]], first_step_s: float, warmup_s: float, peaks: dict
) -> dict[str, Any]:
    """A cell's row: median steps/s and data wait over its windows, the projected wall time
    of the paper's 1M steps, the warm-up and the memory peaks."""
    steps_per_s = statistics.median(w["steps_per_s"] for w in windows)
    return {
        "steps_per_s": steps_per_s,
        "data_wait": statistics.median(w["data_wait"] for w in windows),
        "windows": len(windows),
        "projected_1M_steps_h": 1e6 / steps_per_s / 3600,
        "first_step_s": first_step_s,
        "warmup_s": warmup_s,
        **peaks,
    }


def loader_part(args: PartArgs, report: Callable[[dict], None]) -> None:
    """The loader on the device: the step (1M student, no teacher) with the loader's own
    device path (on CUDA: pinned buffers, copy one batch ahead) against a CPU loader whose
    batches are copied synchronously; then the loader's batches/s on its own."""
    sizes, device, accel = args.sizes, args.torch_device, Accel(args.torch_device)
    batch, rows = sizes.batch_sizes[0], {}
    for name, loader_device in (("prefetch on", device), ("prefetch off", torch.device("cpu"))):
        agent = _student(args)
        with _loader(args, batch, loader_device) as loader:
            batches = (b.to(device) for b in loader)
            step = lambda b, agent=agent: agent.update(*b)  # noqa: E731
            for _ in range(sizes.warmup_steps):
                step(next(batches))
            windows = _timed_windows(args, batches, step, accel)
        rows[name] = {
            "step_ms": 1e3 / statistics.median(w["steps_per_s"] for w in windows),
            "data_wait": statistics.median(w["data_wait"] for w in windows),
        }
        report({"batch": batch, **rows})
    with _loader(args, batch, device) as loader:
        next(loader)
        accel.sync()
        t0 = time.perf_counter()
        for _ in range(sizes.loader_steps):
            next(loader)
        accel.sync()
        rows["loader alone"] = {"batches_per_s": sizes.loader_steps / (time.perf_counter() - t0)}
    report({"batch": batch, **rows})


def plan_part(args: PartArgs, report: Callable[[dict], None]) -> None:
    """Batched MPPI (official parameters) on random observations, no physics: seconds per
    planning step for each number of environments and model dtype, and the projected wall
    time of MT30 evaluation (30 tasks x 10 episodes x 500 steps)."""
    sizes, device, accel = args.sizes, args.torch_device, Accel(args.torch_device)
    dims = store_dims(open_store(args.store))
    torch.manual_seed(0)
    base = WorldModel(ModelConfig.for_size(sizes.student, **dims)).to(device).eval()
    n_tasks = len(dims["action_dims"])
    mppi = planner(sizes)
    rows: list[dict] = []
    for dtype in sizes.plan_dtypes:
        model = copy.deepcopy(base).to(PLAN_DTYPES[dtype])
        for n in sizes.plan_envs:
            obs = torch.randn(n, dims["obs_dim"], device=device)
            task = torch.arange(n, device=device) % n_tasks
            step_s = _time_plans(model, obs, task, mppi, sizes.plan_steps, accel)
            projected = project_eval(step_s, n, args.env_steps_per_s)
            rows.append({"dtype": dtype, "envs": n, "plan_step_s": step_s, **projected})
            report({"rows": rows, "mppi": dataclasses.asdict(mppi)})


def planner(sizes: Sizes) -> MPPIConfig:
    """The official MPPI parameters, with fewer samples and iterations where `sizes` asks."""
    samples = sizes.plan_samples
    return dataclasses.replace(
        OFFICIAL_MPPI, num_samples=samples, iterations=sizes.plan_iterations,
        num_pi_trajs=min(OFFICIAL_MPPI.num_pi_trajs, samples // 4),
        num_elites=min(OFFICIAL_MPPI.num_elites, samples // 4),
    )  # fmt: skip


def _time_plans(model: WorldModel, obs, task, mppi: MPPIConfig, steps: int, accel: Accel) -> float:
    """Median seconds of one planning step (after one untimed step, whose mean warm-starts
    the next as in an episode)."""
    _, mean = plan(model, obs, task, cfg=mppi)
    times = []
    for _ in range(steps):
        accel.sync()
        t0 = time.perf_counter()
        _, mean = plan(model, obs, task, mean, mppi)
        accel.sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


EVAL_EPISODES, EVAL_STEPS = 30 * 10, 500  # MT30 evaluation: 30 tasks x 10 episodes, 500 steps


def project_eval(plan_step_s: float, envs: int, env_steps_per_s: float) -> dict[str, float]:
    """Projected wall time of MT30 evaluation planned `envs` episodes at a time: rounds of
    500 planning steps, plus the physics of every agent step at `env_steps_per_s` per core
    (BENCHMARKS.md, environment speed) on all of this machine's cores."""
    rounds = -(-EVAL_EPISODES // envs)
    physics = EVAL_EPISODES * EVAL_STEPS / (env_steps_per_s * (os.cpu_count() or 1))
    planning = rounds * EVAL_STEPS * plan_step_s
    return {
        "eval_planning_s": planning,
        "eval_physics_s": physics,
        "eval_wall_s": planning + physics,
    }


def torchrun_part(args: PartArgs, report: Callable[[dict], None]) -> None:
    """`trainer distill` under torchrun (1 rank), then one collective on the device's backend
    (nccl on CUDA, gloo on CPU) in a 1-rank process group: both must end cleanly. What it
    does not test: DDP itself (one rank builds no gradient all-reduce, and two NCCL ranks
    cannot share the one GPU of the device machine); tests/test_ddp.py runs 2 ranks on CPU
    (gloo), BENCHMARKS.md §7 times them."""
    sizes, work = args.sizes, Path(args.work)
    teacher = teacher_file(work, 5)
    out = work / "torchrun-distill"
    steps = str(sizes.distill_steps)
    distill = [
        "-m", "trainer", "distill", "--shards", args.store, "--teacher", str(teacher),
        "--d-coef", str(D_COEF), "--steps", steps, "--batch-size", str(sizes.batch_sizes[0]),
        "--device", args.device, "--out", str(out), "--save-every", steps, "--log-every", "1",
        "--no-progress", "--threads", "1",
    ]  # fmt: skip
    backend = "nccl" if args.device == "cuda" else "gloo"
    result = {"distill": _torchrun(distill, args)}
    if result["distill"]["returncode"] == 0:
        summary = json.loads((out / "summary.json").read_text())
        result["distill"] |= {k: summary[k] for k in ("steps", "steps_per_s", "peak_vram_bytes")}
    report(result)
    collective = ["-m", "tools.bench.gpu_parts", "collective", backend, args.device]
    result["collective"] = {"backend": backend, **_torchrun(collective, args)}
    report(result)
    if any(r["returncode"] for r in result.values()):
        raise RuntimeError(f"a torchrun run failed: {json.dumps(result)}")


def _torchrun(command: list[str], args: PartArgs) -> dict[str, Any]:
    full = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
            "1", *command]  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.run(full, capture_output=True, text=True, timeout=max(args.left(), 1))
    print(proc.stdout, proc.stderr, sep="\n")
    return {"returncode": proc.returncode, "seconds": time.perf_counter() - t0,
            "tail": (proc.stdout + proc.stderr)[-600:]}  # fmt: skip


def collective(backend: str, device: str) -> None:
    """In a torchrun rank: init the process group, all-reduce a tensor, check it, tear down."""
    import torch.distributed as dist

    dev = torch.device(device, int(os.environ.get("LOCAL_RANK", 0))) if device == "cuda" else None
    if dev is not None:
        torch.cuda.set_device(dev)
    dist.init_process_group(backend)
    x = torch.ones(4, device=dev or "cpu")
    dist.all_reduce(x)
    dist.barrier()
    world = dist.get_world_size()
    dist.destroy_process_group()
    if not torch.equal(x.cpu(), torch.full((4,), float(world))):
        raise RuntimeError(f"all_reduce over {world} rank(s) gave {x.tolist()}")


def official_part(args: PartArgs, report: Callable[[dict], None]) -> None:
    from tools.bench.official import official_updates

    report(official_updates(args, _loader, Accel(args.torch_device)))


PARTS: dict[str, Callable[[PartArgs, Callable[[dict], None]], None]] = {
    "machine": machine_part,
    "data": data_part,
    "train": train_part,
    "official": official_part,
    "loader": loader_part,
    "plan": plan_part,
    "torchrun": torchrun_part,
}


def main(argv: list[str]) -> None:
    """`python -m tools.bench.gpu_parts PART SETTINGS_JSON RESULT_JSON`, or `collective
    BACKEND DEVICE` inside a torchrun rank."""
    if argv[0] == "collective":
        collective(argv[1], argv[2])
        return
    name, args, result = argv[0], PartArgs.from_json(argv[1]), Path(argv[2])
    PARTS[name](args, lambda obj: write_json(result, obj))


if __name__ == "__main__":
    main(sys.argv[1:])
