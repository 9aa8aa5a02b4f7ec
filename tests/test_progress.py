"""Progress formatting shared by `jobs watch` and the worker's terminal view: bars, durations, ETA, lines."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, strategies as st

from cis490fleet import progress
from cis490fleet.progress import format_duration, format_progress, fraction, progress_line, redraw, render_bar


def test_the_example_line():
    p = {"epoch": 3, "epochs": 10, "loss": 0.41234, "fraction": 0.42}
    # 42% done after 58 s: 58 * 0.58 / 0.42 = 80 s left.
    assert format_progress(p, started=1000.0, now=1058.0) == "epoch 3/10 loss 0.4123 42% ETA 1m20s"


@pytest.mark.parametrize("p, expected", [
    ({"fraction": 0.25}, 0.25),
    ({"epoch": 3, "epochs": 12}, 0.25),
    ({"step": 30, "steps": 40}, 0.75),
    ({"fraction": 0.5, "epoch": 1, "epochs": 10}, 0.5),  # the trainer's own fraction wins
    ({"fraction": 1.7}, 1.0),
    ({"fraction": -2}, 0.0),
    ({"epoch": 3, "epochs": 0}, None),
    ({"fraction": True}, None),
    ({"fraction": "half"}, None),
    ({"fraction": math.nan}, None),
    ({"loss": 0.3}, None),
    ({}, None),
    (None, None),
    ("not a dict", None),
])
def test_fraction_sources(p, expected):
    assert fraction(p) == expected


@pytest.mark.parametrize("seconds, text", [
    (0, "0s"), (44.6, "45s"), (59.4, "59s"), (60, "1m00s"), (80, "1m20s"), (3599, "59m59s"), (3600, "1h00m"),
    (7500, "2h05m"), (86400 + 4 * 3600, "1d04h"), (None, "-"), (-1, "-"), (math.inf, "-"), (math.nan, "-"),
])
def test_durations(seconds, text):
    assert format_duration(seconds) == text


@pytest.mark.parametrize("f, width, text", [
    (0.0, 10, "[..........]"),
    (0.5, 10, "[#####.....]"),
    (1.0, 10, "[##########]"),
    (0.04, 10, "[..........]"),
    (0.96, 10, "[##########]"),
    (2.0, 4, "[####]"),
    (-1, 4, "[....]"),
    (None, 4, "[????]"),
    (math.nan, 3, "[???]"),
    (0.5, 0, "[#]"),
])
def test_bars(f, width, text):
    assert render_bar(f, width) == text


@given(st.floats(allow_nan=True, allow_infinity=True) | st.none(), st.integers(min_value=1, max_value=200))
def test_a_bar_always_has_its_width(f, width):
    bar = render_bar(f, width)
    assert len(bar) == width + 2 and bar[0] == "[" and bar[-1] == "]"


def test_parts_that_are_unknown_are_left_out():
    assert format_progress({"loss": 0.5}, None, 10.0) == "loss 0.5000"
    assert format_progress({"step": 7}, None, 10.0) == "step 7"
    assert format_progress({"step": 10, "steps": 40}, None, 10.0) == "step 10/40 25%"  # no start, no ETA
    assert format_progress({"epoch": 2, "epochs": 4, "step": 99}, 0.0, 10.0) == "epoch 2/4 50% ETA 10s"
    assert format_progress({"metrics": {"acc": 1}}, 0.0, 10.0) == "running"


def test_no_progress_yet_says_starting():
    assert format_progress(None, 0.0, 1.0) == "starting"
    assert format_progress({}, 0.0, 1.0) == "starting"


def test_the_trainers_own_eta_wins_and_a_finished_job_has_none():
    assert format_progress({"fraction": 0.5, "eta_s": 3600}, 0.0, 10.0) == "50% ETA 1h00m"
    assert format_progress({"fraction": 1.0}, 0.0, 10.0) == "100%"
    assert progress.eta_seconds({"fraction": 0.5}, 20.0, 10.0) is None  # a clock that went backwards


def test_losses_far_from_one_stay_readable():
    assert format_progress({"loss": 0.0}, None, 0) == "loss 0.0000"
    assert format_progress({"loss": 1.5e-6}, None, 0) == "loss 1.500e-06"
    assert format_progress({"loss": 2.5e7}, None, 0) == "loss 2.500e+07"
    assert format_progress({"loss": "nan", "epoch": 1}, None, 0) == "epoch 1"
    assert format_progress({"loss": math.inf, "epoch": 1}, None, 0) == "epoch 1"


def test_terminal_line_has_a_bar_and_fits_the_width():
    p = {"epoch": 3, "epochs": 10, "loss": 0.41234, "fraction": 0.5}
    line = progress_line("ab12 mlp/train", p, 0.0, 10.0, tty=True, columns=200, bar_width=10)
    assert line == "ab12 mlp/train [#####.....] epoch 3/10 loss 0.4123 50% ETA 10s"
    cut = progress_line("ab12 mlp/train", p, 0.0, 10.0, tty=True, columns=30, bar_width=10)
    assert len(cut) == 30 and cut.endswith("…") and cut.startswith("ab12 mlp/train [#####")


def test_plain_line_has_no_bar_and_is_never_cut():
    p = {"epoch": 3, "epochs": 10, "fraction": 0.5}
    line = progress_line("job " + "x" * 100, p, 0.0, 10.0, tty=False, columns=20)
    assert line == "job " + "x" * 100 + ": epoch 3/10 50% ETA 10s"
    assert "[" not in line and "\x1b" not in line


def test_redraw_replaces_exactly_the_previous_lines():
    assert redraw(["a", "b"], 0) == "a\nb\n"
    assert redraw(["c"], 2) == "\x1b[1A\x1b[2K\x1b[1A\x1b[2Kc\n"
    assert redraw([], 1) == "\x1b[1A\x1b[2K"


def test_plain_logs_print_on_a_new_epoch_or_a_percent_more():
    assert progress.changed_enough(None, {"fraction": 0.1})
    assert not progress.changed_enough({"fraction": 0.1}, None)
    assert not progress.changed_enough({"fraction": 0.100}, {"fraction": 0.105})
    assert progress.changed_enough({"fraction": 0.100}, {"fraction": 0.111})
    assert progress.changed_enough({"epoch": 1, "fraction": 0.1}, {"epoch": 2, "fraction": 0.1})
    assert progress.changed_enough({"fraction": 0.995}, {"fraction": 1.0})
    assert progress.changed_enough({"loss": 0.5}, {"loss": 0.4})
    assert not progress.changed_enough({"loss": 0.5}, {"loss": 0.5})


def test_terminal_columns_asks_the_terminal_behind_the_stream():
    import io
    import os

    assert progress.terminal_columns(io.StringIO()) == 80
    assert progress.terminal_columns(object(), default=100) == 100
    if os.name == "nt":
        return
    import fcntl
    import pty
    import struct
    import termios

    master, slave = pty.openpty()
    try:
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 133, 0, 0))
        with open(slave, "w", closefd=False) as stream:
            assert progress.terminal_columns(stream) == 133
    finally:
        os.close(master)
        os.close(slave)


def _watch(reports: dict[float, float], refreshes) -> list[float]:
    """The ETA a refreshing view shows at each of ``refreshes``, the trainer having reported fraction
    ``reports[t]`` at time t (a job started at 0)."""
    history, shown = [], []
    for now in refreshes:
        p = {"fraction": max(f for t, f in reports.items() if t <= now)}
        history = progress.observe(history, p, now)
        shown.append(progress.eta_seconds(p, 0.0, now, history))
    return shown


def test_eta_counts_down_between_reports_instead_of_climbing():
    shown = _watch({0: 0.0, 10: 0.1, 20: 0.2, 30: 0.3}, range(10, 40))
    assert all(b <= a for a, b in zip(shown, shown[1:]) if a is not None), shown
    assert shown[0] == 90.0 and shown[-1] == pytest.approx(61.0)  # 10 s per tenth: 70 s left at 30, 9 s gone


def test_eta_is_smoothed_over_the_history_not_the_last_report_alone():
    """A burst (one report that jumped) moves the ETA by what the whole history says, not by the burst alone."""
    steady = {t: t / 100 for t in range(0, 50, 10)}
    shown = _watch({**steady, 50: 0.9}, range(10, 51))
    rate_of_whole_history = (0.9 - 0.1) / (50 - 10)
    assert shown[-1] == pytest.approx((1 - 0.9) / rate_of_whole_history)


def test_history_keeps_only_points_where_the_fraction_moved_and_is_bounded():
    history = []
    for now, f in [(1, 0.1), (2, 0.1), (3, 0.2), (4, None), (5, 0.2)]:
        history = progress.observe(history, {"fraction": f} if f is not None else None, now)
    assert history == [(1, 0.1), (3, 0.2)]
    for now in range(100):
        history = progress.observe(history, {"fraction": now / 100}, now)
    assert len(history) == progress.HISTORY_POINTS and history[-1] == (99, 0.99)
    assert progress.observe(history, {"fraction": 0.05}, 100) == [(100, 0.05)]  # a restarted attempt
