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
from datapipe.errors import BuildWriteError, CorruptStoreError, DestinationError, SourceError
from datapipe.shardreader import ShardReader
from datapipe.store import open_store
from datapipe.verify import verify


@pytest.fixture
def store(small_store, tmp_path):
    """A private copy of the small store (300 episodes, both formats) to damage."""
    return shutil.copytree(small_store, tmp_path / "store")


def _chunk_range(path, i: int) -> tuple[int, int]:
    """Byte offset and length of inner chunk `i` of a Zarr shard file (index at the end)."""
    raw = path.read_bytes()
    index = fmt.shard_index(raw)
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
    neighbour = episode + 1 if episode < 299 else episode - 1  # intact, in the same file
    with pytest.raises(CorruptStoreError, match=f"{rel}: not the file this store was built with"):
        open_store(store).read_episode(neighbour)
    open_store(store).read_episode(299 if episode < 256 else 0)  # other shards read


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
    with pytest.raises(CorruptStoreError, match=f"{name}: unreadable .* into a new folder"):
        open_store(store)  # readers check every data file against the manifest


@pytest.mark.parametrize(
    "damage, named",
    [
        (lambda m: m["dataset"].pop("n_rows"), "n_rows"),
        (lambda m: m["sources"][0].update(size="big"), "big"),
        (lambda m: m.update(formats=["hdf5"]), "hdf5"),
        (lambda m: m["dataset"].update(n_tasks=7), "n_tasks is 7"),
    ],
)
def test_a_missing_or_malformed_meta_field_is_named(store, damage, named):
    meta = json.loads((store / fmt.META_FILE).read_text())
    damage(meta)
    (store / fmt.META_FILE).write_text(json.dumps(fmt.seal(meta)))  # as a faulty writer would
    (p,) = verify(store).problems
    assert (p.kind, p.where) == ("metadata", fmt.META_FILE) and named in p.detail
    with pytest.raises(CorruptStoreError, match=f"{fmt.META_FILE}: .*{named}.* into a new folder"):
        open_store(store)


@pytest.mark.parametrize(
    "edit",
    [
        lambda m: m["sources"][0].update(sha256="0" * 64),  # provenance
        lambda m: m["dataset"].update(rows_per_episode=m["dataset"]["rows_per_episode"] - 1),
        lambda m: m["metadata"].update({fmt.INDEX_FILE: "0" * 64}),
        lambda m: m.pop(fmt.SEAL_KEY),  # a checksummed store never lacks its seal
    ],
)
def test_any_edit_of_meta_json_is_named(store, edit):
    meta = json.loads((store / fmt.META_FILE).read_text())
    edit(meta)
    (store / fmt.META_FILE).write_text(json.dumps(meta))
    (p,) = verify(store).problems
    assert (p.kind, p.where) == (
        "metadata",
        fmt.META_FILE,
    ) and "changed after the build" in p.detail
    with pytest.raises(CorruptStoreError, match=f"{fmt.META_FILE}: changed after the build"):
        open_store(store)


@pytest.mark.parametrize("rel", [fmt.INDEX_FILE, fmt.MANIFEST_FILE, "episodes.zarr/obs/zarr.json"])
def test_an_edited_metadata_file_is_named_by_open_and_verify(store, rel):
    """A small edit that leaves the file valid (a task label, a sha256, a shape) is named."""
    path = store / rel
    doc = json.loads(path.read_text())
    if rel == fmt.INDEX_FILE:
        doc["tasks"][0]["name"], doc["tasks"][1]["name"] = (
            doc["tasks"][1]["name"],
            doc["tasks"][0]["name"],
        )
    elif rel == fmt.MANIFEST_FILE:
        first = next(iter(doc["files"].values()))
        first["sha256"] = "0" * 64
    else:
        doc["shape"][0] += 1
    path.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    problems = verify(store).problems
    assert ("metadata", rel) in [(p.kind, p.where) for p in problems]
    assert "changed after the build" in problems[0].detail and problems[0].where == rel
    with pytest.raises(CorruptStoreError, match=f"{rel}: changed after the build"):
        store_ = open_store(store)
        ShardReader(store_)  # the array metadata is trusted once a reader opens it
    from datapipe.repair import repair

    with pytest.raises(CorruptStoreError, match="into a new folder"):
        repair(store, store)  # metadata is not a shard: repair refuses before reading --src


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
    assert [(p.kind, p.episodes) for p in report.problems] == [
        ("source", None),  # provenance: chunk_1.pt is not the file the store was built from
        ("source-mismatch", [104, 105]),  # and where it differs
    ]
    assert report.problems[0].where == "chunk_1.pt"


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
    with pytest.raises(
        SourceError,
        match=r"file is fixed, the same command .*chunk_2\.pt, episode \d+ .*obs is NaN",
    ):
        build_store(src, tmp_path / "store")
    assert not (tmp_path / "store" / fmt.META_FILE).exists()
    shutil.copy(small_source / "chunk_1.pt", path)  # "fixed" with other bytes: cannot resume
    with pytest.raises(DestinationError, match=r"chunk_2\.pt changed since it began.* Delete"):
        build_store(src, tmp_path / "store")  # not "run the same command", which cannot work
    shutil.copy(small_source / "chunk_2.pt", path)  # fixed: the original bytes
    assert verify(build_store(src, tmp_path / "store"), src=src, deep=True).ok


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
    with pytest.raises(CorruptStoreError, match="into a new folder: `datapipe build --src"):
        repair(store, small_source)


