"""MT30 evaluation on dm_control physics (spec E): `trainer eval`.

This module owns the evaluation protocol and its outputs: per-task mean undiscounted return
over `episodes` episodes, the normalized score (mean over tasks of return / 10), and the
files eval.csv, eval.json and eval.png (bar chart of per-task scores).

Protocol. Each task's env is built with seed 1 (`task_kwargs={'random': seed}`) and its
RandomState carries over across resets, so episode k starts from the state drawn by the
(k+1)-th reset. To run the episodes of a task in lockstep, episode k gets its own copy of
the env, built with the same seed and reset k times first: the initial states are exactly
those of one env reset per episode (reset alone draws from the RandomState; checked in the
tests). All (task, episode) environments of one job step together and their actions are
chosen as one batch (`trainer.plan.Actor`). Actions: MPPI (spec E) or the policy mean,
without exploration noise (eval_mode, the official training-loop protocol; the official
standalone evaluate.py adds planner noise).

Parallelism: `workers` processes, one job per task, each with one torch thread; `workers=0`
runs every task in this process as one lockstep batch (the fast path on a GPU).
"""

from __future__ import annotations

import contextlib
import csv
import json
import multiprocessing as mp
import os
import platform
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from datapipe.tasksets import MT30, TaskSet
from trainer.checkpoint import CheckpointError
from trainer.model import WorldModel
from trainer.plan import OFFICIAL_MPPI, Actor, MPPIConfig, describe_protocol
from trainer.presets import ModelConfig


@dataclass(frozen=True)
class EvalConfig:
    """Settings of `trainer eval` (one field per flag)."""

    checkpoint: (
        Path  # world-model file: official (old/new API, any size) or `trainer quantize` output
    )
    tasks: str = "mt30"  # "mt30" (all 30) or comma-separated MT30 task names
    episodes: int = 10  # episodes per task (spec E: 10)
    mpc: bool = True  # plan with MPPI; False (--no-mpc): act with the policy mean
    workers: int = -1  # processes over tasks; 0 or 1 = all in this process; -1 = one per core
    seed: int = 1  # env seed (task_kwargs random) and torch seed of the planner
    out: Path = Path("runs/eval")  # folder for eval.csv, eval.json, eval.png
    device: str = "cpu"  # cpu | cuda | auto (cuda if available); cuda implies workers=0
    max_steps: int | None = None  # cut episodes after this many agent steps (smoke tests only)
    allow_quantized: bool = False  # load the paper's scale-1.0 qint8 files anyway (garbage)
    planner_noise: bool = (
        False  # MPPI adds std[0]*N(0,1) as the official evaluate.py (not eval_mode)
    )


@dataclass
class TaskResult:
    """Returns of one task's episodes."""

    task: str
    task_id: int
    returns: list[float]

    @property
    def mean_return(self) -> float:
        return float(np.mean(self.returns))

    @property
    def score(self) -> float:
        """mean return / 10, in [0, 100] for full 500-step episodes."""
        return self.mean_return / 10


@dataclass
class EvalResult:
    """Per-task results, the normalized score and how they were obtained."""

    tasks: list[TaskResult]
    protocol: dict[str, Any] = field(default_factory=dict)

    @property
    def normalized_score(self) -> float:
        """Mean over tasks of return / 10 (spec E)."""
        return float(np.mean([t.score for t in self.tasks]))

    def to_dict(self) -> dict[str, Any]:
        return {
            "normalized_score": self.normalized_score,
            "protocol": self.protocol,
            "tasks": [
                asdict(t) | {"mean_return": t.mean_return, "score": t.score} for t in self.tasks
            ],
        }


def resolve_tasks(tasks: str | Sequence[str], task_set: TaskSet = MT30) -> list[str]:
    """Task names from "mt30" or a comma-separated list; unknown names list the valid ones."""
    if isinstance(tasks, str):
        if tasks == task_set.name:
            return list(task_set.names)
        tasks = [t.strip() for t in tasks.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in task_set.names]
    if unknown or not tasks:
        raise ValueError(
            f"unknown task(s) {', '.join(unknown) or '(none given)'}; pass {task_set.name!r} or "
            f"comma-separated names from: {', '.join(task_set.names)}"
        )
    return list(dict.fromkeys(tasks))


