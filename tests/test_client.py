"""client.Client against real HTTP servers on 127.0.0.1: connection reuse, failover, retries, streaming, errors.

The transport is tested against small real ``http.server`` servers whose
behaviour each test scripts (a 503 burst, a dropped answer, a closed idle
socket); the wire contract end to end is tested against ``serve`` in
tests/test_ops_cli.py.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import socket
import ssl
import threading
import tracemalloc

import pytest

from conftest import closed_port_url

from cis490fleet import errors
from cis490fleet.client import Client, parse_urls


class Recorder(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, handler):
        super().__init__(("127.0.0.1", 0), Handler)
        self.handler = handler  # (server, request handler) -> (status, headers, body) or None to drop
        self.requests: list[tuple[str, str, dict, bytes]] = []
        self.peers: set[tuple[str, int]] = set()
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def log_message(self, *args):
        pass

    def _handle(self):
        length = int(self.headers.get("content-length") or 0)
        digest, body, remaining = hashlib.sha256(), b"", length
        while remaining:
            chunk = self.rfile.read(min(remaining, 65536))
            if not chunk:
                break
            digest.update(chunk)
            if len(body) < 4096:
                body += chunk[:4096]
            remaining -= len(chunk)
        self.body_sha = digest.hexdigest()
        self.body_len = length - remaining
        with self.server.lock:
            self.server.requests.append((self.command, self.path, dict(self.headers), body))
            self.server.peers.add(self.client_address)
        reply = self.server.handler(self.server, self)
        if reply is None:
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        status, headers, payload = reply
        if not isinstance(payload, bytes):
            payload = json.dumps(payload).encode()
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("content-length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_POST = do_PUT = _handle


def ok_handler(server, req):
    return 200, {"content-type": "application/json"}, {"ok": True, "path": req.path}


@pytest.fixture
def serve_with():
    servers = []

    def start(handler=ok_handler) -> Recorder:
        srv = Recorder(handler)
        threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(srv)
        return srv

    yield start
    for srv in servers:
        srv.shutdown()
        srv.server_close()


def fast(urls, **kw) -> Client:
    kw.setdefault("retries", 2)
    return Client(urls, backoff_s=0.01, **kw)


# -- URLs ---------------------------------------------------------------------------------------


def test_urls_from_env_comma_separated_and_deduplicated(monkeypatch):
    monkeypatch.setenv("CIS490_RECEIVER", "http://a:8445/, https://b.lab:8445,http://a:8445")
    assert parse_urls(None) == ["http://a:8445", "https://b.lab:8445"]
    assert parse_urls(["http://x", "http://y:1,http://x"]) == ["http://x", "http://y:1"]


def test_missing_url_names_the_flag_and_variable(monkeypatch):
    monkeypatch.delenv("CIS490_RECEIVER", raising=False)
    with pytest.raises(errors.ConfigError, match="--receiver.*CIS490_RECEIVER"):
        Client()


@pytest.mark.parametrize("bad", ["coord.lab:8445", "ftp://coord.lab", "http://", "http://h:notaport", "http://h/?q=1"])
def test_bad_url_is_a_config_error_naming_it(bad):
    with pytest.raises(errors.ConfigError) as info:
        parse_urls(bad)
    assert repr(bad) in str(info.value)


# -- connections --------------------------------------------------------------------------------


def test_hundred_requests_use_one_connection(serve_with):
    srv = serve_with()
    client = fast(srv.url)
    for _ in range(100):
        assert client.health()["ok"] is True
    assert client.connections_opened == 1
    assert len(srv.peers) == 1
    assert len(srv.requests) == 100


def test_each_thread_keeps_its_own_connection(serve_with):
    srv = serve_with()
    client = fast(srv.url)
    failures = []

    def work():
        try:
            for _ in range(10):
                client.workers()
        except Exception as err:  # collected, asserted below
            failures.append(err)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures
    assert client.connections_opened == 4
    assert len(srv.requests) == 40


def test_reconnects_when_server_closed_the_idle_connection(serve_with):
    def close_after_reply(server, req):
        req.close_connection = True  # answer, then close without saying so in a header
        return 200, {}, {"ok": True}

    srv = serve_with(close_after_reply)
    client = fast(srv.url, retries=0)
    for _ in range(3):
        assert client.health() == {"ok": True}
    assert client.connections_opened == 3
    assert len(srv.requests) == 3


def test_tls_reuses_one_connection(serve_with, tmp_path):
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    srv = serve_with()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    cert.configure_cert(ctx)
    srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    client = fast(srv.url.replace("http:", "https:"), ca=ca_file)
    for _ in range(20):
        assert client.health()["ok"] is True
    assert client.connections_opened == 1

    untrusting = fast(srv.url.replace("http:", "https:"), retries=0)
    with pytest.raises(errors.Unavailable, match="TLS handshake failed.*--ca"):
        untrusting.health()


# -- failover and retries -----------------------------------------------------------------------


def test_unreachable_names_every_url_and_how_to_fix(monkeypatch):
    a, b = closed_port_url(), closed_port_url()
    client = fast([a, b], retries=1)
    with pytest.raises(errors.Unavailable) as info:
        client.health()
    message = str(info.value)
    assert a in message and b in message
    assert "--receiver" in message and "CIS490_RECEIVER" in message
    assert "\n" not in message


def test_moves_past_a_dead_peer_and_remembers_the_live_one(serve_with):
    srv = serve_with()
    client = fast([closed_port_url(), srv.url], retries=0)
    assert client.health()["ok"]
    assert client.urls[client._preferred] == srv.url
    for _ in range(5):
        client.health()
    assert client.connections_opened == 1


def test_idempotent_request_retried_through_503(serve_with):
    answers = iter([503, 503, 200])

    def flaky(server, req):
        status = next(answers)
        return status, {}, ({"ok": True} if status == 200 else {"error": "unavailable", "detail": "no leader yet"})

    srv = serve_with(flaky)
    assert fast(srv.url, retries=3).heartbeat("a" * 64, "L1", progress={"epoch": 1}) == {"ok": True}
    assert len(srv.requests) == 3


def test_503_that_never_clears_raises_the_servers_error(serve_with):
    srv = serve_with(lambda s, r: (503, {}, {"error": "unavailable", "detail": "no leader: election in progress"}))
    with pytest.raises(errors.Unavailable, match="election in progress"):
        fast(srv.url, retries=2).jobs()
    assert len(srv.requests) == 3


def headers_of(request) -> dict:
    return {k.lower(): v for k, v in request[2].items()}


def test_claim_whose_answer_is_lost_is_repeated_with_the_same_session_serial(serve_with):
    srv = serve_with(lambda s, r: None)  # reads the request, then hangs up without answering
    client = fast(srv.url, retries=3)
    with pytest.raises(errors.Unavailable, match="sent, but no answer"):
        client.claim({"host": "ws1"})
    assert [r[1] for r in srv.requests] == ["/v1/job/claim"] * 4
    sessions = {(headers_of(r)["x-client-id"], headers_of(r)["x-client-serial"]) for r in srv.requests}
    assert len(sessions) == 1
    (client_id, serial), = sessions
    assert client_id.startswith(client.client_id) and serial == "1"

    with pytest.raises(errors.Unavailable):
        client.cancel("abc")
    assert {headers_of(r)["x-client-serial"] for r in srv.requests[4:]} == {"2"}


def test_claim_503_is_retried_with_the_same_serial(serve_with):
    def flaky(server, req):
        if len(server.requests) < 3:
            return 503, {}, {"error": "unavailable", "detail": "no leader yet"}
        return 200, {}, {"job": None}

    srv = serve_with(flaky)
    assert fast(srv.url, retries=3).claim({"host": "ws1"}, wait=1) == {"job": None}
    assert [headers_of(r)["x-client-serial"] for r in srv.requests] == ["1", "1", "1"]


def test_every_write_sends_a_new_serial_and_reads_send_none(serve_with):
    srv = serve_with()
    client = fast(srv.url, host_id="ws1", operator_token="t")
    client.register({})
    client.heartbeat("f" * 64, "L")
    client.complete("f" * 64, "L", "a" * 64)
    client.fail("f" * 64, "L", "boom")
    client.release("f" * 64, "L")
    client.requeue("abc")
    client.reload()
    client.jobs()
    client.health()
    serials = [headers_of(r).get("x-client-serial") for r in srv.requests]
    assert serials == ["1", "2", "3", "4", "5", "6", "7", None, None]


def test_claim_retried_on_another_peer_when_first_refuses_connections(serve_with):
    srv = serve_with(lambda s, r: (200, {}, {"job": None}))
    assert fast([closed_port_url(), srv.url]).claim({"host": "ws1"}) == {"job": None}
    assert len(srv.requests) == 1


# -- errors and headers -------------------------------------------------------------------------


@pytest.mark.parametrize("status,code,cls", [
    (409, "stale_lease", errors.StaleLease),
    (404, "not_found", errors.NotFound),
    (401, "unauthorized", errors.Unauthorized),
    (403, "forbidden", errors.Forbidden),
    (400, "ambiguous_id", errors.AmbiguousId),
    (409, "conflict", errors.InvalidTransition),
    (413, "too_large", errors.TooLarge),
])
def test_server_errors_come_back_as_their_class(serve_with, status, code, cls):
    srv = serve_with(lambda s, r: (status, {}, {"error": code, "detail": f"the {code} detail"}))
    with pytest.raises(cls, match=f"the {code} detail"):
        fast(srv.url).job("abc")


def test_stale_lease_from_wire_has_its_attributes(serve_with):
    srv = serve_with(lambda s, r: (409, {}, {"error": "stale_lease", "detail": "lost it"}))
    with pytest.raises(errors.StaleLease) as info:
        fast(srv.url).fail("a" * 64, "L", "boom")
    assert info.value.job_id is None and info.value.holder is None


def test_non_json_error_names_status_and_url(serve_with):
    srv = serve_with(lambda s, r: (500, {"content-type": "text/html"}, b"<h1>proxy exploded</h1>"))
    with pytest.raises(errors.Unavailable, match=r"not a cis490fleet coordinator.*HTTP 500 .proxy exploded.") as info:
        fast(srv.url).workers()
    assert srv.url in str(info.value)


def test_non_json_success_is_reported(serve_with):
    srv = serve_with(lambda s, r: (200, {}, b"hello"))
    with pytest.raises(errors.Unavailable, match="is not a cis490fleet coordinator.*HTTP 200 .hello."):
        fast(srv.url).health()


def test_identity_token_and_lease_headers(serve_with):
    srv = serve_with()
    client = fast(srv.url, host_id="ws1", operator_token="s3cret")
    client.heartbeat("f" * 64, "lease-7", progress={"epoch": 2}, log_tail="line\n")
    client.cancel("abc123")
    (m1, p1, h1, b1), (m2, p2, h2, _) = srv.requests
    h1 = {k.lower(): v for k, v in h1.items()}
    assert (m1, p1) == ("POST", f"/v1/job/{'f' * 64}/heartbeat")
    assert h1["x-lab-host"] == "ws1" and h1["x-operator-token"] == "s3cret" and h1["x-lease"] == "lease-7"
    assert json.loads(b1) == {"progress": {"epoch": 2}, "log_tail": "line\n"}
    assert (m2, p2) == ("POST", "/v1/job/abc123/cancel")


def test_token_from_environment(serve_with, monkeypatch):
    monkeypatch.setenv("CIS490_OPERATOR_TOKEN", "from-env")
    srv = serve_with()
    fast(srv.url).reload()
    assert {k.lower(): v for k, v in srv.requests[0][2].items()}["x-operator-token"] == "from-env"


def test_ids_are_quoted_into_one_path_segment(serve_with):
    srv = serve_with()
    fast(srv.url).job("../../etc/passwd")
    assert srv.requests[0][1] == "/v1/job/..%2F..%2Fetc%2Fpasswd"


def test_jobs_query_string(serve_with):
    srv = serve_with()
    fast(srv.url).jobs(status="running", host="ws1", limit=5, offset=10)
    assert srv.requests[0][1] == "/v1/jobs?status=running&host=ws1&limit=5&offset=10"


# -- streaming ----------------------------------------------------------------------------------


def test_upload_streams_without_holding_the_bundle(serve_with, tmp_path):
    bundle = tmp_path / "bundle.tar"
    with open(bundle, "wb") as f:
        for i in range(24):
            f.write(os.urandom(1 << 20))
    want = hashlib.sha256(bundle.read_bytes()).hexdigest()
    seen = {}

    def store(server, req):
        seen.update(sha=req.body_sha, length=req.body_len, headers={k.lower(): v for k, v in req.headers.items()})
        return 201, {}, {"artifact_id": req.body_sha, "path": "models/x", "deduplicated": False}

    srv = serve_with(store)
    client = fast(srv.url, host_id="ws1")
    tracemalloc.start()
    try:
        result = client.upload("a" * 64, "lease-1", bundle)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result["artifact_id"] == want
    assert seen["sha"] == want and seen["length"] == 24 << 20
    assert seen["headers"]["x-content-sha256"] == want
    assert seen["headers"]["content-length"] == str(24 << 20)
    assert seen["headers"]["x-lease"] == "lease-1"
    assert peak < 6 << 20, f"upload held {peak} bytes at once"


def test_upload_of_missing_file_is_one_clear_line(serve_with, tmp_path):
    srv = serve_with()
    with pytest.raises(errors.ConfigError, match="cannot read bundle"):
        fast(srv.url).upload("a" * 64, "L", tmp_path / "nope.tar")
    assert srv.requests == []


def _blob_server(serve_with, blob: bytes, declared: str | None = None):
    def send(server, req):
        headers = {"content-type": "application/octet-stream"}
        if declared:
            headers["x-content-sha256"] = declared
        return 200, headers, blob

    return serve_with(send)


def test_download_verifies_and_renames(serve_with, tmp_path):
    blob = os.urandom(3 << 20)
    sha = hashlib.sha256(blob).hexdigest()
    srv = _blob_server(serve_with, blob, sha)
    dest = tmp_path / "out" / "bundle.tar"
    assert fast(srv.url).download_artifact(sha, dest) == dest
    assert dest.read_bytes() == blob
    assert sorted(p.name for p in dest.parent.iterdir()) == ["bundle.tar"]
    assert srv.requests[0][1] == f"/v1/artifact/{sha}"


def test_download_with_wrong_sha_leaves_nothing(serve_with, tmp_path):
    blob = b"not what you asked for"
    srv = _blob_server(serve_with, blob)
    dest = tmp_path / "bundle.tar"
    with pytest.raises(errors.IntegrityError, match="expected " + "0" * 64):
        fast(srv.url).download_artifact("0" * 64, dest)
    assert list(tmp_path.iterdir()) == []


def test_zipapp_download_checks_declared_sha(serve_with, tmp_path):
    blob = b"PK\x03\x04 pretend zipapp"
    good = _blob_server(serve_with, blob, hashlib.sha256(blob).hexdigest())
    assert fast(good.url).download_zipapp(tmp_path / "a.pyz").read_bytes() == blob
    bad = _blob_server(serve_with, blob, "1" * 64)
    with pytest.raises(errors.IntegrityError):
        fast(bad.url).download_zipapp(tmp_path / "b.pyz")
    assert not (tmp_path / "b.pyz").exists()


def test_bad_artifact_id_refused_before_sending(serve_with, tmp_path):
    srv = serve_with()
    with pytest.raises(errors.BadRequest, match="sha256"):
        fast(srv.url).download_artifact("../x", tmp_path / "x")
    assert srv.requests == []


def test_metrics_is_text(serve_with):
    srv = serve_with(lambda s, r: (200, {"content-type": "text/plain"}, b"# HELP x\nx 1\n"))
    assert fast(srv.url).metrics() == "# HELP x\nx 1\n"


def test_connection_stays_usable_after_an_error_reply(serve_with):
    answers = iter([(404, {}, {"error": "not_found", "detail": "no job abc"})] + [(200, {}, {"ok": True})] * 3)
    srv = serve_with(lambda s, r: next(answers))
    client = fast(srv.url)
    with pytest.raises(errors.NotFound):
        client.job("abc")
    for _ in range(3):
        client.health()
    assert client.connections_opened == 1


# -- against the real coordinator ---------------------------------------------------------------


@pytest.fixture
def coordinator(live_server, monkeypatch):
    from conftest import manifest_toml

    monkeypatch.delenv("CIS490_OPERATOR_TOKEN", raising=False)
    return live_server(manifest=manifest_toml(2))


def test_real_coordinator_keeps_one_connection_for_a_hundred_requests(coordinator):
    client = Client(coordinator.url)
    for i in range(100):
        (client.health if i % 2 else client.jobs)()
    assert client.connections_opened == 1


def test_worker_round_trip_on_the_real_coordinator(coordinator, tmp_path):
    worker = Client(coordinator.url, host_id="ws1")
    cap = {"host": "ws1", "cores": 4, "ram_gib": 8, "slots": 2}
    assert worker.register(cap)["ok"] is True
    claim = worker.claim(cap)
    job_id, lease = claim["job_id"], claim["lease"]
    assert claim["job"]["id"] == job_id and claim["attempt"] == 1
    assert worker.heartbeat(job_id, lease, progress={"epoch": 1}, log_tail="hi\n") == {"ok": True, "cancel": False}

    with pytest.raises(errors.StaleLease):
        worker.heartbeat(job_id, "not-my-lease")
    with pytest.raises(errors.NotFound):
        worker.job("abcd0123")

    bundle = tmp_path / "bundle.tar"
    bundle.write_bytes(os.urandom(3 << 20))
    sha = hashlib.sha256(bundle.read_bytes()).hexdigest()
    stored = worker.upload(job_id, lease, bundle)
    assert stored["artifact_id"] == sha and stored["deduplicated"] is False
    assert worker.complete(job_id, lease, sha) == {"ok": True}
    # The answer to a completion can be lost; sending it again must not turn success into an error.
    assert worker.complete(job_id, lease, sha) == {"ok": True}

    detail = worker.job(job_id[:6])["job"]
    assert detail["status"] == "completed" and detail["artifact_id"] == sha
    got = worker.download_artifact(sha, tmp_path / "back" / "bundle.tar")
    assert got.read_bytes() == bundle.read_bytes()
    assert worker.connections_opened == 1


def test_operator_calls_need_the_token(coordinator):
    from conftest import OPERATOR_TOKEN

    job_id = Client(coordinator.url).jobs()["jobs"][0]["id"]
    with pytest.raises(errors.Unauthorized):
        Client(coordinator.url).cancel(job_id)
    with pytest.raises(errors.Forbidden):
        Client(coordinator.url, operator_token="wrong").cancel(job_id)
    assert Client(coordinator.url, operator_token=OPERATOR_TOKEN).cancel(job_id[:8]) == {"ok": True}
    assert Client(coordinator.url).job(job_id)["job"]["status"] == "cancelled"


def test_long_poll_claim_with_nothing_eligible(coordinator):
    worker = Client(coordinator.url, host_id="ws9")
    cap = {"host": "ws9", "slots": 1}
    assert worker.claim(cap)["job"] is not None
    assert worker.claim(cap, wait=0.2) == {"job": None}
