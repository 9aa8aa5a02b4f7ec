"""The coordinator's own record of when it last saw each job's lease renewed, on its monotonic clock.

Commands carry the wall-clock ``now`` so that every replica applies them alike, and a
lease's ``lease_expires`` is kept in that clock. A wall clock can step forward (an NTP
correction) or differ between the peers that applied a heartbeat and the one that sweeps;
either could expire a lease early. So the sweeper also asks this record: a job whose claim
or heartbeat this peer applied less than ``stale_after_s`` ago on its monotonic clock is
held back from the sweep (``sweep_stale``'s ``hold``), and a peer that has not itself
watched a whole window since it started sweeps nothing. Every peer applies every command,
so a follower that becomes leader has seen each heartbeat no earlier than the old leader did.
"""

from __future__ import annotations

import threading
import time
from typing import Callable


class LeaseClock:
    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self.started = clock()
        self._seen: dict[str, float] = {}
        self._lock = threading.Lock()

    def observe(self, cmds: list[dict], results: list) -> None:
        """Note the claims and heartbeats just applied (the group-commit writer's or Raft's after-commit hook)."""
        now = self.clock()
        renewed = [cmd["job_id"] if cmd.get("op") == "heartbeat" else result.get("job_id")
                   for cmd, result in zip(cmds, results)
                   if cmd.get("op") in ("claim", "heartbeat") and isinstance(result, dict)]
        with self._lock:
            for job_id in renewed:
                if job_id:
                    self._seen[job_id] = now

    def hold(self, stale_after_s: float) -> list[str] | None:
        """The jobs a sweep must not expire yet; None: sweep nothing (this peer has not watched a whole window)."""
        now = self.clock()
        if now - self.started < stale_after_s:
            return None
        with self._lock:
            self._seen = {j: t for j, t in self._seen.items() if now - t < stale_after_s}
            return sorted(self._seen)
