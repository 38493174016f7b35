"""Format version 1 is a promise to every store already built: the committed store in
tests/golden/store-v1 must read back bit for bit with today's code, and today's build must
write the same bytes from the same source.

The golden store was written on 2026-12-02 by `datapipe build --format both --workers 0`
from `make_mt30(MakeConfig(episodes_per_task=1, chunks=2, episode_length=11, seed=0))`:
30 episodes of 11 rows, one per MT30 task, in two chunks. The digests below are sha256 of
that source's arrays (C order; `task` per episode), taken from the source, not the store.
Never regenerate the golden store to make a test pass: a change that fails here breaks
every existing store, and needs a new FORMAT_VERSION (and a new golden store beside this).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
from conftest import build_store, make_source

from datapipe import format as fmt
from datapipe.shardreader import ShardReader
from datapipe.store import open_store
from datapipe.verify import verify

GOLDEN = Path(__file__).parent / "golden" / "store-v1"
SOURCE_DIGESTS = {
    "obs": "d4e65ea407fa49f11e82f31dc121b7e4428727ce8a696ace16441513f2e54a57",
    "action": "a394de68c0d42f984d16c4bf9a4524c9d7bcd52343969ba662a29ff956a104dd",
    "reward": "389bb3fa24facfdf33963384d94f2c81f50458f63a65b5fec3b662a1d8b9e6d1",
    "task": "ee4af19c800863c0ae12bf6472df931ef7f9b630d086ce2372f0ab99d826a08e",
}
SHAPES = {"obs": (30, 11, 24), "action": (30, 11, 6), "reward": (30, 11), "task": (30,)}


def digest(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def golden_copy(tmp_path: Path) -> Path:
    """A copy, so that no reader can change the committed files (and timestamps)."""
    return Path(shutil.copytree(GOLDEN, tmp_path / "store-v1"))


def test_the_store_reader_returns_format_1_bit_for_bit(tmp_path):
    store = open_store(golden_copy(tmp_path))
    assert store.meta.format_version == fmt.FORMAT_VERSION == 1
    assert store.n_episodes == 30 and store.episode_length == 11
    for name, expected in SOURCE_DIGESTS.items():
        got = store.read_array(name, 0, store.n_episodes)
        assert got.shape == SHAPES[name] and digest(got) == expected, name


def test_the_loaders_shard_reader_returns_format_1_bit_for_bit(tmp_path):
    store = open_store(golden_copy(tmp_path))
    episodes = np.arange(store.n_episodes)
    with ShardReader(store) as reader:
        for name in ("obs", "action", "reward"):
            out = np.empty(SHAPES[name], np.float32)
            reader.read(name, episodes, out)
            assert digest(out) == SOURCE_DIGESTS[name], name


def test_the_webdataset_tars_hold_format_1_bit_for_bit():
    with tarfile.open(GOLDEN / fmt.wds_shard_file(0)) as tar:
        keys, arrays = fmt.read_wds_tar(tar)
    assert keys == [fmt.wds_key(i) for i in range(30)]
    for name, values in arrays.items():
        dtype = np.int32 if name == "task" else np.float32
        assert digest(np.asarray(values, dtype=dtype)) == SOURCE_DIGESTS[name], name


def test_todays_build_writes_the_golden_bytes(tmp_path):
    src = make_source(tmp_path / "src", episodes_per_task=1, chunks=2, episode_length=11)
    golden = json.loads((GOLDEN / fmt.META_FILE).read_text())
    sources = [{k: s[k] for k in ("name", "sha256")} for s in golden["sources"]]
    built_src = [
        {"name": p.name, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
        for p in sorted(src.glob("chunk_*.pt"))
    ]
    assert built_src == sources, "make_mt30 no longer writes the golden source: fix it first"
    built = build_store(src, tmp_path / "store", formats=fmt.FORMATS)
    for rel in (fmt.INDEX_FILE, fmt.MANIFEST_FILE, fmt.META_FILE):
        new, old = (json.loads((root / rel).read_text()) for root in (built, GOLDEN))
        if rel == fmt.META_FILE:  # additions since the golden store, which format 1 readers
            # (the golden store's own code included) ignore: the metadata checksums, the seal
            assert fmt.check_seal(new) is True
            new.pop(fmt.SEAL_KEY)
            recorded = new.pop("metadata")
            assert sorted(recorded) == sorted(fmt.metadata_files(fmt.FORMATS))
            for name, sha in recorded.items():
                assert hashlib.sha256((built / name).read_bytes()).hexdigest() == sha, name
        new.pop("created_by", None), old.pop("created_by", None)  # the package version
        assert new == old, rel
    manifest = json.loads((GOLDEN / fmt.MANIFEST_FILE).read_text())
    for rel in manifest["files"]:
        assert (built / rel).read_bytes() == (GOLDEN / rel).read_bytes(), rel


def test_store_meta_reads_and_writes_the_golden_meta_json():
    doc = json.loads((GOLDEN / fmt.META_FILE).read_text())
    assert fmt.StoreMeta.from_json(doc).to_json() == doc


def test_verify_shards_passes_the_golden_store(tmp_path):
    report = verify(golden_copy(tmp_path), deep=True)
    assert report.ok, report.to_text()


def test_info_notes_episodes_shorter_than_the_task_sets(tmp_path):
    from datapipe.info import summary

    assert "note: episodes of 11 rows, where mt30's have 501" in summary(golden_copy(tmp_path))
