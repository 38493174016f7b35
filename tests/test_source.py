"""Reading source chunks: the inert parser reads exactly what torch.load reads and never runs
pickled code; bad source input fails with the file, the episode and a fix, and leaves no store
that looks complete. (Chunks on object storage: test_source_remote.py.)"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import types
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import build_store, load_chunk, make_source, save_chunk

from datapipe import format as fmt
from datapipe.errors import IncompleteStoreError, SourceError, StoreNotFoundError
from datapipe.source import read_episodes, scan_sources
from datapipe.store import open_store

SAMPLE = Path(__file__).parents[1] / "data" / "mt30-sample"


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


# --- the chunk parser: what torch.load reads, without running anything -------------------------


def _bits_equal(got: dict, expected: dict) -> bool:
    return got.keys() == set(expected) and all(
        got[k].dtype == np.asarray(expected[k]).dtype
        and got[k].shape == np.shape(expected[k])
        and got[k].tobytes() == np.asarray(expected[k]).tobytes()  # NaN payloads too
        for k in got
    )


def test_parser_reads_the_sample_exactly_as_torch_load():
    files, _ = scan_sources(SAMPLE)
    for f in files:
        td = torch.load(f.path, weights_only=False)
        for lo, hi in ((0, f.episodes), (7, 29), (f.episodes - 1, f.episodes)):
            got = read_episodes(f.path, lo, hi)
            assert _bits_equal(got, {k: td[k][lo:hi].numpy() for k in fmt.SOURCE_KEYS})
            assert all(a.flags.writeable and a.flags.c_contiguous for a in got.values())


def _tensors(n: int = 6, rows: int = 9) -> dict:
    """Small chunk tensors in awkward but legal layouts: obs and reward are strided views of
    one shared storage, task is expanded over the rows (stride 0)."""
    g = torch.Generator().manual_seed(0)
    both = torch.randn(n, rows, 25, generator=g)
    both[:, 0, 24] = float("nan")
    action = torch.randn(n, rows, 6, generator=g)
    action[:, 0] = float("nan")
    task = torch.arange(n, dtype=torch.int32)[:, None].expand(n, rows)
    return {"obs": both[..., :24], "action": action, "reward": both[..., 24], "task": task}


class _TensorDict2023:
    """Pickles the way the 2023 tensordict of the official chunks did: NEWOBJ of its class,
    then BUILD with its __dict__ (no _make_td, no __reduce__)."""

    def __init__(self, tensors: dict, batch_size):
        self._tensordict, self._batch_size = tensors, torch.Size(batch_size)
        self._device, self._is_shared, self._is_memmap = None, False, False


def _save_2023(tensors: dict, path: Path, monkeypatch) -> None:
    """torch.save a _TensorDict2023 as class `tensordict_2023.tensordict.TensorDict`, a module
    that exists only while saving: the reader can never import it."""
    module = types.ModuleType("tensordict_2023.tensordict")
    module.TensorDict = type("TensorDict", (_TensorDict2023,), {"__module__": module.__name__})
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "tensordict_2023", types.ModuleType("tensordict_2023"))
        m.setitem(sys.modules, module.__name__, module)
        torch.save(module.TensorDict(tensors, tensors["task"].shape), path)
    assert "tensordict_2023" not in sys.modules


@pytest.mark.parametrize("container", ["TensorDict", "dict", "OrderedDict", "TensorDict-2023"])
def test_parser_reads_every_container_exactly_as_torch_load(tmp_path, container, monkeypatch):
    from tensordict import TensorDict

    tensors, path = _tensors(), tmp_path / "chunk_0.pt"
    if container == "TensorDict-2023":
        _save_2023(tensors, path, monkeypatch)
        expected = tensors  # torch.load cannot read it without that tensordict
    else:
        wrap = {"TensorDict": lambda d: TensorDict(d, batch_size=[6, 9]), "dict": dict}
        torch.save(wrap.get(container, OrderedDict)(tensors), path)
        expected = torch.load(path, weights_only=False)
    for lo, hi in ((0, 6), (2, 5), (5, 6)):
        got = read_episodes(path, lo, hi)
        assert _bits_equal(got, {k: expected[k][lo:hi].numpy() for k in fmt.SOURCE_KEYS})
    (file,), layout = scan_sources(tmp_path)
    assert (file.episodes, layout.rows, layout.obs_dim, layout.action_dim) == (6, 9, 24, 6)


def test_big_endian_chunks_read_as_native_values(tmp_path):
    """A chunk written on a big-endian machine (byteorder record "big"): same values."""
    path = tmp_path / "chunk_0.pt"
    torch.save(_tensors(), path)
    with zipfile.ZipFile(path) as z:
        members = [(i.filename, z.read(i)) for i in z.infolist()]
    with zipfile.ZipFile(path, "w") as z:
        for name, blob in members:
            if "/data/" in name:  # every storage here holds 4-byte values
                blob = np.frombuffer(blob, "<u4").astype(">u4").tobytes()
            z.writestr(name, b"big" if name.endswith("/byteorder") else blob)
    expected = torch.load(path, weights_only=False)
    got = read_episodes(path, 1, 4)
    assert _bits_equal(got, {k: expected[k][1:4].numpy() for k in fmt.SOURCE_KEYS})
    assert _bits_equal(got, {k: v[1:4].numpy() for k, v in _tensors().items()})


class _Call:
    """Pickles as the call fn(arg): what a malicious chunk makes torch.load run."""

    def __init__(self, fn, arg):
        self.fn, self.arg = fn, arg

    def __reduce__(self):
        return self.fn, (self.arg,)


@pytest.mark.parametrize("protocol", [2, 4])  # GLOBAL and STACK_GLOBAL
@pytest.mark.parametrize("place", ["whole file", "obs"])
@pytest.mark.parametrize("fn", [os.system, exec, eval], ids=["os.system", "exec", "eval"])
def test_pickled_code_never_runs(tmp_path, protocol, place, fn):
    marker = tmp_path / "it-ran"
    arg = f"touch {marker}" if fn is os.system else f"open({str(marker)!r}, 'w').close()"
    payload = _Call(fn, arg)
    src = tmp_path / "src"
    src.mkdir()
    chunk = payload if place == "whole file" else {**_tensors(), "obs": payload}
    torch.save(chunk, src / "chunk_0.pt", pickle_protocol=protocol)
    with pytest.raises(SourceError, match=rf"chunk_0\.pt: .*{fn.__name__}"):
        scan_sources(src)
    with pytest.raises(SourceError, match=fn.__name__):
        read_episodes(src / "chunk_0.pt", 0, 1)
    assert not marker.exists()


def test_hand_written_inst_and_build_opcodes_stay_inert(tmp_path):
    marker = tmp_path / "it-ran"
    # protocol 0: INST os.system("touch ..."), then BUILD (a __setstate__ call) on the result
    pkl = f"(S'touch {marker}'\nios\nsystem\n(dp0\nb.".encode()
    with zipfile.ZipFile(tmp_path / "chunk_0.pt", "w") as z:
        z.writestr("archive/data.pkl", pkl)
    with pytest.raises(SourceError, match=r"holds a os\.system, not a TensorDict"):
        scan_sources(tmp_path)
    assert not marker.exists()


def _rezip(path: Path, keep=lambda name: True, compression=zipfile.ZIP_STORED, cut=None):
    with zipfile.ZipFile(path) as z:
        members = [(i.filename, z.read(i)) for i in z.infolist()]
    with zipfile.ZipFile(path, "w", compression) as z:
        for name, blob in members:
            if keep(name):
                z.writestr(name, blob[: len(blob) // 2] if cut and name.endswith(cut) else blob)


def _bad_obs(key, fn):
    def edit(path):
        tensors = _tensors()
        tensors[key] = fn(tensors[key])
        torch.save(tensors, path)

    return edit


@pytest.mark.parametrize(
    "damage,message",
    [
        (lambda p: _rezip(p, compression=zipfile.ZIP_DEFLATED), "is compressed"),
        (lambda p: _rezip(p, keep=lambda n: not n.endswith("data/1")), "data/1 is missing"),
        (
            lambda p: _rezip(p, cut="data/1"),
            "action needs 1296 bytes of storage, the file holds 648",
        ),
        (
            _bad_obs("obs", lambda t: t.transpose(0, 1).contiguous().transpose(0, 1)),
            "obs is stored with its episodes interleaved",
        ),
        (_bad_obs("obs", lambda t: t.bfloat16()), "got torch.bfloat16"),
        (_bad_obs("obs", lambda t: t.numpy()), "obs must be a torch.float32 tensor, got a"),
    ],
    ids=["compressed", "storage-missing", "storage-short", "interleaved", "bfloat16", "numpy"],
)
def test_damaged_or_foreign_archives_are_refused(tmp_path, damage, message):
    path = tmp_path / "chunk_0.pt"
    torch.save(_tensors(), path)
    damage(path)
    with pytest.raises(SourceError, match=r"chunk_0\.pt") as info:
        scan_sources(tmp_path)
    assert message in str(info.value)


def test_reading_outside_the_chunk_is_refused(tmp_path):
    torch.save(_tensors(), tmp_path / "chunk_0.pt")
    with pytest.raises(SourceError, match=r"episodes \[4, 7\) asked for, but it holds 6"):
        read_episodes(tmp_path / "chunk_0.pt", 4, 7)


# --- chunks saved from the official buffer, and legacy torch.save files -----------------------


def _data_digest(store: Path) -> dict:
    """store_digest but meta.json, which records the source files' own sizes and hashes."""
    from conftest import store_digest

    return {k: v for k, v in store_digest(store).items() if k != fmt.META_FILE}


