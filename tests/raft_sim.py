"""Deterministic simulation of a Raft group: real RaftNode cores over a hostile simulated network.

The network delays, drops, duplicates, reorders and partitions messages; nodes
crash (also half-way through a Ready) and restart from what their MemoryRaftStore
holds, through the same persist-then-send discipline as the real driver. Every
random choice comes from one ``random.Random(seed)`` (each node's own from a
string derived from it), so a seed replays exactly.

Checked after every step (Raft §5.2-§5.4, Figure 3): election safety, log matching,
leader completeness, state machine safety, commit indexes never decrease, a
committed entry is durable on a majority and survives restarts, ReadIndex reads
see every write committed before they were asked (§8). Then liveness: once the
network heals and every node is up, a leader is elected and a proposal commits
everywhere within a bound.

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

from cis490fleet.errors import NotLeader
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


class Member:
    def __init__(self, node_id: str):
        self.id = node_id
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
        m.node = RaftNode(m.id, self.ids, storage_state=state, rng=random.Random(f"{self.seed}/{m.id}/{m.incarnation}"),
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
            if crash_at == "before_persist":
                return self.crash(m, "before persisting a Ready")
            self.check_persist(m, rd)
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
            if not got or got[0]["term"] != term or _canon(got[0]["data"]) != data:
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
            data = _canon(e["data"])
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
            term, data = got[0]["term"], _canon(got[0]["data"])
            known = self.committed.setdefault(index, (term, data))
            if known != (term, data):
                self.fail(f"state machine safety: {m.id} commits {index} as term {term} {data}; "
                          f"it was committed as term {known[0]} {known[1]}")
            if index > self.max_committed:
                self.max_committed = index
                durable = sum(x.store.holds(index, term) for x in self.members.values())
                if durable * 2 <= len(self.members):
                    self.fail(f"entry {index} committed by {m.id} but durable on only {durable} of "
                              f"{len(self.members)} nodes")
        m.commit_seen = node.commit

    def restore(self, m: Member, snap) -> None:
        m.app_index, m.app_digest = snap.index, snap.data["digest"]
        self.stats["snapshots_installed"] += 1
        self.log(f"{m.id} restores snapshot at {snap.index}")

    def apply(self, m: Member, e: dict) -> None:
        if e["index"] != m.app_index + 1:
            self.fail(f"{m.id} applies entry {e['index']} after {m.app_index}: entries must apply in order, once")
        known = self.committed.get(e["index"])
        if known is not None and known != (e["term"], _canon(e["data"])):
            self.fail(f"{m.id} applies {e} but {known} was committed at {e['index']}")
        m.app_digest = hashlib.sha256((m.app_digest + _canon(e)).encode()).hexdigest()[:16]
        m.app_index = e["index"]
        if self.digests.setdefault(e["index"], m.app_digest) != m.app_digest:
            self.fail(f"state machine safety: {m.id} state after applying {e['index']} differs from another node's")
        self.stats["applied"] += 1

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

    def propose(self, m: Member) -> None:
        self.counter += 1
        try:
            index = m.node.propose({"op": "put", "n": self.counter, "by": m.id})
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
                m.node.transfer_leadership(to)
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
        else:
            self.tick_all()

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
            try:
                index = leader.node.propose(data)
            except NotLeader:  # a leadership transfer is under way
                continue
            self.settle(leader)
            break
        else:
            self.fail(f"liveness: no leader took a proposal within {bound} healthy rounds after healing")
        for _ in range(3 * self.cfg.election_ticks[1]):
            if all(m.app_index >= index for m in self.members.values()):
                break
            self.round()
        else:
            self.fail(f"liveness: proposal at index {index} not applied everywhere within "
                      f"{3 * self.cfg.election_ticks[1]} rounds")
        if self.committed.get(index) != (leader.node.term, _canon(data)):
            self.fail(f"liveness: the proposal at {index} was replaced by {self.committed.get(index)}")

    def stable_leader(self) -> Member | None:
        leaders = [m for m in self.members.values() if m.node.role == LEADER]
        if len(leaders) != 1:
            return None
        node = leaders[0].node
        if node.term_at(node.commit) != node.term:
            return None
        if any(m.node.leader != leaders[0].id or m.node.term != node.term for m in self.members.values()):
            return None
        return leaders[0]

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
