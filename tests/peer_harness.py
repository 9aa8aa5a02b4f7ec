"""Chaos harness for a replicated coordinator group: link proxies, peer processes, faults, final state.

- ``LinkProxy`` — a TCP proxy on 127.0.0.1 for one directed link (peer a -> peer b),
  switchable at run time: ``pass``, ``delay`` (added latency, ms), ``blackhole``
  (accept, read and drop every byte: the sender sees a timeout), ``refuse``
  (accept and reset at once: the sender sees a connection error) and ``reset``
  (cut every open connection once, then pass). Partitions without root.
- ``PeerGroup`` — N ``serve --peer ...`` subprocesses, each with its own data folder
  and manifest copy; peer a's ``--peer b=URL`` is the proxy a->b, its own entry is its
  real URL (``proxies=False``: all direct, for benchmarks). Faults: ``kill9``, ``pause``
  (SIGSTOP), ``resume`` (SIGCONT), ``restart``, ``partition(groups)``, ``heal()``.
  ``wait_leader()`` finds the leader a majority names; ``converged_states()`` reads every
  peer's ``queue.sqlite3`` read-only until all agree.
- ``Workload`` — worker threads that claim, upload a small bundle and complete, half over raw
  http.client (signed by hand with the host's key, the claim's lease on every write), half through
  our ``Client``; every acknowledged claim and complete goes into a ``History``. The peers share
  ``conftest.CLUSTER_KEY``; each host gets its key through ``jobs hosts add`` (``conftest.GroupKeys``).
- ``check_history(history, state)`` — exactly-once and single-lease problems, as sentences.

Only ``ClientWorker`` and the signing of ``RawWorker`` import the project; the rest talks HTTP and SQLite like
an outsider.
"""

from __future__ import annotations

import http.client
import json
import math
import os
import queue
import random
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from conftest import GroupKeys, alias, cluster_key_file, signed

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
MODES = ("pass", "delay", "blackhole", "refuse", "reset")
CHUNK = 64 * 1024


