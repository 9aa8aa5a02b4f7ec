"""The paper's scenarios as transcripts: each test replays one, step by step, on real RaftNode cores.

A transcript is a few lines of a small language, run by ``Transcript`` below over
the simulator's cluster (tests/raft_sim.py, with a perfect network unless told
otherwise), so every step is also checked against the safety invariants:

    nodes 3 [prevote=off] [checkquorum=off] [batch=1] [joiners=1]   a group of n1..n3 (nodes are named by
                                  number; L names the live leader of the highest term), and n4 started
                                  empty, waiting to be added
    add 1 5 [replaces 4] [-> refused]   leader 1 adds n5 as a learner (thesis §4.2.1)
    remove 1 4 [-> refused]       leader 1 removes n4 (§4.1)
    lose 2                        node 2 restarts with an empty store (its storage is gone)
    campaign 1                    node 1 starts an election now
    tick 1 x20 | tick all x20     logical time passes for one node / for every live node
    deliver [to 2] [from 1] [type T]   deliver the messages in flight now (not the replies)
    drop [to 2] [from 1] [type T]      lose them instead
    stabilize                     deliver until the network is quiet
    elapse 30                     30 rounds of: tick every node, then stabilize
    partition 1 | 2 3 / heal      cut / restore links (messages across a cut are lost)
    crash 1 / restart 1           restart from what node 1 persisted
    propose 1 TEXT [-> not_leader L|none]
    propose_many 1 TEXT TEXT ...  leader 1 proposes several commands at once (``RaftNode.propose_many``)
    propose_then_crash 1 TEXT     leader 1 proposes, sends what may leave early (``Ready.early``), and crashes
                                  before persisting the rest
    read 1 CTX / transfer 1 3 / compact 1
    expect role 1 leader [term 2] [leader 1]
    expect leader 1 term 2        (short for: expect role 1 leader term 2)
    expect term 1 [=|>|<] 2 / expect commit 1 2 / expect applied 1 2 / expect snapshot 1 4
    expect log 1 1/1 2/1 3/2      index/term of each entry node 1 holds after its snapshot
    expect data 1 a b             values of the commands node 1 has applied (no-ops skipped)
    expect read 1 CTX 3 / expect no read 1 CTX
    expect inflight TYPE N        how many messages of a type are in flight
    expect voters 1 1 2 3 / expect learners 1 4 / expect lost 2 / expect not lost 2
    # comment; a command may end with "# comment"
"""

from __future__ import annotations

import operator
import random
import shlex

import pytest

from cis490fleet.errors import BadRequest, ConfigError, NotFound, NotLeader, Unavailable
from cis490fleet.raft import HardState, RaftNode, Snapshot, StorageState, check_message
from raft_sim import InvariantViolation, Sim, SimConfig


class TranscriptError(AssertionError):
    pass


