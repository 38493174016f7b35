"""Shared test factories: small MT30-format sources and stores built from them."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from math import erfc, sqrt
from pathlib import Path

import numpy as np
import pytest
import torch

from datapipe.build import BuildConfig, build
from datapipe.format import CONFIG_FILE
from tools.make_mt30 import MakeConfig, make_mt30


def make_source(dst: Path, episodes_per_task: int = 2, chunks: int = 2, **kw) -> Path:
    make_mt30(MakeConfig(dst=dst, episodes_per_task=episodes_per_task, chunks=chunks, **kw))
    return dst


# The paper's released distilled 1M checkpoints (docs/distillation.md): a real trained
# TD-MPC2 model. A clone outside the development workspace does not have them; the tests that
# need them say so in the summary (`-rs`, tools/test.sh).
TD_MPC_OPT = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "td-mpc-opt"
needs_td_mpc_opt = pytest.mark.skipif(
    not (TD_MPC_OPT / "mt30_1M_steps_045dist_fp16.pt").is_file(),
    reason=f"needs the TD-MPC-Opt checkpoints (mt30_1M_steps_045dist_fp16/int8/mixed.pt) in "
    f"{TD_MPC_OPT}",
)


@contextlib.contextmanager
def lock_held_elsewhere(lock: str) -> Iterator[int]:
    """Another process holding `lock` (a `datapipe.location` lock call, e.g.
    "only_writer('/x', 'a test', RuntimeError)") while the block runs; yields its pid."""
    code = (
        "import time; from datapipe.location import only_writer, only_writer_of_file\n"
        f"with {lock}:\n    print('held', flush=True); time.sleep(60)"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        yield holder.pid
    finally:
        holder.kill()
        holder.wait()


def build_store(src: Path, dst: Path, formats=("zarr", "webdataset"), **kw) -> Path:
    kw.setdefault("workers", 0)
    kw.setdefault("progress", False)
    return Path(build(BuildConfig(src=src, dst=dst, formats=formats, **kw)))


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """A training store, mt30-shaped: 30 tasks x 2 episodes of 501 rows, Zarr only (one per
    test module; a module may define its own `store`)."""
    root = tmp_path_factory.mktemp("train_store")
    return build_store(
        make_source(root / "src", episodes_per_task=2, chunks=1), root / "s", formats=("zarr",)
    )


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, store) -> Path:
    """A 1M teacher for `store`, trained a few steps so that its rewards are not all zero
    (one per test module, like `store`)."""
    from tools.make_teacher import make_teacher

    path = tmp_path_factory.mktemp("teacher") / "t1.pt"
    return make_teacher(1, path, seed=7, train_steps=4, shards=store, batch_size=16, device="cpu")


def load_chunk(path: Path) -> dict:
    """A chunk as a plain dict of tensors (a copy, for editing into bad input)."""
    td = torch.load(path, weights_only=False)
    return {k: td[k].clone() for k in td.keys()}  # noqa: SIM118 (a TensorDict iterates rows)


def save_chunk(data: dict, path: Path) -> None:
    from tensordict import TensorDict

    n, rows = data["obs"].shape[:2]
    torch.save(TensorDict(data, batch_size=[n, rows]), path)


def crash_second_unit(monkeypatch) -> None:
    """Make the next in-process build raise KeyboardInterrupt at its second work unit, as if
    killed there; `monkeypatch.undo()` restores the real unit."""
    from datapipe import units

    real, calls = units.build_shard, []

    def crash_on_second(*args):
        calls.append(args[1])
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated crash")
        return real(*args)

    monkeypatch.setattr("datapipe.build.build_shard", crash_on_second)


def store_digest(root: Path) -> dict[str, str]:
    """sha256 of every file of a store but the build config (which names the command)."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != CONFIG_FILE
    }


