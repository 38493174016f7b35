"""Evaluation during training: `--eval-every N` of `trainer train` / `trainer distill`.

Owns what a run keeps of each evaluation of its student, which the training loop runs at
step 0 of a new run, every N steps and at the last step: a row in the run's eval logs
(`trainer.training.runlog.EvalLog`) and the best-scoring model (`best.pt`, an official new-API file,
with `best.json` saying which step and score it is).

The evaluation itself is `trainer.evaluation.evaluate.evaluate`, the code of `trainer eval`: every
episode of the chosen tasks in this process, one episode per batch as in the official code
(so `trainer eval` of `best.pt` with the same seed returns exactly the scores logged). The env
seed is the run's seed, as the official training loop evaluates with `cfg.seed`. Random
generators are saved and restored around it and the model's train/eval mode is put back, so
a run with evaluation trains exactly as one without (tested bit for bit).
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainer.evaluation.evaluate import evaluate, resolve_tasks
from trainer.model.checkpoint import save_official
from trainer.model.world import WorldModel
from trainer.training.runlog import EvalLog
from trainer.training.runstate import write_json

BEST_FILE = "best.pt"
BEST_INFO_FILE = "best.json"


@dataclass(frozen=True)
class EvalProtocol:
    """What one evaluation during training runs; the same for every eval of a run."""

    tasks: tuple[str, ...]
    episodes: int
    mpc: bool
    seed: int

    @classmethod
    def of(cls, tasks: str, episodes: int, mpc: bool, seed: int) -> EvalProtocol:
        return cls(tuple(resolve_tasks(tasks)), episodes, mpc, seed)

    def wait(self) -> timedelta:
        """A bound on one evaluation's wall time, for the ranks that wait on it: 10 minutes
        plus 450 s per MPPI episode (one took ~410 s on a core of the development VM) or
        5 s per policy-only episode."""
        per_episode = 450 if self.mpc else 5
        return timedelta(seconds=600 + per_episode * self.episodes * len(self.tasks))

    def to_dict(self) -> dict[str, Any]:
        return {
            "tasks": list(self.tasks),
            "episodes": self.episodes,
            "mpc": self.mpc,
            "seed": self.seed,
            "action_selection": "MPPI (official parameters)" if self.mpc else "policy mean",
        }


class TrainingEval:
    """Evaluates the live student at the scheduled steps, logs each result and keeps the
    best model. `state_dict()` (the best so far) goes into the training checkpoint."""

    def __init__(
        self,
        protocol: EvalProtocol,
        out: Path,
        log: EvalLog,
        state: dict[str, Any] | None = None,
        compile: bool = False,
    ) -> None:
        self.protocol, self.out, self.log = protocol, Path(out), log
        self.compile = compile  # a --compile run plans through torch.compile too
        state = state or {}
        self.best_step: int | None = state.get("best_step")
        self.best_score: float | None = state.get("best_score")
        self.seconds = 0.0  # wall time of the evaluations run by this process

    def run(self, model: WorldModel, step: int) -> dict[str, Any]:
        """Evaluate `model` now; log the row, keep it as best.pt if it scores highest."""
        t0 = time.perf_counter()
        training = model.training
        with _random_state_kept():
            result = evaluate(
                model,
                list(self.protocol.tasks),
                self.protocol.episodes,
                self.protocol.mpc,
                seed=self.protocol.seed,
                workers=0,
                compile=self.compile,
            )
        model.train(training)
        wall = time.perf_counter() - t0
        self.seconds += wall
        row = {
            "step": step,
            "normalized_score": result.normalized_score,
            "returns": {t.task: t.returns for t in result.tasks},
            "wall_s": wall,
        }
        self.log.write(row)
        if self.best_score is None or row["normalized_score"] > self.best_score:
            self.best_step, self.best_score = step, row["normalized_score"]
            save_official(model, self.out / BEST_FILE)
            info = {"step": step, "normalized_score": self.best_score}
            info["protocol"] = self.protocol.to_dict()
            write_json(self.out / BEST_INFO_FILE, info)
        return row

    def state_dict(self) -> dict[str, Any]:
        return {"best_step": self.best_step, "best_score": self.best_score}


class _random_state_kept:
    """Restore torch (CPU and CUDA), numpy and Python generators on exit: `evaluate` seeds
    torch with the env seed, and training must continue as if it had not run."""

    def __enter__(self) -> None:
        self._fork = torch.random.fork_rng(
            devices=list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
        )
        self._fork.__enter__()
        self._np, self._py = np.random.get_state(), random.getstate()

    def __exit__(self, *exc: Any) -> None:
        np.random.set_state(self._np)
        random.setstate(self._py)
        self._fork.__exit__(*exc)
