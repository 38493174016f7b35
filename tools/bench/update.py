"""`tools bench-update`: the update and the planner, ours beside the official, eager and
compiled, on CPU (issue 20; BENCHMARKS.md §14).

Every cell runs in a process of its own, with one torch thread (OMP_NUM_THREADS=1) and an
empty inductor cache (so its warm-up is a cold compile, as a new run's first), and prints
one JSON row:

- `update`: one TD-MPC2 update of a fresh 1M agent (no teacher) on batches of `batch`
  slices of horizon 3, drawn once from a fixed generator and cycled (the loader's cost is
  not in it: BENCHMARKS §3 and §4 time that); ours through `TDMPC2Agent.update` (eager) or
  `compile_update`, the official through its `update(buffer)` with `compile` false or true.
- `plan`: one action for one environment of a fresh 1M model: MPPI with the official
  parameters (ours: `Actor`, the official: `act(..., eval_mode=True)`), or the policy mean.

Each cell's first step and warm-up are timed apart, then `windows` windows of `window_steps`
steps; a row's figure is the median window's time per step. The cells run in the order
given, so ours and the official alternate at each batch size.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tools.bench.official import (
    OfficialBuffer,
    import_official,
    official_agent,
    official_config,
    official_source,
)
from trainer.model.presets import ModelConfig

HORIZON = 3  # the official mt30 horizon


@dataclass(frozen=True)
class BenchUpdateConfig:
    official: Path | None = None  # root of an official TD-MPC2 checkout; None: ours only
    batch_sizes: tuple[int, ...] = (256, 1024)
    model_size: int = 1
    warmup_steps: int = 5  # after the first step: compilation settles within a few
    windows: int = 5
    window_steps: int = 5
    plan_steps: int = 30  # planning steps per cell after the warm-up
    timeout_s: float = 900.0  # per cell


def cells(cfg: BenchUpdateConfig) -> list[dict[str, Any]]:
    """The cells in the order they run: updates at each batch size, then planning."""
    impls = ("ours", "official") if cfg.official else ("ours",)
    out = []
    for batch in cfg.batch_sizes:
        for compiled in (False, True):
            out += [{"kind": "update", "impl": i, "compiled": compiled, "batch": batch}
                    for i in impls]  # fmt: skip
    for mpc in (True, False):
        for compiled in (False, True):
            out += [{"kind": "plan", "impl": i, "compiled": compiled, "mpc": mpc}
                    for i in impls if i == "ours" or mpc or not compiled]  # fmt: skip
    return out  # (the official compiles its planner only: no compiled official policy cell)


def bench_update(cfg: BenchUpdateConfig, echo: Callable[[str], None] = print) -> list[dict]:
    """Runs every cell in its own process; a failed cell is a row with its error."""
    rows = []
    for cell in cells(cfg):
        row = {**cell, **_run_cell(cell, cfg)}
        echo(describe(row))
        rows.append(row)
    return rows


def _run_cell(cell: dict, cfg: BenchUpdateConfig) -> dict[str, Any]:
    settings = {**dataclasses.asdict(cfg), "official": cfg.official and str(cfg.official)}
    with tempfile.TemporaryDirectory(prefix="bench-update-") as cache:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCHINDUCTOR_CACHE_DIR": cache}
        command = [sys.executable, "-m", "tools.bench.update", json.dumps(cell),
                   json.dumps(settings)]  # fmt: skip
        try:
            done = subprocess.run(command, env=env, capture_output=True, text=True,
                                  timeout=cfg.timeout_s)  # fmt: skip
        except subprocess.TimeoutExpired:
            return {"error": f"over {cfg.timeout_s:.0f} s"}
    last = done.stdout.strip().splitlines()[-1:] if done.returncode == 0 else []
    if not last:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"exit {done.returncode}: {tail}"}
    return json.loads(last[0])


def describe(row: dict) -> str:
    """One line per cell, as the bench prints them."""
    what = f"{row['impl']:8} {'compiled' if row['compiled'] else 'eager':8}"
    if row["kind"] == "update":
        what = f"update B={row['batch']:<5} {what}"
    else:
        what = f"plan {'MPPI' if row['mpc'] else 'policy':6}     {what}"
    if "error" in row:
        return f"{what} error: {row['error']}"
    return (f"{what} {row['ms_per_step']:9.2f} ms/step  first step {row['first_step_s']:6.1f} s"
            f"  warm-up {row['warmup_s']:6.1f} s")  # fmt: skip


def ratios(rows: list[dict]) -> list[dict]:
    """Per batch size: each update cell's time over the official eager one's."""
    out = []
    for batch in sorted({r["batch"] for r in rows if r["kind"] == "update"}):
        cell = {(r["impl"], r["compiled"]): r for r in rows
                if r["kind"] == "update" and r["batch"] == batch and "error" not in r}  # fmt: skip
        base = cell.get(("official", False))
        for key, r in cell.items():
            out.append({"batch": batch, "impl": key[0], "compiled": key[1],
                        "ms_per_step": r["ms_per_step"],
                        "vs_official_eager": base and r["ms_per_step"] / base["ms_per_step"]})  # fmt: skip
    return out


# -- inside a cell's process -------------------------------------------------------------------


def measure(cell: dict, cfg: BenchUpdateConfig) -> dict[str, Any]:
    torch.set_num_threads(1)
    model = dataclasses.replace(ModelConfig.for_size(cfg.model_size), horizon=HORIZON)
    step = (_update_step if cell["kind"] == "update" else _plan_step)(cell, cfg, model)
    t0 = time.perf_counter()
    step()
    first = time.perf_counter() - t0
    for _ in range(cfg.warmup_steps):
        step()
    warmup = time.perf_counter() - t0
    if cell["kind"] == "plan":  # single steps: a plan is short, windows would hide little
        times = [_timed(step, 1) for _ in range(cfg.plan_steps)]
    else:
        times = [_timed(step, cfg.window_steps) for _ in range(cfg.windows)]
    return {
        "ms_per_step": 1000 * statistics.median(times),
        "first_step_s": first,
        "warmup_s": warmup,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def _timed(step: Callable[[], None], n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    return (time.perf_counter() - t0) / n


def _batches(model: ModelConfig, batch: int) -> Iterator[tuple[torch.Tensor, ...]]:
    """Four fixed batches in the loader's layout, cycled: obs [H+1,B,O], action [H,B,A],
    reward [H,B,1], task [B]; each task's padded action dims zero, as in the data."""
    g = torch.Generator().manual_seed(1)
    n_tasks = len(model.action_dims)
    dims = torch.tensor(model.action_dims)
    made = []
    for _ in range(4):
        task = torch.randint(0, n_tasks, (batch,), generator=g)
        action = torch.rand(HORIZON, batch, model.action_dim, generator=g) * 2 - 1
        action *= torch.arange(model.action_dim) < dims[task][:, None]
        made.append((
            torch.randn(HORIZON + 1, batch, model.obs_dim, generator=g), action,
            torch.randn(HORIZON, batch, 1, generator=g), task,
        ))  # fmt: skip
    while True:
        yield from made


