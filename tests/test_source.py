"""Bad source input: every case fails with the file, the episode and a fix, and leaves no
store that looks complete."""

from __future__ import annotations

import shutil

import pytest
import torch
from conftest import build_store, load_chunk, make_source, save_chunk

from datapipe import format as fmt
from datapipe.errors import IncompleteStoreError, SourceError, StoreNotFoundError
from datapipe.store import open_store


@pytest.fixture
def src(tmp_path):
    """30 tasks x 2 episodes in 2 chunks: chunk_1.pt holds store episodes 30..59."""
    return make_source(tmp_path / "src", episodes_per_task=2, chunks=2)


def _edit(src, fn, name="chunk_1.pt"):
    data = load_chunk(src / name)
    fn(data)
    save_chunk(data, src / name)


def _fails(src, tmp_path, *patterns, **kw):
    dst = tmp_path / "store"
    with pytest.raises(SourceError) as info:
        build_store(src, dst, **kw)
    for p in patterns:
        assert p in str(info.value), str(info.value)
    with pytest.raises((IncompleteStoreError, StoreNotFoundError)):
        open_store(dst)
    assert not (dst / fmt.META_FILE).exists()
    return str(info.value)


def test_missing_key(src, tmp_path):
    _edit(src, lambda d: d.pop("reward"))
    _fails(src, tmp_path, "chunk_1.pt", "missing ['reward']")


def test_extra_key(src, tmp_path):
    _edit(src, lambda d: d.__setitem__("done", torch.zeros(d["task"].shape)))
    _fails(src, tmp_path, "chunk_1.pt", "unexpected ['done']")


def test_wrong_dtype(src, tmp_path):
    _edit(src, lambda d: d.__setitem__("obs", d["obs"].double()))
    _fails(src, tmp_path, "chunk_1.pt", "obs must be a torch.float32", "torch.float64")


def test_wrong_shape(src, tmp_path):
    _edit(src, lambda d: d.__setitem__("obs", d["obs"][:, :, :20]))
    _fails(src, tmp_path, "chunk_1.pt", "obs 20", "chunk_0.pt", "one layout")


def test_episode_length_differs_between_chunks(src, tmp_path):
    _edit(src, lambda d: [d.__setitem__(k, v[:, :401]) for k, v in list(d.items())])
    _fails(src, tmp_path, "chunk_1.pt", "401 rows", "501 rows")


def test_nan_outside_row_zero(src, tmp_path):
    def poison(d):
        d["action"][5, 37, 0] = float("nan")

    _edit(src, poison)
    _fails(src, tmp_path, "chunk_1.pt, episode 5 (store episode 35)", "row 37", "re-download")


def test_nan_in_obs_row_zero_is_corruption(src, tmp_path):
    _edit(src, lambda d: d["obs"][2, 0].fill_(float("nan")))
    _fails(src, tmp_path, "chunk_1.pt, episode 2", "obs is NaN")


def test_task_out_of_range(src, tmp_path):
    _edit(src, lambda d: d["task"][3].fill_(31))
    _fails(src, tmp_path, "episode 3 (store episode 33)", "task id 31", "[0, 30)", "--task-set")


def test_task_changes_inside_an_episode(src, tmp_path):
    _edit(src, lambda d: d["task"][4, 250:].fill_(7))
    _fails(src, tmp_path, "episode 4 (store episode 34)", "at row 250")


def test_nonzero_padding(src, tmp_path):
    # chunk_1 episode 0 is task 15 (finger-turn-hard, 12 obs dims)
    _edit(src, lambda d: d["obs"][0, 10:, 20].fill_(1.0))
    _fails(src, tmp_path, "episode 0", "finger-turn-hard", "padding")


def test_worker_errors_reach_the_user_unchanged(src, tmp_path):
    def poison(d):
        d["reward"][1, 100] = float("inf")

    _edit(src, poison)
    _fails(src, tmp_path, "chunk_1.pt, episode 1", "row 100", workers=2)


def test_truncated_file(src, tmp_path):
    path = src / "chunk_1.pt"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    _fails(src, tmp_path, "chunk_1.pt", "truncated")


def test_not_a_torch_file(src, tmp_path):
    (src / "chunk_0.pt").write_text("this is not a checkpoint\n")
    _fails(src, tmp_path, "chunk_0.pt", "cannot be read")


def test_empty_source_directory(tmp_path):
    (tmp_path / "empty").mkdir()
    _fails(tmp_path / "empty", tmp_path, "no chunk_K.pt files", "tools make-mt30")


def test_missing_chunk_number(src, tmp_path):
    shutil.copy(src / "chunk_1.pt", src / "chunk_3.pt")
    _fails(src, tmp_path, "missing chunk_2.pt")


def test_unknown_dims_need_a_task_set(tmp_path):
    src = make_source(tmp_path / "src", episodes_per_task=1, chunks=1)
    _edit(src, lambda d: d.__setitem__("obs", torch.cat([d["obs"], d["obs"][..., :1] * 0], -1)),
          name="chunk_0.pt")  # fmt: skip
    _fails(src, tmp_path, "obs dim 25", "--task-set")
