"""Chaos tests of a replicated coordinator group: 3 ``serve`` peers behind link proxies.

Workers (the original raw client and ours) claim, heartbeat, upload and complete jobs, and
now and then release or fail one or send a poisoned claim, while a reader reads jobs through
every peer and the leader is killed with -9, paused with SIGSTOP and resumed, and partitioned
away and healed. Afterwards: every job came out exactly once, no two acknowledged leases of
one job overlapped in time (``check_leases``), reads were linearizable as far as the queue
shows them (``check_reads``), every poisoned claim was a 400, and every replica holds the
same queue (Raft §5.3, §5.4: log matching and leader completeness, seen from the outside).

The harness pieces that need no peers (proxy modes, peer arguments, the history checker)
are tested here too, so that a checker that cannot fail cannot pass unnoticed. The long
randomized variant is ``soak``: ``python3 make.py soak -k peers``.
"""

from __future__ import annotations

import os
import random
import socket
import sys
import threading
import time

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from peer_harness import (History, LinkProxy, PeerGroup, Workload, check_history, check_leases,  # noqa: E402
                          check_reads,
                          describe_differences, missing_artifacts, serve_supports_peers)

STALE_S = 4
MANIFEST_FLEET = (f"[fleet]\nheartbeat_s = 1\nstale_after_s = {STALE_S}\nmax_attempts = 50\nretries = 40\n"
                  "retry_backoff_s = 0.1\n\n"
                  "[[sweeps]]\nmodel = \"mlp\"\nmode = \"train\"\n")


def manifest(n_jobs: int) -> str:
    return MANIFEST_FLEET + f"seed = [{', '.join(str(i) for i in range(n_jobs))}]\n"


# -- the proxy -------------------------------------------------------------------------------------------


