"""The wire API of ``serve`` over real HTTP on 127.0.0.1: every endpoint, every error code, the limits.

Requests are raw ``http.client`` calls, so what is checked is the wire itself,
not our client's reading of it. The server is the in-process ``live_server``.
"""

from __future__ import annotations

import hashlib
import io
import http.client
import json
import logging
import os
import socket
import threading
import time
import zipfile
from pathlib import Path

import pytest

import cis490fleet
from cis490fleet import errors, http_api, model, openapi
from conftest import OPERATOR_TOKEN, Conn, http_call, manifest_toml, signed

OP = {"x-operator-token": OPERATOR_TOKEN}


def worker(host: str, lease: str | None = None) -> dict:
    headers = {"x-lab-host": host}
    if lease is not None:
        headers["x-lease"] = lease
    return headers


def claim(srv, host: str = "ws1", capability: dict | None = None) -> dict:
    status, _, body = srv.call("POST", "/v1/job/claim", {"capability": capability or {}}, worker(host))
    assert status == 200, body
    return body


def upload(srv, job_id: str, host: str, lease: str | None, data: bytes, sha: str | None = None):
    headers = worker(host, lease)
    headers["x-content-sha256"] = sha or hashlib.sha256(data).hexdigest()
    return srv.call("PUT", f"/v1/model/{job_id}", data, headers)


def assert_error(result, status: int, code: str | None = None, *words: str) -> dict:
    got, headers, body = result
    assert got == status, body
    assert headers["content-type"] == "application/json"
    assert set(body) == {"error", "detail"} and body["detail"]
    if code:
        assert body["error"] == code
    for word in words:
        assert word in body["detail"], body["detail"]
    return body


@pytest.fixture
def srv(live_server):
    return live_server(manifest_toml(3))


# -- health, openapi, placeholders --------------------------------------------------------------


