"""trainer.study.report: the report of a hand-built experiment folder, and held-out reward errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import load_chunk, make_source

from tools.make_teacher import make_teacher
from trainer.model.checkpoint import load_any, save_official
from trainer.model.math import two_hot_inv
from trainer.study.report import REPORT_JSON, REPORT_MD, reward_errors, write_report

TASKS = ["walker-walk", "cheetah-run", "cartpole-swingup"]
STEPS = (0, 50, 100)
SETTINGS = {"steps": 100, "batch_size": 16, "teacher": None, "d_coef": 0.0, "distill": "first",
            "init": None, "seed": 1, "out": "x"}  # fmt: skip


def eval_row(step: int, rng: np.random.Generator) -> dict:
    returns = {t: rng.uniform(0, 1000, 2).round(3).tolist() for t in TASKS}
    score = float(np.mean([np.mean(r) / 10 for r in returns.values()]))
    return {"step": step, "normalized_score": score, "returns": returns, "wall_s": 1.0}


def write_run(folder: Path, seed: int, distill: bool, finished: bool = True) -> dict:
    """A train/distill run folder; returns its last eval row."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng([seed, distill])
    evals = [eval_row(s, rng) for s in STEPS]
    rows = []
    for step in STEPS[1:]:
        row = {"step": step, "reward_loss": 1 / step, "total_loss": 2 / step,
               "steps_per_s": 5.0 * seed}  # fmt: skip
        if distill:
            row |= {"distill_loss": 0.5 / step, "reward_mae_teacher": 3 / step, "d_coef": 0.4}
        rows.append(row)
    for name, lines in (("evals.jsonl", evals), ("metrics.jsonl", rows)):
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in lines))
    (folder / "config.json").write_text(json.dumps({"config": SETTINGS}))
    if finished:
        summary = {"steps": 100, "seconds": 10.0 + seed, "eval_seconds": 2.0,
                   "final_eval": evals[-1], "final_losses": rows[-1]}  # fmt: skip
        (folder / "summary.json").write_text(json.dumps(summary))
    return evals[-1]


def write_reference(folder: Path) -> float:
    folder.mkdir(parents=True)
    tasks = [{"task": t, "task_id": i, "returns": [500.0 + 10 * i], "mean_return": 500.0 + 10 * i,
              "score": 50.0 + i} for i, t in enumerate(TASKS)]  # fmt: skip
    result = {"normalized_score": 51.0, "protocol": {"wall_s": 4.0}, "tasks": tasks}
    (folder / "eval.json").write_text(json.dumps(result))
    return 51.0


def arm(name: str, kind: str, seeds: list[int], **settings) -> dict:
    return {"name": name, "kind": kind, "seeds": seeds,
            "runs": {str(s): f"{name}/seed{s}" for s in seeds},
            "settings": SETTINGS | settings}  # fmt: skip


def make_experiment(root: Path, arms: list[dict], heldout: str | None = None, absent=()) -> dict:
    """experiment.json plus every run folder but the (arm, seed) in `absent`; returns
    {arm: {seed: last eval row}}."""
    finals: dict = {}
    for a in arms:
        for s in a["seeds"]:
            if (a["name"], s) in absent:
                continue
            folder = root / a["runs"][str(s)]
            if a["kind"] == "reference":
                finals.setdefault(a["name"], {})[str(s)] = write_reference(folder)
            else:
                row = write_run(folder, s, a["kind"] == "distill")
                finals.setdefault(a["name"], {})[str(s)] = row
    exp = {"format": "mt30-experiment", "version": 1, "spec": "experiments/test.toml",
           "eval": {"tasks": TASKS, "episodes": 2, "mpc": False}, "heldout": heldout,
           "baseline": "scratch", "arms": arms}  # fmt: skip
    (root / "experiment.json").write_text(json.dumps(exp))
    return finals


def two_arms() -> list[dict]:
    return [
        arm("scratch", "train", [1, 2]),
        arm("distill-0.4", "distill", [1, 2], teacher="teacher.pt", d_coef=0.4),
        arm("teacher", "reference", [1], checkpoint="teacher.pt"),
    ]


