"""Progress of the long steps: rate and ETA, and clean logs off a terminal (a plain line per
interval and one at the end, never a bar's carriage returns); `--no-progress` prints none."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from datapipe.progress import Progress, track

REPO = Path(__file__).resolve().parents[1]


def run(*args) -> subprocess.CompletedProcess:
    """A command as it runs in a log: stdout and stderr are pipes, not a terminal."""
    return subprocess.run(
        [sys.executable, "-m", *(str(a) for a in args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )


def progress_lines(text: str, desc: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(f"{desc}: ")]


def test_lines_off_a_terminal(capsys):
    with Progress(4, "work", "item", interval=0.0) as bar:
        for _ in range(4):
            bar.update(postfix="loss 0.5")
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = progress_lines(err, "work")
    assert len(lines) == 4 and lines[-1].startswith("work: 4/4 items, ")
    assert "items/s, ETA 0:00:00, loss 0.5" in lines[-1]

    with Progress(1000, "quiet", "item", interval=3600.0) as bar:
        for _ in range(1000):
            bar.update()
    assert len(progress_lines(capsys.readouterr().err, "quiet")) == 1  # the end only

    assert list(track(range(3), "off", "item", enabled=False)) == [0, 1, 2]
    assert capsys.readouterr().err == ""


def test_a_start_line_and_counts_set_from_elsewhere(capsys):
    """As an experiment shows its runs' steps: the rate counts only this display's steps."""
    with Progress(100, "exp", "step", initial=40, postfix="runs 1/3", start_line=True) as bar:
        bar.set(40, "runs 1/3, running a")  # nothing new yet: no line
        bar.set(100, "runs 3/3")
    lines = progress_lines(capsys.readouterr().err, "exp")
    assert lines[0] == "exp: 40/100 steps, runs 1/3" and len(lines) == 2
    assert lines[1].startswith("exp: 100/100 steps, ") and lines[1].endswith(
        " steps/s, ETA 0:00:00, runs 3/3"
    )


def test_train_and_make_teacher_progress(store, tmp_path):
    common = ("--shards", store, "--steps", 5, "--batch-size", 8, "--device", "cpu")
    shown = run("trainer", "train", *common, "--out", tmp_path / "a")
    lines = progress_lines(shown.stderr, "train")
    assert len(lines) == 1 and lines[0].startswith("train: 5/5 steps") and "ETA" in lines[0]
    assert "\r" not in shown.stderr
    quiet = run("trainer", "train", *common, "--out", tmp_path / "b", "--no-progress")
    assert progress_lines(quiet.stderr, "train") == []

    out = tmp_path / "teacher" / "t.pt"
    made = run("tools.cli", "make-teacher", "--size", 1, "--out", out, "--train-steps", 3,
               "--shards", store)  # fmt: skip
    assert progress_lines(made.stderr, "train")[-1].startswith("train: 3/3 steps")
    assert sorted(p.name for p in out.parent.iterdir()) == ["t.pt"]  # no <stem>-run/ left


def test_build_and_verify_progress(small_source, tmp_path):
    dst = tmp_path / "store"
    built = run("datapipe.cli", "build", "--src", small_source, "--dst", dst, "--format", "zarr",
                "--workers", 0)  # fmt: skip
    assert progress_lines(built.stderr, "build")[-1].startswith("build: ")
    checked = run("tools.cli", "verify-shards", dst)
    assert progress_lines(checked.stderr, "verify files")
    assert checked.stdout.strip().splitlines()[-1].startswith("OK")
    assert "\r" not in built.stderr + checked.stderr


@pytest.mark.slow
def test_make_mt30_physics_progress(tmp_path):
    pytest.importorskip("dm_control")
    made = run("tools.cli", "make-mt30", "--physics", "dmc", "--dst", tmp_path / "d", "--tasks",
               "cartpole-balance", "--episodes-per-task", 2, "--workers", 0)  # fmt: skip
    assert progress_lines(made.stderr, "make-mt30")[-1].startswith("make-mt30: 2/2 episodes")


def test_the_eta_is_not_held_back_by_a_slow_start(capsys, monkeypatch):
    """As the full MT30 build: a first minute at a tenth of the steady rate (start-up), then
    steady. From the second line on, the ETA is that of the steady rate."""
    import datapipe.progress as progress

    clock = [0.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: clock[0])
    bar = Progress(10_000, "build", "row", interval=60.0)
    for minute in range(1, 5):
        clock[0] = 60.0 * minute
        bar.update(100 if minute == 1 else 1000)  # steady: 1000 rows a minute
    lines = progress_lines(capsys.readouterr().err, "build")
    assert lines[0] == "build: 100/10000 rows, 1.67 rows/s, ETA 1:39:00"  # all it knows
    assert lines[1] == "build: 1100/10000 rows, 16.7 rows/s, ETA 0:08:54"
    assert lines[3] == "build: 3100/10000 rows, 16.7 rows/s, ETA 0:06:54"
    clock[0] = 60.0 * 44  # a quiet spell of 40 minutes: the window forgets older lines
    bar.update(1000)
    assert progress_lines(capsys.readouterr().err, "build")[0].startswith(
        "build: 4100/10000 rows, 0.417 rows/s"  # 1000 rows in the 40 min since minute 4
    )


def test_a_total_refined_while_running(capsys):
    bar = Progress(100, "experiment", "step", enabled=True, interval=0.0)
    bar.set(50, total=200)
    bar.close()
    assert capsys.readouterr().err.splitlines()[-1].startswith("experiment: 50/200 steps")
