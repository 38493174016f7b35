"""`datapipe build`: MT30 chunks -> a Zarr (and optionally WebDataset) store, resumably.

Reads top to bottom: scan and check the sources, derive the plan, prepare (or resume) the
destination, run the missing work units on dask, then commit the store: index, manifest,
config, and last `meta.json`, which marks it complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from datapipe import __version__
from datapipe import format as fmt
from datapipe.errors import (
    BuildConfigError,
    BuildWriteError,
    DatapipeError,
    DestinationError,
    SourceError,
)
from datapipe.location import DISK_FULL, Location, is_storage_error, only_writer
from datapipe.options import setting
from datapipe.progress import Progress
from datapipe.source import NOT_PLANNED, Layout, SourceFile, scan_sources
from datapipe.tasksets import TASK_SETS, TaskSet, get_task_set, match_task_set
from datapipe.units import Piece, build_shard, hash_source, write_json_atomic


@dataclass(frozen=True)
class BuildConfig:
    """Settings of `datapipe build` (one field per flag; the options are generated from them)."""

    src: str | Path = setting(
        help="Folder of chunk_K.pt files: a path or an fsspec URL (s3://bucket/mt30)."
    )
    dst: str | Path = setting(
        help="Store folder to write, or to finish after an interruption: a path or an fsspec URL."
    )
    formats: tuple[str, ...] = setting(
        ("zarr",), "Which store formats to write: zarr, webdataset or both."
    )
    workers: int = setting(
        2, "Local dask worker processes (0: run in this process, no dask; -1: one per core)."
    )
    scheduler: str | None = setting(None, "Address of a running dask.distributed scheduler.")
    task_set: str = setting("auto", "mt30, mt80 or auto (the known set matching the dims).")
    progress: bool = setting(True, "Progress bar: rows/s and ETA (a line a minute off a terminal).")


def resolve_task_set(name: str, layout: Layout, src: str | Path) -> TaskSet:
    if name != "auto":
        ts = get_task_set(name)
    elif (ts := match_task_set(layout.obs_dim, layout.action_dim)) is None:
        raise SourceError(
            f"{src}: no known task set has obs dim {layout.obs_dim} and action dim "
            f"{layout.action_dim}; pass --task-set (mt30 or mt80)."
        )
    if (ts.obs_dim, ts.action_dim) != (layout.obs_dim, layout.action_dim):
        raise SourceError(
            f"{src}: the data has obs dim {layout.obs_dim} and action dim {layout.action_dim}, "
            f"task set {ts.name} needs {ts.obs_dim} and {ts.action_dim}: pick the right --task-set."
        )
    if layout.rows != ts.rows:
        print(
            f"warning: {src}: episodes of {layout.rows} rows, where {ts.name}'s have {ts.rows} "
            f"(a reset row + {ts.rows - 1} steps). They are stored as they are, and the trainer "
            f"derives its discount from their {layout.rows - 1} steps; if they were cut or "
            f"padded, that differs from the official data's.",
            file=sys.stderr,
        )
    return ts


def make_plan(sources: list[SourceFile], layout: Layout, ts: TaskSet, formats) -> dict:
    """Everything that decides the store's bytes; equal plans give identical stores."""
    return {
        "format_version": fmt.FORMAT_VERSION,
        "formats": sorted(formats),
        "task_set": ts.name,
        "layout": asdict(layout),
        "n_episodes": sum(s.episodes for s in sources),
        "sources": [{k: v for k, v in asdict(s).items() if k not in NOT_PLANNED} for s in sources],
    }


def shard_pieces(sources: list[SourceFile], shard: int, n_episodes: int) -> list[Piece]:
    """The source episode ranges that make up one shard."""
    eps = fmt.shard_episodes(shard, n_episodes)
    pieces = []
    for s in sources:
        lo, hi = max(eps.start, s.start), min(eps.stop, s.start + s.episodes)
        if lo < hi:
            pieces.append(Piece(s, lo - s.start, hi - s.start))
    return pieces


def _read_json(loc: Location, rel: str):
    return json.loads(loc.read_bytes(rel))


