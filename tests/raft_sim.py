"""Deterministic simulation of a Raft group: real RaftNode cores over a hostile simulated network.

The network delays, drops, duplicates, reorders and partitions messages; nodes
crash (also half-way through a Ready) and restart from what their MemoryRaftStore
holds, through the same persist-then-send discipline as the real driver. Every
random choice comes from one ``random.Random(seed)`` (each node's own from a
string derived from it), so a seed replays exactly.

Membership changes too (thesis §4): the leader adds learners (new nodes that start
with an empty store), which it promotes once caught up, removes members and
replaces them, racing the crashes and partitions. A member may lose its storage
(restarted empty, as a server that must not vote again under its id) and is then
replaced; some commands fail when applied, with the same error on every replica.

Checked after every step (Raft §5.2-§5.4, Figure 3): election safety, log matching,
leader completeness, state machine safety, commit indexes never decrease, a
committed entry is durable on a majority of the committing leader's voters and
survives restarts, ReadIndex reads see every write committed before they were
asked (§8), a node that lost its storage never grants a vote or campaigns. Then
liveness: once the network heals, every node is up and the lost ones are removed,
a leader is elected and a proposal commits on every member within a bound.

    python tests/raft_sim.py --seed 1234 --nodes 3 --trace    # replay one seed, print every event
    python tests/raft_sim.py --seeds 0:10000 --nodes 5        # soak
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
from collections import Counter, deque
from dataclasses import dataclass

from cis490fleet.errors import BadRequest, NotFound, NotLeader, Unavailable
from cis490fleet.raft import LEADER, RaftNode, check_message
from cis490fleet.raftstore import MemoryRaftStore


class InvariantViolation(AssertionError):
    pass


@dataclass
class SimConfig:
    nodes: int = 3
    steps: int = 300
    election_ticks: tuple[int, int] = (4, 8)
    heartbeat_ticks: int = 1
    max_batch: int = 64
    pre_vote: bool = True
    check_quorum: bool = True
    drop: float = 0.05
    duplicate: float = 0.03
    lose_after_vote: float = 0.1  # how often a node loses its storage right after granting a vote

    @classmethod
    def for_seed(cls, seed: int, nodes: int, steps: int = 300) -> SimConfig:
        """Most seeds run the defaults (PreVote and CheckQuorum on); some switch either off, slow the
        heartbeats, or send one entry per AppendEntries (so logs catch up piecemeal)."""
        variant = seed % 8
        slow = variant == 5
        return cls(nodes=nodes, steps=steps, election_ticks=(6, 12) if slow else (4, 8),
                   heartbeat_ticks=2 if slow else 1, pre_vote=variant != 6, check_quorum=variant != 7, max_batch=1 if seed % 3 == 0 else 64)


def _canon(data: object) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"))


def _content(e: dict) -> str:
    """What an entry carries: its command, and its configuration when it has one."""
    return _canon(e["data"]) if e.get("config") is None else _canon([e["data"], e["config"]])


class Member:
    def __init__(self, node_id: str, seed: bool = True):
        self.id = node_id
        self.seed = seed    # one of the nodes that started the group; others join empty and wait to be added
        self.wiped = False  # its storage was lost: it restarts as a server that must never vote again
        self.store = MemoryRaftStore()
        self.node: RaftNode | None = None
        self.incarnation = 0
        self.app_index = 0
        self.app_digest = ""
        self.commit_seen = 0


class Sim:
    def __init__(self, seed: int, config: SimConfig, *, trace_to=None):
        self.seed = seed
        self.cfg = config
        self.rng = random.Random(seed)
        self.ids = [f"n{i}" for i in range(1, config.nodes + 1)]
        self.seeds = list(self.ids)
        self.members = {i: Member(i) for i in self.ids}
        self.net: list[dict] = []
        self.groups: list[set[str]] | None = None
        self.drop, self.duplicate = config.drop, config.duplicate
        self.trace: deque[str] = deque(maxlen=60)
        self.trace_to = trace_to
        self.stats: Counter[str] = Counter()
        self.step_no = 0
        self.counter = 0
        # What the checks remember.
        self.leaders: dict[int, str] = {}                    # term -> leader
        self.sigs: dict[tuple[int, int], tuple[str, int]] = {}  # (index, term) -> (data, term of index-1)
        self.committed: dict[int, tuple[int, str]] = {}      # index -> (term, data)
        self.max_committed = 0
        self.digests: dict[int, str] = {}                    # index -> state machine digest after applying it
        self.reads: dict[str, int] = {}                      # ctx -> max committed when the read was asked
        self.store_hs: dict[str, tuple[int, int]] = {}       # node -> (term, commit) last saved
        self.committed_config: tuple[int, dict] = (0, {})    # the latest configuration entry committed
        for m in self.members.values():
            self.start(m)

    # ---- bookkeeping -----------------------------------------------------------------------------

    def log(self, event: str) -> None:
        line = f"[{self.step_no}] {event}"
        self.trace.append(line)
        if self.trace_to is not None:
            print(line, file=self.trace_to)

    def fail(self, what: str) -> None:
        raise InvariantViolation(what)

    def live(self) -> list[Member]:
        return [m for m in self.members.values() if m.node is not None]

    def linked(self, a: str, b: str) -> bool:
        return self.groups is None or any(a in g and b in g for g in self.groups)

    # ---- nodes -------------------------------------------------------------------------------------

    def start(self, m: Member) -> None:
        state = m.store.load()
        for index in range(1, state.hard_state.commit + 1):
            if index in self.committed and not m.store.holds(index, self.committed[index][0]):
                self.fail(f"{m.id} restarted without committed entry {index} (persisted commit "
                          f"{state.hard_state.commit})")
        m.node = RaftNode(m.id, self.seeds if m.seed and not m.wiped else [], storage_state=state,
                          rng=random.Random(f"{self.seed}/{m.id}/{m.incarnation}"),
                          election_ticks=self.cfg.election_ticks, heartbeat_ticks=self.cfg.heartbeat_ticks,
                          max_batch=self.cfg.max_batch, pre_vote=self.cfg.pre_vote,
                          check_quorum=self.cfg.check_quorum)
        m.incarnation += 1
        if state.snapshot is not None:
            m.app_index, m.app_digest = state.snapshot.index, state.snapshot.data["digest"]
        else:
            m.app_index, m.app_digest = 0, ""
        m.commit_seen = m.node.commit
        self.log(f"start {m.id} #{m.incarnation} term={m.node.term} commit={m.node.commit} last={m.node.last_index()}")

    def crash(self, m: Member, why: str = "") -> None:
        m.node = None
        self.stats["crash"] += 1
        self.log(f"crash {m.id} {why}")

    def send(self, msg: dict) -> None:
        self.stats["sent"] += 1
        if not self.linked(msg["from"], msg["to"]) or self.rng.random() < self.drop:
            return
        wire = check_message(json.loads(json.dumps(msg)))  # JSON-able and well-formed; no aliasing between nodes
        self.net.append(wire)
        if self.rng.random() < self.duplicate:
            self.net.append(json.loads(json.dumps(msg)))

    def settle(self, m: Member, crash_at: str | None = None) -> None:
        """The driver loop: persist, check, send, apply, advance; until the node has nothing more."""
        self.check_leader(m)
        for _ in range(100):
            node = m.node
            rd = node.ready()
            if rd is None:
                return
            for msg in rd.early:
                self.send(msg)
            if crash_at == "before_persist":
                return self.crash(m, "before persisting a Ready (its early messages sent)")
            self.check_persist(m, rd)
            self.check_lost(m, rd)
            m.store.save(rd.hard_state, rd.entries, rd.snapshot)
            self.check_commit(m)
            if crash_at == "after_persist":
                return self.crash(m, "after persisting, before sending")
            for msg in rd.messages:
                self.send(msg)
            if rd.snapshot is not None:
                self.restore(m, rd.snapshot)
            for e in rd.committed_entries:
                self.apply(m, e)
            for rs in rd.read_states:
                self.check_read(m, rs)
            node.advance(rd)
        self.fail(f"{m.id}: ready() never ran dry")

    # ---- invariants --------------------------------------------------------------------------------

    def check_leader(self, m: Member) -> None:
        node = m.node
        if node.role != LEADER:
            return
        holder = self.leaders.get(node.term)
        if holder == m.id:
            return
        if holder is not None:
            self.fail(f"election safety: {holder} and {m.id} both leaders in term {node.term}")
        self.leaders[node.term] = m.id
        self.stats["elections"] += 1
        self.log(f"leader {m.id} term={node.term} last={node.last_index()}")
        # Leader completeness (§5.4): every committed entry is in the new leader's log.
        snap = node.status()["snapshot_index"]
        for index, (term, data) in self.committed.items():
            if index <= snap:
                continue
            got = node.entries(index, index + 1)
            if not got or got[0]["term"] != term or _content(got[0]) != data:
                self.fail(f"leader completeness: leader {m.id} of term {node.term} lacks committed entry "
                          f"{index} (term {term}); it has {got}")

    def check_persist(self, m: Member, rd) -> None:
        if rd.hard_state is not None:
            term0, commit0 = self.store_hs.get(m.id, (0, 0))
            if rd.hard_state.term < term0 or rd.hard_state.commit < commit0:
                self.fail(f"{m.id} would persist term/commit {rd.hard_state.term}/{rd.hard_state.commit} "
                          f"after {term0}/{commit0}: they must never decrease")
            self.store_hs[m.id] = (rd.hard_state.term, rd.hard_state.commit)
        if rd.snapshot is not None:
            snap = rd.snapshot
            if snap.index > self.max_committed or self.digests.get(snap.index) != snap.data["digest"]:
                self.fail(f"{m.id} installs snapshot at {snap.index} that is not a committed state")
        for e in rd.entries:
            data = _content(e)
            prev_term = m.node.term_at(e["index"] - 1)
            sig = self.sigs.setdefault((e["index"], e["term"]), (data, prev_term))
            if sig != (data, prev_term):
                self.fail(f"log matching: entry ({e['index']}, term {e['term']}) on {m.id} is {data} after term "
                          f"{prev_term}; elsewhere it is {sig[0]} after term {sig[1]}")
            if e["index"] <= m.commit_seen and self.committed.get(e["index"], (e["term"], data)) != (e["term"], data):
                self.fail(f"{m.id} overwrites entry {e['index']} it had committed as {self.committed[e['index']]} "
                          f"with term {e['term']} {data}")

    def check_commit(self, m: Member) -> None:
        node = m.node
        if node.commit < m.commit_seen:
            self.fail(f"{m.id}: commit index went from {m.commit_seen} down to {node.commit}")
        for index in range(m.commit_seen + 1, node.commit + 1):
            got = node.entries(index, index + 1)
            if not got:
                continue  # covered by an installed snapshot, checked there
            term, data = got[0]["term"], _content(got[0])
            known = self.committed.setdefault(index, (term, data))
            if known != (term, data):
                self.fail(f"state machine safety: {m.id} commits {index} as term {term} {data}; "
                          f"it was committed as term {known[0]} {known[1]}")
            if index > self.max_committed:
                self.max_committed = index
                voters = node.voters
                # A member that lost its storage may have acknowledged the entry before: its ack counts, and
                # safety then rests on it never voting again (check_lost) until it is removed.
                durable = sum(self.members[v].wiped or self.members[v].store.holds(index, term) for v in voters)
                if durable * 2 <= len(voters):
                    self.fail(f"entry {index} committed by {m.id} but durable on only {durable} of its "
                              f"{len(voters)} voters {voters}")
            config = got[0].get("config")
            if config is not None and index > self.committed_config[0]:
                self.committed_config = (index, config)
        m.commit_seen = node.commit

    def restore(self, m: Member, snap) -> None:
        m.app_index, m.app_digest = snap.index, snap.data["digest"]
        self.stats["snapshots_installed"] += 1
        self.log(f"{m.id} restores snapshot at {snap.index}")

    def apply(self, m: Member, e: dict) -> None:
        if e["index"] != m.app_index + 1:
            self.fail(f"{m.id} applies entry {e['index']} after {m.app_index}: entries must apply in order, once")
        known = self.committed.get(e["index"])
        if known is not None and known != (e["term"], _content(e)):
            self.fail(f"{m.id} applies {e} but {known} was committed at {e['index']}")
        # A command that fails to apply fails alike everywhere: its error is part of the state, and the
        # replica carries on with the next entry.
        result = "error: refused" if (e["data"] or {}).get("fail") else "ok"
        self.stats["apply_errors"] += result != "ok"
        m.app_digest = hashlib.sha256((m.app_digest + _canon(e) + result).encode()).hexdigest()[:16]
        m.app_index = e["index"]
        if self.digests.setdefault(e["index"], m.app_digest) != m.app_digest:
            self.fail(f"state machine safety: {m.id} state after applying {e['index']} differs from another node's")
        self.stats["applied"] += 1

    def check_lost(self, m: Member, rd) -> None:
        """A node that lost its storage holds no promise of its former self: it must never vote or campaign."""
        if not m.wiped or m.node.config is not None and not m.node.lost:
            return
        for msg in rd.messages:
            if msg["type"] == "RequestVote" or (msg["type"] == "RequestVoteResp" and not msg["reject"]):
                self.fail(f"{m.id} lost its storage, yet sends {msg}")

    def check_read(self, m: Member, rs) -> None:
        wanted = self.reads.get(rs.ctx)
        if wanted is None:
            self.fail(f"{m.id} got a read state for unknown ctx {rs.ctx!r}")
        if rs.index < wanted:
            self.fail(f"ReadIndex: read {rs.ctx} at {m.id} may proceed at index {rs.index}, but {wanted} was "
                      "committed before it was asked: a stale read")
        self.stats["reads"] += 1

    # ---- actions -------------------------------------------------------------------------------------

    def tick_all(self) -> None:
        for m in self.live():
            m.node.tick()
            self.settle(m)

    def deliver(self, pos: int, crash_at: str | None = None) -> None:
        msg = self.net.pop(pos)
        m = self.members[msg["to"]]
        if m.node is None or not self.linked(msg["from"], msg["to"]):
            return
        self.stats["delivered"] += 1
        m.node.step(msg)
        self.settle(m, crash_at)
        if (msg["type"] == "RequestVote" and not msg["pre_vote"] and m.node is not None
                and m.node.vote == msg["from"] and self.rng.random() < self.cfg.lose_after_vote):
            self.wipe(m)  # the worst moment to lose storage: right after promising a vote

    def propose(self, m: Member) -> None:
        self.counter += 1
        cmd = {"op": "put", "n": self.counter, "by": m.id}
        if self.rng.random() < 0.1:
            cmd["fail"] = True
        try:
            index = m.node.propose(cmd)
        except NotLeader:
            return
        self.stats["proposed"] += 1
        self.log(f"propose at {m.id} -> {index}")
        self.settle(m)

    def read(self, m: Member) -> None:
        self.counter += 1
        ctx = f"r{self.counter}"
        self.reads[ctx] = self.max_committed
        try:
            m.node.read_index(ctx)
        except NotLeader:
            return
        self.settle(m)

    def compact(self, m: Member) -> None:
        node = m.node
        snap_index = node.status()["snapshot_index"]
        if node.applied - snap_index < 3:
            return
        snap = node.compact(node.applied, {"digest": m.app_digest})
        m.store.truncate_prefix(snap.index, snap)
        self.stats["compactions"] += 1
        self.log(f"{m.id} compacts to {snap.index}")

    def repartition(self) -> None:
        if self.groups is not None and self.rng.random() < 0.5:
            self.groups = None
            self.log("heal partition")
            return
        ids = list(self.ids)
        self.rng.shuffle(ids)
        cut = self.rng.randint(1, len(ids) - 1)
        self.groups = [set(ids[:cut]), set(ids[cut:])]
        self.stats["partitions"] += 1
        self.log(f"partition {sorted(self.groups[0])} | {sorted(self.groups[1])}")

    def step(self) -> None:
        self.step_no += 1
        rng = self.rng
        r = rng.random()
        live = self.live()
        if r < 0.12 or (r < 0.75 and not self.net):
            self.tick_all()
        elif r < 0.72:
            # mostly in order, sometimes overtaken, now and then one that waited long
            pos = rng.randrange(len(self.net) if rng.random() < 0.1 else min(len(self.net), 4))
            crash_at = None
            if rng.random() < 0.004:
                crash_at = rng.choice(["before_persist", "after_persist"])
            self.deliver(pos, crash_at)
        elif r < 0.74:
            self.net.pop(rng.randrange(len(self.net)))
        elif r < 0.75:
            self.net.append(dict(rng.choice(self.net)))
        elif r < 0.85 and live:
            leaders = [m for m in live if m.node.role == LEADER]
            self.propose(rng.choice(leaders) if leaders and rng.random() < 0.8 else rng.choice(live))
        elif r < 0.88 and live:
            self.read(rng.choice(live))
        elif r < 0.89 and live:
            leaders = [m for m in live if m.node.role == LEADER]
            if leaders:
                m = rng.choice(leaders)
                to = rng.choice(self.ids)
                self.log(f"transfer leadership {m.id} -> {to}")
                try:
                    m.node.transfer_leadership(to)
                except BadRequest:  # not a voter (any more)
                    return
                self.settle(m)
        elif r < 0.92 and live:
            self.compact(rng.choice(live))
        elif r < 0.95:
            self.repartition()
        elif r < 0.975:
            down = [m for m in self.members.values() if m.node is None]
            if down and rng.random() < 0.7:
                self.start(rng.choice(down))
            elif live:
                self.crash(rng.choice(live))
        elif r < 0.985:
            leaders = [m for m in live if m.node.role == LEADER]
            if leaders:
                self.change_membership(rng.choice(leaders))
        elif r < 0.99:
            self.wipe()
        else:
            self.tick_all()

    # ---- membership and storage loss ---------------------------------------------------------------

    def new_member(self) -> Member:
        """A server that starts empty (no seed) and waits for the leader to add it."""
        nid = f"n{len(self.ids) + 1}"
        self.ids.append(nid)
        m = self.members[nid] = Member(nid, seed=False)
        self.start(m)
        return m

    def needs_replacing(self, node) -> list[str]:
        """Members of ``node``'s configuration whose storage was lost: only a new id brings them back."""
        return [v for v in node.voters + node.learners if self.members[v].wiped]

    def change_membership(self, leader: Member) -> None:
        node, rng = leader.node, self.rng
        lost = self.needs_replacing(node)
        choice = rng.choice(["add", "remove", "replace"]) if not lost else "replace"
        try:
            if choice == "add" and len(self.ids) < 3 * self.cfg.nodes:
                new = self.new_member()
                node.add_learner(new.id, f"sim://{new.id}")
            elif choice == "remove" and len(node.voters) > self.cfg.nodes:
                old = rng.choice(node.voters + node.learners)
                node.remove_member(old)
            elif choice == "replace" and len(self.ids) < 3 * self.cfg.nodes:
                old = lost[0] if lost else rng.choice(node.voters)
                if old not in node.voters:
                    node.remove_member(old)
                else:
                    node.add_learner(self.new_member().id, None, replaces=old)
            else:
                return
        except (NotLeader, Unavailable, BadRequest, NotFound) as err:
            self.log(f"membership {choice} at {leader.id} refused: {err}")
            return
        self.stats["membership_changes"] += 1
        self.log(f"membership {choice} at {leader.id}: voters={node.voters} learners={node.learners}")
        self.settle(leader)

    def wipe(self, m: Member | None = None) -> None:
        """Storage loss: a member restarts with an empty store. Another may lose its storage only once the
        group committed the removal of the previous one: two losses before that are two failures at once,
        more than a group of three can survive."""
        index, config = self.committed_config
        if any(m.wiped and (m.wiped_at >= index or m.id in config["voters"] + config["learners"])
               for m in self.members.values()):
            return
        candidates = [c for c in self.members.values() if not c.wiped and self.in_some_config(c.id)
                      and (c.store.last_index() > 0 or c is m)]
        if m is None and candidates:
            m = self.rng.choice(candidates)
        if m not in candidates:
            return
        self.lose_storage(m)

    def lose_storage(self, m: Member) -> None:
        """``m`` restarts with an empty store, and without a seed: never as a member of a new group."""
        if m.node is not None:
            self.crash(m, "to lose its storage")
        m.store, m.wiped, m.wiped_at = MemoryRaftStore(), True, self.max_committed
        self.store_hs.pop(m.id, None)
        self.stats["storage_lost"] += 1
        self.log(f"{m.id} lost its storage")
        self.start(m)

    def in_some_config(self, nid: str) -> bool:
        return any(nid in m.node.voters + m.node.learners for m in self.live())

    # ---- liveness --------------------------------------------------------------------------------------

    def round(self) -> None:
        """Healthy network: tick everyone once, then deliver everything in order until quiet."""
        self.step_no += 1
        self.tick_all()
        for _ in range(20000):
            if not self.net:
                return
            self.deliver(0)
        self.fail("the network never went quiet in a healthy round")

    def heal(self) -> None:
        self.groups = None
        self.drop = self.duplicate = 0.0
        self.log("heal everything")
        for m in self.members.values():
            if m.node is None:
                self.start(m)
        bound = 30 * self.cfg.election_ticks[1]
        self.counter += 1
        data = {"op": "put", "n": self.counter, "by": "liveness"}
        for _ in range(bound):
            self.round()
            leader = self.stable_leader()
            if leader is None:
                continue
            lost = self.needs_replacing(leader.node)
            try:
                if lost:  # what the operator does: remove the member whose storage was lost
                    leader.node.remove_member(lost[0])
                    self.log(f"remove lost {lost[0]} at {leader.id}")
                    self.settle(leader)
                    continue
                index = leader.node.propose(data)
            except (NotLeader, Unavailable):  # a leadership transfer or a membership change is under way
                continue
            self.settle(leader)
            break
        else:
            self.fail(f"liveness: no leader took a proposal within {bound} healthy rounds after healing")
        members = leader.node.voters + leader.node.learners
        for _ in range(3 * self.cfg.election_ticks[1]):
            if all(self.members[i].app_index >= index for i in members):
                break
            self.round()
        else:
            self.fail(f"liveness: proposal at index {index} not applied on every member {members} within "
                      f"{3 * self.cfg.election_ticks[1]} rounds")
        if self.committed.get(index) != (leader.node.term, _canon(data)):
            self.fail(f"liveness: the proposal at {index} was replaced by {self.committed.get(index)}")

    def stable_leader(self) -> Member | None:
        """The leader of the highest term, once it committed in its term and every member of its
        configuration follows it (members whose storage was lost aside: they wait to be removed)."""
        leaders = [m for m in self.members.values() if m.node.role == LEADER]
        if not leaders:
            return None
        top = max(leaders, key=lambda m: m.node.term)
        node = top.node
        if node.term_at(node.commit) != node.term:
            return None
        if any(not self.members[i].wiped and (self.members[i].node.leader != top.id
                                              or self.members[i].node.term != node.term)
               for i in node.voters + node.learners if i != top.id):
            return None
        return top

    def run(self) -> Sim:
        for _ in range(self.cfg.steps):
            self.step()
        self.heal()
        return self


