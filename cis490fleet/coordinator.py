"""``serve``: wires the queue, the artifact store and the HTTP API into one coordinator process.

Shell. Owns the threads of a coordinator: the group-commit writer (the one
thread that writes the queue), the long-poll waiters, the stale sweeper, the
systemd watchdog pings, signal handling and the orderly stop. Reads the clock
and draws leases here, so the commands the store applies carry ``now`` and
``lease`` as data. Never decides a job transition itself: that is ``jobs`` via
``jobstore``.
"""

from __future__ import annotations

import argparse
import hashlib
import ipaddress
import logging
import os
import queue
import signal
import socket
import stat
import sys
import threading
import time
import urllib.parse
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable

from cis490fleet import __version__, auth, commands, errors, manifest_source, model, tokens
from cis490fleet.lease_clock import LeaseClock
from cis490fleet.manifest_source import ManifestTexts
from cis490fleet.metrics import Histogram
from cis490fleet.model import FleetConfig, Manifest
from cis490fleet.notifier import Notifier

log = logging.getLogger(__name__)

ENV_DATA = "CIS490_DATA"
ENV_TOKEN = "CIS490_OPERATOR_TOKEN"
ENV_READ_TOKEN = "CIS490_READ_TOKEN"
DEFAULT_BIND = "127.0.0.1:8445"
MAX_BATCH = 1024
STOP_GRACE_S = 30.0
READERS = 4
# Commands after which a job may have become claimable: waiting claims retry after each.
# Routes every peer answers itself; a follower forwards the rest to the leader.
LOCAL_ROUTES = frozenset({"/", "/metrics", "/v1/health", "/v1/openapi.json", "/v1/zipapp", "/v1/raft/messages",
                          "/v1/raft/snapshot", "/v1/raft/artifact/{sha256}"})
# A reload without a manifest text reads the receiving peer's file before it goes to the leader (http_api.h_reload).
RELOAD_ROUTE = "/v1/manifest/reload"
WAKE_OPS = frozenset({"sync_manifest", "complete", "fail", "cancel", "requeue", "release", "sweep_stale"})
KEY_OPS = frozenset({"host_key_set", "host_key_revoke", "sync_manifest"})
KNOWN_HOSTS_TTL_S = 1.0
KEY_CATCH_UP_S = 2.0
LATENCY_BUCKETS_MS = (1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 60000)


def default_data_dir(env: dict | None = None) -> Path:
    """``$CIS490_DATA``, else the per-user state folder (XDG_STATE_HOME, ~/.local/state, %LOCALAPPDATA%)."""
    env = os.environ if env is None else env
    if env.get(ENV_DATA):
        return Path(env[ENV_DATA]).expanduser()
    if os.name == "nt":
        base = env.get("LOCALAPPDATA") or str(Path.home() / "AppData" / "Local")
        return Path(base) / "cis490fleet"
    if env.get("XDG_STATE_HOME"):
        return Path(env["XDG_STATE_HOME"]) / "cis490fleet"
    return Path.home() / ".local" / "state" / "cis490fleet"


# -- counters for /metrics -------------------------------------------------------------------------


class Counters:
    """Monotonic counters and latency histograms; ``snapshot()`` is what the metrics page reads.

    Counter names: claims (jobs handed out), empty_claims, completions, failures,
    stale_recoveries, stale_failures, commands, batches, requests, errors_4xx, errors_5xx.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self.counters: dict[str, int] = {k: 0 for k in (
            "claims", "empty_claims", "completions", "failures", "stale_recoveries", "stale_failures",
            "commands", "batches", "requests", "errors_4xx", "errors_5xx")}
        self.latency = Histogram(LATENCY_BUCKETS_MS)
        self.claim_latency = Histogram(LATENCY_BUCKETS_MS)

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.counters[name] = self.counters.get(name, 0) + n

    def observe_request(self, status: int, ms: float) -> None:
        with self._lock:
            self.counters["requests"] += 1
            if 400 <= status < 500:
                self.counters["errors_4xx"] += 1
            elif status >= 500:
                self.counters["errors_5xx"] += 1
        self.latency.observe(ms)

    def observe_claim(self, ms: float) -> None:
        """One applied claim command: from its submission to its result, without any long-poll wait."""
        self.claim_latency.observe(ms)

    def snapshot(self) -> dict:
        """``{"counters": {...}, "latency_ms": {"buckets": [(le, cumulative count)...], "sum", "count"},
        "claim_latency_ms": {the same shape}}``."""
        with self._lock:
            counters = dict(self.counters)
        return {"counters": counters, "latency_ms": self.latency.series(),
                "claim_latency_ms": self.claim_latency.series()}


# -- the group-commit writer ------------------------------------------------------------------------


_STOP = object()


class GroupCommitWriter:
    """The one thread that writes the queue: applies every command waiting in line in one transaction.

    Under load many claims share one commit (one fsync with synchronous=FULL);
    each caller still gets its own result or error through a Future. A failing
    command changes nothing and fails only its own caller.
    """

    def __init__(self, store, *, max_batch: int = MAX_BATCH, on_applied=None):
        self.store = store
        self.max_batch = max_batch
        self.on_applied = on_applied
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="group-commit", daemon=True)
        self._closed = False

    def start(self) -> None:
        self._thread.start()

    def submit(self, cmd: dict) -> Future:
        """Queue ``cmd`` for the next batch once ``commands.validate`` passes it; the future gets its result."""
        fut: Future = Future()
        if self._closed:
            fut.set_exception(errors.Unavailable("the coordinator is shutting down; retry on another peer or later"))
            return fut
        try:
            cmd = commands.validate(cmd)
        except errors.BadRequest as err:
            fut.set_exception(err)
            return fut
        self._queue.put((cmd, fut))
        return fut

    def execute(self, cmd: dict) -> dict:
        return self.submit(cmd).result()

    def stop(self, timeout: float = STOP_GRACE_S) -> None:
        """Apply what is queued, then end the thread."""
        self._closed = True
        self._queue.put(_STOP)
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        stopping = False
        while not stopping:
            item = self._queue.get()
            if item is _STOP:
                break
            batch = [item]
            while len(batch) < self.max_batch:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    stopping = True
                    break
                batch.append(item)
            self._apply(batch)
        # Anything submitted after the stop marker is refused, not left hanging.
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not _STOP:
                item[1].set_exception(errors.Unavailable("the coordinator is shutting down; retry later"))

    def _apply(self, batch: list[tuple[dict, Future]]) -> None:
        cmds = [cmd for cmd, _ in batch]
        try:
            results = self.store.execute_batch(cmds)
        except Exception as err:  # the whole transaction failed: every caller gets the error
            if not isinstance(err, errors.FleetError):
                log.exception("the queue could not apply %d command(s)", len(cmds))
            for _, fut in batch:
                fut.set_exception(err)
            return
        for (cmd, fut), result in zip(batch, results):
            if isinstance(result, BaseException):
                fut.set_exception(result)
            else:
                fut.set_result(result)
        if self.on_applied is not None:
            try:
                self.on_applied(cmds, results)
            except Exception:
                log.exception("after-commit hook failed")


# -- sd_notify ----------------------------------------------------------------------------------------


def sd_notify(message: str, env: dict | None = None) -> bool:
    """Send ``message`` to systemd's NOTIFY_SOCKET (abstract '@' names too); False when there is none."""
    env = os.environ if env is None else env
    address = env.get("NOTIFY_SOCKET")
    if not address or not hasattr(socket, "AF_UNIX"):
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
        return True
    except OSError as err:
        log.warning("could not notify systemd at %s: %s", env.get("NOTIFY_SOCKET"), err)
        return False


