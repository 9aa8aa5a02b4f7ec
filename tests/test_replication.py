"""A replicated coordinator group on loopback: election, forwarding, exactly-once application, failover.

In-process peers (``Coordinator(peers=...)`` on real HTTP servers) for the API,
real ``serve --node-id/--peer`` subprocesses for kill -9 and restarts. Ticks are
shortened (50 ms) so elections take well under a second.
"""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from conftest import (CLUSTER_KEY, OPERATOR_TOKEN, READ_TOKEN, Conn, GroupKeys, cluster_key_file, http_call,
                      manifest_toml, serve_command, serve_env, signed, wait_health)
from test_e2e import manifest as e2e_manifest
import test_e2e
from test_e2e import jobs_cli, slow_job, wait_for

from cis490fleet import auth, errors, openapi
from cis490fleet.coordinator import Coordinator
from cis490fleet.replication import cluster_id, parse_peer

ROOT = Path(__file__).resolve().parent.parent
workers = test_e2e.workers  # the e2e worker-process fixture
FAST = {"tick_s": 0.05, "election_ticks": (10, 20), "heartbeat_ticks": 1}
W1 = {"x-lab-host": "w1"}


def claim(url: str, host: str) -> dict:
    status, _, body = http_call(url, "POST", "/v1/job/claim", {"capability": {}}, headers={"x-lab-host": host})
    assert status == 200, body
    return body


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


class Group:
    """In-process peers ``a``, ``b``, ``c`` sharing one manifest; ``start(name)`` (re)starts one on its folder."""

    def __init__(self, tmp: Path, n: int = 3, n_jobs: int = 3, tls=None, **raft):
        self.tmp = tmp
        tmp.mkdir(parents=True, exist_ok=True)
        self.tls = tls  # name -> (server context, peer client context)
        scheme = "https" if tls else "http"
        self.urls = {name: f"{scheme}://127.0.0.1:{p}" for name, p in zip("abcde"[:n], free_ports(n))}
        self.manifest = tmp / "manifest.toml"
        self.manifest.write_text(manifest_toml(n_jobs))
        self.raft = {**FAST, **raft}
        self.coords: dict[str, Coordinator] = {}
        self.keys = GroupKeys(self.urls.values(), context=None).register()

    def start(self, name: str) -> Coordinator:
        server_ctx, peer_ctx = self.tls[name] if self.tls else (None, None)
        c = Coordinator(self.tmp / name, manifest_path=self.manifest, node_id=name, peers=self.urls,
                        operator_token=OPERATOR_TOKEN, raft_options=self.raft, peer_ssl_context=peer_ctx,
                        trust=self.trust())
        c.listen("127.0.0.1", int(self.urls[name].rsplit(":", 1)[1]), server_ctx)
        c.serve_in_thread()
        c.start_background()
        self.coords[name] = c
        return c

    def trust(self) -> auth.Trust:
        """A peer's trust settings: the tokens of the fixtures, and the cluster key unless the peers use TLS."""
        return auth.Trust(operator_tokens={auth.DEFAULT_OPERATOR: OPERATOR_TOKEN}, read_tokens={"test": READ_TOKEN},
                          cluster_key=None if self.tls else CLUSTER_KEY)

    def stop(self, name: str) -> None:
        self.coords.pop(name).close(grace=5)

    def leader(self, timeout: float = 10) -> str:
        def one():
            leaders = [n for n, c in self.coords.items() if c.replicator.status()["role"] == "leader"]
            return leaders[0] if len(leaders) == 1 else None
        return wait_for("one leader", one, timeout=timeout, every=0.02)

    def follower(self) -> str:
        leader = self.leader()
        return next(n for n in self.coords if n != leader)

    def converged(self, timeout: float = 10) -> dict:
        """Wait until every running peer has applied the same index and holds the same counts."""
        def same():
            views = {(c.store.applied_index(), tuple(sorted(c.store.counts().items()))) for c in self.coords.values()}
            return views.pop() if len(views) == 1 else None
        return dict(wait_for("the peers to converge", same, timeout=timeout, every=0.02)[1])

    def close(self) -> None:
        """Followers first, so the last leader finds nobody to hand over to (and does not wait for it)."""
        order = sorted(self.coords, key=lambda n: self.coords[n].replicator.status()["role"] == "leader")
        for name in order:
            self.stop(name)
            time.sleep(0.1)  # a heartbeat round: the leader marks the stopped peer unreachable


