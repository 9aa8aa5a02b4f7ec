"""Membership changes of a real three-peer group (``serve`` subprocesses) while workers keep completing jobs.

A fourth peer joins as a learner and is promoted, a follower is removed, and a dead
follower is replaced under a new id (thesis §4, one server at a time); every
acknowledged claim and completion survives, and the members left agree on the queue.
"""

from __future__ import annotations

import time

from peer_harness import PeerGroup, Workload
from test_peers_chaos import drain, manifest, needs_peers, peers_supported, verify  # noqa: F401 (a fixture)


def voters(group: PeerGroup) -> list[str]:
    leader = group.wait_leader(30)
    return group.health(leader)["voters"]


def wait_voters(group: PeerGroup, want: list[str], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while voters(group) != want:
        if time.monotonic() > deadline:
            raise AssertionError(f"voters are {voters(group)}, expected {want}; health: {group.healths()}")
        time.sleep(0.1)


@needs_peers
def test_add_promote_remove_and_replace_a_dead_peer_while_jobs_complete(tmp_path):
    with PeerGroup(tmp_path / "peers", n=3, manifest_text=manifest(60),
                   extra_args=("--raft-snapshot-every", "40")) as group:
        group.wait_up()
        group.wait_leader(30)
        with Workload(group.urls, tmp_path / "work", raw=1, client=1, work_s=0.2) as work:
            time.sleep(1.0)
            group.add_peer("d")
            group.start("d")
            group.wait_up("d")
            assert group.health("d")["member"] is None  # it waits, and votes for no one
            status, body = group.operator("POST", "/v1/peers", {"id": "d", "url": group.peers["d"].url})
            assert status == 200, body
            assert "d" in body["learners"] + body["voters"]
            wait_voters(group, ["a", "b", "c", "d"])  # caught up from the snapshot and the log: promoted

            leader = group.wait_leader(30)
            removed, dead = [n for n in "abc" if n != leader][:2]
            status, body = group.operator("DELETE", f"/v1/peers/{removed}")
            assert status == 200 and removed not in body["voters"], body
            group.forget(removed)

            group.kill9(dead)
            group.add_peer("e")
            group.start("e")
            group.wait_up("e")
            status, body = group.operator("POST", "/v1/peers/replace",
                                          {"old": dead, "id": "e", "url": group.peers["e"].url})
            assert status == 200, body
            wait_voters(group, sorted([leader, "d", "e"]))
            group.forget(dead)
            done_before_drain = len(work.history.completes)
            drain(group, work, timeout=60)
        assert done_before_drain < 60, "every job was done before the changes ended: they raced nothing"
        state = verify(group, work)
        assert sum(1 for j in state["jobs"].values() if j[0] == "completed") == 60
