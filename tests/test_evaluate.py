"""trainer.evaluation.evaluate: MT30 evaluation end to end on dm_control, its outputs and refusals."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

pytest.importorskip("dm_control")

from conftest import TD_MPC_OPT, needs_td_mpc_opt

from datapipe.tasksets import MT30
from trainer.cli import main
from trainer.errors import IncompatibleDataError, TrainConfigError
from trainer.evaluation.envs import make_env
from trainer.evaluation.evaluate import (
    EvalConfig,
    check_task_set,
    evaluate,
    resolve_tasks,
    run_eval,
)
from trainer.evaluation.plan import MPPIConfig
from trainer.model.checkpoint import QuantizedCheckpointError, load_any, save_official
from trainer.model.presets import ModelConfig
from trainer.model.world import WorldModel

TWO = "cartpole-swingup,pendulum-spin"


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A random-init 1M model in the official new-API file format."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    save_official(WorldModel(ModelConfig.for_size(1)), path)
    return path


def test_unknown_task_lists_the_valid_ones():
    with pytest.raises(ValueError, match="walker-walk-backwards") as err:
        resolve_tasks("walker-stand,walker-fly")
    assert "walker-fly" in str(err.value)
    assert resolve_tasks("mt30")[29] == "pendulum-spin"


def test_mismatched_task_set_is_refused_with_the_mismatch():
    mt80_like = ModelConfig.for_size(1, obs_dim=39, n_tasks=80)
    with pytest.raises(IncompatibleDataError, match=r"80 tasks.*mt30 has 30.*obs dim 39"):
        check_task_set(mt80_like)
    dims = list(ModelConfig.for_size(1).action_dims)
    dims[4] = 6
    with pytest.raises(IncompatibleDataError, match="reacher-easy: 6 vs 2"):
        check_task_set(ModelConfig.for_size(1, action_dims=dims))


def test_mismatched_checkpoint_is_refused_by_run_eval(tmp_path):
    path = tmp_path / "mt80.pt"
    save_official(WorldModel(ModelConfig.for_size(1, obs_dim=39, n_tasks=80)), path)
    with pytest.raises(IncompatibleDataError, match="80 tasks"):
        run_eval(EvalConfig(checkpoint=path, tasks=TWO, out=tmp_path / "out"))


@pytest.mark.parametrize("task", MT30.names)
def test_episode_replica_starts_where_the_next_sequential_episode_starts(task):
    """A worker's episode k (a fresh env reset k times) is the official env's episode k:
    stepping does not draw from the task's RandomState."""
    seq = make_env(task, seed=1)
    seq.reset()
    for _ in range(20):
        seq.step(np.full(6, 0.3))
    replica = make_env(task, seed=1)
    replica.reset()
    np.testing.assert_array_equal(replica.reset(), seq.reset())


