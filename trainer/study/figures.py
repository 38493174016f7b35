"""The figures of `trainer report`: PNG files in DIR/figures/, drawn from report.json's numbers
and the run logs (`trainer.study.report`'s arms), each with the caption report.md prints under it.

Curves are the mean over the seeds that reached each step, with a band from their min to their
max; final scores are over finished runs only, as in the rest of the report.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from datapipe.location import atomic_file
from trainer.study.folder import AGREEMENT_KEYS, FIGURES_DIR, Arm

DPI = 110


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, path: Path) -> None:
    """Write the figure as PNG through `atomic_file` (never a partial file) and close it."""
    fig.tight_layout()
    try:
        with atomic_file(path) as f:  # no version stamp: the same bytes
            fig.savefig(f, dpi=DPI, format="png", metadata={"Software": None})
    finally:
        pyplot().close(fig)


def curve(runs: list[list[dict[str, Any]]], key: str | tuple[str, ...]) -> dict[str, np.ndarray]:
    """Steps and the mean, min and max over runs of `key` (the first of several names a row
    holds) at each step some run logged it; empty arrays when none did."""
    keys = (key,) if isinstance(key, str) else key
    by_step: dict[int, list[float]] = {}
    for rows in runs:
        for row in rows:
            value = next((row[k] for k in keys if row.get(k) is not None), None)
            if value is not None and math.isfinite(value):
                by_step.setdefault(int(row["step"]), []).append(float(value))
    steps = sorted(by_step)
    vals = [by_step[s] for s in steps]
    return {
        "step": np.array(steps),
        "mean": np.array([np.mean(v) for v in vals]),
        "min": np.array([min(v) for v in vals]),
        "max": np.array([max(v) for v in vals]),
    }


def _draw_curve(ax, c: dict[str, np.ndarray], label: str, color: str) -> None:
    ax.plot(c["step"], c["mean"], color=color, label=label, marker=".", ms=3)
    ax.fill_between(c["step"], c["min"], c["max"], color=color, alpha=0.2, lw=0)


def _colors(arms: list[Arm]) -> dict[str, str]:
    return {a.name: f"C{i % 10}" for i, a in enumerate(arms)}


def score_vs_step(report: dict, arms: list[Arm], path: Path) -> str | None:
    plt, colors = pyplot(), _colors(arms)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    drawn = 0
    for arm in arms:
        if arm.kind == "reference":
            mean = report["arms"][arm.name]["final"]["mean"]
            if mean is not None:
                ax.axhline(mean, color=colors[arm.name], ls="--", label=f"{arm.name} (reference)")
                drawn += 1
            continue
        c = curve([r.evals for r in arm.runs], "normalized_score")
        if len(c["step"]):
            _draw_curve(ax, c, arm.name, colors[arm.name])
            drawn += 1
    if not drawn:
        pyplot().close(fig)
        return None
    ax.set_xlabel("training step")
    ax.set_ylabel("normalized score (0-100)")
    ax.legend(fontsize=8)
    save_png(fig, path)
    return (
        "Normalized score during training: line = mean over the seeds that reached the step, "
        "band = min to max over those seeds; dashed lines = reference arms' scores."
    )


def losses(report: dict, arms: list[Arm], path: Path) -> str | None:
    plt, colors = pyplot(), _colors(arms)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    drawn = 0
    for ax, key in zip(axes, ("reward_loss", "distill_loss"), strict=True):
        for arm in arms:
            c = curve([r.metrics for r in arm.runs], key) if arm.kind != "reference" else None
            if c is not None and len(c["step"]):
                _draw_curve(ax, c, arm.name, colors[arm.name])
                drawn += 1
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("training step")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no arm logged it", ha="center", va="center", transform=ax.transAxes)
    if not drawn:
        pyplot().close(fig)
        return None
    save_png(fig, path)
    return (
        "Training losses (reward loss; distillation loss of the distillation arms): mean over "
        "seeds, band = min to max."
    )


def per_task(report: dict, arms: list[Arm], path: Path) -> str | None:
    names = [a.name for a in arms if report["arms"][a.name]["final"]["n"]]
    if not names:
        return None
    tasks = report["eval"]["tasks"]
    grid = np.array(
        [[report["arms"][a]["per_task"][t]["score"] for a in names] for t in tasks], dtype=float
    )
    plt = pyplot()
    fig, ax = plt.subplots(
        figsize=(max(4.0, 1.1 * len(names) + 2.5), max(3.0, 0.3 * len(tasks) + 1.5))
    )
    image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=100)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(tasks)), tasks, fontsize=7)
    for (i, j), v in np.ndenumerate(grid):
        ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=6,
                color="white" if v < 50 else "black")  # fmt: skip
    fig.colorbar(image, ax=ax, label="task score = mean return / 10")
    save_png(fig, path)
    return "Final score per task and arm, mean over the finished seeds."


def d_coef(report: dict, arms: list[Arm], path: Path) -> str | None:
    sweeps = report["d_coef_sweeps"]
    if not sweeps:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, sweep in enumerate(sweeps):
        names, x = list(sweep["arms"]), list(sweep["d_coef"])
        if sweep["no_teacher_arm"]:
            names, x = [sweep["no_teacher_arm"], *names], [0.0, *x]
        finals = [report["arms"][n]["final"] for n in names]
        keep = [k for k, f in enumerate(finals) if f["n"]]
        ax.errorbar([x[k] for k in keep], [finals[k]["mean"] for k in keep],
                    yerr=[finals[k]["std"] or 0.0 for k in keep], marker="o", capsize=3,
                    color=f"C{i % 10}", label=", ".join(sweep["arms"]))  # fmt: skip
    ax.set_xlabel("d_coef (0: the same settings without a teacher)")
    ax.set_ylabel("final normalized score")
    ax.legend(fontsize=7)
    save_png(fig, path)
    return (
        "Final score against the distillation weight d_coef: mean \u00b1 std over seeds (no bar "
        "for n=1); at d_coef 0 the no-teacher arm of otherwise the same settings, if any."
    )


def agreement(report: dict, arms: list[Arm], path: Path) -> str | None:
    plt, colors = pyplot(), _colors(arms)
    fig, ax = plt.subplots(figsize=(7, 4))
    for arm in arms:
        if arm.distill:
            c = curve([r.metrics for r in arm.runs], AGREEMENT_KEYS)
            if len(c["step"]):
                _draw_curve(ax, c, arm.name, colors[arm.name])
    if not ax.get_legend_handles_labels()[0]:
        pyplot().close(fig)
        return None
    ax.set_xlabel("training step")
    ax.set_ylabel("mean |r_student - r_teacher| (batch)")
    ax.legend(fontsize=8)
    save_png(fig, path)
    return (
        "Reward agreement with the teacher on training batches (reward_mae_teacher, lower = "
        "closer): mean over seeds, band = min to max."
    )


def _reward_bars(section: dict) -> list[tuple[str, float, float, float, float]]:
    """(label, MAE, MAE std, RMSE, RMSE std) per arm, teacher and reference."""
    bars = [
        (arm, s["mae_mean"], s["mae_std"] or 0.0, s["rmse_mean"], s["rmse_std"] or 0.0)
        for arm, s in section["arms"].items()
    ]
    others = [(f"teacher: {Path(p).name}", k) for p, k in section["teachers"].items()]
    others += [(f"{name} (reference)", k) for name, k in section["references"].items()]
    for label, key in others:
        if key in section["models"]:
            m = section["models"][key]
            bars.append((label, m["mae"], 0.0, m["rmse"], 0.0))
    return bars


def reward_error(report: dict, arms: list[Arm], path: Path) -> str | None:
    section = report["reward_errors"]
    bars = _reward_bars(section) if "models" in section else []
    if not bars:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 * len(bars) + 2), 4))
    x = np.arange(len(bars))
    for offset, (i, name) in zip((-0.2, 0.2), ((1, "MAE"), (3, "RMSE")), strict=True):
        ax.bar(x + offset, [b[i] for b in bars], 0.4, yerr=[b[i + 1] for b in bars],
               capsize=3, label=name)  # fmt: skip
    ax.set_xticks(x, [b[0] for b in bars], rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("reward error on held-out transitions")
    ax.legend(fontsize=8)
    save_png(fig, path)
    return (
        f"Reward prediction error against the recorded rewards of held-out episodes "
        f"({section['sample']}): arms are mean \u00b1 std over seeds of their final models."
    )


def write_figures(report: dict, arms: list[Arm], out: Path) -> dict[str, dict[str, str]]:
    """Draw every figure that has data into `out`; returns {name: {"path", "caption"}} with
    paths relative to the experiment folder. Figures from an earlier report that no longer
    have data are removed."""
    out.mkdir(parents=True, exist_ok=True)
    figures = {
        "score_vs_step": score_vs_step,
        "losses": losses,
        "per_task": per_task,
        "d_coef": d_coef,
        "agreement": agreement,
        "reward_error": reward_error,
    }
    drawn = {}
    for name, draw in figures.items():
        path = out / f"{name}.png"
        caption = draw(report, arms, path)
        if caption is None:
            path.unlink(missing_ok=True)
        else:
            drawn[name] = {"path": f"{FIGURES_DIR}/{name}.png", "caption": caption}
    return drawn
