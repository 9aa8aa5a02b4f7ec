"""Replication of the queue over a Raft group: the driver of ``raft.RaftNode`` inside ``serve``.

Shell. Owns the Raft driver thread (ticks, inbound messages, a leader's early
appends -> persist -> send -> apply -> answer), one sender thread per peer (JSON batches over kept-alive
HTTP to ``POST /v1/raft/messages``), proposals and their waiters, ReadIndex
barriers, log compaction and the install of a snapshot downloaded from the
leader. Never decides a job transition: committed commands go to
``JobStore.execute_batch`` in log order, with the applied index recorded in the
same transaction, so every peer applies every entry exactly once.

Durability. The Raft log (``raft.sqlite3``, synchronous=FULL) is the durable
record of every acknowledged command: an entry is acknowledged only once a
majority has fsynced it. The queue is a function of that log, so under Raft
``queue.sqlite3`` runs with synchronous=NORMAL (one fsync per Ready instead of
two; WAL keeps each commit atomic, but a power cut may lose the latest ones).
That loses nothing as long as the log still holds every entry after the
queue's *durable* applied index: ``raft_applied`` is written in the same
transaction as the commands, so after a power cut the queue reopens at some
earlier applied index with exactly the state it had there, and the driver
re-applies the rest from the log (applying is deterministic: ``now`` and the
lease come from the entry). Hence the one rule: before compacting the log up to
``i``, fsync the queue's files (``_sync_queue``), so the queue durably stands
at or after ``i``. A kill -9 loses nothing either way (the OS keeps what was
written).

Membership. ``--peer`` seeds a new group only (the first leader writes it into the
log, with each member's URL and the cluster id); afterwards the configuration in
the log rules: ``peers`` follows it after every Ready, senders start and stop with
it, and ``change_membership`` proposes a change and waits for it to commit. A peer
started with ``join=True`` and an empty store waits to be added; one whose raft
store is empty while its queue has applied entries lost its raft state: it starts
without a configuration, so it never votes, and says how to come back.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import queue
import random
import sqlite3
import tempfile
import threading
import time
import urllib.parse
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path

from cis490fleet import commands, edge_json, errors, peer_post, raft, signing, tokens
from cis490fleet.copy_fetcher import CopyFetcher
from cis490fleet.raftstore import SqliteRaftStore

log = logging.getLogger(__name__)

MESSAGES_PATH = "/v1/raft/messages"
SNAPSHOT_PATH = "/v1/raft/snapshot"
ARTIFACT_PATH = "/v1/raft/artifact/"
RECORD_OPS = frozenset({"record_artifact", "record_checkpoint", "record_log"})
CHECKPOINT = "checkpoint"  # the kind of a copied file that is a checkpoint, not a model bundle
LOG = "log"  # the kind of a copied file that is an attempt's train.log (gzip)
PROPOSE_TIMEOUT_S = 20.0
READ_TIMEOUT_S = 5.0
SEND_TIMEOUT_S = 5.0
# Bytes of log entries queued for one peer and not yet posted: beyond, further entries for it are not queued
# (Raft sends them again once the peer has caught up), so a slow or unreachable peer costs bounded memory and
# no resend storm.
MAX_INFLIGHT_BYTES = 8 << 20
SNAPSHOT_EVERY = 10_000
# Most entries the leader holds uncommitted: beyond, a proposal is refused (503) instead of piling up in memory
# and on disk while no quorum answers.
MAX_UNCOMMITTED = 4096
# A sender asks with this header for the receiver's answers (the messages it produces for the sender while
# stepping the batch) in the POST's response; without it they travel on the receiver's own connection.
ANSWER_HEADER = "x-raft-answer"
# The replies that may travel in a response. A leader's own messages (appends, heartbeats, snapshots) always
# leave through its sender, within the peer's byte budget (``_Sender.offer``).
ANSWER_TYPES = frozenset({"AppendEntriesResp", "HeartbeatResp", "RequestVoteResp", "InstallSnapshotResp",
                          "ReadIndexResp"})
# What an answer is signed as (with the cluster key): never an HTTP method, so no signed answer passes for a
# request; its target names the request's nonce, so it answers that request only.
ANSWER_METHOD = "ANSWER"
# How long a receiver holds a POST for its answers; beyond, they leave on its own connection.
ANSWER_WAIT_S = 1.0


def cluster_id(peers: dict[str, str]) -> str:
    """The group's identity: a hash of its member ids (URLs may differ per peer, e.g. behind proxies)."""
    return hashlib.sha256(json.dumps(sorted(peers)).encode()).hexdigest()[:16]


def parse_peer(value: str) -> tuple[str, str]:
    """``ID=URL`` -> (id, url) for ``serve --peer``."""
    from cis490fleet.model import HOST_ID_RE

    pid, sep, url = value.partition("=")
    pid, url = pid.strip(), url.strip().rstrip("/")
    parts = urllib.parse.urlsplit(url)
    if not sep or not HOST_ID_RE.match(pid) or parts.scheme not in ("http", "https") or not parts.hostname:
        raise errors.ConfigError(f"--peer {value!r} is not ID=URL; e.g. --peer a=https://coord-a.lab:8445 "
                                 "(repeat it for every member, this one included)")
    return pid, url


def _announced_url(value: object) -> str | None:
    """The URL a sender announces in its batches (how a peer that was just added reaches the leader)."""
    if not isinstance(value, str) or len(value) > 300:
        return None
    parts = urllib.parse.urlsplit(value)
    return value if parts.scheme in ("http", "https") and parts.hostname else None


def answer_target(request_nonce: str | None) -> str:
    return f"{MESSAGES_PATH}?answers={request_nonce or ''}"


class _Answer:
    """The replies (``ANSWER_TYPES``) a receiver produces for the sender of one POST, handed to the waiting handler once the
    Ready that produced them is persisted; or to the receiver's own sender when the handler stopped waiting."""

    def __init__(self):
        self.messages: list[dict] = []
        self.done = threading.Event()
        self.lock = threading.Lock()
        self.abandoned = False


def _connect(url: str, ssl_context, timeout: float) -> http.client.HTTPConnection:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "https":
        return http.client.HTTPSConnection(parts.hostname, parts.port or 443, timeout=timeout, context=ssl_context)
    return http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=timeout)