def test_eval_end_to_end_writes_csv_json_png(tiny_checkpoint, tmp_path):
    cfg = EvalConfig(
        checkpoint=tiny_checkpoint, tasks=TWO, episodes=1, mpc=True, workers=0, max_steps=2,
        out=tmp_path,
    )  # fmt: skip
    result = run_eval(cfg)
    assert [t.task for t in result.tasks] == TWO.split(",")
    assert all(len(t.returns) == 1 and 0 <= t.returns[0] <= 4 for t in result.tasks)
    assert result.protocol["action_selection"]["mode"] == "mppi"
    assert result.protocol["action_selection"]["eval_mode"] is True
    data = json.loads((tmp_path / "eval.json").read_text())
    assert data["normalized_score"] == pytest.approx(result.normalized_score)
    assert data["protocol"]["checkpoint"] == "tiny.pt" and data["protocol"]["max_steps"] == 2
    with open(tmp_path / "eval.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["task"] for r in rows] == [*TWO.split(","), "normalized_score"]
    assert (tmp_path / "eval.png").read_bytes()[:4] == b"\x89PNG"


def test_noisy_planner_protocol_is_recorded(tiny_checkpoint):
    small = MPPIConfig(num_samples=32, num_pi_trajs=4, num_elites=8, iterations=2)
    model = load_any(tiny_checkpoint)
    result = evaluate(
        model, TWO, 1, mpc=True, workers=0, max_steps=3, planner=small, eval_mode=False
    )
    selection = result.protocol["action_selection"]
    assert selection["eval_mode"] is False and selection["num_samples"] == 32
    assert "noise" in selection["action"]


def test_other_model_sizes_evaluate(tmp_path):
    path = tmp_path / "five.pt"
    save_official(WorldModel(ModelConfig.for_size(5)), path)
    cfg = EvalConfig(
        checkpoint=path, tasks="hopper-hop", episodes=1, mpc=False, workers=0, max_steps=3,
        out=tmp_path,
    )  # fmt: skip
    assert run_eval(cfg).protocol["model_size"] == 5


def returns_of(result) -> dict[str, list[float]]:
    return {t.task: t.returns for t in result.tasks}


def test_mppi_returns_the_same_for_any_workers(tiny_checkpoint):
    small = MPPIConfig(num_samples=32, num_pi_trajs=4, num_elites=8, iterations=2)
    model = load_any(tiny_checkpoint)
    runs = [
        evaluate(model, TWO, 2, mpc=True, workers=w, max_steps=4, planner=small, eval_mode=False)
        for w in (0, 2)
    ]
    assert returns_of(runs[0]) == returns_of(runs[1])
    assert runs[1].protocol["workers"] == 2
    assert "one episode per batch" in runs[0].protocol["batching"]


def test_impossible_settings_are_refused_before_running(tiny_checkpoint):
    model = load_any(tiny_checkpoint)
    with pytest.raises(TrainConfigError, match="episodes=0"):
        evaluate(model, TWO, episodes=0, mpc=False)
    with pytest.raises(TrainConfigError, match="max_steps=0"):
        evaluate(model, TWO, episodes=1, mpc=False, max_steps=0)
    with pytest.raises(TrainConfigError, match=r"workers=2 with lockstep.*--workers 0"):
        evaluate(model, TWO, episodes=1, mpc=False, workers=2, lockstep=True)


def eval_cli(checkpoint: Path, out: Path, *args: str):
    return CliRunner().invoke(
        main,
        ["eval", "--checkpoint", str(checkpoint), "--out", str(out), *map(str, args)],
        catch_exceptions=False,
    )


def test_eval_progress_on_stderr_and_none_with_no_progress(tiny_checkpoint, tmp_path):
    common = ("--tasks", TWO, "--episodes", 2, "--no-mpc", "--max-steps", 2, "--workers", 0)
    quiet = eval_cli(tiny_checkpoint, tmp_path / "quiet", *common, "--no-progress")
    shown = eval_cli(tiny_checkpoint, tmp_path / "shown", *common)
    assert quiet.exit_code == shown.exit_code == 0, shown.output
    assert quiet.stderr == ""
    lines = shown.stderr.splitlines()  # not a terminal: plain lines, the start and the end
    assert lines[0] == "eval: 0/4 episodes, tasks done 0/2"
    assert lines[1].startswith("eval: 2 task(s) x 2 episode(s) = 4 episodes of 2 steps, the ")
    assert lines[2].startswith("eval: first episode in 0:00:0") and "for all 4" in lines[2]
    assert lines[-1].startswith("eval: 4/4 episodes, ") and len(lines) <= 5
    assert lines[-1].endswith(" episodes/s, ETA 0:00:00, tasks done 2/2 (last: pendulum-spin 2/2)")
    assert "normalized score" in shown.stdout and "eval:" not in shown.stdout


@needs_td_mpc_opt
def test_real_checkpoint_returns_do_not_depend_on_workers(tmp_path):
    """Acceptance (issue 12): `trainer eval --workers 1/2/0`, 4 tasks x 2 episodes, give the
    same per-episode returns; lockstep batching, which differs, shows the setting is
    sensitive to how episodes are batched."""
    checkpoint = TD_MPC_OPT / "mt30_1M_steps_045dist_fp16.pt"
    tasks = "walker-walk,cheetah-run,fish-swim,finger-turn-hard"
    common = ("--tasks", tasks, "--episodes", 2, "--no-mpc", "--max-steps", 100, "--no-progress")
    returns = {}
    for workers in ("1", "2", "0", "lockstep"):
        flags = ("--workers", 0, "--lockstep") if workers == "lockstep" else ("--workers", workers)
        result = eval_cli(checkpoint, tmp_path / workers, *common, *flags)
        assert result.exit_code == 0, result.output
        data = json.loads((tmp_path / workers / "eval.json").read_text())
        returns[workers] = {t["task"]: t["returns"] for t in data["tasks"]}
    assert returns["1"] == returns["2"] == returns["0"]
    assert returns["lockstep"] != returns["0"]


@needs_td_mpc_opt
def test_real_fp16_fixture_evaluates(tmp_path):
    cfg = EvalConfig(
        checkpoint=TD_MPC_OPT / "mt30_1M_steps_045dist_fp16.pt", tasks="walker-stand",
        episodes=1, mpc=False, workers=0, max_steps=20, out=tmp_path,
    )  # fmt: skip
    result = run_eval(cfg)
    assert result.protocol["checkpoint_sha256"].startswith("3e35489756abf6e0")
    assert result.tasks[0].returns[0] > 5  # a trained walker stands: ~0.5-1 reward per step


@needs_td_mpc_opt
@pytest.mark.parametrize("name", ["int8", "mixed"])
def test_paper_quantized_fixtures_refused(name, tmp_path):
    cfg = EvalConfig(checkpoint=TD_MPC_OPT / f"mt30_1M_steps_045dist_{name}.pt", out=tmp_path)
    with pytest.raises(QuantizedCheckpointError, match=r"scale: 1\.0.*unusable"):
        run_eval(cfg)
    assert not (tmp_path / "eval.json").exists()


def _file_size_limit(limit: int):
    import resource
    import signal

    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a too-large write fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


@pytest.mark.parametrize("command", ["eval", "export", "quantize"])
def test_a_full_disk_is_a_message_and_leaves_no_partial_file(tiny_checkpoint, tmp_path, command):
    """Every output is written whole or not at all; the user reads what failed and the fix."""
    import subprocess
    import sys

    out = tmp_path / "out"
    args = {
        "eval": ["eval", "--checkpoint", str(tiny_checkpoint), "--tasks", "cartpole-swingup",
                 "--episodes", "1", "--no-mpc", "--max-steps", "2", "--workers", "0",
                 "--no-progress", "--out", str(out)],
        "export": ["export", str(tiny_checkpoint), "--out", str(out / "model.pt")],
        "quantize": ["quantize", "--checkpoint", str(tiny_checkpoint), "--dtype", "int8",
                     "--out", str(out / "model-int8.pt")],
    }[command]  # fmt: skip
    out.mkdir()
    run = subprocess.run(
        [sys.executable, "-m", "trainer.cli", *args],
        capture_output=True,
        text=True,
        preexec_fn=_file_size_limit(20_000),  # the eval's CSV fits, its figure does not
    )
    assert run.returncode == 1, run.stderr
    assert "Traceback" not in run.stderr and "Free disk space" in run.stderr, run.stderr
    if command != "eval":
        assert f"{args[-1]}: writing failed" in run.stderr, run.stderr  # names the file
    left = sorted(p.name for p in out.iterdir())
    assert left == (["eval.csv"] if command == "eval" else []), left  # no temp, no 0-byte file


@pytest.mark.parametrize("command", ["eval", "export", "quantize"])
def test_a_second_writer_of_the_same_output_is_refused(tiny_checkpoint, tmp_path, command):
    """One writer per output, as for runs and stores: the second names the first's pid and
    writes nothing; once the first is gone the output can be written."""
    from conftest import lock_held_elsewhere

    from trainer.errors import BusyError
    from trainer.evaluation.quantized import QuantizeConfig, run_quantize
    from trainer.model.checkpoint import export

    out = tmp_path / ("eval" if command == "eval" else "model.pt")
    lock = {
        "eval": f"only_writer({str(out)!r}, 'a test', RuntimeError)",
        "export": f"only_writer_of_file({str(out)!r}, 'a test', RuntimeError)",
        "quantize": f"only_writer_of_file({str(out)!r}, 'a test', RuntimeError)",
    }[command]
    write = {
        "eval": lambda: run_eval(EvalConfig(checkpoint=tiny_checkpoint, tasks="cartpole-swingup",
                                            episodes=1, mpc=False, workers=0, max_steps=2,
                                            out=out, progress=False)),
        "export": lambda: export(tiny_checkpoint, out),
        "quantize": lambda: run_quantize(QuantizeConfig(checkpoint=tiny_checkpoint, out=out,
                                                        dtype="fp16")),
    }[command]  # fmt: skip
    with lock_held_elsewhere(lock) as pid:
        with pytest.raises(BusyError, match=rf"another `trainer {command}` \(pid {pid}\)"):
            write()
        assert not (out / "eval.json" if command == "eval" else out).exists()
    write()
    assert (out / "eval.json" if command == "eval" else out).is_file()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


@pytest.mark.parametrize("workers", [0, 2])
def test_ctrl_c_writes_the_finished_episodes_as_a_partial_result(
    tiny_checkpoint, tmp_path, workers
):
    """`trainer eval` says its cost first and projects the time after the first episode;
    Ctrl-C then stops it within seconds, writes what finished (marked partial), exits 130."""
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "eval"
    args = ["eval", "--checkpoint", str(tiny_checkpoint), "--tasks", TWO, "--episodes", "100",
            "--no-mpc", "--workers", str(workers), "--out", str(out)]  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "trainer.cli", *args],
        stderr=subprocess.PIPE,
        text=True,
        # as from a terminal: in the full suite an earlier test leaves SIGINT ignored in the
        # pytest process, and a child inherits an ignored signal (as under nohup)
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    lines = []
    for line in iter(proc.stderr.readline, ""):  # line by line, as they come (no read-ahead)
        lines.append(line)
        if "eval: first episode in" in line:
            break
    assert any("2 task(s) x 100 episode(s) = 200 episodes of 500 steps" in x for x in lines), lines
    assert "projected about" in lines[-1] and "for all 200" in lines[-1], lines
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    t0 = time.monotonic()
    err = proc.stderr.read()
    assert proc.wait(timeout=30) == 130, err
    assert time.monotonic() - t0 < 10, "Ctrl-C took too long"
    assert "partial result" in err and "Traceback" not in err, err
    result = json.loads((out / "eval.json").read_text())
    assert result["protocol"]["partial"] is True
    finished = sum(len(t["returns"]) for t in result["tasks"])
    assert 1 <= finished < 200 and (out / "eval.png").is_file()
