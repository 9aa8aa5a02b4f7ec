"""The durable half of Raft: both stores pass the same tests, and a driver loop restarts from them."""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap

import pytest

from cis490fleet.errors import ConfigError
from cis490fleet.raft import LEADER, HardState, RaftNode, Snapshot
from cis490fleet.raftstore import MemoryRaftStore, SqliteRaftStore


def entry(index, term, data=None):
    return {"index": index, "term": term, "data": data}


class Stores:
    """Opens a store of one kind; ``reopen`` is a restart (a new process reading the same file)."""

    def __init__(self, kind, tmp_path):
        self.kind, self.path = kind, tmp_path / "raft.sqlite3"
        self.store = self.open()

    def open(self):
        return SqliteRaftStore(self.path) if self.kind == "sqlite" else MemoryRaftStore()

    def reopen(self):
        if self.kind == "sqlite":
            self.store.close()
            self.store = self.open()
        return self.store


@pytest.fixture(params=["memory", "sqlite"])
def stores(request, tmp_path):
    s = Stores(request.param, tmp_path)
    yield s
    s.store.close()


def test_a_new_store_is_empty(stores):
    state = stores.store.load()
    assert state.hard_state == HardState(0, None, 0)
    assert state.snapshot is None
    assert state.entries == []


def test_save_and_load_survive_a_restart(stores):
    data = {"op": "claim", "now": 1700000000.25, "host": "ws-ü", "capability": {"gpus": [{"index": 0}]}}
    stores.store.save(HardState(3, "n2", 2), [entry(1, 1), entry(2, 3, data)], None)
    state = stores.reopen().load()
    assert state.hard_state == HardState(3, "n2", 2)
    assert state.entries == [entry(1, 1), entry(2, 3, data)]


def test_hard_state_alone_and_nothing_at_all(stores):
    stores.store.save(HardState(1, None, 0), [], None)
    stores.store.save(None, [], None)
    stores.store.save(HardState(2, "n1", 0), [], None)
    assert stores.reopen().load().hard_state == HardState(2, "n1", 0)


def test_entries_replace_the_stored_suffix_from_their_first_index(stores):
    """§5.3: a follower deletes a conflicting entry and all that follow it."""
    stores.store.save(None, [entry(i, 1, {"n": i}) for i in range(1, 6)], None)
    stores.store.save(None, [entry(3, 2, {"n": "new"})], None)
    assert stores.reopen().load().entries == [entry(1, 1, {"n": 1}), entry(2, 1, {"n": 2}), entry(3, 2, {"n": "new"})]


def test_a_snapshot_from_the_leader_replaces_the_whole_log(stores):
    stores.store.save(HardState(2, None, 3), [entry(i, 1) for i in range(1, 10)], None)
    stores.store.save(HardState(3, None, 12), [], Snapshot(12, 3, {"rows": [1, 2]}))
    stores.store.save(None, [entry(13, 3, {"op": "x"})], None)
    state = stores.reopen().load()
    assert state.snapshot == Snapshot(12, 3, {"rows": [1, 2]})
    assert state.entries == [entry(13, 3, {"op": "x"})]
    assert state.hard_state.commit == 12


def test_truncate_prefix_keeps_the_snapshot_and_later_entries(stores):
    """§7: after the application snapshots at index 3, entries up to 3 are no longer needed."""
    stores.store.save(HardState(1, "n1", 5), [entry(i, 1, {"n": i}) for i in range(1, 6)], None)
    stores.store.truncate_prefix(3, Snapshot(3, 1, {"digest": "abc"}))
    state = stores.reopen().load()
    assert state.snapshot == Snapshot(3, 1, {"digest": "abc"})
    assert [e["index"] for e in state.entries] == [4, 5]
    stores.store.truncate_prefix(2, Snapshot(2, 1, {"digest": "older"}))  # late and older: the newer one stays
    assert stores.reopen().load().snapshot == Snapshot(3, 1, {"digest": "abc"})


def test_truncate_prefix_needs_the_snapshot_taken_at_that_index(stores):
    with pytest.raises(ValueError, match=r"truncate_prefix\(4\) needs the snapshot taken at 4, got one at 3"):
        stores.store.truncate_prefix(4, Snapshot(3, 1, None))


def test_what_the_caller_changes_later_is_not_persisted(stores):
    data = {"op": "claim", "tags": ["a"]}
    entries = [entry(1, 1, data)]
    stores.store.save(None, entries, None)
    data["tags"].append("b")
    entries.append(entry(2, 1))
    loaded = stores.reopen().load()
    assert loaded.entries == [entry(1, 1, {"op": "claim", "tags": ["a"]})]
    loaded.entries[0]["data"]["tags"].append("c")
    assert stores.store.load().entries[0]["data"]["tags"] == ["a"]
    snap = Snapshot(1, 1, {"rows": [1]})
    stores.store.truncate_prefix(1, snap)
    snap.data["rows"].append(2)
    stores.store.load().snapshot.data["rows"].append(3)
    assert stores.reopen().load().snapshot.data == {"rows": [1]}


def test_sqlite_save_is_one_transaction(tmp_path):
    store = SqliteRaftStore(tmp_path / "raft.sqlite3")
    store.save(HardState(1, "n1", 1), [entry(1, 1)], None)
    with pytest.raises(TypeError):
        store.save(HardState(2, "n2", 2), [entry(2, 2), entry(3, 2, {"bad": object()})], None)
    store.close()
    state = SqliteRaftStore(tmp_path / "raft.sqlite3").load()
    assert state.hard_state == HardState(1, "n1", 1)
    assert state.entries == [entry(1, 1)]


