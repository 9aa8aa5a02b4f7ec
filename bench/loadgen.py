"""Closed-loop HTTP/1.1 load from separate processes: raw keep-alive sockets, no client library in the way.

Each load process drives several connections with one selector; a connection
runs a *script*, a generator that yields request bytes and is sent back
``(status, body)`` for each. A script counts its finished operations in the
``Stats`` it is given. Requests are built once, responses are parsed just
enough (status, content-length), so the load costs far less CPU than the
server it measures. Every loop is bounded by a deadline and an operation count.
Traffic goes only to 127.0.0.1.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import selectors
import socket
import time
from typing import Callable, Generator

HOST = "127.0.0.1"
CPU = {"os": "linux", "cores": 4, "ram_gib": 16.0, "cuda": False, "gpus": [], "slots": 1}

Script = Generator[bytes, tuple, None]


def request(method: str, path: str, body: bytes = b"", headers: dict | None = None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", f"Content-Length: {len(body)}"]
    if body and not any(k.lower() == "content-type" for k in (headers or {})):
        lines.append("Content-Type: application/json")
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def post_json(path: str, obj, headers: dict | None = None) -> bytes:
    return request("POST", path, json.dumps(obj, separators=(",", ":")).encode(), headers)


class Stats:
    """What one load process counts: operations finished inside the window, errors, latencies."""

    def __init__(self, window_start: float, deadline: float):
        self.window_start = window_start
        self.deadline = deadline
        self.ops = 0
        self.errors = 0
        self.first = None
        self.last = None
        self.statuses: dict[int, int] = {}
        self.samples: list[float] = []

    def done(self, n: int = 1) -> None:
        now = time.monotonic()
        if self.window_start <= now <= self.deadline:
            self.ops += n
            if self.first is None:
                self.first = now
            self.last = now

    def status(self, code: int) -> None:
        self.statuses[code] = self.statuses.get(code, 0) + 1
        if code >= 300:
            self.errors += 1


class _Conn:
    __slots__ = ("sock", "script", "buf", "need", "status", "head")

    def __init__(self, sock: socket.socket, script: Script):
        self.sock = sock
        self.script = script
        self.buf = bytearray()
        self.need = -1
        self.status = 0
        self.head = 0

    def feed(self, data: bytes):
        """The (status, body) of a complete response once it has arrived, else None."""
        self.buf += data
        if self.need < 0:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return None
            head = bytes(self.buf[:end]).decode("latin-1")
            lines = head.split("\r\n")
            self.status = int(lines[0].split(" ", 2)[1])
            length = 0
            for line in lines[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value)
            self.head = end + 4
            self.need = self.head + length
        if len(self.buf) < self.need:
            return None
        body = bytes(self.buf[self.head:self.need])
        del self.buf[:self.need]
        self.need = -1
        return self.status, body


def connect(port: int, timeout: float = 30.0) -> socket.socket:
    sock = socket.create_connection((HOST, port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def drive(port: int, scripts: list[Script], stats: Stats, hard_deadline: float) -> None:
    """Run ``scripts`` (one connection each) until all end or the deadline passes."""
    sel = selectors.DefaultSelector()
    live = 0
    for script in scripts:
        conn = _Conn(connect(port), script)
        try:
            first = next(script)
        except StopIteration:
            conn.sock.close()
            continue
        conn.sock.sendall(first)
        sel.register(conn.sock, selectors.EVENT_READ, conn)
        live += 1
    try:
        while live and time.monotonic() < hard_deadline:
            for key, _ in sel.select(timeout=min(1.0, max(0.0, hard_deadline - time.monotonic()))):
                conn: _Conn = key.data
                data = conn.sock.recv(1 << 16)
                if not data:
                    raise ConnectionError("the server closed a kept-alive connection")
                while True:
                    reply = conn.feed(data)
                    data = b""
                    if reply is None:
                        break
                    stats.status(reply[0])
                    try:
                        nxt = conn.script.send(reply)
                    except StopIteration:
                        sel.unregister(conn.sock)
                        conn.sock.close()
                        live -= 1
                        break
                    conn.sock.sendall(nxt)
    finally:
        for key in list(sel.get_map().values()):
            key.fileobj.close()
        sel.close()


# -- scripts -------------------------------------------------------------------------------------


def bench_host_key(host: str) -> bytes:
    """The key bench/run.py gives each claiming host of the signed claim bench."""
    return hashlib.sha256(f"bench host key/{host}".encode()).digest()


def claim_script(stats: Stats, index: int, *, max_ops: int, hosts: int = 1024, slots: int = 1_000_000,
                 path: str = "/v1/job/claim", signed: bool = False) -> Script:
    """Claim again and again, rotating over ``hosts`` host ids so no host holds thousands of jobs.

    ``signed``: each request is signed with its host's key (a fresh nonce and time each), as our client signs."""
    cap = dict(CPU, slots=slots)
    body = json.dumps({"capability": cap}, separators=(",", ":")).encode()
    names = [f"c{index}-{h}" for h in range(hosts)]
    reqs = [request("POST", path, body, {"x-lab-host": name}) for name in names]
    if signed:
        sign = _claim_signer(names, path, body)
    for n in range(max_ops):
        if time.monotonic() >= stats.deadline:
            return
        status, reply = yield (sign(n) if signed else reqs[n % hosts])
        if status == 200 and b'"job_id"' in reply:
            stats.done()
        elif status != 200:
            raise RuntimeError(f"claim answered {status}: {reply[:200]!r}")


