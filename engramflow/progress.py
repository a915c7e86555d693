"""Progress of a run's stages, shown where the run was started.

Flows report `stage(name, total)` and `advance()`; what the user sees depends on the sink the command
installed: a rich progress bar per stage on a terminal (`RichSink`), one plain line per step in a log
file (the default). Stages run in Ray workers report through their flow, never to the terminal
themselves, so a bar is never torn by lines from another process.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Protocol


class Sink(Protocol):
    def start(self, name: str, total: int) -> Any: ...
    def advance(self, handle: Any, done: int, total: int, note: str) -> None: ...
    def finish(self, handle: Any) -> None: ...


class LineSink:
    """Plain lines: `name: done/total (note)`, for logs and pipes."""

    def start(self, name: str, total: int) -> Any:
        return [name, time.perf_counter()]

    def advance(self, handle: Any, done: int, total: int, note: str) -> None:
        name, started = handle
        print(f"{name}: {done}/{total}{f', {note}' if note else ''} ({time.perf_counter() - started:.0f} s)",
              file=sys.stderr, flush=True)

    def finish(self, handle: Any) -> None:
        pass


class RichSink:
    """One rich progress bar per stage, on standard error, kept when the stage ends."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), TextColumn("{task.fields[note]}"),
                                 console=Console(stderr=True), transient=False)

    def start(self, name: str, total: int) -> Any:
        self.progress.start()
        return self.progress.add_task(name, total=total, note="")

    def advance(self, handle: Any, done: int, total: int, note: str) -> None:
        self.progress.update(handle, completed=done, total=total, note=note)

    def finish(self, handle: Any) -> None:
        self.progress.stop()


_SINK: Sink = LineSink()


def use_terminal_sink() -> None:
    """Bars on a terminal, lines otherwise (what the CLI calls before running a flow)."""
    global _SINK
    _SINK = RichSink() if sys.stderr.isatty() else LineSink()


class Stage:
    def __init__(self, name: str, total: int) -> None:
        self.name, self.total, self.done = name, total, 0
        self.handle = _SINK.start(name, total)

    def advance(self, note: str = "", by: int = 1) -> None:
        self.done += by
        _SINK.advance(self.handle, self.done, self.total, note)


@contextmanager
def stage(name: str, total: int) -> Iterator[Stage]:
    """A stage of `total` steps; call `.advance()` after each."""
    current = Stage(name, total)
    try:
        yield current
    finally:
        _SINK.finish(current.handle)
