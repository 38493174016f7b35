"""Tests for trainer.training.distributed: data-parallel training on 2 CPU ranks (gloo).

- The averaged update equals one process's update on the concatenated batch (2 ranks x B/2
  against 1 x B, the update's random draws made deterministic), replicas stay identical.
- `torchrun --nproc-per-node 2 -m trainer distill` end to end: --ddp-check verifies after
  every step that the ranks' states are identical and their batches different; only rank 0
  writes; an exact resume with 2 ranks and a resume with 1 rank; an error on rank 0 stops
  every rank.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import shutil
import socket
import subprocess
import sys
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.distributed as dist
from conftest import build_store, make_source

from tools.make_teacher import make_teacher
from trainer.errors import ReplicaMismatchError, TrainConfigError
from trainer.model.presets import ModelConfig
from trainer.model.world import WorldModel
from trainer.training.agent import TDMPC2Agent, prepare_teacher
from trainer.training.distributed import DataParallelUpdate, Ranks, check_replicas, stream_seed
from trainer.training.runlog import read_metrics
from trainer.training.runstate import read_training_checkpoint
from trainer.training.train import TrainConfig, train

B, H, STEPS = 16, 3, 3
ROOT = Path(__file__).resolve().parents[1]


# -- 2 ranks x B/2 == 1 x B ---------------------------------------------------------------------


@contextmanager
def deterministic_noise():
    """Policy noise of zero (the mean action): with dropout off, the only random draw left
    is randperm of the Q pair, which every process then draws alike from the same seed."""
    with mock.patch("torch.randn_like", lambda t, **kw: torch.zeros_like(t)):
        yield


def equivalence_setup() -> tuple[TDMPC2Agent, WorldModel, list[tuple[torch.Tensor, ...]]]:
    """A 1M student without dropout, a teacher with a reward signal, STEPS batches of B. The
    two batch statistics are made to matter: half the task-embedding rows are scaled past
    max_norm=1 (the updates renormalise them), and the Q heads spread Q beyond 1 (so the
    running scale moves)."""
    cfg = dataclasses.replace(ModelConfig.for_size(1), dropout=0.0)
    torch.manual_seed(0)
    agent = TDMPC2Agent(cfg, "cpu")
    teacher = WorldModel(cfg)
    with torch.no_grad():
        teacher._reward[-1].weight.normal_(0, 0.5)
        agent.model._Qs.params.get_submodule("2").weight.normal_(0, 2.0)
        for model in (agent.model, teacher):
            model._task_emb.weight[::2] *= 40
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(STEPS):
        obs = torch.randn(H + 1, B, 24, generator=g)
        action = torch.rand(H, B, 6, generator=g) * 2 - 1
        reward = 1 + torch.tanh(obs[:-1, :, :1] + action[..., :1])
        task = torch.randint(0, 30, (B,), generator=g)
        batches.append((obs, action, reward, task))
    torch.manual_seed(5)
    return agent, prepare_teacher(teacher), batches


def record_gradients(agent: TDMPC2Agent) -> list[dict[str, torch.Tensor]]:
    """The gradients every optimiser step of `agent` applies (after clipping), in order."""
    names = {p: n for n, p in agent.model.named_parameters()}
    steps: list[dict[str, torch.Tensor]] = []

    def record(optimizer, args, kwargs) -> None:
        params = (p for g in optimizer.param_groups for p in g["params"])
        steps.append({names[p]: p.grad.clone() for p in params if p.grad is not None})

    for optimizer in (agent.optim, agent.pi_optim):
        optimizer.register_step_pre_hook(record)
    return steps


def equivalence_rank(rank: int, world: int, init_file: str, out: str) -> None:
    """One rank of the equivalence test (run in a spawned process): its 1/world of every batch."""
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=60),  # a lost peer fails the test instead of hanging it
    )
    try:
        with deterministic_noise():
            agent, teacher, batches = equivalence_setup()
            update = DataParallelUpdate(agent, teacher, Ranks(rank, world, rank))
            grads = record_gradients(agent)
            part = slice(rank * B // world, (rank + 1) * B // world)
            for obs, action, reward, task in batches:
                update(obs[:, part], action[:, part], reward[:, part], task[part], teacher, 0.4)
        torch.save({"state": agent.state_dict(), "grads": grads}, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def flat(state: dict, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor of a nested state, by path."""
    out = {}
    for key, value in state.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out |= flat(value, name + ".")
        elif isinstance(value, list):
            out |= flat(dict(enumerate(value)), name + ".")
        elif isinstance(value, torch.Tensor):
            out[name] = value
    return out


