"""trainer.evaluate: MT30 evaluation end to end on dm_control, its outputs and refusals."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("dm_control")

from trainer.checkpoint import CheckpointError, QuantizedCheckpointError, save_official
from trainer.envs import make_env
from trainer.evaluate import EvalConfig, check_task_set, evaluate, resolve_tasks, run_eval
from trainer.model import WorldModel
from trainer.plan import MPPIConfig
from trainer.presets import ModelConfig
from trainer.quantize import load_any

FIXTURES = Path(__file__).parents[2] / "shared" / "fixtures" / "td-mpc-opt"
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
    with pytest.raises(CheckpointError, match=r"80 tasks.*mt30 has 30.*obs dim 39"):
        check_task_set(mt80_like)
    dims = list(ModelConfig.for_size(1).action_dims)
    dims[4] = 6
    with pytest.raises(CheckpointError, match="reacher-easy: 6 vs 2"):
        check_task_set(ModelConfig.for_size(1, action_dims=dims))


def test_mismatched_checkpoint_is_refused_by_run_eval(tmp_path):
    path = tmp_path / "mt80.pt"
    save_official(WorldModel(ModelConfig.for_size(1, obs_dim=39, n_tasks=80)), path)
    with pytest.raises(CheckpointError, match="80 tasks"):
        run_eval(EvalConfig(checkpoint=path, tasks=TWO, out=tmp_path / "out"))


def test_episode_replicas_start_where_sequential_episodes_start():
    seq = make_env("cup-spin", seed=1)
    starts = []
    for _ in range(3):
        starts.append(seq.reset())
        for _ in range(20):
            seq.step(np.full(6, 0.3))
    for k in range(3):
        replica = make_env("cup-spin", seed=1)
        for _ in range(k):
            replica.reset()
        np.testing.assert_array_equal(replica.reset(), starts[k])


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


def test_policy_only_same_in_process_and_in_workers(tiny_checkpoint):
    model = load_any(tiny_checkpoint)
    a = evaluate(model, TWO, episodes=2, mpc=False, workers=0, max_steps=15)
    b = evaluate(model, TWO, episodes=2, mpc=False, workers=2, max_steps=15)
    assert a.protocol["action_selection"]["mode"] == "policy"
    for ta, tb in zip(a.tasks, b.tasks, strict=True):
        np.testing.assert_allclose(ta.returns, tb.returns, rtol=1e-4)
    assert a.normalized_score == pytest.approx(b.normalized_score, rel=1e-4)


@pytest.mark.skipif(not FIXTURES.is_dir(), reason="TD-MPC-Opt fixtures not present")
def test_real_fp16_fixture_evaluates(tmp_path):
    cfg = EvalConfig(
        checkpoint=FIXTURES / "mt30_1M_steps_045dist_fp16.pt", tasks="walker-stand",
        episodes=1, mpc=False, workers=0, max_steps=20, out=tmp_path,
    )  # fmt: skip
    result = run_eval(cfg)
    assert result.protocol["checkpoint_sha256"].startswith("3e35489756abf6e0")
    assert result.tasks[0].returns[0] > 5  # a trained walker stands: ~0.5-1 reward per step


@pytest.mark.skipif(not FIXTURES.is_dir(), reason="TD-MPC-Opt fixtures not present")
@pytest.mark.parametrize("name", ["int8", "mixed"])
def test_paper_quantized_fixtures_refused(name, tmp_path):
    cfg = EvalConfig(checkpoint=FIXTURES / f"mt30_1M_steps_045dist_{name}.pt", out=tmp_path)
    with pytest.raises(QuantizedCheckpointError, match=r"scale: 1\.0.*unusable"):
        run_eval(cfg)
    assert not (tmp_path / "eval.json").exists()
