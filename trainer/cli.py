"""The `trainer` command: thin click wrappers over `train` and `export`.

Each option maps onto one `TrainConfig` field and shows that field's help text and default;
each command builds the config, calls one function and turns the project's errors into
one-line messages.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from datapipe.errors import DatapipeError
from datapipe.location import DISK_FULL
from datapipe.options import option
from trainer.errors import TrainError
from trainer.evaluation.evaluate import EvalConfig
from trainer.evaluation.quantized import QuantizeConfig
from trainer.model.checkpoint import export
from trainer.model.presets import PRESETS
from trainer.options import DEVICES
from trainer.stop import Interrupted
from trainer.training.config import D_SCHEDULES, DISTILL_STEPS, TEACHER_DTYPES, TrainConfig
from trainer.training.runfolder import resume_config
from trainer.training.train import train

_SIZES = click.Choice([str(s) for s in PRESETS])
_option = functools.partial(option, TrainConfig)  # a TrainConfig field's option


def _run_options(fn: Callable) -> Callable:
    """Options shared by `train` and `distill`, in --help order."""
    options = [
        _option("shards", type=str),
        _option("out", type=click.Path(path_type=Path)),
        _option("steps", type=int),
        _option("batch_size", type=int),
        _option("horizon", type=int),
        _option("seed", type=int),
        _option("device", type=click.Choice(DEVICES)),
        _option("model_size", type=_SIZES, default=str(TrainConfig.model_size)),
        _option("init", type=click.Path(path_type=Path, exists=True, dir_okay=False)),
        _option("threads", type=int),
        _option("compile", is_flag=True),
        _option("tf32", "--tf32/--no-tf32"),
        _option("amp", is_flag=True),
        _option("cache_gb", type=float),
        _option("sampler", type=click.Choice(["pool", "uniform"])),
        _option("refill_size", type=int),
        _option("refill_every", type=int),
        _option("log_every", type=int),
        _option("save_every", type=int),
        _option("resume", is_flag=True),
        _option("overwrite", is_flag=True),
        _option("tensorboard", is_flag=True),
        _option("wandb", type=str, metavar="PROJECT"),
        _option("eval_every", type=int),
        _option("eval_tasks", type=str),
        _option("eval_episodes", type=int),
        _option("eval_mpc", "--eval-mpc/--no-eval-mpc"),
        _option("progress", "--progress/--no-progress"),
        _option("ddp_check", is_flag=True),
    ]
    for decorate in reversed(options):
        fn = decorate(fn)
    return fn


@click.group()
def main() -> None:
    """Train and distil TD-MPC2 world models on a datapipe store; export checkpoints.

    \b
    Data-parallel on N processes (gloo on CPU, nccl on CUDA; one GPU per process):
      torchrun --nproc-per-node N -m trainer distill --shards S --teacher T.pt ...
    Every rank trains on its own --batch-size slices (global batch N x B); rank 0 writes
    the run folder.
    """


@main.command("train")
@_run_options
def train_cmd(**kw: Any) -> None:
    """Train a TD-MPC2 world model from scratch (or from --init) on the store SHARDS.

    Ctrl-C (or SIGTERM) finishes the step, writes a checkpoint and prints the command that
    resumes the run: `trainer train --out RUN --resume`."""
    _train(kw, "train")


@main.command("distill")
@_run_options
@_option("teacher", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@_option("teacher_size", type=_SIZES)
@_option("d_coef", type=float, default=0.4)
@_option("d_schedule", type=click.Choice(D_SCHEDULES))
@_option("distill", type=click.Choice(DISTILL_STEPS))
@_option("teacher_dtype", type=click.Choice(list(TEACHER_DTYPES)))
def distill_cmd(**kw: Any) -> None:
    """Train a student with reward distillation from a frozen teacher (TD-MPC-Opt).

    Ctrl-C (or SIGTERM) finishes the step, writes a checkpoint and prints the command that
    resumes the run: `trainer distill --out RUN --resume`."""
    _train(kw, "distill")


@main.command("experiment")
@click.argument("spec", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Experiment folder.")
@click.option(
    "--jobs",
    type=int,
    default=1,
    show_default=True,
    help="Runs at once (each gets CPUs/N threads).",
)
@click.option("--progress/--no-progress", default=True, show_default=True, help="Show progress.")
def experiment_cmd(spec: Path, out: Path, jobs: int, progress: bool) -> None:
    """Run the arms x seeds of the TOML experiment SPEC into OUT/<arm>/seed<k>/, then write
    OUT/report.md. Run it again to resume: finished runs are kept."""
    from trainer.study.experiment import run_experiment

    if jobs < 1:
        raise click.BadParameter("must be >= 1", param_hint="--jobs")
    _run(lambda: run_experiment(spec, out, jobs, progress))


@main.command("specs")
@click.argument("name", required=False)
def specs_cmd(name: str | None) -> None:
    """List the shipped experiment specs, or print spec NAME (to copy and edit:
    `trainer specs demo > my.toml`; its paths are relative to the file's folder)."""
    from datapipe.extras import shipped_specs_dir

    folder = shipped_specs_dir()
    if folder is None:
        raise click.ClickException("no shipped specs found: reinstall the package")
    if name is not None:
        path = folder / f"{name.removesuffix('.toml')}.toml"
        if not path.is_file():
            known = ", ".join(sorted(p.stem for p in folder.glob("*.toml")))
            raise click.ClickException(f"no shipped spec {name!r}; the specs: {known}")
        click.echo(path.read_text(), nl=False)
        return
    click.echo(f"shipped experiment specs in {folder} (print one: trainer specs NAME):")
    for path in sorted(folder.glob("*.toml")):
        first = next((line[1:].strip() for line in path.read_text().splitlines()
                      if line.startswith("#") and line[1:].strip()), "")  # fmt: skip
        click.echo(f"  {path.stem:22} {first}")


@main.command("report")
@click.argument("folder", type=click.Path(path_type=Path, file_okay=False, exists=True))
def report_cmd(folder: Path) -> None:
    """Write FOLDER/report.md, report.json and figures/ for an experiment folder."""
    from trainer.study.report import write_report

    _run(lambda: write_report(folder))
    click.echo(f"wrote {folder / 'report.md'}, {folder / 'report.json'}, {folder / 'figures'}/")


@main.command("curve")
@click.option(
    "--point",
    "points",
    multiple=True,
    required=True,
    help="X=DIR: an experiment folder with its report.json and the value X it stands for.",
)
@click.option("--arm", required=True, help="The arm compared with the report's baseline.")
@click.option("--baseline", default=None, help="Baseline arm (default: the report's).")
@click.option("--x-label", default="episodes per task", show_default=True, help="What X is.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Folder to write.")
def curve_cmd(points, arm, baseline, x_label, out) -> None:
    """One arm-vs-baseline comparison across experiments: OUT/curve.json, curve.md, curve.png."""
    from trainer.study.curve import FILES, parse_point, write_curve

    _run(lambda: write_curve([parse_point(p) for p in points], out, arm, baseline, x_label))
    click.echo("wrote " + ", ".join(str(out / f) for f in FILES))


@main.command("export")
@click.argument("checkpoint", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    required=True,
    help="Official-format file to write: {'model': state_dict}, new API.",
)
def export_cmd(checkpoint: Path, out: Path) -> None:
    """Write the world model of CHECKPOINT (a training checkpoint or an official file, new
    or old API) as an official new-API file."""
    _run(lambda: export(checkpoint, out))
    click.echo(f"wrote {out}")


@main.command("eval")
@option(EvalConfig, "checkpoint", type=click.Path(path_type=Path, exists=True, dir_okay=False),
        required=True)  # fmt: skip
@option(EvalConfig, "tasks", type=str)
@option(EvalConfig, "episodes", type=int)
@option(EvalConfig, "mpc", "--mpc/--no-mpc")
@option(EvalConfig, "workers", type=int)
@option(EvalConfig, "seed", type=int)
@option(EvalConfig, "out", type=click.Path(path_type=Path))
@option(EvalConfig, "device", type=click.Choice(DEVICES))
@option(EvalConfig, "max_steps", type=int)
@option(EvalConfig, "planner_noise", is_flag=True)
@option(EvalConfig, "allow_quantized", is_flag=True)
@option(EvalConfig, "lockstep", is_flag=True)
@option(EvalConfig, "compile", is_flag=True)
@option(EvalConfig, "progress", "--progress/--no-progress")
def eval_cmd(**kw: Any) -> None:
    """Per-task returns and the normalized MT30 score of a checkpoint (docs/tdmpc2.md)."""
    from trainer.evaluation.evaluate import run_eval

    result = _run(lambda: run_eval(EvalConfig(**kw)))
    for t in result.tasks:
        click.echo(f"{t.task:28} {t.mean_return:8.1f}")
    click.echo(
        f"normalized score {result.normalized_score:.2f} ({len(result.tasks)} tasks); "
        f"outputs in {kw['out']}"
    )


@main.command("quantize")
@option(QuantizeConfig, "checkpoint", type=click.Path(path_type=Path, exists=True, dir_okay=False),
        required=True)  # fmt: skip
@option(QuantizeConfig, "dtype", type=click.Choice(["fp16", "bf16", "int8"]), required=True)
@option(QuantizeConfig, "out", type=click.Path(path_type=Path), required=True)
@option(QuantizeConfig, "heldout", type=click.Path(path_type=Path))
@option(QuantizeConfig, "batches", type=int)
@option(QuantizeConfig, "batch_size", type=int)
@option(QuantizeConfig, "score_tasks", type=str)
@option(QuantizeConfig, "score_episodes", type=int)
@option(QuantizeConfig, "workers", type=int)
@option(QuantizeConfig, "seed", type=int)
@option(QuantizeConfig, "progress", "--progress/--no-progress")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def quantize_cmd(as_json: bool, **kw: Any) -> None:
    """Post-training quantization with a size, fidelity and score report (<out>.report.json)."""
    import json

    from trainer.evaluation.quantized import report_text, run_quantize

    report = _run(lambda: run_quantize(QuantizeConfig(**kw)))
    click.echo(json.dumps(report, indent=1) if as_json else report_text(report))


def _train(kw: dict[str, Any], command: str) -> None:
    for name in ("model_size", "teacher_size"):
        if kw.get(name) is not None:
            kw[name] = int(kw[name])
    if kw["resume"]:
        ctx = click.get_current_context()
        typed = (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)
        given = {k: v for k, v in kw.items() if ctx.get_parameter_source(k) in typed}
        given.pop("resume")
        cfg = _run(lambda: resume_config(kw["out"], given, command))
    else:
        needed = ["shards", "teacher"] if command == "distill" else ["shards"]
        for name in needed:
            if kw[name] is None:
                raise click.MissingParameter(
                    "(only a resumed run, --resume, takes it from its config.json)",
                    param_hint=f"--{name}",
                    param_type="option",
                )
        cfg = _run(lambda: TrainConfig(**kw))
    _run(lambda: train(cfg))


def _run(fn: Callable[[], Any]) -> Any:
    """Call `fn`, turning the project's own errors into one-line messages (exit 1) and a
    stopped run into its resume command (exit 128 + the signal). Any other exception is a
    bug of ours and keeps its traceback."""
    try:
        return fn()
    except Interrupted as e:
        click.echo(str(e), err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:  # Ctrl-C before any work that writes (loading, checking)
        click.echo("stopped (Ctrl-C)", err=True)
        sys.exit(130)
    except (DatapipeError, TrainError) as e:  # CheckpointError is a TrainError
        raise click.ClickException(str(e)) from e
    except OSError as e:
        if e.errno not in DISK_FULL:
            raise
        where = f"{e.filename}: " if e.filename else ""
        raise click.ClickException(
            f"{where}writing failed: {e.strerror}. Free disk space (or raise the quota) and run "
            f"the command again: every file is written whole or not at all, and a training run "
            f"continues from its last checkpoint with --resume."
        ) from e


if __name__ == "__main__":
    main()
