"""`tools bench-gpu`: every GPU figure of BENCHMARKS.md from one prepared command.

Runs, in order, each in its own process with its own time cap (`tools.bench.gpu_parts`):
the machine; `pytest -m gpu`; the synthetic store the rest reads; the training grid (1M
student, teachers of 317M/48M/5M or none, fp32/bf16 teacher/amp/compile/compile+amp, B=256
and 1024, in priority order); the official update beside ours (`--official PATH`); the loader
on the device; batched MPPI planning; torchrun on the device's backend. A part that fails or
runs out of time is recorded as such and the next one runs. OUT/gpu.json is rewritten after
every part; OUT/gpu.md is the table for BENCHMARKS.md, with the command that produced it.

The time caps share out `budget_s`: each part gets its share of what is left when it starts,
so time a part did not use goes to the later ones. `--dry-run` runs the same sequence on the
CPU at tiny sizes (CI runs it), so the command is known to work before a GPU is lent.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tools.bench.gpu_parts import DEVICE_SIZES, DRY_SIZES, PartArgs
from tools.bench.gpu_report import write_markdown
from trainer.training.runstate import write_json

# Parts in the order they run, and their shares of the time budget.
SHARES = {
    "machine": 2, "pytest-gpu": 18, "data": 4, "train": 40, "official": 12, "loader": 6,
    "plan": 10, "torchrun": 8,
}  # fmt: skip
NEEDS_STORE = ("train", "official", "loader", "plan", "torchrun")
MIN_PART_S = 5.0  # a part offered less than this is skipped: the budget is spent


@dataclass(frozen=True)
class BenchGPUConfig:
    """Settings of one `tools bench-gpu` run."""

    out: Path  # gpu.json, gpu.md, logs/ and the scratch folder work/
    budget_s: float = 420.0  # all parts together, seconds
    dry_run: bool = False  # CPU, tiny sizes: checks the command, measures nothing
    official: Path | None = None  # root of an official TD-MPC2 checkout (the peer part)
    env_steps_per_s: float = 7860.0  # physics per core of the evaluation projection
    command: str = "tools bench-gpu"  # how it was started, for gpu.md


def bench_gpu(cfg: BenchGPUConfig) -> dict[str, Any]:
    """Run every part; return what OUT/gpu.json holds."""
    out = Path(cfg.out)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    device = "cpu" if cfg.dry_run else "cuda"
    report: dict[str, Any] = {
        "command": cfg.command,
        "dry_run": cfg.dry_run,
        "budget_s": cfg.budget_s,
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "parts": {},
    }
    start = time.time()
    for name in SHARES:
        left = cfg.budget_s - (time.time() - start)
        cap = left * SHARES[name] / sum(SHARES[n] for n in _from(name))
        report["parts"][name] = _run_part(name, cfg, device, cap, report["parts"])
        report["seconds"] = time.time() - start
        _save(out, report)
    return report


def _from(name: str) -> list[str]:
    names = list(SHARES)
    return names[names.index(name) :]


def _run_part(name: str, cfg: BenchGPUConfig, device: str, cap: float, done: dict) -> dict:
    """One part's record: status ok / failed / timeout / skipped, seconds, result."""
    if cap < MIN_PART_S:
        return _skipped(f"the time budget ({cfg.budget_s:.0f} s) was spent", cap)
    if name in NEEDS_STORE and done.get("data", {}).get("status") != "ok":
        return _skipped("no store: the data part did not finish", cap)
    if name == "official" and cfg.official is None:
        return _skipped("no --official PATH given (the root of an official TD-MPC2 checkout)", cap)
    out = Path(cfg.out)
    log = out / "logs" / f"{name}.log"
    result = out / "logs" / f"{name}.json"
    result.unlink(missing_ok=True)
    if name == "pytest-gpu":
        command = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                   *map(str, gpu_test_modules())]  # fmt: skip
    else:
        args = _part_args(cfg, device, time.time() + cap - 2)
        command = [sys.executable, "-m", "tools.bench.gpu_parts", name, args.to_json(), str(result)]
    record = {"cap_s": cap, **_run(command, cap, log)}
    if result.is_file():
        record["result"] = json.loads(result.read_text())
    if name == "pytest-gpu":
        record["result"] = {"summary": _last_line(log)}
        if record["returncode"] == 5:  # no GPU test selected: nothing failed
            record["status"] = "ok"
    return record


def gpu_test_modules() -> list[Path]:
    """The test modules holding GPU-marked tests. Only they are collected: the device's image
    lacks what other modules import (dm_control, rliable, dask)."""
    tests = Path(__file__).resolve().parents[2] / "tests"
    return [p for p in sorted(tests.glob("test_*.py")) if "pytest.mark.gpu" in p.read_text()]


def _part_args(cfg: BenchGPUConfig, device: str, deadline: float) -> PartArgs:
    work = Path(cfg.out).resolve() / "work"
    return PartArgs(
        sizes=DRY_SIZES if cfg.dry_run else DEVICE_SIZES,
        store=str(work / "store"),
        work=str(work),
        device=device,
        deadline=deadline,
        official=None if cfg.official is None else str(Path(cfg.official).resolve()),
        env_steps_per_s=cfg.env_steps_per_s,
    )


def _run(command: list[str], cap: float, log: Path) -> dict[str, Any]:
    """Run `command` for at most `cap` seconds, output to `log`; kill its whole process group
    (its workers too) if it overruns."""
    t0 = time.perf_counter()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log, "w") as f:
        proc = subprocess.Popen(command, stdout=f, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)  # fmt: skip
        try:
            rc = proc.wait(timeout=cap)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return {"status": "timeout", "returncode": None, "seconds": time.perf_counter() - t0,
                    "log": str(log)}  # fmt: skip
    status = "ok" if rc == 0 else "failed"
    record = {"status": status, "returncode": rc, "seconds": time.perf_counter() - t0,
              "log": str(log)}  # fmt: skip
    if rc != 0:
        record["error"] = _last_line(log)
    return record


def _skipped(reason: str, cap: float) -> dict[str, Any]:
    return {"status": "skipped", "reason": reason, "cap_s": cap, "seconds": 0.0}


def _last_line(log: Path) -> str:
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _save(out: Path, report: dict[str, Any]) -> None:
    write_json(out / "gpu.json", report)
    write_markdown(out / "gpu.md", report)