def run_seed(seed: int, nodes: int = 3, steps: int = 300, *, trace_to=None) -> Sim:
    """Run one seed; a failure names the seed, how to replay it, and the last events."""
    config = SimConfig.for_seed(seed, nodes, steps)
    sim = None
    try:
        sim = Sim(seed, config, trace_to=trace_to)
        return sim.run()
    except Exception as exc:
        events = "\n".join(sim.trace) if sim is not None else ""
        raise InvariantViolation(
            f"seed={seed} nodes={nodes} steps={steps} ({config}): {type(exc).__name__}: {exc}\n"
            f"replay: python tests/raft_sim.py --seed {seed} --nodes {nodes} --steps {steps} --trace\n"
            f"last events:\n{events}") from exc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, help="run this one seed")
    parser.add_argument("--seeds", default="0:100", help="run seeds START:STOP (default 0:100)")
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--trace", action="store_true", help="print every event")
    args = parser.parse_args(argv)
    if args.seed is not None:
        seeds = [args.seed]
    else:
        start, _, stop = args.seeds.partition(":")
        seeds = range(int(start), int(stop))
    totals: Counter[str] = Counter()
    for seed in seeds:
        try:
            sim = run_seed(seed, args.nodes, args.steps, trace_to=sys.stdout if args.trace else None)
        except InvariantViolation as exc:
            print(exc, file=sys.stderr)
            return 1
        totals.update(sim.stats)
    print(f"{len(seeds)} seeds ok: " + ", ".join(f"{k}={v}" for k, v in sorted(totals.items())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