def _hard_close(sock: socket.socket) -> None:
    """Close with RST (SO_LINGER 0): the other end sees a reset, not a clean end of stream.
    SHUT_RD first wakes a pump thread blocked reading this socket."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.shutdown(socket.SHUT_RD)
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass


class LinkProxy:
    """A TCP proxy for one directed link; ``set_mode`` switches what it does to old and new connections."""

    def __init__(self, target_port: int, name: str = "", mode: str = "pass", delay_ms: float = 0.0):
        self.name = name
        self.target_port = target_port
        self._lock = threading.Lock()
        self._mode = "pass"
        self.delay_ms = 0.0
        self._conns: set[tuple[socket.socket, socket.socket | None]] = set()
        self._closed = False
        self.accepted = 0
        self.bytes_forwarded = 0
        self.bytes_dropped = 0
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((HOST, 0))
        self._listener.listen(128)
        self.port = self._listener.getsockname()[1]
        self.url = f"http://{HOST}:{self.port}"
        alias(self.url, target_port)  # requests to a fixture server through this proxy are signed for it
        self.set_mode(mode, delay_ms)
        self._thread = threading.Thread(target=self._accept_loop, name=f"proxy-{name}", daemon=True)
        self._thread.start()

    @property
    def mode(self) -> str:
        return self._mode

    def set_mode(self, mode: str, delay_ms: float | None = None) -> None:
        """Switch the link. Entering ``blackhole`` keeps open connections but drops their bytes (the
        sender waits, as behind a dead switch); leaving it resets them, so that no half-forwarded
        request survives a partition and every peer reconnects cleanly after it."""
        if mode not in MODES:
            raise ValueError(f"link mode {mode!r} is not one of {', '.join(MODES)}")
        if delay_ms is not None:
            if delay_ms < 0:
                raise ValueError(f"delay_ms must be >= 0, got {delay_ms}")
            self.delay_ms = float(delay_ms)
        with self._lock:
            old, self._mode = self._mode, ("pass" if mode == "reset" else mode)
            cut = mode in ("reset", "refuse") or (old == "blackhole" and mode != "blackhole")
            victims = list(self._conns) if cut else []
            if cut:
                self._conns.clear()
        for client, upstream in victims:
            _hard_close(client)
            if upstream is not None:
                _hard_close(upstream)

    def open_connections(self) -> int:
        with self._lock:
            return len(self._conns)

    def close(self) -> None:
        self._closed = True
        try:
            self._listener.close()
        except OSError:
            pass
        self.set_mode("reset")

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            self.accepted += 1
            mode = self._mode
            if mode == "refuse":
                _hard_close(client)
                continue
            threading.Thread(target=self._serve, args=(client, mode), daemon=True).start()

    def _serve(self, client: socket.socket, mode: str) -> None:
        upstream = None
        if mode != "blackhole":
            try:
                upstream = socket.create_connection((HOST, self.target_port), timeout=5)
                upstream.settimeout(None)
                upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                _hard_close(client)
                return
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        pair = (client, upstream)
        with self._lock:
            if self._closed or self._mode == "refuse" or (mode == "blackhole" and self._mode != "blackhole"):
                _hard_close(client)
                if upstream is not None:
                    _hard_close(upstream)
                return
            self._conns.add(pair)
        if upstream is None:
            self._pump(client, None, pair)
            return
        threading.Thread(target=self._pump, args=(upstream, client, pair), daemon=True).start()
        self._pump(client, upstream, pair)

    def _pump(self, src: socket.socket, dst: socket.socket | None, pair) -> None:
        """Read ``src``; hand each chunk to a writer that sends it once its delay has passed. The delay is
        latency, not a throughput cap: chunks read back to back leave back to back, each ``delay_ms`` late."""
        out: queue.SimpleQueue | None = None
        if dst is not None:
            out = queue.SimpleQueue()
            threading.Thread(target=self._write, args=(out, dst, pair), daemon=True).start()
        try:
            while True:
                data = src.recv(CHUNK)
                if not data:
                    break
                mode = self._mode
                if mode == "blackhole" or out is None:
                    self.bytes_dropped += len(data)
                    continue
                out.put((time.monotonic() + (self.delay_ms / 1000 if mode == "delay" else 0.0), data))
        except OSError:
            pass
        if out is not None:
            out.put(None)
        else:
            self._finish(pair)

    def _write(self, out: queue.SimpleQueue, dst: socket.socket, pair) -> None:
        while (item := out.get()) is not None:
            due, data = item
            wait = due - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            try:
                dst.sendall(data)
            except OSError:
                break
            self.bytes_forwarded += len(data)
        self._finish(pair)

    def _finish(self, pair) -> None:
        """One direction ended: end the other too (a half-closed HTTP connection is of no use to a peer)."""
        with self._lock:
            tracked = pair in self._conns
            self._conns.discard(pair)
        if tracked:
            for sock in pair:
                if sock is not None:
                    try:
                        sock.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                    sock.close()


# -- HTTP as an outsider ---------------------------------------------------------------------------------


def http_json(url: str, method: str, path: str, body: Any = None, headers: dict | None = None,
              timeout: float = 5.0) -> tuple[int, Any]:
    """One request on a fresh connection: (status, decoded JSON or raw bytes). Raises OSError on no answer."""
    host_port = url.split("://", 1)[1].rstrip("/")
    host, port = host_port.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        headers = dict(headers or {})
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
            headers.setdefault("content-type", "application/json")
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
    except (http.client.HTTPException, ValueError) as err:
        raise ConnectionError(f"{method} {url}{path}: {err}") from err
    finally:
        conn.close()
    if data and resp.headers.get("content-type", "").startswith("application/json"):
        try:
            return resp.status, json.loads(data)
        except ValueError:
            pass
    return resp.status, data


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


_PEER_SUPPORT: dict[str, bool] = {}


def serve_supports_peers() -> bool:
    """Whether ``serve`` takes ``--peer`` (the replicated coordinator has landed)."""
    if "peer" not in _PEER_SUPPORT:
        out = subprocess.run([sys.executable, "-m", "cis490fleet", "serve", "--help"], cwd=ROOT, env=peer_env(),
                             capture_output=True, text=True, timeout=60)
        _PEER_SUPPORT["peer"] = "--peer" in out.stdout + out.stderr
    return _PEER_SUPPORT["peer"]


def peer_env(extra: dict | None = None, token: str | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CIS490_", "NOTIFY_SOCKET", "WATCHDOG_"))}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONFAULTHANDLER"] = "1"  # a peer that dies of a signal leaves its threads' stacks in its log
    if token:
        env["CIS490_OPERATOR_TOKEN"] = token
    env.update(extra or {})
    return env


# -- the group ----------------------------------------------------------------------------------------


@dataclass
class Peer:
    node_id: str
    port: int
    data_dir: Path
    manifest: Path | None
    log_path: Path
    proc: subprocess.Popen | None = None
    paused: bool = False
    starts: int = 0
    join: bool = False  # started with --join: waits to be added to the group (jobs peers add)

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_text(self, tail: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-tail:] if self.log_path.exists() else ""


@dataclass
class PeerGroup:
    """N replicated ``serve`` peers behind one proxy per directed link (``proxies=False``: direct, for
    benchmarks). Use as a context manager."""

    base: Path
    n: int = 3
    manifest_text: str | None = None
    tick_ms: int | None = None
    extra_args: tuple[str, ...] = ()
    env: dict | None = None
    token: str | None = "test-operator-token-0123456789"
    node_ids: tuple[str, ...] = ()
    proxies: bool = True
    peers: dict[str, Peer] = field(default_factory=dict)
    links: dict[tuple[str, str], LinkProxy] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.base = Path(self.base)
        if not self.node_ids:
            self.node_ids = tuple("abcdefghij"[i] for i in range(self.n))
        self.n = len(self.node_ids)
        for nid in self.node_ids:
            folder = self.base / nid
            folder.mkdir(parents=True, exist_ok=True)
            manifest = None
            if self.manifest_text is not None:
                manifest = folder / "manifest.toml"
                manifest.write_text(self.manifest_text, encoding="utf-8")
            self.peers[nid] = Peer(nid, free_port(), folder / "data", manifest, folder / "serve.log")
        for a in self.node_ids:
            for b in self.node_ids:
                if a != b and self.proxies:
                    self.links[(a, b)] = LinkProxy(self.peers[b].port, name=f"{a}->{b}")

    # -- processes ----------------------------------------------------------------------------------

    @property
    def urls(self) -> list[str]:
        return [p.url for p in self.peers.values()]

    def argv(self, nid: str) -> list[str]:
        peer = self.peers[nid]
        argv = [sys.executable, "-m", "cis490fleet", "serve", "--data", str(peer.data_dir),
                "--bind", f"{HOST}:{peer.port}", "--node-id", nid, "--cluster-key-file",
                str(cluster_key_file(self.base))]
        for other in self.node_ids:
            link = self.links.get((nid, other))
            url = link.url if link is not None else self.peers[other].url
            argv += ["--peer", f"{other}={url}"]
        if peer.manifest is not None:
            argv += ["--manifest", str(peer.manifest)]
        if peer.join:
            argv.append("--join")
        if self.tick_ms is not None:
            argv += ["--raft-tick-ms", str(self.tick_ms)]
        return argv + list(self.extra_args)

    def start(self, nid: str | None = None) -> None:
        """Start one peer (or all that are not running). Does not wait: see ``wait_up``/``wait_leader``."""
        for peer in ([self.peers[nid]] if nid else self.peers.values()):
            if peer.alive:
                continue
            with open(peer.log_path, "ab") as log:
                log.write(f"\n=== start {peer.starts} ===\n".encode())
                log.flush()
                peer.proc = subprocess.Popen(self.argv(peer.node_id), cwd=ROOT, env=peer_env(self.env, self.token),
                                             stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            peer.starts += 1
            peer.paused = False

    def __enter__(self) -> "PeerGroup":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for peer in self.peers.values():
            if peer.proc is not None and peer.proc.poll() is None:
                if peer.paused:
                    peer.proc.send_signal(signal.SIGCONT)
                peer.proc.kill()
                peer.proc.wait(30)
        for link in self.links.values():
            link.close()

    def add_peer(self, nid: str) -> Peer:
        """A new peer, started with ``--join`` (it waits for ``POST /v1/peers``); the others reach it directly, it
        reaches them through its own proxies. Not started: see ``start``."""
        folder = self.base / nid
        folder.mkdir(parents=True, exist_ok=True)
        manifest = None
        if self.manifest_text is not None:
            manifest = folder / "manifest.toml"
            manifest.write_text(self.manifest_text, encoding="utf-8")
        peer = self.peers[nid] = Peer(nid, free_port(), folder / "data", manifest, folder / "serve.log", join=True)
        if self.proxies:
            for other in self.node_ids:
                self.links[(nid, other)] = LinkProxy(self.peers[other].port, name=f"{nid}->{other}")
        self.node_ids += (nid,)
        self.n = len(self.node_ids)
        return peer

    def forget(self, nid: str) -> None:
        """Stop a peer removed from the group (kill -9) and leave it out of ``node_ids`` and majorities."""
        self.kill9(nid)
        self.node_ids = tuple(n for n in self.node_ids if n != nid)
        self.n = len(self.node_ids)

    def operator(self, method: str, path: str, body: Any = None, timeout: float = 30.0) -> tuple[int, Any]:
        """An operator request (the group's token) to the first peer that answers."""
        for nid in self.node_ids:
            if self.peers[nid].alive:
                try:
                    return http_json(self.peers[nid].url, method, path, body,
                                     headers={"x-operator-token": self.token}, timeout=timeout)
                except OSError:
                    continue
        raise RuntimeError("no peer answers")

    def kill9(self, nid: str) -> None:
        """kill -9, as a power cut would."""
        peer = self.peers[nid]
        if peer.proc is not None and peer.proc.poll() is None:
            peer.proc.kill()
            peer.proc.wait(30)
        peer.paused = False

    def stop(self, nid: str, timeout: float = 30) -> int | None:
        """SIGTERM and wait: a clean shutdown."""
        peer = self.peers[nid]
        if peer.proc is None:
            return None
        if peer.proc.poll() is None:
            if peer.paused:
                peer.proc.send_signal(signal.SIGCONT)
                peer.paused = False
            peer.proc.terminate()
            try:
                peer.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                peer.proc.kill()
                peer.proc.wait(30)
        return peer.proc.returncode

    def pause(self, nid: str) -> None:
        peer = self.peers[nid]
        if peer.alive and not peer.paused:
            peer.proc.send_signal(signal.SIGSTOP)
            peer.paused = True

    def resume(self, nid: str) -> None:
        peer = self.peers[nid]
        if peer.alive and peer.paused:
            peer.proc.send_signal(signal.SIGCONT)
            peer.paused = False

    def restart(self, nid: str) -> None:
        """kill -9 then start again on the same data folder and port."""
        self.kill9(nid)
        self.start(nid)

    # -- network faults -----------------------------------------------------------------------------

    def set_link(self, a: str, b: str, mode: str, delay_ms: float | None = None) -> None:
        self.links[(a, b)].set_mode(mode, delay_ms)

    def partition(self, *groups, mode: str = "blackhole") -> None:
        """Cut every link between different groups (both directions); peers not named form one more group.
        ``partition(["a"])`` isolates a from the rest."""
        side: dict[str, int] = {}
        for i, group in enumerate(groups):
            for nid in ([group] if isinstance(group, str) else group):
                if nid not in self.peers:
                    raise ValueError(f"no peer {nid!r} in this group ({', '.join(self.node_ids)})")
                side[nid] = i
        for (a, b), link in self.links.items():
            cut = side.get(a, -1) != side.get(b, -1)
            want = mode if cut else "pass"
            if link.mode != want:
                link.set_mode(want)

    def heal(self) -> None:
        for link in self.links.values():
            if link.mode != "pass":
                link.set_mode("pass")

    # -- observation --------------------------------------------------------------------------------

    def health(self, nid: str, timeout: float = 1.0) -> dict | None:
        """This peer's /v1/health, or None when it does not answer (down, paused, cut off)."""
        peer = self.peers[nid]
        if not peer.alive or peer.paused:
            return None
        try:
            status, body = http_json(peer.url, "GET", "/v1/health", timeout=timeout)
        except OSError:
            return None
        return body if status == 200 and isinstance(body, dict) else None

    def healths(self, timeout: float = 1.0) -> dict[str, dict | None]:
        return {nid: self.health(nid, timeout) for nid in self.node_ids}

    def wait_up(self, nid: str | None = None, timeout: float = 60) -> None:
        """Until the peer (or every running peer) answers /v1/health."""
        deadline = time.monotonic() + timeout
        for peer in ([self.peers[nid]] if nid else self.peers.values()):
            while self.health(peer.node_id) is None:
                if peer.proc is not None and peer.proc.poll() is not None:
                    raise RuntimeError(f"peer {peer.node_id} exited with {peer.proc.returncode}:\n{peer.log_text()}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"peer {peer.node_id} did not answer /v1/health within {timeout} s:\n"
                                       f"{peer.log_text()}")
                time.sleep(0.05)

    def current_leader(self, exclude: tuple[str, ...] = ()) -> str | None:
        """The peer that says it leads in the highest term and that a majority of the group names as leader."""
        hs = {nid: h for nid, h in self.healths().items() if h is not None and nid not in exclude}
        leaders = [(h.get("term", 0), nid) for nid, h in hs.items() if h.get("role") == "leader"]
        for term, nid in sorted(leaders, reverse=True):
            votes = sum(1 for h in hs.values() if h.get("leader") == nid and h.get("term") == term)
            if votes * 2 > self.n:
                return nid
        return None

    def wait_leader(self, timeout: float = 30, exclude: tuple[str, ...] = ()) -> str:
        deadline = time.monotonic() + timeout
        while True:
            nid = self.current_leader(exclude)
            if nid is not None:
                return nid
            for peer in self.peers.values():
                if peer.proc is not None and peer.proc.poll() not in (None, -9, -15) and peer.node_id not in exclude:
                    raise RuntimeError(f"peer {peer.node_id} exited with {peer.proc.returncode}:\n{peer.log_text()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"no leader named by a majority within {timeout} s; health: {self.healths()}\n"
                                   + "\n".join(f"--- {p.node_id}:\n{p.log_text(1500)}" for p in self.peers.values()))
            time.sleep(0.05)

    def read_state(self, nid: str) -> dict:
        return read_queue_state(self.peers[nid].data_dir / "queue.sqlite3")

    def converged_states(self, timeout: float = 30) -> dict[str, dict]:
        """Every peer's queue state, once all running peers hold the same one and report the same applied index.

        Reads each peer's ``queue.sqlite3`` read-only while it runs (WAL lets readers in), so
        the answer does not depend on how the API forwards reads."""
        deadline = time.monotonic() + timeout
        last: dict[str, dict] = {}
        while True:
            hs = self.healths()
            applied = {nid: (h or {}).get("applied") for nid, h in hs.items()}
            try:
                last = {nid: self.read_state(nid) for nid in self.node_ids}
            except sqlite3.Error:
                last = {}
            states = list(last.values())
            if (states and all(s == states[0] for s in states)
                    and len({a for a in applied.values()}) == 1 and None not in applied.values()):
                return last
            if time.monotonic() > deadline:
                raise AssertionError(f"replicas did not converge within {timeout} s; applied: {applied}\n"
                                     + describe_differences(last))
            time.sleep(0.2)


def read_queue_state(path: Path) -> dict:
    """The replicated part of one queue file: every job's status, try counts, holder and artifact,
    and every attempt record (timestamps included: commands carry the leader's ``now``)."""
    if not path.exists():
        raise sqlite3.OperationalError(f"{path} does not exist yet")
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
    try:
        conn.execute("BEGIN")
        jobs = {row[0]: tuple(row[1:]) for row in conn.execute(
            "SELECT id, status, attempts, tries, host, lease, artifact_id, lease_expires FROM jobs ORDER BY id")}
        attempts: dict[str, list[tuple]] = {}
        for row in conn.execute("SELECT job, number, host, lease, started, ended, outcome FROM attempts "
                                "ORDER BY job, number"):
            attempts.setdefault(row[0], []).append(tuple(row[1:]))
        conn.execute("COMMIT")
    finally:
        conn.close()
    return {"jobs": jobs, "attempts": attempts}


JOB_FIELDS = ("status", "attempts", "tries", "host", "lease", "artifact_id", "lease_expires")
ATTEMPT_FIELDS = ("number", "host", "lease", "started", "ended", "outcome")


def describe_differences(states: dict[str, dict], limit: int = 10) -> str:
    """A short account of where replica states differ (for assertion messages)."""
    if not states:
        return "(no state could be read)"
    names = list(states)
    ref = states[names[0]]
    lines = []
    for nid in names[1:]:
        other = states[nid]
        for kind in ("jobs", "attempts"):
            keys = sorted(set(ref[kind]) | set(other[kind]))
            for key in keys:
                a, b = ref[kind].get(key), other[kind].get(key)
                if a != b:
                    lines.append(f"{kind}[{key[:12]}]: {names[0]}={a} {nid}={b}")
                    if len(lines) >= limit:
                        return "\n".join(lines)
    return "\n".join(lines) or "(states equal)"


# -- workload -------------------------------------------------------------------------------------------

CAPABILITY = {"os": "linux", "cores": 4, "ram_gib": 16.0, "cuda": False, "gpus": [], "slots": 4}


@dataclass
class History:
    """Acknowledged operations only: what a worker was told succeeded."""

    claims: list[dict] = field(default_factory=list)  # t_inv/t_ack: wall clock, as the coordinators' `now`
    completes: list[dict] = field(default_factory=list)
    heartbeats: list[dict] = field(default_factory=list)  # acknowledged ones, with t_inv
    ends: list[dict] = field(default_factory=list)  # every release/fail/complete sent, answered or not, with t_inv
    reads: list[dict] = field(default_factory=list)  # GET /v1/job answers: status, latest attempt, t_inv, t_ack
    poisoned: list[dict] = field(default_factory=list)  # answers to claims with a poisoned capability
    rejected: list[dict] = field(default_factory=list)
    abandoned: list[dict] = field(default_factory=list)
    unknown: int = 0
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, _list: str, /, **rec) -> None:
        rec["t"] = time.monotonic()
        with self.lock:
            getattr(self, _list).append(rec)

    def note_unknown(self) -> None:
        with self.lock:
            self.unknown += 1

    def error(self, text: str) -> None:
        with self.lock:
            if len(self.errors) < 50:
                self.errors.append(text)


