"""Lease keeping for one running attempt: heartbeats, progress, the operator's cancel, losing the job, self-fencing.

Two threads per attempt talk to the coordinator so that the slot thread never waits on
the network: one heartbeats (every ``heartbeat_s``, and early, at most every
``PROGRESS_EVERY_S``, when the trainer reports a step worth showing), one long-polls
``watch`` so a cancel is seen within a second or two. ``verdict(now)`` tells the slot
thread whether the trainer must stop, and why. Never delivers a result
(result_outbox.py) and never starts a trainer (trainer_process.py).

Self-fencing (docs/INTERNALS.md, "Training at most once"): the lease is proven by the
newest acknowledged heartbeat, dated when it was *sent* on this host's monotonic clock
(the claim's send time before the first). The coordinator hands the job to another host
no sooner than ``stale_after_s`` after it *received* that heartbeat, on its clock. The
trainer is therefore dead by ``stale_after_s * (1 - CLOCK_RATE_BOUND) - FENCE_SLACK_S``
after that send time: SIGTERM ``grace`` seconds before, SIGKILL then.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from cis490fleet import errors
from cis490fleet.progress import changed_enough
from cis490fleet.trainer_process import TrainerRun
from cis490fleet.worker_view import logger

log = logger(__name__)

CLOCK_RATE_BOUND = 0.01  # the worker's and the coordinator's clocks run at rates within 1 % of each other
FENCE_SLACK_S = 0.25     # the slot thread notices a verdict within 0.1 s; then SIGKILL and reaping
PROGRESS_EVERY_S = 2.0   # progress goes out at most this often
WATCH_WAIT_S = 20.0      # one cancel long-poll
TICK_S = 0.1

# Verdicts.
CANCELLED = "cancelled"  # an operator cancelled the job
LOST = "lost"            # the coordinator gave the job to another attempt (409)
FENCED = "fenced"        # the lease can no longer be proven: stop before another host may start


def fence_plan(stale_after_s: float, heartbeat_s: float, grace_s: float) -> tuple[float, float]:
    """(seconds after the proving send by which the trainer is dead, SIGTERM grace within that).

    The grace is cut so that the fence never starts before two heartbeat periods have gone unanswered.
    """
    dead_by = stale_after_s * (1 - CLOCK_RATE_BOUND) - FENCE_SLACK_S
    grace = max(0.0, min(grace_s, dead_by - 2 * heartbeat_s))
    return dead_by, grace


class LeaseKeeper:
    """Keeps ``run``'s lease from ``proven_at`` (the claim's send time, ``time.monotonic()``) on."""

    def __init__(self, client: Any, run: TrainerRun, grace_s: float, proven_at: float):
        self.client = client
        self.run = run
        self.dead_by, self.grace_s = fence_plan(run.stale_after_s, run.heartbeat_s, grace_s)
        self.progress: dict | None = None  # what the last heartbeat carried
        self._proven_at = proven_at
        self._verdict: str | None = None
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._answered = threading.Event()  # the first heartbeat was acknowledged, or a verdict came
        self._threads = [threading.Thread(target=target, name=f"{name}-{run.job_id[:8]}", daemon=True)
                         for name, target in (("heartbeat", self._heartbeats), ("watch", self._watch))]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        """No more heartbeats; the threads end on their own (a long-poll in flight is left to finish)."""
        self._done.set()

    def wait_first(self, timeout: float) -> None:
        self._answered.wait(timeout)

    def unproven_for(self, now: float) -> float:
        with self._lock:
            return now - self._proven_at

    def fence_at(self) -> float:
        """When (``time.monotonic()``) the trainer must get SIGTERM unless a heartbeat is acknowledged first."""
        with self._lock:
            return self._proven_at + self.dead_by - self.grace_s

    def verdict(self, now: float) -> str | None:
        """CANCELLED, LOST or FENCED when the trainer must stop now, else None."""
        with self._lock:
            if self._verdict is not None:
                return self._verdict
        return FENCED if now >= self.fence_at() else None

    def _decide(self, verdict: str) -> None:
        with self._lock:
            if self._verdict is None:
                self._verdict = verdict
        self._answered.set()

    def _heartbeats(self) -> None:
        run = self.run
        next_beat = 0.0
        last_try = float("-inf")
        warned = False
        while not self._done.is_set():
            now = time.monotonic()
            progress = run.progress()
            # The first report goes out at once, not after the throttle: a job shorter than PROGRESS_EVERY_S
            # would otherwise show "starting" until it ended. While heartbeats fail, the throttle holds.
            worth_showing = ((self.progress is None and not warned or now - last_try >= PROGRESS_EVERY_S)
                             and progress != self.progress and changed_enough(self.progress, progress))
            if now < next_beat and not worth_showing:
                self._done.wait(TICK_S)
                continue
            next_beat = now + run.heartbeat_s
            sent = last_try = time.monotonic()
            try:
                answer = self.client.heartbeat(run.job_id, run.lease, progress=progress, log_tail=run.log_tail())
            except errors.StaleLease as err:
                log.warning("job %s: %s; stopping the trainer", run.label, err)
                self._decide(LOST)
                return
            except errors.InvalidTransition as err:
                log.warning("job %s: %s; stopping the trainer", run.label, err)
                self._decide(CANCELLED)
                return
            except errors.FleetError as err:
                if not warned:
                    log.warning("job %s: heartbeat failed (%s); the trainer keeps running until %.0f s after the "
                                "last acknowledged one", run.label, err, self.dead_by)
                warned = True
                continue
            with self._lock:
                self._proven_at = max(self._proven_at, sent)
            self._answered.set()
            self.progress = progress
            if warned:
                log.info("job %s: the coordinator answers again", run.label)
            warned = False
            if answer and answer.get("cancel"):
                log.info("job %s: cancelled by an operator; stopping the trainer", run.label)
                self._decide(CANCELLED)
                return

    def _watch(self) -> None:
        run = self.run
        while not self._done.is_set():
            try:
                answer = self.client.watch(run.job_id, run.lease, WATCH_WAIT_S)
            except errors.StaleLease:
                self._decide(LOST)
                return
            except errors.NotFound:
                return  # a coordinator without the watch route: heartbeats still carry the cancel
            except errors.FleetError:
                self._done.wait(1.0)
                continue
            if answer and answer.get("cancel"):
                log.info("job %s: cancelled by an operator; stopping the trainer", run.label)
                self._decide(CANCELLED)
                return