def _number_episodes(data: dict, first: int) -> None:
    """Add the `episode` key as the official Buffer.load does: episode i of the chunk is
    number first + i on every row, an int64 view expanded along the rows."""
    n, rows = data["reward"].shape
    data["episode"] = torch.arange(first, first + n, dtype=torch.int64)[:, None].expand(n, rows)


@pytest.mark.parametrize("chunk_1_first", [30, 0], ids=["loaded-after-chunk-0", "loaded-alone"])
def test_episode_key_of_the_official_buffer_is_checked_then_left_out(src, tmp_path, chunk_1_first):
    reference = build_store(src, tmp_path / "reference")
    _edit(src, lambda d: _number_episodes(d, 0), name="chunk_0.pt")
    _edit(src, lambda d: _number_episodes(d, chunk_1_first))
    assert "episode" in torch.load(src / "chunk_1.pt", weights_only=False).keys()  # noqa: SIM118
    store = build_store(src, tmp_path / "store")
    assert _data_digest(store) == _data_digest(reference)


def test_episode_key_in_the_official_load_order_of_many_chunks(tmp_path):
    # the official trainer loads sorted(glob("*.pt")): chunk_10.pt comes before chunk_2.pt
    src = make_source(tmp_path / "src", episodes_per_task=1, chunks=11)
    files, _ = scan_sources(src)
    by_name = sorted(files, key=lambda f: f.name)
    assert [f.name for f in by_name[:3]] == ["chunk_0.pt", "chunk_1.pt", "chunk_10.pt"]
    first = 0
    for f in by_name:
        _edit(src, lambda d, first=first: _number_episodes(d, first), name=f.name)
        first += f.episodes
    build_store(src, tmp_path / "store")


