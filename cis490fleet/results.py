"""A sweep's answer: each completed job's final metrics, ranked best first.

Pure. The final metrics are what the trainer wrote to ``metrics.json`` (sent with ``complete``), else
the numbers of its last progress line. Bookkeeping numbers (epoch counts, seeds, fractions) are not
metrics. A metric whose name speaks of a loss or an error is better lower; any other, higher.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from typing import Any

MAX_METRICS = 64
MAX_NAME = 64
BOOKKEEPING = frozenset({"epoch", "epochs", "epochs_done", "step", "steps", "fraction", "seed", "total", "done",
                         "tree", "trees", "peak_vram_gib", "interrupted"})
_LOWER_IS_BETTER = re.compile(r"loss|error|err\b|mse|mae|rmse|perplexity|ppl|time|seconds", re.I)
_NAME_RE = re.compile(r"^[A-Za-z0-9_.\-/]{1,64}$")


def final_metrics(*sources: Any) -> dict[str, float]:
    """The finite numbers of the first source that has any: top-level ones, and those of a nested ``metrics``
    table (which win on a clash), under names of at most 64 plain characters; at most 64 of them."""
    for source in sources:
        found = _numbers(source)
        if found:
            return found
    return {}


def _numbers(source: Any) -> dict[str, float]:
    if not isinstance(source, dict):
        return {}
    out: dict[str, float] = {}
    nested = source.get("metrics")
    for table in (source, nested if isinstance(nested, dict) else {}):
        for name, value in table.items():
            if (isinstance(name, str) and name not in BOOKKEEPING and _NAME_RE.match(name)
                    and isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)):
                out[name] = float(value)
    return dict(sorted(out.items())[:MAX_METRICS])


def better_lower(metric: str) -> bool:
    return bool(_LOWER_IS_BETTER.search(metric))


def metric_names(rows: list[dict]) -> list[str]:
    names: dict[str, None] = {}
    for row in rows:
        names.update(dict.fromkeys(row.get("metrics") or {}))
    return sorted(names)


def default_metric(names: list[str]) -> str | None:
    """What to rank by when nobody said: val_loss, else a validation score, else any loss, else the first."""
    for pick in ([n for n in names if n == "val_loss"], [n for n in names if n.startswith("val_")],
                 [n for n in names if "loss" in n], names):
        if pick:
            return pick[0]
    return None


def rank(rows: list[dict], metric: str | None, order: str | None = None) -> list[dict]:
    """``rows`` best first by ``metric`` (``order``: "min" or "max"; None: from the name); rows without the
    metric go last, in their queue order."""
    if metric is None:
        return list(rows)
    lower = better_lower(metric) if order is None else order == "min"
    have = [r for r in rows if metric in (r.get("metrics") or {})]
    lack = [r for r in rows if metric not in (r.get("metrics") or {})]
    have.sort(key=lambda r: r["metrics"][metric], reverse=not lower)
    return have + lack


def hyper_names(rows: list[dict]) -> list[str]:
    names: dict[str, None] = {}
    for row in rows:
        names.update(dict.fromkeys(row.get("hyper") or {}))
    return list(names)


def table(rows: list[dict]) -> tuple[list[str], list[list[Any]]]:
    """Column names and values: job, model, mode, seed, each hyper key, each metric."""
    hypers, metrics = hyper_names(rows), metric_names(rows)
    head = ["name", "id", "model", "mode", "seed", *hypers, *metrics]
    body = []
    for r in rows:
        h, m = r.get("hyper") or {}, r.get("metrics") or {}
        body.append([r.get("name") or "", r["id"][:12], r.get("model"), r.get("mode"), r.get("seed"),
                     *(h.get(k, "") for k in hypers), *(m.get(k, "") for k in metrics)])
    return head, body


def to_csv(rows: list[dict]) -> str:
    head, body = table(rows)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(head)
    for line in body:
        writer.writerow([_cell(v) for v in line])
    return out.getvalue()


def _cell(value: Any) -> Any:
    if isinstance(value, (list, dict)):
        return json.dumps(value, sort_keys=True)
    return value
