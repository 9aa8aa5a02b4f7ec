"""Claims are atomic: concurrent claimers (threads, and separate processes on one file) never share a job.

Hypothesis picks the jobs (some needing CUDA) and the claimers (some with CUDA);
every claimer claims until the queue answers ``{"job": null}``. Afterwards every
eligible job was claimed exactly once, by exactly one lease, and nothing was lost.
"""

from __future__ import annotations

import multiprocessing
import tempfile
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cis490fleet.jobstore import JobStore
from cis490fleet.model import FleetConfig, JobSpec, Manifest

T0 = 1_700_000_000.0
GPU = {"cuda": True, "gpus": [{"index": 0, "name": "rtx", "vram_gib": 24}], "slots": 1000}
CPU = {"cuda": False, "slots": 1000}

scenarios = st.tuples(
    st.lists(st.booleans(), min_size=1, max_size=25),  # per job: requires CUDA
    st.lists(st.booleans(), min_size=2, max_size=6),  # per claimer: has CUDA
)


def build_queue(path: Path, needs_cuda: list[bool]) -> list[JobSpec]:
    specs = [JobSpec(model="m", mode="x", seed=i, require_cuda=c, priority=i % 3) for i, c in enumerate(needs_cuda)]
    with JobStore(path) as store:
        store.execute({"op": "sync_manifest", "now": T0,
                       "manifest": Manifest(fleet=FleetConfig(), jobs=tuple(specs)).to_json()})
    return specs


def claim_all(path: str, host: str, cuda: bool, barrier=None) -> list[tuple[str, str]]:
    """Claim until nothing is left for this host; returns (job id, lease) pairs. Runs in a thread or a process."""
    got = []
    with JobStore(path) as store:
        if barrier is not None:
            barrier.wait()
        n = 0
        while True:
            lease = f"{host}-{n}"
            res = store.execute({"op": "claim", "now": T0 + n, "host": host, "capability": GPU if cuda else CPU,
                                 "lease": lease})
            if res["job"] is None:
                return got
            got.append((res["job_id"], lease))
            n += 1


def check(path: Path, specs: list[JobSpec], claimers: list[bool], claims: list[tuple[str, str]]) -> None:
    ids = [job_id for job_id, _ in claims]
    assert len(ids) == len(set(ids)), "a job was handed to two claimers"
    eligible = {s.id for s in specs if not s.require_cuda or any(claimers)}
    assert set(ids) == eligible, "an eligible job was not claimed, or an ineligible one was"
    with JobStore(path) as store:
        conn = store._conn()
        for job_id, lease in claims:
            rows = conn.execute("SELECT lease FROM attempts WHERE job = ?", (job_id,)).fetchall()
            assert rows == [(lease,)], f"job {job_id[:8]} has attempts {rows}, expected one with lease {lease}"
            assert conn.execute("SELECT status, lease FROM jobs WHERE id = ?", (job_id,)).fetchone() == (
                "claimed", lease)
        counts = store.counts()
        assert counts["claimed"] == len(eligible)
        assert counts["pending"] == len(specs) - len(eligible)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios)
def test_threads_never_share_a_job(scenario):
    needs_cuda, claimers = scenario
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "queue.sqlite3"
        specs = build_queue(path, needs_cuda)
        barrier = threading.Barrier(len(claimers))
        results: list[list] = [[] for _ in claimers]
        errors: list[BaseException] = []

        def run(i: int) -> None:
            try:
                results[i] = claim_all(str(path), f"host{i}", claimers[i], barrier)
            except BaseException as err:  # surfaced below
                errors.append(err)
                barrier.abort()

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(claimers))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        check(path, specs, claimers, [c for r in results for c in r])


@pytest.fixture(scope="module")
def process_pool():
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(4) as pool:
        yield pool


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                HealthCheck.function_scoped_fixture])
@given(scenarios)
def test_processes_never_share_a_job(process_pool, scenario):
    needs_cuda, claimers = scenario
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "queue.sqlite3"
        specs = build_queue(path, needs_cuda)
        args = [(str(path), f"proc{i}", cuda) for i, cuda in enumerate(claimers)]
        results = process_pool.starmap(claim_all, args)
        check(path, specs, claimers, [c for r in results for c in r])