def test_episode_key_that_disagrees_is_refused(src, tmp_path):
    def reordered(d):
        _number_episodes(d, 30)
        d["episode"] = d["episode"].flip(0).contiguous()  # as if shuffled after loading

    _edit(src, reordered)
    message = _fails(src, tmp_path, "chunk_1.pt, episode 0", "'episode' key is 59 at row 0")
    assert "Buffer.load writes 30 there (0 for a chunk loaded alone)" in message
    command = message.split("save the chunk again: ")[1]
    assert 'del td["episode"]' in command
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    subprocess.run(command, shell=True, check=True, env=env, capture_output=True)
    build_store(src, tmp_path / "without-the-key")


def test_episode_key_of_another_type_is_refused(src, tmp_path):
    _edit(src, lambda d: d.__setitem__("episode", torch.zeros(d["task"].shape, dtype=torch.int32)))
    _fails(src, tmp_path, "chunk_1.pt", "'episode' key is torch.int32", "torch.int64")


def test_legacy_torch_save_file_is_named_with_its_conversion(src, tmp_path):
    reference = build_store(src, tmp_path / "reference")
    path = src / "chunk_1.pt"
    torch.save(torch.load(path, weights_only=False), path, _use_new_zipfile_serialization=False)
    message = _fails(src, tmp_path, "chunk_1.pt: is a legacy torch.save file", "zip format")
    assert "truncated" not in message and "re-download" not in message
    command = message.split("only for a file you trust): ")[1]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    subprocess.run(command, shell=True, check=True, env=env, capture_output=True)
    assert _data_digest(build_store(src, tmp_path / "converted")) == _data_digest(reference)