def bundle_bytes(job_id: str, host: str, attempt) -> tuple[bytes, str]:
    import hashlib

    data = f"bundle of {job_id} by {host} attempt {attempt}\n".encode() * 8
    return data, hashlib.sha256(data).hexdigest()


class _Worker(threading.Thread):
    """claim -> (work) -> upload -> complete, until ``workload.stop`` is set; a complete in flight is
    retried until acknowledged or refused even after the stop, so no committed complete goes unacknowledged."""

    def __init__(self, workload: "Workload", host: str):
        super().__init__(name=f"worker-{host}", daemon=True)
        self.workload = workload
        self.host = host
        self.history = workload.history
        self.claims = 0

    def run(self) -> None:
        try:
            while not self.workload.stop.is_set():
                self.t_inv = time.time()
                claim = self.claim()
                if claim is None:
                    time.sleep(0.05)
                    continue
                self.claims += 1
                if self.workload.poison_every and self.claims % self.workload.poison_every == 0:
                    self.poison()
                if self.workload.abandon_every and self.claims % self.workload.abandon_every == 0:
                    self.history.add("abandoned", host=self.host, job_id=claim["job_id"], attempt=claim["attempt"])
                    continue
                late = self.workload.late_every and self.claims % self.workload.late_every == 0
                if late:  # presumed dead: no heartbeat while away
                    time.sleep(self.workload.late_s)
                elif not self.hold(claim, self.workload.work_s):
                    continue
                w = self.workload
                if w.release_every and self.claims % w.release_every == 0:
                    self.end(claim, "release", lambda: self.release(claim))
                    continue
                if w.fail_every and self.claims % w.fail_every == 0:
                    self.end(claim, "fail", lambda: self.fail(claim))
                    continue
                artifact_id = self.retry(lambda: self.upload(claim), claim, "upload")
                if artifact_id is None:
                    continue
                if self.end(claim, "complete", lambda: self.complete(claim, artifact_id)):
                    self.history.add("completes", host=self.host, job_id=claim["job_id"], attempt=claim["attempt"],
                                     lease=claim["lease"], artifact_id=artifact_id, kind=self.kind, t_ack=time.time())
        except Exception as err:  # a broken worker must show up in the test, not vanish with its thread
            self.history.error(f"{self.host}: {type(err).__name__}: {err}")

    def record_claim(self, data: dict) -> dict | None:
        """The claim answer's job as the history records it, or None for ``{"job": null}``."""
        if data.get("job") is None:
            return None
        claim = {"job_id": data["job_id"], "attempt": data["attempt"], "lease": data.get("lease")}
        self.history.add("claims", host=self.host, kind=self.kind, t_inv=self.t_inv, t_ack=time.time(), **claim)
        return claim

    def hold(self, claim: dict, seconds: float) -> bool:
        """Work on the job for ``seconds``, heartbeating; False when a heartbeat says the lease moved on."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            time.sleep(min(left, self.workload.heartbeat_every_s))
            t_inv = time.time()
            try:
                self.heartbeat(claim)
            except Refused as err:
                self.history.add("rejected", host=self.host, job_id=claim["job_id"], attempt=claim["attempt"],
                                 op="heartbeat", reason=str(err))
                return False
            except Retry:
                continue
            self.history.add("heartbeats", host=self.host, job_id=claim["job_id"], attempt=claim["attempt"],
                             t_inv=t_inv, t_ack=time.time())
        return True

    def end(self, claim: dict, op: str, call) -> bool:
        """Send the attempt's last word (release, fail or complete) until answered; every try is recorded
        before it is sent, since one that got no answer may still have been applied."""
        self.history.add("ends", host=self.host, job_id=claim["job_id"], attempt=claim["attempt"], op=op,
                         t_inv=time.time())
        return bool(self.retry(call, claim, op))

    def poison(self) -> None:
        """A claim whose capability no replica could store: must be a 400, and change nothing."""
        body, headers = signed(self.workload.keys.host_key(self.host), self.host, "POST", "/v1/job/claim",
                               b'{"capability": {"gpus": [{"vram_gib": "x"}]}}',
                               {"x-lab-host": self.host, "content-type": "application/json"})
        try:
            status, data = http_json(self.workload.urls[self.claims % len(self.workload.urls)], "POST",
                                     "/v1/job/claim", body, headers, timeout=self.workload.request_timeout_s)
        except OSError:
            return
        self.history.add("poisoned", host=self.host, status=status,
                         error=data.get("error") if isinstance(data, dict) else None)

    def retry(self, op, claim: dict, what: str):
        """Repeat ``op`` (harmless to repeat) until it answers; None/False when refused or out of time."""
        deadline = time.monotonic() + self.workload.op_deadline_s
        while time.monotonic() < deadline:
            try:
                return op()
            except Refused as err:
                self.history.add("rejected", host=self.host, job_id=claim["job_id"], attempt=claim["attempt"],
                                 op=what, reason=str(err))
                return None
            except Retry:
                time.sleep(0.05)
        self.history.error(f"{self.host}: {what} of {claim['job_id'][:12]} got no answer for "
                           f"{self.workload.op_deadline_s} s")
        return None


class Refused(Exception):
    """The coordinator answered no (stale lease, wrong state): final."""


class Retry(Exception):
    """No answer, or unavailable: try again."""


class RawWorker(_Worker):
    """A worker on raw HTTP: each request signed by hand with the host's key, URLs tried in turn."""

    kind = "raw"

    def __init__(self, workload: "Workload", host: str):
        super().__init__(workload, host)
        self.url_index = 0
        self.key = None

    def call(self, method: str, path: str, body=None, headers=None, retry_sent: bool = True):
        urls = self.workload.urls
        if self.key is None:
            self.key = self.workload.keys.host_key(self.host)
        for _ in range(len(urls)):
            url = urls[self.url_index % len(urls)]
            sent, signed_headers = signed(self.key, self.host, method, path, body,
                                          {"x-lab-host": self.host, **(headers or {})})
            try:
                status, data = http_json(url, method, path, sent, signed_headers,
                                         timeout=self.workload.request_timeout_s)
            except OSError as err:
                self.url_index += 1
                if not retry_sent and not isinstance(err, ConnectionRefusedError):
                    raise Retry(f"{method} {path}: no answer ({err})")
                continue
            if status in (502, 503):
                self.url_index += 1
                continue
            if status == 401 and isinstance(data, dict) and data.get("error") == "stale_signature":
                # A new leader (or a restarted peer) cannot tell this from a replay: sign again once it can.
                time.sleep(max(0.0, data["not_before"] - time.time()) + 0.05)
                return self.call(method, path, body, headers, retry_sent)
            return status, data
        raise Retry(f"{method} {path}: no URL answered")

    def claim(self) -> dict | None:
        try:
            status, data = self.call("POST", "/v1/job/claim", {"capability": CAPABILITY}, retry_sent=False)
        except Retry:
            self.history.note_unknown()
            return None
        if status != 200:
            self.history.error(f"{self.host}: claim answered {status} {data!r:.200}")
            return None
        return self.record_claim(data)

    def upload(self, claim: dict) -> str:
        body, sha = bundle_bytes(claim["job_id"], self.host, claim["attempt"])
        status, data = self.call("PUT", f"/v1/model/{claim['job_id']}", body,
                                 {"x-content-sha256": sha, "content-type": "application/octet-stream",
                                  "x-lease": claim["lease"]})
        return self.answer(status, data, 201)["artifact_id"]

    def complete(self, claim: dict, artifact_id: str) -> bool:
        status, data = self.call("POST", f"/v1/job/{claim['job_id']}/complete", {"artifact_id": artifact_id},
                                 {"x-lease": claim["lease"]})
        self.answer(status, data, 200)
        return True

    def heartbeat(self, claim: dict) -> None:
        status, data = self.call("POST", f"/v1/job/{claim['job_id']}/heartbeat", [{"progress": {"epoch": 1}}],
                                 {"x-lease": claim["lease"]})
        self.answer(status, data, 200)

    def release(self, claim: dict) -> bool:
        status, data = self.call("POST", f"/v1/job/{claim['job_id']}/release", None, {"x-lease": claim["lease"]})
        self.answer(status, data, 200)
        return True

    def fail(self, claim: dict) -> bool:
        status, data = self.call("POST", f"/v1/job/{claim['job_id']}/fail", {"error": "chaos: a failed try"},
                                 {"x-lease": claim["lease"]})
        self.answer(status, data, 200)
        return True

    def answer(self, status: int, data, want: int) -> dict:
        if status == want:
            return data
        if status in (404, 409):
            raise Refused(f"{status} {data!r:.200}")
        self.history.error(f"{self.host}: answered {status} {data!r:.200}")
        raise Refused(f"{status}")


