"""datapipe.sample: task weights, the admission stream and the per-batch draws (no I/O)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import chi2_pvalue

from datapipe.sample import Admissions, SliceDraws, task_probabilities

NAMES = ["a", "b", "c", "d"]
COUNTS = [10, 30, 60, 0]  # task d has no episodes


def _by_task(counts):
    starts = np.cumsum([0, *counts])
    return [np.arange(starts[t], starts[t + 1]) for t in range(len(counts))]


def test_default_weights_follow_episode_counts():
    np.testing.assert_allclose(task_probabilities(COUNTS, NAMES), [0.1, 0.3, 0.6, 0])


def test_balanced_subset_and_mapping():
    np.testing.assert_allclose(
        task_probabilities(COUNTS, NAMES, weights="balanced"), [1 / 3] * 3 + [0]
    )
    np.testing.assert_allclose(
        task_probabilities(COUNTS, NAMES, tasks=["a", 1]), [0.25, 0.75, 0, 0]
    )
    probs = task_probabilities(COUNTS, NAMES, weights={"a": 3, "c": 1})
    np.testing.assert_allclose(probs, [0.75, 0, 0.25, 0])
    probs = task_probabilities(COUNTS, NAMES, tasks=["c"], weights={"a": 3, "c": 1})
    np.testing.assert_allclose(probs, [0, 0, 1, 0])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"tasks": ["zz"]}, "unknown task 'zz'"),
        ({"tasks": [7]}, "outside"),
        ({"weights": "uniform"}, "balanced"),
        ({"weights": {"a": -1}}, ">= 0"),
        ({"weights": {"d": 1}}, "no episodes"),
        ({"tasks": ["d"]}, "no episodes to sample"),
    ],
)
def test_bad_weights_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        task_probabilities(COUNTS, NAMES, **kwargs)


def test_admissions_cover_each_task_once_per_pass():
    by_task = _by_task(COUNTS)
    adm = Admissions(by_task, task_probabilities(COUNTS, NAMES), block_size=16, seed=3)
    ids = np.concatenate([adm.next_block() for _ in range(100)])
    for t, eps in enumerate(by_task[:3]):
        mine = ids[np.isin(ids, eps)]
        n_pass = len(mine) // len(eps)
        assert n_pass > 5
        for p in range(n_pass):  # every full pass is a permutation of the task's episodes
            assert sorted(mine[p * len(eps) : (p + 1) * len(eps)]) == list(eps), t


def test_admissions_are_uniform_over_episodes_by_default():
    by_task = _by_task(COUNTS)
    adm = Admissions(by_task, task_probabilities(COUNTS, NAMES), block_size=64, seed=0)
    ids = np.concatenate([adm.next_block() for _ in range(400)])  # 256 admissions / episode
    counts = np.bincount(ids, minlength=100)
    assert chi2_pvalue(counts, np.full(100, len(ids) / 100)) > 1e-3


def test_admissions_honour_weights():
    probs = task_probabilities(COUNTS, NAMES, weights={"a": 1, "b": 1, "c": 2})
    adm = Admissions(_by_task(COUNTS), probs, block_size=64, seed=1)
    tasks = np.digitize(np.concatenate([adm.next_block() for _ in range(200)]), [10, 40, 100])
    share = np.bincount(tasks, minlength=4) / len(tasks)
    np.testing.assert_allclose(share, [0.25, 0.25, 0.5, 0], atol=0.02)


def test_admissions_resume_exactly():
    probs = task_probabilities(COUNTS, NAMES)
    a = Admissions(_by_task(COUNTS), probs, block_size=8, seed=5)
    blocks = [a.next_block() for _ in range(30)]
    b = Admissions(_by_task(COUNTS), probs, block_size=8, seed=5)
    for _ in range(12):
        b.next_block()
    state = b.state_dict()
    c = Admissions(_by_task(COUNTS), probs, block_size=8, seed=5)
    c.load_state_dict(state)
    for k in range(12, 30):
        np.testing.assert_array_equal(c.next_block(), blocks[k])
    other = Admissions(_by_task(COUNTS), probs, block_size=8, seed=6)
    assert not np.array_equal(other.next_block(), blocks[0])


def test_slice_draws_are_pure_and_uniform():
    draws = SliceDraws(seed=0, n_slots=50, n_starts=20, batch_size=128, chunk=16)
    again = SliceDraws(seed=0, n_slots=50, n_starts=20, batch_size=128, chunk=16)
    for step in (0, 17, 5, 300, 17):  # any order: a pure function of (seed, step)
        for x, y in zip(draws.draw(step), again.draw(step), strict=True):
            np.testing.assert_array_equal(x, y)
    assert not np.array_equal(draws.draw(1)[0], draws.draw(2)[0])
    slots = np.concatenate([draws.draw(s)[0] for s in range(400)])
    starts = np.concatenate([draws.draw(s)[1] for s in range(400)])
    assert slots.min() == 0 and slots.max() == 49 and starts.max() == 19
    assert chi2_pvalue(np.bincount(slots, minlength=50), np.full(50, len(slots) / 50)) > 1e-3
    assert chi2_pvalue(np.bincount(starts, minlength=20), np.full(20, len(starts) / 20)) > 1e-3


def test_chi2_helper_can_fail():
    skewed = np.array([120] + [100] * 49)
    assert chi2_pvalue(skewed * 100, np.full(50, skewed.sum() * 2)) < 1e-6


def test_bench_pool_replays_the_loaders_pool():
    from tools.bench.pool import bench_pool

    out = bench_pool(episodes=3000, tasks=3, rows=51, cache_gb=0.0055, steps=4000,
                     batch_size=32, window=400)  # fmt: skip
    live = out["pool_episodes"]
    assert live == 64 * (int(0.0055e9 // ((51 * 31 * 4 + 8) * 64)) - 2)  # the loader's sum
    assert out["stay_batches"] == live // 64 * 16
    # each batch draws B slots uniformly from the live ones: B * stay / live slices per stay
    assert abs(out["slices_per_stay_mean"] - 32 * out["stay_batches"] / live) < 0.2
    for sampler in ("pool", "uniform"):  # both draw every task at its share in the long run
        assert out[sampler]["slices_per_episode_mean"] == 4000 * 32 / 3000
    assert out["passes"] > 2 and out["pool"]["episodes_never_drawn"] == 0
    # the pool is a shuffle window: a window sees the live episodes and those admitted in it
    assert out["pool"]["distinct_episodes_per_window"] <= live + 400 // 16 * 64
    assert out["uniform"]["distinct_episodes_per_window"] > live + 400 // 16 * 64
