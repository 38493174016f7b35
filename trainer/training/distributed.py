"""Data-parallel training over the ranks torchrun starts: the process group, each rank's
seeded stream, the DistributedDataParallel wrapping of the student's update, and the
collectives the training loop needs (gathers for checkpoints, global-batch metrics, the
`--ddp-check` verification).

How one update runs on N ranks, each with its own batch of B slices, so that it computes what
one process would on the N*B slices side by side (up to float rounding):

- Gradients. Both backward passes of an update (the world-model loss, then the policy loss)
  start from a forward of `TDMPC2Agent.losses`, which `DataParallelUpdate` replaces by
  `DataParallelLosses`: one DistributedDataParallel per pass, holding exactly the parameters
  that pass trains. DDP averages each pass's gradients across ranks, and every loss is a mean
  over the batch, so the average is the gradient of the N*B batch. Parameters a pass does not
  train keep their gradient as it was (None), as in one process, so clipping and Adam see the
  same tensors.
- The task embedding's leftover policy gradient (docs/tdmpc2.md#exactness) is averaged in
  the policy pass, so it is the same on every rank, and the next model pass ends with
  leftover + the average new gradient, as in one process.
- Batch statistics. Two things in the update are not means over the batch: the running Q
  scale (P5/P95 of Q over the batch, docs/tdmpc2.md#running-scale) and the max-norm
  renormalisation of the task-embedding rows of the batch's tasks
  (docs/tdmpc2.md#task-embedding; it rewrites those rows in place). Both are taken over the
  global batch here (`GlobalRunningScale`, `GlobalRenorm`); per rank they would differ
  between ranks and the replicas would drift apart.
- Everything else (clipping, Adam, the target-Q update) is a function of the averaged
  gradients and of the parameters, so the replicas stay identical; `check_replicas` proves
  it after every step with --ddp-check.

Random draws (slices, policy noise, dropout, the Q pair) come from a per-rank stream seeded by
`stream_seed`: no two ranks draw the same stream, and a 1-rank run keeps the run's seed, so it
is today's single-process run exactly. Without torchrun (or with one rank) nothing here starts
a process group and `Ranks` answers every collective locally.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from trainer.errors import ReplicaMismatchError, TrainConfigError
from trainer.model.math import RunningScale
from trainer.model.world import WorldModel
from trainer.training.agent import TDMPC2Agent, UpdateLosses

T = TypeVar("T")


@dataclass(frozen=True)
class Ranks:
    """This process's place among the ranks of a run. A run started without torchrun (or
    with one process) is rank 0 of 1, and every collective below is then answered locally."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Ranks:
        """RANK, WORLD_SIZE and LOCAL_RANK as torchrun sets them; rank 0 of 1 without them."""
        env = os.environ if env is None else env
        try:
            ranks = cls(
                int(env.get("RANK", 0)),
                int(env.get("WORLD_SIZE", 1)),
                int(env.get("LOCAL_RANK", 0)),
            )
        except ValueError as e:
            raise TrainConfigError(
                f"RANK, WORLD_SIZE and LOCAL_RANK must be integers ({e}); start data-parallel "
                f"runs with `torchrun --nproc-per-node N -m trainer ...`"
            ) from e
        if not (ranks.world_size >= 1 and 0 <= ranks.rank < ranks.world_size):
            raise TrainConfigError(
                f"RANK={ranks.rank} does not fit WORLD_SIZE={ranks.world_size}; start "
                f"data-parallel runs with `torchrun --nproc-per-node N -m trainer ...`"
            )
        return ranks

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one rank that reads and writes the run folder."""
        return self.rank == 0

    def device(self, kind: str) -> torch.device:
        """The device of this rank: cuda:LOCAL_RANK for a data-parallel CUDA run."""
        if kind != "cuda" or not self.distributed:
            return torch.device(kind)
        if self.local_rank >= torch.cuda.device_count():
            raise TrainConfigError(
                f"LOCAL_RANK {self.local_rank}, but this node has {torch.cuda.device_count()} "
                f"CUDA device(s); start at most that many processes per node (--nproc-per-node)"
            )
        return torch.device("cuda", self.local_rank)

    # -- collectives (all ranks call them, in the same order) ---------------------------------

    def gather(self, obj: T) -> list[T]:
        """Every rank's `obj` (picklable), in rank order, on every rank."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def on_main(self, fn: Callable[[], T]) -> T:
        """fn() run on rank 0 only, its result (or the exception it raised) on every rank:
        the other ranks need not see rank 0's files, and all ranks fail alike."""
        if not self.distributed:
            return fn()
        box: list[Any] = [None]
        if self.is_main:
            try:
                box[0] = (True, fn())
            except Exception as e:
                box[0] = (False, e)
        dist.broadcast_object_list(box, src=0)
        ok, value = box[0]
        if not ok:
            raise value
        return value

    def cat(self, tensor: Tensor) -> Tensor:
        """The global batch of a per-rank tensor: every rank's, concatenated on dim 0 in rank
        order (the same shape on every rank)."""
        if not self.distributed:
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts)

    def mean(self, values: dict[str, Any], device: torch.device) -> dict[str, Any]:
        """Each value (a number or a 0-dim tensor) averaged over the ranks, as float64 device
        tensors. Logged losses are batch means, so this is the loss of the global batch;
        values that are equal on all ranks (gradient norms, the Q scale) come back unchanged."""
        if not self.distributed:
            return values
        packed = torch.stack(
            [
                torch.as_tensor(v, dtype=torch.float64, device=device).reshape(())
                for v in values.values()
            ]
        )
        dist.all_reduce(packed)
        return dict(zip(values, (packed / self.world_size).unbind(), strict=True))

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


