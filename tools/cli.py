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
@click.option(
    "--task-set",
    type=click.Choice(["mt30", "mt80"]),
    default="mt30",
    show_default=True,
    help="mt30: 501-row episodes, obs 24; mt80: 101-row episodes, obs 39.",
)
def make_mt30_cmd(dst, episodes_per_task, chunks, seed, task_set) -> None:
    """Write a synthetic dataset in exactly the official MT30 chunk format."""
    cfg = MakeConfig(
        dst=dst, episodes_per_task=episodes_per_task, chunks=chunks, seed=seed, task_set=task_set
    )
    try:
        paths = make_mt30(cfg)
    except ValueError as e:
        raise click.ClickException(str(e)) from e
    click.echo(f"wrote {len(paths)} chunk(s) to {dst}")


@main.command("verify-shards")
@click.argument("store", type=click.Path(path_type=Path))
@click.option(
    "--src",
    type=click.Path(path_type=Path),
    default=None,
    help="Source chunks: compare episodes with them bit for bit.",
)
@click.option("--deep", is_flag=True, help="With --src: compare every episode, not a sample.")
@click.option(
    "--sample", type=int, default=64, show_default=True, help="Episodes compared without --deep."
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the compared sample.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def verify_shards_cmd(store, src, deep, sample, seed, as_json) -> None:
    """Prove STORE complete and uncorrupted; list every problem and exit 1 if any."""
    from datapipe.verify import verify

    report = verify(store, src=src, deep=deep, sample=sample, seed=seed, progress=not as_json)
    click.echo(report.to_json() if as_json else report.to_text())
    raise SystemExit(0 if report.ok else 1)


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
        click.echo(
            f"{r['array']:7} {r['layout']:11} {r['codec']:22} {r['ratio']:6.2f} "
            f"{r['encode_MBps']:9.0f} {r['decode_GBps']:9.2f}"
        )


@main.command("bench-build")
@click.option(
    "--src", type=click.Path(path_type=Path), required=True, help="Folder of chunk_K.pt files."
)
@click.option(
    "--work", type=click.Path(path_type=Path), required=True, help="Scratch folder for stores."
)
@click.option("--workers", default="1,2", show_default=True, help="Worker counts to compare.")
@click.option(
    "--format", "formats", default="zarr", show_default=True, help="zarr, webdataset or both."
)
def bench_build_cmd(src, work, workers, formats) -> None:
    """Build throughput and peak RSS against a plain read of the same sources."""
    from tools.bench_build import bench_build

    r = bench_build(src, work, tuple(int(w) for w in workers.split(",")), formats)
    click.echo(
        f"source: {r['rows']} rows, {r['raw_bytes'] / 1e9:.2f} GB raw; "
        f"read pass {r['read_seconds']:.1f} s"
    )
    click.echo(
        f"{'workers':>7} {'seconds':>8} {'rows/s':>10} {'MB/s':>7} {'build/read':>10} "
        f"{'peak RSS tree':>13} {'peak RSS proc':>13}"
    )
    for b in r["builds"]:
        click.echo(
            f"{b['workers']:>7} {b['seconds']:8.1f} {b['rows_per_s']:10.0f} "
            f"{b['MB_per_s']:7.1f} {b['build_over_read']:10.1f} "
            f"{b['peak_tree_rss'] / 2**20:10.0f} MiB {b['peak_proc_rss'] / 2**20:9.0f} MiB"
        )


if __name__ == "__main__":
    main()
