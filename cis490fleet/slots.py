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
