"""The Raft consensus core: terms, votes, log replication, snapshots, PreVote, CheckQuorum, ReadIndex, membership.

A pure state machine shaped like etcd's RawNode. It never touches a socket, file,
thread or clock and never draws from the global random generator: time arrives
as ``tick()``, randomness from an injected ``random.Random``, messages are plain
JSON-able dicts in (``step``) and out (``Ready.messages``).

The driver loop (``raftstore`` is the durable half)::

    node.tick()  /  node.step(msg)  /  node.propose({"op": ..., "now": ...})
    rd = node.ready()
    if rd is not None:
        store.save(rd.hard_state, rd.entries, rd.snapshot)  # 1. durable first ...
        send(rd.messages)                                   # 2. ... then votes and acks may leave
        if rd.snapshot: restore the state machine from rd.snapshot.data
        for e in rd.committed_entries: apply(e)             # 3. e["data"] is None for a no-op
        for r in rd.read_states: serve reads for r.ctx once applied >= r.index
        node.advance(rd)                                    # 4. before the next tick/step/ready

After the application took a snapshot at an applied index ``i``:
``snap = node.compact(i, data); store.truncate_prefix(i, snap)``.

Entries are ``{"index", "term", "data"}``; ``data`` is a JSON-able dict, or None
for the no-op a new leader appends to open its term. References: the Raft paper
(Ongaro & Ousterhout, extended version) and Ongaro's thesis, cited by section.

Membership (thesis §4): a configuration ``{"voters": [...], "learners": [...], ...}``
travels in an entry's ``config`` field (its ``data`` is None, so the application
skips it) and in snapshots. Every member uses the latest configuration in its log,
committed or not (§4.1), and falls back to the previous one when a conflicting
suffix is dropped. Changes go one server at a time (§4.1: any two majorities of
configurations that differ by one server overlap), with the fix Ongaro posted to
raft-dev in 2015 for the bug in the dissertation's single-server algorithm: a
leader proposes a change only once an entry of its own term is committed, and only
while no earlier change is uncommitted. A new server joins as a learner (§4.2.1:
it catches up without counting in any majority) and the leader promotes it once it
holds everything committed. A leader that removed itself steps down once the
removal commits (§4.2.2). Extra keys of a configuration (``addresses``,
``replacing``, ``cluster``) pass through unchanged; the core reads only ``replacing``.

A node started with an empty store and no seed (``peers=[]``) has no configuration:
it is a joining server (it accepts the leader's snapshot and log) or one whose Raft
state is gone. The leader marks each message with whether it counts the receiver as
a voter; an unconfigured node that is told it is a voter, that finds itself a voter
in the first configuration it receives, or that is asked to commit entries it does
not hold, has lost state it once acknowledged: it becomes ``lost`` and from then on
neither votes, campaigns nor stores anything, so it can break no promise its former
self made. The way back is a new identity: remove it, add it under a new id.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from cis490fleet.errors import BadRequest, ConfigError, NotFound, NotLeader, Unavailable

FOLLOWER = "follower"
PRE_CANDIDATE = "pre_candidate"
CANDIDATE = "candidate"
LEADER = "leader"
_EARLY_TYPES = frozenset({"AppendEntries", "Heartbeat"})

# Replication state of one follower, seen from the leader (etcd's Progress).
PROBE = "probe"          # one append in flight, until the follower says where its log matches
REPLICATE = "replicate"  # appends are streamed optimistically
SNAPSHOT = "snapshot"    # an InstallSnapshot is in flight

_FROM_LEADER = ("AppendEntries", "Heartbeat", "InstallSnapshot")

# Fields each message type carries besides type, term, from and to.
_FIELDS: dict[str, dict[str, type]] = {
    "RequestVote": {"last_log_index": int, "last_log_term": int, "pre_vote": bool},
    "RequestVoteResp": {"reject": bool, "pre_vote": bool},
    "AppendEntries": {"prev_log_index": int, "prev_log_term": int, "commit": int, "entries": list},
    "AppendEntriesResp": {"reject": bool, "index": int},
    "Heartbeat": {"commit": int},
    "HeartbeatResp": {},
    "InstallSnapshot": {"snapshot": dict},
    "InstallSnapshotResp": {"index": int},
    "TimeoutNow": {},
    "ReadIndex": {},
    "ReadIndexResp": {"index": int},
}
MESSAGE_TYPES = frozenset(_FIELDS)


def _check_field(where: str, obj: dict, name: str, kind: type) -> None:
    value = obj.get(name)
    if kind is int:
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise BadRequest(f"{where}: {name!r} must be an integer >= 0, got {value!r}")
    elif not isinstance(value, kind):
        raise BadRequest(f"{where}: {name!r} must be a {'JSON object' if kind is dict else kind.__name__}, "
                         f"got {value!r}")


def check_config(where: str, config: object) -> dict:
    """A configuration from the wire or a store: ``voters`` and ``learners``, lists of distinct ids."""
    if not isinstance(config, dict):
        raise BadRequest(f"{where}: 'config' must be a JSON object, got {config!r}")
    seen: set[str] = set()
    for key in ("voters", "learners"):
        ids = config.get(key, [])
        if not isinstance(ids, list) or not all(isinstance(i, str) and i for i in ids):
            raise BadRequest(f"{where}: config {key!r} must be a list of member ids, got {ids!r}")
        if seen & set(ids) or len(set(ids)) != len(ids):
            raise BadRequest(f"{where}: config lists a member twice: {config.get('voters')}, {config.get('learners')}")
        seen |= set(ids)
    if not config.get("voters"):
        raise BadRequest(f"{where}: config 'voters' must name at least one member")
    for key in ("addresses", "replacing"):
        value = config.get(key, {})
        if not isinstance(value, dict) or not all(isinstance(k, str) and (v is None or isinstance(v, str))
                                                  for k, v in value.items()):
            raise BadRequest(f"{where}: config {key!r} must map member ids to strings, got {value!r}")
    if not isinstance(config.get("cluster", ""), str):
        raise BadRequest(f"{where}: config 'cluster' must be a string, got {config['cluster']!r}")
    return config


def check_message(msg: object) -> dict:
    """Validate a message from the wire, so that ``step`` may trust it. Raises BadRequest naming the field."""
    if not isinstance(msg, dict):
        raise BadRequest(f"raft message: expected a JSON object, got {type(msg).__name__}")
    kind = msg.get("type")
    if kind not in _FIELDS:
        raise BadRequest(f"raft message: unknown type {kind!r}; expected one of {', '.join(sorted(_FIELDS))}")
    where = f"raft {kind} message"
    for name, field_kind in {"term": int, "from": str, "to": str, **_FIELDS[kind]}.items():
        _check_field(where, msg, name, field_kind)
    if kind == "AppendEntriesResp" and msg["reject"]:
        _check_field(where, msg, "hint", int)
        _check_field(where, msg, "hint_term", int)
    if kind == "InstallSnapshot":
        _check_field(where, msg["snapshot"], "index", int)
        _check_field(where, msg["snapshot"], "term", int)
        if msg["snapshot"].get("config") is not None:
            check_config(where, msg["snapshot"]["config"])
    for pos, e in enumerate(msg.get("entries") or []):
        at = f"{where}: entries[{pos}]"
        if not isinstance(e, dict):
            raise BadRequest(f"{at} must be a JSON object, got {e!r}")
        _check_field(at, e, "index", int)
        _check_field(at, e, "term", int)
        if e["index"] != msg["prev_log_index"] + 1 + pos:
            raise BadRequest(f"{at}: index {e['index']} breaks the run that starts after "
                             f"prev_log_index {msg['prev_log_index']}")
        if e.get("data") is not None and not isinstance(e["data"], dict):
            raise BadRequest(f"{at}: 'data' must be a JSON object or null, got {e['data']!r}")
        if e.get("config") is not None:
            check_config(at, e["config"])
    return msg


@dataclass(frozen=True)
class HardState:
    """What must be on disk before any message of the same Ready leaves, but a leader's early appends (§5.1 Figure 2,
    persistent state; ``Ready.early``)."""

    term: int = 0
    vote: str | None = None
    commit: int = 0


@dataclass(frozen=True)
class Snapshot:
    """The state machine as of ``index`` (whose entry had ``term``); ``data`` is the application's, JSON-able;
    ``config`` is the group's configuration in effect at ``index`` (None in stores written before membership)."""

    index: int
    term: int
    data: object = None
    config: dict | None = None

    def to_wire(self) -> dict:
        wire = {"index": self.index, "term": self.term, "data": self.data}
        if self.config is not None:
            wire["config"] = self.config
        return wire

    @classmethod
    def from_wire(cls, d: dict) -> Snapshot:
        return cls(int(d["index"]), int(d["term"]), d.get("data"), d.get("config"))


