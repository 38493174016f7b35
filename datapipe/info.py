"""`datapipe info`: a readable summary of a store (complete or not)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from datapipe import format as fmt
from datapipe.errors import IncompleteStoreError
from datapipe.location import Location
from datapipe.store import open_store
from datapipe.tasksets import get_task_set


def _dir_bytes(root: Location, rel: str) -> int:
    return sum(root.size(f) for f in root.find(rel))


def _human(n: float) -> str:
    """Decimal units: 512 B, 3.8 MB, 1.9 GB."""
    if n < 1000:
        return f"{int(n)} B"
    exponent = min(int(math.log10(n)) // 3, 4)  # 1 KB .. 4 TB
    return f"{n / 1000**exponent:.1f} {('KB', 'MB', 'GB', 'TB')[exponent - 1]}"


def _incomplete_summary(root: Location, err: IncompleteStoreError) -> str:
    plan = json.loads(root.read_bytes(fmt.PLAN_FILE))
    total = fmt.n_shards(plan["n_episodes"])
    done = len(root.listdir(fmt.UNITS_DIR))
    return (
        f"store: {root}\nstatus: INCOMPLETE, {done} of {total} shards built\n"
        f"episodes: {plan['n_episodes']} planned\n{err}"
    )


def _length_note(meta: fmt.StoreMeta) -> list[str]:
    """A line when the episodes are not as long as the task set's (built with a warning)."""
    rows = get_task_set(meta.task_set).rows
    if meta.rows_per_episode == rows:
        return []
    return [f"note: episodes of {meta.rows_per_episode} rows, where {meta.task_set}'s have {rows}"]


def summary(path: str | Path) -> str:
    """The text `datapipe info` prints for the store at `path` (a path or an fsspec URL)."""
    root = Location(path)
    try:
        store = open_store(root.url)
    except IncompleteStoreError as e:
        if root.exists(fmt.PLAN_FILE):
            return _incomplete_summary(root, e)
        raise
    meta = store.meta
    lines = [
        f"store: {root}",
        f"status: complete, format version {meta.format_version} ({meta.created_by})",
        f"dataset: task set {meta.task_set}, {meta.n_tasks} tasks, {meta.n_episodes} "
        f"episodes x {meta.rows_per_episode} rows = {meta.n_rows} rows; obs {meta.obs_dim}, "
        f"action {meta.action_dim}",
        f"formats: {', '.join(meta.formats)}; {meta.n_shards} shards of "
        f"{fmt.EPISODES_PER_SHARD} episodes",
        *_length_note(meta),
        "",
        f"{'array':8} {'dtype':8} {'shape':22} {'raw':>10} {'on disk':>10} {'ratio':>6}",
    ]
    for name, arr in meta.arrays().items():
        if "zarr" not in meta.formats:
            break
        raw = math.prod(arr["shape"]) * 4
        disk = _dir_bytes(root, f"{fmt.ZARR_DIR}/{name}")
        ratio = raw / disk if disk else float("nan")
        shape = "x".join(map(str, arr["shape"]))
        lines.append(
            f"{name:8} {arr['dtype']:8} {shape:22} {_human(raw):>10} {_human(disk):>10} {ratio:6.2f}"
        )
    if "webdataset" in meta.formats:
        lines.append(f"webdataset shards: {_human(_dir_bytes(root, fmt.WDS_DIR))}")
    lines += ["", f"{'id':>3} {'task':28} {'episodes':>9} {'rows':>11}"]
    for t in store.index["tasks"]:
        lines.append(f"{t['id']:>3} {t['name']:28} {t['episodes']:>9} {t['rows']:>11}")
    lines.append("sources: " + ", ".join(f"{s.name} ({_human(s.size)})" for s in meta.sources))
    return "\n".join(lines)
