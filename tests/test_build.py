"""datapipe build: round trip, layouts, resume, dask execution, destination handling."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import (
    build_store,
    crash_second_unit,
    load_chunk,
    make_source,
    save_chunk,
    store_digest,
)

from datapipe import format as fmt
from datapipe.cli import main as datapipe_cli
from datapipe.errors import DestinationError, IncompleteStoreError
from datapipe.store import open_store


def _source_arrays(src):
    files = sorted(src.glob("chunk_*.pt"), key=lambda p: int(p.stem.split("_")[1]))
    tds = [torch.load(p, weights_only=False) for p in files]
    return {k: np.concatenate([td[k].numpy() for td in tds]) for k in fmt.SOURCE_KEYS}


def _bits(a: np.ndarray) -> np.ndarray:
    return a.view(np.uint32)  # compares NaN payloads too: bit for bit


def _read_wds(root, meta):
    out = {k: [] for k in fmt.SOURCE_KEYS}
    keys = []
    for shard in range(meta.n_shards):
        with tarfile.open(root / fmt.wds_shard_file(shard)) as tar:
            shard_keys, arrays = fmt.read_wds_tar(tar)
        keys += shard_keys
        for name, values in arrays.items():
            out[name] += values
    return keys, out


def test_zarr_round_trip_is_bit_exact(small_source, small_store):
    src = _source_arrays(small_source)
    store = open_store(small_store)
    assert store.n_episodes == len(src["obs"]) == 300
    for name in ("obs", "action", "reward"):
        got = store.read_array(name, 0, store.n_episodes)
        assert got.dtype == src[name].dtype
        np.testing.assert_array_equal(_bits(got), _bits(src[name]))
    np.testing.assert_array_equal(store.read_array("task", 0, 300), src["task"][:, 0])
    ep = store.read_episode(123)
    for name in fmt.SOURCE_KEYS:
        np.testing.assert_array_equal(_bits(ep[name]), _bits(src[name][123]))


def test_webdataset_round_trip_is_bit_exact(small_source, small_store):
    src = _source_arrays(small_source)
    keys, wds = _read_wds(small_store, open_store(small_store).meta)
    assert keys == [fmt.wds_key(i) for i in range(300)]
    for name in ("obs", "action", "reward"):
        np.testing.assert_array_equal(_bits(np.stack(wds[name])), _bits(src[name]))
    np.testing.assert_array_equal(wds["task"], src["task"][:, 0])


def test_webdataset_decodes_with_the_webdataset_library(small_store):
    wds = pytest.importorskip("webdataset")
    url = str(small_store / fmt.wds_shard_file(0))
    sample = next(iter(wds.WebDataset(url, shardshuffle=False).decode()))
    assert sample[fmt.WDS_MEMBERS["obs"]].shape == (501, 24)
    assert sample[fmt.WDS_MEMBERS["task"]] == 0


def test_metadata_index_and_provenance(small_source, small_store):
    store = open_store(small_store)
    meta = store.meta
    assert meta.task_names[0] == "walker-stand" and meta.n_tasks == 30
    assert meta.rows_per_episode == 501 and meta.n_rows == 300 * 501
    assert [s.name for s in meta.sources] == ["chunk_0.pt", "chunk_1.pt", "chunk_2.pt"]
    assert [(s.start, s.episodes) for s in meta.sources] == [(0, 100), (100, 100), (200, 100)]
    import hashlib

    digest = hashlib.sha256((small_source / "chunk_1.pt").read_bytes()).hexdigest()
    assert meta.sources[1].sha256 == digest
    for t in range(30):
        np.testing.assert_array_equal(store.episodes_of_task(t), np.arange(10 * t, 10 * t + 10))
        assert store.index["tasks"][t]["rows"] == 10 * 501
    manifest = json.loads((small_store / fmt.MANIFEST_FILE).read_text())["files"]
    assert fmt.zarr_shard_file("obs", 1) in manifest and fmt.wds_shard_file(1) in manifest
    assert not (small_store / fmt.BUILD_DIR).exists()


def test_a_shard_of_task_zero_episodes_is_stored(tmp_path):
    # all-zero chunks (task id 0 for a whole shard) must be written like any other
    src = make_source(tmp_path / "src", episodes_per_task=300, chunks=1, task_set="mt30")
    data = load_chunk(src / "chunk_0.pt")
    save_chunk({k: v[:257] for k, v in data.items()}, src / "chunk_0.pt")
    store = open_store(build_store(src, tmp_path / "store"))
    assert (Path(store.url) / fmt.zarr_shard_file("task", 0)).exists()
    np.testing.assert_array_equal(store.read_array("task", 0, 257), 0)


def test_mt80_layout_comes_from_the_data(tmp_path):
    src = make_source(tmp_path / "src", episodes_per_task=1, chunks=2, task_set="mt80")
    store = open_store(build_store(src, tmp_path / "store"))
    assert (store.n_episodes, store.episode_length, store.obs_dim) == (80, 101, 39)
    assert store.task_names[79] == "mw-hand-insert" and store.action_dims[79] == 4
    assert store.read_episode(79)["obs"].shape == (101, 39)


def test_interrupted_build_resumes_to_an_identical_store(
    small_source, small_store, tmp_path, monkeypatch
):
    crash_second_unit(monkeypatch)
    dst = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        build_store(small_source, dst)
    with pytest.raises(IncompleteStoreError, match="datapipe build"):
        open_store(dst)
    monkeypatch.undo()
    done_before = {p.name for p in (dst / fmt.BUILD_DIR / "units").iterdir()}
    assert len(done_before) == 1
    build_store(small_source, dst)
    assert store_digest(dst) == store_digest(small_store)


def test_dask_local_cluster_build_equals_in_process_build(small_source, small_store, tmp_path):
    dst = build_store(small_source, tmp_path / "dask", workers=2)
    assert store_digest(dst) == store_digest(small_store)


def test_rebuilding_a_complete_store_is_a_no_op(small_source, small_store, capsys):
    before = store_digest(small_store)
    build_store(small_source, small_store, progress=True)
    assert "already complete" in capsys.readouterr().out
    assert store_digest(small_store) == before


def test_destination_holding_another_dataset_is_refused(small_store, tmp_path):
    other = make_source(tmp_path / "other", episodes_per_task=1, chunks=1, seed=7)
    with pytest.raises(DestinationError, match="different dataset"):
        build_store(other, small_store)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(DestinationError, match="not empty"):
        build_store(other, tmp_path / "busy")


def test_cli_build_and_info(small_source, tmp_path):
    runner = CliRunner()
    dst = tmp_path / "cli"
    args = [
        "build",
        "--src",
        str(small_source),
        "--dst",
        str(dst),
        "--workers",
        "0",
        "--no-progress",
    ]
    result = runner.invoke(datapipe_cli, args)
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[-1].startswith(f"{dst}: complete (300 episodes, ")
    result = runner.invoke(datapipe_cli, ["info", str(dst)])
    assert result.exit_code == 0, result.output
    assert "complete" in result.output and "walker-stand" in result.output
    assert "ratio" in result.output
    result = runner.invoke(datapipe_cli, ["info", str(tmp_path / "nothing")])
    assert result.exit_code != 0 and "datapipe build" in result.output


def _refused(args: list[str], *names: str) -> str:
    """Run `datapipe build ARGS` as a user would; check it fails cleanly naming `names`."""
    result = CliRunner().invoke(datapipe_cli, ["build", *args, "--workers", "0", "--no-progress"])
    assert result.exit_code == 1 and type(result.exception) is SystemExit, result.output
    assert "Traceback" not in result.output
    for name in names:
        assert name in result.output, result.output
    return result.output


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("below", [False, True], ids=["the-file", "below-the-file"])
def test_cli_build_into_an_existing_file_is_refused(small_source, tmp_path, below):
    (tmp_path / "notes.txt").write_text("mine")
    dst = tmp_path / "notes.txt" / "store" if below else tmp_path / "notes.txt"
    before = _tree(tmp_path)
    output = _refused(["--src", str(small_source), "--dst", str(dst)], "notes.txt", "is a file")
    assert "--dst" in output
    assert _tree(tmp_path) == before  # nothing written


def test_cli_build_into_a_store_with_damaged_metadata_is_refused(
    small_source, small_store, tmp_path
):
    import shutil

    dst = shutil.copytree(small_store, tmp_path / "store")
    (dst / fmt.META_FILE).write_text((dst / fmt.META_FILE).read_text()[:100])
    before = _tree(dst)
    output = _refused(["--src", str(small_source), "--dst", str(dst)], f"{dst}/{fmt.META_FILE}")
    assert f"--dst {dst}-rebuilt" in output and "damaged" in output
    assert _tree(dst) == before


def test_every_build_setting_is_a_flag_with_its_help():
    import dataclasses

    from datapipe.build import BuildConfig
    from datapipe.cli import main

    params = {p.name: p for p in main.commands["build"].params}
    for f in dataclasses.fields(BuildConfig):
        assert params[f.name].help == f.metadata["help"] != "", f.name


def test_bad_settings_and_a_file_for_a_store_are_clean_errors(small_source, tmp_path):
    """No traceback and no hang: an unknown task set, --workers below -1, a file given as
    the store to `datapipe info`; --workers -1 is one worker per core."""
    _refused(["--src", str(small_source), "--dst", str(tmp_path / "a"), "--task-set", "mt99"],
             "--task-set mt99", "mt30, mt80")  # fmt: skip
    result = CliRunner().invoke(
        datapipe_cli, ["build", "--src", str(small_source), "--dst", str(tmp_path / "b"),
                       "--workers", "-2", "--no-progress"],
    )  # fmt: skip
    assert result.exit_code == 1 and "--workers -2" in result.output
    (tmp_path / "notes.txt").write_text("mine")
    result = CliRunner().invoke(datapipe_cli, ["info", str(tmp_path / "notes.txt")])
    assert result.exit_code == 1 and "a file, not a store" in result.output
    assert "Traceback" not in result.output
    built = CliRunner().invoke(
        datapipe_cli, ["build", "--src", str(small_source), "--dst", str(tmp_path / "c"),
                       "--workers", "-1", "--no-progress"],
    )  # fmt: skip
    assert built.exit_code == 0 and "complete (300 episodes" in built.output, built.output


def test_a_second_build_into_a_destination_being_built_is_refused(small_source, tmp_path):
    """A local destination is locked while it is built (the folder itself, no file added):
    another build stops at once naming the holder's pid, and writes nothing."""
    from conftest import lock_held_elsewhere

    dst = tmp_path / "store"
    with lock_held_elsewhere(f"only_writer({str(dst)!r}, 'a test', RuntimeError)") as pid:
        _refused(["--src", str(small_source), "--dst", str(dst)],
                 f"another `datapipe build` (pid {pid})")  # fmt: skip
        assert list(dst.iterdir()) == []
    built = CliRunner().invoke(datapipe_cli, ["build", "--src", str(small_source), "--dst",
                                              str(dst), "--workers", "0", "--no-progress"])  # fmt: skip
    assert built.exit_code == 0, built.output
    from datapipe.verify import verify

    assert verify(dst).ok  # the finished store holds no lock file or other stray


def test_episodes_of_another_length_than_the_task_sets_are_named(capsys):
    """500-row episodes under mt30 (a row lost, or steps only) are built, with a warning."""
    from datapipe.build import resolve_task_set
    from datapipe.source import Layout

    assert resolve_task_set("auto", Layout(501, 24, 6), "src").name == "mt30"
    assert capsys.readouterr().err == ""
    assert resolve_task_set("mt30", Layout(500, 24, 6), "src").name == "mt30"
    err = capsys.readouterr().err
    assert (
        err.startswith("warning: src: episodes of 500 rows, where mt30's have 501")
        and "499 steps" in err
    )
