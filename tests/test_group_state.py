"""The replicated group as the one source of truth: reads, the manifest, artifacts, forwarding.

In-process peers on loopback (``test_replication.Group``); ticks of 50 ms.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import threading
import time
from pathlib import Path

import pytest

from conftest import OPERATOR_TOKEN, Conn, http_call, manifest_toml
from test_e2e import jobs_cli, wait_for
from test_replication import W1, Group, claim, free_ports, group, three  # noqa: F401 - the in-process group fixture

from cis490fleet import commands, errors
from cis490fleet.coordinator import Coordinator


def test_a_read_on_a_peer_that_is_not_the_leader_still_passes_the_read_barrier(group):  # noqa: F811
    """The window between forward_url (answer here, this peer leads) and the read (it no longer does):
    the read must still see every write acknowledged before it, so the peer's read barrier runs whatever
    its role now (a follower asks the leader for the read index and waits until it has applied that far)."""
    g = three(group, n_jobs=8)
    leader, f = g.leader(), g.follower()
    for i in range(8):
        status, _, got = http_call(g.urls[leader], "POST", "/v1/job/claim", {"capability": {}},
                                   headers={"x-lab-host": f"w{i}"})
        assert status == 200 and got["job"] is not None
        _, total = g.coords[f].list_jobs(status="claimed")
        assert total == i + 1, f"the read after claim {i + 1} missed it"
        assert g.coords[f].job_detail(got["job_id"])["host"] == f"w{i}"


# -- the manifest is replicated state ------------------------------------------------------------------


OP = {"x-operator-token": OPERATOR_TOKEN}
IN_FORCE = manifest_toml(4, heartbeat_s=0.2, stale_after_s=0.8, max_attempts=3)
FILES = {"a": manifest_toml(5, heartbeat_s=1, stale_after_s=4, max_attempts=1),
         "b": manifest_toml(2, heartbeat_s=2, stale_after_s=8, max_attempts=1),
         "c": manifest_toml(3, heartbeat_s=3, stale_after_s=12, max_attempts=1)}


class FilesGroup(Group):
    """Peers started with different ``--manifest`` files: ``FILES[name]``."""

    def start(self, name: str) -> Coordinator:
        path = self.tmp / f"manifest-{name}.toml"
        path.write_text(FILES[name])
        c = Coordinator(self.tmp / name, manifest_path=path, node_id=name, peers=self.urls,
                        operator_token=OPERATOR_TOKEN, raft_options=self.raft, trust=self.trust())
        c.listen("127.0.0.1", int(self.urls[name].rsplit(":", 1)[1]))
        c.serve_in_thread()
        c.start_background()
        self.coords[name] = c
        return c

    def start_all(self) -> str:
        """Start a, b and c; the leader's name once every peer knows it."""
        for name in "abc":
            self.start(name)
        leader = self.leader()
        wait_for("every peer to know the leader",
                 lambda: all(c.replicator.leader() == leader for c in self.coords.values()))
        return leader


def queue_view(c: Coordinator) -> dict:
    jobs, _ = c.store.jobs()
    return {"manifest": c.store.manifest_info()["sha256"], "fleet": c.store.fleet().to_json(),
            "jobs": sorted((j["id"], j["status"], j["in_manifest"]) for j in jobs)}


@pytest.fixture
def files_group(tmp_path):
    g = FilesGroup(tmp_path / "g")
    yield g
    g.close()


