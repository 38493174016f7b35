"""datapipe build on an existing dask.distributed cluster: a `dask scheduler` and two
`dask worker` processes on localhost, started here, build a store equal to the local build,
from and into local folders or an S3-compatible server."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import store_digest

from tools.dask_cluster import local_dask_cluster


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
