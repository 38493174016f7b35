"""`trainer curve --point X=DIR ... --out OUT`: one comparison of a study, across experiments.

Each point is an experiment folder (or its copy under results/) holding the report.json that
`trainer report` wrote, and the value X of whatever the experiments vary (e.g. episodes per
task of the student's data). The curve takes from every report the comparison of one arm with
its baseline (difference of mean normalized score and of the IQM, with their bootstrap
intervals, as the report computed them), both arms' final scores, and the held-out reward
error of both arms and of the arm's teacher. Nothing is recomputed: the numbers are the
reports' own, so every point stays reproducible by the commands of its report.

Writes OUT/curve.json, OUT/curve.md and OUT/curve.png.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datapipe.location import atomic_file
from trainer.errors import TrainError
from trainer.study.figures import pyplot, save_png

REPORT = "report.json"
FILES = ("curve.json", "curve.md", "curve.png")


class CurveError(TrainError):
    """A point that cannot be read or does not hold the comparison asked for."""


@dataclass(frozen=True)
class Point:
    x: float
    folder: Path


def parse_point(text: str) -> Point:
    """`X=DIR` -> Point; X a number."""
    x, sep, folder = text.partition("=")
    try:
        value = float(x)
    except ValueError:
        value = None
    if not sep or not folder or value is None:
        raise CurveError(f"--point {text!r}: give X=DIR, X a number (e.g. 8=runs/study-8)")
    return Point(value, Path(folder))


def _read(point: Point) -> dict[str, Any]:
    path = point.folder / REPORT
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CurveError(
            f"{path}: no such file; run `trainer report {point.folder}` first"
        ) from None
    except (OSError, ValueError) as e:
        raise CurveError(f"{path}: not a readable report ({e})") from None


def _row(point: Point, report: dict[str, Any], arm: str, baseline: str | None) -> dict[str, Any]:
    where = point.folder / REPORT
    base = baseline or report.get("baseline")
    arms = report.get("arms", {})
    for name in (arm, base):
        if name not in arms:
            raise CurveError(f"{where}: no arm {name!r} (arms: {', '.join(arms)})")
    comparison = report.get("comparisons", {}).get(arm)
    if not comparison or comparison.get("baseline") != base:
        raise CurveError(f"{where}: no comparison of {arm!r} with {base!r} in the report")
    errors = report.get("reward_errors") or {}
    by_arm = errors.get("arms", {})
    teacher_key = next(iter(errors.get("teachers", {}).values()), None)
    teacher = errors.get("models", {}).get(teacher_key) if teacher_key else None
    return {
        "x": point.x,
        "report": str(where),
        "eval": report["eval"],
        "arm": arm,
        "baseline": base,
        "scores": {name: arms[name]["final"] for name in (arm, base)},
        "comparison": comparison,
        "reward_mae": {name: by_arm.get(name) for name in (arm, base)},
        "teacher_mae": teacher and {"model": teacher_key, "mae": teacher["mae"]},
    }


def build_curve(points: list[Point], arm: str, baseline: str | None) -> dict[str, Any]:
    if not points:
        raise CurveError("give at least one --point X=DIR")
    rows = [_row(p, _read(p), arm, baseline) for p in sorted(points, key=lambda p: p.x)]
    return {"format": "mt30-curve", "version": 1, "points": rows}


def _fmt(x: float) -> str:
    return f"{x:g}"


def _ci(v: float, ci: list[float]) -> str:
    return f"{v:+.2f} ({ci[0]:+.2f} to {ci[1]:+.2f})"


def _mae(entry: dict[str, Any] | None) -> str:
    if not entry:
        return "-"
    return (
        f"{entry['mae_mean']:.4f} ± {entry['mae_std']:.4f}"
        if entry["n"] > 1
        else (f"{entry['mae_mean']:.4f}")
    )


def markdown(curve: dict[str, Any], x_label: str) -> str:
    rows = curve["points"]
    arm, base = rows[0]["arm"], rows[0]["baseline"]
    lines = [
        f"| {x_label} | {base} score | {arm} score | {arm} − {base} (95% CI) | IQM diff (95% CI) "
        f"| P({arm} > {base}) | reward MAE {base} | reward MAE {arm} | teacher MAE | eval |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        c, s, ev = r["comparison"], r["scores"], r["eval"]
        teacher = f"{r['teacher_mae']['mae']:.4f}" if r["teacher_mae"] else "-"
        cells = [
            _fmt(r["x"]),
            f"{s[base]['mean']:.2f} ± {s[base]['std'] or 0:.2f}",
            f"{s[arm]['mean']:.2f} ± {s[arm]['std'] or 0:.2f}",
            _ci(c["diff_mean"], c["diff_mean_ci95"]),
            _ci(c["diff_iqm"], c["diff_iqm_ci95"]),
            f"{c['probability_of_improvement']:.2f}",
            _mae(r["reward_mae"][base]),
            _mae(r["reward_mae"][arm]),
            teacher,
            f"{ev['episodes']} episodes x {len(ev['tasks'])} tasks, n = {c['n']}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def figure(curve: dict[str, Any], x_label: str, path: Path) -> None:
    plt = pyplot()
    rows = curve["points"]
    arm, base = rows[0]["arm"], rows[0]["baseline"]
    xs = [r["x"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    for key, label, shift, color in (
        ("diff_mean", "mean", 0.97, "C0"),
        ("diff_iqm", "IQM", 1.03, "C1"),
    ):
        ys = [r["comparison"][key] for r in rows]
        lo = [y - r["comparison"][key + "_ci95"][0] for y, r in zip(ys, rows, strict=True)]
        hi = [r["comparison"][key + "_ci95"][1] - y for y, r in zip(ys, rows, strict=True)]
        left.errorbar(
            [x * shift for x in xs],
            ys,
            yerr=[lo, hi],
            fmt="o-",
            capsize=4,
            color=color,
            label=f"{label} (95% CI)",
        )
    left.axhline(0, color="grey", lw=0.8)
    left.set(xscale="log", xlabel=x_label, ylabel=f"{arm} − {base} (normalized score)")
    left.set_xticks(xs, [_fmt(x) for x in xs], minor=False)
    left.minorticks_off()
    left.legend(fontsize=8)
    for name, color in ((base, "C2"), (arm, "C3")):
        pts = [(r["x"], r["reward_mae"][name]) for r in rows if r["reward_mae"][name]]
        right.errorbar(
            [p[0] for p in pts],
            [p[1]["mae_mean"] for p in pts],
            yerr=[p[1]["mae_std"] or 0 for p in pts],
            fmt="o-",
            capsize=4,
            color=color,
            label=name,
        )
    teacher = [r["teacher_mae"]["mae"] for r in rows if r["teacher_mae"]]
    if teacher:
        right.axhline(teacher[0], color="black", ls="--", lw=1, label="teacher")
    right.set(xscale="log", xlabel=x_label, ylabel="held-out reward MAE")
    right.set_xticks(xs, [_fmt(x) for x in xs], minor=False)
    right.minorticks_off()
    right.legend(fontsize=8)
    save_png(fig, path)


def write_curve(
    points: list[Point], out: Path, arm: str, baseline: str | None, x_label: str
) -> dict[str, Any]:
    curve = build_curve(points, arm, baseline)
    curve["x_label"] = x_label
    out.mkdir(parents=True, exist_ok=True)
    with atomic_file(out / "curve.json") as f:
        f.write((json.dumps(curve, indent=1) + "\n").encode())
    with atomic_file(out / "curve.md") as f:
        f.write(markdown(curve, x_label).encode())
    figure(curve, x_label, out / "curve.png")
    return curve