def remote_digest(url: str) -> dict[str, str]:
    """store_digest of a store on an fsspec file system."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(url)
    fs.invalidate_cache()
    n = len(root.rstrip("/")) + 1
    return {
        p[n:]: hashlib.sha256(fs.cat_file(p)).hexdigest()
        for p in sorted(fs.find(root))
        if not p.endswith(CONFIG_FILE)
    }


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """One intra-op torch thread for the whole suite: as fast as two for these small models on
    an idle machine, and not slowed down tenfold by contention when other jobs share the cores."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def signals_left_as_found():
    """A test that leaves SIGINT or SIGTERM handled otherwise than it found them changes every
    later test in the process (a subprocess inherits an ignored signal, so Ctrl-C tests stop
    working): restore them and fail that test by name."""
    import signal

    wanted = (signal.SIGINT, signal.SIGTERM)
    before = {s: signal.getsignal(s) for s in wanted}
    yield
    changed = {s.name: (before[s], signal.getsignal(s)) for s in wanted
               if signal.getsignal(s) is not before[s]}  # fmt: skip
    for s in wanted:
        signal.signal(s, before[s])
    assert not changed, f"the test left signal handlers changed (before, after): {changed}"


@pytest.fixture(scope="session")
def small_source(tmp_path_factory) -> Path:
    """30 tasks x 10 episodes in 3 chunks: 300 episodes, 2 shards (one partial)."""
    return make_source(tmp_path_factory.mktemp("src"), episodes_per_task=10, chunks=3)


@pytest.fixture(scope="session")
def small_store(small_source, tmp_path_factory) -> Path:
    return build_store(small_source, tmp_path_factory.mktemp("store") / "s")


def chi2_pvalue(observed: np.ndarray, expected: np.ndarray) -> float:
    """Upper tail of Pearson's chi-square (Wilson-Hilferty normal approximation)."""
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    k = len(observed) - 1
    z = ((chi2 / k) ** (1 / 3) - (1 - 2 / (9 * k))) / sqrt(2 / (9 * k))
    return 0.5 * erfc(z / sqrt(2))


def make_labelled_store(root: Path, episodes_per_task: int = 10, rows: int = 21) -> Path:
    """A store (both formats) whose values name their place, for checking batch semantics:
    obs[..., 0] = store episode, obs[..., 1] = row, action[..., 0] = row and
    reward = 1000 * episode + row, except row 0, which keeps its NaN action/reward fillers."""
    src = make_source(root / "src", episodes_per_task=episodes_per_task, episode_length=rows)
    start = 0
    for path in sorted(src.glob("chunk_*.pt")):
        data = load_chunk(path)
        n = data["obs"].shape[0]
        episode = torch.arange(start, start + n, dtype=torch.float32)[:, None]
        row = torch.arange(rows, dtype=torch.float32)[None, :]
        data["obs"][:, :, 0] = episode
        data["obs"][:, :, 1] = row
        data["action"][:, 1:, 0] = row[:, 1:]
        data["reward"][:, 1:] = 1000 * episode + row[:, 1:]
        save_chunk(data, path)
        start += n
    return build_store(src, root / "store")


@pytest.fixture(scope="session")
def labelled_store(tmp_path_factory) -> Path:
    """30 tasks x 10 episodes of 21 rows (300 episodes: 2 shards, the second partial)."""
    return make_labelled_store(tmp_path_factory.mktemp("labelled"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible server (moto's server mode) on localhost for the whole session.

    It is configured the way a user configures a real one, through the standard AWS
    environment variables, which s3fs (and the dask workers and torchrun ranks the tests
    start, which inherit the environment) read; yields the endpoint URL."""
    exe = shutil.which("moto_server")
    if exe is None:
        pytest.fail("moto_server is missing: pip install -e '.[dev]' (moto[server])")
    port = _free_port()
    proc = subprocess.Popen(
        [exe, "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail("moto_server did not start in 60 s")
                time.sleep(0.2)
        yield endpoint
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_server) -> str:
    """A new, empty bucket on the session's S3 server; yields its URL, `s3://NAME`."""
    import fsspec

    name = f"test-{uuid.uuid4().hex[:12]}"
    fs = fsspec.filesystem("s3")
    fs.mkdir(name)
    return f"s3://{name}"