def test_peers_with_different_manifest_files_keep_the_group_s_manifest_across_a_failover(files_group, caplog):
    """The first leader seeds the group with its file; `jobs reload` puts the operator's text in force; a new
    leader never re-reads its own file: no flip of the fleet settings or in_manifest, no job failed 'out of
    tries' by a file's lower max_attempts. A peer whose file differs says so at start with both sha256s."""
    caplog.set_level(logging.INFO)
    g = files_group
    first = g.start_all()
    seeded = commands.manifest_sha256(FILES[first])
    wait_for("the first leader to seed the group",
             lambda: all((c.store.manifest_info() or {}).get("sha256") == seeded for c in g.coords.values()))
    wait_for("each other peer to say its file differs", lambda: caplog.text.count("differs from the group") >= 2)
    assert seeded[:16] in caplog.text and commands.manifest_sha256(FILES[g.follower()])[:16] in caplog.text

    status, _, result = http_call(g.urls[g.follower()], "POST", "/v1/manifest/reload",
                                  {"text": IN_FORCE, "name": "lab.toml"}, headers=OP)
    assert status == 200, result
    assert result["manifest"]["sha256"] == commands.manifest_sha256(IN_FORCE) and result["total"] >= 4
    # One try used and lost (no heartbeat within stale_after_s): pending again with attempts 1, which a file
    # with max_attempts = 1 would call out of tries.
    status, _, got = http_call(g.urls[g.leader()], "POST", "/v1/job/claim", {"capability": {}}, headers=W1)
    assert status == 200 and got["job"] is not None
    wait_for("the stale claim to go back to pending",
             lambda: g.coords[g.leader()].store.job(got["job_id"], time.time())["status"] == "pending", timeout=20)
    before = queue_view(g.coords[g.leader()])
    assert before["fleet"]["max_attempts"] == 3

    old = g.leader()
    g.stop(old)
    new = g.leader()
    assert new != old
    status, _, _ = http_call(g.urls[new], "GET", "/v1/jobs")  # passes the new leader's read barrier
    assert status == 200
    time.sleep(1.0)  # room for a leader's start-up work (the old code re-read its file here)
    g.converged()
    for c in g.coords.values():
        assert queue_view(c) == before
    assert "out of tries" not in caplog.text


def test_a_reload_without_a_file_through_a_follower_puts_that_peer_s_own_file_in_force(files_group):
    g = files_group
    g.start_all()
    f = g.follower()
    status, headers, result = http_call(g.urls[f], "POST", "/v1/manifest/reload", headers=OP)
    assert status == 200 and headers["x-forwarded-by"] == f, result
    assert result["manifest"]["sha256"] == commands.manifest_sha256(FILES[f])
    wait_for("every peer to apply it", lambda: {(c.store.manifest_info() or {}).get("sha256")
                                                for c in g.coords.values()} == {commands.manifest_sha256(FILES[f])})
    health = g.coords[f].health()
    assert health["manifest"]["sha256"] == commands.manifest_sha256(FILES[f])


def test_jobs_reload_file_sends_the_text_and_jobs_peers_shows_the_manifest_in_force(files_group, tmp_path):
    g = files_group
    g.start_all()
    mine = tmp_path / "mine.toml"
    mine.write_text(IN_FORCE)
    out = jobs_cli(g.urls[g.follower()], "reload", str(mine))
    sha = commands.manifest_sha256(IN_FORCE)
    assert out.returncode == 0 and f"sha256 {sha[:16]}" in out.stdout, out.stderr
    g.converged()
    out = jobs_cli(g.urls["a"], "peers")
    assert out.returncode == 0, out.stderr
    assert "MANIFEST" in out.stdout and out.stdout.count(sha[:12]) == 3, out.stdout


# -- forwarding ------------------------------------------------------------------------------------------


class LosingLeader:
    """A stand-in for a leader's HTTP side that reads a write and closes the connection without answering
    (as a leader that applied it and then crashed): once per distinct write, answering a repeat. Reads are
    answered on the kept-alive connection."""

    def __init__(self):
        self.seen: list[tuple[str, str | None]] = []
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn, conn.makefile("rb") as f:
            while True:
                line = f.readline()
                if not line:
                    return
                method, target, _ = line.decode().split(" ", 2)
                headers = {}
                while (h := f.readline()) not in (b"\r\n", b""):
                    k, _, v = h.decode().partition(":")
                    headers[k.strip().lower()] = v.strip()
                f.read(int(headers.get("content-length") or 0))
                key = (target, headers.get("x-client-serial"))
                self.seen.append(key)
                if method == "POST" and self.seen.count(key) == 1:
                    return  # applied, never answered
                body = b'{"jobs": [], "total": 0, "job": null}'
                conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "
                             + str(len(body)).encode() + b"\r\n\r\n" + body)

    def close(self) -> None:
        self.sock.close()


