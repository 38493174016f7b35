"""`trainer experiment SPEC.toml --out DIR [--jobs N]`: arms x seeds of ordinary runs.

Owns the experiment spec (a TOML file read with `tomllib`), its checks, the plan of runs and
running them. Each arm x seed is an ordinary run folder `DIR/<arm>/seed<k>/`, made by
`trainer.training.train.train` (the function behind `trainer train` / `trainer distill`) in a child
process of its own, or, for a `kind = "reference"` arm, by `trainer.evaluation.evaluate.run_eval` (the
function behind `trainer eval`) with the experiment's evaluation protocol. Nothing about a run
depends on the experiment around it: a run folder equals what the command with the same
settings writes.

Spec:

    [base]                      # any train/distill setting by its option name, underscores
    shards = "runs/store"       # the one store every arm trains on
    steps = 4000
    eval_every = 1000           # an experiment compares evaluation scores: required
    eval_tasks = "mt30"         # or ["walker-walk", "cheetah-run"]
    seeds = [1, 2, 3]           # run seeds (also the eval env seeds, as the official code)

    [report]                    # optional: what `trainer report` compares and checks
    baseline = "scratch"        # arm the others are compared to
    heldout = "runs/heldout"    # official chunk folder for the reward-error table

    [[arm]]
    name = "scratch"

    [[arm]]
    name = "distill"
    teacher = "teacher.pt"      # teacher + d_coef: a distillation arm
    d_coef = 0.4

    [[arm]]
    name = "teacher"
    kind = "reference"          # evaluate a fixed model with the same protocol and seeds
    checkpoint = "teacher.pt"

Relative paths (shards, teacher, init, checkpoint, heldout) are relative to the spec file's
folder, so a spec and its data move together and run from any directory. Every check
runs before anything starts: unknown settings, settings out of range, a missing store,
teacher, init or checkpoint, arms that train on different stores or are evaluated
differently, and run folders that already hold a run with other settings.

Resuming: run the same command again. Finished runs are kept, interrupted runs continue from
their last checkpoint (exactly: `trainer train --resume`), runs not started start.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import time
import tomllib
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from datapipe.location import only_writer
from datapipe.progress import Progress
from datapipe.source import file_sha256
from trainer.errors import TrainConfigError, TrainError
from trainer.model.checkpoint import CheckpointError, read_checkpoint
from trainer.stop import SIGNALS, Interrupted
from trainer.study.folder import EXPERIMENT_FILE, FORMAT, REFERENCE_FILE, REPORT_MD, VERSION
from trainer.training.config import TrainConfig
from trainer.training.runfolder import CONFIG_FILE, SUMMARY_FILE
from trainer.training.runlog import JSONL_FILE, read_evals, read_metrics
from trainer.training.runstate import (
    CHECKPOINT_FILE,
    read_training_checkpoint,
    write_json,
)
from trainer.training.traineval import EvalProtocol

RUN_LOG = "run.log"  # a run's stdout and stderr

_TRAIN_FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}
_NOT_SETTINGS = {"out", "resume", "overwrite", "seed", "progress"}  # set by the experiment, per run
SETTINGS = sorted(_TRAIN_FIELDS - _NOT_SETTINGS)
_ARM_KEYS = {"name", "kind", "seeds", "checkpoint"}
_REPORT_KEYS = {"baseline", "heldout"}
_EVAL_KEYS = ("eval_tasks", "eval_episodes", "eval_mpc")
_LIST_SETTINGS = {"eval_tasks"}  # may be a TOML array or the CLI's comma-separated string
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class SpecError(TrainConfigError):
    """An experiment spec that cannot run: the message names the key and the fix."""


@dataclass(frozen=True)
class Run:
    """One arm x seed: a training run (`config`) or a reference evaluation (`checkpoint`)."""

    arm: str
    kind: str  # train | distill | reference
    seed: int
    out: Path
    config: TrainConfig | None = None
    checkpoint: Path | None = None

    @property
    def name(self) -> str:
        return f"{self.arm}/seed{self.seed}"

    @property
    def steps(self) -> int:
        """Training steps (0 for a reference evaluation)."""
        return self.config.steps if self.config is not None else 0

    @property
    def evaluations(self) -> int:
        """Evaluations the run makes from scratch: step 0, every eval_every, the last step
        (a reference run: one)."""
        if self.config is None:
            return 1
        every = self.config.eval_every
        return len({0, self.steps, *range(every, self.steps, every)}) if every else 0


@dataclass(frozen=True)
class Experiment:
    """A checked spec: its runs in the order they start, and what the report needs."""

    spec: Path
    out: Path
    arms: list[dict[str, Any]]
    runs: list[Run]
    eval: dict[str, Any]
    report: dict[str, Any]

    def describe(self) -> dict[str, Any]:
        """experiment.json: everything `trainer report` reads about the plan."""
        return {
            "format": FORMAT,
            "version": VERSION,
            "spec": str(self.spec),
            "spec_sha256": hashlib.sha256(self.spec.read_bytes()).hexdigest(),
            "eval": self.eval,
            "heldout": self.report.get("heldout"),
            "baseline": self.report.get("baseline"),
            "arms": self.arms,
        }


# -- the spec -----------------------------------------------------------------------------------


def load_spec(
    spec: str | os.PathLike, out: str | os.PathLike, jobs: int = 1, check_files: bool = True
) -> Experiment:
    """Read and check `spec`; the runs it plans under `out`. Raises SpecError naming the key.
    `check_files=False` skips the checks that need the store, teachers and checkpoints
    (to check a spec written for another machine)."""
    spec, out = Path(spec), Path(out)
    try:
        raw = tomllib.loads(spec.read_text())
    except FileNotFoundError:
        raise SpecError(f"{spec}: no such experiment spec") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise SpecError(f"{spec} is not valid TOML ({e}); fix the line it names") from None
    unknown = set(raw) - {"base", "arm", "report"}
    if unknown:
        raise SpecError(
            f"{spec}: unknown table(s) {', '.join(sorted(unknown))}; a spec has [base], "
            f"[report] and [[arm]] tables"
        )
    base = _beside(spec, dict(raw.get("base", {})))
    report = _beside(spec, dict(raw.get("report", {})))
    arms = [_beside(spec, dict(a)) if isinstance(a, dict) else a for a in raw.get("arm", [])]
    if not arms:
        raise SpecError(f"{spec}: no [[arm]] tables; add at least one arm with a name")
    _check_keys(spec, "[report]", report, _REPORT_KEYS)
    _check_keys(spec, "[base]", base, set(SETTINGS) | {"seeds"})
    base_seeds = _seeds(spec, "[base]", base.pop("seeds", [1]))
    base = _normalise(spec, "[base]", base)
    if check_files:
        _check_packages(spec)
    if not base.get("eval_every"):
        raise SpecError(
            f"{spec}: [base] eval_every is not set; an experiment compares evaluation scores, "
            f"so set eval_every (steps between evaluations, e.g. 1000)"
        )
    threads = base.get("threads") or max(1, (os.cpu_count() or 1) // max(1, jobs))

    planned, described, names = [], [], set()
    for i, arm in enumerate(arms):
        where = f"[[arm]] #{i + 1}"
        name = arm.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise SpecError(
                f'{spec}: {where} needs name = "..." (letters, digits, . _ -), got {name!r}'
            )
        where = f"[[arm]] {name!r}"
        if name in names:
            raise SpecError(f"{spec}: two arms are named {name!r}; give each arm its own name")
        names.add(name)
        kind = arm.get("kind", "train")
        if kind not in ("train", "reference"):
            raise SpecError(f'{spec}: {where} kind = {kind!r}; use "train" or "reference"')
        seeds = _seeds(spec, where, arm.get("seeds", base_seeds))
        if kind == "reference":
            runs, settings = _reference_runs(spec, where, arm, name, seeds, out, check_files)
        else:
            runs, settings = _training_runs(
                spec, where, arm, name, seeds, base, out, threads, check_files
            )
            kind = runs[0].kind
        planned.append(runs)
        described.append(
            {
                "name": name,
                "kind": kind,
                "seeds": seeds,
                "runs": {str(r.seed): r.name for r in runs},
                "settings": settings,
            }
        )
    _check_comparable(spec, [r for runs in planned for r in runs if r.config is not None])
    if "baseline" in report and report["baseline"] not in names:
        raise SpecError(
            f"{spec}: [report] baseline = {report['baseline']!r} is not an arm; use one of "
            f"{', '.join(sorted(names))}"
        )
    if check_files and "heldout" in report and not Path(report["heldout"]).is_dir():
        raise SpecError(
            f"{spec}: [report] heldout = {report['heldout']!r}: no such folder; give a folder "
            f"of chunk_K.pt files (e.g. from `tools make-mt30`) or leave heldout out"
        )
    # seed-major order: every arm's first seed first, so that an early stop already compares
    order = sorted(
        ((k, a, r) for a, runs in enumerate(planned) for k, r in enumerate(runs)),
        key=lambda t: (t[0], t[1]),
    )
    return Experiment(spec, out, described, [r for _, _, r in order], _protocol(base), report)


def _protocol(base: dict[str, Any]) -> dict[str, Any]:
    """The evaluation protocol every arm shares (the [base] eval settings); each run's env
    seed is its own seed."""
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    value = {k: base.get(k, defaults[k]) for k in (*_EVAL_KEYS, "eval_every")}
    protocol = EvalProtocol.of(value["eval_tasks"], value["eval_episodes"], value["eval_mpc"], 0)
    return protocol.to_dict() | {"eval_every": value["eval_every"], "seed": "the run's seed"}


_PATH_KEYS = ("shards", "teacher", "init", "checkpoint", "heldout")


def _beside(spec: Path, table: dict[str, Any]) -> dict[str, Any]:
    """The table with its relative local paths made relative to the spec file's folder
    (normalised: experiments/../runs/x is runs/x); absolute paths and URLs as they are."""
    out = dict(table)
    for key in _PATH_KEYS:
        value = out.get(key)
        if isinstance(value, str) and "://" not in value and not os.path.isabs(value):
            out[key] = os.path.normpath(os.path.join(spec.parent, value))
    return out


def _check_keys(spec: Path, where: str, table: dict[str, Any], known: set[str]) -> None:
    unknown = sorted(set(table) - known)
    if not unknown:
        return
    key = unknown[0]
    hint = ""
    if key in _NOT_SETTINGS:
        hint = {
            "seed": " (use seeds = [1, 2, 3])",
            "out": " (the run folders are OUT/<arm>/seed<k>)",
        }.get(key, " (the experiment sets it)")
    raise SpecError(
        f"{spec}: {where} has unknown setting {key!r}{hint}; known settings: "
        f"{', '.join(sorted(known))}"
    )


def _seeds(spec: Path, where: str, seeds: Any) -> list[int]:
    if (
        not isinstance(seeds, list)
        or not seeds
        or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)
        or len(set(seeds)) != len(seeds)
    ):
        raise SpecError(f"{spec}: {where} seeds = {seeds!r}; give distinct integers, e.g. [1, 2]")
    return list(seeds)


def _accepts(kind: Any, value: Any) -> bool:
    """Whether a TOML value is of a setting's type: a bool is no number, a float no int."""
    kinds = typing.get_args(kind) or (kind,)
    if isinstance(value, bool):
        return bool in kinds
    if isinstance(value, int):
        return int in kinds or float in kinds
    if isinstance(value, float):
        return float in kinds
    if isinstance(value, str):
        return str in kinds or Path in kinds
    return False


