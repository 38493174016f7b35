"""MT30 evaluation on dm_control physics (docs/tdmpc2.md#evaluation): `trainer eval`.

This module owns the evaluation protocol and its outputs: per-task mean undiscounted return
over `episodes` episodes, the normalized score (mean over tasks of return / 10), and the
files eval.csv, eval.json and eval.png (bar chart of per-task scores).

Protocol. Each task's env is built with seed `seed` (`task_kwargs={'random': seed}`) and its
RandomState carries over across resets, so episode k starts from the state drawn by the
(k+1)-th reset, as in the official loop (one env per task, its episodes in turn). Actions:
MPPI (docs/tdmpc2.md#mppi) or the policy mean, without exploration noise (eval_mode, the official
training-loop protocol; the official standalone evaluate.py adds planner noise).

Batching. By default every episode is its own batch, as in the official code: the networks
see the same shapes whatever else is evaluated, so an episode's return depends on the model,
the seed and the protocol only -- not on `workers`, nor on the other tasks -- and on the CPU
equals the official code's. `lockstep=True` plans all episodes of all tasks as one batch in
this process instead (`trainer.evaluation.plan.Actor` over N environments; the fast path on a GPU).
float32 GEMM rounding depends on the batch size and the chaotic tasks (walker, cheetah,
fish, hopper, finger-turn-hard) amplify 1e-6 into tens of points, so lockstep returns depend
on which tasks and episodes run together: a different protocol, recorded as such.

Seeding. The env seed is `seed` (docs/tdmpc2.md#environments). The planner's draws (and the
policy's samples, which the policy mean ignores) come from torch's global generator, seeded at the start of
each episode from (seed, task id, episode index) (`episode_seed`): an episode's plans do not
depend on which process runs it or on what ran before it. The official loop seeds once and
draws from one stream across all tasks in turn, so MPPI returns match it in distribution,
not draw for draw; policy-only returns match it exactly. Lockstep seeds torch once, `seed`.

Parallelism: `workers` processes (spawned, one torch thread each), one job per episode: a
fresh env of its task reset k times first, which starts where the official env's (k+1)-th
reset starts (reset alone draws from the RandomState; checked in the tests for every task).
`workers` 0 or 1 runs every episode in this process (one env per task, one torch thread on
the CPU). Both run exactly the same computation per episode.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import multiprocessing as mp
import os
import platform
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from datapipe.location import atomic_file, only_writer
from datapipe.options import setting
from datapipe.progress import Progress, hms
from datapipe.tasksets import MT30, TaskSet
from trainer.errors import BusyError, IncompatibleDataError, TrainConfigError
from trainer.evaluation.plan import OFFICIAL_MPPI, Actor, MPPIConfig, describe_protocol
from trainer.model.presets import ModelConfig
from trainer.model.world import WorldModel
from trainer.options import resolve_device
from trainer.stop import Interrupted


@dataclass(frozen=True)
class EvalConfig:
    """Settings of `trainer eval`, one field per flag (the options are generated from them)."""

    checkpoint: Path = setting(
        help="World model: official file (old/new API, any size) or `trainer quantize` output."
    )
    tasks: str = setting("mt30", "mt30, or comma-separated task names.")
    episodes: int = setting(10, "Episodes per task (official: 10).")
    mpc: bool = setting(True, "Plan with MPPI (official); --no-mpc: act with the policy mean.")
    workers: int = setting(
        -1,
        "Processes over episodes; 0: this process; -1: one per core. Returns do not depend on it.",
    )
    seed: int = setting(1, "Env seed, and the root of each episode's planner seed.")
    out: Path = setting(Path("runs/eval"), "Folder for eval.csv, eval.json and eval.png.")
    device: str = setting(
        "cpu",
        "cpu, cuda or auto (cuda when available). One episode per batch is fastest on CPU "
        "workers; on cuda use --lockstep.",
    )
    max_steps: int | None = setting(None, "Cut episodes after this many steps (smoke tests).")
    allow_quantized: bool = setting(False, "Load the paper's broken scale-1.0 int8 files anyway.")
    planner_noise: bool = setting(
        False, "Add std[0]*N(0,1) to planned actions, as the official evaluate.py does."
    )
    lockstep: bool = setting(
        False,
        "Plan all episodes as one batch in this process: fast on a GPU, but the returns then "
        "depend on the batch (default: one episode per batch, as the official code).",
    )
    compile: bool = setting(
        False,
        "torch.compile the planner and the policy step, as the official code compiles _plan "
        "(each worker process compiles its own: minutes each on CPU).",
    )
    progress: bool = setting(
        True, "Episodes done per task, rate and ETA on stderr (a line per 30 s off a terminal)."
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
        """Mean over tasks of return / 10 (docs/tdmpc2.md#normalized-score)."""
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
        raise TrainConfigError(
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
        raise IncompatibleDataError(
            f"the checkpoint does not fit the {task_set.name} task set: it has "
            + "; ".join(problems)
            + f". Evaluate it on the task set it was trained on ({task_set.name} evaluation "
            "runs the dm_control MT30 tasks only)."
        )


# -- episodes -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class EpisodeSettings:
    """How every episode of one evaluation is run (handed to the worker processes)."""

    mpc: bool = True  # MPPI; False: the policy mean
    seed: int = 1  # env seed, and the root of the per-episode torch seeds
    max_steps: int | None = None  # cut episodes after this many agent steps (smoke tests)
    planner: MPPIConfig = OFFICIAL_MPPI
    eval_mode: bool = True  # False: MPPI adds std[0] * N(0, 1), as the official evaluate.py
    compile: bool = (
        False  # plan and policy step through torch.compile (trainer.evaluation.plan.compiled)
    )

    def steps(self) -> int:
        from trainer.evaluation.envs import EPISODE_LENGTH

        return min(self.max_steps or EPISODE_LENGTH, EPISODE_LENGTH)


def episode_seed(seed: int, task_id: int, episode: int) -> int:
    """The torch seed of episode `episode` of task `task_id`: a function of these alone."""
    return int(np.random.SeedSequence([seed, task_id, episode]).generate_state(1)[0])


def task_episodes(
    model: WorldModel,
    task: str,
    episodes: range,
    run: EpisodeSettings,
    done: Callable[[str, int, float, float], None] = lambda task, k, total, seconds: None,
) -> list[float]:
    """Returns of episodes `episodes` of `task`, one after another on one env, each its own
    batch of one (module docstring); `done(task, k, return, seconds)` is called after each."""
    from trainer.evaluation.envs import make_env

    env = make_env(task, run.seed)
    for _ in range(episodes.start):  # the resets of the episodes before (module docstring)
        env.reset()
    device = model.device
    task_id = torch.tensor([env.task_id], device=device)
    actor = Actor(model, 1, run.mpc, run.planner, run.eval_mode, run.compile)
    returns = []
    for k in episodes:
        t0 = time.perf_counter()
        torch.manual_seed(episode_seed(run.seed, env.task_id, k))
        actor.reset()
        obs, total = env.reset(), 0.0
        for _ in range(run.steps()):
            action = actor(torch.from_numpy(obs)[None].to(device), task_id)
            obs, reward, _, _ = env.step(action[0].cpu().numpy())
            total += reward
        returns.append(total)
        done(task, k, total, time.perf_counter() - t0)
    return returns


def lockstep_episodes(
    model: WorldModel, tasks: Sequence[str], episodes: int, run: EpisodeSettings
) -> dict[str, list[float]]:
    """Every episode of every task in this process as one batch (`lockstep=True`)."""
    from trainer.evaluation.envs import make_env

    torch.manual_seed(run.seed)
    envs = []
    for task in tasks:
        for k in range(episodes):
            env = make_env(task, run.seed)
            for _ in range(k):  # replay the resets of episodes 0..k-1 (module docstring)
                env.reset()
            envs.append(env)
    device = model.device
    task_ids = torch.tensor([env.task_id for env in envs], device=device)
    actor = Actor(model, len(envs), run.mpc, run.planner, run.eval_mode, run.compile)
    obs = np.stack([env.reset() for env in envs])
    returns = np.zeros(len(envs))
    for _ in range(run.steps()):
        action = actor(torch.from_numpy(obs).to(device), task_ids).cpu().numpy()
        for i, env in enumerate(envs):
            obs[i], reward, _, _ = env.step(action[i])
            returns[i] += reward
    per_task = returns.reshape(len(tasks), episodes)
    return {task: [float(r) for r in row] for task, row in zip(tasks, per_task, strict=True)}


@contextlib.contextmanager
def one_torch_thread(active: bool = True) -> Iterator[None]:
    """Run the block with one torch intra-op thread (then restore the count).

    Evaluation interleaves small network calls with single-threaded physics; on a shared
    2-core machine two torch threads made policy-only evaluation 10x slower (53 s against
    5.5 s for 30 tasks x 1 episode) and an MPPI step 2.5x slower (BENCHMARKS.md). One thread
    everywhere also gives every process the same float rounding.
    """
    before = torch.get_num_threads()
    if active:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


_WORKER_MODEL: WorldModel | None = None  # of a worker process: the model its jobs run


def set_worker_model(model: WorldModel | None) -> None:
    """The model this (pool worker) process's jobs run (None: none), set once by the pool's
    initializer: a spawned process shares nothing with its parent. Evaluation workers and
    `tools make-mt30 --physics dmc` rollout workers both keep theirs here."""
    global _WORKER_MODEL
    _WORKER_MODEL = model


def worker_model() -> WorldModel:
    assert _WORKER_MODEL is not None, "a worker job ran before its pool's initializer set it"
    return _WORKER_MODEL


def _init_worker(cfg: ModelConfig, state: dict, dtype: torch.dtype) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's: it stops us
    torch.set_num_threads(1)
    model = WorldModel(cfg).to(dtype)
    model.load_state_dict(state)
    set_worker_model(model.eval())


def _worker_episode(task: str, episode: int, run: EpisodeSettings) -> tuple[float, float]:
    """(return, seconds the episode took) of one episode in a worker process."""
    took = []
    (total,) = task_episodes(
        worker_model(), task, range(episode, episode + 1), run, lambda *a: took.append(a[-1])
    )
    return total, took[0]


def _in_workers(
    model: WorldModel,
    tasks: Sequence[str],
    episodes: int,
    run: EpisodeSettings,
    workers: int,
    done: Callable[[str, int, float, float], None],
) -> None:
    """Every episode as its own job on `workers` processes, each reported to `done` as it
    finishes; on any error or Ctrl-C the processes are stopped at once (the episodes they
    were playing are lost)."""
    state = {
        k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in model.state_dict().items()
    }
    # spawn, not fork: torch's thread pools do not survive a fork; a worker that dies
    # raises BrokenProcessPool here instead of hanging
    pool = ProcessPoolExecutor(
        workers, mp.get_context("spawn"), _init_worker, (model.cfg, state, model.dtype)
    )
    try:
        jobs = {
            pool.submit(_worker_episode, task, k, run): (task, k)
            for task in tasks
            for k in range(episodes)
        }
        for job in as_completed(jobs):
            total, seconds = job.result()
            done(*jobs[job], total, seconds)
    except BaseException:  # an episode failed or Ctrl-C: stop the processes, wait for none
        processes = list((pool._processes or {}).values())
        pool.shutdown(wait=False, cancel_futures=True)
        for process in processes:
            process.kill()
        raise
    pool.shutdown()


def _resolve_workers(workers: int, lockstep: bool, device: torch.device, jobs: int) -> int:
    """`workers` with -1 resolved; refuses combinations that cannot run."""
    if workers < 0:
        return 0 if lockstep or device.type != "cpu" else min(os.cpu_count() or 1, jobs)
    if workers >= 2 and device.type != "cpu":
        raise TrainConfigError(
            f"workers={workers} needs the model on the CPU; pass --workers 0 on {device}"
        )
    if workers >= 2 and lockstep:
        raise TrainConfigError(
            f"workers={workers} with lockstep: lockstep plans every episode as one batch in "
            "this process; pass --workers 0, or leave out --lockstep to split the episodes "
            "over processes"
        )
    return workers


def _check_counts(episodes: int, max_steps: int | None) -> None:
    if episodes < 1:
        raise TrainConfigError(f"episodes={episodes}: evaluate at least 1 episode per task")
    if max_steps is not None and max_steps < 1:
        raise TrainConfigError(
            f"max_steps={max_steps}: cut episodes after at least 1 step, or leave it out for "
            "full 500-step episodes"
        )


# the protocol's "batching" entry
ONE_EPISODE_PER_BATCH = (
    "one episode per batch, as the official code (returns independent of workers); "
    "torch seeded per episode from (seed, task id, episode)"
)
LOCKSTEP = "lockstep: every episode of every task in one batch; torch seeded once with seed"


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
    lockstep: bool = False,
    progress: bool = False,
    compile: bool = False,
) -> EvalResult:
    """Per-task returns and the normalized score of `model` on MT30 tasks.

    The protocol: docs/tdmpc2.md#evaluation. `eval_mode=False` adds the planner's exploration
    noise, as the official standalone evaluate.py (and TD-MPC-Opt's) do; it has no effect
    with `mpc=False`.

    Each episode is its own batch (the returns do not depend on `workers`); `workers` >= 2:
    that many processes (spawned, one torch thread each), one job per episode; 0 or 1: this
    process; -1: one process per CPU core (at most one per episode), or this process when
    the model is on a GPU. `lockstep=True`: all episodes as one batch in this process (the
    GPU fast path; its returns depend on the batch, see the module docstring). `progress`:
    episodes done, per task, with rate and ETA on stderr. `compile`: the planner and the
    policy step through torch.compile (every worker process compiles its own: minutes each
    on CPU).
    """
    names = resolve_tasks(tasks)
    _check_counts(episodes, max_steps)
    check_task_set(model.cfg)
    model.eval()
    device = model.device
    workers = _resolve_workers(workers, lockstep, device, len(names) * episodes)
    run = EpisodeSettings(mpc, seed, max_steps, planner, eval_mode, compile)
    t0 = time.perf_counter()
    at_once = 1 if workers <= 1 else workers
    with EpisodeProgress(names, episodes, progress, at_once) as bar:
        if progress:
            bar.note(cost_line(names, episodes, run, device, workers, lockstep))
        try:
            if lockstep:
                with one_torch_thread(device.type == "cpu"):
                    bar.all_done(lockstep_episodes(model, names, episodes, run))
            elif workers <= 1:
                with one_torch_thread(device.type == "cpu"):
                    for t in names:
                        task_episodes(model, t, range(episodes), run, bar.done)
            else:
                _in_workers(model, names, episodes, run, workers, bar.done)
        except KeyboardInterrupt:
            partial = bar.finished()
            raise EvalInterrupted(
                EvalResult(
                    [TaskResult(t, MT30.names.index(t), r) for t, r in partial.items()],
                    _protocol(model, run, episodes, workers, lockstep, time.perf_counter() - t0)
                    | {"partial": bar.n < bar.total},
                )
            ) from None
    wall = time.perf_counter() - t0
    returns = bar.finished()
    results = [TaskResult(t, MT30.names.index(t), returns[t]) for t in names]
    return EvalResult(results, _protocol(model, run, episodes, workers, lockstep, wall))


class EvalInterrupted(KeyboardInterrupt):
    """Ctrl-C during an evaluation: `result` holds the episodes that finished (tasks with
    none left out), its protocol marked partial."""

    def __init__(self, result: EvalResult) -> None:
        super().__init__("evaluation interrupted")
        self.result = result


def cost_line(
    names: Sequence[str], episodes: int, run: EpisodeSettings, device, workers: int, lockstep
) -> str:
    """What an evaluation will run, said before it starts (its cost is the user's to weigh)."""
    n = len(names) * episodes
    how = (
        f"MPPI planning ({run.planner.iterations} iterations x {run.planner.num_samples} "
        f"samples, horizon {run.planner.horizon}) at every step"
        if run.mpc
        else "the policy's action (no planning)"
    )
    where = "one batch" if lockstep else f"{max(workers, 1)} process(es)"
    return (
        f"eval: {len(names)} task(s) x {episodes} episode(s) = {n} episodes of {run.steps()} "
        f"steps, {how}, on {device} in {where} (a projected time follows once one finishes)"
    )


def _protocol(model, run, episodes, workers, lockstep, wall: float) -> dict[str, Any]:
    mpc, seed, max_steps, planner, eval_mode = (
        run.mpc, run.seed, run.max_steps, run.planner, run.eval_mode,
    )  # fmt: skip
    device = model.device
    return {
        "action_selection": describe_protocol(mpc, planner, eval_mode),
        "episodes": episodes,
        "seed": seed,
        "env": "dm_control, task_kwargs random=seed, action repeat 2, 500 agent steps",
        "batching": LOCKSTEP if lockstep else ONE_EPISODE_PER_BATCH,
        "max_steps": max_steps,
        "model_size": model.cfg.model_size,
        "dtype": str(model.dtype).removeprefix("torch."),
        "device": str(device),
        "workers": workers,
        "wall_s": wall,
        "torch": torch.__version__,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
    }


class EpisodeProgress(Progress):
    """Episodes done of the total, with rate and ETA, which tasks are done and the last
    episode's task (a `datapipe.progress.Progress`, a first line at once off a terminal)."""

    def __init__(
        self,
        tasks: Sequence[str],
        episodes: int,
        enabled: bool,
        at_once: int = 1,
        interval: float = 30.0,
    ) -> None:
        self.per_task, self.episodes = dict.fromkeys(tasks, 0), episodes
        self.returns: dict[str, dict[int, float]] = {t: {} for t in tasks}
        self.at_once, self._start = at_once, time.monotonic()
        total = len(tasks) * episodes
        super().__init__(
            total, "eval", "episode", enabled, interval=interval, postfix=self._tasks_done(),
            start_line=True,
        )  # fmt: skip

    def done(self, task: str, k: int, total: float, seconds: float = math.nan) -> None:
        """Episode `k` of `task` has finished with return `total` after `seconds` of play."""
        self.returns[task][k] = total
        self.per_task[task] += 1
        if self.n == 0 and self.enabled and self.total > 1 and seconds == seconds:
            first = time.monotonic() - self._start  # with the processes' start-up
            rest = seconds * (-(-self.total // self.at_once) - 1)
            self.note(
                f"eval: first episode in {hms(first)} ({seconds:.1f} s of play); projected "
                f"about {hms(first + rest)} for all {self.total} ({self.at_once} at a time)"
            )
        last = f"{task} {self.per_task[task]}/{self.episodes}"
        self.update(1, f"{self._tasks_done()} (last: {last})")

    def all_done(self, returns: dict[str, list[float]]) -> None:
        """Every episode has finished (lockstep ends them all at once)."""
        for task, totals in returns.items():
            for k, total in enumerate(totals):
                self.done(task, k, total)  # no time of its own: no projection

    def note(self, line: str) -> None:
        """A line on stderr beside the bar (stdout holds the results)."""
        if self.tty:
            self._bar.write(line, file=sys.stderr)
        elif self.enabled:
            print(line, file=sys.stderr, flush=True)

    def finished(self) -> dict[str, list[float]]:
        """The returns of the finished episodes, per task, in episode order; tasks with none
        left out."""
        return {t: [r[k] for k in sorted(r)] for t, r in self.returns.items() if r}

    def _tasks_done(self) -> str:
        full = sum(n == self.episodes for n in self.per_task.values())
        return f"tasks done {full}/{len(self.per_task)}"


# -- outputs ------------------------------------------------------------------------------------


def write_outputs(result: EvalResult, out: str | os.PathLike) -> dict[str, Path]:
    """Write eval.csv, eval.json and eval.png into `out`; returns their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out / "eval.csv", "json": out / "eval.json", "png": out / "eval.png"}
    text = io.StringIO(newline="")
    w = csv.writer(text)
    w.writerow(["task_id", "task", "episodes", "mean_return", "std_return", "score", "returns"])
    for t in result.tasks:
        w.writerow(
            [t.task_id, t.task, len(t.returns), f"{t.mean_return:.3f}",
             f"{np.std(t.returns):.3f}", f"{t.score:.3f}",
             " ".join(f"{r:.3f}" for r in t.returns)]
        )  # fmt: skip
    w.writerow(["", "normalized_score", "", "", "", f"{result.normalized_score:.3f}", ""])
    with atomic_file(paths["csv"]) as f:  # each file whole or absent (a full disk: OSError)
        f.write(text.getvalue().encode())
    plot_scores(result, paths["png"])
    with atomic_file(paths["json"]) as f:  # last: a finished result has all three files
        f.write((json.dumps(result.to_dict(), indent=2) + "\n").encode())
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
    try:
        with atomic_file(path) as f:  # never a 0-byte figure (a full disk: OSError, no file)
            fig.savefig(f, dpi=110, format="png")
    finally:
        plt.close(fig)


def run_eval(cfg: EvalConfig) -> EvalResult:
    """`trainer eval`: load the checkpoint, evaluate, write the outputs into cfg.out (one
    evaluation at a time per folder)."""
    with only_writer(cfg.out, "another `trainer eval`", BusyError):
        return _run_eval(cfg)


def _run_eval(cfg: EvalConfig) -> EvalResult:
    from datapipe.source import file_sha256
    from trainer.model.checkpoint import load_any, read_meta

    device = resolve_device(cfg.device)
    names = resolve_tasks(cfg.tasks)
    sha256 = file_sha256(cfg.checkpoint)  # of the file evaluated, read before it is loaded
    model = load_any(cfg.checkpoint, allow_quantized=cfg.allow_quantized, device=device)
    stopped = None
    try:
        result = evaluate(
            model, names, cfg.episodes, cfg.mpc, cfg.seed, cfg.workers, cfg.max_steps,
            eval_mode=not cfg.planner_noise, lockstep=cfg.lockstep, progress=cfg.progress,
            compile=cfg.compile,
        )  # fmt: skip
    except EvalInterrupted as e:
        result, stopped = e.result, e
    done = sum(len(t.returns) for t in result.tasks)
    if stopped is not None and not done:
        raise Interrupted(
            f"{cfg.out}: stopped before any episode finished; nothing written", signal.SIGINT
        )
    meta = read_meta(cfg.checkpoint)
    result.protocol |= {
        "checkpoint": Path(cfg.checkpoint).name,
        "checkpoint_sha256": sha256,
        "quantization": None if meta is None else {k: meta[k] for k in ("dtype", "scheme")},
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
    }
    write_outputs(result, cfg.out)
    if stopped is not None and result.protocol["partial"]:
        raise Interrupted(
            f"{cfg.out}: stopped; the {done} of {len(names) * cfg.episodes} episodes that "
            f'finished are written as a partial result (eval.json: "partial": true, scores '
            f"of the tasks reached). Run the same command again for the whole evaluation.",
            signal.SIGINT,
        )
    return result
