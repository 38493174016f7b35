"""Stores on object storage: built into, verified on, and read from a real S3-compatible server
(moto's server mode, started by the session fixture `s3_server`), through the same code paths
and integrity checks as local stores, and byte for byte equal to them."""

from __future__ import annotations

import fsspec
import numpy as np
import pytest
import torch
from conftest import build_store, crash_second_unit, remote_digest, store_digest

import datapipe
from datapipe import format as fmt
from datapipe.errors import CorruptStoreError, IncompleteStoreError, StorageAccessError
from datapipe.shardreader import ShardReader
from datapipe.verify import verify

SMALL = {"cache_gb": 90e-6, "refill_size": 8, "refill_every": 4}


def _flip_remote_byte(url: str, offset: int) -> None:
    fs, path = fsspec.core.url_to_fs(url)
    blob = bytearray(fs.cat_file(path))
    blob[offset] ^= 0xFF
    fs.pipe_file(path, bytes(blob))


def _batches(loader, n):
    return [[t.clone() for t in next(loader)] for _ in range(n)]


@pytest.fixture(scope="module")
def s3_labelled(labelled_store, s3_server):
    """The labelled store, copied as it is onto the S3 server."""
    fs = fsspec.filesystem("s3")
    fs.mkdir("labelled")
    fs.put(str(labelled_store), "labelled/store", recursive=True)
    return "s3://labelled/store"


def test_build_into_s3_equals_the_local_build(small_source, small_store, s3_bucket):
    url = f"{s3_bucket}/mt30"
    assert build_store(small_source, url) is not None
    assert remote_digest(url) == store_digest(small_store)
    store = datapipe.open_store(url)
    assert store.url == url and store.n_episodes == 300
    np.testing.assert_array_equal(
        store.read_episode(257)["obs"], datapipe.open_store(small_store).read_episode(257)["obs"]
    )


def test_interrupted_s3_build_resumes_to_an_identical_store(
    small_source, small_store, s3_bucket, monkeypatch
):
    crash_second_unit(monkeypatch)
    url = f"{s3_bucket}/resumed"
    with pytest.raises(KeyboardInterrupt):
        build_store(small_source, url)
    with pytest.raises(IncompleteStoreError, match="datapipe build"):
        datapipe.open_store(url)
    monkeypatch.undo()
    build_store(small_source, url)
    assert remote_digest(url) == store_digest(small_store)


def test_loader_reads_s3_exactly_as_local(labelled_store, s3_labelled):
    local = _batches(datapipe.SliceLoader(labelled_store, batch_size=32, seed=3, **SMALL), 12)
    remote = _batches(datapipe.SliceLoader(s3_labelled, batch_size=32, seed=3, **SMALL), 12)
    for x, y in zip(local, remote, strict=True):
        assert all(torch.equal(s, t) for s, t in zip(x, y, strict=True))


def test_webdataset_stream_reads_s3_exactly_as_local(labelled_store, s3_labelled):
    def take(path):
        stream = iter(datapipe.WebDatasetStream(path, batch_size=32, seed=1, shuffle_buffer=64))
        return [next(stream) for _ in range(4)]

    for a, b in zip(take(labelled_store), take(s3_labelled), strict=True):
        assert all(torch.equal(s, t) for s, t in zip(a, b, strict=True))


def test_dataloader_workers_stream_from_s3(labelled_store, s3_labelled):
    """Forked DataLoader workers open the S3 tars themselves (fsspec's S3 file system cannot
    cross a fork) and together yield what the same workers yield from the local copy."""

    def take(path):
        stream = datapipe.WebDatasetStream(path, batch_size=16, seed=2, shuffle_buffer=16)
        loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2)
        batches = []
        for batch in loader:
            batches.append(batch)
            if len(batches) == 6:
                return batches

    for a, b in zip(take(labelled_store), take(s3_labelled), strict=True):
        assert all(torch.equal(s, t) for s, t in zip(a, b, strict=True))


def test_s3_store_verifies_a_flipped_byte_is_caught_and_repaired(labelled_store, s3_bucket):
    fs = fsspec.filesystem("s3")
    url = f"{s3_bucket}/store"
    fs.put(str(labelled_store), url.removeprefix("s3://"), recursive=True)
    assert verify(url).ok

    shard = f"{url}/{fmt.zarr_shard_file('action', 1)}"
    index = fmt.shard_index(fs.cat_file(shard.removeprefix("s3://")))
    _flip_remote_byte(shard, int(index[10, 0]) + 20)  # inside the chunk of episode 266

    with pytest.raises(CorruptStoreError) as err:
        ShardReader(datapipe.open_store(url)).read_episodes([266])
    for part in (url, "action/c/1/0/0", "chunk 10", "episode 266"):
        assert part in str(err.value)
    loader = datapipe.SliceLoader(url, batch_size=8, cache_gb=1.0, refill_size=8)
    with pytest.raises(CorruptStoreError, match="crc32c"):
        next(loader)
    report = verify(url)
    assert [(p.kind, p.where, p.episodes) for p in report.problems if p.kind == "checksum"] == [
        ("checksum", fmt.zarr_shard_file("action", 1), [266, 267])
    ]
    from datapipe.repair import repair

    shards, report = repair(url, labelled_store.parent / "src")  # the store's source folder
    assert shards == [1] and report.ok, report.to_text()
    assert remote_digest(url) == store_digest(labelled_store)


def test_a_missing_bucket_is_named_with_the_fix(small_source, s3_server):
    with pytest.raises(StorageAccessError, match=r"s3://no-such-bucket-7/x: building") as err:
        build_store(small_source, "s3://no-such-bucket-7/x")
    assert "bucket exists" in str(err.value) and "AWS_ENDPOINT_URL" in str(err.value)
    with pytest.raises(datapipe.StoreNotFoundError, match="s3://no-such-bucket-7/x: no such"):
        datapipe.open_store("s3://no-such-bucket-7/x")