_TYPE_WORDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _normalise(spec: Path, where: str, settings: dict[str, Any]) -> dict[str, Any]:
    """The settings with lists joined as the CLI spells them, each checked for its type."""
    out = dict(settings)
    for key in _LIST_SETTINGS & set(out):
        if isinstance(out[key], list) and all(isinstance(v, str) for v in out[key]):
            out[key] = ",".join(out[key])
    hints = typing.get_type_hints(TrainConfig)
    for key, value in out.items():
        if key in hints and not _accepts(hints[key], value):
            kinds = typing.get_args(hints[key]) or (hints[key],)
            want = next(_TYPE_WORDS[k] for k in (*kinds, str) if k in _TYPE_WORDS)
            want += " or a list of strings" if key in _LIST_SETTINGS else ""
            raise SpecError(f"{spec}: {where} {key} = {value!r}: must be {want}")
    return out


def _training_runs(
    spec: Path,
    where: str,
    arm: dict[str, Any],
    name: str,
    seeds: list[int],
    base: dict[str, Any],
    out: Path,
    threads: int,
    check_files: bool,
) -> tuple[list[Run], dict[str, Any]]:
    _check_keys(spec, where, arm, set(SETTINGS) | _ARM_KEYS - {"checkpoint"})
    own = _normalise(spec, where, {k: v for k, v in arm.items() if k not in _ARM_KEYS})
    settings = base | own
    if settings.get("teacher") and "d_coef" not in settings:
        raise SpecError(
            f"{spec}: {where} names a teacher but no d_coef; set d_coef (the paper's best: 0.4)"
        )
    settings.setdefault("threads", threads)
    runs = []
    for seed in seeds:
        run_out = out / name / f"seed{seed}"
        try:
            cfg = TrainConfig(**settings, seed=seed, out=run_out, progress=False)
        except TrainConfigError as e:
            raise SpecError(f"{spec}: {where}: {e}") from None
        except TypeError as e:  # a value of the wrong type (e.g. a table)
            raise SpecError(f"{spec}: {where}: {e}; check the value types") from None
        kind = "distill" if cfg.teacher is not None and cfg.d_coef > 0 else "train"
        runs.append(Run(name, kind, seed, run_out, config=cfg))
    if check_files:
        _check_files(spec, where, runs[0].config)
    for run in runs:
        _check_run_folder(spec, run)
    recorded = {k: v for k, v in runs[0].config.to_dict().items() if k not in _NOT_SETTINGS}
    return runs, recorded


