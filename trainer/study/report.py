"""`trainer report DIR`: the report of an experiment folder written by `trainer experiment`.

The folder is read by `trainer.study.folder` (each run's final evaluation, curves and compute,
and which runs are missing or unfinished). This module owns:
  * the statistics: per arm the mean, std and t-interval of the final score over seeds, and
    the IQM and mean over tasks x seeds with stratified-bootstrap intervals; every arm against
    the baseline arm (differences with intervals, probability of improvement, a verdict);
  * `reward_errors`: how well world models predict the recorded rewards of held-out episodes;
  * the outputs: DIR/report.json (every number, keyed by arm), DIR/report.md rendered from it
    (`trainer.study.markdown`) and the PNG figures in DIR/figures/ (`trainer.study.figures`).

A run's final score is the last row of its evals.jsonl (a reference arm's: its eval.json). Only
finished runs (summary.json written) count toward an arm's final statistics; unfinished ones
are listed with their last evaluation and appear in the curves. Same inputs give the same bytes:
the bootstrap is seeded and nothing records the time.

The statistics are rliable's: IQM, mean and probability of improvement (`rliable.metrics`)
with percentile intervals from its stratified bootstrap (`rliable.library`: seeds resampled
with replacement within every task, each arm independently; tasks resampled where an arm has
a single seed).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rliable import library as rly
from rliable import metrics
from scipy import stats
from torch import Tensor

from datapipe.location import atomic_file
from trainer.errors import ReportError
from trainer.model.math import two_hot_inv
from trainer.model.world import WorldModel
from trainer.study.folder import (
    FIGURES_DIR,
    REPORT_JSON,
    REPORT_MD,
    Arm,
    Run,
    has_teacher,
    read_experiment,
    resolve_path,
)
from trainer.training.runstate import CHECKPOINT_FILE

REPORT_FORMAT, REPORT_VERSION = "mt30-experiment-report", 1
LEVEL = 0.95  # coverage of every interval
REPS = 2000  # bootstrap resamples
BOOTSTRAP_SEED = 0
REWARD_SAMPLE = 8192  # held-out transitions for the reward errors (all of them if fewer)
RUN_KEYS = ("name", "seeds", "seed", "out", "resume", "progress")  # not what an arm studies
TEACHER_KEYS = ("teacher", "teacher_size", "teacher_dtype", "d_coef", "d_schedule", "distill")


# -- statistics -----------------------------------------------------------------------------------


def task_matrix(runs: list[Run], tasks: list[str]) -> np.ndarray:
    """[n_runs, n_tasks] task scores (mean return / 10) of the runs' final evaluations."""
    rows = []
    for run in runs:
        lacking = [t for t in tasks if t not in (run.returns or {})]
        if lacking:
            raise ReportError(
                f"run {run.rel}: its final evaluation lacks {', '.join(lacking)}, named in "
                "experiment.json eval.tasks"
            )
        rows.append([float(np.mean(run.returns[t])) / 10.0 for t in tasks])
    return np.array(rows, dtype=np.float64).reshape(len(runs), len(tasks))


def _bootstrap(
    scores: np.ndarray | tuple[np.ndarray, np.ndarray], func: Any, task_bootstrap: bool = False
) -> tuple[np.ndarray, list[list[float]]]:
    """rliable's stratified bootstrap of `func`: (point estimates, [[lo, hi] per statistic]).

    A matrix [n_seeds, n_tasks] resamples seeds within every task (and the tasks too with
    `task_bootstrap`); a pair of matrices resamples each independently. rliable draws from
    numpy's global generator: it is seeded here, and restored after, so that the same inputs
    give the same report.
    """
    state = np.random.get_state()
    np.random.seed(BOOTSTRAP_SEED)
    try:
        points, intervals = rly.get_interval_estimates(
            {"x": scores}, func, reps=REPS, confidence_interval_size=LEVEL,
            task_bootstrap=task_bootstrap,
        )  # fmt: skip
    finally:
        np.random.set_state(state)
    lo, hi = intervals["x"]
    return points["x"], [[float(a), float(b)] for a, b in zip(lo, hi, strict=True)]


def _aggregates(scores: np.ndarray) -> np.ndarray:
    return np.array([metrics.aggregate_iqm(scores), metrics.aggregate_mean(scores)])