class ClientWorker(_Worker):
    """Our ``cis490fleet.client.Client`` with the lease from the claim."""

    kind = "client"

    def __init__(self, workload: "Workload", host: str):
        super().__init__(workload, host)
        from cis490fleet import client, errors

        self.errors = errors
        self.client = client.Client(workload.urls, host_id=host, timeout=workload.request_timeout_s, retries=2,
                                    backoff_s=0.05, backoff_max_s=0.3)
        self.folder = workload.folder / host
        self.folder.mkdir(parents=True, exist_ok=True)

    def run(self) -> None:
        try:
            super().run()
        finally:
            self.client.close()

    def claim(self) -> dict | None:
        try:
            data = self.client.claim(CAPABILITY)
        except (self.errors.Unavailable, self.errors.NotLeader, OSError):
            self.history.note_unknown()
            return None
        return self.record_claim(data)

    def _call(self, fn, *args, **kw):
        try:
            return fn(*args, **kw)
        except (self.errors.StaleLease, self.errors.InvalidTransition, self.errors.NotFound) as err:
            raise Refused(f"{type(err).__name__}: {err}")
        except (self.errors.Unavailable, self.errors.NotLeader, OSError) as err:
            raise Retry(str(err))

    def upload(self, claim: dict) -> str:
        body, sha = bundle_bytes(claim["job_id"], self.host, claim["attempt"])
        path = self.folder / f"{claim['job_id'][:16]}-{claim['attempt']}.tar"
        path.write_bytes(body)
        return self._call(self.client.upload, claim["job_id"], claim["lease"], path, sha256=sha)["artifact_id"]

    def complete(self, claim: dict, artifact_id: str) -> bool:
        self._call(self.client.complete, claim["job_id"], claim["lease"], artifact_id)
        return True

    def heartbeat(self, claim: dict) -> None:
        self._call(self.client.heartbeat, claim["job_id"], claim["lease"], {"epoch": 1})

    def release(self, claim: dict) -> bool:
        self._call(self.client.release, claim["job_id"], claim["lease"])
        return True

    def fail(self, claim: dict) -> bool:
        self._call(self.client.fail, claim["job_id"], claim["lease"], "chaos: a failed try")
        return True