@pytest.fixture
def echo_port():
    """A TCP echo server on 127.0.0.1 (one thread per connection)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    stop = threading.Event()

    def handle(conn):
        with conn:
            try:
                while data := conn.recv(4096):
                    conn.sendall(data)
            except OSError:
                pass

    def loop():
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            threading.Thread(target=handle, args=(conn,), daemon=True).start()

    threading.Thread(target=loop, daemon=True).start()
    yield srv.getsockname()[1]
    stop.set()
    srv.close()


def roundtrip(sock: socket.socket, data: bytes) -> bytes:
    sock.sendall(data)
    got = b""
    while len(got) < len(data):
        chunk = sock.recv(4096)
        if not chunk:
            break
        got += chunk
    return got


@pytest.fixture
def proxy(echo_port):
    p = LinkProxy(echo_port, name="t")
    yield p
    p.close()


def test_proxy_passes_bytes_both_ways(proxy):
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as s:
        assert roundtrip(s, b"hello") == b"hello"
        assert roundtrip(s, b"x" * 200_000) == b"x" * 200_000


def test_blackhole_swallows_bytes_then_heal_cuts_the_old_connection(proxy):
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as s:
        assert roundtrip(s, b"before") == b"before"
        proxy.set_mode("blackhole")
        s.settimeout(0.5)
        s.sendall(b"lost")
        with pytest.raises(socket.timeout):
            s.recv(10)
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=0.5) as s2:
            s2.sendall(b"also lost")
            with pytest.raises(socket.timeout):
                s2.recv(10)
        proxy.set_mode("pass")
        s.settimeout(5)
        with pytest.raises(OSError):
            if s.recv(10) == b"":
                raise ConnectionResetError("closed")
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as s:
        assert roundtrip(s, b"after") == b"after"
    assert proxy.bytes_dropped >= len(b"lost")


def test_refuse_and_reset_cut_connections(proxy):
    s = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
    assert roundtrip(s, b"one") == b"one"
    proxy.set_mode("reset")
    with pytest.raises(OSError):
        s.sendall(b"two")
        if s.recv(10) == b"":
            raise ConnectionResetError("closed")
    s.close()
    assert proxy.mode == "pass"
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as s:
        assert roundtrip(s, b"three") == b"three"
    proxy.set_mode("refuse")
    with pytest.raises(OSError):
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as s:
            s.sendall(b"four")
            if s.recv(10) == b"":
                raise ConnectionResetError("closed")


def test_delay_holds_each_chunk_back(proxy):
    proxy.set_mode("delay", delay_ms=150)
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as s:
        t0 = time.monotonic()
        assert roundtrip(s, b"slow") == b"slow"
        assert time.monotonic() - t0 >= 0.3  # one delay each way: a lower bound, not a performance figure
    with pytest.raises(ValueError, match="not one of"):
        proxy.set_mode("drop")


def test_group_wires_each_directed_link_through_its_own_proxy(tmp_path):
    group = PeerGroup(tmp_path, n=3, manifest_text=manifest(2), tick_ms=20)
    try:
        argv = group.argv("a")
        peers = [argv[i + 1] for i, v in enumerate(argv) if v == "--peer"]
        assert peers == [f"a={group.peers['a'].url}", f"b={group.links[('a', 'b')].url}",
                         f"c={group.links[('a', 'c')].url}"]
        assert group.links[("a", "b")].target_port == group.peers["b"].port
        assert argv[argv.index("--raft-tick-ms") + 1] == "20"
        assert (tmp_path / "b" / "manifest.toml").read_text() == manifest(2)
        group.partition(["a"])
        cut = {k for k, link in group.links.items() if link.mode == "blackhole"}
        assert cut == {("a", "b"), ("b", "a"), ("a", "c"), ("c", "a")}
        group.partition(["a", "b"], ["c"], mode="refuse")
        assert {k for k, link in group.links.items() if link.mode == "refuse"} == {
            ("a", "c"), ("c", "a"), ("b", "c"), ("c", "b")}
        group.heal()
        assert {link.mode for link in group.links.values()} == {"pass"}
        with pytest.raises(ValueError, match="no peer 'z'"):
            group.partition(["z"])
    finally:
        group.close()


# -- the checker ---------------------------------------------------------------------------------------

J1, J2 = "1" * 64, "2" * 64


def good_case():
    h = History()
    h.add("claims", host="w1", job_id=J1, attempt=1, lease="L1")
    h.add("claims", host="w2", job_id=J1, attempt=2, lease="L2")
    h.add("completes", host="w2", job_id=J1, attempt=2, lease="L2", artifact_id="a" * 64)
    h.add("claims", host="w1", job_id=J2, attempt=1, lease="L3")
    h.add("completes", host="w1", job_id=J2, attempt=1, lease="L3", artifact_id="b" * 64)
    state = {"jobs": {J1: ("completed", 2, 1, "w2", "L2", "a" * 64, None),
                      J2: ("completed", 1, 1, "w1", "L3", "b" * 64, None)},
             "attempts": {J1: [(1, "w1", "L1", 1.0, 5.0, "stale"), (2, "w2", "L2", 5.0, 6.0, "completed")],
                          J2: [(1, "w1", "L3", 1.0, 2.0, "completed")]}}
    return h, state


def test_checker_accepts_a_clean_history():
    h, state = good_case()
    assert check_history(h, state) == []


@pytest.mark.parametrize("breakage, expect", [
    ("double_grant", "granted twice"),
    ("overlap", "still valid"),
    ("lost_complete", "acknowledged complete lost"),
    ("two_completers", "by 2 holders"),
    ("lost_claim", "acknowledged claim lost"),
    ("unacked_completion", "no complete of it was acknowledged"),
    ("regranted", "granted again"),
    ("pending", "ended pending"),
])
def test_checker_catches_each_violation(breakage, expect):
    h, state = good_case()
    if breakage == "double_grant":
        h.add("claims", host="w3", job_id=J1, attempt=1, lease="L9")
    elif breakage == "overlap":
        state["attempts"][J1][0] = (1, "w1", "L1", 1.0, None, None)
    elif breakage == "lost_complete":
        state["jobs"][J2] = ("pending", 1, 0, None, None, None, None)
    elif breakage == "two_completers":
        h.add("completes", host="w1", job_id=J1, attempt=1, lease="L1", artifact_id="c" * 64)
    elif breakage == "lost_claim":
        h.add("claims", host="w3", job_id=J2, attempt=7, lease="L7")
    elif breakage == "unacked_completion":
        h.completes = [c for c in h.completes if c["job_id"] != J2]
    elif breakage == "regranted":
        h.add("claims", host="w3", job_id=J2, attempt=2, lease="L8")
        state["attempts"][J2].append((2, "w3", "L8", 3.0, None, None))
    elif breakage == "pending":
        state["jobs"]["3" * 64] = ("pending", 0, 0, None, None, None, None)
    problems = check_history(h, state)
    assert any(expect in p for p in problems), problems


def lease_case() -> History:
    """Job J1: attempt 1 heartbeats until 10.0 and is released at 11.0; attempt 2 is granted at 11.5."""
    h = History()
    h.add("claims", host="w1", job_id=J1, attempt=1, lease="L1", t_inv=9.0, t_ack=9.1)
    h.add("heartbeats", host="w1", job_id=J1, attempt=1, t_inv=10.0, t_ack=10.1)
    h.add("ends", host="w1", job_id=J1, attempt=1, op="release", t_inv=11.0)
    h.add("claims", host="w2", job_id=J1, attempt=2, lease="L2", t_inv=11.4, t_ack=11.5)
    h.add("reads", job_id=J1, status="claimed", attempt=2, t_inv=11.6, t_ack=11.7)
    return h


def test_lease_and_read_checkers_accept_a_clean_history():
    h = lease_case()
    assert check_leases(h, stale_after_s=4) == [] and check_reads(h) == []


@pytest.mark.parametrize("breakage, expect", [
    ("granted_before_release", "held it until at least 11.000"),
    ("granted_before_stale", "held it until at least 14.000"),
    ("stale_read", "saw attempt 1"),
    ("read_went_back", "saw attempt 1"),
])
def test_lease_and_read_checkers_catch_each_violation(breakage, expect):
    h = lease_case()
    if breakage == "granted_before_release":
        h.claims[1]["t_ack"] = 10.5
    elif breakage == "granted_before_stale":
        h.ends.clear()  # no last word: held until 4 s after the last acknowledged heartbeat
        h.claims[1]["t_ack"] = 13.0
    elif breakage == "stale_read":
        h.reads[0]["attempt"] = 1
    elif breakage == "read_went_back":
        h.add("reads", job_id=J1, status="claimed", attempt=1, t_inv=11.8, t_ack=11.9)
    problems = check_leases(h, stale_after_s=4) + check_reads(h)
    assert any(expect in p for p in problems), problems


def test_differences_are_described():
    _, a = good_case()
    _, b = good_case()
    b["jobs"][J1] = ("claimed",) + b["jobs"][J1][1:]
    text = describe_differences({"a": a, "b": b})
    assert "jobs[111111111111]" in text and "claimed" in text


# -- the group under chaos -----------------------------------------------------------------------------

@pytest.fixture
def peers_supported():
    if not serve_supports_peers():
        pytest.skip("serve does not take --peer: the replicated coordinator is not in this build")


needs_peers = pytest.mark.usefixtures("peers_supported")


def all_completed(group: PeerGroup, leader: str) -> bool:
    try:
        state = group.read_state(leader)
    except Exception:
        return False
    return bool(state["jobs"]) and all(j[0] == "completed" for j in state["jobs"].values())


def drain(group: PeerGroup, work: Workload, timeout: float) -> None:
    """Workers at full speed until the leader's queue has nothing left, then stop them."""
    work.work_s = 0.0
    deadline = time.monotonic() + timeout
    leader = group.wait_leader(timeout)
    while not all_completed(group, leader):
        if time.monotonic() > deadline:
            break
        time.sleep(0.2)
        leader = group.current_leader() or leader
    work.finish()