def _reference_runs(
    spec: Path,
    where: str,
    arm: dict[str, Any],
    name: str,
    seeds: list[int],
    out: Path,
    check_files: bool,
) -> tuple[list[Run], dict[str, Any]]:
    extra = sorted(set(arm) - _ARM_KEYS)
    if extra:
        raise SpecError(
            f"{spec}: {where} is a reference arm and sets {extra[0]!r}; a reference arm takes "
            f"name, kind, checkpoint and seeds (it is evaluated with the [base] eval settings)"
        )
    if "checkpoint" not in arm:
        raise SpecError(f'{spec}: {where} is a reference arm: set checkpoint = "model.pt"')
    checkpoint = Path(arm["checkpoint"])
    if check_files:
        _check_model_file(spec, where, "checkpoint", checkpoint)
    runs = [
        Run(name, "reference", s, out / name / f"seed{s}", checkpoint=checkpoint) for s in seeds
    ]
    return runs, {"checkpoint": str(checkpoint)}


# What every experiment needs besides the base package: evaluation (each arm is scored) and
# the report's statistics. Checked before any run starts, not in a run's log hours later.
_NEEDED = {"dm_control": "envs", "mujoco": "envs", "matplotlib": "envs", "rliable": "train",
           "scipy": "train"}  # fmt: skip


