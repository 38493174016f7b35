"""tools make-mt30 writes the official chunk layout with data structured like real rollouts."""

from __future__ import annotations

import hashlib

import numpy as np
import torch
from click.testing import CliRunner
from tensordict import TensorDict

from datapipe.tasksets import MT30
from tools.cli import main as tools_cli
from tools.make_mt30 import MakeConfig


def test_official_layout_and_structure(tmp_path):
    result = CliRunner().invoke(
        tools_cli,
        ["make-mt30", "--dst", str(tmp_path), "--episodes-per-task", "3", "--chunks", "2"],
    )
    assert result.exit_code == 0, result.output
    tds = [torch.load(tmp_path / f"chunk_{k}.pt", weights_only=False) for k in range(2)]
    assert all(isinstance(td, TensorDict) for td in tds)
    assert [td.batch_size for td in tds] == [torch.Size([45, 501])] * 2
    td = torch.cat(tds)
    assert {k: str(td[k].dtype) for k in td.keys()} == {  # noqa: SIM118
        "obs": "torch.float32", "action": "torch.float32",
        "reward": "torch.float32", "task": "torch.int32",
    }  # fmt: skip
    obs, action, reward = td["obs"].numpy(), td["action"].numpy(), td["reward"].numpy()
    task = td["task"].numpy()
    assert obs.shape == (90, 501, 24) and action.shape == (90, 501, 6)
    assert np.isnan(action[:, 0]).all() and np.isnan(reward[:, 0]).all()
    assert np.isfinite(action[:, 1:]).all() and np.isfinite(obs).all()
    assert (np.abs(action[:, 1:]) <= 1).all()
    assert reward[:, 1:].min() >= 0 and reward[:, 1:].max() <= 2
    np.testing.assert_array_equal(task[:, 0], np.repeat(np.arange(30), 3))  # tasks in runs
    assert (task == task[:, :1]).all()
    for e in range(90):
        t = task[e, 0]
        assert (
            not obs[e, :, MT30.obs_dims[t] :].any()
            and not action[e, 1:, MT30.action_dims[t] :].any()
        )
        assert obs[e, :, : MT30.obs_dims[t]].any(axis=0).all()  # every real dim is used
    # smooth, not white noise: steps are small next to the spread of the trajectory
    step = np.abs(np.diff(obs[:, :, :3], axis=1)).mean()
    assert step < 0.2 * obs[:, :, :3].std()
    assert reward[:, 1:].std() > 0.05


def test_same_seed_same_bytes(tmp_path):
    def digest(d):
        CliRunner().invoke(tools_cli, ["make-mt30", "--dst", str(d), "--episodes-per-task", "1"])
        return hashlib.sha256((d / "chunk_0.pt").read_bytes()).hexdigest()

    assert digest(tmp_path / "a") == digest(tmp_path / "b")


def test_shipped_sample_is_official_layout():
    from pathlib import Path

    from datapipe.source import scan_sources

    files, layout = scan_sources(Path(__file__).parents[1] / "data" / "mt30-sample")
    assert [f.name for f in files] == ["chunk_0.pt", "chunk_1.pt"]
    assert (layout.rows, layout.obs_dim, layout.action_dim) == (501, 24, 6)


def test_every_make_setting_is_a_flag_with_its_help_and_default():
    import dataclasses

    params = {p.name: p for p in tools_cli.commands["make-mt30"].params}
    for f in dataclasses.fields(MakeConfig):
        assert params[f.name].help == f.metadata["help"] != "", f.name
        if f.default is not dataclasses.MISSING:
            assert params[f.name].default == f.default, f.name
