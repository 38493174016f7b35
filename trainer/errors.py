"""The errors the training entry points raise on purpose.

Each says what is wrong and what to do, and also subclasses the matching built-in, so a
caller can catch `ValueError` without knowing ours. Checkpoint-file problems raise
`trainer.model.checkpoint.CheckpointError`; store problems raise `datapipe.errors.DatapipeError`.
"""


class TrainError(Exception):
    """Base class of every error raised on purpose by the training entry points."""


class TrainConfigError(TrainError, ValueError):
    """The settings cannot work together (or not on this machine)."""


class IncompatibleDataError(TrainError, ValueError):
    """The store's task set or dims differ from those of the teacher or the student."""


class ResumeError(TrainError, ValueError):
    """A run cannot be resumed (or started) in the given output folder."""


class DivergedError(TrainError, FloatingPointError):
    """A loss became NaN or infinite; the run stopped at that step."""


class ReplicaMismatchError(TrainError, RuntimeError):
    """Data-parallel ranks hold different model states, or drew the same batch (--ddp-check)."""


class BusyError(TrainError, RuntimeError):
    """Another process is writing the same output (run folder, evaluation, model file)."""


class ReportError(TrainError, ValueError):
    """An experiment folder cannot be reported on (not one, another format, runs missing)."""