def _check_packages(spec: Path) -> None:
    import importlib.util

    from datapipe.extras import install_hint

    missing = [name for name in _NEEDED if importlib.util.find_spec(name) is None]
    if missing:
        extras = sorted({_NEEDED[name] for name in missing})
        raise SpecError(
            f"{spec}: an experiment evaluates every arm and reports statistics, which need "
            f"{', '.join(missing)}: install them with "
            f"{' and '.join(f'`{install_hint(e)}`' for e in extras)}"
        )


def _check_files(spec: Path, where: str, cfg: TrainConfig) -> None:
    """The store opens; teacher and init files are world models that fit it, and a teacher
    is trained (before any run starts)."""
    from datapipe.errors import DatapipeError
    from datapipe.store import open_store
    from trainer.training.train import load_teacher, store_dims

    try:
        store = open_store(cfg.shards)
    except (DatapipeError, OSError) as e:
        raise SpecError(f"{spec}: {where} shards = {cfg.shards!r}: {e}") from None
    for key in ("teacher", "init"):
        path = getattr(cfg, key)
        if path is not None:
            _check_model_file(spec, where, key, path)
    if cfg.teacher is not None and cfg.d_coef > 0:
        try:
            with torch.random.fork_rng(devices=[]):
                load_teacher(cfg.teacher, read_checkpoint(cfg.teacher), cfg.teacher_size,
                             store_dims(store))  # fmt: skip
        except TrainError as e:
            raise SpecError(f"{spec}: {where} teacher = {str(cfg.teacher)!r}: {e}") from None


