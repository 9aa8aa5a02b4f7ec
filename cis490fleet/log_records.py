"""Attempt logs in the job queue: which stored log (sha256, size) each attempt handed in.

Mixed into ``jobstore.JobStore``, so ``record_log`` is a queue command like the others
(validated, applied in one transaction, replicated in the log) and never reads a clock.
The files are the coordinator's (``log_api``): content-addressed under ``<data>/logs/``.
"""

from __future__ import annotations

from cis490fleet import jobs
from cis490fleet.errors import InvalidTransition, NotFound
from cis490fleet.model import CANCELLED, HELD_STATUSES

MIGRATION = """
    ALTER TABLE attempts ADD COLUMN log_sha TEXT;
    ALTER TABLE attempts ADD COLUMN log_size INTEGER;
"""


class LogRecords:
    """The log side of ``JobStore`` (uses its ``_load`` and ``_snapshot``)."""

    def _op_record_log(self, conn, now: float, job_id: str, host: str, lease: str | None, sha256: str, size: int,
                       model: str, mode: str) -> dict:
        state, _ = self._load(conn, job_id)
        check_log(state, host, lease)
        conn.execute("UPDATE attempts SET log_sha = ?, log_size = ? WHERE job = ? AND number = ?",
                     (sha256, size, job_id, state.tries))
        return {"ok": True, "attempt": state.tries}

    def check_log_holder(self, job_id: str, host: str, lease: str | None) -> dict:
        """The fence of ``record_log`` as a read, so an upload is refused before its body is read."""
        with self._snapshot() as conn:
            state, _ = self._load(conn, job_id)
            check_log(state, host, lease)
            model, mode = conn.execute("SELECT model, mode FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return {"job_id": job_id, "model": model, "mode": mode, "status": state.status}

    def attempt_log(self, job_id: str, attempt: int | None) -> dict:
        """``{"attempt", "sha256", "size", "host"}`` of the attempt's log (None: the newest attempt with one)."""
        with self._snapshot() as conn:
            if attempt is None:
                row = conn.execute("SELECT number, log_sha, log_size, host FROM attempts WHERE job = ? "
                                   "AND log_sha IS NOT NULL ORDER BY number DESC LIMIT 1", (job_id,)).fetchone()
            else:
                row = conn.execute("SELECT number, log_sha, log_size, host FROM attempts WHERE job = ? "
                                   "AND number = ?", (job_id, attempt)).fetchone()
                if row is None:
                    raise NotFound(f"job {job_id[:12]} has no attempt {attempt}; 'jobs show' lists its attempts")
        if row is None or row[1] is None:
            which = (f"no attempt of job {job_id[:12]} handed in a log" if attempt is None
                     else f"attempt {attempt} of job {job_id[:12]} handed in no log")
            raise NotFound(f"{which} (a worker sends it when an attempt ends)")
        return {"attempt": row[0], "sha256": row[1], "size": row[2], "host": row[3]}

    def log_records(self) -> list[dict]:
        """Every stored log, oldest attempt first: a peer fetches the files it lacks."""
        with self._snapshot() as conn:
            rows = conn.execute("SELECT a.job, a.log_sha, j.model, j.mode, a.host, a.started FROM attempts a "
                                "JOIN jobs j ON j.id = a.job WHERE a.log_sha IS NOT NULL "
                                "ORDER BY a.started, a.job, a.number").fetchall()
        return [dict(zip(("job_id", "sha256", "model", "mode", "host", "created"), r)) for r in rows]


def check_log(state: jobs.JobState, host: str, lease: str | None) -> None:
    """A log comes from the holder while the attempt is held, or after a cancel told it to stop."""
    jobs.check_holder(state, host, lease)
    if state.status not in HELD_STATUSES and state.status != CANCELLED:
        raise InvalidTransition(state.id, state.status, "record a log for")