def test_report_numbers_are_the_runs_numbers(tmp_path):
    finals = make_experiment(tmp_path, two_arms())
    report = write_report(tmp_path)
    on_disk = json.loads((tmp_path / REPORT_JSON).read_text())
    assert on_disk == report
    means = {}
    for name in ("scratch", "distill-0.4"):
        final = report["arms"][name]["final"]
        expect = [
            np.mean([np.mean(row["returns"][t]) / 10 for t in TASKS])
            for row in finals[name].values()
        ]
        got = [final["per_seed"][s] for s in ("1", "2")]
        assert got == pytest.approx(expect, abs=1e-9)
        assert final["n"] == 2
        assert final["mean"] == pytest.approx(np.mean(expect))
        assert final["std"] == pytest.approx(np.std(expect, ddof=1))
        lo, hi = final["ci95"]
        assert lo < final["mean"] < hi
        assert final["aggregate"]["mean"] == pytest.approx(np.mean(expect))
        means[name] = np.mean(expect)
    ref = report["arms"]["teacher"]["final"]
    assert ref["n"] == 1 and ref["mean"] == 51.0 and ref["std"] is None and ref["ci95"] is None
    comp = report["comparisons"]["distill-0.4"]
    assert comp["diff_mean"] == pytest.approx(means["distill-0.4"] - means["scratch"])
    lo, hi = comp["diff_mean_ci95"]
    assert lo <= comp["diff_mean"] <= hi and 0 <= comp["probability_of_improvement"] <= 1
    assert "teacher" not in report["comparisons"] and "scratch" not in report["comparisons"]
    for name in ("score_vs_step", "losses", "per_task", "agreement"):
        assert (tmp_path / "figures" / f"{name}.png").stat().st_size > 1000
    assert not (tmp_path / "figures" / "d_coef.png").exists()
    assert report["reward_errors"]["heldout"] is None and report["missing"] == []
    md = (tmp_path / REPORT_MD).read_text()
    for name in ("scratch", "distill-0.4", "teacher", "policy-only", "figures/per_task.png"):
        assert name in md
    assert comp["sentence"] in md
    # 100 steps per run at 5 x seed steps/s, 2 arms x seeds 1, 2; 3 evals of 1 s per run + 4 s
    assert report["compute"]["seconds"] == pytest.approx(2 * (100 / 5 + 100 / 10))
    assert report["compute"]["eval_seconds"] == pytest.approx(4 * 3 * 1.0 + 4.0)
    before = (tmp_path / REPORT_JSON).read_bytes(), md
    write_report(tmp_path)
    assert ((tmp_path / REPORT_JSON).read_bytes(), (tmp_path / REPORT_MD).read_text()) == before


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """A fresh 1M teacher (predicts reward 0) and a student whose reward head is perturbed."""
    root = tmp_path_factory.mktemp("models")
    teacher = make_teacher(1, root / "teacher.pt", seed=0)
    model = load_any(teacher)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model._reward[-1].parameters():
            p.add_(0.05 * torch.randn_like(p))
    save_official(model, root / "student.pt")
    return {"teacher": teacher, "student": root / "student.pt"}


@pytest.fixture(scope="module")
def heldout(tmp_path_factory) -> Path:
    """30 tasks x 1 episode of 11 rows: 300 transitions."""
    return make_source(tmp_path_factory.mktemp("held"), episodes_per_task=1, chunks=1,
                       episode_length=11)  # fmt: skip


def test_reward_errors_match_an_independent_computation(models, heldout):
    errors = reward_errors(models, heldout)
    data = load_chunk(next(heldout.glob("chunk_*.pt")))
    obs, action = data["obs"][:, :-1].flatten(0, 1), data["action"][:, 1:].flatten(0, 1)
    reward, task = data["reward"][:, 1:].flatten(), data["task"][:, 1:].flatten().long()
    for name, path in models.items():
        model = load_any(path)
        with torch.no_grad():
            logits = model.reward(model.encode(obs, task), action, task)
            pred = two_hot_inv(logits, model.cfg.vmin, model.cfg.vmax)[:, 0]
        err = (pred.double() - reward.double()).numpy()
        e = errors[name]
        assert e["n"] == 300 and np.isfinite([e["mae"], e["rmse"]]).all()
        assert e["mae"] == pytest.approx(np.abs(err).mean(), rel=1e-6)
        assert e["rmse"] == pytest.approx(np.sqrt((err**2).mean()), rel=1e-6)
        assert len(e["per_task"]) == 30 and e["per_task"]["walker-walk"]["n"] == 10
    # a fresh init predicts reward 0: its MAE is the data's mean |r|
    assert errors["teacher"]["mae"] == pytest.approx(reward.abs().double().mean().item(), abs=1e-5)
    assert errors["student"]["mae"] != pytest.approx(errors["teacher"]["mae"])
    sampled = reward_errors({"student": models["student"]}, heldout, n=64, seed=3)
    assert sampled["student"]["n"] == 64 and np.isfinite(sampled["student"]["rmse"])


