"""Lease keeping for one running attempt: heartbeats, the operator's cancel, and losing the job to another host.

Decides when the trainer must stop because the lease says so; never delivers a result
(result_outbox.py) and never starts a trainer (trainer_process.py).
"""

from __future__ import annotations

from typing import Any

from cis490fleet import errors
from cis490fleet.slots import CANCELLED, LOST
from cis490fleet.trainer_process import TrainerRun
from cis490fleet.worker_view import logger

log = logger(__name__)


class LeaseKeeper:
    """Heartbeats ``run``'s lease every ``heartbeat_s``; ``keep(now)`` says when the trainer was stopped, and why."""

    def __init__(self, client: Any, run: TrainerRun, grace_s: float):
        self.client = client
        self.run = run
        self.grace_s = grace_s
        self.progress: dict | None = None  # what the last heartbeat carried
        self._next_beat = 0.0
        self._warned = False

    def keep(self, now: float) -> str | None:
        """Heartbeat when one is due; LOST or CANCELLED once the trainer has been stopped, else None."""
        if now < self._next_beat:
            return None
        run = self.run
        self._next_beat = now + run.heartbeat_s
        self.progress = run.progress()
        try:
            answer = self.client.heartbeat(run.job_id, run.lease, progress=self.progress, log_tail=run.log_tail())
        except errors.StaleLease as err:
            log.warning("job %s: %s; stopping the trainer", run.label, err)
            run.stop(self.grace_s)
            return LOST
        except errors.InvalidTransition as err:
            log.warning("job %s: %s; stopping the trainer", run.label, err)
            run.stop(self.grace_s)
            return CANCELLED
        except errors.FleetError as err:
            if not self._warned:
                log.warning("job %s: heartbeat failed (%s); the trainer keeps running", run.label, err)
            self._warned = True
            return None
        if self._warned:
            log.info("job %s: the coordinator answers again", run.label)
        self._warned = False
        if answer and answer.get("cancel"):
            log.info("job %s: cancelled by an operator; stopping the trainer", run.label)
            run.stop(self.grace_s)
            return CANCELLED
        return None