@contextmanager
def process_group(
    ranks: Ranks, device: torch.device, timeout: timedelta | None = None
) -> Iterator[None]:
    """The default process group for a data-parallel run (gloo on CPU, nccl on CUDA), from
    torchrun's environment; destroyed on exit. Nothing for one rank, or when the caller has
    initialised one already (then it is the caller's to destroy). `timeout` bounds every
    collective, the barrier in which the other ranks wait while rank 0 evaluates included
    (torch's default for NCCL is 10 minutes: an MPPI evaluation outlasts it)."""
    if not ranks.distributed or dist.is_initialized():
        if dist.is_initialized() and dist.get_world_size() != ranks.world_size:
            raise TrainConfigError(
                f"the process group has {dist.get_world_size()} ranks but WORLD_SIZE is "
                f"{ranks.world_size}; start the run with torchrun and let train() set it up"
            )
        yield
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    kw = {} if timeout is None else {"timeout": timeout}
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", **kw)
    try:
        yield
    finally:
        dist.destroy_process_group()


def stream_seed(seed: int, rank: int, world_size: int, start: int = 0) -> int:
    """Seed of the stream (slices and update noise) of rank `rank` in a run of `world_size`
    ranks whose streams (re)started at step `start`.

    A 1-rank run from step 0 keeps `seed` itself, so it draws what a plain single-process run
    always drew. Any other (rank, world size, start) gets its own numpy SeedSequence child of
    `seed`: independent streams, none shared by two ranks, and a resume with another number
    of ranks starts fresh streams rather than replaying old ones. 32 bits, as np.random.seed
    takes.
    """
    if world_size == 1 and start == 0:
        return seed
    sequence = np.random.SeedSequence(seed, spawn_key=(world_size, rank, start))
    return int(sequence.generate_state(1)[0])


# -- the data-parallel update ------------------------------------------------------------------


class GlobalRunningScale(RunningScale):
    """RunningScale whose P5/P95 are taken over the global batch (all ranks' Q values), so S
    is the same on every rank and equals one process's on the whole batch."""

    def __init__(self, tau: float, ranks: Ranks) -> None:
        super().__init__(tau)
        self.ranks = ranks

    def update(self, x: Tensor) -> None:
        super().update(self.ranks.cat(x.detach()))