class _Sender:
    """One peer's outbox: a thread posting batches of messages on a kept-alive connection.

    Raft tolerates lost messages, so a failed post drops its batch (after a short pause). Flow control:
    ``offer`` refuses a message carrying entries while ``queued_bytes`` (entries waiting here, estimated
    from the sizes posted so far) would pass the owner's ``max_inflight_bytes``; messages without entries
    (heartbeats, votes, answers) always go."""

    def __init__(self, owner: "Replicator", peer: str, url: str):
        self.owner, self.peer, self.url = owner, peer, url
        self.box: queue.SimpleQueue = queue.SimpleQueue()
        self.queued_bytes = 0
        self.held_back = 0  # messages with entries that flow control did not queue
        self.entry_bytes = 256.0  # running estimate of one entry's encoded size
        self._lock = threading.Lock()
        self.conn = peer_post.PeerConnection(url, owner.ssl_context, SEND_TIMEOUT_S)
        self.thread = threading.Thread(target=self._run, name=f"raft-send-{peer}", daemon=True)
        self.failing = False
        self.thread.start()

    def offer(self, msg: dict) -> bool:
        """Queue ``msg`` unless it carries entries and the peer already has its fill of them waiting."""
        entries = len(msg.get("entries") or ())
        cost = int(entries * self.entry_bytes)
        with self._lock:
            if entries and self.queued_bytes and self.queued_bytes + cost > self.owner.max_inflight_bytes:
                self.held_back += 1
                return False
            self.queued_bytes += cost
        self.box.put((msg, cost))
        return True

    def _run(self) -> None:
        while True:
            item = self.box.get()
            if item is None:
                break
            batch = [item]
            while len(batch) < 256:
                try:
                    item = self.box.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    self._send([m for m, _ in batch], sum(c for _, c in batch))
                    return
                batch.append(item)
            self._send([m for m, _ in batch], sum(c for _, c in batch))
        self.conn.close()

    def _send(self, messages: list[dict], cost: int) -> None:
        try:
            size = self._post(messages)
        finally:
            with self._lock:
                self.queued_bytes -= cost
        entries = sum(len(m.get("entries") or ()) for m in messages)
        if entries and size:
            self.entry_bytes = 0.8 * self.entry_bytes + 0.2 * (size / entries)

    def _post(self, messages: list[dict]) -> int:
        """Post one batch and step the answers that come back in the response; returns the batch's size in
        bytes."""
        body = json.dumps({"cluster": self.owner.cluster or self.owner.joining_cluster, "from": self.owner.node_id,
                           "to": self.peer,
                           "url": self.owner.urls.get(self.owner.node_id), "messages": messages},
                          separators=(",", ":")).encode()
        for attempt in (1, 2):
            try:
                headers = self.owner.peer_headers("POST", MESSAGES_PATH, signing.body_sha256(body), {
                    "content-type": "application/json", "x-forwarded-by": self.owner.node_id,
                    ANSWER_HEADER: "inline"})
                resp = self.conn.post(MESSAGES_PATH, body, headers)
                if resp.status != 200:
                    log.warning("raft peer %s refused messages: %s %s", self.peer, resp.status, resp.body[:200])
                    self.conn.close()
                    self.failing = True
                    return len(body)
                if self.failing:
                    log.info("raft peer %s is reachable again", self.peer)
                self.failing = False
                self._take_answers(resp, headers.get(signing.H_NONCE))
                return len(body)
            except OSError as err:
                if attempt == 2:
                    if not self.failing:
                        log.info("raft peer %s at %s unreachable: %s", self.peer, self.url, err)
                    self.failing = True
                    time.sleep(0.05)
        return len(body)

    def _take_answers(self, resp: peer_post.Answer, nonce: str | None) -> None:
        """Step the peer's answers from the response: signed with the cluster key for this request when the
        group has one (under TLS the connection itself is the peer's, verified against the peer CA).
        A refused answer is dropped and logged: Raft resends what is not acknowledged."""
        owner = self.owner
        try:
            if owner.cluster_key is not None:
                signed = signing.parse(resp.header)
                if signed is None or signed.signer != f"peer/{self.peer}":
                    raise errors.Unauthorized(f"the answer is not signed by peer/{self.peer}")
                signing.verify(owner.cluster_key, signed, ANSWER_METHOD, answer_target(nonce),
                               signing.body_sha256(resp.body), time.time())
            body = edge_json.parse(resp.body, what="a raft answer")
            msgs = body.get("messages") if isinstance(body, dict) else None
            if not msgs:
                return
            if not isinstance(msgs, list):
                raise errors.BadRequest("'messages' must be a list")
            checked = [raft.check_message(m) for m in msgs]
            if any(m["from"] != self.peer or m["to"] != owner.node_id for m in checked):
                raise errors.Forbidden("a message's from/to does not match the peer asked")
        except errors.FleetError as err:
            log.warning("raft peer %s: answer refused: %s", self.peer, err.detail)
            return
        owner._inbox.put(("msgs", checked, self.peer, None, None))


class _RemoteCopy:
    """A peer's answer as a readable stream that closes its connection."""

    def __init__(self, resp: http.client.HTTPResponse, conn: http.client.HTTPConnection):
        self._resp, self._conn = resp, conn

    def read(self, n: int = -1) -> bytes:
        return self._resp.read(None if n is None or n < 0 else n)

    def close(self) -> None:
        self._resp.close()
        self._conn.close()


