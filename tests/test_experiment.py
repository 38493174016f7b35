"""Tests for trainer.study.experiment: spec checks, run folders equal to `trainer train/distill`,
resume after SIGKILL of the whole process group, and the report's numbers."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from trainer.study.experiment import SpecError, load_spec, run_experiment
from trainer.training.runlog import read_evals, read_metrics
from trainer.training.runstate import read_training_checkpoint
from trainer.training.train import TrainConfig, train

TASKS = ["cartpole-balance", "pendulum-swingup"]


def spec_text(store: Path, teacher: Path, steps: int = 6, extra: str = "") -> str:
    return f"""
[base]
shards = "{store}"
steps = {steps}
batch_size = 8
eval_every = 3
eval_tasks = {json.dumps(TASKS)}
eval_episodes = 1
seeds = [1, 2]
save_every = 3
log_every = 1
cache_gb = 0.05
device = "cpu"
{extra}
[[arm]]
name = "scratch"

[[arm]]
name = "distill"
teacher = "{teacher}"
d_coef = 0.4

[[arm]]
name = "teacher"
kind = "reference"
checkpoint = "{teacher}"
seeds = [1]
"""


def write_spec(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "spec.toml"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def finished(tmp_path_factory, store, teacher) -> Path:
    """An uninterrupted experiment: 2 arms x 2 seeds and a reference arm, 2 jobs."""
    root = tmp_path_factory.mktemp("exp")
    spec = write_spec(root, spec_text(store, teacher))
    return run_experiment(spec, root / "out", jobs=2, progress=False)


def model_state(run: Path) -> dict:
    ckpt = read_training_checkpoint(run / "checkpoint.pt")
    return {"model": ckpt["agent"]["model"], "step": ckpt["step"], "loader": ckpt["loader"]}


def assert_same_run(a: Path, b: Path) -> None:
    sa, sb = model_state(a), model_state(b)
    assert sa["step"] == sb["step"] and sa["loader"] == sb["loader"]
    assert sa["model"].keys() == sb["model"].keys()
    for k, x in sa["model"].items():
        y = sb["model"][k]
        assert torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y, k

    def strip(rows):
        return [
            {k: v for k, v in r.items() if k not in ("wall_s", "steps_per_s", "data_wait")}
            for r in rows
        ]

    assert strip(read_metrics(a)) == strip(read_metrics(b))
    assert strip(read_evals(a)) == strip(read_evals(b))


def test_run_folders_equal_trainer_runs(finished, store, teacher, tmp_path):
    """Each arm x seed folder is what `trainer train/distill` with those settings writes."""
    common = dict(shards=store, steps=6, batch_size=8, eval_every=3, eval_tasks=",".join(TASKS),
                  eval_episodes=1, save_every=3, log_every=1, cache_gb=0.05, device="cpu",
                  threads=1, progress=False)  # fmt: skip
    train(TrainConfig(**common, seed=2, out=tmp_path / "scratch"))
    assert_same_run(finished / "scratch" / "seed2", tmp_path / "scratch")
    train(TrainConfig(**common, seed=1, teacher=teacher, d_coef=0.4, out=tmp_path / "distill"))
    assert_same_run(finished / "distill" / "seed1", tmp_path / "distill")
    reference = json.loads((finished / "teacher" / "seed1" / "eval.json").read_text())
    assert [t["task"] for t in reference["tasks"]] == TASKS


def test_report_numbers_equal_the_run_folders(finished):
    report = json.loads((finished / "report.json").read_text())
    for arm in ("scratch", "distill"):
        for seed in (1, 2):
            last = read_evals(finished / arm / f"seed{seed}")[-1]
            scores = [sum(r) / len(r) / 10 for r in last["returns"].values()]
            assert last["normalized_score"] == pytest.approx(sum(scores) / len(scores))
            run = report["arms"][arm]["runs"][str(seed)]
            assert run["status"] == "finished" and run["final_step"] == 6
            assert run["final_score"] == last["normalized_score"]
    ref = json.loads((finished / "teacher" / "seed1" / "eval.json").read_text())
    assert report["arms"]["teacher"]["runs"]["1"]["final_score"] == ref["normalized_score"]
    for arm in ("scratch", "distill"):
        finals = [report["arms"][arm]["runs"][s]["final_score"] for s in ("1", "2")]
        assert report["arms"][arm]["final"]["mean"] == pytest.approx(sum(finals) / 2)
    diff = report["comparisons"]["distill"]["diff_mean"]
    assert diff == pytest.approx(
        report["arms"]["distill"]["final"]["mean"] - report["arms"]["scratch"]["final"]["mean"]
    )
    assert (finished / "report.md").is_file()


def test_rerun_keeps_finished_runs(finished, store, teacher):
    before = {p: p.stat().st_mtime_ns for p in finished.glob("*/seed*/checkpoint.pt")}
    spec = finished.parent / "spec.toml"
    run_experiment(spec, finished, jobs=1, progress=False)
    assert {p: p.stat().st_mtime_ns for p in finished.glob("*/seed*/checkpoint.pt")} == before


@pytest.mark.slow
def test_sigkill_of_the_process_group_then_rerun_is_bit_identical(store, teacher, tmp_path):
    spec = write_spec(tmp_path, spec_text(store, teacher, steps=40))
    command = [sys.executable, "-m", "trainer.cli", "experiment", str(spec), "--jobs", "2",
               "--no-progress"]  # fmt: skip
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    proc = subprocess.Popen([*command, "--out", str(killed)], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 240
    ckpt = killed / "scratch" / "seed1" / "checkpoint.pt"
    while time.monotonic() < deadline:  # kill once the first run is past its first checkpoint
        if ckpt.is_file() and 3 <= read_training_checkpoint(ckpt)["step"] < 30:
            break
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "report.json").exists()
    subprocess.run([*command, "--out", str(killed)], check=True, capture_output=True)
    subprocess.run([*command, "--out", str(whole)], check=True, capture_output=True)
    for arm in ("scratch/seed1", "scratch/seed2", "distill/seed1", "distill/seed2"):
        assert_same_run(killed / arm, whole / arm)


@pytest.mark.slow
def test_ctrl_c_stops_every_run_at_a_checkpoint_and_says_how_to_resume(store, teacher, tmp_path):
    """SIGINT to the whole process group, as a terminal sends it: the children ignore it, the
    parent asks each running run to stop (one SIGTERM), and each writes a checkpoint at the
    step it stopped at, which is its last logged step."""
    spec = write_spec(tmp_path, spec_text(store, teacher, steps=2000))
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "trainer.cli", "experiment", str(spec), "--jobs", "2",
         "--no-progress", "--out", str(out)],
        start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    runs = [out / "scratch" / "seed1", out / "distill" / "seed1"]
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not all(
        (r / "metrics.jsonl").is_file() and len(read_metrics(r)) >= 5 for r in runs
    ):
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGINT, err
    assert "Traceback" not in err
    assert f"Resume with: trainer experiment {spec} --out {out} --jobs 2" in err
    for run in runs:
        step = read_training_checkpoint(run / "checkpoint.pt")["step"]
        assert 5 <= step < 2000 and step == read_metrics(run)[-1]["step"], run
        assert not list(run.glob(".*tmp"))
        assert "stopped at step" in (run / "run.log").read_text()


def test_plan_order_kinds_and_threads(store, teacher, tmp_path):
    exp = load_spec(write_spec(tmp_path, spec_text(store, teacher)), tmp_path / "out", jobs=2)
    assert [r.name for r in exp.runs] == [
        "scratch/seed1", "distill/seed1", "teacher/seed1", "scratch/seed2", "distill/seed2",
    ]  # fmt: skip
    assert [a["kind"] for a in exp.arms] == ["train", "distill", "reference"]
    assert exp.runs[0].config.threads == max(1, (os.cpu_count() or 1) // 2)
    assert exp.eval["tasks"] == TASKS and exp.eval["episodes"] == 1


@pytest.mark.parametrize(
    "change, message",
    [
        (("steps = 6", "stepz = 6"), "unknown setting 'stepz'"),
        (("seeds = [1, 2]", "seed = 1"), "unknown setting 'seed' (use seeds"),
        (("eval_every = 3", ""), "eval_every is not set"),
        (('name = "distill"', 'name = "scratch"'), "two arms are named 'scratch'"),
        (("d_coef = 0.4", ""), "names a teacher but no d_coef"),
        (("batch_size = 8", "batch_size = 0"), "batch_size must be >= 1"),
        (('kind = "reference"', 'kind = "reference"\nsteps = 3'), "reference arm and sets 'steps'"),
        (('name = "distill"', 'name = "distill"\neval_episodes = 2'), "cannot be compared: eval_episodes"),
        (('name = "distill"', 'name = "distill"\nshards = "/nonexistent"'), "shards = '/nonexistent'"),
        (("steps = 6", "steps = true"), "[base] steps = True: must be an integer"),
        (("steps = 6", 'steps = "ten"'), "[base] steps = 'ten': must be an integer"),
        (("steps = 6", "steps = 40.5"), "[base] steps = 40.5: must be an integer"),
        (("d_coef = 0.4", 'd_coef = "0.4"'), "[[arm]] 'distill' d_coef = '0.4': must be a number"),
        (("cache_gb = 0.05", "cache_gb = 1"), None),  # an integer is a number
        (('device = "cpu"', "device = 1"), "device = 1: must be a string"),
        (("eval_episodes = 1", "eval_episodes = 1\namp = 1"), "amp = 1: must be true or false"),
    ],
)  # fmt: skip
def test_bad_spec_is_refused_naming_the_key(store, teacher, tmp_path, change, message):
    text = spec_text(store, teacher).replace(*change, 1)
    if message is None:
        load_spec(write_spec(tmp_path, text), tmp_path / "out")
        return
    with pytest.raises(SpecError, match=_escape(message)):
        load_spec(write_spec(tmp_path, text), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_reference_arm_is_kept_only_while_its_checkpoint_is_the_file_evaluated(
    finished, teacher, tmp_path
):
    """Keyed by the checkpoint's sha256: changed in place (or another file by that path),
    the reference run is evaluated again instead of reported with the old score."""
    from trainer.study.experiment import Run, run_state

    out = tmp_path / "teacher" / "seed1"
    out.mkdir(parents=True)
    shutil.copy(finished / "teacher" / "seed1" / "eval.json", out / "eval.json")
    model = shutil.copy(teacher, tmp_path / "model.pt")
    run = Run("teacher", "reference", 1, out, checkpoint=Path(model))
    assert run_state(run) == "done"
    with open(model, "ab") as f:
        f.write(b"\0")
    assert run_state(run) == "new"


def test_missing_teacher_and_other_settings_in_a_used_folder(store, teacher, tmp_path):
    text = spec_text(store, teacher).replace(f'teacher = "{teacher}"', 'teacher = "/no/t.pt"')
    with pytest.raises(SpecError, match=r"teacher = '/no/t\.pt': no such file"):
        load_spec(write_spec(tmp_path, text), tmp_path / "out")
    run = tmp_path / "out" / "scratch" / "seed1"
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"config": {"batch_size": 16, "steps": 6}}))
    with pytest.raises(SpecError, match=r"already holds a run with other settings.*batch_size 16"):
        load_spec(write_spec(tmp_path, spec_text(store, teacher)), tmp_path / "out")


def _escape(text: str) -> str:
    import re

    return re.escape(text)


@pytest.mark.parametrize(
    "name",
    [
        "paper-table1",
        "paper-table2",
        "cpu-study",
        "cpu-study-10k",
        "cpu-study-scarce-2",
        "cpu-study-scarce-8",
        "pool-ab",
        "demo",
        "bench-jobs",
    ],
)
def test_shipped_specs_are_valid(name, tmp_path):
    """Every shipped spec passes every check but those of files made elsewhere."""
    spec = Path(__file__).parents[1] / "experiments" / f"{name}.toml"
    exp = load_spec(spec, tmp_path / "out", check_files=False)
    assert exp.runs and all(r.config is None or r.config.eval_every for r in exp.runs)
    if name.startswith("paper"):
        assert exp.eval["mpc"] and exp.eval["episodes"] == 10 and len(exp.eval["tasks"]) == 30


def test_what_every_run_needs_is_checked_before_the_first(store, teacher, tmp_path, monkeypatch):
    """An untrained teacher and a missing evaluation package stop the experiment before any
    run, naming the key and the install command, instead of failing in a run's log."""
    from tools.make_teacher import make_teacher

    untrained = make_teacher(1, tmp_path / "untrained.pt", seed=7)  # reward head all zeros
    text = spec_text(store, teacher).replace(f'teacher = "{teacher}"', f'teacher = "{untrained}"')
    with pytest.raises(SpecError, match=r"\[\[arm\]\] 'distill' teacher = .*never trained"):
        load_spec(write_spec(tmp_path, text), tmp_path / "out")
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "dm_control" else real(name)
    )
    with pytest.raises(SpecError, match=r"need dm_control: install them with `pip install .*envs"):
        load_spec(write_spec(tmp_path, spec_text(store, teacher)), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_install_hints_follow_the_way_the_package_was_installed(monkeypatch, tmp_path):
    from datapipe import extras

    assert extras.install_hint("envs") == f"pip install -e '{extras._CHECKOUT}[envs]'"  # a clone
    monkeypatch.setattr(extras, "_CHECKOUT", tmp_path)  # site-packages: no pyproject.toml beside
    assert extras.install_hint("envs") == "pip install 'mt30-datapipe[envs]'"


def test_progress_counts_the_evaluations_as_well_as_the_steps(finished, store, teacher, tmp_path):
    """The display's work: steps plus evaluations in step equivalents, guessed from the
    protocol until the logs measure it (an evaluation took longer than the training here)."""
    from trainer.study.experiment import _Work

    fresh = load_spec(write_spec(tmp_path, spec_text(store, teacher)), tmp_path / "new")
    work = _Work(fresh)
    guess = 4.0 * 1 * len(TASKS)  # policy-only: ~4 steps per episode, 1 episode, 2 tasks
    # 4 training runs of 6 steps, each evaluated at steps 0, 3 and 6; 1 reference run
    assert [r.evaluations for r in fresh.runs] == [3, 3, 1, 3, 3]
    done, total, said = work.count(set())
    assert (done, total) == (0, round(24 + 13 * guess))
    assert "evaluations 0/13" in said and "guessed" in said
    exp = load_spec(finished.parent / "spec.toml", finished)
    done, total, said = _Work(exp).count({r.name for r in exp.runs})
    assert done == total and "training steps 24/24, evaluations 13/13" in said
    assert "measured" in said