def _claim_signer(names: list[str], path: str, body: bytes) -> Callable[[int], bytes]:
    """Request ``n``'s bytes, signed by host ``names[n % len(names)]`` with a fresh nonce and the current time,
    exactly as ``signing.signature_headers`` signs them (checked once here), at a few microseconds each: only
    the time and the nonce change between a host's requests, so the rest of the signed text, the key's HMAC
    state and the request's bytes are made once per host."""
    import hmac
    import os

    from cis490fleet import signing

    body_sha = signing.body_sha256(body)
    hosts = []
    for name in names:
        signer, headers = f"host/{name}", {"x-lab-host": name}
        before, after = signing.canonical("POST", path, 0, "NONCE", body_sha, signer, headers).split(b"\n0\nNONCE\n")
        template = request("POST", path, body, {**headers, signing.H_SIGNER: signer, signing.H_TIME: "{t}",
                                                signing.H_NONCE: "{n}", signing.H_SIGNATURE: "{s}"})
        hosts.append((hmac.new(bench_host_key(name), before + b"\n", "sha256"), b"\n" + after,
                      template.decode("latin-1").replace("%", "%%").replace("{t}", "%d").replace("{n}", "%s").replace("{s}", "%s")))

    def sign(n: int) -> bytes:
        mac, after, template = hosts[n % len(hosts)]
        now, nonce = int(time.time()), os.urandom(16).hex()
        mac = mac.copy()
        mac.update(b"%d\n%s%s" % (now, nonce.encode(), after))
        return (template % (now, nonce, mac.hexdigest())).encode("latin-1")

    name, probe = names[0], sign(0)
    head = dict(line.split(": ", 1) for line in probe.split(b"\r\n\r\n")[0].decode().split("\r\n")[1:])
    expected = signing.signature_headers(bench_host_key(name), f"host/{name}", "POST", path, body_sha,
                                         int(head[signing.H_TIME]), head[signing.H_NONCE], {"x-lab-host": name})
    if head[signing.H_SIGNATURE] != expected[signing.H_SIGNATURE]:
        raise RuntimeError("the load generator's signer disagrees with cis490fleet.signing")
    return sign