class Workload:
    """``raw`` + ``client`` worker threads against ``urls``; ``work_s`` is how long each holds a job.

    Presumed-dead workers, so that leases expire under chaos too: every ``abandon_every``-th claim
    of a worker is dropped (its job must go stale and run again elsewhere), every ``late_every``-th
    is held ``late_s`` before its upload and complete (which must then be refused if the lease
    moved on)."""

    def __init__(self, urls: list[str], folder: Path, *, raw: int = 2, client: int = 2, work_s: float = 0.0,
                 abandon_every: int = 0, late_every: int = 0, late_s: float = 0.0, release_every: int = 0,
                 fail_every: int = 0, poison_every: int = 0, readers: int = 0, heartbeat_every_s: float = 0.3,
                 request_timeout_s: float = 3.0, op_deadline_s: float = 60.0):
        self.release_every = release_every
        self.fail_every = fail_every
        self.poison_every = poison_every
        self.heartbeat_every_s = heartbeat_every_s
        self.abandon_every = abandon_every
        self.late_every = late_every
        self.late_s = late_s
        self.urls = list(urls)
        self.folder = Path(folder)
        self.keys = GroupKeys(self.urls).register()
        self.history = History()
        self.stop = threading.Event()
        self.work_s = work_s
        self.request_timeout_s = request_timeout_s
        self.op_deadline_s = op_deadline_s
        self.workers: list[_Worker] = [RawWorker(self, f"raw{i}") for i in range(raw)]
        self.workers += [ClientWorker(self, f"cli{i}") for i in range(client)]
        self.readers = [threading.Thread(target=self._read, args=(i,), name=f"reader-{i}", daemon=True)
                        for i in range(readers)]

    def __enter__(self) -> "Workload":
        for w in [*self.workers, *self.readers]:
            w.start()
        return self

    def _read(self, n: int) -> None:
        """Read claimed jobs through every peer in turn: each answer joins the history for ``check_reads``."""
        rng = random.Random(n)
        while not self.stop.is_set():
            with self.history.lock:
                known = [c["job_id"] for c in self.history.claims[-50:]]
            if not known:
                time.sleep(0.05)
                continue
            job_id = rng.choice(known)
            t_inv = time.time()
            try:
                status, data = http_json(rng.choice(self.urls), "GET", f"/v1/job/{job_id}",
                                         timeout=self.request_timeout_s)
            except OSError:
                continue
            if status == 200:
                job = data["job"]
                latest = max((a.get("number", 0) for a in job.get("attempts") or ()), default=0)
                self.history.add("reads", job_id=job_id, status=job["status"], attempt=latest, t_inv=t_inv,
                                 t_ack=time.time())
            time.sleep(0.02)

    def __exit__(self, *exc) -> None:
        self.finish()

    def finish(self, timeout: float = 90) -> None:
        self.stop.set()
        deadline = time.monotonic() + timeout
        for w in [*self.workers, *self.readers]:
            w.join(max(0.1, deadline - time.monotonic()))
        alive = [w.name for w in [*self.workers, *self.readers] if w.is_alive()]
        if alive:
            self.history.error(f"workers still running after {timeout} s: {alive}")