class Transcript:
    def __init__(self) -> None:
        self.sim: Sim | None = None
        self.reads: dict[str, list[int]] = {}
        self.data: dict[str, list[str]] = {}

    # ---- plumbing ----------------------------------------------------------------------------------

    def resolve(self, name: str) -> str:
        """"3" names node n3; "L" the live leader of the highest term."""
        if name != "L":
            return f"n{name}"
        leaders = [m.node for m in self.sim.live() if m.node.role == "leader"]
        if not leaders:
            raise TranscriptError("there is no leader")
        return max(leaders, key=lambda node: node.term).id

    def member(self, name: str):
        return self.sim.members[self.resolve(name)]

    def node(self, name: str):
        node = self.member(name).node
        if node is None:
            raise TranscriptError(f"node {name} is crashed")
        return node

    def run(self, text: str) -> None:
        for number, raw in enumerate(text.strip().splitlines(), 1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            words = shlex.split(line)
            try:
                getattr(self, "do_" + words[0])(*words[1:])
            except TranscriptError as exc:
                raise TranscriptError(f"line {number}: {line!r}: {exc}\n{self.describe()}") from None

    def describe(self) -> str:
        if self.sim is None:
            return ""
        rows = []
        for name, m in self.sim.members.items():
            if m.node is None:
                rows.append(f"  {name}: crashed")
                continue
            st = m.node.status()
            log = " ".join(f"{e['index']}/{e['term']}" for e in m.node.entries(0, st["last_index"] + 1))
            rows.append(f"  {name}: {st['role']} term={st['term']} leader={st['leader']} commit={st['commit']} "
                        f"applied={st['applied']} snap={st['snapshot_index']} log=[{log}]")
        rows.append(f"  in flight: {[(m['type'], m['from'], m['to']) for m in self.sim.net]}")
        return "\n".join(rows)

    def watch(self) -> None:
        sim = self.sim
        original_apply, original_read = sim.apply, sim.check_read

        def apply(m, e):
            original_apply(m, e)
            if e["data"] is not None:
                self.data.setdefault(m.id, []).append(e["data"]["value"])

        def check_read(m, rs):
            original_read(m, rs)
            self.reads.setdefault(f"{m.id}/{rs.ctx}", []).append(rs.index)

        def restore(m, snap, _original=sim.restore):
            _original(m, snap)
            self.data[m.id] = list(snap.data["values"])

        sim.apply, sim.check_read, sim.restore = apply, check_read, restore

    def matching(self, words: tuple[str, ...]) -> list[dict]:
        want = dict(zip(words[::2], words[1::2]))
        unknown = set(want) - {"to", "from", "type"}
        if unknown or len(words) % 2:
            raise TranscriptError(f"filters are: to N, from N, type T; got {' '.join(words)!r}")
        return [msg for msg in self.sim.net
                if ("to" not in want or msg["to"] == f"n{want['to']}")
                and ("from" not in want or msg["from"] == f"n{want['from']}")
                and ("type" not in want or msg["type"] == want["type"])]

    # ---- commands ----------------------------------------------------------------------------------

    def do_nodes(self, count: str, *options: str) -> None:
        opts = dict(o.split("=", 1) for o in options)
        config = SimConfig(nodes=int(count), steps=0, election_ticks=(10, 20), drop=0.0, duplicate=0.0,
                           lose_after_vote=0.0,
                           pre_vote=opts.get("prevote", "on") == "on",
                           check_quorum=opts.get("checkquorum", "on") == "on", max_batch=int(opts.get("batch", 64)))
        self.sim = Sim(0, config)
        for _ in range(int(opts.get("joiners", 0))):
            self.sim.new_member()
        self.watch()

    def do_campaign(self, name: str) -> None:
        m = self.member(name)
        self.node(name).campaign()
        self.sim.settle(m)

    def do_tick(self, name: str, times: str = "x1") -> None:
        for _ in range(int(times.lstrip("x"))):
            targets = self.sim.live() if name == "all" else [self.member(name)]
            for m in targets:
                m.node.tick()
                self.sim.settle(m)

    def do_deliver(self, *words: str) -> None:
        for msg in self.matching(words):
            self.sim.deliver(self.sim.net.index(msg))

    def do_drop(self, *words: str) -> None:
        for msg in self.matching(words):
            self.sim.net.remove(msg)

    def do_stabilize(self) -> None:
        for _ in range(10_000):
            if not self.sim.net:
                return
            self.sim.deliver(0)
        raise TranscriptError("the network did not go quiet")

    def do_elapse(self, rounds: str) -> None:
        for _ in range(int(rounds)):
            self.do_tick("all")
            self.do_stabilize()

    def do_partition(self, *words: str) -> None:
        groups, current = [], set()
        for w in words + ("|",):
            if w == "|":
                groups.append(current)
                current = set()
            else:
                current.add(f"n{w}")
        self.sim.groups = groups

    def do_heal(self) -> None:
        self.sim.groups = None

    def do_crash(self, name: str) -> None:
        self.sim.crash(self.member(name))

    def do_restart(self, name: str) -> None:
        m = self.member(name)
        self.sim.start(m)
        snap = m.store.load().snapshot
        self.data[m.id] = list(snap.data["values"]) if snap else []

    def do_propose(self, name: str, value: str, arrow: str | None = None, outcome: str | None = None,
                   leader: str | None = None) -> None:
        m = self.member(name)
        try:
            index = self.node(name).propose({"op": "put", "value": value})
        except NotLeader as exc:
            if outcome != "not_leader":
                raise TranscriptError(f"propose was refused: {exc}") from None
            want = None if leader in (None, "none") else f"n{leader}"
            if exc.leader_url != want:
                raise TranscriptError(f"NotLeader names {exc.leader_url}, expected {want}") from None
            return
        if outcome is not None:
            raise TranscriptError(f"propose was accepted at index {index}, expected {outcome}")
        self.sim.settle(m)

    def do_propose_then_crash(self, name: str, value: str) -> None:
        m = self.member(name)
        self.node(name).propose({"op": "put", "value": value})
        self.sim.settle(m, crash_at="before_persist")

    def do_propose_many(self, name: str, *values: str) -> None:
        m = self.member(name)
        self.node(name).propose_many([{"op": "put", "value": v} for v in values])
        self.sim.settle(m)

    def _change(self, name: str, change, words: tuple[str, ...]) -> None:
        m = self.member(name)
        refused = words[-2:] == ("->", "refused")
        try:
            change(self.node(name))
        except (Unavailable, BadRequest, NotFound, NotLeader) as exc:
            if not refused:
                raise TranscriptError(f"the membership change was refused: {exc}") from None
            return
        if refused:
            raise TranscriptError("the membership change was accepted, expected a refusal")
        self.sim.settle(m)

    def do_add(self, name: str, new: str, *words: str) -> None:
        replaces = f"n{words[1]}" if words[:1] == ("replaces",) else None
        self._change(name, lambda node: node.add_learner(f"n{new}", f"sim://n{new}", replaces=replaces), words)

    def do_remove(self, name: str, old: str, *words: str) -> None:
        self._change(name, lambda node: node.remove_member(f"n{old}"), words)

    def do_lose(self, name: str) -> None:
        self.sim.lose_storage(self.member(name))

    def do_read(self, name: str, ctx: str) -> None:
        self.sim.reads[ctx] = self.sim.max_committed
        self.node(name).read_index(ctx)
        self.sim.settle(self.member(name))

    def do_transfer(self, name: str, to: str) -> None:
        self.node(name).transfer_leadership(f"n{to}")
        self.sim.settle(self.member(name))

    def do_compact(self, name: str) -> None:
        m = self.member(name)
        node = self.node(name)
        snap = node.compact(node.applied, {"digest": m.app_digest, "values": self.data.get(m.id, [])})
        m.store.truncate_prefix(snap.index, snap)

    def do_expect(self, what: str, *args: str) -> None:
        getattr(self, "expect_" + what)(*args)

    # ---- expectations ------------------------------------------------------------------------------

    def expect_role(self, name: str, role: str, *more: str) -> None:
        st = self.node(name).status()
        want = {"role": role}
        for key, value in zip(more[::2], more[1::2]):
            want[key] = int(value) if key == "term" else (None if value == "none" else self.resolve(value))
        got = {key: st[key] for key in want}
        if got != want:
            raise TranscriptError(f"node {name}: expected {want}, got {got}")

    def expect_leader(self, name: str, *more: str) -> None:
        self.expect_role(name, "leader", *more)

    def _compare(self, name: str, key: str, args: tuple[str, ...]) -> None:
        op, value = (args[0], args[1]) if len(args) == 2 else ("=", args[0])
        got = self.node(name).status()[key]
        ops = {"=": operator.eq, ">": operator.gt, "<": operator.lt, ">=": operator.ge}
        if not ops[op](got, int(value)):
            raise TranscriptError(f"node {name}: expected {key} {op} {value}, got {got}")

    def expect_term(self, name: str, *args: str) -> None:
        self._compare(name, "term", args)

    def expect_commit(self, name: str, *args: str) -> None:
        self._compare(name, "commit", args)

    def expect_applied(self, name: str, *args: str) -> None:
        self._compare(name, "applied", args)

    def expect_snapshot(self, name: str, *args: str) -> None:
        self._compare(name, "snapshot_index", args)

    def expect_log(self, name: str, *pairs: str) -> None:
        node = self.node(name)
        got = [f"{e['index']}/{e['term']}" for e in node.entries(0, node.last_index() + 1)]
        if got != list(pairs):
            raise TranscriptError(f"node {name}: expected log {' '.join(pairs)}, got {' '.join(got)}")

    def expect_data(self, name: str, *values: str) -> None:
        got = self.data.get(f"n{name}", [])
        if got != list(values):
            raise TranscriptError(f"node {name}: expected applied values {list(values)}, got {got}")

    def expect_read(self, name: str, ctx: str, index: str) -> None:
        got = self.reads.get(f"n{name}/{ctx}")
        if got != [int(index)]:
            raise TranscriptError(f"node {name}: expected read {ctx} at index {index}, got {got}")

    def expect_not(self, what: str, name: str) -> None:
        if what != "lost" or self.node(name).status()["lost"]:
            raise TranscriptError(f"node {name}: expected not {what}, got {self.node(name).status()['lost']}")

    def expect_no(self, what: str, name: str, ctx: str) -> None:
        if what != "read":
            raise TranscriptError("only 'expect no read N CTX' exists")
        if f"n{name}/{ctx}" in self.reads:
            raise TranscriptError(f"node {name}: read {ctx} was released at {self.reads[f'n{name}/{ctx}']}")

    def expect_voters(self, name: str, *ids: str) -> None:
        got = self.node(name).status()["voters"]
        if got != [f"n{i}" for i in ids]:
            raise TranscriptError(f"node {name}: expected voters {list(ids)}, got {got}")

    def expect_learners(self, name: str, *ids: str) -> None:
        got = self.node(name).status()["learners"]
        if got != [f"n{i}" for i in ids]:
            raise TranscriptError(f"node {name}: expected learners {list(ids)}, got {got}")

    def expect_lost(self, name: str) -> None:
        if not self.node(name).status()["lost"]:
            raise TranscriptError(f"node {name}: expected it to know it lost its raft state")

    def expect_inflight(self, kind: str, count: str) -> None:
        got = len(self.matching(("type", kind)))
        if got != int(count):
            raise TranscriptError(f"expected {count} {kind} in flight, got {got}")


def run(text: str) -> Transcript:
    t = Transcript()
    t.run(text)
    return t


# ---- the scenarios ----------------------------------------------------------------------------------


def test_election():
    """§5.2 Leader election: a candidate wins with votes from a majority and asserts itself with AppendEntries.

    With PreVote (thesis §9.6) the node first polls at term+1 without changing its term.
    """
    run("""
    nodes 3
    campaign 1
    expect role 1 pre_candidate term 0
    expect inflight RequestVote 2
    deliver                     # pre-votes granted
    deliver                     # ... counted: now a real candidate at term 1
    expect role 1 candidate term 1
    deliver
    deliver                     # votes counted
    expect leader 1 term 1
    expect log 1 1/1            # the no-op that opens the term (§8)
    stabilize
    expect role 2 follower term 1 leader 1
    expect role 3 follower term 1 leader 1
    expect commit 1 1
    expect commit 3 1
    propose 2 x -> not_leader 1
    """)


def test_election_refuses_a_stale_log():
    """§5.4.1 Election restriction: a voter denies its vote to a candidate whose log is less up-to-date."""
    run("""
    nodes 3 prevote=off checkquorum=off
    campaign 1
    stabilize
    partition 1 2 | 3
    propose 1 a
    stabilize
    heal
    campaign 3                  # node 3 lacks entry 2
    stabilize
    expect role 3 follower term 2 leader none
    expect role 1 follower term 2
    expect log 3 1/1
    campaign 1
    stabilize
    expect leader 1 term 3
    expect log 3 1/1 2/1 3/3
    """)


def test_log_replication():
    """§5.3 Log replication: an entry commits once the leader holds acknowledgements from a majority,
    and followers learn the commit index from the next message."""
    run("""
    nodes 3
    campaign 1
    stabilize
    propose 1 a
    expect log 1 1/1 2/1
    expect commit 1 1           # no majority yet
    deliver type AppendEntries
    expect log 2 1/1 2/1
    expect commit 2 1
    deliver from 2              # one acknowledgement: leader + 2 is a majority of 3
    expect commit 1 2
    expect data 1 a
    expect commit 2 1
    stabilize
    elapse 1                    # the next heartbeat carries the commit index
    expect commit 2 2
    expect data 2 a
    expect data 3 a
    """)


def test_commands_proposed_together_travel_in_one_append_per_follower():
    """``propose_many``: the entries are appended together and reach each follower in one AppendEntries,
    then commit and apply in order like single proposals."""
    run("""
    nodes 3
    campaign 1
    stabilize
    propose_many 1 a b c
    expect log 1 1/1 2/1 3/1 4/1
    expect inflight AppendEntries 2
    stabilize
    elapse 1
    expect commit 2 4
    expect data 1 a b c
    expect data 2 a b c
    expect data 3 a b c
    propose 1 d
    propose 1 e
    expect inflight AppendEntries 4
    """)


def test_a_leader_sends_appends_before_its_own_copy_is_on_disk_and_a_crash_then_loses_nothing_committed():
    """Thesis §10.2.1: the leader's appends leave while it writes its own copy. Crashing before that write,
    it never counted the entry; the followers hold it, and the next leader commits it."""
    run("""
    nodes 3
    campaign 1
    stabilize
    propose 1 a
    stabilize
    elapse 1
    expect data 1 a
    propose_then_crash 1 b   # the AppendEntries are out; node 1's log never held b on disk
    expect inflight AppendEntries 2
    stabilize
    expect log 2 1/1 2/1 3/1
    restart 1
    expect log 1 1/1 2/1
    elapse 40
    expect data 1 a b
    expect data 2 a b
    expect data 3 a b
    """)


def test_only_a_leader_whose_term_and_vote_are_on_disk_sends_before_persisting():
    leader, follower = _node("n1", pre_vote=False), _node("n2", pre_vote=False)
    leader.campaign()
    leader.step({"type": "RequestVoteResp", "term": 1, "from": "n2", "to": "n1", "reject": False,
                 "pre_vote": False})
    rd = leader.ready()  # a leader before the Ready with its new term and vote was written
    assert leader.status()["role"] == "leader" and rd.hard_state.term == 1
    assert rd.early == [] and "AppendEntries" in {m["type"] for m in rd.messages}
    leader.advance(rd)
    follower.step(next(m for m in rd.messages if m["to"] == "n2" and m["type"] == "AppendEntries"))
    answer = follower.ready()  # an answer vouches for what the follower wrote: it waits for the write
    assert answer.early == [] and [m["type"] for m in answer.messages] == ["AppendEntriesResp"]
    follower.advance(answer)
    leader.step(answer.messages[0])
    leader.advance(leader.ready())
    leader.propose({"op": "put", "value": "a"})
    rd = leader.ready()
    assert [(m["type"], m["to"]) for m in rd.early] == [("AppendEntries", "n2")] and rd.messages == []


def test_log_repair_after_divergence():
    """§5.3: a new leader forces followers' logs to duplicate its own; conflicting uncommitted entries go."""
    run("""
    nodes 3 checkquorum=off
    campaign 1
    stabilize
    partition 1 | 2 3
    propose 1 lost1
    propose 1 lost2
    expect log 1 1/1 2/1 3/1
    campaign 2
    stabilize
    expect leader 2 term 2
    propose 2 kept
    stabilize
    heal
    elapse 3
    expect role 1 follower term 2 leader 2
    expect log 1 1/1 2/2 3/2
    expect commit 1 3
    expect data 1 kept
    """)


FIGURE_8_PREFIX = """
    nodes 5 prevote=off checkquorum=off batch=1
    campaign 1
    stabilize
    expect leader 1 term 1
    # (a) S1 leads term 1; its entry 2 reaches only S2
    partition 1 2 | 3 4 5
    propose 1 a
    stabilize
    expect log 2 1/1 2/1
    expect commit 1 1
    # (b) S1 crashes; S5 wins term 2 with votes from S3, S4 and itself, appends entry 2 (term 2) alone
    crash 1
    campaign 5
    deliver                     # S3 and S4 vote for S5
    deliver
    expect leader 5 term 2
    drop                        # S5's AppendEntries are lost
    expect log 5 1/1 2/2
    expect log 3 1/1
    crash 5
    # (c) S1 restarts and wins term 3 (its first try, at term 2, meets S3's vote for S5)
    restart 1
    heal
    partition 1 2 3 | 4 5
    campaign 1
    stabilize
    campaign 1
    deliver type RequestVote
    deliver type RequestVoteResp
    expect leader 1 term 3
    expect log 1 1/1 2/1 3/3
    deliver to 2                # S2 takes entry 3
    deliver to 3                # S3 lacks entry 2: it rejects
    deliver to 1                # S2's acknowledgement; S3's rejection makes S1 back up
    deliver to 3                # S3 takes entry 2 (one entry per message)
    expect log 3 1/1 2/1
    deliver to 1
    expect commit 1 1           # S1 knows entry 2 is on S1 S2 S3, a majority: as it is of an old term,
                                # counting replicas does not commit it
"""


def test_figure_8_old_term_entry_is_not_committed_by_counting():
    """§5.4.2, Figure 8 (c)-(d): an entry from an earlier term on a majority is not committed by counting
    replicas; S5 may still be elected and replace it, and nothing that was applied is lost."""
    run(FIGURE_8_PREFIX + """
    drop from 1                 # entry 3, on its way to S3, is lost as S1 crashes
    crash 1
    restart 5
    heal
    campaign 5
    stabilize                   # its try at term 3 meets S2's and S3's votes for S1
    campaign 5
    stabilize                   # S3 and S4 vote for it at term 4; S2, whose log is newer, refuses
    expect leader 5 term 4
    elapse 3
    expect log 2 1/1 2/2 3/4
    expect log 3 1/1 2/2 3/4
    expect data 2
    expect data 3
    """)


def test_figure_8_current_term_entry_commits_the_old_one():
    """§5.4.2, Figure 8 (e): once an entry of the leader's own term is on a majority, it commits,
    and with it every earlier entry; S5 can no longer win."""
    run(FIGURE_8_PREFIX + """
    elapse 2                    # the next heartbeats bring S3 entry 3: it is on S1 S2 S3
    expect commit 1 3
    expect data 1 a
    crash 1
    restart 5
    heal
    campaign 5
    stabilize
    campaign 5
    stabilize
    expect role 5 candidate term 4   # S2 and S3 refuse: they hold an entry of term 3, S5 does not
    elapse 40
    expect role 5 follower
    expect commit 5 4
    expect data 5 a
    """)


def _commit_by_counting_any_term(self):
    matches = sorted([self.last_index()] + [pr.match for pr in self._progress.values()], reverse=True)
    if matches[self._quorum() - 1] <= self.commit:
        return False
    self.commit = matches[self._quorum() - 1]
    return True


def test_figure_8_catches_a_leader_that_counts_old_term_entries(monkeypatch):
    """The transcript above fails against the bug Figure 8 warns of, both where the commit index is
    checked and, without that line, through the simulator's leader completeness check."""
    monkeypatch.setattr(RaftNode, "_maybe_commit", _commit_by_counting_any_term)
    with pytest.raises(TranscriptError, match="expect commit 1 1"):
        run(FIGURE_8_PREFIX)
    with pytest.raises(InvariantViolation, match="leader completeness: leader n5 of term 4 lacks committed entry 2"):
        run(FIGURE_8_PREFIX.replace("    expect commit 1 1", "") + """
        drop from 1
        crash 1
        restart 5
        heal
        campaign 5
        stabilize
        campaign 5
        stabilize
        """)


def test_partitioned_leader_steps_down_with_check_quorum():
    """Thesis §6.2 CheckQuorum: a leader that hears from no majority for an election timeout steps down;
    its entries proposed meanwhile never commit (§5.2)."""
    run("""
    nodes 3
    campaign 1
    stabilize
    partition 1 | 2 3
    propose 1 lost
    tick 1 x20                  # two election timeouts: the first check still counts earlier replies
    expect role 1 follower term 1 leader none
    expect commit 1 1
    propose 1 again -> not_leader none
    elapse 40                   # meanwhile 2 and 3 time out and elect one of them
    expect leader L term 2
    propose L kept
    stabilize
    heal
    elapse 3
    expect role 1 follower term 2 leader L
    expect log 1 1/1 2/2 3/2
    expect data 1 kept
    """)


def test_partitioned_leader_without_check_quorum_steps_down_on_rejoin():
    """§5.1-§5.2: without CheckQuorum the old leader believes it still leads, but cannot commit; the
    first message of the higher term it hears on rejoining makes it a follower."""
    run("""
    nodes 3 prevote=off checkquorum=off
    campaign 1
    stabilize
    partition 1 | 2 3
    propose 1 lost
    tick 1 x50
    expect leader 1 term 1
    expect commit 1 1
    campaign 2
    stabilize
    expect leader 2 term 2
    heal
    tick 1                      # the old leader's heartbeats are ignored: they are from an old term
    stabilize
    expect leader 1 term 1
    tick 2                      # the new leader's heartbeat carries the new term
    stabilize
    expect role 1 follower term 2
    elapse 3
    expect log 1 1/1 2/2
    expect data 1
    """)


def test_prevote_rejoining_node_does_not_disrupt():
    """Thesis §9.6 PreVote: an isolated node keeps failing pre-votes without raising its term, so when it
    rejoins, the leader keeps its term and leadership."""
    run("""
    nodes 3
    campaign 1
    stabilize
    partition 3 | 1 2
    tick 3 x100
    expect role 3 pre_candidate term 1
    heal
    elapse 30
    expect leader 1 term 1
    expect role 3 follower term 1 leader 1
    """)


def test_without_prevote_a_rejoining_node_disrupts():
    """Thesis §9.6, the problem PreVote solves: an isolated node's term grows with each timeout, and on
    rejoining it forces the healthy leader to step down."""
    run("""
    nodes 3 prevote=off checkquorum=off
    campaign 1
    stabilize
    partition 3 | 1 2
    tick 3 x100
    expect role 3 candidate
    expect term 3 > 4
    heal
    elapse 30
    expect term 1 > 4
    expect term 2 > 4
    """)


def test_check_quorum_leader_ignores_a_disruptive_vote():
    """Thesis §4.2.3 / §6.2: a server that heard from the leader within the minimum election timeout
    disregards RequestVote, so a candidate that missed heartbeats cannot depose a live leader."""
    run("""
    nodes 3 prevote=off
    campaign 1
    stabilize
    campaign 3
    stabilize
    expect leader 1 term 1
    expect role 3 candidate term 2
    """)


def test_snapshot_catch_up():
    """§7 Log compaction: a follower that lags behind the leader's snapshot receives InstallSnapshot,
    restores from it, and continues with ordinary AppendEntries."""
    run("""
    nodes 3
    campaign 1
    stabilize
    crash 3
    propose 1 a
    propose 1 b
    propose 1 c
    stabilize
    elapse 1
    compact 1
    expect snapshot 1 4
    expect log 1
    restart 3
    expect log 3 1/1
    elapse 1
    expect inflight InstallSnapshot 0
    expect snapshot 3 4
    expect applied 3 4
    expect data 3 a b c
    propose 1 d
    stabilize
    elapse 1
    expect log 3 5/1
    expect data 3 a b c d
    crash 3
    restart 3                   # the installed snapshot was persisted
    expect snapshot 3 4
    expect commit 3 5
    expect log 3 5/1
    """)


def test_leadership_transfer():
    """Thesis §3.10 Leadership transfer: the leader stops taking proposals, brings the target up to date,
    then sends TimeoutNow; the target campaigns at once (no pre-vote, through the voters' lease)."""
    run("""
    nodes 3
    campaign 1
    stabilize
    partition 1 2 | 3
    propose 1 a
    stabilize
    heal
    transfer 1 3
    propose 1 b -> not_leader 3
    stabilize
    expect leader 3 term 2
    expect role 1 follower term 2 leader 3
    expect log 3 1/1 2/1 3/2
    propose 3 b
    stabilize
    elapse 1
    expect data 1 a b
    """)


def test_leadership_transfer_to_an_unreachable_node_is_abandoned():
    """Thesis §3.10: if the transfer does not complete within an election timeout, the leader resumes."""
    run("""
    nodes 3
    campaign 1
    stabilize
    partition 1 2 | 3
    transfer 1 3
    propose 1 a -> not_leader 3
    tick 1 x10
    propose 1 a
    stabilize
    expect leader 1 term 1
    """)


def test_read_index():
    """§8 / thesis §6.4 ReadIndex: the leader records its commit index, confirms it still leads with a
    heartbeat round, and only then lets the read proceed at that index. Followers forward to the leader."""
    run("""
    nodes 3
    campaign 1
    stabilize
    propose 1 a
    stabilize
    read 1 r1
    expect no read 1 r1
    deliver type Heartbeat
    deliver type HeartbeatResp
    expect read 1 r1 2
    read 2 r2
    stabilize
    expect read 2 r2 2
    partition 1 | 2 3
    read 1 r3
    stabilize
    tick 1 x5
    stabilize
    expect no read 1 r3          # a partitioned leader cannot confirm it still leads
    """)


def test_read_index_waits_for_the_new_leaders_first_commit():
    """Thesis §6.4 step 1: a new leader does not know the commit index until it has committed an entry
    of its own term, so reads wait for its no-op."""
    run("""
    nodes 3
    campaign 1
    stabilize
    propose 1 a
    stabilize
    transfer 1 2                 # a quick way to a new leader (thesis §3.10)
    deliver                      # TimeoutNow
    deliver                      # RequestVote
    deliver                      # votes
    expect leader 2 term 2
    expect commit 2 < 3
    read 2 r1
    deliver type Heartbeat
    deliver type HeartbeatResp
    expect no read 2 r1
    stabilize
    expect commit 2 3
    expect read 2 r1 3
    """)


def test_restart_keeps_term_vote_and_log():
    """§5.1 Figure 2: currentTerm, votedFor and log[] are persistent; a restarted node keeps its vote."""
    t = run("""
    nodes 3 prevote=off checkquorum=off
    campaign 1
    deliver to 2 type RequestVote
    expect role 2 follower term 1
    crash 2
    restart 2
    expect term 2 1
    campaign 3
    deliver to 2
    expect inflight RequestVoteResp 2
    """)
    replies = {m["to"]: m for m in t.sim.net if m["type"] == "RequestVoteResp" and m["from"] == "n2"}
    assert replies["n1"]["reject"] is False
    assert replies["n3"]["reject"] is True  # already voted for n1 in term 1, before the crash


def test_a_bad_expectation_fails_with_the_line_and_the_cluster():
    with pytest.raises(TranscriptError, match=r"line 4: 'expect leader 2 term 1'.*\n.*n1: leader term=1"):
        run("""
        nodes 3
        campaign 1
        stabilize
        expect leader 2 term 1
        """)


# ---- the edges of the core ---------------------------------------------------------------------------


def _node(node_id="n1", peers=("n1", "n2", "n3"), **kw):
    return RaftNode(node_id, list(peers), rng=random.Random(0), **kw)


def test_a_follower_refuses_to_propose_and_to_transfer():
    node = _node()
    with pytest.raises(NotLeader, match="unknown"):
        node.propose({"op": "x"})
    with pytest.raises(NotLeader):
        node.transfer_leadership("n2")
    with pytest.raises(NotLeader, match="knows no leader"):
        node.read_index("r1")


def test_transfer_to_a_stranger_is_a_bad_request():
    node = _node(peers=["n1"])
    node.campaign()
    with pytest.raises(BadRequest, match=r"cannot transfer leadership to 'n9': not a voter of this group \(n1\)"):
        node.transfer_leadership("n9")


def test_compaction_only_of_what_was_applied():
    node = _node(peers=["n1"])
    node.campaign()
    node.advance(node.ready())
    node.propose({"op": "x"})
    with pytest.raises(ValueError, match="cannot compact the raft log to 2: only 1 is applied"):
        node.compact(2, None)
    node.advance(node.ready())
    assert node.compact(2, {"s": 1}) == Snapshot(2, 1, {"s": 1}, {"voters": ["n1"], "learners": []})
    with pytest.raises(ValueError, match="already compacted to 2"):
        node.compact(2, None)


def test_bad_timing_is_a_config_error():
    with pytest.raises(ConfigError, match="heartbeat_ticks=10, election_ticks=\\(10, 20\\)"):
        _node(heartbeat_ticks=10)


def test_a_broken_store_is_refused():
    state = StorageState(HardState(1, None, 0), None, [{"index": 1, "term": 1, "data": None},
                                                      {"index": 3, "term": 1, "data": None}])
    with pytest.raises(ConfigError, match="not contiguous"):
        _node(storage_state=state)
    with pytest.raises(ConfigError, match="commit index 5 is beyond the last entry 0"):
        _node(storage_state=StorageState(HardState(1, None, 5)))


def test_an_idle_node_has_nothing_ready():
    node = _node()
    assert node.ready() is None
    node.tick()
    assert node.ready() is None


def test_messages_for_someone_else_are_ignored_but_not_those_from_outside_the_configuration():
    """Thesis §4.2.3: a server that is not in our configuration yet (it was added by an entry we have not
    received) may need our vote; a node that is no member itself grants none."""
    node = _node()
    vote = {"type": "RequestVote", "term": 5, "to": "n1", "last_log_index": 0, "last_log_term": 0,
            "pre_vote": False}
    node.step({**vote, "from": "n2", "to": "n3"})
    assert node.status()["term"] == 0 and node.ready() is None
    node.step({**vote, "from": "n9"})
    assert node.status()["term"] == 5 and node.status()["vote"] == "n9"
    joiner = _node(peers=[])
    joiner.step({**vote, "from": "n2"})
    assert joiner.status()["vote"] is None and joiner.ready().messages[0]["reject"] is True


GOOD_APPEND = {"type": "AppendEntries", "term": 2, "from": "n1", "to": "n2", "prev_log_index": 4,
               "prev_log_term": 1, "commit": 3, "entries": [{"index": 5, "term": 2, "data": {"op": "x"}},
                                                            {"index": 6, "term": 2, "data": None}]}


@pytest.mark.parametrize("change, complaint", [
    ({"term": -1}, "raft AppendEntries message: 'term' must be an integer >= 0, got -1"),
    ({"term": True}, "'term' must be an integer >= 0, got True"),
    ({"from": None}, "'from' must be a str, got None"),
    ({"type": "Gossip"}, "unknown type 'Gossip'; expected one of AppendEntries, AppendEntriesResp"),
    ({"entries": "all"}, "'entries' must be a list"),
    ({"entries": [{"index": 6, "term": 2}]}, "entries[0]: index 6 breaks the run that starts after prev_log_index 4"),
    ({"entries": [{"index": 5, "term": 2, "data": [1]}]}, "entries[0]: 'data' must be a JSON object or null"),
    ({"entries": [7]}, "entries[0] must be a JSON object, got 7"),
    ({"entries": [{"index": 5, "term": 2, "config": {"voters": "n1"}}]},
     "entries[0]: config 'voters' must be a list of member ids, got 'n1'"),
    ({"entries": [{"index": 5, "term": 2, "config": {"voters": ["n1"], "learners": ["n1"]}}]},
     "config lists a member twice"),
    ({"entries": [{"index": 5, "term": 2, "config": {"voters": []}}]}, "config 'voters' must name at least one member"),
    ({"entries": [{"index": 5, "term": 2, "config": {"voters": ["n1"], "addresses": [1]}}]},
     "config 'addresses' must map member ids to strings, got [1]"),
])
def test_check_message_names_what_is_wrong(change, complaint):
    assert check_message(dict(GOOD_APPEND)) == GOOD_APPEND
    with pytest.raises(BadRequest) as err:
        check_message({**GOOD_APPEND, **change})
    assert complaint in str(err.value)
    assert "\n" not in str(err.value)


def test_check_message_knows_each_type():
    with pytest.raises(BadRequest, match="expected a JSON object, got list"):
        check_message([])
    with pytest.raises(BadRequest, match="'hint' must be an integer"):
        check_message({"type": "AppendEntriesResp", "term": 1, "from": "a", "to": "b", "reject": True, "index": 3})
    with pytest.raises(BadRequest, match=r"raft InstallSnapshot message: 'index' must be an integer"):
        check_message({"type": "InstallSnapshot", "term": 1, "from": "a", "to": "b", "snapshot": {"term": 1}})
    check_message({"type": "TimeoutNow", "term": 1, "from": "a", "to": "b"})


def test_each_ready_is_advanced_before_the_next():
    node = _node(peers=["n1"])
    node.campaign()
    rd = node.ready()
    assert [e["index"] for e in rd.committed_entries] == [1]
    with pytest.raises(RuntimeError, match="call advance"):
        node.ready()
    node.advance(rd)
    assert node.ready() is None


# ---- membership (thesis §4) and lost storage -----------------------------------------------------------


def test_a_learner_catches_up_from_a_snapshot_then_is_promoted():
    """Thesis §4.2.1: a new server joins as a learner (it counts in no majority) and catches up from the
    leader's snapshot and log; the leader promotes it once it holds everything committed. §4.1: the
    configuration is the latest in the log, and it survives a restart."""
    run("""
    nodes 3 joiners=1
    campaign 1
    stabilize
    propose 1 a
    propose 1 b
    stabilize
    elapse 1
    compact 1
    expect snapshot 1 3
    add 1 4
    expect learners 1 4        # in effect as soon as it is in the leader's log, committed or not
    expect voters 1 1 2 3
    elapse 3
    expect snapshot 4 3
    expect voters 1 1 2 3 4    # promoted by the leader, one more single-server change
    expect learners 1
    expect voters 4 1 2 3 4
    expect data 4 a b
    propose 1 c
    elapse 1
    expect data 4 a b c
    crash 4
    restart 4
    expect voters 4 1 2 3 4
    expect learners 4
    """)


def test_a_learner_counts_in_no_majority():
    """Thesis §4.2.1: until it is promoted, a learner's copy of an entry does not help commit it."""
    run("""
    nodes 3 joiners=1
    campaign 1
    stabilize
    crash 2
    partition 1 2 3 | 4
    add 1 4
    stabilize
    expect commit 1 2          # n1 and n3 commit the learner's entry
    crash 3
    heal
    propose 1 x
    elapse 3
    expect log 4 1/1 2/1 3/1 4/1   # the learner holds x, and n1 proposed its promotion (entry 4) ...
    expect commit 1 2          # ... but n1 and n4 are no majority of n1..n4, nor n1 of n1 n2 n3
    expect voters 1 1 2 3 4    # in effect while uncommitted (§4.1)
    """)


def test_one_change_at_a_time_and_only_real_changes():
    """§4.1: a change waits until the previous one commits; adding a member twice, removing a stranger or
    the only voter are refused with a reason."""
    run("""
    nodes 3 joiners=1
    campaign 1
    stabilize
    add 1 2 -> refused         # already a voter
    remove 1 7 -> refused      # not a member
    remove 1 3
    add 1 4 -> refused         # the removal of n3 has not committed yet
    stabilize
    expect voters 1 1 2
    expect voters 2 1 2
    add 1 4
    stabilize
    elapse 2
    expect voters 1 1 2 4
    """)
    node = _node(peers=["n1"])
    node.campaign()
    with pytest.raises(BadRequest, match="cannot remove 'n1': it is the group's only voter"):
        node.remove_member("n1")


def test_a_removed_leader_steps_down_once_its_removal_commits():
    """Thesis §4.2.2: a leader may remove itself; it manages the group until the removal commits (not counting
    itself), then steps down and hands over with TimeoutNow. A removed server never campaigns (§4.2.3)."""
    run("""
    nodes 3
    campaign 1
    stabilize
    remove 1 1
    expect voters 1 2 3
    expect leader 1
    stabilize
    expect role 1 follower
    expect leader 2 term 2     # TimeoutNow: n2 held everything, so it was elected at once
    propose 2 a
    stabilize
    elapse 1
    expect data 3 a
    tick 1 x40
    expect role 1 follower
    """)


SINGLE_SERVER_BUG = """
    nodes 4 joiners=1 prevote=off checkquorum=off
    campaign 1
    stabilize
    partition 1 2 3 4 | 5
    add 1 5                    # C0 = n1..n4; n5 joins as a learner
    stabilize
    expect learners 2 5
    partition 1 5 | 2 3 4
    tick 1
    stabilize
    tick 1
    stabilize                  # n5 caught up: n1 appends C1 = n1..n5, which reaches only n5
    expect voters 1 1 2 3 4 5
    expect voters 5 1 2 3 4 5
    expect voters 2 1 2 3 4
    campaign 2
    deliver to 3
    deliver to 4
    deliver to 2               # the votes of n3 and n4: n2 leads term 2 under C0
    expect leader 2 term 2
    partition 1 5 | 2 3 | 4    # its opening entry reaches n3 only: 2 of C0's 4, not committed
    stabilize
"""


def test_single_server_change_waits_for_an_entry_of_the_leaders_term():
    """The bug in the dissertation's single-server algorithm (Ongaro, raft-dev, 2015) and its fix. n1's
    uncommitted C1 (adding n5) and a new leader's C2 (removing n4) differ by two servers, so a majority of
    each can be disjoint: n2 n3 for C2 = n1 n2 n3, and n1 n4 n5 for C1. With the fix n2 may not propose C2
    before an entry of its own term commits; that entry would need a majority of C0, which makes n1 lose."""
    run(SINGLE_SERVER_BUG + """
    remove 2 4 -> refused      # n2 has committed nothing in term 2
    partition 1 4 5 | 2 3
    elapse 40                  # n1 wins under C1 with n4 and n5: nothing committed is lost
    expect leader 1
    heal
    elapse 30
    expect voters 2 1 2 3 4 5
    remove 1 4                 # now n1 committed in its term: a change is safe
    stabilize
    elapse 2
    expect voters 3 1 2 3 5
    propose 1 z
    elapse 2
    expect data 5 z
    """)


def test_single_server_change_without_the_fix_loses_a_committed_entry(monkeypatch):
    """The transcript above, against a leader that proposes a change before committing in its term: n2
    commits C2 with n3 alone, n1 is elected under C1 by n4 and n5, and the simulator's leader completeness
    check fires."""
    monkeypatch.setattr(RaftNode, "_change_pending",
                        lambda self: "pending" if self._config_index > self.commit else None)
    with pytest.raises(InvariantViolation, match=r"leader completeness: leader n1 of term \d+ lacks committed entry 3"):
        run(SINGLE_SERVER_BUG + """
        remove 2 4
        stabilize
        expect commit 2 4
        partition 1 4 5 | 2 3
        elapse 40
        """)


def test_a_wiped_follower_knows_it_and_never_campaigns():
    """A follower whose storage is gone restarts empty. The leader's next message (which counts it as a
    voter, and names entries it acknowledged) makes it lost; before that, an empty node votes for no one.
    A lost node campaigns never, and the group goes on without it."""
    run("""
    nodes 3
    campaign 1
    stabilize
    propose 1 a
    stabilize
    elapse 1
    lose 3
    expect not lost 3
    elapse 2
    expect lost 3
    tick 3 x40
    expect role 3 follower
    expect log 3
    propose 1 b
    stabilize
    expect data 2 a b
    """)


def test_a_wiped_voter_does_not_vote_twice_in_a_term():
    """The issue's two leaders in term 1: n3 votes for n1, loses its storage, and is asked by n2 for the
    same term. An empty node that was not told to seed a new group grants nothing."""
    run("""
    nodes 3 prevote=off
    partition 1 3 | 2
    campaign 1
    deliver to 3 type RequestVote
    lose 3
    stabilize
    expect leader 1 term 1     # n3's vote, sent before its storage went, counts
    partition 1 | 2 3
    campaign 2
    stabilize
    expect role 2 candidate term 1
    """)


def test_a_wiped_voter_cannot_elect_a_stale_leader_and_is_replaced():
    """With PreVote and CheckQuorum: n3 acknowledged entry a with n1, then lost its storage; n1 is down.
    n2 lacks a and cannot win without n3, which grants no vote, so a is not lost. Back under a new id
    (n4 replaces n3: added as a learner, promoted, then n3 removed), the group is whole again."""
    run("""
    nodes 3 joiners=1
    campaign 1
    stabilize
    partition 1 3 4 | 2
    propose 1 a
    stabilize
    expect commit 1 2
    lose 3
    crash 1
    heal
    elapse 60
    expect term 2 1            # its pre-votes never win: n3 grants nothing
    restart 1
    elapse 30
    expect leader 1
    expect lost 3
    add 1 4 replaces 3
    elapse 5
    expect voters 1 1 2 4
    expect data 4 a
    propose 1 b
    elapse 2
    expect data 2 a b
    """)


def test_a_heartbeat_beyond_the_log_makes_a_node_lost_instead_of_killing_it():
    """A seeded node restarted on an emptied store (the old advice) is sent a heartbeat naming entries it
    acknowledged before: it used to die of an AssertionError; now it knows it lost them and stays out."""
    node = _node("n2")
    node.step({"type": "Heartbeat", "term": 3, "from": "n1", "to": "n2", "commit": 5, "ctx": None})
    assert "holding entry 5, but its log ends at 0" in node.status()["lost"]
    assert "remove it and add it back under a new id" in node.status()["lost"]
    node.step({"type": "RequestVote", "term": 4, "from": "n3", "to": "n2", "last_log_index": 9, "last_log_term": 3,
               "pre_vote": False})
    for _ in range(50):
        node.tick()
    rd = node.ready()
    assert node.status()["role"] == "follower" and node.status()["vote"] is None
    assert rd is None or not rd.messages
