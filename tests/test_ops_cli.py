"""The ``jobs`` operator CLI end to end against real ``serve`` subprocesses.

Workers are played by ``client.Client`` with a host id (register, claim,
heartbeat, upload, complete), so every job state the CLI shows is one the
real coordinator reached. Most commands run in this process through
``ops.main`` (output captured); exit codes, the one-line errors, Ctrl-C and the
terminal view run the real ``python -m cis490fleet jobs`` command.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pty
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from cis490fleet import cli, ops
from cis490fleet.client import Client
from cis490fleet.model import compute_job_id
from conftest import OPERATOR_TOKEN, ROOT, clean_env, closed_port_url, manifest_toml

ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class Capture(io.StringIO):
    """stdout that lets a test wait for text to appear (the CLI runs in this thread, a worker in another)."""

    def __init__(self):
        super().__init__()
        self.changed = threading.Condition()

    def write(self, text: str) -> int:
        with self.changed:
            n = super().write(text)
            self.changed.notify_all()
            return n

    def wait_for(self, text: str, timeout: float = 30) -> bool:
        with self.changed:
            return self.changed.wait_for(lambda: text in self.getvalue(), timeout)


def jobs(url, *args, stdout=None) -> tuple[int, str, str]:
    """``cis490fleet jobs --receiver URL ARGS`` in this process: (exit code, stdout, stderr)."""
    out, err = stdout or Capture(), io.StringIO()
    argv = [*(["--receiver", url] if url else []), *args]
    code = ops.main(argv, stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def cli_env(**extra) -> dict:
    env = clean_env()
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def jobs_process(*args, env=None, timeout=60) -> subprocess.CompletedProcess:
    """The real command: ``python -m cis490fleet jobs ARGS``."""
    return subprocess.run([sys.executable, "-m", "cis490fleet", "jobs", *args], capture_output=True, text=True,
                          env=env or cli_env(), cwd=ROOT, timeout=timeout)


def worker(url: str, host: str = "ws1", slots: int = 2) -> tuple[Client, dict]:
    cap = {"host": host, "os": "linux", "cores": 8, "ram_gib": 16, "slots": slots}
    client = Client(url, host_id=host, retries=0)
    client.register(cap)
    return client, cap


@pytest.fixture
def operator(monkeypatch):
    monkeypatch.setenv("CIS490_OPERATOR_TOKEN", OPERATOR_TOKEN)


@pytest.fixture
def fleet(serve_process, monkeypatch):
    """A coordinator with three pending jobs (mlp/train, seeds 0..2)."""
    monkeypatch.delenv("CIS490_RECEIVER", raising=False)
    monkeypatch.delenv("CIS490_OPERATOR_TOKEN", raising=False)
    return serve_process(manifest=manifest_toml(3))


def all_ids(url: str) -> list[str]:
    return sorted(j["id"] for j in Client(url).jobs()["jobs"])


def test_exit_codes_are_clis():
    from cis490fleet import errors

    assert ops.exit_code is cli.exit_code is errors.exit_code
    documented = {errors.StaleLease("j", None): 1, errors.BadRequest("x"): 2, errors.ConfigError("x"): 2,
                  errors.NotFound("x"): 3, errors.AmbiguousId("ab", ["abc", "abd"]): 3,
                  errors.Unauthorized("x"): 4, errors.Forbidden("x"): 4, errors.Unavailable("x"): 5}
    assert {type(e).__name__: ops.exit_code(e) for e in documented} == {
        type(e).__name__: code for e, code in documented.items()}
    assert (ops.EXIT_OK, ops.EXIT_FAILED, ops.EXIT_USAGE, ops.EXIT_NOT_FOUND, ops.EXIT_UNAUTHORISED,
            ops.EXIT_UNREACHABLE) == (cli.EXIT_OK, cli.EXIT_FAILED, cli.EXIT_USAGE, cli.EXIT_NOT_FOUND,
                                      cli.EXIT_UNAUTHORISED, cli.EXIT_UNREACHABLE) == (0, 1, 2, 3, 4, 5)


# -- status, list, show -----------------------------------------------------------------------------


def test_status_shows_counts_workers_and_running_jobs(fleet):
    w, cap = worker(fleet.url)
    claim = w.claim(cap)
    w.heartbeat(claim["job_id"], claim["lease"], progress={"epoch": 3, "epochs": 10, "loss": 0.25})

    code, out, err = jobs(fleet.url, "status")
    assert (code, err) == (0, "")
    assert "2 pending" in out and "1 running" in out and "(3 total)" in out
    assert "1 live of 1: ws1 (1/2)" in out
    row = next(line for line in out.splitlines() if line.strip().startswith(claim["job_id"][:12]))
    assert "ws1" in row and "epoch 3/10 loss 0.2500 30%" in row
    assert "\x1b[" not in out

    code, out, _ = jobs(fleet.url, "status", "--json")
    snap = json.loads(out)
    assert code == 0
    assert snap["health"]["jobs"]["running"] == 1
    assert [j["id"] for j in snap["running"]] == [claim["job_id"]]



def test_status_and_watch_take_each_jobs_age_from_the_listing(fleet):
    """Four requests however many jobs run: no job detail is fetched for an age."""
    w, cap = worker(fleet.url)
    claims = [w.claim(cap), w.claim(cap)]
    started = {j["id"]: j["started"] for j in Client(fleet.url).jobs(status="claimed")["jobs"]}
    assert set(started) == {c["job_id"] for c in claims} and all(isinstance(t, float) for t in started.values())

    code, out, _ = jobs(fleet.url, "status", "--json")
    assert code == 0 and {j["id"]: j["started"] for j in json.loads(out)["running"]} == started
    code, out, _ = jobs(fleet.url, "status")
    assert code == 0 and all(c["job_id"][:12] in out for c in claims)
    code, out, _ = jobs(fleet.url, "watch", "--once")
    assert code == 0 and out.count(" claimed age ") == 2
    # A request after all of those, then the access log: no GET /v1/job/<id> among them.
    assert fleet.call("GET", "/v1/health?after=status")[0] == 200
    deadline = time.monotonic() + 30
    while "/v1/health?after=status" not in fleet.log_text():
        assert time.monotonic() < deadline, fleet.log_text()
        time.sleep(0.05)
    log = fleet.log_text()
    assert log.count("GET /v1/jobs?status=claimed") == 4  # this test's own, then status twice and watch
    assert "GET /v1/job/" not in log

def test_list_filters_and_pages(fleet):
    w, cap = worker(fleet.url)
    claim = w.claim(cap)

    code, out, _ = jobs(fleet.url, "list")
    lines = out.splitlines()
    assert code == 0 and lines[0].split() == ["ID", "STATUS", "MODEL", "MODE", "PRIO", "HOST", "UPDATED", "NAME"]
    assert len(lines) == 4
    assert {line.index(claim["job_id"][:12]) for line in lines[1:] if claim["job_id"][:12] in line} == {0}
    assert len({line.find(" pending") for line in lines if " pending" in line}) == 1  # one column, aligned

    code, out, _ = jobs(fleet.url, "list", "--status", "claimed")
    assert code == 0
    assert [line.split()[0] for line in out.splitlines()[1:]] == [claim["job_id"][:12]]

    code, out, _ = jobs(fleet.url, "list", "--host", "ws1", "--json")
    assert [j["id"] for j in json.loads(out)["jobs"]] == [claim["job_id"]]

    code, out, _ = jobs(fleet.url, "list", "--limit", "1")
    assert code == 0 and "(1 shown of 3" in out

    code, out, _ = jobs(fleet.url, "list", "--model", "nosuchmodel")
    assert code == 0 and out.strip() == "no jobs match"


def test_show_by_unique_prefix_with_attempts_error_and_log(fleet):
    w, cap = worker(fleet.url)
    claim = w.claim(cap)
    job_id = claim["job_id"]
    w.heartbeat(job_id, claim["lease"], progress={"epoch": 1}, log_tail="loading data\nepoch 1 loss 0.9\n")
    w.fail(job_id, claim["lease"], "CUDA out of memory\nTraceback line 2")

    code, out, err = jobs(fleet.url, "show", job_id[:7])
    assert (code, err) == (0, "")
    assert re.search(rf"^id\s+{job_id}$", out, re.M)
    assert re.search(r"^model\s+mlp$", out, re.M)
    assert "attempts" in out and re.search(r"^\s+1\s+ws1\s", out, re.M)
    assert "last error\n  CUDA out of memory\n  Traceback line 2" in out
    assert "log tail\n  loading data\n  epoch 1 loss 0.9" in out

    code, out, _ = jobs(fleet.url, "show", job_id[:7], "--json")
    detail = json.loads(out)["job"]
    assert detail["id"] == job_id and detail["attempts"][0]["host"] == "ws1"


def test_failures_table_shows_failed_attempts_of_jobs_still_retrying(fleet):
    code, out, err = jobs(fleet.url, "failures")
    assert (code, out, err) == (0, "no failed attempts\n", "")
    w, cap = worker(fleet.url)
    first, second = w.claim(cap), w.claim(cap)
    w.fail(first["job_id"], first["lease"], "CUDA out of memory\nTraceback line 2", "signal")
    w.fail(second["job_id"], second["lease"], "\n  disk full\n", "infra")

    code, out, err = jobs(fleet.url, "failures")
    lines = out.splitlines()
    assert (code, err) == (0, "")
    assert lines[0].split() == ["WHEN", "ID", "NAME", "MODEL/MODE", "ATTEMPT", "HOST", "OUTCOME", "CLASS", "NOW",
                                "ERROR"]
    assert re.match(rf"\d+s ago\s+{second['job_id'][:12]}\s+-\s+mlp/train\s+1\s+ws1\s+failed\s+infra\s+pending\s+"
                    r"disk full$", lines[1]), out
    assert re.match(rf"\d+s ago\s+{first['job_id'][:12]}\s+.*\s+pending\s+CUDA out of memory$", lines[1 + 1]), out
    assert len(lines) == 3 and "Traceback" not in out

    code, out, _ = jobs(fleet.url, "failures", "--limit", "1", "--json")
    got = json.loads(out)["failures"]
    assert code == 0 and [(f["job_id"], f["attempt"], f["status"]) for f in got] == [(second["job_id"], 1, "pending")]
    assert got[0]["error"] == "\n  disk full\n"
    assert jobs(fleet.url, "failures", "--limit", "0")[0] == 2


def test_show_of_pending_job_says_why(fleet):
    code, out, _ = jobs(fleet.url, "show", all_ids(fleet.url)[0])
    assert code == 0
    assert "why pending\n  - no live worker" in out


def _two_seeds_sharing_a_prefix() -> tuple[int, int, str]:
    seen: dict[str, int] = {}
    for seed in range(100000):
        prefix = compute_job_id("mlp", "train", {}, "default", [], seed)[:4]
        if prefix in seen:
            return seen[prefix], seed, prefix
        seen[prefix] = seed
    raise AssertionError("no shared prefix found")


def test_ambiguous_prefix_is_exit_3_naming_the_matches(serve_process):
    a, b, prefix = _two_seeds_sharing_a_prefix()
    sp = serve_process(manifest=f'[[sweeps]]\nmodel = "mlp"\nmode = "train"\nseed = [{a}, {b}]\n')
    assert all(i.startswith(prefix) for i in all_ids(sp.url))
    proc = jobs_process("--receiver", sp.url, "show", prefix)
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout == "" and len(proc.stderr.splitlines()) == 1
    assert prefix in proc.stderr and "more characters" in proc.stderr


def test_unknown_id_is_exit_3(fleet):
    proc = jobs_process("--receiver", fleet.url, "show", "abcd0123")
    assert proc.returncode == 3
    assert len(proc.stderr.splitlines()) == 1 and "abcd0123" in proc.stderr
    assert "Traceback" not in proc.stderr


# -- writes -------------------------------------------------------------------------------------


def test_cancel_and_requeue_need_the_operator_token(fleet):
    job_id = all_ids(fleet.url)[0]
    no_token = jobs_process("--receiver", fleet.url, "cancel", job_id[:8])
    assert no_token.returncode == 4
    assert len(no_token.stderr.splitlines()) == 1 and "CIS490_OPERATOR_TOKEN" in no_token.stderr
    wrong = jobs_process("--receiver", fleet.url, "requeue", job_id[:8], env=cli_env(CIS490_OPERATOR_TOKEN="wrong"))
    assert wrong.returncode == 4 and "Traceback" not in wrong.stderr
    assert Client(fleet.url).job(job_id)["job"]["status"] == "pending"


def test_cancel_then_requeue(fleet, operator):
    first, second, _ = all_ids(fleet.url)
    code, out, err = jobs(fleet.url, "cancel", first[:6], second)
    assert (code, err) == (0, "")
    assert out.splitlines() == [f"cancelled {first[:12]}", f"cancelled {second[:12]}"]
    c = Client(fleet.url)
    assert [c.job(i)["job"]["status"] for i in (first, second)] == ["cancelled", "cancelled"]

    code, out, _ = jobs(fleet.url, "requeue", first[:6], "--json")
    assert code == 0 and json.loads(out) == [{"id": first, "ok": True}]
    assert c.job(first)["job"]["status"] == "pending"


def test_cancel_goes_on_past_an_unknown_id_and_exits_3(fleet, operator):
    job_id = all_ids(fleet.url)[0]
    code, out, err = jobs(fleet.url, "cancel", "abcd0123", job_id)
    assert code == 3
    assert out.strip() == f"cancelled {job_id[:12]}"
    assert "abcd0123" in err and len(err.splitlines()) == 1


def test_requeue_of_a_running_job_is_refused(fleet, operator):
    w, cap = worker(fleet.url)
    claim = w.claim(cap)
    code, out, err = jobs(fleet.url, "requeue", claim["job_id"])
    assert code == 1 and out == ""
    assert claim["job_id"][:12] in err


def test_reload_adds_new_jobs(fleet, operator):
    manifest = Path(fleet.argv[fleet.argv.index("--manifest") + 1])
    manifest.write_text(manifest_toml(5), encoding="utf-8")
    code, out, _ = jobs(fleet.url, "reload")
    assert code == 0
    sha = hashlib.sha256(manifest_toml(5).encode()).hexdigest()
    assert out.strip() == f"manifest reloaded (sha256 {sha[:16]}): 2 added, 3 kept, 0 removed, 5 total"
    code, out, _ = jobs(fleet.url, "reload", "--json")
    assert json.loads(out)["kept"] == 5


def test_reload_says_how_many_jobs_stopped_being_claimable(fleet, operator):
    w, cap = worker(fleet.url)
    held = w.claim(cap)["job_id"]
    manifest = Path(fleet.argv[fleet.argv.index("--manifest") + 1])
    manifest.write_text(manifest_toml(0), encoding="utf-8")
    code, out, _ = jobs(fleet.url, "reload")
    assert code == 0
    sha = hashlib.sha256(manifest_toml(0).encode()).hexdigest()
    assert out.splitlines() == [f"manifest reloaded (sha256 {sha[:16]}): 0 added, 0 kept, 3 removed, 3 total",
                                "2 pending job(s) stopped being claimable: they left the manifest (bring them back, "
                                "or 'jobs cancel ID')"]
    assert w.claim(cap) == {"job": None}
    pending = next(i for i in all_ids(fleet.url) if i != held)
    code, out, _ = jobs(fleet.url, "show", pending)
    assert "why pending\n  - removed from the manifest: bring it back or cancel it\n" in out


def test_workers_table(fleet):
    worker(fleet.url, "ws1")
    w2, cap2 = worker(fleet.url, "gpu-box", slots=1)
    w2.claim(cap2)
    code, out, _ = jobs(fleet.url, "workers")
    lines = out.splitlines()
    assert code == 0 and lines[0].split()[:4] == ["HOST", "STATE", "LAST", "SEEN"]
    assert re.match(r"gpu-box\s+live\s+\d+s ago\s+1/1\s+linux\s+8\s", lines[1])
    assert re.match(r"ws1\s+live\s+\d+s ago\s+0/2\s", lines[2])
    code, out, _ = jobs(fleet.url, "workers", "--json")
    assert {w["host"] for w in json.loads(out)["workers"]} == {"ws1", "gpu-box"}


# -- logs, fetch ------------------------------------------------------------------------------------


def test_logs_prints_the_tail(fleet):
    w, cap = worker(fleet.url)
    claim = w.claim(cap)
    w.heartbeat(claim["job_id"], claim["lease"], log_tail="one\ntwo\n")
    assert jobs(fleet.url, "logs", claim["job_id"][:8]) == (0, "one\ntwo\n", "")
    other = next(i for i in all_ids(fleet.url) if i != claim["job_id"])
    code, out, err = jobs(fleet.url, "logs", other)
    assert code == 0 and out == "" and "no log yet" in err


def test_logs_of_a_finished_job_never_says_yet(fleet, operator):
    w, cap = worker(fleet.url)
    claim = w.claim(cap)
    w.fail(claim["job_id"], claim["lease"], "boom")  # final: the manifest grants no retries
    code, out, err = jobs(fleet.url, "logs", claim["job_id"])
    assert (code, out) == (0, "") and err == f"job {claim['job_id'][:12]} kept no log (it is failed)\n"
    code, out, err = jobs(fleet.url, "logs", claim["job_id"], "--attempt", "1")
    assert code == 3 and f"attempt 1 of job {claim['job_id'][:12]} handed in no log" in err
    code, out, err = jobs(fleet.url, "logs", claim["job_id"], "--attempt", "7")
    assert code == 3 and "has no attempt 7" in err


def test_logs_follow_prints_each_line_once_until_the_job_ends(fleet, tmp_path):
    w, cap = worker(fleet.url)
    claim = w.claim(cap)
    job_id, lease = claim["job_id"], claim["lease"]
    w.heartbeat(job_id, lease, log_tail="line1\n")
    bundle_file = tmp_path / "b.tar"
    bundle_file.write_bytes(b"\0" * 1024)
    out = Capture()
    problems = []

    def play():
        try:
            assert out.wait_for("line1\n")
            w.heartbeat(job_id, lease, log_tail="line1\nline2\n")
            assert out.wait_for("line2\n")
            w.heartbeat(job_id, lease, log_tail="line2\nline3\n")  # the tail has rolled past line1
            artifact = w.upload(job_id, lease, bundle_file)["artifact_id"]
            w.complete(job_id, lease, artifact)
        except BaseException as err:  # reported by the assertion below
            problems.append(err)

    t = threading.Thread(target=play, daemon=True)
    t.start()
    code, text, _ = jobs(fleet.url, "logs", job_id, "-f", "--interval", "0.05", stdout=out)
    t.join(30)
    assert not problems
    assert code == 0
    assert text == "line1\nline2\nline3\n"


@pytest.mark.parametrize("old,new,added", [
    ("", "a\n", "a\n"),
    ("a\n", "a\nb\n", "b\n"),
    ("a\nb\n", "b\nc\n", "c\n"),
    ("a\n", "b\nc\n", "b\nc\n"),
    ("xyz\nabc\n", "bc\nd\n", "d\n"),
    ("a\nb\n", "a\nb\n", ""),
])
def test_new_log_text(old, new, added):
    assert ops.new_log_text(old, new) == added


def _completed_job(url: str, tmp_path: Path) -> tuple[str, str, Path]:
    from cis490fleet import bundle

    src = tmp_path / "model"
    src.mkdir()
    (src / "weights.bin").write_bytes(os.urandom(4096))
    (src / "metrics.json").write_text('{"acc": 0.9}')
    path, sha, _ = bundle.make_bundle(src, tmp_path / "upload")
    w, cap = worker(url)
    claim = w.claim(cap)
    assert w.upload(claim["job_id"], claim["lease"], path)["artifact_id"] == sha
    w.complete(claim["job_id"], claim["lease"], sha)
    return claim["job_id"], sha, src


def test_fetch_downloads_verifies_and_extracts(fleet, tmp_path):
    job_id, sha, src = _completed_job(fleet.url, tmp_path)
    dest = tmp_path / "fetched"
    code, out, err = jobs(fleet.url, "fetch", job_id[:8], "-o", str(dest), "--extract")
    assert (code, err) == (0, "")
    path, extracted = (Path(p) for p in out.splitlines())
    assert path.parent == dest and path.name.startswith(f"mlp_train-{sha[:12]}.tar")
    assert hashlib.sha256(path.read_bytes()).hexdigest() == sha
    assert (extracted / "weights.bin").read_bytes() == (src / "weights.bin").read_bytes()
    assert sorted(p.name for p in dest.iterdir()) == sorted([path.name, extracted.name])


def test_fetch_refuses_a_damaged_artifact_and_leaves_nothing(fleet, tmp_path):
    job_id, sha, _ = _completed_job(fleet.url, tmp_path)
    (stored,) = [p for p in (fleet.data_dir / "models").rglob("bundle.tar*") if sha in str(p)]
    stored.chmod(0o644)
    damaged = bytearray(stored.read_bytes())
    damaged[100] ^= 0xFF
    stored.write_bytes(bytes(damaged))
    dest = tmp_path / "fetched"
    code, out, err = jobs(fleet.url, "fetch", job_id, "-o", str(dest))
    assert code == 1 and out == ""
    assert "sha256" in err and sha in err and len(err.splitlines()) == 1
    assert not dest.exists() or list(dest.iterdir()) == []


@pytest.mark.parametrize("blocker", ["output is a file", "download name is a folder"])
def test_fetch_into_a_place_it_cannot_write_is_one_line_exit_2(fleet, tmp_path, blocker):
    job_id, sha, _ = _completed_job(fleet.url, tmp_path)
    dest = tmp_path / "fetched"
    if blocker == "output is a file":
        dest.write_text("not a folder")
    else:
        (dest / f"mlp_train-{sha[:12]}.bundle").mkdir(parents=True)
    code, out, err = jobs(fleet.url, "fetch", job_id, "-o", str(dest))
    assert (code, out) == (2, "")
    assert f"cannot write the download to {dest}" in err and len(err.splitlines()) == 1
    assert [p.name for p in dest.iterdir()] == [f"mlp_train-{sha[:12]}.bundle"] if dest.is_dir() else True


def test_fetch_whose_final_name_is_taken_by_a_folder_is_one_line_exit_2(fleet, tmp_path):
    job_id, sha, _ = _completed_job(fleet.url, tmp_path)
    dest = tmp_path / "fetched"
    for suffix in (".tar", ".tar.zst", ".tar.gz"):
        (dest / f"mlp_train-{sha[:12]}{suffix}").mkdir(parents=True)
    code, out, err = jobs(fleet.url, "fetch", job_id, "-o", str(dest))
    assert (code, out) == (2, "")
    assert f"cannot save the model under {dest}" in err and len(err.splitlines()) == 1


def test_fetch_of_a_job_without_artifact_is_exit_3(fleet, tmp_path):
    code, out, err = jobs(fleet.url, "fetch", all_ids(fleet.url)[0], "-o", str(tmp_path))
    assert code == 3 and "no artifact yet" in err
    assert list(tmp_path.iterdir()) == []


# -- watch, peers ---------------------------------------------------------------------------------


def test_watch_once_plain_lines_when_not_a_terminal(fleet):
    w, cap = worker(fleet.url)
    claim = w.claim(cap)
    w.heartbeat(claim["job_id"], claim["lease"], progress={"fraction": 0.5, "epoch": 5, "epochs": 10})
    code, out, _ = jobs(fleet.url, "watch", "--once")
    lines = out.splitlines()
    assert code == 0 and len(lines) == 2
    assert "pending 2" in lines[0] and "running 1" in lines[0] and "workers 1/1" in lines[0]
    assert claim["job_id"][:12] in lines[1] and "on ws1" in lines[1]
    assert "running age " in lines[1] and ": epoch 5/10 50%" in lines[1]
    assert "[" not in lines[1] and "\x1b" not in out


def _run_on_a_terminal(argv: list[str], columns: int = 120) -> tuple[int, str]:
    import fcntl
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    proc = subprocess.Popen([sys.executable, "-m", "cis490fleet", "jobs", *argv], stdout=slave, stderr=slave,
                            stdin=subprocess.DEVNULL, env=cli_env(), cwd=ROOT)
    os.close(slave)
    chunks = []
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    return proc.wait(30), b"".join(chunks).decode()


def test_watch_on_a_terminal_draws_progress_bars_in_colour(fleet):
    w, cap = worker(fleet.url)
    claim = w.claim(cap)
    w.heartbeat(claim["job_id"], claim["lease"], progress={"fraction": 0.5, "epoch": 5, "epochs": 10, "loss": 1.5})
    code, out = _run_on_a_terminal(["--receiver", fleet.url, "watch", "--once"])
    assert code == 0, out
    assert "\x1b[" in out
    plain = ANSI.sub("", out)
    assert "[##########..........] epoch 5/10 loss 1.5000 50%" in plain

    code, out = _run_on_a_terminal(["--receiver", fleet.url, "--no-color", "watch", "--once"])
    assert code == 0 and "\x1b[" not in out and "[##########" in out

    code, out = _run_on_a_terminal(["--receiver", fleet.url, "--no-color", "watch", "--once"], columns=50)
    job_line = out.splitlines()[1]
    assert code == 0 and job_line.startswith("  " + claim["job_id"][:12]) and job_line.endswith("…")
    assert len(job_line) == 50  # cut to the terminal's width, so a redraw never wraps


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


# A shell without job control starts background commands with SIGINT ignored, and children inherit that.
@pytest.mark.parametrize("started_with", [None, _ignore_sigint], ids=["default", "sigint-ignored-by-parent"])
def test_watch_stops_on_ctrl_c_with_exit_0(fleet, started_with):
    proc = subprocess.Popen([sys.executable, "-m", "cis490fleet", "jobs", "--receiver", fleet.url, "watch",
                             "--interval", "0.2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=cli_env(), cwd=ROOT, preexec_fn=started_with)
    try:
        first = proc.stdout.readline()
        assert "pending 3" in first
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
        assert "Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_peers_reports_each_url(fleet):
    dead = closed_port_url()
    code, out, _ = jobs(None, "--receiver", fleet.url, "--receiver", dead, "peers")
    assert code == 1
    live_row = next(line for line in out.splitlines() if line.startswith(fleet.url))
    assert live_row.split()[1:3] == ["leader", "1"]
    dead_row = next(line for line in out.splitlines() if line.startswith(dead))
    assert "unreachable" in dead_row and "connection refused" in dead_row

    code, out, _ = jobs(fleet.url, "peers", "--json")
    (report,) = json.loads(out)
    assert code == 0 and report["health"]["role"] == "leader"


# -- failures as one line -----------------------------------------------------------------------


def test_unreachable_coordinator_is_one_line_and_exit_5():
    url = closed_port_url()
    proc = jobs_process("--receiver", url, "status")
    assert proc.returncode == 5
    assert proc.stdout == ""
    (line,) = proc.stderr.splitlines()
    assert url in line and "CIS490_RECEIVER" in line and "--receiver" in line


def test_receiver_from_environment(fleet):
    proc = jobs_process("list", "--json", env=cli_env(CIS490_RECEIVER=f"{closed_port_url()},{fleet.url}"))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["total"] == 3


def test_no_receiver_is_a_usage_error():
    proc = jobs_process("status")
    assert proc.returncode == 2
    (line,) = proc.stderr.splitlines()
    assert "--receiver" in line and "CIS490_RECEIVER" in line


@pytest.mark.parametrize("argv", [["frobnicate"], ["list", "--limit", "0"], ["show"], ["watch", "--interval", "-1"],
                                  []])
def test_bad_usage_is_exit_2(argv):
    code, out, _ = jobs("http://127.0.0.1:9", *argv)
    assert code == 2


def test_bad_receiver_url_is_exit_2():
    proc = jobs_process("--receiver", "coord.lab:8445", "status")
    assert proc.returncode == 2
    assert "'coord.lab:8445'" in proc.stderr and "http://" in proc.stderr


def test_jobs_command_imports_nothing_heavy():
    code = ("import sys, cis490fleet.ops; heavy = {'sqlite3', 'torch', 'tarfile', 'zstandard', 'cis490fleet.bundle',"
            " 'cis490fleet.coordinator', 'cis490fleet.http_api', 'cis490fleet.worker'}; "
            "print(sorted(heavy & set(sys.modules)))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=cli_env(), cwd=ROOT)
    assert proc.stdout.strip() == "[]", proc.stderr


def test_mutual_tls_with_ca_cert_and_key(serve_process, tmp_path):
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1")
    server.cert_chain_pems[0].write_to_path(tmp_path / "server.pem")
    server.private_key_pem.write_to_path(tmp_path / "server.key")
    ca.cert_pem.write_to_path(tmp_path / "ca.pem")
    ca.issue_cert("ops-laptop").private_key_and_cert_chain_pem.write_to_path(tmp_path / "me.pem")
    from cis490fleet import tls

    sp = serve_process(manifest=manifest_toml(2),
                       args=["--cert", str(tmp_path / "server.pem"), "--key", str(tmp_path / "server.key"),
                             "--client-ca", str(tmp_path / "ca.pem")],
                       ssl_context=tls.client_context(tmp_path / "ca.pem", tmp_path / "me.pem"))
    good = jobs_process("--receiver", sp.url, "--ca", str(tmp_path / "ca.pem"), "--cert", str(tmp_path / "me.pem"),
                        "list", "--json")
    assert good.returncode == 0, good.stderr
    assert json.loads(good.stdout)["total"] == 2

    untrusted = jobs_process("--receiver", sp.url, "list")
    assert untrusted.returncode == 5
    (line,) = untrusted.stderr.splitlines()
    assert "TLS" in line and "--ca" in line

    missing = jobs_process("--receiver", sp.url, "--ca", str(tmp_path / "nope.pem"), "list")
    assert missing.returncode == 2 and "nope.pem" in missing.stderr


def test_a_url_that_is_not_a_coordinator_says_so_and_exits_5(tmp_path):
    """A plain web server on loopback (404 pages in HTML) is not taken for a coordinator with a missing job."""
    import http.server

    (tmp_path / "index.html").write_text("<!DOCTYPE HTML><title>hello</title>")
    handler = lambda *a, **kw: http.server.SimpleHTTPRequestHandler(*a, directory=str(tmp_path), **kw)  # noqa: E731
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        for argv in (["show", "3fa9"], ["status"], ["list"]):
            code, out, err = jobs(url, *argv)
            assert (code, out) == (5, ""), (argv, err)
            (line,) = err.splitlines()
            assert "not a cis490fleet coordinator" in line and url in line and "DOCTYPE" not in line
    finally:
        httpd.shutdown()
        httpd.server_close()


TRAINER_CRASH = ("trainer exit code 1; last stderr:\n"
                 "epoch 1 loss 0.93\n"
                 "Traceback (most recent call last):\n"
                 '  File "train.py", line 12, in <module>\n'
                 "    raise ValueError(\"lr must be > 0, got -0.1\")\n"
                 "ValueError: lr must be > 0, got -0.1\n\n")


def test_failures_list_and_show_give_the_trainers_own_last_line(fleet):
    """The worker's summary of a crash ("trainer exit code 1; last stderr:") hides the reason on the lines after
    it: each one-line view shows the trainer's last meaningful line, with the exit code after it."""
    w, cap = worker(fleet.url)
    claim = w.claim(cap)
    w.fail(claim["job_id"], claim["lease"], TRAINER_CRASH)
    want = "ValueError: lr must be > 0, got -0.1 (trainer exit code 1)"

    code, out, _ = jobs(fleet.url, "failures")
    assert code == 0 and out.splitlines()[1].endswith(want), out
    code, out, _ = jobs(fleet.url, "show", claim["job_id"])
    assert code == 0 and re.search(r"^\s+1\s+ws1\s.*failed\s+job\s+" + re.escape(want) + "$", out, re.M), out
    assert "last error\n  trainer exit code 1; last stderr:\n  epoch 1 loss 0.93\n" in out
    code, out, _ = jobs(fleet.url, "list", "--json")
    assert {j["last_error"] for j in json.loads(out)["jobs"] if j["id"] == claim["job_id"]} == {want}