def cycle_script(stats: Stats, index: int, *, max_ops: int, payload: int = 1024) -> Script:
    """claim -> heartbeat -> upload ``payload`` bytes -> complete, as one worker with one slot."""
    host = {"x-lab-host": f"w{index}"}
    claim = post_json("/v1/job/claim", {"capability": CPU}, host)
    for _ in range(max_ops):
        if time.monotonic() >= stats.deadline:
            return
        status, reply = yield claim
        got = json.loads(reply)
        if status != 200 or not got.get("job_id"):
            raise RuntimeError(f"claim answered {status}: {reply[:200]!r}")
        job_id, lease = got["job_id"], got["lease"]
        headers = dict(host, **{"x-lease": lease})
        status, reply = yield post_json(f"/v1/job/{job_id}/heartbeat", {"progress": {"epoch": 1}}, headers)
        _expect(status, reply, "heartbeat")
        bundle = (job_id.encode() * (payload // 64 + 1))[:payload]
        sha = hashlib.sha256(bundle).hexdigest()
        status, reply = yield request("PUT", f"/v1/model/{job_id}", bundle,
                                      dict(headers, **{"x-content-sha256": sha,
                                                       "content-type": "application/octet-stream"}))
        _expect(status, reply, "upload", 201)
        status, reply = yield post_json(f"/v1/job/{job_id}/complete", {"artifact_id": sha}, headers)
        _expect(status, reply, "complete")
        stats.done()


def _expect(status: int, reply: bytes, what: str, want: int = 200) -> None:
    if status != want:
        raise RuntimeError(f"{what} answered {status}: {reply[:300]!r}")


SCRIPTS: dict[str, Callable[..., Script]] = {"claim": claim_script, "cycle": cycle_script}


# -- processes ----------------------------------------------------------------------------------


def _child(port, script, indexes, kwargs, ready, go, results, warmup, duration, max_ops):
    try:
        ready.put(os.getpid())
        go.wait(120)
        t0 = time.monotonic()
        stats = Stats(t0 + warmup, t0 + warmup + duration)
        make = SCRIPTS[script]
        scripts = [make(stats, i, max_ops=max_ops, **kwargs) for i in indexes]
        drive(port, scripts, stats, hard_deadline=stats.deadline + 30)
        results.put({"ops": stats.ops, "errors": stats.errors, "first": stats.first, "last": stats.last,
                     "start": t0 + warmup, "deadline": stats.deadline, "statuses": stats.statuses})
    except BaseException as err:  # reported to the parent, which raises it
        results.put({"error": f"{type(err).__name__}: {err}"})


def _collect(q, procs, timeout: float) -> list:
    """One item per process from ``q``; fails fast when a process died without sending one."""
    import queue

    out = []
    deadline = time.monotonic() + timeout
    while len(out) < len(procs):
        try:
            out.append(q.get(timeout=0.2))
        except queue.Empty:
            if time.monotonic() > deadline:
                raise TimeoutError(f"load processes did not answer within {timeout:.0f} s") from None
            dead = [p for p in procs if p.exitcode not in (None, 0)]
            if dead:
                raise RuntimeError(f"load process {dead[0].pid} died with exit code {dead[0].exitcode}") from None
    return out


def run(port: int, script: str, *, connections: int = 16, processes: int = 2, duration: float = 5.0,
        warmup: float = 0.5, max_ops: int = 10**9, kwargs: dict | None = None, timeout: float = 300.0) -> dict:
    """Closed-loop load: ``connections`` scripts over ``processes`` processes.

    Returns ops, seconds, rate (ops/s). Time-bounded runs count operations
    finished in [start + warmup, start + warmup + duration]; count-bounded
    runs (``max_ops`` per connection, ``warmup=0``) time the first start to
    the last finished operation.
    """
    ctx = mp.get_context("spawn")
    ready, results, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    groups = [list(range(connections))[p::processes] for p in range(processes)]
    procs = [ctx.Process(target=_child, args=(port, script, g, kwargs or {}, ready, go, results, warmup, duration,
                                              max_ops), daemon=True) for g in groups if g]
    for p in procs:
        p.start()
    try:
        _collect(ready, procs, 60)
        go.set()
        outs = _collect(results, procs, timeout)
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
    failed = [o["error"] for o in outs if "error" in o]
    if failed:
        raise RuntimeError("load process failed: " + "; ".join(failed))
    ops = sum(o["ops"] for o in outs)
    statuses: dict[int, int] = {}
    for o in outs:
        for k, v in o["statuses"].items():
            statuses[k] = statuses.get(k, 0) + v
    if max_ops < 10**9 and warmup == 0:
        lasts = [o["last"] for o in outs if o["last"] is not None]
        seconds = (max(lasts) - min(o["start"] for o in outs)) if lasts else float("nan")
    else:
        seconds = duration
    return {"ops": ops, "seconds": seconds, "rate": ops / seconds if seconds and seconds > 0 else 0.0,
            "errors": sum(o["errors"] for o in outs), "statuses": statuses}


def poller(port: int, host: str, out, stop, max_ops: int, wait: float = 30.0) -> None:
    """A long-polling worker: puts (job name, monotonic time the claim answered) on ``out`` for each job."""
    conn = _Conn(connect(port, timeout=wait + 30), iter(()))
    claim = post_json("/v1/job/claim", {"capability": dict(CPU, slots=10_000), "wait": wait}, {"x-lab-host": host})
    for _ in range(max_ops):
        if stop.is_set():
            break
        conn.sock.sendall(claim)
        reply = None
        while reply is None:
            data = conn.sock.recv(1 << 16)
            if not data:
                raise ConnectionError("the coordinator closed the long-poll connection")
            reply = conn.feed(data)
        now = time.monotonic()
        status, body = reply
        _expect(status, body, "claim")
        job = json.loads(body).get("job")
        if job is not None:
            out.put((job.get("name"), now))
    conn.sock.close()


def _upload(url: str, path: str, sha256: str, ca: str | None = None) -> dict:
    """Claim one job as host 'up', then time ``Client.upload`` of ``path``; report this process's peak RSS.

    ``sha256`` is "-" to let the client hash the file first, else the hash the worker got from make_bundle.
    """
    from cis490fleet.client import Client

    client = Client(url, host_id="up", ca=ca, timeout=600)
    claim = client.claim(CPU)
    known = None if sha256 == "-" else sha256
    t0 = time.perf_counter()
    result = client.upload(claim["job_id"], claim["lease"], path, **({"sha256": known} if known else {}))
    seconds = time.perf_counter() - t0
    client.close()
    hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    return {"seconds": seconds, "hwm_mib": hwm / 1024, "artifact_id": result["artifact_id"]}


def _tls_send(port: int, path: str, ca: str) -> None:
    """Send a file over a raw TLS socket: the sender half of the TLS upload ceiling."""
    import ssl

    ctx = ssl.create_default_context(cafile=ca)
    with socket.create_connection((HOST, port), timeout=60) as raw, \
            ctx.wrap_socket(raw, server_hostname=HOST) as sock, open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            sock.sendall(chunk)


if __name__ == "__main__":
    import sys

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    command, *rest = sys.argv[1:]
    if command == "upload":
        print(json.dumps(_upload(*rest)))
    elif command == "tls-send":
        _tls_send(int(rest[0]), rest[1], rest[2])
    else:
        raise SystemExit(f"unknown command {command!r}: use upload URL PATH SHA256|- [CA] or tls-send PORT PATH CA")
