"""`tools bench-update` (tools/bench/update.py) and the official agent on CPU
(tools/bench/official.py). The compiled cells take a minute of compilation each, so the
tests here measure eager cells only; BENCHMARKS.md §14 has the full run."""

from __future__ import annotations

import os
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tools.bench.official import import_official, official_agent
from tools.bench.update import BenchUpdateConfig, _run_cell, cells, measure, ratios

OFFICIAL = os.environ.get("TDMPC2_OFFICIAL")  # root of an official TD-MPC2 checkout, if any


@pytest.fixture
def forget_official_modules():
    """The official code imports as `tdmpc2` and `common`: each test imports its own."""
    yield
    for name in [n for n in sys.modules if n == "tdmpc2" or n.split(".")[0] == "common"]:
        del sys.modules[name]
    sys.path[:] = [p for p in sys.path if not p.endswith("tdmpc2")]


def test_cells_alternate_ours_and_the_official_and_skip_what_the_official_lacks():
    cfg = BenchUpdateConfig(official=Path("x"), batch_sizes=(256, 1024))
    got = [(c["kind"], c["impl"], c["compiled"], c.get("batch"), c.get("mpc")) for c in cells(cfg)]
    assert got[:4] == [("update", "ours", False, 256, None), ("update", "official", False, 256, None),
                       ("update", "ours", True, 256, None), ("update", "official", True, 256, None)]  # fmt: skip
    assert [c for c in got if c[0] == "update" and c[3] == 1024] == [
        (k, i, c, 1024, None) for k, i, c, _, _ in got[:4]
    ]
    plans = [c for c in got if c[0] == "plan"]
    assert ("plan", "official", True, None, False) not in plans  # the official compiles plan only
    assert len(plans) == 7
    assert all(c["impl"] == "ours" for c in cells(BenchUpdateConfig(batch_sizes=(8,))))


def test_ratios_are_against_the_official_eager_cell_of_the_same_batch():
    rows = [
        {"kind": "update", "impl": "official", "compiled": False, "batch": 8, "ms_per_step": 10.0},
        {"kind": "update", "impl": "ours", "compiled": True, "batch": 8, "ms_per_step": 7.0},
        {"kind": "update", "impl": "ours", "compiled": False, "batch": 16, "ms_per_step": 3.0},
        {"kind": "update", "impl": "official", "compiled": True, "batch": 8, "error": "boom"},
    ]
    got = {(r["batch"], r["impl"], r["compiled"]): r["vs_official_eager"] for r in ratios(rows)}
    assert got == {(8, "official", False): 1.0, (8, "ours", True): 0.7, (16, "ours", False): None}


def test_eager_cells_measure_our_update_and_planner(monkeypatch):
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # a cell's process sets 1
    cfg = BenchUpdateConfig(warmup_steps=1, windows=2, window_steps=1, plan_steps=2)
    update = measure({"kind": "update", "impl": "ours", "compiled": False, "batch": 4}, cfg)
    assert update["ms_per_step"] > 0 and update["threads"] == torch.get_num_threads()
    assert update["warmup_s"] >= update["first_step_s"] > 0
    plan = measure({"kind": "plan", "impl": "ours", "compiled": False, "mpc": False}, cfg)
    assert 0 < plan["ms_per_step"] < update["ms_per_step"] * 100


def test_a_cell_that_fails_is_a_row_with_its_error(tmp_path):
    cfg = BenchUpdateConfig(official=tmp_path, timeout_s=120)
    row = _run_cell({"kind": "update", "impl": "official", "compiled": False, "batch": 4}, cfg)
    assert "no tdmpc2/tdmpc2.py" in row["error"]


def _checkout_with_cuda_constructors(root: Path) -> Path:
    """A checkout laid out as the official one, whose constructors hard-code cuda:0 and
    capturable Adams in the official's own words."""
    src = root / "tdmpc2"
    (src / "common").mkdir(parents=True)
    (src / "config.yaml").write_text("lr: 3e-4\n")
    (src / "common" / "__init__.py").write_text("")
    (src / "common" / "scale.py").write_text(textwrap.dedent("""\
        import torch
        class RunningScale(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.value = torch.nn.Buffer(torch.ones(1, device=torch.device('cuda:0')))
        """))  # fmt: skip
    (src / "tdmpc2.py").write_text(textwrap.dedent("""\
        import torch
        from common.scale import RunningScale
        class TDMPC2(torch.nn.Module):
            def __init__(self, cfg):
                super().__init__()
                self.device = torch.device('cuda:0')
                self.lin = torch.nn.Linear(2, 2).to(self.device)
                self.optim = torch.optim.Adam(self.lin.parameters(), lr=cfg.lr, capturable=True)
                self.discount = torch.tensor([0.9], device='cuda:0')
                self.scale = RunningScale()
            def step(self):
                self.optim.zero_grad()
                self.lin(torch.ones(1, 2, device=self.device)).sum().backward()
                self.optim.step()
        """))  # fmt: skip
    return root


def test_the_official_constructors_place_their_tensors_on_cpu(tmp_path, forget_official_modules):
    TDMPC2 = import_official(_checkout_with_cuda_constructors(tmp_path))
    agent = official_agent(TDMPC2, type("Cfg", (), {"lr": 1e-3})(), torch.device("cpu"))
    assert agent.device == torch.device("cpu")
    assert {t.device.type for t in (agent.discount, agent.scale.value, *agent.parameters())} == {
        "cpu"
    }
    assert not agent.optim.param_groups[0]["capturable"]
    agent.step()  # a capturable Adam on CPU would stop here
    assert sys.modules["tdmpc2"].torch is torch and sys.modules["common.scale"].torch is torch


@pytest.mark.skipif(not OFFICIAL, reason="needs TDMPC2_OFFICIAL=<root of an official TD-MPC2 "
                    "checkout> and tensordict 0.8.3 (pip install tensordict==0.8.3)")  # fmt: skip
def test_the_official_agent_updates_on_cpu(forget_official_modules):
    pytest.importorskip("tensordict", reason="the official code needs tensordict 0.8.3")
    cfg = BenchUpdateConfig(official=Path(OFFICIAL), warmup_steps=1, windows=1, window_steps=1)
    row = measure({"kind": "update", "impl": "official", "compiled": False, "batch": 8}, cfg)
    assert row["ms_per_step"] > 0
