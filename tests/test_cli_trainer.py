"""End-to-end smoke test of the `trainer` command: train, distill, resume, export."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch
from click.testing import CliRunner
from conftest import build_store, make_source

from tools.make_teacher import make_teacher
from trainer.cli import main
from trainer.model.checkpoint import load_checkpoint, read_checkpoint
from trainer.training.runlog import read_metrics
from trainer.training.runstate import read_training_checkpoint


def invoke(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_trainer_cli_end_to_end(tmp_path):
    store = build_store(
        make_source(tmp_path / "src", episodes_per_task=2, chunks=1),
        tmp_path / "shards",
        formats=("zarr",),
    )
    small = ("--batch-size", 8, "--device", "cpu", "--log-every", 1, "--no-progress")

    result = invoke("train", "--shards", store, "--out", tmp_path / "base", "--steps", 2, *small)
    assert result.exit_code == 0, result.output
    assert "steps/s" in result.output and "waiting for data" in result.output
    result = invoke(
        "train", "--shards", store, "--out", tmp_path / "base", "--steps", 3, "--resume", *small
    )
    assert result.exit_code == 0, result.output
    assert [r["step"] for r in read_metrics(tmp_path / "base")] == [1, 2, 3]

    teacher = make_teacher(5, tmp_path / "t5.pt", seed=1, nonzero_reward=True)  # random init
    result = invoke(
        "distill",
        "--shards",
        store,
        "--teacher",
        teacher,
        "--d-coef",
        0.4,
        "--init",
        tmp_path / "nope.pt",
        "--out",
        tmp_path / "d",
        *small,
    )
    assert result.exit_code == 2 and "does not exist" in result.output  # click checks --init

    result = invoke(
        "distill",
        "--shards",
        store,
        "--teacher",
        teacher,
        "--steps",
        2,
        "--out",
        tmp_path / "distill",
        *small,
    )
    assert result.exit_code == 0, result.output
    saved = read_training_checkpoint(tmp_path / "distill" / "checkpoint.pt")
    assert saved["config"]["d_coef"] == 0.4 and saved["teacher"]["size"] == 5
    assert "distill_loss" in read_metrics(tmp_path / "distill")[-1]

    result = invoke(
        "distill",
        "--shards",
        store,
        "--teacher",
        teacher,
        "--teacher-size",
        1,
        "--out",
        tmp_path / "wrong",
        *small,
    )
    assert result.exit_code == 1 and "does not fit a 1M model" in result.output
    assert "It fits: 5M" in result.output and "Traceback" not in result.output

    exported = tmp_path / "student.pt"
    result = invoke("export", tmp_path / "distill" / "checkpoint.pt", "--out", exported)
    assert result.exit_code == 0, result.output
    model = load_checkpoint(exported)
    assert model.cfg.model_size == 1
    for key, value in model.state_dict().items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, saved["agent"]["model"][key]), key

    # An official file re-saved, and used as --init of a new run.
    result = invoke("export", teacher, "--out", tmp_path / "t5-copy.pt")
    assert result.exit_code == 0, result.output
    a, b = read_checkpoint(teacher), read_checkpoint(tmp_path / "t5-copy.pt")
    assert all(torch.equal(a[k], b[k]) for k in a if isinstance(a[k], torch.Tensor))
    result = invoke(
        "train",
        "--shards",
        store,
        "--init",
        exported,
        "--steps",
        1,
        "--out",
        tmp_path / "from-init",
        *small,
    )
    assert result.exit_code == 0, result.output

    result = invoke("train", "--shards", tmp_path / "missing", "--out", tmp_path / "m", *small)
    assert result.exit_code == 1 and "datapipe build" in result.output


def test_python_m_trainer_is_the_command_torchrun_starts():
    result = subprocess.run(
        [sys.executable, "-m", "trainer", "distill", "--help"],
        cwd=Path(__file__).parents[1],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert "Usage: trainer distill" in result.stdout and "--ddp-check" in result.stdout
    assert "on each rank" in result.stdout and "fsspec URL" in result.stdout


def test_tools_make_teacher_writes_an_official_file(tmp_path):
    from tools.cli import main as tools_cli

    out = tmp_path / "teacher.pt"
    result = CliRunner().invoke(tools_cli, ["make-teacher", "--size", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert load_checkpoint(out).cfg.model_size == 1


def test_eval_and_quantize_commands(tmp_path):
    import pytest

    pytest.importorskip("dm_control")
    model = make_teacher(1, tmp_path / "m.pt")
    runner = CliRunner()
    result = runner.invoke(
        main,
        [
            "eval",
            "--checkpoint",
            str(model),
            "--tasks",
            "pendulum-spin,cartpole-balance",
            "--episodes",
            "1",
            "--no-mpc",
            "--max-steps",
            "5",
            "--workers",
            "0",
            "--out",
            str(tmp_path / "eval"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "normalized score" in result.output and (tmp_path / "eval" / "eval.json").exists()
    result = runner.invoke(
        main,
        [
            "quantize",
            "--checkpoint",
            str(model),
            "--dtype",
            "int8",
            "--out",
            str(tmp_path / "q.pt"),
        ],
    )
    assert result.exit_code == 0, result.output
    result = runner.invoke(
        main,
        [
            "eval",
            "--checkpoint",
            str(tmp_path / "q.pt"),
            "--tasks",
            "pendulum-spin",
            "--episodes",
            "1",
            "--no-mpc",
            "--max-steps",
            "3",
            "--workers",
            "0",
            "--out",
            str(tmp_path / "eval-q"),
        ],
    )
    assert result.exit_code == 0, result.output
    result = runner.invoke(main, ["eval", "--checkpoint", str(model), "--tasks", "walker-fly"])
    assert result.exit_code != 0 and "walker-walk" in result.output  # lists the valid names


def test_every_setting_is_a_flag_with_its_help():
    """One field per flag: each command's config fields all reach its CLI, with the
    field's help text (the options are generated from the dataclass)."""
    import dataclasses

    from trainer.evaluation.evaluate import EvalConfig
    from trainer.evaluation.quantized import QuantizeConfig
    from trainer.training.config import TrainConfig

    distill_only = {"teacher", "teacher_size", "d_coef", "d_schedule", "distill", "teacher_dtype"}
    for command, config, skip in (
        ("eval", EvalConfig, set()),
        ("quantize", QuantizeConfig, set()),
        ("distill", TrainConfig, set()),
        ("train", TrainConfig, distill_only),
    ):
        params = {p.name: p for p in main.commands[command].params}
        for f in dataclasses.fields(config):
            if f.name in skip:
                assert f.name not in params, (command, f.name)
                continue
            assert f.name in params, f"trainer {command} has no flag for {config.__name__}.{f.name}"
            assert params[f.name].help == f.metadata["help"] != "", (command, f.name)
