"""tools bench-gpu: the dry run end to end on CPU, the parts' CPU paths, budget and failures."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time

import pytest
import torch
from click.testing import CliRunner

from tools.bench.gpu import SHARES, BenchGPUConfig, _run, bench_gpu, gpu_test_modules
from tools.bench.gpu_parts import (
    DEVICE_SIZES,
    DRY_SIZES,
    Accel,
    PartArgs,
    _TeacherCache,
    grid,
    measure_cell,
    planner,
    project_eval,
)
from tools.bench.official import official_source, official_updates
from tools.make_teacher import make_teacher
from trainer.errors import TrainConfigError
from trainer.model.checkpoint import read_checkpoint


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """`tools bench-gpu --dry-run` once for the module: (exit code, output, gpu.json, gpu.md)."""
    from tools.cli import main

    out = tmp_path_factory.mktemp("bench-gpu")
    result = CliRunner().invoke(main, ["bench-gpu", "--dry-run", "--out", str(out)])
    report = json.loads((out / "gpu.json").read_text())
    return result.exit_code, result.output, report, (out / "gpu.md").read_text()


@pytest.mark.slow
def test_dry_run_runs_every_part(dry_run):
    code, output, report, _ = dry_run
    assert code == 0, output
    parts = report["parts"]
    assert list(parts) == list(SHARES)
    assert {n: p["status"] for n, p in parts.items() if n != "official"} == dict.fromkeys(
        set(SHARES) - {"official"}, "ok"
    )
    assert parts["official"]["status"] == "skipped" and "--official" in parts["official"]["reason"]
    assert "skipped" in parts["pytest-gpu"]["result"]["summary"]  # no GPU here: skipped, not run


@pytest.mark.slow
def test_dry_run_measures_the_whole_grid(dry_run):
    _, _, report, markdown = dry_run
    train = report["parts"]["train"]["result"]
    assert [c["label"] for c in train["cells"]] == train["planned"] and not train["left_out"]
    for cell in train["cells"]:
        assert cell["status"] == "ok", cell
        assert cell["steps_per_s"] > 0 and 0 <= cell["data_wait"] < 1
        assert math.isfinite(cell["last_loss"]) and cell["max_allocated_bytes"] is None
    loader = report["parts"]["loader"]["result"]
    assert loader["prefetch on"]["step_ms"] > 0 and loader["loader alone"]["batches_per_s"] > 0
    plans = report["parts"]["plan"]["result"]["rows"]
    assert {(r["dtype"], r["envs"]) for r in plans} == {
        (d, n) for d in DRY_SIZES.plan_dtypes for n in DRY_SIZES.plan_envs
    }
    torchrun = report["parts"]["torchrun"]["result"]
    assert torchrun["distill"]["steps"] == DRY_SIZES.distill_steps
    assert torchrun["collective"] == {**torchrun["collective"], "backend": "gloo", "returncode": 0}
    assert "tools bench-gpu --out" in markdown and "--dry-run" in markdown
    for heading in ("| part | status", "| B | teacher | mode", "| path | step ms", "| dtype |"):
        assert heading in markdown


def test_grid_runs_the_papers_setting_first():
    cells = grid(DEVICE_SIZES)
    assert [c["label"] for c in cells[:6]] == [
        "B=256 teacher=317 fp32",
        "B=256 teacher=317 compile",
        "B=256 teacher=317 compile-amp",
        "B=256 teacher=none fp32",
        "B=256 teacher=none compile",
        "B=256 teacher=none compile-amp",
    ]
    assert len(cells) == len({c["label"] for c in cells}) == 2 * (4 * 5 - 1)  # no bf16 w/o teacher
    assert [c["batch"] for c in cells] == sorted(c["batch"] for c in cells)


def test_budget_left_out_parts_are_recorded(tmp_path):
    report = bench_gpu(BenchGPUConfig(out=tmp_path, budget_s=1.0, dry_run=True))
    assert {p["status"] for p in report["parts"].values()} == {"skipped"}
    assert "budget" in report["parts"]["machine"]["reason"]
    assert (
        "no store" in report["parts"]["train"]["reason"]
        or "budget" in (report["parts"]["train"]["reason"])
    )
    assert json.loads((tmp_path / "gpu.json").read_text()) == json.loads(json.dumps(report))
    assert "| machine | skipped |" in (tmp_path / "gpu.md").read_text()


def test_a_part_past_its_cap_is_killed_and_a_failure_keeps_its_message(tmp_path):
    t0 = time.perf_counter()
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    assert _run(sleeper, 1.0, tmp_path / "a.log")["status"] == "timeout"
    assert time.perf_counter() - t0 < 30
    failing = [sys.executable, "-c", "raise SystemExit('part broke: see here')"]
    record = _run(failing, 30.0, tmp_path / "b.log")
    assert record["status"] == "failed" and record["error"] == "part broke: see here"


def test_gpu_test_modules_are_the_marked_ones():
    names = {p.name for p in gpu_test_modules()}
    assert {"test_train.py", "test_loader.py"} <= names and "test_envs.py" not in names


def test_accel_cpu_path():
    accel = Accel(torch.device("cpu"))
    accel.free()
    accel.sync()
    assert accel.peaks() == {"max_allocated_bytes": None, "max_reserved_bytes": None}
    assert accel.describe()["device"] == "cpu" and not accel.cuda


def test_part_args_round_trip(tmp_path):
    args = PartArgs(sizes=DEVICE_SIZES, store="s", work="w", device="cuda", deadline=1.0)
    assert PartArgs.from_json(args.to_json()) == args


def test_eval_projection_and_planner():
    p = project_eval(0.01, 300, 1000.0)
    assert p["eval_planning_s"] == pytest.approx(500 * 0.01)  # one round of 500 steps
    assert p["eval_physics_s"] == pytest.approx(300 * 500 / (1000.0 * os.cpu_count()))
    assert project_eval(0.01, 30, 1000.0)["eval_planning_s"] == pytest.approx(10 * 500 * 0.01)
    assert planner(DEVICE_SIZES) == planner(dataclasses.replace(DRY_SIZES, plan_samples=512,
                                                                plan_iterations=6))  # fmt: skip
    assert (planner(DRY_SIZES).num_samples, planner(DRY_SIZES).num_elites) == (32, 8)


def test_official_peer_needs_a_checkout_and_a_gpu(tmp_path):
    with pytest.raises(TrainConfigError, match=f"--official {tmp_path}: no tdmpc2/tdmpc2.py"):
        official_source(tmp_path)
    args = PartArgs(sizes=DRY_SIZES, store="s", work="w", device="cpu", deadline=0.0)
    result = official_updates(args, None, Accel(torch.device("cpu")))
    assert result["status"] == "skipped" and "bench-update" in result["reason"]


def test_make_teacher_nonzero_reward_head(tmp_path):
    key = "_reward.2.weight"
    assert not read_checkpoint(make_teacher(1, tmp_path / "a.pt"))[key].any()
    assert read_checkpoint(make_teacher(1, tmp_path / "b.pt", nonzero_reward=True))[key].any()
    with pytest.raises(ValueError, match="nonzero_reward applies to a random init"):
        make_teacher(1, tmp_path / "c.pt", train_steps=2, shards=tmp_path, nonzero_reward=True)


def _cell_args(store, tmp_path, modes) -> PartArgs:
    sizes = dataclasses.replace(DRY_SIZES, modes=modes, warmup_steps=2, windows=1)
    return PartArgs(sizes=sizes, store=str(store), work=str(tmp_path), device="cpu",
                    deadline=time.time() + 600)  # fmt: skip


@pytest.mark.slow
def test_amp_cell_on_cpu(store, tmp_path):
    """An --amp cell (bf16 autocast of the forward losses, with a teacher) measures on CPU: its
    failures show up here, without a GPU. (A compiled cell compiles `compile_update`, whose
    contract tests/test_compile.py checks; it is not compiled a second time here.)"""
    mode = "amp"
    args = _cell_args(store, tmp_path, (mode,))
    cell = {"label": mode, "batch": 8, "teacher": 5, "mode": mode}
    row = measure_cell(args, cell, _TeacherCache(args))
    assert row["steps_per_s"] > 0 and math.isfinite(row["last_loss"])