# -- the checks -------------------------------------------------------------------------------------------

ENDED_OUTCOMES = ("stale", "released", "failed", "cancelled")


def check_history(history: History, state: dict, *, expect_all_completed: bool = True) -> list[str]:
    """Every way the final ``state`` (one replica's, see ``read_queue_state``) and the acknowledged
    ``history`` disagree with exactly-once, single-lease execution; empty when they agree."""
    problems: list[str] = []
    jobs, attempts = state["jobs"], state["attempts"]

    def rec(job_id, number):
        for a in attempts.get(job_id, []):
            if a[0] == number:
                return a
        return None

    granted: dict[tuple, dict] = {}
    for c in history.claims:
        key = (c["job_id"], c["attempt"])
        if key in granted:
            problems.append(f"job {c['job_id'][:12]} attempt {c['attempt']} was granted twice: to "
                            f"{granted[key]['host']} and to {c['host']}")
        granted[key] = c
        a = rec(*key)
        if a is None:
            problems.append(f"acknowledged claim lost: job {c['job_id'][:12]} attempt {c['attempt']} "
                            f"({c['host']}) has no attempt record")
        elif a[1] != c["host"] or (c.get("lease") is not None and str(a[2]) != str(c["lease"])):
            problems.append(f"job {c['job_id'][:12]} attempt {c['attempt']}: acknowledged to {c['host']} lease "
                            f"{c.get('lease')}, recorded as {a[1]} lease {a[2]}")

    for job_id, recs in attempts.items():
        for a in recs[:-1]:
            if a[4] is None or a[5] not in ENDED_OUTCOMES:
                problems.append(f"job {job_id[:12]}: attempt {a[0]} ({a[1]}) was still valid "
                                f"(outcome {a[5]}, ended {a[4]}) when a later attempt began")
        done = [a for a in recs if a[5] == "completed"]
        if len(done) > 1:
            problems.append(f"job {job_id[:12]} completed twice: attempts {[a[0] for a in done]}")

    by_job: dict[str, set] = {}
    for c in history.completes:
        by_job.setdefault(c["job_id"], set()).add((c["host"], c["attempt"], c["artifact_id"]))
    for job_id, acks in by_job.items():
        if len(acks) > 1:
            problems.append(f"job {job_id[:12]} acknowledged as completed by {len(acks)} holders: {sorted(acks)}")
        host, number, artifact = sorted(acks)[0]
        job = jobs.get(job_id)
        if job is None or job[0] != "completed":
            problems.append(f"acknowledged complete lost: job {job_id[:12]} by {host} attempt {number} is "
                            f"{job[0] if job else 'missing'}")
            continue
        if job[5] != artifact:
            problems.append(f"job {job_id[:12]}: acknowledged artifact {artifact[:12]}, recorded {str(job[5])[:12]}")
        last = attempts.get(job_id, [(None,)])[-1]
        if last[0] != number:
            problems.append(f"job {job_id[:12]}: completed by attempt {number} ({host}) yet attempt {last[0]} "
                            "came after it")
        later = [c for c in history.claims if c["job_id"] == job_id and c["attempt"] > number]
        if later:
            problems.append(f"job {job_id[:12]}: completed by attempt {number} yet granted again as attempt "
                            f"{later[0]['attempt']} to {later[0]['host']}")

    for job_id, job in jobs.items():
        if job[0] == "completed" and job_id not in by_job:
            problems.append(f"job {job_id[:12]} is completed but no complete of it was acknowledged")
        elif expect_all_completed and job[0] != "completed":
            problems.append(f"job {job_id[:12]} ended {job[0]}, not completed")
    return problems


