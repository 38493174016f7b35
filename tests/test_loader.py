"""SliceLoader and ShardReader: batch semantics, sampling statistics, determinism, resume,
bounded memory and bad input, on small stores from the conftest factories."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import chi2_pvalue

import datapipe
from datapipe import format as fmt
from datapipe.extras import install_hint
from datapipe.sample import Admissions
from datapipe.shardreader import ShardReader

H = 3
SMALL = {"cache_gb": 90e-6, "refill_size": 8, "refill_every": 4}  # 2 live groups of 8 episodes


def _batches(loader, n):
    return [[t.clone() for t in next(loader)] for _ in range(n)]


def _check_semantics(store, obs, action, reward, task):
    """Every slice is rows s..s+H of one episode, in the official one-step-offset layout."""
    T = store.episode_length
    assert not (np.isnan(obs).any() or np.isnan(action).any() or np.isnan(reward).any())
    episode, start = obs[0, :, 0].astype(int), obs[0, :, 1].astype(int)
    assert ((start >= 0) & (start <= T - H - 1)).all()
    k = np.arange(H + 1)[:, None]
    np.testing.assert_array_equal(obs[:, :, 0], np.broadcast_to(episode, obs.shape[:2]))
    np.testing.assert_array_equal(obs[:, :, 1], start + k)
    np.testing.assert_array_equal(action[:, :, 0], start + k[1:])
    np.testing.assert_array_equal(reward[:, :, 0], 1000 * episode + start + k[1:])
    np.testing.assert_array_equal(task, store.episode_tasks[episode])
    return episode, start


def test_batch_layout_and_semantics(labelled_store):
    store = datapipe.open_store(labelled_store)
    loader = datapipe.SliceLoader(store, batch_size=64, horizon=H, seed=0, **SMALL)
    assert loader.pool_episodes == 16 and loader.pool_bytes <= SMALL["cache_gb"] * 1e9
    seen = set()
    for _ in range(200):  # 50 refills
        batch = next(loader)
        obs, action, reward, task = batch  # unpacks like the official Buffer.sample
        assert obs.shape == (H + 1, 64, store.obs_dim) and obs.dtype == torch.float32
        assert action.shape == (H, 64, store.action_dim) and reward.shape == (H, 64, 1)
        assert task.shape == (64,) and task.dtype == torch.int64 and obs.device.type == "cpu"
        episode, _ = _check_semantics(store, obs.numpy(), action.numpy(), reward.numpy(), task)
        seen.update(episode.tolist())
    assert len(seen) > 250  # the pool (16 episodes) moved through most of the store


def test_batches_equal_the_stored_episodes(labelled_store):
    store = datapipe.open_store(labelled_store)
    loader = datapipe.SliceLoader(store, batch_size=16, horizon=H, seed=1, **SMALL)
    obs, action, reward, task = next(loader)
    for b in range(16):  # every column, not only the labels
        e, s = int(obs[0, b, 0]), int(obs[0, b, 1])
        ep = store.read_episode(e)
        np.testing.assert_array_equal(obs[:, b], ep["obs"][s : s + H + 1])
        np.testing.assert_array_equal(action[:, b], ep["action"][s + 1 : s + H + 1])
        np.testing.assert_array_equal(reward[:, b, 0], ep["reward"][s + 1 : s + H + 1])
        assert task[b] == ep["task"][0]


def test_draw_is_uniform_given_the_admissions(labelled_store):
    """Slice counts per episode match what the pool's admissions imply (a multinomial: chi-
    square), start rows are uniform, and over the run every episode gets its share."""
    store = datapipe.open_store(labelled_store)
    B, n_batches = 64, 1600
    loader = datapipe.SliceLoader(store, batch_size=B, horizon=H, seed=7, **SMALL)
    episodes, starts = [], []
    for _ in range(n_batches):
        obs = next(loader).obs.numpy()
        episodes.append(obs[0, :, 0].astype(int))
        starts.append(obs[0, :, 1].astype(int))
    episodes, starts = np.concatenate(episodes), np.concatenate(starts)

    by_task = [store.episodes_of_task(t) for t in range(len(store.task_names))]
    adm = Admissions(by_task, loader.task_probs, SMALL["refill_size"], seed=7)
    G, K = loader.live_groups, SMALL["refill_every"]
    expected = np.zeros(store.n_episodes)
    for block in range(n_batches // K + G):
        ids = adm.next_block()
        live_epochs = [e for e in range(block - G + 1, block + 1) if 0 <= e < n_batches // K]
        np.add.at(expected, ids, len(live_epochs) * K * B / loader.pool_episodes)
    assert expected.sum() == pytest.approx(len(episodes))
    observed = np.bincount(episodes, minlength=store.n_episodes)
    assert chi2_pvalue(observed[expected > 0], expected[expected > 0]) > 1e-3
    n_starts = store.episode_length - H
    assert chi2_pvalue(np.bincount(starts, minlength=n_starts), np.full(n_starts, len(starts) / n_starts)) > 1e-3  # fmt: skip
    share = observed / observed.mean()
    assert share.min() > 0.5 and share.max() < 1.6  # long run: near uniform over episodes


def test_task_weights_and_subsets(labelled_store):
    store = datapipe.open_store(labelled_store)
    weights = {"walker-walk": 3, "cheetah-run": 1}
    loader = datapipe.SliceLoader(store, batch_size=128, seed=2, weights=weights, **SMALL)
    tasks = torch.cat([next(loader).task for _ in range(800)]).numpy()
    share = np.bincount(tasks, minlength=30) / len(tasks)
    ww, cr = store.task_names.index("walker-walk"), store.task_names.index("cheetah-run")
    assert share[ww] == pytest.approx(0.75, abs=0.05) and share[cr] == pytest.approx(0.25, abs=0.05)
    assert set(np.flatnonzero(share)) == {ww, cr}
    only = datapipe.SliceLoader(store, batch_size=32, tasks=["cup-spin", 4], **SMALL)
    seen = {int(t) for _ in range(20) for t in next(only).task}
    assert seen == {4, store.task_names.index("cup-spin")}
    balanced = datapipe.SliceLoader(store, batch_size=128, weights="balanced", **SMALL)
    counts = np.bincount(torch.cat([next(balanced).task for _ in range(400)]), minlength=30)
    assert counts.min() > 0.5 * counts.mean()


def test_same_seed_same_batches(labelled_store):
    a = _batches(datapipe.SliceLoader(labelled_store, batch_size=32, seed=4, **SMALL), 30)
    b = _batches(datapipe.SliceLoader(labelled_store, batch_size=32, seed=4, **SMALL), 30)
    c = _batches(datapipe.SliceLoader(labelled_store, batch_size=32, seed=5, **SMALL), 30)
    for x, y in zip(a, b, strict=True):
        for s, t in zip(x, y, strict=True):
            assert torch.equal(s, t)
    assert not torch.equal(a[0][0], c[0][0])


def test_refill_thread_and_process_agree(labelled_store):
    thread = _batches(datapipe.SliceLoader(labelled_store, batch_size=32, workers=0, **SMALL), 20)
    procs = _batches(datapipe.SliceLoader(labelled_store, batch_size=32, workers=2, **SMALL), 20)
    for x, y in zip(thread, procs, strict=True):
        assert all(torch.equal(s, t) for s, t in zip(x, y, strict=True))


@pytest.mark.parametrize("stop", [1, 8, 13])  # at, and between, refill boundaries
def test_resume_continues_exactly(labelled_store, stop):
    ref = _batches(datapipe.SliceLoader(labelled_store, batch_size=32, seed=9, **SMALL), 30)
    first = datapipe.SliceLoader(labelled_store, batch_size=32, seed=9, **SMALL)
    _batches(first, stop)
    state = json.loads(json.dumps(first.state_dict()))  # checkpoints hold plain JSON
    first.close()
    resumed = datapipe.SliceLoader(labelled_store, batch_size=32, seed=9, **SMALL)
    resumed.load_state_dict(state)
    for want, got in zip(ref[stop:], _batches(resumed, 30 - stop), strict=True):
        for s, t in zip(want, got, strict=True):
            assert torch.equal(s, t)
    replayed = dict(state, admissions=None)  # without the saved admissions: replayed
    again = datapipe.SliceLoader(labelled_store, batch_size=32, seed=9, **SMALL)
    again.load_state_dict(replayed)
    assert torch.equal(next(again).obs, ref[stop][0])
    with pytest.raises(ValueError, match="batch_size"):
        datapipe.SliceLoader(labelled_store, batch_size=16, seed=9, **SMALL).load_state_dict(state)


def test_memory_is_bounded_by_the_budget(labelled_store):
    loader = datapipe.SliceLoader(labelled_store, cache_gb=0.0002, refill_size=4)
    assert loader.pool_bytes <= 0.0002e9 and loader.pool_episodes < 300
    whole = datapipe.SliceLoader(labelled_store, cache_gb=1.0, refill_size=8)
    assert 300 <= whole.pool_episodes < 308  # whole store, rounded up to a group of 8


def test_bad_arguments_are_refused(labelled_store):
    with pytest.raises(ValueError, match="horizon=21"):
        datapipe.SliceLoader(labelled_store, horizon=21)
    datapipe.SliceLoader(labelled_store, horizon=20, **SMALL)  # 21 rows: the longest slice
    with pytest.raises(ValueError, match="cache_gb"):
        datapipe.SliceLoader(labelled_store, cache_gb=1e-6)


def test_reader_equals_zarr(labelled_store):
    store = datapipe.open_store(labelled_store)
    ids = np.arange(store.n_episodes)[::-1]
    with ShardReader(store, max_open_shards=2) as reader:
        got = reader.read_episodes(ids)
    for name in ("obs", "action", "reward"):
        want = store.read_array(name, 0, store.n_episodes)[::-1]
        np.testing.assert_array_equal(got[name], want)


def _flip_byte(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_corrupt_chunk_raises_naming_array_chunk_and_episodes(labelled_store, tmp_path):
    root = shutil.copytree(labelled_store, tmp_path / "s")
    shard = root / fmt.zarr_shard_file("action", 1)
    index = fmt.shard_index(shard.read_bytes())
    _flip_byte(shard, int(index[10, 0]) + 20)  # inside the chunk of episode 266
    reader = ShardReader(datapipe.open_store(root))
    with pytest.raises(datapipe.CorruptStoreError) as err:
        reader.read_episodes([266])
    msg = str(err.value)
    for part in ("'action'", "action/c/1/0/0", "episodes [256, 300)", "chunk 10", "episode 266"):
        assert part in msg, msg
    assert isinstance(err.value, ValueError)
    loader = datapipe.SliceLoader(root, batch_size=8, cache_gb=1.0, refill_size=8)
    with pytest.raises(datapipe.CorruptStoreError, match="crc32c"):
        next(loader)  # the pool would hold every episode: the bad one is met at once


def test_corrupt_shard_index_is_refused(labelled_store, tmp_path):
    root = shutil.copytree(labelled_store, tmp_path / "s")
    shard = root / fmt.zarr_shard_file("obs", 0)
    _flip_byte(shard, shard.stat().st_size - 100)
    with pytest.raises(
        datapipe.CorruptStoreError, match=r"obs/c/0/0/0 \(episodes \[0, 256\)\), index"
    ):
        ShardReader(datapipe.open_store(root)).read_episodes([3])


def test_unfinished_and_old_stores_are_refused_with_the_fix(labelled_store, tmp_path):
    root = shutil.copytree(labelled_store, tmp_path / "s")
    meta = json.loads((root / fmt.META_FILE).read_text())
    (root / fmt.META_FILE).write_text(json.dumps(dict(meta, format_version=0)))
    with pytest.raises(datapipe.StoreVersionError, match="datapipe build"):
        datapipe.SliceLoader(root)
    (root / fmt.META_FILE).unlink()
    (root / fmt.BUILD_DIR).mkdir()
    (root / fmt.PLAN_FILE).write_text(json.dumps({"command": "datapipe build --src A --dst B"}))
    with pytest.raises(datapipe.IncompleteStoreError, match="datapipe build --src A --dst B"):
        datapipe.SliceLoader(root)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_batches_equal_cpu_batches(labelled_store):
    cpu = _batches(datapipe.SliceLoader(labelled_store, batch_size=64, seed=3, **SMALL), 20)
    gpu_loader = datapipe.SliceLoader(labelled_store, batch_size=64, seed=3, device="cuda", **SMALL)
    for want in cpu:
        got = next(gpu_loader)
        assert got.obs.device.type == "cuda"
        for s, t in zip(want, got, strict=True):
            assert torch.equal(s, t.cpu())


def test_bench_loader_cli_smoke(labelled_store, tmp_path):
    from click.testing import CliRunner

    from tools.cli import main

    args = ["bench-loader", "--store", str(labelled_store), "--batch-size", "16", "--seconds", "1"]
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(main, [*args, "--approach", "ours", "--approach", "numpy",
                                       "--cache-gb", "0.001", "--json-out", str(out)])  # fmt: skip
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())["rows"]
    assert [r["approach"] for r in rows] == ["ours", "numpy"]
    assert all(r["batches_per_s"] > 0 and r["peak_pss_gb"] > 0 for r in rows)
    try:
        import torchrl  # noqa: F401
    except ImportError:
        result = CliRunner().invoke(main, args)  # the official approach needs the extra
        assert result.exit_code != 0 and install_hint("bench") in result.output


def test_uniform_sampler_draws_every_slice_from_the_whole_store(labelled_store):
    """sampler="uniform": the official draw, each slice's episode uniform over the store
    (chi-square per batch window, no pool), same semantics, exact resume."""
    store = datapipe.open_store(labelled_store)
    loader = datapipe.SliceLoader(store, batch_size=64, horizon=H, seed=3, sampler="uniform")
    assert loader.pool_episodes == 0
    episodes = []
    for _ in range(200):
        obs, action, reward, task = (t.numpy() for t in next(loader))
        episodes.append(_check_semantics(store, obs, action, reward, task)[0])
    counts = np.bincount(np.concatenate(episodes), minlength=store.n_episodes)
    assert chi2_pvalue(counts, np.full(store.n_episodes, counts.sum() / store.n_episodes)) > 1e-3
    # the first 20 batches already reach episodes from all over the store, unlike a pool
    assert len(np.unique(np.concatenate(episodes[:20]))) > 0.9 * store.n_episodes
    state = loader.state_dict()
    want = _batches(loader, 3)
    again = datapipe.SliceLoader(store, batch_size=64, horizon=H, seed=3, sampler="uniform")
    again.load_state_dict(state)
    for a, b in zip(want, _batches(again, 3), strict=True):
        assert all(torch.equal(s, t) for s, t in zip(a, b, strict=True))
    with pytest.raises(ValueError, match="sampler='uniform', this loader 'pool'"):
        datapipe.SliceLoader(store, batch_size=64, horizon=H, seed=3).load_state_dict(state)


def test_start_up_reads_the_pools_chunks_not_the_shard_files(tmp_path, monkeypatch):
    """Filling the pool for the first batch reads its episodes' chunks and the touched shard
    indexes, never whole shard files (the sha256 check of stores without chunks.crc32c read
    every touched file whole): on a store of 3,000 episodes, 32 episodes read ~1% of it."""
    import os

    from conftest import make_labelled_store

    store = make_labelled_store(tmp_path / "s", episodes_per_task=100, rows=101)
    files = (store / fmt.ZARR_DIR).rglob("*")
    data = sum(p.stat().st_size for p in files if p.is_file() and p.name != "zarr.json")
    pool = {"cache_gb": 0.0005, "refill_size": 8, "refill_every": 4}  # 40 episodes read
    read = [0]
    real_pread = os.pread

    def counting_pread(fd, n, offset):
        out = real_pread(fd, n, offset)
        read[0] += len(out)
        return out

    monkeypatch.setattr(os, "pread", counting_pread)
    with datapipe.SliceLoader(store, batch_size=16, seed=0, workers=0, **pool) as loader:
        next(loader)
    assert 0 < read[0] < 0.05 * data, (read[0], data)
    (store / fmt.CHUNK_CRC_FILE).unlink()  # a store built before the table: files hashed
    read[0] = 0
    with datapipe.SliceLoader(store, batch_size=16, seed=0, workers=0, **pool) as loader:
        next(loader)
    assert read[0] > 0.5 * data, (read[0], data)


def test_a_pool_of_1500_groups_starts(tmp_path):
    """At start the loader queues every group of the pool for its refill worker; replies
    left unread filled their pipe and the two processes waited on each other for ever (a
    4 GB pool over all of MT30, ~1,000 groups, hung so). Run in a child with a time limit."""
    import subprocess
    import sys

    code = f"""
import sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from conftest import make_labelled_store
import datapipe
store = make_labelled_store(__import__("pathlib").Path({str(tmp_path)!r}) / "s", 50)
for workers in (1, 0):
    with datapipe.SliceLoader(store, batch_size=16, seed=0, cache_gb=0.004, refill_size=1,
                              refill_every=1, workers=workers) as loader:
        assert loader.live_groups == 1500
        next(loader)
print("started")
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "started" in run.stdout, run.stderr[-2000:]
