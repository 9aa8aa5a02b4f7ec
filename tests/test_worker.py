"""The worker daemon: its config, the trainer process it manages, and single steps against a real coordinator."""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from cis490fleet import errors, slots, trainer_process, worker, worker_config, worker_view
from cis490fleet.slots import Slot
from cis490fleet.trainer_process import TrainerRun
from cis490fleet.worker_config import WorkerConfig
from conftest import alias, clean_env, host_key_for

ROOT = Path(__file__).resolve().parent.parent
JOB_ID = "ab" * 32


def args(**kw) -> argparse.Namespace:
    ns = worker_config.parse_args([])
    for k, v in kw.items():
        setattr(ns, k, v)
    return ns


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


# -- config --------------------------------------------------------------------------------


def test_flags_override_the_config_file(tmp_path):
    cfg = write(tmp_path / "worker.toml", """
        receiver = ["http://127.0.0.1:1", "http://127.0.0.1:2"]
        host_id = "ws1"
        work_dir = "work"
        slots = 2
        grace_s = 7
        [capability]
        cuda = false
    """)
    c = worker_config.build_config(args(config=str(cfg)), {})
    assert c.receivers == ("http://127.0.0.1:1", "http://127.0.0.1:2")
    assert (c.host_id, c.slots, c.grace_s, c.wait_s) == ("ws1", 2, 7.0, 20.0)
    assert c.capability == {"cuda": False}
    c = worker_config.build_config(args(config=str(cfg), receiver=["http://10.0.0.9:8445/"], host_id="ws2", slots=3,
                                 grace=1.5, wait=0.5, work_dir=str(tmp_path / "w")), {})
    assert c.receivers == ("http://10.0.0.9:8445",)
    assert (c.host_id, c.slots, c.grace_s, c.wait_s, c.work_dir) == ("ws2", 3, 1.5, 0.5, tmp_path / "w")


def test_receiver_from_the_environment_beats_the_file(tmp_path):
    cfg = write(tmp_path / "worker.toml", 'receiver = "http://a:1"\nhost_id = "h"\n')
    c = worker_config.build_config(args(config=str(cfg)), {"CIS490_RECEIVER": "http://b:2, http://c:3"})
    assert c.receivers == ("http://b:2", "http://c:3")


@pytest.mark.parametrize("text, flags, needle", [
    ('recever = "http://a:1"\n', {}, "did you mean 'receiver'?"),
    ('receiver = "ftp://a"\n', {}, "is not an http:// or https:// URL"),
    ("receiver = 3\n", {}, "expected a URL or a list of URLs"),
    ('receiver = "http://a:1"\nslots = 0\n', {}, "slots: expected an integer >= 1, got 0"),
    ('receiver = "http://a:1"\ngrace_s = "soon"\n', {}, "grace_s: expected a number >= 0"),
    ('receiver = "http://a:1"\nhost_id = "bad host"\n', {}, "host id 'bad host' is not valid"),
    ('receiver = "http://a:1"\ncert = "CERT"\n', {}, "cert file CERT does not exist"),
    ('receiver = "http://a:1"\ncapability = 1\n', {}, "expected a table"),
    ("receiver = [\n", {}, "not valid TOML"),
    ('host_id = "h"\n', {}, "no coordinator URL: pass --receiver URL, set CIS490_RECEIVER"),
    ('receiver = "http://a:1"\n', {"slots": -1}, "--slots: expected an integer >= 1, got -1"),
])
def test_bad_config_names_what_is_wrong(tmp_path, text, flags, needle):
    cfg = write(tmp_path / "worker.toml", text)
    with pytest.raises(errors.ConfigError) as info:
        worker_config.build_config(args(config=str(cfg), **flags), {})
    assert needle in str(info.value)
    assert "\n" not in str(info.value)


def test_config_file_that_is_not_utf8_is_named(tmp_path):
    cfg = tmp_path / "worker.toml"
    cfg.write_bytes(b'receiver = "http://a:1"\nhost_id = "\xff"\n')
    with pytest.raises(errors.ConfigError, match=r"worker.toml: not UTF-8 text \(bad byte at offset 35\)"):
        worker_config.build_config(args(config=str(cfg)), {})


def test_missing_config_file(tmp_path):
    with pytest.raises(errors.ConfigError, match="no such file"):
        worker_config.build_config(args(config=str(tmp_path / "nope.toml")), {})


def test_example_config_parses(tmp_path):
    data = worker_config.read_config_file(ROOT / "etc" / "worker.toml.example")
    assert data["receiver"] and data["host_id"]


def test_bad_flag_is_one_line_and_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "cis490fleet", "work", "--receiver", "ftp://nowhere",
                           "--work-dir", str(tmp_path)], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "CIS490_RECEIVER": ""})
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "not an http:// or https:// URL" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


# -- small pure helpers --------------------------------------------------------------------


def test_fill_command_replaces_known_placeholders_only():
    argv = trainer_process.fill_command(["{python}", "-c", "{not_one}", "--hyper={hyper}", "{out}/x"],
                               {"python": "py", "hyper": '{"lr":0.1}', "out": "/o", "model": "m", "mode": "a",
                                "seed": "1", "split_recipe": "d", "train_hosts": "[]"})
    assert argv == ["py", "-c", "{not_one}", '--hyper={"lr":0.1}', "/o/x"]


def test_plan_slots_one_per_gpu_else_one():
    cpu = {"cuda": False, "gpus": []}
    two = {"cuda": True, "gpus": [{"index": 0}, {"index": 3}]}
    assert slots.plan_slots(cpu, None) == [Slot(0, "")]
    assert slots.plan_slots(cpu, 2) == [Slot(0, ""), Slot(1, "")]
    assert slots.plan_slots(two, None) == [Slot(0, "0"), Slot(1, "3")]
    assert slots.plan_slots(two, 3) == [Slot(0, "0"), Slot(1, "3"), Slot(2, "0")]
    assert slots.plan_slots({"cuda": False, "gpus": [{"index": 0}]}, None) == [Slot(0, "")]


