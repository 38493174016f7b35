"""`datapipe repair`: rebuild the damaged shards of a complete store from its source.

Builds are deterministic, so a shard rebuilt from the same source has the same bytes as the
original: every rebuilt file must match its manifest entry, or the repair stops (the source
changed). Damage to the metadata files themselves cannot be repaired this way: rebuild the
store.
"""

from __future__ import annotations

from pathlib import Path

from datapipe import format as fmt
from datapipe.build import shard_pieces
from datapipe.errors import CorruptStoreError, SourceError
from datapipe.location import Location
from datapipe.source import scan_sources
from datapipe.store import rebuild_command
from datapipe.units import build_shard
from datapipe.verify import Report, verify


def damaged_shards(report: Report) -> set[int]:
    """Shards named by the report; CorruptStoreError if something else is damaged."""
    other = report.not_in_a_shard()
    if other:
        raise CorruptStoreError(
            f"{report.store}: {other[0].kind} problem in {other[0].where} ({other[0].detail}) "
            f"is not in a shard, and `datapipe repair` rebuilds shards only. Build the store "
            f"again into a new folder: `{rebuild_command(Location(report.store))}`."
        )
    return report.damaged_shards()


def repair(store: str | Path, src: str | Path) -> tuple[list[int], Report]:
    """Rebuild every damaged shard of `store` from `src`; returns (shards, the new report)."""
    root = Location(store)
    report = verify(root.url)
    shards = sorted(damaged_shards(report))
    for p in report.problems:
        if p.kind == "unexpected-file":
            root.remove(p.where)
    if shards:
        meta = report.meta
        sources, _ = scan_sources(src)
        planned = meta.plan["sources"]
        if [(s.name, s.size, s.quick_id) for s in sources] != [
            (s["name"], s["size"], s["quick_id"]) for s in planned
        ]:
            raise SourceError(
                f"{src}: is not the source this store was built from "
                f"({', '.join(s['name'] for s in planned)}); pass the original --src."
            )
        manifest = report.manifest["files"]
        n = meta.n_episodes
        try:
            for k in shards:
                record = build_shard(
                    root.url,
                    k,
                    shard_pieces(sources, k, n),
                    meta.task_set,
                    list(meta.formats),
                )
                for rel, info in record["files"].items():
                    if manifest.get(rel) != info:
                        raise CorruptStoreError(
                            f"{root.child(rel)}: rebuilt from {src}, but differs from the manifest: "
                            f"the source changed since the build. Rebuild the store."
                        )
        finally:
            root.remove_tree(fmt.BUILD_DIR)  # the rebuilt units' records
    return shards, verify(root.url)
