"""WebDatasetStream: training batches read sequentially from a store's WebDataset tars.

For stores on object storage, or wherever random reads are slow: each reader streams whole
tar shards (opened with fsspec, so local paths and s3://, gs://, ... URLs alike; `pipe:`
commands through webdataset), cuts slices from every episode, mixes them in a shuffle buffer and emits batches in
the SliceLoader layout (obs [H+1,B,O], action [H,B,A], reward [H,B,1], task [B]).

Splitting: every pass shuffles the shard list with (seed, pass), identically everywhere, then
hands shard i to reader i mod (world_size x num_workers), by `torch.distributed` rank and
DataLoader worker (webdataset's `pytorch_worker_info`): the readers cover disjoint shards.

Sampling: every episode yields `slices_per_episode` slices at uniform start rows, so slices
are uniform over episodes and start rows, up to the mixing of a finite shuffle buffer. Task
weights (see `datapipe.sample.task_probabilities`) scale the slices cut per episode of each
task. The stream is deterministic for a given seed and reader split; it does not resume
mid-pass (use SliceLoader for exact resume).

Which file: each tar is read whole into memory (~15 MB for an MT30 shard) and checked to be the
file the store's manifest names (size and sha256, `Store.check_bytes`) before any of its
episodes is used, so a swapped tar, or one copied from another build, raises naming the file.

Use with a DataLoader: `DataLoader(stream, batch_size=None, num_workers=n, pin_memory=True)`.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import tarfile
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import fsspec
import numpy as np
import torch
import webdataset as wds

from datapipe import format as fmt
from datapipe.errors import CorruptStoreError
from datapipe.loader import Batch
from datapipe.sample import task_probabilities
from datapipe.store import Store, open_store, repair_command

_SHARDS, _SLICES, _SHUFFLE = 11, 12, 13  # stream tags of the seeds


def _read_whole(url: str) -> bytes:
    opened = wds.gopen(url) if url.startswith("pipe:") else fsspec.open(url, "rb").open()
    with opened as stream:
        return stream.read()


def _damaged_member(blob: bytes) -> str | None:
    """Where the tar `blob` is damaged (its first member that does not decode), if it is."""
    name = "the tar header"
    try:
        with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
            for member in tar:
                name = f"sample {member.name.split('.', 1)[0]}, member {member.name}"
                payload = tar.extractfile(member).read() if member.isfile() else b""
                if member.name.endswith(".gz"):
                    gzip.decompress(payload)
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        return f"{name} does not decode ({type(e).__name__}: {e})"
    return None


def _open_each(store: Store, shards: list[tuple[str, str]]) -> Iterator[dict]:
    """{"url", "stream"} of each (url, store file) in turn, read whole as it is reached and
    checked against the store's manifest before anything of it is used."""
    for url, rel in shards:
        blob = _read_whole(url)
        try:
            store.check_bytes(rel, len(blob), hashlib.sha256(blob).hexdigest())
        except CorruptStoreError as e:
            damage = _damaged_member(blob)
            if damage is not None:
                raise CorruptStoreError(
                    f"{url}: {damage}. Rebuild the damaged shard from the source: "
                    f"`{repair_command(store.location)}`."
                ) from None
            if url == store.location.child(rel):
                raise
            raise CorruptStoreError(f"{url} (read as the store's {rel}): {e}") from None
        yield {"url": url, "stream": io.BytesIO(blob)}


