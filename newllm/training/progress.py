"""Progress of the training loops: a live bar on a terminal, a few log lines anywhere else.

A tqdm bar redraws itself with a carriage return up to 10 times a second; written to a file (a SLURM
job's log, a redirected run) every redraw stays, tens of kB of bar per run. So the bar is drawn only when
its stream is a terminal. Elsewhere a loop writes a plain log line (into the run's log like every other
line) at a quarter of its length, half, three quarters and its end, and only when a minute has passed
since the last progress line of any loop: a long loop gives at most 4 lines, many short epochs about one
line a minute, a run of seconds none (its phase summaries say the rest).
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import IO, Any, Generic, TypeVar

from tqdm.auto import tqdm

log = logging.getLogger(__name__)
T = TypeVar("T")
LINES = 4  # log lines a loop may write: at 1/4, 1/2, 3/4 and all of its length


@dataclass
class Pacer:
    """At most one progress line per `every_s` seconds, across every loop of the process."""

    every_s: float = 60.0
    clock: Callable[[], float] = time.monotonic
    last: float | None = None  # when the last line was written (or the first loop began)

    def start(self) -> None:
        if self.last is None:
            self.last = self.clock()

    def due(self) -> bool:
        now = self.clock()
        if self.last is not None and now - self.last < self.every_s:
            return False
        self.last = now
        return True


PACER = Pacer()


class Progress(Generic[T]):
    """Iterate `iterable` as the loop's progress: `for x in Progress(items, "phase1", enabled)`;
    set_postfix(key=value) adds figures to the bar or to the next line."""

    def __init__(self, iterable: Iterable[T], desc: str, enabled: bool = True, stream: IO[str] | None = None,
                 pacer: Pacer = PACER) -> None:
        stream = stream if stream is not None else sys.stderr
        self.items, self.desc, self.pacer = iterable, desc, pacer
        self.total = len(iterable) if hasattr(iterable, "__len__") else None
        self.postfix: dict[str, Any] = {}
        terminal = enabled and getattr(stream, "isatty", lambda: False)()
        self.bar = tqdm(iterable, desc=desc, total=self.total, leave=False, file=stream) if terminal else None
        self.lines = enabled and not terminal

    def __iter__(self) -> Iterator[T]:
        if self.bar is not None:
            return iter(self.bar)
        return self._logged() if self.lines else iter(self.items)

    def set_postfix(self, **figures: Any) -> None:
        if self.bar is not None:
            self.bar.set_postfix(**figures)
        self.postfix = figures

    def _logged(self) -> Iterator[T]:
        self.pacer.start()
        start = self.pacer.clock()
        marks = {math.ceil(self.total * q / LINES) for q in range(1, LINES + 1)} if self.total else None
        for done, item in enumerate(self.items, start=1):
            yield item
            if (marks is None or done in marks) and self.pacer.due():
                log.info("%s", self.line(done, self.pacer.clock() - start))

    def line(self, done: int, elapsed_s: float) -> str:
        """`phase1: 20/40 (50%) in 31 s, loss=-0.3312 stab=0.999`"""
        share = f"{done}/{self.total} ({100 * done / self.total:.0f}%)" if self.total else f"{done}"
        figures = " ".join(f"{k}={v}" for k, v in self.postfix.items())
        return f"{self.desc}: {share} in {elapsed_s:.0f} s" + (f", {figures}" if figures else "")
