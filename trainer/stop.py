"""Stopping a run on Ctrl-C or SIGTERM without losing it.

The first SIGINT or SIGTERM only asks the training loop to stop: it finishes the step it is
in, writes a checkpoint and raises `Interrupted`, whose message is the command that resumes
the run. A second signal aborts at once (KeyboardInterrupt); the atomic writers remove their
temporary files as it unwinds, so no half-written file is left behind.

A signal the process was started with ignored (`nohup`, or `trainer experiment`'s children,
whose parent owns Ctrl-C and forwards it as one SIGTERM) stays ignored.
"""

from __future__ import annotations

import signal
import sys
import threading
from types import FrameType
from typing import Any

from trainer.errors import TrainError

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(TrainError):
    """A run stopped on a signal after writing its checkpoint; the message says how to go on."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        """The shell's convention for a process ended by a signal: 128 + its number."""
        return 128 + self.signum


class StopRequest:
    """While active, the first SIGINT/SIGTERM sets `signum`; the second aborts at once.

    Use as a context manager around the loop and test `requested` between steps. Outside
    the main thread (where Python cannot install handlers) it never fires.
    """

    def __init__(self, announce: str = "stopping after this step") -> None:
        self.signum: int | None = None
        self._announce = announce
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                if signal.getsignal(signum) is not signal.SIG_IGN:
                    self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt(f"second signal ({signal.Signals(signum).name}): aborted")
        self.signum = signum
        name = signal.Signals(signum).name
        print(f"\n{name}: {self._announce}; send it again to abort at once", file=sys.stderr)