def aggregate(scores: np.ndarray) -> dict[str, Any]:
    """IQM and mean over tasks x seeds of a [n_seeds, n_tasks] score matrix, with 95%
    bootstrap intervals: seeds resampled within every task, or tasks resampled if n = 1."""
    n = scores.shape[0]
    (iqm, mean), (iqm_ci, mean_ci) = _bootstrap(scores, _aggregates, task_bootstrap=n < 2)
    how = (
        "seeds resampled within every task"
        if n >= 2
        else "tasks resampled (n=1: says nothing about seed-to-seed variation)"
    )
    return {
        "iqm": float(iqm),
        "iqm_ci95": iqm_ci,
        "mean": float(mean),
        "mean_ci95": mean_ci,
        "bootstrap": how,
    }


def seed_stats(scores: list[float]) -> dict[str, Any]:
    """n, mean, std (ddof=1) and the 95% t-interval over seeds (None where n is too small)."""
    x = np.asarray(scores, dtype=np.float64)
    n = len(x)
    out: dict[str, Any] = {"n": n, "mean": float(x.mean()) if n else None, "std": None}
    out["ci95"] = None
    if n >= 2:
        std = float(x.std(ddof=1))
        half = float(stats.t.ppf(0.5 + LEVEL / 2, n - 1)) * std / math.sqrt(n)
        out |= {"std": std, "ci95": [out["mean"] - half, out["mean"] + half]}
    return out