def test_health_reports_role_counts_and_version(srv):
    status, _, body = srv.call("GET", "/v1/health")
    assert status == 200
    assert body["ok"] is True and body["role"] == "leader" and body["term"] == 1
    assert body["leader"] == body["node_id"] == "test-node"
    assert body["jobs"]["pending"] == 3 and body["peers"] == []
    assert body["version"]
    schema = openapi.document()["paths"]["/v1/health"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert set(body) <= set(schema["properties"]) and set(schema["required"]) <= set(body)


def test_openapi_lists_every_route_and_nothing_else(srv):
    status, _, doc = srv.call("GET", "/v1/openapi.json")
    assert status == 200 and doc["openapi"].startswith("3.1")
    documented = {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}
    table = set(srv.server.router.table())
    assert table == documented
    assert documented == {(m.upper(), p) for p, ops in openapi.document()["paths"].items() for m in ops}


def test_placeholder_pages_answer(srv):
    status, headers, body = srv.call("GET", "/")
    assert status == 200 and headers["content-type"].startswith("text/html") and b"cis490fleet" in body
    status, _, body = srv.call("GET", "/metrics")
    assert status == 200 and b"cis490fleet_requests_total" in body


# -- claim ----------------------------------------------------------------------------------------


def test_claim_hands_out_a_job_with_its_lease_and_timing(srv):
    body = claim(srv)
    assert model.JOB_ID_RE.match(body["job_id"]) and body["job"]["id"] == body["job_id"]
    assert body["job"]["model"] == "mlp" and body["attempt"] == 1
    assert len(body["lease"]) == 32 and body["heartbeat_s"] == 30 and body["stale_after_s"] == 600
    assert "command" in body["trainer"]


def test_claim_without_identity_is_401(srv):
    assert_error(srv.call("POST", "/v1/job/claim", {"capability": {}}), 401, "unauthorized", "signed",
                 "--host-key-file")


def test_claim_with_a_bad_host_id_is_400_in_legacy_mode(live_server):
    srv = live_server(manifest_toml(), legacy=True)
    assert_error(srv.call("POST", "/v1/job/claim", {}, worker("bad host!")), 400, "bad_request", "x-lab-host")


def test_claim_on_an_empty_queue_is_job_null(live_server):
    srv = live_server(manifest_toml(0))
    assert claim(srv) == {"job": None}


def test_claim_accepts_an_empty_body(srv):
    status, _, body = srv.call("POST", "/v1/job/claim", None, worker("ws1"))
    assert status == 200 and body["job_id"]


@pytest.mark.parametrize("body, words", [
    ({"capability": [1, 2]}, ["capability", "object"]),
    ({"capability": {}, "wait": "soon"}, ["wait", "number"]),
    ({"capability": {}, "wait": 61}, ["wait", "0..60"]),
    ({"capability": {}, "wait": -1}, ["wait"]),
    ([{"capability": {}}], ["JSON object"]),
])
def test_claim_validates_its_fields(srv, body, words):
    assert_error(srv.call("POST", "/v1/job/claim", body, worker("ws1")), 400, "bad_request", *words)


def test_bad_json_is_400_naming_the_problem(srv):
    result = srv.call("POST", "/v1/job/claim", b'{"capability": ', {**worker("ws1"), "content-type": "application/json"})
    assert_error(result, 400, "bad_request", "not valid JSON")
    result = srv.call("POST", "/v1/job/claim", b'{"wait": NaN}', worker("ws1"))
    assert_error(result, 400, "bad_request", "NaN")
    result = srv.call("POST", "/v1/job/claim", b"\xff\xfe{", worker("ws1"))
    assert_error(result, 400, "bad_request")
    result = srv.call("POST", "/v1/job/claim", b"[" * 200_000, worker("ws1"))
    assert_error(result, 400, "bad_request")


def test_json_body_over_one_mib_is_413(srv):
    big = json.dumps({"capability": {"pad": "x" * (1 << 20)}}).encode()
    assert_error(srv.call("POST", "/v1/job/claim", big, worker("ws1")), 413, "too_large")


def test_chunked_bodies_are_refused_with_411(srv):
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as sock:
        sock.sendall(b"POST /v1/job/claim HTTP/1.1\r\nHost: x\r\nx-lab-host: ws1\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"2\r\n{}\r\n0\r\n\r\n")
        resp = http.client.HTTPResponse(sock)
        resp.begin()
        assert resp.status == 411 and json.loads(resp.read())["error"] == "length_required"


def test_long_poll_claim_returns_when_a_job_becomes_claimable(live_server):
    srv = live_server(manifest_toml(0))
    got = {}

    def wait_for_job():
        got["result"] = http_call(srv.url, "POST", "/v1/job/claim", {"capability": {}, "wait": 60},
                                  worker("ws1"), timeout=90)

    t = threading.Thread(target=wait_for_job)
    t.start()
    deadline = time.monotonic() + 30
    while srv.coordinator.counters.snapshot()["counters"]["empty_claims"] < 1:  # it is waiting now
        assert time.monotonic() < deadline
        time.sleep(0.01)
    srv.manifest_path.write_text(manifest_toml(1))
    assert srv.call("POST", "/v1/manifest/reload", None, OP)[0] == 200
    t.join(30)  # generous: the wait itself is 60 s, so an answer before it proves the wake-up
    assert not t.is_alive(), "the waiting claim was not woken by the reload"
    status, _, body = got["result"]
    assert status == 200 and body["job_id"]


def test_long_poll_claim_ends_with_job_null_when_nothing_comes(live_server):
    srv = live_server(manifest_toml(0))
    status, _, body = srv.call("POST", "/v1/job/claim", {"capability": {}, "wait": 0.2}, worker("ws1"))
    assert status == 200 and body == {"job": None}


def test_a_stale_claim_goes_back_and_wakes_a_waiting_claim(live_server):
    srv = live_server(manifest_toml(1, heartbeat_s=0.1, stale_after_s=0.4))
    first = claim(srv, "ws1")
    status, _, second = srv.call("POST", "/v1/job/claim", {"wait": 60}, worker("ws2"), timeout=90)
    assert status == 200 and second["job_id"] == first["job_id"] and second["attempt"] == 2
    assert srv.coordinator.counters.snapshot()["counters"]["stale_recoveries"] == 1
    assert_error(srv.call("POST", f"/v1/job/{first['job_id']}/heartbeat", {}, worker("ws1", first["lease"])),
                 409, "stale_lease")


def test_sixteen_keep_alive_clients_claim_500_jobs_each_exactly_once(live_server):
    srv = live_server(manifest_toml(500))
    claimed: list[list[str]] = [[] for _ in range(16)]
    failures = []

    def run(i: int):
        try:
            with Conn(srv.url) as conn:
                while True:
                    status, _, body = conn.call("POST", "/v1/job/claim",
                                                {"capability": {"slots": 1000}}, worker(f"ws{i}"))
                    assert status == 200, body
                    if body["job"] is None:
                        return
                    claimed[i].append(body["job_id"])
        except Exception as err:  # reported below; a thread cannot fail the test itself
            failures.append(repr(err))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not failures
    everything = [j for per in claimed for j in per]
    assert len(everything) == 500 and len(set(everything)) == 500
    assert sum(1 for per in claimed if per) > 1, "all claims went through one client"
    _, _, body = srv.call("GET", "/v1/jobs?status=claimed&limit=1")
    assert body["total"] == 500


# -- heartbeat, complete, fail, release ------------------------------------------------------------


def test_heartbeat_accepts_object_list_and_empty_bodies(srv):
    c = claim(srv)
    path = f"/v1/job/{c['job_id']}/heartbeat"
    headers = worker("ws1", c["lease"])
    for body in ({"progress": {"epoch": 1}, "log_tail": "loss 0.5"}, [{"progress": {"epoch": 1}},
                 {"progress": {"epoch": 2}}], None, []):
        status, _, answer = srv.call("POST", path, body, headers)
        assert status == 200 and answer == {"ok": True, "cancel": False}
    _, _, detail = srv.call("GET", f"/v1/job/{c['job_id']}")
    assert detail["job"]["status"] == "running" and detail["job"]["progress"] == {"epoch": 2}
    assert detail["job"]["log_tail"] == "loss 0.5"


def test_heartbeat_validates_its_fields(srv):
    c = claim(srv)
    path = f"/v1/job/{c['job_id']}/heartbeat"
    ws1 = worker("ws1", c["lease"])
    assert_error(srv.call("POST", path, {"progress": 3}, ws1), 400, "bad_request", "progress")
    assert_error(srv.call("POST", path, {"log_tail": {}}, ws1), 400, "bad_request", "log_tail")
    assert_error(srv.call("POST", path, [1, 2], ws1), 400, "bad_request")
    assert_error(srv.call("POST", path, {}, worker("ws1", "x" * 200)), 400, "bad_request", "x-lease")


def test_heartbeat_from_a_non_holder_is_409(srv):
    c = claim(srv)
    path = f"/v1/job/{c['job_id']}/heartbeat"
    assert_error(srv.call("POST", path, {}, worker("ws2", c["lease"])), 409, "stale_lease", "ws1")
    assert_error(srv.call("POST", path, {}, worker("ws1", "0" * 32)), 409, "stale_lease")
    # Every worker write carries its lease: the holder's name alone fences nothing.
    assert_error(srv.call("POST", path, {}, worker("ws1")), 400, "bad_request", "x-lease", "--trust-host-header")


def test_in_legacy_mode_a_heartbeat_without_a_lease_is_fenced_by_host(live_server):
    srv = live_server(manifest_toml(), legacy=True)
    c = claim(srv)
    path = f"/v1/job/{c['job_id']}/heartbeat"
    assert_error(srv.call("POST", path, {}, worker("ws2")), 409, "stale_lease", "ws1")
    assert srv.call("POST", path, {}, worker("ws1"))[0] == 200


def test_ids_are_validated_before_lookup(srv):
    ws1 = worker("ws1", "1")
    assert_error(srv.call("POST", "/v1/job/xyz/heartbeat", {}, ws1), 400, "bad_request", "64")
    assert_error(srv.call("POST", f"/v1/job/{'A' * 64}/heartbeat", {}, ws1), 400, "bad_request")
    assert_error(srv.call("POST", f"/v1/job/{'0' * 64}/heartbeat", {}, ws1), 404, "not_found")
    assert_error(srv.call("GET", "/v1/job/..%2f..%2fetc"), 400, "bad_request")
    assert_error(srv.call("GET", "/v1/job/abc"), 404, "not_found", "no job is named", "prefix")  # a name, or too short a prefix
    assert_error(srv.call("GET", "/v1/artifact/nothex"), 400, "bad_request")


def test_operator_cancel_reaches_the_worker_through_its_heartbeat(srv):
    c = claim(srv)
    assert srv.call("POST", f"/v1/job/{c['job_id'][:10]}/cancel", None, OP)[2] == {"ok": True}
    status, _, body = srv.call("POST", f"/v1/job/{c['job_id']}/heartbeat", {}, worker("ws1", c["lease"]))
    assert status == 200 and body == {"ok": True, "cancel": True}


def test_complete_needs_the_uploaded_artifact_and_the_holder(srv):
    c = claim(srv)
    jid, lease = c["job_id"], c["lease"]
    data = b"bundle bytes" * 100
    sha = hashlib.sha256(data).hexdigest()
    path = f"/v1/job/{jid}/complete"
    assert_error(srv.call("POST", path, {"artifact_id": sha}, worker("ws1", lease)), 404, "not_found")
    assert_error(srv.call("POST", path, {}, worker("ws1", lease)), 400, "bad_request", "artifact_id")
    assert_error(srv.call("POST", path, {"artifact_id": "abc"}, worker("ws1", lease)), 400, "bad_request")
    assert upload(srv, jid, "ws1", lease, data)[0] == 201
    assert srv.call("GET", f"/v1/artifact/{sha}")[2] == data  # a small one goes out with its headers
    assert_error(srv.call("POST", path, {"artifact_id": sha}, worker("ws2", lease)), 409, "stale_lease")
    assert srv.call("POST", path, {"artifact_id": sha}, worker("ws1", lease))[2] == {"ok": True}
    _, _, detail = srv.call("GET", f"/v1/job/{jid}")
    assert detail["job"]["status"] == "completed" and detail["job"]["artifact_id"] == sha


def test_fail_keeps_the_error_and_reports_the_status(srv):
    c = claim(srv)
    path = f"/v1/job/{c['job_id']}/fail"
    assert_error(srv.call("POST", path, {"error": 3}, worker("ws1", c["lease"])), 400, "bad_request", "error")
    assert_error(srv.call("POST", path, {"error": "x"}, worker("ws2", c["lease"])), 409, "stale_lease")
    assert_error(srv.call("POST", path, {"error": "x", "class": "gremlins"}, worker("ws1", c["lease"])), 400,
                 "bad_request", "field 'class' must be one of fenced, infra, job, signal, stalled, time_limit, usage")
    status, _, body = srv.call("POST", path, {"error": "CUDA out of memory", "class": "signal"},
                               worker("ws1", c["lease"]))
    assert status == 200 and body["ok"] is True and body["status"] == "pending" and body["retry_at"]
    _, _, detail = srv.call("GET", f"/v1/job/{c['job_id']}")
    assert "CUDA out of memory" in detail["job"]["last_error"]
    assert detail["job"]["attempts"][0]["class"] == "signal"


def test_a_fail_without_a_class_is_the_job_s_fault_and_final_by_default(srv):
    c = claim(srv)
    status, _, body = srv.call("POST", f"/v1/job/{c['job_id']}/fail", {"error": "Traceback ..."},
                               worker("ws1", c["lease"]))
    assert status == 200 and body["status"] == "failed" and body["retry_at"] is None


def test_a_very_long_error_is_kept_by_its_end(srv):
    c = claim(srv)
    error = "x" * 200_000 + "\nRuntimeError: the real reason"
    status, _, body = srv.call("POST", f"/v1/job/{c['job_id']}/fail", {"error": error}, worker("ws1", c["lease"]))
    assert status == 200
    _, _, detail = srv.call("GET", f"/v1/job/{c['job_id']}")
    assert detail["job"]["last_error"].endswith("RuntimeError: the real reason")


def test_release_gives_the_job_back(srv):
    c = claim(srv)
    path = f"/v1/job/{c['job_id']}/release"
    assert_error(srv.call("POST", path, None, worker("ws2", c["lease"])), 409, "stale_lease")
    assert srv.call("POST", path, None, worker("ws1", c["lease"]))[2] == {"ok": True}
    _, _, detail = srv.call("GET", f"/v1/job/{c['job_id']}")
    assert detail["job"]["status"] == "pending"


# -- uploads and downloads ---------------------------------------------------------------------------


def test_upload_stores_and_download_returns_the_same_bytes(srv):
    c = claim(srv)
    data = bytes(range(256)) * 4096
    status, _, body = upload(srv, c["job_id"], "ws1", c["lease"], data)
    sha = hashlib.sha256(data).hexdigest()
    assert status == 201 and body["artifact_id"] == sha and body["deduplicated"] is False
    assert body["path"].startswith(f"models/mlp_train/{sha}/bundle")
    status, headers, got = srv.call("GET", f"/v1/artifact/{sha}")
    assert status == 200 and got == data
    assert headers["x-content-sha256"] == sha and int(headers["content-length"]) == len(data)
    c2 = claim(srv, "ws2")
    status, _, body = upload(srv, c2["job_id"], "ws2", c2["lease"], data)
    assert status == 201 and body["deduplicated"] is True
    assert_error(srv.call("GET", f"/v1/artifact/{'0' * 64}"), 404, "not_found")


def test_upload_integrity_errors_are_400(srv):
    c = claim(srv)
    data = b"model" * 1000
    assert_error(upload(srv, c["job_id"], "ws1", c["lease"], data, sha="0" * 64), 400, "integrity", "sha256")
    assert_error(upload(srv, c["job_id"], "ws1", c["lease"], data, sha="zz"), 400, "bad_request", "x-content-sha256")
    status, _, body = srv.call("PUT", f"/v1/model/{c['job_id']}", data, worker("ws1", c["lease"]))
    assert status == 400 and "x-content-sha256" in body["detail"]
    assert not list((srv.coordinator.data_dir / "tmp").iterdir())


def raw_exchange(port: int, head: bytes, body: bytes = b"", shut: bool = False, timeout: float = 20):
    """Send raw bytes; return (status, json body, headers) of the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(head + body)
        if shut:
            sock.shutdown(socket.SHUT_WR)
        resp = http.client.HTTPResponse(sock)
        resp.begin()
        data = resp.read()
        return resp.status, (json.loads(data) if data else None), resp.headers


def upload_head(srv, job_id: str, host: str, lease: str, length: int | None, sha: str, extra: str = "") -> bytes:
    """The head of an upload, signed with ``host``'s key as the client signs it."""
    path = f"/v1/model/{job_id}"
    _, headers = signed(srv.host_key(host), host, "PUT", path, None,
                        {"x-lab-host": host, "x-content-sha256": sha, "x-lease": lease})
    lines = [f"PUT {path} HTTP/1.1", "Host: x", *(f"{k}: {v}" for k, v in headers.items())]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    return ("\r\n".join(lines) + "\r\n" + extra + "\r\n").encode()


def test_upload_from_a_non_holder_is_refused_before_the_body_is_read(srv):
    c = claim(srv)
    # 1 GiB declared, not one byte sent: the answer must come from the headers alone.
    status, body, headers = raw_exchange(srv.port, upload_head(srv, c["job_id"], "ws2", c["lease"], 1 << 30, "0" * 64,
                                                               "Expect: 100-continue\r\n"))
    assert status == 409 and body["error"] == "stale_lease"
    assert headers["connection"] == "close"



def test_upload_with_a_wrong_lease_sharing_the_shown_prefix_is_409_before_a_byte_is_stored(srv):
    c = claim(srv)
    shown = srv.call("GET", f"/v1/job/{c['job_id']}")[2]["job"]["attempts"][-1]["lease"]
    wrong = shown + "0" * (len(c["lease"]) - len(shown))
    assert wrong != c["lease"] and wrong.startswith(shown) and len(shown) == 8
    # 1 GiB declared, not one byte sent: the answer must come from the headers alone.
    status, body, _ = raw_exchange(srv.port, upload_head(srv, c["job_id"], "ws1", wrong, 1 << 30, "0" * 64,
                                                         "Expect: 100-continue\r\n"))
    assert status == 409 and body["error"] == "stale_lease"
    data = b"not the holder's model" * 100
    status, body, _ = raw_exchange(srv.port, upload_head(srv, c["job_id"], "ws1", wrong, len(data),
                                                         hashlib.sha256(data).hexdigest()), data)
    assert status == 409 and body["error"] == "stale_lease"
    assert srv.coordinator.artifacts.locate(hashlib.sha256(data).hexdigest()) is None
    assert not list((srv.coordinator.data_dir / "tmp").iterdir())
    status, _, body = upload(srv, c["job_id"], "ws1", c["lease"], data)  # the real holder still can
    assert status == 201 and body["artifact_id"] == hashlib.sha256(data).hexdigest()

def test_upload_over_the_fleet_limit_is_413_before_the_body(live_server):
    srv = live_server(manifest_toml(1, max_artifact_bytes=1000))
    c = claim(srv)
    status, body, _ = raw_exchange(srv.port, upload_head(srv, c["job_id"], "ws1", c["lease"], 1001, "0" * 64))
    assert status == 413 and body["error"] == "too_large" and "max_artifact_bytes" in body["detail"]


def test_upload_without_content_length_is_411(srv):
    c = claim(srv)
    status, body, _ = raw_exchange(srv.port, upload_head(srv, c["job_id"], "ws1", c["lease"], None, "0" * 64))
    assert status == 411 and "content-length" in body["detail"]


def test_short_upload_is_400_and_leaves_nothing(srv):
    c = claim(srv)
    data = b"x" * 5000
    status, body, _ = raw_exchange(srv.port, upload_head(srv, c["job_id"], "ws1", c["lease"], 10_000,
                                                         hashlib.sha256(data).hexdigest()), data, shut=True)
    assert status == 400 and body["error"] == "integrity"
    assert not list((srv.coordinator.data_dir / "tmp").iterdir())
    assert srv.coordinator.artifacts.locate(hashlib.sha256(data).hexdigest()) is None


# -- reads -------------------------------------------------------------------------------------------


def test_jobs_list_filters_and_pages(srv):
    c = claim(srv)
    status, _, body = srv.call("GET", "/v1/jobs")
    assert status == 200 and body["total"] == 3 and len(body["jobs"]) == 3
    _, _, body = srv.call("GET", "/v1/jobs?status=claimed")
    assert [j["id"] for j in body["jobs"]] == [c["job_id"]]
    _, _, body = srv.call("GET", "/v1/jobs?host=ws1&model=mlp")
    assert body["total"] == 1
    _, _, body = srv.call("GET", "/v1/jobs?limit=1&offset=1")
    assert body["total"] == 3 and len(body["jobs"]) == 1
    assert_error(srv.call("GET", "/v1/jobs?status=done"), 400, "bad_request", "pending")
    assert_error(srv.call("GET", "/v1/jobs?limit=ten"), 400, "bad_request", "limit")
    assert_error(srv.call("GET", "/v1/jobs?limit=0"), 400, "bad_request", "limit")
    assert_error(srv.call("GET", "/v1/jobs?offset=-1"), 400, "bad_request", "offset")
    assert_error(srv.call("GET", "/v1/jobs?status=pending&status=claimed"), 400, "bad_request", "once")


def test_job_detail_by_id_or_unique_prefix(live_server):
    srv = live_server(manifest_toml(300))
    jid = model.compute_job_id("mlp", "train", {}, "default", [], 0)
    status, _, body = srv.call("GET", f"/v1/job/{jid[:8]}")
    assert status == 200 and body["job"]["id"] == jid and "attempts" in body["job"]
    assert srv.call("GET", f"/v1/job/{jid.upper()}")[0] == 200
    # seeds 87 and 158 give ids that both start with 4c1f
    assert_error(srv.call("GET", "/v1/job/4c1f"), 400, "ambiguous_id")
    assert_error(srv.call("GET", f"/v1/job/{'f' * 63}"), 404, "not_found")


def test_failures_lists_failed_attempts_newest_first_with_the_jobs_status_now(srv):
    assert srv.call("GET", "/v1/failures")[2] == {"failures": []}
    first, second = claim(srv, "ws1"), claim(srv, "ws2")
    for c, host, error in ((first, "ws1", "CUDA out of memory\nTraceback"), (second, "ws2", "disk full")):
        status, _, body = srv.call("POST", f"/v1/job/{c['job_id']}/fail", {"error": error, "class": "infra"},
                                   worker(host, c["lease"]))
        assert status == 200 and body["status"] == "pending", body
    status, headers, body = srv.call("GET", "/v1/failures")
    assert status == 200 and headers["content-type"] == "application/json"
    assert [(f["job_id"], f["host"], f["error"]) for f in body["failures"]] == [
        (second["job_id"], "ws2", "disk full"), (first["job_id"], "ws1", "CUDA out of memory\nTraceback")]
    newest = body["failures"][0]
    assert set(newest) == {"job_id", "name", "model", "mode", "attempt", "host", "ended", "outcome", "error",
                           "status", "class"}
    assert newest["class"] == "infra"
    assert (newest["model"], newest["mode"], newest["attempt"], newest["outcome"], newest["status"]) == (
        "mlp", "train", 1, "failed", "pending")
    assert isinstance(newest["ended"], float)
    assert srv.call("GET", "/v1/failures?limit=1")[2] == {"failures": body["failures"][:1]}
    assert srv.call("GET", "/v1/failures?limit=1000")[2] == body
    assert_error(srv.call("GET", "/v1/failures?limit=0"), 400, "bad_request", "limit=0", "1..1000")
    assert_error(srv.call("GET", "/v1/failures?limit=1001"), 400, "bad_request", "limit=1001", "1..1000")
    assert_error(srv.call("GET", "/v1/failures?limit=ten"), 400, "bad_request", "limit", "not an integer")
    assert_error(srv.call("POST", "/v1/failures", {}), 405)


def test_register_and_list_workers(srv):
    status, _, body = srv.call("POST", "/v1/worker/register", {"capability": {"cores": 8, "cuda": False}},
                               worker("ws7"))
    assert status == 200 and body["ok"] is True
    _, _, body = srv.call("GET", "/v1/workers")
    assert [w["host"] for w in body["workers"]] == ["ws7"] and body["workers"][0]["capability"]["cores"] == 8
    assert_error(srv.call("POST", "/v1/worker/register", {}, worker("ws7")), 400, "bad_request", "capability")
    assert_error(srv.call("POST", "/v1/worker/register", {"capability": {}}), 401, "unauthorized")


def test_zipapp_built_from_the_sources_is_served_with_its_sha(srv):
    status, headers, body = srv.call("GET", "/v1/zipapp", timeout=120)
    assert status == 200 and headers["content-type"] == "application/zip"
    assert headers["x-content-sha256"] == hashlib.sha256(body).hexdigest()
    with zipfile.ZipFile(io.BytesIO(body)) as zf:
        names = zf.namelist()
    assert "__main__.py" in names and "cis490fleet/http_api.py" in names
    assert srv.call("GET", "/v1/zipapp")[2] == body  # built once, then the same bytes


def test_the_windows_installer_is_served_with_its_sha_and_pinned_in_the_enroll_commands(srv):
    status, headers, body = srv.call("GET", "/v1/install-worker.ps1")
    shipped = (Path(cis490fleet.__file__).parent / "windows" / "install-worker.ps1").read_bytes()
    assert status == 200 and body == shipped and headers["content-type"].startswith("text/plain")
    assert headers["x-content-sha256"] == hashlib.sha256(shipped).hexdigest()
    status, _, added = srv.call("POST", "/v1/hosts", {"host": "ws9"}, {"x-operator-token": OPERATOR_TOKEN})
    assert status == 201, added
    assert f"-ne '{headers['x-content-sha256']}'" in added["enroll"]["windows"]
    assert "/v1/install-worker.ps1" in added["enroll"]["windows"]


# -- operator endpoints ----------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/v1/job/{id}/cancel", "/v1/job/{id}/requeue", "/v1/manifest/reload"])
def test_operator_endpoints_check_the_token(live_server, path):
    srv = live_server(manifest_toml(1))
    jid = model.compute_job_id("mlp", "train", {}, "default", [], 0)
    path = path.format(id=jid)
    assert_error(srv.call("POST", path), 401, "unauthorized", "x-operator-token")
    assert_error(srv.call("POST", path, None, {"x-operator-token": "wrong"}), 403, "forbidden", "wrong")
    closed = live_server(manifest_toml(1), token=None)
    assert_error(closed.call("POST", path, None, {"x-operator-token": "anything"}), 403, "forbidden",
                 "CIS490_OPERATOR_TOKEN")


def test_cancel_and_requeue(srv):
    c = claim(srv)
    jid = c["job_id"]
    assert_error(srv.call("POST", f"/v1/job/{jid}/requeue", None, OP), 409, "conflict", "claimed")
    assert srv.call("POST", f"/v1/job/{jid[:6]}/cancel", None, OP)[2] == {"ok": True}
    assert srv.call("POST", f"/v1/job/{jid}/requeue", None, OP)[2] == {"ok": True}
    _, _, detail = srv.call("GET", f"/v1/job/{jid}")
    assert detail["job"]["status"] == "pending"
    assert_error(srv.call("POST", f"/v1/job/{'e' * 64}/cancel", None, OP), 404, "not_found")


def test_reload_adds_jobs_and_reports_every_manifest_problem(srv):
    srv.manifest_path.write_text(manifest_toml(5))
    status, _, body = srv.call("POST", "/v1/manifest/reload", None, OP)
    assert status == 200 and (body["added"], body["kept"], body["removed"], body["total"]) == (2, 3, 0, 5)
    status, _, body = srv.call("POST", "/v1/manifest/reload", None, OP)
    assert (body["added"], body["kept"]) == (0, 5)
    srv.manifest_path.write_text('[fleet]\nheartbeat_s = -1\n[[jobs]]\nmodel = "m"\nseed = "x"\n')
    body = assert_error(srv.call("POST", "/v1/manifest/reload", None, OP), 400, "bad_manifest")
    assert "heartbeat_s" in body["detail"] and "mode" in body["detail"] and "seed" in body["detail"]
    assert srv.call("GET", "/v1/health")[2]["jobs"]["pending"] == 5


# -- the server: errors, logs, sockets ---------------------------------------------------------------


def test_unknown_paths_and_methods_are_json(srv):
    assert_error(srv.call("GET", "/v2/anything"), 404, "not_found")
    body = assert_error(srv.call("DELETE", "/v1/workers"), 405, "method_not_allowed", "GET")
    status, headers, _ = srv.call("DELETE", "/v1/workers")
    assert headers["allow"] == "GET"
    assert_error(srv.call("BREW", "/v1/health"), 405, "method_not_allowed")
    status, headers, body = srv.call("HEAD", "/v1/health")
    assert status == 200 and body == b""


def test_an_unexpected_exception_is_a_500_with_the_traceback_only_in_the_log(srv, caplog):
    def boom(req):
        raise RuntimeError("secret internals")

    srv.server.router.add("GET", "/boom", boom)
    with caplog.at_level(logging.ERROR, logger="cis490fleet.http_api"):
        body = assert_error(srv.call("GET", "/boom"), 500, "internal", "server log")
    assert "secret internals" not in json.dumps(body)
    assert any("secret internals" in (r.exc_text or "") or r.exc_info for r in caplog.records)


def test_access_log_has_one_line_per_request_and_no_secrets(srv, caplog):
    with caplog.at_level(logging.INFO, logger="cis490fleet.http_api.access"):
        srv.call("POST", "/v1/manifest/reload?token=hunter2&x=1", None, OP)
        srv.call("GET", "/v1/jobs?status=pending", None, worker("ws3"))
    lines = [r.getMessage() for r in caplog.records if r.name == "cis490fleet.http_api.access"]
    assert len(lines) == 2
    assert lines[0].startswith("POST /v1/manifest/reload?token=***&x=1 200 ")
    assert lines[1].startswith("GET /v1/jobs?status=pending 200 ") and lines[1].endswith("host=ws3")
    assert all("hunter2" not in line and OPERATOR_TOKEN not in line for line in lines)
    assert all("ms" in line for line in lines)


def test_accepted_sockets_have_tcp_nodelay(srv):
    seen = []
    srv.server.accept_hook = lambda sock: seen.append(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
    srv.call("GET", "/v1/health")
    assert seen and all(seen)


def test_one_connection_serves_many_requests(srv):
    accepted = []
    srv.server.accept_hook = accepted.append
    with Conn(srv.url) as conn:
        for _ in range(5):
            assert conn.call("GET", "/v1/health")[0] == 200
        assert conn.call("POST", "/v1/job/claim", b"{", worker("ws1"))[0] == 400
        assert conn.call("GET", "/v1/workers")[0] == 200
    assert len(accepted) == 1


def test_over_the_thread_bound_is_503_json(srv):
    busy = http_api.FleetHTTPServer(("127.0.0.1", 0), srv.coordinator, max_handlers=1)
    threading.Thread(target=busy.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{busy.port}"
        with Conn(url) as first:
            assert first.call("GET", "/v1/health")[0] == 200  # keeps its handler thread while open
            status, _, body = http_call(url, "GET", "/v1/health")
            assert status == 503 and body["error"] == "unavailable"
    finally:
        busy.shutdown()
        busy.server_close()


def test_a_stalled_client_is_dropped_after_the_socket_timeout(srv):
    quick = http_api.FleetHTTPServer(("127.0.0.1", 0), srv.coordinator, socket_timeout=0.3)
    threading.Thread(target=quick.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        with socket.create_connection(("127.0.0.1", quick.port), timeout=30) as sock:
            sock.sendall(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n")  # headers never finish
            assert sock.recv(1024) == b""  # the server gave up and closed
    finally:
        quick.shutdown()
        quick.server_close()


def test_malformed_request_lines_get_json_400(srv):
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as sock:
        sock.sendall(b"GARBAGE\r\n\r\n")
        resp = http.client.HTTPResponse(sock)
        resp.begin()
        assert resp.status == 400 and json.loads(resp.read())["error"] == "bad_request"


def raw_status(port: int, data: bytes) -> tuple[int, dict | None, http.client.HTTPMessage]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        resp = http.client.HTTPResponse(sock)
        resp.begin()
        body = resp.read()
        return resp.status, (json.loads(body) if body else None), resp.headers


@pytest.mark.parametrize("head, status", [
    (b"GET /v1/health\r\n\r\n", 400),  # HTTP/0.9
    (b"GET /v1/health HTTP/one\r\n\r\n", 400),
    (b"GET /v1/health HTTP/2.0\r\n\r\n", 505),
    (b"GET /v1/health HTTP/1.1\r\nHost : x\r\n\r\n", 400),  # space before the colon: a smuggling trick
    (b"GET /v1/health HTTP/1.1\r\nno colon here\r\n\r\n", 400),
    (b"GET /v1/health HTTP/1.1\r\n folded-first\r\n\r\n", 400),
    (b"GET /v1/health HTTP/1.1\r\nx-long: " + b"a" * 70000 + b"\r\n\r\n", 431),
    (b"GET /v1/health HTTP/1.1\r\n" + b"".join(b"x-%d: 1\r\n" % i for i in range(101)) + b"\r\n", 431),
])
def test_the_header_reader_refuses_what_http_server_refuses(srv, head, status):
    got, body, headers = raw_status(srv.port, head)
    assert got == status and body["error"] and headers["connection"] == "close"


FOLDED_HEAD = (b"GET /echo HTTP/1.1\r\nx-lab-host: ws1\r\n\tcontinued\r\nx-tag: a\r\nX-Tag: b\r\n"
               b"Connection: close\r\n\r\n")


def send_in_pieces(port: int, data: bytes, piece: int) -> tuple[int, http.client.HTTPMessage]:
    """``data`` sent ``piece`` bytes at a time, each alone on the wire (the reader sees partial heads)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(0, len(data), piece):
            sock.sendall(data[i:i + piece])
            time.sleep(0.002)
        resp = http.client.HTTPResponse(sock)
        resp.begin()
        resp.read()
        return resp.status, resp.headers


@pytest.mark.parametrize("head, piece", [
    (FOLDED_HEAD, len(FOLDED_HEAD)),  # the whole head in the read buffer at once
    (FOLDED_HEAD, 7),  # trickling in: read line by line
    (FOLDED_HEAD.replace(b"\r\n", b"\n"), len(FOLDED_HEAD)),  # bare LF line ends
])
def test_the_header_reader_keeps_folded_and_repeated_headers(srv, head, piece):
    seen = {}

    def echo(req):
        seen["host"] = req.headers.get("X-Lab-Host")
        seen["all"] = req.headers.get_all("x-tag")
        return {"ok": True}

    srv.server.router.add("GET", "/echo", echo)
    status, headers = send_in_pieces(srv.port, head, piece)
    assert status == 200 and headers["connection"] == "close"
    assert seen == {"host": "ws1 continued", "all": ["a", "b"]}


def test_a_head_and_its_body_in_one_packet_are_told_apart(srv):
    """The head is split off the read buffer at its blank line; a body holding a blank line of its own, and
    a second request in the same packet, stay for what follows."""
    got = []
    srv.server.router.add("POST", "/echo-body", lambda req: got.append(req.body_bytes()) or {"ok": True})
    body = b"a\r\n\r\nb"
    one = b"POST /echo-body HTTP/1.1\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    answers = b""
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as sock:
        sock.sendall(one + one)
        while answers.count(b'{"ok":true}') < 2:
            chunk = sock.recv(65536)
            assert chunk, answers
            answers += chunk
    assert answers.count(b"HTTP/1.1 200 OK\r\n") == 2 and got == [body, body]


def test_our_client_drives_a_job_end_to_end(srv, tmp_path):
    from cis490fleet.client import Client

    bundle = tmp_path / "bundle.tar"
    bundle.write_bytes(os.urandom(300_000))
    with srv.client("ws1", operator_token=OPERATOR_TOKEN) as client:
        c = client.claim({"cores": 4}, wait=1)
        assert client.heartbeat(c["job_id"], c["lease"], progress={"epoch": 1}, log_tail="ok") == \
            {"ok": True, "cancel": False}
        stored = client.upload(c["job_id"], c["lease"], bundle)
        assert stored["artifact_id"] == hashlib.sha256(bundle.read_bytes()).hexdigest()
        assert client.complete(c["job_id"], c["lease"], stored["artifact_id"]) == {"ok": True}
        assert client.job(c["job_id"][:8])["job"]["status"] == "completed"
        got = client.download_artifact(stored["artifact_id"], tmp_path / "copy.tar")
        assert got.read_bytes() == bundle.read_bytes()
        assert client.reload()["kept"] == 3
        with pytest.raises(errors.StaleLease):
            client.heartbeat(c["job_id"], "0" * 32)
