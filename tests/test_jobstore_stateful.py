"""Stale-lease recovery, stateful: Hypothesis drives the SQLite queue and a plain-Python model side by side.

The model below restates DESIGN.md's state rules without looking at jobs.py.
After every step the two agree on every job (status, holder, lease, attempt
count, manifest flag); completed jobs never change; no job ever uses more
tries than it has; a caller with a stale lease changes nothing; no job disappears.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from cis490fleet.errors import InvalidTransition, StaleLease
from cis490fleet.jobstore import JobStore
from cis490fleet.model import FleetConfig, HostSpec, JobSpec, Manifest

T0 = 1_700_000_000.0
STALE_S = 60.0
BACKOFF_S = 5.0
MAX_ATTEMPTS = 3
HOSTS = ("ws1", "ws2")
SLOTS = 2
UNIVERSE = (
    JobSpec(model="m", mode="x", seed=0, priority=0),
    JobSpec(model="m", mode="x", seed=1, priority=2),
    JobSpec(model="m", mode="x", seed=2, priority=0),
    JobSpec(model="m", mode="x", seed=3, priority=1, retries=0),
)
IDS = [s.id for s in UNIVERSE]
FLEET_RETRIES = 1
MAX = {s.id: (MAX_ATTEMPTS if s.retries is None else s.retries + 1) for s in UNIVERSE}
# Tries a failure that is the job's own fault may have used and still be retried.
FAULT_MAX = {s.id: min(MAX[s.id], (FLEET_RETRIES if s.retries is None else s.retries) + 1) for s in UNIVERSE}
HELD = ("claimed", "running")


@dataclass
class ModelJob:
    seq: int
    priority: int
    status: str = "pending"
    holder: tuple[str, str] | None = None  # (host, lease)
    attempts: int = 0
    expires: float | None = None
    not_before: float | None = None
    in_manifest: bool = True
    artifact: str | None = None
    leases: list[tuple[str, str]] = field(default_factory=list)


def artifact_of(lease: str) -> str:
    return hashlib.sha256(lease.encode()).hexdigest()


class QueueMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.tmp = tempfile.mkdtemp(prefix="queue-stateful-")
        self.store = JobStore(Path(self.tmp) / "queue.sqlite3", synchronous="OFF")
        self.now = T0
        self.jobs: dict[str, ModelJob] = {}
        self.next_lease = 0
        self.completed: dict[str, tuple] = {}
        self.reload(tuple(range(len(UNIVERSE))))

    def teardown(self):
        self.store.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    # ---------------------------------------------------------- helpers

    def run(self, cmd: dict, expect: type[Exception] | None = None):
        cmd = {"now": self.now, **cmd}
        if expect is None:
            return self.store.execute(cmd)
        before = self.snapshot()
        try:
            self.store.execute(cmd)
        except expect:
            assert self.snapshot() == before, f"{cmd['op']} refused with {expect.__name__} but changed the queue"
            return None
        raise AssertionError(f"{cmd} should have raised {expect.__name__}")

    def snapshot(self):
        conn = self.store._conn()
        return (conn.execute("SELECT * FROM jobs ORDER BY id").fetchall(),
                conn.execute("SELECT * FROM attempts ORDER BY job, number").fetchall(),
                conn.execute("SELECT * FROM artifacts ORDER BY artifact_id").fetchall())

    def caller(self, job_id: str, who: str) -> tuple[str, str | None]:
        job = self.jobs[job_id]
        if who == "holder" and job.holder:
            return job.holder
        if who == "holder_by_host" and job.holder:
            return job.holder[0], None
        if who == "other_host" and job.holder:
            return next(h for h in HOSTS if h != job.holder[0]), job.holder[1]
        old = [x for x in job.leases if x != job.holder]
        return old[-1] if old else ("ws2", "never-issued")

    def fenced(self, job_id: str, host: str, lease: str | None) -> bool:
        holder = self.jobs[job_id].holder
        return holder is None or holder[0] != host or (lease is not None and lease != holder[1])

    def held_by(self, host: str) -> int:
        return sum(1 for j in self.jobs.values() if j.status in HELD and j.holder and j.holder[0] == host)

    # ---------------------------------------------------------- rules

    @rule(subset=st.sets(st.integers(0, len(UNIVERSE) - 1), min_size=1).map(lambda s: tuple(sorted(s))))
    def reload(self, subset):
        specs = [UNIVERSE[i] for i in subset]
        manifest = Manifest(fleet=FleetConfig(stale_after_s=STALE_S, heartbeat_s=10, max_attempts=MAX_ATTEMPTS,
                                              retry_backoff_s=BACKOFF_S, worker_timeout_s=10**9,
                                              retries=FLEET_RETRIES),
                            hosts=tuple(HostSpec(id=h, slots=SLOTS) for h in HOSTS), jobs=tuple(specs))
        res = self.run({"op": "sync_manifest", "manifest": manifest.to_json()})
        wanted = {s.id for s in specs}
        unclaimable = sum(1 for i, j in self.jobs.items() if j.in_manifest and i not in wanted and j.status == "pending")
        added = 0
        for spec in specs:
            if spec.id not in self.jobs:
                self.jobs[spec.id] = ModelJob(seq=len(self.jobs), priority=spec.priority)
                added += 1
        for job_id, job in self.jobs.items():
            job.in_manifest = job_id in wanted
        assert res.pop("manifest")["sha256"] == hashlib.sha256(
            json.dumps(manifest.to_json(), sort_keys=True, separators=(",", ":")).encode()).hexdigest()
        assert res == {"added": added, "kept": len(specs) - added, "removed": len(self.jobs) - len(specs),
                       "total": len(self.jobs), "out_of_tries": 0,  # retries never change here
                       "unclaimable": unclaimable}

    @rule(host=st.sampled_from(HOSTS))
    def claim(self, host):
        lease = f"lease-{self.next_lease}"
        self.next_lease += 1
        res = self.run({"op": "claim", "host": host, "capability": {"slots": 1}, "lease": lease})
        expected = None
        if self.held_by(host) < SLOTS:
            claimable = [(-j.priority, j.seq, i) for i, j in self.jobs.items()
                         if j.status == "pending" and j.in_manifest
                         and (j.not_before is None or j.not_before <= self.now)]
            expected = min(claimable)[2] if claimable else None
        assert (res.get("job_id") if res["job"] else None) == expected
        if expected is not None:
            job = self.jobs[expected]
            job.status, job.holder, job.attempts = "claimed", (host, lease), job.attempts + 1
            job.expires, job.not_before = self.now + STALE_S, None
            job.leases.append((host, lease))

    @rule(i=st.integers(0, len(UNIVERSE) - 1), who=st.sampled_from(["holder", "holder_by_host", "other_host", "stale"]))
    def heartbeat(self, i, who):
        job_id = IDS[i]
        if job_id not in self.jobs:
            return
        host, lease = self.caller(job_id, who)
        cmd = {"op": "heartbeat", "job_id": job_id, "host": host, "lease": lease, "progress": {"step": i}}
        job = self.jobs[job_id]
        if self.fenced(job_id, host, lease):
            self.run(cmd, StaleLease)
        elif job.status == "cancelled":
            assert self.run(cmd) == {"ok": True, "cancel": True}
        elif job.status in HELD:
            assert self.run(cmd) == {"ok": True, "cancel": False}
            job.status, job.expires = "running", self.now + STALE_S
        else:
            self.run(cmd, InvalidTransition)

    @rule(i=st.integers(0, len(UNIVERSE) - 1), who=st.sampled_from(["holder", "holder_by_host", "stale"]))
    def complete(self, i, who):
        job_id = IDS[i]
        if job_id not in self.jobs:
            return
        host, lease = self.caller(job_id, who)
        job = self.jobs[job_id]
        artifact = artifact_of(job.holder[1] if job.holder else "none")
        record = {"op": "record_artifact", "artifact_id": artifact, "job_id": job_id, "host": host, "lease": lease,
                  "model": "m", "mode": "x", "size": 1, "path": "p"}
        done = {"op": "complete", "job_id": job_id, "host": host, "lease": lease, "artifact_id": artifact}
        if self.fenced(job_id, host, lease):
            self.run(record, StaleLease)
            self.run(done, StaleLease)
        elif job.status in HELD or (job.status == "completed" and job.artifact == artifact):
            self.run(record)
            assert self.run(done) == {"ok": True}
            job.status, job.artifact = "completed", artifact
        else:
            self.run(record, InvalidTransition)

    @rule(i=st.integers(0, len(UNIVERSE) - 1), who=st.sampled_from(["holder", "holder_by_host", "stale"]),
          failure_class=st.sampled_from([None, "job", "usage", "signal", "fenced"]))
    def fail(self, i, who, failure_class):
        job_id = IDS[i]
        if job_id not in self.jobs:
            return
        host, lease = self.caller(job_id, who)
        cmd = {"op": "fail", "job_id": job_id, "host": host, "lease": lease, "error": "boom"}
        if failure_class is not None:
            cmd["failure_class"] = failure_class
        limit = {None: FAULT_MAX[job_id], "job": FAULT_MAX[job_id], "usage": 0}.get(failure_class, MAX[job_id])
        job = self.jobs[job_id]
        if self.fenced(job_id, host, lease):
            self.run(cmd, StaleLease)
        elif job.status in ("cancelled", "failed"):
            assert self.run(cmd)["status"] == job.status
        elif job.status in HELD:
            res = self.run(cmd)
            if job.attempts >= limit:
                job.status = "failed"
            else:
                job.status, job.holder = "pending", None
                job.not_before = self.now + min(3600.0, BACKOFF_S * 2 ** (job.attempts - 1))
            assert (res["status"], res["retry_at"]) == (job.status, job.not_before if job.status == "pending" else None)
        else:
            self.run(cmd, InvalidTransition)

    @rule(i=st.integers(0, len(UNIVERSE) - 1), who=st.sampled_from(["holder", "holder_by_host", "stale"]))
    def release(self, i, who):
        job_id = IDS[i]
        if job_id not in self.jobs:
            return
        host, lease = self.caller(job_id, who)
        cmd = {"op": "release", "job_id": job_id, "host": host, "lease": lease}
        job = self.jobs[job_id]
        if self.fenced(job_id, host, lease):
            self.run(cmd, StaleLease)
        elif job.status == "cancelled":
            self.run(cmd)
        elif job.status in HELD:
            self.run(cmd)
            job.status, job.holder, job.attempts = "pending", None, job.attempts - 1
        else:
            self.run(cmd, InvalidTransition)

    @rule(i=st.integers(0, len(UNIVERSE) - 1))
    def cancel(self, i):
        job_id = IDS[i]
        if job_id not in self.jobs:
            return
        job = self.jobs[job_id]
        cmd = {"op": "cancel", "job_id": job_id}
        if job.status in ("completed", "failed"):
            self.run(cmd, InvalidTransition)
        else:
            self.run(cmd)
            job.status = "cancelled"

    @rule(i=st.integers(0, len(UNIVERSE) - 1))
    def requeue(self, i):
        job_id = IDS[i]
        if job_id not in self.jobs:
            return
        job = self.jobs[job_id]
        cmd = {"op": "requeue", "job_id": job_id}
        if job.status in ("completed", "claimed", "running"):
            self.run(cmd, InvalidTransition)
        else:
            self.run(cmd)
            if job.status != "pending":
                job.status, job.holder, job.attempts, job.not_before = "pending", None, 0, None

    @rule(dt=st.sampled_from([1.0, 7.0, 30.0, 61.0, 400.0]))
    def advance_clock(self, dt):
        self.now += dt

    @precondition(lambda self: any(j.status in HELD for j in self.jobs.values()))
    @rule()
    def sweep(self):
        recovered = failed = 0
        for job_id, job in self.jobs.items():
            if job.status in HELD and job.expires <= self.now:
                if job.attempts >= MAX[job_id]:
                    job.status, failed = "failed", failed + 1
                else:
                    job.status, recovered = "pending", recovered + 1
                job.holder = None
        assert self.run({"op": "sweep_stale"}) == {"recovered": recovered, "failed": failed}

    # ---------------------------------------------------------- invariants

    @invariant()
    def store_agrees_with_the_model(self):
        rows = self.store._conn().execute(
            "SELECT id, status, host, lease, attempts, in_manifest FROM jobs").fetchall()
        assert {r[0] for r in rows} == set(self.jobs), "a job appeared or disappeared"
        for job_id, status, host, lease, attempts, in_manifest in rows:
            job = self.jobs[job_id]
            holder = (host, lease) if lease is not None else None
            assert (status, holder, attempts, bool(in_manifest)) == (
                job.status, job.holder, job.attempts, job.in_manifest), f"job {job_id[:8]} differs from the model"
            assert 0 <= attempts <= MAX[job_id]

    @invariant()
    def completed_jobs_never_change(self):
        conn = self.store._conn()
        for job_id, before in self.completed.items():
            now = conn.execute("SELECT status, host, lease, artifact_id, attempts FROM jobs WHERE id = ?",
                               (job_id,)).fetchone()
            assert now == before
        for job_id, job in self.jobs.items():
            if job.status == "completed" and job_id not in self.completed:
                self.completed[job_id] = conn.execute(
                    "SELECT status, host, lease, artifact_id, attempts FROM jobs WHERE id = ?", (job_id,)).fetchone()

    @invariant()
    def at_most_one_open_attempt_per_job(self):
        open_ = self.store._conn().execute(
            "SELECT job, count(*) FROM attempts WHERE ended IS NULL GROUP BY job HAVING count(*) > 1").fetchall()
        assert open_ == []


QueueMachine.TestCase.settings = settings(max_examples=40, stateful_step_count=30, deadline=None,
                                          suppress_health_check=[HealthCheck.too_slow])
TestQueueStateful = QueueMachine.TestCase