BUNDLE_WAIT_S = 15.0


def verify(group: PeerGroup, work: Workload, bundles_on: tuple[str, ...] | None = None) -> dict:
    """Replicas converged, the history checks out, and every completed job's bundle is on the peers
    ``bundles_on`` (default: all) within ``BUNDLE_WAIT_S``: a peer restored from a snapshot fetches the
    bundles its new queue names in the background."""
    states = group.converged_states(timeout=30)
    history = work.history
    assert not history.errors, history.errors
    assert history.completes, "no complete was acknowledged at all"
    state = next(iter(states.values()))
    print(f"claims {len(history.claims)}, completes {len(history.completes)}, refused {len(history.rejected)}, "
          f"abandoned {len(history.abandoned)}, "
          f"unanswered claims {history.unknown}, heartbeats {len(history.heartbeats)}, "
          f"last words {len(history.ends)} ({sum(e['op'] != 'complete' for e in history.ends)} release/fail), "
          f"reads {len(history.reads)}, poisoned claims {len(history.poisoned)}, jobs {len(state['jobs'])}, "
          f"attempts {sum(len(a) for a in state['attempts'].values())}")
    problems = check_history(history, state) + check_leases(history, STALE_S) + check_reads(history)
    assert not problems, "\n".join(problems[:20])
    # A poisoned claim is refused (400), or meets a group without a leader (503) or a leader newer than its
    # signature (401 stale_signature, before anything reads the body); never taken, never a 500.
    refused = [p for p in history.poisoned if p["status"] not in (400, 503) and p["error"] != "stale_signature"]
    assert not refused, refused
    assert not history.poisoned or any(p["status"] == 400 for p in history.poisoned)
    deadline = time.monotonic() + BUNDLE_WAIT_S
    while True:
        lost = [m for nid in (group.node_ids if bundles_on is None else bundles_on)
                for m in missing_artifacts(group.peers[nid].data_dir, state)]
        if not lost or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert not lost, "\n".join(lost[:20])
    return state


