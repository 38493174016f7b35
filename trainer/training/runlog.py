"""Run logs: one row of metrics per log step to CSV, JSONL and optionally TensorBoard, and
the memory peaks reported at the end of a run.

Files in the run folder:

    metrics.csv    one row per log step, columns COLUMNS (empty where a value is absent)
    metrics.jsonl  the same rows as JSON objects (absent values left out)
    evals.csv      one row per evaluation during training (--eval-every): step, normalized
                   score, wall seconds, then the mean return of every evaluated task
    evals.jsonl    the same rows with every episode's return: {"step", "normalized_score",
                   "returns": {task: [return, ...]}, "wall_s"}
    tensorboard/   event files (with --tensorboard), one scalar per metric (train/..., eval/...)

A resumed run first drops the rows written after its checkpoint, so the files read as if
the run had never stopped.
"""

from __future__ import annotations

import csv
import json
import math
import secrets
import sys
from pathlib import Path
from typing import Any

import psutil
import torch

from datapipe.extras import install_hint
from trainer.errors import TrainConfigError

# docs/tdmpc2.md#logged-values, in the official order.
UPDATE_METRICS = (
    "consistency_loss",
    "reward_loss",
    "value_loss",
    "termination_loss",
    "total_loss",
    "grad_norm",
    "pi_loss",
    "pi_grad_norm",
    "pi_entropy",
    "pi_scaled_entropy",
    "pi_scale",
)
# docs/distillation.md#loss: logged when a teacher is given; reward_mae_teacher =
# mean |r_student - r_teacher| on the batch (lower: closer to the teacher).
DISTILL_METRICS = ("distill_loss", "reward_mae_teacher", "d_coef")
# Speed over the steps since the previous row; data_wait = share of that time spent in the loader.
SPEED_METRICS = ("steps_per_s", "data_wait")
COLUMNS = ("step", *UPDATE_METRICS, *DISTILL_METRICS, *SPEED_METRICS)

CSV_FILE = "metrics.csv"
JSONL_FILE = "metrics.jsonl"
EVAL_CSV_FILE = "evals.csv"
EVAL_JSONL_FILE = "evals.jsonl"
TENSORBOARD_DIR = "tensorboard"
WANDB_DIR = "wandb"  # wandb's own files (offline runs too), under the run folder
WANDB_ID_FILE = "wandb-id.txt"  # the W&B run id, so that a resumed run continues the same run
RUN_LOG_FILES = (CSV_FILE, JSONL_FILE, EVAL_CSV_FILE, EVAL_JSONL_FILE, WANDB_ID_FILE)


