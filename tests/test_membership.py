"""Changing a replicated group's members on loopback: add, remove, replace, and a peer whose raft state is gone.

In-process peers (test_replication's ``Group``) on real HTTP servers, changed through
the operator routes (``membership_api.py``); each change is one single-server step of
the Raft core (thesis §4), answered once it is committed.
"""

from __future__ import annotations

import json
import logging
import shutil
import time

import pytest

from conftest import OPERATOR_TOKEN, http_call, manifest_toml
from test_e2e import wait_for
from test_replication import claim, free_ports, group, three  # noqa: F401 (group is a fixture)

from cis490fleet.coordinator import Coordinator

OP = {"x-operator-token": OPERATOR_TOKEN}


def join(g, name: str) -> Coordinator:
    """Start a new peer that waits to be added (serve --node-id NAME --join --peer NAME=URL)."""
    g.urls[name] = f"http://127.0.0.1:{free_ports(1)[0]}"
    g.keys.urls.append(g.urls[name])
    g.keys.register()
    c = Coordinator(g.tmp / name, manifest_path=g.manifest, node_id=name, peers={name: g.urls[name]},
                    operator_token=OPERATOR_TOKEN, raft_options={**g.raft, "join": True}, trust=g.trust())
    c.listen("127.0.0.1", int(g.urls[name].rsplit(":", 1)[1]))
    c.serve_in_thread()
    c.start_background()
    g.coords[name] = c
    return c


def health(g, name: str) -> dict:
    return g.coords[name].replicator.health()


def voters(g, name: str) -> list[str]:
    return health(g, name)["voters"]


def test_a_new_peer_joins_as_learner_is_promoted_and_a_peer_is_removed(group, caplog):
    g = three(group, n_jobs=6)
    claim(g.urls["a"], "w1")
    d = join(g, "d")
    assert d.replicator.health()["member"] is None  # waits, votes for no one
    f = g.follower()
    status, headers, body = http_call(g.urls[f], "POST", "/v1/peers", {"id": "d", "url": g.urls["d"]}, headers=OP)
    assert status == 200, body
    assert headers["x-forwarded-by"] == f  # a follower forwards the change to the leader
    assert "d" in body["learners"] or "d" in body["voters"]
    wait_for("d promoted to voter", lambda: voters(g, g.leader()) == ["a", "b", "c", "d"], timeout=10)
    assert g.converged()["claimed"] == 1  # d caught up from the leader's log or snapshot
    wait_for("d knows it is a voter", lambda: voters(g, "d") == ["a", "b", "c", "d"])
    claim(g.urls["d"], "w2")  # jobs keep flowing, through the new peer too
    assert g.converged()["claimed"] == 2

    status, _, body = http_call(g.urls["d"], "DELETE", "/v1/peers/c", headers=OP)
    assert status == 200, body
    assert body["voters"] == ["a", "b", "d"]
    wait_for("c's removal reaches every member", lambda: all(voters(g, n) == ["a", "b", "d"] for n in "abd"))
    g.stop("c")
    claim(g.urls["b"], "w3")
    assert g.converged()["claimed"] == 3

    # The log's configuration survives a restart; the peer's own --peer list (a, b, c, d) no longer matters.
    g.stop("a")
    caplog.set_level(logging.WARNING, logger="cis490fleet.replication")
    g.start("a")
    wait_for("a back with the log's members", lambda: voters(g, "a") == ["a", "b", "d"], timeout=10)
    assert sorted(g.coords["a"].replicator.peers) == ["a", "b", "d"]
    assert "the group's members come from its log (voters a, b, d, learners none); --peer (a, b, c, d)" in caplog.text


def test_a_leader_removes_itself_and_steps_down(group):
    g = three(group)
    old = g.leader()
    status, _, body = http_call(g.urls[old], "POST", f"/v1/peers/{old}/remove", headers=OP)
    assert status == 200, body
    assert old not in body["voters"]
    wait_for("a new leader among the others", lambda: g.leader() != old, timeout=10)
    assert health(g, old)["member"] is None
    status, _, answer = http_call(g.urls[old], "GET", "/v1/jobs")
    assert status == 503 and f"this peer ({old}) is no longer a member of the group" in answer["detail"]
    rest = [n for n in "abc" if n != old]
    claim(g.urls[rest[0]], "w1")
    wait_for("both members apply the claim", lambda: {g.coords[n].store.counts().get("claimed") for n in rest} == {1})


def test_a_peer_whose_raft_state_is_gone_never_votes_and_is_replaced(group, caplog):
    caplog.set_level(logging.INFO)
    g = three(group, n_jobs=4)
    claim(g.urls["a"], "w1")
    g.converged()
    victim = g.follower()
    g.stop(victim)
    (g.tmp / victim / "raft.sqlite3").unlink()  # the raft store is lost, the queue is not
    for suffix in ("-wal", "-shm"):
        (g.tmp / victim / f"raft.sqlite3{suffix}").unlink(missing_ok=True)
    g.start(victim)
    assert "raft state is gone" in caplog.text
    wait_for("the leader's contact makes it lost", lambda: health(g, victim)["lost"], timeout=10)
    assert health(g, victim)["member"] is None and health(g, victim)["role"] == "follower"
    status, _, body = http_call(g.urls[victim], "GET", "/v1/jobs")
    assert status == 503 and "lost the raft state it once acknowledged" in body["detail"]
    assert "add it back under a new id" in body["detail"]
    g.stop(victim)  # restarted, with the leader's term in its store but still no log: still out
    g.start(victim)
    wait_for("the leader's contact makes it lost again", lambda: health(g, victim)["lost"], timeout=10)
    assert health(g, victim)["member"] is None

    e = join(g, "e")
    status, _, body = http_call(g.urls[g.leader()], "POST", "/v1/peers/replace",
                                {"old": victim, "id": "e", "url": g.urls["e"]}, headers=OP)
    assert status == 200, body
    survivors = sorted(n for n in "abce" if n != victim)
    wait_for("e promoted and the lost peer removed", lambda: voters(g, g.leader()) == survivors, timeout=15)
    g.stop(victim)
    claim(g.urls["e"], "w2")
    wait_for("e applies what the group commits",
             lambda: e.store.counts().get("claimed") == 2 and g.coords[survivors[0]].store.counts()["claimed"] == 2)