def test_damaged_array_metadata_is_reported(store):
    (store / fmt.ZARR_DIR / "obs" / "zarr.json").write_text("{")
    report = verify(store)
    assert [p.kind for p in report.problems] == ["metadata", "metadata"]
    assert report.problems[0].where == f"{fmt.ZARR_DIR}/obs/zarr.json"  # its checksum
    assert "zarr.json" in report.problems[1].where  # and what the reader made of it


# --- a shard file that is not the one the manifest names -----------------------------------


def _swap(a, b) -> None:
    data = a.read_bytes()
    a.write_bytes(b.read_bytes())
    b.write_bytes(data)


@pytest.fixture(scope="module")
def other_build(small_source, tmp_path_factory):
    """Another build of the same source files, with chunk_0.pt and chunk_1.pt trading places:
    its shards hold the same episodes in another order."""
    root = tmp_path_factory.mktemp("other_build")
    src = shutil.copytree(small_source, root / "src")
    (src / "chunk_0.pt").rename(src / "held.pt")
    (src / "chunk_1.pt").rename(src / "chunk_0.pt")
    (src / "held.pt").rename(src / "chunk_1.pt")
    return build_store(src, root / "store")


def _swapped_obs(store, other):
    _swap(store / fmt.zarr_shard_file("obs", 0), store / fmt.zarr_shard_file("obs", 1))
    return r"obs/c/[01]/0/0"


def _task_copied(store, other):
    shutil.copy(store / fmt.zarr_shard_file("task", 1), store / fmt.zarr_shard_file("task", 0))
    return r"task/c/0"


def _from_other_build(store, other):
    rel = fmt.zarr_shard_file("reward", 0)
    shutil.copy(other / rel, store / rel)
    return r"reward/c/0/0"


def _read_store(store):
    s = open_store(store)
    for e in (0, 299):
        s.read_episode(e)


def _read_shards(store):
    from datapipe.shardreader import ShardReader

    with ShardReader(open_store(store)) as reader:
        reader.read_episodes([0, 299])


def _load(workers):
    def first_batch(store):
        from datapipe import SliceLoader

        with SliceLoader(store, batch_size=8, cache_gb=0.01, refill_size=8, workers=workers) as lo:
            next(lo)

    return first_batch


@pytest.mark.parametrize("damage", [_swapped_obs, _task_copied, _from_other_build])
@pytest.mark.parametrize(
    "read",
    [_read_store, _read_shards, _load(1), _load(0)],
    ids=["store", "shardreader", "loader", "loader-thread"],
)
def test_every_reader_refuses_a_shard_file_the_manifest_does_not_name(
    store, other_build, damage, read
):
    wrong = damage(store, other_build)
    with pytest.raises(
        CorruptStoreError, match=rf"{wrong}: not the file this store was built"
    ) as e:
        read(store)
    assert f"datapipe repair {store} --src " in str(e.value)
    assert {p.kind for p in verify(store).problems} >= {"file-hash"}


def _swapped_tars(store, other):
    _swap(store / fmt.wds_shard_file(0), store / fmt.wds_shard_file(1))


def _tar_copied(store, other):
    shutil.copy(store / fmt.wds_shard_file(1), store / fmt.wds_shard_file(0))


def _tar_from_other_build(store, other):
    shutil.copy(other / fmt.wds_shard_file(0), store / fmt.wds_shard_file(0))


@pytest.mark.parametrize("damage", [_swapped_tars, _tar_copied, _tar_from_other_build])
def test_the_webdataset_stream_refuses_a_tar_the_manifest_does_not_name(store, other_build, damage):
    from datapipe import WebDatasetStream

    damage(store, other_build)
    stream = iter(WebDatasetStream(store, batch_size=16, shuffle_buffer=16))
    with pytest.raises(CorruptStoreError, match=r"shard-00000[01]\.tar: not the file this store"):
        for _ in range(200):  # one pass is 150 batches
            next(stream)


def test_the_same_file_from_another_build_is_read(store, other_build):
    # shard 1 holds chunk_2.pt's episodes in both builds: byte for byte the manifest's files
    from datapipe import WebDatasetStream

    for rel in (fmt.zarr_shard_file("obs", 1), fmt.wds_shard_file(1)):
        shutil.copy(other_build / rel, store / rel)
    _read_store(store)
    _load(0)(store)
    next(iter(WebDatasetStream(store, batch_size=16, shuffle_buffer=16)))


