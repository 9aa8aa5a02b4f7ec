"""The worker's terminal: one live progress line per running job, and log records that never land inside it.

Never talks to the coordinator or touches a trainer; it only draws what it is given.
"""

from __future__ import annotations

import logging
import sys
import threading

from cis490fleet.progress import progress_line, redraw, terminal_columns


class ProgressView:
    """One redrawn line per running job on a terminal, kept below the log lines.

    Worker log calls go through a ``ViewSafeLog``, which lifts the block
    off the terminal before a record is written and puts it back after, so no log
    line is ever overwritten.
    """

    def __init__(self, stream):
        self.stream = stream
        self.lock = threading.RLock()
        self.shown: list[str] = []

    def draw(self, runs: list, now: float) -> None:
        columns = terminal_columns(self.stream)
        lines = [progress_line(f"slot {run.slot.index} {run.label}", run.progress(), run.started, now, tty=True,
                               columns=columns) for run in sorted(runs, key=lambda r: r.slot.index)]
        with self.lock:
            self.clear()
            self.shown = lines
            self.put_back()

    def clear(self) -> None:
        with self.lock:
            if self.shown:
                self.stream.write(redraw([], len(self.shown)))
                self.stream.flush()

    def put_back(self) -> None:
        with self.lock:
            if self.shown:
                self.stream.write(redraw(self.shown, 0))
                self.stream.flush()

    def close(self) -> None:
        with self.lock:
            self.clear()
            self.shown = []


class ViewSafeLog:
    """A module's logger whose records never land inside the live progress block (see ``show``)."""

    view: ProgressView | None = None  # one block per process: every worker module's log shares it

    def __init__(self, logger: logging.Logger):
        self.logger = logger

    def _emit(self, level: int, msg: str, *args, **kwargs) -> None:
        view = self.view
        if view is None:
            self.logger.log(level, msg, *args, stacklevel=3, **kwargs)
            return
        with view.lock:
            view.clear()
            try:
                self.logger.log(level, msg, *args, stacklevel=3, **kwargs)
            finally:
                view.put_back()

    def debug(self, msg, *args, **kw):
        self._emit(logging.DEBUG, msg, *args, **kw)

    def info(self, msg, *args, **kw):
        self._emit(logging.INFO, msg, *args, **kw)

    def warning(self, msg, *args, **kw):
        self._emit(logging.WARNING, msg, *args, **kw)

    def exception(self, msg, *args, **kw):
        self._emit(logging.ERROR, msg, *args, exc_info=True, **kw)


def show(view: ProgressView | None) -> None:
    """Route every worker module's log records around ``view`` (None: plain logging again)."""
    ViewSafeLog.view = view


def logger(name: str) -> ViewSafeLog:
    return ViewSafeLog(logging.getLogger(name))


def is_tty() -> bool:
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):
        return False
