"""The `datapipe` command: thin click wrappers over build and info."""

from __future__ import annotations

import shlex
import sys

import click

from datapipe.build import BuildConfig, build
from datapipe.errors import DatapipeError
from datapipe.info import summary


@click.group()
def main() -> None:
    """Convert MT30-format chunks into verified, compressed stores and inspect them."""


@main.command("build")
@click.option("--src", metavar="PATH|URL", required=True,
              help="Folder of chunk_K.pt files: a path or an fsspec URL (s3://bucket/mt30).")  # fmt: skip
@click.option("--dst", metavar="PATH|URL", required=True,
              help="Store folder to write or finish: a path or an fsspec URL.")  # fmt: skip
@click.option("--format", "fmt", type=click.Choice(["zarr", "webdataset", "both"]), default="zarr",
              show_default=True, help="Which store formats to write.")  # fmt: skip
@click.option("--workers", type=int, default=2, show_default=True,
              help="Local dask worker processes (0: run in this process, no dask).")  # fmt: skip
@click.option("--scheduler", default=None, help="Address of a running dask.distributed scheduler.")
@click.option(
    "--task-set", default="auto", show_default=True, help="mt30, mt80 or auto (from the dims)."
)
@click.option("--no-progress", is_flag=True, help="Do not draw a progress bar.")
def build_cmd(src, dst, fmt, workers, scheduler, task_set, no_progress) -> None:
    """Build the store DST from the chunks in SRC; re-run the same command to resume."""
    formats = ("zarr", "webdataset") if fmt == "both" else (fmt,)
    cfg = BuildConfig(src=src, dst=dst, formats=formats, workers=workers, scheduler=scheduler,
                      task_set=task_set, progress=not no_progress)  # fmt: skip
    command = shlex.join(["datapipe", *sys.argv[1:]]) if sys.argv[1:2] == ["build"] else None
    _run(lambda: build(cfg, command=command or f"datapipe build --src {src} --dst {dst}"))


@main.command("info")
@click.argument("store", metavar="STORE")
def info_cmd(store) -> None:
    """Summarise STORE: counts per task, sizes, compression, version, completeness."""
    _run(lambda: click.echo(summary(store)))


@main.command("repair")
@click.argument("store", metavar="STORE")
@click.option("--src", metavar="PATH|URL", required=True, help="The chunks STORE was built from.")
def repair_cmd(store, src) -> None:
    """Rebuild the damaged shards of STORE (as found by verify-shards) from SRC."""
    from datapipe.repair import repair

    def run():
        shards, report = repair(store, src)
        click.echo(f"rebuilt {len(shards)} shard(s): {shards}" if shards else "nothing to repair")
        click.echo(report.to_text())
        if not report.ok:
            raise SystemExit(1)

    _run(run)


def _run(fn) -> None:
    try:
        fn()
    except DatapipeError as e:
        raise click.ClickException(str(e)) from e


if __name__ == "__main__":
    main()
