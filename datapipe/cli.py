"""The `datapipe` command: thin click wrappers over build and info."""

from __future__ import annotations

import shlex
import sys

import click

from datapipe.build import BuildConfig, build
from datapipe.errors import DatapipeError
from datapipe.format import FORMATS
from datapipe.info import summary
from datapipe.options import option


@click.group()
def main() -> None:
    """Convert MT30-format chunks into verified, compressed stores and inspect them."""


def _formats(ctx, param, value: str) -> tuple[str, ...]:
    return FORMATS if value == "both" else (value,)


@main.command("build")
@option(BuildConfig, "src", metavar="PATH|URL", required=True)
@option(BuildConfig, "dst", metavar="PATH|URL", required=True)
@option(BuildConfig, "formats", "--format", type=click.Choice([*FORMATS, "both"]),
        default="zarr", callback=_formats)  # fmt: skip
@option(BuildConfig, "workers", type=int)
@option(BuildConfig, "scheduler")
@option(BuildConfig, "task_set")
@option(BuildConfig, "progress", "--progress/--no-progress")
def build_cmd(**kw) -> None:
    """Build the store DST from the chunks in SRC; re-run the same command to resume."""
    cfg = BuildConfig(**kw)
    command = shlex.join(["datapipe", *sys.argv[1:]]) if sys.argv[1:2] == ["build"] else None
    _run(lambda: build(cfg, command=command or f"datapipe build --src {cfg.src} --dst {cfg.dst}"))


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