def _update_step(cell: dict, cfg: BenchUpdateConfig, model: ModelConfig) -> Callable[[], None]:
    batches = _batches(model, cell["batch"])
    if cell["impl"] == "official":
        agent = _official(cfg, model, cell["batch"], cell["compiled"])
        buffer = OfficialBuffer(batches, type(agent))
        return lambda: agent.update(buffer)
    from trainer.training.agent import TDMPC2Agent
    from trainer.training.train import compile_update

    torch.manual_seed(0)
    agent = TDMPC2Agent(model)
    update = compile_update(agent.update, torch.device("cpu")) if cell["compiled"] else agent.update
    return lambda: update(*next(batches), None, 0.0, "first")


def _plan_step(cell: dict, cfg: BenchUpdateConfig, model: ModelConfig) -> Callable[[], None]:
    g = torch.Generator().manual_seed(2)
    obs = torch.randn(1, model.obs_dim, generator=g)
    if cell["impl"] == "official":
        agent = _official(cfg, model, 256, cell["compiled"], mpc=cell["mpc"])
        first = [True]

        def act() -> None:
            agent.act(obs[0], t0=first[0], eval_mode=True, task=7)
            first[0] = False

        return act
    from trainer.evaluation.plan import Actor
    from trainer.model.world import WorldModel

    torch.manual_seed(0)
    actor = Actor(WorldModel(model), 1, mpc=cell["mpc"], compile=cell["compiled"])
    task = torch.tensor([7])
    return lambda: actor(obs, task)


def _official(cfg: BenchUpdateConfig, model: ModelConfig, batch: int, compiled: bool, **more):
    from datapipe.tasksets import MT30

    TDMPC2 = import_official(cfg.official)
    raw = official_config(official_source(cfg.official), model, list(MT30.names), batch, compiled)
    raw.update(more)
    torch.manual_seed(0)
    return official_agent(TDMPC2, raw, torch.device("cpu"))


def main(argv: list[str]) -> None:
    """`python -m tools.bench.update CELL_JSON SETTINGS_JSON`: one cell, one JSON line."""
    import contextlib
    import io

    cell, settings = json.loads(argv[0]), json.loads(argv[1])
    settings["batch_sizes"] = tuple(settings["batch_sizes"])
    cfg = BenchUpdateConfig(**settings)
    with contextlib.redirect_stdout(io.StringIO()):  # the official code prints as it builds
        row = measure(cell, cfg)
    print(json.dumps(row))


if __name__ == "__main__":
    main(sys.argv[1:])