def check_leases(history: History, stale_after_s: float, slack_s: float = 0.2) -> list[str]:
    """No two acknowledged leases of one job overlap in time, as the workers saw them.

    Attempt A of a job is held from its claim until the first release/fail/complete sent for it (answered
    or not: one that got no answer may have been applied), or, without one, until ``stale_after_s`` after
    the last heartbeat acknowledged to it (the claim itself counts as one): the coordinator may give the job
    to another attempt only after that. The next acknowledged claim B of the job must have been answered
    after A's end (``slack_s`` for the coordinators' and the workers' readings of the same clock)."""
    problems = []
    by_job: dict[str, list[dict]] = {}
    for c in history.claims:
        by_job.setdefault(c["job_id"], []).append(c)
    last_word: dict[tuple, float] = {}
    for e in history.ends:
        key = (e["job_id"], e["attempt"])
        last_word[key] = min(last_word.get(key, e["t_inv"]), e["t_inv"])
    alive: dict[tuple, float] = {}
    for h in history.heartbeats:
        key = (h["job_id"], h["attempt"])
        alive[key] = max(alive.get(key, 0.0), h["t_inv"])
    for job_id, claims in by_job.items():
        claims.sort(key=lambda c: c["attempt"])
        for a, b in zip(claims, claims[1:]):
            key = (job_id, a["attempt"])
            held_until = min(last_word.get(key, math.inf), max(alive.get(key, 0.0), a["t_inv"]) + stale_after_s)
            if b["t_ack"] < held_until - slack_s:
                problems.append(f"job {job_id[:12]}: attempt {b['attempt']} ({b['host']}) was granted at "
                                f"{b['t_ack']:.3f}, while attempt {a['attempt']} ({a['host']}) held it until at least "
                                f"{held_until:.3f}")
    return problems