@dataclass
class StorageState:
    """What a node restarts from: ``raftstore.load()`` returns one."""

    hard_state: HardState = field(default_factory=HardState)
    snapshot: Snapshot | None = None
    entries: list[dict] = field(default_factory=list)


@dataclass(frozen=True)
class ReadState:
    """A linearizable read for ``ctx`` may be served once the state machine has applied ``index``."""

    index: int
    ctx: object


@dataclass
class Ready:
    """One batch of work for the driver, in the order: send ``early``, persist, send ``messages``, apply, then
    ``advance(ready)``.

    ``entries`` replace every stored entry from ``entries[0]["index"]`` on;
    ``snapshot`` (received from the leader) replaces the stored snapshot and the whole stored log.
    """

    hard_state: HardState | None
    entries: list[dict]
    snapshot: Snapshot | None
    messages: list[dict]
    committed_entries: list[dict]
    read_states: list[ReadState]
    early: list[dict] = field(default_factory=list)
    """Messages that may leave before this Ready is persisted (``messages`` leave after): a leader's appends
    and heartbeats while its term and vote are already on disk (thesis §10.2.1), so followers write while the
    leader does. The leader counts its own copy toward a commit only when a follower's answer is stepped,
    which a driver does after persisting this Ready."""


@dataclass
class Progress:
    match: int = 0
    next: int = 1
    state: str = PROBE
    paused: bool = False
    pending_snapshot: int = 0
    snapshot_wait: int = 0
    active: bool = False


@dataclass
class _Read:
    ctx: object
    index: int
    requester: str
    acks: set[str]


def _members(config: dict | None) -> set[str]:
    return set(config["voters"]) | set(config.get("learners", ())) if config else set()


