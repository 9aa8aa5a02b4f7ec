"""Metric history in the job queue: the numbers of every progress report, per attempt, for the curves.

Mixed into ``jobstore.JobStore``: a heartbeat that carries progress appends a point in the same
transaction (so every peer keeps the same history), and ``metric_history(job_id)`` reads it back.
A report that repeats the last point (a heartbeat with no new progress) adds nothing. An attempt
keeps at most ``MAX_POINTS``: past that, every other older point is dropped, so a long run keeps
its whole shape at a coarser grain, and its first and newest points always.
"""

from __future__ import annotations

import json

from cis490fleet import stop_rules
from cis490fleet.results import final_metrics

MAX_POINTS = 512

MIGRATION = """
    CREATE TABLE metric_points (
        job TEXT NOT NULL REFERENCES jobs(id),
        attempt INTEGER NOT NULL,
        t REAL NOT NULL,
        epoch REAL,
        step INTEGER,
        metrics TEXT NOT NULL
    );
    CREATE INDEX metric_points_job ON metric_points(job, attempt);
"""


# The sweep's early-stopping rule compares values reported at one epoch across the sweep's jobs.
STOP_MIGRATION = """
    CREATE INDEX metric_points_epoch ON metric_points(epoch) WHERE epoch IS NOT NULL;
"""


def _position(progress: dict, key: str):
    value = progress.get(key)
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


class MetricHistory:
    """The history side of ``JobStore`` (uses its ``_snapshot``)."""

    def _record_point(self, conn, job_id: str, attempt: int, progress: dict, now: float) -> None:
        numbers = final_metrics(progress)
        if not numbers:
            return
        epoch, step = _position(progress, "epoch"), _position(progress, "step")
        text = json.dumps(numbers, sort_keys=True)
        last = conn.execute("SELECT epoch, step, metrics FROM metric_points WHERE job = ? AND attempt = ? "
                            "ORDER BY rowid DESC LIMIT 1", (job_id, attempt)).fetchone()
        if last is not None and tuple(last) == (epoch, step, text):
            return
        conn.execute("INSERT INTO metric_points (job, attempt, t, epoch, step, metrics) VALUES (?, ?, ?, ?, ?, ?)",
                     (job_id, attempt, now, epoch, step, text))
        count = conn.execute("SELECT count(*) FROM metric_points WHERE job = ? AND attempt = ?",
                             (job_id, attempt)).fetchone()[0]
        if count > MAX_POINTS:
            rowids = [r[0] for r in conn.execute("SELECT rowid FROM metric_points WHERE job = ? AND attempt = ? "
                                                 "ORDER BY rowid", (job_id, attempt))]
            drop = rowids[1:-1:2]
            conn.executemany("DELETE FROM metric_points WHERE rowid = ?", [(r,) for r in drop])

    def _stop_reason(self, conn, job_id: str, progress: dict) -> str | None:
        """Why the sweep's stop rule ends this job at the epoch ``progress`` reports; None: it goes on."""
        epoch = _position(progress, "epoch")
        if epoch is None:
            return None
        spec_text = conn.execute("SELECT spec FROM jobs WHERE id = ?", (job_id,)).fetchone()[0]
        spec = json.loads(spec_text)
        stop, sweep = spec.get("stop"), spec.get("sweep")
        if not stop or not sweep:
            return None
        mine = final_metrics(progress).get(stop["metric"])
        if mine is None:
            return None
        latest: dict[str, float] = {}
        for other, metrics in conn.execute(
                "SELECT p.job, p.metrics FROM metric_points p INDEXED BY metric_points_epoch JOIN jobs j ON j.id = p.job "
                "WHERE p.epoch = ? AND p.job != ? AND json_extract(j.spec, '$.sweep') = ? ORDER BY p.rowid",
                (epoch, job_id, sweep)):
            value = json.loads(metrics).get(stop["metric"])
            if value is not None:
                latest[other] = value
        return stop_rules.verdict(stop, epoch, mine, list(latest.values()))

    def metric_history(self, job_id: str) -> list[dict]:
        """``[{"attempt", "points": [{"t", "epoch", "step", "metrics"}, ...]}, ...]``, oldest attempt first."""
        job_id = self.resolve(job_id)
        with self._snapshot() as conn:
            rows = conn.execute("SELECT attempt, t, epoch, step, metrics FROM metric_points WHERE job = ? "
                                "ORDER BY attempt, rowid", (job_id,)).fetchall()
        attempts: dict[int, list[dict]] = {}
        for attempt, t, epoch, step, metrics in rows:
            attempts.setdefault(attempt, []).append({"t": t, "epoch": epoch, "step": step,
                                                     "metrics": json.loads(metrics)})
        return [{"attempt": a, "points": points} for a, points in attempts.items()]