def _check_model_file(spec: Path, where: str, key: str, path: Path) -> None:
    if not path.is_file():
        raise SpecError(
            f"{spec}: {where} {key} = {str(path)!r}: no such file; give an official-format "
            f"checkpoint (e.g. from `tools make-teacher` or `trainer export`)"
        )
    try:
        read_checkpoint(path)
    except (CheckpointError, OSError) as e:
        raise SpecError(f"{spec}: {where} {key} = {str(path)!r}: {e}") from None


def _check_comparable(spec: Path, runs: list[Run]) -> None:
    """Every training arm trains on one store and is evaluated by one protocol."""
    if not runs:
        return
    first = runs[0]
    for run in runs[1:]:
        for key in ("shards", *_EVAL_KEYS):
            a, b = getattr(first.config, key), getattr(run.config, key)
            if key == "eval_tasks":
                a, b = first.config.eval_protocol.tasks, run.config.eval_protocol.tasks
            if a != b:
                raise SpecError(
                    f"{spec}: arms {first.arm!r} and {run.arm!r} cannot be compared: {key} "
                    f"{a!r} vs {b!r}. Set {key} once in [base] (an experiment trains every arm "
                    f"on one store and evaluates them alike), or split the arms into two specs"
                )


_COMPARED = ("steps", "eval_every", "shards", *_EVAL_KEYS)  # besides TrainConfig.math_fields


def _check_run_folder(spec: Path, run: Run) -> None:
    """A run folder that already holds a run must hold this run (to keep or to resume)."""
    path = run.out / CONFIG_FILE
    if not path.is_file():
        return
    old = json.loads(path.read_text())["config"]
    new = run.config.to_dict()
    keys = (*run.config.math_fields, "teacher", *_COMPARED)
    was = {k: TrainConfig.saved(old, k) for k in dict.fromkeys(keys)}
    differ = [f"{k} {was[k]!r} -> {new[k]!r}" for k in was if not _same(k, was[k], new[k])]
    if old.get("steps") != new["steps"] and _checkpoint_step(run) <= new["steps"]:
        differ = [d for d in differ if not d.startswith("steps ")]  # it continues, or stops
    if differ:
        raise SpecError(
            f"{spec}: {run.out} already holds a run with other settings ({'; '.join(differ)}); "
            f"use another --out, or move that folder away"
        )


