"""Shared test factories: small MT30-format sources and stores built from them."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from datapipe.build import BuildConfig, build
from datapipe.format import CONFIG_FILE
from tools.make_mt30 import MakeConfig, make_mt30


def make_source(dst: Path, episodes_per_task: int = 2, chunks: int = 2, **kw) -> Path:
    make_mt30(MakeConfig(dst=dst, episodes_per_task=episodes_per_task, chunks=chunks, **kw))
    return dst


def build_store(src: Path, dst: Path, formats=("zarr", "webdataset"), **kw) -> Path:
    kw.setdefault("workers", 0)
    kw.setdefault("progress", False)
    return build(BuildConfig(src=src, dst=dst, formats=formats, **kw))


def load_chunk(path: Path) -> dict:
    """A chunk as a plain dict of tensors (a copy, for editing into bad input)."""
    td = torch.load(path, weights_only=False)
    return {k: td[k].clone() for k in td.keys()}  # noqa: SIM118 (a TensorDict iterates rows)


def save_chunk(data: dict, path: Path) -> None:
    from tensordict import TensorDict

    n, rows = data["obs"].shape[:2]
    torch.save(TensorDict(data, batch_size=[n, rows]), path)


def store_digest(root: Path) -> dict[str, str]:
    """sha256 of every file of a store but the build config (which names the command)."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != CONFIG_FILE
    }


@pytest.fixture(scope="session")
def small_source(tmp_path_factory) -> Path:
    """30 tasks x 10 episodes in 3 chunks: 300 episodes, 2 shards (one partial)."""
    return make_source(tmp_path_factory.mktemp("src"), episodes_per_task=10, chunks=3)


@pytest.fixture(scope="session")
def small_store(small_source, tmp_path_factory) -> Path:
    return build_store(small_source, tmp_path_factory.mktemp("store") / "s")
