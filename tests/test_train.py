"""Tests for trainer.training.train: the training loop, distillation, exact resume and bad input."""

from __future__ import annotations

import json
import math
import os
import shutil
import stat
import sys
from pathlib import Path

import pytest
import torch
from conftest import build_store, make_source

from datapipe.errors import IncompleteStoreError, StoreNotFoundError
from tools.make_teacher import make_teacher
from trainer.errors import (
    DivergedError,
    IncompatibleDataError,
    ResumeError,
    TrainConfigError,
)
from trainer.model.checkpoint import (
    CheckpointError,
    export,
    load_checkpoint,
    read_checkpoint,
    save_atomic,
)
from trainer.training.agent import TDMPC2Agent
from trainer.training.runlog import UPDATE_METRICS, read_evals, read_metrics
from trainer.training.runstate import read_training_checkpoint
from trainer.training.train import TrainConfig, train

LOSSES = (*UPDATE_METRICS, "distill_loss", "reward_mae_teacher", "d_coef")


def config(store: Path, out: Path, **kw) -> TrainConfig:
    base = dict(
        shards=store,
        out=out,
        steps=6,
        batch_size=8,
        device="cpu",
        log_every=1,
        save_every=3,
        progress=False,
    )
    return TrainConfig(**{**base, **kw})


def losses(run: Path) -> list[dict]:
    """Logged rows without the timing columns."""
    return [{k: v for k, v in row.items() if k in ("step", *LOSSES)} for row in read_metrics(run)]


