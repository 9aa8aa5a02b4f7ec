"""The SQLite job queue (jobstore.py) and its plumbing (db.py), on real database files."""

from __future__ import annotations

import hashlib
import sqlite3
import threading

import pytest

from cis490fleet import db, errors
from cis490fleet.errors import (AmbiguousId, BadRequest, ConfigError, FleetError, InvalidTransition, NotFound,
                                StaleLease, Unavailable)
from cis490fleet.jobstore import CLAIM_SQL, FAILURES_CUT_SQL, FAILURES_SQL, HELD_SQL, MIGRATIONS, JobStore
from cis490fleet.model import FleetConfig, HostSpec, JobSpec, Manifest, compute_job_id

T0 = 1_700_000_000.0
ART = "a" * 64
CPU = {"cores": 4, "ram_gib": 16}
GPU = {"cores": 8, "ram_gib": 64, "cuda": True, "gpus": [{"index": 0, "name": "rtx", "vram_gib": 24}]}


def manifest(*jobs: JobSpec, hosts=(), **fleet) -> dict:
    return Manifest(fleet=FleetConfig(**fleet), hosts=tuple(hosts), jobs=tuple(jobs)).to_json()


def seeds(n: int, model: str = "mlp", **kw) -> list[JobSpec]:
    return [JobSpec(model=model, mode="train", seed=i, **kw) for i in range(n)]


@pytest.fixture
def store(tmp_path):
    s = JobStore(tmp_path / "queue.sqlite3")
    yield s
    s.close()


def sync(store, *jobs, now=T0, **kw):
    """The sync's counts (``manifest``, the record of what is in force, is tested on its own)."""
    result = store.execute({"op": "sync_manifest", "now": now, "manifest": manifest(*jobs, **kw)})
    result.pop("manifest")
    return result


def claim(store, host="ws1", lease="L1", now=T0, cap=CPU):
    return store.execute({"op": "claim", "now": now, "host": host, "capability": cap, "lease": lease})


def finish(store, job_id, host="ws1", lease="L1", now=T0, artifact=ART):
    store.execute({"op": "record_artifact", "now": now, "artifact_id": artifact, "job_id": job_id, "host": host,
                   "lease": lease, "model": "mlp", "mode": "train", "size": 10, "path": f"models/x/{artifact}"})
    return store.execute({"op": "complete", "now": now, "job_id": job_id, "host": host, "lease": lease,
                          "artifact_id": artifact})


def dump(store) -> list[str]:
    return list(store._conn().iterdump())


# ------------------------------------------------------------------ db.py

def test_connect_sets_wal_foreign_keys_busy_timeout_and_synchronous(tmp_path):
    conn = db.connect(tmp_path / "x.sqlite3", synchronous="normal")
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    assert conn.execute("PRAGMA busy_timeout").fetchone()[0] == 30000
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 1
    assert conn.isolation_level is None
    conn.close()


def test_connect_refuses_an_unknown_synchronous_mode(tmp_path):
    with pytest.raises(ConfigError, match="FULL"):
        db.connect(tmp_path / "x.sqlite3", synchronous="fast")


def test_transaction_commits_or_rolls_back_everything(tmp_path):
    conn = db.connect(tmp_path / "x.sqlite3")
    conn.execute("CREATE TABLE t (x)")
    with db.transaction(conn):
        conn.execute("INSERT INTO t VALUES (1)")
    with pytest.raises(ZeroDivisionError):
        with db.transaction(conn):
            conn.execute("INSERT INTO t VALUES (2)")
            1 / 0
    assert conn.execute("SELECT x FROM t").fetchall() == [(1,)]
    assert not conn.in_transaction


def test_migrate_applies_each_step_once_and_refuses_a_newer_database(tmp_path):
    path = tmp_path / "x.sqlite3"
    steps = ["CREATE TABLE a (x); CREATE TRIGGER a_t AFTER INSERT ON a BEGIN SELECT 1; END;",
             "INSERT INTO a VALUES ('semi;colon')"]
    conn = db.connect(path)
    assert db.migrate(conn, steps[:1]) == 1
    assert db.migrate(conn, steps) == 2
    assert db.migrate(conn, steps) == 2
    assert conn.execute("SELECT x FROM a").fetchall() == [("semi;colon",)]
    with pytest.raises(ConfigError, match="schema version 2 but this program knows only up to 1"):
        db.migrate(conn, steps[:1], what="queue.sqlite3")
    conn.close()


def test_a_failed_migration_leaves_the_old_schema(tmp_path):
    conn = db.connect(tmp_path / "x.sqlite3")
    with pytest.raises(sqlite3.OperationalError):
        db.migrate(conn, ["CREATE TABLE a (x)", "CREATE TABLE b (x); INSERT INTO nowhere VALUES (1)"])
    assert db.schema_version(conn) == 0
    assert conn.execute("SELECT name FROM sqlite_master").fetchall() == []


def test_store_refuses_a_queue_written_by_a_newer_program(tmp_path):
    path = tmp_path / "queue.sqlite3"
    JobStore(path).close()
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    conn.close()
    with pytest.raises(ConfigError, match="newer cis490fleet"):
        JobStore(path)


def test_a_closed_store_says_so(tmp_path):
    s = JobStore(tmp_path / "q.sqlite3")
    s.close()
    with pytest.raises(Unavailable, match="closed"):
        s.counts()
    with pytest.raises(Unavailable):
        s.execute({"op": "sweep_stale", "now": T0})


# ------------------------------------------------------------------ commands: validation

