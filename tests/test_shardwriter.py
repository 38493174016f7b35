"""The direct shard encoder writes exactly the bytes zarr-python writes for the same data."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from datapipe import format as fmt
from datapipe.shardwriter import encode_shard


def _episodes(n: int, rng) -> dict[str, np.ndarray]:
    obs = rng.normal(size=(n, 501, 24)).astype(np.float32)
    obs[:, :, 17:] = 0  # padding, as in the data
    action = rng.uniform(-1, 1, size=(n, 501, 6)).astype(np.float32)
    action[:, 0] = np.nan
    reward = rng.uniform(0, 2, size=(n, 501)).astype(np.float32)
    reward[:, 0] = np.nan
    task = rng.integers(0, 30, size=n).astype(np.int32)
    task[:3] = 0
    return {"obs": obs, "action": action, "reward": reward, "task": task}


@pytest.mark.parametrize("n_episodes", [256, 300])  # a full shard, and a full + a partial one
def test_bytes_equal_zarr_python(tmp_path, n_episodes):
    data = _episodes(n_episodes, np.random.default_rng(0))
    group = zarr.open_group(tmp_path / "z", mode="w")
    with zarr.config.set(fmt.ZARR_WRITE_CONFIG):
        for name, values in data.items():
            shape = fmt.array_shape(name, n_episodes, 501, 24, 6)
            group.create_array(**fmt.zarr_array_kwargs(name, shape))[:] = values
    for name, values in data.items():
        for shard in range(fmt.n_shards(n_episodes)):
            eps = fmt.shard_episodes(shard, n_episodes)
            want = (tmp_path / "z" / fmt.zarr_shard_file(name, shard).split("/", 1)[1]).read_bytes()
            assert encode_shard(name, values[eps.start : eps.stop]) == want, (name, shard)


def test_all_zero_task_shard(tmp_path):
    blob = encode_shard("task", np.zeros(256, np.int32))
    group = zarr.open_group(tmp_path / "z", mode="w")
    array = group.create_array(**fmt.zarr_array_kwargs("task", (256,)))
    (tmp_path / "z" / "task" / "c").mkdir()
    (tmp_path / "z" / "task" / "c" / "0").write_bytes(blob)
    np.testing.assert_array_equal(array[:], 0)
