"""SliceLoader: TD-MPC2 training batches from a store, in bounded RAM, at training speed.

Owns the episode pool, its background refill and the batch hand-off to the device.

- Pool: `cache_gb` of decoded episodes, in groups of `refill_size` slots. G groups are live;
  two spare groups are being refilled by a worker process (`datapipe.refill`: whole-episode
  reads through `ShardReader`, crc32c-checked). Every `refill_every` batches the oldest live
  group retires and the next refilled one goes live, at a fixed step, so the stream does not
  depend on timing (the loader waits for a late group rather than serve another).
  Which episodes enter, and which (slot, start row) each batch draws, come from
  `datapipe.sample` as a function of the seed and a counter: same seed, same batches.
- Batch: numpy `take` from the pool straight into the batch's buffers, in the official layout
  (docs/mt30.md#slices): obs [H+1,B,O], action [H,B,A], reward [H,B,1], task [B] long,
  from rows obs[s:s+H+1], action[s+1:s+H+1], reward[s+1:s+H+1], task of the episode. Row 0's
  NaN action/reward therefore never enter a batch.
- Device: on CPU every batch is gathered straight into new tensors (no pinning, nothing
  shared between batches). On CUDA it is gathered into preallocated pinned host buffers (a
  ring of 2) and copied with non_blocking=True on a side stream, one batch ahead, so the copy
  of batch k+1 overlaps the step on batch k; the caller's stream waits on the copy.

Memory: the pool (`cache_gb`, shared with the worker), plus a constant (the worker process,
buffers, open shard files and their indexes), plus ~24 bytes per store episode of metadata.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from datapipe.refill import Pool, Refiller, fill_slots
from datapipe.sample import Admissions, SliceDraws, UniformDraws, task_probabilities
from datapipe.shardreader import ShardReader
from datapipe.store import Store, open_store

_STATE_VERSION = 1
_SPARE = 2  # groups being read while the live ones serve batches (two: the reader never idles)


@dataclass
class Batch:
    """One training batch in the official TD-MPC2 layout (time-major)."""

    obs: torch.Tensor  # [H+1, B, obs_dim] float32
    action: torch.Tensor  # [H, B, action_dim] float32
    reward: torch.Tensor  # [H, B, 1] float32
    task: torch.Tensor  # [B] int64

    def __iter__(self) -> Iterator[torch.Tensor]:
        """`obs, action, reward, task = batch`, as the official `Buffer.sample` returns."""
        return iter((self.obs, self.action, self.reward, self.task))

    def to(self, device: str | torch.device, non_blocking: bool = False) -> Batch:
        return Batch(*(t.to(device, non_blocking=non_blocking) for t in self))

    def pin_memory(self) -> Batch:
        """Called by a DataLoader with pin_memory=True."""
        return Batch(*(t.pin_memory() for t in self))


class SliceLoader:
    """An endless iterable of `Batch`es of `batch_size` slices of `horizon` steps.

    Args:
        path_or_store: a store path or an open `Store`.
        batch_size, horizon: B and H of the batch layout.
        device: where batches land ("cpu", "cuda", "cuda:1", a torch.device).
        seed: the whole stream is a function of the seed (and of the arguments below).
        tasks: restrict sampling to these tasks (names or ids); default all.
        weights: None (uniform over all valid slices, as the official sampler), "balanced"
            (equal share per task) or a mapping task -> weight.
        cache_gb: RAM for the episode pool, in GB of decoded episodes.
        refill_size: episodes per refill (one pool group).
        refill_every: batches between refills: the pool admits refill_size / refill_every
            new episodes per batch (more: fresher batches; fewer: less reading).
        workers: refill processes (forked); 0 refills in a thread of this process.
        sampler: "pool" (the default: slices from the RAM pool, which turns over) or
            "uniform" (no pool: every slice's episode drawn from the whole store and read
            for its batch, as the official sampler draws; slower, for checking the pool).
    """

    def __init__(
        self,
        path_or_store: str | Path | Store,
        batch_size: int = 256,
        horizon: int = 3,
        device: str | torch.device = "cpu",
        seed: int = 0,
        tasks: Iterable[int | str] | None = None,
        weights: str | Mapping[int | str, float] | None = None,
        cache_gb: float = 1.0,
        refill_size: int = 64,
        refill_every: int = 16,
        workers: int = 1,
        sampler: str = "pool",
    ):
        store = path_or_store if isinstance(path_or_store, Store) else open_store(path_or_store)
        self.store = store
        T = store.episode_length
        if horizon < 1 or horizon + 1 > T:
            raise ValueError(
                f"horizon={horizon}: a slice needs horizon + 1 rows and this store's episodes "
                f"have {T}; use 1 <= horizon <= {T - 1}."
            )
        if min(batch_size, refill_size, refill_every) < 1 or workers < 0:
            raise ValueError("batch_size, refill_size, refill_every must be >= 1, workers >= 0")
        self.batch_size, self.horizon, self.seed = batch_size, horizon, int(seed)
        self.device = torch.device(device)
        self.refill_size, self.refill_every, self.workers = refill_size, refill_every, workers
        by_task = [store.episodes_of_task(t) for t in range(len(store.task_names))]
        probs = task_probabilities([len(e) for e in by_task], store.task_names, tasks, weights)
        self.task_probs = probs
        if sampler not in ("pool", "uniform"):
            raise ValueError(f"sampler={sampler!r}: use 'pool' or 'uniform'")
        self.sampler = sampler
        self._uniform = None
        if sampler == "uniform":
            self._uniform = UniformDraws(by_task, probs, T - horizon, batch_size, self.seed)
        self._admissions = Admissions(by_task, probs, refill_size, self.seed)
        n_selected = sum(len(e) for e, p in zip(by_task, probs, strict=True) if p > 0)
        episode_bytes = T * (store.obs_dim + store.action_dim + 1) * 4 + 8
        groups = int(cache_gb * 1e9 // (episode_bytes * refill_size))
        if groups < _SPARE + 1 and sampler == "pool":
            need = (_SPARE + 1) * refill_size * episode_bytes / 1e9
            raise ValueError(
                f"cache_gb={cache_gb} holds fewer than {_SPARE + 1} groups of refill_size="
                f"{refill_size} episodes; use cache_gb >= {need:.3f} or a smaller refill_size."
            )
        self.live_groups = min(groups - _SPARE, math.ceil(n_selected / refill_size))
        n_slots = (self.live_groups + _SPARE) * refill_size
        if sampler == "uniform":  # no pool: the slots hold one batch's episodes, read for it
            self.live_groups, n_slots = 0, batch_size
        self._pool = Pool(n_slots, T, store.obs_dim, store.action_dim)
        self._flat = {
            k: v.reshape(n_slots * T, -1) for k, v in self._pool.arrays.items() if k != "task"
        }
        self._episode_tasks = store.episode_tasks
        n_live = self.live_groups * refill_size
        self._draws = SliceDraws(self.seed, n_live, T - horizon, batch_size)
        self._cuda = self.device.type == "cuda"
        self._out = [self._buffers(pinned=True) for _ in range(2)] if self._cuda else []
        self._refiller: Refiller | None = None
        self._reader: ShardReader | None = None  # the uniform sampler's
        self._step = 0  # batches handed to the caller
        self._epoch = -1  # the pool serves batches of this refill epoch
        self._admitted: dict[int, dict] = {}  # block -> admissions state before it
        self._resume_admissions: dict | None = None
        self._pending: tuple[int, Batch, object] | None = None
        if self._cuda:
            self._stream = torch.cuda.Stream(device=self.device)
            self._copied = [None, None]  # per pinned set: event of its last copy

    # -- pool -------------------------------------------------------------------------------

    @property
    def pool_episodes(self) -> int:
        """Episodes live in the pool (the draw of a batch is uniform over them); 0 for the
        uniform sampler, which has no pool."""
        return self.live_groups * self.refill_size

    @property
    def pool_bytes(self) -> int:
        """Bytes held by the pool (live and refilling groups): at most cache_gb * 1e9."""
        return self._pool.nbytes

    def _group(self, block: int) -> int:
        return block % (self.live_groups + _SPARE)

    def _start(self, step: int) -> None:
        """(Re)start the refill workers so that the pool serves batch `step` next."""
        self.close()
        epoch = step // self.refill_every
        if self._admissions.block_index != epoch:
            state = self._resume_admissions
            if state is None or state["block"] != epoch:  # replay the admissions up to epoch
                self._admissions.load_state_dict({"block": 0, "taken": [0] * len(self.task_probs)})
                while self._admissions.block_index < epoch:
                    self._admissions.next_block()
            else:
                self._admissions.load_state_dict(state)
        self._admitted = {}
        self._refiller = Refiller(self.store, self._pool, self._episode_tasks, self.workers)
        self._epoch = epoch
        for block in range(epoch, epoch + self.live_groups + _SPARE):
            self._submit(block)
        for block in range(epoch, epoch + self.live_groups):
            self._refiller.wait(block)

    def _submit(self, block: int) -> None:
        """Draw block `block` of admissions and have the refill workers read it."""
        assert self._admissions.block_index == block
        self._admitted[block] = self._admissions.state_dict()  # for state_dict()
        first = self._group(block) * self.refill_size
        self._refiller.submit(block, first, self._admissions.next_block())

    def _enter_epoch(self, epoch: int) -> None:
        """Retire block epoch-1, make block epoch+G-1 live, queue block epoch+G+1."""
        last = epoch + self.live_groups - 1
        self._refiller.wait(last)
        self._epoch = epoch
        self._admitted.pop(epoch - 1, None)
        self._submit(epoch + self.live_groups + _SPARE - 1)

    # -- batches ----------------------------------------------------------------------------

    def _buffers(self, pinned: bool) -> dict[str, torch.Tensor]:
        H, B = self.horizon, self.batch_size
        shapes = {
            "obs": ((H + 1, B, self.store.obs_dim), torch.float32),
            "action": ((H, B, self.store.action_dim), torch.float32),
            "reward": ((H, B, 1), torch.float32),
            "task": ((B,), torch.int64),
        }
        return {k: torch.empty(s, dtype=d, pin_memory=pinned) for k, (s, d) in shapes.items()}

    def _gather(self, step: int, out: dict[str, torch.Tensor]) -> None:
        """Batch `step` into the CPU buffers `out`."""
        if self._uniform is not None:
            return self._gather_uniform(step, out)
        if self._refiller is None:
            self._start(step)
        epoch = step // self.refill_every
        if epoch != self._epoch:
            assert epoch == self._epoch + 1
            self._enter_epoch(epoch)
        R = self.refill_size
        n_live = self.live_groups * R
        slots, starts = self._draws.draw(step)
        self._take((slots + self._group(epoch) * R) % (n_live + _SPARE * R), starts, out)

    def _gather_uniform(self, step: int, out: dict[str, torch.Tensor]) -> None:
        """Batch `step` of the uniform sampler: its slices' episodes read into the pool's
        first slots, then gathered as from the pool."""
        if self._reader is None:
            self._reader = ShardReader(self.store)
        episodes, starts = self._uniform.draw(step)
        unique, slots = np.unique(episodes, return_inverse=True)
        fill_slots(self._reader, self._pool, self._episode_tasks, 0, unique)
        self._take(slots, starts, out)

    def _take(self, slots: np.ndarray, starts: np.ndarray, out: dict[str, torch.Tensor]) -> None:
        """Gather the slices (pool slot, start row) into the batch buffers `out`."""
        T, H = self.store.episode_length, self.horizon
        rows = slots * T + starts  # flat row of each slice's first row
        steps = np.arange(H + 1)[:, None]
        np.take(self._flat["obs"], rows + steps, axis=0, out=out["obs"].numpy())
        np.take(self._flat["action"], rows + steps[1:], axis=0, out=out["action"].numpy())
        np.take(self._flat["reward"], rows + steps[1:], axis=0, out=out["reward"].numpy())
        np.take(self._pool.arrays["task"], slots, out=out["task"].numpy())

    def __iter__(self) -> SliceLoader:
        return self

    def __next__(self) -> Batch:
        if not self._cuda:
            out = self._buffers(pinned=False)  # new tensors: a batch stays valid when kept
            self._gather(self._step, out)
            self._step += 1
            return Batch(**out)
        if self._pending is None or self._pending[0] != self._step:
            self._pending = self._issue(self._step)
        step, batch, event = self._pending
        self._pending = self._issue(step + 1)  # copy of k+1 overlaps the step on k
        stream = torch.cuda.current_stream(self.device)
        stream.wait_event(event)
        for t in batch:
            t.record_stream(stream)
        self._step = step + 1
        return batch

    def _issue(self, step: int) -> tuple[int, Batch, object]:
        """Gather batch `step` into a pinned set and start its copy on the side stream."""
        i = step % 2
        if self._copied[i] is not None:
            self._copied[i].synchronize()  # the set's previous copy is done: safe to overwrite
        host = self._out[i]
        self._gather(step, host)
        with torch.cuda.stream(self._stream):
            dev = {k: v.to(self.device, non_blocking=True) for k, v in host.items()}
            event = torch.cuda.Event()
            event.record(self._stream)
        self._copied[i] = event
        return step, Batch(**dev), event

    # -- state ------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Where the stream is: `load_state_dict` on a loader with the same arguments resumes it."""
        block = self._step // self.refill_every
        admissions = self._admitted.get(block, self._resume_admissions)
        if admissions is None or admissions["block"] != block:
            admissions = None  # not at hand: a resume replays the admissions (a few seconds)
        return {
            "version": _STATE_VERSION,
            "seed": self.seed,
            "step": self._step,
            "batch_size": self.batch_size,
            "horizon": self.horizon,
            "refill_size": self.refill_size,
            "refill_every": self.refill_every,
            "sampler": self.sampler,
            "pool_episodes": self.pool_episodes,
            "task_probs": self.task_probs.tolist(),
            "admissions": admissions,
        }

    def load_state_dict(self, state: Mapping) -> None:
        mine = self.state_dict()
        keys = ("version", "seed", "batch_size", "horizon", "refill_size", "refill_every")
        for key in (*keys, "sampler"):
            if state.get(key, "pool" if key == "sampler" else None) != mine[key]:
                raise ValueError(
                    f"loader state has {key}={state.get(key)!r}, this loader {mine[key]!r}: "
                    f"resume with the same loader arguments."
                )
        if state["pool_episodes"] != mine["pool_episodes"] or not np.allclose(
            state["task_probs"], mine["task_probs"]
        ):
            raise ValueError("loader state has another pool size or task weights: resume with "
                             "the same cache_gb, tasks and weights.")  # fmt: skip
        self.close()
        self._step = int(state["step"])
        self._resume_admissions = state.get("admissions")
        self._pending = None

    def close(self) -> None:
        """Stop the refill workers (a later batch starts them again)."""
        if self._refiller is not None:
            self._refiller.close()
            self._refiller = None
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    def __enter__(self) -> SliceLoader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_refiller", None) is not None:
            self.close()