def test_signal_name():
    assert trainer_process.signal_name(3) == "exit code 3"
    assert trainer_process.signal_name(-9) == "killed by SIGKILL"


def test_progress_reads_the_last_complete_json_line(tmp_path):
    p = tmp_path / "progress.jsonl"
    assert trainer_process.read_progress(p) is None
    p.write_text('{"epoch": 1, "fraction": 0.25}\n{"epoch": 2, "fraction": 0.5, "loss": 0.5}\n{"epo')
    got = trainer_process.read_progress(p)
    assert got == {"epoch": 2, "fraction": 0.5, "loss": 0.5}


# -- the trainer process -------------------------------------------------------------------


def claim_for(tmp_path: Path, script: str, *, hyper: dict | None = None, heartbeat_s: float = 0.2) -> dict:
    path = write(tmp_path / "trainer.py", script)
    return {"job_id": JOB_ID, "lease": "L1", "attempt": 2, "heartbeat_s": heartbeat_s,
            "job": {"model": "mlp", "mode": "fast", "hyper": hyper or {"lr": 0.1}, "seed": 7,
                    "split_recipe": "default", "train_hosts": ["a", "b"]},
            "trainer": {"command": ["{python}", str(path), "--model", "{model}", "--hyper", "{hyper}",
                                    "--seed", "{seed}", "--hosts", "{train_hosts}", "--out", "{out}"]}}


def wait_exit(run: TrainerRun, limit: float = 30.0) -> int:
    deadline = time.monotonic() + limit
    while (code := run.poll()) is None:
        assert time.monotonic() < deadline, "trainer did not exit"
        time.sleep(0.05)
    return code


def test_trainer_gets_its_arguments_environment_and_log(tmp_path):
    claim = claim_for(tmp_path, """
        import json, os, sys
        out = sys.argv[sys.argv.index("--out") + 1]
        env = {k: os.environ.get(k) for k in ("CIS490_JOB_ID", "CIS490_ATTEMPT", "CIS490_OUT",
                                              "CIS490_PROGRESS", "CUDA_VISIBLE_DEVICES")}
        json.dump({"argv": sys.argv[1:], "env": env}, open(os.path.join(out, "seen.json"), "w"))
        with open(os.environ["CIS490_PROGRESS"], "a") as f:
            f.write(json.dumps({"epoch": 1, "epochs": 1, "fraction": 1.0, "loss": 0.25}) + "\\n")
        print("to stdout")
        print("to stderr", file=sys.stderr)
    """)
    run = TrainerRun(claim, Slot(1, "3"), tmp_path / "work", now=0.0)
    run.spawn()
    assert wait_exit(run) == 0
    seen = json.loads((run.out / "seen.json").read_text())
    assert seen["argv"] == ["--model", "mlp", "--hyper", '{"lr":0.1}', "--seed", "7", "--hosts", '["a", "b"]',
                            "--out", str(run.out)]
    assert seen["env"] == {"CIS490_JOB_ID": JOB_ID, "CIS490_ATTEMPT": "2", "CIS490_OUT": str(run.out),
                           "CIS490_PROGRESS": str(run.progress_path), "CUDA_VISIBLE_DEVICES": "3"}
    assert run.dir == tmp_path / "work" / JOB_ID / "attempt-2"
    assert run.stderr_tail() == "to stderr\n"
    assert "to stdout" in run.log_tail() and "to stderr" in run.log_tail()
    assert run.progress()["loss"] == 0.25



def test_progress_view_redraws_its_lines_in_place_in_the_shared_format(tmp_path):
    import io

    run = TrainerRun(claim_for(tmp_path, ""), Slot(0, ""), tmp_path / "work", now=100.0)
    run.dir.mkdir(parents=True)
    run.progress_path.write_text(json.dumps({"epoch": 3, "epochs": 10, "loss": 0.41234, "fraction": 0.42}) + "\n")
    screen = io.StringIO()
    view = worker_view.ProgressView(screen)
    view.draw([run], now=158.0)
    first = screen.getvalue()
    full = f"slot 0 {run.label} [########............] epoch 3/10 loss 0.4123 42% ETA 1m20s"
    # Cut to the terminal's width (80 when unknown): a wrapped line would not be cleared by the next redraw.
    assert len(full) > 80 and first == full[:79] + "…\n"
    view.draw([run], now=158.0)
    assert screen.getvalue() == first + "\x1b[1A\x1b[2K" + first
    view.close()
    assert screen.getvalue().endswith("\x1b[1A\x1b[2K") and view.shown == []


def test_cpu_slot_hides_gpus(tmp_path):
    claim = claim_for(tmp_path, """
        import os, sys
        sys.exit(0 if os.environ["CUDA_VISIBLE_DEVICES"] == "" else 5)
    """)
    run = TrainerRun(claim, Slot(0, ""), tmp_path / "work", now=0.0)
    run.spawn()
    assert wait_exit(run) == 0


def test_stderr_tail_keeps_the_last_4_kib_of_a_noisy_trainer(tmp_path):
    claim = claim_for(tmp_path, """
        import sys
        for i in range(20000):
            print(f"out line {i}")
            print(f"err line {i}", file=sys.stderr)
        sys.exit(3)
    """)
    run = TrainerRun(claim, Slot(0, ""), tmp_path / "work", now=0.0)
    run.spawn()
    assert wait_exit(run) == 3
    tail = run.stderr_tail()
    assert tail.endswith("err line 19999\n") and "out line" not in tail
    assert len(tail.encode()) <= trainer_process.TAIL_BYTES
    # Both streams land in train.log whole-line, each in its own order, never spliced mid-line
    # (an unbuffered trainer writes a line's text and its newline in two system calls).
    lines = run.log_path.read_text().splitlines()
    assert [x for x in lines if x.startswith("out ")] == [f"out line {i}" for i in range(20000)]
    assert [x for x in lines if x.startswith("err ")] == [f"err line {i}" for i in range(20000)]
    assert len(lines) == 40000