@pytest.mark.parametrize("cmd, words", [
    ({"op": "explode", "now": T0}, "unknown queue command op 'explode'"),
    ({"op": "cancel"}, "missing field 'now'"),
    ({"op": "cancel", "now": T0}, "missing field 'job_id'"),
    ({"op": "cancel", "now": T0, "job_id": "abc"}, "'job_id' must be a full job id"),
    ({"op": "claim", "now": "soon", "host": "ws1", "capability": {}, "lease": "x"}, "'now' must be a finite number"),
    ({"op": "claim", "now": T0, "host": "../etc", "capability": {}, "lease": "x"}, "'host' must be a host id"),
    ({"op": "claim", "now": T0, "host": "ws1", "capability": {}, "lease": ""}, "'lease' must be a non-empty"),
    (["op"], "must be an object"),
])
def test_bad_commands_are_refused_with_a_sentence_naming_the_problem(store, cmd, words):
    with pytest.raises(BadRequest) as info:
        store.execute(cmd)
    assert words in str(info.value)
    assert "\n" not in str(info.value)


# ------------------------------------------------------------------ manifest sync

def test_sync_is_idempotent_and_keeps_statuses(store):
    jobs = seeds(5)
    assert sync(store, *jobs) == {"added": 5, "kept": 0, "removed": 0, "total": 5, "out_of_tries": 0, "unclaimable": 0}
    first = claim(store)
    before = dump(store)
    assert sync(store, *jobs, now=T0 + 10) == {"added": 0, "kept": 5, "removed": 0, "total": 5, "out_of_tries": 0,
                                               "unclaimable": 0}
    assert dump(store) == before
    assert store.job(first["job_id"], T0)["status"] == "claimed"


def test_sync_adds_new_jobs_flags_removed_ones_and_unflags_returning_ones(store):
    a, b, c = seeds(3)
    sync(store, a, b)
    assert sync(store, b, c) == {"added": 1, "kept": 1, "removed": 1, "total": 3, "out_of_tries": 0,
                                 "unclaimable": 1}
    listed = {j["id"]: j["in_manifest"] for j in store.jobs()[0]}
    assert listed == {a.id: False, b.id: True, c.id: True}
    assert store.job(a.id, T0)["status"] == "pending"  # stays, but is never claimed while removed
    assert sync(store, a, b, c) == {"added": 0, "kept": 3, "removed": 0, "total": 3, "out_of_tries": 0,
                                    "unclaimable": 0}
    assert store.job(a.id, T0)["in_manifest"] is True


def test_a_removed_job_is_not_claimed_but_a_held_one_finishes(store):
    held, waiting, other = seeds(3)
    sync(store, held, waiting)
    assert claim(store)["job_id"] == held.id
    assert sync(store, other)["unclaimable"] == 1  # waiting stops being claimable; held is not counted
    assert claim(store, host="ws2", lease="L2")["job_id"] == other.id
    assert claim(store, host="ws3", lease="L3") == {"job": None}
    assert store.pending_claimable_count(T0) == 0
    assert store.job(waiting.id, T0)["why_pending"] == ["removed from the manifest: bring it back or cancel it"]
    finish(store, held.id)
    assert store.job(held.id, T0)["status"] == "completed"
    sync(store, waiting, other)
    assert claim(store, host="ws3", lease="L3")["job_id"] == waiting.id


def fail_as(store, job_id, failure_class=None, lease="L1", now=T0):
    cmd = {"op": "fail", "now": now, "job_id": job_id, "host": "ws1", "lease": lease, "error": "boom"}
    if failure_class:
        cmd["failure_class"] = failure_class
    return store.execute(cmd)


def test_a_trainer_failure_is_final_unless_retries_grant_more_and_exit_2_never_retries(store):
    plain, granted = JobSpec(model="mlp", mode="train", seed=0), JobSpec(model="mlp", mode="train", seed=1, retries=2)
    sync(store, plain, granted, retry_backoff_s=0)
    claim(store)
    assert fail_as(store, plain.id)["status"] == "failed"  # an old client sends no class: the job's fault
    assert claim(store, lease="L2")["job_id"] == granted.id
    assert fail_as(store, granted.id, "job", lease="L2")["status"] == "pending"
    claim(store, lease="L3")
    assert fail_as(store, granted.id, "usage", lease="L3")["status"] == "failed"
    detail = store.job(granted.id, T0)
    assert [(a["outcome"], a["class"]) for a in detail["attempts"]] == [("failed", "job"), ("failed", "usage")]


def test_failures_that_are_not_the_job_s_fault_retry_up_to_max_attempts(store):
    (job,) = seeds(1)
    sync(store, job, retry_backoff_s=0, max_attempts=3)
    for n, failure_class in enumerate(("signal", "fenced", "infra"), start=1):
        assert claim(store, lease=f"L{n}", now=T0 + n)["job_id"] == job.id
        answer = fail_as(store, job.id, failure_class, lease=f"L{n}", now=T0 + n)
        assert answer["status"] == ("pending" if n < 3 else "failed")
    assert [f["class"] for f in store.recent_failures(5)] == ["infra", "fenced", "signal"]
    with pytest.raises(BadRequest, match="failure_class.*one of fenced, infra, job"):
        fail_as(store, job.id, "cosmic-rays")


def test_a_claim_carries_the_time_limits_the_job_s_or_the_fleet_s(store):
    plain = JobSpec(model="mlp", mode="train", seed=0)
    own = JobSpec(model="mlp", mode="train", seed=1, max_runtime_s=60.0)
    sync(store, plain, own, max_runtime_s=3600.0, stall_after_s=300.0)
    first, second = claim(store), claim(store, host="ws2", lease="L2")
    assert (first["max_runtime_s"], first["stall_after_s"]) == (3600.0, 300.0)
    assert (second["max_runtime_s"], second["stall_after_s"]) == (60.0, 300.0)