def run_fault(group: PeerGroup, work: Workload, fault: str, rng: random.Random, hold_s: float) -> int:
    """One fault against the current leader, then wait until a majority names a leader again.
    Returns how many completes had been acknowledged when the fault struck."""
    leader = group.wait_leader(30)
    done = len(work.history.completes)
    print(f"{time.monotonic():.1f} {fault} {leader} for {hold_s:.1f} s; {done} completes")
    if fault == "kill9":
        group.kill9(leader)
        group.wait_leader(30, exclude=(leader,))
        time.sleep(hold_s)
        group.start(leader)
        group.wait_up(leader)
    elif fault == "pause":
        group.pause(leader)
        time.sleep(hold_s)
        group.resume(leader)
    elif fault == "partition":
        group.partition([leader], mode=rng.choice(("blackhole", "refuse")))
        group.wait_leader(30, exclude=(leader,))
        time.sleep(hold_s)
        group.heal()
    elif fault == "delay":
        for (a, b), link in group.links.items():
            if leader in (a, b):
                link.set_mode("delay", delay_ms=rng.choice((20, 50)))
        time.sleep(hold_s)
        group.heal()
    print(f"{time.monotonic():.1f} leader {group.wait_leader(30)}")
    return done


@needs_peers
def test_exactly_once_through_kill_pause_and_partition_of_the_leader(tmp_path):
    with PeerGroup(tmp_path / "peers", n=3, manifest_text=manifest(120)) as group:
        group.wait_up()
        group.wait_leader(30)
        with Workload(group.urls, tmp_path / "work", raw=2, client=2, work_s=0.7, abandon_every=9, late_every=10,
                      late_s=4.5, release_every=7, fail_every=8, poison_every=5, readers=1) as work:
            time.sleep(1.0)
            rng = random.Random(6)
            struck_at = [run_fault(group, work, fault, rng, hold_s=2.5) for fault in ("kill9", "pause", "partition")]
            drain(group, work, timeout=40)
        assert struck_at[-1] < 120, "every job was done before the last fault: the faults tested nothing"
        state = verify(group, work)
        assert sum(1 for j in state["jobs"].values() if j[0] == "completed") == 120
        assert group.links[("b", "a")].accepted + group.links[("a", "b")].accepted > 0


def restart_behind(tmp_path, bundles_on_follower: bool) -> None:
    with PeerGroup(tmp_path / "peers", n=3, manifest_text=manifest(30),
                   extra_args=("--raft-snapshot-every", "20")) as group:
        group.wait_up()
        leader = group.wait_leader(30)
        follower = next(n for n in group.node_ids if n != leader)
        group.kill9(follower)
        with Workload(group.urls, tmp_path / "work", raw=1, client=1) as work:
            drain(group, work, timeout=40)
        group.start(follower)
        group.wait_up(follower)
        verify(group, work, None if bundles_on_follower else tuple(n for n in group.node_ids if n != follower))


