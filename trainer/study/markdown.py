"""report.md of `trainer report`: report.json's numbers in plain words and tables.

Rendered from report.json's content only, so the two always agree; the headline table and the
comparisons come first, then the figures, the per-task table, the reward errors, compute, the
eval protocol and the runs that are missing or unfinished.
"""

from __future__ import annotations

from typing import Any

NA = "n/a"


def _num(x: float | None, digits: int = 2) -> str:
    return NA if x is None else f"{x:.{digits}f}"


def _ci(ci: list[float] | None, digits: int = 2) -> str:
    return NA if ci is None else f"[{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"


def _pm(mean: float | None, std: float | None, digits: int = 2) -> str:
    if mean is None:
        return NA
    return _num(mean, digits) + ("" if std is None else f" \u00b1 {std:.{digits}f}")


def _with_ci(agg: dict[str, Any], key: str) -> str:
    return NA if not agg else f"{_num(agg[key])} {_ci(agg[f'{key}_ci95'])}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _intro(report: dict[str, Any]) -> list[str]:
    arms, ev = report["arms"], report["eval"]
    n_missing = len(report["missing"])
    listed = ", ".join(f"{a} ({e['kind']})" for a, e in arms.items())
    text = (
        f"{len(arms)} arms: {listed}. An "
        "arm's final score is, for each finished run, the normalized score of its last "
        f"evaluation: the mean over the {len(ev['tasks'])} tasks of the task score (mean "
        f"return / 10, 0 to 100). Evaluation: {ev['episodes']} episode(s) per task, "
        f"{ev['policy']}. "
    )
    if report["baseline"]:
        text += f"Every other arm is compared with the baseline arm {report['baseline']}. "
    if n_missing:
        text += (
            f"{n_missing} run(s) are missing or unfinished and do not count (listed at the end)."
        )
    else:
        text += "Every run finished."
    return [f"# Experiment report: {report['spec']}", "", text, ""]


def _headline(report: dict[str, Any]) -> list[str]:
    rows = []
    for name, e in report["arms"].items():
        f, agg = e["final"], e["final"]["aggregate"] or {}
        per_seed = ", ".join(f"{s}: {v:.2f}" for s, v in f["per_seed"].items()) or NA
        rows.append([
            name, e["kind"], str(f["n"]), _pm(f["mean"], f["std"]), _ci(f["ci95"]),
            _with_ci(agg, "iqm"), _with_ci(agg, "mean"), per_seed,
        ])  # fmt: skip
    untrained = report.get("untrained")
    if untrained:
        f = untrained["final"]
        rows.append(["untrained (step 0)", "baseline", str(f["n"]), _pm(f["mean"], f["std"]),
                     _ci(f["ci95"]), NA, NA, NA])  # fmt: skip
    header = ["arm", "kind", "n", "mean \u00b1 std", "95% CI (t, seeds)", "IQM [95% CI]",
              "mean over tasks x seeds [95% CI]", "per seed"]  # fmt: skip
    note = (
        "Scores are 0 to 100. std (ddof=1) and the t-interval need n >= 2. IQM and mean over "
        "tasks x seeds: 95% stratified-bootstrap intervals "
        f"({report['statistics']['bootstrap']}) that resample seeds within every task; for an "
        "arm with n = 1 they resample tasks only and say nothing about seed-to-seed variation."
    )
    if untrained:
        note += (
            " The untrained row is every training run's step-0 evaluation (random weights, "
            "the same protocol): the score a policy gets for nothing."
        )
        high = untrained["high_tasks"]
        if high:
            per_task = ", ".join(f"{t} {untrained['per_task'][t]:.1f}" for t in high)
            note += (
                f" It already scores >= {untrained['high_threshold']:.0f} of 100 on "
                f"{per_task}: {100 * untrained['high_share']:.0f}% of its score (marked * in "
                f"the per-task table)."
            )
    return ["## Final scores", "", *_table(header, rows), "", note, ""]


def _comparisons(report: dict[str, Any]) -> list[str]:
    lines = [f"## Against the baseline ({report['baseline'] or 'none'})", ""]
    if report["baseline"] is None:
        none = "No baseline: experiment.json names none and no train arm lacks a teacher."
        return [*lines, none, ""]
    comps = report["comparisons"]
    lines += [f"- {c['sentence']}" for c in comps.values()] or ["- No other arm to compare."]
    note = (
        "Differences are of the mean normalized score and of the IQM, with 95% bootstrap "
        'intervals; "beyond noise" means the mean\'s interval excludes 0. P(a > b) is the '
        "probability of improvement averaged over tasks (rliable)."
    )
    return [*lines, "", note, ""]


def _figures(report: dict[str, Any]) -> list[str]:
    lines = ["## Figures", ""]
    for name, fig in report["figures"].items():
        lines += [f"![{name}]({fig['path']})", "", f"*{fig['caption']}*", ""]
    if not report["figures"]:
        lines += ["No figure: no run has data yet.", ""]
    return lines