def _create_arrays(dst: Location, plan: dict) -> None:
    """Create the empty Zarr group: its metadata files are made in a local temp folder, then
    published array by array, the group's own zarr.json last (its presence means done)."""
    import zarr

    group_file = f"{fmt.ZARR_DIR}/zarr.json"
    if dst.exists(group_file):
        return
    with tempfile.TemporaryDirectory() as tmp:
        group = zarr.open_group(tmp, mode="w", attributes={"format_version": fmt.FORMAT_VERSION})
        lay = plan["layout"]
        for name in fmt.ARRAYS:
            shape = fmt.array_shape(
                name, plan["n_episodes"], lay["rows"], lay["obs_dim"], lay["action_dim"]
            )
            group.create_array(**fmt.zarr_array_kwargs(name, shape))
        for name in fmt.ARRAYS:
            rel = f"{name}/zarr.json"
            dst.write_atomic(f"{fmt.ZARR_DIR}/{rel}", (Path(tmp) / rel).read_bytes())
        dst.write_atomic(group_file, (Path(tmp) / "zarr.json").read_bytes())


def _check_is_folder(dst: Location) -> None:
    """Refuse a destination that is a file, or lies under one (nothing is written)."""
    if dst.is_file():
        raise DestinationError(
            f"{dst}: is a file, but a store is a folder. Pass a new or empty folder as --dst."
        )
    if dst.local:
        above = next((p for p in Path(dst.root).parents if p.exists()), None)
        if above is not None and not above.is_dir():
            raise DestinationError(
                f"{dst}: {above} is a file, so no folder can be made below it. Pass a --dst "
                f"outside it."
            )


def _read_existing(dst: Location, rel: str, what: str) -> dict:
    """Metadata file `rel` of what `dst` holds; DestinationError if it is damaged."""
    try:
        data = _read_json(dst, rel)
        if not isinstance(data, dict):
            raise ValueError(f"holds a JSON {type(data).__name__}, not an object")
    except (OSError, ValueError) as e:
        raise DestinationError(
            f"{dst.child(rel)}: unreadable ({type(e).__name__}: {e}): {dst} holds {what} whose "
            f"metadata is damaged, so it can be neither resumed nor reused. Run the same "
            f"command with a new --dst (e.g. --dst {dst.url}-rebuilt), or delete {dst} and run "
            f"it again."
        ) from e
    return data


def _changed_sources(old: dict, new: dict) -> list[str]:
    """Source files of the same names whose size or bytes differ between two build plans."""
    before = {s["name"]: s for s in old.get("sources", [])}
    after = {s["name"]: s for s in new["sources"]}
    if before.keys() != after.keys():
        return []
    return [name for name in after if before[name] != after[name]]


def prepare_destination(dst: Location, plan: dict, command: str) -> bool:
    """Create, or check for resuming, the store at `dst`; False if it is already complete."""
    _check_is_folder(dst)
    identity = {k: v for k, v in plan.items() if k != "command"}
    if dst.exists(fmt.META_FILE):
        if _read_existing(dst, fmt.META_FILE, "a store").get("plan") != identity:
            raise DestinationError(
                f"{dst}: holds a complete store of a different dataset or build settings. "
                f"Choose another --dst, or delete {dst} to rebuild."
            )
        dst.remove_tree(fmt.BUILD_DIR)
        return False
    if dst.exists(fmt.PLAN_FILE):
        old = _read_existing(dst, fmt.PLAN_FILE, "an unfinished build")
        if _changed_sources(old, identity):
            raise DestinationError(
                f"{dst}: holds an unfinished build from other bytes of the same source files "
                f"({', '.join(_changed_sources(old, identity))} changed since it began), so its "
                f"finished units cannot be kept. Delete {dst} and run the command again, or "
                f"use a new --dst."
            )
        if {k: v for k, v in old.items() if k != "command"} != identity:
            raise DestinationError(
                f"{dst}: holds an unfinished build of a different dataset or settings (started "
                f"by `{old.get('command')}`). Finish it with that command, or delete {dst}."
            )
    elif not dst.is_empty():
        raise DestinationError(
            f"{dst}: exists, is not empty and is not a datapipe store: choose an empty or new --dst."
        )
    else:
        write_json_atomic(dst, fmt.PLAN_FILE, {**identity, "command": command})
    _create_arrays(dst, plan)
    dst.remove_stale_temps()  # left by a killed run; its unit is redone
    return True