@pytest.mark.skipif(os.name == "nt", reason="process groups via signals are POSIX")
def test_stop_kills_the_whole_process_group_after_the_grace(tmp_path):
    claim = claim_for(tmp_path, """
        import os, signal, subprocess, sys, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        open(os.path.join(os.environ["CIS490_OUT"], "child.pid"), "w").write(str(child.pid))
        time.sleep(600)
    """)
    run = TrainerRun(claim, Slot(0, ""), tmp_path / "work", now=0.0)
    run.spawn()
    pid_file = run.out / "child.pid"
    deadline = time.monotonic() + 30
    while not pid_file.exists() or not pid_file.read_text():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    child = int(pid_file.read_text())
    assert run.stop(grace_s=0.5) == -signal.SIGKILL
    deadline = time.monotonic() + 10
    while pid_alive(child):
        assert time.monotonic() < deadline, "the trainer's child outlived it"
        time.sleep(0.05)


@pytest.mark.skipif(os.name == "nt", reason="signals are POSIX")
def test_stop_sends_sigterm_first(tmp_path):
    claim = claim_for(tmp_path, """
        import os, signal, sys, time
        def bye(*_):
            open(os.path.join(os.environ["CIS490_OUT"], "saved"), "w").write("yes")
            sys.exit(143)
        signal.signal(signal.SIGTERM, bye)
        open(os.path.join(os.environ["CIS490_OUT"], "ready"), "w").close()
        time.sleep(600)
    """)
    run = TrainerRun(claim, Slot(0, ""), tmp_path / "work", now=0.0)
    run.spawn()
    deadline = time.monotonic() + 30
    while not (run.out / "ready").exists():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert run.stop(grace_s=30) == 143
    assert (run.out / "saved").read_text() == "yes"


def test_a_missing_trainer_program_is_a_clear_error(tmp_path):
    claim = claim_for(tmp_path, "")
    claim["trainer"]["command"] = [str(tmp_path / "no-such-trainer")]
    run = TrainerRun(claim, Slot(0, ""), tmp_path / "work", now=0.0)
    with pytest.raises(errors.FleetError, match="cannot start the trainer .*check \\[trainer\\].command"):
        run.spawn()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes: it runs nothing.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs /proc to check a pid's identity")
def test_start_up_kills_trainers_left_by_a_killed_worker(tmp_path):
    claim = claim_for(tmp_path, "import time; time.sleep(600)\n")
    run = TrainerRun(claim, Slot(0, ""), tmp_path / "work", now=0.0)
    run.spawn()
    pid = run.proc.pid
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        # A stale pid file naming an unrelated process must not hurt it.
        other = tmp_path / "work" / ("cd" * 32) / "attempt-1"
        other.mkdir(parents=True)
        (other / "trainer.pid").write_text(str(stranger.pid))
        assert trainer_process.kill_orphans(tmp_path / "work") == 1
        assert run.proc.wait(timeout=10) == -signal.SIGKILL
        assert stranger.poll() is None
        assert not (other / "trainer.pid").exists() and not run.pid_path.exists()
    finally:
        stranger.kill()
        stranger.wait()


# -- single steps against a real coordinator -----------------------------------------------

TRAINERS = ROOT / "tests" / "trainers"


def fake_nvidia_smi(tmp_path: Path, gpus: list[tuple[int, str, int]]) -> str:
    """A real `nvidia-smi` program answering with ``gpus`` (none: a CPU-only host); returns a PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    rows = "".join(f"{i}, {name}, {mib}\n" for i, name, mib in gpus)
    tool = bin_dir / "nvidia-smi"
    tool.write_text(f"#!{sys.executable}\nimport sys\nsys.stdout.write({rows!r})\n")
    tool.chmod(0o755)
    return f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"


def trainer_manifest(trainer: str, jobs: str, *, heartbeat_s: float = 0.5, stale_after_s: float = 2.0,
                     max_attempts: int = 3, extra_fleet: str = "") -> str:
    command = json.dumps(["{python}", str(TRAINERS / trainer), "--model", "{model}", "--mode", "{mode}",
                          "--hyper", "{hyper}", "--seed", "{seed}", "--out", "{out}"])
    return textwrap.dedent(f"""
        [fleet]
        heartbeat_s = {heartbeat_s}
        stale_after_s = {stale_after_s}
        max_attempts = {max_attempts}
        retry_backoff_s = 0.1
        {extra_fleet}
        [trainer]
        command = {command}
    """) + textwrap.dedent(jobs)


ONE_JOB = """
    [[jobs]]
    name = "one"
    model = "mlp"
    mode = "fast"
    hyper = { steps = 40, sleep = 0.1 }
