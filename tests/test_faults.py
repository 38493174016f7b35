"""Fault injection: damaged stores are caught precisely, and builds survive crashes,
corrupt sources and full disks without losing work or looking complete."""

from __future__ import annotations

import errno
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import build_store, make_source, store_digest

from datapipe import format as fmt
from datapipe.errors import BuildWriteError, CorruptStoreError, SourceError
from datapipe.store import open_store
from datapipe.verify import verify


@pytest.fixture
def store(small_store, tmp_path):
    """A private copy of the small store (300 episodes, both formats) to damage."""
    return shutil.copytree(small_store, tmp_path / "store")


def _chunk_range(path, i: int) -> tuple[int, int]:
    """Byte offset and length of inner chunk `i` of a Zarr shard file (index at the end)."""
    raw = path.read_bytes()
    index = np.frombuffer(raw[-(fmt.EPISODES_PER_SHARD * 16 + 4) : -4], "<u8").reshape(-1, 2)
    return int(index[i, 0]), int(index[i, 1])


def _flip(path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x5A
    path.write_bytes(bytes(data))


def _problems(report, kind):
    return [p for p in report.problems if p.kind == kind]


def test_clean_store_verifies(small_source, small_store):
    report = verify(small_store, src=small_source, deep=True)
    assert report.ok, report.to_text()
    assert report.checked["episodes compared with the source"] == 300


@pytest.mark.parametrize("array,episode", [("obs", 37), ("action", 260), ("reward", 299)])
def test_flipped_byte_names_exactly_that_chunk(store, array, episode):
    rel = fmt.zarr_shard_file(array, episode // fmt.EPISODES_PER_SHARD)
    offset, length = _chunk_range(store / rel, episode % fmt.EPISODES_PER_SHARD)
    _flip(store / rel, offset + length // 2)
    report = verify(store)
    bad = _problems(report, "checksum")
    assert [(p.where, p.episodes) for p in bad] == [(rel, [episode, episode + 1])], report.to_text()
    assert [p.where for p in _problems(report, "file-hash")] == [rel]
    with pytest.raises(
        CorruptStoreError, match=rf"array '{array}', episodes \[{episode}, {episode + 1}\)"
    ):
        open_store(store).read_episode(episode)
    open_store(store).read_episode(episode + 1 if episode < 299 else episode - 1)  # neighbours read


def test_flipped_byte_in_a_webdataset_tar(store):
    rel = fmt.wds_shard_file(1)
    size = (store / rel).stat().st_size
    _flip(store / rel, size // 2)
    report = verify(store)
    kinds = {p.kind for p in report.problems}
    assert "file-hash" in kinds and kinds & {"webdataset", "format-mismatch"}, report.to_text()
    assert all(p.where == rel for p in report.problems)


def test_deleted_files_are_reported_precisely(store):
    (store / fmt.zarr_shard_file("action", 1)).unlink()
    (store / fmt.wds_shard_file(0)).unlink()
    report = verify(store)
    missing = {(p.where, tuple(p.episodes)) for p in _problems(report, "missing-file")}
    assert missing == {
        (fmt.zarr_shard_file("action", 1), (256, 300)),
        (fmt.wds_shard_file(0), (0, 256)),
    }


@pytest.mark.parametrize("name", [fmt.META_FILE, fmt.INDEX_FILE, fmt.MANIFEST_FILE])
def test_truncated_metadata_is_reported(store, name):
    path = store / name
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    report = verify(store)
    assert [(p.kind, p.where) for p in report.problems] == [("metadata", name)]
    if name != fmt.MANIFEST_FILE:
        with pytest.raises(CorruptStoreError, match=name):
            open_store(store)


def test_stored_values_that_break_the_policy_are_reported(store):
    # a store written by something else: NaN outside row 0 and a wrong task, checksums valid
    import zarr

    with zarr.config.set(fmt.ZARR_WRITE_CONFIG):
        obs = zarr.open_array(store / fmt.ZARR_DIR / "obs", mode="r+")
        ep = obs[5]
        ep[3, 0] = np.nan
        obs[5] = ep
        zarr.open_array(store / fmt.ZARR_DIR / "task", mode="r+")[7] = 29
    report = verify(store)
    assert {
        (p.kind, tuple(p.episodes))
        for p in report.problems
        if p.where.startswith(fmt.ZARR_DIR + " ")
    } == {
        ("nan", (5, 6)),
        ("task", (7, 8)),
    }


def test_source_mismatch_is_reported(small_source, store, tmp_path):
    src = shutil.copytree(small_source, tmp_path / "src")
    from conftest import load_chunk, save_chunk

    data = load_chunk(src / "chunk_1.pt")
    data["reward"][4, 10] += 1.0
    save_chunk(data, src / "chunk_1.pt")
    report = verify(store, src=src, deep=True)
    assert [(p.kind, p.episodes) for p in report.problems] == [("source-mismatch", [104, 105])]


def test_verify_cli_exit_codes_and_json(store):
    from click.testing import CliRunner

    from tools.cli import main as tools_cli

    ok = CliRunner().invoke(tools_cli, ["verify-shards", str(store), "--json"])
    assert ok.exit_code == 0 and json.loads(ok.output)["ok"] is True
    (store / fmt.wds_shard_file(1)).unlink()
    bad = CliRunner().invoke(tools_cli, ["verify-shards", str(store)])
    assert bad.exit_code == 1 and "missing-file" in bad.output and "repair" in bad.output


# --- builds under faults -------------------------------------------------------------------


@pytest.fixture(scope="module")
def kill_source(tmp_path_factory):
    """1,200 episodes = 5 shards, so kills land between, inside and after units."""
    root = tmp_path_factory.mktemp("kill")
    src = make_source(root / "src", episodes_per_task=40, chunks=3)
    return src, build_store(src, root / "reference")


def _build_cmd(src, dst):
    return [
        sys.executable,
        "-m",
        "datapipe.cli",
        "build",
        "--src",
        str(src),
        "--dst",
        str(dst),
        "--format",
        "both",
        "--workers",
        "0",
        "--no-progress",
    ]


@pytest.mark.slow
def test_sigkill_at_random_points_then_resume(kill_source, tmp_path):
    src, reference = kill_source
    t0 = time.perf_counter()
    subprocess.run(_build_cmd(src, tmp_path / "timing"), check=True, capture_output=True)
    full = time.perf_counter() - t0
    for seed in range(5):
        dst = tmp_path / f"killed-{seed}"
        proc = subprocess.Popen(
            _build_cmd(src, dst), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        time.sleep(random.Random(seed).uniform(0.2, 1.0) * full)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        subprocess.run(_build_cmd(src, dst), check=True, capture_output=True)
        assert verify(dst).ok, f"seed {seed}"
        assert store_digest(dst) == store_digest(reference), f"seed {seed}"


def test_corrupt_source_bytes_fail_the_build(small_source, tmp_path):
    src = shutil.copytree(small_source, tmp_path / "src")
    path = src / "chunk_2.pt"
    data = bytearray(path.read_bytes())
    data[len(data) // 3 : len(data) // 3 + 64] = b"\xff" * 64  # inside the obs tensor: NaN
    path.write_bytes(bytes(data))
    with pytest.raises(SourceError, match=r"chunk_2\.pt, episode \d+ .*obs is NaN"):
        build_store(src, tmp_path / "store")
    assert not (tmp_path / "store" / fmt.META_FILE).exists()


def test_corrupt_zip_directory_fails_the_build(small_source, tmp_path):
    src = shutil.copytree(small_source, tmp_path / "src")
    path = src / "chunk_0.pt"
    data = bytearray(path.read_bytes())
    data[-200:] = b"\x00" * 200  # the zip central directory
    path.write_bytes(bytes(data))
    with pytest.raises(SourceError, match=r"chunk_0\.pt: cannot be read"):
        build_store(src, tmp_path / "store")


def _limit_file_size(limit: int):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a too-large write fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_disk_full_fails_cleanly_then_resumes(kill_source, tmp_path):
    src, reference = kill_source
    dst = tmp_path / "store"
    run = subprocess.run(
        _build_cmd(src, dst), capture_output=True, text=True, preexec_fn=_limit_file_size(2_000_000)
    )
    assert run.returncode != 0
    assert "writing the store failed" in run.stderr and "run the same command again" in run.stderr
    assert not (dst / fmt.META_FILE).exists()
    subprocess.run(_build_cmd(src, dst), check=True, capture_output=True)
    assert verify(dst).ok
    assert store_digest(dst) == store_digest(reference)


def test_write_errors_become_build_write_errors(small_source, tmp_path, monkeypatch):
    def full(*args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("datapipe.build.build_shard", full)
    with pytest.raises(BuildWriteError, match="Free disk space"):
        build_store(small_source, tmp_path / "store")


def test_repair_rebuilds_damaged_shards(small_source, small_store, store):
    rel = fmt.zarr_shard_file("obs", 1)
    offset, length = _chunk_range(store / rel, 3)
    _flip(store / rel, offset + length // 2)
    (store / fmt.wds_shard_file(0)).unlink()
    (store / fmt.ZARR_DIR / "reward" / "c" / ".0.tmp.123").write_bytes(b"junk")
    from datapipe.repair import repair

    shards, report = repair(store, small_source)
    assert shards == [0, 1] and report.ok, report.to_text()
    assert store_digest(store) == store_digest(small_store)


def test_repair_refuses_another_source_and_metadata_damage(small_source, store, tmp_path):
    from datapipe.repair import repair

    (store / fmt.wds_shard_file(1)).unlink()
    other = make_source(tmp_path / "other", episodes_per_task=10, chunks=3, seed=5)
    with pytest.raises(SourceError, match="not the source"):
        repair(store, other)
    path = store / fmt.INDEX_FILE
    path.write_text(path.read_text()[:50])
    with pytest.raises(CorruptStoreError, match="rebuild the whole store"):
        repair(store, small_source)


def test_damaged_array_metadata_is_reported(store):
    (store / fmt.ZARR_DIR / "obs" / "zarr.json").write_text("{")
    report = verify(store)
    assert [p.kind for p in report.problems] == ["metadata"] and "zarr.json" in report.problems[
        0
    ].where
