"""Source chunks on object storage: scanned, hashed and read with ranged requests from a real
S3-compatible server (moto's server mode, fixture `s3_server`), exactly as the local copy."""

from __future__ import annotations

import dataclasses

import fsspec
import pytest
from conftest import build_store, make_source, store_digest

from datapipe.errors import SourceError
from datapipe.source import file_sha256, read_episodes, scan_sources


@pytest.fixture(scope="module")
def local_src(tmp_path_factory):
    """30 tasks x 1 episode in 2 chunks."""
    return make_source(tmp_path_factory.mktemp("remote") / "src", episodes_per_task=1, chunks=2)


@pytest.fixture
def remote_src(local_src, s3_bucket) -> str:
    """`local_src` uploaded as it is: s3://BUCKET/src/chunk_K.pt."""
    url = f"{s3_bucket}/src"
    fsspec.filesystem("s3").put(str(local_src), url.removeprefix("s3://"), recursive=True)
    return url


def _bits_equal(a, b) -> bool:
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and a[k].tobytes() == b[k].tobytes()
        for k in a
    )


def test_remote_source_scans_hashes_and_reads_like_the_local_copy(local_src, remote_src):
    local, local_layout = scan_sources(local_src)
    remote, remote_layout = scan_sources(remote_src)
    assert remote_layout == local_layout
    assert [f.path for f in remote] == [f"{remote_src}/chunk_{k}.pt" for k in range(2)]
    unpath = [dataclasses.replace(f, path="") for f in remote]
    assert unpath == [dataclasses.replace(f, path="") for f in local]
    for lf, rf in zip(local, remote, strict=True):
        assert file_sha256(rf.path) == file_sha256(lf.path)
        for lo, hi in ((0, lf.episodes), (3, 9), (lf.episodes - 1, lf.episodes)):
            assert _bits_equal(read_episodes(rf.path, lo, hi), read_episodes(lf.path, lo, hi))


def test_corrupt_remote_chunk_names_the_url(local_src, remote_src):
    fs, path = fsspec.core.url_to_fs(f"{remote_src}/chunk_1.pt")
    fs.pipe_file(path, (local_src / "chunk_1.pt").read_bytes()[:100_000])  # truncated
    with pytest.raises(SourceError, match=rf"{remote_src}/chunk_1\.pt: cannot be read.*truncated"):
        scan_sources(remote_src)
    with pytest.raises(SourceError, match=rf"{remote_src}/chunk_1\.pt: cannot be read"):
        read_episodes(f"{remote_src}/chunk_1.pt", 0, 1)


def test_missing_remote_folder_and_chunk(s3_bucket):
    with pytest.raises(SourceError, match="no such source directory"):
        scan_sources(f"{s3_bucket}/nothing")
    with pytest.raises(SourceError, match=r"chunk_0\.pt: cannot be opened.*exists"):
        read_episodes(f"{s3_bucket}/nothing/chunk_0.pt", 0, 1)


def test_build_from_a_remote_source_equals_the_local_build(local_src, remote_src, tmp_path):
    local = build_store(local_src, tmp_path / "local")
    remote = build_store(remote_src, tmp_path / "remote")
    assert store_digest(remote) == store_digest(local)
