"""An experiment folder as `trainer experiment` writes it and `trainer report` reads it: the
names of its files, its format, and its runs read from disk into arms.

DIR/experiment.json (format mt30-experiment, version 1) names every arm, its settings and
seeds, and the run folder of each seed (relative to DIR). A training run's folder holds
summary.json once finished and evals.jsonl / metrics.jsonl as it goes; a reference run's
holds eval.json. The report writes DIR/report.json, DIR/report.md and DIR/figures/.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainer.errors import ReportError
from trainer.training.runfolder import SUMMARY_FILE
from trainer.training.runlog import read_evals, read_metrics

EXPERIMENT_FILE = "experiment.json"
REFERENCE_FILE = "eval.json"  # a reference run's result (trainer.evaluation.evaluate.write_outputs)
FORMAT, VERSION = "mt30-experiment", 1
REPORT_MD, REPORT_JSON, FIGURES_DIR = "report.md", "report.json", "figures"
AGREEMENT_KEYS = ("reward_mae_teacher", "reward_agreement")  # new and old name, same quantity


@dataclass
class Run:
    """One seed of one arm as found on disk."""

    seed: str
    rel: str  # run folder as experiment.json names it (relative to DIR)
    status: str  # finished | unfinished | missing | no-evals
    evals: list[dict[str, Any]] = field(default_factory=list)
    metrics: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] | None = None
    final_step: int | None = None
    final_score: float | None = None  # recorded normalized score of the final evaluation
    returns: dict[str, list[float]] | None = None  # per-task episode returns of that evaluation
    eval_seconds: float = 0.0  # reference arms: wall time of their eval

    @property
    def counted(self) -> bool:
        return self.status == "finished"


@dataclass
class Arm:
    """One arm of experiment.json with its runs."""

    name: str
    kind: str  # train | distill | reference
    settings: dict[str, Any]
    runs: list[Run]

    @property
    def distill(self) -> bool:
        return self.kind == "distill" or (self.kind != "reference" and has_teacher(self))

    def counted(self) -> list[Run]:
        return [r for r in self.runs if r.counted]


def has_teacher(arm: Arm) -> bool:
    """Whether the arm's runs distil from a teacher."""
    return bool(arm.settings.get("teacher"))


def _read_train_run(root: Path, seed: str, rel: str) -> Run:
    path = root / rel
    if not path.is_dir():
        return Run(seed, rel, "missing")
    evals, rows = read_evals(path), read_metrics(path)
    summary_path = path / SUMMARY_FILE
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else None
    status = "unfinished" if summary is None else ("finished" if evals else "no-evals")
    run = Run(seed, rel, status, evals, rows, summary)
    if evals:
        last = evals[-1]
        run.final_step, run.final_score = last["step"], last.get("normalized_score")
        run.returns = last["returns"]
    return run


def _read_reference_run(root: Path, seed: str, rel: str) -> Run:
    path = root / rel / REFERENCE_FILE
    if not path.is_file():
        return Run(seed, rel, "missing")
    result = json.loads(path.read_text())
    run = Run(seed, rel, "finished", final_score=result["normalized_score"])
    run.returns = {t["task"]: t["returns"] for t in result["tasks"]}
    run.eval_seconds = float(result.get("protocol", {}).get("wall_s") or 0.0)
    return run


def read_experiment(exp_dir: str | os.PathLike) -> tuple[dict[str, Any], list[Arm]]:
    """experiment.json of `exp_dir` and its arms with every run read from disk."""
    root = Path(exp_dir)
    path = root / EXPERIMENT_FILE
    if not path.is_file():
        raise ReportError(
            f"{path} does not exist: is {root} a folder written by `trainer experiment`?"
        )
    exp = json.loads(path.read_text())
    if exp.get("format") != FORMAT or exp.get("version") != VERSION:
        raise ReportError(
            f"{path}: format {exp.get('format')!r} version {exp.get('version')!r}; this report "
            f"reads {FORMAT} version {VERSION}"
        )
    arms = []
    for a in exp["arms"]:
        lacking = [str(s) for s in a["seeds"] if str(s) not in a["runs"]]
        if lacking:
            raise ReportError(f"{path}: arm {a['name']} has no run folder for seed(s) {lacking}")
        read = _read_reference_run if a["kind"] == "reference" else _read_train_run
        runs = [read(root, str(s), a["runs"][str(s)]) for s in a["seeds"]]
        arms.append(Arm(a["name"], a["kind"], a.get("settings", {}), runs))
    return exp, arms


def resolve_path(root: Path, path: str | None) -> Path | None:
    """A path from experiment.json or an arm's settings: absolute, relative to DIR, or
    relative to the working directory (where `trainer experiment` ran)."""
    if not path:
        return None
    p = Path(path)
    return p if p.is_absolute() or not (root / p).exists() else root / p
