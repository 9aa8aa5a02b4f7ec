"""What a worker slot is (one trainer at a time, on its own GPU or the CPU) and how one step of a slot ends.

Pure: plans from a capability dict; never probes the host.
"""

from __future__ import annotations

from dataclasses import dataclass

# Outcomes of one slot step (Worker.run_once).
IDLE = "idle"                # nothing eligible for us
COMPLETED = "completed"      # uploaded and completed
FAILED = "failed"            # reported as failed
CANCELLED = "cancelled"      # the operator cancelled it; trainer stopped
LOST = "lost"                # 409: another attempt owns the job now; trainer stopped
RELEASED = "released"        # we are shutting down; job handed back
PENDING = "pending"          # result kept on disk until the coordinator answers
UNAVAILABLE = "unavailable"  # no coordinator answered the claim


@dataclass(frozen=True)
class Slot:
    index: int
    gpu: str  # CUDA_VISIBLE_DEVICES for this slot; "" on CPU-only slots


def plan_slots(capability: dict, override: int | None) -> list[Slot]:
    """One slot per GPU (each with its own device), one on a CPU-only host; ``override`` sets the count."""
    gpus = []
    if capability.get("cuda"):
        gpus = [str(g.get("index", i)) for i, g in enumerate(capability.get("gpus") or [])]
    count = override or max(1, len(gpus))
    return [Slot(i, gpus[i % len(gpus)] if gpus else "") for i in range(count)]


def slots_from_plan(plan: object) -> list[Slot] | None:
    """The slots the coordinator's register answer lists (``[{"index", "gpus": [int]}]``), None when it
    lists none (an older coordinator): the worker then keeps its own plan."""
    if not isinstance(plan, list) or not plan:
        return None
    out = []
    for i, entry in enumerate(plan):
        gpus = entry.get("gpus") if isinstance(entry, dict) else None
        if not isinstance(gpus, list) or not all(isinstance(g, int) and not isinstance(g, bool) for g in gpus):
            return None
        out.append(Slot(i, ",".join(str(g) for g in gpus)))
    return out


def visible_devices(claim: dict, slot: Slot) -> str:
    """CUDA_VISIBLE_DEVICES for a claimed job: the GPUs the coordinator gave it, else its slot's."""
    gpus = claim.get("gpus")
    if isinstance(gpus, list) and all(isinstance(g, int) and not isinstance(g, bool) for g in gpus):
        return ",".join(str(g) for g in gpus)
    return slot.gpu
