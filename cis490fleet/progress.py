"""Terminal rendering of training progress: bars, 'epoch 3/10 loss 0.4123 42% ETA 1m20s', TTY and plain lines.

Pure string formatting over the progress dicts of the trainer contract
(``fraction``, ``epoch``/``epochs``, ``step``/``steps``, ``loss``, ``eta_s``);
the caller passes ``now`` and writes the strings. Shared by ``jobs watch`` and
the worker's terminal view, so both say the same thing the same way. The one
look outside is ``terminal_columns``, asked of the stream the caller writes to.
"""

from __future__ import annotations

import math
import os
from typing import Any

BAR_WIDTH = 20
_CLEAR_LINE_UP = "\x1b[1A\x1b[2K"


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def fraction(progress: dict | None) -> float | None:
    """How far a job is, 0..1: ``fraction``, else epoch/epochs, else step/steps; None when unknown."""
    if not isinstance(progress, dict):
        return None
    f = _number(progress.get("fraction"))
    if f is None:
        for done, total in (("epoch", "epochs"), ("step", "steps")):
            d, t = _number(progress.get(done)), _number(progress.get(total))
            if d is not None and t:
                f = d / t
                break
    return None if f is None else max(0.0, min(1.0, f))


def format_duration(seconds: float | None) -> str:
    """'45s', '1m20s', '2h05m', '3d04h'; '-' for None or a negative/non-finite value."""
    s = _number(seconds)
    if s is None or s < 0:
        return "-"
    s = int(round(s))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def render_bar(fraction: float | None, width: int = BAR_WIDTH) -> str:
    """'[########............]' with ``width`` cells inside the brackets; '[????...]' when unknown."""
    width = max(1, int(width))
    f = _number(fraction)
    if f is None:
        return "[" + "?" * width + "]"
    filled = int(width * max(0.0, min(1.0, f)) + 0.5)
    return "[" + "#" * filled + "." * (width - filled) + "]"


HISTORY_POINTS = 12


def observe(history: list[tuple[float, float]], progress: dict | None, now: float,
            keep: int = HISTORY_POINTS) -> list[tuple[float, float]]:
    """``history`` of (when first seen, fraction) points with ``progress`` added when its fraction moved on;
    the last ``keep`` points. A fraction that went back (a new attempt) starts a new history."""
    f = fraction(progress)
    if f is None or (history and history[-1][1] == f):
        return history
    if history and f < history[-1][1]:
        return [(now, f)]
    return (history + [(now, f)])[-keep:]


def eta_seconds(progress: dict | None, started: float | None, now: float,
                history: list[tuple[float, float]] = ()) -> float | None:
    """Seconds left: the trainer's own ``eta_s``, else the rate over ``history`` (see ``observe``), else
    extrapolated from the time since ``started``.

    With a history the estimate is made as of the last point and counts down from there, so it does not
    climb while a refreshing view waits for the next report; the rate over all points smooths out bursts."""
    if not isinstance(progress, dict):
        return None
    eta = _number(progress.get("eta_s"))
    if eta is not None:
        return max(0.0, eta)
    f = fraction(progress)
    if f is None or not 0 < f < 1:
        return None
    if history and history[-1][1] == f:
        (t0, f0), (t1, _) = history[0], history[-1]
        if t1 > t0 and f > f0:
            return max(0.0, (1 - f) * (t1 - t0) / (f - f0) - (now - t1))
        if started is not None and t1 > started:
            return max(0.0, (t1 - started) * (1 - f) / f - (now - t1))
    if started is None:
        return None
    elapsed = now - started
    return elapsed * (1 - f) / f if elapsed > 0 else None


def _format_loss(loss: float) -> str:
    if loss != 0 and (abs(loss) < 1e-3 or abs(loss) >= 1e5):
        return f"{loss:.3e}"
    return f"{loss:.4f}"


def format_progress(progress: dict | None, started: float | None, now: float,
                    history: list[tuple[float, float]] = ()) -> str:
    """'epoch 3/10 loss 0.4123 42% ETA 1m20s' (parts that are unknown are left out); 'starting' with none."""
    if not isinstance(progress, dict) or not progress:
        return "starting"
    parts = []
    for done, total in (("epoch", "epochs"), ("step", "steps")):
        d = progress.get(done)
        if d is not None and not isinstance(d, (dict, list)):
            t = progress.get(total)
            parts.append(f"{done} {d}" + (f"/{t}" if t is not None and not isinstance(t, (dict, list)) else ""))
            break
    loss = _number(progress.get("loss"))
    if loss is not None:
        parts.append(f"loss {_format_loss(loss)}")
    f = fraction(progress)
    if f is not None:
        parts.append(f"{100 * f:.0f}%")
    eta = eta_seconds(progress, started, now, history)
    if eta is not None and (f is None or f < 1):
        parts.append(f"ETA {format_duration(eta)}")
    return " ".join(parts) or "running"


def terminal_columns(stream, default: int = 80) -> int:
    """The width of the terminal behind ``stream`` (``default`` when unknown), so a drawn line never wraps:
    a wrapped line would not be cleared by the next ``redraw``."""
    try:
        return os.get_terminal_size(stream.fileno()).columns or default
    except (AttributeError, OSError, ValueError):
        return default


def _fit(text: str, columns: int | None) -> str:
    if columns is None or columns <= 0 or len(text) <= columns:
        return text
    return text[:max(0, columns - 1)] + "…" if columns > 1 else text[:columns]


def progress_line(label: str, progress: dict | None, started: float | None, now: float, *, tty: bool,
                  columns: int | None = 80, bar_width: int = BAR_WIDTH,
                  history: list[tuple[float, float]] = ()) -> str:
    """One job's line. On a terminal: 'label [####....] epoch 3/10 ...' cut to ``columns``;
    otherwise a plain log line 'label: epoch 3/10 ...' (no bar, never cut)."""
    text = format_progress(progress, started, now, history)
    if not tty:
        return f"{label}: {text}"
    return _fit(f"{label} {render_bar(fraction(progress), bar_width)} {text}", columns)


def redraw(lines: list[str], previous: int) -> str:
    """What to write to a terminal to replace the ``previous`` lines drawn last time with ``lines``."""
    return _CLEAR_LINE_UP * max(0, previous) + "".join(line + "\n" for line in lines)


def changed_enough(old: dict | None, new: dict | None, *, step: float = 0.01) -> bool:
    """Whether a plain (non-TTY) log deserves a new line: a new epoch, or ``step`` more of the job done."""
    if not isinstance(new, dict) or not new:
        return False
    if not isinstance(old, dict) or not old:
        return True
    if old.get("epoch") != new.get("epoch"):
        return True
    a, b = fraction(old), fraction(new)
    if a is None or b is None:
        return old != new
    return abs(b - a) >= step or (b >= 1 and a < 1)
