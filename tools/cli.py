"""The `tools` command: data generation and measurement helpers around the pipeline."""

from __future__ import annotations

from pathlib import Path

import click

from tools.make_mt30 import MakeConfig, make_mt30


@click.group()
def main() -> None:
    """Helpers: make MT30-format data, measure codecs."""


@main.command("make-mt30")
@click.option(
    "--dst", type=click.Path(path_type=Path), required=True, help="Folder to write chunk_K.pt into."
)
@click.option(
    "--episodes-per-task", type=int, default=4, show_default=True, help="Episodes of every task."
)
@click.option("--chunks", type=int, default=1, show_default=True, help="Number of chunk files.")
@click.option("--seed", type=int, default=0, show_default=True, help="Generation seed.")
@click.option("--task-set", type=click.Choice(["mt30", "mt80"]), default="mt30", show_default=True,
              help="mt30: 501-row episodes, obs 24; mt80: 101-row episodes, obs 39.")  # fmt: skip
def make_mt30_cmd(dst, episodes_per_task, chunks, seed, task_set) -> None:
    """Write a synthetic dataset in exactly the official MT30 chunk format."""
    cfg = MakeConfig(dst=dst, episodes_per_task=episodes_per_task, chunks=chunks, seed=seed,
                     task_set=task_set)  # fmt: skip
    try:
        paths = make_mt30(cfg)
    except ValueError as e:
        raise click.ClickException(str(e)) from e
    click.echo(f"wrote {len(paths)} chunk(s) to {dst}")


@main.command("bench-codecs")
@click.option(
    "--src", type=click.Path(path_type=Path), required=True, help="Folder of chunk_K.pt files."
)
@click.option("--episodes", type=int, default=300, show_default=True, help="Episodes to sample.")
def bench_codecs_cmd(src, episodes) -> None:
    """Compression ratio and one-thread speed of candidate codecs and layouts."""
    from tools.bench_codecs import bench_codecs

    click.echo(
        f"{'array':7} {'layout':11} {'codec':22} {'ratio':>6} {'enc MB/s':>9} {'dec GB/s':>9}"
    )
    for r in bench_codecs(src, episodes):
        click.echo(f"{r['array']:7} {r['layout']:11} {r['codec']:22} {r['ratio']:6.2f} "
                   f"{r['encode_MBps']:9.0f} {r['decode_GBps']:9.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