def _per_task(report: dict[str, Any]) -> list[str]:
    names = [a for a, e in report["arms"].items() if e["final"]["n"]]
    untrained = report.get("untrained")
    high = set(untrained["high_tasks"]) if untrained else set()
    rows = [
        [f"{t} *" if t in high else t,
         *(_num(report["arms"][a]["per_task"][t]["mean_return"], 1) for a in names),
         *([_num(untrained["per_task"][t] * 10.0, 1)] if untrained else [])]
        for t in report["eval"]["tasks"]
    ]  # fmt: skip
    title = "## Per-task final returns (mean over finished seeds; task score = return / 10)"
    header = ["task", *names, *(["untrained (step 0)"] if untrained else [])]
    lines = [title, "", *_table(header, rows), ""]
    if high:
        lines += [
            f"\\* An untrained policy (step 0, random weights) already scores >= "
            f"{untrained['high_threshold']:.0f} of 100 on these {len(high)} task(s), "
            f"{100 * untrained['high_share']:.0f}% of its score: differences between arms there "
            f"say little about what training learned.",
            "",
        ]
    return lines


def _reward_rows(section: dict[str, Any]) -> list[list[str]]:
    rows = [
        [arm, f"final models, {s['n']} seed(s)", _pm(s["mae_mean"], s["mae_std"], 4),
         _pm(s["rmse_mean"], s["rmse_std"], 4)]
        for arm, s in section["arms"].items()
    ]  # fmt: skip
    named = [(f"teacher {p}", k) for p, k in section["teachers"].items()]
    named += [(f"{a} (reference)", k) for a, k in section["references"].items()]
    for label, key in named:
        m = section["models"].get(key)
        if m is not None:
            rows.append([label, "one file", _num(m["mae"], 4), _num(m["rmse"], 4)])
    return rows


def _reward(report: dict[str, Any]) -> list[str]:
    section = report["reward_errors"]
    lines = ["## Reward error on held-out episodes", ""]
    if "skipped" in section:
        return [*lines, f"Not computed: {section['skipped']}.", ""]
    lines += [
        f"Held-out data: `{section['heldout']}`, {section['sample']}. Each model's predicted "
        "reward r(enc(obs_{k-1}), a_k) against the recorded r_k (per task in report.json).",
        "",
        *_table(["model", "what", "MAE", "RMSE"], _reward_rows(section)),
        "",
        section["reading"],
        "",
    ]
    if section["missing_files"]:
        lines += ["Files not found: " + ", ".join(f"`{p}`" for p in section["missing_files"]), ""]
    return lines


def _compute(report: dict[str, Any]) -> list[str]:
    rows = [
        [a, str(c["runs"]), str(c["steps"] if c["steps"] is not None else NA),
         str(c["batch_size"] if c["batch_size"] is not None else NA), _num(c["seconds"], 0),
         _num(c["eval_seconds"], 0)]
        for a, e in report["arms"].items()
        for c in [e["compute"]]
    ]  # fmt: skip
    total = report["compute"]
    hours = (total["seconds"] + total["eval_seconds"]) / 3600
    text = (
        f"In all: {total['seconds']:.0f} s of training and {total['eval_seconds']:.0f} s of "
        f"evaluation ({hours:.2f} h), summed over the finished runs from their logs (metrics "
        f"rows: steps at their steps/s; eval rows: wall time)."
    )
    header = ["arm", "finished runs", "steps", "batch", "train s", "eval s"]
    return ["## Compute", "", *_table(header, rows), "", text, ""]


def _protocol(report: dict[str, Any]) -> list[str]:
    ev = report["eval"]
    return [
        "## Eval protocol",
        "",
        f"- Tasks ({len(ev['tasks'])}): {', '.join(ev['tasks'])}",
        f"- Episodes per task per evaluation: {ev['episodes']}",
        f"- Actions: {ev['policy']}",
        f"- Scores: {report['statistics']['score']}",
        "",
    ]


def _missing(report: dict[str, Any]) -> list[str]:
    lines = ["## Missing and unfinished runs", ""]
    for m in report["missing"]:
        what = {
            "missing": "missing (no run folder or no eval.json)",
            "unfinished": "unfinished (no summary.json)",
            "no-evals": "finished without any evaluation",
        }[m["status"]]
        last = "" if m["last_step"] is None else (
            f"; last evaluation at step {m['last_step']}, score {_num(m['last_score'])}"
        )  # fmt: skip
        lines.append(f"- {m['arm']} seed {m['seed']} (`{m['path']}`): {what}{last}; not counted.")
    if not report["missing"]:
        lines.append("None: every run finished.")
    return [*lines, ""]


def render(report: dict[str, Any]) -> str:
    """report.md's text for report.json's content `report`."""
    parts = (_intro, _headline, _comparisons, _figures, _per_task, _reward, _compute,
             _protocol, _missing)  # fmt: skip
    lines = [line for part in parts for line in part(report)]
    return "\n".join(lines).rstrip() + "\n"
