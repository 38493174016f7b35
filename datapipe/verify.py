"""`tools verify-shards`: prove a store complete and uncorrupted, or list every problem.

Checks, in order: metadata (present, parseable, version, complete); counts (metadata against
the per-task index, the index covering every episode once); the manifest (every data file
present with its size and sha256, nothing unexpected); then shard by shard, in bounded memory:
every Zarr chunk's crc32c and decode, shapes and dtypes, the NaN policy (only action/reward
at row 0), task ids against the range and the index, the WebDataset tar against the index and
against the Zarr arrays; and with a source, episodes equal to the source bit for bit (a
seeded sample, or all of them with `deep`). Problems are collected, never raised.

The report ends with what to do, decided by where the problems are: damage inside shards
(`in_a_shard`, the same test `datapipe repair` applies) gets the exact `datapipe repair`
command; damage to the metadata gets the exact `datapipe build` into a new folder; a missing
store, an unfinished build and a wrong `--src` get their own fix. The verdict is the last
line of the text report and the last key of the JSON one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import tarfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from datapipe import format as fmt
from datapipe.errors import DatapipeError
from datapipe.location import Location
from datapipe.progress import track
from datapipe.shardreader import ShardReader
from datapipe.source import ChunkReader, file_sha256, scan_sources
from datapipe.store import Store, rebuild_command, repair_command

# problems located in a shard's data, which rebuilding that shard fixes
SHARD_KINDS = {
    "checksum",
    "file-hash",
    "missing-file",
    "webdataset",
    "format-mismatch",
    "nan",
    "task",
    "shape",
    "source-mismatch",
    "unexpected-file",
}


@dataclass
class Problem:
    kind: str  # e.g. "checksum", "missing-file", "count", "nan", "source-mismatch"
    where: str  # file (relative to the store), array or metadata name
    detail: str
    episodes: list[int] | None = None  # [lo, hi) store episodes affected, where known


@dataclass
class Report:
    store: str
    problems: list[Problem] = field(default_factory=list)
    checked: dict[str, int] = field(default_factory=dict)
    meta: fmt.StoreMeta | None = field(default=None, repr=False)  # once parsed
    manifest: dict | None = field(default=None, repr=False)
    src: str | None = None  # the source given to compare with, if any
    fix: str | None = None  # the advice, where the problem needs its own (no store, unfinished)

    @property
    def ok(self) -> bool:
        return not self.problems

    def add(self, kind: str, where: str, detail: str, episodes=None) -> None:
        self.problems.append(
            Problem(kind, where, detail, None if episodes is None else list(episodes))
        )

    def count(self, what: str, n: int = 1) -> None:
        self.checked[what] = self.checked.get(what, 0) + n

    def not_in_a_shard(self) -> list[Problem]:
        """The problems that rebuilding shards does not fix."""
        return [p for p in self.problems if not in_a_shard(p)]

    def damaged_shards(self) -> set[int]:
        """The shards holding the problems located in one."""
        return {p.episodes[0] // fmt.EPISODES_PER_SHARD for p in self.problems if p.episodes}

    def advice(self) -> list[str]:
        """What to do about the problems: one command per line."""
        if self.ok:
            return []
        if self.fix is not None:
            return [self.fix]
        root = Location(self.store)
        source = [p for p in self.problems if p.kind == "source"]
        metadata = [p for p in self.not_in_a_shard() if p.kind != "source"]
        src = None if source else self.src  # a --src that is not the store's: not advised
        if metadata:
            return [
                f"rebuild: the metadata is damaged (or of another format version), which "
                f"`datapipe repair` cannot fix; build the store again into a new folder: "
                f"{rebuild_command(root, src)}"
            ]
        lines = []
        if source:
            lines.append(
                f"source: pass the source this store was built from as --src ({source[0].detail})"
            )
        if len(source) < len(self.problems):
            lines.append(
                f"repair: rebuild the damaged shards from the source: {repair_command(root, src)}"
            )
        return lines

    def verdict(self) -> str:
        checked = ", ".join(f"{v} {k}" for k, v in self.checked.items()) or "nothing"
        if self.ok:
            return f"OK: {self.store}; checked {checked}"
        return f"FAILED: {len(self.problems)} problem(s) in {self.store}; checked {checked}"

    def to_json(self) -> str:
        return json.dumps(
            {
                "store": self.store,
                "ok": self.ok,
                "checked": self.checked,
                "problems": [asdict(p) for p in self.problems],
                "advice": self.advice(),
                "verdict": self.verdict(),
            },
            indent=1,
        )

    def to_text(self) -> str:
        lines = [f"verify-shards {self.store}"]
        for p in self.problems:
            eps = f" episodes [{p.episodes[0]}, {p.episodes[1]})" if p.episodes else ""
            lines.append(f"  PROBLEM {p.kind}: {p.where}{eps}: {p.detail}")
        lines += self.advice()
        lines.append(self.verdict())
        return "\n".join(lines)


def in_a_shard(p: Problem) -> bool:
    """Whether rebuilding the shard it names fixes problem `p` (what `datapipe repair` does)."""
    return p.kind in SHARD_KINDS and (p.episodes is not None or p.kind == "unexpected-file")


def _json(root: Location, name: str, report: Report) -> dict | None:
    if not root.exists(name):
        report.add("missing-file", name, "metadata file is missing")
        return None
    try:
        return json.loads(root.read_bytes(name))
    except ValueError as e:
        report.add("metadata", name, f"not valid JSON (truncated or damaged): {e}")
        return None


def _check_metadata(root: Location, report: Report) -> tuple[fmt.StoreMeta, dict, dict] | None:
    doc = _json(root, fmt.META_FILE, report)
    index = _json(root, fmt.INDEX_FILE, report)
    manifest = _json(root, fmt.MANIFEST_FILE, report)
    if doc is None or index is None or manifest is None:
        return None
    try:
        meta = fmt.StoreMeta.from_json(doc)
    except fmt.MetaVersionError as e:
        report.add("version", fmt.META_FILE, f"{e}, expected {fmt.FORMAT_VERSION}")
        return None
    except fmt.MetaError as e:
        report.add("metadata", fmt.META_FILE, str(e))
        return None
    if not meta.complete:
        report.add("incomplete", fmt.META_FILE, "the store is not marked complete")
    _check_metadata_files(root, meta, report)
    return meta, index, manifest


def _check_metadata_files(root: Location, meta: fmt.StoreMeta, report: Report) -> None:
    """Every metadata file has the sha256 meta.json records (stores built since it does)."""
    for rel, want in sorted(meta.metadata.items()):
        if not root.exists(rel):
            report.add("missing-file", rel, "metadata file is missing")
        elif hashlib.sha256(root.read_bytes(rel)).hexdigest() != want:
            report.add(
                "metadata",
                rel,
                f"changed after the build: its sha256 is not the one {fmt.META_FILE} records",
            )
        report.count("metadata checksums")


def _check_crc_table(root: Location, meta: fmt.StoreMeta, report: Report) -> None:
    """chunks.crc32c (stores built since it exists) is whole and made for this manifest."""
    if "zarr" not in meta.formats or not root.exists(fmt.CHUNK_CRC_FILE):
        return
    if any(p.where == fmt.CHUNK_CRC_FILE for p in report.problems):
        return  # already named by its checksum
    manifest_sha256 = hashlib.sha256(root.read_bytes(fmt.MANIFEST_FILE)).hexdigest()
    try:
        fmt.decode_crc_table(
            root.read_bytes(fmt.CHUNK_CRC_FILE), fmt.n_shards(meta.n_episodes), manifest_sha256
        )
    except fmt.MetaError as e:
        report.add("metadata", fmt.CHUNK_CRC_FILE, str(e))
    report.count("metadata files")


def _check_counts(meta: fmt.StoreMeta, index: dict, report: Report) -> None:
    n, rows = meta.n_episodes, meta.rows_per_episode
    if meta.n_rows != n * rows:
        report.add("count", fmt.META_FILE, f"n_rows {meta.n_rows} != {n} episodes x {rows} rows")
    if meta.n_shards != fmt.n_shards(n):
        report.add("count", fmt.META_FILE, f"n_shards {meta.n_shards} != {fmt.n_shards(n)}")
    tasks = index.get("tasks", [])
    if len(tasks) != meta.n_tasks:
        report.add("count", fmt.INDEX_FILE, f"{len(tasks)} tasks, metadata says {meta.n_tasks}")
    cover = np.zeros(n, np.int64)
    for t in tasks:
        eps = sum(b - a for a, b in t["ranges"])
        if eps != t["episodes"] or t["rows"] != eps * rows:
            report.add(
                "count",
                fmt.INDEX_FILE,
                f"task {t['name']}: ranges hold {eps} episodes, "
                f"counts say {t['episodes']} episodes / {t['rows']} rows",
            )
        for a, b in t["ranges"]:
            if not 0 <= a < b <= n:
                report.add(
                    "count", fmt.INDEX_FILE, f"task {t['name']}: range [{a}, {b}) outside [0, {n})"
                )
                continue
            cover[a:b] += 1
    bad = np.flatnonzero(cover != 1)
    if len(bad):
        report.add(
            "count",
            fmt.INDEX_FILE,
            f"{len(bad)} episodes are indexed {cover[bad[0]]} "
            f"times instead of once (first: {bad[0]})",
            [int(bad[0]), int(bad[-1]) + 1],
        )
    report.count("metadata files", 3)


def _expected_files(meta: fmt.StoreMeta) -> dict[str, list[int]]:
    """Every data file of the store -> the [lo, hi) store episodes it holds."""
    files = {}
    for k in range(meta.n_shards):
        eps = fmt.shard_episodes(k, meta.n_episodes)
        names = [fmt.zarr_shard_file(a, k) for a in fmt.ARRAYS] if "zarr" in meta.formats else []
        if "webdataset" in meta.formats:
            names.append(fmt.wds_shard_file(k))
        files.update({name: [eps.start, eps.stop] for name in names})
    return files


def _check_manifest(
    root: Location, meta: fmt.StoreMeta, manifest: dict, report: Report, progress
) -> set[str]:
    """sha256 of every data file; returns the missing ones (the rest are decoded after)."""
    listed, expected = manifest.get("files", {}), _expected_files(meta)
    for rel in sorted(expected.keys() - listed.keys()):
        report.add("manifest", fmt.MANIFEST_FILE, f"does not list {rel}")
    on_disk = {
        rel
        for d in (fmt.ZARR_DIR, fmt.WDS_DIR)
        for rel in root.find(d)
        if rel.rsplit("/", 1)[-1] != "zarr.json"
    }
    for rel in sorted(on_disk - expected.keys()):
        report.add("unexpected-file", rel, "not part of the store (a leftover temp file?)")
    missing = set()
    for rel in progress(sorted(expected), "files"):
        if rel not in on_disk:
            report.add("missing-file", rel, "data file is missing", expected[rel])
            missing.add(rel)
            continue
        with root.open(rel) as f:
            h = hashlib.file_digest(f, "sha256")
            size = f.tell()
        want = listed.get(rel)
        if want and size != want["size"]:
            what = f"size {size} differs from the manifest's {want['size']} (truncated?)"
            report.add("file-hash", rel, what, expected[rel])
        elif want and h.hexdigest() != want["sha256"]:
            report.add("file-hash", rel, "sha256 differs from the manifest", expected[rel])
        report.count("bytes hashed", size)
    report.count("data files", len(expected))
    return missing


def _zarr_arrays(store: Store, reader: ShardReader, eps: range, report: Report) -> dict | None:
    """The shard's arrays, decoded and checksum-verified; each failing chunk is reported by
    its episode (obs/action/reward through the direct shard reader, task through zarr)."""
    shapes = {
        "obs": (store.episode_length, store.obs_dim),
        "action": (store.episode_length, store.action_dim),
        "reward": (store.episode_length,),
    }
    out, ok = {}, True
    shard = eps.start // fmt.EPISODES_PER_SHARD
    for name, shape in shapes.items():
        out[name] = np.empty((len(eps), *shape), np.float32)
        try:
            reader.read(name, np.arange(eps.start, eps.stop), out[name])
            continue
        except DatapipeError:
            ok = False
        failed = []
        for j, e in enumerate(eps):
            try:
                reader.read(name, np.array([e]), out[name][j : j + 1])
            except DatapipeError:
                failed.append(e)
        rel = fmt.zarr_shard_file(name, shard)
        if len(failed) == len(eps):
            report.add(
                "checksum",
                rel,
                f"array {name}: every chunk fails: the shard index or the whole file is damaged",
                [eps.start, eps.stop],
            )
        for e in failed if len(failed) < len(eps) else []:
            report.add(
                "checksum", rel, f"array {name}: chunk of episode {e} fails its crc32c", [e, e + 1]
            )
    try:
        out["task"] = store.read_array("task", eps.start, eps.stop)
    except DatapipeError:
        ok = False
        report.add(
            "checksum",
            fmt.zarr_shard_file("task", shard),
            "task chunk fails its checksum or decode",
            [eps.start, eps.stop],
        )
    report.count("zarr chunks", len(eps) * 3 + 1)
    return out if ok else None


def _wds_arrays(root: Location, eps: range, report: Report) -> dict | None:
    rel = fmt.wds_shard_file(eps.start // fmt.EPISODES_PER_SHARD)
    try:
        with root.open(rel) as f, tarfile.open(fileobj=f) as tar:
            keys, out = fmt.read_wds_tar(tar)
    except (tarfile.TarError, OSError, ValueError, EOFError) as e:
        report.add("webdataset", rel, f"unreadable: {type(e).__name__}: {e}", [eps.start, eps.stop])
        return None
    want = [fmt.wds_key(e) for e in eps]
    if keys != want or any(len(v) != len(eps) for v in out.values()):
        report.add(
            "webdataset",
            rel,
            f"samples {keys[:1]}..{keys[-1:]} ({len(keys)}) do not match "
            f"the index's episodes {want[0]}..{want[-1]}",
            [eps.start, eps.stop],
        )
        return None
    report.count("webdataset samples", len(eps))
    return {k: np.stack(v) if k != "task" else np.asarray(v, np.int32) for k, v in out.items()}


def _check_values(a: dict, eps: range, where: str, store: Store, report: Report) -> None:
    shapes = {
        "obs": (store.episode_length, store.obs_dim),
        "action": (store.episode_length, store.action_dim),
        "reward": (store.episode_length,),
        "task": (),
    }
    for name, shape in shapes.items():
        got = a[name]
        want_dtype = fmt.SOURCE_DTYPES[name]
        if got.shape != (len(eps), *shape) or got.dtype != want_dtype:
            report.add(
                "shape",
                where,
                f"{name} is {got.dtype}{list(got.shape)}, expected "
                f"{want_dtype}{[len(eps), *shape]}",
                [eps.start, eps.stop],
            )
            return
    checks = {"obs": a["obs"], "action": a["action"][:, 1:], "reward": a["reward"][:, 1:]}
    for name, values in checks.items():
        finite = np.isfinite(values).reshape(len(eps), -1).all(axis=1)
        for i in np.flatnonzero(~finite)[:5]:
            report.add(
                "nan",
                where,
                f"{name} holds NaN/inf outside the row-0 fillers",
                [eps.start + i, eps.start + i + 1],
            )
    n_tasks = len(store.task_names)
    expected = store.episode_tasks[eps.start : eps.stop]
    for i in np.flatnonzero((a["task"] < 0) | (a["task"] >= n_tasks) | (a["task"] != expected))[:5]:
        report.add(
            "task",
            where,
            f"task id {a['task'][i]}, index says {expected[i]} (range [0, {n_tasks}))",
            [eps.start + i, eps.start + i + 1],
        )


def _bits_equal(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


def _check_source(a: dict, eps: range, picks, sources, report: Report, rel: str) -> None:
    """Compare the picked episodes with the source, through `sources`: {SourceFile: its open
    ChunkReader} (a chunk's index is parsed once, not once per episode)."""
    for e in picks:
        f = next(s for s in sources if s.start <= e < s.start + s.episodes)
        src = sources[f].read(e - f.start, e - f.start + 1)
        i = e - eps.start
        for name in fmt.ARRAYS:
            stored = (
                a[name][i]
                if name != "task"
                else np.full(src["task"].shape[1], a["task"][i], np.int32)
            )
            if not _bits_equal(stored, src[name][0]):
                report.add(
                    "source-mismatch",
                    rel,
                    f"{name} differs from {f.name} episode {e - f.start}",
                    [e, e + 1],
                )
        report.count("episodes compared with the source")


def _not_a_store(root: Location, report: Report) -> bool:
    """Report a missing store folder, or a file in its place; True if so."""
    src = report.src or "SRC"
    if root.is_file():
        report.add("missing-file", root.url, "is a file, not a store folder")
        report.fix = (
            "build: pass the store's folder, or build a store into a new one: "
            f"datapipe build --src {src} --dst NEW_DST --format both"
        )
    elif root.is_empty():
        report.add("missing-file", root.url, "no such store directory")
        report.fix = (
            "build: there is no store here; build one: "
            f"datapipe build --src {src} --dst {root.url} --format both"
        )
    return report.fix is not None


def _unfinished(root: Location, report: Report) -> bool:
    """Report a store whose build did not finish (a plan, no meta.json); True if so."""
    if root.exists(fmt.META_FILE) or not root.exists(fmt.PLAN_FILE):
        return False
    try:
        command = json.loads(root.read_bytes(fmt.PLAN_FILE))["command"]
    except (OSError, ValueError, KeyError, TypeError):
        return False  # a damaged plan: reported with the rest of the metadata
    report.add("incomplete", fmt.PLAN_FILE, "the build of this store did not finish")
    report.fix = f"finish the build: run it again (only the missing parts are built): {command}"
    return True


def _sources(src, meta: fmt.StoreMeta, report: Report, deep: bool) -> list | None:
    """The source files to compare with, or None (reported) if `src` is not this store's.
    Provenance: every file's size and quick id (its first and last MiB) against the build
    plan, and with `deep` its sha256 against the one meta.json records."""
    try:
        sources, _ = scan_sources(src)
    except DatapipeError as e:
        report.add("source", str(src), f"unreadable: {e}")
        return None
    built_from = [s.name for s in meta.sources]
    if [s.name for s in sources] != built_from:
        report.add(
            "source",
            str(src),
            f"its files differ from the store's sources ({', '.join(built_from)})",
        )
        return None
    planned = meta.plan.get("sources", [])
    for s, recorded, plan in zip(sources, meta.sources, planned, strict=False):
        if (s.size, s.quick_id) != (plan.get("size"), plan.get("quick_id")):
            report.add("source", s.name, "not the file the store was built from (size or bytes)")
        elif deep and file_sha256(s.path) != recorded.sha256:
            report.add("source", s.name, f"its sha256 differs from the one {fmt.META_FILE} records")
        report.count("source files checked" + (" (sha256)" if deep else ""))
    return sources  # compared even where provenance failed: the report says where they differ


def verify(
    path: str | Path,
    src: str | Path | None = None,
    deep: bool = False,
    sample: int = 64,
    seed: int = 0,
    progress: bool = False,
) -> Report:
    """Check the store at `path`, a path or an fsspec URL (and against `src` if given); never
    raises on bad data."""
    root = Location(path)
    report = Report(root.url, src=None if src is None else str(src))
    if _not_a_store(root, report) or _unfinished(root, report):
        return report
    loaded = _check_metadata(root, report)
    if loaded is None:
        return report
    meta, index, manifest = loaded
    report.meta, report.manifest = meta, manifest
    _check_counts(meta, index, report)
    _check_crc_table(root, meta, report)

    def bar(items, what):
        return track(items, f"verify {what}", what.rstrip("s"), enabled=progress)

    missing = _check_manifest(root, meta, manifest, report, bar)
    store = Store(root.url, meta=meta, index=index, check_files=False)  # hashed above
    n = store.n_episodes
    sources, picks = None, set()
    if src is not None:
        sources = _sources(src, meta, report, deep)
        picks = (
            set(range(n))
            if deep
            else set(
                np.random.default_rng(seed).choice(n, size=min(sample, n), replace=False).tolist()
            )
        )
    try:
        reader = ShardReader(store) if "zarr" in meta.formats else None
    except (DatapipeError, OSError, ValueError, KeyError) as e:
        report.add(
            "metadata",
            f"{fmt.ZARR_DIR}/*/zarr.json",
            f"array metadata unreadable or not format v1: {e}",
        )
        return report
    with contextlib.ExitStack() as held:  # the source chunks, each opened once
        if sources is not None:
            sources = {s: held.enter_context(ChunkReader(s.path)) for s in sources}
        for k in bar(range(meta.n_shards), "shards"):
            eps = fmt.shard_episodes(k, n)
            zarr_a = wds_a = None
            if (
                "zarr" in meta.formats
                and not {fmt.zarr_shard_file(a, k) for a in fmt.ARRAYS} & missing
            ):
                zarr_a = _zarr_arrays(store, reader, eps, report)
                if zarr_a is not None:
                    _check_values(zarr_a, eps, f"{fmt.ZARR_DIR} shard {k}", store, report)
            if "webdataset" in meta.formats and fmt.wds_shard_file(k) not in missing:
                wds_a = _wds_arrays(root, eps, report)
                if wds_a is not None:
                    _check_values(wds_a, eps, fmt.wds_shard_file(k), store, report)
            if zarr_a is not None and wds_a is not None:
                for name in fmt.ARRAYS:
                    if not _bits_equal(zarr_a[name], wds_a[name]):
                        report.add(
                            "format-mismatch",
                            fmt.wds_shard_file(k),
                            f"{name} differs from the Zarr array",
                            [eps.start, eps.stop],
                        )
            arrays = zarr_a if zarr_a is not None else wds_a
            if sources is not None and arrays is not None:
                here = sorted(e for e in picks if e in eps)
                _check_source(arrays, eps, here, sources, report, f"shard {k}")
            report.count("shards")
    if reader is not None:
        reader.close()
    return report
