"""datapipe build on an existing dask.distributed cluster: a `dask scheduler` and two
`dask worker` processes on localhost, started here, build a store equal to the local build."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time

import pytest
from conftest import store_digest


@pytest.fixture
def cluster(tmp_path):
    dask = shutil.which("dask")
    if dask is None:
        pytest.fail("the `dask` command is missing: install dask[distributed]")
    info = tmp_path / "scheduler.json"
    procs = [
        subprocess.Popen(
            [
                dask,
                "scheduler",
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--dashboard-address",
                ":0",
                "--scheduler-file",
                str(info),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    ]
    try:
        deadline = time.monotonic() + 60
        while not info.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert info.exists(), "dask scheduler did not start in 60 s"
        for _ in range(2):
            procs.append(
                subprocess.Popen(
                    [
                        dask,
                        "worker",
                        "--scheduler-file",
                        str(info),
                        "--nworkers",
                        "1",
                        "--nthreads",
                        "1",
                        "--no-dashboard",
                        "--host",
                        "127.0.0.1",
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        address = json.loads(info.read_text())["address"]
        from dask.distributed import Client

        with Client(address, timeout=60) as client:
            client.wait_for_workers(2, timeout=60)
        yield address
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            p.wait(timeout=30)


def test_build_on_a_running_cluster_equals_the_local_build(
    small_source, small_store, tmp_path, cluster
):
    dst = tmp_path / "cluster-store"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "datapipe.cli",
            "build",
            "--src",
            str(small_source),
            "--dst",
            str(dst),
            "--format",
            "both",
            "--scheduler",
            cluster,
            "--no-progress",
        ],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert store_digest(dst) == store_digest(small_store)
