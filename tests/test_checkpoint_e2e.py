"""Checkpoints end to end: a real `serve`, real `work` processes, real signals, real trainers.

A worker killed with SIGKILL mid-training: the next attempt, on the other host, resumes
from the checkpoint the first one uploaded, and the model it delivers is byte for byte
the one an uninterrupted run makes. SIGTERM and cancel keep the checkpoint; a tampered
one is refused and training starts over.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import tarfile
import textwrap

import pytest

import test_e2e
from conftest import OPERATOR_TOKEN, clean_env, wait_for
from test_e2e import held_by, job_named, jobs_by_name, jobs_cli, manifest

from cis490fleet import bundle
from cis490fleet.client import Client

ROOT = test_e2e.ROOT
workers = test_e2e.workers  # the e2e worker-process fixture
pytestmark = pytest.mark.skipif(os.name == "nt", reason="uses POSIX signals")
HAS_TORCH = importlib.util.find_spec("torch") is not None


def resumable(steps: int, sleep: float, every_s: float = 0) -> str:
    return manifest(f"""
        [[jobs]]
        name = "ckpt"
        model = "mlp"
        mode = "ckpt"
        hyper = {{ steps = {steps}, sleep = {sleep} }}
        checkpoint_every_s = {every_s}
    """, trainer="resumable.py")


def checkpoint_at(client: Client, attempt: int, least: int = 1):
    """The checkpoint ``attempt`` recorded, once its epoch is at least ``least``."""
    def found():
        for c in job_named(client, "ckpt")["checkpoints"]:
            if c["attempt"] == attempt and (c["epoch"] or 0) >= least:
                return c
        return None
    return found


def attempt_log(worker, job_id: str, attempt: int) -> str:
    return (worker.work_dir / job_id / f"attempt-{attempt}" / "train.log").read_text(errors="replace")


def expected_state(steps: int, seed: str = "0") -> str:
    import hashlib

    state = hashlib.sha256(seed.encode()).hexdigest()
    for step in range(1, steps + 1):
        state = hashlib.sha256(f"{state}:{step}".encode()).hexdigest()
    return state


def result_of(client: Client, job: dict, tmp_path) -> dict:
    dest = client.download_artifact(job["artifact_id"], tmp_path / "result.bundle")
    out = bundle.extract_bundle(dest, tmp_path / "result")
    return json.loads((out / "result.json").read_text())


@pytest.mark.skipif(not HAS_TORCH, reason="torch is not installed")
def test_kill_9_mid_training_resumes_on_the_other_host_to_the_bit_identical_model(serve_process, workers, tmp_path):
    hyper = {"epochs": 80, "hidden": 8, "batch_size": 4}
    text = textwrap.dedent(f"""
        [fleet]
        heartbeat_s = 0.5
        stale_after_s = 3
        checkpoint_every_s = 0
        [[jobs]]
        name = "ckpt"
        model = "mlp"
        mode = "resume"
        hyper = {json.dumps(hyper).replace(":", " =").replace('"', "")}
    """)
    server = serve_process(manifest=text)
    client = Client(server.url)
    a = workers(server.url, "host-a")
    wait_for("host-a to upload a checkpoint", checkpoint_at(client, 1), timeout=180)
    job_id = jobs_by_name(client)["ckpt"]["id"]
    trainer = a.trainer_pid(job_id)
    a.proc.send_signal(signal.SIGKILL)  # the host dies, its trainer with it
    os.killpg(trainer, signal.SIGKILL)
    a.wait()

    b = workers(server.url, "host-b", "--once")
    assert b.wait(timeout=240) == 0, b.log_text()
    job = job_named(client, "ckpt")
    assert job["status"] == "completed" and [t["host"] for t in job["attempts"]] == ["host-a", "host-b"], job
    log = attempt_log(b, job_id, 2)
    assert "resuming from the checkpoint" in log, log
    done = int(log.split(" of 80 epochs")[0].rsplit(" ", 1)[1])
    assert 1 <= done < 80, "training ended before the kill; make it longer"
    assert f"epoch {done}/80" not in log and f"epoch {done + 1}/80" in log and "epoch 80/80" in log

    # The same job trained in one go, outside the fleet.
    whole = tmp_path / "whole"
    env = clean_env()
    env.update(PYTHONPATH=str(ROOT), CUDA_VISIBLE_DEVICES="")
    done = subprocess.run([sys.executable, "-m", "cis490fleet", "train", "--model", "mlp", "--mode", "resume",
                           "--hyper", json.dumps(hyper), "--seed", "0", "--split-recipe", "default",
                           "--out", str(whole)], env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    _, sha, _ = bundle.make_bundle(whole, tmp_path / "whole-bundle")
    assert job["artifact_id"] == sha, "the resumed model differs from an uninterrupted run's"
    # Completion pruned the checkpoints to the last one.
    assert len(job["checkpoints"]) == 1, job["checkpoints"]


def test_sigterm_of_the_worker_hands_in_the_checkpoint_and_the_next_attempt_resumes(serve_process, workers,
                                                                                    tmp_path):
    server = serve_process(manifest=resumable(steps=40, sleep=0.1))
    client = Client(server.url)
    a = workers(server.url, "host-a")
    wait_for("a first checkpoint", checkpoint_at(client, 1, least=3), timeout=60)
    a.proc.send_signal(signal.SIGTERM)
    assert a.wait() == 0
    job_id = jobs_by_name(client)["ckpt"]["id"]
    stopped = attempt_log(a, job_id, 1)
    at = int(stopped.split("stopped at step ")[1].split()[0])
    saved = checkpoint_at(client, 1)()
    assert saved["epoch"] == at, (saved, stopped)  # what the trainer saved on SIGTERM, not an older one
    assert job_named(client, "ckpt")["status"] == "pending"

    b = workers(server.url, "host-b", "--once")
    assert b.wait(timeout=90) == 0
    job = job_named(client, "ckpt")
    assert job["status"] == "completed", job
    assert f"resumed at step {at}" in attempt_log(b, job_id, 2)
    assert result_of(client, job, tmp_path) == {"steps": 40, "state": expected_state(40)}


def test_a_cancelled_job_keeps_its_checkpoint_for_a_requeue(serve_process, workers, tmp_path):
    server = serve_process(manifest=resumable(steps=40, sleep=0.1))
    client = Client(server.url, operator_token=OPERATOR_TOKEN)
    a = workers(server.url, "host-a")
    wait_for("a first checkpoint", checkpoint_at(client, 1, least=2), timeout=60)
    job_id = jobs_by_name(client)["ckpt"]["id"]
    client.cancel(job_id)
    wait_for("the trainer to stop", lambda: "stopped at step" in attempt_log(a, job_id, 1), timeout=30)
    at = int(attempt_log(a, job_id, 1).split("stopped at step ")[1].split()[0])
    wait_for("the cancel's checkpoint", checkpoint_at(client, 1, least=at), timeout=30)
    shown = jobs_cli(server.url, "show", job_id[:12])
    assert shown.returncode == 0 and f"epoch {at}" in shown.stdout, shown.stdout + shown.stderr

    client.requeue(job_id)
    wait_for("the requeued job to complete", lambda: job_named(client, "ckpt")["status"] == "completed", timeout=90)
    assert f"resumed at step {at}" in attempt_log(a, job_id, 2)
    assert result_of(client, job_named(client, "ckpt"), tmp_path) == {"steps": 40, "state": expected_state(40)}


def test_a_tampered_checkpoint_is_refused_and_training_starts_over(serve_process, workers, tmp_path):
    server = serve_process(manifest=resumable(steps=30, sleep=0.1))
    client = Client(server.url)
    a = workers(server.url, "host-a")
    saved = wait_for("a checkpoint", checkpoint_at(client, 1, least=2), timeout=60)
    job_id = jobs_by_name(client)["ckpt"]["id"]
    trainer = a.trainer_pid(job_id)
    a.proc.send_signal(signal.SIGKILL)
    os.killpg(trainer, signal.SIGKILL)
    a.wait()
    # Once the job is stale no upload of host-a's can be recorded any more: the newest checkpoint is final.
    wait_for("the job to go stale", lambda: job_named(client, "ckpt")["status"] == "pending", timeout=30)
    # Someone changes the stored checkpoint: it no longer matches the sha256 it is recorded under.
    saved = checkpoint_at(client, 1)()
    stored = next(server.data_dir.glob(f"checkpoints/*/{saved['sha256']}/bundle.tar*"))
    forged = tmp_path / "forged"
    forged.mkdir()
    (forged / "state.json").write_text(json.dumps({"step": 29, "state": "forged"}))
    with tarfile.open(stored, "w") as tar:  # a well-formed bundle, other bytes
        tar.add(forged / "state.json", arcname="state.json")

    b = workers(server.url, "host-b", "--once")
    assert b.wait(timeout=90) == 0
    assert "not resuming from the checkpoint of attempt 1" in b.log_text() and "sha256" in b.log_text()
    assert "resumed at step" not in attempt_log(b, job_id, 2)
    job = job_named(client, "ckpt")
    assert job["status"] == "completed"
    assert result_of(client, job, tmp_path) == {"steps": 30, "state": expected_state(30)}


@pytest.mark.parametrize("limit,hyper,outcome", [
    ("max_runtime_s = 2", "steps = 100, sleep = 0.1", "ran past its time limit of 2 s"),
    ("stall_after_s = 1.5", "steps = 100, sleep = 0.1, stall_at = 5", "stalled: no progress for 1.5 s"),
])
def test_a_time_limit_or_a_stall_keeps_what_the_trainer_saved_when_stopped(serve_process, workers, limit, hyper,
                                                                          outcome):
    server = serve_process(manifest=manifest(f"""
        [[jobs]]
        name = "ckpt"
        model = "mlp"
        mode = "limited"
        hyper = {{ {hyper} }}
        {limit}
    """, trainer="resumable.py", max_attempts=1))
    client = Client(server.url)
    a = workers(server.url, "host-a", "--once")
    assert a.wait(timeout=90) == 0
    job = job_named(client, "ckpt")
    assert job["status"] == "failed" and outcome in job["attempts"][0]["error"], job["attempts"]
    stopped = attempt_log(a, job["id"], 1)
    at = int(stopped.split("stopped at step ")[1].split()[0])
    assert at >= 1 and [(c["attempt"], c["epoch"]) for c in job["checkpoints"]] == [(1, at)], job["checkpoints"]
