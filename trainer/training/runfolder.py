"""What a run folder holds, and whether a run may start or continue in it: a new run never
writes over another (unless --overwrite), nor into the store; a resumed run takes its
settings from config.json and may not change what changes the math.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

from trainer.errors import ResumeError, TrainConfigError
from trainer.training.config import TrainConfig
from trainer.training.runlog import RUN_LOG_FILES, TENSORBOARD_DIR, WANDB_DIR
from trainer.training.runstate import CHECKPOINT_FILE, read_training_checkpoint
from trainer.training.traineval import BEST_FILE, BEST_INFO_FILE

CONFIG_FILE = "config.json"
SUMMARY_FILE = "summary.json"


def resume_config(out: Path, given: dict[str, Any], command: str) -> TrainConfig:
    """The settings of the run in `out` (its config.json), for `trainer <command> --out OUT
    --resume`, with the settings in `given` given again: those that change the math must
    agree with the run's; the others (--steps, logging, progress, threads) replace them."""
    path = Path(out) / CONFIG_FILE
    if not path.is_file():
        raise ResumeError(
            f"--resume: {out} holds no {CONFIG_FILE}, so no run to continue; start the run "
            f"without --resume"
        )
    try:
        saved = json.loads(path.read_text())["config"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ResumeError(
            f"{path} is damaged ({e!r}); give every setting again together with --resume"
        ) from e
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    saved = {k: v for k, v in saved.items() if k in known}
    if (command == "distill") != (saved.get("teacher") is not None):
        kind = "a distillation run" if saved.get("teacher") is not None else "a training run"
        other = "distill" if saved.get("teacher") is not None else "train"
        raise ResumeError(f"{out} holds {kind}: resume it with `trainer {other} --resume`")
    cfg = TrainConfig(**{**saved, **given, "out": out, "resume": True, "overwrite": False})
    old = TrainConfig(**{**saved, "out": out, "resume": True, "overwrite": False})
    differ = [
        f"--{k.replace('_', '-')} {getattr(old, k)} (the run's) vs {getattr(cfg, k)} (given)"
        for k in cfg.math_fields
        if k in given and getattr(cfg, k) != getattr(old, k)
    ]
    if differ:
        raise ResumeError(
            f"--resume: {'; '.join(differ)}: these change the math of the run in {out}; leave "
            f"them out to take the run's settings from {path}, or start a new run elsewhere"
        )
    return cfg


def check_out_beside_store(cfg: TrainConfig) -> None:
    """Refuse a run folder inside the store (or the store inside the run folder): run files
    would mix with the store's, and --overwrite would delete from it."""
    if "://" in cfg.shards:
        return
    out, store = cfg.out.resolve(), Path(cfg.shards).resolve()
    if out == store or store in out.parents or out in store.parents:
        raise TrainConfigError(
            f"--out {cfg.out} and the store {cfg.shards} overlap: run files would be written "
            f"among the store's; give an --out outside the store, e.g. runs/<name>"
        )


def previous_run(cfg: TrainConfig) -> dict[str, Any] | None:
    """The checkpoint to resume from, or None for a new run; refuses to overwrite a run
    unless told to (--overwrite), and then removes the old run's files first."""
    path = cfg.checkpoint_path
    if cfg.resume:
        if not path.is_file():
            raise ResumeError(
                f"--resume: {cfg.out} holds no {CHECKPOINT_FILE} to continue from (the run "
                f"stopped before its first checkpoint); start it again with --overwrite"
            )
        return read_training_checkpoint(path)
    found = [p for p in _run_files(cfg.out) if p.exists()]
    if found and not cfg.overwrite:
        raise ResumeError(
            f"{cfg.out} already holds a run ({', '.join(p.name for p in found)}); pass "
            f"--resume to continue it, --overwrite to delete it and start again, or choose "
            f"another --out"
        )
    discard_run(cfg.out)
    return None


def discard_run(out: Path) -> None:
    """Remove every file a run writes into `out` (--overwrite; a run that failed before its
    first step)."""
    for p in _run_files(out):
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def _run_files(out: Path) -> list[Path]:
    """What a run writes into its folder (all of it: --overwrite deletes these)."""
    names = (
        CHECKPOINT_FILE, CONFIG_FILE, SUMMARY_FILE, *RUN_LOG_FILES, TENSORBOARD_DIR,
        WANDB_DIR, BEST_FILE, BEST_INFO_FILE,
    )  # fmt: skip
    return [out / name for name in names]


def check_resumable(
    cfg: TrainConfig,
    previous: dict[str, Any],
    store_id: dict[str, Any],
    teacher_id: dict[str, Any] | None,
) -> None:
    old, new = previous["config"], cfg.to_dict()
    was = {k: TrainConfig.saved(old, k) for k in cfg.math_fields}
    differ = [f"{k} {was[k]!r} -> {new[k]!r}" for k in cfg.math_fields if was[k] != new[k]]
    if previous["store"]["meta_sha256"] != store_id["meta_sha256"]:
        differ.append(
            f"store {previous['store']['path']} -> {store_id['path']} (other data: "
            f"meta.json sha256 {previous['store']['meta_sha256'][:12]} vs "
            f"{store_id['meta_sha256'][:12]})"
        )
    old_teacher = previous.get("teacher")
    if (old_teacher is None) != (teacher_id is None) or (
        teacher_id is not None and old_teacher["sha256"] != teacher_id["sha256"]
    ):
        describe = lambda t: "none" if t is None else f"{t['path']} (sha256 {t['sha256'][:12]})"  # noqa: E731
        differ.append(f"teacher {describe(old_teacher)} -> {describe(teacher_id)}")
    if differ:
        raise ResumeError(
            f"cannot resume {cfg.checkpoint_path}: settings that change the math differ from "
            f"the run's: {'; '.join(differ)}. Resume with the run's settings (see "
            f"{cfg.out / CONFIG_FILE}) or start a new run in another --out."
        )
    if cfg.steps < previous["step"]:
        raise ResumeError(
            f"cannot resume {cfg.checkpoint_path}: it is at step {previous['step']}, past "
            f"--steps {cfg.steps}; give --steps >= {previous['step']}"
        )
