"""Hostile input never kills anything: slow clients, deep or non-finite JSON, a full disk, a crashing handler,
a dying thread. Everything runs for real: loopback sockets, a serve subprocess, a tmpfs that fills up."""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from cis490fleet import http_api
from conftest import Conn, manifest_toml

SLOW_CLIENTS = 520
ATTACKER = "127.0.0.2"  # another loopback address: the per-address cap is per client address


def worker(host: str) -> dict:
    return {"x-lab-host": host}


def serve_in_thread(server) -> None:
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()


@pytest.fixture
def srv(live_server):
    return live_server(manifest_toml(3))


def open_slow(port: int, n: int, first: bytes) -> list[socket.socket]:
    """``n`` connections from ATTACKER that send ``first`` and then nothing; refused ones are closed."""
    held = []
    for _ in range(n):
        sock = socket.socket()
        sock.settimeout(5)
        sock.bind((ATTACKER, 0))
        try:
            sock.connect(("127.0.0.1", port))
            if first:
                sock.sendall(first)
        except OSError:
            sock.close()
            continue
        held.append(sock)
    return held


def queue_dump(srv) -> list:
    status, _, body = srv.call("GET", "/v1/jobs")
    assert status == 200, body
    return sorted((j["id"], j["status"], j["attempts"]) for j in body["jobs"])


# -- slow clients hold only their own connections ---------------------------------------------


def test_520_slow_clients_do_not_turn_another_client_away(srv):
    slow = open_slow(srv.port, SLOW_CLIENTS, b"GET /v1/health HTTP/1.1\r\nHost: x\r\n")  # a head that never ends
    try:
        t0 = time.monotonic()
        status, _, body = srv.call("GET", "/v1/health", timeout=10)
        assert status == 200 and body["ok"] is True
        assert time.monotonic() - t0 < 5
        assert srv.server.guard.held(ATTACKER) <= srv.server.guard.per_address
        # Beyond its share, the attacker's connections were answered 503 (or reset: it had sent bytes the
        # server never read) and closed at once.
        answers = [_answer_or_close(s, 0.01) for s in slow]
        refused = [a for a in answers if a is not None]
        assert len(refused) >= SLOW_CLIENTS - srv.server.guard.per_address - 1
        assert all(a == b"" or a.startswith(b"HTTP/1.1 503") for a in refused)
        assert any(a.startswith(b"HTTP/1.1 503") for a in refused)
    finally:
        for sock in slow:
            sock.close()


def _answer_or_close(sock: socket.socket, timeout: float) -> bytes | None:
    """What the server sent (b"" when it closed), or None when it sent nothing within ``timeout``."""
    sock.settimeout(timeout)
    try:
        return sock.recv(4096)
    except (TimeoutError, socket.timeout):
        return None
    except OSError:
        return b""


def test_a_head_that_trickles_in_is_dropped_at_its_deadline(srv):
    quick = http_api.FleetHTTPServer(("127.0.0.1", 0), srv.coordinator, head_s=1.0)
    serve_in_thread(quick)
    try:
        with socket.create_connection(("127.0.0.1", quick.port), timeout=10) as sock:
            t0 = time.monotonic()
            ended = None
            # One byte every 0.2 s: a per-read timeout would never fire.
            for byte in b"GET /v1/health HTTP/1.1\r\nHost: x\r\nx-pad: " + b"a" * 100:
                try:
                    sock.sendall(bytes([byte]))
                except OSError:
                    ended = time.monotonic() - t0
                    break
                if _answer_or_close(sock, 0.2) == b"":
                    ended = time.monotonic() - t0
                    break
            assert ended is not None and ended < 4, ended
        # An idle keep-alive connection is not a slow head: it is kept until its next request.
        with Conn(f"http://127.0.0.1:{quick.port}") as conn:
            assert conn.call("GET", "/v1/health")[0] == 200
            time.sleep(1.5)
            assert conn.call("GET", "/v1/health")[0] == 200
    finally:
        quick.shutdown()
        quick.server_close()