def test_sqlite_is_durable_before_it_returns(tmp_path):
    path = tmp_path / "raft.sqlite3"
    SqliteRaftStore(path).close()
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()
    store = SqliteRaftStore(path)
    assert store._conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    store.close()


def test_sqlite_refuses_a_file_that_is_not_a_raft_store(tmp_path):
    path = tmp_path / "raft.sqlite3"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(ConfigError) as err:
        SqliteRaftStore(path)
    message = str(err.value)
    assert str(path) in message and "restore it from a backup" in message and "\n" not in message
    assert "move" not in message and "empty raft store" in message  # an emptied store breaks Raft's safety


WRITER = textwrap.dedent("""
    import sys
    from cis490fleet.raft import HardState
    from cis490fleet.raftstore import SqliteRaftStore
    store = SqliteRaftStore(sys.argv[1])
    index = 0
    while True:
        batch = [{"index": index + k, "term": 1, "data": {"n": index + k, "pad": "x" * 200}} for k in range(1, 21)]
        index += 20
        store.save(HardState(1, "n1", index), batch, None)
        print(index, flush=True)  # acknowledged: it must survive what comes next
""")


def test_sqlite_keeps_every_acknowledged_save_through_sigkill(tmp_path):
    """A writer killed mid-save leaves a store that loads, is consistent, and holds every acknowledged save."""
    if not hasattr(signal, "SIGKILL"):
        pytest.skip("needs SIGKILL")
    path = tmp_path / "raft.sqlite3"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True)
    acknowledged = 0
    try:
        for line in proc.stdout:
            acknowledged = int(line)
            if acknowledged >= 400:
                break
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
    state = SqliteRaftStore(path).load()
    indexes = [e["index"] for e in state.entries]
    assert indexes == list(range(1, len(indexes) + 1)), "the log must stay contiguous"
    assert len(indexes) >= acknowledged
    assert state.hard_state.commit == len(indexes), "hard state and entries are saved together"


# ---- a driver loop over a real store -----------------------------------------------------------------


class Driver:
    """The loop a coordinator runs: persist, send, apply, advance (here a group of one: nothing to send)."""

    def __init__(self, stores, applied=()):
        self.stores = stores
        self.applied = list(applied)
        self.node = RaftNode("n1", ["n1"], storage_state=stores.store.load(), rng=random.Random(1))

    def run(self):
        while (rd := self.node.ready()) is not None:
            self.stores.store.save(rd.hard_state, rd.entries, rd.snapshot)
            assert rd.messages == []
            self.applied += [e["data"] for e in rd.committed_entries if e["data"] is not None]
            self.node.advance(rd)


def test_a_group_of_one_commits_and_restarts_from_its_store(stores):
    driver = Driver(stores)
    driver.node.campaign()
    driver.run()
    assert driver.node.status()["role"] == LEADER
    for n in range(3):
        driver.node.propose({"op": "put", "n": n})
    driver.run()
    assert driver.applied == [{"op": "put", "n": 0}, {"op": "put", "n": 1}, {"op": "put", "n": 2}]
    assert driver.node.ready() is None

    stores.reopen()
    again = Driver(stores)  # a fresh process: the state machine is rebuilt by replaying committed entries
    again.run()
    assert again.applied == driver.applied
    assert again.node.status()["term"] == 1 and again.node.status()["commit"] == 4
    again.node.campaign()
    again.run()
    assert again.node.status()["term"] == 2


def test_a_restart_after_compaction_starts_from_the_snapshot(stores):
    driver = Driver(stores)
    driver.node.campaign()
    for n in range(4):
        driver.run()
        driver.node.propose({"op": "put", "n": n})
    driver.run()
    snap = driver.node.compact(3, {"applied": driver.applied[:2]})
    stores.store.truncate_prefix(3, snap)
    stores.reopen()
    state = stores.store.load()
    assert state.snapshot.index == 3 and [e["index"] for e in state.entries] == [4, 5]
    again = Driver(stores, applied=state.snapshot.data["applied"])
    again.run()
    assert again.applied == driver.applied
    assert json.dumps(again.node.status())  # status is JSON-able for /v1/health


def test_configurations_survive_a_restart_in_entries_and_snapshots(stores):
    """Thesis §4.1: the configuration is the latest in the log, so the store keeps each entry's config and the
    one a snapshot covers; a node restarted from it has the same voters and learners."""
    config = {"voters": ["n1", "n2"], "learners": ["n3"], "addresses": {"n3": "http://n3"}}
    stores.store.save(HardState(2, "n1", 1), [entry(1, 1), {**entry(2, 2), "config": config}], None)
    state = stores.reopen().load()
    assert state.entries[1] == {"index": 2, "term": 2, "data": None, "config": config}
    node = RaftNode("n1", ["n1", "n9"], storage_state=state, rng=random.Random(0))
    assert (node.voters, node.learners) == (["n1", "n2"], ["n3"])
    stores.store.truncate_prefix(2, Snapshot(2, 2, {"s": 1}, config))
    state = stores.reopen().load()
    assert state.snapshot == Snapshot(2, 2, {"s": 1}, config) and state.entries == []
    node = RaftNode("n1", ["n1", "n9"], storage_state=state, rng=random.Random(0))
    assert (node.voters, node.learners) == (["n1", "n2"], ["n3"])