def watchdog_interval(env: dict | None = None) -> float | None:
    """Half of WATCHDOG_USEC in seconds when the watchdog is meant for this process."""
    env = os.environ if env is None else env
    usec = env.get("WATCHDOG_USEC")
    pid = env.get("WATCHDOG_PID")
    if not usec or (pid and pid.strip() != str(os.getpid())):
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 2e6 if value > 0 else None


# -- the coordinator ----------------------------------------------------------------------------------


class DataDirLock:
    """An exclusive lock on ``<data>/serve.lock`` for the life of one coordinator: two would trample each other.

    The operating system drops the lock when the process dies, kill -9 included.
    """

    def __init__(self, data_dir: Path):
        self.path = data_dir / "serve.lock"
        self._file = open(self.path, "a+b")
        try:
            self._lock()
        except OSError:
            self._file.seek(0)
            holder = self._file.read().decode(errors="replace").strip() or "unknown"
            self._file.close()
            raise errors.ConfigError(f"data folder {data_dir} is in use by another serve (pid {holder}); stop it, "
                                     "or give this one another --data") from None
        self._file.seek(0)
        self._file.truncate()
        self._file.write(str(os.getpid()).encode())
        self._file.flush()

    def _lock(self) -> None:
        if os.name == "nt":
            import msvcrt

            self._file.seek(0)
            msvcrt.locking(self._file.fileno(), msvcrt.LK_NBLCK, 1)
        else:
            import fcntl

            fcntl.flock(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)

    def release(self) -> None:
        if not self._file.closed:
            self._file.close()


