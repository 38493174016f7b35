"""The `tools` command: data generation and measurement helpers around the pipeline."""

from __future__ import annotations

import json
from pathlib import Path

import click

from datapipe.errors import DatapipeError
from datapipe.options import option
from tools.errors import ToolError
from tools.make_mt30 import MakeConfig, make_dataset
from trainer.errors import TrainError


@click.group()
def main() -> None:
    """Helpers: make MT30-format data, measure codecs."""


@main.command("make-mt30")
@option(MakeConfig, "dst", type=click.Path(path_type=Path), required=True)
@option(MakeConfig, "episodes_per_task", type=int)
@option(MakeConfig, "chunks", type=int)
@option(MakeConfig, "seed", type=int)
@option(MakeConfig, "task_set", type=click.Choice(["mt30", "mt80"]))
@option(MakeConfig, "episode_length", type=int)
@option(MakeConfig, "physics", type=click.Choice(["synthetic", "dmc"]))
@option(MakeConfig, "policy")
@option(MakeConfig, "workers", type=int)
@option(MakeConfig, "noise")
@option(MakeConfig, "tasks")
@option(MakeConfig, "progress", "--progress/--no-progress")
@option(MakeConfig, "like", type=click.Choice(["mt30"]))
def make_mt30_cmd(**kw) -> None:
    """Write a dataset in exactly the official MT30 chunk format."""
    cfg = MakeConfig(**kw)
    try:
        paths = make_dataset(cfg)
    except (ToolError, DatapipeError, TrainError) as e:
        raise click.ClickException(str(e)) from e
    click.echo(f"wrote {len(paths)} chunk(s) to {cfg.dst}")


@main.command("make-teacher")
@click.option(
    "--size",
    type=click.Choice(["1", "5", "19", "48", "317"]),
    required=True,
    help="Model size preset (millions of parameters).",
)
@click.option(
    "--out", type=click.Path(path_type=Path), required=True, help="Checkpoint file to write."
)
@click.option("--seed", type=int, default=0, show_default=True, help="Initialisation seed.")
@click.option(
    "--train-steps",
    type=int,
    default=0,
    show_default=True,
    help="Train this many steps on --shards first (0: random init).",
)
@click.option("--shards", type=click.Path(path_type=Path), default=None, help="Store to train on.")
@click.option(
    "--nonzero-reward",
    is_flag=True,
    help="Random init: draw the reward head's last layer (default zeros: reward 0).",
)
@click.option(
    "--progress/--no-progress",
    default=True,
    show_default=True,
    help="Progress bar of the training steps (one line a minute off a terminal).",
)
def make_teacher_cmd(size, out, seed, train_steps, shards, nonzero_reward, progress) -> None:
    """Write a checkpoint of any size in the official new-API layout."""
    from tools.make_teacher import make_teacher

    try:
        path = make_teacher(
            int(size),
            out,
            seed=seed,
            train_steps=train_steps,
            shards=shards,
            nonzero_reward=nonzero_reward,
            progress=progress,
        )
    except (ToolError, DatapipeError, TrainError) as e:
        raise click.ClickException(str(e)) from e
    click.echo(f"wrote {path}")