def test_watch_eta_counts_down_between_reports():
    """Refreshes between two progress reports: the ETA shown counts down; it never climbs while waiting."""
    watch = ops.Ops(ops.build_parser().parse_args(["watch"]), ops.Out(io.StringIO(), color=False), io.StringIO())
    t0 = 1_800_000_000.0

    def eta_at(now: float, f: float) -> str:
        job = {"id": "a" * 64, "model": "mlp", "mode": "train", "host": "ws1", "status": "running",
               "started": t0, "progress": {"fraction": f}}
        (_, line) = watch.watch_lines({"health": {"jobs": {"running": 1}}, "workers": [], "running": [job]},
                                      now, bars=False)
        return re.search(r"ETA (\S+)", line).group(1)

    shown = [eta_at(t0 + t, 0.1 * (t // 10)) for t in range(10, 40, 2)]
    seconds = [sum(int(n) * {"s": 1, "m": 60}[u] for n, u in re.findall(r"(\d+)([sm])", s)) for s in shown]
    assert all(b <= a for a, b in zip(seconds, seconds[1:])), shown
    assert shown[0] == "1m30s" and shown[-1] == "1m02s", shown


NAMED = '[[jobs]]\nname = "baseline"\nmodel = "mlp"\nmode = "base"\nhyper = {{ lr = {lr} }}\n'


def test_job_names_work_wherever_an_id_prefix_does(serve_process, operator, tmp_path):
    """``jobs show baseline``: the manifest's names are what people remember; an ambiguous name lists each job
    it names, and a name that names nothing says so (exit 3)."""
    fleet = serve_process(manifest=manifest_toml(2, extra=NAMED.format(lr=0.1)))
    (baseline,) = [j["id"] for j in Client(fleet.url).jobs()["jobs"] if j["name"] == "baseline"]
    code, out, err = jobs(fleet.url, "show", "baseline")
    assert (code, err) == (0, "") and re.search(rf"^id\s+{baseline}$", out, re.M)
    for verb, done in (("cancel", "cancelled"), ("requeue", "requeued")):
        code, out, err = jobs(fleet.url, verb, "baseline")
        assert (code, err, out) == (0, "", f"{done} {baseline[:12]}  baseline\n")
    code, out, err = jobs(fleet.url, "logs", "baseline")
    assert code == 0 and "has no log" in err
    code, out, err = jobs(fleet.url, "fetch", "baseline", "-o", str(tmp_path))
    assert code == 3 and f"job {baseline[:12]} has no artifact yet" in err

    code, out, err = jobs(fleet.url, "show", "basline")
    assert (code, out) == (3, "") and "no job is named 'basline'" in err

    manifest = Path(fleet.argv[fleet.argv.index("--manifest") + 1])
    manifest.write_text(manifest_toml(2, extra=NAMED.format(lr=0.2)), encoding="utf-8")
    assert jobs(fleet.url, "reload")[0] == 0
    code, out, err = jobs(fleet.url, "show", "baseline")
    assert (code, out) == (3, "") and "name 'baseline' names 2 jobs" in err, err
    assert baseline[:12] in err and "no longer in the manifest" in err and len(err.splitlines()) == 1


HIDE_ZSTD = ("import runpy, sys; sys.modules['zstandard'] = None; sys.modules['compression.zstd'] = None; "
             "sys.argv[0] = 'cis490fleet'; runpy.run_module('cis490fleet', run_name='__main__')")


def test_fetch_extract_of_a_zstd_bundle_without_a_zstd_decoder_is_exit_1_and_leaves_nothing(fleet, tmp_path):
    """Plain python3 (no zstandard, older than 3.14) cannot extract a .tar.zst: exit 1 (not the usage code 2)
    with the fix, and neither the download nor an empty folder is left behind."""
    pytest.importorskip("zstandard")
    job_id, sha, _ = _completed_job(fleet.url, tmp_path)
    dest = tmp_path / "fetched"
    proc = subprocess.run([sys.executable, "-c", HIDE_ZSTD, "jobs", "--receiver", fleet.url, "fetch", job_id[:8],
                           "-o", str(dest), "--extract"], capture_output=True, text=True, env=cli_env(), cwd=ROOT,
                          timeout=60)
    assert (proc.returncode, proc.stdout) == (1, ""), proc.stderr
    (line,) = proc.stderr.splitlines()
    assert "pip install zstandard" in line and "3.14" in line and "without --extract" in line
    assert not dest.exists()


@pytest.mark.skipif(sys.version_info < (3, 14), reason="compression.zstd is in the standard library from 3.14")
def test_fetch_extract_uses_the_standard_librarys_zstd_without_zstandard(fleet, tmp_path):
    pytest.importorskip("zstandard")  # to make the .tar.zst bundle
    job_id, sha, src = _completed_job(fleet.url, tmp_path)
    dest = tmp_path / "fetched"
    proc = subprocess.run([sys.executable, "-c", HIDE_ZSTD.replace("sys.modules['compression.zstd'] = None; ", ""),
                           "jobs", "--receiver", fleet.url, "fetch", job_id, "-o", str(dest), "--extract"],
                          capture_output=True, text=True, env=cli_env(), cwd=ROOT, timeout=60)
    assert proc.returncode == 0, proc.stderr
    extracted = Path(proc.stdout.splitlines()[1])
    assert (extracted / "weights.bin").read_bytes() == (src / "weights.bin").read_bytes()


# -- speaking to a command-line user -------------------------------------------------------------


def test_operator_token_errors_tell_a_cli_user_what_to_set(fleet):
    job_id = all_ids(fleet.url)[0]
    for env, words in ((cli_env(), "set CIS490_OPERATOR_TOKEN"),
                       (cli_env(CIS490_OPERATOR_TOKEN="wrong"), "reads it from CIS490_OPERATOR_TOKEN")):
        proc = jobs_process("--receiver", fleet.url, "cancel", job_id[:8], env=env)
        (line,) = proc.stderr.splitlines()
        assert proc.returncode == 4 and words in line and not line.split(": ", 1)[1].startswith("missing"), line


def test_top_level_help_lists_every_jobs_subcommand(capsys):
    assert cli.main(["--help"]) == 0
    (jobs_line,) = [line for line in capsys.readouterr().out.splitlines() if line.strip().startswith("jobs ")]
    assert set(ops.build_parser().subcommands) >= {"status", "failures", "peers"}
    assert set(ops.build_parser().subcommands) <= set(jobs_line.replace(",", " ").split()), jobs_line


def test_with_json_errors_are_json_too(fleet):
    """With --json a script gets every error as one JSON object on stderr (stdout stays for answers only)."""
    cases = [(["--receiver", fleet.url, "show", "nope", "--json"], 3, "not_found"),
             (["--receiver", closed_port_url(), "--json", "status"], 5, "unavailable"),
             (["--receiver", fleet.url, "cancel", all_ids(fleet.url)[0], "--json"], 4, "unauthorized"),
             (["--receiver", fleet.url, "list", "--limit", "0", "--json"], 2, "usage")]
    for argv, exit_, code in cases:
        proc = jobs_process(*argv)
        assert (proc.returncode, proc.stdout) == (exit_, "" if code != "unauthorized" else proc.stdout), proc
        (line,) = proc.stderr.splitlines()
        doc = json.loads(line)
        assert set(doc) == {"error", "detail", "exit"} and (doc["error"], doc["exit"]) == (code, exit_), doc
        assert doc["detail"] and "Traceback" not in doc["detail"]


def test_a_completed_job_shows_no_last_error_of_an_attempt_it_superseded(serve_process, tmp_path):
    fleet = serve_process(manifest=manifest_toml(1).replace("max_attempts = 3", "max_attempts = 3\nretries = 1\nretry_backoff_s = 0"))
    w, cap = worker(fleet.url)
    first = w.claim(cap)
    w.fail(first["job_id"], first["lease"], "CUDA out of memory")
    src = tmp_path / "model"
    src.mkdir()
    (src / "weights.bin").write_bytes(b"w" * 64)
    from cis490fleet import bundle

    path, sha, _ = bundle.make_bundle(src, tmp_path / "upload")
    second = w.claim(cap)
    assert second["job_id"] == first["job_id"]
    w.upload(second["job_id"], second["lease"], path)
    w.complete(second["job_id"], second["lease"], sha)

    code, out, _ = jobs(fleet.url, "show", first["job_id"])
    assert code == 0 and re.search(r"^status\s+completed$", out, re.M)
    assert "last error" not in out, out
    assert re.search(r"^\s+1\s+ws1\s.*failed\s.*CUDA out of memory$", out, re.M), out  # the history keeps it
    assert Client(fleet.url).job(first["job_id"])["job"]["last_error"] is None
