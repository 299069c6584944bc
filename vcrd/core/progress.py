"""Progress output that suits a terminal and a log file.

On a terminal, a tqdm bar. When the stream is not a terminal (``make demo > demo.log``, CI, a job
scheduler), a tqdm bar would write thousands of carriage-return updates into the file; instead
:class:`LineProgress` writes one plain status line at most every ``interval`` seconds, and a last
one when the work ends::

    training: 1200/3600 step (33%), 95 s elapsed, 12.6 step/s, about 190 s left

Work without a count (a model conversion's phases) uses :class:`PhaseProgress`: a line per phase,
and off a terminal a heartbeat line every few seconds while a phase runs.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from typing import Callable, Iterator, Optional, TextIO, Union

DEFAULT_INTERVAL_S = 5.0


class LineProgress:
    """A status line every ``interval`` seconds at most (and one at ``close``), for logs.

    Args:
        total: the amount of work (steps, tokens, examples).
        desc: what is being done, printed first on each line.
        unit: the unit of ``total``.
        initial: work already done (a resumed run).
        interval: the least number of seconds between two lines.
        file: where the lines go (default ``sys.stderr``).
        clock: seconds since an arbitrary origin (``time.monotonic``; tests pass their own).
    """

    def __init__(self, total: int, *, desc: str, unit: str, initial: int = 0,
                 interval: float = DEFAULT_INTERVAL_S, file: Optional[TextIO] = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.total, self.desc, self.unit, self.n = total, desc, unit, initial
        self.interval, self.file, self.clock = interval, file if file is not None else sys.stderr, clock
        self.start = self.clock()
        self.last_line = self.start
        self.initial = initial
        self.written_n: Optional[int] = None
        self.closed = False

    def update(self, n: int = 1) -> None:
        """Count ``n`` more units; write a line if ``interval`` seconds passed since the last one."""
        self.n += n
        now = self.clock()
        if now - self.last_line >= self.interval:
            self._write(now)

    def close(self) -> None:
        """Write the last line (once, and only if the count moved since the last line)."""
        if not self.closed:
            self.closed = True
            if self.written_n != self.n:
                self._write(self.clock())

    def line(self, now: float) -> str:
        """The status line at time ``now``."""
        elapsed = now - self.start
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        text = f"{self.desc}: {self.n}/{self.total} {self.unit}{pct}, {elapsed:.0f} s elapsed"
        done_here = self.n - self.initial
        if elapsed > 0 and done_here > 0:
            rate = done_here / elapsed
            text += f", {rate:.3g} {self.unit}/s"
            if self.total and self.n < self.total:
                text += f", about {(self.total - self.n) / rate:.0f} s left"
        return text

    def _write(self, now: float) -> None:
        self.last_line, self.written_n = now, self.n
        print(self.line(now), file=self.file, flush=True)

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class NoProgress:
    """Progress output switched off: ``update`` and ``close`` do nothing."""

    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> NoProgress:
        return self

    def __exit__(self, *exc) -> None:
        pass


def is_terminal(stream: Optional[TextIO]) -> bool:
    """True when ``stream`` is a terminal (a closed or odd stream counts as not one)."""
    try:
        return bool(stream is not None and stream.isatty())
    except (AttributeError, ValueError):
        return False


class PhaseProgress:
    """Phase lines for a long conversion. Each phase prints a line when it starts and one with its time
    when it ends; when ``stream`` is not a terminal (a log file, CI) a background thread also prints a
    line every ``interval`` seconds while a phase runs (with ``detail()``, e.g. bytes hashed so far),
    so a silent minute never looks like a hang. ``interval <= 0``: no heartbeat."""

    def __init__(self, stream: Optional[TextIO] = None, interval: float = 5.0) -> None:
        self.stream = stream if stream is not None else sys.stdout
        self.interval = interval
        self.heartbeat = interval > 0 and not is_terminal(self.stream)
        self.start = time.perf_counter()
        self.detail: Callable[[], str] = lambda: ""

    def say(self, text: str) -> None:
        print(f"[{time.perf_counter() - self.start:6.1f} s] {text}", file=self.stream, flush=True)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[PhaseProgress]:
        self.say(f"{name} ...")
        t0, done = time.perf_counter(), threading.Event()
        self.detail = lambda: ""

        def beat() -> None:
            while not done.wait(self.interval):
                extra = self.detail()
                self.say(f"  {name}: {time.perf_counter() - t0:.0f} s{f', {extra}' if extra else ''}")

        thread = threading.Thread(target=beat, daemon=True) if self.heartbeat else None
        if thread is not None:
            thread.start()
        try:
            yield self
        finally:
            done.set()
            if thread is not None:
                thread.join()
        self.say(f"{name}: done in {time.perf_counter() - t0:.1f} s")


def progress(total: int, *, desc: str, unit: str, initial: int = 0, disable: bool = False,
             file: Optional[TextIO] = None, interval: float = DEFAULT_INTERVAL_S
             ) -> Union[LineProgress, NoProgress, object]:
    """A progress reporter with ``update(n)`` and ``close()``, usable as a context manager.

    A tqdm bar when ``file`` (default ``sys.stderr``) is a terminal, else a :class:`LineProgress`
    writing a status line every ``interval`` seconds at most; :class:`NoProgress` when ``disable``.
    """
    if disable:
        return NoProgress()
    stream = file if file is not None else sys.stderr
    if is_terminal(stream):
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit=unit, initial=initial, file=stream)
    return LineProgress(total, desc=desc, unit=unit, initial=initial, interval=interval, file=stream)
