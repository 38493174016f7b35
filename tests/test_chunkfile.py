"""tools/chunkfile.py writes torch.save's exact bytes block by block, in bounded memory."""

from __future__ import annotations

import itertools
import tracemalloc
import zipfile

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from tensordict import TensorDict

import tools.make_mt30 as make
from datapipe.tasksets import MT30
from tools.chunkfile import STREAMS, chunk_shapes, write_chunk
from tools.cli import main as tools_cli


def _episodes(n: int, rows: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "obs": rng.normal(size=(n, rows, 24)).astype(np.float32),
        "action": rng.normal(size=(n, rows, 6)).astype(np.float32),
        "reward": rng.normal(size=(n, rows)).astype(np.float32),
        "task": rng.integers(0, 30, size=(n, rows)).astype(np.int32),
    }


@pytest.mark.parametrize("streams", [True, False], ids=["torch>=2.6", "torch<2.6"])
@pytest.mark.parametrize("cuts", [[], [1], [3, 4, 6]])
def test_blocks_give_torch_saves_bytes(tmp_path, cuts, streams, monkeypatch):
    import tools.chunkfile

    monkeypatch.setattr(tools.chunkfile, "STREAMS", streams and tools.chunkfile.STREAMS)
    data = _episodes(7, 11)
    td = TensorDict({k: torch.from_numpy(v) for k, v in data.items()}, batch_size=[7, 11])
    (tmp_path / "ref").mkdir()
    torch.save(td, tmp_path / "ref" / "chunk_0.pt.tmp")  # the record names say chunk_0.pt
    bounds = [0, *cuts, 7]
    blocks = [{k: v[a:b] for k, v in data.items()} for a, b in itertools.pairwise(bounds)]
    write_chunk(tmp_path / "chunk_0.pt", chunk_shapes(7, 11, 24, 6), blocks)
    assert (tmp_path / "chunk_0.pt").read_bytes() == (
        tmp_path / "ref" / "chunk_0.pt.tmp"
    ).read_bytes()
    assert zipfile.ZipFile(tmp_path / "chunk_0.pt").testzip() is None  # every CRC-32 right
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chunk_0.pt", "ref"]  # no temporary


def test_blocks_that_do_not_fill_the_chunk_are_refused(tmp_path):
    data = _episodes(3, 5)
    with pytest.raises(ValueError, match="the blocks held 3 episodes, the chunk has 4"):
        write_chunk(tmp_path / "chunk_0.pt", chunk_shapes(4, 5, 24, 6), [data])
    assert list(tmp_path.iterdir()) == []  # nothing half-written under the chunk's name


def _peak_bytes(tmp_path, episodes_per_task: int) -> int:
    tracemalloc.start()
    try:
        cfg = make.MakeConfig(
            dst=tmp_path, episodes_per_task=episodes_per_task, episode_length=101, progress=False
        )
        make.make_mt30(cfg)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.skipif(not STREAMS, reason="needs torch >= 2.6 (torch.serialization.skip_data)")
def test_make_mt30_memory_does_not_grow_with_the_chunk(tmp_path, monkeypatch):
    # blocks of 8 episodes: a chunk of 30 x 8 episodes against one of 30 x 64 (8x the bytes)
    monkeypatch.setattr(make, "BLOCK", 8)
    small = _peak_bytes(tmp_path / "small", 8)
    big = _peak_bytes(tmp_path / "big", 64)
    chunk = (tmp_path / "big" / "chunk_0.pt").stat().st_size
    assert chunk > 7 * (tmp_path / "small" / "chunk_0.pt").stat().st_size
    assert big < 1.5 * small, (small, big)
    assert big < chunk / 8, (big, chunk)


def test_like_mt30_is_the_released_layout():
    cfg = make._like(make.MakeConfig(dst=None, like="mt30"), MT30)
    assert (cfg.episodes_per_task, cfg.chunks, cfg.rows) == (23_000, 4, 501)
    assert make._chunk_bounds(cfg, MT30) == [0, 200_000, 400_000, 600_000, 690_000]


def test_like_refuses_settings_it_fixes(tmp_path):
    args = ["make-mt30", "--dst", str(tmp_path), "--like", "mt30", "--chunks", "2"]
    result = CliRunner().invoke(tools_cli, args)
    assert result.exit_code != 0
    assert "--like mt30 fixes the episodes, chunks and rows" in result.output
    assert list(tmp_path.iterdir()) == []
