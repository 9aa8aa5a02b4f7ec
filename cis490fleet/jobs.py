"""Job state rules: every transition of one job as a pure function of its record, the command and ``now``.

Never touches SQLite, clocks or randomness: ``jobstore`` loads a ``JobState``,
calls one function here and writes back the ``Step`` it returns. A function
that refuses raises (``StaleLease``, ``InvalidTransition``) before anything
changes.

Status flow: pending -> claimed (claim) -> running (first heartbeat) ->
completed | failed; cancelled from any non-final status. Counting: ``attempts``
counts the claims that used up a try since the last requeue (a release gives its
try back); ``tries`` numbers every attempt record ever made for the job.

Fencing: ``host`` and ``lease`` name the current holder. They stay set on a
completed job (who trained it, and so a repeated ``complete`` is harmless), on
a job failed by its holder (a repeated ``fail`` too) and on a job cancelled
while held (its holder's next heartbeat answers ``cancel: true``). They are
cleared whenever the job may go to someone else.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from cis490fleet.errors import InvalidTransition, StaleLease
from cis490fleet.model import (CANCELLED, CLAIMED, COMPLETED, FAILED, FINAL_STATUSES, HALTED_STATUSES, HELD_STATUSES,
                               PENDING, RUNNING, STOPPED)

MAX_BACKOFF_S = 3600.0

# Attempt outcomes.
OUT_COMPLETED = "completed"
OUT_FAILED = "failed"
OUT_RELEASED = "released"
OUT_STALE = "stale"
OUT_CANCELLED = "cancelled"
OUT_STOPPED = "stopped"

# Failure classes, one per ended attempt that did not complete (DESIGN.md, State).
# The job's fault: final unless `retries` grants more tries; a usage error never retries.
CLASS_JOB = "job"                # the trainer exited non-zero
CLASS_USAGE = "usage"            # the trainer exited 2: its arguments are wrong, another try cannot help
CLASS_TIME_LIMIT = "time_limit"  # ran past max_runtime_s
CLASS_STALLED = "stalled"        # no progress line for stall_after_s
# Not the job's fault: retried up to max_attempts.
CLASS_SIGNAL = "signal"          # the trainer was killed by a signal (the OOM killer's SIGKILL, an admin)
CLASS_FENCED = "fenced"          # its worker could not prove the lease and stopped it
CLASS_INFRA = "infra"            # a lost upload, a trainer that could not start, another host problem
CLASS_LOST = "lost"              # its worker stopped heartbeating (the stale sweep)
# Attempts that ended without failing.
CLASS_CANCELLED = "cancelled"
CLASS_STOPPED = "stopped_early"  # a sweep's stop rule ended it
CLASS_RELEASED = "released"

JOB_FAULTS = frozenset({CLASS_JOB, CLASS_USAGE, CLASS_TIME_LIMIT, CLASS_STALLED})
FAILURE_CLASSES = JOB_FAULTS | {CLASS_SIGNAL, CLASS_FENCED, CLASS_INFRA}  # what a worker may report


@dataclass(frozen=True)
class JobState:
    """The mutable part of one job."""

    id: str
    status: str = PENDING
    attempts: int = 0
    tries: int = 0
    host: str | None = None
    lease: str | None = None
    lease_expires: float | None = None
    not_before: float | None = None
    artifact_id: str | None = None
    last_error: str | None = None
    updated: float = 0.0


@dataclass(frozen=True)
class Attempt:
    """One attempt record; ``number`` is 1-based and unique per job."""

    number: int
    host: str
    lease: str
    started: float
    ended: float | None = None
    outcome: str | None = None
    error: str | None = None
    failure_class: str | None = None


@dataclass(frozen=True)
class AttemptEnd:
    """Closes attempt ``number``."""

    number: int
    ended: float
    outcome: str
    error: str | None = None
    failure_class: str | None = None  # None for a completed attempt


@dataclass(frozen=True)
class Step:
    """What a transition produced: the new state and the attempt records to write."""

    job: JobState
    opened: Attempt | None = None
    closed: AttemptEnd | None = None
    cancel: bool = False  # heartbeat answer: the holder must stop


def backoff_s(failures: int, retry_backoff_s: float) -> float:
    """Wait before the next try after ``failures`` counted attempts: doubling, capped at one hour."""
    if failures < 1:
        return 0.0
    return min(MAX_BACKOFF_S, retry_backoff_s * 2 ** min(failures - 1, 64))


def check_holder(job: JobState, host: str, lease: str | None) -> None:
    """Raise StaleLease unless (host, lease) is the current holder; ``lease=None`` fences by host alone."""
    if job.host is None or job.host != host or (lease is not None and lease != job.lease):
        raise StaleLease(job.id, job.host)


def check_checkpoint(job: JobState, host: str, lease: str | None) -> None:
    """A checkpoint comes from the holder while it trains, or after a cancel told it to stop (what the
    trainer saved on its way out is kept for a requeue)."""
    check_holder(job, host, lease)
    if job.status not in HELD_STATUSES and job.status not in HALTED_STATUSES:
        raise InvalidTransition(job.id, job.status, "record a checkpoint for")


def checkpoint_attempt(job: JobState, host: str, lease: str | None, last: tuple[str, str] | None) -> int:
    """The attempt whose checkpoint (host, lease) hands in: the holder's (``check_checkpoint``); or, while the
    job waits unclaimed, its last attempt's when that attempt was (host, lease) = ``last``: a worker that
    stopped its trainer on its own (self-fenced) and reached the coordinator again only after the job went
    back to pending still hands in what its trainer saved, for the next attempt. Never once another host
    holds the job, and never without a lease to prove it."""
    if job.status == PENDING and job.host is None and lease is not None and last == (host, lease):
        return job.tries
    check_checkpoint(job, host, lease)
    return job.tries


def _fmt_s(seconds: float) -> str:
    return f"{seconds:g}s"


def claim(job: JobState, *, host: str, lease: str, now: float, stale_after_s: float) -> Step:
    if job.status != PENDING:
        raise InvalidTransition(job.id, job.status, "claim")
    if job.not_before is not None and job.not_before > now:
        raise InvalidTransition(job.id, "waiting for its retry backoff", "claim")
    number = job.tries + 1
    new = replace(job, status=CLAIMED, attempts=job.attempts + 1, tries=number, host=host, lease=lease,
                  lease_expires=now + stale_after_s, not_before=None, updated=now)
    return Step(new, opened=Attempt(number=number, host=host, lease=lease, started=now))


def heartbeat(job: JobState, *, host: str, lease: str | None, now: float, stale_after_s: float) -> Step:
    check_holder(job, host, lease)
    if job.status in HALTED_STATUSES:
        return Step(job, cancel=True)
    if job.status not in HELD_STATUSES:
        raise InvalidTransition(job.id, job.status, "heartbeat")
    return Step(replace(job, status=RUNNING, lease_expires=now + stale_after_s, updated=now))


def complete(job: JobState, *, host: str, lease: str | None, artifact_id: str, now: float) -> Step:
    check_holder(job, host, lease)
    if job.status == COMPLETED and job.artifact_id == artifact_id:
        return Step(job)  # a retried complete whose first answer was lost
    if job.status not in HELD_STATUSES:
        raise InvalidTransition(job.id, job.status, "complete")
    # An earlier attempt's error is history (the attempt keeps it), not what a completed job's "last error" says.
    new = replace(job, status=COMPLETED, artifact_id=artifact_id, lease_expires=None, not_before=None,
                  last_error=None, updated=now)
    return Step(new, closed=AttemptEnd(job.tries, now, OUT_COMPLETED))


def tries_for(failure_class: str, *, max_attempts: int, fault_tries: int) -> int:
    """How many tries a job may have used and still be retried after a failure of this class.

    The job's own faults get ``fault_tries`` (1 + the `retries` granted), never more than
    ``max_attempts``; a usage error gets none; the rest (not the job's fault) ``max_attempts``.
    """
    if failure_class == CLASS_USAGE:
        return 0
    if failure_class in JOB_FAULTS:
        return min(max_attempts, fault_tries)
    return max_attempts


def fail(job: JobState, *, host: str, lease: str | None, error: str, now: float, max_attempts: int,
         retry_backoff_s: float, failure_class: str = CLASS_JOB, fault_tries: int | None = None) -> Step:
    """Back to pending after a backoff while tries remain for this class of failure, else failed for good.

    ``fault_tries`` (None: ``max_attempts``) limits the tries of failures that are the job's fault.
    """
    check_holder(job, host, lease)
    if job.status in HALTED_STATUSES or job.status == FAILED:
        return Step(job)  # the holder reporting after a cancel or an early stop, or a retried fail
    if job.status not in HELD_STATUSES:
        raise InvalidTransition(job.id, job.status, "fail")
    closed = AttemptEnd(job.tries, now, OUT_FAILED, error, failure_class)
    limit = tries_for(failure_class, max_attempts=max_attempts,
                      fault_tries=max_attempts if fault_tries is None else fault_tries)
    if job.attempts >= limit:
        new = replace(job, status=FAILED, lease_expires=None, last_error=error, updated=now)
    else:
        new = replace(job, status=PENDING, host=None, lease=None, lease_expires=None, last_error=error,
                      not_before=now + backoff_s(job.attempts, retry_backoff_s), updated=now)
    return Step(new, closed=closed)


def release(job: JobState, *, host: str, lease: str | None, now: float) -> Step:
    """The holder gives the job back untried (e.g. shutting down): the attempt does not count."""
    check_holder(job, host, lease)
    if job.status in HALTED_STATUSES:
        return Step(job)
    if job.status not in HELD_STATUSES:
        raise InvalidTransition(job.id, job.status, "release")
    new = replace(job, status=PENDING, attempts=max(0, job.attempts - 1), host=None, lease=None,
                  lease_expires=None, updated=now)
    return Step(new, closed=AttemptEnd(job.tries, now, OUT_RELEASED, failure_class=CLASS_RELEASED))


def cancel(job: JobState, *, now: float) -> Step:
    """Cancel from any non-final status; a holder keeps its lease only to hear ``cancel: true``."""
    if job.status == CANCELLED:
        return Step(job)
    if job.status in FINAL_STATUSES:
        raise InvalidTransition(job.id, job.status, "cancel")
    closed = (AttemptEnd(job.tries, now, OUT_CANCELLED, failure_class=CLASS_CANCELLED)
              if job.status in HELD_STATUSES else None)
    return Step(replace(job, status=CANCELLED, lease_expires=None, not_before=None, updated=now), closed=closed)


def stop_early(job: JobState, *, now: float, reason: str) -> Step:
    """A running job that its sweep's stop rule found worse than its peers ends, for good, as ``stopped``;
    like a cancel, its holder keeps the lease only to hear that it must stop (and hand in its checkpoint)."""
    if job.status not in HELD_STATUSES:
        raise InvalidTransition(job.id, job.status, "stop early")
    closed = AttemptEnd(job.tries, now, OUT_STOPPED, reason, CLASS_STOPPED)
    return Step(replace(job, status=STOPPED, lease_expires=None, not_before=None, last_error=reason, updated=now),
                closed=closed)


def requeue(job: JobState, *, now: float) -> Step:
    """A failed, cancelled or stopped job starts over with every try available again (a stopped one resumes
    from its checkpoint)."""
    if job.status == PENDING:
        return Step(job)
    if job.status == COMPLETED:
        raise InvalidTransition(job.id, job.status, "requeue",
                                "a completed job is never trained again; change its seed to train a new one")
    if job.status in HELD_STATUSES:
        raise InvalidTransition(job.id, job.status, "requeue", "cancel it first")
    new = replace(job, status=PENDING, attempts=0, host=None, lease=None, lease_expires=None, not_before=None,
                  updated=now)
    return Step(new)


def out_of_tries(job: JobState, *, now: float, max_attempts: int) -> Step | None:
    """A pending job whose tries are used up under the current limit fails rather than run again.

    Happens when a manifest reload lowers ``retries`` (or ``max_attempts``) below
    the tries a retrying job has already had.
    """
    if job.status != PENDING or job.attempts < max_attempts:
        return None
    error = f"out of tries: {job.attempts} used, the manifest now allows {max_attempts}"
    if job.last_error:
        error += f"; last error: {job.last_error}"
    return Step(replace(job, status=FAILED, not_before=None, last_error=error, updated=now))


def is_stale(job: JobState, now: float) -> bool:
    return job.status in HELD_STATUSES and job.lease_expires is not None and job.lease_expires <= now


def expire(job: JobState, *, now: float, max_attempts: int, stale_after_s: float) -> Step | None:
    """A holder that stopped heartbeating loses the job: pending again, or failed after the last try."""
    if not is_stale(job, now):
        return None
    error = f"no heartbeat for {_fmt_s(stale_after_s)}"
    closed = AttemptEnd(job.tries, now, OUT_STALE, error, CLASS_LOST)
    if job.attempts >= max_attempts:
        error = f"no heartbeat for {_fmt_s(stale_after_s)} on {job.attempts} attempts"
        new = replace(job, status=FAILED, host=None, lease=None, lease_expires=None, last_error=error, updated=now)
    else:
        new = replace(job, status=PENDING, host=None, lease=None, lease_expires=None,
                      last_error=f"attempt {job.tries}: {error} from {job.host}", updated=now)
    return Step(new, closed=closed)
