"""Progress output: a status line every few seconds at most when the stream is not a terminal."""

from __future__ import annotations

import io

from vcrd.core.progress import LineProgress, NoProgress, progress


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_ten_thousand_updates_over_twenty_seconds_write_four_lines():
    out, clock = io.StringIO(), FakeClock()
    bar = LineProgress(10_240, desc="training", unit="step", interval=5.0, file=out, clock=clock)
    for _ in range(10_240):
        clock.now += 1 / 512  # exact in binary: 20 s in all
        bar.update(1)
    bar.close()
    assert out.getvalue().splitlines() == [
        "training: 2560/10240 step (25%), 5 s elapsed, 512 step/s, about 15 s left",
        "training: 5120/10240 step (50%), 10 s elapsed, 512 step/s, about 10 s left",
        "training: 7680/10240 step (75%), 15 s elapsed, 512 step/s, about 5 s left",
        "training: 10240/10240 step (100%), 20 s elapsed, 512 step/s",  # close adds no copy of it
    ]


def test_resumed_work_counts_its_rate_from_this_run_only():
    out, clock = io.StringIO(), FakeClock()
    with LineProgress(100, desc="teacher top-K", unit="ex", initial=60, interval=1.0, file=out, clock=clock) as bar:
        clock.now += 4.0
        bar.update(20)
        clock.now += 0.5
        bar.update(5)  # within the interval: no line until close
    assert out.getvalue().splitlines() == ["teacher top-K: 80/100 ex (80%), 4 s elapsed, 5 ex/s, about 4 s left",
                                           "teacher top-K: 85/100 ex (85%), 4 s elapsed, 5.56 ex/s, about 3 s left"]


def test_close_writes_once():
    out = io.StringIO()
    bar = LineProgress(3, desc="x", unit="tok", file=out, clock=FakeClock())
    bar.close()
    bar.close()
    assert out.getvalue() == "x: 0/3 tok (0%), 0 s elapsed\n"


def test_a_file_gets_lines_a_terminal_gets_tqdm_and_disable_gets_nothing():
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert isinstance(progress(10, desc="d", unit="u", file=io.StringIO()), LineProgress)
    bar = progress(10, desc="d", unit="u", file=Terminal())
    assert type(bar).__module__.startswith("tqdm")
    bar.close()
    assert isinstance(progress(10, desc="d", unit="u", disable=True), NoProgress)