class WebDatasetStream(torch.utils.data.IterableDataset):
    """An endless stream of `Batch`es (on CPU) from the WebDataset shards of a store.

    Args:
        path_or_store: the store: a path, an fsspec URL (s3://bucket/store) or an open Store.
        batch_size, horizon, seed, tasks, weights: as for SliceLoader.
        slices_per_episode: slices cut from each episode read (at full weight).
        shuffle_buffer: slices held for mixing (memory: ~(H+1) x 128 bytes each).
        shard_urls: where to read the tars from, in shard order (default: the store's own);
            e.g. a mirror, or [f"pipe:aws s3 cp s3://bucket/store/{f} -" for f in ...].
    """

    def __init__(
        self,
        path_or_store: str | Path | Store,
        batch_size: int = 256,
        horizon: int = 3,
        seed: int = 0,
        tasks: Iterable[int | str] | None = None,
        weights: str | Mapping[int | str, float] | None = None,
        slices_per_episode: int = 8,
        shuffle_buffer: int = 16384,
        shard_urls: Sequence[str] | None = None,
    ):
        super().__init__()
        store = path_or_store if isinstance(path_or_store, Store) else open_store(path_or_store)
        store.require_format("webdataset", "use datapipe.SliceLoader")
        T = store.episode_length
        if horizon < 1 or horizon + 1 > T:
            raise ValueError(
                f"horizon={horizon}: a slice needs horizon + 1 rows and this store's episodes "
                f"have {T}; use 1 <= horizon <= {T - 1}."
            )
        self.store, self.batch_size, self.horizon, self.seed = store, batch_size, horizon, seed
        self.shuffle_buffer = max(shuffle_buffer, batch_size)
        n_shards = fmt.n_shards(store.n_episodes)
        if shard_urls is None:
            shard_urls = [store.location.child(fmt.wds_shard_file(k)) for k in range(n_shards)]
        if len(shard_urls) != n_shards:
            raise ValueError(f"{len(shard_urls)} shard URLs for a store of {n_shards} shards")
        self.shard_urls = list(shard_urls)
        counts = [task["episodes"] for task in store.index["tasks"]]  # per task id
        probs = task_probabilities(counts, store.task_names, tasks, weights)
        share = np.asarray(counts, np.float64) / max(1, sum(counts))
        rate = np.divide(probs, share, out=np.zeros_like(probs), where=share > 0)
        self.slices_per_task = slices_per_episode * rate / rate.max()  # mean slices / episode

    def _my_shards(self, pass_: int) -> list[tuple[str, str]]:
        """(url, store file) of the shards this reader reads in pass `pass_`, in order."""
        rank, world, worker, workers = wds.utils.pytorch_worker_info()
        readers, me = world * workers, rank * workers + worker
        if len(self.shard_urls) < readers:
            raise ValueError(
                f"{len(self.shard_urls)} shards cannot feed {readers} readers "
                f"({world} ranks x {workers} workers); use fewer DataLoader workers."
            )
        order = np.random.default_rng((self.seed, _SHARDS, pass_)).permutation(len(self.shard_urls))
        return [(self.shard_urls[k], fmt.wds_shard_file(k)) for k in order[me::readers]]

    def _episodes(self, shards: list[tuple[str, str]]) -> Iterator[dict]:
        files = wds.tariterators.tar_file_expander(_open_each(self.store, shards))
        for sample in wds.tariterators.group_by_keys(files):
            where = f"{sample.get('__url__')}: sample {sample.get('__key__')}"
            try:
                task = fmt.wds_decode(fmt.WDS_MEMBERS["task"], sample[fmt.WDS_MEMBERS["task"]])[1]
                if not 0 <= task < len(self.slices_per_task):
                    raise ValueError(f"task id {task} out of range")
                if self.slices_per_task[task] == 0:
                    continue  # not sampled: skip decoding it
                ep = {
                    k: fmt.wds_decode(fmt.WDS_MEMBERS[k], sample[fmt.WDS_MEMBERS[k]])[1]
                    for k in ("obs", "action", "reward")
                }
                ep["task"] = task
            except (KeyError, ValueError, OSError, EOFError, zlib.error) as e:
                raise CorruptStoreError(
                    f"{where}: unreadable ({type(e).__name__}: {e}). Rebuild the damaged shard "
                    f"from the source: `{repair_command(self.store.location)}`."
                ) from e
            T, obs_dim = self.store.episode_length, self.store.obs_dim
            if ep["obs"].shape != (T, obs_dim) or ep["reward"].shape != (T,):
                raise CorruptStoreError(f"{where}: obs {ep['obs'].shape}, expected {(T, obs_dim)}")
            yield ep

    def _slices(self, rank_seed: tuple) -> Iterator[dict[str, np.ndarray]]:
        """The slices of each episode read, stacked: obs [n,H+1,O], action [n,H,A], reward
        [n,H], task [n]; pass after pass over this reader's shards."""
        T, H = self.store.episode_length, self.horizon
        rows = np.arange(H + 1)
        pass_ = 0
        while True:
            rng = np.random.default_rng((self.seed, _SLICES, pass_, *rank_seed))
            for ep in self._episodes(self._my_shards(pass_)):
                mean = self.slices_per_task[ep["task"]]
                n = int(mean) + int(rng.random() < mean - int(mean))
                idx = rng.integers(0, T - H, size=n)[:, None] + rows
                yield {
                    "obs": ep["obs"][idx],
                    "action": ep["action"][idx[:, 1:]],
                    "reward": ep["reward"][idx[:, 1:]],
                    "task": np.full(n, ep["task"], np.int64),
                }
            pass_ += 1

    def __iter__(self) -> Iterator[Batch]:
        rank, world, worker, workers = wds.utils.pytorch_worker_info()
        rank_seed = (rank, world, worker, workers)
        rng = np.random.default_rng((self.seed, _SHUFFLE, *rank_seed))
        S, B = self.shuffle_buffer, self.batch_size
        buf: dict[str, np.ndarray] = {}  # the shuffle buffer, S slices once full
        out: dict[str, np.ndarray] = {}  # the batch being filled
        held = filled = 0
        for new in self._slices(rank_seed):
            if not buf:
                buf = {k: np.empty((S, *v.shape[1:]), v.dtype) for k, v in new.items()}
                out = {k: np.empty((B, *v.shape[1:]), v.dtype) for k, v in new.items()}
            n = len(new["task"])
            take = min(n, S - held)  # filling the buffer
            for k, v in new.items():
                buf[k][held : held + take] = v[:take]
            held += take
            for j in range(take, n):  # buffer full: each new slice evicts a random one
                i = int(rng.integers(S))
                for k, v in new.items():
                    out[k][filled] = buf[k][i]
                    buf[k][i] = v[j]
                filled += 1
                if filled == B:
                    yield self._batch(out)
                    filled = 0

    @staticmethod
    def _batch(out: dict[str, np.ndarray]) -> Batch:
        """A new Batch (time-major) from the [B, ...] slices in `out`."""
        return Batch(
            obs=torch.from_numpy(out["obs"].transpose(1, 0, 2).copy()),
            action=torch.from_numpy(out["action"].transpose(1, 0, 2).copy()),
            reward=torch.from_numpy(out["reward"].T[..., None].copy()),
            task=torch.from_numpy(out["task"].copy()),
        )