def test_sync_updates_scheduling_fields_of_an_existing_job_without_touching_its_status(store):
    job, other = seeds(2)
    sync(store, job, other)
    got = claim(store)
    assert got["job_id"] == job.id
    bumped = JobSpec(model="mlp", mode="train", seed=1, priority=9)
    assert sync(store, job, bumped)["kept"] == 2
    assert store.job(other.id, T0)["priority"] == 9
    assert store.job(job.id, T0)["status"] == "claimed"


def test_sync_stores_fleet_trainer_and_hosts_replacing_old_ones(store):
    sync(store, *seeds(1), hosts=[HostSpec(id="ws1", slots=2)], heartbeat_s=7, stale_after_s=21)
    assert store.fleet().heartbeat_s == 7
    assert [h.id for h in store.hosts()] == ["ws1"]
    sync(store, *seeds(1), hosts=[HostSpec(id="ws2")])
    assert [h.id for h in store.hosts()] == ["ws2"]
    assert store.fleet().heartbeat_s == 30
    assert store.trainer().command[0] == "{python}"


def test_a_reload_that_lowers_retries_below_the_tries_used_fails_the_job_instead_of_running_it_again(store):
    tried, fresh = JobSpec(model="mlp", mode="train", seed=0, retries=3), JobSpec(model="mlp", mode="train", seed=1)
    sync(store, tried, fresh, retry_backoff_s=0)
    for n in (1, 2):
        got = claim(store, lease=f"L{n}", now=T0 + n, cap=CPU)
        assert got["job_id"] == tried.id and got["attempt"] == n
        store.execute({"op": "fail", "now": T0 + n, "job_id": tried.id, "host": "ws1", "lease": f"L{n}",
                       "error": f"oom {n}"})
    assert store.job(tried.id, T0 + 3)["status"] == "pending"  # 2 of 4 tries used

    lowered = JobSpec(model="mlp", mode="train", seed=0, retries=1)  # 2 tries in all: none left
    assert lowered.id == tried.id
    result = sync(store, lowered, fresh, now=T0 + 3, retry_backoff_s=0)
    assert result["out_of_tries"] == 1 and result["kept"] == 2
    detail = store.job(tried.id, T0 + 3)
    assert detail["status"] == "failed"
    assert detail["last_error"] == "out of tries: 2 used, the manifest now allows 2; last error: oom 2"
    assert claim(store, lease="L3", now=T0 + 4)["job_id"] == fresh.id  # never the exhausted job
    assert claim(store, host="ws2", lease="L4", now=T0 + 5) == {"job": None}
    assert sync(store, lowered, fresh, now=T0 + 6, retry_backoff_s=0)["out_of_tries"] == 0
    assert store.job(fresh.id, T0 + 6)["status"] == "claimed"


def test_sync_refuses_a_malformed_manifest_and_changes_nothing(store):
    sync(store, *seeds(2))
    before = dump(store)
    bad = manifest(*seeds(3))
    bad["jobs"][2] = {"model": "mlp", "mode": "train", "seed": 2, "bogus": object()}
    with pytest.raises(BadRequest, match=r"jobs\[2\]"):
        store.execute({"op": "sync_manifest", "now": T0, "manifest": bad})
    assert dump(store) == before


# ------------------------------------------------------------------ claim

def test_claim_answers_the_wire_shape_and_registers_the_worker(store):
    sync(store, JobSpec(model="mlp", mode="train", hyper={"lr": 0.1}), heartbeat_s=10, stale_after_s=60)
    got = claim(store, lease="tok")
    job_id = compute_job_id("mlp", "train", {"lr": 0.1}, "default", (), 0)
    assert got["job_id"] == job_id and got["job"]["id"] == job_id
    assert got["job"]["hyper"] == {"lr": 0.1} and got["job"]["model"] == "mlp"
    assert (got["lease"], got["attempt"], got["heartbeat_s"], got["stale_after_s"]) == ("tok", 1, 10, 60)
    assert got["trainer"]["command"][0] == "{python}"
    [worker] = store.workers(T0)
    assert worker["host"] == "ws1" and worker["live"] and worker["running"] == [job_id]
    assert claim(store, host="ws2", lease="t2") == {"job": None}


def test_claim_takes_highest_priority_then_oldest(store):
    low, high_old, high_new = (JobSpec(model="m", mode="x", seed=0, priority=1),
                               JobSpec(model="other", mode="x", seed=1, priority=5),
                               JobSpec(model="m", mode="x", seed=2, priority=5))
    sync(store, low, high_old, high_new)
    order = [claim(store, host=f"h{i}", lease=f"l{i}")["job_id"] for i in range(3)]
    assert order == [high_old.id, high_new.id, low.id]


def test_claim_respects_slots(store):
    sync(store, *seeds(3), hosts=[HostSpec(id="ws1", slots=2)])
    assert claim(store, lease="a")["job"] is not None
    assert claim(store, lease="b")["job"] is not None
    assert claim(store, lease="c") == {"job": None}


def test_claim_respects_host_policy_and_capability(store):
    cuda_job = JobSpec(model="big", mode="x", require_cuda=True, min_vram_gib=16)
    pinned = JobSpec(model="small", mode="x", allowed_hosts=("ws9",))
    sync(store, cuda_job, pinned, hosts=[HostSpec(id="gpu1", deny_jobs=("small",))])
    assert claim(store, host="ws1", lease="a") == {"job": None}
    assert claim(store, host="gpu1", lease="b", cap=GPU)["job_id"] == cuda_job.id
    assert claim(store, host="ws9", lease="c")["job_id"] == pinned.id