def test_unfinished_runs_sweeps_and_reward_errors(tmp_path, models, heldout):
    arms = [
        arm("scratch", "train", [1, 2, 3]),
        arm("distill-0.4", "distill", [1, 2], teacher="teacher.pt", d_coef=0.4),
        arm("distill-0.8", "distill", [1, 2], teacher="teacher.pt", d_coef=0.8),
        arm("teacher", "reference", [1], checkpoint="teacher.pt"),
        arm("never-ran", "train", [1], batch_size=32),
    ]
    absent = {("scratch", 3), ("never-ran", 1)}
    make_experiment(tmp_path, arms, heldout=str(heldout), absent=absent)
    (tmp_path / "scratch/seed2/summary.json").unlink()  # seed 2 did not finish
    shutil.copy(models["teacher"], tmp_path / "teacher.pt")
    for name, seeds in (("scratch", [1]), ("distill-0.4", [1, 2]), ("distill-0.8", [1, 2])):
        for s in seeds:
            shutil.copy(models["student"], tmp_path / name / f"seed{s}" / "checkpoint.pt")
    report = write_report(tmp_path)
    missing = {(m["arm"], m["seed"]): m["status"] for m in report["missing"]}
    assert missing == {("scratch", "2"): "unfinished", ("scratch", "3"): "missing",
                       ("never-ran", "1"): "missing"}  # fmt: skip
    assert report["arms"]["scratch"]["final"]["n"] == 1
    assert report["arms"]["never-ran"]["final"]["mean"] is None
    assert "nothing to compare" in report["comparisons"]["never-ran"]["sentence"]
    assert report["comparisons"]["distill-0.4"]["bootstrap"].startswith("tasks resampled")
    md = (tmp_path / REPORT_MD).read_text()
    assert "scratch seed 2 (`scratch/seed2`): unfinished" in md
    assert "scratch seed 3 (`scratch/seed3`): missing" in md
    assert "task-level bootstrap only" in md
    sweep = report["d_coef_sweeps"]
    assert sweep == [{"arms": ["distill-0.4", "distill-0.8"], "d_coef": [0.4, 0.8],
                      "no_teacher_arm": "scratch"}]  # fmt: skip
    assert (tmp_path / "figures" / "d_coef.png").exists()
    section = report["reward_errors"]
    assert section["arms"]["distill-0.4"]["n"] == 2 and section["arms"]["scratch"]["n"] == 1
    assert section["arms"]["distill-0.4"]["mae_std"] == pytest.approx(0.0, abs=1e-12)
    teacher_mae = section["models"]["teacher:teacher.pt"]["mae"]
    assert section["models"]["teacher"]["mae"] == teacher_mae  # the reference arm's same file
    assert "Teacher teacher.pt predicts the held-out rewards" in section["reading"]
    assert section["reading"] in md and "figures/reward_error.png" in md
    assert (tmp_path / "figures" / "reward_error.png").exists()


def test_the_untrained_step_0_score_is_a_baseline_row_and_high_tasks_are_marked(tmp_path):
    """Every training run's step-0 evaluation is the untrained baseline (identical ones, as
    runs of one seed in two arms, counted once); tasks it already scores high on are marked."""
    finals = make_experiment(tmp_path, two_arms())
    firsts = {}
    for name in ("scratch", "distill-0.4"):
        for seed in ("1", "2"):
            path = tmp_path / name / f"seed{seed}" / "evals.jsonl"
            rows = [json.loads(line) for line in path.read_text().splitlines()]
            if name == "distill-0.4":  # the same seed starts from the same weights
                rows[0] = firsts[seed]
            firsts[seed] = rows[0]
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = write_report(tmp_path)
    untrained = report["untrained"]
    expect = {s: [np.mean(r["returns"][t]) / 10 for t in TASKS] for s, r in firsts.items()}
    assert untrained["runs"] == 2
    assert untrained["final"]["mean"] == pytest.approx(
        np.mean([np.mean(v) for v in expect.values()])
    )
    per_task = {t: np.mean([expect[s][i] for s in expect]) for i, t in enumerate(TASKS)}
    assert untrained["per_task"] == pytest.approx(per_task)
    assert untrained["high_tasks"] == [t for t in TASKS if per_task[t] >= 25.0]
    assert untrained["high_tasks"]  # uniform(0, 1000) returns: some tasks score >= 25
    md = (tmp_path / REPORT_MD).read_text()
    assert "| untrained (step 0) | baseline | 2 |" in md
    assert f"| {untrained['high_tasks'][0]} * |" in md and "An untrained policy (step 0" in md
    assert f"It already scores >= 25 of 100 on {untrained['high_tasks'][0]} " in md
    assert finals  # the final scores are untouched by the step-0 rows
