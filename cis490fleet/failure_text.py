"""One line that says why an attempt failed, from the error text a worker reported.

Pure core: string handling only. A worker reports a trainer crash as its own
summary ("trainer exit code 1; last stderr:") followed by the trainer's stderr
tail; the reason a person needs is the trainer's last meaningful line there
(a traceback's exception line), not the summary. Never reads or writes anything.
"""

from __future__ import annotations

STDERR_MARK = "; last stderr:"


def _meaningful(line: str) -> bool:
    """A line that can say why: it has a letter or digit, and is not a traceback's frame, source or heading."""
    if not line.strip() or line[:1].isspace() or not any(ch.isalnum() for ch in line):
        return False
    return not line.startswith(("Traceback (most recent call last)", "During handling of", "The above exception"))


def summary(text: str | None) -> str | None:
    """'ValueError: lr must be > 0 (trainer exit code 1)' for a worker's crash report; the first non-blank line
    of any other error text; None for None."""
    if text is None:
        return None
    head, mark, tail = str(text).partition(STDERR_MARK)
    first = next((line.strip() for line in head.splitlines() if line.strip()), "")
    if not mark:
        return first
    reason = next((line.strip() for line in reversed(tail.splitlines()) if _meaningful(line)), "")
    return f"{reason} ({first})" if reason else first
