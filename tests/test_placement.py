"""Faster hosts for longer jobs: expected durations, the list-scheduling plan a free host follows, and the
queue applying it (claims, `jobs show`'s reason) on real SQLite files."""

from __future__ import annotations

import pytest

from test_gpu_placement import store  # noqa: F401 (fixture)

from cis490fleet import placement
from cis490fleet.model import FleetConfig, HostSpec, JobSpec, Manifest
from cis490fleet.placement import NEVER, QueuedJob, Runs, Speeds

T0 = 1_700_000_000.0
CPU = {"cores": 4, "ram_gib": 16}


def test_speeds_come_from_the_manifest_then_from_finished_attempts():
    declared = Speeds({"gpu": 4.0}, [])
    assert declared.expected_seconds("gpu", "mlp", 60) == 900.0
    assert declared.expected_seconds("pi", "mlp", 60) == 3600.0
    assert declared.expected_seconds("pi", "mlp", None) is None
    # gbt ran 1000 s on gpu (declared 4.0: work 4000 s) and 5000 s on pi (declared 1.0: work 5000 s).
    learned = Speeds({"gpu": 4.0}, [Runs("gpu", "gbt", 1, 1000.0), Runs("pi", "gbt", 2, 10000.0)])
    assert learned.work["gbt"] == pytest.approx((4000 + 10000) / 3)
    assert learned.speed("gpu", "gbt") == pytest.approx(learned.work["gbt"] / 1000)
    assert learned.speed("pi", "gbt") == pytest.approx(learned.work["gbt"] / 5000)
    assert learned.speed("cpu", "gbt") == 1.0 and learned.speed("gpu", "mlp") == 4.0
    # A job without expected_minutes takes its model's learned work.
    assert learned.expected_seconds("cpu", "gbt", None) == pytest.approx(learned.work["gbt"])


def test_slot_times_count_free_slots_as_now_and_overdue_jobs_as_never():
    assert placement.slot_times(100.0, 2, []) == [100.0, 100.0]
    assert placement.slot_times(100.0, 2, [(0.0, 400.0)]) == [100.0, 400.0]
    assert placement.slot_times(100.0, 1, [(0.0, 80.0)]) == [100.0]  # overdue, not yet twice: ends now
    assert placement.slot_times(100.0, 1, [(0.0, 40.0)]) == [NEVER]  # past twice its time: busy for good
    assert placement.slot_times(100.0, 1, [(0.0, None)]) == [100.0]


def job(key, minutes, hosts=("pi", "gpu"), priority=0):
    return QueuedJob(key, "mlp", minutes, frozenset(hosts), priority)


def test_a_slow_host_leaves_a_long_job_to_a_faster_host_that_frees_up_soon():
    speeds = Speeds({"pi": 0.1, "gpu": 4.0}, [])
    slots = {"pi": [0.0], "gpu": [600.0]}  # the GPU host is busy for 10 more minutes
    key, passed = placement.plan("pi", 0.0, [job("long", 60)], slots, speeds)
    assert key is None
    assert passed == [placement.Planned("long", "gpu", 600.0, 1500.0, 36000.0)]
    assert placement.explain(passed[0], "pi", 0.0) == (
        "waits for a faster host: gpu is expected to start it in 10m00s and finish it in 25m00s, sooner than pi "
        "would (here: 10h00m)")
    # A short job the GPU host would finish later than the Pi: the Pi takes it.
    assert placement.plan("pi", 0.0, [job("short", 1)], slots, speeds)[0] == "short"


def test_the_wait_is_bounded_by_what_the_asking_host_would_take():
    speeds = Speeds({"pi": 0.1, "gpu": 4.0}, [])
    busy = {"pi": [0.0], "gpu": [40_000.0]}  # the GPU host is expected busy longer than the Pi needs
    assert placement.plan("pi", 0.0, [job("long", 60)], busy, speeds)[0] == "long"
    stuck = {"pi": [0.0], "gpu": [NEVER]}
    assert placement.plan("pi", 0.0, [job("long", 60)], stuck, speeds)[0] == "long"