@pytest.fixture
def group(tmp_path):
    groups: list[Group] = []

    def make(**kw) -> Group:
        g = Group(tmp_path / f"g{len(groups)}", **kw)
        groups.append(g)
        return g

    yield make
    for g in groups:
        g.close()


def three(group, **kw) -> Group:
    g = group(**kw)
    for name in "abc":
        g.start(name)
    g.leader()
    wait_for("the manifest synced", lambda: g.converged()["pending"] == kw.get("n_jobs", 3))
    return g


def test_a_claim_through_a_follower_is_forwarded_and_applied_on_every_peer(group):
    g = three(group)
    f = g.follower()
    status, headers, body = http_call(g.urls[f], "POST", "/v1/job/claim", {"capability": {}}, headers=W1)
    assert status == 200, body
    assert headers["x-forwarded-by"] == f
    assert body["lease"].isdigit(), "a claim's fencing token is its log index"
    counts = g.converged()
    assert counts["claimed"] == 1 and counts["pending"] == 2
    job = g.coords[f].store.job(body["job_id"], time.time())
    assert job["host"] == "w1"
    # Reads through a follower come from the leader too, and see the claim.
    status, headers, listed = http_call(g.urls[f], "GET", "/v1/jobs?status=claimed")
    assert status == 200 and listed["total"] == 1 and headers["x-forwarded-by"] == f


