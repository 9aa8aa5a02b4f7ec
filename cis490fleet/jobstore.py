"""The job queue on SQLite: applies queue commands with the ``jobs`` rules, and answers reads for the API.

Every write is one command dict (see docs/INTERNALS.md, "Queue commands")
carrying its own ``now`` and lease: the store reads no clock and draws no
randomness, so the same command list gives the same database on every peer.
A command that raises a FleetError changes nothing.

Claiming stays fast however long the queue: jobs are grouped into constraint
classes (``JobSpec.constraint_key``; few rows), eligibility is decided per
class in Python with ``policy``, and each eligible class gives its best job
through one index seek (``CLAIM_SQL`` on ``jobs_claim``). A job waiting for
dependencies carries ``blocked = 1`` until every job it names in ``after`` has
completed.

Jobs that leave the manifest stay in the queue, flagged ``in_manifest = 0``: never
claimed again (one already held finishes) until the manifest brings them back.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import sqlite3
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cis490fleet import checkpoint_records, commands, db, failure_text, jobs, log_records, metric_history, placement, policy
from cis490fleet.results import final_metrics
from cis490fleet.errors import (AmbiguousId, ApplyFailed, BadRequest, FleetError, InvalidTransition, NotFound,
                                Unavailable, error_from_wire)
from cis490fleet.model import (COMPLETED, FAILED, HELD_STATUSES, JOB_ID_RE, NAME_RE, PENDING, STATUSES,
                               FleetConfig, HostSpec, JobSpec, TrainerConfig, normalize_capability)

log = logging.getLogger(__name__)

PREFIX_MIN = 4
APPLY_FAILURES_KEPT = 20


def _machine_fault(err: Exception) -> bool:
    """A fault of the disk, the memory or the database file, not of the command being applied."""
    return isinstance(err, (OSError, MemoryError)) or (
        isinstance(err, sqlite3.DatabaseError)
        and not isinstance(err, (sqlite3.IntegrityError, sqlite3.DataError, sqlite3.ProgrammingError)))


MIGRATIONS = [
    """
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE classes (id INTEGER PRIMARY KEY, key TEXT NOT NULL UNIQUE);
    CREATE TABLE jobs (
        id TEXT PRIMARY KEY,
        seq INTEGER NOT NULL UNIQUE,
        cls INTEGER NOT NULL REFERENCES classes(id),
        name TEXT,
        model TEXT NOT NULL,
        mode TEXT NOT NULL,
        priority INTEGER NOT NULL,
        retries INTEGER,
        spec TEXT NOT NULL,
        spec_hash TEXT NOT NULL,
        status TEXT NOT NULL,
        blocked INTEGER NOT NULL DEFAULT 0,
        attempts INTEGER NOT NULL DEFAULT 0,
        tries INTEGER NOT NULL DEFAULT 0,
        host TEXT,
        lease TEXT,
        lease_expires REAL,
        not_before REAL,
        progress TEXT,
        last_error TEXT,
        artifact_id TEXT,
        in_manifest INTEGER NOT NULL DEFAULT 1,
        created REAL NOT NULL,
        updated REAL NOT NULL
    );
    CREATE INDEX jobs_claim ON jobs(cls, status, blocked, priority DESC, seq);
    CREATE INDEX jobs_status ON jobs(status, seq);
    CREATE INDEX jobs_held ON jobs(host) WHERE status IN ('claimed', 'running');
    CREATE INDEX jobs_lease ON jobs(lease_expires) WHERE status IN ('claimed', 'running');
    CREATE INDEX jobs_name ON jobs(name) WHERE name IS NOT NULL;
    CREATE INDEX jobs_blocked ON jobs(blocked) WHERE blocked = 1;
    CREATE TABLE job_deps (
        job TEXT NOT NULL REFERENCES jobs(id),
        dep_name TEXT NOT NULL,
        PRIMARY KEY (job, dep_name)
    ) WITHOUT ROWID;
    CREATE INDEX job_deps_name ON job_deps(dep_name);
    CREATE TABLE attempts (
        job TEXT NOT NULL REFERENCES jobs(id),
        number INTEGER NOT NULL,
        host TEXT NOT NULL,
        lease TEXT NOT NULL,
        started REAL NOT NULL,
        ended REAL,
        outcome TEXT,
        error TEXT,
        log_tail TEXT,
        PRIMARY KEY (job, number)
    );
    CREATE TABLE workers (host TEXT PRIMARY KEY, capability TEXT NOT NULL, last_seen REAL NOT NULL);
    CREATE TABLE artifacts (
        artifact_id TEXT PRIMARY KEY,
        job_id TEXT NOT NULL,
        model TEXT NOT NULL,
        mode TEXT NOT NULL,
        host TEXT NOT NULL,
        size INTEGER NOT NULL,
        path TEXT NOT NULL,
        created REAL NOT NULL
    );
    """,
    # Client sessions: a command carrying client_id + serial applies once; a retry gets the first result.
    """
    CREATE TABLE sessions (client_id TEXT PRIMARY KEY, serial INTEGER NOT NULL, result TEXT NOT NULL);
    """,
    # Failed attempts, newest first (recent_failures), as a walk of this index however long the history.
    """
    CREATE INDEX attempts_failed ON attempts(ended DESC) WHERE outcome IN ('failed', 'stale');
    """,
    # GPU placement per attempt ({"gpus", "vram_gib", "share"}: the coordinator's VRAM accounting), the peak
    # VRAM each job's trainer reported, and the largest peak per model (the need of a rerun without
    # min_vram_gib).
    """
    ALTER TABLE attempts ADD COLUMN placement TEXT;
    ALTER TABLE jobs ADD COLUMN peak_vram_gib REAL;
    CREATE TABLE model_vram (model TEXT PRIMARY KEY, peak_vram_gib REAL NOT NULL) WITHOUT ROWID;
    """,
    # The checkpoint each attempt left (checkpoint_records.py).
    checkpoint_records.MIGRATION,
    # Finished attempts per host and model (count, seconds in all): the speeds placement learns.
    """
    CREATE TABLE model_runs (host TEXT NOT NULL, model TEXT NOT NULL, runs INTEGER NOT NULL, seconds REAL NOT NULL,
                             PRIMARY KEY (host, model)) WITHOUT ROWID;
    """,
    # The claimable jobs in claim order (PLAN_QUEUE_SQL), as a walk: no sort of the queue per claim.
    """
    CREATE INDEX jobs_plan ON jobs(priority DESC, seq) WHERE status = 'pending' AND blocked = 0;
    """,
    # When a worker said it was leaving (stopped by SIGTERM); any later request of that host clears it.
    """
    ALTER TABLE workers ADD COLUMN left_at REAL;
    """,
    # Why each attempt that did not complete ended (jobs.CLASS_*): whose fault, so whether it is retried.
    """
    ALTER TABLE attempts ADD COLUMN class TEXT;
    """,
    # Each completed job's final metrics (results.final_metrics): the answer of a sweep, without its bundles.
    """
    ALTER TABLE jobs ADD COLUMN metrics TEXT;
    """,
    # The numbers of every progress report per attempt (metric_history.py): curves that outlive the browser.
    metric_history.MIGRATION,
    # The whole log each attempt handed in (log_records.py).
    log_records.MIGRATION,
    # Points at one epoch across a sweep's jobs, for its early-stopping rule (stop_rules.py).
    metric_history.STOP_MIGRATION,
    # Where a job came from: NULL the manifest, 'submitted' jobs submit (kept across reloads).
    """
    ALTER TABLE jobs ADD COLUMN origin TEXT;
    """,
    checkpoint_records.NEWEST_MIGRATION,
    # Host keys (``jobs hosts add``): replicated so every peer verifies a host's signature; a revoked row stays,
    # so the history says who revoked it. ``operator_actions``: who cancelled or requeued a job, and when.
    """
    CREATE TABLE host_keys (host TEXT PRIMARY KEY, key TEXT NOT NULL, created REAL NOT NULL, created_by TEXT NOT NULL,
                            revoked REAL, revoked_by TEXT);
    CREATE TABLE operator_actions (job TEXT NOT NULL, at REAL NOT NULL, action TEXT NOT NULL, by TEXT NOT NULL);
    CREATE INDEX operator_actions_job ON operator_actions(job, at);
    """,
]

# The claim seek: the best claimable job of one class. Its WHERE and ORDER BY
# match jobs_claim column for column, so SQLite walks the index in order and
# stops at the first row not in backoff: no sort, no scan of other classes. A job removed from the
# manifest (in_manifest = 0) is skipped there too.
CLAIM_SQL = ("SELECT id, priority, seq FROM jobs INDEXED BY jobs_claim "
             "WHERE cls = ? AND status = 'pending' AND blocked = 0 AND (not_before IS NULL OR not_before <= ?) "
             "AND in_manifest = 1 "
             "ORDER BY priority DESC, seq LIMIT 1")

UPSERT_WORKER_SQL = ("INSERT INTO workers (host, capability, last_seen) VALUES (?, ?, ?) ON CONFLICT (host) DO UPDATE "
                     "SET capability = excluded.capability, last_seen = max(last_seen, excluded.last_seen), left_at = NULL")

HELD_SQL = "SELECT count(*) FROM jobs WHERE host = ? AND status IN ('claimed', 'running')"
# The claimable jobs a placement plan walks (higher priority first), and what every host holds.
PLAN_WINDOW = 256
PLAN_QUEUE_SQL = ("SELECT id, cls, model, priority, json_extract(spec, '$.expected_minutes') FROM jobs "
                  "INDEXED BY jobs_plan WHERE status = 'pending' AND blocked = 0 AND in_manifest = 1 "
                  "AND (not_before IS NULL OR not_before <= ?) ORDER BY priority DESC, seq LIMIT ?")
PLAN_HELD_SQL = ("SELECT j.host, j.model, json_extract(j.spec, '$.expected_minutes'), a.started FROM jobs j "
                 "JOIN attempts a ON a.job = j.id AND a.number = j.tries WHERE j.status IN ('claimed', 'running')")
# The GPU placements of a host's held jobs, for the VRAM accounting of its next claim.
PLACED_SQL = ("SELECT a.placement FROM jobs j JOIN attempts a ON a.job = j.id AND a.number = j.tries "
              "WHERE j.host = ? AND j.status IN ('claimed', 'running') AND a.placement IS NOT NULL")
HELD_BY_HOST_SQL = "SELECT host, count(*) FROM jobs WHERE status IN ('claimed', 'running') GROUP BY host"

# recent_failures in two index walks of attempts_failed, so no sort of the whole history: the ``ended`` of the
# limit-th newest failed attempt, then every failed attempt at least as new (ties on ``ended`` included, so the
# cut does not depend on the order SQLite meets them in); the few rows are ordered in Python.
FAILURES_CUT_SQL = ("SELECT ended FROM attempts INDEXED BY attempts_failed WHERE outcome IN ('failed', 'stale') "
                    "ORDER BY ended DESC LIMIT 1 OFFSET ?")
FAILURES_SQL = ("SELECT a.job, j.name, j.model, j.mode, a.number, a.host, a.ended, a.outcome, a.error, j.status, "
                "a.class, j.seq FROM attempts a INDEXED BY attempts_failed JOIN jobs j ON j.id = a.job "
                "WHERE a.outcome IN ('failed', 'stale') AND a.ended >= ?")
FAILURE_FIELDS = ("job_id", "name", "model", "mode", "attempt", "host", "ended", "outcome", "error", "status", "class")

ARTIFACT_FIELDS = ("artifact_id", "job_id", "model", "mode", "host", "size", "path", "created")
ARTIFACT_COLUMNS = ", ".join(ARTIFACT_FIELDS)

STATE_COLUMNS = "id, status, attempts, tries, host, lease, lease_expires, not_before, artifact_id, last_error, updated"

# ``started``: when the current attempt (number = tries) began, while a holder's lease is on the job.
SUMMARY_COLUMNS = ("id, name, model, mode, status, priority, attempts, host, progress, updated, created, "
                   "in_manifest, last_error, artifact_id, spec, "
                   "(SELECT a.started FROM attempts a WHERE a.job = jobs.id AND a.number = jobs.tries "
                   "AND jobs.lease IS NOT NULL), origin")

# Dependencies are satisfied when a job of that name has completed.
REFRESH_BLOCKED_SQL = """
    UPDATE jobs SET blocked = EXISTS (
        SELECT 1 FROM job_deps d WHERE d.job = jobs.id AND NOT EXISTS (
            SELECT 1 FROM jobs j2 WHERE j2.name = d.dep_name AND j2.status = 'completed'))