def test_prefer_cuda_waits_for_a_live_cuda_host_and_falls_back_when_there_is_none(store):
    job = JobSpec(model="m", mode="x", prefer_cuda=True)
    sync(store, job, worker_timeout_s=120)
    store.execute({"op": "register_worker", "now": T0, "host": "gpu1", "capability": GPU})
    assert claim(store, host="cpu1", now=T0 + 60) == {"job": None}
    why = store.job(job.id, T0 + 60)["why_pending"]
    assert any(r.startswith("cpu1:") and "prefers CUDA" in r for r in why)
    assert any(r.startswith("gpu1: eligible") for r in why)
    assert claim(store, host="cpu1", now=T0 + 121)["job_id"] == job.id  # gpu1 is no longer live


def test_claim_skips_jobs_in_retry_backoff(store):
    sync(store, *seeds(1), retry_backoff_s=100)
    got = claim(store)
    res = store.execute({"op": "fail", "now": T0 + 1, "job_id": got["job_id"], "host": "ws1", "lease": "L1",
                         "error": "oom\ntraceback", "failure_class": "signal"})
    assert res == {"ok": True, "status": "pending", "retry_at": T0 + 101}
    assert claim(store, lease="L2", now=T0 + 50) == {"job": None}
    detail = store.job(got["job_id"], T0 + 50)
    assert detail["last_error"] == "oom\ntraceback"
    assert any("retry backoff" in r for r in detail["why_pending"])
    assert store.jobs()[0][0]["last_error"] == "oom"
    again = claim(store, lease="L2", now=T0 + 101)
    assert again["job_id"] == got["job_id"] and again["attempt"] == 2


def test_claim_query_uses_the_index_in_order(store):
    sync(store, *seeds(3))
    conn = store._conn()
    plan = " | ".join(r[3] for r in conn.execute("EXPLAIN QUERY PLAN " + CLAIM_SQL, (1, T0)))
    assert "USING INDEX jobs_claim (cls=? AND status=? AND blocked=?)" in plan
    assert "TEMP B-TREE" not in plan
    held = " | ".join(r[3] for r in conn.execute("EXPLAIN QUERY PLAN " + HELD_SQL, ("ws1",)))
    assert "USING INDEX jobs_held" in held or "USING COVERING INDEX jobs_held" in held


def test_recent_failures_walk_their_partial_index_without_sorting(store):
    conn = store._conn()
    for sql in (FAILURES_CUT_SQL, FAILURES_SQL):
        plan = " | ".join(r[3] for r in conn.execute("EXPLAIN QUERY PLAN " + sql, (0,)))
        assert "USING INDEX attempts_failed" in plan or "USING COVERING INDEX attempts_failed" in plan, plan
        assert "TEMP B-TREE" not in plan and "SCAN a " not in plan, plan
    assert "(ended>?)" in " | ".join(r[3] for r in conn.execute("EXPLAIN QUERY PLAN " + FAILURES_SQL, (0,)))