def test_health_shows_role_term_leader_and_each_peer_s_lag(group):
    g = three(group)
    leader = g.leader()
    f = g.follower()
    _, _, h = http_call(g.urls[f], "GET", "/v1/health")
    assert h["role"] == "follower" and h["node_id"] == f and h["leader"] == leader
    assert h["leader_url"] == g.urls[leader] and h["term"] >= 1 and h["applied"] <= h["commit"]
    _, _, lh = http_call(g.urls[leader], "GET", "/v1/health")
    assert lh["role"] == "leader"
    rows = {p["id"]: p for p in lh["peers"]}
    assert set(rows) == {"a", "b", "c"}
    for pid in set(rows) - {leader}:
        assert rows[pid]["lag"] >= 0 and rows[pid]["match"] <= lh["last_index"]
    schema = openapi.document()["paths"]["/v1/health"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    for answer in (h, lh):
        assert set(answer) <= set(schema["properties"]), "health says more than /v1/openapi.json documents"
        assert set(schema["required"]) <= set(answer)


def test_an_upload_through_a_follower_lands_on_a_majority_before_it_is_acknowledged(group):
    g = three(group)
    f = g.follower()
    _, _, claim = http_call(g.urls[f], "POST", "/v1/job/claim", {"capability": {}}, headers=W1)
    data = os.urandom(300_000)
    sha = hashlib.sha256(data).hexdigest()
    headers = {**W1, "x-lease": claim["lease"], "x-content-sha256": sha}
    status, _, up = http_call(g.urls[f], "PUT", f"/v1/model/{claim['job_id']}", data, headers=headers)
    assert status == 201, up
    holding = [n for n, c in g.coords.items() if c.artifacts.locate(sha) is not None]
    assert len(holding) >= 2, holding
    status, _, done = http_call(g.urls[f], "POST", f"/v1/job/{claim['job_id']}/complete", {"artifact_id": sha},
                                headers={**W1, "x-lease": claim["lease"]})
    assert status == 200, done
    assert g.converged()["completed"] == 1
    wait_for("every peer to hold the bundle", lambda: all(c.artifacts.locate(sha) for c in g.coords.values()))
    for c in g.coords.values():
        assert hashlib.sha256(c.artifacts.locate(sha).read_bytes()).hexdigest() == sha


def test_a_stopped_leader_hands_over_and_a_restarted_peer_applies_each_entry_once(group):
    g = three(group)
    leader = g.leader()
    for i in range(2):
        assert claim(g.urls[leader], f"w{i}")["job_id"]
    before = g.converged()
    g.stop(leader)
    new = g.leader(timeout=5)
    assert new != leader
    assert claim(g.urls[new], "w9")["job_id"]
    g.start(leader)
    counts = g.converged()
    assert counts["claimed"] == before["claimed"] + 1 == 3
    # Exactly once: the restarted peer re-applied nothing it had (one attempt per claimed job).
    for job in g.coords[leader].store.jobs()[0]:
        assert len(g.coords[leader].store.job(job["id"], time.time())["attempts"]) == 1


def test_a_follower_far_behind_installs_the_leader_s_queue_as_a_snapshot(group, caplog):
    g = three(group, snapshot_every=3, n_jobs=8)
    leader = g.leader()
    lagging = g.follower()
    g.stop(lagging)
    for i in range(8):
        assert claim(g.urls[leader], f"w{i}")["job_id"]
    assert g.coords[leader].replicator.status()["snapshot_index"] > 0
    caplog.set_level(logging.INFO, logger="cis490fleet.replication")
    g.start(lagging)
    assert g.converged()["claimed"] == 8
    # The swapped-in queue is visible before the driver thread logs the install: wait for the line.
    wait_for("the snapshot install logged", lambda: "installed the leader's queue" in caplog.text, timeout=10)


def test_messages_from_another_cluster_are_refused(group):
    g = three(group)
    f = g.follower()
    batch = {"cluster": "not-this-one", "from": "a", "to": f, "messages": []}

    def as_peer(body):
        body, headers = signed(CLUSTER_KEY, "a", "POST", "/v1/raft/messages", body, {}, kind="peer")
        return http_call(g.urls[f], "POST", "/v1/raft/messages", body, headers)

    status, _, body = as_peer(batch)
    assert status == 403 and body["error"] == "forbidden"
    assert "cluster" in body["detail"]
    good = {**batch, "cluster": cluster_id(g.urls), "from": "zz"}
    assert as_peer(good)[0] == 403
    bad = {**batch, "cluster": cluster_id(g.urls), "from": g.leader(), "messages": [{"type": "Nonsense"}]}
    status, _, body = as_peer(bad)
    assert status == 400 and "unknown type" in body["detail"]


def test_a_follower_answers_in_the_response_signed_for_that_request_only_when_asked(group):
    import http.client
    import json
    import secrets

    from cis490fleet import signing
    from cis490fleet.replication import ANSWER_METHOD, answer_target

    g = three(group)
    leader, f = g.leader(), g.follower()
    term = g.coords[leader].replicator.status()["term"]
    batch = {"cluster": cluster_id(g.urls), "from": leader, "to": f, "url": g.urls[leader],
             "messages": [{"type": "Heartbeat", "term": term, "from": leader, "to": f, "commit": 0, "ctx": "probe"}]}
    port = int(g.urls[f].rsplit(":", 1)[1])

    def post(extra: dict, key: bytes | None = CLUSTER_KEY) -> tuple[int, http.client.HTTPMessage, bytes, str]:
        body = json.dumps(batch).encode()
        nonce = secrets.token_hex(16)
        headers = {"content-type": "application/json", **extra}
        if key is not None:
            headers.update(signing.signature_headers(key, f"peer/{leader}", "POST", "/v1/raft/messages",
                                                     signing.body_sha256(body), time.time(), nonce))
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            conn.request("POST", "/v1/raft/messages", body, headers)
            resp = conn.getresponse()
            return resp.status, resp.headers, resp.read(), nonce
        finally:
            conn.close()

    status, headers, data, nonce = post({"x-raft-answer": "inline"})
    assert status == 200, data
    answer = json.loads(data)
    assert [(m["type"], m["from"], m["to"], m.get("ctx")) for m in answer["messages"]] == \
        [("HeartbeatResp", f, leader, "probe")]
    signed = signing.parse(headers.get)
    assert signed is not None and signed.signer == f"peer/{f}"
    signing.verify(CLUSTER_KEY, signed, ANSWER_METHOD, answer_target(nonce), signing.body_sha256(data), time.time())
    with pytest.raises(errors.Unauthorized):  # bound to its request: useless as the answer to another
        signing.verify(CLUSTER_KEY, signed, ANSWER_METHOD, answer_target(secrets.token_hex(16)),
                       signing.body_sha256(data), time.time())
    # Not asked: the answer travels on the follower's own connection, as before.
    status, headers, data, _ = post({})
    assert status == 200 and json.loads(data) == {"ok": True}
    assert signing.parse(headers.get) is None
    # Asking changes nothing about who may post: only a peer, signed with the cluster key.
    assert post({"x-raft-answer": "inline"}, key=None)[0] in (401, 403)
    assert post({"x-raft-answer": "inline"}, key=bytes(32))[0] == 401


def test_the_leader_steps_only_answers_signed_by_the_peer_it_asked_for_that_request():
    """A sender posts, then steps the messages in the response: only when signed with the cluster key by the
    peer it posted to, for this very request, and only messages from that peer to itself."""
    import functools
    import http.server
    import json
    import queue
    import secrets
    import threading
    from types import SimpleNamespace

    from cis490fleet import signing
    from cis490fleet.replication import ANSWER_METHOD, Replicator, _Sender, answer_target

    resp_msg = {"type": "AppendEntriesResp", "term": 1, "from": "b", "to": "a", "reject": False, "index": 7}
    answer = {"how": "good"}

    class Peer(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def do_POST(self):
            self.rfile.read(int(self.headers["content-length"]))
            how = answer["how"]
            msg = {**resp_msg, "from": "c"} if how == "from another peer" else resp_msg
            body = json.dumps({"ok": True, "messages": [msg]}).encode()
            nonce = secrets.token_hex(16) if how == "for another request" else self.headers.get(signing.H_NONCE)
            key = bytes(32) if how == "another key" else CLUSTER_KEY
            signer = "peer/c" if how == "signed by another peer" else "peer/b"
            headers = {} if how == "unsigned" else signing.signature_headers(
                key, signer, ANSWER_METHOD, answer_target(nonce), signing.body_sha256(body), time.time(),
                secrets.token_hex(16))
            self.send_response(200)
            for name, value in {**headers, "content-length": str(len(body))}.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Peer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    owner = SimpleNamespace(cluster="c1", joining_cluster=None, node_id="a", urls={"a": "http://127.0.0.1:1"},
                            ssl_context=None, cluster_key=CLUSTER_KEY, max_inflight_bytes=1 << 20,
                            _inbox=queue.SimpleQueue())
    owner.peer_headers = functools.partial(Replicator.peer_headers, owner)
    sender = _Sender(owner, "b", f"http://127.0.0.1:{server.server_address[1]}")
    append = {"type": "AppendEntries", "term": 1, "from": "a", "to": "b", "prev_log_index": 0, "prev_log_term": 0,
              "commit": 0, "entries": []}
    try:
        for how in ("unsigned", "another key", "for another request", "signed by another peer",
                    "from another peer"):
            answer["how"] = how
            sender._post([append])
            assert owner._inbox.empty(), how
        answer["how"] = "good"
        sender._post([append])
        kind, msgs, peer, _, _ = owner._inbox.get_nowait()
        assert (kind, peer, [m["index"] for m in msgs]) == ("msgs", "b", [7])
    finally:
        sender.box.put(None)
        server.shutdown()
        server.server_close()


def test_a_single_coordinator_has_no_peer_endpoint(live_server):
    server = live_server(manifest=manifest_toml(1))
    status, _, body = server.call("POST", "/v1/raft/messages", {"cluster": "x", "from": "a", "to": "b",
                                                                 "messages": []})
    assert status == 404 and "--peer" in body["detail"]


@pytest.mark.parametrize("value", ["a", "a=", "=http://x:1", "a=ftp://x", "a b=http://x:1"])
def test_bad_peer_flags_are_one_line_errors(value):
    with pytest.raises(errors.ConfigError, match="ID=URL"):
        parse_peer(value)


def test_serve_refuses_a_node_id_missing_from_its_peers(tmp_path):
    env = serve_env()
    proc = subprocess.run(serve_command("--data", str(tmp_path / "d"), "--bind", "127.0.0.1:0", "--node-id", "x",
                                        "--peer", "a=http://127.0.0.1:1"), cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "--node-id 'x' is not among the --peer entries" in proc.stderr
    assert "Traceback" not in proc.stderr


# -- real processes ------------------------------------------------------------------------------


def start_peer(tmp: Path, name: str, urls: dict, manifest: Path, extra=()) -> subprocess.Popen:
    port = urls[name].rsplit(":", 1)[1]
    argv = serve_command("--data", str(tmp / name), "--bind", f"127.0.0.1:{port}", "--manifest", str(manifest),
                         "--node-id", name, "--raft-tick-ms", "50", "--cluster-key-file",
                         str(cluster_key_file(tmp)), *extra)
    for pid, url in urls.items():
        argv += ["--peer", f"{pid}={url}"]
    GroupKeys(urls.values()).register()
    log = open(tmp / f"{name}.log", "ab")
    return subprocess.Popen(argv, cwd=ROOT, env=serve_env(), stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL)


def health(url: str) -> dict | None:
    try:
        status, _, body = http_call(url, "GET", "/v1/health", timeout=2)
    except OSError:
        return None
    return body if status == 200 else None


@pytest.mark.skipif(os.name == "nt", reason="uses POSIX signals")
def test_kill_9_of_the_leader_elects_another_and_loses_no_acknowledged_write(tmp_path):
    urls = {n: f"http://127.0.0.1:{p}" for n, p in zip("abc", free_ports(3))}
    manifest = tmp_path / "manifest.toml"
    manifest.write_text(manifest_toml(4))
    procs = {n: start_peer(tmp_path, n, urls, manifest) for n in urls}
    try:
        for url in urls.values():
            wait_health(url, timeout=60)

        def leader_of(alive):
            seen = {h["leader"] for u in alive if (h := health(urls[u])) and h.get("role") in ("leader", "follower")}
            seen.discard(None)
            return seen.pop() if len(seen) == 1 else None

        leader = wait_for("a leader", lambda: leader_of(urls), timeout=20)
        wait_for("the manifest synced", lambda: (health(urls[leader]) or {}).get("jobs", {}).get("pending") == 4)
        follower = next(n for n in urls if n != leader)
        acked = []
        for i in range(2):
            acked.append(claim(urls[follower], f"w{i}")["job_id"])
        procs[leader].send_signal(signal.SIGKILL)
        procs[leader].wait(30)
        survivors = [n for n in urls if n != leader]
        t0 = time.monotonic()
        new = wait_for("a new leader", lambda: (lambda l: l if l and l != leader else None)(leader_of(survivors)),
                       timeout=10, every=0.05)
        assert time.monotonic() - t0 < 10
        for job_id in acked:
            status, _, body = http_call(urls[survivors[0]], "GET", f"/v1/job/{job_id}")
            assert status == 200 and body["job"]["status"] == "claimed", body
        assert claim(urls[new], "w9")["job_id"] not in acked
        procs[leader] = start_peer(tmp_path, leader, urls, manifest)
        wait_health(urls[leader], timeout=60)
        target = health(urls[new])["commit"]
        wait_for("the old leader to catch up",
                 lambda: (h := health(urls[leader])) and h["applied"] >= target and h["jobs"]["claimed"] == 3,
                 timeout=20)
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait(30)


@pytest.mark.skipif(os.name == "nt", reason="uses POSIX signals")
def test_a_group_of_one_serves_a_worker_end_to_end(tmp_path, workers):
    (port,) = free_ports(1)
    url = f"http://127.0.0.1:{port}"
    manifest = tmp_path / "manifest.toml"
    manifest.write_text(e2e_manifest(slow_job(steps=3, sleep=0.05)))
    proc = start_peer(tmp_path, "solo", {"solo": url}, manifest)
    try:
        wait_for("leader", lambda: (health(url) or {}).get("role") == "leader", timeout=60)
        wait_for("the manifest synced", lambda: (health(url) or {}).get("jobs", {}).get("pending") == 1)
        w = workers(url, "solo-w", "--once")
        assert w.wait(60) == 0, w.log_text()
        h = health(url)
        assert h["jobs"]["completed"] == 1, w.log_text()
        assert h["applied"] == h["commit"] >= 4
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)


def test_jobs_peers_shows_every_member_from_one_url(group):
    g = three(group)
    leader = g.leader()
    f = g.follower()
    proc = jobs_cli(g.urls[f], "peers")
    assert proc.returncode == 0, proc.stderr
    rows = {line.split()[0]: line.split() for line in proc.stdout.splitlines()[1:] if line.strip()}
    assert set(rows) == set(g.urls.values())
    assert rows[g.urls[leader]][1] == "leader"
    for name, url in g.urls.items():
        if name != leader:
            role, term, leader_id, node, member, commit, applied, lag = rows[url][1:9]
            assert (role, leader_id, node, member) == ("follower", leader, name, "voter")
            assert int(applied) <= int(commit) and int(lag) >= 0


def peer_pki(tmp_path: Path, hosts: tuple[str, ...]) -> tuple[Path, dict]:
    """A CA, certificates for peers a, b, c (server and peer-client contexts) and for ``hosts``
    (``<host>.pem`` next to ``ca.pem``): (the CA's path, {peer: (server context, client context)})."""
    import trustme

    from cis490fleet import tls

    ca = trustme.CA()
    ca_path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(ca_path)
    contexts = {}
    for name in "abc":
        leaf = ca.issue_cert("127.0.0.1", "localhost", common_name=name)
        cert, key = tmp_path / f"{name}.pem", tmp_path / f"{name}.key"
        leaf.cert_chain_pems[0].write_to_path(cert)
        leaf.private_key_pem.write_to_path(key)
        contexts[name] = (tls.server_context(cert, key, ca_path), tls.client_context(ca_path, cert, key))
    for host in hosts:
        ca.issue_cert(host).private_key_and_cert_chain_pem.write_to_path(tmp_path / f"{host}.pem")
    return ca_path, contexts


def test_peers_over_mutual_tls_forward_a_worker_s_certificate_identity_and_nobody_else_s(group, tmp_path):
    from cis490fleet import tls

    ca_path, contexts = peer_pki(tmp_path, ("ws1",))
    worker = tls.client_context(ca_path, tmp_path / "ws1.pem")
    g = three(group, tls=contexts)
    # `jobs hosts add ws1`: only hosts the fleet knows hold jobs
    g.coords[g.leader()].execute({"op": "host_key_set", "host": "ws1", "key": "ab" * 32, "by": "test"})
    f = g.follower()
    status, headers, body = http_call(g.urls[f], "POST", "/v1/job/claim", {"capability": {}}, context=worker)
    assert status == 200 and headers["x-forwarded-by"] == f, body
    assert g.coords[g.leader()].store.job(body["job_id"], time.time())["host"] == "ws1"
    # A worker cannot pass itself off as a forwarding peer to speak for another host.
    status, _, body = http_call(g.urls[g.leader()], "POST", "/v1/job/claim", {"capability": {}}, context=worker,
                                headers={"x-forwarded-by": f, "x-lab-host": "ws2"}, credentials=False)
    assert status == 403 and "certificate" in body["detail"]


def test_a_follower_keeps_one_connection_to_the_leader_per_client_connection(group):
    g = three(group)
    leader = g.coords[g.leader()]
    for i in range(5):
        g.keys.host_key(f"w{i}")
    accepted = []
    leader.server.accept_hook = accepted.append
    with Conn(g.urls[g.follower()]) as conn:
        assert conn.call("GET", "/v1/jobs")[0] == 200
        opened = len(accepted)
        for i in range(5):
            status, headers, _ = conn.call("POST", "/v1/job/claim", {"capability": {}}, {"x-lab-host": f"w{i}"})
            assert status == 200 and headers["x-forwarded-by"]
            assert conn.call("GET", "/v1/workers")[0] == 200
    assert len(accepted) == opened, "each forwarded request opened a new connection to the leader"


def test_a_retried_command_of_a_client_session_applies_once_and_answers_as_the_first_time(group):
    g = three(group)
    leader = g.coords[g.leader()]
    claim_cmd = {"op": "claim", "host": "w1", "capability": {}, "lease": None, "lease_from_index": True,
                 "client_id": "w1-session", "serial": 1}
    first = leader.execute(claim_cmd)
    assert first["job_id"]
    assert leader.execute(claim_cmd) == first
    assert g.converged()["claimed"] == 1
    release = {"op": "release", "job_id": first["job_id"], "host": "w1", "lease": "wrong",
               "client_id": "w1-session", "serial": 2}
    with pytest.raises(errors.StaleLease):
        leader.execute(release)
    with pytest.raises(errors.StaleLease):  # the same answer, from the session, not a second try
        leader.execute({**release, "lease": first["lease"]})
    assert g.converged()["claimed"] == 1
    with pytest.raises(errors.BadRequest, match="serial 1 is older than 2"):
        leader.execute(claim_cmd)
    for c in g.coords.values():
        assert c.store.job(first["job_id"], time.time())["status"] == "claimed"


def test_a_claim_whose_answer_was_lost_with_the_leader_is_the_same_claim_on_the_next_leader(group):
    from cis490fleet.client import Client
    from test_client_sessions import DropFirstAnswer

    g = three(group)
    old = g.leader()
    proxy = DropFirstAnswer(int(g.urls[old].rsplit(":", 1)[1]), on_drop=lambda: g.stop(old))
    try:
        others = [u for n, u in g.urls.items() if n != old]
        client = Client([proxy.url, *others], host_id="w1", retries=20, backoff_s=0.05, backoff_max_s=0.5)
        got = client.claim({"host": "w1"})
    finally:
        proxy.close()
    assert proxy.dropped.is_set() and g.leader() != old
    assert g.converged()["claimed"] == 1
    for c in g.coords.values():
        job = c.store.job(got["job_id"], time.time())
        assert (job["status"], job["host"], job["attempt_count"], len(job["attempts"])) == ("claimed", "w1", 1, 1)
    assert client.heartbeat(got["job_id"], got["lease"]) == {"ok": True, "cancel": False}


def test_peers_come_from_the_flags_else_from_the_manifest_s_fleet_peers(tmp_path, caplog):
    from cis490fleet.coordinator import _peer_settings, build_parser

    manifest = tmp_path / "m.toml"
    manifest.write_text(manifest_toml(1, extra='[[fleet.peers]]\nid = "a"\nurl = "http://127.0.0.1:9001"\n'
                                              '[[fleet.peers]]\nid = "b"\nurl = "http://127.0.0.1:9002/"\n'))
    args = build_parser().parse_args(["--manifest", str(manifest), "--node-id", "a", "--raft-tick-ms", "20"])
    peers, options, _ = _peer_settings(args)
    assert peers == {"a": "http://127.0.0.1:9001", "b": "http://127.0.0.1:9002"}
    assert options["tick_s"] == 0.02 and options["election_ticks"] == (20, 40) and options["heartbeat_ticks"] == 3
    flags = build_parser().parse_args(["--manifest", str(manifest), "--node-id", "x", "--peer", "x=http://h:1"])
    assert _peer_settings(flags)[0] == {"x": "http://h:1"}
    assert _peer_settings(build_parser().parse_args([]))[0] is None
    for bad, message in ((["--peer", "a=http://h:1"], "needs --node-id"),
                         (["--node-id", "a", "--peer", "a=http://h:1", "--peer", "a=http://h:2"], "id twice"),
                         (["--node-id", "a", "--peer", "a=http://h:1", "--raft-election-ticks", "20-10"], "LO < HI")):
        with pytest.raises(errors.ConfigError, match=message):
            _peer_settings(build_parser().parse_args(bad))


def test_a_group_of_two_warns_that_it_cannot_survive_a_loss(group, caplog):
    caplog.set_level(logging.WARNING, logger="cis490fleet.replication")
    g = group(n=2)
    g.start("a")
    assert "add a third (jobs peers add)" in caplog.text


def test_a_follower_that_missed_an_upload_fetches_the_bundle_when_it_applies_the_record(group):
    g = three(group)
    leader = g.leader()
    away = g.follower()
    g.stop(away)
    got = claim(g.urls[leader], "w1")
    data = os.urandom(10_000)
    sha = hashlib.sha256(data).hexdigest()
    status, _, _ = http_call(g.urls[leader], "PUT", f"/v1/model/{got['job_id']}", data,
                             headers={"x-lab-host": "w1", "x-lease": got["lease"], "x-content-sha256": sha})
    assert status == 201
    assert (g.tmp / away).exists() and not list((g.tmp / away).glob(f"models/*/{sha}"))
    back = g.start(away)
    wait_for("the returning follower to fetch the bundle", lambda: back.artifacts.locate(sha) is not None, timeout=10)
    assert hashlib.sha256(back.artifacts.locate(sha).read_bytes()).hexdigest() == sha


def test_peer_traffic_stays_out_of_the_request_counters_and_the_info_access_log(group, caplog):
    caplog.set_level(logging.INFO, logger="cis490fleet.http_api.access")
    g = three(group)
    f = g.coords[g.follower()]
    before = f.counters.snapshot()["counters"]["requests"]
    time.sleep(0.5)  # ten heartbeat rounds at 50 ms ticks
    assert f.replicator.status()["role"] == "follower"
    assert f.counters.snapshot()["counters"]["requests"] == before
    assert "/v1/raft/messages" not in caplog.text
    assert http_call(g.urls[g.follower()], "GET", "/v1/health")[0] == 200
    assert "/v1/health" in caplog.text


@pytest.mark.skipif(os.name == "nt", reason="uses POSIX signals")
def test_kill_9_mid_load_with_the_log_compacted_every_few_entries_loses_no_acknowledged_claim(tmp_path):
    """The queue runs with synchronous=NORMAL under Raft and the log is compacted every 3 entries: each peer
    must still restart onto a queue that holds every acknowledged claim, and re-apply the rest from its log."""
    import sqlite3
    import threading

    urls = {n: f"http://127.0.0.1:{p}" for n, p in zip("abc", free_ports(3))}
    manifest = tmp_path / "manifest.toml"
    manifest.write_text(manifest_toml(400))
    extra = ("--raft-snapshot-every", "3")
    procs = {n: start_peer(tmp_path, n, urls, manifest, extra) for n in urls}
    acked: dict[str, str] = {}  # job id -> lease, as answered
    seen: dict[str, dict] = {}  # peer -> its last health before the kill
    stop = threading.Event()

    def load(worker: int) -> None:
        i = 0
        while not stop.wait(0.05):  # paced, so the jobs outlast the restarts
            i += 1
            try:
                status, _, body = http_call(urls["abc"[(worker + i) % 3]], "POST", "/v1/job/claim",
                                            {"capability": {}}, headers={"x-lab-host": f"w{worker}-{i}"}, timeout=5)
            except (OSError, errors.FleetError):  # FleetError: adding the host's key met a kill (it may be in)
                continue
            if status == 200 and body.get("job_id"):
                acked[body["job_id"]] = body["lease"]

    try:
        for url in urls.values():
            wait_health(url, timeout=60)
        leader = wait_for("a leader", lambda: (health(urls["a"]) or {}).get("leader"), timeout=20)
        wait_for("the manifest synced", lambda: (health(urls[leader]) or {}).get("jobs", {}).get("pending") == 400)
        threads = [threading.Thread(target=load, args=(w,), daemon=True) for w in range(4)]
        for t in threads:
            t.start()
        victims = [leader, next(n for n in urls if n != leader)]
        for victim in victims:
            wait_for("claims before the kill", lambda n=len(acked): len(acked) >= n + 8, timeout=30, every=0.02)
            procs[victim].send_signal(signal.SIGKILL)
            procs[victim].wait(30)
            wait_for("claims while a peer is down", lambda n=len(acked): len(acked) >= n + 5, timeout=30, every=0.02)
            procs[victim] = start_peer(tmp_path, victim, urls, manifest, extra)
            wait_health(urls[victim], timeout=60)
        wait_for("claims after the restarts", lambda n=len(acked): len(acked) >= n + 5, timeout=30, every=0.02)
        stop.set()
        for t in threads:
            t.join(30)

        def same_applied():
            hs = [health(u) for u in urls.values()]
            seen.update((n, h) for n, h in zip(urls, hs) if h)
            return all(hs) and len({h["applied"] for h in hs}) == 1 and hs[0]["applied"] >= hs[0]["commit"]

        wait_for("every peer applied everything", same_applied, timeout=30)
    finally:
        stop.set()
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait(30)
    assert len(acked) >= 31
    states = {name: _peer_files(tmp_path / name) for name in urls}
    for name, st in states.items():
        lost = {j: (lease, st["jobs"].get(j)) for j, lease in acked.items() if st["jobs"].get(j) != ("claimed", lease)}
        if lost:
            raise AssertionError(
                f"peer {name} lost {len(lost)} of {len(acked)} acknowledged claims (job: acked lease, its (status, "
                f"lease) there): {lost}\n" + _describe_peers(tmp_path, states, seen))
        assert st["snapshot_index"], f"peer {name} never compacted its log\n" + _describe_peers(tmp_path, states, seen)


def _peer_files(folder: Path) -> dict:
    """What a stopped peer's files hold: each job's (status, lease), the queue's applied index, the raft log's
    snapshot index, commit index and last entry."""
    import sqlite3

    queue = sqlite3.connect(f"file:{folder / 'queue.sqlite3'}?mode=ro", uri=True)
    raft_db = sqlite3.connect(f"file:{folder / 'raft.sqlite3'}?mode=ro", uri=True)
    try:
        jobs = {j: (status, lease) for j, status, lease in queue.execute("SELECT id, status, lease FROM jobs")}
        applied = queue.execute("SELECT value FROM meta WHERE key = 'raft_applied'").fetchone()
        snap = raft_db.execute("SELECT idx FROM snapshot").fetchone()
        commit = raft_db.execute("SELECT commit_index FROM hard_state").fetchone()
        last = raft_db.execute("SELECT MAX(idx) FROM entries").fetchone()
    finally:
        queue.close()
        raft_db.close()
    return {"jobs": jobs, "queue_applied": int(applied[0]) if applied else 0,
            "snapshot_index": snap[0] if snap else 0, "commit": commit[0] if commit else 0, "last_entry": last[0]}


def _describe_peers(tmp: Path, states: dict, seen: dict) -> str:
    """Each peer's files and its last health (applied, commit, snapshot, install under way), and the end of its
    log (requests left out): enough to tell from a CI log alone where a claim went missing."""
    lines = []
    for name, st in states.items():
        h = seen.get(name) or {}
        lines.append(f"peer {name}: queue applied {st['queue_applied']}, raft snapshot {st['snapshot_index']}, "
                     f"commit {st['commit']}, last entry {st['last_entry']}; last health: role {h.get('role')}, "
                     f"applied {h.get('applied')}, commit {h.get('commit')}, snapshot {h.get('snapshot_index')}, "
                     f"installing {h.get('installing')}")
        log_file = tmp / f"{name}.log"
        text = log_file.read_text(errors="replace") if log_file.exists() else ""
        tail = [line for line in text.splitlines() if "http_api.access" not in line][-15:]
        lines += [f"  {name}.log: {line}" for line in tail]
    return "\n".join(lines)