def test_longer_jobs_first_within_a_priority_and_unknown_ones_in_queue_order():
    speeds = Speeds({}, [])
    queue = [job("a", 5), job("b", 50), QueuedJob("c", "new", None, frozenset({"pi"})), job("d", 1, priority=1)]
    assert [j.key for j in placement.longest_first(queue, speeds)] == ["d", "c", "b", "a"]
    # Two equal hosts: the longest goes first, the next host gets the next longest.
    slots = {"pi": [0.0], "gpu": [0.0]}
    assert placement.plan("pi", 0.0, queue[:2], slots, speeds)[0] == "b"


# -- the queue --


def sync(store, *jobs, hosts=()):
    store.execute({"op": "sync_manifest", "now": T0, "manifest": Manifest(
        fleet=FleetConfig(worker_timeout_s=3600), hosts=tuple(hosts), jobs=tuple(jobs)).to_json()})


def claim(store, host, lease, now=T0):
    return store.execute({"op": "claim", "now": now, "host": host, "capability": CPU, "lease": lease})


def test_a_slow_host_defers_to_a_faster_busy_one_and_jobs_show_says_why(store):  # noqa: F811
    hosts = [HostSpec(id="pi", speed=0.1), HostSpec(id="ws", speed=4.0)]
    first = JobSpec(model="mlp", mode="train", seed=0, expected_minutes=20)
    long = JobSpec(model="mlp", mode="train", seed=1, expected_minutes=60)
    sync(store, first, long, hosts=hosts)
    store.execute({"op": "register_worker", "now": T0, "host": "pi", "capability": CPU})
    assert claim(store, "ws", "L1")["job_id"] == long.id  # the longest first
    # ws is busy for 15 more minutes; it would finish `first` 20 minutes from now, the Pi in 3h20m.
    assert claim(store, "pi", "L2") == {"job": None}
    why = store.job(first.id, T0)["why_pending"]
    assert "pi: waits for a faster host: ws is expected to start it in 15m00s and finish it in 20m00s, sooner " \
           "than pi would (here: 3h20m)" in why
    # Once ws has run past twice its job's expected time, it no longer holds the job back.
    assert claim(store, "pi", "L2", now=T0 + 2 * 900 + 1)["job_id"] == first.id


def test_finished_attempts_teach_the_queue_each_hosts_speed(store):  # noqa: F811
    a, b = (JobSpec(model="gbt", mode="train", seed=i) for i in range(2))
    sync(store, a, b)
    assert claim(store, "fast", "L1")["job_id"] == a.id
    store.execute({"op": "record_artifact", "now": T0, "artifact_id": "a" * 64, "job_id": a.id, "host": "fast",
                   "lease": "L1", "model": "gbt", "mode": "train", "size": 1, "path": "models/x"})
    store.execute({"op": "complete", "now": T0 + 100, "job_id": a.id, "host": "fast", "lease": "L1",
                   "artifact_id": "a" * 64})
    runs = store._conn().execute("SELECT host, model, runs, seconds FROM model_runs").fetchall()
    assert runs == [("fast", "gbt", 1, 100.0)]


def test_the_plan_walks_the_claimable_jobs_in_order_without_sorting_the_queue(store):  # noqa: F811
    from cis490fleet.jobstore import PLAN_QUEUE_SQL

    plan = " | ".join(r[3] for r in store._conn().execute("EXPLAIN QUERY PLAN " + PLAN_QUEUE_SQL, (T0, 256)))
    assert "USING INDEX jobs_plan" in plan and "TEMP B-TREE" not in plan, plan


def test_finished_attempts_turn_the_plan_on_only_where_it_matters():
    assert Speeds({"gpu": 4.0}, []).matter()  # declared speeds
    short = [Runs("a", "mlp", 10, 30.0), Runs("b", "mlp", 10, 300.0)]  # 3 s against 30 s: not worth a plan
    assert not Speeds({}, short).matter()
    alike = [Runs("a", "mlp", 1, 600.0), Runs("b", "mlp", 1, 700.0)]  # ten minutes, hosts within 1.25x
    assert not Speeds({}, alike).matter()
    apart = [Runs("a", "mlp", 1, 600.0), Runs("b", "mlp", 1, 6000.0)]
    assert Speeds({}, apart).matter()
