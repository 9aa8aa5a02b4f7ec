"""The worker's side of checkpoints (checkpoint_sync.py) against a real coordinator, one attempt at a time."""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from cis490fleet.checkpoint_sync import CheckpointSync
from cis490fleet.client import Client
from cis490fleet.slots import Slot
from cis490fleet.trainer_process import TrainerRun
from conftest import manifest_toml, wait_for


@pytest.fixture
def uploads():
    pool = ThreadPoolExecutor(max_workers=1)
    yield pool
    pool.shutdown(wait=True)


def attempt(srv, tmp_path, uploads, host="ws1"):
    client = Client(srv.url, host_id=host, retries=1, backoff_s=0.01)
    claim = client.claim({})
    run = TrainerRun(claim, Slot(0, ""), tmp_path / host, time.time())
    sync = CheckpointSync(client, run, time.time(), uploads)
    return client, run, sync, sync.environment()


def save(folder, step: int) -> None:
    """What a trainer does: a "." temporary file, renamed into place."""
    tmp = folder / ".state.json.tmp"
    tmp.write_text(json.dumps({"step": step}))
    os.replace(tmp, folder / "state.json")


def newest(client, job_id):
    return [(c["attempt"], c["epoch"]) for c in client.job(job_id)["job"]["checkpoints"]]


def test_each_new_checkpoint_goes_up_through_one_connection_and_hand_over_sends_the_last(live_server, tmp_path,
                                                                                         uploads):
    srv = live_server(manifest_toml(1).replace("[fleet]", "[fleet]\ncheckpoint_every_s = 0"))
    client, run, sync, env = attempt(srv, tmp_path, uploads)
    assert env == {"CIS490_CHECKPOINT_DIR": str(sync.dir)}  # nothing to resume from on a first attempt
    before = client.connections_opened
    for step in range(1, 7):
        save(sync.dir, step)
        (sync.dir / ".half-written").write_bytes(b"x" * step)  # never uploaded
        progress = {"epoch": step, "checkpoint": "state.json"}
        wait_for(f"checkpoint {step} on the coordinator",  # polled as the worker does, until it is up
                 lambda: sync.poll(time.time(), progress) or newest(client, run.job_id) == [(1, step)],
                 timeout=30, every=0.05)
    assert client.connections_opened - before <= 2, "an upload thread per checkpoint leaks connections"
    save(sync.dir, 7)  # the trainer's last words on SIGTERM, not yet announced
    sync.hand_over({"epoch": 7, "checkpoint": "state.json"})
    assert newest(client, run.job_id) == [(1, 7)]

    # The next attempt, elsewhere, starts from it: downloaded, verified, extracted.
    client.release(run.job_id, run.lease)
    _, other, later, env = attempt(srv, tmp_path, uploads, host="ws2")
    assert env["CIS490_RESUME_FROM"] == str(later.resume_dir)
    assert sorted(p.name for p in later.resume_dir.iterdir()) == ["state.json"]
    assert json.loads((later.resume_dir / "state.json").read_text()) == {"step": 7}


def test_uploads_wait_checkpoint_every_s_but_hand_over_does_not(live_server, tmp_path, uploads):
    srv = live_server(manifest_toml(1).replace("[fleet]", "[fleet]\ncheckpoint_every_s = 3600"))
    client, run, sync, _ = attempt(srv, tmp_path, uploads)
    now = time.time()
    save(sync.dir, 1)
    wait_for("the first checkpoint", lambda: sync.poll(now, {"epoch": 1, "checkpoint": "state.json"})
             or newest(client, run.job_id) == [(1, 1)], timeout=30, every=0.05)
    save(sync.dir, 2)
    sync.poll(now + 60, {"epoch": 2, "checkpoint": "state.json"})
    time.sleep(0.5)
    assert newest(client, run.job_id) == [(1, 1)], "uploaded before checkpoint_every_s passed"
    sync.hand_over()
    assert newest(client, run.job_id) == [(1, None)]  # no progress line said which epoch


def test_a_resume_checkpoint_that_fails_its_sha256_is_not_used(live_server, tmp_path, uploads):
    srv = live_server(manifest_toml(1).replace("[fleet]", "[fleet]\ncheckpoint_every_s = 0"))
    client, run, sync, _ = attempt(srv, tmp_path, uploads)
    save(sync.dir, 5)
    sync.hand_over({"epoch": 5, "checkpoint": "state.json"})
    client.release(run.job_id, run.lease)
    stored = next(srv.coordinator.checkpoints.models_dir.glob("*/*/bundle.tar*"))
    stored.write_bytes(stored.read_bytes()[:-1] + b"!")  # same size, other bytes
    _, _, later, env = attempt(srv, tmp_path, uploads, host="ws2")
    assert "CIS490_RESUME_FROM" not in env and not later.resume_dir.exists()


def test_a_self_fenced_attempt_hands_its_checkpoint_in_when_the_coordinator_answers_again(live_server, tmp_path,
                                                                                          uploads):
    import threading

    from cis490fleet import jobs
    from cis490fleet.result_outbox import Outbox
    from conftest import closed_port_url

    srv = live_server(manifest_toml(1, heartbeat_s=0.2, stale_after_s=1), sweep_interval=0.1)
    client = Client(srv.url, host_id="ws1", retries=1, backoff_s=0.01)
    run = TrainerRun(client.claim({}), Slot(0, ""), tmp_path / "ws1", time.time())
    cut_off = Client(closed_port_url(), host_id="ws1", retries=1, backoff_s=0.01)
    sync = CheckpointSync(cut_off, run, time.time(), uploads)
    sync.environment()
    save(sync.dir, 4)  # what the trainer saved when its worker stopped it
    pending = tmp_path / "pending"
    kept = sync.hand_over({"epoch": 4, "checkpoint": "state.json"}, keep_in=pending)
    assert kept["checkpoint_epoch"] == 4 and os.path.isfile(kept["checkpoint"])
    assert Outbox(cut_off, pending, threading.Event()).report_failure(
        run, "stopped by its worker", jobs.CLASS_FENCED, kept) == "pending"

    wait_for("the stale sweep", lambda: client.job(run.job_id)["job"]["status"] == "pending", timeout=30)
    Outbox(client, pending, threading.Event()).flush_pending()  # the coordinator answers again
    assert newest(client, run.job_id) == [(1, 4)]
    assert list(pending.iterdir()) == [], "the record and its checkpoint stayed behind"
    again = Client(srv.url, host_id="ws2").claim({})
    assert again["resume"]["epoch"] == 4 and again["resume"]["attempt"] == 1
