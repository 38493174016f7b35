"""`tools bench-ddp`: the per-step cost of data-parallel CPU training, N ranks against 1.

Runs the same `trainer train` (or `distill`, with a teacher) through torchrun three ways, with
the same per-rank batch and one torch thread per process:

- 1 rank: the single-process step;
- N x 1 rank: N independent single-process runs at the same time, which pay everything N
  processes cost each other on this machine (cores, memory bandwidth, other jobs' load) but
  do not communicate;
- N ranks: the data-parallel run.

Every step's time comes from the run's metrics.jsonl (--log-every 1: one row per step, whose
steps_per_s is 1 / that step's seconds); the first `warmup` steps (pool fill, allocator)
are left out and the median taken. N ranks against 1 rank is the whole per-step overhead;
N ranks against N x 1 rank is the part that data parallelism itself adds (the gradient
all-reduces, the global-batch statistics, the metrics all-reduce, waiting for the slower rank).
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer.training.runlog import read_metrics


@dataclass(frozen=True)
class BenchDDPConfig:
    shards: str  # store path or URL
    work: Path  # scratch folder for the run folders
    ranks: int = 2
    model_size: int = 1
    batch_size: int = 256  # per rank, the same in every run
    steps: int = 60
    warmup: int = 10
    teacher: Path | None = None  # distill from it; None: plain training


def bench_ddp(cfg: BenchDDPConfig) -> list[dict[str, Any]]:
    """One row per configuration: median step time, data wait, throughput, ratio to 1 rank."""
    if cfg.ranks < 2 or cfg.steps <= cfg.warmup:
        raise ValueError(f"need ranks >= 2 and steps > warmup (got {cfg.ranks}, {cfg.steps})")
    n = cfg.ranks
    rows = [
        _measure("1 rank", _launch(cfg, [1]), cfg.warmup),
        _measure(f"{n} x 1 rank", _launch(cfg, [1] * n), cfg.warmup),
        _measure(f"{n} ranks", _launch(cfg, [n]), cfg.warmup),
    ]
    for row in rows:
        row["step_ratio"] = row["median_step_ms"] / rows[0]["median_step_ms"]
    return rows


def _launch(cfg: BenchDDPConfig, nprocs: list[int]) -> list[Path]:
    """Start one torchrun per entry of `nprocs` (that many ranks) at once; their run folders.
    Each one's output goes to <run folder>.log."""
    label = "x".join(map(str, nprocs))
    outs = [cfg.work / f"{label}-{i}" for i in range(len(nprocs))]
    commands = [_command(cfg, nproc, out) for nproc, out in zip(nprocs, outs, strict=True)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cfg.work.mkdir(parents=True, exist_ok=True)
    running = []
    for command, out in zip(commands, outs, strict=True):
        shutil.rmtree(out, ignore_errors=True)
        with open(f"{out}.log", "w") as log:
            running.append(subprocess.Popen(command, env=env, stdout=log, stderr=log))
    for command, out, proc in zip(commands, outs, running, strict=True):
        if proc.wait() != 0:
            raise RuntimeError(
                f"benchmark run failed ({proc.returncode}): {' '.join(command)}; its output: "
                f"{out}.log"
            )
    return outs


def _command(cfg: BenchDDPConfig, nproc: int, out: Path) -> list[str]:
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc-per-node={nproc}", "-m", "trainer",
        "train" if cfg.teacher is None else "distill",
        "--shards", cfg.shards, "--out", str(out), "--steps", str(cfg.steps),
        "--batch-size", str(cfg.batch_size), "--model-size", str(cfg.model_size),
        "--device", "cpu", "--threads", "1", "--log-every", "1",
        "--save-every", str(cfg.steps), "--no-progress",
    ]  # fmt: skip
    if cfg.teacher is not None:
        command += ["--teacher", str(cfg.teacher)]
    return command


def _measure(label: str, runs: list[Path], warmup: int) -> dict[str, Any]:
    """Medians over the timed steps of all `runs` (concurrent ones are pooled)."""
    step_s, wait_s, samples, peak = [], [], 0, 0
    for run in runs:
        rows = [r for r in read_metrics(run) if r["step"] > warmup]
        step_s += [1 / r["steps_per_s"] for r in rows]
        wait_s += [r["data_wait"] / r["steps_per_s"] for r in rows]
        summary = json.loads((run / "summary.json").read_text())
        samples += summary["global_batch_size"]
        peak = max(peak, summary["peak_rss_bytes"])  # of the largest rank
    median = statistics.median(step_s)
    return {
        "config": label,
        "slices_per_step": samples,
        "median_step_ms": 1e3 * median,
        "median_data_wait_ms": 1e3 * statistics.median(wait_s),
        "samples_per_s": samples / median,
        "timed_steps": len(step_s),
        "peak_rss_gb": peak / 1e9,
        "load_1min": os.getloadavg()[0],
    }