def _run(jobs: list[tuple], cfg: BuildConfig, total_rows: int, done_rows: int) -> None:
    """Run (fn, args, rows) jobs on dask (or in-process with workers=0), with progress."""
    bar = Progress(total_rows, "build", "row", enabled=cfg.progress, initial=done_rows)
    if cfg.workers == 0 and cfg.scheduler is None:
        for fn, args, rows in jobs:
            fn(*args)
            bar.update(rows)
        bar.close()
        return
    from dask.distributed import Client, LocalCluster, as_completed

    if cfg.scheduler is not None:
        client, cluster = Client(cfg.scheduler), None
    else:
        n_workers = (os.cpu_count() or 1) if cfg.workers == -1 else cfg.workers
        cluster = LocalCluster(  # a unit's error is re-raised here: no worker log of it
            n_workers=n_workers, threads_per_worker=1, processes=True, dashboard_address=":0",
            silence_logs=logging.CRITICAL,
        )  # fmt: skip
        client = Client(cluster)
    futures = {client.submit(fn, *args, pure=False): rows for fn, args, rows in jobs}
    try:
        for future in as_completed(futures):
            future.result()  # re-raises the unit's own error (e.g. a SourceError)
            bar.update(futures[future])
    finally:
        bar.close()
        client.cancel(list(futures))
        client.close()
        if cluster is not None:
            cluster.close()


def _index(records: list[dict], ts: TaskSet, rows: int) -> dict:
    """task name -> episode ranges, counts, rows; merged from the units' task runs."""
    runs: dict[int, list[list[int]]] = {t: [] for t in range(ts.n_tasks)}
    for rec in sorted(records, key=lambda r: r["shard"]):
        for task, start, stop in rec["task_runs"]:
            ranges = runs[task]
            if ranges and ranges[-1][1] == start:
                ranges[-1][1] = stop
            else:
                ranges.append([start, stop])
    tasks = []
    for t in range(ts.n_tasks):
        n = sum(b - a for a, b in runs[t])
        tasks.append(
            {"id": t, "name": ts.names[t], "episodes": n, "rows": n * rows, "ranges": runs[t]}
        )
    return {"format_version": fmt.FORMAT_VERSION, "tasks": tasks}


def _chunk_crcs(dst: Location, record: dict, name: str) -> list[int]:
    """The chunk crc32c list of array `name` in a unit's record (a unit recorded by a build
    before the table existed: read from its shard file)."""
    crcs = record.get("chunk_crc32c", {}).get(name)
    if crcs is None:
        crcs = fmt.chunk_crcs(dst.read_bytes(fmt.zarr_shard_file(name, record["shard"])), name)
    return crcs


def _sha256(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()


def _commit(
    dst: Location, cfg: BuildConfig, plan: dict, sources: list[SourceFile], ts: TaskSet
) -> None:
    """Write index, manifest, config, then meta.json (the completeness mark); drop _build."""
    n_shards = fmt.n_shards(plan["n_episodes"])
    records = [_read_json(dst, fmt.unit_record_file(k)) for k in range(n_shards)]
    hashes = [_read_json(dst, fmt.source_record_file(i))["sha256"] for i in range(len(sources))]
    rows = plan["layout"]["rows"]
    index = _index(records, ts, rows)
    files = {rel: info for rec in records for rel, info in rec["files"].items()}
    dst.remove_stale_temps()  # of a worker lost mid-write, whose unit was redone elsewhere
    written = {fmt.INDEX_FILE: write_json_atomic(dst, fmt.INDEX_FILE, index)}
    manifest = write_json_atomic(dst, fmt.MANIFEST_FILE, {"files": dict(sorted(files.items()))})
    written[fmt.MANIFEST_FILE] = manifest
    if "zarr" in plan["formats"]:
        table = {a: [_chunk_crcs(dst, rec, a) for rec in records] for a in fmt.ARRAYS}
        table = {a: np.asarray(v, np.uint32) for a, v in table.items()}
        blob = fmt.encode_crc_table(table, manifest["sha256"])
        dst.write_atomic(fmt.CHUNK_CRC_FILE, blob)
    config = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()}
    write_json_atomic(dst, fmt.CONFIG_FILE, config)
    metadata = {  # as published (the Zarr metadata was written when the build began)
        rel: written[rel]["sha256"] if rel in written else _sha256(dst.read_bytes(rel))
        for rel in fmt.metadata_files(plan["formats"])
    }
    lay = plan["layout"]
    meta = fmt.StoreMeta(
        created_by=f"mt30-datapipe {__version__}",
        task_set=ts.name,
        task_names=tuple(ts.names),
        obs_dims=tuple(ts.obs_dims),
        action_dims=tuple(ts.action_dims),
        obs_dim=lay["obs_dim"],
        action_dim=lay["action_dim"],
        rows_per_episode=rows,
        n_episodes=plan["n_episodes"],
        n_rows=plan["n_episodes"] * rows,
        formats=tuple(plan["formats"]),
        n_shards=n_shards,
        sources=tuple(
            fmt.StoreSource(s.name, s.size, h, s.episodes, s.start)
            for s, h in zip(sources, hashes, strict=True)
        ),
        plan=plan,
        metadata=metadata,
    )
    write_json_atomic(dst, fmt.META_FILE, fmt.seal(meta.to_json()))
    dst.remove_tree(fmt.BUILD_DIR)


