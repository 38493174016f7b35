"""WebDatasetStream: layout and semantics, sampling, splitting across ranks and DataLoader
workers, determinism and bad input, on the labelled store from conftest."""

from __future__ import annotations

import json
import shutil
import tarfile

import numpy as np
import pytest
import torch
from conftest import chi2_pvalue

import datapipe
from datapipe import format as fmt
from datapipe.shardreader import ShardReader

H = 3


def _take(stream, n):
    it = iter(stream)
    return [next(it) for _ in range(n)]


def _labels(batches):
    """(episode, start) of every slice, checking each against the labelled store's layout."""
    episodes, starts = [], []
    for obs, action, reward, _ in batches:
        e, s = obs[0, :, 0].numpy().astype(int), obs[0, :, 1].numpy().astype(int)
        k = np.arange(H + 1)[:, None]
        assert not torch.isnan(obs).any() and not torch.isnan(action).any()
        np.testing.assert_array_equal(obs[:, :, 0].numpy(), np.broadcast_to(e, obs.shape[:2]))
        np.testing.assert_array_equal(obs[:, :, 1].numpy(), s + k)
        np.testing.assert_array_equal(action[:, :, 0].numpy(), s + k[1:])
        np.testing.assert_array_equal(reward[:, :, 0].numpy(), 1000 * e + s + k[1:])
        episodes.append(e)
        starts.append(s)
    return np.concatenate(episodes), np.concatenate(starts)


def test_layout_semantics_and_uniform_slices(labelled_store):
    store = datapipe.open_store(labelled_store)
    stream = datapipe.WebDatasetStream(
        store, batch_size=50, slices_per_episode=4, shuffle_buffer=64
    )
    batches = _take(stream, 72)  # 3600 slices: three passes of 300 episodes x 4 slices
    obs, action, reward, task = batches[0]
    assert (
        obs.shape == (H + 1, 50, 24) and action.shape == (H, 50, 6) and reward.shape == (H, 50, 1)
    )
    assert task.dtype == torch.int64
    episodes, starts = _labels(batches)
    np.testing.assert_array_equal(
        torch.cat([b.task for b in batches]), store.episode_tasks[episodes]
    )
    counts = np.bincount(episodes, minlength=300)
    assert counts.min() >= 4 * 3 - 64 // 4 and counts.max() <= 4 * 3 + 64 // 4
    assert (np.abs(counts - 12) <= 4).mean() > 0.9  # all but the buffer's few: exactly 12
    n_starts = store.episode_length - H
    assert chi2_pvalue(np.bincount(starts, minlength=n_starts), np.full(n_starts, len(starts) / n_starts)) > 1e-3  # fmt: skip


def test_task_weights(labelled_store):
    store = datapipe.open_store(labelled_store)
    weights = {"walker-walk": 3, "cheetah-run": 1}
    stream = datapipe.WebDatasetStream(store, batch_size=64, weights=weights, shuffle_buffer=64)
    tasks = torch.cat([b.task for b in _take(stream, 40)]).numpy()
    share = np.bincount(tasks, minlength=30) / len(tasks)
    ww, cr = store.task_names.index("walker-walk"), store.task_names.index("cheetah-run")
    assert set(np.flatnonzero(share)) == {ww, cr}
    assert share[ww] == pytest.approx(0.75, abs=0.06)


def test_same_seed_same_stream(labelled_store):
    def run(seed):
        stream = datapipe.WebDatasetStream(
            labelled_store, batch_size=32, seed=seed, shuffle_buffer=64
        )
        return _take(stream, 5)

    a, b, c = run(1), run(1), run(2)
    for x, y in zip(a, b, strict=True):
        assert all(torch.equal(s, t) for s, t in zip(x, y, strict=True))
    assert not torch.equal(a[0].obs, c[0].obs)


def test_ranks_read_disjoint_shards(labelled_store, monkeypatch):
    shard_of = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        stream = datapipe.WebDatasetStream(labelled_store, batch_size=16, shuffle_buffer=16)
        episodes, _ = _labels(_take(stream, 10))
        shards = set(episodes // fmt.EPISODES_PER_SHARD)
        assert len(shards) == 1
        shard_of[rank] = shards.pop()
    assert shard_of[0] != shard_of[1]
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(ValueError, match="2 shards cannot feed 4 readers"):
        _take(datapipe.WebDatasetStream(labelled_store), 1)


def test_dataloader_workers_split_the_shards(labelled_store):
    stream = datapipe.WebDatasetStream(labelled_store, batch_size=16, shuffle_buffer=16)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2)
    shards = []
    for i, batch in enumerate(loader):
        episodes, _ = _labels([batch])
        shards.append(set(episodes // fmt.EPISODES_PER_SHARD))
        if i == 9:
            break
    assert all(len(s) == 1 for s in shards)
    assert shards[0::2] == [shards[0]] * 5 and shards[1::2] == [shards[1]] * 5  # round robin
    assert shards[0] != shards[1]


def test_corrupt_member_raises(labelled_store, tmp_path):
    root = shutil.copytree(labelled_store, tmp_path / "s")
    tar_path = root / fmt.wds_shard_file(0)
    with tarfile.open(tar_path) as tar:
        member = tar.getmember(f"{fmt.wds_key(5)}.{fmt.WDS_MEMBERS['obs']}")
    data = bytearray(tar_path.read_bytes())
    data[member.offset_data + member.size // 2] ^= 0xFF
    tar_path.write_bytes(bytes(data))
    monkeypatch_urls = [str(root / fmt.wds_shard_file(0))] * 2  # read shard 0 only
    stream = datapipe.WebDatasetStream(root, batch_size=8, shard_urls=monkeypatch_urls)
    with pytest.raises(datapipe.CorruptStoreError, match=f"sample {fmt.wds_key(5)}"):
        _take(stream, 100)


def test_a_store_without_a_format_is_refused_by_its_readers_with_one_error(
    labelled_store, tmp_path
):
    root = shutil.copytree(labelled_store, tmp_path / "s")
    meta = json.loads((root / fmt.META_FILE).read_text())
    for formats in (["zarr"], ["webdataset"]):  # as a build of one format writes it (sealed)
        (root / f"{formats[0]}.json").write_text(json.dumps(fmt.seal(dict(meta, formats=formats))))
    shutil.copy(root / "zarr.json", root / fmt.META_FILE)
    with pytest.raises(datapipe.StoreFormatError, match="--format both"):
        datapipe.WebDatasetStream(root)
    shutil.copy(root / "webdataset.json", root / fmt.META_FILE)
    store = datapipe.open_store(root)
    for read in (ShardReader, lambda s: s.read_array("obs", 0, 1)):
        with pytest.raises(datapipe.StoreFormatError, match="without its zarr format"):
            read(store)
    with pytest.raises(ValueError, match="horizon=30"):
        datapipe.WebDatasetStream(labelled_store, horizon=30)