class GlobalRenorm:
    """Max-norm renormalisation of task-embedding rows over the global batch's tasks.

    nn.Embedding(max_norm=1) rescales, in place, the rows of the tasks it looks up
    (docs/tdmpc2.md#task-embedding): per rank that would touch different rows on different
    ranks. Here each embedding's own renormalisation is switched off and, before every
    lookup, the rows of all ranks' tasks of the current batch (`set_batch`) are renormalised
    instead: the rows one process would rescale on the whole batch, with the same call.
    """

    def __init__(self, embeddings: list[nn.Embedding]) -> None:
        self.tasks: Tensor | None = None
        for embedding in embeddings:
            max_norm, norm_type = embedding.max_norm, embedding.norm_type
            if max_norm is None:
                continue
            embedding.max_norm = None
            embedding.register_forward_pre_hook(self._hook(max_norm, norm_type))

    def set_batch(self, tasks: Tensor) -> None:
        """The task ids of the global batch of the coming update."""
        self.tasks = tasks.contiguous()

    def _hook(self, max_norm: float, norm_type: float) -> Callable:
        def renorm(module: nn.Embedding, args: tuple) -> None:
            if self.tasks is None:
                raise RuntimeError("GlobalRenorm: set_batch() before the update's lookups")
            tasks = self.tasks.to(module.weight.device)
            with torch.no_grad():
                torch.embedding_renorm_(module.weight.detach(), tasks, max_norm, norm_type)

        return renorm


class _Pass(nn.Module):
    """One backward pass of the update for DDP: its forward is that pass's loss, its
    parameters exactly those the loss trains (so every one gets a gradient on every rank, and
    DDP averages nothing else). The world model itself is not a child: the pass only borrows
    the networks it trains."""

    def __init__(self, losses: UpdateLosses, kind: str, trained: dict[str, nn.Module]) -> None:
        super().__init__()
        self.__dict__["losses"] = losses
        self.kind = kind
        for name, module in trained.items():
            self.add_module(name, module)

    def forward(self, *args: Any) -> Any:
        return self.losses(self.kind, *args)


class DataParallelLosses(nn.Module):
    """`UpdateLosses` with each backward pass under its own DistributedDataParallel.

    The model pass trains the task embedding, encoder, dynamics, reward head and Q ensemble;
    the policy pass trains pi and the task embedding (docs/tdmpc2.md#update). Giving each pass
    only its own parameters means every parameter DDP holds is used, so DDP needs no search
    for unused parameters and reduces no zeros; the parameters a pass does not train keep
    their gradients as they are, exactly as in one process (pi's None in the model pass; in
    the policy pass the rest are None after the model step, and the Q ensemble is used
    detached). DDP broadcasts rank 0's parameters once, at construction.
    """

    def __init__(self, model: WorldModel) -> None:
        super().__init__()
        losses = UpdateLosses(model)
        shared = {"task_emb": model._task_emb}
        model_pass = {
            "encoder": model._encoder,
            "dynamics": model._dynamics,
            "reward": model._reward,
            "Qs": model._Qs,
        }
        self.passes = nn.ModuleDict(
            {
                "model": DistributedDataParallel(_Pass(losses, "model", shared | model_pass)),
                "pi": DistributedDataParallel(_Pass(losses, "pi", shared | {"pi": model._pi})),
            }
        )

    def forward(self, kind: str, *args: Any) -> Any:
        return self.passes[kind](*args)


class DataParallelUpdate:
    """`agent.update` on one rank of a data-parallel run (see the module docstring).

    Swaps in the DDP-wrapped losses, the global-batch Q scale and the global-batch embedding
    renormalisation. Build it after the agent's state is loaded; call it like agent.update.
    """

    def __init__(self, agent: TDMPC2Agent, teacher: WorldModel | None, ranks: Ranks) -> None:
        self.agent, self.ranks = agent, ranks
        agent.losses = DataParallelLosses(agent.model)
        scale = GlobalRunningScale(agent.cfg.tau, ranks).to(agent.device)
        scale.load_state_dict(agent.scale.state_dict())
        agent.scale = scale
        embeddings = [agent.model._task_emb] + ([] if teacher is None else [teacher._task_emb])
        self.renorm = GlobalRenorm(embeddings)

    def __call__(
        self, obs: Tensor, action: Tensor, reward: Tensor, task: Tensor, *args: Any, **kw: Any
    ) -> dict[str, float]:
        self.renorm.set_batch(self.ranks.cat(task.to(self.agent.device, torch.long)))
        return self.agent.update(obs, action, reward, task, *args, **kw)


