"""Early stopping for sweeps: whether a job's metric at an epoch is worse than its sweep's rule allows.

Pure. A ``[[sweeps]]`` entry's ``stop = { metric, mode, rule, min_epochs, reduction_factor }`` is
checked each time one of its jobs reports ``metric`` at an epoch, against what the sweep's other
jobs reported at that same epoch:

- ``median`` (the median stopping rule): from ``min_epochs`` on, a job whose value is worse than the
  median of the others' values at that epoch stops, once at least ``MEDIAN_MIN_PEERS`` others
  reached it.
- ``asha`` (asynchronous successive halving): the rungs are the epochs ``min_epochs * rf**k``. At a
  rung, a job goes on only when it is among the best ``1/rf`` of the values recorded there (itself
  included), once ``rf`` jobs reached the rung; a job that arrives early goes on, as ASHA promotes it.
"""

from __future__ import annotations

import math
import statistics

RULES = ("median", "asha")
MODES = ("min", "max")
MEDIAN_MIN_PEERS = 2


def normalise(stop: dict) -> dict:
    """A stop table with its defaults filled in (the manifest checks its values)."""
    return {"metric": stop["metric"], "mode": stop.get("mode", "min"), "rule": stop.get("rule", "median"),
            "min_epochs": int(stop.get("min_epochs", 1)), "reduction_factor": int(stop.get("reduction_factor", 3))}


def _worse(a: float, b: float, mode: str) -> bool:
    return a > b if mode == "min" else a < b


def is_rung(epoch: float, min_epochs: int, rf: int) -> bool:
    if epoch < min_epochs or not float(epoch).is_integer() or epoch % min_epochs:
        return False
    k = round(math.log(epoch / min_epochs, rf))
    return min_epochs * rf ** k == epoch


def verdict(stop: dict, epoch: float, mine: float, others: list[float]) -> str | None:
    """Why the job must stop now, in a sentence; None when it goes on."""
    rule = normalise(stop)
    metric, mode, min_epochs = rule["metric"], rule["mode"], rule["min_epochs"]
    if epoch < min_epochs:
        return None
    shown = f"{metric} {mine:.4g} at epoch {epoch:g}"
    if rule["rule"] == "median":
        if len(others) < MEDIAN_MIN_PEERS:
            return None
        median = statistics.median(others)
        if _worse(mine, median, mode):
            return (f"stopped early: {shown} is worse than the median {median:.4g} of the {len(others)} other "
                    f"jobs of its sweep at that epoch")
        return None
    rf = rule["reduction_factor"]
    if not is_rung(epoch, min_epochs, rf):
        return None
    values = sorted([*others, mine], reverse=(mode == "max"))
    if len(values) < rf:
        return None
    keep = max(1, len(values) // rf)
    if _worse(mine, values[keep - 1], mode):
        return (f"stopped early: {shown} is not among the best {keep} of the {len(values)} jobs of its sweep at "
                f"rung epoch {epoch:g} (reduction factor {rf})")
    return None