def test_a_forwarded_write_that_may_have_reached_the_leader_is_repeated_only_with_a_client_session(tmp_path):
    leader = LosingLeader()
    coord = Coordinator(tmp_path / "follower", node_id="f")
    coord.forward_url = lambda template, params=None: leader.url  # every request goes to the stand-in leader
    coord.listen("127.0.0.1", 0)
    coord.serve_in_thread()
    try:
        with Conn(coord.url) as conn:
            assert conn.call("GET", "/v1/jobs")[0] == 200  # keeps a connection to the leader for this client
            status, _, body = conn.call("POST", "/v1/job/claim", {"capability": {}}, headers=W1)
            assert status == 503 and "may have been applied" in body["detail"], body
            assert leader.seen.count(("/v1/job/claim", None)) == 1, "a write without a session was sent twice"

            assert conn.call("GET", "/v1/jobs")[0] == 200
            session = {**W1, "x-client-id": "c" * 16, "x-client-serial": "7"}
            status, _, body = conn.call("POST", "/v1/job/claim", {"capability": {}}, headers=session)
            assert status == 200, body
            assert leader.seen.count(("/v1/job/claim", "7")) == 2
    finally:
        coord.close(grace=2)
        leader.close()


# -- artifacts ---------------------------------------------------------------------------------------------


def bring_back(folder: Path) -> None:
    """Put a bundle folder moved away back (the peer's own fetcher may have made the folder meanwhile)."""
    folder.mkdir(exist_ok=True)
    for f in folder.with_name(folder.name + ".away").iterdir():
        f.rename(folder / f.name)


def test_a_peer_back_from_a_stop_keeps_fetching_a_missing_bundle_and_serves_it_from_a_peer_meanwhile(group):  # noqa: F811
    """A follower that was down during an upload finds no peer holding the bundle at first (both copies are
    moved away): it says one bundle is missing, a download through it is streamed from the first peer that
    has the file again (the leader still lacks it), and it fetches its own copy on a later try."""
    g = three(group)
    leader = g.leader()
    away = next(n for n in g.coords if n != leader)
    other = next(n for n in g.coords if n not in (leader, away))
    g.stop(away)
    got = claim(g.urls[leader], "w1")
    data = os.urandom(20_000)
    sha = hashlib.sha256(data).hexdigest()
    status, _, _ = http_call(g.urls[leader], "PUT", f"/v1/model/{got['job_id']}", data,
                             headers={"x-lab-host": "w1", "x-lease": got["lease"], "x-content-sha256": sha})
    assert status == 201
    wait_for("the push to reach the other follower", lambda: g.coords[other].artifacts.locate(sha) is not None)
    held = {n: g.coords[n].artifacts.locate(sha).parent for n in (leader, other)}
    for folder in held.values():
        folder.rename(folder.with_name(folder.name + ".away"))
    back = g.start(away)
    g.converged()
    wait_for("the missing bundle to show", lambda: back.health()["artifacts_missing"] == 1)
    status, _, body = http_call(g.urls[away], "GET", f"/v1/artifact/{sha}")
    assert status == 404, body

    bring_back(held[other])
    status, headers, body = http_call(g.urls[away], "GET", f"/v1/artifact/{sha}")
    assert status == 200 and body == data and headers["x-content-sha256"] == sha
    wait_for("the returning peer to fetch its own copy", lambda: back.artifacts.locate(sha) is not None, timeout=40)
    assert hashlib.sha256(back.artifacts.locate(sha).read_bytes()).hexdigest() == sha
    wait_for("nothing missing any more", lambda: back.health()["artifacts_missing"] == 0, timeout=10)
    bring_back(held[leader])


def test_a_leader_refuses_proposals_beyond_its_cap_on_uncommitted_entries(group):  # noqa: F811
    """With no follower answering, commands cannot commit: past ``max_uncommitted`` waiting entries a
    proposal fails at once with Unavailable (503, Retry-After) instead of piling up."""
    g = three(group, election_ticks=(60, 80), max_uncommitted=3)  # the leader keeps leading 3-4 s alone
    leader = g.leader()
    g.keys.host_key("w1")  # the worker's key first: adding it is a command, which needs a quorum too
    for name in [n for n in g.coords if n != leader]:
        g.stop(name)
    futures = [g.coords[leader].replicator.submit({"op": "sweep_stale", "now": time.time()}) for _ in range(5)]
    refused = [f.exception(2) for f in futures[3:]]
    assert all(isinstance(e, errors.Unavailable) and "wait for a quorum" in str(e) for e in refused), refused
    assert not any(f.done() for f in futures[:3]), "the first three wait for a quorum"
    status, headers, body = http_call(g.urls[leader], "POST", "/v1/job/claim", {"capability": {}}, headers=W1)
    assert status == 503 and headers["retry-after"] == "1", body


