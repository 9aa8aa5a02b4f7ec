"""The job state rules (jobs.py) on plain records, with a fixed clock."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cis490fleet import jobs
from cis490fleet.errors import InvalidTransition, StaleLease
from cis490fleet.jobs import JobState

JOB = "ab" * 32
T0 = 1_000_000.0
STALE = 600.0


def claimed(attempts=0, tries=0, host="ws1", lease="L1", now=T0) -> jobs.Step:
    return jobs.claim(JobState(JOB, attempts=attempts, tries=tries), host=host, lease=lease, now=now,
                      stale_after_s=STALE)


def test_claim_opens_an_attempt_and_a_lease_that_expires_after_the_stale_window():
    step = claimed()
    assert step.job.status == "claimed"
    assert (step.job.host, step.job.lease, step.job.attempts, step.job.tries) == ("ws1", "L1", 1, 1)
    assert step.job.lease_expires == T0 + STALE
    assert step.opened == jobs.Attempt(number=1, host="ws1", lease="L1", started=T0)


def test_claim_refuses_a_job_in_backoff_and_a_job_that_is_not_pending():
    with pytest.raises(InvalidTransition):
        jobs.claim(JobState(JOB, not_before=T0 + 1), host="ws1", lease="L", now=T0, stale_after_s=STALE)
    with pytest.raises(InvalidTransition):
        jobs.claim(claimed().job, host="ws2", lease="L2", now=T0, stale_after_s=STALE)


def test_first_heartbeat_makes_the_job_running_and_extends_the_lease():
    step = jobs.heartbeat(claimed().job, host="ws1", lease="L1", now=T0 + 50, stale_after_s=STALE)
    assert step.job.status == "running"
    assert step.job.lease_expires == T0 + 50 + STALE
    assert not step.cancel


@pytest.mark.parametrize("host, lease", [("ws2", "L1"), ("ws1", "L2"), ("ws2", None)])
def test_a_caller_that_does_not_hold_the_job_gets_stale_lease_and_nothing_changes(host, lease):
    held = claimed().job
    for call in (
        lambda: jobs.heartbeat(held, host=host, lease=lease, now=T0, stale_after_s=STALE),
        lambda: jobs.complete(held, host=host, lease=lease, artifact_id="c" * 64, now=T0),
        lambda: jobs.fail(held, host=host, lease=lease, error="x", now=T0, max_attempts=3, retry_backoff_s=30),
        lambda: jobs.release(held, host=host, lease=lease, now=T0),
    ):
        with pytest.raises(StaleLease) as info:
            call()
        assert info.value.holder == "ws1" and info.value.job_id == JOB


def test_lease_none_fences_by_host_identity():
    held = claimed().job
    assert jobs.heartbeat(held, host="ws1", lease=None, now=T0, stale_after_s=STALE).job.status == "running"


def test_complete_keeps_the_holder_and_a_repeated_complete_is_harmless():
    held = claimed().job
    step = jobs.complete(held, host="ws1", lease="L1", artifact_id="c" * 64, now=T0 + 5)
    assert step.job.status == "completed" and step.job.host == "ws1"
    assert step.closed == jobs.AttemptEnd(1, T0 + 5, "completed")
    again = jobs.complete(step.job, host="ws1", lease="L1", artifact_id="c" * 64, now=T0 + 6)
    assert again.job is step.job and again.closed is None
    with pytest.raises(InvalidTransition):
        jobs.complete(step.job, host="ws1", lease="L1", artifact_id="d" * 64, now=T0 + 6)


def test_fail_retries_after_a_doubling_backoff_then_fails_for_good():
    job = JobState(JOB)
    retry_ats = []
    for n in range(1, 4):
        job = jobs.claim(job, host="ws1", lease=f"L{n}", now=T0, stale_after_s=STALE).job
        step = jobs.fail(job, host="ws1", lease=f"L{n}", error=f"boom {n}", now=T0, max_attempts=3,
                         retry_backoff_s=30)
        job = step.job
        assert step.closed == jobs.AttemptEnd(n, T0, "failed", f"boom {n}", "job")
        retry_ats.append(job.not_before)
        if n < 3:
            assert job.status == "pending" and job.host is None and job.lease is None
            job = JobState(**{**job.__dict__, "not_before": None})  # let the backoff pass
    assert retry_ats[:2] == [T0 + 30, T0 + 60]
    assert job.status == "failed" and job.attempts == 3 and job.last_error == "boom 3"


@given(st.integers(min_value=1, max_value=200), st.floats(min_value=0.1, max_value=5000))
def test_backoff_doubles_and_never_exceeds_one_hour(n, base):
    assert jobs.backoff_s(n, base) == min(3600.0, base * 2 ** (n - 1))
    assert jobs.backoff_s(n, base) <= jobs.MAX_BACKOFF_S


def test_release_gives_the_try_back():
    step = jobs.release(claimed(attempts=2, tries=2).job, host="ws1", lease="L1", now=T0 + 1)
    assert step.job.status == "pending" and step.job.attempts == 2 and step.job.tries == 3
    assert step.job.host is None
    assert step.closed.outcome == "released"


def test_cancel_of_a_held_job_keeps_the_holder_so_its_heartbeat_answers_cancel():
    step = jobs.cancel(claimed().job, now=T0 + 1)
    assert step.job.status == "cancelled" and step.closed.outcome == "cancelled"
    beat = jobs.heartbeat(step.job, host="ws1", lease="L1", now=T0 + 2, stale_after_s=STALE)
    assert beat.cancel and beat.job is step.job
    assert jobs.fail(step.job, host="ws1", lease="L1", error="stopped", now=T0 + 3, max_attempts=3,
                     retry_backoff_s=30).job is step.job
    with pytest.raises(InvalidTransition):
        jobs.complete(step.job, host="ws1", lease="L1", artifact_id="c" * 64, now=T0 + 3)
    with pytest.raises(StaleLease):
        jobs.heartbeat(step.job, host="ws2", lease="X", now=T0 + 2, stale_after_s=STALE)


def test_cancel_refuses_final_jobs_and_repeats_harmlessly():
    done = jobs.complete(claimed().job, host="ws1", lease="L1", artifact_id="c" * 64, now=T0).job
    with pytest.raises(InvalidTransition):
        jobs.cancel(done, now=T0)
    cancelled = jobs.cancel(JobState(JOB), now=T0).job
    assert cancelled.status == "cancelled" and cancelled.host is None
    assert jobs.cancel(cancelled, now=T0 + 1).job is cancelled


def test_requeue_rules():
    assert jobs.requeue(JobState(JOB), now=T0).job == JobState(JOB)
    with pytest.raises(InvalidTransition, match="cancel it first"):
        jobs.requeue(claimed().job, now=T0)
    done = jobs.complete(claimed().job, host="ws1", lease="L1", artifact_id="c" * 64, now=T0).job
    with pytest.raises(InvalidTransition, match="change its seed"):
        jobs.requeue(done, now=T0)
    cancelled = jobs.cancel(claimed(attempts=2, tries=2).job, now=T0).job
    again = jobs.requeue(cancelled, now=T0 + 1).job
    assert again.status == "pending" and again.attempts == 0 and again.host is None and again.lease is None
    assert again.tries == 3  # attempt records keep their numbers


def test_expire_returns_a_stale_job_to_pending_then_fails_it_after_the_last_try():
    held = claimed().job
    assert jobs.expire(held, now=T0 + STALE - 1, max_attempts=2, stale_after_s=STALE) is None
    step = jobs.expire(held, now=T0 + STALE, max_attempts=2, stale_after_s=STALE)
    assert step.job.status == "pending" and step.job.host is None and step.closed.outcome == "stale"
    second = jobs.claim(step.job, host="ws2", lease="L2", now=T0 + STALE, stale_after_s=STALE).job
    last = jobs.expire(second, now=T0 + 2 * STALE, max_attempts=2, stale_after_s=STALE)
    assert last.job.status == "failed"
    assert last.job.last_error == "no heartbeat for 600s on 2 attempts"


def test_out_of_tries_fails_only_a_pending_job_whose_tries_reached_the_limit():
    waiting = JobState(JOB, attempts=2, tries=2, not_before=T0 + 60, last_error="oom")
    assert jobs.out_of_tries(waiting, now=T0, max_attempts=3) is None
    step = jobs.out_of_tries(waiting, now=T0, max_attempts=2)
    assert step.job.status == "failed" and step.job.not_before is None and step.closed is None
    assert step.job.last_error == "out of tries: 2 used, the manifest now allows 2; last error: oom"
    assert jobs.out_of_tries(claimed(attempts=5).job, now=T0, max_attempts=1) is None  # held: its holder decides


def test_expire_ignores_jobs_that_are_not_held():
    for job in (JobState(JOB), jobs.cancel(claimed().job, now=T0).job):
        assert jobs.expire(job, now=T0 + 10 * STALE, max_attempts=3, stale_after_s=STALE) is None