def test_claim_finds_the_one_eligible_job_among_200000_ineligible(store):
    eligible = JobSpec(model="m", mode="x", seed=7, priority=-5)
    ineligible = JobSpec(model="m", mode="x", seed=8, require_cuda=True, priority=10)
    sync(store, ineligible, eligible)
    conn = store._conn()
    cls, spec, spec_hash = conn.execute("SELECT cls, spec, spec_hash FROM jobs WHERE id = ?",
                                        (ineligible.id,)).fetchone()
    rows = ((f"{i:064x}", 1000 + i, cls, "m", "x", 10, spec, spec_hash, "pending", T0, T0) for i in range(200_000))
    with db.transaction(conn):
        conn.executemany("INSERT INTO jobs (id, seq, cls, model, mode, priority, spec, spec_hash, status, created, "
                         "updated) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
    assert claim(store)["job_id"] == eligible.id
    assert claim(store, host="ws2", lease="x") == {"job": None}
    assert claim(store, host="gpu", lease="g", cap=GPU)["job_id"] == ineligible.id


# ------------------------------------------------------------------ heartbeat, complete, fail, release, fencing

def test_heartbeat_runs_the_job_and_keeps_progress_and_log_tail(store):
    sync(store, *seeds(1))
    got = claim(store)
    res = store.execute({"op": "heartbeat", "now": T0 + 5, "job_id": got["job_id"], "host": "ws1", "lease": "L1",
                         "progress": {"epoch": 3}, "log_tail": "loss 0.5\n"})
    assert res == {"ok": True, "cancel": False}
    detail = store.job(got["job_id"], T0 + 5)
    assert detail["status"] == "running" and detail["progress"] == {"epoch": 3}
    assert detail["log_tail"] == "loss 0.5\n"
    assert detail["attempts"] == [{"number": 1, "host": "ws1", "lease": "L1", "started": T0, "ended": None,
                                   "outcome": None, "error": None, "class": None, "log_size": None}]


def test_attempts_show_only_a_lease_prefix(store):
    sync(store, *seeds(1))
    got = claim(store, lease="0123456789abcdef")
    assert store.job(got["job_id"], T0)["attempts"][0]["lease"] == "01234567"


def test_a_stale_lease_changes_nothing(store):
    sync(store, *seeds(1))
    got = claim(store)
    before = dump(store)
    for cmd in ({"op": "heartbeat", "lease": "old"}, {"op": "fail", "lease": "old", "error": "x"},
                {"op": "release", "lease": None, "host": "ws2"},
                {"op": "complete", "lease": "old", "artifact_id": ART}):
        full = {"now": T0 + 1, "job_id": got["job_id"], "host": "ws1", **cmd}
        with pytest.raises(StaleLease) as info:
            store.execute(full)
        assert info.value.holder == "ws1"
    assert dump(store) == before



def test_check_holder_fences_like_the_worker_commands_and_changes_nothing(store):
    sync(store, *seeds(1))
    got = claim(store, lease="0123456789abcdef")
    job_id = got["job_id"]
    before = dump(store)
    assert store.check_holder(job_id, "ws1", "0123456789abcdef") == {
        "job_id": job_id, "model": "mlp", "mode": "train", "status": "claimed"}
    assert store.check_holder(job_id, "ws1", None)["status"] == "claimed"  # lease None: fenced by host alone
    for host, lease in (("ws1", "01234567-not-it"), ("ws1", "01234567"), ("ws2", "0123456789abcdef"),
                        ("ws2", None)):
        with pytest.raises(StaleLease) as info:
            store.check_holder(job_id, host, lease)
        assert info.value.holder == "ws1"
        with pytest.raises(StaleLease):  # the fenced command says the same
            store.execute({"op": "heartbeat", "now": T0, "job_id": job_id, "host": host, "lease": lease})
    with pytest.raises(NotFound):
        store.check_holder("f" * 64, "ws1", None)
    assert dump(store) == before


def test_summaries_carry_the_current_attempts_start(store):
    sync(store, *seeds(2))
    first = claim(store, lease="L1", now=T0 + 5)["job_id"]

    def started() -> dict:
        return {j["id"]: j["started"] for j in store.jobs()[0]}

    other = next(j for j in started() if j != first)
    assert started() == {first: T0 + 5, other: None}
    assert store.job(first, T0 + 6)["started"] == T0 + 5
    store.execute({"op": "release", "now": T0 + 7, "job_id": first, "host": "ws1", "lease": "L1"})
    assert started() == {first: None, other: None}  # pending again: no attempt holds it
    again = claim(store, host="ws2", lease="L2", now=T0 + 9)["job_id"]
    assert again == first and started()[first] == T0 + 9  # the new attempt, not the released one
    finish(store, first, host="ws2", lease="L2", now=T0 + 20)
    assert started()[first] == T0 + 9

def test_complete_needs_a_recorded_artifact_and_then_is_final(store):
    sync(store, *seeds(1))
    got = claim(store)
    with pytest.raises(NotFound, match="upload the bundle"):
        store.execute({"op": "complete", "now": T0, "job_id": got["job_id"], "host": "ws1", "lease": "L1",
                       "artifact_id": ART})
    assert finish(store, got["job_id"]) == {"ok": True}
    assert finish(store, got["job_id"]) == {"ok": True}  # a retried complete
    detail = store.job(got["job_id"], T0)
    assert detail["status"] == "completed" and detail["artifact_id"] == ART and detail["host"] == "ws1"
    assert store.artifact(ART)["job_id"] == got["job_id"]
    assert store.artifact("b" * 64) is None
    assert store.total_artifact_bytes() == 10
    with pytest.raises(InvalidTransition, match="change its seed"):
        store.execute({"op": "requeue", "now": T0, "job_id": got["job_id"]})
    with pytest.raises(InvalidTransition):
        store.execute({"op": "cancel", "now": T0, "job_id": got["job_id"]})


def test_release_returns_the_job_without_using_a_try(store):
    sync(store, *seeds(1), max_attempts=1)
    got = claim(store)
    store.execute({"op": "release", "now": T0 + 1, "job_id": got["job_id"], "host": "ws1", "lease": None})
    again = claim(store, lease="L2", now=T0 + 2)
    assert again["job_id"] == got["job_id"] and again["attempt"] == 2
    assert store.job(got["job_id"], T0)["attempt_count"] == 1


def test_cancel_of_a_running_job_reaches_its_holder_through_the_heartbeat(store):
    sync(store, *seeds(1))
    got = claim(store)
    store.execute({"op": "cancel", "now": T0 + 1, "job_id": got["job_id"]})
    beat = store.execute({"op": "heartbeat", "now": T0 + 2, "job_id": got["job_id"], "host": "ws1", "lease": "L1"})
    assert beat == {"ok": True, "cancel": True}
    assert store.workers(T0 + 2)[0]["running"] == []
    store.execute({"op": "requeue", "now": T0 + 3, "job_id": got["job_id"]})
    with pytest.raises(StaleLease):
        store.execute({"op": "heartbeat", "now": T0 + 4, "job_id": got["job_id"], "host": "ws1", "lease": "L1"})
    assert claim(store, lease="L2", now=T0 + 5)["job_id"] == got["job_id"]


def test_requeue_refuses_a_held_job(store):
    sync(store, *seeds(1))
    got = claim(store)
    with pytest.raises(InvalidTransition, match="cancel it first"):
        store.execute({"op": "requeue", "now": T0, "job_id": got["job_id"]})


def test_sweep_recovers_stale_jobs_then_fails_them_after_the_last_try(store):
    sync(store, *seeds(1), max_attempts=2, stale_after_s=60, heartbeat_s=10)
    got = claim(store)
    assert store.execute({"op": "sweep_stale", "now": T0 + 59}) == {"recovered": 0, "failed": 0}
    assert store.execute({"op": "sweep_stale", "now": T0 + 60}) == {"recovered": 1, "failed": 0}
    with pytest.raises(StaleLease):
        store.execute({"op": "heartbeat", "now": T0 + 61, "job_id": got["job_id"], "host": "ws1", "lease": "L1"})
    claim(store, host="ws2", lease="L2", now=T0 + 100)
    assert store.execute({"op": "sweep_stale", "now": T0 + 200}) == {"recovered": 0, "failed": 1}
    detail = store.job(got["job_id"], T0 + 200)
    assert detail["status"] == "failed" and detail["last_error"] == "no heartbeat for 60s on 2 attempts"
    assert [a["outcome"] for a in detail["attempts"]] == ["stale", "stale"]


def test_unknown_jobs_are_not_found(store):
    with pytest.raises(NotFound):
        store.execute({"op": "cancel", "now": T0, "job_id": "f" * 64})
    with pytest.raises(NotFound):
        store.job("f" * 64, T0)


# ------------------------------------------------------------------ batches

def test_one_bad_command_in_a_batch_does_not_undo_the_others(store):
    a, b = seeds(2)
    sync(store, a, b)
    results = store.execute_batch([
        {"op": "cancel", "now": T0, "job_id": a.id},
        {"op": "requeue", "now": T0, "job_id": "e" * 64},
        {"op": "nonsense", "now": T0},
        {"op": "claim", "now": T0, "host": "ws1", "capability": CPU, "lease": "L1"},
        {"op": "heartbeat", "now": T0, "job_id": b.id, "host": "ws1", "lease": "wrong"},
    ])
    assert results[0] == {"ok": True}
    assert isinstance(results[1], NotFound) and isinstance(results[2], BadRequest)
    assert results[3]["job_id"] == b.id
    assert isinstance(results[4], StaleLease)
    assert store.counts() == {"pending": 0, "claimed": 1, "running": 0, "completed": 0, "failed": 0, "cancelled": 1,
                              "stopped": 0}


def test_a_failing_command_inside_a_batch_leaves_no_partial_writes(store):
    sync(store, *seeds(1))
    got = claim(store)
    results = store.execute_batch([
        {"op": "heartbeat", "now": T0 + 1, "job_id": got["job_id"], "host": "ws1", "lease": "L1",
         "progress": {"bad": float("nan")}},
    ])
    assert isinstance(results[0], BadRequest)
    assert store.job(got["job_id"], T0)["status"] == "claimed"


class _BuggyStore(JobStore):
    def _op_cancel(self, conn, now, job_id, by=None):
        super()._op_cancel(conn, now, job_id, by)
        raise RuntimeError("a bug, not a refusal")


class _FullDiskStore(JobStore):
    def _op_cancel(self, conn, now, job_id, by=None):
        super()._op_cancel(conn, now, job_id, by)
        raise sqlite3.OperationalError("database or disk is full")


def test_a_command_that_raises_unexpectedly_is_undone_alone_as_apply_failed(tmp_path):
    s = _BuggyStore(tmp_path / "q.sqlite3")
    a, b = seeds(2)
    s.execute({"op": "sync_manifest", "now": T0, "manifest": manifest(a, b)})
    results = s.execute_batch([{"op": "claim", "now": T0, "host": "ws1", "capability": CPU, "lease": "L1"},
                               {"op": "cancel", "now": T0, "job_id": b.id}])
    assert results[0]["job"] is not None
    assert isinstance(results[1], errors.ApplyFailed) and "RuntimeError: a bug" in str(results[1])
    assert s.counts()["pending"] == 1 and s.counts()["claimed"] == 1, "the cancel is undone, the claim kept"
    s.close()


def test_a_fault_of_the_machine_undoes_the_whole_batch(tmp_path):
    s = _FullDiskStore(tmp_path / "q.sqlite3")
    a, b = seeds(2)
    s.execute({"op": "sync_manifest", "now": T0, "manifest": manifest(a, b)})
    with pytest.raises(sqlite3.OperationalError):
        s.execute_batch([{"op": "claim", "now": T0, "host": "ws1", "capability": CPU, "lease": "L1"},
                         {"op": "cancel", "now": T0, "job_id": b.id}])
    assert s.counts()["pending"] == 2
    s.close()


def test_the_manifest_in_force_is_recorded_with_its_text_and_a_seed_applies_only_to_an_empty_queue(store):
    a, b = seeds(2)
    seed = {"op": "sync_manifest", "now": T0, "manifest": manifest(a), "seed_only": True,
            "source": {"text": "first", "name": "a.toml"}}
    assert store.execute(seed)["added"] == 1
    first = store.manifest_info()
    assert first == {"sha256": hashlib.sha256(b"first").hexdigest(), "name": "a.toml", "applied": T0}
    again = store.execute({**seed, "manifest": manifest(a, b), "source": {"text": "other", "name": "b.toml"}})
    assert again["seeded"] is False and again["manifest"] == first and store.counts()["pending"] == 1
    reload = {**seed, "seed_only": False, "manifest": manifest(a, b), "now": T0 + 5,
              "source": {"text": "second", "name": "lab.toml"}}
    assert store.execute(reload)["added"] == 1
    assert store.manifest_info()["applied"] == T0 + 5 and store.manifest_text() == "second"
    store.execute({**reload, "now": T0 + 9})
    assert store.manifest_info()["applied"] == T0 + 5, "the same text again keeps when it came in force"


# ------------------------------------------------------------------ dependencies

def test_a_job_with_after_is_claimable_only_once_its_dependencies_completed(store):
    first = JobSpec(model="m", mode="x", seed=1, name="prep")
    second = JobSpec(model="m", mode="x", seed=2, name="train", after=("prep",), priority=100)
    sync(store, first, second)
    got = claim(store)
    assert got["job_id"] == first.id
    assert claim(store, host="ws2", lease="L2") == {"job": None}
    why = store.job(second.id, T0)["why_pending"]
    assert any("waits for 'prep', which a worker has just claimed" in r for r in why)
    finish(store, first.id)
    assert claim(store, host="ws2", lease="L2")["job_id"] == second.id


def test_a_failed_dependency_shows_in_why_pending(store):
    first = JobSpec(model="m", mode="x", seed=1, name="prep", retries=0)
    second = JobSpec(model="m", mode="x", seed=2, name="train", after=("prep",))
    sync(store, first, second)
    claim(store)
    store.execute({"op": "fail", "now": T0, "job_id": first.id, "host": "ws1", "lease": "L1", "error": "x"})
    why = store.job(second.id, T0)["why_pending"]
    assert any("waits for 'prep', which failed: requeue it" in r for r in why)


def test_dependencies_follow_manifest_changes(store):
    dependent = JobSpec(model="m", mode="x", seed=2, name="train", after=("prep",))
    sync(store, dependent)
    assert any("not in the queue" in r for r in store.job(dependent.id, T0)["why_pending"])
    assert claim(store) == {"job": None}
    freed = JobSpec(model="m", mode="x", seed=2, name="train")
    sync(store, freed)
    assert claim(store)["job_id"] == dependent.id


# ------------------------------------------------------------------ reads

def test_resolve_takes_a_full_id_or_a_unique_prefix(store):
    by_prefix: dict[str, JobSpec] = {}
    for spec in seeds(2000):
        other = by_prefix.setdefault(spec.id[:4], spec)
        if other is not spec:
            pair = (other, spec)
            break
    sync(store, *pair)
    a, b = pair
    assert store.resolve(a.id) == a.id
    common = next(i for i in range(64) if a.id[i] != b.id[i])
    assert store.resolve(a.id[:common + 1].upper()) == a.id
    assert store.resolve(" " + b.id[:common + 1] + " ") == b.id
    with pytest.raises(AmbiguousId) as info:
        store.resolve(a.id[:4])
    assert info.value.matches == sorted([a.id, b.id])
    with pytest.raises(NotFound, match="at least 4"):
        store.resolve(a.id[:3])
    with pytest.raises(NotFound, match="no job is named 'train-3'"):
        store.resolve("train-3")
    with pytest.raises(BadRequest, match="neither a job name nor a job id"):
        store.resolve("no/such")
    with pytest.raises(NotFound):
        store.resolve("0000000")


def test_why_pending_says_when_no_worker_is_live(store):
    sync(store, *seeds(1))
    assert store.job(seeds(1)[0].id, T0)["why_pending"] == [
        "no live worker: none has claimed or heartbeated in the last 120s"]


def test_listing_filters_pages_and_counts(store):
    sync(store, *seeds(4), *seeds(2, model="cnn"))
    claim(store)
    page, total = store.jobs(model="mlp", limit=2, offset=1)
    assert total == 4 and [j["seed"] for j in page] == [1, 2]
    assert store.jobs(host="ws1")[1] == 1
    assert store.jobs(status="pending")[1] == 5
    assert set(page[0]) >= {"id", "name", "model", "mode", "status", "priority", "attempts", "host", "progress",
                            "updated", "created", "in_manifest", "last_error", "artifact_id", "seed", "hyper"}
    assert store.counts() == {"pending": 5, "claimed": 1, "running": 0, "completed": 0, "failed": 0,
                              "cancelled": 0, "stopped": 0}
    assert store.pending_claimable_count(T0) == 5
    with pytest.raises(BadRequest, match="unknown status"):
        store.jobs(status="done")


def fail(store, job_id, now, host="ws1", lease="L1", error="boom", failure_class="job"):
    return store.execute({"op": "fail", "now": now, "job_id": job_id, "host": host, "lease": lease, "error": error,
                          "failure_class": failure_class})


def test_recent_failures_list_failed_and_stale_attempts_of_a_job_that_later_completed(store):
    sync(store, *seeds(2), max_attempts=3, retry_backoff_s=10, stale_after_s=60, heartbeat_s=10)
    job = claim(store, lease="L1")["job_id"]
    fail(store, job, T0 + 5, error="CUDA out of memory\nTraceback ...", failure_class="signal")
    assert claim(store, host="ws2", lease="L2", now=T0 + 20)["attempt"] == 2
    store.execute({"op": "sweep_stale", "now": T0 + 80})
    assert [f["status"] for f in store.recent_failures(10)] == ["pending", "pending"]  # retrying
    assert claim(store, lease="L3", now=T0 + 200)["attempt"] == 3
    finish(store, job, lease="L3", now=T0 + 210)

    got = store.recent_failures(10)
    assert got == [
        {"job_id": job, "name": None, "model": "mlp", "mode": "train", "attempt": 2, "host": "ws2", "ended": T0 + 80,
         "outcome": "stale", "error": "no heartbeat for 60s", "status": "completed", "class": "lost"},
        {"job_id": job, "name": None, "model": "mlp", "mode": "train", "attempt": 1, "host": "ws1", "ended": T0 + 5,
         "outcome": "failed", "error": "CUDA out of memory\nTraceback ...", "status": "completed",
         "class": "signal"}]
    assert store.recent_failures(1) == got[:1] and store.recent_failures(0) == []
    assert store.job(job, T0 + 210)["status"] == "completed"
    for bad in (-1, 1.5, True, "3"):
        with pytest.raises(BadRequest, match="limit must be a whole number"):
            store.recent_failures(bad)


def test_a_sweep_leaves_the_jobs_it_is_told_to_hold_alone(store):
    held, silent = seeds(2)
    sync(store, held, silent, stale_after_s=60, heartbeat_s=10)
    claim(store, lease="L1")
    claim(store, host="ws2", lease="L2")
    result = store.execute({"op": "sweep_stale", "now": T0 + 61, "hold": [held.id]})
    assert result == {"recovered": 1, "failed": 0}
    assert (store.job(held.id, T0)["status"], store.job(silent.id, T0)["status"]) == ("claimed", "pending")
    with pytest.raises(BadRequest, match=r"sweep_stale: field 'hold\[0\]' must be a full job id"):
        store.execute({"op": "sweep_stale", "now": T0 + 62, "hold": ["abc"]})


def test_recent_failures_order_ties_by_queue_order_and_cut_after_them(store):
    jobs = [JobSpec(model="mlp", mode="train", seed=i, priority=i) for i in range(4)]
    sync(store, *jobs, max_attempts=5, stale_after_s=60, heartbeat_s=10)
    for i in range(4):  # highest priority first: attempts are written in the reverse of queue order
        assert claim(store, host=f"h{i}", lease=f"L{i}")["job_id"] == jobs[3 - i].id
    store.execute({"op": "sweep_stale", "now": T0 + 60})  # all four go stale in one sweep: one ``ended``
    first = claim(store, host="h9", lease="X", now=T0 + 61)["job_id"]
    fail(store, first, T0 + 70, host="h9", lease="X")
    got = [(f["job_id"], f["attempt"]) for f in store.recent_failures(3)]
    assert got == [(first, 2), (jobs[0].id, 1), (jobs[1].id, 1)]
    assert [f["job_id"] for f in store.recent_failures(1000)] == [first] + [j.id for j in jobs]


def test_workers_report_liveness_running_jobs_and_effective_slots(store):
    sync(store, *seeds(1), hosts=[HostSpec(id="gpu1", slots=3)], worker_timeout_s=100)
    store.execute({"op": "register_worker", "now": T0, "host": "gpu1", "capability": GPU})
    claim(store, host="ws1", now=T0 + 50)
    workers = {w["host"]: w for w in store.workers(T0 + 120)}
    assert workers["gpu1"]["live"] is False and workers["gpu1"]["slots"] == 3
    assert workers["ws1"]["live"] is True and len(workers["ws1"]["running"]) == 1


# ------------------------------------------------------------------ snapshot swap

def test_replace_with_while_other_threads_read_and_write_never_crashes_nor_mixes_files(tmp_path):
    sources = {}
    for n in (3, 5):
        src = JobStore(tmp_path / f"src{n}.sqlite3")
        sync(src, *seeds(n))
        sources[n] = src
    store = JobStore(tmp_path / "queue.sqlite3")
    sources[3].backup_to(tmp_path / "first.sqlite3")
    store.replace_with(tmp_path / "first.sqlite3")
    stop = threading.Event()
    problems: list = []
    seen: set = set()

    def reader():
        try:
            while not stop.is_set():
                counts = store.counts()
                listed, total = store.jobs()
                assert sum(counts.values()) in (3, 5) and total in (3, 5) and len(listed) == total
                assert store.fleet().max_attempts >= 1 and store.artifacts() == []
                seen.add(total)
        except BaseException as err:  # noqa: BLE001 - reported by the main thread
            problems.append(err)

    def writer():
        try:
            while not stop.is_set():
                store.execute({"op": "register_worker", "now": T0, "host": "ws1", "capability": CPU})
        except BaseException as err:  # noqa: BLE001 - reported by the main thread
            problems.append(err)

    threads = [threading.Thread(target=reader) for _ in range(3)] + [threading.Thread(target=writer)]
    for t in threads:
        t.start()
    try:
        for i in range(40):
            n = (3, 5)[i % 2]
            copy = tmp_path / f"copy{i}.sqlite3"
            sources[n].backup_to(copy)
            store.replace_with(copy)
            # the old file's WAL must not survive into the new one
            assert sum(store.counts().values()) == n
    finally:
        stop.set()
        for t in threads:
            t.join()
        store.close()
        for src in sources.values():
            src.close()
    assert not problems, problems[0]
    assert seen == {3, 5}


def test_artifacts_lists_every_recorded_artifact(store):
    job = sync(store, *seeds(1)) and claim(store)["job_id"]
    finish(store, job)
    assert [a["artifact_id"] for a in store.artifacts()] == [ART]
    assert store.artifacts()[0] == store.artifact(ART)


# ------------------------------------------------------------------ replay

def test_the_same_commands_give_the_same_database(tmp_path):
    a, b, c = seeds(2) + [JobSpec(model="m", mode="x", name="n", after=("absent",))]
    cmds = [
        {"op": "sync_manifest", "now": T0, "manifest": manifest(a, b, c)},
        {"op": "claim", "now": T0 + 1, "host": "ws1", "capability": CPU, "lease": "1"},
        {"op": "heartbeat", "now": T0 + 2, "job_id": a.id, "host": "ws1", "lease": "1", "progress": {"e": 1}},
        {"op": "claim", "now": T0 + 3, "host": "ws2", "capability": GPU, "lease": "2"},
        {"op": "fail", "now": T0 + 4, "job_id": b.id, "host": "ws2", "lease": "2", "error": "boom"},
        {"op": "sweep_stale", "now": T0 + 5000},
        {"op": "sync_manifest", "now": T0 + 6000, "manifest": manifest(b, c)},
    ]
    dumps = []
    for name in ("one", "two"):
        s = JobStore(tmp_path / f"{name}.sqlite3")
        for cmd in cmds:
            s.execute(cmd)
        dumps.append(dump(s))
        s.close()
    assert dumps[0] == dumps[1]


def test_errors_are_fleet_errors():
    assert issubclass(StaleLease, FleetError) and issubclass(InvalidTransition, FleetError)
