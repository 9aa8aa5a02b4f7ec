"""Attacks on the trust model, each refused with the right status and the queue left exactly as it was.

Every request here is one an outsider on the lab network could send: raw HTTP on
loopback, signed (or not) by hand with ``conftest.signed``, never through our
client. After each attack the whole queue database is dumped again and compared.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import time
from pathlib import Path

import pytest

from conftest import OPERATOR_TOKEN, http_call, manifest_toml, signed
from test_replication import group, peer_pki, three  # noqa: F401 (group is a fixture)

from cis490fleet import signing

OP = {"x-operator-token": OPERATOR_TOKEN}
CAP = {"capability": {}}
SLOTS3 = {"capability": {"slots": 3}}


def dump(queue: Path) -> dict:
    """Every row of every table of a queue file, read-only: what an attack must leave unchanged."""
    conn = sqlite3.connect(f"file:{queue}?mode=ro", uri=True)
    try:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
        return {t: sorted(map(repr, conn.execute(f'SELECT * FROM "{t}"'))) for t in tables}
    finally:
        conn.close()


def raw(url: str, method: str, path: str, body=None, headers=None, context=None):
    return http_call(url, method, path, body, headers, context=context, credentials=False)


def as_host(key: bytes, host: str, method: str, path: str, body=None, headers=None) -> tuple:
    """(body, headers) signed by ``host`` with ``key``, as its worker would send them."""
    return signed(key, host, method, path, body if body is not None else {}, {"x-lab-host": host, **(headers or {})})


@pytest.fixture
def fleet(live_server):
    """A coordinator with two enrolled hosts, ws1 holding a job; ``unchanged(attack)`` runs it and compares."""
    srv = live_server(manifest_toml(3))
    keys = {h: srv.host_key(h) for h in ("ws1", "ws2")}
    body, headers = as_host(keys["ws1"], "ws1", "POST", "/v1/job/claim", CAP)
    status, _, held = raw(srv.url, "POST", "/v1/job/claim", body, headers)
    assert status == 200 and held["job"] is not None, held
    queue = srv.coordinator.data_dir / "queue.sqlite3"

    def unchanged(attack):
        before = dump(queue)
        result = attack()
        assert dump(queue) == before, "the attack changed the queue"
        return result

    srv.keys, srv.held, srv.unchanged = keys, held, unchanged
    return srv


def test_a_stranger_cannot_claim_or_read(fleet):
    status, _, body = fleet.unchanged(lambda: raw(fleet.url, "POST", "/v1/job/claim", CAP, {"x-lab-host": "ws9"}))
    assert status == 401 and "--host-key-file" in body["detail"] and "jobs hosts add ws9" in body["detail"]
    b, h = as_host(secrets.token_bytes(32), "ws9", "POST", "/v1/job/claim", CAP)
    status, _, body = fleet.unchanged(lambda: raw(fleet.url, "POST", "/v1/job/claim", b, h))
    assert status == 403 and "jobs hosts add ws9" in body["detail"]
    for path in ("/v1/jobs", f"/v1/job/{fleet.held['job_id']}", "/v1/workers", "/metrics",
                 f"/v1/artifact/{'0' * 64}"):
        status, _, body = raw(fleet.url, "GET", path)
        assert status == 401 and "token" in body["detail"], path
    status, _, health = raw(fleet.url, "GET", "/v1/health")
    assert status == 200 and health["security"] == {"workers": "signed", "reads": "token"}
    assert OPERATOR_TOKEN not in json.dumps(health) and health["access"] == "none"


def test_an_enrolled_host_cannot_act_as_another(fleet):
    job, lease = fleet.held["job_id"], fleet.held["lease"]
    # ws2 with its own key, naming ws1 in x-lab-host, heartbeating ws1's job with ws1's lease.
    path = f"/v1/job/{job}/heartbeat"
    b, h = signed(fleet.keys["ws2"], "ws2", "POST", path, {}, {"x-lab-host": "ws1", "x-lease": lease})
    status, _, body = fleet.unchanged(lambda: raw(fleet.url, "POST", path, b, h))
    assert status == 403 and "acts only as itself" in body["detail"]
    # ws2's key, signing as ws1: the signature does not verify.
    b, h = signed(fleet.keys["ws2"], "ws1", "POST", path, {}, {"x-lab-host": "ws1", "x-lease": lease})
    status, _, body = fleet.unchanged(lambda: raw(fleet.url, "POST", path, b, h))
    assert status == 401 and "signature does not match" in body["detail"]
    # ws2 as itself, with the lease it read somewhere: the lease is ws1's, so it is not ws2's job.
    b, h = as_host(fleet.keys["ws2"], "ws2", "POST", f"/v1/job/{job}/complete", {"artifact_id": "0" * 64},
                   {"x-lease": lease})
    status, _, body = fleet.unchanged(lambda: raw(fleet.url, "POST", f"/v1/job/{job}/complete", b, h))
    assert status == 409 and body["error"] == "stale_lease"
    # A worker write without the lease is not fenced by the host name alone any more.
    b, h = as_host(fleet.keys["ws1"], "ws1", "POST", path, {})
    status, _, body = fleet.unchanged(lambda: raw(fleet.url, "POST", path, b, h))
    assert status == 400 and "x-lease" in body["detail"]
    # Claiming an identity a follower would assert: only a peer may.
    b, h = as_host(fleet.keys["ws2"], "ws2", "POST", "/v1/job/claim", CAP, {"x-fleet-identity": "host:ws1"})
    status, _, answer = raw(fleet.url, "POST", "/v1/job/claim", b, h)
    assert status == 200 and (answer["job"] is None or fleet.coordinator.store.job(
        answer["job_id"], time.time())["host"] == "ws2")


def test_a_replayed_request_is_refused(fleet):
    job, lease = fleet.held["job_id"], fleet.held["lease"]
    path = f"/v1/job/{job}/fail"
    b, h = as_host(fleet.keys["ws1"], "ws1", "POST", path, {"error": "first"}, {"x-lease": lease})
    assert raw(fleet.url, "POST", path, b, h)[0] == 200
    status, _, body = fleet.unchanged(lambda: raw(fleet.url, "POST", path, b, h))
    assert status == 401 and "replay" in body["detail"]


def test_a_request_replayed_after_a_restart_is_refused(live_server):
    """The restarted coordinator's nonce memory is empty, so a write without a session signed before it started
    is refused as possibly seen; the host's own requests go on: our client's writes carry sessions (which the
    queue applies once, restarts or not), and a fresh signature once the time named has come passes."""
    srv = live_server(manifest_toml(3))
    key = srv.host_key("ws1")
    b, h = as_host(key, "ws1", "POST", "/v1/job/claim", SLOTS3)
    status, _, first = raw(srv.url, "POST", "/v1/job/claim", b, h)
    assert status == 200 and first["job"] is not None
    data = srv.coordinator.data_dir
    srv.close()
    again = live_server(data_dir=data)
    before = dump(data / "queue.sqlite3")
    status, headers, body = raw(again.url, "POST", "/v1/job/claim", b, h)
    assert status == 401 and body["error"] == "stale_signature" and "restarted" in body["detail"], body
    not_before = int(headers["x-fleet-not-before"])
    assert body["not_before"] == not_before
    assert int(h[signing.H_TIME]) < not_before <= time.time() + signing.HOST_AHEAD_S + 1
    assert dump(data / "queue.sqlite3") == before
    with again.client("ws1") as client:
        claim = client.claim(SLOTS3["capability"], wait=0)
        assert claim["job"] is not None
        assert client.watch(claim["job_id"], claim["lease"], wait=0) == {"cancel": False}  # no session: it waits
    time.sleep(max(0.0, not_before - time.time()))
    b, h = as_host(key, "ws1", "POST", "/v1/job/claim", SLOTS3)
    status, _, third = raw(again.url, "POST", "/v1/job/claim", b, h)
    assert status == 200 and third["job"] is not None


def test_a_request_replayed_after_a_change_of_leader_is_refused(group):
    """The new leader never saw the nonce the old one took: it refuses writes signed before it led, directly
    and through the other peer (which forwards the host's signature time with its nonce)."""
    g = three(group)
    leader = g.leader()
    key = g.keys.host_key("ws1")
    b, h = signed(key, "ws1", "POST", "/v1/job/claim", CAP, {"x-lab-host": "ws1"})
    status, _, first = raw(g.urls[leader], "POST", "/v1/job/claim", b, h)
    assert status == 200 and first["job"] is not None
    g.converged()
    g.stop(leader)
    new = g.leader()
    g.converged()
    queue = g.tmp / new / "queue.sqlite3"
    before = dump(queue)
    for peer in g.coords:
        status, headers, body = raw(g.urls[peer], "POST", "/v1/job/claim", b, h)
        assert status == 401 and body["error"] == "stale_signature", (peer, body)
        assert int(headers["x-fleet-not-before"]) > int(h[signing.H_TIME])
    g.converged()
    assert dump(queue) == before


def test_a_tampered_body_or_target_is_refused(fleet):
    b, h = as_host(fleet.keys["ws2"], "ws2", "POST", "/v1/job/claim", {"capability": {"cores": 1}})
    tampered = json.dumps({"capability": {"cores": 64, "cuda": True}}).encode()
    status, _, body = fleet.unchanged(lambda: raw(fleet.url, "POST", "/v1/job/claim", tampered, h))
    assert status == 401 and "signature does not match" in body["detail"]
    status, _, body = fleet.unchanged(lambda: raw(fleet.url, "POST", "/v1/worker/register", b, h))
    assert status == 401 and "signature does not match" in body["detail"]


def test_a_stale_timestamp_is_refused(fleet):
    b, h = as_host(fleet.keys["ws2"], "ws2", "POST", "/v1/job/claim", CAP)
    old = signing.signature_headers(fleet.keys["ws2"], "host/ws2", "POST", "/v1/job/claim",
                                    signing.body_sha256(b), time.time() - 3600, secrets.token_hex(16),
                                    {"x-lab-host": "ws2"})
    status, _, body = fleet.unchanged(lambda: raw(fleet.url, "POST", "/v1/job/claim", b, {**h, **old}))
    assert status == 401 and "clock" in body["detail"]


def test_a_revoked_key_is_refused_and_a_rotated_one_replaces_it(fleet):
    status, _, body = raw(fleet.url, "POST", "/v1/hosts/ws2/revoke", None, OP)
    assert status == 200
    b, h = as_host(fleet.keys["ws2"], "ws2", "POST", "/v1/job/claim", CAP)
    status, _, body = fleet.unchanged(lambda: raw(fleet.url, "POST", "/v1/job/claim", b, h))
    assert status == 403 and "revoked" in body["detail"]
    assert fleet.keys["ws2"].hex() not in json.dumps(raw(fleet.url, "GET", "/v1/hosts", None, OP)[2])
    status, _, added = raw(fleet.url, "POST", "/v1/hosts", {"host": "ws2"}, OP)
    assert status == 201 and len(added["key"]) == 64
    status, _, rotated = raw(fleet.url, "POST", "/v1/hosts/ws2/rotate", None, OP)
    assert status == 200 and rotated["key"] != added["key"]
    b, h = as_host(bytes.fromhex(added["key"]), "ws2", "POST", "/v1/job/claim", CAP)
    status, _, body = fleet.unchanged(lambda: raw(fleet.url, "POST", "/v1/job/claim", b, h))
    assert status == 401 and "signature does not match" in body["detail"]
    b, h = as_host(bytes.fromhex(rotated["key"]), "ws2", "POST", "/v1/job/claim", CAP)
    assert raw(fleet.url, "POST", "/v1/job/claim", b, h)[0] == 200


def test_hosts_need_the_operator_token(fleet):
    for method, path, body in (("GET", "/v1/hosts", None), ("POST", "/v1/hosts", {"host": "ws7"}),
                               ("POST", "/v1/hosts/ws1/revoke", None), ("POST", "/v1/hosts/ws1/rotate", None)):
        b, h = as_host(fleet.keys["ws1"], "ws1", method, path, body)
        status, _, answer = fleet.unchanged(lambda: raw(fleet.url, method, path, b if body else None, h))
        assert status == 401 and "operator token" in answer["detail"], path


# -- peers ------------------------------------------------------------------------------------------


def test_a_forged_raft_message_and_a_snapshot_fetch_from_a_non_peer_are_refused(group):
    g = three(group)
    f = g.follower()
    queue = g.tmp / f / "queue.sqlite3"
    before = dump(queue)
    cancel = {"type": "AppendEntries", "term": 999, "from": g.leader(), "to": f}
    status, _, body = raw(g.urls[f], "POST", "/v1/raft/messages",
                          {"cluster": g.coords[f].replicator.cluster, "from": g.leader(), "to": f,
                           "messages": [cancel]})
    assert status == 403 and "peers" in body["detail"]
    status, _, body = raw(g.urls[f], "GET", "/v1/raft/snapshot", None,
                          {"x-raft-cluster": g.coords[f].replicator.cluster})
    assert status == 403 and "cluster key" in body["detail"]
    wrong_key = secrets.token_bytes(32)
    b, h = signed(wrong_key, g.leader(), "GET", "/v1/raft/snapshot", None,
                  {"x-raft-cluster": g.coords[f].replicator.cluster}, kind="peer")
    status, _, body = raw(g.urls[f], "GET", "/v1/raft/snapshot", None, h)
    assert status == 401 and "signature does not match" in body["detail"]
    assert dump(queue) == before


def test_through_each_follower_a_host_is_only_itself(group):
    g = three(group)
    leader = g.leader()
    ws2 = g.keys.host_key("ws2")
    for f in (n for n in g.urls if n != leader):
        me = f"ws-{f}"  # a host of its own per follower: each holds one job at a time
        key = g.keys.host_key(me)
        queue = g.tmp / leader / "queue.sqlite3"
        g.converged()
        before = dump(queue)
        # ws2's key, the other host's name, and an identity header a follower would add: refused at the follower.
        b, h = signed(ws2, "ws2", "POST", "/v1/job/claim", CAP, {"x-lab-host": me, "x-fleet-identity": f"host:{me}"})
        status, _, body = raw(g.urls[f], "POST", "/v1/job/claim", b, h)
        assert status == 403 and "acts only as itself" in body["detail"], body
        assert dump(queue) == before
        # The follower forwards what it verified: the host stays itself at the leader.
        b, h = signed(key, me, "POST", "/v1/job/claim", CAP, {"x-lab-host": me})
        status, headers, claim = raw(g.urls[f], "POST", "/v1/job/claim", b, h)
        assert status == 200 and headers["x-forwarded-by"] == f
        assert g.coords[leader].store.job(claim["job_id"], time.time())["host"] == me
        # The same signed request again, through the other follower or the leader: a replay.
        for other in g.urls:
            status, _, body = raw(g.urls[other], "POST", "/v1/job/claim", b, h)
            assert status == 401 and "replay" in body["detail"], (other, body)
        g.converged()
        assert not any("'ws2'" in row for t in ("jobs", "attempts") for row in dump(queue)[t])


def test_mutual_tls_through_a_follower_a_certificate_is_only_itself(group, tmp_path):
    from cis490fleet import tls

    ca_path, contexts = peer_pki(tmp_path, ("ws1", "ghost"))
    g = three(group, tls=contexts)
    leader = g.leader()
    g.coords[leader].execute({"op": "host_key_set", "host": "ws1", "key": "ab" * 32, "by": "test"})
    g.coords[leader].execute({"op": "host_key_set", "host": "ws2", "key": "cd" * 32, "by": "test"})
    ws1 = tls.client_context(ca_path, tmp_path / "ws1.pem")
    ghost = tls.client_context(ca_path, tmp_path / "ghost.pem")
    queue = g.tmp / leader / "queue.sqlite3"
    for f in (n for n in g.urls if n != leader):
        g.converged()
        before = dump(queue)
        for url, headers in ((g.urls[f], {"x-lab-host": "ws2"}), (g.urls[f], {"x-fleet-identity": "host:ws2"}),
                             (g.urls[leader], {"x-fleet-identity": "host:ws2", "x-forwarded-by": f})):
            status, _, body = raw(url, "POST", "/v1/job/claim", CAP, headers, context=ws1)
            if status == 200:  # an identity header from a client is ignored: the claim is ws1's own
                assert g.coords[leader].store.job(body["job_id"], time.time())["host"] == "ws1"
                g.coords[leader].execute({"op": "release", "job_id": body["job_id"], "host": "ws1",
                                          "lease": body["lease"]})
            else:
                assert status == 403 and "certificate" in body["detail"], body
        status, _, body = raw(g.urls[f], "POST", "/v1/job/claim", CAP, context=ghost)
        assert status == 403 and "jobs hosts add ghost" in body["detail"]
        g.converged()
        assert not any(row for row in dump(queue)["attempts"] if "'ws2'" in row or "'ghost'" in row)
        assert dump(queue)["host_keys"] == before["host_keys"]


# -- secure by default ------------------------------------------------------------------------------


@pytest.mark.parametrize("legacy, named", [(True, "--trust-host-header"), (False, "--cluster-key-file")])
def test_serve_refuses_to_run_where_workers_or_peers_need_not_prove_who_they_are(tmp_path, legacy, named):
    """Legacy mode off loopback under TLS without a client CA (nobody proves who they are), and peers that
    share neither a cluster key nor a CA: both refused at start, naming the flag that fixes it."""
    import trustme

    from test_serve_process import run_serve

    if legacy:
        leaf = trustme.CA().issue_cert("127.0.0.1")
        leaf.cert_chain_pems[0].write_to_path(tmp_path / "cert.pem")
        leaf.private_key_pem.write_to_path(tmp_path / "key.pem")
        args = ["--bind", "0.0.0.0:0", "--trust-host-header", "--cert", str(tmp_path / "cert.pem"), "--key",
                str(tmp_path / "key.pem")]
    else:
        args = ["--bind", "127.0.0.1:0", "--node-id", "a", "--peer", "a=http://127.0.0.1:1", "--peer",
                "b=http://127.0.0.1:2"]
    result = run_serve("--data", str(tmp_path / "data"), *args, timeout=60)
    assert result.returncode == 2 and named in result.stderr and "Traceback" not in result.stderr, result.stderr


ADDED_ROUTES = [  # (method, path template, body): routes added beside the original wire, each refused to outsiders
    ("POST", "/v1/jobs", {"toml": '[[jobs]]\nmodel = "mlp"\nmode = "x"\n'}),
    ("GET", "/v1/results", None),
    ("GET", "/v1/job/{id}/metrics", None),
    ("POST", "/v1/job/{id}/watch", {"wait": 0}),
    ("POST", "/v1/worker/leave", {}),
    ("POST", "/v1/hosts", {"host": "ws7"}),
    ("POST", "/v1/peers", {"id": "d", "url": "http://127.0.0.1:1"}),
]


@pytest.mark.parametrize("method, template, body", ADDED_ROUTES, ids=lambda v: v if isinstance(v, str) else "")
def test_the_added_routes_refuse_a_stranger_a_forged_host_and_a_replay(fleet, method, template, body):
    path = template.replace("{id}", fleet.held["job_id"])
    status, _, answer = fleet.unchanged(lambda: raw(fleet.url, method, path, body))
    assert status in (401, 403), (path, status, answer)
    b, h = as_host(secrets.token_bytes(32), "ws1", method, path, body)  # ws1's name, not its key
    status, _, answer = fleet.unchanged(lambda: raw(fleet.url, method, path, b, h))
    assert status in (401, 403), (path, status, answer)
    b, h = as_host(fleet.keys["ws2"], "ws2", method, path, body)
    raw(fleet.url, method, path, b, h)  # another enrolled host: a reader, neither operator nor holder
    status, _, answer = fleet.unchanged(lambda: raw(fleet.url, method, path, b, h))  # the same bytes again
    assert status in (401, 403, 409), (path, status, answer)
