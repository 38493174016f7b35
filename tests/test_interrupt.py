"""Stopping and continuing runs as a user does: Ctrl-C, `--resume` with only `--out`,
`--overwrite`, and a second Ctrl-C that aborts without leaving a half-written file."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from trainer.cli import main
from trainer.errors import ResumeError
from trainer.stop import StopRequest
from trainer.training.agent import TDMPC2Agent
from trainer.training.config import TrainConfig
from trainer.training.runfolder import resume_config
from trainer.training.runlog import read_metrics
from trainer.training.runstate import read_training_checkpoint
from trainer.training.train import train

REPO = Path(__file__).resolve().parents[1]
SMALL = ("--batch-size", "8", "--cache-gb", "0.1", "--device", "cpu", "--threads", "1")


@pytest.fixture(autouse=True)
def sigint_as_at_a_terminal():
    """Ctrl-C handled as at a terminal. A suite started in the background of a
    non-interactive shell (`cmd &`, as a CI job may be) inherits SIGINT ignored, and an
    ignored signal stays ignored in every child it starts: then neither this process nor the
    trainers it spawns would see the Ctrl-C these tests send."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def trainer_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "trainer", *(str(a) for a in args)]


def run_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        trainer_cmd(*args), cwd=REPO, capture_output=True, text=True, preexec_fn=_default_sigint
    )


def same_model(a: Path, b: Path) -> None:
    sa, sb = read_training_checkpoint(a), read_training_checkpoint(b)
    assert sa["step"] == sb["step"]
    for part in ("model", "optim", "pi_optim"):
        flat_a, flat_b = _tensors(sa["agent"][part]), _tensors(sb["agent"][part])
        assert flat_a.keys() == flat_b.keys()
        for key in flat_a:
            assert torch.equal(flat_a[key], flat_b[key]), (part, key)
    assert sa["loader"] == sb["loader"]
    assert torch.equal(sa["rng"]["torch"], sb["rng"]["torch"])


