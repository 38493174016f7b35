"""What post-training quantization changed, and the `trainer quantize` command.

This module owns:
  * `fidelity`: quantized vs reference outputs (reward, Q, policy action) on held-out batches;
  * `heldout_transitions`: (obs_{k-1}, a_k, r_k, task) of real rollouts in a chunk folder,
    the held-out data of `fidelity` and of `trainer.study.report`'s reward errors;
  * `run_quantize`: write the quantized file (`trainer.model.quantize`), then report its
    size, its fidelity and the policy-only score change (`trainer.evaluation.evaluate`).
"""

from __future__ import annotations

import dataclasses
import io
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from datapipe.location import atomic_file, only_writer_of_file
from datapipe.options import setting
from trainer.errors import BusyError
from trainer.model.checkpoint import load_any
from trainer.model.math import two_hot_inv
from trainer.model.quantize import quantize_model, save_quantized
from trainer.model.world import WorldModel

# -- fidelity -------------------------------------------------------------------------------------


def heldout_transitions(
    src: str | os.PathLike, n: int | None = 2048, seed: int = 0
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(obs [N, O], action [N, A], reward [N], task [N]) from real rollouts in a chunk folder:
    a visited state obs_{k-1}, the action a_k actually taken in it and the reward r_k it
    earned (k >= 1). `n` transitions drawn with replacement by `seed`; `n=None`: every
    transition of every episode, in file, episode and row order."""
    from datapipe.source import read_episodes, scan_sources

    files, layout = scan_sources(src)
    total = sum(f.episodes for f in files)
    if n is None:
        which = np.repeat(np.arange(total), layout.rows - 1)
        rows = np.tile(np.arange(1, layout.rows), total)
    else:
        rng = np.random.default_rng(seed)
        which = rng.integers(0, total, n)
        rows = rng.integers(1, layout.rows, n)
    parts: dict[str, list[np.ndarray]] = {"obs": [], "action": [], "reward": [], "task": []}
    for f in files:
        local = (which >= f.start) & (which < f.start + f.episodes)
        if not local.any():
            continue
        data = read_episodes(f.path, 0, f.episodes)
        e, k = which[local] - f.start, rows[local]
        parts["obs"].append(data["obs"][e, k - 1])
        for key in ("action", "reward", "task"):
            parts[key].append(data[key][e, k])
    obs, action, reward, task = (torch.from_numpy(np.concatenate(v)) for v in parts.values())
    return obs, action, reward, task.long()


def heldout_batches(
    src: str | os.PathLike, n_batches: int = 8, batch_size: int = 256, seed: int = 0
) -> list[tuple[Tensor, Tensor, Tensor]]:
    """(obs [B, O], action [B, A], task [B]) triples from real rollouts in a chunk folder:
    a visited state obs_{k-1} and the action a_k actually taken in it (k >= 1)."""
    obs, action, _, task = heldout_transitions(src, n_batches * batch_size, seed)
    return [
        (obs[i : i + batch_size], action[i : i + batch_size], task[i : i + batch_size])
        for i in range(0, len(task), batch_size)
    ]


@torch.no_grad()
def _outputs(model: WorldModel, obs: Tensor, action: Tensor, task: Tensor) -> dict[str, Tensor]:
    dtype = model._encoder["state"][0].weight.dtype
    z = model.encode(obs.to(dtype), task)
    a = action.to(dtype)
    reward = two_hot_inv(model.reward(z, a, task), model.cfg.vmin, model.cfg.vmax)
    q = two_hot_inv(model.Q(z, a, task, mode="all"), model.cfg.vmin, model.cfg.vmax)
    _, info = model.pi(z, task)
    return {"latent": z, "reward": reward, "Q": q, "action": info["mean"]}


def fidelity(
    reference: WorldModel, candidate: WorldModel, batches: list[tuple[Tensor, Tensor, Tensor]]
) -> dict[str, dict[str, float]]:
    """Per output (latent, reward, Q of every member, policy mean action): mean and max
    absolute error of `candidate` against `reference`, and the reference's mean |value|."""
    reference.eval(), candidate.eval()
    sums: dict[str, dict[str, float]] = {}
    count: dict[str, int] = {}
    for obs, action, task in batches:
        ref, cand = _outputs(reference, obs, action, task), _outputs(candidate, obs, action, task)
        for name, r in ref.items():
            err = (cand[name].float() - r.float()).abs()
            s = sums.setdefault(
                name, {"mean_abs_err": 0.0, "max_abs_err": 0.0, "ref_mean_abs": 0.0}
            )
            s["mean_abs_err"] += float(err.sum())
            s["ref_mean_abs"] += float(r.float().abs().sum())
            s["max_abs_err"] = max(s["max_abs_err"], float(err.max()))
            count[name] = count.get(name, 0) + err.numel()
    for name, s in sums.items():
        s["mean_abs_err"] /= count[name]
        s["ref_mean_abs"] /= count[name]
        s["rel_err"] = s["mean_abs_err"] / max(s["ref_mean_abs"], 1e-12)
    return sums


# -- the command ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class QuantizeConfig:
    """Settings of `trainer quantize`, one field per flag (the options are generated from
    them)."""

    checkpoint: Path = setting(help="Source world model (official file, fp32 or fp16, any size).")
    dtype: str = setting(
        "int8", "fp16/bf16: cast; int8: per-channel Linear weights, scales from the weights."
    )
    out: Path = setting(
        Path("runs/quantized.pt"), "Quantized file to write; the report goes to <out>.report.json."
    )
    heldout: Path | None = setting(
        None, "Folder of chunk_K.pt for the fidelity report (reward, Q, action error)."
    )
    batches: int = setting(8, "Held-out batches for the fidelity report.")
    batch_size: int = setting(256, "Rows per held-out batch.")
    score_tasks: str = setting("", "Comma-separated tasks for the policy-only score change.")
    score_episodes: int = setting(2, "Episodes per scored task.")
    workers: int = setting(-1, "Eval processes of the score change (see trainer eval).")
    seed: int = setting(1, "Env seed of the score change; sampling seed of held-out batches.")
    progress: bool = setting(
        True, "Progress of the score change's episodes (a line per 30 s off a terminal)."
    )


def run_quantize(cfg: QuantizeConfig) -> dict[str, Any]:
    """`trainer quantize`: write the quantized file, then report its size, its fidelity
    against the float32 source on held-out batches and the policy-only score change (one
    writer per output file)."""
    with only_writer_of_file(cfg.out, "another `trainer quantize`", BusyError):
        return _run_quantize(cfg)


def _run_quantize(cfg: QuantizeConfig) -> dict[str, Any]:
    import json

    from trainer.evaluation.evaluate import evaluate

    reference = load_any(cfg.checkpoint)
    save_quantized(reference, cfg.dtype, cfg.out, cfg.checkpoint)
    candidate = load_any(cfg.out)
    source_bytes, out_bytes = os.path.getsize(cfg.checkpoint), os.path.getsize(cfg.out)
    fp32 = io.BytesIO()  # the model alone in float32: a training checkpoint adds optimisers
    torch.save(reference.state_dict(), fp32)
    fp32_bytes = fp32.getbuffer().nbytes
    report: dict[str, Any] = {
        "source": {"path": str(cfg.checkpoint), "bytes": source_bytes},
        "fp32_model_bytes": fp32_bytes,
        "out": {
            "path": str(cfg.out),
            "bytes": out_bytes,
            "ratio_to_fp32": out_bytes / fp32_bytes,
            "ratio_to_source": out_bytes / source_bytes,
        },
        "dtype": cfg.dtype,
        "scheme": quantize_model(reference, cfg.dtype)["scheme"],
        "runtime_dtype": str(candidate._encoder["state"][0].weight.dtype).removeprefix("torch."),
    }
    if cfg.heldout is not None:
        batches = heldout_batches(cfg.heldout, cfg.batches, cfg.batch_size, cfg.seed)
        report["fidelity"] = fidelity(reference, candidate, batches)
    if cfg.score_tasks:
        runs = {}
        for name, model in (("fp32", reference), (cfg.dtype, candidate)):
            result = evaluate(
                model,
                cfg.score_tasks,
                cfg.score_episodes,
                False,
                cfg.seed,
                cfg.workers,
                progress=cfg.progress,
            )
            runs[name] = result
        report["score"] = {
            "protocol": "policy mean (eval_mode, no noise), "
            f"{cfg.score_episodes} episodes per task, seed {cfg.seed}",
            **{name: r.normalized_score for name, r in runs.items()},
            "delta": runs[cfg.dtype].normalized_score - runs["fp32"].normalized_score,
            "per_task": {
                a.task: {"fp32": a.mean_return, cfg.dtype: b.mean_return}
                for a, b in zip(runs["fp32"].tasks, runs[cfg.dtype].tasks, strict=True)
            },
        }
    with atomic_file(f"{cfg.out}.report.json") as f:
        f.write((json.dumps(report, indent=2) + "\n").encode())
    return report


def report_text(report: dict[str, Any]) -> str:
    """`trainer quantize`'s report for a person: size, fidelity, score change."""
    out, mb = report["out"], lambda n: f"{n / 1e6:.2f} MB"
    lines = [
        f"{report['dtype']} ({report['scheme']}) -> {out['path']}",
        f"size: {mb(out['bytes'])} = {out['ratio_to_fp32']:.2f}x the float32 model "
        f"({mb(report['fp32_model_bytes'])}); the source file is {mb(report['source']['bytes'])}",
    ]
    if "fidelity" in report:
        lines.append(f"{'output':10} {'mean |err|':>11} {'max |err|':>11} {'relative':>9}")
        for name, s in report["fidelity"].items():
            lines.append(
                f"{name:10} {s['mean_abs_err']:11.3g} {s['max_abs_err']:11.3g} {s['rel_err']:9.2%}"
            )
    if "score" in report:
        score = report["score"]
        lines.append(
            f"score ({score['protocol']}): float32 {score['fp32']:.2f}, {report['dtype']} "
            f"{score[report['dtype']]:.2f}, change {score['delta']:+.2f}"
        )
    lines.append(f"report: {out['path']}.report.json")
    return "\n".join(lines)