def test_a_store_without_the_chunk_table_hashes_whole_files_instead(store, other_build):
    # stores built before chunks.crc32c existed: the readers check each file's sha256
    (store / fmt.CHUNK_CRC_FILE).unlink()
    wrong = _swapped_obs(store, other_build)
    with pytest.raises(CorruptStoreError, match=rf"{wrong}: not the file this store was built"):
        _load(0)(store)


def test_loader_start_reads_no_whole_data_file(store, monkeypatch):
    # with the chunk table, which-file checks use the chunks that are read anyway
    from datapipe.store import Store

    def no_hashing(*args):
        raise AssertionError("a data file was hashed whole")

    monkeypatch.setattr(Store, "_digest", no_hashing)
    for workers in (0, 1):
        _load(workers)(store)
    _read_shards(store)


@pytest.mark.parametrize("damage", ["truncated", "from-other-build"])
def test_a_damaged_chunk_table_is_named(store, other_build, damage):
    table = store / fmt.CHUNK_CRC_FILE
    if damage == "truncated":
        table.write_bytes(table.read_bytes()[:-100])
        problem = "its checksum fails"
    else:
        shutil.copy(other_build / fmt.CHUNK_CRC_FILE, table)
        problem = "made for another manifest.json"
    assert [(p.kind, p.where) for p in verify(store).problems] == [("metadata", fmt.CHUNK_CRC_FILE)]
    with pytest.raises(CorruptStoreError, match=f"{fmt.CHUNK_CRC_FILE}: {problem}.* new folder"):
        open_store(store)


# --- what verify-shards advises ------------------------------------------------------------


def _verify_cli(*args):
    from click.testing import CliRunner

    from tools.cli import main as tools_cli

    return CliRunner().invoke(tools_cli, ["verify-shards", *map(str, args)])


def _advised(output: str, prefix: str) -> list[str]:
    """The command of the advice line starting with `prefix`, split into arguments."""
    import shlex

    (line,) = [ln for ln in output.splitlines() if ln.startswith(prefix)]
    return shlex.split(line.split(": ")[-1])


def test_shard_damage_is_advised_the_exact_repair_command(small_source, store):
    from click.testing import CliRunner

    from datapipe.cli import main as datapipe_cli

    _swap(store / fmt.zarr_shard_file("obs", 0), store / fmt.zarr_shard_file("obs", 1))
    result = _verify_cli(store)
    assert result.exit_code == 1
    assert result.output.splitlines()[-1].startswith("FAILED: ")
    command = _advised(result.output, "repair: ")
    assert command == ["datapipe", "repair", str(store), "--src", str(small_source)]
    repaired = CliRunner().invoke(datapipe_cli, command[1:])
    assert repaired.exit_code == 0, repaired.output
    assert _verify_cli(store, "--json").exit_code == 0


@pytest.mark.parametrize("damage", ["meta-damaged", "index-deleted"])
def test_metadata_damage_is_advised_a_rebuild_into_a_new_folder(small_source, store, damage):
    from click.testing import CliRunner

    from datapipe.cli import main as datapipe_cli
    from datapipe.repair import repair

    if damage == "meta-damaged":
        (store / fmt.META_FILE).write_text((store / fmt.META_FILE).read_text()[:100])
    else:
        (store / fmt.INDEX_FILE).unlink()
    result = _verify_cli(store)
    assert result.exit_code == 1 and f"datapipe repair {store}" not in result.output
    assert result.output.splitlines()[-1].startswith("FAILED: 1 problem(s) in ")
    command = _advised(result.output, "rebuild: ")
    new = f"{store}-rebuilt"
    assert command == [
        "datapipe",
        "build",
        "--src",
        str(small_source),
        "--dst",
        new,
        "--format",
        "both",
    ]
    with pytest.raises(CorruptStoreError, match="into a new folder"):
        repair(store, small_source)  # what is not advised is refused
    rebuilt = CliRunner().invoke(datapipe_cli, [*command[1:], "--workers", "0", "--no-progress"])
    assert rebuilt.exit_code == 0, rebuilt.output
    assert verify(new).ok


def test_verdict_is_the_last_line_in_every_output_mode(tmp_path):
    missing = tmp_path / "nothing"
    text = _verify_cli(missing)
    assert text.exit_code == 1
    lines = text.output.splitlines()
    assert lines[-1] == f"FAILED: 1 problem(s) in {missing}; checked nothing"
    assert f"datapipe build --src SRC --dst {missing}" in lines[-2]
    as_json = _verify_cli(missing, "--json")
    report = json.loads(as_json.output)
    assert list(report)[-1] == "verdict" and report["verdict"] == lines[-1]
    assert as_json.exit_code == 1 and report["advice"] == [lines[-2]]
    (tmp_path / "a-file").write_text("x")
    assert "is a file" in _verify_cli(tmp_path / "a-file").output