def summary_writer_class() -> type:
    """torch's TensorBoard SummaryWriter, or an error saying how to install TensorBoard."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise TrainConfigError(
            f"--tensorboard needs the tensorboard package ({e}); install it with "
            f"`{install_hint('train')}`, or leave out "
            f"--tensorboard: metrics.csv and metrics.jsonl are always written"
        ) from e
    return SummaryWriter


def wandb_module() -> Any:
    """The wandb package, or an error saying how to install it."""
    try:
        import wandb
    except ImportError as e:
        raise TrainConfigError(
            f"--wandb needs the wandb package ({e}); install it with `{install_hint('wandb')}`, "
            f"or leave out --wandb: metrics.csv and metrics.jsonl are always written"
        ) from e
    return wandb


class MetricsLog:
    """Appends metric rows to the run folder's CSV and JSONL files, and to TensorBoard
    and Weights & Biases when asked (W&B: the CSV's names, evaluations under eval/)."""

    def __init__(
        self,
        run_dir: Path,
        tensorboard: bool = False,
        resume_step: int | None = None,
        wandb_project: str | None = None,
        config: dict[str, Any] | None = None,
    ):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        csv_path, jsonl_path = self.run_dir / CSV_FILE, self.run_dir / JSONL_FILE
        if resume_step is None:
            csv_path.write_text(",".join(COLUMNS) + "\n")
            jsonl_path.write_text("")
        else:
            _truncate_csv(csv_path, resume_step)
            _truncate_jsonl(jsonl_path, resume_step)
        self._csv_file = open(csv_path, "a", newline="")  # noqa: SIM115 (closed in close())
        self._csv = csv.writer(self._csv_file, lineterminator="\n")  # csv's default is \r\n
        self._jsonl = open(jsonl_path, "a")  # noqa: SIM115 (closed in close())
        self._tb = None
        if tensorboard:
            purge = None if resume_step is None else resume_step + 1
            self._tb = summary_writer_class()(str(self.run_dir / TENSORBOARD_DIR), purge_step=purge)
        self._wandb = None
        if wandb_project is not None:
            self._wandb = _wandb_run(self.run_dir, wandb_project, config, resume_step)

    def write(self, step: int, values: dict[str, float]) -> None:
        """One row: `values` keyed by COLUMNS names (others are ignored)."""
        row = {k: float(values[k]) for k in COLUMNS[1:] if k in values}
        self._csv.writerow([step, *(_fmt(row.get(k)) for k in COLUMNS[1:])])
        self._csv_file.flush()
        clean = {k: (v if math.isfinite(v) else str(v)) for k, v in row.items()}
        self._jsonl.write(json.dumps({"step": step, **clean}) + "\n")
        self._jsonl.flush()
        self._tensorboard("train", row, step)
        if self._wandb is not None:
            self._wandb.log(row, step=step)

    def add_scalars(self, prefix: str, values: dict[str, float], step: int) -> None:
        """`values` as scalars `prefix/name` in TensorBoard and W&B (if on)."""
        self._tensorboard(prefix, values, step)
        if self._wandb is not None:
            self._wandb.log({f"{prefix}/{k}": v for k, v in values.items()}, step=step)

    def _tensorboard(self, prefix: str, values: dict[str, float], step: int) -> None:
        if self._tb is not None:
            for key, value in values.items():
                self._tb.add_scalar(f"{prefix}/{key}", value, step)
            self._tb.flush()

    def close(self) -> None:
        self._csv_file.close()
        self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _wandb_run(
    run_dir: Path, project: str, config: dict[str, Any] | None, resume_step: int | None
) -> Any:
    """A W&B run for the run folder: a new one, or on resume the one its id file names.
    WANDB_MODE=offline (wandb's own setting) keeps it on this machine (`wandb sync` later)."""
    wandb = wandb_module()
    id_file = run_dir / WANDB_ID_FILE
    if resume_step is not None and id_file.is_file():
        run_id = id_file.read_text().strip()
    else:
        run_id = secrets.token_hex(4)
        id_file.write_text(run_id + "\n")
    return wandb.init(
        project=project,
        id=run_id,
        resume="allow",
        name=run_dir.name,
        dir=str(run_dir),
        config=config or {},
    )


class EvalLog:
    """Appends evaluation rows to the run folder's evals.csv and evals.jsonl, and to
    TensorBoard as eval/normalized_score, eval/<task> through the run's MetricsLog (one
    event writer per run). The CSV columns are fixed by `tasks`."""

    def __init__(
        self,
        run_dir: Path,
        tasks: tuple[str, ...],
        metrics: MetricsLog,
        resume_step: int | None = None,
    ) -> None:
        self.run_dir, self.tasks, self._metrics = Path(run_dir), tuple(tasks), metrics
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._header = ",".join(("step", "normalized_score", "wall_s", *self.tasks)) + "\n"
        csv_path, jsonl_path = self.run_dir / EVAL_CSV_FILE, self.run_dir / EVAL_JSONL_FILE
        if resume_step is None:
            csv_path.write_text(self._header)
            jsonl_path.write_text("")
        else:
            _truncate_csv(csv_path, resume_step, self._header)
            _truncate_jsonl(jsonl_path, resume_step)
        self._csv_path, self._jsonl_path = csv_path, jsonl_path

    def write(self, row: dict[str, Any]) -> None:
        means = [float(sum(r) / len(r)) for r in (row["returns"][t] for t in self.tasks)]
        values = [row["normalized_score"], row["wall_s"], *means]
        with open(self._csv_path, "a", newline="") as f:
            f.write(",".join([str(row["step"]), *(repr(float(v)) for v in values)]) + "\n")
        with open(self._jsonl_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        scalars = dict(zip(self.tasks, means, strict=True))
        self._metrics.add_scalars(
            "eval", {"normalized_score": row["normalized_score"]}, row["step"]
        )
        self._metrics.add_scalars("eval", scalars, row["step"])


class NullLog:
    """MetricsLog's stand-in on the ranks other than 0 of a data-parallel run: only rank 0
    writes the run folder."""

    def write(self, step: int, values: dict[str, float]) -> None:
        pass

    def __enter__(self) -> NullLog:
        return self

    def __exit__(self, *exc: Any) -> None:
        pass


class StepTimer:
    """Seconds spent waiting for the loader and in the update, per log window and in total."""

    def __init__(self, step: int) -> None:
        self.window_start = self.first_step = self.last_step = step
        self.wait = self.busy = self.total_wait = self.total_busy = 0.0

    def add(self, wait: float, busy: float) -> None:
        self.wait += wait
        self.busy += busy

    def close_window(self, step: int) -> dict[str, float]:
        """steps_per_s and data_wait (share of the time in the loader) since the last call."""
        seconds = self.wait + self.busy
        out = {
            "steps_per_s": (step - self.window_start) / seconds,
            "data_wait": self.wait / seconds,
        }
        self.total_wait, self.total_busy = self.total_wait + self.wait, self.total_busy + self.busy
        self.wait = self.busy = 0.0
        self.window_start = self.last_step = step
        return out

    def totals(self) -> dict[str, Any]:
        """Steps, seconds, steps/s and data-wait share over all closed windows."""
        steps, seconds = self.last_step - self.first_step, self.total_wait + self.total_busy
        return {
            "steps": steps,
            "seconds": seconds,
            "steps_per_s": steps / seconds if steps else None,
            "data_wait": self.total_wait / seconds if steps else None,
        }


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The rows of a run's metrics.jsonl, in order ([] before the run wrote any)."""
    return _read_jsonl(Path(run_dir) / JSONL_FILE)


def read_evals(run_dir: str | Path) -> list[dict[str, Any]]:
    """The rows of a run's evals.jsonl, in order ([] when the run does not evaluate)."""
    return _read_jsonl(Path(run_dir) / EVAL_JSONL_FILE)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSONL log; a half-written last line (a run killed mid-write, or one still
    writing) is left out, a bad line before it is an error."""
    if not path.is_file():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                raise TrainConfigError(
                    f"{path}: line {i + 1} is not JSON; the log is damaged: move it away"
                ) from None
    return rows


def _fmt(value: float | None) -> str:
    return "" if value is None else repr(value)


def _truncate_csv(path: Path, last_step: int, header: str | None = None) -> None:
    """Keep the rows up to `last_step` (written before the checkpoint a run resumes from).
    Lines are rewritten with \n endings (files of older versions end them in \r\n)."""
    lines = path.read_text().splitlines() if path.exists() else []
    header = header or ",".join(COLUMNS) + "\n"
    if lines and lines[0] != header.rstrip("\n"):
        raise TrainConfigError(
            f"{path} has other columns than this trainer writes; move it away to resume"
        )
    kept = [line for line in lines[1:] if line.strip() and int(line.split(",", 1)[0]) <= last_step]
    path.write_text(header + "".join(f"{line}\n" for line in kept))


def _truncate_jsonl(path: Path, last_step: int) -> None:
    """Keep the rows up to `last_step`; a half-written last line (the process was killed
    while writing it) is dropped like the rows after the checkpoint."""
    kept = [row for row in _read_jsonl(path) if row["step"] <= last_step]
    path.write_text("".join(json.dumps(row) + "\n" for row in kept))


# -- memory ------------------------------------------------------------------------------------


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far (the kernel's high-water mark where it
    keeps one, else the current RSS from psutil)."""
    current = psutil.Process().memory_info().rss
    try:
        import resource
    except ImportError:  # Windows: no getrusage
        return current
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return max(current, peak if sys.platform == "darwin" else peak * 1024)


def peak_vram_bytes(device: torch.device) -> int | None:
    """Peak memory allocated by torch on a CUDA device since the run started, else None."""
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