# -- verification --------------------------------------------------------------------------------


def digest(obj: Any) -> str:
    """sha256 over the bytes of every tensor in a (nested) state, and the repr of the rest."""
    h = hashlib.sha256()
    _feed(h, obj)
    return h.hexdigest()


def _feed(h: Any, obj: Any) -> None:
    if isinstance(obj, Tensor):
        t = obj.detach().cpu().contiguous().reshape(-1)
        h.update(f"{t.dtype}{tuple(obj.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, dict):
        for key, value in obj.items():
            h.update(repr(key).encode())
            _feed(h, value)
    elif isinstance(obj, list | tuple):
        for value in obj:
            _feed(h, value)
    else:
        h.update(repr(obj).encode())


def check_replicas(agent: TDMPC2Agent, batch: tuple[Tensor, ...], step: int, ranks: Ranks) -> None:
    """After update `step`: every rank holds the same model, optimiser states, Q scale and
    leftover gradient, and no two ranks trained on the same batch. Raises
    ReplicaMismatchError naming the ranks otherwise (on every rank)."""
    mine = (digest(agent.state_dict()), digest(list(batch)))
    states, batches = zip(*ranks.gather(mine), strict=True)
    differ = [r for r, s in enumerate(states) if s != states[0]]
    if differ:
        raise ReplicaMismatchError(
            f"--ddp-check: after step {step} the model/optimiser state of rank(s) {differ} "
            f"differs from rank 0's: the replicas diverged. This is a bug in the data-parallel "
            f"update (trainer/training/distributed.py); please report it with the command line"
        )
    seen: dict[str, int] = {}
    for r, b in enumerate(batches):
        if b in seen:
            raise ReplicaMismatchError(
                f"--ddp-check: at step {step} ranks {seen[b]} and {r} trained on the same "
                f"batch: their data streams are not independent (see stream_seed in "
                f"trainer/training/distributed.py)"
            )
        seen[b] = r


@dataclass(frozen=True)
class Stream:
    """Where one rank's random draws come from (see `rank_stream`)."""

    seed: int  # of the rank's loader, and of its update noise when `reseed`
    loader: dict[str, Any] | None  # loader state to continue, or None: a fresh stream
    rng: dict[str, Any] | None  # generator states to continue
    reseed: bool  # seed torch/numpy/python with `seed` before the first update
    notice: str | None = None  # what rank 0 says about it


def rank_stream(
    seed: int, checkpoint: Path, ranks: Ranks, previous: dict[str, Any] | None
) -> Stream:
    """This rank's data and update-noise stream.

    A new run: `stream_seed(seed, rank, world size)`, which for a single rank is the run's
    seed and its generators as model init left them (so one process draws what it always
    did). A resume with the checkpoint's number of ranks: each rank continues its own saved
    stream exactly. A resume with another number of ranks: the model, optimisers and step
    continue, and every rank starts a fresh stream derived from (seed, rank, world size,
    step), which no earlier stream of the run shares.
    """
    if previous is None:
        seed = stream_seed(seed, ranks.rank, ranks.world_size)
        return Stream(seed, None, None, reseed=ranks.distributed)
    saved = [{"loader": previous["loader"], "rng": previous["rng"]}, *previous["other_ranks"]]
    if len(saved) == ranks.world_size:
        mine = saved[ranks.rank]
        return Stream(mine["loader"]["seed"], mine["loader"], mine["rng"], reseed=False)
    step = previous["step"]
    notice = (
        f"{checkpoint}: written by {len(saved)} rank(s), resumed by "
        f"{ranks.world_size}: model, optimisers and step {step} continue; each rank's data "
        f"stream is re-derived from (seed {seed}, rank, {ranks.world_size} ranks, step "
        f"{step}), so the batches differ from those of an uninterrupted run"
    )
    seed = stream_seed(seed, ranks.rank, ranks.world_size, step)
    return Stream(seed, None, None, reseed=True, notice=notice)