def test_520_silent_tls_clients_do_not_turn_another_client_away(srv, tmp_path):
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("127.0.0.1").configure_cert(server_ctx)
    tls_server = http_api.FleetHTTPServer(("127.0.0.1", 0), srv.coordinator, ssl_context=server_ctx,
                                          handshake_s=1.0)
    serve_in_thread(tls_server)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    slow = open_slow(tls_server.port, SLOW_CLIENTS, b"")  # connect, never say hello
    try:
        conn = http.client.HTTPSConnection("127.0.0.1", tls_server.port, context=client_ctx, timeout=10)
        conn.request("GET", "/v1/health")
        assert conn.getresponse().status == 200
        conn.close()
        # The silent ones that got in are dropped at the handshake deadline.
        t0 = time.monotonic()
        while tls_server.guard.held(ATTACKER) and time.monotonic() - t0 < 10:
            time.sleep(0.1)
        assert tls_server.guard.held(ATTACKER) == 0
    finally:
        for sock in slow:
            sock.close()
        tls_server.shutdown()
        tls_server.server_close()


# -- JSON at the edge -----------------------------------------------------------------------------


@pytest.mark.parametrize("body", [
    b'{"capability": {"ram_gib": 1e999}}',
    b'{"capability": {"ram_gib": -1e400}}',
    b'{"capability": {"ram_gib": NaN}}',
    b'{"capability": {"ram_gib": Infinity}}',
])
def test_non_finite_numbers_are_a_400_and_change_nothing(srv, body):
    before = queue_dump(srv)
    with Conn(srv.url) as conn:
        status, _, answer = conn.call("POST", "/v1/job/claim", body, {**worker("ws1"),
                                                                       "content-type": "application/json"})
        assert status == 400 and answer["error"] == "bad_request", answer
        assert "finite" in answer["detail"]
        assert conn.call("GET", "/v1/health")[0] == 200  # the same connection carries on
    assert queue_dump(srv) == before


@pytest.mark.parametrize("levels", [65, 980, 100_000])
def test_deep_json_is_a_400_and_reads_keep_working(srv, levels):
    status, _, job = srv.call("POST", "/v1/job/claim", {"capability": {}}, worker("ws1"))
    assert status == 200 and job["job"]
    before = queue_dump(srv)
    deep = b'[{"progress": ' + b'{"a": ' * levels + b"1" + b"}" * levels + b"}]"
    status, _, answer = srv.call("POST", f"/v1/job/{job['job_id']}/heartbeat", deep,
                                 {**worker("ws1"), "x-lease": job["lease"]})
    assert status == 400 and "levels deep" in answer["detail"], answer
    assert queue_dump(srv) == before
    shallow = b'[{"progress": ' + b'{"a": ' * 3 + b"1" + b"}" * 3 + b"}]"
    status, _, answer = srv.call("POST", f"/v1/job/{job['job_id']}/heartbeat", shallow,
                                 {**worker("ws1"), "x-lease": job["lease"]})
    assert status == 200, answer
    assert srv.call("GET", "/v1/jobs")[0] == 200


# -- a thread serve needs ends: serve exits non-zero, so systemd restarts it ----------------------

# Runs serve in the main thread; once it listens, raises an exception inside the named thread, as an
# unexpected bug there would.
STRIKE = """
import ctypes, pathlib, sys, threading, time
from cis490fleet import cli
victim, url_file = sys.argv[1], pathlib.Path(sys.argv[2])

def strike():
    while not url_file.exists():
        time.sleep(0.05)
    time.sleep(0.5)
    for thread in threading.enumerate():
        if thread.name == victim:
            ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident),
                                                       ctypes.py_object(RuntimeError))
            print("struck", victim, flush=True)

threading.Thread(target=strike, daemon=True).start()
sys.exit(cli.main(["serve", *sys.argv[3:]]))
"""