"""


def _empty_claim(op: str, result: object) -> bool:
    """A claim that found no job changed nothing, so its session is not advanced: a long-poll repeats the
    claim under the same serial until a job comes, and a retry of it simply claims again."""
    return op == "claim" and isinstance(result, dict) and result.get("job") is None


# ---------------------------------------------------------------- helpers

def _dumps(value) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _loads(text):
    return None if text is None else json.loads(text)


def _state(row) -> jobs.JobState:
    return jobs.JobState(id=row[0], status=row[1], attempts=row[2], tries=row[3], host=row[4], lease=row[5],
                         lease_expires=row[6], not_before=row[7], artifact_id=row[8], last_error=row[9],
                         updated=row[10])


class _Meta:
    """The manifest's fleet, trainer and hosts as stored by the last sync."""

    def __init__(self, fleet: FleetConfig, trainer: TrainerConfig, hosts: tuple[HostSpec, ...]):
        self.fleet = fleet
        self.trainer = trainer
        self.hosts = hosts
        self.by_host = {h.id: h for h in hosts}


class _Worker:
    __slots__ = ("host", "cap", "spec", "held")

    def __init__(self, host, cap, spec, held):
        self.host, self.cap, self.spec, self.held = host, cap, spec, held


def _probe(key: str) -> JobSpec:
    """A stand-in job carrying exactly one class's constraints, for the eligibility checks."""
    c = json.loads(key)
    return JobSpec(model=c["model"], mode="*", require_cuda=c["require_cuda"], prefer_cuda=c["prefer_cuda"],
                   min_vram_gib=float(c["min_vram_gib"]), min_ram_gib=float(c["min_ram_gib"]),
                   allowed_hosts=tuple(c["allowed_hosts"]), gpus=c.get("gpus", 0),
                   gpu_share=c.get("gpu_share", False), mixed_gpus=c.get("mixed_gpus", False))


class _Gate:
    """Shared use of the store's connections by any number of threads, or exclusive use by one (the swap of
    the queue file for a snapshot, and close), so no connection is closed while another thread is in it.

    Shared entries nest within a thread. A waiting exclusive entry holds back new shared ones, so a stream
    of reads cannot starve the swap; uncontended, a shared entry costs two acquires of a plain lock."""

    def __init__(self):
        self._cond = threading.Condition(threading.Lock())
        self._users = 0
        self._waiting = 0
        self._exclusive = False
        self._local = threading.local()

    def enter(self) -> None:
        local = self._local
        depth = getattr(local, "depth", 0)
        if not depth:
            with self._cond:
                while self._exclusive or self._waiting:
                    self._cond.wait()
                self._users += 1
        local.depth = depth + 1

    def leave(self) -> None:
        local = self._local
        local.depth -= 1
        if not local.depth:
            with self._cond:
                self._users -= 1
                if not self._users and self._waiting:
                    self._cond.notify_all()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        if getattr(self._local, "depth", 0):
            raise RuntimeError("the job queue's exclusive gate was asked for by a thread inside a shared use")
        with self._cond:
            self._waiting += 1
            try:
                while self._exclusive or self._users:
                    self._cond.wait()
            finally:
                self._waiting -= 1
            self._exclusive = True
        try:
            yield
        finally:
            with self._cond:
                self._exclusive = False
                self._cond.notify_all()


class _HostGpus:
    """One host's GPUs as a claim sees them: the host's GPUs, what its held jobs were given on them, and
    the measured VRAM peaks of models; read once, asked per job class and slot."""

    def __init__(self, store: "JobStore", conn, host: str, cap: dict, spec: HostSpec | None):
        self.host = host
        self.gpus = policy.host_gpus(cap)
        self.plan = policy.plan_slots(cap)
        self.share = bool(spec and spec.gpu_share)
        self.placed = []
        for (text,) in conn.execute(PLACED_SQL, (host,)):
            p = json.loads(text)
            self.placed += [policy.Placed(g, float(p["vram_gib"]), bool(p["share"])) for g in p["gpus"]]
        self.measured = store._measured_vram(conn)

    def slot_gpus(self, slot: dict) -> list[int]:
        """The GPUs the worker names for its slot; without them (or naming GPUs the host does not have),
        the slot's GPUs in the coordinator's plan."""
        if slot["gpus"] and set(slot["gpus"]) <= {g["index"] for g in self.gpus}:
            return slot["gpus"]
        return self.plan[slot["index"]]["gpus"] if slot["index"] < len(self.plan) else []

    def place(self, job: JobSpec, slot: dict) -> tuple[list[int] | None, float, str | None]:
        """(GPUs given or None, the VRAM accounted per GPU, the refusal or None)."""
        need = policy.vram_need(job, self.measured.get(job.model))
        given, refusal = policy.place_gpus(job, self.host, need, self.slot_gpus(slot), self.gpus, self.placed,
                                           host_share=self.share, free_reported=slot.get("free"))
        return given, need, refusal

    def fits_when_free(self, job: JobSpec, slot: dict) -> bool:
        """Whether the job would get GPUs from this slot once the host's jobs have left them."""
        need = policy.vram_need(job, self.measured.get(job.model))
        return policy.place_gpus(job, self.host, need, self.slot_gpus(slot), self.gpus, [],
                                 host_share=self.share)[0] is not None

    def refusal(self, job: JobSpec) -> str | None:
        """Why no slot of the host could take the job now (each distinct reason), None when one could."""
        reasons = []
        for planned in self.plan:
            given, _, refusal = self.place(job, {"index": planned["index"], "gpus": planned["gpus"]})
            if given is not None:
                return None
            reasons.append(refusal)
        return "; ".join(dict.fromkeys(reasons)) or None


# ---------------------------------------------------------------- the store

ORIGIN_SUBMITTED = "submitted"


@dataclass
class _Upsert:
    present: dict  # job id -> in_manifest, before the upsert
    pending: set
    submitted: set  # jobs that came from jobs submit: a reload never counts them removed
    seen: dict  # the ids of job_dicts, in order
    added: int