def _differences(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return _aggregates(x)[::-1] - _aggregates(y)[::-1]  # (mean, IQM) of x minus those of y


def _paired_differences(xy: np.ndarray) -> np.ndarray:
    return _differences(xy[..., 0], xy[..., 1])


def compare(x: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    """Arm x against arm y ([n_seeds, n_tasks] score matrices over the same tasks): difference
    of the mean and of the IQM with 95% bootstrap intervals, and P(x > y) (rliable's)."""
    if min(len(x), len(y)) >= 2:
        (diff_mean, diff_iqm), (mean_ci, iqm_ci) = _bootstrap((x, y), _differences)
        how = "seeds resampled within every task, each arm independently"
    else:  # per-task means of both arms side by side; the same tasks drawn for both
        xy = np.stack([x.mean(0, keepdims=True), y.mean(0, keepdims=True)], axis=-1)
        _, (mean_ci, iqm_ci) = _bootstrap(xy, _paired_differences, task_bootstrap=True)
        diff_mean, diff_iqm = _differences(x, y)
        how = "tasks resampled, the same tasks for both arms (an arm has n=1)"
    return {
        "n": len(x),
        "n_baseline": len(y),
        "diff_mean": float(diff_mean),
        "diff_mean_ci95": mean_ci,
        "diff_iqm": float(diff_iqm),
        "diff_iqm_ci95": iqm_ci,
        "probability_of_improvement": float(metrics.probability_of_improvement(x, y)),
        "bootstrap": how,
    }


def _signed(x: float) -> str:
    return f"{x:+.2f}".replace("-", "\u2212")


def verdict(name: str, base: str, c: dict[str, Any]) -> tuple[str, str]:
    """(verdict, sentence) of a comparison: beyond noise only if the mean's CI excludes 0."""
    lo, hi = c["diff_mean_ci95"]
    if min(c["n"], c["n_baseline"]) == 1:
        # a task-level interval says nothing about seeds: no verdict either way
        word = "undecided (one seed)"
    elif lo > 0:
        word = f"{name} is better beyond noise"
    elif hi < 0:
        word = f"{base} is better beyond noise"
    else:
        word = "within noise"
    ilo, ihi = c["diff_iqm_ci95"]
    text = (
        f"{name} \u2212 {base}: {_signed(c['diff_mean'])} (95% CI {_signed(lo)} to "
        f"{_signed(hi)}): {word}. IQM {_signed(c['diff_iqm'])} (95% CI {_signed(ilo)} to "
        f"{_signed(ihi)}); P({name} > {base}) = {c['probability_of_improvement']:.2f}."
    )
    if min(c["n"], c["n_baseline"]) == 1:
        text += (
            " One arm has a single seed: the interval comes from the task-level bootstrap only"
            " and says nothing about seed-to-seed variation."
        )
    elif min(c["n"], c["n_baseline"]) == 2:
        text += " With 2 seeds the interval itself is rough."
    return word, text


def baseline_arm(exp: dict[str, Any], arms: list[Arm]) -> Arm | None:
    """experiment.json's baseline, else the first train arm without a teacher, else None."""
    names = {a.name: a for a in arms}
    if exp.get("baseline") is not None:
        if exp["baseline"] not in names:
            raise ReportError(f"baseline {exp['baseline']!r} is not an arm: {', '.join(names)}")
        return names[exp["baseline"]]
    return next((a for a in arms if a.kind == "train" and not has_teacher(a)), None)


def scratch_arm(arms: list[Arm], base: Arm | None) -> Arm | None:
    """The from-scratch arm (train, no teacher, no --init): the baseline if it is one, else
    the first such arm, else None."""
    plain = [a for a in arms if a.kind == "train" and not has_teacher(a)]
    plain = [a for a in plain if not a.settings.get("init")]
    return base if base in plain else next(iter(plain), None)


def _study_settings(arm: Arm, drop: tuple[str, ...]) -> str:
    kept = {k: v for k, v in arm.settings.items() if k not in RUN_KEYS + drop}
    return json.dumps(kept, sort_keys=True, default=str)


def d_coef_sweeps(arms: list[Arm]) -> list[dict[str, Any]]:
    """Groups of >= 2 distillation arms whose settings differ only in d_coef, each with the
    no-teacher arm of otherwise the same settings (or None)."""
    groups: dict[str, list[Arm]] = {}
    for arm in arms:
        if arm.distill:
            groups.setdefault(_study_settings(arm, ("d_coef",)), []).append(arm)
    sweeps = []
    for members in groups.values():
        if len({float(a.settings.get("d_coef", 0.0)) for a in members}) < 2:
            continue
        members = sorted(members, key=lambda a: float(a.settings.get("d_coef", 0.0)))
        same = _study_settings(members[0], TEACHER_KEYS)
        plain = [
            a
            for a in arms
            if a.kind == "train" and not has_teacher(a)
            and _study_settings(a, TEACHER_KEYS) == same
        ]  # fmt: skip
        sweeps.append(
            {
                "arms": [a.name for a in members],
                "d_coef": [float(a.settings.get("d_coef", 0.0)) for a in members],
                "no_teacher_arm": plain[0].name if plain else None,
            }
        )
    return sweeps


# -- reward errors --------------------------------------------------------------------------------


@torch.no_grad()
def predicted_rewards(
    model: WorldModel, obs: Tensor, action: Tensor, task: Tensor, batch: int = 1024
) -> Tensor:
    """The model's reward r(z, a) for z = enc(obs), as float64 [N], in batches of `batch`."""
    dtype = model._encoder["state"][0].weight.dtype
    out = []
    for i in range(0, len(task), batch):
        t = task[i : i + batch]
        z = model.encode(obs[i : i + batch].to(dtype), t)
        logits = model.reward(z, action[i : i + batch].to(dtype), t)
        out.append(two_hot_inv(logits, model.cfg.vmin, model.cfg.vmax)[:, 0].double())
    return torch.cat(out)


def _task_names(heldout: Path) -> list[str] | None:
    from datapipe.source import scan_sources
    from datapipe.tasksets import match_task_set

    _, layout = scan_sources(heldout)
    task_set = match_task_set(layout.obs_dim, layout.action_dim)
    return None if task_set is None else list(task_set.names)


def _errors(err: np.ndarray) -> dict[str, Any]:
    return {
        "mae": float(np.abs(err).mean()),
        "rmse": float(np.sqrt((err**2).mean())),
        "n": len(err),
    }


def heldout_size(heldout: str | os.PathLike) -> int:
    """Transitions (rows k >= 1) in a held-out chunk folder."""
    from datapipe.source import scan_sources

    files, layout = scan_sources(heldout)
    return sum(f.episodes for f in files) * (layout.rows - 1)


def reward_errors(
    checkpoints: dict[str, Path], heldout: Path, n: int = REWARD_SAMPLE, seed: int = 0
) -> dict[str, dict]:
    """Per named model file: MAE and RMSE of its predicted reward for (obs_{k-1}, a_k) against
    the recorded r_k of the held-out episodes in `heldout` (a chunk folder), overall and per
    task: `{name: {"mae", "rmse", "n", "per_task": {task: {"mae", "rmse", "n"}}}}`.

    Every transition when the folder holds at most `n`, else `n` drawn by `seed` (the same
    ones for every model)."""
    from trainer.evaluation.quantized import heldout_transitions
    from trainer.model.checkpoint import load_any

    heldout = Path(heldout)
    count = None if heldout_size(heldout) <= n else n
    obs, action, reward, task = heldout_transitions(heldout, count, seed)
    names = _task_names(heldout)
    ids = task.numpy()
    out: dict[str, dict] = {}
    for key, path in checkpoints.items():
        model = load_any(path)
        err = (predicted_rewards(model, obs, action, task) - reward.double()).numpy()
        out[key] = _errors(err)
        out[key]["per_task"] = {
            (names[i] if names else f"task{i}"): _errors(err[ids == i]) for i in np.unique(ids)
        }
        del model
    return out


def _reward_models(root: Path, arms: list[Arm]) -> tuple[dict[str, Path], dict[str, Any]]:
    """Files to score ({key: path}) and what each key is; missing files are listed."""
    files: dict[str, Path] = {}
    about: dict[str, Any] = {"arms": {}, "teachers": {}, "references": {}, "missing": []}
    for arm in arms:
        if arm.kind == "reference":
            keys = {arm.name: resolve_path(root, arm.settings.get("checkpoint"))}
            about["references"][arm.name] = arm.name
        else:
            keys = {
                f"{arm.name}/seed{r.seed}": root / r.rel / CHECKPOINT_FILE for r in arm.counted()
            }
            about["arms"][arm.name] = list(keys)
            teacher = arm.settings.get("teacher")
            if teacher and str(teacher) not in about["teachers"]:
                about["teachers"][str(teacher)] = f"teacher:{teacher}"
                keys[f"teacher:{teacher}"] = resolve_path(root, str(teacher))
        for key, path in keys.items():
            if path is not None and path.is_file():
                files[key] = path
            elif path is not None:
                about["missing"].append(str(path))
    about["arms"] = {a: [k for k in ks if k in files] for a, ks in about["arms"].items()}
    return files, about


def _arm_reward_stats(models: dict[str, dict], keys: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {"runs": keys}
    for metric in ("mae", "rmse"):
        s = seed_stats([models[k][metric] for k in keys])
        out |= {f"{metric}_mean": s["mean"], f"{metric}_std": s["std"], "n": s["n"]}
    return out


def _reward_reading(section: dict[str, Any], name: str | None) -> str:
    lead = (
        "A teacher that predicts the data's rewards worse than a student learns them from the "
        "data has little to give through reward distillation."
    )
    scratch = section["arms"].get(name) if name else None
    if not section["teachers"]:
        return lead + " No arm names a teacher."
    if not scratch or scratch["mae_mean"] is None:
        return lead + " There is no from-scratch model to compare the teacher with."
    s_mae, s_std = scratch["mae_mean"], scratch["mae_std"] or 0.0
    spread = f"{s_mae:.4f}" + (f" \u00b1 {s_std:.4f}" if scratch["n"] > 1 else "")
    lines = [lead]
    for path, key in section["teachers"].items():
        if key not in section["models"]:
            lines.append(f"Teacher {path}: its file was not found.")
            continue
        t = section["models"][key]["mae"]
        if abs(t - s_mae) <= s_std:
            case = "about as well as (within the seeds' spread)"
            tail = "it has little to add"
        elif t > s_mae:
            case, tail = "worse than", "this study is in the little-to-give case"
        else:
            case, tail = "better than", "there is reward knowledge to distil"
        lines.append(
            f"Teacher {path} predicts the held-out rewards {case} the from-scratch arm {name} "
            f"learns them (MAE {t:.4f} vs {spread}): {tail}."
        )
    return " ".join(lines)


def reward_section(exp: dict[str, Any], arms: list[Arm], root: Path, scratch: Arm | None) -> dict:
    """report.json's reward_errors (only `heldout` and why it was skipped without held-out
    data); the reading compares each teacher with the from-scratch arm `scratch`."""
    heldout = resolve_path(root, exp.get("heldout"))
    if heldout is None:
        return {"heldout": None, "skipped": "experiment.json names no held-out folder"}
    if not heldout.is_dir():
        return {"heldout": str(exp["heldout"]), "skipped": f"{heldout} does not exist"}
    files, about = _reward_models(root, arms)
    total = heldout_size(heldout)
    models = reward_errors(files, heldout)
    section = {
        "heldout": str(exp["heldout"]),
        "transitions": min(total, REWARD_SAMPLE),
        "sample": f"all {total} transitions, rows k >= 1 of every episode"
        if total <= REWARD_SAMPLE
        else f"{REWARD_SAMPLE} of its {total} transitions, drawn with seed 0",
        "models": models,
        "arms": {a: _arm_reward_stats(models, keys) for a, keys in about["arms"].items() if keys},
        "teachers": about["teachers"],
        "references": about["references"],
        "missing_files": about["missing"],
    }
    section["scratch_arm"] = None if scratch is None else scratch.name
    section["reading"] = _reward_reading(section, section["scratch_arm"])
    return section


# -- the report -----------------------------------------------------------------------------------


def _tasks(exp: dict[str, Any]) -> list[str]:
    tasks = exp["eval"]["tasks"]
    if isinstance(tasks, str):
        from trainer.evaluation.evaluate import resolve_tasks

        return resolve_tasks(tasks)
    return list(tasks)


def _arm_entry(arm: Arm, tasks: list[str]) -> dict[str, Any]:
    done = arm.counted()
    scores = task_matrix(done, tasks)
    final = seed_stats([r.final_score for r in done])
    final["per_seed"] = {r.seed: r.final_score for r in done}
    final["aggregate"] = aggregate(scores) if done else None
    means = scores.mean(0) if done else [None] * len(tasks)
    return {
        "kind": arm.kind,
        "seeds": [r.seed for r in arm.runs],
        "runs": {r.seed: _run_entry(r, tasks) for r in arm.runs},
        "final": final,
        "per_task": {t: _task_entry(v) for t, v in zip(tasks, means, strict=True)},
        "compute": _compute(arm),
    }


def _task_entry(score: float | None) -> dict[str, float | None]:
    """Mean over seeds of a task's final score and mean return (None without a run)."""
    if score is None:
        return {"score": None, "mean_return": None}
    return {"score": float(score), "mean_return": float(score) * 10.0}


def _run_entry(run: Run, tasks: list[str]) -> dict[str, Any]:
    scores = task_matrix([run], tasks)[0] if run.returns is not None else None
    return {
        "path": run.rel,
        "status": run.status,
        "final_step": run.final_step,
        "final_score": run.final_score,
        "task_scores": None
        if scores is None
        else dict(zip(tasks, map(float, scores), strict=True)),
    }


def _compute(arm: Arm) -> dict[str, Any]:
    """Training and evaluation seconds of the finished runs, from their logs (every metrics
    row holds the steps/s of its window; every eval row its wall time), so that a run
    resumed after an interruption counts each of its steps once."""
    done = arm.counted()
    return {
        "runs": len(done),
        "steps": arm.settings.get("steps"),
        "batch_size": arm.settings.get("batch_size"),
        "seconds": float(sum(train_seconds(r.metrics) for r in done)),
        "eval_seconds": float(
            sum(sum(e.get("wall_s") or 0.0 for e in r.evals) for r in done)
            + sum(r.eval_seconds for r in done)
        ),
    }


def train_seconds(rows: list[dict[str, Any]]) -> float:
    """Seconds of training behind metrics rows: each row's window of steps at its steps/s."""
    total, last = 0.0, 0
    for row in rows:
        rate = row.get("steps_per_s")
        if rate:
            total += (row["step"] - last) / rate
        last = row["step"]
    return total


def _comparisons(arms: list[Arm], base: Arm | None, tasks: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if base is None:
        return out
    y = task_matrix(base.counted(), tasks)
    for arm in arms:
        if arm.kind == "reference" or arm is base:
            continue
        x = task_matrix(arm.counted(), tasks)
        if not len(x) or not len(y):
            empty = arm.name if not len(x) else base.name
            out[arm.name] = {"baseline": base.name, "verdict": None,
                             "sentence": f"{arm.name} \u2212 {base.name}: no finished run of "
                             f"{empty}, nothing to compare."}  # fmt: skip
            continue
        c = {"baseline": base.name, **compare(x, y)}
        c["verdict"], c["sentence"] = verdict(arm.name, base.name, c)
        out[arm.name] = c
    return out


UNTRAINED_HIGH = 25.0  # task score (of 100) at which an untrained policy counts as scoring high


def untrained_section(arms: list[Arm], tasks: list[str]) -> dict[str, Any] | None:
    """The baseline every training run starts from: its step-0 evaluation (random weights),
    mean over the training runs that logged one; and the tasks on which that untrained policy
    already scores >= UNTRAINED_HIGH (e.g. pendulum-spin, which a near-constant action spins):
    on those, scores say little about what training learned. Runs of one seed start from the
    same weights whatever the arm: identical step-0 evaluations count once. None without a
    step-0 row."""
    rows = {}
    for arm in arms:
        if arm.kind == "reference":
            continue
        for run in arm.runs:
            first = run.evals[0] if run.evals else None
            if first is not None and first["step"] == 0 and set(tasks) <= first["returns"].keys():
                row = tuple(float(np.mean(first["returns"][t])) / 10.0 for t in tasks)
                rows[row] = row
    if not rows:
        return None
    scores = np.array(list(rows))
    per_task = dict(zip(tasks, map(float, scores.mean(0)), strict=True))
    high = [t for t in tasks if per_task[t] >= UNTRAINED_HIGH]
    return {
        "runs": len(rows),
        "final": seed_stats([float(s) for s in scores.mean(1)]),
        "per_task": per_task,
        "high_threshold": UNTRAINED_HIGH,
        "high_tasks": high,
        "high_share": float(sum(per_task[t] for t in high) / max(sum(per_task.values()), 1e-12)),
    }


def _missing(arms: list[Arm]) -> list[dict[str, Any]]:
    return [
        {"arm": a.name, "seed": r.seed, "path": r.rel, "status": r.status,
         "last_step": r.final_step, "last_score": r.final_score}
        for a in arms
        for r in a.runs
        if not r.counted
    ]  # fmt: skip


def _clean(obj: Any) -> Any:
    """JSON-ready: numpy scalars to Python, non-finite floats to None."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def policy_words(mpc: bool) -> str:
    if mpc:
        return "MPPI planning with the world model (docs/tdmpc2.md#mppi)"
    return "policy-only: the policy network's mean action, no planning"


def build_report(exp_dir: str | os.PathLike) -> tuple[dict[str, Any], list[Arm]]:
    """report.json's content for the experiment folder `exp_dir`, and its arms as read."""
    root = Path(exp_dir)
    exp, arms = read_experiment(root)
    tasks = _tasks(exp)
    base = baseline_arm(exp, arms)
    entries = {a.name: _arm_entry(a, tasks) for a in arms}
    report = {
        "format": REPORT_FORMAT,
        "version": REPORT_VERSION,
        "spec": exp.get("spec"),
        "baseline": None if base is None else base.name,
        "eval": {
            "tasks": tasks,
            "episodes": exp["eval"].get("episodes"),
            "mpc": bool(exp["eval"].get("mpc")),
            "policy": policy_words(bool(exp["eval"].get("mpc"))),
        },
        "statistics": {
            "level": LEVEL,
            "bootstrap": f"percentile, {REPS} resamples, seed {BOOTSTRAP_SEED}",
            "score": "task score = mean return / 10; final score = last evaluation",
        },
        "arms": entries,
        "untrained": untrained_section(arms, tasks),
        "comparisons": _comparisons(arms, base, tasks),
        "d_coef_sweeps": d_coef_sweeps(arms),
        "reward_errors": reward_section(exp, arms, root, scratch_arm(arms, base)),
        "compute": {
            "seconds": sum(e["compute"]["seconds"] for e in entries.values()),
            "eval_seconds": sum(e["compute"]["eval_seconds"] for e in entries.values()),
        },
        "missing": _missing(arms),
    }
    return report, arms


def write_report(exp_dir: str | os.PathLike) -> dict[str, Any]:
    """Write DIR/report.md, DIR/report.json and DIR/figures/*.png for the experiment folder
    `exp_dir`; returns report.json's content."""
    from trainer.study.figures import write_figures
    from trainer.study.markdown import render

    root = Path(exp_dir)
    report, arms = build_report(root)
    report["figures"] = write_figures(report, arms, root / FIGURES_DIR)
    report = _clean(report)
    with atomic_file(root / REPORT_JSON) as f:  # whole or absent, as every output
        f.write((json.dumps(report, indent=2) + "\n").encode())
    with atomic_file(root / REPORT_MD) as f:
        f.write(render(report).encode())
    return report