def test_two_ranks_on_half_batches_equal_one_process_on_the_whole(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    procs = [
        ctx.Process(target=equivalence_rank, args=(r, 2, str(tmp_path / "pg"), str(tmp_path)))
        for r in range(2)
    ]
    try:
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=120)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
    assert [p.exitcode for p in procs] == [0, 0]

    with deterministic_noise():
        agent, teacher, batches = equivalence_setup()
        grads = record_gradients(agent)
        for batch in batches:
            agent.update(*batch, teacher, 0.4)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]

    # The gradient of every optimiser step (model, pi, model, ...; the model steps carry the
    # leftover pi gradient of the embedding): the same tensors, equal up to float rounding.
    assert len(ranks[0]["grads"]) == len(grads) == 2 * STEPS
    for step, (mine, theirs) in enumerate(zip(grads, ranks[0]["grads"], strict=True)):
        assert mine.keys() == theirs.keys(), step
        for name, g in mine.items():
            error = (theirs[name] - g).norm() / g.norm().clamp_min(1e-30)
            # float32 sums over half batches, then the all-reduce: 1.8e-5 seen on a 2-core VM
            assert error < 1e-4, (step, name, error.item())

    # The states: replicas bit for bit; against one process, differences far below one Adam
    # step (lr 3e-4), which is all that rounding amplified by Adam can account for.
    single, rank0, rank1 = (
        flat(s) for s in (agent.state_dict(), ranks[0]["state"], ranks[1]["state"])
    )
    assert single.keys() == rank0.keys() == rank1.keys()
    for name in single:
        assert torch.equal(rank0[name], rank1[name]), name
        if name != "task_emb_grad":
            # a third of one Adam step; 3.5e-5 seen on a 2-core VM (float rounding of the sums)
            torch.testing.assert_close(rank0[name], single[name], rtol=1e-5, atol=1e-4, msg=name)
    # The embedding's leftover policy gradient is a gradient, not a state: compare it by
    # relative norm. Its per-row terms nearly cancel, so merely reordering the batch rows in
    # one process moves it by up to 2e-4 here; skipping the rank average would move it by ~1.
    g = single["task_emb_grad"]
    assert (rank0["task_emb_grad"] - g).norm() / g.norm() < 1e-3
    # The batch statistics took part: rows were renormalised, the scale moved.
    renormalised = (rank0["model._task_emb.weight"].norm(dim=1) - 1).abs() < 0.01
    assert renormalised.sum() >= 5
    assert rank0["scale.value"].item() > 1.01


def test_ranks_from_torchrun_environment():
    assert Ranks.from_env({}) == Ranks(0, 1, 0) and not Ranks.from_env({}).distributed
    ranks = Ranks.from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert ranks == Ranks(3, 4, 1) and ranks.distributed and not ranks.is_main
    assert ranks.device("cpu") == torch.device("cpu")
    for env in ({"RANK": "2", "WORLD_SIZE": "2"}, {"WORLD_SIZE": "two"}):
        with pytest.raises(TrainConfigError, match="torchrun --nproc-per-node"):
            Ranks.from_env(env)


def test_stream_seeds():
    assert stream_seed(7, 0, 1) == 7  # a 1-rank run keeps the run's seed
    seeds = {stream_seed(7, r, n, s) for n in (2, 4) for r in range(n) for s in (0, 100)}
    assert len(seeds) == 12 and 7 not in seeds
    assert stream_seed(7, 1, 2, 100) == stream_seed(7, 1, 2, 100)