class JobStore(checkpoint_records.CheckpointRecords, metric_history.MetricHistory, log_records.LogRecords):
    """The queue in one SQLite file; one connection per thread, shared by any number of processes."""

    def __init__(self, path, *, synchronous: str = "FULL"):
        self.path = str(path)
        self._synchronous = synchronous
        self._local = threading.local()
        self._lock = threading.Lock()
        self._conns: list[sqlite3.Connection] = []
        self._closed = False
        self._gate = _Gate()
        self._generation = 0  # bumped by replace_with: a thread's connection of an older one is closed
        self._meta_cache: tuple[tuple, _Meta] | None = None
        self._probes: dict[str, JobSpec] = {}
        self._caps: dict[tuple, tuple[_Meta, str, dict, dict]] = {}
        with self._use() as conn:
            db.migrate(conn, MIGRATIONS, what=f"job queue {Path(self.path).name}")

    # -------------------------------------------------------- connections

    def _conn(self) -> sqlite3.Connection:
        """This thread's connection; use it only inside ``_use`` (tests may read through it directly)."""
        local = self._local
        conn = getattr(local, "conn", None)
        if conn is not None and local.generation == self._generation and not self._closed:
            return conn
        with self._lock:
            if self._closed:
                raise Unavailable("the job queue is closed (the coordinator is shutting down)")
            conn = db.connect(self.path, synchronous=self._synchronous)
            self._conns.append(conn)
            local.generation = self._generation
        local.conn = conn
        return conn

    @contextlib.contextmanager
    def _use(self) -> Iterator[sqlite3.Connection]:
        """This thread's connection, held in shared use of the gate for the block."""
        self._gate.enter()
        try:
            yield self._conn()
        finally:
            self._gate.leave()

    def _close_all(self) -> None:
        """Close every thread's connection; the caller holds the gate exclusively."""
        with self._lock:
            conns, self._conns = self._conns, []
            self._generation += 1
        for conn in conns:
            try:
                conn.close()
            except sqlite3.Error as err:  # pragma: no cover - closing is best effort
                log.debug("closing a queue connection: %s", err)

    def close(self) -> None:
        with self._gate.exclusive():
            self._closed = True
            self._close_all()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @contextlib.contextmanager
    def _snapshot(self) -> Iterator[sqlite3.Connection]:
        """A read transaction, so a read made of several queries sees one state."""
        with self._use() as conn:
            conn.execute("BEGIN")
            try:
                yield conn
            finally:
                conn.execute("COMMIT")

    # -------------------------------------------------------- writes

    def execute(self, cmd: dict) -> dict:
        """Apply one command in its own transaction; raises the command's FleetError."""
        op, args = commands.parse(cmd)
        with self._use() as conn, db.transaction(conn):
            return getattr(self, "_op_" + op)(conn, **args)

    def execute_batch(self, cmds: list[dict], applied_index: int | None = None,
                      indexes: list[int] | None = None) -> list:
        """Group commit: one transaction, each command in its own savepoint.

        A command that raises FleetError is undone alone and its error takes its slot in the
        result. So is one that raises any other exception but a fault of the machine (``_machine_fault``:
        disk, memory, a locked or broken database): it depends only on the command and the state, so it
        gets ApplyFailed, the same on every replica, which then carries on. A machine fault undoes the
        whole batch and propagates: another try, or another replica, may well succeed.
        ``applied_index`` (the Raft log index of the batch's last entry) is recorded in
        the same transaction, so a restarted peer re-applies exactly what the queue has not seen;
        ``indexes`` (each command's log index) go with the ApplyFailed record (``apply_failures``).
        """
        results: list = []
        with self._use() as conn, db.transaction(conn):
            if applied_index is not None:
                conn.execute("INSERT INTO meta (key, value) VALUES ('raft_applied', ?) "
                             "ON CONFLICT (key) DO UPDATE SET value = excluded.value", (str(int(applied_index)),))
            for cmd in cmds:
                try:
                    session = commands.session(cmd)
                    if session is not None:
                        seen = self._session_result(conn, *session)
                        if seen is not None:
                            results.append(seen)
                            continue
                    op, args = commands.parse(cmd)
                except FleetError as err:
                    results.append(err)
                    continue
                conn.execute("SAVEPOINT cmd")
                try:
                    result = getattr(self, "_op_" + op)(conn, **args)
                except FleetError as err:
                    result = err
                except Exception as err:
                    if _machine_fault(err):
                        raise
                    log.exception("queue command %s could not be applied; it changed nothing", op)
                    result = ApplyFailed(f"{op}: the queue could not apply this command ({type(err).__name__}: "
                                         f"{str(err)[:200]}); it changed nothing. This is a bug: report it")
                if isinstance(result, FleetError):
                    conn.execute("ROLLBACK TO cmd")
                conn.execute("RELEASE cmd")
                if isinstance(result, ApplyFailed):
                    index = indexes[len(results)] if indexes is not None else None
                    self._record_apply_failure(conn, {"index": index, "op": op, "error": result.detail})
                results.append(result)
                if session is not None and not _empty_claim(op, result):
                    saved = ({"error": result.code, "detail": result.detail} if isinstance(result, FleetError)
                             else {"result": result})
                    conn.execute("INSERT INTO sessions (client_id, serial, result) VALUES (?, ?, ?) ON CONFLICT "
                                 "(client_id) DO UPDATE SET serial = excluded.serial, result = excluded.result",
                                 (session[0], session[1], _dumps(saved)))
        return results

    @staticmethod
    def _record_apply_failure(conn, failure: dict) -> None:
        """Keep the newest APPLY_FAILURES_KEPT commands that failed to apply, in the queue itself (the same on
        every replica): what an operator reports."""
        row = conn.execute("SELECT value FROM meta WHERE key = 'apply_failures'").fetchone()
        kept = (json.loads(row[0]) if row else [])[-(APPLY_FAILURES_KEPT - 1):] + [failure]
        conn.execute("INSERT INTO meta (key, value) VALUES ('apply_failures', ?) "
                     "ON CONFLICT (key) DO UPDATE SET value = excluded.value", (_dumps(kept),))

    def apply_failures(self) -> list[dict]:
        """The newest commands that failed to apply: ``{"index" (Raft log index, None alone), "op", "error"}``."""
        with self._use() as conn:
            row = conn.execute("SELECT value FROM meta WHERE key = 'apply_failures'").fetchone()
        return json.loads(row[0]) if row else []

    @staticmethod
    def _session_result(conn, client_id: str, serial: int):
        """The first result of a command already applied for this client (an error is returned, not raised);
        None when ``serial`` is new."""
        row = conn.execute("SELECT serial, result FROM sessions WHERE client_id = ?", (client_id,)).fetchone()
        if row is None or serial > row[0]:
            return None
        if serial < row[0]:
            return BadRequest(f"client {client_id[:40]!r}: serial {serial} is older than {row[0]}, which is already "
                              "applied; use a new serial for a new command")
        saved = json.loads(row[1])
        if "error" in saved:
            return error_from_wire(0, saved["error"], saved["detail"])
        return saved["result"]

    def applied_index(self) -> int:
        """The Raft log index the queue has applied up to (0 when never replicated)."""
        with self._use() as conn:
            row = conn.execute("SELECT value FROM meta WHERE key = 'raft_applied'").fetchone()
        return int(row[0]) if row else 0

    def backup_to(self, dest) -> None:
        """A consistent copy of the queue at ``dest`` (SQLite's online backup), for a follower's snapshot."""
        target = sqlite3.connect(str(dest))
        try:
            with self._use() as conn:
                conn.backup(target)
        finally:
            target.close()

    def replace_with(self, path) -> None:
        """Swap the queue file for ``path`` (a snapshot from the leader): wait until no thread is using the
        store, close every connection, move the file in (dropping the old WAL and shared memory, which must
        never meet the new file), and let each thread reopen on its next use. Other threads' reads and writes
        wait meanwhile and then see the new queue."""
        with self._gate.exclusive():
            if self._closed:
                raise Unavailable("the job queue is closed (the coordinator is shutting down)")
            self._close_all()
            for suffix in ("-wal", "-shm"):
                Path(self.path + suffix).unlink(missing_ok=True)
            os.replace(path, self.path)
            self._meta_cache = None
            db.migrate(self._conn(), MIGRATIONS, what=f"job queue {Path(self.path).name}")

    # -------------------------------------------------------- meta

    def _meta(self, conn) -> _Meta:
        rows = tuple(conn.execute("SELECT key, value FROM meta WHERE key IN ('fleet', 'trainer', 'hosts') "
                                  "ORDER BY key").fetchall())
        cached = self._meta_cache
        if cached is not None and cached[0] == rows:
            return cached[1]
        values = dict(rows)
        meta = _Meta(FleetConfig.from_json(json.loads(values.get("fleet", "{}"))),
                     TrainerConfig.from_json(json.loads(values.get("trainer", "{}"))),
                     tuple(HostSpec.from_json(h) for h in json.loads(values.get("hosts", "[]"))))
        self._meta_cache = (rows, meta)
        return meta

    def _probe(self, key: str) -> JobSpec:
        probe = self._probes.get(key)
        if probe is None:
            probe = self._probes[key] = _probe(key)
        return probe

    # -------------------------------------------------------- job rows

    def _load(self, conn, job_id: str) -> tuple[jobs.JobState, sqlite3.Row | tuple]:
        row = conn.execute(f"SELECT {STATE_COLUMNS}, retries, name FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise NotFound(f"no job {job_id[:12]} in the queue; list jobs with 'cis490fleet jobs list'")
        return _state(row), row

    @staticmethod
    def _max_attempts(retries: int | None, fleet: FleetConfig) -> int:
        return fleet.max_attempts if retries is None else retries + 1

    def _save(self, conn, step: jobs.Step, *, clear_progress: bool = False) -> None:
        j = step.job
        conn.execute(
            "UPDATE jobs SET status = ?, attempts = ?, tries = ?, host = ?, lease = ?, lease_expires = ?, "
            "not_before = ?, artifact_id = ?, last_error = ?, updated = ?"
            + (", progress = NULL" if clear_progress else "") + " WHERE id = ?",
            (j.status, j.attempts, j.tries, j.host, j.lease, j.lease_expires, j.not_before, j.artifact_id,
             j.last_error, j.updated, j.id))
        if step.opened is not None:
            a = step.opened
            conn.execute("INSERT INTO attempts (job, number, host, lease, started) VALUES (?, ?, ?, ?, ?)",
                         (j.id, a.number, a.host, a.lease, a.started))
        if step.closed is not None:
            c = step.closed
            conn.execute("UPDATE attempts SET ended = ?, outcome = ?, error = ?, class = ? WHERE job = ? AND number = ?",
                         (c.ended, c.outcome, c.error, c.failure_class, j.id, c.number))

    @staticmethod
    def _refresh_blocked(conn, name: str | None = None) -> None:
        """Recompute ``blocked`` for the jobs that wait on ``name`` (all waiting jobs when None)."""
        if name is not None:
            conn.execute(REFRESH_BLOCKED_SQL + " WHERE id IN (SELECT job FROM job_deps WHERE dep_name = ?)", (name,))
            return
        conn.execute(REFRESH_BLOCKED_SQL + " WHERE id IN (SELECT job FROM job_deps)")
        conn.execute("UPDATE jobs SET blocked = 0 WHERE blocked = 1 AND id NOT IN (SELECT job FROM job_deps)")

    def _touch_worker(self, conn, host: str, now: float) -> None:
        conn.execute("UPDATE workers SET last_seen = max(last_seen, ?), left_at = NULL WHERE host = ?", (now, host))

    # -------------------------------------------------------- ops

    def _op_sync_manifest(self, conn, now: float, manifest: dict, source: dict | None, seed_only: bool) -> dict:
        """Make the queue match ``manifest``; ``source`` (its text, sha256 and file name) is kept as the
        group's manifest. ``seed_only``: only when no manifest was ever applied (a peer's ``--manifest``
        seeds a new group, and never overrides what ``jobs reload`` put in force)."""
        if seed_only and conn.execute("SELECT 1 FROM meta WHERE key IN ('fleet', 'manifest')").fetchone():
            total = conn.execute("SELECT count(*) FROM jobs").fetchone()[0]
            return {"seeded": False, "added": 0, "kept": total, "removed": 0, "total": total, "out_of_tries": 0,
                    "unclaimable": 0, "manifest": self._manifest_info(conn)}
        if source is None:
            source = {"text": None, "name": "", "sha256": hashlib.sha256(_dumps(manifest).encode()).hexdigest()}
        info = self._manifest_info(conn)
        if info is None or info["sha256"] != source["sha256"]:  # the same text again keeps when it came in force
            info = {"sha256": source["sha256"], "name": source["name"], "applied": now}
            for key, value in (("manifest", _dumps(info)), ("manifest_text", source["text"])):
                if value is None:
                    conn.execute("DELETE FROM meta WHERE key = ?", (key,))
                else:
                    conn.execute("INSERT INTO meta (key, value) VALUES (?, ?) "
                                 "ON CONFLICT (key) DO UPDATE SET value = excluded.value", (key, value))
        try:
            fleet = FleetConfig.from_json(manifest.get("fleet") or {})
            trainer = TrainerConfig.from_json(manifest.get("trainer") or {})
            hosts = [HostSpec.from_json(h) for h in manifest.get("hosts") or ()]
            job_dicts = list(manifest.get("jobs") or ())
        except (TypeError, KeyError, ValueError, AttributeError) as err:
            raise BadRequest(f"sync_manifest: the manifest is not a Manifest.to_json() object ({err})") from None
        timed = any(isinstance(d, dict) and d.get("expected_minutes") for d in job_dicts)
        for key, value in (("fleet", fleet.to_json()), ("trainer", trainer.to_json()),
                           ("hosts", [h.to_json() for h in hosts]), ("timed", timed)):
            conn.execute("INSERT INTO meta (key, value) VALUES (?, ?) "
                         "ON CONFLICT (key) DO UPDATE SET value = excluded.value", (key, _dumps(value)))

        up = self._upsert_specs(conn, job_dicts, now, "sync_manifest")
        present, pending, seen = up.present, up.pending, up.seen
        back = sorted(job_id for job_id in seen if present.get(job_id) == 0)
        gone = sorted(job_id for job_id, flag in present.items()
                      if flag == 1 and job_id not in seen and job_id not in up.submitted)
        conn.executemany("UPDATE jobs SET in_manifest = 1 WHERE id = ?", [(j,) for j in back])
        conn.executemany("UPDATE jobs SET in_manifest = 0 WHERE id = ?", [(j,) for j in gone])
        exhausted = self._fail_out_of_tries(conn, now, fleet)
        self._refresh_blocked(conn)
        total = len(present) + up.added
        kept = len(seen) - up.added
        listed = len(seen) + len(up.submitted - seen.keys())
        return {"added": up.added, "kept": kept, "removed": total - listed, "total": total,
                "out_of_tries": exhausted, "unclaimable": len(pending.intersection(gone)), "manifest": info}

    def _upsert_specs(self, conn, job_dicts: list, now: float, op: str, origin: str | None = None) -> _Upsert:
        """Insert the jobs of ``job_dicts`` that are new, update those whose spec changed; ``origin`` marks
        the new ones (None: the manifest's; ``ORIGIN_SUBMITTED``: ``jobs submit``'s, kept across reloads)."""
        by_hash: dict[str, str] = {}
        present: dict[str, int] = {}
        pending: set[str] = set()
        submitted: set[str] = set()
        for job_id, spec_hash, in_manifest, status, job_origin in conn.execute(
                "SELECT id, spec_hash, in_manifest, status, origin FROM jobs"):
            by_hash[spec_hash] = job_id
            present[job_id] = in_manifest
            if status == PENDING:
                pending.add(job_id)
            if job_origin == ORIGIN_SUBMITTED:
                submitted.add(job_id)
        classes = dict(conn.execute("SELECT key, id FROM classes").fetchall())
        next_seq = (conn.execute("SELECT max(seq) FROM jobs").fetchone()[0] or 0) + 1

        seen: dict[str, None] = {}
        inserts, updates, deps = [], [], []
        changed_ids = []
        for index, d in enumerate(job_dicts):
            try:
                text = _dumps(d)
            except (TypeError, ValueError) as err:
                raise BadRequest(f"{op}: jobs[{index}] is not plain JSON ({err})") from None
            spec_hash = hashlib.sha256(text.encode("utf-8")).hexdigest()
            job_id = by_hash.get(spec_hash)
            if job_id is not None:
                seen.setdefault(job_id)
                continue
            try:
                spec = JobSpec.from_json(d)
                job_id = spec.id
                key = spec.constraint_key()
            except (TypeError, ValueError, KeyError) as err:
                raise BadRequest(f"{op}: jobs[{index}] is not a valid job ({err})") from None
            if job_id in seen:
                continue
            seen[job_id] = None
            by_hash[spec_hash] = job_id
            cls = classes.get(key)
            if cls is None:
                cls = conn.execute("INSERT INTO classes (key) VALUES (?)", (key,)).lastrowid
                classes[key] = cls
            deps += [(job_id, name) for name in dict.fromkeys(spec.after)]
            if job_id in present:
                changed_ids.append((job_id,))
                updates.append((cls, spec.name, spec.priority, spec.retries, text, spec_hash, now, job_id))
            else:
                inserts.append((job_id, next_seq, cls, spec.name, spec.model, spec.mode, spec.priority, spec.retries,
                                text, spec_hash, PENDING, now, now, origin))
                next_seq += 1
        if inserts:
            conn.executemany(
                "INSERT INTO jobs (id, seq, cls, name, model, mode, priority, retries, spec, spec_hash, status, "
                "created, updated, origin) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", inserts)
        if updates:
            conn.executemany("UPDATE jobs SET cls = ?, name = ?, priority = ?, retries = ?, spec = ?, spec_hash = ?, "
                             "in_manifest = 1, updated = ? WHERE id = ?", updates)
            conn.executemany("DELETE FROM job_deps WHERE job = ?", changed_ids)
        if deps:
            conn.executemany("INSERT OR IGNORE INTO job_deps (job, dep_name) VALUES (?, ?)", deps)
        return _Upsert(present, pending, submitted, seen, len(inserts))

    def _op_submit_jobs(self, conn, now: float, jobs: list) -> dict:
        """Add jobs outside the manifest (``jobs submit``): validated like it before they are proposed, listed
        with origin "submitted", and never counted removed by a reload."""
        up = self._upsert_specs(conn, jobs, now, "submit_jobs", ORIGIN_SUBMITTED)
        self._refresh_blocked(conn)
        return {"added": up.added, "existing": len(up.seen) - up.added, "ids": list(up.seen)}

    def _fail_out_of_tries(self, conn, now: float, fleet: FleetConfig) -> int:
        rows = conn.execute(f"SELECT {STATE_COLUMNS}, retries FROM jobs WHERE status = 'pending' AND attempts > 0 "
                            "AND attempts >= coalesce(retries + 1, ?) ORDER BY seq", (fleet.max_attempts,)).fetchall()
        for row in rows:
            step = jobs.out_of_tries(_state(row), now=now, max_attempts=self._max_attempts(row[-1], fleet))
            if step is not None:
                self._save(conn, step)
                log.info("job %s: %s", row[0][:12], step.job.last_error)
        return len(rows)

    def _upsert_worker(self, conn, host: str, cap: dict, now: float) -> None:
        conn.execute(UPSERT_WORKER_SQL, (host, _dumps(cap), now))

    def _capability(self, meta: _Meta, capability: dict, spec: HostSpec | None) -> tuple[str, dict, dict]:
        """(the normalised capability as stored, the effective capability, its refusal verdicts) for a claim.

        Every claim of a worker repeats the same capability; normalising it, applying the
        host's overrides and serialising it cost about a fifth of a claim's CPU. ``repr``
        tells 4 from 4.0 and True, so equal keys normalise alike; an entry is used only
        with the manifest (meta) it was computed under. The verdicts dict caches
        ``_statically_refused`` for this capability and host entry.
        """
        key = (repr(capability), None if spec is None else spec.id)
        hit = self._caps.get(key)
        if hit is not None and hit[0] is meta:
            return hit[1], hit[2], hit[3]
        detected = normalize_capability(capability)
        text, cap = _dumps(detected), policy.effective_capability(detected, spec)
        if len(self._caps) >= 1024:
            self._caps.clear()
        verdicts: dict = {}
        self._caps[key] = (meta, text, cap, verdicts)
        return text, cap, verdicts

    @staticmethod
    def _statically_refused(verdicts: dict, class_key: str, probe: JobSpec, host: str, cap: dict,
                            spec: HostSpec | None) -> bool:
        """Whether ``policy.static_refusals`` refuses this class to the host, cached in ``verdicts`` (one
        capability, one ``[[hosts]]`` entry, one manifest). Besides those and the class, the verdict depends
        on the host id only through the class's allowed_hosts, which is therefore part of the key."""
        key = (class_key, (host in probe.allowed_hosts) if probe.allowed_hosts else None)
        refused = verdicts.get(key)
        if refused is None:
            refused = verdicts[key] = bool(policy.static_refusals(probe, host, cap, spec))
        return refused

    def _op_leave_worker(self, conn, now: float, host: str) -> dict:
        """The worker is stopping: shown as gone at once and no longer counted as a live host (why pending,
        prefer_cuda), instead of after ``worker_timeout_s``; its next request brings it back."""
        conn.execute("UPDATE workers SET left_at = ? WHERE host = ?", (now, host))
        return {"ok": True}

    def _op_register_worker(self, conn, now: float, host: str, capability: dict) -> dict:
        """Records the worker and answers its slots as the coordinator sees them (the manifest's [[hosts]]
        slots, else the worker's own count), each with its GPUs: the worker runs exactly these."""
        detected = normalize_capability(capability)
        self._upsert_worker(conn, host, detected, now)
        cap = policy.effective_capability(detected, self._meta(conn).by_host.get(host))
        return {"ok": True, "slots": policy.plan_slots(cap)}

    @staticmethod
    def _record_run(conn, job_id: str, number: int, host: str, now: float) -> None:
        """Count a finished attempt's seconds for its host and model: the speeds placement learns."""
        conn.execute("INSERT INTO model_runs (host, model, runs, seconds) SELECT ?, j.model, 1, max(0, ? - a.started) "
                     "FROM jobs j JOIN attempts a ON a.job = j.id AND a.number = ? WHERE j.id = ? "
                     "ON CONFLICT (host, model) DO UPDATE SET runs = runs + 1, seconds = seconds + excluded.seconds",
                     (host, now, number, job_id))

    @staticmethod
    def _record_peak_vram(conn, job_id: str, peak) -> None:
        """Keep the largest VRAM peak a trainer reported for the job, and for its model (a rerun's need)."""
        if isinstance(peak, bool) or not isinstance(peak, (int, float)) or not 0 < peak < 1e6:
            return
        conn.execute("UPDATE jobs SET peak_vram_gib = max(coalesce(peak_vram_gib, 0), ?) WHERE id = ?",
                     (float(peak), job_id))
        conn.execute("INSERT INTO model_vram (model, peak_vram_gib) SELECT model, ? FROM jobs WHERE id = ? "
                     "ON CONFLICT (model) DO UPDATE SET peak_vram_gib = max(peak_vram_gib, excluded.peak_vram_gib)",
                     (float(peak), job_id))

    @staticmethod
    def _measured_vram(conn) -> dict[str, float]:
        return dict(conn.execute("SELECT model, peak_vram_gib FROM model_vram").fetchall())

    def _live_workers(self, conn, meta: _Meta, now: float, *, live: bool = True) -> list[_Worker]:
        """The workers that claimed or heartbeated lately and did not leave; ``live=False``: every known one."""
        held = dict(conn.execute(HELD_BY_HOST_SQL).fetchall())
        out = []
        rows = (conn.execute("SELECT host, capability FROM workers WHERE last_seen >= ? AND left_at IS NULL "
                             "ORDER BY host", (now - meta.fleet.worker_timeout_s,)) if live
                else conn.execute("SELECT host, capability FROM workers ORDER BY host"))
        for host, cap_text in rows:
            spec = meta.by_host.get(host)
            out.append(_Worker(host, policy.effective_capability(json.loads(cap_text), spec), spec, held.get(host, 0)))
        return out

    @staticmethod
    def _cuda_host_available(probe: JobSpec, workers: list[_Worker], exclude: str) -> bool:
        """Whether a live CUDA host other than ``exclude`` could take a job of this class now."""
        return any(w.host != exclude and w.cap.get("cuda") and w.held < w.cap["slots"]
                   and not policy.static_refusals(probe, w.host, w.cap, w.spec) for w in workers)

    def _op_claim(self, conn, now: float, host: str, capability: dict, lease: str, slot: dict | None) -> dict:
        meta = self._meta(conn)
        spec = meta.by_host.get(host)
        cap_text, cap, verdicts = self._capability(meta, capability, spec)
        conn.execute(UPSERT_WORKER_SQL, (host, cap_text, now))
        if policy.slot_refusal(host, conn.execute(HELD_SQL, (host,)).fetchone()[0], cap["slots"]):
            return {"job": None}
        gpus = None if slot is None else _HostGpus(self, conn, host, cap, spec)
        workers = None
        ok: dict[int, tuple] = {}  # class -> (its best claimable row, the GPUs this slot gives it, its probe)
        waiting_multi = None  # the first claimable multi-GPU job that lacks free GPUs here (its row)
        for cls, key in conn.execute("SELECT id, key FROM classes ORDER BY id").fetchall():
            probe = self._probe(key)
            if self._statically_refused(verdicts, key, probe, host, cap, spec):
                continue
            if probe.prefer_cuda and not cap.get("cuda"):
                if workers is None:
                    workers = self._live_workers(conn, meta, now)
                if policy.prefer_cuda_refusal(probe, host, cap, self._cuda_host_available(probe, workers, host)):
                    continue
            row = conn.execute(CLAIM_SQL, (cls, now)).fetchone()
            if row is None:
                continue
            placed = None if gpus is None else gpus.place(probe, slot)
            if placed is None or placed[0] is not None:
                ok[cls] = (row, placed, probe)
            elif probe.gpus > 1 and gpus.fits_when_free(probe, slot) and (
                    waiting_multi is None or (-row[1], row[2]) < (-waiting_multi[1], waiting_multi[2])):
                waiting_multi = row
        if waiting_multi is not None:
            # Drain: while a multi-GPU job that comes first waits for the host's GPUs, a freed GPU is kept
            # for it (jobs that need none still run, on the CPU), else single-GPU jobs would take every card
            # in turn and it would never start.
            first = (-waiting_multi[1], waiting_multi[2])
            ok = {c: v if (-v[0][1], v[0][2]) < first else (v[0], ([], 0.0, None), v[2])
                  for c, v in ok.items() if (-v[0][1], v[0][2]) < first or not policy.needs_gpu(v[2])}
        if not ok:
            return {"job": None}
        best = min(ok.values(), key=lambda c: (-c[0][1], c[0][2]))
        speeds = self._speeds(conn, meta)
        if speeds is not None:
            chosen = self._plan(conn, meta, now, host, speeds, ok)[0]
            if chosen is None:
                return {"job": None}
            best = (chosen, ok[chosen[1]][1])
        row = conn.execute(f"SELECT {STATE_COLUMNS}, spec FROM jobs WHERE id = ?", (best[0][0],)).fetchone()
        state = _state(row)
        step = jobs.claim(state, host=host, lease=lease, now=now, stale_after_s=meta.fleet.stale_after_s)
        self._save(conn, step, clear_progress=True)
        spec_json = json.loads(row[-1])
        answer = {"job_id": state.id, "job": {**spec_json, "id": state.id}, "lease": lease,
                  "attempt": step.opened.number, "heartbeat_s": meta.fleet.heartbeat_s,
                  "stale_after_s": meta.fleet.stale_after_s, "trainer": meta.trainer.to_json(),
                  "slots": cap["slots"], "resume": self._newest_checkpoint(conn, state.id),
                  "inputs": self._inputs(conn, spec_json.get("after") or ()),
                  # The job's checkpoint period and time limits, else the fleet's (a time limit of None: none).
                  **{k: getattr(meta.fleet, k) if spec_json.get(k) is None else spec_json[k]
                     for k in ("checkpoint_every_s", "max_runtime_s", "stall_after_s")}}
        if best[1] is not None:
            given, need = best[1][0], best[1][1]
            conn.execute("UPDATE attempts SET placement = ? WHERE job = ? AND number = ?",
                         (_dumps({"gpus": given, "vram_gib": need if given else 0.0,
                                  "share": bool(spec_json.get("gpu_share"))}), state.id, step.opened.number))
            answer.update({"gpus": given, "slot": slot["index"]})
        return answer

    def _speeds(self, conn, meta: _Meta) -> placement.Speeds | None:
        """What placement knows of durations; None when claims go by queue order: nothing is known, or
        only finished attempts that do not make a plan worth its cost (``Speeds.matter``)."""
        timed = conn.execute("SELECT value FROM meta WHERE key = 'timed'").fetchone()
        speeds = placement.Speeds({h.id: h.speed for h in meta.hosts if h.speed},
                                  [placement.Runs(*r) for r in conn.execute("SELECT * FROM model_runs")])
        if timed and json.loads(timed[0]):
            return speeds
        return speeds if speeds.known() and speeds.matter() else None

    def _plan(self, conn, meta: _Meta, now: float, host: str, speeds: placement.Speeds,
              ok: dict[int, tuple] | None = None) -> tuple[tuple | None, list[placement.Planned]]:
        """Which claimable job ``host`` takes now by placement.plan ((id, class) or None), and the jobs it
        passes over for a faster host. ``ok`` holds the classes the asking slot may take (a claim); without
        it (``jobs show``) the host's eligibility is its static one, as for every other live host."""
        workers = self._live_workers(conn, meta, now)
        held: dict[str, list] = {}
        for h, model, minutes, started in conn.execute(PLAN_HELD_SQL):
            held.setdefault(h, []).append((started, speeds.expected_seconds(h, model, minutes)))
        slots = {w.host: placement.slot_times(now, w.cap["slots"], held.get(w.host, [])) for w in workers}
        if ok is not None:
            slots[host] = [now] + slots.get(host, [now])[1:]
        rows = conn.execute(PLAN_QUEUE_SQL, (now, PLAN_WINDOW)).fetchall()
        hosts_of: dict[int, frozenset[str]] = {}
        for cls in {r[1] for r in rows}:
            key = conn.execute("SELECT key FROM classes WHERE id = ?", (cls,)).fetchone()[0]
            probe = self._probe(key)
            hosts = {w.host for w in workers if w.host != host and not policy.static_refusals(probe, w.host, w.cap,
                                                                                               w.spec)}
            mine = cls in ok if ok is not None else any(
                w.host == host and not policy.static_refusals(probe, w.host, w.cap, w.spec) for w in workers)
            hosts_of[cls] = frozenset(hosts | ({host} if mine else set()))
        queue = [placement.QueuedJob(r[0], r[2], r[4], hosts_of[r[1]], r[3]) for r in rows]
        key, passed = placement.plan(host, now, queue, slots, speeds)
        chosen = next(((r[0], r[1]) for r in rows if r[0] == key), None)
        return chosen, passed

    @staticmethod
    def _inputs(conn, after) -> list[dict]:
        """The bundles a claimed job's trainer gets: one per job it waits for (``after``), all completed by now."""
        out = []
        for name in dict.fromkeys(after):
            row = conn.execute("SELECT id, artifact_id FROM jobs WHERE name = ? AND status = 'completed'",
                               (name,)).fetchone()
            if row is not None and row[1] is not None:
                out.append({"name": name, "job_id": row[0], "artifact_id": row[1]})
        return out

    def _op_heartbeat(self, conn, now: float, job_id: str, host: str, lease: str | None,
                      progress: dict | None, log_tail: str | None) -> dict:
        state, _ = self._load(conn, job_id)
        step = jobs.heartbeat(state, host=host, lease=lease, now=now,
                              stale_after_s=self._meta(conn).fleet.stale_after_s)
        self._touch_worker(conn, host, now)
        if step.cancel:
            return {"ok": True, "cancel": True}
        self._save(conn, step)
        if progress is not None:
            try:
                conn.execute("UPDATE jobs SET progress = ? WHERE id = ?", (_dumps(progress), job_id))
            except (TypeError, ValueError):
                raise BadRequest("heartbeat: field 'progress' must be plain JSON "
                                 "(numbers, strings, lists, objects)") from None
            self._record_peak_vram(conn, job_id, progress.get("peak_vram_gib"))
            self._record_point(conn, job_id, state.tries, progress, now)
        if log_tail is not None:
            conn.execute("UPDATE attempts SET log_tail = ? WHERE job = ? AND number = ?",
                         (log_tail, job_id, state.tries))
        reason = self._stop_reason(conn, job_id, progress) if progress is not None else None
        if reason is not None:
            self._save(conn, jobs.stop_early(step.job, now=now, reason=reason))
            log.info("job %s: %s", job_id[:12], reason)
            return {"ok": True, "cancel": True, "stopped": reason}
        return {"ok": True, "cancel": False}

    def _op_record_artifact(self, conn, now: float, artifact_id: str, job_id: str, host: str, lease: str | None,
                            model: str, mode: str, size: int, path: str) -> dict:
        state, _ = self._load(conn, job_id)
        jobs.check_holder(state, host, lease)
        if state.status not in HELD_STATUSES and not (
                state.status == COMPLETED and state.artifact_id == artifact_id):
            raise InvalidTransition(job_id, state.status, "record an artifact for")
        conn.execute("INSERT OR IGNORE INTO artifacts (artifact_id, job_id, model, mode, host, size, path, created) "
                     "VALUES (?, ?, ?, ?, ?, ?, ?, ?)", (artifact_id, job_id, model, mode, host, size, path, now))
        return {"ok": True}

    def _op_complete(self, conn, now: float, job_id: str, host: str, lease: str | None, artifact_id: str,
                     metrics: dict | None = None, progress: dict | None = None) -> dict:
        """``progress``: the trainer's last progress line, which a heartbeat may not have carried yet: it
        becomes the job's progress and the last point of its curve."""
        state, row = self._load(conn, job_id)
        jobs.check_holder(state, host, lease)
        if conn.execute("SELECT 1 FROM artifacts WHERE artifact_id = ?", (artifact_id,)).fetchone() is None:
            raise NotFound(f"artifact {artifact_id[:12]} is not stored; upload the bundle "
                           f"(PUT /v1/model/{artifact_id}) before completing job {job_id[:12]}")
        step = jobs.complete(state, host=host, lease=lease, artifact_id=artifact_id, now=now)
        if step.job is not state:
            self._record_run(conn, job_id, state.tries, host, now)
            self._save(conn, step)
            if progress is not None:
                conn.execute("UPDATE jobs SET progress = ? WHERE id = ?", (_dumps(progress), job_id))
                self._record_point(conn, job_id, state.tries, progress, now)
            else:
                progress = _loads(conn.execute("SELECT progress FROM jobs WHERE id = ?", (job_id,)).fetchone()[0])
            final = final_metrics(metrics, progress)
            conn.execute("UPDATE jobs SET metrics = ? WHERE id = ?", (json.dumps(final) if final else None, job_id))
            self._touch_worker(conn, host, now)
            if row[-1] is not None:
                self._refresh_blocked(conn, row[-1])
            pruned = self._prune_checkpoints(conn, job_id)
            if pruned:
                return {"ok": True, "unreferenced_checkpoints": pruned}
        return {"ok": True}

    def _op_fail(self, conn, now: float, job_id: str, host: str, lease: str | None, error: str,
                 failure_class: str) -> dict:
        state, row = self._load(conn, job_id)
        fleet = self._meta(conn).fleet
        retries = row[-2]
        step = jobs.fail(state, host=host, lease=lease, error=error, now=now,
                         max_attempts=self._max_attempts(retries, fleet), retry_backoff_s=fleet.retry_backoff_s,
                         failure_class=failure_class,
                         fault_tries=(fleet.retries if retries is None else retries) + 1)
        if step.job is not state:
            self._save(conn, step)
            self._touch_worker(conn, host, now)
        return {"ok": True, "status": step.job.status, "retry_at": step.job.not_before}

    def _op_release(self, conn, now: float, job_id: str, host: str, lease: str | None) -> dict:
        return self._apply_rule(conn, job_id, jobs.release, host=host, lease=lease, now=now)

    def _op_cancel(self, conn, now: float, job_id: str, by: str | None) -> dict:
        result = self._apply_rule(conn, job_id, jobs.cancel, now=now)
        self._record_action(conn, job_id, now, "cancel", by)
        return result

    def _op_requeue(self, conn, now: float, job_id: str, by: str | None) -> dict:
        result = self._apply_rule(conn, job_id, jobs.requeue, now=now)
        self._record_action(conn, job_id, now, "requeue", by)
        return result

    @staticmethod
    def _record_action(conn, job_id: str, now: float, action: str, by: str | None) -> None:
        if by is not None:
            conn.execute("INSERT INTO operator_actions (job, at, action, by) VALUES (?, ?, ?, ?)",
                         (job_id, now, action, by))

    def _op_host_key_set(self, conn, now: float, host: str, key: str, by: str, rotate: bool) -> dict:
        """``jobs hosts add`` (a host without a live key) or ``rotate`` (a host with one); the key was drawn
        at the edge, so every replica stores the same one."""
        row = conn.execute("SELECT revoked FROM host_keys WHERE host = ?", (host,)).fetchone()
        live = row is not None and row[0] is None
        if rotate and not live:
            raise NotFound(f"host {host!r} has no key to rotate; add it with: jobs hosts add {host}")
        if not rotate and live:
            raise BadRequest(f"host {host!r} already has a key; replace it with: jobs hosts rotate {host} "
                             "(the old key stops working at once)")
        conn.execute("INSERT INTO host_keys (host, key, created, created_by) VALUES (?, ?, ?, ?) ON CONFLICT (host) "
                     "DO UPDATE SET key = excluded.key, created = excluded.created, created_by = excluded.created_by, "
                     "revoked = NULL, revoked_by = NULL", (host, key, now, by))
        return {"ok": True, "host": host}

    def _op_host_key_revoke(self, conn, now: float, host: str, by: str) -> dict:
        cur = conn.execute("UPDATE host_keys SET revoked = ?, revoked_by = ? WHERE host = ? AND revoked IS NULL",
                           (now, by, host))
        if cur.rowcount == 0:
            raise NotFound(f"host {host!r} has no key to revoke; `jobs hosts list` shows the hosts with keys")
        return {"ok": True, "host": host}

    def _apply_rule(self, conn, job_id: str, rule, **kw) -> dict:
        """Load the job, apply a ``jobs`` rule to it and save the step unless it changed nothing."""
        state, _ = self._load(conn, job_id)
        step = rule(state, **kw)
        if step.job is not state:
            self._save(conn, step)
        return {"ok": True}

    def _op_sweep_stale(self, conn, now: float, hold: list[str] | None) -> dict:
        """Expire the leases past ``lease_expires``, except those of the jobs in ``hold``."""
        fleet = self._meta(conn).fleet
        held = frozenset(hold or ())
        recovered = failed = 0
        rows = conn.execute(f"SELECT {STATE_COLUMNS}, retries FROM jobs WHERE status IN ('claimed', 'running') "
                            "AND lease_expires <= ? ORDER BY lease_expires, id", (now,)).fetchall()
        for row in rows:
            if row[0] in held:
                continue
            step = jobs.expire(_state(row), now=now, max_attempts=self._max_attempts(row[-1], fleet),
                               stale_after_s=fleet.stale_after_s)
            if step is None:
                continue
            self._save(conn, step)
            if step.job.status == FAILED:
                failed += 1
            else:
                recovered += 1
            log.info("job %s: no heartbeat from %s; %s", row[0][:12], row[4], step.job.status)
        return {"recovered": recovered, "failed": failed}

    # -------------------------------------------------------- reads

    def resolve(self, ref: str) -> str:
        """The full job id for a job's manifest name, its id, or a unique hex prefix of at least 4 characters.

        A name is looked up first (names are what people remember); a name that several jobs carry (an edited
        job keeps its name, the old one stays in the queue) is AmbiguousId listing each of them."""
        text = str(ref).strip()
        with self._snapshot() as conn:
            named = (conn.execute("SELECT id, model, mode, status, in_manifest FROM jobs WHERE name = ? ORDER BY seq",
                                  (text,)).fetchall() if NAME_RE.match(text) else [])
        if len(named) == 1:
            return named[0][0]
        if named:
            shown = ", ".join(f"{r[0][:12]} ({r[1]}/{r[2]}, {r[3]}" + ("" if r[4] else ", no longer in the manifest")
                              + ")" for r in named[:5])
            raise AmbiguousId(text, [r[0] for r in named],
                              f"name {text!r} names {len(named)} jobs: {shown}{', ...' if len(named) > 5 else ''}; "
                              "give the id (or a unique prefix of it) of the one you mean")
        hint = "'cis490fleet jobs list' shows each job's name and id"
        lower = text.lower()
        if not lower or any(ch not in "0123456789abcdef" for ch in lower) or len(lower) > 64:
            if NAME_RE.match(text):
                raise NotFound(f"no job is named {text!r}; {hint}")
            raise BadRequest(f"{ref!r} is neither a job name nor a job id: give a name from the manifest, the id "
                             f"or its first {PREFIX_MIN}+ hex digits")
        if len(lower) < PREFIX_MIN:
            raise NotFound(f"no job is named {text!r}, and a job id prefix needs at least {PREFIX_MIN} hex digits; "
                           + hint)
        with self._snapshot() as conn:
            rows = conn.execute("SELECT id FROM jobs WHERE id >= ? AND id < ? ORDER BY id LIMIT 2",
                                (lower, lower + "g")).fetchall()
            if len(rows) > 1:
                rows = conn.execute("SELECT id FROM jobs WHERE id >= ? AND id < ? ORDER BY id",
                                    (lower, lower + "g")).fetchall()
        if not rows:
            raise NotFound(f"no job is named {text!r} and no job id starts with {lower!r}; {hint}")
        if len(rows) > 1:
            raise AmbiguousId(lower, [r[0] for r in rows])
        return rows[0][0]

    def check_holder(self, job_id: str, host: str, lease: str | None) -> dict:
        """The fence of the worker commands as a read: StaleLease unless (host, lease) holds the job now,
        NotFound for no such job; changes nothing. Lets an upload be refused before its body is read.

        Returns ``{"job_id", "model", "mode", "status"}`` of the held job.
        """
        with self._snapshot() as conn:
            state, _ = self._load(conn, job_id)
            jobs.check_holder(state, host, lease)
            model, mode = conn.execute("SELECT model, mode FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return {"job_id": job_id, "model": model, "mode": mode, "status": state.status}

    @staticmethod
    def _summary(row) -> dict:
        spec = json.loads(row[14])
        return {"id": row[0], "name": row[1], "model": row[2], "mode": row[3], "status": row[4],
                "priority": row[5], "attempts": row[6], "host": row[7], "progress": _loads(row[8]),
                "updated": row[9], "created": row[10], "in_manifest": bool(row[11]),
                "last_error": failure_text.summary(row[12]), "artifact_id": row[13], "seed": spec.get("seed"),
                "hyper": spec.get("hyper", {}), "started": row[15], "origin": row[16] or "manifest"}

    def job(self, job_id: str, now: float) -> dict:
        """Everything ``jobs show`` prints about one job."""
        if not (isinstance(job_id, str) and JOB_ID_RE.match(job_id)):
            job_id = self.resolve(job_id)
        with self._snapshot() as conn:
            row = conn.execute(f"SELECT {SUMMARY_COLUMNS}, not_before, retries, blocked, tries, peak_vram_gib "
                               "FROM jobs "
                               "WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise NotFound(f"no job {job_id[:12]} in the queue; list jobs with 'cis490fleet jobs list'")
            out = self._summary(row)
            meta = self._meta(conn)
            spec = JobSpec.from_json(json.loads(row[14]))
            attempts = [
                {"number": a[0], "host": a[1], "lease": a[2][:8], "started": a[3], "ended": a[4], "outcome": a[5],
                 "error": a[6], "class": a[8], "log_size": a[9],  # log_size: the stored log's, None without
                 **({"gpus": json.loads(a[7])["gpus"]} if a[7] else {})}
                for a in conn.execute("SELECT number, host, lease, started, ended, outcome, error, placement, class, "
                                      "log_size FROM attempts WHERE job = ? ORDER BY number", (job_id,))]
            tail = conn.execute("SELECT log_tail FROM attempts WHERE job = ? AND log_tail IS NOT NULL "
                                "ORDER BY number DESC LIMIT 1", (job_id,)).fetchone()
            out.update({
                "spec": spec.to_json(), "attempts": attempts, "attempt_count": row[6],
                "max_attempts": self._max_attempts(row[18], meta.fleet), "last_error": row[12],
                "log_tail": tail[0] if tail else None, "not_before": row[17], "peak_vram_gib": row[21],
                "why_pending": self._why_pending(conn, meta, job_id, spec, row[4], row[17], now, bool(row[11])),
                "checkpoints": self._checkpoints_of(conn, job_id),
                "operator_actions": [{"at": a[0], "action": a[1], "by": a[2]} for a in conn.execute(
                    "SELECT at, action, by FROM operator_actions WHERE job = ? ORDER BY at", (job_id,))],
            })
        return out

    def _dep_status(self, conn, names) -> dict[str, str | None]:
        out: dict[str, str | None] = {}
        for name in names:
            statuses = [r[0] for r in conn.execute("SELECT status FROM jobs WHERE name = ?", (name,))]
            out[name] = COMPLETED if COMPLETED in statuses else (statuses[0] if statuses else None)
        return out

    def _why_pending(self, conn, meta: _Meta, job_id: str, spec: JobSpec, status: str, not_before: float | None,
                     now: float, in_manifest: bool) -> list[str]:
        if status != PENDING:
            return []
        if not in_manifest:
            return ["removed from the manifest: bring it back or cancel it"]
        reasons = []
        if not_before is not None and not_before > now:
            reasons.append(f"waiting {not_before - now:.0f}s more before its next try (retry backoff after a failure)")
        reasons += policy.dependency_refusals(spec, self._dep_status(conn, spec.after))
        workers = self._live_workers(conn, meta, now)
        if not workers:
            reasons.append("no live worker: none has claimed or heartbeated in the last "
                           f"{meta.fleet.worker_timeout_s:g}s")
            for w in self._live_workers(conn, meta, now, live=False):
                reasons += [f"{w.host} (not live): {r}" for r in policy.static_refusals(spec, w.host, w.cap, w.spec)]
        for w in workers:
            refused = policy.static_refusals(spec, w.host, w.cap, w.spec)
            if not refused:
                prefer = policy.prefer_cuda_refusal(spec, w.host, w.cap,
                                                    self._cuda_host_available(spec, workers, w.host))
                if prefer:
                    refused.append(prefer)
                slot = policy.slot_refusal(w.host, w.held, w.cap["slots"])
                if slot:
                    refused.append(slot)
                else:
                    gpu = _HostGpus(self, conn, w.host, w.cap, w.spec).refusal(spec)
                    if gpu:
                        refused.append(gpu)
            if refused:
                reasons += [f"{w.host}: {r}" for r in refused]
            elif (waits := self._waits_for_faster(conn, meta, now, w.host, job_id)) is not None:
                reasons.append(f"{w.host}: {waits}")
            else:
                reasons.append(f"{w.host}: eligible; it takes the job at its next claim unless jobs of higher "
                               "priority (or older ones) come first")
        return reasons

    def _waits_for_faster(self, conn, meta: _Meta, now: float, host: str, job_id: str) -> str | None:
        """The sentence saying why ``host`` leaves the job to a faster host, None when it does not."""
        speeds = self._speeds(conn, meta)
        if speeds is None:
            return None
        passed = self._plan(conn, meta, now, host, speeds)[1]
        return next((placement.explain(p, host, now) for p in passed if p.key == job_id), None)

    def jobs(self, *, status: str | None = None, model: str | None = None, host: str | None = None,
             limit: int | None = None, offset: int = 0) -> tuple[list[dict], int]:
        """Job summaries in queue order (manifest order), and the total matching the filters."""
        where, params = [], []
        if status is not None:
            if status not in STATUSES:
                raise BadRequest(f"unknown status {status!r}; use one of {', '.join(STATUSES)}")
            where.append("status = ?")
            params.append(status)
        if model is not None:
            where.append("model = ?")
            params.append(model)
        if host is not None:
            where.append("host = ?")
            params.append(host)
        for name, value in (("limit", limit), ("offset", offset)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise BadRequest(f"{name} must be a whole number >= 0; got {value!r}")
        clause = (" WHERE " + " AND ".join(where)) if where else ""
        with self._snapshot() as conn:
            total = conn.execute(f"SELECT count(*) FROM jobs{clause}", params).fetchone()[0]
            rows = conn.execute(f"SELECT {SUMMARY_COLUMNS} FROM jobs{clause} ORDER BY seq LIMIT ? OFFSET ?",
                                params + [-1 if limit is None else limit, offset or 0]).fetchall()
        return [self._summary(r) for r in rows], total

    def recent_failures(self, limit: int) -> list[dict]:
        """Attempts that failed or went stale, newest ``ended`` first (ties: queue order, attempt number), each
        with its job's current status: a job still retrying, or one that later completed, shows here too."""
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
            raise BadRequest(f"limit must be a whole number >= 0; got {limit!r}")
        if limit == 0:
            return []
        with self._snapshot() as conn:
            cut = conn.execute(FAILURES_CUT_SQL, (limit - 1,)).fetchone()
            rows = conn.execute(FAILURES_SQL, (float("-inf") if cut is None else cut[0],)).fetchall()
        rows.sort(key=lambda r: (-r[6], r[11], r[4]))
        return [dict(zip(FAILURE_FIELDS, r)) for r in rows[:limit]]

    def workers(self, now: float) -> list[dict]:
        with self._snapshot() as conn:
            meta = self._meta(conn)
            running: dict[str, list[str]] = {}
            for job_id, host in conn.execute("SELECT id, host FROM jobs WHERE status IN ('claimed', 'running') "
                                             "ORDER BY seq"):
                running.setdefault(host, []).append(job_id)
            out = []
            for host, cap_text, last_seen, left_at in conn.execute(
                    "SELECT host, capability, last_seen, left_at FROM workers ORDER BY host"):
                cap = json.loads(cap_text)
                out.append({"host": host, "capability": cap, "last_seen": last_seen, "left": left_at,
                            "live": left_at is None and now - last_seen <= meta.fleet.worker_timeout_s,
                            "running": running.get(host, []),
                            "slots": policy.effective_capability(cap, meta.by_host.get(host))["slots"]})
        return out

    def counts(self) -> dict[str, int]:
        out = dict.fromkeys(STATUSES, 0)
        with self._use() as conn:
            for status, n in conn.execute("SELECT status, count(*) FROM jobs GROUP BY status"):
                out[status] = n
        return out

    def results(self, *, sweep: str | None = None, model: str | None = None) -> list[dict]:
        """Completed jobs, in queue order, with their identity, hyper values and final metrics."""
        where, args = ["status = 'completed'"], []
        if sweep is not None:
            where.append("json_extract(spec, '$.sweep') = ?")
            args.append(sweep)
        if model is not None:
            where.append("model = ?")
            args.append(model)
        with self._snapshot() as conn:
            rows = conn.execute(f"SELECT id, name, model, mode, spec, metrics, artifact_id, updated FROM jobs "
                                f"WHERE {' AND '.join(where)} ORDER BY seq", args).fetchall()
        out = []
        for job_id, name, model_, mode, spec_text, metrics, artifact_id, updated in rows:
            spec = json.loads(spec_text)
            out.append({"id": job_id, "name": name, "model": model_, "mode": mode, "seed": spec.get("seed"),
                        "hyper": spec.get("hyper", {}), "sweep": spec.get("sweep"),
                        "metrics": json.loads(metrics) if metrics else {}, "artifact_id": artifact_id,
                        "completed": updated})
        return out

    def sweep_counts(self, sweep: str) -> tuple[dict[str, int], float | None]:
        """How many jobs of one sweep (``JobSpec.sweep``) are in each status, and when the last of them changed."""
        with self._use() as conn:
            rows = conn.execute("SELECT status, count(*), max(updated) FROM jobs "
                                "WHERE json_extract(spec, '$.sweep') = ? GROUP BY status", (sweep,)).fetchall()
        return {r[0]: r[1] for r in rows}, max((r[2] for r in rows), default=None)

    def artifact(self, artifact_id: str) -> dict | None:
        with self._use() as conn:
            row = conn.execute(f"SELECT {ARTIFACT_COLUMNS} FROM artifacts WHERE artifact_id = ?",
                               (artifact_id,)).fetchone()
        if row is None:
            return None
        return dict(zip(ARTIFACT_FIELDS, row))

    def artifacts(self) -> list[dict]:
        """Every recorded artifact (as ``artifact``), oldest first: what a peer restored from a snapshot
        must fetch to hold the bundles its queue names."""
        with self._use() as conn:
            rows = conn.execute(f"SELECT {ARTIFACT_COLUMNS} FROM artifacts ORDER BY created, artifact_id").fetchall()
        return [dict(zip(ARTIFACT_FIELDS, row)) for row in rows]

    @staticmethod
    def _manifest_info(conn) -> dict | None:
        row = conn.execute("SELECT value FROM meta WHERE key = 'manifest'").fetchone()
        return json.loads(row[0]) if row else None

    def manifest_info(self) -> dict | None:
        """The manifest in force: ``{"sha256", "name", "applied"}`` of the last sync, None before the first."""
        with self._use() as conn:
            return self._manifest_info(conn)

    def manifest_text(self) -> str | None:
        """The text of the manifest in force, as the operator sent it (None when synced from memory)."""
        with self._use() as conn:
            row = conn.execute("SELECT value FROM meta WHERE key = 'manifest_text'").fetchone()
        return row[0] if row else None

    def fleet(self) -> FleetConfig:
        with self._use() as conn:
            return self._meta(conn).fleet

    def trainer(self) -> TrainerConfig:
        with self._use() as conn:
            return self._meta(conn).trainer

    def hosts(self) -> list[HostSpec]:
        with self._use() as conn:
            return list(self._meta(conn).hosts)

    def host_keys(self) -> dict[str, bytes]:
        """host -> key of every host whose key is not revoked (what a signature is checked against)."""
        with self._use() as conn:
            return {host: bytes.fromhex(key) for host, key in
                    conn.execute("SELECT host, key FROM host_keys WHERE revoked IS NULL")}

    def host_key_list(self) -> list[dict]:
        """Every host that was given a key, without the key: when, by whom, and whether it was revoked."""
        with self._use() as conn:
            rows = conn.execute("SELECT host, created, created_by, revoked, revoked_by FROM host_keys "
                                "ORDER BY host").fetchall()
        return [dict(zip(("host", "created", "created_by", "revoked", "revoked_by"), r)) for r in rows]

    def total_artifact_bytes(self) -> int:
        with self._use() as conn:
            return conn.execute("SELECT coalesce(sum(size), 0) FROM artifacts").fetchone()[0]

    def pending_claimable_count(self, now: float, limit: int | None = None) -> int:
        """Pending jobs out of backoff, in the manifest and not waiting on dependencies (stops at ``limit``)."""
        with self._use() as conn:
            return conn.execute(
                "SELECT count(*) FROM (SELECT 1 FROM jobs WHERE status = 'pending' AND blocked = 0 "
                "AND in_manifest = 1 AND (not_before IS NULL OR not_before <= ?) LIMIT ?)",
                (now, -1 if limit is None else limit)).fetchone()[0]
