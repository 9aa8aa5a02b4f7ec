"""failure_text.summary: the one line that says why an attempt failed."""

from __future__ import annotations

import pytest

from cis490fleet.failure_text import summary


@pytest.mark.parametrize("text,line", [
    (None, None),
    ("", ""),
    ("CUDA out of memory\nTraceback line 2", "CUDA out of memory"),
    ("\n  disk full\n", "disk full"),
    ("trainer exit code 3; last stderr:\nboom: simulated trainer crash\n", "boom: simulated trainer crash (trainer exit code 3)"),
    ("trainer killed by SIGKILL; last stderr:\nepoch 2\nTraceback (most recent call last):\n"
     '  File "t.py", line 1, in <module>\n    x()\n    ^^^\nKeyError: \'lr\'\n\n', "KeyError: 'lr' (trainer killed by SIGKILL)"),
    ("trainer exit code 1; last stderr:\n   \n----\n", "trainer exit code 1"),
])
def test_summary(text, line):
    assert summary(text) == line