def _tensors(tree, prefix="") -> dict[str, torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        return {prefix: tree}
    if isinstance(tree, dict):
        return {
            k: v for key, sub in tree.items() for k, v in _tensors(sub, f"{prefix}/{key}").items()
        }
    if isinstance(tree, list | tuple):
        return {
            k: v for i, sub in enumerate(tree) for k, v in _tensors(sub, f"{prefix}/{i}").items()
        }
    return {prefix: torch.tensor(float(tree))} if isinstance(tree, int | float) else {}


@pytest.mark.slow
def test_ctrl_c_then_resume_with_only_out_is_bit_identical(store, teacher, tmp_path):
    args = ("--shards", store, "--teacher", teacher, "--steps", 200, "--log-every", 1, *SMALL)
    whole = run_cli("distill", *args, "--out", tmp_path / "whole", "--no-progress")
    assert whole.returncode == 0, whole.stderr

    split = tmp_path / "split"
    stop_after = random.Random().randint(20, 180)
    proc = subprocess.Popen(
        trainer_cmd("distill", *args, "--out", split, "--no-progress"),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_default_sigint,
    )
    while proc.poll() is None and _last_step(split) < stop_after:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGINT, err
    assert "Traceback" not in err
    assert f"Resume with: trainer distill --out {split} --resume" in err
    stopped = read_training_checkpoint(split / "checkpoint.pt")["step"]
    assert stop_after <= stopped < 200  # save_every is 1000: this checkpoint is the stop's
    assert not list(split.glob(".*tmp*"))

    resumed = run_cli("distill", "--out", split, "--resume", "--no-progress")
    assert resumed.returncode == 0, resumed.stderr
    same_model(tmp_path / "whole" / "checkpoint.pt", split / "checkpoint.pt")
    assert _losses(split) == _losses(tmp_path / "whole")


def _losses(run: Path) -> list[dict]:
    timing = ("steps_per_s", "data_wait")
    return [{k: v for k, v in row.items() if k not in timing} for row in read_metrics(run)]


def _last_step(run: Path) -> int:
    rows = read_metrics(run) if (run / "metrics.jsonl").exists() else []
    return rows[-1]["step"] if rows else 0


def test_second_signal_aborts_without_a_half_written_checkpoint(store, tmp_path, monkeypatch):
    """The first Ctrl-C asks for a checkpoint; a second one during its write aborts at once,
    and the write's temporary file is gone."""
    update, save, calls = TDMPC2Agent.update, torch.save, []

    def update_then_signal(self, *args, **kw):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return update(self, *args, **kw)

    def save_interrupted(*args, **kw):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(1)  # the handler runs here
        return save(*args, **kw)

    monkeypatch.setattr(TDMPC2Agent, "update", update_then_signal)
    monkeypatch.setattr(torch, "save", save_interrupted)
    cfg = TrainConfig(
        shards=store, out=tmp_path / "run", steps=50, batch_size=8, device="cpu", progress=False
    )
    with pytest.raises(KeyboardInterrupt, match="second signal"):
        train(cfg)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [
        "config.json",
        "metrics.csv",
        "metrics.jsonl",
    ]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_stop_request_keeps_an_ignored_signal_ignored():
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        with StopRequest():
            assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_resume_takes_the_settings_of_config_json(store, teacher, tmp_path):
    run = tmp_path / "run"
    invoke = lambda *a: CliRunner().invoke(main, [str(x) for x in a])  # noqa: E731
    first = invoke("distill", "--shards", store, "--teacher", teacher, "--out", run, "--steps",
                   2, "--d-coef", 0.2, "--no-progress", *SMALL)  # fmt: skip
    assert first.exit_code == 0, first.output

    more = invoke("distill", "--out", run, "--resume", "--steps", 3, "--no-progress")
    assert more.exit_code == 0, more.output
    saved = read_training_checkpoint(run / "checkpoint.pt")
    assert saved["step"] == 3 and saved["config"]["batch_size"] == 8
    assert saved["config"]["d_coef"] == 0.2 and saved["config"]["cache_gb"] == 0.1

    refused = invoke("distill", "--out", run, "--resume", "--steps", 4, "--batch-size", 16)
    assert refused.exit_code == 1 and "Traceback" not in refused.output
    assert "--batch-size 8 (the run's) vs 16 (given)" in refused.output
    wrong_command = invoke("train", "--out", run, "--resume")
    assert wrong_command.exit_code == 1
    assert "holds a distillation run: resume it with `trainer distill --resume`" in (
        wrong_command.output
    )
    missing = invoke("train", "--out", tmp_path / "none", "--resume")
    assert missing.exit_code == 1 and "holds no config.json" in missing.output
    assert read_training_checkpoint(run / "checkpoint.pt")["step"] == 3


def test_a_run_folder_is_overwritten_only_when_asked(store, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"config": {}}))  # a start cut short
    (run / "metrics.csv").write_text("step\n")
    cfg = dict(shards=store, out=run, steps=2, batch_size=8, device="cpu", progress=False)
    with pytest.raises(ResumeError, match=r"already holds a run \(config.json, metrics.csv\)"):
        train(TrainConfig(**cfg))
    assert (run / "metrics.csv").read_text() == "step\n"
    train(TrainConfig(**cfg, overwrite=True))
    assert [r["step"] for r in read_metrics(run)] == [2]
    with pytest.raises(ValueError, match="resume and overwrite exclude each other"):
        TrainConfig(**cfg, overwrite=True, resume=True)
    with pytest.raises(ResumeError, match=r"holds no config\.json"):
        resume_config(tmp_path / "elsewhere", {}, "train")


def test_missing_shards_is_a_usage_error_without_resume(tmp_path):
    result = CliRunner().invoke(main, ["train", "--out", str(tmp_path / "r")])
    assert result.exit_code == 2 and "Missing option --shards" in result.output


def test_out_inside_the_store_is_refused(store, tmp_path):
    copy = tmp_path / "store"
    shutil.copytree(store, copy)
    before = sorted(p.relative_to(copy) for p in copy.rglob("*"))
    result = CliRunner().invoke(
        main, ["train", "--shards", str(copy), "--out", str(copy / "run"), "--device", "cpu"]
    )
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"--out {copy / 'run'} and the store {copy} overlap" in result.output
    assert sorted(p.relative_to(copy) for p in copy.rglob("*")) == before
