"""trainer.model.quantize and trainer.evaluation.quantized: real post-training quantization,
its file format, `load_any`, fidelity and `trainer quantize`."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from conftest import TD_MPC_OPT, needs_td_mpc_opt

from datapipe.source import file_sha256
from trainer.evaluation.quantized import QuantizeConfig, fidelity, run_quantize
from trainer.model.checkpoint import QUANTIZED_FORMAT as FORMAT
from trainer.model.checkpoint import (
    CheckpointError,
    QuantizedCheckpointError,
    dequantize_per_channel,
    load_any,
    load_checkpoint,
    read_checkpoint,
    read_meta,
    save_official,
)
from trainer.model.presets import ModelConfig
from trainer.model.quantize import linear_weight_keys, quantize_per_channel, save_quantized
from trainer.model.world import WorldModel
from trainer.training.runstate import write_training_checkpoint


def trained_like(seed: int = 0, **dims) -> WorldModel:
    """A random 1M model with weights of trained magnitude (reward and Q heads non-zero)."""
    torch.manual_seed(seed)
    model = WorldModel(ModelConfig.for_size(1, **dims))
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                p.normal_(0, 0.08)
    return model.eval()


def batch(n: int = 64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    task = torch.randint(0, 30, (n,), generator=g)
    action = torch.rand(n, 6, generator=g) * 2 - 1
    return torch.randn(n, 24, generator=g), action, task


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("q") / "model.pt"
    save_official(trained_like(), path)
    return path


def test_per_channel_scales_come_from_the_weights():
    w = torch.randn(5, 7) * torch.tensor([0.01, 0.1, 1.0, 3.0, 0.0])[:, None]
    q, scale = quantize_per_channel(w)
    assert q.dtype == torch.int8 and scale.shape == (5,)
    torch.testing.assert_close(scale[:4], w[:4].abs().amax(1) / 127)
    assert len(set(scale.tolist())) == 5  # one scale per output channel, none fixed
    assert (q[:4].abs().amax(1) == 127).all() and not q[4].any()
    assert ((dequantize_per_channel(q, scale) - w).abs() <= scale[:, None] / 2 + 1e-7).all()
    stacked = torch.randn(2, 3, 4) * torch.tensor([1.0, 10.0])[:, None, None]
    _, s = quantize_per_channel(stacked)
    assert s.shape == (2, 3) and (s[1] > s[0]).all()  # ensemble members get their own scales


def test_every_linear_weight_is_quantized():
    keys = linear_weight_keys(trained_like())
    # encoder 2, dynamics 3, reward 3, pi 3, Q online 3 + target 3
    assert len(keys) == 17 and "_Qs.params.0.weight" in keys and "_pi.2.weight" in keys
    assert not any(k.endswith("ln.weight") or k.startswith("_task_emb") for k in keys)


@pytest.mark.parametrize(
    ("dtype", "runtime", "tol"),
    [("fp16", torch.float16, 2e-2), ("bf16", torch.bfloat16, 1e-1), ("int8", torch.float32, 5e-2)],
)
def test_round_trip(model_file, tmp_path, dtype, runtime, tol):
    reference = load_any(model_file)
    out = save_quantized(reference, dtype, tmp_path / f"{dtype}.pt", model_file)
    meta = read_meta(out)
    assert meta["format"] == FORMAT and meta["dtype"] == dtype
    assert meta["source"]["sha256"] == file_sha256(model_file)
    loaded = load_any(out)
    assert loaded._encoder["state"][0].weight.dtype == runtime  # inference runs in it on CPU
    again = load_any(save_quantized(loaded, dtype, tmp_path / "again.pt"))
    for (k, a), b in zip(loaded.state_dict().items(), again.state_dict().values(), strict=True):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b), k  # quantizing a quantized model changes nothing
    report = fidelity(reference, loaded, [batch()])
    assert set(report) == {"latent", "reward", "Q", "action"}
    for name, r in report.items():
        assert r["rel_err"] < tol, (name, r)
        assert r["rel_err"] > 0, name  # it is really quantized


def test_int8_file_size_and_official_loaders(model_file, tmp_path):
    reference = load_any(model_file)
    int8 = save_quantized(reference, "int8", tmp_path / "int8.pt")
    fp16 = save_quantized(reference, "fp16", tmp_path / "fp16.pt")
    size = model_file.stat().st_size
    assert int8.stat().st_size < 0.3 * size and fp16.stat().st_size < 0.55 * size
    # the fp16 file stays an official {"model": state_dict}; the int8 one is refused clearly
    torch.testing.assert_close(
        load_checkpoint(fp16)._pi[0].weight, reference._pi[0].weight.half().float()
    )
    with pytest.raises(CheckpointError, match="not a"):
        read_checkpoint(int8)


def test_load_any_reads_dims_from_new_api_files(tmp_path):
    dims = (3, 1, 2, 2, 6)
    model = trained_like(action_dims=dims, obs_dim=24)
    save_official(model, tmp_path / "five.pt")
    loaded = load_any(tmp_path / "five.pt")
    assert loaded.cfg.action_dims == dims and loaded.cfg.n_tasks == 5
    q = load_any(save_quantized(loaded, "int8", tmp_path / "five-int8.pt"))
    assert q.cfg.action_dims == dims


def test_load_any_reads_training_checkpoints(tmp_path):
    model = trained_like()
    path = write_training_checkpoint(
        tmp_path / "checkpoint.pt",
        step=3,
        model_config=dataclasses.asdict(model.cfg),
        agent={"model": model.state_dict()},
    )
    loaded = load_any(path)
    assert torch.equal(loaded._pi[0].weight, model._pi[0].weight)
    int8 = load_any(save_quantized(loaded, "int8", tmp_path / "int8.pt", path))
    assert int8.cfg == model.cfg


def test_identical_models_have_zero_error(model_file):
    m = load_any(model_file)
    assert all(r["max_abs_err"] == 0 for r in fidelity(m, m, [batch()]).values())


@needs_td_mpc_opt
def test_real_fixtures(tmp_path):
    fp16 = load_any(TD_MPC_OPT / "mt30_1M_steps_045dist_fp16.pt")
    assert fp16.cfg.model_size == 1 and fp16._pi[0].weight.dtype == torch.float32
    for name in ("int8", "mixed"):
        path = TD_MPC_OPT / f"mt30_1M_steps_045dist_{name}.pt"
        with pytest.raises(QuantizedCheckpointError, match=r"scale: 1\.0.*unusable"):
            load_any(path)
        broken = load_any(path, allow_quantized=True)  # loads, for inspection
        assert fidelity(fp16, broken, [batch()])["Q"]["rel_err"] > 0.3
    ours = load_any(save_quantized(fp16, "int8", tmp_path / "int8.pt"))
    assert fidelity(fp16, ours, [batch()])["Q"]["rel_err"] < 0.05


def test_run_quantize_reports_size_fidelity_and_score(model_file, tmp_path):
    pytest.importorskip("dm_control")
    from tools.rollouts import make_mt30_dmc

    held = tmp_path / "held"
    make_mt30_dmc(held, episodes_per_task=1, policy="random", workers=0, tasks="pendulum-spin")
    cfg = QuantizeConfig(
        checkpoint=model_file, dtype="int8", out=tmp_path / "m-int8.pt", heldout=held,
        batches=2, batch_size=32, score_tasks="pendulum-spin", score_episodes=1, workers=0,
    )  # fmt: skip
    report = run_quantize(cfg)
    assert report["out"]["ratio_to_source"] < 0.3
    assert report["fidelity"]["reward"]["rel_err"] < 0.05
    assert set(report["score"]) >= {"fp32", "int8", "delta", "per_task"}
    assert json.loads(Path(f"{cfg.out}.report.json").read_text())["dtype"] == "int8"


def test_quantize_prints_a_table_or_json(model_file, tmp_path):
    from click.testing import CliRunner

    from trainer.cli import main as trainer_cli

    args = ["quantize", "--checkpoint", str(model_file), "--dtype", "fp16"]
    text = CliRunner().invoke(trainer_cli, [*args, "--out", str(tmp_path / "a.pt")])
    assert text.exit_code == 0, text.output
    assert "x the float32 model" in text.output and "{" not in text.output
    as_json = CliRunner().invoke(trainer_cli, [*args, "--out", str(tmp_path / "b.pt"), "--json"])
    report = json.loads(as_json.output)
    # fp16 halves the float32 model (the source may be a training checkpoint with optimisers)
    assert 0.45 < report["out"]["ratio_to_fp32"] < 0.6
    assert f"{report['out']['ratio_to_fp32']:.2f}x the float32 model" in text.output