"""


@pytest.fixture
def cpu_host(tmp_path, monkeypatch):
    """Capability detection sees a CPU-only host (a real nvidia-smi listing no GPU): fast and the same everywhere."""
    monkeypatch.setenv("PATH", fake_nvidia_smi(tmp_path, []))


def make_worker(url: str, tmp_path: Path, host: str = "w1", **kw) -> worker.Worker:
    config = WorkerConfig(receivers=(url,), host_id=host, work_dir=tmp_path / f"work-{host}",
                          grace_s=kw.pop("grace_s", 5.0), wait_s=kw.pop("wait_s", 0.0), **kw)
    w = worker.Worker(config)
    w.start()
    return w


def job_detail(server, job_id: str) -> dict:
    status, _, body = server.call("GET", f"/v1/job/{job_id}")
    assert status == 200, body
    return body["job"]


def only_job(server) -> dict:
    status, _, body = server.call("GET", "/v1/jobs")
    (job,) = body["jobs"]
    return job_detail(server, job["id"])


def test_run_once_trains_uploads_and_completes(live_server, tmp_path, cpu_host):
    server = live_server(trainer_manifest("ok.py", ONE_JOB))
    w = make_worker(server.url, tmp_path)
    assert w.capability["slots"] == 1 and w.capability["cuda"] is False
    assert w.run_once() == slots.COMPLETED
    job = only_job(server)
    assert job["status"] == "completed" and job["artifact_id"]
    status, headers, data = server.call("GET", f"/v1/artifact/{job['artifact_id']}")
    assert status == 200
    import hashlib
    assert hashlib.sha256(data).hexdigest() == job["artifact_id"]
    from cis490fleet import bundle
    bundle_path = tmp_path / ("b" + bundle.bundle_suffix(data[:4]))
    bundle_path.write_bytes(data)
    bundle.extract_bundle(bundle_path, tmp_path / "x")
    assert json.loads((tmp_path / "x" / "result.json").read_text())["model"] == "mlp"
    assert w.run_once() == slots.IDLE
    assert not list(w.outbox.pending_dir.iterdir())


def test_a_crashing_trainer_fails_the_job_with_its_stderr(live_server, tmp_path, cpu_host):
    server = live_server(trainer_manifest("crash.py", ONE_JOB, max_attempts=1))
    w = make_worker(server.url, tmp_path)
    assert w.run_once() == slots.FAILED
    job = only_job(server)
    assert job["status"] == "failed"
    assert "exit code 3" in job["last_error"] and "boom: simulated trainer crash" in job["last_error"]


def test_an_artifact_over_the_limit_fails_the_job(live_server, tmp_path, cpu_host):
    server = live_server(trainer_manifest("noisy.py", ONE_JOB.replace("steps = 40, sleep = 0.1", "lines = 10"),
                                          max_attempts=1, extra_fleet="max_artifact_bytes = 10"))
    w = make_worker(server.url, tmp_path)
    w.outbox.backoff_s = 0.01
    assert w.run_once() == slots.FAILED
    job = only_job(server)
    assert job["status"] == "failed" and "upload failed" in job["last_error"], job["last_error"]


def test_cancel_stops_the_trainer_and_reports_nothing(live_server, tmp_path, cpu_host):
    server = live_server(trainer_manifest("hang.py", ONE_JOB))
    w = make_worker(server.url, tmp_path, grace_s=2.0)
    from conftest import OPERATOR_TOKEN

    def cancel_when_running():
        deadline = time.monotonic() + 30
        while not any(r.proc is not None for r in list(w.runs.values())) and time.monotonic() < deadline:
            time.sleep(0.05)  # the run is listed before its trainer starts (inputs, the first heartbeat)
        run = next(iter(w.runs.values()))
        cancel_when_running.pid = run.proc.pid
        status, _, body = server.call("POST", f"/v1/job/{run.job_id}/cancel",
                                      headers={"x-operator-token": OPERATOR_TOKEN})
        assert status == 200, body

    import threading
    t = threading.Thread(target=cancel_when_running)
    t.start()
    assert w.run_once() == slots.CANCELLED
    t.join()
    assert not pid_alive(cancel_when_running.pid)
    assert only_job(server)["status"] == "cancelled"


def test_results_wait_on_disk_while_the_coordinator_is_away(serve_process, tmp_path, cpu_host):
    server = serve_process(manifest=trainer_manifest("ok.py", ONE_JOB, heartbeat_s=1, stale_after_s=60))
    w = make_worker(server.url, tmp_path)
    w.client.retries = 0
    # Claim, then take the coordinator away before the trainer's result goes out.
    claim = w.client.claim(w.capability)
    run = TrainerRun(claim, w.slots[0], w.work_dir, now=time.time())
    run.spawn()
    assert wait_exit(run) == 0
    server.stop()
    assert w.outbox.finish(run) == slots.PENDING
    (record,) = w.outbox.pending_records()
    assert record["job_id"] == claim["job_id"] and Path(record["bundle"]).is_file()

    again = serve_process(data_dir=server.data_dir, manifest=trainer_manifest("ok.py", ONE_JOB, heartbeat_s=1,
                                                                              stale_after_s=60))
    w2 = make_worker(again.url, tmp_path)  # a restarted worker, same work folder
    assert w2.outbox.pending_records() == []
    assert job_detail(again, claim["job_id"])["status"] == "completed"


def test_one_slot_per_gpu_each_seeing_only_its_own(live_server, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", fake_nvidia_smi(tmp_path, [(0, "Fake A", 8192), (1, "Fake B", 8192)]))
    script = write(tmp_path / "gpu_trainer.py", """
        import os, time
        time.sleep(1)
        open(os.path.join(os.environ["CIS490_OUT"], "gpu"), "w").write(os.environ["CUDA_VISIBLE_DEVICES"])
    """)
    manifest = trainer_manifest("ok.py", """
        [[jobs]]
        model = "mlp"
        mode = "a"
        require_cuda = true
        [[jobs]]
        model = "mlp"
        mode = "b"
        require_cuda = true
    """).replace(str(TRAINERS / "ok.py"), str(script))
    server = live_server(manifest)
    w = make_worker(server.url, tmp_path, once=True)
    assert w.run() == 0
    _, _, body = server.call("GET", "/v1/workers")
    (me,) = body["workers"]
    assert me["capability"]["slots"] == 2 and me["capability"]["cuda"] is True
    seen = set()
    for job in server.call("GET", "/v1/jobs")[2]["jobs"]:
        assert job["status"] == "completed"
        seen.add((w.work_dir / job["id"] / "attempt-1" / "out" / "gpu").read_text())
    assert seen == {"0", "1"}


@pytest.mark.skipif(os.name == "nt", reason="pseudo-terminals are POSIX")
def test_on_a_terminal_each_running_job_gets_a_live_progress_line(live_server, tmp_path):
    import pty
    import threading

    server = live_server(trainer_manifest("slow.py", ONE_JOB.replace("steps = 40, sleep = 0.1",
                                                                     "steps = 10, sleep = 0.3")))
    master, slave = pty.openpty()
    env = clean_env()
    env.update(PATH=fake_nvidia_smi(tmp_path, []), PYTHONPATH=str(ROOT))
    key_file = tmp_path / "tty.key"
    key_file.write_text(host_key_for(server.url, "tty").hex())
    proc = subprocess.Popen([sys.executable, "-m", "cis490fleet", "work", "--receiver", server.url, "--host-id",
                             "tty", "--host-key-file", str(key_file), "--work-dir", str(tmp_path / "work"), "--once",
                             "--wait", "0"],
                            cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave)
    os.close(slave)
    chunks: list[bytes] = []

    def drain():
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain)
    reader.start()
    try:
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        reader.join(timeout=10)
        os.close(master)
    screen = b"".join(chunks).decode(errors="replace")
    assert "slot 0 " in screen and "(one)" in screen and "epoch" in screen, screen
    assert "[" + "#" * 10 in screen, screen
    assert "completed, artifact" in screen  # log lines survive the redraws
    assert only_job(server)["status"] == "completed"


def test_upload_failures_are_retried_then_the_job_fails(live_server, tmp_path, cpu_host):
    server = live_server(trainer_manifest("ok.py", ONE_JOB, max_attempts=1))
    w = make_worker(server.url, tmp_path)
    w.outbox.backoff_s = 0.01
    claim = w.client.claim(w.capability)
    record = {"action": "complete", "job_id": claim["job_id"], "lease": claim["lease"], "attempt": 1,
              "bundle": str(tmp_path / "vanished.tar.zst"), "label": "one"}
    assert w.outbox.deliver(record) == slots.FAILED
    job = only_job(server)
    assert job["status"] == "failed"
    assert f"upload failed after {w.outbox.upload_tries} tries" in job["last_error"] and "vanished" in job["last_error"]
    assert w.outbox.pending_records() == []


def test_a_refused_claim_is_logged_in_one_line_without_a_traceback(tmp_path, cpu_host, caplog):
    import http.server
    import threading

    class RefuseClaims(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers.get("content-length") or 0))
            refused = self.path == "/v1/job/claim"
            body = json.dumps({"error": "forbidden", "detail": "host w1 may not claim here"} if refused
                              else {"ok": True}).encode()
            self.send_response(403 if refused else 200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), RefuseClaims)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        w = make_worker(f"http://127.0.0.1:{srv.server_address[1]}", tmp_path)
        loop = threading.Thread(target=w._slot_loop, args=(w.slots[0],), daemon=True)
        loop.start()
        deadline = time.monotonic() + 10
        while not any("may not claim" in r.getMessage() for r in caplog.records) and time.monotonic() < deadline:
            time.sleep(0.05)
        w.stop()
        loop.join(10)
    finally:
        srv.shutdown()
        srv.server_close()
    (record, *_) = [r for r in caplog.records if "may not claim" in r.getMessage()]
    assert record.exc_info is None and "\n" not in record.getMessage()
    assert not loop.is_alive()


def test_exit_when_idle(live_server, tmp_path, cpu_host):
    server = live_server(trainer_manifest("ok.py", ""))
    w = make_worker(server.url, tmp_path, exit_when_idle_s=0.5, wait_s=0.2)
    assert w.run() == 0


def test_once_claims_again_after_the_queue_settles_so_a_job_gone_stale_meanwhile_is_trained(
        live_server, tmp_path, cpu_host):
    """--once: the empty claim and the 'nothing held' check are two requests; a stale sweep between them must not
    let the worker leave a pending job behind."""
    server = live_server(trainer_manifest("ok.py", ONE_JOB, heartbeat_s=0.2, stale_after_s=1.0))
    status, _, ghost = server.call("POST", "/v1/job/claim", {"capability": {}}, {"x-lab-host": "ghost"})
    assert status == 200 and ghost["job"] is not None
    claimed_at = time.monotonic()
    w = make_worker(server.url, tmp_path, once=True)
    settled = w.queue_settled

    def sweep_then_check() -> bool:
        time.sleep(max(0.0, claimed_at + 1.2 - time.monotonic()))
        server.coordinator.sweep_once()  # the ghost's job goes back to pending after the empty claim
        return settled()

    w.queue_settled = sweep_then_check
    assert w.run() == 0
    job = only_job(server)
    assert job["status"] == "completed" and job["host"] == "w1", job


def test_a_worker_stopped_with_sigterm_tells_the_coordinator_it_is_leaving(live_server, tmp_path):
    """`jobs workers` shows a worker that was stopped as gone at once, not after worker_timeout_s (120 s);
    its job goes back to pending, and the same host shows live again once it comes back."""
    server = live_server(trainer_manifest("slow.py", ONE_JOB.replace("steps = 40", "steps = 600")))
    env = clean_env()
    env.update(PATH=fake_nvidia_smi(tmp_path, []), PYTHONPATH=str(ROOT))
    key_file = tmp_path / "leaver.key"
    key_file.write_text(host_key_for(server.url, "leaver").hex())
    argv = [sys.executable, "-m", "cis490fleet", "work", "--receiver", server.url, "--host-id", "leaver",
            "--host-key-file", str(key_file), "--work-dir", str(tmp_path / "work"), "--wait", "1", "--grace", "5"]
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while only_job(server)["status"] != "running" and time.monotonic() < deadline:
            time.sleep(0.1)
        assert only_job(server)["status"] == "running"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    (me,) = server.call("GET", "/v1/workers")[2]["workers"]
    assert me["host"] == "leaver" and me["live"] is False and me["left"] is not None, me
    assert only_job(server)["status"] == "pending"
    from cis490fleet import ops

    out = io.StringIO()
    assert ops.main(["--receiver", server.url, "workers"], stdout=out) == 0
    assert out.getvalue().splitlines()[1].split()[:2] == ["leaver", "left"], out.getvalue()

    from cis490fleet.client import Client

    Client(server.url, host_id="leaver", retries=0).register({"host": "leaver", "os": "linux", "slots": 1})
    (me,) = server.call("GET", "/v1/workers")[2]["workers"]
    assert me["live"] is True and me["left"] is None


# -- how attempts end: failure classes, time limits, cancel and progress within seconds -------------


def attempt_classes(server) -> list[tuple[str, str]]:
    return [(a["outcome"], a["class"]) for a in only_job(server)["attempts"]]


def test_a_usage_error_exit_2_is_never_retried(live_server, tmp_path, cpu_host):
    server = live_server(trainer_manifest("usage.py", ONE_JOB, extra_fleet="retries = 2"))
    w = make_worker(server.url, tmp_path)
    assert w.run_once() == slots.FAILED
    job = only_job(server)
    assert job["status"] == "failed" and "exit code 2" in job["last_error"], job
    assert attempt_classes(server) == [("failed", "usage")]


def test_without_retries_a_trainer_failure_is_final_at_once(live_server, tmp_path, cpu_host):
    server = live_server(trainer_manifest("crash.py", ONE_JOB, max_attempts=3))
    w = make_worker(server.url, tmp_path)
    assert w.run_once() == slots.FAILED
    assert only_job(server)["status"] == "failed"
    assert attempt_classes(server) == [("failed", "job")]


def test_retries_grant_a_failing_trainer_more_tries(live_server, tmp_path, cpu_host):
    server = live_server(trainer_manifest("crash.py", ONE_JOB + "retries = 1\n", max_attempts=3))
    w = make_worker(server.url, tmp_path)
    assert w.run_once() == slots.FAILED
    assert only_job(server)["status"] == "pending"
    time.sleep(0.2)  # the retry backoff
    assert w.run_once() == slots.FAILED
    assert only_job(server)["status"] == "failed"
    assert attempt_classes(server) == [("failed", "job"), ("failed", "job")]


@pytest.mark.skipif(os.name == "nt", reason="signals are POSIX")
def test_a_trainer_killed_by_sigkill_is_not_the_job_s_fault_and_is_retried(live_server, tmp_path, cpu_host):
    server = live_server(trainer_manifest("oom.py", ONE_JOB, max_attempts=2))
    w = make_worker(server.url, tmp_path)
    assert w.run_once() == slots.FAILED
    job = only_job(server)
    assert job["status"] == "pending" and "killed by SIGKILL" in job["last_error"], job
    time.sleep(0.2)
    assert w.run_once() == slots.FAILED
    assert only_job(server)["status"] == "failed"  # max_attempts still bounds it
    assert attempt_classes(server) == [("failed", "signal"), ("failed", "signal")]


@pytest.mark.parametrize("limit,failure_class,error", [
    ("max_runtime_s = 1", "time_limit", "ran past its time limit of 1 s"),
    ("stall_after_s = 1", "stalled", "stalled: no progress for 1 s"),
])
def test_a_trainer_past_its_time_limit_or_stalled_is_stopped_and_the_attempt_fails(
        live_server, tmp_path, cpu_host, limit, failure_class, error):
    server = live_server(trainer_manifest("hang.py", ONE_JOB + limit + "\n", max_attempts=3))
    w = make_worker(server.url, tmp_path, grace_s=2.0)
    started = time.monotonic()
    pids = trainer_pids(w)
    assert w.run_once() == slots.FAILED
    assert 1.0 <= time.monotonic() - started < 30
    job = only_job(server)
    assert job["status"] == "failed" and job["last_error"] == error, job
    assert attempt_classes(server) == [("failed", failure_class)]
    assert pids and not pid_alive(pids[0])


def trainer_pids(w) -> list[int]:
    """A list that a daemon thread fills with the pid of the first trainer ``w`` starts."""
    import threading

    pids: list[int] = []

    def wait_for_one():
        deadline = time.monotonic() + 30
        while not pids and time.monotonic() < deadline:
            pids.extend(r.proc.pid for r in list(w.runs.values()) if r.proc)
            time.sleep(0.05)

    threading.Thread(target=wait_for_one, daemon=True).start()
    return pids


def test_a_cancel_is_noticed_within_2_s_though_heartbeats_are_30_s_apart(live_server, tmp_path, cpu_host):
    import threading

    from conftest import OPERATOR_TOKEN

    server = live_server(trainer_manifest("hang.py", ONE_JOB, heartbeat_s=30, stale_after_s=120))
    w = make_worker(server.url, tmp_path, grace_s=2.0)
    pids = trainer_pids(w)
    cancelled_at = []

    def cancel_once_running():
        deadline = time.monotonic() + 30
        while not pids and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1.0)  # past the first heartbeat: only the watch can bring the news now
        job_id = next(iter(w.runs.values())).job_id
        cancelled_at.append(time.monotonic())
        status, _, body = server.call("POST", f"/v1/job/{job_id}/cancel", headers={"x-operator-token": OPERATOR_TOKEN})
        assert status == 200, body

    t = threading.Thread(target=cancel_once_running)
    t.start()
    assert w.run_once() == slots.CANCELLED
    took = time.monotonic() - cancelled_at[0]
    t.join()
    assert took < 2.0 + 2.0, f"the trainer was stopped {took:.1f} s after the cancel"  # + its SIGTERM grace
    assert not pid_alive(pids[0])
    assert attempt_classes(server) == [("cancelled", "cancelled")]


def test_progress_reaches_the_coordinator_within_2_s_though_heartbeats_are_30_s_apart(
        live_server, tmp_path, cpu_host):
    import threading

    server = live_server(trainer_manifest("slow.py", ONE_JOB.replace("steps = 40, sleep = 0.1",
                                                                     "steps = 8, sleep = 1.0"),
                                          heartbeat_s=30, stale_after_s=120))
    w = make_worker(server.url, tmp_path)
    seen: list[tuple[float, int]] = []

    def poll():
        while not seen or seen[-1][1] < 8:
            progress = only_job(server).get("progress") or {}
            if progress.get("step") and (not seen or seen[-1][1] != progress["step"]):
                seen.append((time.monotonic(), progress["step"]))
            if only_job(server)["status"] == "completed":
                return
            time.sleep(0.1)

    t = threading.Thread(target=poll, daemon=True)
    t.start()
    assert w.run_once() == slots.COMPLETED
    t.join(10)
    steps = [step for _, step in seen]
    assert len(steps) >= 3 and steps == sorted(steps), seen  # not just the first heartbeat's
    gaps = [b - a for (a, _), (b, _) in zip(seen, seen[1:])]
    assert max(gaps) < 2.0 + 1.5, seen  # at most once per 2 s, and no later than that


@pytest.mark.skipif(os.name == "nt", reason="signals are POSIX")
def test_a_worker_told_to_stop_hands_the_job_back_as_released(live_server, tmp_path, cpu_host):
    import threading

    server = live_server(trainer_manifest("hang.py", ONE_JOB))
    w = make_worker(server.url, tmp_path, grace_s=2.0)
    pids = trainer_pids(w)

    def stop_once_running():
        deadline = time.monotonic() + 30
        while not pids and time.monotonic() < deadline:
            time.sleep(0.05)
        w.stop()

    threading.Thread(target=stop_once_running, daemon=True).start()
    assert w.run_once() == slots.RELEASED
    assert only_job(server)["status"] == "pending"
    assert attempt_classes(server) == [("released", "released")]


# -- self-fencing: a worker cut off from the coordinator stops its trainer before anyone else starts one ------


@pytest.mark.skipif(os.name == "nt", reason="signals are POSIX")
def test_a_worker_cut_off_by_a_proxy_stops_its_trainer_before_the_job_runs_elsewhere(live_server, tmp_path,
                                                                                        cpu_host):
    import threading

    from cis490fleet.client import Client
    from peer_harness import LinkProxy

    stamps = tmp_path / "stamps.jsonl"
    job = f"""
        [[jobs]]
        name = "fenced"
        model = "mlp"
        mode = "fast"
        hyper = {{ steps = 16, sleep = 0.5, stamps = {json.dumps(str(stamps))} }}
    """
    server = live_server(trainer_manifest("stamped.py", job, heartbeat_s=0.5, stale_after_s=3.0), sweep_interval=0.2)
    port = int(server.url.rsplit(":", 1)[1])
    proxy = LinkProxy(port, name="a->coordinator")
    alias(proxy.url, server)
    try:
        cut_off = make_worker(proxy.url, tmp_path, host="wa", grace_s=2.0)
        cut_off.client = cut_off.outbox.client = Client(proxy.url, host_id="wa", timeout=2.0, retries=0)
        outcome: list[str] = []
        a = threading.Thread(target=lambda: outcome.append(cut_off.run_once()), daemon=True)
        a.start()
        wait_for_stamp(stamps, "start", 1)
        proxy.set_mode("blackhole")
        cut_at = time.time()

        other = make_worker(server.url, tmp_path, host="wb", wait_s=1.0)
        deadline = time.monotonic() + 60
        while (result := other.run_once()) != slots.COMPLETED:
            assert result == slots.IDLE and time.monotonic() < deadline, result
        a.join(60)
        assert outcome == [slots.PENDING]  # the fenced attempt's report waits on disk for the coordinator
        proxy.set_mode("pass")
        cut_off.outbox.flush_pending()  # refused: the job went to wb meanwhile; the record is dropped
        assert cut_off.outbox.pending_records() == []
    finally:
        proxy.close()
    runs = read_stamps(stamps)
    (first, second) = sorted(runs.values(), key=lambda r: r["start"])
    assert first["stop"] < second["start"], f"the two attempts overlapped: {runs}"
    assert first["stop"] - cut_at < 3.0  # stopped within stale_after_s of the cut
    detail = only_job(server)
    assert detail["status"] == "completed" and detail["host"] == "wb", detail
    assert [(a["host"], a["outcome"], a["class"]) for a in detail["attempts"]] == [
        ("wa", "stale", "lost"), ("wb", "completed", None)]


def read_stamps(path: Path) -> dict[int, dict]:
    runs: dict[int, dict] = {}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        runs.setdefault(row["attempt"], {})[row["event"]] = row["t"]
    return runs


def wait_for_stamp(path: Path, event: str, attempt: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not (path.exists() and read_stamps(path).get(attempt, {}).get(event)):
        assert time.monotonic() < deadline, f"no {event} of attempt {attempt} in {path}"
        time.sleep(0.05)


def test_a_log_tail_starts_at_a_line_boundary(tmp_path):
    """The tail sent with each heartbeat (and shown by `jobs show`) never begins in the middle of a line."""
    log = tmp_path / "train.log"
    log.write_text("".join(f"epoch {i:04d} loss 0.5\n" for i in range(1000)))  # 20-byte lines
    tail = trainer_process.read_tail(log, 95)
    assert tail.startswith("epoch ") and tail.endswith("epoch 0999 loss 0.5\n"), tail
    assert all(re.fullmatch(r"epoch \d{4} loss 0\.5", line) for line in tail.splitlines()), tail
    short = tmp_path / "short.log"
    short.write_text("one\ntwo\n")
    assert trainer_process.read_tail(short, 100) == "one\ntwo\n"
    one_long_line = tmp_path / "long.log"
    one_long_line.write_text("x" * 500)
    assert trainer_process.read_tail(one_long_line, 100) == "x" * 100  # no line start to find: the bytes as they are


def test_a_crash_reports_stderr_from_a_line_boundary(tmp_path):
    run = TrainerRun.__new__(TrainerRun)
    run._readers, run._stderr_tail, run._stderr_len = [], __import__("collections").deque(), 0
    for i in range(1000):
        run._keep_stderr(f"warning {i:04d}: noisy\n".encode())
    tail = run.stderr_tail()
    assert tail.startswith("warning ") and tail.endswith("warning 0999: noisy\n") and len(tail) <= trainer_process.TAIL_BYTES


# -- whole logs: each attempt hands in its train.log; `jobs logs --attempt N` prints it ---------------------


def jobs_cli(url: str, *argv: str) -> tuple[int, str]:
    from cis490fleet import ops

    out = io.StringIO()
    code = ops.main(["--receiver", url, "logs", *argv], stdout=out)
    return code, out.getvalue()


def test_each_attempt_hands_in_its_whole_log_and_jobs_logs_prints_it(live_server, tmp_path, cpu_host):
    server = live_server(trainer_manifest("crash.py", ONE_JOB + "retries = 1\n", max_attempts=3))
    w = make_worker(server.url, tmp_path)
    assert w.run_once() == slots.FAILED
    time.sleep(0.2)  # the retry backoff
    assert w.run_once() == slots.FAILED
    job = only_job(server)
    assert job["status"] == "failed" and [a["log_size"] > 0 for a in job["attempts"]] == [True, True]
    for attempt in (1, 2):
        code, text = jobs_cli(server.url, job["id"], "--attempt", str(attempt))
        assert code == 0
        assert sorted(text.splitlines()) == ["boom: simulated trainer crash (fixture tests/trainers/crash.py)",
                                             "starting, about to crash"], text  # both streams, in either order
        assert text == (w.work_dir / job["id"] / f"attempt-{attempt}" / "train.log").read_text()
    assert jobs_cli(server.url, job["id"]) == (0, text)  # a finished job: the newest whole log
    assert not list(w.outbox.pending_dir.iterdir())  # nothing left behind on the worker


def test_a_completed_job_s_log_is_kept_whole_past_the_tail(live_server, tmp_path, cpu_host):
    server = live_server(trainer_manifest("noisy.py", ONE_JOB.replace("steps = 40, sleep = 0.1", "lines = 5000")))
    w = make_worker(server.url, tmp_path)
    assert w.run_once() == slots.COMPLETED
    job = only_job(server)
    code, text = jobs_cli(server.url, job["id"], "--attempt", "1")
    assert code == 0 and len(text.encode()) > 4 * 4096  # more than the 4 KiB tail a heartbeat carries
    assert text == (w.work_dir / job["id"] / "attempt-1" / "train.log").read_text()


@pytest.mark.skipif(os.name == "nt", reason="signals are POSIX")
def test_a_self_fenced_attempt_is_reported_as_fenced_once_the_coordinator_answers_again(live_server, tmp_path,
                                                                                          cpu_host):
    import threading

    from cis490fleet.client import Client
    from peer_harness import LinkProxy

    stamps = tmp_path / "stamps.jsonl"
    job = f"""
        [[jobs]]
        name = "fenced"
        model = "mlp"
        mode = "fast"
        hyper = {{ steps = 60, sleep = 0.5, stamps = {json.dumps(str(stamps))} }}
    """
    server = live_server(trainer_manifest("stamped.py", job, heartbeat_s=0.5, stale_after_s=8.0))
    proxy = LinkProxy(int(server.url.rsplit(":", 1)[1]), name="a->coordinator")
    alias(proxy.url, server)
    try:
        w = make_worker(proxy.url, tmp_path, host="wa", grace_s=2.0)
        w.client = w.outbox.client = Client(proxy.url, host_id="wa", timeout=2.0, retries=0)
        outcome: list[str] = []
        a = threading.Thread(target=lambda: outcome.append(w.run_once()), daemon=True)
        a.start()
        wait_for_stamp(stamps, "start", 1)
        proxy.set_mode("blackhole")
        cut_at = time.monotonic()
        wait_for_stamp(stamps, "stop", 1)  # SIGTERM at stale_after_s * 0.99 - 0.25 - grace after the last answer
        assert time.monotonic() - cut_at < 8.0 - 2.0
        proxy.set_mode("pass")  # back before the coordinator's stale sweep
        a.join(30)
        assert outcome and outcome[0] in (slots.PENDING, slots.FAILED), outcome
        w.outbox.flush_pending()
    finally:
        proxy.close()
    detail = only_job(server)
    assert [(a["host"], a["outcome"], a["class"]) for a in detail["attempts"]] == [("wa", "failed", "fenced")]
    assert detail["status"] == "pending"  # not the job's fault: it is tried again
    assert "no heartbeat acknowledged for" in detail["attempts"][0]["error"]


def test_a_jobs_first_progress_goes_out_at_once_so_a_short_job_never_shows_starting(live_server, tmp_path,
                                                                                     cpu_host, monkeypatch):
    """Progress is throttled (PROGRESS_EVERY_S), but not the first report: the heartbeat at the start carried
    none, so a job shorter than the throttle would show 'starting' until it ended."""
    from cis490fleet import lease_keeper, ops

    monkeypatch.setattr(lease_keeper, "PROGRESS_EVERY_S", 120.0)  # longer than the job: only the first may pass
    server = live_server(trainer_manifest("slow.py", ONE_JOB.replace("steps = 40, sleep = 0.1",
                                                                     "steps = 2, sleep = 2.0"), heartbeat_s=60,
                                          stale_after_s=600))
    w = make_worker(server.url, tmp_path)
    import threading

    outcome = []
    t = threading.Thread(target=lambda: outcome.append(w.run_once()))
    t.start()
    shown = set()
    try:
        while t.is_alive():
            out = io.StringIO()
            ops.main(["--receiver", server.url, "status"], stdout=out)
            shown |= {line.split()[5] + " " + line.split()[6] for line in out.getvalue().splitlines()
                      if line.startswith("  ") and len(line.split()) > 6 and "mlp" in line}
            time.sleep(0.2)
    finally:
        t.join(timeout=60)
    assert outcome == [slots.COMPLETED]
    assert "epoch 1/2" in shown, shown


def test_heartbeats_that_fail_keep_their_period_however_often_progress_comes(live_server, tmp_path, cpu_host):
    """A coordinator that refuses connections gets a heartbeat per period (and a watch retry a second), not one
    per new progress line: the progress throttle holds while heartbeats fail."""
    import threading

    from cis490fleet.client import Client
    from peer_harness import LinkProxy

    server = live_server(trainer_manifest("slow.py", ONE_JOB.replace("steps = 40, sleep = 0.1",
                                                                     "steps = 40, sleep = 0.05"),
                                          heartbeat_s=20, stale_after_s=60))
    proxy = LinkProxy(int(server.url.rsplit(":", 1)[1]), name="a->coordinator")
    alias(proxy.url, server)
    try:
        w = make_worker(proxy.url, tmp_path, grace_s=1.0)
        w.client = w.outbox.client = Client(proxy.url, host_id="w1", timeout=2.0, retries=0)
        pids = trainer_pids(w)
        a = threading.Thread(target=w.run_once, daemon=True)
        a.start()
        deadline = time.monotonic() + 30
        while not pids and time.monotonic() < deadline:
            time.sleep(0.01)
        proxy.set_mode("refuse")
        before = proxy.accepted
        time.sleep(2.0)
        tries = proxy.accepted - before
        w.stop()
        a.join(30)
    finally:
        proxy.close()
    assert tries <= 6, f"{tries} connections in 2 s to a coordinator that refuses them"