class Replicator:
    """This peer's member of the Raft group that replicates the queue.

    ``submit(cmd)`` proposes a command on the leader and resolves with its result
    once applied here; ``read_barrier()`` makes the leader's next read linearizable.
    Has ``submit/execute/stop/alive`` like ``coordinator.GroupCommitWriter``, so
    the coordinator uses either the same way.
    """

    def __init__(self, data_dir: Path, node_id: str, peers: dict[str, str], store, *, on_applied=None,
                 ssl_context=None, tick_s: float = 0.1, election_ticks: tuple[int, int] = (10, 20),
                 heartbeat_ticks: int = 1, snapshot_every: int = SNAPSHOT_EVERY, artifacts=None,
                 checkpoints=None, logs=None, join: bool = False, max_uncommitted: int = MAX_UNCOMMITTED,
                 max_inflight_bytes: int = MAX_INFLIGHT_BYTES, cluster_key: bytes | None = None):
        if node_id not in peers:
            raise errors.ConfigError(f"--node-id {node_id!r} is not among the --peer entries "
                                     f"({', '.join(sorted(peers))}); list this peer too: --peer {node_id}=URL")
        self.data_dir = Path(data_dir)
        self.node_id = node_id
        self._local_urls = dict(peers)  # this peer's --peer: they win (e.g. each peer reaches the others via a proxy)
        self.urls = dict(peers)   # every address known: --peer, the configuration's, what senders announce
        self.peers = dict(peers)  # the members of the configuration in effect, with their URLs
        self._seed_cluster = cluster_id(peers)
        self.store = store
        self.artifacts = artifacts
        self.checkpoints = checkpoints  # a second ArtifactStore: checkpoints travel like bundles, with kind=checkpoint
        self.logs = logs  # a third: attempts' logs, kind=log
        self.on_applied = on_applied
        self.ssl_context = ssl_context
        self.cluster_key = cluster_key
        self.tick_s = tick_s
        self.snapshot_every = snapshot_every
        self.max_uncommitted = max_uncommitted
        self.max_inflight_bytes = max_inflight_bytes
        self.raft_store = SqliteRaftStore(self.data_dir / "raft.sqlite3")
        applied = store.applied_index()
        state = self.raft_store.load()
        seed = list(peers)
        # No log: nothing acknowledged yet, or nothing kept (a term alone may come from a vote request it refused).
        if not (state.entries or state.snapshot):
            if join:
                seed = []
                log.info("raft: %s waits to be added to a group (jobs peers add %s=URL on any member)", node_id,
                         node_id)
            elif applied > 0:
                seed = []  # a seed would vote again in terms it already voted in
                log.error("raft: the raft store %s is empty but the queue has applied %d entries: this peer's raft "
                          "state is gone, so it will neither vote nor campaign. Bring the host back under a new id: "
                          "jobs peers replace %s NEW=URL, then start it with --node-id NEW --join",
                          self.raft_store.path, applied, node_id)
            elif (holder := self._group_lists_me(peers)) is not None:
                seed = []  # a whole data folder lost, restarted with its old --peer list
                log.error("raft: %s starts with an empty data folder, but %s already leads a group with committed "
                          "entries in which %s is a voter: this peer's raft state is gone, so it will neither vote "
                          "nor campaign. Bring the host back under a new id: jobs peers replace %s NEW=URL, then "
                          "start it with --node-id NEW --join", node_id, holder, node_id, node_id)
        self.node = raft.RaftNode(node_id, seed, storage_state=state, rng=random.Random(),
                                  election_ticks=election_ticks, heartbeat_ticks=heartbeat_ticks,
                                  applied=applied, seed_extra={"addresses": dict(peers), "cluster": self._seed_cluster})
        # A crash between saving a received snapshot and swapping in the queue: finish the install first.
        self._unfinished = state.snapshot if state.snapshot is not None and applied < state.snapshot.index else None
        self._db_applied = applied
        self._installing: raft.Snapshot | None = None  # a snapshot whose queue is being downloaded
        self._deferred: list[dict] = []  # committed entries that wait for that install
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._answers: dict[str, _Answer] = {}  # peer -> the answer its messages go into during this loop
        self._answering: list[_Answer] = []
        self._waiters: dict[str, tuple[int, Future]] = {}
        self._reads: dict[str, Future] = {}
        self._read_states: list[raft.ReadState] = []
        self._status = self.node.status()
        self._status_lock = threading.Lock()
        self._role = self.node.role
        self.leader_since: float | None = None
        """When this peer last became the leader (wall clock), set before it answers as one: host signatures
        older than that are refused here (``auth.Trust.host_not_before``), as an earlier leader may have taken them."""
        self._leader_watchers: list = []
        self._closed = False
        self._stop = threading.Event()
        self._senders: dict[str, _Sender] = {}
        self.joining_cluster: str | None = None
        self._logged_members: tuple = ()
        self._started = False
        self._lost_logged = False
        self._sync_members()
        config = self.node.config
        if not join and config is not None and self.node.status()["config_index"] >= 0 \
                and set(peers) != set(config["voters"]) | set(config["learners"]):
            log.warning("raft: the group's members come from its log (voters %s, learners %s); --peer (%s) only "
                        "seeds a new group: change the members with jobs peers add/remove/replace",
                        ", ".join(config["voters"]), ", ".join(config["learners"]) or "none", ", ".join(sorted(peers)))
        self._thread = threading.Thread(target=self._run, name="raft-driver", daemon=True)
        self.copies = CopyFetcher(self) if artifacts is not None else None
        if len(self.node.voters) == 2:
            log.warning("a group of two peers cannot survive the loss of either: add a third (jobs peers add)")

    def _group_lists_me(self, peers: dict[str, str]) -> str | None:
        """Before seeding with an empty store: the id of a peer that leads a group that already committed entries
        and counts this id as a voter (a peer that starts with nothing cannot have been one but by losing its
        state), else None. Unreachable peers are skipped: a new group's peers start at about the same time."""
        for pid, url in peers.items():
            if pid == self.node_id:
                continue
            try:
                conn = _connect(url, self.ssl_context, 2.0)
                try:
                    conn.request("GET", "/v1/health")
                    resp = conn.getresponse()
                    body = edge_json.parse(resp.read(1 << 20), what="a peer's health") if resp.status == 200 else {}
                finally:
                    conn.close()
            except (OSError, http.client.HTTPException, errors.FleetError):
                continue
            if (isinstance(body, dict) and body.get("role") == raft.LEADER and isinstance(body.get("commit"), int)
                    and body["commit"] > 0 and self.node_id in (body.get("voters") or ())):
                return pid
        return None

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self) -> None:
        self._started = True
        self._thread.start()
        if self.copies is not None:
            self.copies.start()
        if self.node.voters == [self.node_id]:
            self._call(lambda n: n.campaign())

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def on_leader(self, fn) -> None:
        """Call ``fn()`` (on a fresh thread) each time this peer becomes the leader."""
        self._leader_watchers.append(fn)

    def stop(self, timeout: float = 5.0) -> None:
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        self._inbox.put(None)
        self._thread.join(timeout)
        senders = list(self._senders.values())
        for s in senders:
            s.box.put(None)
        for s in senders:
            s.thread.join(1.0)
        self._fail_all(errors.Unavailable("this coordinator is shutting down; retry on another peer"))
        if self.copies is not None:
            self.copies.stop()
        self.raft_store.close()

    def hand_over(self, timeout: float = 2.0) -> bool:
        """Leader only: transfer leadership to the most up-to-date peer and wait for it (before a stop)."""
        st = self.status()
        if st["role"] != raft.LEADER or len(self.peers) < 2:
            return False
        reachable = {p: pr for p, pr in st.get("progress", {}).items()
                     if p in st["voters"] and p in self._senders and not self._senders[p].failing}
        best = max(reachable.items(), key=lambda kv: kv[1]["match"], default=(None, None))[0]
        if best is None:
            return False
        log.info("handing leadership to %s before stopping", best)
        try:
            self._call(lambda n: n.transfer_leadership(best)).result(timeout)
        except (errors.FleetError, FutureTimeout):
            return False
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.status()["role"] != raft.LEADER:
                log.info("handed leadership to %s", best)
                return True
            time.sleep(0.05)
        return False

    # -- the API the coordinator uses -------------------------------------------------------------

    def url_of(self, node: str | None) -> str | None:
        return self.urls.get(node) if node else None

    def status(self) -> dict:
        with self._status_lock:
            return dict(self._status)

    def is_leader(self) -> bool:
        return self.status()["role"] == raft.LEADER

    def leader(self) -> str | None:
        return self.status()["leader"]

    def submit(self, cmd: dict) -> Future:
        """Validate ``cmd`` (``commands.validate``) and propose it (leader only, else NotLeader with the leader's
        URL); the future gets its result."""
        fut: Future = Future()
        if self._closed:
            fut.set_exception(errors.Unavailable("this coordinator is shutting down; retry on another peer"))
            return fut
        try:  # an entry that fails to serialise or to apply would stall or split the group: check it first
            cmd = commands.validate(cmd)
        except errors.BadRequest as err:
            fut.set_exception(err)
            return fut
        rid = tokens.token_hex(8)
        self._inbox.put(("propose", {**cmd, "rid": rid}, fut))
        return fut

    def _propose(self, proposals: list[tuple[dict, Future]]) -> None:
        """Driver: propose the commands submitted since the last loop together (one AppendEntries per follower
        for all of them), each refused once ``max_uncommitted`` entries wait for a quorum."""
        node = self.node
        waiting = node.last_index() - node.commit
        room = max(0, self.max_uncommitted - waiting) if node.role == raft.LEADER else len(proposals)
        for _, fut in proposals[room:]:
            fut.set_exception(errors.Unavailable(
                f"{waiting} commands already wait for a quorum (peers slow or unreachable); retry in a second"))
        proposals = proposals[:room]
        if not proposals:
            return
        try:
            indexes = node.propose_many([data for data, _ in proposals])
        except errors.NotLeader as err:
            for _, fut in proposals:
                fut.set_exception(errors.NotLeader(self.url_of(err.leader_url)))
            return
        for (data, fut), index in zip(proposals, indexes):
            self._waiters[data["rid"]] = (index, fut)

    def execute(self, cmd: dict) -> dict:
        fut = self.submit(cmd)
        try:
            return fut.result(PROPOSE_TIMEOUT_S)
        except FutureTimeout:
            raise errors.Unavailable(f"no quorum committed the command within {PROPOSE_TIMEOUT_S:.0f} s "
                                     "(peers down or partitioned?); retry later") from None

    def read_barrier(self, timeout: float = READ_TIMEOUT_S) -> None:
        """Return once this peer has applied everything committed before the call (Raft ReadIndex)."""
        ctx = tokens.token_hex(8)
        fut: Future = Future()

        def ask(node):
            self._reads[ctx] = fut
            try:
                node.read_index(ctx)
            except errors.NotLeader as err:
                self._reads.pop(ctx, None)
                fut.set_exception(errors.NotLeader(self.url_of(err.leader_url)))

        self._call(ask)
        try:
            fut.result(timeout)
        except FutureTimeout:
            self._reads.pop(ctx, None)
            raise errors.Unavailable("could not confirm leadership with a quorum for a read; retry") from None

    def peer_headers(self, method: str, target: str, body_sha: str, headers: dict) -> dict:
        """``headers`` signed with the cluster key as this peer (unsigned without one: peers then prove
        themselves by their TLS certificates)."""
        if self.cluster_key is None:
            return headers
        return {**headers, **signing.signature_headers(self.cluster_key, f"peer/{self.node_id}", method, target,
                                                       body_sha, time.time(), tokens.token_hex(16), headers)}

    def receive(self, body: object, answer: bool = False) -> list[dict] | None:
        """A batch from ``POST /v1/raft/messages``: checked here, stepped by the driver. With ``answer``, waits
        for the messages the driver produces for the sender meanwhile (persisted first, as any message that
        leaves) and returns them (``[]`` when the driver took longer than ``ANSWER_WAIT_S``: they then leave
        on this peer's own connection); else None."""
        if not isinstance(body, dict):
            raise errors.BadRequest("raft messages: expected a JSON object with cluster, from, to, messages")
        cluster = self.cluster  # None while this peer waits to be added: it learns the group's from the leader
        if cluster is not None and body.get("cluster") != cluster:
            raise errors.Forbidden(f"raft messages from cluster {str(body.get('cluster'))[:40]!r} refused: this "
                                   f"peer belongs to cluster {cluster}; check the --peer lists")
        sender, url = body.get("from"), _announced_url(body.get("url"))
        # A sender we know of, or one announcing its URL: a member added by an entry this peer has not received.
        if body.get("to") != self.node_id or sender == self.node_id or not (sender in self.urls or url):
            raise errors.Forbidden(f"raft messages from {str(sender)[:40]!r} to "
                                   f"{str(body.get('to'))[:40]!r} refused: this is peer {self.node_id!r}")
        msgs = body.get("messages")
        if not isinstance(msgs, list):
            raise errors.BadRequest("raft messages: 'messages' must be a list")
        checked = [raft.check_message(m) for m in msgs]
        if any(m["from"] != body["from"] or m["to"] != self.node_id for m in checked):
            raise errors.Forbidden("raft messages: a message's from/to does not match its batch")
        if self._closed:
            raise errors.Unavailable(f"raft peer {self.node_id} is shutting down")
        if cluster is None:
            self.joining_cluster = body.get("cluster")  # answered with until the configuration arrives
        if not answer:
            self._inbox.put(("msgs", checked, sender, url, None))
            return None
        ans = _Answer()
        self._inbox.put(("msgs", checked, sender, url, ans))
        if not ans.done.wait(ANSWER_WAIT_S):
            with ans.lock:
                if not ans.done.is_set():
                    ans.abandoned = True
                    return []
        return ans.messages

    def answer(self, messages: list[dict], request_nonce: str | None) -> tuple[bytes, dict]:
        """The response body and headers that carry ``messages`` back to the sender of the request signed with
        ``request_nonce``: signed with the cluster key when the group has one."""
        body = json.dumps({"ok": True, "messages": messages}, separators=(",", ":")).encode()
        if self.cluster_key is None:
            return body, {}
        return body, signing.signature_headers(self.cluster_key, f"peer/{self.node_id}", ANSWER_METHOD,
                                               answer_target(request_nonce), signing.body_sha256(body),
                                               time.time(), tokens.token_hex(16))

    def health(self) -> dict:
        """Role, term, leader, commit, applied, the configuration and its members as this peer sees them
        (``match``/``lag`` on the leader: how far each member's log has caught up)."""
        st = self.status()
        progress = st.get("progress") or {}
        peers = []
        for pid, url in sorted(self.peers.items()):
            row = {"id": pid, "url": url, "member": "voter" if pid in st["voters"] else "learner"}
            if pid == self.node_id:
                row.update(role=st["role"], match=st["last_index"], lag=0, term=st["term"],
                           commit_index=st["commit"])
            elif pid in progress:
                match = progress[pid]["match"]
                row.update(role=raft.FOLLOWER, match=match, lag=max(0, st["last_index"] - match))
            elif pid == st["leader"]:
                row.update(role=raft.LEADER)
            peers.append(row)
        role = raft.CANDIDATE if st["role"] == raft.PRE_CANDIDATE else st["role"]
        member = "voter" if self.node_id in st["voters"] else "learner" if self.node_id in st["learners"] else None
        return {"role": role, "term": st["term"], "leader": st["leader"], "leader_url": self.url_of(st["leader"]),
                "node_id": self.node_id, "commit": st["commit"], "commit_index": st["commit"],
                "applied": st["applied"], "last_index": st["last_index"], "snapshot_index": st["snapshot_index"],
                "installing": st.get("installing"),
                "cluster": self.cluster, "peers": peers,
                "voters": st["voters"], "learners": st["learners"], "member": member, "lost": st["lost"],
                "artifacts_missing": self.copies.missing() if self.copies is not None else 0}

    # -- the driver -------------------------------------------------------------------------------

    def _call(self, fn) -> Future:
        """Run ``fn(node)`` on the driver thread (the only one that touches the node)."""
        fut: Future = Future()
        if self._closed:
            fut.set_exception(errors.Unavailable("this coordinator is shutting down; retry on another peer"))
            return fut
        self._inbox.put(("call", fn, fut))
        return fut

    def _run(self) -> None:
        next_tick = time.monotonic() + self.tick_s
        try:
            if self._unfinished is not None:
                self._begin_install(self._unfinished)
            while not self._stop.is_set():
                try:
                    item = self._inbox.get(timeout=max(0.0, next_tick - time.monotonic()))
                except queue.Empty:
                    item = ()
                items = [item]
                while len(items) < 1024:
                    try:
                        items.append(self._inbox.get_nowait())
                    except queue.Empty:
                        break
                proposals: list[tuple[dict, Future]] = []
                for item in items:
                    if item and item[0] == "propose":
                        proposals.append(item[1:])
                        continue
                    if proposals:  # in order with the calls around them
                        self._propose(proposals)
                        proposals = []
                    if item is None:
                        return
                    if item:
                        self._handle(item)
                if proposals:
                    self._propose(proposals)
                now = time.monotonic()
                if now >= next_tick:
                    self.node.tick()
                    next_tick = max(next_tick + self.tick_s, now)
                self._drain()
                self._hand_answers()
        except BaseException:
            log.exception("the raft driver stopped")
            raise
        finally:
            self._hand_answers()

    def _handle(self, item) -> None:
        if item[0] == "installed":
            self._end_install(item[1])
        elif item[0] == "msgs":
            _, msgs, sender, url, ans = item
            if url and sender not in self.urls:
                self.urls = {**self.urls, sender: url}
            if ans is not None:
                self._answers[sender] = ans
                self._answering.append(ans)
            for msg in msgs:
                self.node.step(msg)
        else:
            _, fn, fut = item
            try:
                fut.set_result(fn(self.node))
            except errors.FleetError as err:
                fut.set_exception(err)

    def _drain(self) -> None:
        while True:
            rd = self.node.ready()
            if rd is None:
                break
            for msg in rd.early:
                self._offer(msg)
            self.raft_store.save(rd.hard_state, rd.entries, rd.snapshot)
            self._sync_members()
            for msg in rd.messages:
                ans = self._answers.get(msg["to"]) if msg["type"] in ANSWER_TYPES else None
                if ans is not None:
                    ans.messages.append(msg)
                    continue
                self._offer(msg)
            if rd.snapshot is not None:
                self._begin_install(rd.snapshot)
            if rd.committed_entries:
                if self._installing is not None:
                    self._deferred += rd.committed_entries
                else:
                    self._apply(rd.committed_entries)
            self._read_states += rd.read_states
            self.node.advance(rd)
            self._answer_reads()
            self._maybe_compact()
        self._sync_members()
        st = self.node.status()
        if st["role"] == raft.LEADER and self._status["role"] != raft.LEADER and \
                (st["last_index"] > 1 or st["snapshot_index"] > 0):  # else no leader came before: nothing to refuse
            self.leader_since = time.time()
        # The node counts a snapshot and the entries after it as applied once handed out; the queue holds them
        # only once its copy is in place (_end_install). Health reports what the queue holds.
        st["applied"] = min(st["applied"], self._db_applied)
        st["installing"] = self._installing.index if self._installing is not None else None
        with self._status_lock:
            self._status = st
        if st["lost"] and not self._lost_logged:
            self._lost_logged = True
            log.error("%s. Run jobs peers replace %s NEW=URL on any member, then start this host with --node-id "
                      "NEW --join", st["lost"], self.node_id)
        if st["role"] != self._role:
            was, self._role = self._role, st["role"]
            log.info("raft %s: %s -> %s (term %d, leader %s)", self.node_id, was, st["role"], st["term"],
                     st["leader"])
            if was == raft.LEADER:
                for ctx in list(self._reads):
                    self._reads.pop(ctx).set_exception(errors.Unavailable("leadership changed; retry"))
            if st["role"] == raft.LEADER:
                for fn in self._leader_watchers:
                    threading.Thread(target=fn, name="raft-on-leader", daemon=True).start()

    def _hand_answers(self) -> None:
        """Driver, after ``_drain`` (everything in them is persisted): wake the handlers waiting for answers; an
        answer whose handler stopped waiting leaves on the peer's own connection."""
        if not self._answering:
            return
        answering, self._answering, self._answers = self._answering, [], {}
        for ans in answering:
            with ans.lock:
                if not ans.abandoned:
                    ans.done.set()
                    continue
            for msg in ans.messages:
                self._offer(msg)

    def _sync_members(self) -> None:
        """Driver thread: follow the configuration in effect (its URLs, ``peers``, ``cluster``), stop the senders
        of peers no longer in it. Other threads read these attributes; each is replaced, never changed in place."""
        config = self.node.config
        if config is None:
            self.cluster = None
            return
        addresses = {p: u for p, u in (config.get("addresses") or {}).items() if isinstance(u, str)}
        if any(p not in self._local_urls and self.urls.get(p) != u for p, u in addresses.items()):
            self.urls = {**self.urls, **addresses, **self._local_urls}
        members = set(config["voters"]) | set(config["learners"])
        self.peers = {p: self.urls[p] for p in sorted(members) if p in self.urls}
        if (config["voters"], config["learners"]) != self._logged_members:
            self._logged_members = (config["voters"], config["learners"])
            log.info("raft %s: members now voters %s, learners %s", self.node_id, ", ".join(config["voters"]),
                     ", ".join(config["learners"]) or "none")
        self.cluster = config.get("cluster", self._seed_cluster)
        for pid in [p for p in self._senders if p not in members]:
            self._senders.pop(pid).box.put(None)

    def _offer(self, msg: dict) -> None:
        """Hand ``msg`` to its peer's sender, started on first use (none while stopped or the peer has no URL)."""
        pid = msg["to"]
        sender = self._senders.get(pid)
        if sender is None and self._started and not self._closed and self.urls.get(pid):
            sender = self._senders[pid] = _Sender(self, pid, self.urls[pid])
        if sender is not None:
            sender.offer(msg)

    def change_membership(self, change, what: str) -> dict:
        """Run ``change(node) -> index`` (``add_learner`` or ``remove_member``) on the leader's driver, then
        wait until that entry commits. Raises what the core raises (NotLeader with the leader's URL)."""
        def propose(node):
            return change(node), node.term

        try:
            index, term = self._call(propose).result(PROPOSE_TIMEOUT_S)
        except errors.NotLeader as err:
            raise errors.NotLeader(self.url_of(err.leader_url)) from None
        except FutureTimeout:
            raise errors.Unavailable("the raft driver did not answer; retry") from None
        deadline = time.monotonic() + PROPOSE_TIMEOUT_S
        while time.monotonic() < deadline:
            st = self.status()
            if st["commit"] >= index:
                if self._call(lambda n: n.term_at(index)).result(PROPOSE_TIMEOUT_S) not in (term, None):
                    break
                log.info("raft: %s committed at index %d", what, index)
                return {"ok": True, "index": index, "voters": st["voters"], "learners": st["learners"]}
            time.sleep(0.02)
        raise errors.Unavailable(f"{what} was proposed at index {index} but did not commit within "
                                 f"{PROPOSE_TIMEOUT_S:.0f} s (no quorum, or leadership changed); check jobs peers and "
                                 "retry")

    def _apply(self, entries: list[dict]) -> None:
        entries = [e for e in entries if e["index"] > self._db_applied]
        if not entries:
            return
        cmds, rids = [], []
        for e in entries:
            data = e["data"]
            if data is None:
                continue
            cmd = dict(data)
            if cmd.pop("lease_from_index", False):
                cmd["lease"] = str(e["index"])  # a claim's fencing token is its log index
            cmds.append(cmd)
            rids.append((e["index"], cmd.get("rid")))
        results = self.store.execute_batch(cmds, applied_index=entries[-1]["index"],
                                           indexes=[index for index, _ in rids])
        self._db_applied = entries[-1]["index"]
        for (index, rid), result in zip(rids, results):
            if isinstance(result, errors.ApplyFailed):
                log.error("raft entry %d failed to apply, alike on every replica; carrying on: %s", index,
                          result.detail)
            waiter = self._waiters.pop(rid, None) if rid else None
            if waiter is not None:
                _, fut = waiter
                if isinstance(result, BaseException):
                    fut.set_exception(result)
                else:
                    fut.set_result(result)
        last = entries[-1]["index"]
        for rid, (index, fut) in list(self._waiters.items()):
            if index <= last:  # another leader's entry took this index: ours is gone
                del self._waiters[rid]
                fut.set_exception(errors.Unavailable("leadership changed before the command committed; retry"))
        if cmds and self.on_applied is not None:
            try:
                self.on_applied(cmds, results)
            except Exception:
                log.exception("after-commit hook failed")
        if self.copies is not None and any(cmd.get("op") in RECORD_OPS for cmd in cmds):
            self.copies.wake()  # a follower that missed an upload's push fetches it

    def _answer_reads(self) -> None:
        applied = self._db_applied  # what the queue holds: behind the node's applied while a snapshot installs
        keep = []
        for rs in self._read_states:
            if rs.index <= applied:
                fut = self._reads.pop(rs.ctx, None)
                if fut is not None and not fut.done():
                    fut.set_result(rs.index)
            else:
                keep.append(rs)
        self._read_states = keep

    def _fail_all(self, err: errors.FleetError) -> None:
        for _, fut in list(self._waiters.values()):
            if not fut.done():
                fut.set_exception(err)
        self._waiters.clear()
        for fut in list(self._reads.values()):
            if not fut.done():
                fut.set_exception(err)
        self._reads.clear()

    # -- snapshots ---------------------------------------------------------------------------------

    def _maybe_compact(self) -> None:
        if self._installing is not None:
            return  # the queue does not stand at the node's applied index yet
        applied = self.node.applied
        snap_index = self.node.status()["snapshot_index"]
        if self.snapshot_every and applied - snap_index >= self.snapshot_every:
            # The queue database is the state machine; the snapshot names only the point it stands at,
            # so the queue must durably stand there before the log forgets the entries (module docstring).
            self._sync_queue()
            snap = self.node.compact(applied, {"index": applied, "term": self.node.term_at(applied)})
            self.raft_store.truncate_prefix(applied, snap)
            log.info("raft log compacted up to %d", applied)

    def _sync_queue(self) -> None:
        """fsync the queue's WAL, database file and folder: every transaction committed so far (all by this
        thread) survives a power cut, whatever its synchronous mode (NORMAL syncs the WAL only at checkpoints;
        SQLite's own checkpoint may skip the sync while readers pin old frames)."""
        path = Path(self.store.path)
        for name in (str(path) + "-wal", str(path), str(path.parent)):
            try:
                fd = os.open(name, os.O_RDONLY)
            except FileNotFoundError:
                continue
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def _begin_install(self, snap: raft.Snapshot) -> None:
        """Driver: fetch a peer's queue for ``snap`` on another thread; meanwhile the driver keeps stepping
        messages and ticking, and holds back the entries committed after the snapshot (``_end_install``)."""
        first = self._installing is None
        if not first and snap.index <= self._installing.index:
            return
        if first and snap.index <= self._db_applied:
            # The queue already holds it (a copy taken after an earlier snapshot can stand ahead of the node's
            # commit index). A copy must never take it back: the driver goes on from _db_applied, so the
            # entries between that copy and _db_applied would never be applied here.
            return
        self._installing = snap
        if first:
            threading.Thread(target=self._download_snapshot, name="raft-snapshot-download", daemon=True).start()

    def _end_install(self, applied: int) -> None:
        """Driver: the downloaded queue (standing at ``applied``) is in place; apply what waited for it."""
        if self._installing is None:
            return
        if applied < self._installing.index:  # a newer snapshot came meanwhile: fetch again
            threading.Thread(target=self._download_snapshot, name="raft-snapshot-download", daemon=True).start()
            return
        # Entries between the snapshot and the copy are already in it: _apply skips them. The copy stands after
        # the snapshot, which stands after what the queue held before (_begin_install).
        self._db_applied = applied
        self._installing = None
        deferred, self._deferred = self._deferred, []
        if deferred:
            self._apply(deferred)
        self._answer_reads()
        if self.copies is not None:
            self.copies.wake()  # its queue names uploads this peer never saw pushed

    def _download_snapshot(self) -> None:
        """Swap in a peer's queue (a consistent copy at or after the snapshot's index), the leader's first,
        trying until some peer has one: without it this peer has no state to apply onto."""
        delay = 0.1
        while not self._stop.is_set():
            snap = self._installing
            if snap is None:
                return
            order = sorted((p for p in self.peers if p != self.node_id), key=lambda p: p != self.status()["leader"])
            for pid in order:
                try:
                    applied = self._download_queue(pid, snap.index)
                except (OSError, http.client.HTTPException, errors.FleetError) as err:
                    log.info("could not get the queue from %s for snapshot %d: %s", pid, snap.index, err)
                    continue
                log.info("installed the leader's queue from %s at raft index %d (snapshot %d)", pid, applied,
                         snap.index)
                self._inbox.put(("installed", applied))
                return
            self._stop.wait(delay)
            delay = min(delay * 2, 2.0)

    def _download_queue(self, pid: str, at_least: int) -> int:
        fd, tmp = tempfile.mkstemp(prefix="snapshot-", suffix=".sqlite3", dir=self.data_dir)
        try:
            with os.fdopen(fd, "wb") as out:
                conn = _connect(self.peers[pid], self.ssl_context, 60.0)
                try:
                    conn.request("GET", SNAPSHOT_PATH, headers=self.peer_headers(
                        "GET", SNAPSHOT_PATH, signing.EMPTY_SHA256, {"x-raft-cluster": self.cluster}))
                    resp = conn.getresponse()
                    if resp.status != 200:
                        raise errors.Unavailable(f"answered {resp.status}: {resp.read()[:200]!r}")
                    while chunk := resp.read(1 << 20):
                        out.write(chunk)
                    out.flush()
                    os.fsync(out.fileno())
                finally:
                    conn.close()
            db_copy = sqlite3.connect(tmp)
            try:
                row = db_copy.execute("SELECT value FROM meta WHERE key = 'raft_applied'").fetchone()
            except sqlite3.Error as err:
                raise errors.Unavailable(f"sent a queue copy that is not a database ({err})") from None
            finally:
                db_copy.close()
            applied = int(row[0]) if row else 0
            if applied < at_least:
                raise errors.Unavailable(f"its queue stands at {applied}, before {at_least}")
            self.store.replace_with(tmp)
            return applied
        finally:
            Path(tmp).unlink(missing_ok=True)

    # -- artifacts -----------------------------------------------------------------------------

    def store_of(self, kind: str | None):
        """Where a copy of that kind lives: checkpoints and logs apart from model bundles."""
        if kind == CHECKPOINT:
            if self.checkpoints is None:
                raise errors.BadRequest("this peer keeps no checkpoints")
            return self.checkpoints
        if kind == LOG:
            if self.logs is None:
                raise errors.BadRequest("this peer keeps no attempt logs")
            return self.logs
        return self.artifacts

    def recorded_copies(self) -> list[dict]:
        """Every copy the queue records (``copy_fetcher``): bundles, and checkpoints and logs where kept."""
        recorded = [{**a, "now": a["created"]} for a in self.store.artifacts()]
        if self.checkpoints is not None:
            recorded += [{**c, "artifact_id": c["sha256"], "kind": CHECKPOINT, "now": c["created"]}
                         for c in self.store.checkpoint_records()]
        if self.logs is not None:
            recorded += [{**r, "artifact_id": r["sha256"], "kind": LOG, "now": r["created"]}
                         for r in self.store.log_records()]
        return recorded

    def fetch_copy(self, copy: dict) -> bool:
        """Fetch one recorded copy from the first other peer that has it (verified by its sha256)."""
        sha = copy["artifact_id"]
        store = self.store_of(copy.get("kind"))
        source = {CHECKPOINT: f"/v1/checkpoint/{sha}", LOG: f"/v1/log/{sha}"}.get(copy.get("kind"),
                                                                                   f"/v1/artifact/{sha}")
        for pid, url in self.peers.items():
            if pid == self.node_id:
                continue
            try:
                conn = _connect(url, self.ssl_context, 60.0)
                try:
                    conn.request("GET", source, headers=self.peer_headers("GET", source, signing.EMPTY_SHA256,
                                                                          {"x-forwarded-by": self.node_id}))
                    resp = conn.getresponse()
                    if resp.status != 200:
                        resp.read()
                        continue
                    length = int(resp.getheader("content-length") or 0)
                    store.put(resp, sha256=sha, length=length, model=copy["model"], mode=copy["mode"],
                              job_id=copy["job_id"], host=copy["host"], now=copy["now"])
                finally:
                    conn.close()
            except (OSError, http.client.HTTPException, errors.FleetError) as err:
                log.info("could not fetch %s %s from %s: %s", copy.get("kind") or "artifact", sha[:12], pid, err)
                continue
            log.info("fetched %s %s from %s", copy.get("kind") or "artifact", sha[:12], pid)
            return True
        return False

    def open_remote(self, path: str):
        """(stream, size) of ``GET path`` from the first other peer that answers 200, the leader first:
        a download of a copy this peer lacks. NotFound when no peer has it."""
        leader = self.status()["leader"]
        for pid in sorted((p for p in self.peers if p != self.node_id), key=lambda p: p != leader):
            try:
                conn = _connect(self.peers[pid], self.ssl_context, 60.0)
                conn.request("GET", path, headers=self.peer_headers("GET", path, signing.EMPTY_SHA256,
                                                                    {"x-forwarded-by": self.node_id}))
                resp = conn.getresponse()
            except (OSError, http.client.HTTPException) as err:
                log.info("could not ask %s for %s: %s", pid, path, err)
                continue
            if resp.status == 200:
                return _RemoteCopy(resp, conn), int(resp.getheader("content-length") or 0)
            resp.read()
            conn.close()
        raise errors.NotFound(f"{path.rsplit('/', 1)[-1][:16]}: no peer of this group holds it (yet); if it was "
                              "recorded, it is being fetched: retry in a while")

    def push_artifact(self, sha: str, meta: dict, timeout: float = 60.0) -> int:
        """Leader: send a stored bundle to every member in parallel; returns how many voters hold it
        (this one included) once a majority of them does, else raises Unavailable (learners' copies count for none).

        ``timeout`` is per socket operation; the wait for a majority also allows 10 MiB/s for the bytes."""
        path = self.store_of(meta.get("kind")).locate(sha)
        size = path.stat().st_size
        voters = set(self.status()["voters"])
        need = len(voters) // 2 + 1
        done = threading.Semaphore(0)
        ok = [int(self.node_id in voters)]
        lock = threading.Lock()

        def push(pid, url):
            try:
                conn = _connect(url, self.ssl_context, timeout)
                with open(path, "rb") as f:
                    conn.request("PUT", ARTIFACT_PATH + sha, body=f, headers=self.peer_headers(
                        "PUT", ARTIFACT_PATH + sha, sha, {
                            "content-length": str(size), "x-raft-cluster": self.cluster, "x-content-sha256": sha,
                            "x-artifact": json.dumps(meta, separators=(",", ":"))}))
                    resp = conn.getresponse()
                    resp.read()
                conn.close()
                if resp.status in (200, 201):
                    with lock:
                        ok[0] += pid in voters
                else:
                    log.warning("peer %s refused artifact %s: %s", pid, sha[:12], resp.status)
            except (OSError, http.client.HTTPException) as err:
                log.info("could not push artifact %s to %s: %s", sha[:12], pid, err)
            finally:
                done.release()

        others = [(p, u) for p, u in self.peers.items() if p != self.node_id]
        for pid, url in others:
            threading.Thread(target=push, args=(pid, url), name="raft-artifact-push", daemon=True).start()
        deadline = time.monotonic() + timeout + size / (10 << 20)
        for _ in others:
            with lock:
                if ok[0] >= need:
                    break
            if not done.acquire(timeout=max(0.0, deadline - time.monotonic())):
                break
        with lock:
            held = ok[0]
        if held < need:
            raise errors.Unavailable(f"artifact {sha[:12]} reached {held} of {len(voters)} voters, not a majority; "
                                     "retry the upload")
        return held

    def receive_artifact(self, sha: str, cluster: str | None, meta_text: str | None, body, length: int) -> dict:
        """Follower side of ``push_artifact`` (``PUT /v1/raft/artifact/{sha256}``): verified by sha256."""
        if cluster != self.cluster:
            raise errors.Forbidden("artifact push from another cluster refused; check the --peer lists")
        try:
            meta = edge_json.parse((meta_text or "").encode(), what="x-artifact")
            store = self.store_of(meta.get("kind"))
            return store.put(body, sha256=sha, length=length, model=meta["model"], mode=meta["mode"],
                             job_id=meta["job_id"], host=meta["host"], now=float(meta["now"]))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise errors.BadRequest("x-artifact must be a JSON object with model, mode, job_id, host, now") from None

    def snapshot_copy(self, cluster: str | None):
        """``GET /v1/raft/snapshot``: a consistent copy of the queue in a temp file -> (file, size)."""
        if cluster != self.cluster:
            raise errors.Forbidden("snapshot request from another cluster refused; check the --peer lists")
        fd, tmp = tempfile.mkstemp(prefix="snapshot-out-", suffix=".sqlite3", dir=self.data_dir)
        os.close(fd)
        try:
            self.store.backup_to(tmp)
            f = open(tmp, "rb")
        finally:
            Path(tmp).unlink(missing_ok=True)
        return f, os.fstat(f.fileno()).st_size
