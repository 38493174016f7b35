"""Progress of a long step, for a person at a terminal and for a log file alike.

On a terminal it is a tqdm bar (rate, ETA). Anywhere else (a log file, a CI job, a pipe)
a bar's carriage returns turn into a flood of fragments, so it prints plain lines instead:
at most one per `interval` seconds and one at the end, each with the count, the rate and
the ETA. The rate is measured from the first line on (from the start only until there is
one) and over the last `WINDOW` seconds at most, so that a slow start does not inflate the
ETA for the rest of a long step: the full MT30 build's first minute (a cluster starting,
44 GB of sources hashed) went at 0.4x its steady rate, and the whole-run average put the ETA
at 36 min for a 14-min build. `enabled=False` prints nothing. Every long step of the project
reports through it: build, verify-shards, make-mt30, training, evaluation
(`trainer.evaluation.evaluate.EpisodeProgress`) and whole experiments.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

from tqdm import tqdm

T = TypeVar("T")
WINDOW = 1800.0  # seconds of history behind the rate of a log line (an experiment's
# evaluations take minutes and count no steps: a short window made its ETA jump)


class Progress:
    """`update(n)` as work finishes (or `set(n)`, the count so far); `write(line)` prints
    without breaking the bar. `postfix` follows the count, rate and ETA; `start_line` prints
    a first line at once off a terminal."""

    def __init__(
        self,
        total: int,
        desc: str,
        unit: str,
        enabled: bool = True,
        initial: int = 0,
        interval: float = 60.0,
        postfix: str = "",
        start_line: bool = False,
    ) -> None:
        self.total, self.desc, self.unit, self.interval = total, desc, unit, interval
        self.enabled, self.tty = enabled, enabled and sys.stderr.isatty()
        self.n = initial
        self.postfix = postfix
        self._t0 = self._last_line = time.monotonic()
        self._marks = [(self._t0, initial)]  # (time, count) at each log line, last WINDOW s
        self._bar = tqdm(
            total=total,
            initial=initial,
            desc=desc,
            unit=unit,
            disable=not self.tty,
            dynamic_ncols=True,
        )
        if postfix:
            self._bar.set_postfix_str(postfix, refresh=False)
        if start_line and self.enabled and not self.tty:
            self._line()

    def update(self, n: int = 1, postfix: str | None = None) -> None:
        self.n += n
        if postfix is not None:
            self.postfix = postfix
        if self.tty:
            if postfix is not None:
                self._bar.set_postfix_str(postfix, refresh=False)
            self._bar.update(n)
        elif self.enabled:
            now = time.monotonic()
            if now - self._last_line >= self.interval or self.n >= self.total:
                self._last_line = now
                self._line()

    def set(self, n: int, postfix: str | None = None, total: int | None = None) -> None:
        """The count is now `n` (work counted elsewhere, e.g. by other processes), of
        `total` if given (an estimate that was refined)."""
        if total is not None and total != self.total:
            self.total = self._bar.total = total
        self.update(n - self.n, postfix)

    def write(self, line: str) -> None:
        if self.tty:
            self._bar.write(line)
        else:
            print(line, flush=True)

    def close(self) -> None:
        self._bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _line(self) -> None:
        text = f"{self.desc}: {self.n}/{self.total} {self.unit}s"
        now = time.monotonic()
        marks = self._marks  # the start, then one mark per line
        if len(marks) > 1 and marks[0][0] == self._t0:
            marks.pop(0)  # a line exists: the start-up before it is not the rate
        while len(marks) > 1 and now - marks[1][0] >= WINDOW:
            marks.pop(0)  # keep the youngest mark that is at least WINDOW old
        t0, n0 = marks[0]
        if self.n > n0 and now > t0:
            rate = (self.n - n0) / (now - t0)
            text += f", {rate:.3g} {self.unit}s/s, ETA {hms((self.total - self.n) / rate)}"
        if self.postfix:
            text += f", {self.postfix}"
        self._marks.append((now, self.n))
        print(text, file=sys.stderr, flush=True)


def track(items: Iterable[T], desc: str, unit: str, enabled: bool = True) -> Iterator[T]:
    """`items`, counted with a `Progress` as they are consumed."""
    items = list(items)
    with Progress(len(items), desc, unit, enabled) as bar:
        for item in items:
            yield item
            bar.update()


def hms(seconds: float) -> str:
    """h:mm:ss of a duration (an ETA); "?" when it is not known yet (NaN)."""
    if seconds != seconds:
        return "?"
    m, s = divmod(round(seconds), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}"
