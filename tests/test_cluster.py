"""datapipe build on an existing dask.distributed cluster: a `dask scheduler` and two
`dask worker` processes on localhost, started here, build a store equal to the local build,
from and into local folders or an S3-compatible server."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import fsspec
import pytest
from conftest import build_store, make_source, remote_digest, store_digest

from datapipe import format as fmt
from datapipe.verify import verify
from tools.bench.dask_cluster import local_dask_cluster


@pytest.fixture
def cluster():
    with local_dask_cluster(2) as (address, _):
        yield address


def _build(src: str, dst: str, scheduler: str) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "datapipe.cli", "build", "--src", src, "--dst", dst,
         "--format", "both", "--scheduler", scheduler, "--no-progress"],
        capture_output=True,
        text=True,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]


def test_build_on_a_running_cluster_equals_the_local_build(
    small_source, small_store, tmp_path, cluster
):
    dst = tmp_path / "cluster-store"
    _build(str(small_source), str(dst), cluster)
    assert store_digest(dst) == store_digest(small_store)


def test_a_lost_worker_is_retried_and_the_store_is_the_same(tmp_path):
    """SIGKILL one of two workers once the build is under way: its units are rerun on the
    other, and the store equals an in-process build, without leftovers of the dead worker."""
    src = make_source(tmp_path / "src", episodes_per_task=60, chunks=3)  # 1,800 eps, 8 units
    reference = build_store(src, tmp_path / "reference")
    dst = tmp_path / "store"
    with local_dask_cluster(2) as (address, pids):
        build = subprocess.Popen(
            [sys.executable, "-m", "datapipe.cli", "build", "--src", str(src), "--dst", str(dst),
             "--format", "both", "--scheduler", address, "--no-progress"],
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        units = dst / fmt.UNITS_DIR
        deadline = time.monotonic() + 120
        while not (units.is_dir() and any(units.iterdir())) and time.monotonic() < deadline:
            assert build.poll() is None, build.stderr.read()[-3000:]
            time.sleep(0.05)
        os.kill(pids[-1], signal.SIGKILL)  # a worker dies mid-build
        _, err = build.communicate(timeout=300)
    assert build.returncode == 0, err[-3000:]
    assert not (dst / fmt.BUILD_DIR).exists()  # committed
    assert store_digest(dst) == store_digest(reference)


def test_cluster_build_from_and_into_s3_equals_the_local_build(
    small_source, small_store, s3_bucket, cluster
):
    """Workers read their byte ranges of the chunks from the S3 server and write their shards
    back to it (the workers inherit the endpoint and credentials from the environment)."""
    fsspec.filesystem("s3").put(f"{small_source}/", f"{s3_bucket}/src/", recursive=True)
    _build(f"{s3_bucket}/src", f"{s3_bucket}/store", cluster)
    assert remote_digest(f"{s3_bucket}/store") == store_digest(small_store)
    assert verify(f"{s3_bucket}/store", src=f"{s3_bucket}/src", deep=True).ok