def _same(key: str, a: Any, b: Any) -> bool:
    """Equal settings; paths by the file they name (a run resumed from another folder)."""
    if a == b:
        return True
    local = key in _PATH_KEYS and all(isinstance(v, str) and "://" not in v for v in (a, b))
    return local and os.path.realpath(a) == os.path.realpath(b)


def _checkpoint_step(run: Run) -> int:
    """The step of the run's checkpoint (0 without one)."""
    path = run.out / CHECKPOINT_FILE
    return read_training_checkpoint(path)["step"] if path.is_file() else 0


# -- running ------------------------------------------------------------------------------------


def run_state(run: Run) -> str:
    """done | resume | new. A reference run is done when its eval.json is of the checkpoint
    file as it is now (its sha256): a changed file, in place or by path, is evaluated again."""
    if run.config is None:
        return "done" if _evaluated_sha256(run) == file_sha256(run.checkpoint) else "new"
    if not (run.out / CHECKPOINT_FILE).is_file():
        return "new"
    summary = run.out / SUMMARY_FILE
    if summary.is_file() and json.loads(summary.read_text()).get("final_step") == run.steps:
        return "done"
    return "resume"


def _evaluated_sha256(run: Run) -> str | None:
    """The sha256 of the checkpoint a reference run's eval.json evaluated, if it has one."""
    try:
        protocol = json.loads((run.out / REFERENCE_FILE).read_text())["protocol"]
        return None if protocol.get("partial") else protocol["checkpoint_sha256"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def run_experiment(
    spec: str | os.PathLike, out: str | os.PathLike, jobs: int = 1, progress: bool = True
) -> Path:
    """Run every planned run not yet finished, `jobs` at a time; then write the report.
    Returns the experiment folder. Raises ExperimentError if any run failed, and
    `Interrupted` (with the command that resumes) after Ctrl-C or SIGTERM: the running
    runs then finish their step and write a checkpoint first."""
    exp = load_spec(spec, out, jobs)
    exp.out.mkdir(parents=True, exist_ok=True)
    with _only_experiment_in(exp.out), _signals_raise() as caught:
        try:
            return _run_planned(exp, jobs, progress)
        except KeyboardInterrupt:
            signum = caught[0] if caught else signal.SIGINT
            raise Interrupted(
                f"{exp.out}: stopped; the running runs wrote a checkpoint at their last step. "
                f"Resume with: trainer experiment {spec} --out {exp.out} --jobs {jobs}",
                signum,
            ) from None


def _run_planned(exp: Experiment, jobs: int, progress: bool) -> Path:
    write_json(exp.out / EXPERIMENT_FILE, exp.describe())
    states = {run.name: run_state(run) for run in exp.runs}
    todo = [run for run in exp.runs if states[run.name] != "done"]
    kept = len(exp.runs) - len(todo)
    resumed = sum(states[r.name] == "resume" for r in todo)
    for run in todo:
        if run.config is None and (run.out / REFERENCE_FILE).is_file():
            print(
                f"{run.out}: its {REFERENCE_FILE} is partial or of another file than "
                f"{run.checkpoint} (sha256): evaluating it again"
            )
    print(
        f"{exp.out}: {len(exp.runs)} runs ({kept} finished, {resumed} to resume, "
        f"{len(todo) - resumed} to start), {jobs} at a time"
    )
    failed = _run_all(todo, states, exp, jobs, progress)
    if failed:
        lines = "; ".join(f"{r.name} (exit {code}, log {r.out / RUN_LOG})" for r, code in failed)
        raise ExperimentError(
            f"{len(failed)} run(s) failed: {lines}. Fix the cause and run the same command "
            f"again: finished runs are kept, the others resume"
        )
    from trainer.study.report import write_report

    write_report(exp.out)
    print(f"{exp.out}: report in {exp.out / REPORT_MD}")
    return exp.out


class ExperimentError(TrainConfigError):
    """A run of the experiment failed, or another experiment runs in the same folder."""


@contextlib.contextmanager
def _only_experiment_in(out: Path) -> Iterator[None]:
    """Hold an exclusive lock on OUT: two experiments writing the same run folders would
    corrupt them. The lock goes with the process, however it ends."""
    with only_writer(out, "another `trainer experiment`", ExperimentError):
        yield


@contextlib.contextmanager
def _signals_raise() -> Iterator[list[int]]:
    """SIGINT and SIGTERM raise KeyboardInterrupt; the signals caught are listed in the
    value yielded. The children ignore SIGINT (see `_child`): the parent stops them."""
    caught: list[int] = []

    def handler(signum: int, frame: Any) -> None:
        caught.append(signum)
        raise KeyboardInterrupt(f"signal {signum}")

    previous = {signum: signal.signal(signum, handler) for signum in SIGNALS}
    try:
        yield caught
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def _run_all(
    todo: list[Run], states: dict[str, str], exp: Experiment, jobs: int, progress: bool
) -> list[tuple[Run, int]]:
    finished = {r.name for r in exp.runs if states[r.name] == "done"}

    work = _Work(exp)
    done, total, said = work.count(finished)
    display = Progress(total, "experiment", "step", progress, done, postfix=said)
    waiting, active, failed = list(todo), {}, []
    try:
        while waiting or active:
            while waiting and len(active) < jobs:
                run = waiting.pop(0)
                active[run.name] = (run, _start(run, states[run.name] == "resume", exp))
            time.sleep(1.0)
            for name, (run, proc) in list(active.items()):
                code = proc.poll()
                if code is None:
                    continue
                del active[name]
                proc.log.close()
                if code == 0:
                    finished.add(name)
                else:
                    failed.append((run, code))
                    display.write(f"{name} failed (exit {code}); its log: {run.out / RUN_LOG}")
            running = [r for r, _ in active.values()]
            names = ", ".join(r.name for r in running) or "-"
            done, total, said = work.count(finished)
            display.set(
                done, f"{said}; runs {len(finished)}/{len(exp.runs)} done, running {names}", total
            )
    finally:
        _stop_children([proc for _, proc in active.values()], display)
        display.close()
    return failed


def _stop_children(procs: list[subprocess.Popen], display: Progress) -> None:
    """Interrupted: one SIGTERM asks each run to finish its step and write a checkpoint;
    another Ctrl-C while they do sends a second one, which aborts them at once."""
    if not procs:
        return
    display.write(
        f"stopping {len(procs)} run(s) after their current step (Ctrl-C again aborts them)"
    )
    for proc in procs:
        proc.terminate()
    try:
        for proc in procs:
            proc.wait()
    except KeyboardInterrupt:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait()
        raise


def _start(run: Run, resume: bool, exp: Experiment) -> subprocess.Popen:
    run.out.mkdir(parents=True, exist_ok=True)
    if run.config is not None:
        # A new run's folder may hold what a start cut short before its first checkpoint.
        config = dataclasses.replace(run.config, resume=resume, overwrite=not resume)
        job = {"kind": "train", "config": config.to_dict()}
    else:
        job = {
            "kind": "reference",
            "checkpoint": str(run.checkpoint),
            "tasks": ",".join(exp.eval["tasks"]),
            "episodes": exp.eval["episodes"],
            "mpc": exp.eval["mpc"],
            "seed": run.seed,
            "out": str(run.out),
        }
    log = open(run.out / RUN_LOG, "a")  # noqa: SIM115 (closed when the run ends)
    proc = subprocess.Popen(
        [sys.executable, "-m", "trainer.study.experiment", json.dumps(job)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    proc.log = log  # type: ignore[attr-defined]
    return proc


class _Work:
    """An experiment's work in training-step equivalents: every training step counts one,
    every evaluation (the runs' own at step 0, every eval_every and the last step, and each
    reference run's) as many steps as the same time trains. That ratio is measured from the
    runs' logs (median eval wall time over median seconds per step) as soon as both exist,
    and until then guessed from the development VM (a policy-only episode ~ 4 steps at batch
    256; an MPPI episode ~ 500)."""

    def __init__(self, exp: Experiment, every: float = 10.0) -> None:
        self.exp, self.every, self._at, self._ratio = exp, every, -math.inf, None
        protocol = exp.eval
        per_episode = 500.0 if protocol["mpc"] else 4.0
        self.guess = per_episode * protocol["episodes"] * len(protocol["tasks"])

    def ratio(self) -> tuple[float, bool]:
        """(steps per evaluation, measured?), read from the logs at most every few seconds."""
        if time.monotonic() - self._at >= self.every:
            self._at = time.monotonic()
            self._ratio = _measured_ratio(self.exp.runs)
        return (self._ratio, True) if self._ratio else (self.guess, False)

    def count(self, finished: set[str]) -> tuple[int, int, str]:
        """(done, total) in step equivalents, and what they are made of, in words; a run
        not finished counts what its logs hold (a run to resume, or one running)."""
        per_eval, measured = self.ratio()
        steps = evals = steps_total = evals_total = 0
        for run in self.exp.runs:
            steps_total += run.steps
            evals_total += run.evaluations
            if run.name in finished:
                steps, evals = steps + run.steps, evals + run.evaluations
            elif run.config is not None:
                steps += _steps_done(run)
                evals += min(len(read_evals(run.out)), run.evaluations)
        done = round(steps + evals * per_eval)
        total = round(steps_total + evals_total * per_eval)
        how = "measured" if measured else "guessed until one is logged"
        said = (
            f"training steps {steps}/{steps_total}, evaluations {evals}/{evals_total} "
            f"(one ~ {per_eval:.0f} steps, {how})"
        )
        return done, max(total, 1), said


def _measured_ratio(runs: list[Run]) -> float | None:
    """Median evaluation wall time over median seconds per training step, from the logs."""
    walls, rates = [], []
    for run in runs:
        if run.config is None or not run.out.is_dir():
            continue
        walls += [row["wall_s"] for row in read_evals(run.out) if row.get("wall_s")]
        rates += [row["steps_per_s"] for row in read_metrics(run.out) if row.get("steps_per_s")]
    if not walls or not rates:
        return None
    return statistics.median(walls) * statistics.median(rates)


def _steps_done(run: Run) -> int:
    """Steps a running run has logged (its last metrics row)."""
    if run.config is None:
        return 0
    path = run.out / JSONL_FILE
    try:
        with open(path, "rb") as f:
            f.seek(max(0, path.stat().st_size - 4096))
            lines = [line for line in f.read().splitlines() if line.strip()]
        return int(json.loads(lines[-1])["step"]) if lines else 0
    except (OSError, ValueError, KeyError):
        return 0


def _child(job: dict[str, Any]) -> None:
    """One run, in its own process: exactly `trainer train/distill` or `trainer eval`.
    Ctrl-C at the terminal reaches the parent only; it stops the child with SIGTERM."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if job["kind"] == "train":
        from trainer.training.train import train

        train(TrainConfig(**job["config"]))
        return
    from trainer.evaluation.evaluate import EvalConfig, run_eval

    cfg = EvalConfig(
        checkpoint=Path(job["checkpoint"]),
        tasks=job["tasks"],
        episodes=job["episodes"],
        mpc=job["mpc"],
        seed=job["seed"],
        out=Path(job["out"]),
        workers=0,
    )
    result = run_eval(cfg)
    print(f"{job['out']}: normalized score {result.normalized_score:.2f}")


if __name__ == "__main__":
    _child(json.loads(sys.argv[1]))