def test_membership_changes_are_checked(group, live_server):
    g = three(group)
    leader = g.urls[g.leader()]
    assert http_call(leader, "POST", "/v1/peers", {"id": "d", "url": "http://127.0.0.1:9"})[0] == 401
    for body, complaint in [({"id": "d"}, "'url' must be the new peer's http(s) URL"),
                            ({"id": "../x", "url": "http://x:1"}, "'id' must be a peer id"),
                            ({"id": "a", "url": "http://x:1"}, "'a' is already a member"),
                            ([], "expected a JSON object")]:
        status, _, answer = http_call(leader, "POST", "/v1/peers", body, headers=OP)
        assert status == 400 and complaint in answer["detail"], answer
    status, _, answer = http_call(leader, "DELETE", "/v1/peers/zz", headers=OP)
    assert status == 404 and "'zz' is not a member" in answer["detail"]
    status, _, answer = http_call(leader, "POST", "/v1/peers/replace", {"old": "zz", "id": "d", "url": "http://x:1"},
                                  headers=OP)
    assert status == 400 and "cannot replace 'zz'" in answer["detail"]
    alone = live_server(manifest=manifest_toml(1))
    status, _, answer = alone.call("POST", "/v1/peers", {"id": "d", "url": "http://x:1"}, headers=OP)
    assert status == 400 and "runs alone" in answer["detail"]


def test_jobs_peers_add_replace_remove_and_the_table(group, monkeypatch):
    from test_ops_cli import jobs

    monkeypatch.setenv("CIS490_OPERATOR_TOKEN", OPERATOR_TOKEN)
    g = three(group)
    join(g, "d")
    code, out, err = jobs(g.urls["a"], "peers", "add", f"d={g.urls['d']}")
    assert code == 0, err
    assert out.startswith("committed at index ") and ("learners d" in out or "voters a, b, c, d" in out)
    assert "serve --node-id d --join" in out
    wait_for("d promoted", lambda: voters(g, g.leader()) == ["a", "b", "c", "d"], timeout=10)
    code, out, _ = jobs(g.urls["a"], "peers")
    rows = {line.split()[0]: line.split() for line in out.splitlines()[1:]}
    assert code == 0 and sorted(rows) == sorted(g.urls.values())
    assert {rows[g.urls[n]][5] for n in "abcd"} == {"voter"}

    join(g, "e")
    code, out, err = jobs(g.urls["b"], "peers", "replace", "c", f"e={g.urls['e']}")
    assert code == 0, err
    wait_for("e in, c out", lambda: voters(g, g.leader()) == ["a", "b", "d", "e"], timeout=15)
    code, out, err = jobs(g.urls["a"], "--json", "peers", "remove", "e")
    assert code == 0 and json.loads(out)["voters"] == ["a", "b", "d"], err
    code, _, err = jobs(g.urls["a"], "peers", "add", "x")
    assert code == 2 and "'x' is not NEW=URL" in err
    code, _, err = jobs(g.urls["a"], "peers", "remove")
    assert code == 2 and "jobs peers remove takes ID" in err


def test_join_needs_this_peers_own_address(tmp_path):
    from cis490fleet import coordinator, errors

    with pytest.raises(errors.ConfigError, match=r"--join needs this peer's own address: --node-id ID --peer ID=URL"):
        coordinator.main(["--join", "--node-id", "d", "--data", str(tmp_path / "d"), "--bind", "127.0.0.1:0"])


def test_a_peer_restarted_on_an_empty_data_folder_with_its_old_peer_list_does_not_seed_again(group, caplog):
    """A disk replaced under a running unit: the peer comes back with nothing and its old --peer list. Seeding
    again would let it vote twice in a term; it asks its peers first, finds a leader that counts it as a voter
    with entries committed, and starts as a peer whose raft state is gone."""
    caplog.set_level(logging.ERROR, logger="cis490fleet.replication")
    g = three(group)
    claim(g.urls["a"], "w1")
    victim = g.follower()
    g.stop(victim)
    shutil.rmtree(g.tmp / victim)
    g.start(victim)
    assert f"{victim} starts with an empty data folder, but {g.leader()} already leads a group" in caplog.text
    assert health(g, victim)["member"] is None
    wait_for("the leader's contact makes it lost", lambda: health(g, victim)["lost"], timeout=10)
    for _ in range(30):  # it never campaigns, whatever its election timer says
        assert health(g, victim)["role"] == "follower"
        time.sleep(0.05)
