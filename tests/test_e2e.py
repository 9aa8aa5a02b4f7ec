"""End to end: a real `serve` and real `work` processes on loopback, with real signals.

The fixture trainers (tests/trainers/) keep these fast; heartbeats and the stale
window are shortened in each test's manifest. One test runs the built-in torch
trainer, one runs the Quickstart demo script.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import OPERATOR_TOKEN, clean_env, host_key_for, wait_for
from test_worker import fake_nvidia_smi, pid_alive, trainer_manifest

from cis490fleet.client import Client

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(os.name == "nt", reason="uses POSIX signals")


def manifest(jobs: str, *, trainer: str = "slow.py", heartbeat_s: float = 0.5, stale_after_s: float = 2.0,
             max_attempts: int = 3) -> str:
    return trainer_manifest(trainer, jobs, heartbeat_s=heartbeat_s, stale_after_s=stale_after_s,
                            max_attempts=max_attempts)


def slow_job(name: str = "slow", steps: int = 60, sleep: float = 0.1) -> str:
    return f"""
        [[jobs]]
        name = "{name}"
        model = "mlp"
        mode = "{name}"
        hyper = {{ steps = {steps}, sleep = {sleep} }}
    """


class WorkerProcess:
    """A `cis490fleet work` subprocess with its own work folder and log."""

    def __init__(self, tmp_path: Path, url: str, host: str, *args: str, path_env: str):
        self.host = host
        self.work_dir = tmp_path / f"work-{host}"
        self.log_path = tmp_path / f"worker-{host}.log"
        key_file = tmp_path / f"{host}.key"
        key_file.write_text(host_key_for(url, host).hex() + "\n")
        argv = [sys.executable, "-m", "cis490fleet", "work", "--receiver", url, "--host-id", host,
                "--host-key-file", str(key_file), "--work-dir", str(self.work_dir), *args]
        env = clean_env()
        env.update(PATH=path_env, PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT))
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def trainer_pid(self, job_id: str, timeout: float = 30) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for pid_file in self.work_dir.glob(f"{job_id}/attempt-*/trainer.pid"):
                text = pid_file.read_text().strip()
                if text:
                    return int(text)
            time.sleep(0.05)
        raise AssertionError(f"no trainer of job {job_id[:12]} on {self.host}:\n{self.log_text()}")

    def wait(self, timeout: float = 60) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"worker {self.host} did not exit:\n{self.log_text()}") from None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)


@pytest.fixture
def workers(tmp_path):
    """Factory ``start(url, host, *args) -> WorkerProcess``; every worker and trainer left is killed at teardown."""
    path_env = fake_nvidia_smi(tmp_path, [])
    started: list[WorkerProcess] = []

    def start(url: str, host: str, *args: str) -> WorkerProcess:
        w = WorkerProcess(tmp_path, url, host, "--wait", "1", "--grace", "3", *args, path_env=path_env)
        started.append(w)
        return w

    yield start
    for w in started:
        w.kill()
        for pid_file in w.work_dir.glob("*/attempt-*/trainer.pid"):
            try:
                os.killpg(int(pid_file.read_text()), signal.SIGKILL)
            except (OSError, ValueError):
                pass




def jobs_by_name(client: Client) -> dict[str, dict]:
    return {j["name"]: j for j in client.jobs()["jobs"]}


def job_named(client: Client, name: str) -> dict:
    return client.job(jobs_by_name(client)[name]["id"])["job"]


def held_by(client: Client, name: str, host: str) -> dict | None:
    job = jobs_by_name(client)[name]
    return job if job["status"] == "running" and job.get("host") == host else None


def jobs_cli(url: str, *args: str) -> subprocess.CompletedProcess:
    env = clean_env()
    env.update(PYTHONPATH=str(ROOT), CIS490_OPERATOR_TOKEN=OPERATOR_TOKEN)
    return subprocess.run([sys.executable, "-m", "cis490fleet", "jobs", "--receiver", url, *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=60)


def test_two_workers_train_every_eligible_job_and_leave_the_cuda_ones_pending(serve_process, workers, tmp_path):
    jobs = "".join(f"""
        [[jobs]]
        name = "cpu-{i}"
        model = "{'mlp' if i % 2 else 'logreg'}"
        mode = "m{i}"
        hyper = {{ steps = {2 + i}, sleep = 0.05 }}
        {'allowed_hosts = ["e2e-b"]' if i == 0 else ''}
        {'after = ["cpu-0"]' if i == 5 else ''}
        {'prefer_cuda = true' if i == 3 else ''}
    """ for i in range(6)) + "".join(f"""
        [[jobs]]
        name = "gpu-{i}"
        model = "mlp"
        mode = "gpu{i}"
        require_cuda = true
        {'min_vram_gib = 24' if i else ''}
    """ for i in range(2))
    server = serve_process(manifest=manifest(jobs))
    a = workers(server.url, "e2e-a", "--once")
    b = workers(server.url, "e2e-b", "--once")
    assert a.wait() == 0 and b.wait() == 0

    client = Client(server.url)
    by_name = jobs_by_name(client)
    assert len(by_name) == 8
    for i in range(6):
        job = client.job(by_name[f"cpu-{i}"]["id"])["job"]
        assert job["status"] == "completed", (job, a.log_text(), b.log_text())
        dest = client.download_artifact(job["artifact_id"], tmp_path / f"cpu-{i}.bundle")  # verifies the sha256
        assert dest.stat().st_size > 0
    assert job_named(client, "cpu-0")["host"] == "e2e-b"
    assert {by_name[f"cpu-{i}"]["host"] for i in range(6)} == {"e2e-a", "e2e-b"}
    for i in range(2):
        job = client.job(by_name[f"gpu-{i}"]["id"])["job"]
        assert job["status"] == "pending"
        reasons = " ".join(job["why_pending"])
        assert "CUDA" in reasons and "e2e-a" in reasons and "e2e-b" in reasons, reasons
    shown = jobs_cli(server.url, "show", by_name["gpu-0"]["id"][:12])
    assert shown.returncode == 0 and "CUDA" in shown.stdout, shown.stdout + shown.stderr


def test_a_killed_worker_s_job_is_recovered_by_another_after_the_stale_window(serve_process, workers):
    server = serve_process(manifest=manifest(slow_job(steps=30, sleep=0.1)))
    client = Client(server.url)
    a = workers(server.url, "e2e-a")
    wait_for("the job to run on e2e-a", lambda: held_by(client, "slow", "e2e-a"))
    job_id = jobs_by_name(client)["slow"]["id"]
    orphan = a.trainer_pid(job_id)
    a.proc.send_signal(signal.SIGKILL)
    a.wait()
    os.killpg(orphan, signal.SIGKILL)  # a dead host's trainer dies with it

    b = workers(server.url, "e2e-b", "--once")
    assert b.wait(timeout=90) == 0
    job = job_named(client, "slow")
    assert job["status"] == "completed" and job["host"] == "e2e-b", (job, b.log_text())
    hosts = [att["host"] for att in job["attempts"]]
    assert hosts == ["e2e-a", "e2e-b"], job["attempts"]


def test_sigterm_releases_the_job_without_using_an_attempt(serve_process, workers):
    server = serve_process(manifest=manifest(slow_job(steps=40, sleep=0.1), max_attempts=1))
    client = Client(server.url)
    a = workers(server.url, "e2e-a")
    wait_for("the job to run on e2e-a", lambda: held_by(client, "slow", "e2e-a"))
    # Heartbeats carry the trainer's latest progress line and the tail of its log.
    detail = wait_for("progress in the job detail",
                      lambda: (d := job_named(client, "slow")).get("progress") and "step" in (d.get("log_tail") or "")
                      and d)
    assert detail["progress"]["epochs"] == 40 and detail["progress"]["epoch"] >= 1
    pid = a.trainer_pid(jobs_by_name(client)["slow"]["id"])
    a.proc.send_signal(signal.SIGTERM)
    assert a.wait(timeout=30) == 0
    assert not pid_alive(pid)
    assert "released" in a.log_text()
    assert jobs_by_name(client)["slow"]["status"] == "pending"

    b = workers(server.url, "e2e-b", "--once")
    assert b.wait(timeout=90) == 0
    job = job_named(client, "slow")
    # max_attempts = 1: had the release used up the attempt, the job could not have run again.
    assert job["status"] == "completed" and job["host"] == "e2e-b", (job, b.log_text())


def test_cancel_stops_the_running_trainer_within_the_grace_period(serve_process, workers):
    server = serve_process(manifest=manifest(slow_job(), trainer="hang.py"))
    client = Client(server.url)
    a = workers(server.url, "e2e-a")
    wait_for("the job to run", lambda: held_by(client, "slow", "e2e-a"))
    job_id = jobs_by_name(client)["slow"]["id"]
    pid = a.trainer_pid(job_id)
    done = jobs_cli(server.url, "cancel", job_id[:12])
    assert done.returncode == 0, done.stderr
    wait_for("the trainer to be gone", lambda: not pid_alive(pid), timeout=30)
    assert jobs_by_name(client)["slow"]["status"] == "cancelled"
    assert a.proc.poll() is None, "the worker itself keeps running"
    assert "cancelled by an operator" in a.log_text()


def test_a_crashing_trainer_fails_the_job_with_its_stderr_in_the_detail(serve_process, workers):
    server = serve_process(manifest=manifest(slow_job(name="crashy"), trainer="crash.py", max_attempts=2))
    w = workers(server.url, "e2e-a", "--once")
    assert w.wait() == 0
    client = Client(server.url)
    job = job_named(client, "crashy")
    assert job["status"] == "failed", job
    assert "exit code 3" in job["last_error"] and "boom: simulated trainer crash" in job["last_error"]
    assert len(job["attempts"]) == 1  # the trainer's own failure is final: the manifest grants no retries
    shown = jobs_cli(server.url, "show", job["id"])
    assert "boom: simulated trainer crash" in shown.stdout, shown.stdout


def test_a_worker_presumed_dead_stops_its_trainer_when_it_comes_back(serve_process, workers):
    server = serve_process(manifest=manifest(slow_job(), trainer="hang.py"))
    client = Client(server.url)
    a = workers(server.url, "e2e-a")
    wait_for("the job to run on e2e-a", lambda: held_by(client, "slow", "e2e-a"))
    pid = a.trainer_pid(jobs_by_name(client)["slow"]["id"])
    a.proc.send_signal(signal.SIGSTOP)  # frozen: no heartbeats, but its trainer keeps running
    try:
        workers(server.url, "e2e-b")
        wait_for("e2e-b to take the job over", lambda: held_by(client, "slow", "e2e-b"), timeout=60)
    finally:
        a.proc.send_signal(signal.SIGCONT)
    wait_for("e2e-a's trainer to stop", lambda: not pid_alive(pid), timeout=30)
    assert "not held by this caller" in a.log_text(), a.log_text()
    assert held_by(client, "slow", "e2e-b"), "the job stays with its new holder"
    assert a.proc.poll() is None, "the worker itself carries on"


def test_a_coordinator_restart_during_training_loses_nothing(serve_process, workers):
    text = manifest(slow_job(steps=25, sleep=0.1), heartbeat_s=0.5, stale_after_s=30)
    server = serve_process(manifest=text)
    client = Client(server.url)
    a = workers(server.url, "e2e-a", "--once")
    wait_for("the job to run", lambda: held_by(client, "slow", "e2e-a"))
    assert server.stop() == 0
    time.sleep(1.0)  # heartbeats meet a closed port meanwhile
    again = serve_process(data_dir=server.data_dir, manifest=text, args=("--bind", f"127.0.0.1:{server.port}"))
    assert again.url == server.url
    assert a.wait(timeout=120) == 0
    job = job_named(Client(again.url), "slow")
    assert job["status"] == "completed" and len(job["attempts"]) == 1, (job, a.log_text())


@pytest.mark.torch
def test_the_built_in_torch_trainer_end_to_end(serve_process, workers, tmp_path):
    pytest.importorskip("torch")
    text = textwrap.dedent("""
        [fleet]
        heartbeat_s = 1
        stale_after_s = 30
        [[jobs]]
        name = "tiny"
        model = "logreg"
        mode = "baseline"
        hyper = { lr = 0.1, epochs = 2 }
    """)
    server = serve_process(manifest=text)
    w = workers(server.url, "e2e-a", "--once")
    assert w.wait(timeout=240) == 0
    client = Client(server.url)
    job = job_named(client, "tiny")
    assert job["status"] == "completed", (job, w.log_text())
    from cis490fleet import bundle

    path = client.download_artifact(job["artifact_id"], tmp_path / "tiny.bundle")
    out = bundle.extract_bundle(path, tmp_path / "tiny")
    assert (out / "model.pt").stat().st_size > 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert [h["epoch"] for h in metrics["history"]] == [1, 2]
    assert job["attempts"][0]["host"] == "e2e-a"


def test_the_quickstart_demo(tmp_path):
    pytest.importorskip("torch")
    env = clean_env()
    env["PATH"] = fake_nvidia_smi(tmp_path, [])
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "demo.py"), "--run-dir", str(tmp_path / "run"),
                           "--pyz", str(tmp_path / "demo.pyz"), "--timeout", "240"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "jobs status" in proc.stdout
    assert "demo: killed worker" in proc.stdout and "mlp-resume was resumed by" in proc.stdout, proc.stdout
    models = tmp_path / "run" / "models"
    assert sorted(p.name for p in models.iterdir()) == ["gbt-small", "iris-logreg", "logreg-base", "logreg-l2",
                                                        "mlp-finetune", "mlp-holdout", "mlp-resume", "mlp-small",
                                                        "mlp-wide"], proc.stdout
    assert len(list(models.glob("*/*/model.pt"))) == 9, proc.stdout
    assert "train=120 val=30" in next(models.glob("iris-logreg/*/train.log")).read_text()
    results = proc.stdout.split("demo: results, best first (jobs results):", 1)[1].splitlines()
    assert results[1].split()[:2] == ["NAME", "ID"] and "VAL_LOSS (min)" in results[1], proc.stdout
    assert sorted(line.split()[0] for line in results[2:11]) == sorted(p.name for p in models.iterdir())


def processes_mentioning(text: str) -> list[str]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
            stat = (cmdline.parent / "stat").read_text()
        except OSError:
            continue
        if text in argv and stat.split(")")[-1].split()[0] != "Z":
            found.append(argv)
    return found


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="finds leftover processes through /proc")
def test_ctrl_c_stops_everything_the_demo_started(tmp_path):
    run_dir = tmp_path / "run"
    env = clean_env()
    env["PATH"] = fake_nvidia_smi(tmp_path, [])
    env["PYTHONUNBUFFERED"] = "1"
    log = tmp_path / "demo.log"
    with open(log, "wb") as out:
        demo = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "demo.py"), "--run-dir", str(run_dir),
                                 "--pyz", str(tmp_path / "demo.pyz")], cwd=ROOT, env=env, stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        wait_for("the demo's workers", lambda: "workers demo-a and demo-b started" in log.read_text(), timeout=120)
        wait_for("a trainer", lambda: list(run_dir.glob("work-*/*/attempt-*/trainer.pid")), timeout=60)
        demo.send_signal(signal.SIGINT)
        assert demo.wait(timeout=60) == 130, log.read_text()
    finally:
        if demo.poll() is None:
            demo.kill()
    assert "stopping everything it started" in log.read_text()
    assert processes_mentioning(str(run_dir)) == []


def test_sighup_detects_capability_again(serve_process, workers, tmp_path):
    """A re-detection updates what the host offers; a GPU that appeared after start is not offered to CUDA work."""
    server = serve_process(manifest=manifest("""
        [[jobs]]
        name = "big-gpu"
        model = "mlp"
        mode = "gpu"
        require_cuda = true
        min_vram_gib = 20
        hyper = { steps = 2, sleep = 0.05 }
    """))
    fake_nvidia_smi(tmp_path, [(0, "Small GPU", 8192)])
    w = workers(server.url, "e2e-hup")
    client = Client(server.url)

    def capability() -> dict | None:
        for worker in client.workers()["workers"]:
            if worker["host"] == "e2e-hup":
                return worker["capability"]
        return None

    wait_for("the worker to register", lambda: capability() is not None, timeout=30)
    assert capability()["vram_gib"] == pytest.approx(8.0)
    time.sleep(1.5)  # several long-poll rounds: 8 GiB must leave the 20 GiB job alone
    assert jobs_by_name(client)["big-gpu"]["status"] == "pending"

    fake_nvidia_smi(tmp_path, [(0, "Big GPU", 24576), (1, "New GPU", 81920)])
    w.proc.send_signal(signal.SIGHUP)
    wait_for("the 20 GiB job to complete", lambda: jobs_by_name(client)["big-gpu"]["status"] == "completed", timeout=30)
    cap = capability()
    assert [g["name"] for g in cap["gpus"]] == ["Big GPU"] and cap["vram_gib"] == pytest.approx(24.0)
    assert "SIGHUP: detecting capability again" in w.log_text()
    assert "GPUs changed since start (planned ['0'], now ['0', '1'])" in w.log_text()