def test_check_replicas_names_diverged_ranks_and_shared_batches(monkeypatch):
    """What --ddp-check reports, with the other ranks' digests faked."""
    torch.manual_seed(0)
    agent = TDMPC2Agent(ModelConfig.for_size(1), "cpu")
    batch = (torch.zeros(2), torch.ones(2))
    monkeypatch.setattr(
        "trainer.training.distributed.digest",
        lambda obj: "state" if isinstance(obj, dict) else "batch",
    )
    for others, message in (
        ([("other state", "batch 1")], r"state of rank\(s\) \[1\] differs"),
        ([("state", "batch 1"), ("state", "batch 1")], "ranks 1 and 2 trained on the same batch"),
        ([("state", "batch")], "ranks 0 and 1 trained on the same batch"),
    ):
        monkeypatch.setattr(Ranks, "gather", lambda self, obj, o=others: [obj, *o])
        with pytest.raises(ReplicaMismatchError, match=message):
            check_replicas(agent, batch, 4, Ranks(0, 1 + len(others), 0))
    monkeypatch.setattr(Ranks, "gather", lambda self, obj: [obj, ("state", "batch 1")])
    check_replicas(agent, batch, 4, Ranks(0, 2, 0))  # the same state, other batches: fine


# -- torchrun end to end ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run_inputs(tmp_path_factory) -> tuple[Path, Path]:
    """A store (30 tasks x 2 episodes, Zarr) and a random-init 1M teacher for it."""
    root = tmp_path_factory.mktemp("ddp")
    store = build_store(
        make_source(root / "src", episodes_per_task=2, chunks=1), root / "s", formats=("zarr",)
    )
    return store, make_teacher(1, root / "teacher.pt", seed=7, shards=store, nonzero_reward=True)


def distill_args(store: Path, teacher: Path, out: Path, *args: str) -> list[str]:
    """`-m trainer distill` on 4 slices per rank, as every torchrun test here starts it."""
    return [
        "-m", "trainer", "distill", "--shards", str(store), "--teacher", str(teacher),
        "--out", str(out), "--batch-size", "4", "--device", "cpu", "--log-every", "1",
        "--save-every", "3", "--threads", "1", "--no-progress", *args,
    ]  # fmt: skip