def _forget(dst: Location, sources: list[SourceFile], n: int, path: str | None) -> None:
    """Drop what an unfinished build recorded of the source file at `path` (its sha256, the
    units that read it): a fixed file may differ anywhere, and the store must hold its bytes
    and its provenance, not the bad file's."""
    for i, s in enumerate(sources):
        if s.path != path:
            continue
        dst.remove(fmt.source_record_file(i))
        for k in range(fmt.n_shards(n)):
            if any(p.file.path == path for p in shard_pieces(sources, k, n)):
                dst.remove(fmt.unit_record_file(k))


def build(cfg: BuildConfig, command: str = "datapipe build") -> str:
    """Build (or finish building) the store `cfg.dst` from `cfg.src`; returns its location
    (an absolute path, or the URL)."""
    unknown = set(cfg.formats) - set(fmt.FORMATS)
    if unknown or not cfg.formats:
        raise BuildConfigError(
            f"formats must be a non-empty subset of {fmt.FORMATS}, got {cfg.formats}"
        )
    if cfg.workers < -1:
        raise BuildConfigError(
            f"--workers {cfg.workers}: give 0 (in this process), -1 (one per core) or a count"
        )
    if cfg.task_set != "auto" and cfg.task_set not in TASK_SETS:
        raise BuildConfigError(
            f"--task-set {cfg.task_set}: give auto or one of {', '.join(TASK_SETS)}"
        )
    sources, layout = scan_sources(cfg.src)
    ts = resolve_task_set(cfg.task_set, layout, cfg.src)
    plan = make_plan(sources, layout, ts, cfg.formats)
    dst = Location(cfg.dst)
    try:
        return _build(cfg, dst, sources, layout, ts, plan, command)
    except Exception as e:
        if dst.local or isinstance(e, DatapipeError) or not is_storage_error(e):
            raise
        raise dst.access_error(e, "building the store") from e


def _build(cfg, dst: Location, sources, layout: Layout, ts: TaskSet, plan, command) -> str:
    """Prepare or resume `dst`, run the missing units, commit; see build(). A local
    destination is locked for the whole build: a second build into it stops at once."""
    if not dst.local:
        return _build_locked(cfg, dst, sources, layout, ts, plan, command)
    _check_is_folder(dst)
    with only_writer(dst.root, "another `datapipe build`", DestinationError):
        return _build_locked(cfg, dst, sources, layout, ts, plan, command)


def _build_locked(cfg, dst: Location, sources, layout: Layout, ts: TaskSet, plan, command):
    if not prepare_destination(dst, plan, command):
        print(f"{dst}: already complete; nothing to do.")
        return dst.url
    n = plan["n_episodes"]
    jobs, done_rows = [], 0
    done = {f"{d}/{name}" for d in (fmt.SOURCES_DIR, fmt.UNITS_DIR) for name in dst.listdir(d)}
    for i, s in enumerate(sources):
        if fmt.source_record_file(i) not in done:
            jobs.append((hash_source, (dst.url, i, s.path), 0))
    for k in range(fmt.n_shards(n)):
        rows = len(fmt.shard_episodes(k, n)) * layout.rows
        if fmt.unit_record_file(k) in done:
            done_rows += rows
            continue
        jobs.append(
            (
                build_shard,
                (dst.url, k, shard_pieces(sources, k, n), ts.name, plan["formats"]),
                rows,
            )
        )
    t0 = time.perf_counter()
    try:
        _run(jobs, cfg, n * layout.rows, done_rows)
        _commit(dst, cfg, plan, sources, ts)
    except SourceError as e:
        _forget(dst, sources, n, e.path)
        raise SourceError(
            f"{dst}: the build stopped at a bad source file and is left unfinished; once the "
            f"file is fixed, the same command finishes it (or says why it cannot). {e}",
            path=e.path,
        ) from e
    except OSError as e:
        if e.errno not in DISK_FULL:
            raise
        raise BuildWriteError(
            f"{dst}: writing the store failed ({e}). Free disk space (or raise the file size "
            f"limit) and run the same command again: finished units are kept."
        ) from e
    dt = time.perf_counter() - t0  # printed with or without progress: the run's outcome
    print(f"{dst}: complete ({n} episodes, {n * layout.rows} rows, {dt:.1f} s this run)")
    return dst.url
