"""JSON as it arrives from the network: parsed with bounds, or refused with a sentence naming the fix.

Pure core. Owns the parse of every JSON body at the HTTP edge: finite numbers only
(``1e999`` parses to infinity, which no stored value may hold), a cap on nesting
depth (checked without recursion, so a hostile body never reaches the
interpreter's recursion limit), UTF-8 only. It never bounds what a field may
hold once parsed: that is the command validation's job.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from typing import Any

from cis490fleet import errors

MAX_DEPTH = 64


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:40]} is out of range (it would be {value})")
    return value


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


_STRING_RE = re.compile(rb'"(?:[^"\\]|\\.)*"')
_ONLY_BRACKETS = bytes(range(256)).translate(None, b"[]{}")  # every other byte, to delete
_SIGNED = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")  # openers +1, closers -1 as signed bytes


def depth(raw: bytes) -> int:
    """How deep ``[`` and ``{`` nest in ``raw`` (brackets inside strings not counted), at C speed."""
    if raw.count(b"[") + raw.count(b"{") <= MAX_DEPTH:
        return raw.count(b"[") + raw.count(b"{")  # an upper bound: the common case costs two scans
    brackets = _STRING_RE.sub(b"", raw).translate(None, _ONLY_BRACKETS).translate(_SIGNED)
    return max(itertools.accumulate(memoryview(brackets).cast("b")), default=0)


def parse(raw: bytes, *, what: str = "request body", max_depth: int = MAX_DEPTH) -> Any:
    """``raw`` as JSON; None when it is empty. BadRequest for anything else that is not bounded JSON."""
    if not raw.strip():
        return None
    if depth(raw) > max_depth:
        raise errors.BadRequest(f"{what} nests arrays/objects more than {max_depth} levels deep; "
                                "send flatter JSON")
    try:
        return json.loads(raw, parse_float=_finite_float, parse_constant=_reject_constant)
    except UnicodeDecodeError:
        raise errors.BadRequest(f"{what} is not UTF-8 text; send JSON encoded as UTF-8") from None
    except RecursionError:
        raise errors.BadRequest(f"{what} is nested too deeply; send flatter JSON") from None
    except ValueError as err:
        reason = "a number has too many digits" if "digits" in str(err) else str(err)
        raise errors.BadRequest(f"{what} is not valid JSON ({reason}); send JSON with finite numbers") from None