@needs_peers
def test_follower_restarted_behind_catches_up(tmp_path):
    """A follower that was down while every job ran gets the whole state back once restarted: the log
    was compacted meanwhile (every 20 entries), so it needs the leader's snapshot (§7)."""
    restart_behind(tmp_path, bundles_on_follower=False)


@needs_peers
def test_follower_restarted_behind_gets_the_bundles_too(tmp_path):
    restart_behind(tmp_path, bundles_on_follower=True)


@pytest.mark.soak
@needs_peers
@pytest.mark.parametrize("seed", range(5))
def test_soak_random_faults(tmp_path, seed):
    rng = random.Random(seed)
    print(f"seed {seed}")
    with PeerGroup(tmp_path / "peers", n=3, manifest_text=manifest(1000),
                   extra_args=("--raft-snapshot-every", str(rng.choice((50, 500, 10000))))) as group:
        group.wait_up()
        group.wait_leader(30)
        with Workload(group.urls, tmp_path / "work", raw=3, client=3, work_s=0.4, abandon_every=13,
                      late_every=17, late_s=4.5, release_every=11, fail_every=12, poison_every=7,
                      readers=1) as work:
            for _ in range(12):
                run_fault(group, work, rng.choice(("kill9", "pause", "partition", "delay")), rng,
                          hold_s=rng.uniform(0.5, 6.0))
                time.sleep(rng.uniform(0.2, 1.5))
            drain(group, work, timeout=180)
        verify(group, work)


def claim_many(url: str, n: int, host: str) -> int:
    """``n`` claims on one kept-alive connection (raw, each signed with the host's key): how many got a job."""
    import http.client
    import json

    from conftest import GroupKeys, signed
    from peer_harness import CAPABILITY

    key = GroupKeys([url]).host_key(host)

    port = int(url.rsplit(":", 1)[1])
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    body = json.dumps({"capability": dict(CAPABILITY, slots=10**6)})
    got = 0
    try:
        for _ in range(n):
            sent, headers = signed(key, host, "POST", "/v1/job/claim", body.encode(),
                                   {"x-lab-host": host, "content-type": "application/json"})
            conn.request("POST", "/v1/job/claim", body=sent, headers=headers)
            resp = conn.getresponse()
            got += resp.status == 200 and b'"job_id"' in resp.read()
    finally:
        conn.close()
    return got


@pytest.mark.soak
@needs_peers
def test_soak_follower_installs_snapshots_while_its_health_is_polled(tmp_path):
    """A follower far behind swaps in the leader's queue (§7) while dashboards poll it: it must stay up.
    (Seen once: a follower 100,000 entries behind died of SIGSEGV during the install.)"""
    with PeerGroup(tmp_path / "peers", n=3, manifest_text=manifest(6000), proxies=False,
                   extra_args=("--raft-snapshot-every", "200")) as group:
        group.wait_up()
        for round_ in range(3):
            leader = group.wait_leader(30)
            follower = next(n for n in group.node_ids if n != leader)
            group.kill9(follower)
            threads = [threading.Thread(target=claim_many, args=(group.peers[leader].url, 500, f"r{round_}h{i}"))
                       for i in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            target = group.health(leader, timeout=10)["commit"]
            stop = threading.Event()

            def poll(path: str) -> None:
                from peer_harness import http_json

                while not stop.is_set():
                    try:
                        http_json(group.peers[follower].url, "GET", path, timeout=2)
                    except OSError:
                        time.sleep(0.01)

            pollers = [threading.Thread(target=poll, args=(p,), daemon=True)
                       for p in ("/v1/health", "/v1/health", "/metrics", "/")]
            group.start(follower)
            for t in pollers:
                t.start()
            try:
                deadline = time.monotonic() + 60
                while (group.health(follower) or {}).get("applied", 0) < target:
                    assert group.peers[follower].alive, group.peers[follower].log_text(6000)
                    assert time.monotonic() < deadline, f"{follower} did not catch up: {group.health(follower)}"
                    time.sleep(0.02)
            finally:
                stop.set()
            assert group.peers[follower].alive, group.peers[follower].log_text(6000)
        group.converged_states(timeout=30)