def test_entries_for_a_slow_peer_are_held_back_at_its_byte_budget(group):  # noqa: F811
    """Peer c is reached through a link that holds every chunk back 300 ms: the leader queues entries for it
    only up to ``max_inflight_bytes`` (Raft sends the rest again once c catches up), and a and b keep
    committing; c catches up in the end."""
    from peer_harness import LinkProxy

    g = group(max_inflight_bytes=16 * 1024)
    (real_c,) = free_ports(1)
    link = LinkProxy(real_c, "to-c", mode="delay", delay_ms=300)
    g.urls["c"] = link.url
    try:
        for name in "ab":
            g.start(name)
        # c's own posts (and the answers to them) go direct, so c could win an election and have no slow link
        # to itself: a or b leads, c waits far longer before it campaigns.
        c = Coordinator(g.tmp / "c", node_id="c", peers=g.urls, operator_token=OPERATOR_TOKEN,
                        raft_options={**g.raft, "election_ticks": (400, 500)}, trust=g.trust())
        c.listen("127.0.0.1", real_c)
        c.serve_in_thread()
        g.coords["c"] = c
        leader = g.leader()
        assert leader != "c"
        coord = g.coords[leader]
        coord.execute({"op": "sweep_stale"})
        wait_for("c to follow", lambda: c.store.applied_index() == coord.store.applied_index(), timeout=30)
        for i in range(150):
            coord.execute({"op": "register_worker", "host": f"w{i}", "capability": {"note": "x" * 4000}})
        sender = coord.replicator._senders["c"]
        assert sender.held_back > 0, "nothing was held back: the budget was never reached"
        # A message is always let in when nothing waits (else a large one would never go), so the queue may
        # hold the budget plus one AppendEntries: at most 64 entries of a little over 4 KiB each.
        assert sender.queued_bytes <= 16 * 1024 + 64 * 4200
        link.set_mode("pass")
        wait_for("c to catch up", lambda: c.store.applied_index() == coord.store.applied_index(), timeout=30)
    finally:
        link.close()


# -- snapshots ---------------------------------------------------------------------------------------------


def test_a_follower_keeps_stepping_raft_while_it_downloads_a_snapshot(group):  # noqa: F811
    """A follower far behind fetches the leader's queue over a slow link: its driver keeps taking the
    leader's entries meanwhile (its commit index moves on), holds them back until the copy is in place,
    then applies them and ends up with the leader's queue."""
    from peer_harness import LinkProxy

    g = three(group, n_jobs=30, snapshot_every=5)
    leader = g.leader()
    away = next(n for n in g.coords if n != leader)
    g.stop(away)
    for i in range(12):
        g.coords[leader].claim(f"w{i}", {})  # entries of the leader's own: no host key to add first
    links = [LinkProxy(int(url.rsplit(":", 1)[1]), f"to-{n}", mode="delay", delay_ms=4000)
             for n, url in g.urls.items() if n != away]
    slow_urls = {**g.urls, **{n: link.url for n, link in zip([n for n in g.urls if n != away], links)}}
    try:
        back = Coordinator(g.tmp / away, node_id=away, peers=slow_urls, operator_token=OPERATOR_TOKEN,
                           raft_options=g.raft, trust=g.trust())
        back.listen("127.0.0.1", int(g.urls[away].rsplit(":", 1)[1]))
        back.serve_in_thread()
        g.coords[away] = back
        wait_for("the snapshot download to begin", lambda: back.replicator._installing is not None, timeout=20)
        before = back.replicator.status()["commit"]
        for i in range(12, 15):
            g.coords[leader].claim(f"w{i}", {})  # entries of the leader's own: no host key to add first
        wait_for("the follower to take new entries during the download",
                 lambda: back.replicator.status()["commit"] > before and back.replicator._installing is not None,
                 timeout=10, every=0.02)
        for link in links:
            link.set_mode("pass")
        wait_for("the follower to catch up", lambda: back.store.applied_index() == g.coords[leader].store.applied_index()
                 and back.store.counts() == g.coords[leader].store.counts(), timeout=30)
    finally:
        for link in links:
            link.close()