class Coordinator:
    """One coordinator peer: the queue, the artifact store, the manifest file and the writer.

    ``http_api`` calls the methods below; each turns a request into a command
    (with ``now`` and, for claims, a fresh lease) or a read.
    """

    def __init__(self, data_dir: str | os.PathLike, *, manifest_path: str | os.PathLike | None = None,
                 operator_token: str | None = None, synchronous: str = "FULL", node_id: str | None = None,
                 sweep_interval: float | None = None, max_batch: int = MAX_BATCH,
                 peers: dict[str, str] | None = None, raft_options: dict | None = None, peer_ssl_context=None,
                 trust: auth.Trust | None = None):
        from cis490fleet.artifacts import ArtifactStore
        from cis490fleet.jobstore import JobStore

        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.manifest_path = Path(manifest_path) if manifest_path else None
        self.operator_token = operator_token or None
        self.trust = trust or auth.Trust(operator_tokens={auth.DEFAULT_OPERATOR: operator_token} if operator_token
                                         else {})
        self._known: tuple[float, dict[str, bytes], frozenset] | None = None  # (read at, host keys, manifest hosts)
        self._known_generation = 0  # raised by every key command, so a read that raced one is not cached
        self._known_lock = threading.Lock()
        self.node_id = node_id or socket.gethostname() or "coordinator"
        self.counters = Counters()
        self.lease_clock = LeaseClock()
        self.wall_clock: Callable[[], float] = time.time  # the ``now`` commands carry
        self.manifest: Manifest | None = None
        self.manifest_texts = ManifestTexts(self.manifest_path)
        self.url: str | None = None
        self._sweep_interval = sweep_interval
        self._stopping = threading.Event()
        self._wake = threading.Condition()
        self._generation = 0
        self._zipapp: tuple[bytes, str] | None = None
        self._install_script: tuple[bytes, str] | None = None
        self._zipapp_lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self.server = None
        self._serving: threading.Thread | None = None
        self._peer_urls: tuple[str, ...] = ()
        self._peer_ips: frozenset[str] = frozenset()
        self._closed = False
        self._data_lock = DataDirLock(self.data_dir)
        if (self.data_dir / "queue.sqlite3").exists():
            self.trust.forget_before(time.time())  # a restart: what the last run accepted is not remembered
        try:
            # Under Raft the log (synchronous=FULL) is the durable record and the queue is re-applied from it
            # after a crash, so the queue skips its own fsync per commit (replication.py's docstring).
            self.store = JobStore(self.data_dir / "queue.sqlite3", synchronous="NORMAL" if peers else synchronous)
        except BaseException:
            self._data_lock.release()
            raise
        self.artifacts = ArtifactStore(self.data_dir)
        self.artifacts.clean_tmp()
        self.checkpoints = ArtifactStore(self.data_dir, root="checkpoints")
        self.logs = ArtifactStore(self.data_dir, root="logs")  # attempts' train.log, gzip (log_api.py)
        self._readers = ThreadPoolExecutor(max_workers=READERS, thread_name_prefix="queue-read")
        self.replicator = None
        self.peer_ssl_context = peer_ssl_context
        if peers:
            from cis490fleet.replication import Replicator

            try:
                self.replicator = Replicator(self.data_dir, self.node_id, peers, self.store,
                                             on_applied=self._after_commit, ssl_context=peer_ssl_context,
                                             artifacts=self.artifacts, checkpoints=self.checkpoints,
                                             logs=self.logs, cluster_key=self.trust.cluster_key,
                                             **(raft_options or {}))
            except BaseException:
                self.store.close()
                self._data_lock.release()
                raise
            self.replicator.on_leader(self._on_leader)
            self.writer = self.replicator
        else:
            self.writer = GroupCommitWriter(self.store, max_batch=max_batch, on_applied=self._after_commit)
        self.notifier = Notifier(self.store, self.store.fleet,
                                 is_leader=lambda: self.replicator is None or self.replicator.is_leader())
        self.writer.start()

    @property
    def peer_ids(self) -> frozenset:
        return frozenset(self.replicator.peers) if self.replicator else frozenset()

    def _on_leader(self) -> None:
        """A new leader seeds the group with its ``--manifest`` when no manifest was ever applied; it never
        re-reads its file otherwise (the manifest in force is replicated state: ``jobs reload`` changes it)."""
        if self.manifest_path is None or not self.manifest_path.exists() or self._stopping.is_set():
            return
        try:
            text, name = self.manifest_texts.read()
            self._sync_text(text, name, seed_only=True)
        except errors.FleetError as err:
            log.warning("seeding the group with manifest %s failed: %s", self.manifest_path, err)

    def _check_manifest_file(self) -> None:
        """Say once, at start, whether this peer's ``--manifest`` differs from the group's manifest (waits
        until this peer has applied one)."""
        file_sha = self.manifest_texts.file_sha256()
        if file_sha is None:
            return
        while not self._stopping.wait(0.5):
            try:
                info = self.store.manifest_info()
            except errors.FleetError:
                return
            if info is not None:
                if info["sha256"] != file_sha:
                    log.warning("%s", manifest_source.differs(os.fspath(self.manifest_path), file_sha, info))
                return

    def leader_url(self) -> str | None:
        """The leader's URL when this peer follows one; None when it leads or runs alone (Unavailable while
        the group has no leader)."""
        return self.forward_url("/v1/jobs")

    def forward_url(self, template: str, params: dict | None = None) -> str | None:
        """Where a request for ``template`` must go: None to answer here, else the leader's URL.

        Unavailable when the group has no leader now."""
        if self.replicator is None or template in LOCAL_ROUTES or template == RELOAD_ROUTE:
            return None
        if template == "/v1/artifact/{sha256}":
            return None  # from this peer's store, else streamed from a peer that has it (open_artifact)
        st = self.replicator.status()
        if st["role"] == "leader":
            return None
        url = self.replicator.url_of(st["leader"])
        if url is None and st.get("lost"):
            raise errors.Unavailable(f"{st['lost']}; meanwhile send requests to another peer")
        if url is None and st.get("config") and self.node_id not in st["voters"] + st["learners"]:
            raise errors.Unavailable(f"this peer ({self.node_id}) is no longer a member of the group (members: "
                                     f"{', '.join(st['voters'] + st['learners'])}); send requests to one of them")
        if url is None:
            raise errors.Unavailable("no leader elected yet (election in progress); retry in a second")
        return url

    def _replicator(self):
        if self.replicator is None:
            raise errors.NotFound("this coordinator is not part of a replicated group (serve without --peer)")
        return self.replicator

    def raft_receive(self, body, *, answer: bool = False, request_nonce: str | None = None):
        """None, or with ``answer`` the (body, headers) of a response that carries this peer's answers."""
        replicator = self._replicator()
        messages = replicator.receive(body, answer)
        return None if messages is None else replicator.answer(messages, request_nonce)

    def raft_snapshot(self, cluster: str | None):
        return self._replicator().snapshot_copy(cluster)

    def raft_artifact(self, sha256: str, cluster: str | None, meta: str | None, body, length: int) -> dict:
        return self._replicator().receive_artifact(sha256, cluster, meta, body, length)

    # -- commands ------------------------------------------------------------------------------

    def execute(self, cmd: dict) -> dict:
        """Apply one command through the writer (the group-commit writer, or the Raft log), which validates it
        first (``commands.validate``); raises the FleetError it failed with."""
        cmd = dict(cmd)
        cmd.setdefault("now", self.wall_clock())
        return self.writer.execute(cmd)

    def _after_commit(self, cmds: list[dict], results: list) -> None:
        wake = False
        c = self.counters
        c.add("batches")
        c.add("commands", len(cmds))
        self.lease_clock.observe(cmds, results)
        for cmd, result in zip(cmds, results):
            if isinstance(result, BaseException):
                continue
            for sha in (result.get("unreferenced_checkpoints") or () if isinstance(result, dict) else ()):
                self.checkpoints.remove(sha)
            op = cmd.get("op")
            if op == "claim":
                c.add("claims" if result.get("job") is not None else "empty_claims")
            elif op == "complete":
                c.add("completions")
            elif op == "fail":
                c.add("failures")
            elif op == "sweep_stale":
                c.add("stale_recoveries", int(result.get("recovered", 0) or 0))
                c.add("stale_failures", int(result.get("failed", 0) or 0))
            if op in WAKE_OPS:
                wake = True
            if op in KEY_OPS:
                self.forget_known_hosts()
        if wake:
            self.wake_waiters()
        self.notifier.observe(cmds, results)

    def wake_waiters(self) -> None:
        with self._wake:
            self._generation += 1
            self._wake.notify_all()

    def claim(self, host: str, capability: dict, wait: float = 0.0, session: dict | None = None,
              slot: dict | None = None) -> dict:
        """A claim for ``host``; with ``wait``, hold on until a job is eligible or the wait ends.

        ``session`` (``client_id`` + ``serial``) goes into every try: the queue remembers only the try
        that got a job, so a retried request gets that job and lease again instead of a second one."""
        deadline = time.monotonic() + max(0.0, wait)
        while True:
            with self._wake:
                generation = self._generation
            t0 = time.perf_counter()
            if self.replicator is not None:
                lease = {"lease": None, "lease_from_index": True}  # the fencing token is the claim's log index
            else:
                lease = {"lease": tokens.token_hex(16)}
            result = self.execute({"op": "claim", "host": host, "capability": capability, **lease,
                                   **({} if slot is None else {"slot": slot}), **(session or {})})
            self.counters.observe_claim((time.perf_counter() - t0) * 1000)
            if result.get("job") is not None or wait <= 0:
                return result
            with self._wake:
                while self._generation == generation and not self._stopping.is_set():
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return result
                    self._wake.wait(left)
                if self._stopping.is_set() or time.monotonic() >= deadline:
                    return result

    def watch(self, job_id: str, host: str, lease: str | None, wait: float) -> dict:
        """Hold on until the job is cancelled (``{"cancel": true}``) or ``wait`` seconds pass; StaleLease
        as soon as the caller no longer holds it. Lets a worker stop a cancelled trainer within a second or
        two without heartbeating that often."""
        deadline = time.monotonic() + max(0.0, wait)
        while True:
            with self._wake:
                generation = self._generation
            if self._read(self.store.check_holder, job_id, host, lease)["status"] in model.HALTED_STATUSES:
                return {"cancel": True}
            with self._wake:
                while self._generation == generation and not self._stopping.is_set():
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return {"cancel": False}
                    self._wake.wait(left)
                if self._stopping.is_set() or time.monotonic() >= deadline:
                    return {"cancel": False}
    # -- hosts and their keys ------------------------------------------------------------------------

    def _known_hosts(self) -> tuple[dict[str, bytes], frozenset]:
        """Host keys and manifest host ids, re-read when a key command applies and, in a replicated group, at
        least every ``KNOWN_HOSTS_TTL_S`` (a snapshot installed on a follower changes them without a command)."""
        known = self._known
        if known is not None and (self.replicator is None or time.monotonic() - known[0] <= KNOWN_HOSTS_TTL_S):
            return known[1], known[2]  # alone, every change is a command here, which drops the cache
        # One thread re-reads; the others keep using the last read meanwhile (every claim would re-read at once).
        if known is not None and not self._known_lock.acquire(blocking=False):
            return known[1], known[2]
        if known is None:
            self._known_lock.acquire()
            known = self._known
            if known is not None:  # the read this thread waited for; a key command since would have dropped it
                self._known_lock.release()
                return known[1], known[2]
        try:
            generation = self._known_generation
            keys = self._read(self.store.host_keys)
            declared = frozenset(h.id for h in self._read(self.store.hosts))
            known = (time.monotonic(), keys, declared)
            if generation == self._known_generation:
                self._known = known
        finally:
            self._known_lock.release()
        return known[1], known[2]

    def forget_known_hosts(self) -> None:
        self._known_generation += 1
        self._known = None

    def host_key(self, host: str) -> bytes | None:
        """``host``'s key. A follower that does not know it yet waits a little for its queue to apply what the
        leader committed (a host added a moment ago through another peer), then answers."""
        key = self._known_hosts()[0].get(host)
        if key is None and self.replicator is not None and not self.replicator.is_leader():
            deadline = time.monotonic() + KEY_CATCH_UP_S
            while key is None and time.monotonic() < deadline and not self._stopping.is_set():
                time.sleep(0.05)
                self.forget_known_hosts()
                key = self._known_hosts()[0].get(host)
        return key

    def check_known_host(self, host: str) -> None:
        """Forbidden unless the fleet knows ``host``: a key from `jobs hosts add`, or a [[hosts]] entry."""
        keys, declared = self._known_hosts()
        if host not in keys and host not in declared:
            raise errors.Forbidden(f"host {host!r} is not part of this fleet: declare it in the manifest's "
                                   f"[[hosts]], or {auth.ADD_HOST_HINT.format(host=host)}")

    def hosts_list(self) -> list[dict]:
        """Hosts with keys (never the keys) and manifest hosts without one."""
        rows = self._read(self.store.host_key_list)
        declared = {h.id for h in self._read(self.store.hosts)}
        for row in rows:
            row["in_manifest"] = row["host"] in declared
        seen = {row["host"] for row in rows}
        rows += [{"host": h, "created": None, "created_by": None, "revoked": None, "revoked_by": None,
                  "in_manifest": True} for h in sorted(declared - seen)]
        return sorted(rows, key=lambda r: r["host"])

    def enroll_commands(self, host: str, key: str, receiver: str) -> dict | None:
        """The ready-to-paste enroll commands for a new host key, pinned to this zipapp's sha256."""
        try:
            from cis490fleet import bootstrap
        except ImportError:
            return None
        return bootstrap.enroll_commands(receiver, host, key, self.zipapp()[1], self.install_script()[1])

    # -- reads ---------------------------------------------------------------------------------------

    def _read(self, fn, *args, **kw):
        """Run a store read on the reader pool: a few long-lived threads, so a few SQLite connections,
        however many client connections come and go."""
        try:
            future = self._readers.submit(fn, *args, **kw)
        except RuntimeError:  # the pool is shut down
            raise errors.Unavailable("the coordinator is shutting down; retry later") from None
        return future.result()

    def resolve_job_id(self, ref: str) -> str:
        return self._read(self.store.resolve, ref)

    def _barrier(self) -> None:
        """In a replicated group: make the next read see every write committed before it (ReadIndex).

        Asked whatever the role, so there is no window between ``forward_url`` choosing to answer here and
        the read: a peer that is no longer the leader forwards its ReadIndex to the new one and waits until
        it has applied that far (raft.read_index), or raises NotLeader while no leader is known."""
        if self.replicator is not None:
            self.replicator.read_barrier()

    def job_detail(self, ref: str) -> dict:
        self._barrier()
        return self._read(self.store.job, ref, time.time())

    def list_jobs(self, *, status=None, model=None, host=None, limit=1000, offset=0) -> tuple[list, int]:
        self._barrier()
        return self._read(self.store.jobs, status=status, model=model, host=host, limit=limit, offset=offset)

    def workers(self) -> list:
        self._barrier()
        return self._read(self.store.workers, time.time())

    def failures(self, limit: int = 20) -> list:
        self._barrier()
        return self._read(self.store.recent_failures, limit)

    def submit_jobs(self, text: str, *, dry_run: bool = False) -> dict:
        """Add the jobs of a ``[[jobs]]``/``[[sweeps]]`` snippet, checked with the manifest in force."""
        from cis490fleet import submission

        added = submission.new_jobs(text, self._read(self.store.manifest_text))
        listed = [{"id": j.id, "name": j.name, "model": j.model, "mode": j.mode, "hyper": j.hyper, "seed": j.seed}
                  for j in added]
        if dry_run or not added:
            return {"dry_run": dry_run, "added": 0, "existing": 0, "jobs": listed}
        result = self.execute({"op": "submit_jobs", "jobs": [j.to_json() for j in added]})
        return {"dry_run": False, "added": result["added"], "existing": result["existing"], "jobs": listed}

    def metric_history(self, ref: str) -> list:
        self._barrier()
        return self._read(self.store.metric_history, ref)

    def results(self, *, sweep: str | None = None, model: str | None = None) -> list:
        self._barrier()
        return self._read(self.store.results, sweep=sweep, model=model)

    def fleet(self) -> FleetConfig:
        return self._read(self.store.fleet)

    def max_artifact_bytes(self) -> int:
        return int(self.fleet().max_artifact_bytes)

    def health(self) -> dict:
        peers = [{"id": pid, "url": url} for pid, url in self.fleet().peers]
        out = {"ok": True, "role": "leader", "leader": self.node_id, "term": 1, "node_id": self.node_id,
               "version": __version__, "url": self.url, "jobs": self._read(self.store.counts), "peers": peers,
               "security": self.trust.summary()}
        out["manifest"] = self._read(self.store.manifest_info)
        out["apply_failures"] = len(self._read(self.store.apply_failures))
        if self.replicator is not None:
            out.update(self.replicator.health())
        return out

    # -- artifacts ----------------------------------------------------------------------------------

    def _holder_job(self, job_id: str, host: str, lease: str | None) -> dict:
        """``JobStore.check_holder`` (the full lease), plus the status ``record_artifact`` would refuse:
        an upload that the job would not take is refused before a byte of it is read."""
        job = self._read(self.store.check_holder, job_id, host, lease)
        if job["status"] not in model.HELD_STATUSES and job["status"] != model.COMPLETED:
            raise errors.InvalidTransition(job_id, job["status"], "upload a bundle for")
        return job

    def store_artifact(self, job_id: str, host: str, lease: str | None, body, sha256: str, length: int) -> dict:
        """Check the holder before reading a byte, stream the bundle to the store, then record it on the job."""
        job = self._holder_job(job_id, host, lease)
        now = time.time()
        result = self.artifacts.put(body, sha256=sha256, length=length, model=job["model"], mode=job["mode"],
                                    job_id=job_id, host=host, now=now)
        if self.replicator is not None:
            # On a majority's disks before record_artifact commits, so complete survives the leader's disk.
            self.replicator.push_artifact(result["artifact_id"], {"model": job["model"], "mode": job["mode"],
                                                                  "job_id": job_id, "host": host, "now": now})
        self.execute({"op": "record_artifact", "artifact_id": result["artifact_id"], "job_id": job_id, "host": host,
                      "lease": lease, "model": job["model"], "mode": job["mode"], "size": result["size"],
                      "path": result["path"]})
        return result

    def open_artifact(self, sha256: str, *, from_peers: bool = True):
        """(file, size) of a stored bundle; one this peer lacks (not fetched yet) is streamed from a peer
        that has it, unless ``from_peers`` is False (a peer asking: it asks the others itself)."""
        try:
            return self.artifacts.open_artifact(sha256)
        except errors.NotFound:
            if self.replicator is None or not from_peers:
                raise
        return self.replicator.open_remote(f"/v1/artifact/{sha256}")

    def zipapp(self) -> tuple[bytes, str]:
        """The running zipapp's bytes, else one built from these sources (built once, then cached)."""
        with self._zipapp_lock:
            if self._zipapp is None:
                data = _running_zipapp_bytes()
                if data is None:
                    from cis490fleet import zipbuild

                    data = zipbuild.build()
                self._zipapp = (data, hashlib.sha256(data).hexdigest())
            return self._zipapp

    def install_script(self) -> tuple[bytes, str]:
        """install-worker.ps1 as this build ships it (in the zipapp too), and its sha256: what Windows hosts
        download, pinned, from ``GET /v1/install-worker.ps1``."""
        if self._install_script is None:
            import importlib.resources

            data = (importlib.resources.files("cis490fleet") / "windows" / "install-worker.ps1").read_bytes()
            self._install_script = (data, hashlib.sha256(data).hexdigest())
        return self._install_script

    # -- the manifest ------------------------------------------------------------------------------

    def load_manifest(self, *, at_start: bool = False) -> dict | None:
        """Read this peer's manifest file and put it in force; a missing file at start-up is an empty queue."""
        if self.manifest_path is None:
            if at_start:
                log.warning("no --manifest given: the queue holds only what earlier runs put there")
                return None
            raise errors.BadRequest("this coordinator was started without --manifest; send the manifest "
                                    "(jobs reload FILE), or restart it with --manifest FILE")
        if at_start and not self.manifest_path.exists():
            log.warning("manifest %s does not exist yet: starting with the queue as it is; create it and run "
                        "'jobs reload'", self.manifest_path)
            return None
        text, name = self.manifest_texts.read()
        return self._sync_text(text, name)

    def _sync_text(self, text: str, name: str, *, seed_only: bool = False) -> dict:
        loaded, cmd = self.manifest_texts.command(text, name, seed_only=seed_only)
        result = self.execute(cmd)
        if result.get("seeded") is False:
            file_sha = commands.manifest_sha256(text)
            if result["manifest"] and result["manifest"]["sha256"] != file_sha:
                log.warning("%s", manifest_source.differs(name, file_sha, result["manifest"]))
            return result
        self.manifest = loaded
        log.info("manifest %s (sha256 %s): %s added, %s kept, %s removed, %s total", name,
                 result["manifest"]["sha256"][:16], result.get("added"), result.get("kept"), result.get("removed"),
                 result.get("total"))
        return result

    def reload_manifest(self, text: str | None = None, name: str | None = None) -> dict:
        """Put ``text`` (the operator's manifest) in force, else this peer's own file's text."""
        if text is None:
            result = self.load_manifest()
        else:
            result = self._sync_text(text, name or "manifest")
        return {"added": result.get("added", 0), "kept": result.get("kept", 0), "removed": result.get("removed", 0),
                "total": result.get("total", 0), **result}

    def sync(self, manifest: Manifest) -> dict:
        """Sync an in-memory manifest (tests and embedding); same effect as a reload."""
        result = self.execute({"op": "sync_manifest", "manifest": manifest.to_json()})
        self.manifest = manifest
        return result

    # -- threads and lifecycle ------------------------------------------------------------------

    def sweep_interval(self) -> float:
        if self._sweep_interval:
            return self._sweep_interval
        return max(0.05, min(self.fleet().heartbeat_s, 10.0))

    def sweep_once(self) -> dict:
        if self.replicator is not None and not self.replicator.is_leader():
            return {"recovered": 0, "failed": 0}  # the leader sweeps for the group
        hold = self.lease_clock.hold(self.fleet().stale_after_s)
        if hold is None:
            return {"recovered": 0, "failed": 0}  # not up for a whole stale window yet: it cannot tell
        result = self.execute({"op": "sweep_stale", "hold": hold})
        if result.get("recovered") or result.get("failed"):
            log.info("stale sweep: %s job(s) back to pending, %s failed", result.get("recovered", 0),
                     result.get("failed", 0))
        return result

    def _sweeper(self) -> None:
        while not self._stopping.wait(self.sweep_interval()):
            try:
                self.sweep_once()
            except errors.Unavailable:
                if self.replicator is None or self._stopping.is_set():
                    return
            except errors.NotLeader:
                continue
            except Exception:
                log.exception("stale sweep failed; trying again in %.1f s", self.sweep_interval())

    def _watchdog(self, interval: float) -> None:
        while not self._stopping.wait(interval):
            if self.writer.alive:
                sd_notify("WATCHDOG=1")

    def start_background(self) -> None:
        """Start the sweeper and, under systemd with a watchdog, the watchdog pings."""
        threads = [threading.Thread(target=self._sweeper, name="stale-sweeper", daemon=True)]
        interval = watchdog_interval()
        if interval:
            threads.append(threading.Thread(target=self._watchdog, args=(interval,), name="watchdog", daemon=True))
        for t in threads:
            t.start()
        self._threads += threads
        self.notifier.start()
        if self.replicator is not None and self.manifest_path is not None:  # ends when it has said its piece
            threading.Thread(target=self._check_manifest_file, name="manifest-check", daemon=True).start()

    def listen(self, host: str, port: int, ssl_context=None, *, per_address: int | None = None):
        """Bind the HTTP server (not yet serving); sets ``url``. The group's peers are exempt from the
        per-address connection cap (a follower forwards many workers' long-polls)."""
        from cis490fleet import connection_guard
        from cis490fleet.http_api import FleetHTTPServer

        self.server = FleetHTTPServer((host, port), self, ssl_context=ssl_context, exempt=self._is_peer_address,
                                      per_address=per_address or connection_guard.PER_ADDRESS)
        scheme = "https" if ssl_context is not None else "http"
        shown = f"[{host}]" if ":" in host else host
        self.url = f"{scheme}://{shown}:{self.server.port}"
        return self.server

    def _is_peer_address(self, address: str) -> bool:
        """Whether ``address`` (a ``connection_guard.client_key``) is one of the group's members now (their URLs
        resolved again after a change)."""
        from cis490fleet import connection_guard

        urls = tuple(sorted(self.replicator.peers.values())) if self.replicator is not None else ()
        if urls != self._peer_urls:
            self._peer_urls = urls
            self._peer_ips = frozenset(map(connection_guard.client_key, connection_guard.peer_addresses(urls)))
        return address in self._peer_ips

    def dead_threads(self) -> list[str]:
        """Names of the started threads ``serve`` cannot do without that have ended (none while all run)."""
        dead = []
        if self._serving is not None and not self._serving.is_alive():
            dead.append(self._serving.name)
        if not self.writer.alive:
            dead.append("raft-driver" if self.replicator is not None else "group-commit")
        dead += [t.name for t in self._threads if not t.is_alive()]
        if self._threads and not self.notifier.alive():
            dead.append("notifier")
        return dead

    def serve_in_thread(self) -> threading.Thread:
        """Serve HTTP on a daemon thread (after ``listen``)."""
        self._serving = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.2},
                                         name="http-accept", daemon=True)
        self._serving.start()
        return self._serving

    def close(self, grace: float = STOP_GRACE_S) -> None:
        """Stop accepting, let requests in flight finish, stop the writer, close the database. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self.replicator is not None:
            self.replicator.hand_over()
        self._stopping.set()
        self.wake_waiters()
        if self.server is not None:
            if self._serving is not None:
                self.server.shutdown()
                if not self.server.wait_idle(grace):
                    log.warning("requests still running after %.0f s; stopping anyway", grace)
            self.server.server_close()
        for t in self._threads:
            t.join(5)
        self._readers.shutdown(wait=True)
        self.writer.stop(grace)
        self.notifier.stop()
        self.store.close()
        log.info("database closed")
        self._data_lock.release()


def _running_zipapp_bytes() -> bytes | None:
    """The bytes of the .pyz this process runs from, when it runs from one."""
    import cis490fleet

    loader = getattr(cis490fleet, "__loader__", None)
    archive = getattr(loader, "archive", None)
    candidates = [archive] if archive else []
    if sys.argv and sys.argv[0].endswith(".pyz"):
        candidates.append(sys.argv[0])
    for path in candidates:
        try:
            return Path(path).read_bytes()
        except OSError:
            continue
    return None


# -- command line -----------------------------------------------------------------------------------


def parse_bind(value: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[IPv6]:PORT`` -> (host, port)."""
    text = value.strip()
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise errors.ConfigError(f"--bind {value!r} is not HOST:PORT; e.g. --bind 127.0.0.1:8445 (port 0 picks one)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        port = int(port_text)
    except ValueError:
        raise errors.ConfigError(f"--bind {value!r}: port {port_text!r} is not a number") from None
    if not 0 <= port <= 65535:
        raise errors.ConfigError(f"--bind {value!r}: port {port} is out of range 0..65535")
    return host, port


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_token(path: str | None, env: dict) -> str | None:
    if path:
        p = Path(path)
        try:
            token = p.read_text(encoding="utf-8").strip()
        except OSError as err:
            raise errors.ConfigError(f"--operator-token-file {path}: cannot read it ({err.strerror or err})") from None
        except UnicodeDecodeError:
            raise errors.ConfigError(f"--operator-token-file {path} is not UTF-8 text; write the token as plain "
                                     "text, e.g. the output of: python3 -c 'import secrets; print(secrets.token_hex(16))'"
                                     ) from None
        if not token:
            raise errors.ConfigError(f"--operator-token-file {path} is empty; put the operator token in it")
        if os.name != "nt":
            mode = p.stat().st_mode
            if mode & (stat.S_IRWXG | stat.S_IRWXO):
                log.warning("operator token file %s is readable by others; chmod 600 it", path)
        return token
    token = (env.get(ENV_TOKEN) or "").strip()
    return token or None


def _operator_tokens(path: str | None, env: dict) -> dict[str, str]:
    """Named operator tokens from --operator-token-file (name:token lines, or one bare token), else the
    environment's one token, named 'operator'."""
    if path:
        return auth.read_named_tokens(path, "--operator-token-file", auth.DEFAULT_OPERATOR)
    token = read_token(None, env)
    return {auth.DEFAULT_OPERATOR: token} if token else {}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cis490fleet serve", description="Run a coordinator: manifest, queue, "
                                "artifact store, HTTP API.")
    p.add_argument("--data", help=f"data folder (default ${ENV_DATA}, else the per-user state folder)")
    p.add_argument("--manifest", help="training manifest (TOML); loaded and synced at start, re-read on reload")
    p.add_argument("--bind", default=DEFAULT_BIND, help=f"HOST:PORT to listen on (default {DEFAULT_BIND}; port 0 "
                   "picks a free one)")
    p.add_argument("--port-file", help="also write the URL this coordinator listens on to this file")
    p.add_argument("--operator-token-file", help=f"operator tokens, one name:token per line (a bare token is named "
                   f"'{auth.DEFAULT_OPERATOR}'); else ${ENV_TOKEN}")
    p.add_argument("--read-token-file", help=f"read tokens (name:token lines) for jobs, logs, artifacts, metrics; "
                   f"also ${ENV_READ_TOKEN}")
    p.add_argument("--public-read", action="store_true", help="let anyone read jobs, workers, logs, artifacts and "
                   "metrics without a token")
    p.add_argument("--trust-host-header", action="store_true",
                   help="legacy mode for a closed lab network: x-lab-host names the worker unproved, leases are "
                   "optional, reads are open (anyone who reaches the port can claim as any host)")
    p.add_argument("--cluster-key-file", help="the key the peers share to prove they are peers (created, mode "
                   "0600, if missing: copy it to every other peer)"),
    p.add_argument("--cert", help="TLS certificate (PEM)")
    p.add_argument("--key", help="TLS private key (PEM)")
    p.add_argument("--client-ca", help="CA (PEM) that signs worker certificates: turns on mutual TLS")
    p.add_argument("--insecure", action="store_true",
                   help="allow plain HTTP on a non-loopback address (only on a network you trust)")
    p.add_argument("--sweep-interval", type=float, help="seconds between stale sweeps (default min(heartbeat_s, 10))")
    p.add_argument("--synchronous", default="FULL", type=str.upper, choices=("FULL", "EXTRA", "NORMAL"),
                   help="SQLite synchronous mode (default FULL: every acknowledged claim survives a power cut); "
                   "with peers the Raft log is always FULL and the queue NORMAL, re-applied from the log")
    p.add_argument("--node-id", help="this peer's id in health answers (default: the host name)")
    p.add_argument("--peer", action="append", default=[], metavar="ID=URL",
                   help="a member of a NEW replicated coordinator group (repeat for every member, this one included; "
                   "default: [[fleet.peers]] of the manifest); with none, serve runs alone. Once the group exists "
                   "its log holds the members: change them with jobs peers add/remove/replace")
    p.add_argument("--join", action="store_true",
                   help="this peer joins an existing group (give --peer ID=URL for itself): with an empty raft "
                   "store it waits until jobs peers add ID=URL (or replace) runs on a member")
    p.add_argument("--raft-tick-ms", type=float, default=50.0, help="Raft tick (default 50 ms)")
    p.add_argument("--raft-heartbeat-ticks", type=int, default=3,
                   help="ticks between leader heartbeats (default 3: every 150 ms)")
    p.add_argument("--raft-election-ticks", default="20-40", metavar="LO-HI",
                   help="randomized election timeout in ticks (default 20-40: 1.0-2.0 s at 50 ms ticks)")
    p.add_argument("--raft-snapshot-every", type=int, default=10_000, metavar="N",
                   help="compact the Raft log every N applied entries (default 10000; 0 never)")
    p.add_argument("--peer-ca", help="CA (PEM) that signs the peers' certificates (default --client-ca)")
    p.add_argument("--max-connections-per-address", type=int, default=None, metavar="N",
                   help="most connections one client address may hold at once (default 64; peers are exempt)")
    p.add_argument("--max-batch", type=int, default=MAX_BATCH, metavar="N",
                   help=f"most queue commands committed in one transaction (default {MAX_BATCH}); 1 gives one "
                   "fsync per command, the baseline of bench/run.py")
    return p


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _peer_settings(args) -> tuple[dict[str, str] | None, dict, object]:
    """``--peer`` (else the manifest's ``[[fleet.peers]]``) and the Raft timing flags, checked."""
    pairs = []
    if args.peer:  # the Raft modules are imported only by a replicated coordinator (a few MiB of RSS)
        from cis490fleet.replication import parse_peer

        pairs = [parse_peer(v) for v in args.peer]
    if not pairs and args.manifest and Path(args.manifest).exists():
        from cis490fleet import manifest as manifest_mod

        pairs = list(manifest_mod.load(args.manifest).fleet.peers)
    if not pairs:
        if args.join:
            raise errors.ConfigError("--join needs this peer's own address: --node-id ID --peer ID=URL")
        return None, {}, None
    peers = dict(pairs)
    if len(peers) != len(pairs):
        raise errors.ConfigError("--peer lists an id twice; give each member once as ID=URL")
    if not args.node_id:
        raise errors.ConfigError("a replicated group needs --node-id: which of the --peer ids this one is "
                                 f"({', '.join(sorted(peers))})")
    lo, sep, hi = args.raft_election_ticks.partition("-")
    try:
        election = (int(lo), int(hi))
    except ValueError:
        raise errors.ConfigError(f"--raft-election-ticks {args.raft_election_ticks!r} is not LO-HI, "
                                 "e.g. 10-20") from None
    if not sep or not 0 < args.raft_heartbeat_ticks < election[0] < election[1]:
        raise errors.ConfigError("need 0 < --raft-heartbeat-ticks < LO < HI of --raft-election-ticks; got "
                                 f"{args.raft_heartbeat_ticks} and {args.raft_election_ticks}")
    if not args.raft_tick_ms > 0 or args.raft_snapshot_every < 0:
        raise errors.ConfigError("--raft-tick-ms must be > 0 and --raft-snapshot-every >= 0")
    peer_ssl = None
    if args.cert:
        from cis490fleet import tls

        peer_ssl = tls.client_context(ca=args.peer_ca or args.client_ca, cert=args.cert, key=args.key)
    options = {"tick_s": args.raft_tick_ms / 1000, "election_ticks": election,
               "heartbeat_ticks": args.raft_heartbeat_ticks, "snapshot_every": args.raft_snapshot_every,
               "join": args.join}
    return peers, options, peer_ssl


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    env = os.environ
    host, port = parse_bind(args.bind)
    if args.max_batch < 1:
        raise errors.ConfigError(f"--max-batch {args.max_batch} must be a whole number >= 1")
    if args.max_connections_per_address is not None and args.max_connections_per_address < 1:
        raise errors.ConfigError(f"--max-connections-per-address {args.max_connections_per_address} must be a "
                                 "whole number >= 1")
    if args.sweep_interval is not None and not args.sweep_interval > 0:
        raise errors.ConfigError(f"--sweep-interval {args.sweep_interval} must be a number of seconds > 0")
    if (args.key or args.client_ca) and not args.cert:
        raise errors.ConfigError("--key and --client-ca need --cert: give the server's certificate too")
    if not args.cert and not is_loopback(host) and not args.insecure:
        raise errors.ConfigError(
            f"refusing to listen on {host}:{port} without TLS: anyone on that network could read the traffic; "
            "give --cert and --key (and --client-ca for mutual TLS), bind 127.0.0.1, or pass "
            "--insecure if the network is trusted")
    if args.trust_host_header and not is_loopback(host) and not args.client_ca and not args.insecure:
        raise errors.ConfigError(
            f"refusing to listen on {host}:{port} with --trust-host-header: any client there could claim jobs and "
            "upload models as any host; drop --trust-host-header (workers then sign with keys from "
            "`jobs hosts add`), bind 127.0.0.1, or pass --insecure as well for a closed lab network")
    ssl_context = None
    if args.cert:
        from cis490fleet import tls

        ssl_context = tls.server_context(args.cert, args.key, args.client_ca)
    operator_tokens = _operator_tokens(args.operator_token_file, env)
    token = next(iter(operator_tokens.values()), None)
    read_tokens = auth.read_named_tokens(args.read_token_file, "--read-token-file", "reader") \
        if args.read_token_file else {}
    if (env.get(ENV_READ_TOKEN) or "").strip():
        read_tokens.setdefault("reader", env[ENV_READ_TOKEN].strip())
    cluster_key = auth.load_or_create_key(args.cluster_key_file, "--cluster-key-file") \
        if args.cluster_key_file else None
    trust = auth.Trust(operator_tokens=operator_tokens, read_tokens=read_tokens, cluster_key=cluster_key,
                       legacy=args.trust_host_header, public_read=args.public_read)
    data_dir = Path(args.data).expanduser() if args.data else default_data_dir(env)
    try:
        data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as err:
        raise errors.ConfigError(f"cannot create data folder {data_dir}: {err.strerror or err}; pass --data DIR") from None

    peers, raft_options, peer_ssl = _peer_settings(args)
    if peers and (len(peers) > 1 or getattr(args, "join", False)) and cluster_key is None \
            and not (args.client_ca or args.peer_ca):
        raise errors.ConfigError(
            "peers must prove to each other that they are peers: give every peer the same --cluster-key-file "
            "(the first peer creates it, mode 0600, when it does not exist; copy it to the others), or run them "
            "under mutual TLS with --client-ca/--peer-ca")
    coord = Coordinator(data_dir, manifest_path=args.manifest, operator_token=token, synchronous=args.synchronous,
                        node_id=args.node_id, sweep_interval=args.sweep_interval, max_batch=args.max_batch,
                        peers=peers, raft_options=raft_options, peer_ssl_context=peer_ssl, trust=trust)
    try:
        if coord.replicator is None:
            coord.load_manifest(at_start=True)  # a replicated group syncs when a leader is elected
        try:
            server = coord.listen(host, port, ssl_context, per_address=args.max_connections_per_address)
        except OSError as err:
            raise errors.ConfigError(f"cannot listen on {args.bind}: {err.strerror or err}; pick another --bind "
                                     "(port 0 picks a free one)") from None
    except BaseException:
        coord.close()
        raise

    stop = threading.Event()

    def on_signal(signum, frame):
        log.info("received %s: stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    if not token:
        log.warning("no operator token: cancel, requeue, reload and hosts are refused; set %s or "
                    "--operator-token-file", ENV_TOKEN)
    if args.trust_host_header:
        log.warning("LEGACY MODE (--trust-host-header): workers are not authenticated; x-lab-host names a worker "
                    "unproved, leases are optional and reads are open. Use it only on a closed lab network.")
    coord.serve_in_thread()
    coord.start_background()
    (data_dir / "serve.url").unlink(missing_ok=True)
    _write_atomic(data_dir / "serve.url", coord.url + "\n")
    if args.port_file:
        _write_atomic(Path(args.port_file), coord.url + "\n")
    print(f"listening on {coord.url}", flush=True)
    if peers:
        own = peers[coord.node_id]
        if urllib.parse.urlsplit(own).port not in (None, server.port):
            log.warning("--peer %s=%s names another port than this serve listens on (%d): the other peers reach "
                        "it there only through a proxy", coord.node_id, own, server.port)
    log.info("listening on %s (data %s, node %s)", coord.url, data_dir, coord.node_id)
    sd_notify("READY=1\nSTATUS=listening on " + coord.url)

    dead: list[str] = []
    while not stop.wait(1.0) and not dead:
        dead = coord.dead_threads()
    if dead:
        # Non-zero, so that systemd's Restart=on-failure starts serve again.
        log.error("the %s thread ended unexpectedly (its traceback is above); stopping with exit status %d so "
                  "that the service manager restarts serve", ", ".join(dead), errors.EXIT_FAILED)
    sd_notify("STOPPING=1")
    try:
        coord.close()
    finally:
        (data_dir / "serve.url").unlink(missing_ok=True)
    return errors.EXIT_FAILED if dead else 0
