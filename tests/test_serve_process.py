"""``serve`` as a real process: start-up checks, signals, sd_notify, and kill -9 in the middle of work."""

from __future__ import annotations

import hashlib
import http.client
import os
import signal
import socket
import sqlite3
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest

from cis490fleet import coordinator, errors
from conftest import OPERATOR_TOKEN, Conn, http_call, manifest_toml, serve_command, serve_env, signed

ROOT = Path(__file__).resolve().parent.parent
W1 = {"x-lab-host": "ws1"}


def integrity_ok(data_dir: Path) -> None:
    conn = sqlite3.connect(data_dir / "queue.sqlite3")
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        conn.close()


def run_serve(*args: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run serve to completion (for start-up refusals)."""
    return subprocess.run(serve_command(*args), cwd=ROOT, env=serve_env(env), capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


# -- start-up and stop -------------------------------------------------------------------------------


def test_starts_announces_its_url_and_stops_cleanly_on_sigterm(serve_process):
    sp = serve_process(manifest=manifest_toml(2))
    assert f"listening on {sp.url}" in sp.log_text()
    assert (sp.data_dir / "serve.url").read_text().strip() == sp.url
    assert sp.call("GET", "/v1/health")[2]["jobs"]["pending"] == 2
    assert sp.stop(signal.SIGTERM) == 0
    log = sp.log_text()
    assert "database closed" in log and "Traceback" not in log
    # Every connection closed: SQLite checkpointed and removed the write-ahead log.
    assert not (sp.data_dir / "queue.sqlite3-wal").exists()
    assert not (sp.data_dir / "serve.url").exists()
    integrity_ok(sp.data_dir)


def test_sigint_stops_cleanly_too(serve_process):
    sp = serve_process()
    assert sp.stop(signal.SIGINT) == 0
    assert "database closed" in sp.log_text()


def test_sigterm_lets_a_waiting_claim_answer(serve_process):
    sp = serve_process(manifest=manifest_toml(0))
    got = {}

    def wait():
        got["answer"] = http_call(sp.url, "POST", "/v1/job/claim", {"wait": 60}, W1, timeout=120)

    t = threading.Thread(target=wait)
    t.start()
    deadline = time.monotonic() + 30
    while b"cis490fleet_empty_claims_total 1" not in sp.call("GET", "/metrics")[2]:  # it is waiting now
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert sp.stop(signal.SIGTERM) == 0
    t.join(30)
    status, _, body = got["answer"]
    assert status == 200 and body == {"job": None}


def test_plain_http_on_a_non_loopback_address_is_refused(tmp_path):
    result = run_serve("--data", str(tmp_path), "--bind", "0.0.0.0:0")
    assert result.returncode == 2
    assert "without TLS" in result.stderr and "--insecure" in result.stderr and "Traceback" not in result.stderr


def test_insecure_allows_plain_http_on_all_addresses(serve_process):
    sp = serve_process(args=["--bind", "0.0.0.0:0", "--insecure"])
    assert sp.url.startswith("http://0.0.0.0:")
    assert http_call(f"http://127.0.0.1:{sp.port}", "GET", "/v1/health")[0] == 200
    assert sp.stop() == 0


@pytest.mark.parametrize("flags, words", [
    (["--sweep-interval", "0"], "--sweep-interval"),
    (["--max-batch", "0"], "--max-batch"),
    (["--synchronous", "sometimes"], "--synchronous"),
    (["--key", "k.pem"], "--cert"),
])
def test_bad_flags_are_one_line(tmp_path, flags, words):
    result = run_serve("--data", str(tmp_path), "--bind", "127.0.0.1:0", *flags)
    assert result.returncode == 2 and words in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("bind", ["8445", "host:port", "127.0.0.1:70000"])
def test_a_bad_bind_is_one_line(tmp_path, bind):
    result = run_serve("--data", str(tmp_path), "--bind", bind)
    assert result.returncode == 2 and "--bind" in result.stderr and "Traceback" not in result.stderr


def test_an_invalid_manifest_stops_start_up_listing_every_problem(tmp_path):
    manifest = tmp_path / "m.toml"
    manifest.write_text('[fleet]\nheartbeat_s = "often"\n[[jobs]]\nmode = "train"\n')
    result = run_serve("--data", str(tmp_path / "data"), "--bind", "127.0.0.1:0", "--manifest", str(manifest))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "heartbeat_s" in result.stderr and "model" in result.stderr


def test_a_missing_manifest_starts_an_empty_queue_with_a_warning(serve_process, tmp_path):
    sp = serve_process(manifest=tmp_path / "not-yet.toml")
    assert sp.call("GET", "/v1/health")[2]["jobs"]["pending"] == 0
    assert "does not exist yet" in sp.log_text()
    (tmp_path / "not-yet.toml").write_text(manifest_toml(4))
    status, _, body = sp.call("POST", "/v1/manifest/reload", None, {"x-operator-token": OPERATOR_TOKEN})
    assert status == 200 and body["added"] == 4


def test_operator_token_from_a_file_and_never_in_the_log(serve_process, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("file-token-42\n")
    token_file.chmod(0o600)
    sp = serve_process(manifest=manifest_toml(1), token=None, args=["--operator-token-file", str(token_file)])
    reload = "/v1/manifest/reload"
    assert sp.call("POST", reload, None, {"x-operator-token": "file-token-42"})[0] == 200
    assert sp.call("POST", reload, None, {"x-operator-token": OPERATOR_TOKEN})[0] == 403
    assert sp.stop() == 0
    assert "file-token-42" not in sp.log_text()


def test_an_empty_token_file_is_refused(tmp_path):
    (tmp_path / "token").write_text("\n")
    result = run_serve("--data", str(tmp_path), "--bind", "127.0.0.1:0", "--operator-token-file",
                       str(tmp_path / "token"))
    assert result.returncode == 2 and "empty" in result.stderr


def test_a_token_file_that_is_not_text_is_one_line(tmp_path):
    (tmp_path / "token").write_bytes(b"\xff\xfe\x00token")
    result = run_serve("--data", str(tmp_path), "--bind", "127.0.0.1:0", "--operator-token-file",
                       str(tmp_path / "token"))
    assert result.returncode == 2 and "is not UTF-8 text" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_second_serve_on_the_same_data_folder_is_refused(serve_process):
    sp = serve_process()
    result = run_serve("--data", str(sp.data_dir), "--bind", "127.0.0.1:0")
    assert result.returncode == 2 and "in use by another serve" in result.stderr and str(sp.proc.pid) in result.stderr
    assert sp.call("GET", "/v1/health")[0] == 200


def test_default_data_folder_follows_the_environment(tmp_path):
    assert coordinator.default_data_dir({"CIS490_DATA": str(tmp_path)}) == tmp_path
    if os.name != "nt":
        assert coordinator.default_data_dir({"XDG_STATE_HOME": "/state"}) == Path("/state/cis490fleet")
        assert coordinator.default_data_dir({}) == Path.home() / ".local/state/cis490fleet"


def test_serve_run_from_the_zipapp_hands_out_that_very_file(serve_process, tmp_path):
    from cis490fleet import zipbuild

    pyz = zipbuild.build(tmp_path / "cis490fleet.pyz")
    sp = serve_process(program=pyz)
    status, headers, body = sp.call("GET", "/v1/zipapp")
    assert status == 200 and body == pyz.read_bytes()
    assert headers["x-content-sha256"] == hashlib.sha256(body).hexdigest()
    assert sp.stop() == 0


# -- group commit ------------------------------------------------------------------------------------


class GatedStore:
    """A real JobStore whose batches wait at a gate, so the test decides when the writer may commit."""

    def __init__(self, store):
        self.store = store
        self.gate = threading.Event()
        self.batch_sizes: list[int] = []

    def execute_batch(self, cmds):
        self.batch_sizes.append(len(cmds))
        assert self.gate.wait(30)
        return self.store.execute_batch(cmds)


def test_group_commit_applies_everything_waiting_in_one_batch_with_one_result_each(tmp_path):
    from cis490fleet import manifest
    from cis490fleet.jobstore import JobStore

    store = JobStore(tmp_path / "queue.sqlite3")
    store.execute({"op": "sync_manifest", "now": 1.0, "manifest": manifest.parse(manifest_toml(30)).to_json()})
    gated = GatedStore(store)
    writer = coordinator.GroupCommitWriter(gated)
    writer.start()
    try:
        first = writer.submit({"op": "claim", "now": 2.0, "host": "ws0", "capability": {}, "lease": "l0"})
        deadline = time.monotonic() + 30
        while gated.batch_sizes != [1]:  # the writer is inside the first commit now
            assert time.monotonic() < deadline
            time.sleep(0.01)
        claims = [writer.submit({"op": "claim", "now": 3.0, "host": f"ws{i}", "capability": {}, "lease": f"l{i}"})
                  for i in range(1, 21)]
        bad = writer.submit({"op": "heartbeat", "now": 3.0, "job_id": "0" * 64, "host": "ws1", "lease": None})
        gated.gate.set()
        results = [f.result(30) for f in [first] + claims]
        with pytest.raises(errors.NotFound):
            bad.result(30)
    finally:
        gated.gate.set()
        writer.stop()
        store.close()
    assert gated.batch_sizes == [1, 21]
    assert [r["lease"] for r in results] == [f"l{i}" for i in range(21)]
    assert len({r["job_id"] for r in results}) == 21


# -- systemd notification -------------------------------------------------------------------------------


@pytest.mark.parametrize("abstract", [True, False], ids=["abstract", "path"])
def test_sd_notify_ready_watchdog_and_stopping(serve_process, tmp_path, abstract):
    name = f"cis490-test-{uuid.uuid4().hex[:12]}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if abstract:
        sock.bind("\0" + name)
        address = "@" + name
    else:
        address = str(tmp_path / "notify.sock")
        sock.bind(address)
    sock.settimeout(60)
    try:
        sp = serve_process(env={"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "200000"})
        messages = []
        while not any(m.startswith("WATCHDOG=1") for m in messages):
            messages.append(sock.recv(4096).decode())
        assert messages[0].startswith("READY=1") and sp.url in messages[0]
        assert sp.stop() == 0
        while not messages[-1].startswith("STOPPING=1"):
            messages.append(sock.recv(4096).decode())
    finally:
        sock.close()


# -- kill -9 --------------------------------------------------------------------------------------------


def test_kill_9_during_an_upload_leaves_no_half_artifact(serve_process):
    sp = serve_process(manifest=manifest_toml(1))
    _, _, c = sp.call("POST", "/v1/job/claim", {}, W1)
    data = os.urandom(4 << 20)
    sha = hashlib.sha256(data).hexdigest()
    path = f"/v1/model/{c['job_id']}"
    _, headers = signed(sp.host_key("ws1"), "ws1", "PUT", path, None,
                        {**W1, "x-lease": c["lease"], "x-content-sha256": sha, "Content-Length": str(len(data))})
    head = (f"PUT {path} HTTP/1.1\r\nHost: x\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
            + "\r\n").encode()
    with socket.create_connection(("127.0.0.1", sp.port), timeout=30) as sock:
        sock.sendall(head + data[: 1 << 20])
        deadline = time.monotonic() + 30
        while not any(p.stat().st_size for p in (sp.data_dir / "tmp").iterdir()):
            assert time.monotonic() < deadline, "the upload never started on the server"
            time.sleep(0.02)
        sp.kill()
    assert list((sp.data_dir / "tmp").iterdir()), "the test meant to kill mid-upload"

    again = serve_process(data_dir=sp.data_dir)
    integrity_ok(sp.data_dir)
    assert not list((sp.data_dir / "tmp").iterdir())
    assert not list((sp.data_dir / "models").glob("*/*/bundle*"))
    assert again.call("GET", f"/v1/artifact/{sha}")[0] == 404
    index = sp.data_dir / "models" / "index.jsonl"
    assert not index.exists() or sha not in index.read_text()
    _, _, detail = again.call("GET", f"/v1/job/{c['job_id']}")
    assert detail["job"]["status"] == "claimed" and detail["job"]["host"] == "ws1"
    assert detail["job"]["artifact_id"] is None
    status, _, body = again.call("PUT", f"/v1/model/{c['job_id']}", data,
                                 {**W1, "x-lease": c["lease"], "x-content-sha256": sha})
    assert status == 201 and body["artifact_id"] == sha


def test_kill_9_during_a_burst_of_claims_loses_no_acknowledged_claim(serve_process):
    n_jobs = 300
    sp = serve_process(manifest=manifest_toml(n_jobs))
    acked: dict[str, tuple[str, str]] = {}
    lock = threading.Lock()
    enough = threading.Event()
    twice = []

    def claimer(i: int):
        host = f"ws{i}"
        try:
            with Conn(sp.url, timeout=30) as conn:
                while True:
                    status, _, body = conn.call("POST", "/v1/job/claim", {"capability": {"slots": 1000}},
                                                {"x-lab-host": host})
                    if status != 200 or body["job"] is None:
                        return
                    with lock:
                        if body["job_id"] in acked:
                            twice.append(body["job_id"])
                        acked[body["job_id"]] = (host, body["lease"])
                        if len(acked) >= 40:
                            enough.set()
        except (OSError, http.client.HTTPException):
            return  # the server was killed under us

    threads = [threading.Thread(target=claimer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    assert enough.wait(60), "claims did not get going"
    sp.kill()
    for t in threads:
        t.join(60)
    with lock:
        before = dict(acked)
    assert not twice, "a job was handed out twice"
    assert len(before) < n_jobs, "the burst ended before the kill; the test proves nothing"

    again = serve_process(data_dir=sp.data_dir)
    integrity_ok(sp.data_dir)
    health = again.call("GET", "/v1/health")[2]
    assert sum(health["jobs"].values()) == n_jobs
    for job_id, (host, lease) in before.items():
        _, _, detail = again.call("GET", f"/v1/job/{job_id}")
        job = detail["job"]
        assert job["status"] == "claimed" and job["host"] == host, job_id
        assert len(job["attempts"]) == 1 and lease.startswith(job["attempts"][0]["lease"])
    # The rest are handed out once each, and never one that was acknowledged before the kill.
    after = set()
    with Conn(again.url) as conn:
        while True:
            _, _, body = conn.call("POST", "/v1/job/claim", {"capability": {"slots": 1000}}, {"x-lab-host": "late"})
            if body["job"] is None:
                break
            assert body["job_id"] not in before and body["job_id"] not in after
            after.add(body["job_id"])
    health = again.call("GET", "/v1/health")[2]
    assert health["jobs"]["claimed"] == n_jobs and health["jobs"]["pending"] == 0
    assert again.stop() == 0