def test_health_counts_as_applied_only_what_the_queue_holds_while_a_snapshot_downloads(group):  # noqa: F811
    """A follower far behind takes the leader's snapshot, and its node counts everything up to it as applied,
    but its queue stands where it was until the copy is in place. Health's ``applied`` must say where the
    queue stands (and ``installing`` which snapshot it awaits), else "every peer applied everything" is seen
    while one queue still lacks acknowledged claims. The follower reaches the others through links that hold
    every chunk back 1.5 s, then refuse it once the download has begun: the copy cannot arrive while the
    test looks."""
    from peer_harness import LinkProxy

    g = three(group, n_jobs=30, snapshot_every=5)
    leader = g.leader()
    away = next(n for n in g.coords if n != leader)
    g.stop(away)
    for i in range(12):
        claim(g.urls[leader], f"w{i}")
    others = [n for n in g.urls if n != away]
    links = [LinkProxy(int(g.urls[n].rsplit(":", 1)[1]), f"to-{n}", mode="delay", delay_ms=1500) for n in others]
    try:
        back = Coordinator(g.tmp / away, node_id=away, peers={**g.urls, **{n: link.url for n, link in
                                                                           zip(others, links)}},
                           operator_token=OPERATOR_TOKEN, raft_options=g.raft, trust=g.trust())
        back.listen("127.0.0.1", int(g.urls[away].rsplit(":", 1)[1]))
        back.serve_in_thread()
        g.coords[away] = back
        wait_for("the snapshot download to begin", lambda: back.health()["installing"] is not None, timeout=20,
                 every=0.01)
        for link in links:
            link.set_mode("refuse")
        h = back.health()
        assert h["installing"] is not None, "the copy arrived before the links were cut"
        assert h["applied"] <= back.store.applied_index() < h["installing"] <= h["snapshot_index"] <= h["commit"]
        assert h["applied"] < g.coords[leader].health()["applied"]
        for link in links:
            link.set_mode("pass")
        wait_for("the follower to catch up", lambda: back.health()["installing"] is None
                 and back.health()["applied"] == g.coords[leader].health()["applied"], timeout=30)
        assert back.store.applied_index() >= back.health()["applied"]
        assert back.store.counts() == g.coords[leader].store.counts()
    finally:
        for link in links:
            link.close()


def test_a_snapshot_the_queue_already_holds_is_not_fetched_again(group):  # noqa: F811
    """A follower's queue can stand ahead of its node's commit index (it installed a copy taken later than the
    snapshot). A snapshot at or below where the queue stands must not be downloaded: a copy from a peer that
    lags would take the queue back while the driver went on from where it stood, and the entries in between
    would never be applied on this peer. The driver is handed such a snapshot directly."""
    from cis490fleet import raft

    g = three(group, n_jobs=6, snapshot_every=3)
    leader = g.leader()
    for i in range(6):
        claim(g.urls[leader], f"w{i}")
    g.converged()
    f = g.follower()
    rep, store = g.coords[f].replicator, g.coords[f].store
    queue = g.tmp / f / "queue.sqlite3"
    inode, applied = queue.stat().st_ino, store.applied_index()

    def hand_snapshot(node):
        index = applied - 1
        rep._begin_install(raft.Snapshot(index, node.term_at(index) or node.term, {"index": index}, node.config))

    rep._call(hand_snapshot).result(5)
    rep._call(lambda node: None).result(5)  # one more turn of the driver: its status is refreshed after the first
    assert rep.health()["installing"] is None, "the follower set out to fetch a queue it already holds"
    wait_for("no download in progress", lambda: rep.health()["installing"] is None, timeout=30)
    assert queue.stat().st_ino == inode, "the follower swapped in a copy of a queue it already held"
    assert store.applied_index() == applied