@main.command("verify-shards")
@click.argument("store", metavar="STORE")
@click.option(
    "--src",
    metavar="PATH|URL",
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
    """Prove STORE (a path or an fsspec URL) complete and uncorrupted; list every problem and
    exit 1 if any."""

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
    from tools.bench.codecs import bench_codecs

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
@click.option("--cluster", is_flag=True,
              help="Build on a real `dask scheduler` + `dask worker` processes started for it.")  # fmt: skip
def bench_build_cmd(src, work, workers, formats, cluster) -> None:
    """Build throughput and peak RSS against a plain read of the same sources."""
    from tools.bench.build import bench_build

    r = bench_build(src, work, tuple(int(w) for w in workers.split(",")), formats, cluster)
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


@main.command("bench-loader")
@click.option("--store", type=click.Path(path_type=Path), required=True, help="Store to read.")
@click.option("--src", type=click.Path(path_type=Path), default=None,
              help="The store's chunk_K.pt folder (for the official approach).")  # fmt: skip
@click.option("--batch-size", "batch_sizes", type=int, multiple=True, default=(256, 1024),
              show_default=True, help="B to time (repeatable).")  # fmt: skip
@click.option("--horizon", type=int, default=3, show_default=True, help="H.")
@click.option("--cache-gb", type=float, default=0.25, show_default=True,
              help="Our loader's pool budget, GB.")  # fmt: skip
@click.option("--seconds", type=float, default=10.0, show_default=True,
              help="Timed seconds per approach and batch size.")  # fmt: skip
@click.option("--approach", "approaches", multiple=True,
              type=click.Choice(["ours", "official", "numpy"]), default=("ours", "official", "numpy"),
              show_default=True, help="Approaches to run (repeatable).")  # fmt: skip
@click.option("--threads", type=int, default=1, show_default=True,
              help="torch intra-op threads in every approach.")  # fmt: skip
@click.option("--refill-every", type=int, default=16, show_default=True,
              help="Our loader: batches between refills of 64 episodes.")  # fmt: skip
@click.option("--json-out", type=click.Path(path_type=Path), default=None,
              help="Also write the rows as JSON here.")  # fmt: skip
def bench_loader_cmd(store, src, batch_sizes, horizon, cache_gb, seconds, approaches, threads,
                     refill_every, json_out):  # fmt: skip
    """Batches/s, transitions/s and peak RSS: SliceLoader vs the official torchrl path vs numpy."""
    from tools.bench.loader import BenchLoaderConfig, bench_loader

    cfg = BenchLoaderConfig(store=store, src=src, batch_sizes=tuple(batch_sizes), horizon=horizon,
                            cache_gb=cache_gb, seconds=seconds, approaches=tuple(approaches),
                            threads=threads, refill_every=refill_every)  # fmt: skip
    try:
        rows = bench_loader(cfg)
    except (ImportError, ValueError, FileNotFoundError) as e:
        raise click.ClickException(str(e)) from e
    click.echo(f"{'approach':9} {'B':>5} {'batches/s':>10} {'transitions/s':>14} "
               f"{'peak RSS GB':>12} {'peak PSS GB':>12} {'setup s':>8}")  # fmt: skip
    for r in rows:
        click.echo(f"{r['approach']:9} {r['batch_size']:5d} {r['batches_per_s']:10.0f} "
                   f"{r['transitions_per_s']:14.0f} {r['peak_rss_gb']:12.2f} "
                   f"{r['peak_pss_gb']:12.2f} {r['setup_s']:8.1f}")  # fmt: skip
    _write_rows(json_out, cfg, rows)


@main.command("bench-startup")
@click.argument("stores", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--batches", type=int, default=200, show_default=True,
              help="Time to this batch too (the pool refilled from all over the store).")  # fmt: skip
@click.option("--batch-size", type=int, default=256, show_default=True, help="B.")
@click.option("--cache-gb", type=float, default=1.0, show_default=True, help="Pool budget, GB.")
def bench_startup_cmd(stores, batches, batch_size, cache_gb):
    """Loader start-up against store size: open, first batch, N-th batch, each store fresh."""
    from tools.bench.startup import bench_startup

    for row in bench_startup(list(stores), batches, batch_size, cache_gb):
        click.echo(json.dumps(row))


@main.command("bench-pool")
@click.option("--cache-gb", "cache_gbs", type=float, multiple=True, default=(0.25, 1.0, 4.0),
              show_default=True, help="Pool budgets to replay (repeatable).")  # fmt: skip
@click.option("--episodes", type=int, default=690_000, show_default=True,
              help="Store episodes (MT30: 690,000 of 501 rows).")  # fmt: skip
@click.option("--steps", type=int, default=1_000_000, show_default=True, help="Batches.")
@click.option("--batch-size", type=int, default=256, show_default=True, help="B.")
@click.option("--json-out", type=click.Path(path_type=Path), default=None,
              help="Also write the rows as JSON here.")  # fmt: skip
def bench_pool_cmd(cache_gbs, episodes, steps, batch_size, json_out):
    """The loader's pool against uniform draws over the whole store (no I/O, pure numpy)."""
    from tools.bench.pool import bench_pool

    rows = []
    for cache_gb in cache_gbs:
        rows.append(bench_pool(episodes, cache_gb=cache_gb, steps=steps, batch_size=batch_size))
        click.echo(json.dumps(rows[-1]))
    if json_out is not None:
        json_out.write_text(json.dumps(rows, indent=1) + "\n")


@main.command("bench-verify")
@click.option("--store", type=click.Path(path_type=Path), required=True, help="Store to verify.")
@click.option(
    "--faults-store",
    type=click.Path(path_type=Path),
    default=None,
    help="A small store (both formats) to copy and damage for the fault table.",
)
@click.option(
    "--work",
    type=click.Path(path_type=Path),
    default=Path("/tmp/bench-verify"),
    show_default=True,
    help="Scratch folder for damaged copies.",
)
@click.option("--per-kind", type=int, default=10, show_default=True, help="Faults of each kind.")
def bench_verify_cmd(store, faults_store, work, per_kind) -> None:
    """verify-shards GB/s and peak RSS; detection table of injected faults."""
    from tools.bench.verify import fault_table, verify_throughput

    r = verify_throughput(store)
    click.echo(
        f"verify-shards: {r['stored_bytes'] / 1e9:.2f} GB stored in {r['seconds']:.1f} s = "
        f"{r['GB_per_s']:.3f} GB/s; peak RSS {r['peak_rss'] / 2**20:.0f} MiB"
    )
    if faults_store is not None:
        click.echo(f"{'fault':40} {'injected':>8} {'detected':>8}")
        for row in fault_table(faults_store, work, per_kind):
            click.echo(f"{row['fault']:40} {row['injected']:>8} {row['detected']:>8}")


@main.command("bench-update")
@click.option("--official", type=click.Path(path_type=Path, exists=True, file_okay=False),
              default=None, help="Root of an official TD-MPC2 checkout to time beside ours "
              "(needs tensordict 0.8.3); without it, ours only.")  # fmt: skip
@click.option("--batch-sizes", default="256,1024", show_default=True,
              help="Comma-separated update batch sizes.")  # fmt: skip
@click.option("--model-size", type=click.Choice(["1", "5", "19", "48", "317"]), default="1",
              show_default=True, help="Model size.")  # fmt: skip
@click.option("--windows", type=int, default=5, show_default=True,
              help="Timed windows per update cell (the median is reported).")  # fmt: skip
@click.option("--window-steps", type=int, default=5, show_default=True,
              help="Updates per window.")  # fmt: skip
@click.option("--plan-steps", type=int, default=30, show_default=True,
              help="Timed planning steps per planning cell.")  # fmt: skip
@click.option("--json-out", type=click.Path(path_type=Path), default=None,
              help="Also write the rows as JSON here.")  # fmt: skip
def bench_update_cmd(official, batch_sizes, model_size, windows, window_steps, plan_steps,
                     json_out):  # fmt: skip
    """Update and planning ms/step on CPU, one thread, each cell in its own process: ours and
    the official, eager and compiled (cold compile: its warm-up is timed apart)."""
    from tools.bench.update import BenchUpdateConfig, bench_update, ratios

    cfg = BenchUpdateConfig(official=official, model_size=int(model_size), windows=windows,
                            batch_sizes=tuple(int(b) for b in batch_sizes.split(",")),
                            window_steps=window_steps, plan_steps=plan_steps)  # fmt: skip
    rows = bench_update(cfg, click.echo)
    for r in ratios(rows):
        if r["vs_official_eager"] is not None:
            click.echo(f"B={r['batch']:<5} {r['impl']:8} {'compiled' if r['compiled'] else 'eager':8}"
                       f" {r['vs_official_eager']:.2f}x the official eager time")  # fmt: skip
    _write_rows(json_out, cfg, rows)


@main.command("bench-ddp")
@click.option("--shards", required=True, help="Store to train on (path or URL).")
@click.option("--work", type=click.Path(path_type=Path), default=Path("/tmp/bench-ddp"),
              show_default=True, help="Scratch folder for the run folders and their logs.")  # fmt: skip
@click.option("--ranks", type=int, default=2, show_default=True,
              help="Ranks of the data-parallel run (compared with 1).")  # fmt: skip
@click.option("--model-size", type=click.Choice(["1", "5", "19", "48", "317"]), default="1",
              show_default=True, help="Student size.")  # fmt: skip
@click.option("--batch-size", type=int, default=256, show_default=True,
              help="Slices per rank, the same in both runs.")  # fmt: skip
@click.option("--steps", type=int, default=60, show_default=True, help="Steps of each run.")
@click.option("--warmup", type=int, default=10, show_default=True,
              help="First steps left out of the medians.")  # fmt: skip
@click.option("--teacher", type=click.Path(path_type=Path, exists=True, dir_okay=False),
              default=None, help="Distil from this teacher (default: plain training).")  # fmt: skip
@click.option("--json-out", type=click.Path(path_type=Path), default=None,
              help="Also write the rows as JSON here.")  # fmt: skip
def bench_ddp_cmd(shards, work, ranks, model_size, batch_size, steps, warmup, teacher, json_out):
    """Per-step time of N-rank CPU training (torchrun, gloo) against 1 rank and against N
    independent 1-rank runs at once; the same batch per rank."""
    from tools.bench.ddp import BenchDDPConfig, bench_ddp

    cfg = BenchDDPConfig(shards=shards, work=work, ranks=ranks, model_size=int(model_size),
                         batch_size=batch_size, steps=steps, warmup=warmup, teacher=teacher)  # fmt: skip
    try:
        rows = bench_ddp(cfg)
    except (RuntimeError, ValueError) as e:
        raise click.ClickException(str(e)) from e
    click.echo(f"{'config':12} {'slices/step':>11} {'median step ms':>14} {'data wait ms':>12} "
               f"{'samples/s':>10} {'step ratio':>10} {'peak RSS GB':>11} {'load 1m':>7}")  # fmt: skip
    for r in rows:
        click.echo(f"{r['config']:12} {r['slices_per_step']:>11} {r['median_step_ms']:>14.1f} "
                   f"{r['median_data_wait_ms']:>12.2f} {r['samples_per_s']:>10.0f} "
                   f"{r['step_ratio']:>10.2f} {r['peak_rss_gb']:>11.2f} {r['load_1min']:>7.2f}")  # fmt: skip
    _write_rows(json_out, cfg, rows)


def _write_rows(json_out: Path | None, cfg, rows: list[dict]) -> None:
    """A benchmark's config and result rows as JSON, if --json-out was given."""
    if json_out is not None:
        config = {k: str(v) for k, v in vars(cfg).items()}
        json_out.write_text(json.dumps({"config": config, "rows": rows}, indent=1))


@main.command("bench-gpu")
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    required=True,
    help="Folder for gpu.json, gpu.md, logs/ and scratch files.",
)
@click.option(
    "--budget-s",
    type=float,
    default=420.0,
    show_default=True,
    help="Seconds for all parts together; each part gets its share of what is left.",
)
@click.option(
    "--dry-run",
    is_flag=True,
    help="The same sequence on the CPU at tiny sizes (checks the command).",
)
@click.option(
    "--official",
    type=click.Path(path_type=Path, exists=True, file_okay=False),
    default=None,
    help="Root of an official TD-MPC2 checkout: time its update too.",
)
@click.option(
    "--env-steps-per-s",
    type=float,
    default=7860.0,
    show_default=True,
    help="Physics agent steps/s per core for the evaluation projection "
    "(BENCHMARKS.md, environment speed).",
)
def bench_gpu_cmd(out, budget_s, dry_run, official, env_steps_per_s) -> None:
    """Every GPU figure in one command, each part with its own time cap: machine, pytest -m
    gpu, training grid, official peer, loader, MPPI planning, torchrun. Writes OUT/gpu.json
    after every part and OUT/gpu.md; exits 1 if a part failed or ran out of time."""
    import shlex

    from tools.bench.gpu import BenchGPUConfig, bench_gpu

    if not dry_run:
        import torch

        if not torch.cuda.is_available():
            raise click.ClickException(
                "torch sees no CUDA device: run it on a machine with a GPU, or pass --dry-run"
            )
    command = ["tools", "bench-gpu", "--out", str(out), "--budget-s", f"{budget_s:g}"]
    command += ["--dry-run"] if dry_run else []
    command += [] if official is None else ["--official", str(official)]
    command += ["--env-steps-per-s", f"{env_steps_per_s:g}"]
    cfg = BenchGPUConfig(
        out=out,
        budget_s=budget_s,
        dry_run=dry_run,
        official=official,
        env_steps_per_s=env_steps_per_s,
        command=shlex.join(command),
    )
    report = bench_gpu(cfg)
    bad = []
    for name, part in report["parts"].items():
        click.echo(
            f"{name:11} {part['status']:8} {part['seconds']:6.0f} s  "
            f"{part.get('reason') or part.get('error') or ''}"
        )
        bad += [name] if part["status"] in ("failed", "timeout") else []
    click.echo(f"wrote {out / 'gpu.json'} and {out / 'gpu.md'}")
    if bad:
        raise SystemExit(1)


@main.command("bench-envs")
@click.option("--steps", type=int, default=1000, show_default=True, help="Agent steps per task.")
@click.option("--tasks", default="mt30", show_default=True, help="mt30 or comma-separated names.")
def bench_envs_cmd(steps, tasks) -> None:
    """Agent steps/s of every MT30 environment (one process, random actions)."""
    from datapipe.tasksets import MT30
    from tools.bench.envs import bench_envs

    names = list(MT30.names) if tasks == "mt30" else tasks.split(",")
    click.echo(f"{'task':28} {'steps/s':>9}")
    for row in bench_envs(names, steps):
        click.echo(f"{row['task']:28} {row['steps_per_s']:9.0f}")


if __name__ == "__main__":
    main()
