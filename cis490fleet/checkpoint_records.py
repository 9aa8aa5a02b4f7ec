"""Checkpoint records in the job queue: which checkpoint each attempt of a job left, and which one to resume from.

Mixed into ``jobstore.JobStore``, so ``record_checkpoint`` is a queue command like
the others (validated, applied in the same transaction, replicated in the same log)
and never reads a clock. One row per attempt: a newer checkpoint of the same
attempt replaces the older one. The files are the coordinator's (``checkpoint_api``):
a command that stops referring to a checkpoint answers its sha256 in
``unreferenced_checkpoints``, and the coordinator removes that file after the commit.
"""

from __future__ import annotations

from cis490fleet import jobs

MIGRATION = """
    CREATE TABLE checkpoints (
        job TEXT NOT NULL REFERENCES jobs(id),
        attempt INTEGER NOT NULL,
        sha256 TEXT NOT NULL,
        epoch INTEGER,
        size INTEGER NOT NULL,
        host TEXT NOT NULL,
        model TEXT NOT NULL,
        mode TEXT NOT NULL,
        created REAL NOT NULL,
        PRIMARY KEY (job, attempt)
    );
    CREATE INDEX checkpoints_sha ON checkpoints(sha256);
"""

# The checkpoint to resume from is the newest of a job's: a walk of this index, not a sort.
NEWEST_MIGRATION = """
    CREATE INDEX IF NOT EXISTS checkpoints_newest ON checkpoints(job, created DESC, attempt DESC);
"""

FIELDS = ("attempt", "sha256", "epoch", "size", "host", "created")
COLUMNS = ", ".join(FIELDS)


def _row(row) -> dict:
    return dict(zip(FIELDS, row))


class CheckpointRecords:
    """The checkpoint side of ``JobStore`` (uses its ``_load`` and ``_snapshot``)."""

    def _op_record_checkpoint(self, conn, now: float, job_id: str, host: str, lease: str | None, sha256: str,
                              epoch: int | None, size: int, model: str, mode: str) -> dict:
        attempt = self._checkpoint_attempt(conn, job_id, host, lease)
        old = conn.execute("SELECT sha256 FROM checkpoints WHERE job = ? AND attempt = ?",
                           (job_id, attempt)).fetchone()
        conn.execute("INSERT INTO checkpoints (job, attempt, sha256, epoch, size, host, model, mode, created) "
                     "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (job, attempt) DO UPDATE SET "
                     "sha256 = excluded.sha256, epoch = excluded.epoch, size = excluded.size, "
                     "host = excluded.host, created = excluded.created",
                     (job_id, attempt, sha256, epoch, size, host, model, mode, now))
        return {"ok": True, "attempt": attempt,
                "unreferenced_checkpoints": self._unreferenced(conn, [old[0]] if old else [])}

    def _prune_checkpoints(self, conn, job_id: str) -> list[str]:
        """A completed job keeps only its newest checkpoint; returns the sha256s nothing refers to any more."""
        newest = self._newest_checkpoint(conn, job_id)
        if newest is None:
            return []
        dropped = [r[0] for r in conn.execute("SELECT sha256 FROM checkpoints WHERE job = ? AND attempt != ?",
                                              (job_id, newest["attempt"]))]
        conn.execute("DELETE FROM checkpoints WHERE job = ? AND attempt != ?", (job_id, newest["attempt"]))
        return self._unreferenced(conn, dropped)

    @staticmethod
    def _unreferenced(conn, shas: list[str]) -> list[str]:
        return sorted({s for s in shas
                       if conn.execute("SELECT 1 FROM checkpoints WHERE sha256 = ?", (s,)).fetchone() is None})

    @staticmethod
    def _newest_checkpoint(conn, job_id: str) -> dict | None:
        """What the next attempt resumes from: the checkpoint recorded last, of any attempt."""
        row = conn.execute(f"SELECT {COLUMNS} FROM checkpoints WHERE job = ? ORDER BY created DESC, attempt DESC "
                           "LIMIT 1", (job_id,)).fetchone()
        return _row(row) if row else None

    @staticmethod
    def _checkpoints_of(conn, job_id: str) -> list[dict]:
        return [_row(r) for r in conn.execute(f"SELECT {COLUMNS} FROM checkpoints WHERE job = ? ORDER BY attempt",
                                              (job_id,))]

    def check_checkpoint_holder(self, job_id: str, host: str, lease: str | None) -> dict:
        """The fence of ``record_checkpoint`` as a read, so an upload is refused before its body is read:
        ``{"job_id", "model", "mode", "status"}``."""
        with self._snapshot() as conn:
            self._checkpoint_attempt(conn, job_id, host, lease)
            model, mode, status = conn.execute("SELECT model, mode, status FROM jobs WHERE id = ?",
                                               (job_id,)).fetchone()
        return {"job_id": job_id, "model": model, "mode": mode, "status": status}

    def _checkpoint_attempt(self, conn, job_id: str, host: str, lease: str | None) -> int:
        """``jobs.checkpoint_attempt`` given the job and its last attempt's (host, lease)."""
        state, _ = self._load(conn, job_id)
        last = conn.execute("SELECT host, lease FROM attempts WHERE job = ? AND number = ?",
                            (job_id, state.tries)).fetchone()
        return jobs.checkpoint_attempt(state, host, lease, tuple(last) if last else None)

    def checkpoint_referenced(self, sha256: str) -> bool:
        with self._snapshot() as conn:
            return conn.execute("SELECT 1 FROM checkpoints WHERE sha256 = ?", (sha256,)).fetchone() is not None

    def checkpoint_records(self) -> list[dict]:
        """Every recorded checkpoint, oldest first: a peer fetches the files it lacks."""
        with self._snapshot() as conn:
            rows = conn.execute("SELECT job, sha256, model, mode, host, created FROM checkpoints "
                                "ORDER BY created, job, attempt").fetchall()
        return [dict(zip(("job_id", "sha256", "model", "mode", "host", "created"), r)) for r in rows]