def torchrun(
    nproc: int, store: Path, teacher: Path, out: Path, *args: str, ok: bool = True
) -> subprocess.CompletedProcess:
    """`torchrun --nproc-per-node nproc -m trainer distill` on 4 slices per rank."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
        str(nproc), *distill_args(store, teacher, out, *args),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert (result.returncode == 0) == ok, result.stdout + result.stderr
    return result


@pytest.fixture(scope="module")
def whole_run(run_inputs, tmp_path_factory) -> tuple[Path, str]:
    """A 2-rank distillation run of 6 steps with --ddp-check; its folder and output."""
    out = tmp_path_factory.mktemp("whole") / "run"
    return out, torchrun(2, *run_inputs, out, "--steps", "6", "--ddp-check").stdout


@pytest.fixture(scope="module")
def run_at_step_3(run_inputs, tmp_path_factory) -> Path:
    """The same run stopped after step 3 (its checkpoint)."""
    out = tmp_path_factory.mktemp("split") / "run"
    torchrun(2, *run_inputs, out, "--steps", "3")
    return out


def losses(run: Path) -> list[dict]:
    return [{k: r[k] for k in ("step", "total_loss", "pi_loss")} for r in read_metrics(run)]


def test_torchrun_ranks_stay_identical_draw_apart_and_rank_0_writes(whole_run):
    run, output = whole_run
    # --ddp-check ran after every step: identical replicas, different batches on the 2 ranks.
    summary = json.loads((run / "summary.json").read_text())
    assert summary["ddp_check"] == {"steps": 6, "ranks": 2, "passed": True}
    assert summary["world_size"] == 2 and summary["global_batch_size"] == 8
    assert len(summary["peak_rss_bytes_per_rank"]) == 2
    assert json.loads((run / "config.json").read_text())["global_batch_size"] == 8
    assert output.count("batch 4 per rank x 2 ranks = global batch 8") == 1  # rank 0 speaks
    # Rank 0 alone writes: one metrics row per step, the checkpoint holds both ranks' streams.
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3, 4, 5, 6]
    saved = read_training_checkpoint(run / "checkpoint.pt")
    assert saved["world_size"] == 2 and len(saved["other_ranks"]) == 1
    seeds = [saved["loader"]["seed"], saved["other_ranks"][0]["loader"]["seed"]]
    assert seeds == [stream_seed(1, 0, 2), stream_seed(1, 1, 2)]


def test_torchrun_resume_on_two_ranks_is_exact(run_inputs, whole_run, run_at_step_3, tmp_path):
    split = shutil.copytree(run_at_step_3, tmp_path / "run")
    torchrun(2, *run_inputs, split, "--steps", "6", "--resume")
    whole = read_training_checkpoint(whole_run[0] / "checkpoint.pt")
    resumed = read_training_checkpoint(split / "checkpoint.pt")
    a, b = flat(whole["agent"]), flat(resumed["agent"])
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert resumed["other_ranks"][0]["loader"] == whole["other_ranks"][0]["loader"]
    assert losses(split) == losses(whole_run[0])


def test_resume_of_a_two_rank_run_on_one_rank(run_inputs, run_at_step_3, tmp_path, capsys):
    store, teacher = run_inputs
    run = shutil.copytree(run_at_step_3, tmp_path / "run")
    config = TrainConfig(
        shards=store, out=run, steps=6, batch_size=4, device="cpu", log_every=1,
        save_every=3, progress=False, teacher=teacher, d_coef=0.4, resume=True,
    )  # fmt: skip
    train(config)
    assert "written by 2 rank(s), resumed by 1" in capsys.readouterr().out
    saved = read_training_checkpoint(run / "checkpoint.pt")
    assert saved["step"] == 6 and saved["world_size"] == 1 and saved["other_ranks"] == []
    # A fresh stream from (seed, rank 0, 1 rank, step 3), 3 batches into it.
    assert saved["loader"]["seed"] == stream_seed(1, 0, 1, 3) and saved["loader"]["step"] == 3
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3, 4, 5, 6]
    assert losses(run)[:3] == losses(run_at_step_3)


def test_torchrun_error_on_rank_0_stops_every_rank(run_inputs, whole_run):
    """Rank 0 alone reads the run folder; its refusal reaches the other rank (no hang)."""
    result = torchrun(2, *run_inputs, whole_run[0], "--steps", "8", ok=False)
    assert "already holds a run" in result.stderr and "pass --resume" in result.stderr


def test_two_nodes_of_one_rank_train_as_one_node_of_two(run_inputs, whole_run, tmp_path):
    """The README's multi-node form: a torchrun launcher per node with --nnodes 2 and a static
    rendezvous at node 0. Ranks 0 and 1 are the same ranks as in the one-node run, so the
    result is that run's, bit for bit."""
    store, teacher = run_inputs
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    out = tmp_path / "run"
    common = [
        "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port", port,
        *distill_args(store, teacher, out, "--steps", "6"),
    ]  # fmt: skip
    launch = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank"]
    nodes = [
        subprocess.Popen(
            [*launch, str(node), *common],
            cwd=ROOT,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for node in (0, 1)
    ]
    outputs = [p.communicate(timeout=300)[0] for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], "\n".join(outputs)
    assert "x 2 ranks = global batch 8" in outputs[0]
    whole = flat(read_training_checkpoint(whole_run[0] / "checkpoint.pt")["agent"])
    nodes_run = flat(read_training_checkpoint(out / "checkpoint.pt")["agent"])
    assert whole.keys() == nodes_run.keys()
    assert all(torch.equal(whole[k], nodes_run[k]) for k in whole)
    assert losses(out) == losses(whole_run[0])


def test_the_process_group_waits_as_long_as_an_evaluation(monkeypatch):
    """Rank 0 evaluates while the others wait in a barrier: the group's timeout (NCCL's
    default is 10 minutes) fits the run's evaluation protocol."""
    from datetime import timedelta

    import torch.distributed as dist

    from trainer.training.distributed import process_group
    from trainer.training.traineval import EvalProtocol

    seen = []
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda *a, **k: seen.append(k))
    monkeypatch.setattr(dist, "destroy_process_group", lambda: None)
    mppi = EvalProtocol(tuple(f"t{i}" for i in range(30)), 10, True, 1)
    with process_group(Ranks(0, 2, 0), torch.device("cpu"), mppi.wait()):
        pass
    assert seen[-1]["timeout"] == timedelta(seconds=600 + 450 * 300)  # 30 tasks x 10 MPPI
    assert EvalProtocol(("a",), 4, False, 1).wait() == timedelta(seconds=620)
    with process_group(Ranks(0, 2, 0), torch.device("cpu")):
        pass
    assert "timeout" not in seen[-1]