@pytest.mark.parametrize("victim", ["http-accept", "stale-sweeper", "raft-driver"])
def test_serve_exits_non_zero_when_a_thread_it_needs_ends(tmp_path, victim):
    from conftest import serve_env

    port = _free_port()
    args = ["--data", str(tmp_path / "data"), "--bind", f"127.0.0.1:{port}", "--port-file", str(tmp_path / "url"),
            "--sweep-interval", "0.2"]
    if victim == "raft-driver":
        args += ["--node-id", "a", "--peer", f"a=http://127.0.0.1:{port}"]
    proc = subprocess.Popen([sys.executable, "-c", STRIKE, victim, str(tmp_path / "url"), *args],
                            env=serve_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            stdin=subprocess.DEVNULL)
    try:
        output, _ = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        output, _ = proc.communicate()
        pytest.fail(f"serve kept running after its {victim} thread ended:\n{output[-3000:]}")
    assert f"struck {victim}" in output, output[-3000:]
    assert proc.returncode == 1, output[-3000:]
    assert f"the {victim} thread ended unexpectedly" in output
    assert "Traceback" in output  # the thread's own traceback is in the log


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- a full disk is a 507 with the fix, and loses nothing already stored --------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A 16 MiB tmpfs, mounted for this test (we run as root); skipped where mounting is not allowed."""
    mount = tmp_path / "disk"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip() or proc.returncode}); "
                    "the full-disk test needs one")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def fill(folder: Path) -> Path:
    """Write a file in ``folder`` until the file system has no byte left; returns it."""
    filler = folder / "filler"
    with open(filler, "wb", buffering=0) as f:
        for size in (1 << 20, 1 << 12, 1):
            try:
                while f.write(b"\0" * size):
                    pass
            except OSError:
                pass
    return filler


def worker_lease(host: str, lease: str) -> dict:
    return {"x-lab-host": host, "x-lease": lease}


def put_bundle(srv, job: dict, data: bytes):
    import hashlib

    headers = {**worker_lease("ws1", job["lease"]), "x-content-sha256": hashlib.sha256(data).hexdigest()}
    return srv.call("PUT", f"/v1/model/{job['job_id']}", data, headers)


def test_a_full_disk_is_507_with_the_fix_and_loses_nothing(small_disk, live_server):
    import os

    srv = live_server(manifest_toml(3), data_dir=small_disk / "data")
    first = srv.call("POST", "/v1/job/claim", {"capability": {}}, worker("ws1"))[2]
    stored = os.urandom(64 << 10)
    status, _, art = put_bundle(srv, first, stored)
    assert status == 201, art
    assert srv.call("POST", f"/v1/job/{first['job_id']}/complete", {"artifact_id": art["artifact_id"]},
                    worker_lease("ws1", first["lease"]))[0] == 200
    second = srv.call("POST", "/v1/job/claim", {"capability": {}}, worker("ws1"))[2]
    before = queue_dump(srv)

    filler = fill(small_disk)
    status, _, answer = put_bundle(srv, second, os.urandom(1 << 20))
    assert status == 507 and answer["error"] == "disk_full", answer
    assert "disk is full" in answer["detail"] and "free space" in answer["detail"]
    # Queue writes: SQLite says "database or disk is full" once its files cannot grow.
    statuses = set()
    for _ in range(20):
        status, _, answer = srv.call("POST", f"/v1/job/{second['job_id']}/heartbeat",
                                     [{"progress": {"epoch": 1}, "log_tail": "x" * (200 << 10)}],
                                     worker_lease("ws1", second["lease"]))
        statuses.add(status)
        if status != 200:
            assert status == 507 and answer["error"] == "disk_full", answer
            break
    assert 507 in statuses and 500 not in statuses
    # Everything stored before is still there, and the server still answers.
    assert queue_dump(srv) == before
    status, _, data = srv.call("GET", f"/v1/artifact/{art['artifact_id']}")
    assert status == 200 and data == stored

    filler.unlink()
    status, _, art2 = put_bundle(srv, second, os.urandom(1 << 20))
    assert status == 201, art2
    assert srv.call("POST", f"/v1/job/{second['job_id']}/complete", {"artifact_id": art2["artifact_id"]},
                    worker_lease("ws1", second["lease"]))[0] == 200
    index = (small_disk / "data" / "models" / "index.jsonl").read_text().splitlines()
    assert [json.loads(line)["artifact_id"] for line in index] == [art["artifact_id"], art2["artifact_id"]]


# -- jobs fetch --extract refuses a bundle that would expand past --max-extract -------------------


def gz_bomb(folder: Path, expanded: int) -> bytes:
    """A .tar.gz whose one file of zeros expands to ``expanded`` bytes (about 1000x smaller packed)."""
    import gzip
    import io
    import tarfile

    raw = io.BytesIO()
    with gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz, tarfile.open(fileobj=gz, mode="w|") as tar:
        info = tarfile.TarInfo("weights.bin")
        info.size = expanded
        tar.addfile(info, _Zeros(expanded))
    return raw.getvalue()


class _Zeros:
    def __init__(self, n: int):
        self.left = n

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        self.left -= n
        return b"\0" * n


def test_fetch_extract_refuses_a_bundle_past_max_extract_and_leaves_nothing(live_server, tmp_path):
    import io

    from cis490fleet import ops

    srv = live_server(manifest_toml(1))
    job = srv.call("POST", "/v1/job/claim", {"capability": {}}, worker("ws1"))[2]
    bomb = gz_bomb(tmp_path, 8 << 20)
    status, _, art = put_bundle(srv, job, bomb)
    assert status == 201, art
    assert srv.call("POST", f"/v1/job/{job['job_id']}/complete", {"artifact_id": art["artifact_id"]},
                    worker_lease("ws1", job["lease"]))[0] == 200

    def fetch(*extra) -> tuple[int, str]:
        out, err = io.StringIO(), io.StringIO()
        code = ops.main(["--receiver", srv.url, "fetch", job["job_id"], "-o", str(dest), "--extract", *extra],
                        stdout=out, stderr=err)
        return code, err.getvalue()

    dest = tmp_path / "fetched"
    code, err = fetch("--max-extract", "4M")
    assert code == 1 and "would expand to more than 4194304 bytes" in err and "--max-extract" in err, err
    assert not dest.exists(), list(dest.rglob("*"))
    code, err = fetch("--max-extract", "9M")
    assert code == 0, err
    assert (dest / f"mlp_train-{art['artifact_id'][:12]}" / "weights.bin").stat().st_size == 8 << 20


def test_the_default_extract_limit_is_200x_between_1_and_64_gib():
    from cis490fleet import bundle

    assert bundle.default_max_extract(1 << 20) == 1 << 30
    assert bundle.default_max_extract(10 << 20) == 2000 << 20
    assert bundle.default_max_extract(1 << 40) == 64 << 30


# -- an unexpected exception in a handler is a 500 for that request; the server carries on ---------


def test_a_handler_that_raises_answers_500_logs_the_traceback_and_the_connection_lives_on(srv, caplog):
    def broken(req):
        raise ZeroDivisionError("a bug in a handler")

    srv.server.router.add("GET", "/v1/broken", broken)
    with caplog.at_level("ERROR", logger="cis490fleet.http_api"), Conn(srv.url) as conn:
        for _ in range(3):
            status, _, body = conn.call("GET", "/v1/broken")
            assert status == 500 and body["error"] == "internal" and "server log" in body["detail"]
            assert conn.call("GET", "/v1/health")[0] == 200  # the same keep-alive connection, still served
    tracebacks = [r for r in caplog.records if r.exc_info and r.exc_info[0] is ZeroDivisionError]
    assert len(tracebacks) == 3
    assert queue_dump(srv)  # and the queue still reads


def test_a_full_work_disk_loses_log_lines_but_never_blocks_the_trainer(small_disk, tmp_path):
    from cis490fleet.slots import Slot
    from cis490fleet.trainer_process import TrainerRun

    go = tmp_path / "go"
    script = tmp_path / "chatty.py"
    script.write_text(
        "import os, sys, time\n"
        f"while not os.path.exists({str(go)!r}):\n    time.sleep(0.05)\n"
        "for i in range(40000):\n    print('epoch line', i, 'x' * 40)\n"  # ~2 MB: far more than a pipe holds
        "print('done-marker', file=sys.stderr)\n")
    claim = {"job_id": "ab" * 32, "attempt": 1, "job": {"model": "mlp", "mode": "train"},
             "trainer": {"command": ["{python}", str(script)]}}
    run = TrainerRun(claim, Slot(0, ""), small_disk / "work", now=0.0)
    run.spawn()
    try:
        fill(small_disk)
        go.touch()
        deadline = time.monotonic() + 60
        while run.poll() is None:
            assert time.monotonic() < deadline, "the trainer blocked: nobody read its output once the disk was full"
            time.sleep(0.05)
        assert run.poll() == 0
        assert run.stderr_tail() == "done-marker\n"  # the failure reasons still come through
    finally:
        if run.proc is not None and run.proc.poll() is None:
            run.proc.kill()


def test_a_bundle_that_does_not_fit_the_work_disk_is_a_host_problem_retried_not_the_jobs_failure(
        small_disk, live_server):
    import os

    from cis490fleet.client import Client
    from cis490fleet.result_outbox import Outbox
    from cis490fleet.slots import Slot
    from cis490fleet.trainer_process import TrainerRun

    srv = live_server(manifest_toml(1))
    claim = srv.call("POST", "/v1/job/claim", {"capability": {}}, worker("ws1"))[2]
    run = TrainerRun(claim, Slot(0, ""), small_disk / "work", now=0.0)
    run.out.mkdir(parents=True)
    (run.out / "weights.bin").write_bytes(os.urandom(4 << 20))  # the trainer's output, already on disk
    reserve = small_disk / "reserve"
    reserve.write_bytes(b"\0" * (256 << 10))
    fill(small_disk)
    reserve.unlink()  # room for the small result record, none for a 4 MiB bundle
    with Client(srv.url, host_id="ws1", retries=0) as client:
        Outbox(client, small_disk / "work" / "pending", threading.Event()).finish(run)
    job = srv.call("GET", f"/v1/job/{claim['job_id']}")[2]["job"]
    assert job["status"] == "pending", job  # another try, on this host once it has room or on another
    assert "disk is full" in json.dumps(job["attempts"]), job["attempts"]


def test_an_exempt_address_is_not_held_to_its_share(srv):
    """The group's peers forward many workers' long-polls over their own connections."""
    guarded = http_api.FleetHTTPServer(("127.0.0.1", 0), srv.coordinator, per_address=4,
                                       exempt=lambda address: address == ATTACKER)
    serve_in_thread(guarded)
    peer = open_slow(guarded.port, 10, b"")
    others = []
    try:
        t0 = time.monotonic()
        while guarded.guard.held(ATTACKER) < 10 and time.monotonic() - t0 < 10:
            time.sleep(0.05)
        assert guarded.guard.held(ATTACKER) == 10
        for _ in range(6):  # an address that is not exempt gets its share and 503s after
            sock = socket.create_connection(("127.0.0.1", guarded.port), timeout=5)
            others.append(sock)
        answers = [_answer_or_close(s, 0.5) for s in others]
        assert sum(1 for a in answers if a is not None and a.startswith(b"HTTP/1.1 503")) == 2, answers
    finally:
        for sock in peer + others:
            sock.close()
        guarded.shutdown()
        guarded.server_close()


def test_an_ipv6_host_counts_as_its_whole_64_network():
    from cis490fleet.connection_guard import client_key

    assert client_key("2001:db8:1:2::1") == client_key("2001:db8:1:2:ffff::9") == "2001:db8:1:2::/64"
    assert client_key("2001:db8:1:3::1") != client_key("2001:db8:1:2::1")
    assert client_key("::ffff:10.0.0.7") == "10.0.0.7" and client_key("10.0.0.7") == "10.0.0.7"