def interrupt_at_update_5(store: Path, out: Path, kw: dict, monkeypatch) -> None:
    """Run `config(store, out, **kw)` and stop it with KeyboardInterrupt inside update 5."""
    update, calls = TDMPC2Agent.update, []

    def interrupted(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return update(self, *args, **kwargs)

    monkeypatch.setattr(TDMPC2Agent, "update", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(config(store, out, **kw))
    monkeypatch.setattr(TDMPC2Agent, "update", update)


def weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return read_training_checkpoint(checkpoint)["agent"]["model"]


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        if isinstance(wa[key], torch.Tensor):
            assert torch.equal(wa[key], wb[key]), key


# -- the loop -----------------------------------------------------------------------------------


def test_train_writes_run_folder(store, tmp_path):
    ckpt = train(config(store, tmp_path / "run", steps=4, log_every=2, save_every=2))
    saved = read_training_checkpoint(ckpt)
    assert saved["step"] == 4 and saved["teacher"] is None
    assert saved["config"]["device"] == "cpu" and saved["config"]["steps"] == 4
    assert saved["store"]["format_version"] == 1 and len(saved["store"]["meta_sha256"]) == 64
    rows = read_metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [2, 4]
    assert set(UPDATE_METRICS) | {"steps_per_s", "data_wait"} <= set(rows[0])
    header = (tmp_path / "run" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert header[0] == "step" and "reward_mae_teacher" in header
    config_json = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config_json["config"]["batch_size"] == 8
    assert config_json["model_config"]["episode_lengths"] == [500] * 30
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 4 and 0 <= summary["data_wait"] < 1
    assert summary["peak_rss_bytes"] > 0 and summary["peak_vram_bytes"] is None
    assert summary["world_size"] == 1 and summary["global_batch_size"] == 8
    assert saved["world_size"] == 1 and saved["other_ranks"] == []
    assert b"\r" not in (tmp_path / "run" / "metrics.csv").read_bytes()


def test_run_files_get_the_mode_the_umask_gives(store, tmp_path):
    """Readable by the group and others under the usual umask 022, like the official
    code's files (a temporary file's 0600 must not leak into the checkpoint)."""
    old = os.umask(0o022)
    try:
        ckpt = train(config(store, tmp_path / "run", steps=1))
        export(ckpt, tmp_path / "model.pt")
    finally:
        os.umask(old)
    for path in (ckpt, tmp_path / "run" / "config.json", tmp_path / "model.pt"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path


def test_reward_loss_falls(store, tmp_path):
    train(config(store, tmp_path / "run", steps=40, batch_size=32, log_every=1, save_every=40))
    reward = [row["reward_loss"] for row in read_metrics(tmp_path / "run")]
    # The zero-initialised head starts uniform: ln(101) per step, weighted by rho^t over H=3.
    assert reward[0] == pytest.approx(math.log(101) * (1 + 0.5 + 0.25) / 3, rel=1e-4)
    assert max(reward[-5:]) < 0.5 * reward[0], reward


def test_distill_with_zero_coef_equals_plain_training(store, teacher, tmp_path):
    plain = train(config(store, tmp_path / "plain", steps=4))
    distilled = train(config(store, tmp_path / "distill", steps=4, teacher=teacher, d_coef=0.0))
    rows_plain, rows_distill = losses(tmp_path / "plain"), losses(tmp_path / "distill")
    for a, b in zip(rows_plain, rows_distill, strict=True):
        assert {k: b[k] for k in a} == a
        assert "distill_loss" in b and b["reward_mae_teacher"] > 0
    assert_same_weights(plain, distilled)


def test_distillation_changes_the_student(store, teacher, tmp_path):
    train(config(store, tmp_path / "plain", steps=2))
    train(config(store, tmp_path / "distill", steps=2, teacher=teacher, d_coef=0.4))
    rows_plain, rows_distill = losses(tmp_path / "plain"), losses(tmp_path / "distill")
    assert rows_plain[0]["reward_loss"] == rows_distill[0]["reward_loss"]  # same first batch
    assert rows_plain[1]["reward_loss"] != rows_distill[1]["reward_loss"]  # other weights
    assert rows_distill[0]["d_coef"] == 0.4


def test_linear_schedule(store, teacher, tmp_path):
    train(
        config(
            store,
            tmp_path / "run",
            steps=4,
            teacher=teacher,
            d_coef=0.4,
            d_schedule="linear",
            distill="all",
        )
    )
    assert [r["d_coef"] for r in read_metrics(tmp_path / "run")] == pytest.approx(
        [0.4, 0.3, 0.2, 0.1]
    )


def test_store_at_a_url(store, tmp_path, s3_bucket):
    """--shards takes an fsspec URL as given (a Path would fold s3://b into s3:/b)."""
    import fsspec

    url = f"{s3_bucket}/store"
    fsspec.filesystem("s3").put(str(store), url.removeprefix("s3://"), recursive=True)
    assert config(url, tmp_path).shards == url
    assert config(store, tmp_path).shards == str(store)
    saved = read_training_checkpoint(train(config(url, tmp_path / "run", steps=2)))
    assert saved["store"]["path"] == url
    local = read_training_checkpoint(train(config(store, tmp_path / "local", steps=2)))
    assert saved["store"]["meta_sha256"] == local["store"]["meta_sha256"]
    assert local["store"]["path"] == str(store.resolve())
    assert_same_weights(tmp_path / "run" / "checkpoint.pt", tmp_path / "local" / "checkpoint.pt")


# -- resume ---------------------------------------------------------------------------------------


def test_resume_reproduces_the_uninterrupted_run(store, teacher, tmp_path, monkeypatch):
    kw = dict(steps=6, save_every=3, teacher=teacher, d_coef=0.4)
    whole = train(config(store, tmp_path / "whole", **kw))

    # Interrupt the second run during update 5: the checkpoint is at step 3, the logs at 4.
    interrupt_at_update_5(store, tmp_path / "split", kw, monkeypatch)
    assert read_training_checkpoint(tmp_path / "split" / "checkpoint.pt")["step"] == 3
    assert [r["step"] for r in read_metrics(tmp_path / "split")] == [1, 2, 3, 4]
    split = train(config(store, tmp_path / "split", resume=True, **kw))
    assert losses(tmp_path / "split") == losses(tmp_path / "whole")
    assert_same_weights(whole, split)
    a, b = read_training_checkpoint(whole), read_training_checkpoint(split)
    assert a["loader"] == b["loader"]
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])
    assert torch.equal(a["agent"]["scale"]["value"], b["agent"]["scale"]["value"])


def test_checkpoint_from_before_data_parallel_training_resumes(store, tmp_path):
    ckpt = train(config(store, tmp_path / "run", steps=2))
    old = torch.load(ckpt, weights_only=True)
    for key in ("world_size", "other_ranks", "global_batch_size"):
        del old[key]
    save_atomic(old, ckpt)
    train(config(store, tmp_path / "run", steps=3, resume=True))
    assert read_training_checkpoint(ckpt)["step"] == 3


def test_uniform_sampler_run_resumes_exactly_and_older_runs_resume(store, tmp_path):
    kw = dict(steps=4, save_every=2, sampler="uniform")
    whole = train(config(store, tmp_path / "whole", **kw))
    train(config(store, tmp_path / "split", **{**kw, "steps": 2}))
    split = train(config(store, tmp_path / "split", resume=True, **kw))
    assert losses(tmp_path / "split") == losses(tmp_path / "whole")
    assert_same_weights(whole, split)
    # a run saved before the sampler settings existed resumes with their defaults
    ckpt = train(config(store, tmp_path / "old", steps=2))
    old = torch.load(ckpt, weights_only=True)
    for key in ("sampler", "refill_size", "refill_every"):
        del old["config"][key]
    del old["loader"]["sampler"]
    save_atomic(old, ckpt)
    saved = json.loads((tmp_path / "old" / "config.json").read_text())
    for key in ("sampler", "refill_size", "refill_every"):
        del saved["config"][key]
    (tmp_path / "old" / "config.json").write_text(json.dumps(saved))
    train(config(store, tmp_path / "old", steps=3, resume=True))
    assert read_training_checkpoint(ckpt)["step"] == 3


def test_resume_refuses_other_math(store, teacher, tmp_path):
    train(config(store, tmp_path / "run", steps=2))
    with pytest.raises(ResumeError, match="pass --resume"):
        train(config(store, tmp_path / "run", steps=4))
    with pytest.raises(ResumeError, match=r"batch_size 8 -> 16.*seed 1 -> 2"):
        train(config(store, tmp_path / "run", steps=4, resume=True, batch_size=16, seed=2))
    with pytest.raises(ResumeError, match=r"teacher none -> .*t1\.pt"):
        train(config(store, tmp_path / "run", steps=4, resume=True, teacher=teacher))
    with pytest.raises(ResumeError, match=r"no checkpoint\.pt"):
        train(config(store, tmp_path / "empty", resume=True))
    train(config(store, tmp_path / "run", steps=3, resume=True, log_every=5))  # not math: fine
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ResumeError, match="cannot be read as a training checkpoint"):
        train(config(store, tmp_path / "bad", resume=True))
    assert read_training_checkpoint(tmp_path / "run" / "checkpoint.pt")["step"] == 3


# -- bad input ------------------------------------------------------------------------------------


def test_wrong_size_teacher_lists_keys_and_fitting_sizes(store, teacher, tmp_path):
    with pytest.raises(CheckpointError) as err:
        train(config(store, tmp_path / "run", teacher=teacher, teacher_size=5, d_coef=0.4))
    message = str(err.value)
    assert "does not fit a 5M model" in message and "It fits: 1M" in message
    assert "_task_emb.weight: file (30, 96) vs model (30, 64)" in message

    state = read_checkpoint(teacher)
    state["_dynamics.1.weight"] = torch.zeros(384, 100)
    del state["_pi.0.bias"]
    broken = tmp_path / "broken.pt"
    save_atomic({"model": state}, broken)
    with pytest.raises(CheckpointError) as err:
        train(config(store, tmp_path / "run2", teacher=broken, d_coef=0.4))
    message = str(err.value)
    assert "matches no model size" in message and "Closest is 1M" in message
    assert "_dynamics.1.weight: file (384, 100) vs model (384, 384)" in message
    assert "missing _pi.0.bias (384,)" in message


def test_init_of_another_size_names_the_size_it_fits(store, tmp_path):
    student = make_teacher(5, tmp_path / "s5.pt", seed=0)
    with pytest.raises(CheckpointError) as err:
        train(config(store, tmp_path / "run", init=student))
    message = str(err.value)
    assert "does not fit this 1M model" in message and "_task_emb.weight" in message
    assert "pass --model-size 5" in message


def test_teacher_with_an_untrained_reward_head_is_refused(store, tmp_path):
    untrained = make_teacher(1, tmp_path / "fresh.pt", seed=0)  # reward head zeros, as TD-MPC2's
    with pytest.raises(
        IncompatibleDataError, match=r"fresh\.pt: its reward head was never trained"
    ):
        train(config(store, tmp_path / "run", teacher=untrained, d_coef=0.4))
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_store_of_another_task_set_is_refused(teacher, tmp_path):
    mt80 = build_store(
        make_source(tmp_path / "src80", task_set="mt80", episodes_per_task=1, chunks=1),
        tmp_path / "s80",
        formats=("zarr",),
    )
    for kw in ({"teacher": teacher, "d_coef": 0.4}, {"init": teacher}):
        with pytest.raises(IncompatibleDataError) as err:
            train(config(mt80, tmp_path / "run", **kw))
        message = str(err.value)
        assert "n_tasks 30 vs 80" in message and "obs_dim 24 vs 39" in message
        assert "task set mt80" in message
    # Without a teacher or --init the student is built for the store: it trains.
    train(config(mt80, tmp_path / "ok", steps=2, save_every=2))
    saved = read_training_checkpoint(tmp_path / "ok" / "checkpoint.pt")
    assert (
        saved["model_config"]["obs_dim"] == 39 and len(saved["model_config"]["action_dims"]) == 80
    )
    assert saved["model_config"]["episode_lengths"][0] == 100


def test_missing_or_incomplete_store_points_at_datapipe_build(store, tmp_path):
    with pytest.raises(StoreNotFoundError, match="datapipe build"):
        train(config(tmp_path / "nowhere", tmp_path / "run"))
    unfinished = tmp_path / "unfinished"
    shutil.copytree(store, unfinished)
    (unfinished / "meta.json").unlink()
    (unfinished / "_build").mkdir(exist_ok=True)
    command = f"datapipe build --src SRC --dst {unfinished}"
    (unfinished / "_build" / "plan.json").write_text(json.dumps({"command": command}))
    with pytest.raises(IncompleteStoreError, match="datapipe build"):
        train(config(unfinished, tmp_path / "run"))


def test_nan_loss_stops_with_step_and_last_checkpoint(store, tmp_path, monkeypatch):
    update, calls = TDMPC2Agent.update, []

    def poisoned(self, *args, **kwargs):
        info = update(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 5:
            info["value_loss"] = float("nan")
        return info

    monkeypatch.setattr(TDMPC2Agent, "update", poisoned)
    with pytest.raises(DivergedError) as err:
        train(config(store, tmp_path / "run", steps=10, save_every=2))
    message = str(err.value)
    ckpt = tmp_path / "run" / "checkpoint.pt"
    assert "step 5" in message and "value_loss=nan" in message
    assert f"{ckpt} (step 4)" in message
    assert read_training_checkpoint(ckpt)["step"] == 4
    assert read_metrics(tmp_path / "run")[-1]["value_loss"] == "nan"


def test_nan_between_log_steps_is_named_by_its_own_step(store, tmp_path, monkeypatch):
    """Metrics are read at log, eval and save steps only; a non-finite loss in between is
    still named by its own step, and no checkpoint is written after it."""
    update, calls = TDMPC2Agent.update, []

    def poisoned(self, *args, **kwargs):
        info = update(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 5:
            info["reward_loss"] = info["reward_loss"] * float("inf")
        return info

    monkeypatch.setattr(TDMPC2Agent, "update", poisoned)
    with pytest.raises(DivergedError, match=r"step 5 \(reward_loss=inf\)"):
        train(config(store, tmp_path / "run", steps=10, log_every=3, save_every=2))
    assert read_training_checkpoint(tmp_path / "run" / "checkpoint.pt")["step"] == 4
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [3, 5]


def test_a_step_reads_no_device_value_outside_log_steps(store, tmp_path, monkeypatch):
    """Counts reads of tensor values (item, tolist, float, int, bool) made by our code: per
    10-step log window a few, not one per step (each would stop a GPU's queue)."""
    import sys

    reads = []
    for name in ("item", "tolist", "__float__", "__int__", "__bool__"):
        real = getattr(torch.Tensor, name)

        def counted(self, *a, _real=real, **k):
            caller = sys._getframe(1).f_code.co_filename
            if "/trainer/" in caller or "/datapipe/" in caller:
                reads.append(caller)
            return _real(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)
    counts = []
    for steps in (10, 30):
        reads.clear()
        train(config(store, tmp_path / f"r{steps}", steps=steps, log_every=10, save_every=10))
        counts.append(len(reads))
    per_window = (counts[1] - counts[0]) / 2
    assert per_window < 10, (counts, sorted(set(reads)))


@pytest.mark.parametrize("cache_gb", [float("nan"), float("inf"), 1e-6])
def test_a_pool_budget_that_cannot_work_is_refused(store, tmp_path, cache_gb):
    with pytest.raises(TrainConfigError, match="cache_gb"):
        train(config(store, tmp_path / "run", cache_gb=cache_gb))


def test_a_file_for_the_store_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(StoreNotFoundError, match="a file, not a store"):
        train(config(tmp_path / "notes.txt", tmp_path / "run"))


def test_two_runs_into_one_folder_the_second_is_refused(store, tmp_path):
    """While a process writes a run folder (holds its lock), another `trainer train`
    into it stops at once naming that process; the lock goes when the process ends."""
    from conftest import lock_held_elsewhere

    out = tmp_path / "run"
    lock = f"only_writer({str(out)!r}, 'a test', RuntimeError)"
    with lock_held_elsewhere(lock) as pid:
        with pytest.raises(ResumeError, match=rf"another `trainer train/distill` \(pid {pid}\)"):
            train(config(store, out, steps=1))
        assert not (out / "config.json").exists()
    train(config(store, out, steps=1))  # the holder is gone: its lock with it


def test_settings_are_checked(store, teacher, tmp_path):
    with pytest.raises(TrainConfigError, match="d_coef > 0 needs a teacher"):
        config(store, tmp_path, d_coef=0.4)
    with pytest.raises(TrainConfigError, match="batch_size must be >= 1"):
        config(store, tmp_path, batch_size=0)
    for kw in ({"amp": True}, {"teacher": teacher, "teacher_dtype": "bfloat16"}):  # --compile runs
        with pytest.raises(TrainConfigError, match="only on CUDA, and this run is on the CPU"):
            train(config(store, tmp_path / "run", **kw))


def test_tensorboard_missing_says_how_to_install(store, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(TrainConfigError, match=r"pip install -e '.*\[train\]'"):
        train(config(store, tmp_path / "run", tensorboard=True))


def test_tensorboard_events(store, tmp_path):
    pytest.importorskip("tensorboard")
    train(config(store, tmp_path / "run", steps=2, tensorboard=True))
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))


# -- make_teacher ---------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [1, 5])
def test_make_teacher_random_init(tmp_path, size):
    path = make_teacher(size, tmp_path / f"t{size}.pt", seed=0)
    assert set(torch.load(path, weights_only=True)) == {"model"}
    assert load_checkpoint(path).cfg.model_size == size
    again = make_teacher(size, tmp_path / "again.pt", seed=0)
    a, b = read_checkpoint(path), read_checkpoint(again)
    assert all(torch.equal(a[k], b[k]) for k in a if isinstance(a[k], torch.Tensor))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_amp_compile_bf16_teacher(store, teacher, tmp_path):
    train(
        config(
            store,
            tmp_path / "run",
            device="cuda",
            steps=3,
            teacher=teacher,
            d_coef=0.4,
            teacher_dtype="bfloat16",
            amp=True,
            compile=True,
        )
    )
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["peak_vram_bytes"] > 0


EVAL = dict(eval_every=3, eval_tasks="cartpole-balance,pendulum-swingup", eval_episodes=2)


def test_eval_during_training_rows_best_model_and_summary(store, teacher, tmp_path):
    from trainer.model.checkpoint import load_checkpoint as load_official
    from trainer.training.runlog import read_evals

    run = tmp_path / "run"
    train(config(store, run, steps=7, teacher=teacher, d_coef=0.4, **EVAL))
    rows = read_evals(run)
    assert [r["step"] for r in rows] == [0, 3, 6, 7]  # step 0, every 3, the last step
    for r in rows:
        assert set(r["returns"]) == {"cartpole-balance", "pendulum-swingup"}
        assert all(len(v) == 2 for v in r["returns"].values())
        scores = [sum(v) / len(v) / 10 for v in r["returns"].values()]
        assert r["normalized_score"] == pytest.approx(sum(scores) / 2)
    csv_lines = (run / "evals.csv").read_text().splitlines()
    assert csv_lines[0] == "step,normalized_score,wall_s,cartpole-balance,pendulum-swingup"
    assert [int(line.split(",")[0]) for line in csv_lines[1:]] == [0, 3, 6, 7]
    best = max(rows, key=lambda r: r["normalized_score"])  # first of equal scores wins
    info = json.loads((run / "best.json").read_text())
    assert info["step"] == best["step"] and info["normalized_score"] == best["normalized_score"]
    assert load_official(run / "best.pt", size=1).cfg.model_size == 1
    summary = json.loads((run / "summary.json").read_text())
    assert summary["final_eval"] == rows[-1]
    assert summary["final_losses"]["total_loss"] == read_metrics(run)[-1]["total_loss"]
    assert "distill_loss" in summary["final_losses"] and 0 < summary["eval_share"] < 1


def test_eval_during_training_leaves_training_unchanged(store, tmp_path):
    plain = train(config(store, tmp_path / "plain", steps=4))
    evaluated = train(config(store, tmp_path / "eval", steps=4, **EVAL))
    assert losses(tmp_path / "plain") == losses(tmp_path / "eval")
    assert_same_weights(plain, evaluated)


def test_resume_keeps_eval_rows_and_best(store, tmp_path, monkeypatch):
    from trainer.training.runlog import read_evals

    kw = dict(steps=6, save_every=3, **EVAL)
    train(config(store, tmp_path / "whole", **kw))
    interrupt_at_update_5(store, tmp_path / "split", kw, monkeypatch)
    train(config(store, tmp_path / "split", resume=True, **kw))
    strip = lambda rows: [{k: v for k, v in r.items() if k != "wall_s"} for r in rows]  # noqa: E731
    assert strip(read_evals(tmp_path / "split")) == strip(read_evals(tmp_path / "whole"))
    best = [json.loads((tmp_path / r / "best.json").read_text()) for r in ("whole", "split")]
    assert best[0] == best[1]


def test_eval_settings_are_checked(store, tmp_path):
    with pytest.raises(TrainConfigError, match="eval_tasks: unknown task"):
        config(store, tmp_path, eval_every=2, eval_tasks="walker-fly")
    with pytest.raises(TrainConfigError, match="eval_every must be >= 0"):
        config(store, tmp_path, eval_every=-1)


def wandb_history(run: Path) -> list[dict[str, float]]:
    """The history rows of the offline W&B run under `run`, read from its .wandb file
    (leveldb-log records of wandb's protobuf Record; wandb ships no reader for it)."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = run.glob("wandb/offline-run-*/run-*.wandb")
    data, pos, block, records, part = path.read_bytes(), 7, 32768, [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:
            break
        part += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            records.append(part)
            part = b""
    rows = []
    for raw in records:
        record = pb.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json)
                     for i in record.history.item}  # fmt: skip
            rows.append({k: v for k, v in items.items() if not k.startswith("_") or k == "_step"})
    return rows


def test_wandb_offline_gets_the_csv_names(store, tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="the wandb extra is not installed")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "run"
    kw = dict(steps=4, log_every=2, wandb="mt30-test", eval_every=4)
    train(config(store, run, eval_tasks="cartpole-balance", eval_episodes=1, **kw))
    rows = wandb_history(run)
    logged = [r for r in rows if "reward_loss" in r]
    assert [r["_step"] for r in logged] == [2, 4]
    csv_rows = read_metrics(run)
    for mine, theirs in zip(logged, csv_rows, strict=True):  # (W&B merges a step's logs)
        assert {k for k in mine if not k.startswith("eval/")} - {"_step"} == set(theirs) - {"step"}
        assert all(mine[k] == pytest.approx(theirs[k]) for k in theirs if k != "step")
    scores = [r["eval/normalized_score"] for r in rows if "eval/normalized_score" in r]
    assert scores == [pytest.approx(e["normalized_score"]) for e in read_evals(run)]
    assert len((run / "wandb-id.txt").read_text().strip()) == 8


def test_cuda_rng_is_saved_and_restored_for_the_runs_own_gpu(monkeypatch):
    """A run on cuda:1 saves that GPU's generator only, and restores it with fewer GPUs
    visible; a state saved with every GPU's (before) restores the run's own entry."""
    from trainer.training.runstate import rng_state, set_rng_state

    calls = []
    own = torch.tensor([1, 2, 3], dtype=torch.uint8)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: own)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, device: calls.append((s, device)))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    state = rng_state(torch.device("cuda:1"))
    assert state["cuda"] is own
    set_rng_state(state, torch.device("cuda:0"))  # one GPU visible now, as cuda:0
    assert calls[-1][0] is own and calls[-1][1] == torch.device("cuda:0")
    every = [torch.tensor([k], dtype=torch.uint8) for k in range(4)]
    set_rng_state({**state, "cuda": every}, torch.device("cuda:2"))
    assert calls[-1][0] is every[2]
    set_rng_state({**state, "cuda": every[:1]}, torch.device("cuda"))
    assert calls[-1][0] is every[0]


def test_a_batch_that_does_not_fit_in_memory_is_a_message_and_keeps_nothing(store, tmp_path):
    """Out of memory before the first step: the batch size named, the folder left as it was,
    so the same command with a smaller batch runs without --overwrite."""
    out = tmp_path / "run"
    with pytest.raises(TrainConfigError, match=r"--batch-size 2000000000: cpu ran out of memory"):
        train(config(store, out, steps=1, batch_size=2_000_000_000))
    assert sorted(p.name for p in out.iterdir()) == []
    train(config(store, out, steps=1))