def check_task_set(cfg: ModelConfig, task_set: TaskSet = MT30) -> None:
    """Refuse a model whose task count or dims differ from `task_set`, saying how."""
    problems = []
    if cfg.n_tasks != task_set.n_tasks:
        problems.append(
            f"{cfg.n_tasks} tasks (task embedding rows), {task_set.name} has {task_set.n_tasks}"
        )
    if cfg.obs_dim != task_set.obs_dim:
        problems.append(f"obs dim {cfg.obs_dim}, {task_set.name} pads to {task_set.obs_dim}")
    if cfg.action_dim != task_set.action_dim:
        problems.append(
            f"action dim {cfg.action_dim}, {task_set.name} pads to {task_set.action_dim}"
        )
    if not problems and tuple(cfg.action_dims) != tuple(task_set.action_dims):
        diff = [
            f"{name}: {a} vs {b}"
            for name, a, b in zip(
                task_set.names, cfg.action_dims, task_set.action_dims, strict=True
            )
            if a != b
        ]
        problems.append(f"per-task action dims differ ({'; '.join(diff)})")
    if problems:
        raise CheckpointError(
            f"the checkpoint does not fit the {task_set.name} task set: it has "
            + "; ".join(problems)
            + f". Evaluate it on the task set it was trained on ({task_set.name} evaluation "
            "runs the dm_control MT30 tasks only)."
        )


# -- the lockstep core --------------------------------------------------------------------------


def run_episodes(
    model: WorldModel,
    tasks: Sequence[str],
    episodes: int,
    mpc: bool = True,
    seed: int = 1,
    max_steps: int | None = None,
    planner: MPPIConfig = OFFICIAL_MPPI,
    eval_mode: bool = True,
) -> list[TaskResult]:
    """Every episode of every task in this process, all environments in lockstep."""
    from trainer.envs import EPISODE_LENGTH, make_env

    torch.manual_seed(seed)
    envs, ids = [], []
    for task in tasks:
        for k in range(episodes):
            env = make_env(task, seed)
            for _ in range(k):  # replay the resets of episodes 0..k-1 (see module docstring)
                env.reset()
            envs.append(env)
            ids.append(env.task_id)
    device = model._action_masks.device
    task_ids = torch.tensor(ids, device=device)
    actor = Actor(model, len(envs), mpc=mpc, cfg=planner, eval_mode=eval_mode)
    obs = np.stack([env.reset() for env in envs])
    returns = np.zeros(len(envs))
    for _ in range(min(max_steps or EPISODE_LENGTH, EPISODE_LENGTH)):
        action = actor(torch.from_numpy(obs).to(device), task_ids).cpu().numpy()
        for i, env in enumerate(envs):
            obs[i], reward, _, _ = env.step(action[i])
            returns[i] += reward
    per_task = returns.reshape(len(tasks), episodes)
    return [
        TaskResult(task, MT30.names.index(task), [float(r) for r in row])
        for task, row in zip(tasks, per_task, strict=True)
    ]


@contextlib.contextmanager
def one_torch_thread(active: bool = True) -> Iterator[None]:
    """Run the block with one torch intra-op thread (then restore the count).

    Evaluation interleaves small network calls with single-threaded physics; on a shared
    2-core machine two torch threads made policy-only evaluation 10x slower (53 s against
    5.5 s for 30 tasks x 1 episode) and an MPPI step 2.5x slower (BENCHMARKS.md).
    """
    before = torch.get_num_threads()
    if active:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


_WORKER_MODEL: WorldModel | None = None  # set once per worker process by _init_worker


def _init_worker(cfg: ModelConfig, state: dict, dtype: torch.dtype) -> None:
    global _WORKER_MODEL
    torch.set_num_threads(1)
    model = WorldModel(cfg).to(dtype)
    model.load_state_dict(state)
    _WORKER_MODEL = model.eval()


def _worker_job(
    task: str, episodes: int, mpc: bool, seed: int, max_steps, planner, eval_mode: bool
) -> TaskResult:
    assert _WORKER_MODEL is not None
    task_seed = int(np.random.SeedSequence([seed, MT30.names.index(task)]).generate_state(1)[0])
    # env seed stays `seed` (spec E); the task-specific torch seed makes plans independent
    # of which worker runs the task
    torch.manual_seed(task_seed)
    (result,) = run_episodes(
        _WORKER_MODEL, [task], episodes, mpc, seed, max_steps, planner, eval_mode
    )
    return result