def check_reads(history: History) -> list[str]:
    """Reads of a job are linearizable as far as the queue shows them: a read that began after a claim of
    attempt n (or a complete) of the job was acknowledged sees attempt n or later (completed), and a read
    never sees less than a read answered before it began."""
    problems = []
    facts: dict[str, list[tuple[float, int, bool]]] = {}  # job -> (acknowledged at, attempt at least, completed)
    for c in history.claims:
        facts.setdefault(c["job_id"], []).append((c["t_ack"], c["attempt"], False))
    for c in history.completes:
        facts.setdefault(c["job_id"], []).append((c["t_ack"], c["attempt"], True))
    for r in sorted(history.reads, key=lambda r: r["t_ack"]):
        facts.setdefault(r["job_id"], []).append((r["t_ack"], r["attempt"], r["status"] == "completed"))
    for r in history.reads:
        for at, attempt, completed in facts.get(r["job_id"], ()):
            if at >= r["t_inv"]:
                continue
            if r["attempt"] < attempt or (completed and r["status"] != "completed"):
                problems.append(f"job {r['job_id'][:12]}: a read begun at {r['t_inv']:.3f} saw attempt {r['attempt']} "
                                f"{r['status']}, though attempt {attempt}{' completed' if completed else ''} was "
                                f"known at {at:.3f}")
                break
    return problems


def missing_artifacts(data_dir: Path, state: dict) -> list[str]:
    """Completed jobs whose bundle is not in this peer's artifact store with the right sha256."""
    import hashlib

    out = []
    for job_id, job in state["jobs"].items():
        sha = job[5]
        if job[0] != "completed" or not sha:
            continue
        found = sorted((data_dir / "models").glob(f"*/{sha}/bundle*"))
        if not found:
            out.append(f"{data_dir.parent.name}: no bundle {sha[:12]} for job {job_id[:12]}")
        elif hashlib.sha256(found[0].read_bytes()).hexdigest() != sha:
            out.append(f"{data_dir.parent.name}: bundle {sha[:12]} for job {job_id[:12]} has other bytes")
    return out