class RaftNode:
    """One member of a Raft group.

    ``peers`` seeds a new group: its voters (this node is added), with ``seed_extra``'s keys. It counts only
    while the storage holds no configuration; afterwards the log's configuration rules. ``peers=[]`` starts a
    node that has no
    configuration: a server waiting to be added (or one whose state is gone, see the module docstring).
    """

    def __init__(self, node_id: str, peers: list[str], *, storage_state: StorageState | None = None,
                 rng: random.Random, election_ticks: tuple[int, int] = (10, 20), heartbeat_ticks: int = 1,
                 pre_vote: bool = True, check_quorum: bool = True, applied: int = 0, max_batch: int = 64,
                 seed_extra: dict | None = None):
        lo, hi = election_ticks
        if not 0 < heartbeat_ticks < lo < hi or max_batch < 1:
            raise ConfigError(f"raft settings: need 0 < heartbeat_ticks < election_ticks[0] < election_ticks[1] "
                              f"and max_batch >= 1, got heartbeat_ticks={heartbeat_ticks}, "
                              f"election_ticks={election_ticks}, max_batch={max_batch}")
        self.id = node_id
        self._seed = ({**(seed_extra or {}), "voters": sorted(set(peers) | {node_id}), "learners": []}
                      if peers else None)
        self.lost: str | None = None
        self._rng = rng
        self._election_lo, self._election_hi = lo, hi
        self.heartbeat_ticks = heartbeat_ticks
        self.pre_vote = pre_vote
        self.check_quorum = check_quorum
        self.max_batch = max_batch  # entries per AppendEntries

        state = storage_state or StorageState()
        snap = state.snapshot
        self._snapshot = snap
        self._snap_index = snap.index if snap else 0
        self._snap_term = snap.term if snap else 0
        self._log = [dict(e) for e in state.entries if e["index"] > self._snap_index]
        for offset, e in enumerate(self._log):
            if e["index"] != self._snap_index + 1 + offset:
                raise ConfigError(f"raft storage of {node_id}: log is not contiguous after index "
                                  f"{self._snap_index} (found entry {e['index']}); restore this peer's "
                                  "own raft store from its backup (a copy of another peer's carries that peer's vote), "
                                  "or replace the peer under a new id")
        self._refresh_config()
        hs = state.hard_state
        self.term, self.vote = hs.term, hs.vote
        self.commit = max(hs.commit, self._snap_index)
        if self.commit > self.last_index():
            raise ConfigError(f"raft storage of {node_id}: commit index {self.commit} is beyond the last entry "
                              f"{self.last_index()}; restore this peer's "
                              "own raft store from its backup (a copy of another peer's carries that peer's vote), "
                              "or replace the peer under a new id")
        self.applied = min(max(applied, self._snap_index), self.commit)
        self._unstable = self.last_index() + 1  # first entry not yet handed out for persistence
        self._persisted = HardState(self.term, self.vote, self.commit)
        self._pending_snapshot: Snapshot | None = None
        self._msgs: list[dict] = []
        self._outstanding = False
        self._read_states: list[ReadState] = []
        self._reads: list[_Read] = []
        self._reads_waiting: list[tuple[object, str]] = []  # until the leader commits in its term
        self._progress: dict[str, Progress] = {}
        self._votes: dict[str, bool] = {}
        self._transferee: str | None = None
        self._heartbeat_elapsed = 0
        self._become_follower(self.term, None)

    # ---- the log -------------------------------------------------------------------------------

    def last_index(self) -> int:
        return self._snap_index + len(self._log)

    def last_term(self) -> int:
        return self._log[-1]["term"] if self._log else self._snap_term

    def term_at(self, index: int) -> int | None:
        """The term of the entry at ``index``; None when compacted away or beyond the log."""
        if index == self._snap_index:
            return self._snap_term
        if index < self._snap_index or index > self.last_index():
            return None
        return self._log[index - self._snap_index - 1]["term"]

    def entries(self, lo: int, hi: int) -> list[dict]:
        """Entries with ``lo <= index < hi`` still in memory (not compacted)."""
        lo = max(lo, self._snap_index + 1)
        return self._log[lo - self._snap_index - 1:max(hi - self._snap_index - 1, 0)]

    def _append(self, entries: list[dict]) -> None:
        first = entries[0]["index"]
        if first <= self.commit:
            raise AssertionError(f"raft {self.id}: would overwrite committed entry {first} (commit {self.commit})")
        dropped = self._log[first - self._snap_index - 1:]
        del self._log[first - self._snap_index - 1:]
        self._log.extend(dict(e) for e in entries)
        self._unstable = min(self._unstable, first)
        if any(e.get("config") is not None for e in dropped + entries):
            self._refresh_config()

    # ---- membership (thesis §4) ------------------------------------------------------------------

    def _config_at(self, index: int) -> tuple[dict | None, int]:
        """The latest configuration in the log at or before ``index``, and the index of its entry
        (the snapshot's index when it comes from the snapshot, -1 when from the seed)."""
        for e in reversed(self.entries(self._snap_index + 1, index + 1)):
            if e.get("config") is not None:
                return e["config"], e["index"]
        if self._snapshot is not None and self._snapshot.config is not None:
            return self._snapshot.config, self._snap_index
        return self._seed, -1

    def _refresh_config(self) -> None:
        """§4.1: the configuration in effect is the latest in the log, whether committed or not."""
        config, self._config_index = self._config_at(self.last_index())
        self.config = None if config is None else {**config, "voters": sorted(config["voters"]),
                                                   "learners": sorted(config.get("learners", []))}
        self.voters = self.config["voters"] if config else []
        self.learners = self.config["learners"] if config else []
        if getattr(self, "role", None) == LEADER:
            members = _members(self.config) - {self.id}
            for gone in set(self._progress) - members:
                del self._progress[gone]
            for new in sorted(members - set(self._progress)):
                self._progress[new] = Progress(next=self.last_index() + 1)

    def _change_pending(self) -> str | None:
        """Why the leader may not propose a configuration change now (None: it may)."""
        if self._config_index > self.commit:
            return f"the change at index {self._config_index} has not committed yet"
        if self.term_at(self.commit) != self.term:
            # The fix for the single-server change bug (raft-dev, 2015): an earlier leader's uncommitted
            # change may still win elsewhere, unless an entry of this term commits first.
            return "this leader has not yet committed an entry of its term"
        return None

    def _propose_config(self, config: dict) -> int:
        if self.role != LEADER:
            raise NotLeader(self.leader, f"raft node {self.id} is not the leader; only the leader "
                            f"({self.leader or 'unknown'}) changes the membership")
        why = self._change_pending()
        if why is not None:
            raise Unavailable(f"a membership change must wait: {why}; retry in a moment")
        config = {k: v for k, v in config.items() if v or k in ("voters", "learners")}
        index = self.last_index() + 1
        self._append([{"index": index, "term": self.term, "data": None, "config": config}])
        self._maybe_commit()
        self._broadcast_append()
        return index

    def add_learner(self, node_id: str, address: object = None, *, replaces: str | None = None) -> int:
        """Add ``node_id`` as a learner (§4.2.1); the leader promotes it to voter once it has caught up.

        ``address`` is kept in the configuration's ``addresses`` for the application. With ``replaces``,
        the leader removes that voter once ``node_id`` is a voter: two single-server steps (§4.1)."""
        if node_id in _members(self.config):
            raise BadRequest(f"{node_id!r} is already a member ({'voter' if node_id in self.voters else 'learner'});"
                             " give a new id (a member that was removed never comes back under its old id)")
        if replaces is not None and replaces not in self.voters:
            raise BadRequest(f"cannot replace {replaces!r}: not a voter of this group ({', '.join(self.voters)})")
        config = dict(self.config)
        config["learners"] = sorted(self.learners + [node_id])
        config["addresses"] = {**config.get("addresses", {}), node_id: address}
        if replaces is not None:
            config["replacing"] = {**config.get("replacing", {}), node_id: replaces}
        return self._propose_config(config)

    def remove_member(self, node_id: str) -> int:
        """Remove a voter or learner (§4.1); a leader that removes itself steps down once it commits (§4.2.2)."""
        if node_id not in _members(self.config):
            raise NotFound(f"{node_id!r} is not a member of this group (voters {', '.join(self.voters)}; "
                           f"learners {', '.join(self.learners) or 'none'})")
        if self.voters == [node_id]:
            raise BadRequest(f"cannot remove {node_id!r}: it is the group's only voter")
        config = dict(self.config)
        config["voters"] = [v for v in self.voters if v != node_id]
        config["learners"] = [v for v in self.learners if v != node_id]
        config["addresses"] = {k: v for k, v in config.get("addresses", {}).items() if k != node_id}
        config["replacing"] = {k: v for k, v in config.get("replacing", {}).items() if node_id not in (k, v)}
        return self._propose_config(config)

    def _advance_membership(self) -> None:
        """Leader: the next automatic step once the last change committed: promote a caught-up learner,
        finish a replacement, or step down after removing itself."""
        if self.role != LEADER or self._change_pending() is not None:
            return
        if self.id not in self.voters:
            heir = max(self.voters, key=lambda v: self._progress[v].match)
            if self._progress[heir].match == self.last_index():
                self._send({"type": "TimeoutNow", "to": heir})
            self._become_follower(self.term, None)
            return
        for learner in self.learners:
            if self._progress[learner].match >= self.commit:
                config = dict(self.config)
                config["voters"] = sorted(self.voters + [learner])
                config["learners"] = [v for v in self.learners if v != learner]
                self._propose_config(config)
                return
        for new, old in sorted(self.config.get("replacing", {}).items()):
            if new in self.voters and old in self.voters:
                self.remove_member(old)
                return

    def _become_lost(self, why: str) -> None:
        self.lost = (f"raft node {self.id} has lost the raft state it once acknowledged ({why}); it will not vote "
                     f"or campaign: remove it and add it back under a new id")
        self._become_follower(self.term, None)

    def _up_to_date(self, last_index: int, last_term: int) -> bool:
        """§5.4.1: a vote goes only to a candidate whose log is at least as up-to-date as ours."""
        return (last_term, last_index) >= (self.last_term(), self.last_index())

    def _find_conflict_by_term(self, index: int, term: int) -> int:
        """The largest index <= ``index`` whose term is <= ``term``: where the two logs may still match."""
        while index > self._snap_index and self.term_at(index) > term:
            index -= 1
        return index

    # ---- roles -----------------------------------------------------------------------------------

    def _quorum(self) -> int:
        return len(self.voters) // 2 + 1

    def _can_campaign(self) -> bool:
        """Voters campaign; so does a voter whose removal is not committed yet, since it may still be needed
        to commit it (thesis §4.2.2; its own vote then does not count). Learners and lost nodes never do."""
        if self.lost is not None:
            return False
        if self.id in self.voters:
            return True
        return self._config_index > self.commit and self.id in (self._config_at(self._config_index - 1)[0]
                                                                or {"voters": ()})["voters"]

    def _reset(self, term: int) -> None:
        if term != self.term:
            self.term, self.vote = term, None
        self.leader: str | None = None
        self._elapsed = 0
        self._heartbeat_elapsed = 0
        self._timeout = self._rng.randrange(self._election_lo, self._election_hi)
        self._votes = {}
        self._transferee = None
        self._progress = {}
        self._reads, self._reads_waiting = [], []

    def _become_follower(self, term: int, leader: str | None) -> None:
        self._reset(term)
        self.role = FOLLOWER
        self.leader = leader

    def _become_leader(self) -> None:
        self._reset(self.term)
        self.role = LEADER
        self.leader = self.id
        self._progress = {p: Progress(next=self.last_index() + 1)
                          for p in sorted(_members(self.config) - {self.id})}
        # §5.4.2 / §8: a no-op opens the term; entries of earlier terms commit only underneath it. A seeded
        # configuration that is in no entry yet rides on it, so the log holds the group's membership.
        opening = {"index": self.last_index() + 1, "term": self.term, "data": None}
        if self._config_index < 0:
            opening["config"] = self.config
        self._append([opening])
        self._maybe_commit()
        self._broadcast_append()

    def _campaign(self, kind: str) -> None:
        """§5.2 election; ``kind`` is "pre" (thesis §9.6 PreVote), "vote", or "transfer" (thesis §3.10)."""
        if not self._can_campaign():
            return  # learners, removed and lost servers never campaign (§4.2.1, §4.2.2)
        if kind == "pre":
            self._reset(self.term)
            self.role = PRE_CANDIDATE
            term = self.term + 1
        else:
            self._reset(self.term + 1)
            self.role = CANDIDATE
            self.vote = self.id
            term = self.term
        self._votes = {self.id: True}
        if self._poll() == "won":
            self._campaign("vote") if kind == "pre" else self._become_leader()
            return
        for peer in self.voters:
            if peer != self.id:
                self._send({"type": "RequestVote", "to": peer, "term": term, "pre_vote": kind == "pre",
                            "transfer": kind == "transfer", "last_log_index": self.last_index(),
                            "last_log_term": self.last_term()})

    def _poll(self) -> str | None:
        granted = sum(v for p, v in self._votes.items() if p in self.voters)
        refused = sum(not v for p, v in self._votes.items() if p in self.voters)
        if granted >= self._quorum():
            return "won"
        if refused > len(self.voters) - self._quorum():
            return "lost"
        return None

    # ---- the driver's interface --------------------------------------------------------------

    def tick(self) -> None:
        """Advance logical time by one tick (the driver calls this every ~100 ms)."""
        if self.role == LEADER:
            self._tick_leader()
            return
        self._elapsed += 1
        if self._elapsed >= self._timeout and self._can_campaign():
            self._campaign("pre" if self.pre_vote else "vote")

    def campaign(self) -> None:
        """Start an election now instead of waiting for the timeout (a group of one calls this at start)."""
        if self.role != LEADER:
            self._campaign("pre" if self.pre_vote else "vote")

    def propose(self, data: dict) -> int:
        """Append a command to the leader's log; returns its index.

        Raises NotLeader whose ``leader_url`` holds the leader's node id (or None);
        the driver maps it to the peer's URL.

        The command was applied iff the entry applied at that index carries the same
        data (a deposed leader's entry may be replaced by another): tag commands with a
        request id to recognise them.
        """
        return self.propose_many([data])[0]

    def propose_many(self, datas: list[dict]) -> list[int]:
        """``propose`` for several commands at once: appended together, sent in one AppendEntries per
        follower (up to ``max_batch`` entries) instead of one per command. Returns their indexes."""
        if self.role != LEADER:
            raise NotLeader(self.leader, f"raft node {self.id} is not the leader; "
                            f"the leader is {self.leader or 'unknown (election in progress)'}")
        if self._transferee is not None:
            raise NotLeader(self._transferee, f"raft node {self.id} is handing leadership to "
                            f"{self._transferee}; retry there")
        first = self.last_index() + 1
        self._append([{"index": first + i, "term": self.term, "data": data} for i, data in enumerate(datas)])
        self._maybe_commit()
        self._broadcast_append()
        return list(range(first, first + len(datas)))

    def read_index(self, ctx: object) -> None:
        """Ask for a linearizable read (§8, thesis §6.4); a ReadState with ``ctx`` comes out of a later Ready.

        ``ctx`` must be unique and hashable (a request id). A follower forwards to the
        leader. Reads pending when leadership changes are dropped: the caller times out.
        """
        if self.role == LEADER:
            self._leader_read(ctx, self.id)
        elif self.leader is not None:
            self._send({"type": "ReadIndex", "to": self.leader, "ctx": ctx})
        else:
            raise NotLeader(None, f"raft node {self.id} knows no leader (election in progress); retry shortly")

    def transfer_leadership(self, to: str) -> None:
        """Thesis §3.10: bring ``to`` up to date, then tell it to start an election at once (TimeoutNow)."""
        if self.role != LEADER:
            raise NotLeader(self.leader, f"raft node {self.id} is not the leader; only the leader "
                            f"({self.leader or 'unknown'}) can transfer leadership")
        if to not in self.voters:
            raise BadRequest(f"cannot transfer leadership to {to!r}: not a voter of this group "
                             f"({', '.join(self.voters)})")
        if to == self.id:
            return
        self._transferee = to
        self._elapsed = 0  # the transfer is abandoned if it has not happened within an election timeout
        if self._progress[to].match == self.last_index():
            self._send({"type": "TimeoutNow", "to": to})
        else:
            self._send_append(to)

    def compact(self, index: int, data: object) -> Snapshot:
        """§7: forget entries up to ``index``, which the application has applied and captured in ``data``."""
        if index > self.applied:
            raise ValueError(f"cannot compact the raft log to {index}: only {self.applied} is applied")
        if index <= self._snap_index:
            raise ValueError(f"cannot compact the raft log to {index}: already compacted to {self._snap_index}")
        term = self.term_at(index)
        config = self._config_at(index)[0]
        self._log = self._log[index - self._snap_index:]
        self._snap_index, self._snap_term = index, term
        self._snapshot = Snapshot(index, term, data, config)
        return self._snapshot

    def ready(self) -> Ready | None:
        """What the driver must persist, send and apply now; None when there is nothing."""
        if self._outstanding:
            raise RuntimeError("raft: call advance() with the previous Ready before asking for another")
        hs = HardState(self.term, self.vote, self.commit)
        first_commit = max(self.applied, self._pending_snapshot.index if self._pending_snapshot else 0) + 1
        early, late = [], self._msgs
        if self.role == LEADER and (hs.term, hs.vote) == (self._persisted.term, self._persisted.vote):
            early = [m for m in late if m["type"] in _EARLY_TYPES]
            late = [m for m in late if m["type"] not in _EARLY_TYPES] if early else late
        rd = Ready(
            hard_state=hs if hs != self._persisted else None,
            entries=[dict(e) for e in self.entries(self._unstable, self.last_index() + 1)],
            snapshot=self._pending_snapshot,
            messages=late,
            committed_entries=[dict(e) for e in self.entries(first_commit, self.commit + 1)],
            read_states=self._read_states,
            early=early,
        )
        if not (rd.hard_state or rd.entries or rd.snapshot or rd.messages or rd.early or rd.committed_entries
                or rd.read_states):
            return None
        self._msgs, self._read_states = [], []
        self._outstanding = True
        return rd

    def advance(self, rd: Ready) -> None:
        """The driver persisted, sent and applied ``rd``."""
        self._outstanding = False
        if rd.hard_state is not None:
            self._persisted = rd.hard_state
        if rd.snapshot is not None:
            self.applied = max(self.applied, rd.snapshot.index)
            if self._pending_snapshot is rd.snapshot:
                self._pending_snapshot = None
        if rd.entries:
            last = rd.entries[-1]
            if self.term_at(last["index"]) == last["term"]:
                self._unstable = max(self._unstable, last["index"] + 1)
        if rd.committed_entries:
            self.applied = max(self.applied, rd.committed_entries[-1]["index"])

    def status(self) -> dict:
        st = {"id": self.id, "role": self.role, "term": self.term, "vote": self.vote, "leader": self.leader,
              "commit": self.commit, "applied": self.applied, "last_index": self.last_index(),
              "snapshot_index": self._snap_index, "voters": list(self.voters), "learners": list(self.learners),
              "config": self.config, "config_index": self._config_index, "lost": self.lost}
        if self.role == LEADER:
            st["progress"] = {p: {"match": pr.match, "next": pr.next, "state": pr.state, "active": pr.active}
                              for p, pr in sorted(self._progress.items())}
            st["transferee"] = self._transferee
        return st

    # ---- messages in -------------------------------------------------------------------------

    def step(self, msg: dict) -> None:
        """Handle one message from a peer (``check_message`` it first when it came off the wire).

        Messages not meant for this member of the group are ignored.
        """
        kind, term, sender = msg.get("type"), msg.get("term"), msg.get("from")
        if msg.get("to") != self.id or sender == self.id or kind not in MESSAGE_TYPES or self.lost is not None:
            return
        # Senders outside our configuration count too (thesis §4.1, §4.2.3): a server added by an entry we have
        # not received yet may lead or need our vote. PreVote and the leader's lease keep removed servers from
        # disrupting (§4.2.3). The driver authenticates who may send at all.
        if term > self.term:
            if kind == "RequestVote" and not msg.get("transfer"):
                # Thesis §4.2.3 / §6.2: while a leader is heard from, ignore those who would depose it.
                if self.check_quorum and self.leader is not None and self._elapsed < self._election_lo:
                    return
            if kind == "RequestVote" and msg["pre_vote"]:
                pass  # a pre-vote changes no term (thesis §9.6)
            elif kind == "RequestVoteResp" and msg["pre_vote"] and not msg["reject"]:
                pass  # a granted pre-vote carries the term we would campaign for
            else:
                self._become_follower(term, sender if kind in _FROM_LEADER else None)
        elif term < self.term:
            if (self.check_quorum or self.pre_vote) and kind in ("AppendEntries", "Heartbeat"):
                # A deposed leader learns the new term from us and steps down (thesis §6.2, §9.6).
                self._send({"type": "AppendEntriesResp", "to": sender, "reject": True, "index": 0, "hint": 0,
                            "hint_term": 0})
            elif kind == "RequestVote" and msg["pre_vote"]:
                self._send({"type": "RequestVoteResp", "to": sender, "reject": True, "pre_vote": True})
            return

        if kind == "RequestVote":
            self._on_vote_request(msg)
        elif self.role == LEADER:
            self._step_leader(msg)
        elif self.role in (CANDIDATE, PRE_CANDIDATE):
            self._step_candidate(msg)
        else:
            self._step_follower(msg)

    def _on_vote_request(self, msg: dict) -> None:
        sender, pre = msg["from"], msg["pre_vote"]
        can_vote = (self.vote == sender or (self.vote is None and self.leader is None)
                    or (pre and msg["term"] > self.term)) and (self._can_campaign() or self.id in self.learners)
        if can_vote and self._up_to_date(msg["last_log_index"], msg["last_log_term"]):
            self._send({"type": "RequestVoteResp", "to": sender, "term": msg["term"], "reject": False,
                        "pre_vote": pre})
            if not pre:
                self._elapsed = 0
                self.vote = sender
        else:
            self._send({"type": "RequestVoteResp", "to": sender, "reject": True, "pre_vote": pre})

    def _step_candidate(self, msg: dict) -> None:
        kind = msg["type"]
        if kind in _FROM_LEADER:
            self._become_follower(self.term, msg["from"])
            self._step_follower(msg)
        elif kind == "RequestVoteResp" and msg["pre_vote"] == (self.role == PRE_CANDIDATE):
            if self.role == PRE_CANDIDATE and not msg["reject"] and msg["term"] != self.term + 1:
                return  # a grant from an earlier pre-vote round
            self._votes[msg["from"]] = not msg["reject"]
            result = self._poll()
            if result == "won":
                self._campaign("vote") if self.role == PRE_CANDIDATE else self._become_leader()
            elif result == "lost":
                self._become_follower(self.term, None)

    def _step_follower(self, msg: dict) -> None:
        kind, sender = msg["type"], msg["from"]
        if kind in _FROM_LEADER:
            self._elapsed = 0
            self.leader = sender
            if self.config is None and msg.get("voter") is True:
                return self._become_lost(f"leader {sender} counts it as a voter, but it has no log")
        if kind == "AppendEntries":
            self._on_append(msg)
        elif kind == "Heartbeat":
            if msg["commit"] > self.last_index():
                # The leader only sends what we acknowledged: we have forgotten it.
                return self._become_lost(f"leader {sender} counts it as holding entry {msg['commit']}, "
                                         f"but its log ends at {self.last_index()}")
            self._commit_to(msg["commit"])
            self._send({"type": "HeartbeatResp", "to": sender, "ctx": msg.get("ctx")})
        elif kind == "InstallSnapshot":
            self._on_snapshot(msg)
        elif kind == "TimeoutNow":
            self._campaign("transfer")
        elif kind == "ReadIndexResp":
            self._read_states.append(ReadState(msg["index"], msg["ctx"]))

    def _commit_to(self, index: int) -> None:
        if index > self.commit:
            self.commit = index

    def _on_append(self, msg: dict) -> None:
        """§5.3: accept entries only where our log matches at ``prev_log_index``; drop conflicts after it."""
        prev, sender = msg["prev_log_index"], msg["from"]
        if prev < self.commit:
            self._send({"type": "AppendEntriesResp", "to": sender, "reject": False, "index": self.commit})
            return
        if self.term_at(prev) != msg["prev_log_term"]:
            hint = self._find_conflict_by_term(min(prev, self.last_index()), msg["prev_log_term"])
            self._send({"type": "AppendEntriesResp", "to": sender, "reject": True, "index": prev, "hint": hint,
                        "hint_term": self.term_at(hint) or 0})
            return
        entries = msg["entries"]
        if self.config is None and self.id in next((e["config"]["voters"] for e in reversed(entries)
                                                    if e.get("config")), ()):
            return self._become_lost(f"it is a voter in the configuration of entry {entries[-1]['index']} that "
                                     "it receives with no log of its own")
        for pos, e in enumerate(entries):
            if self.term_at(e["index"]) != e["term"]:
                self._append(entries[pos:])
                break
        last_new = prev + len(entries)
        self._commit_to(min(msg["commit"], last_new))
        self._send({"type": "AppendEntriesResp", "to": sender, "reject": False, "index": last_new})

    def _on_snapshot(self, msg: dict) -> None:
        """§7: a snapshot replaces the log unless the log already holds its last entry."""
        snap = Snapshot.from_wire(msg["snapshot"])
        if self.config is None and snap.config is not None and self.id in snap.config["voters"]:
            return self._become_lost(f"it is a voter in the snapshot at {snap.index} it receives with no log "
                                     "of its own")
        if snap.index > self.commit:
            if self.term_at(snap.index) == snap.term:
                self._commit_to(snap.index)
            else:
                self._snap_index, self._snap_term = snap.index, snap.term
                self._log = []
                self._snapshot = self._pending_snapshot = snap
                self.commit = snap.index
                self._unstable = snap.index + 1
                self._refresh_config()
        self._send({"type": "InstallSnapshotResp", "to": msg["from"], "index": self.commit})

    # ---- the leader --------------------------------------------------------------------------

    def _tick_leader(self) -> None:
        self._heartbeat_elapsed += 1
        self._elapsed += 1
        for pr in self._progress.values():
            if pr.state == SNAPSHOT:
                pr.snapshot_wait += 1
        if self._elapsed >= self._election_lo:
            self._elapsed = 0
            if self.check_quorum:
                active = sum(v == self.id or self._progress[v].active for v in self.voters)
                for pr in self._progress.values():
                    pr.active = False
                if active < self._quorum():
                    self._become_follower(self.term, None)  # thesis §6.2 CheckQuorum
                    return
            self._transferee = None
        if self._heartbeat_elapsed >= self.heartbeat_ticks:
            self._heartbeat_elapsed = 0
            self._broadcast_heartbeat(self._reads[-1].ctx if self._reads else None)

    def _step_leader(self, msg: dict) -> None:
        kind, sender = msg["type"], msg["from"]
        pr = self._progress.get(sender)
        if pr is None:
            return  # not (or no longer) a member
        self._step_progress(msg, sender, pr)
        self._advance_membership()

    def _step_progress(self, msg: dict, sender: str, pr: Progress) -> None:
        kind = msg["type"]
        if kind in ("AppendEntriesResp", "InstallSnapshotResp"):
            pr.active = True
            if msg.get("reject"):
                self._on_append_reject(sender, pr, msg)
            elif msg["index"] > pr.match:
                was_paused = pr.state != REPLICATE
                pr.match = msg["index"]
                pr.next = max(pr.next, pr.match + 1)
                pr.paused = False
                if pr.state == PROBE or (pr.state == SNAPSHOT and pr.match >= pr.pending_snapshot):
                    pr.state, pr.next = REPLICATE, pr.match + 1
                if self._maybe_commit():
                    self._broadcast_append()
                elif was_paused or pr.match < self.last_index():
                    # was_paused: the commit index may have moved while this follower was skipped
                    self._send_append(sender, allow_empty=was_paused)
                if sender == self._transferee and pr.match == self.last_index():
                    self._send({"type": "TimeoutNow", "to": sender})
        elif kind == "HeartbeatResp":
            pr.active = True
            pr.paused = False
            if pr.state == SNAPSHOT and pr.snapshot_wait >= self._election_lo:
                pr.state, pr.next = PROBE, pr.match + 1  # the snapshot was likely lost: send it again
            if pr.match < self.last_index():
                self._send_append(sender)
            if msg.get("ctx") is not None:
                self._read_ack(msg["ctx"], sender)
        elif kind == "ReadIndex":
            self._leader_read(msg["ctx"], sender)

    def _on_append_reject(self, peer: str, pr: Progress, msg: dict) -> None:
        rejected = msg["index"]
        if pr.state == SNAPSHOT:
            return
        if pr.state == REPLICATE:
            if rejected <= pr.match:
                return  # stale
        elif rejected != pr.next - 1:
            return  # stale: not the probe in flight
        hint = msg["hint"]
        if msg.get("hint_term"):
            hint = self._find_conflict_by_term(hint, msg["hint_term"])
        pr.next = max(min(rejected, hint + 1), pr.match + 1)
        pr.state, pr.paused = PROBE, False
        self._send_append(peer)

    def _maybe_commit(self) -> bool:
        """§5.3/§5.4.2: commit what a majority holds, but count replicas only for entries of this term."""
        matches = sorted((self.last_index() if v == self.id else self._progress[v].match for v in self.voters),
                         reverse=True)
        index = matches[self._quorum() - 1]
        if index <= self.commit or self.term_at(index) != self.term:
            return False
        self.commit = index
        waiting, self._reads_waiting = self._reads_waiting, []
        for ctx, requester in waiting:
            self._leader_read(ctx, requester)
        return True

    def _send(self, msg: dict) -> None:
        msg.setdefault("term", self.term)
        msg["from"] = self.id
        self._msgs.append(msg)

    def _send_append(self, peer: str, allow_empty: bool = True) -> None:
        pr = self._progress[peer]
        if pr.state == SNAPSHOT or (pr.state == PROBE and pr.paused):
            return
        prev = pr.next - 1
        prev_term = self.term_at(prev)
        if prev_term is None:  # compacted: only a snapshot can bring this follower up (§7)
            self._send({"type": "InstallSnapshot", "to": peer, "snapshot": self._snapshot.to_wire(),
                        "voter": peer in self.voters})
            pr.state, pr.pending_snapshot, pr.snapshot_wait = SNAPSHOT, self._snap_index, 0
            return
        entries = self.entries(pr.next, min(pr.next + self.max_batch, self.last_index() + 1))
        if not entries and not allow_empty:
            return
        self._send({"type": "AppendEntries", "to": peer, "prev_log_index": prev, "prev_log_term": prev_term,
                    "entries": [dict(e) for e in entries], "commit": self.commit, "voter": peer in self.voters})
        if pr.state == REPLICATE and entries:
            pr.next = entries[-1]["index"] + 1
        elif pr.state == PROBE:
            pr.paused = True

    def _broadcast_append(self) -> None:
        for peer in self._progress:
            self._send_append(peer)

    def _broadcast_heartbeat(self, ctx: object) -> None:
        for peer, pr in self._progress.items():
            self._send({"type": "Heartbeat", "to": peer, "commit": min(pr.match, self.commit), "ctx": ctx,
                        "voter": peer in self.voters})

    def _leader_read(self, ctx: object, requester: str) -> None:
        if self.term_at(self.commit) != self.term:
            self._reads_waiting.append((ctx, requester))  # thesis §6.4 step 1: commit in this term first
            return
        read = _Read(ctx, self.commit, requester, {self.id} & set(self.voters))
        self._reads.append(read)
        if len(read.acks) >= self._quorum():
            self._release_reads(read)
        else:
            self._broadcast_heartbeat(ctx)

    def _read_ack(self, ctx: object, peer: str) -> None:
        for read in self._reads:
            if read.ctx == ctx:
                if peer in self.voters:
                    read.acks.add(peer)
                if len(read.acks) >= self._quorum():
                    self._release_reads(read)
                return

    def _release_reads(self, upto: _Read) -> None:
        """A quorum confirmed leadership after ``upto`` and every earlier read was asked: all may proceed."""
        while self._reads:
            read = self._reads.pop(0)
            if read.requester == self.id:
                self._read_states.append(ReadState(read.index, read.ctx))
            else:
                self._send({"type": "ReadIndexResp", "to": read.requester, "ctx": read.ctx, "index": read.index})
            if read is upto:
                return