def evaluate(
    model: WorldModel,
    tasks: str | Sequence[str] = "mt30",
    episodes: int = 10,
    mpc: bool = True,
    seed: int = 1,
    workers: int = -1,
    max_steps: int | None = None,
    planner: MPPIConfig = OFFICIAL_MPPI,
    eval_mode: bool = True,
) -> EvalResult:
    """Per-task returns and the normalized score of `model` on MT30 tasks (spec E).

    `eval_mode=False` adds the planner's exploration noise, as the official standalone
    evaluate.py (and TD-MPC-Opt's) do; it has no effect with `mpc=False`.

    `workers` >= 2: that many processes (spawned, one torch thread each), one job per task;
    0 or 1: all tasks in this process as one lockstep batch (use this on a GPU); -1: one
    process per CPU core (at most one per task), or this process when the model is on a GPU.
    """
    names = resolve_tasks(tasks)
    check_task_set(model.cfg)
    model.eval()
    device = model._action_masks.device
    if workers < 0:
        workers = 0 if device.type != "cpu" else min(os.cpu_count() or 1, len(names))
    if workers and device.type != "cpu":
        raise ValueError(f"workers={workers} needs the model on the CPU; use workers=0 on {device}")
    dtype = model._encoder["state"][0].weight.dtype
    t0 = time.perf_counter()
    if workers <= 1:
        with one_torch_thread(device.type == "cpu"):
            results = run_episodes(model, names, episodes, mpc, seed, max_steps, planner, eval_mode)
    else:
        state = {
            k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in model.state_dict().items()
        }
        # spawn, not fork: torch's thread pools do not survive a fork; a worker that dies
        # raises BrokenProcessPool here instead of hanging
        with ProcessPoolExecutor(
            workers, mp.get_context("spawn"), _init_worker, (model.cfg, state, dtype)
        ) as pool:
            n = len(names)
            results = list(
                pool.map(_worker_job, names, [episodes] * n, [mpc] * n, [seed] * n,
                         [max_steps] * n, [planner] * n, [eval_mode] * n)
            )  # fmt: skip
    wall = time.perf_counter() - t0
    protocol = {
        "action_selection": describe_protocol(mpc, planner, eval_mode),
        "episodes": episodes,
        "seed": seed,
        "env": "dm_control, task_kwargs random=seed, action repeat 2, 500 agent steps",
        "max_steps": max_steps,
        "model_size": model.cfg.model_size,
        "dtype": str(dtype).removeprefix("torch."),
        "device": str(device),
        "workers": workers,
        "wall_s": wall,
        "torch": torch.__version__,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
    }
    return EvalResult(results, protocol)


# -- outputs ------------------------------------------------------------------------------------


def write_outputs(result: EvalResult, out: str | os.PathLike) -> dict[str, Path]:
    """Write eval.csv, eval.json and eval.png into `out`; returns their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out / "eval.csv", "json": out / "eval.json", "png": out / "eval.png"}
    with open(paths["csv"], "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["task_id", "task", "episodes", "mean_return", "std_return", "score", "returns"])
        for t in result.tasks:
            w.writerow(
                [t.task_id, t.task, len(t.returns), f"{t.mean_return:.3f}",
                 f"{np.std(t.returns):.3f}", f"{t.score:.3f}",
                 " ".join(f"{r:.3f}" for r in t.returns)]
            )  # fmt: skip
        w.writerow(["", "normalized_score", "", "", "", f"{result.normalized_score:.3f}", ""])
    paths["json"].write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    plot_scores(result, paths["png"])
    return paths


def plot_scores(result: EvalResult, path: str | os.PathLike) -> None:
    """Bar chart of per-task scores (return / 10) with the normalized score as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [t.task for t in result.tasks]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.32 * len(names) + 2), 4.5))
    ax.bar(range(len(names)), [t.score for t in result.tasks], color="tab:blue")
    ax.axhline(result.normalized_score, color="tab:red", ls="--",
               label=f"normalized score {result.normalized_score:.2f}")  # fmt: skip
    ax.set_xticks(range(len(names)), names, rotation=75, ha="right", fontsize=7)
    ax.set_ylabel("score = mean return / 10")
    ax.set_ylim(0, 100)
    p = result.protocol
    selection = p.get("action_selection", {})
    mode = selection.get("mode", "?")
    if mode == "mppi" and not selection.get("eval_mode", True):
        mode += " + noise"
    else:
        mode += ", eval_mode"
    ax.set_title(
        f"{p.get('checkpoint', 'model')}: {mode}, {p.get('episodes')} ep/task, "
        f"seed {p.get('seed')}", fontsize=9
    )  # fmt: skip
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_eval(cfg: EvalConfig) -> EvalResult:
    """`trainer eval`: load the checkpoint, evaluate, write the outputs into cfg.out."""
    from trainer.quantize import load_any, read_meta
    from trainer.runstate import file_sha256

    device = cfg.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    names = resolve_tasks(cfg.tasks)
    model = load_any(cfg.checkpoint, allow_quantized=cfg.allow_quantized, device=device)
    result = evaluate(
        model, names, cfg.episodes, cfg.mpc, cfg.seed, cfg.workers, cfg.max_steps,
        eval_mode=not cfg.planner_noise,
    )  # fmt: skip
    meta = read_meta(cfg.checkpoint)
    result.protocol |= {
        "checkpoint": Path(cfg.checkpoint).name,
        "checkpoint_sha256": file_sha256(cfg.checkpoint),
        "quantization": None if meta is None else {k: meta[k] for k in ("dtype", "scheme")},
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
    }
    write_outputs(result, cfg.out)
    return result
