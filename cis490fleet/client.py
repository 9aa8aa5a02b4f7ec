"""HTTP client for the coordinator's wire API: keep-alive connections, peer failover, retries, streamed transfers.

Adapter: owns the client side of the sockets and nothing else. One persistent
connection per thread and coordinator URL (a TLS handshake per request costs
several times the request). Every method returns the server's JSON unchanged
(except ``metrics`` and the downloads); a server error comes back as the
FleetError subclass the server raised, so callers catch ``StaleLease``,
``NotFound``, ``Forbidden``... on both sides of the wire.

Retries: a request that never reached a server (refused, reset before it was
sent, a kept-alive socket the server had closed) is always tried again, on the
next URL. A request that was sent but got no answer, or got 502/503, is tried
again too: reads and uploads are harmless to repeat, and every write command
carries a client session (``x-client-id`` + ``x-client-serial``) whose retries
reuse the serial, so the coordinator applies it once and answers a retry with
the first answer. That makes ``claim`` safe across a leader failover: the retry
gets the job and lease the lost answer carried, not a second job. Each thread
has its own session (the coordinator keeps one outstanding serial per client
id), named after the client's random id. Bundles are never read into memory.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import os
import random
import secrets
import select
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Any, Callable

from cis490fleet import errors, signing

log = logging.getLogger(__name__)

ENV_RECEIVER = "CIS490_RECEIVER"
ENV_TOKEN = "CIS490_OPERATOR_TOKEN"
ENV_READ_TOKEN = "CIS490_READ_TOKEN"
CHUNK = 1 << 20
MAX_ERROR_BODY = 1 << 20
RETRY_STATUSES = frozenset({502, 503})
STALE_SIGNATURE_WAIT_MAX_S = 2 * signing.HOST_AHEAD_S + 5
"""The longest wait for a coordinator that refused a signature as older than its memory (``signing.not_before``
puts that at most HOST_AHEAD_S past its start, give or take the clocks' offset)."""
_HEX64 = frozenset("0123456789abcdef")


class _NotSent(Exception):
    """The request never reached the server; sending it again is always safe."""


class _NoAnswer(Exception):
    """The request was sent but no complete answer came back; ``reused`` when on a kept-alive socket."""

    def __init__(self, message: str, reused: bool):
        super().__init__(message)
        self.reused = reused


def parse_urls(urls: str | list[str] | tuple[str, ...] | None) -> list[str]:
    """Coordinator base URLs from an argument or CIS490_RECEIVER (comma-separated), normalised, in order."""
    if urls is None:
        urls = os.environ.get(ENV_RECEIVER, "")
    if isinstance(urls, str):
        urls = [urls]
    out: list[str] = []
    for item in urls:
        for raw in str(item).split(","):
            raw = raw.strip()
            if raw:
                url = normalize_url(raw)
                if url not in out:
                    out.append(url)
    if not out:
        raise errors.ConfigError(
            f"no coordinator URL given; pass --receiver URL (e.g. http://127.0.0.1:8445) or set {ENV_RECEIVER}")
    return out


def normalize_url(raw: str) -> str:
    parts = urllib.parse.urlsplit(raw)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise errors.ConfigError(
            f"coordinator URL {raw!r} is not an http:// or https:// URL with a host; "
            f"write it like http://127.0.0.1:8445 in --receiver or {ENV_RECEIVER}")
    try:
        port = parts.port
    except ValueError:
        raise errors.ConfigError(f"coordinator URL {raw!r} has a bad port; write it like https://coord.lab:8445") from None
    if parts.query or parts.fragment or parts.username:
        raise errors.ConfigError(f"coordinator URL {raw!r} must not carry a query, fragment or user name")
    host = parts.hostname
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{host}:{port}" if port else host
    return f"{parts.scheme}://{netloc}{parts.path.rstrip('/')}"


def _describe(err: BaseException) -> str:
    if isinstance(err, TimeoutError) or type(err).__name__ == "timeout":
        return "timed out"
    if type(err).__module__ == "ssl":
        reason = getattr(err, "verify_message", None) or getattr(err, "reason", None) or str(err)
        return (f"TLS handshake failed ({reason}); check --ca (the CA that signed the coordinator's certificate) "
                "and, for mutual TLS, --cert and --key")
    if isinstance(err, OSError) and err.strerror and not hasattr(err, "reason"):
        return err.strerror.lower() if isinstance(err, ConnectionError) else err.strerror
    return str(err) or type(err).__name__


@contextlib.contextmanager
def _writing(dest: Path):
    """A local file error while saving a download, as a ConfigError: the sink's OSError would otherwise
    read as a network failure and be retried against the coordinator."""
    try:
        yield
    except OSError as err:
        raise errors.ConfigError(f"cannot write the download to {dest} ({err.strerror or err}); "
                                 "choose a destination whose folder exists or can be created, and is writable") from None


def _quote(segment: str) -> str:
    return urllib.parse.quote(str(segment), safe="")


def _check_sha256(value: str, what: str) -> str:
    if not isinstance(value, str) or len(value) != 64 or not set(value) <= _HEX64:
        raise errors.BadRequest(f"{what} must be 64 lowercase hex characters (a sha256), got {value!r}")
    return value


def _not_a_coordinator(url: str, method: str, path: str, answer: str, data: bytes) -> errors.Unavailable:
    """A reply without the coordinator's JSON error shape: the URL points at some other web server (or a proxy
    in front of one), so say that, with the page's first line of text, instead of passing on its 404 as a
    missing job."""
    import re

    text = re.sub(r"<[^>]*>", " ", data[:4096].decode("utf-8", "replace"))
    first = next((" ".join(line.split()) for line in text.splitlines() if line.strip()), "")
    return errors.Unavailable(
        f"{url} is not a cis490fleet coordinator: {method} {path} answered {answer}"
        + (f" ({first[:120]})" if first else "")
        + f"; point --receiver / {ENV_RECEIVER} at the URL that 'serve' prints")


def _fill_attributes(err: errors.FleetError) -> errors.FleetError:
    """Give a FleetError rebuilt from the wire the attributes its class promises."""
    if isinstance(err, errors.StaleLease):
        err.__dict__.setdefault("job_id", None)
        err.__dict__.setdefault("holder", None)
    if isinstance(err, errors.NotLeader):
        err.__dict__.setdefault("leader_url", None)
    if isinstance(err, errors.AmbiguousId):
        err.__dict__.setdefault("prefix", None)
        err.__dict__.setdefault("matches", [])
    if isinstance(err, errors.InvalidTransition):
        for name in ("job_id", "status", "action"):
            err.__dict__.setdefault(name, None)
    if isinstance(err, errors.ManifestError):
        err.__dict__.setdefault("problems", err.detail.splitlines())
    return err


class _Counting:
    """Mixin that reports each new socket, so reuse is observable (``Client.connections_opened``)."""

    on_connect: Callable[[], None] = staticmethod(lambda: None)

    def connect(self):
        super().connect()
        self.on_connect()


class _HTTPConnection(_Counting, http.client.HTTPConnection):
    pass


class _HTTPSConnection(_Counting, http.client.HTTPSConnection):
    pass


def connection_dropped(conn: http.client.HTTPConnection) -> bool:
    """True when a kept-alive socket was closed by the server (readable while idle means EOF or junk); a
    follower's forwards to the leader check their kept-alive connections the same way."""
    sock = conn.sock
    if sock is None:
        return False
    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(readable)


class Client:
    """Talks to one coordinator group through any of its peers' URLs."""

    def __init__(self, urls: str | list[str] | None = None, *, host_id: str | None = None,
                 operator_token: str | None = None, ca=None, cert=None, key=None,
                 timeout: float = 30.0, retries: int = 5, backoff_s: float = 0.25, backoff_max_s: float = 5.0,
                 host_key: bytes | str | None = None, read_token: str | None = None):
        self.urls = parse_urls(urls)
        self.host_id = host_id
        self.operator_token = operator_token if operator_token is not None else (os.environ.get(ENV_TOKEN) or None)
        self.read_token = read_token if read_token is not None else (os.environ.get(ENV_READ_TOKEN) or None)
        if isinstance(host_key, str):
            host_key = signing.parse_key(host_key, "the host key")
        if host_key is not None and not host_id:
            raise errors.ConfigError("a host key signs as a host: give the host id too (host_id / --host-id)")
        self.host_key = host_key
        self.clock_offset = 0.0  # the coordinator's clock minus ours, from its Date headers
        self.timeout = float(timeout)
        self.retries = max(0, int(retries))
        self.backoff_s = float(backoff_s)
        self.backoff_max_s = float(backoff_max_s)
        self._tls = (ca, cert, key)
        self._ssl_context = None
        self._preferred = 0
        self._local = threading.local()
        self._lock = threading.Lock()
        self._all_conns: list[http.client.HTTPConnection] = []
        self.connections_opened = 0
        self._rng = random.Random()
        self.client_id = secrets.token_hex(16)
        self._sessions = 0

    def _session_headers(self) -> dict:
        """The next serial of this thread's session; a retry of the same call sends these headers again."""
        session = getattr(self._local, "session", None)
        if session is None:
            with self._lock:
                self._sessions += 1
                n = self._sessions
            session = self._local.session = [f"{self.client_id}-{n}", 0]
        session[1] += 1
        return {"x-client-id": session[0], "x-client-serial": session[1]}

    # -- connections -------------------------------------------------------------------------

    def _context(self):
        if self._ssl_context is None:
            ca, cert, key = self._tls
            try:
                from cis490fleet import tls
            except ImportError:  # pragma: no cover - tls.py ships with the package
                import ssl
                ctx = ssl.create_default_context(cafile=str(ca) if ca else None)
                if cert:
                    ctx.load_cert_chain(str(cert), str(key) if key else None)
                self._ssl_context = ctx
            else:
                self._ssl_context = tls.client_context(ca, cert, key)
        return self._ssl_context

    def _counted(self) -> None:
        with self._lock:
            self.connections_opened += 1

    def _connection(self, url: str) -> http.client.HTTPConnection:
        conns = getattr(self._local, "conns", None)
        if conns is None:
            conns = self._local.conns = {}
        conn = conns.get(url)
        if conn is None:
            parts = urllib.parse.urlsplit(url)
            if parts.scheme == "https":
                conn = _HTTPSConnection(parts.hostname, parts.port or 443, timeout=self.timeout,
                                        context=self._context())
            else:
                conn = _HTTPConnection(parts.hostname, parts.port or 80, timeout=self.timeout)
            conn.on_connect = self._counted
            conns[url] = conn
            with self._lock:
                self._all_conns.append(conn)
        return conn

    def close(self) -> None:
        """Close every connection this client opened, in every thread."""
        with self._lock:
            conns, self._all_conns = self._all_conns, []
        for conn in conns:
            conn.close()
        self._local = threading.local()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- one exchange ----------------------------------------------------------------------

    def _headers(self, extra: dict | None) -> dict:
        headers = {"accept": "application/json"}
        if self.host_id:
            headers["x-lab-host"] = self.host_id
        if self.operator_token:
            headers["x-operator-token"] = self.operator_token
        if self.read_token:
            headers["x-read-token"] = self.read_token
        if extra:
            headers.update({k: str(v) for k, v in extra.items() if v is not None})
        return headers

    def _signed(self, headers: dict, method: str, target: str, body: bytes | None) -> dict:
        """``headers`` plus a fresh signature (new nonce, current time): each send of a request is signed anew,
        so a retry is not refused as a replay, while its session serial stays the same."""
        if self.host_key is None:
            return headers
        body_sha = headers.get("x-content-sha256") if body is None and "x-content-sha256" in headers else \
            signing.body_sha256(body or b"")
        return {**headers, **signing.signature_headers(self.host_key, f"host/{self.host_id}", method, target,
                                                       body_sha, time.time() + self.clock_offset,
                                                       secrets.token_hex(16), headers)}

    def _once(self, url: str, method: str, path: str, headers: dict, body: bytes | None,
              body_path: Path | None, timeout: float, sink: Callable | None):
        """One request on this thread's connection to ``url``: (status, headers, body bytes or sink's result)."""
        conn = self._connection(url)
        if connection_dropped(conn):
            conn.close()
        reused = conn.sock is not None
        target = urllib.parse.urlsplit(url).path + path
        headers = self._signed(headers, method, target, body)
        resp = None
        try:
            if conn.sock is None:
                conn.connect()
            conn.sock.settimeout(timeout)
            if body_path is None:
                conn.request(method, target, body=body, headers=headers)
            else:
                resp = self._send_file(conn, method, target, headers, body_path)
        except (OSError, http.client.HTTPException) as err:  # OSError includes ssl.SSLError and timeouts
            conn.close()
            raise _NotSent(_describe(err)) from err
        except BaseException:
            conn.close()
            raise
        try:
            if resp is None:
                resp = conn.getresponse()
            if self.host_key is not None:
                self.clock_offset = signing.corrected_offset(self.clock_offset,
                                                             signing.clock_offset(resp.getheader("date"), time.time()))
            if 200 <= resp.status < 300 and sink is not None:
                result = sink(resp)
            elif resp.status >= 300:
                result = resp.read(MAX_ERROR_BODY)
                if not resp.isclosed():
                    conn.close()
            else:
                result = resp.read()
            return resp.status, resp.headers, result
        except (OSError, http.client.HTTPException) as err:
            conn.close()
            raise _NoAnswer(_describe(err), reused) from err
        except BaseException:
            conn.close()
            raise

    def _once_reconnecting(self, url: str, *args):
        """``_once``, repeated at once on a new socket when a kept-alive one died under the request.

        The server may close an idle connection just as a request is sent on it;
        the check in ``_once`` narrows that window but cannot close it.
        """
        try:
            return self._once(url, *args)
        except _NoAnswer as err:
            if not err.reused:
                raise
            log.debug("kept-alive connection to %s closed under us (%s); reconnecting", url, err)
            return self._once(url, *args)

    def _send_file(self, conn, method: str, target: str, headers: dict, body_path: Path):
        """Send headers, then the file in chunks; returns an early answer (e.g. 413) when the server cut us off."""
        conn.putrequest(method, target, skip_accept_encoding=True)
        for name, value in headers.items():
            conn.putheader(name, value)
        conn.endheaders()
        sent = 0
        with open(body_path, "rb") as f:
            while chunk := f.read(CHUNK):
                try:
                    conn.send(chunk)
                except OSError:
                    try:
                        return conn.getresponse()
                    except (OSError, http.client.HTTPException):
                        pass
                    raise
                sent += len(chunk)
        if sent != int(headers["content-length"]):
            raise errors.IntegrityError(
                f"{body_path} changed while it was being uploaded ({sent} bytes sent, "
                f"{headers['content-length']} declared); upload it again once nothing writes to it")
        return None

    def _wait_to_sign_again(self, resp_headers) -> bool:
        """After a refusal for a signature older than the coordinator's memory (it restarted or became the
        leader a moment ago): wait until its ``x-fleet-not-before`` on the coordinator's clock; True to send
        again, freshly signed. False when the answer is another refusal."""
        floor = resp_headers.get("x-fleet-not-before") if self.host_key is not None else None
        if not floor or not floor.isascii() or not floor.isdigit():
            return False
        wait = int(floor) - (time.time() + self.clock_offset)
        if wait > STALE_SIGNATURE_WAIT_MAX_S:
            return False
        time.sleep(max(0.0, wait) + 0.05)
        return True

    def _backoff(self, round_: int) -> None:
        delay = min(self.backoff_max_s, self.backoff_s * (2 ** round_))
        time.sleep(delay * (0.5 + self._rng.random() / 2))

    def _exchange(self, method: str, path: str, *, payload: Any = None, headers: dict | None = None,
                  body_path: Path | None = None, timeout: float | None = None,
                  sink: Callable | None = None, session: bool = False) -> tuple[int, Any, Any]:
        """Send one request to the first peer that answers: (status, headers, body or the sink's result).

        ``session``: a write command; it gets the next serial, which every retry below repeats."""
        extra = dict(headers or {})
        if session:
            extra.update(self._session_headers())
        body = None
        if payload is not None:
            body = json.dumps(payload).encode()
            extra["content-type"] = "application/json"
        elif method in ("POST", "PUT") and body_path is None:
            body = b"{}"
            extra["content-type"] = "application/json"
        all_headers = self._headers(extra)
        timeout = self.timeout if timeout is None else timeout
        n = len(self.urls)
        where = (lambda url: f"{url}: ") if n > 1 else (lambda url: "")
        last_problem = "no attempt made"
        last_reply = None
        for round_ in range(self.retries + 1):
            if round_:
                self._backoff(round_ - 1)
            start = self._preferred
            for k in range(n):
                i = (start + k) % n
                url = self.urls[i]
                try:
                    offset = self.clock_offset
                    status, resp_headers, data = self._once_reconnecting(
                        url, method, path, all_headers, body, body_path, timeout, sink)
                    if status == 401 and self.clock_offset != offset:
                        # Refused for our clock, which the answer's Date corrected: sign again with the offset.
                        status, resp_headers, data = self._once_reconnecting(
                            url, method, path, all_headers, body, body_path, timeout, sink)
                    if status == 401 and self._wait_to_sign_again(resp_headers):
                        status, resp_headers, data = self._once_reconnecting(
                            url, method, path, all_headers, body, body_path, timeout, sink)
                except _NotSent as err:
                    last_problem = f"{where(url)}{err}"
                    log.debug("%s %s not sent to %s: %s", method, path, url, err)
                    continue
                except _NoAnswer as err:
                    last_problem = f"{where(url)}sent, but no answer ({err})"
                    log.debug("%s %s got no answer from %s: %s", method, path, url, err)
                    continue
                if status in RETRY_STATUSES:
                    last_reply = (url, status, resp_headers, data)
                    last_problem = f"{where(url)}HTTP {status}"
                    continue
                self._preferred = i
                return status, resp_headers, data
        if last_reply is not None:
            url, status, resp_headers, data = last_reply
            raise self._error(url, method, path, status, data)
        tried = ", ".join(self.urls)
        raise errors.Unavailable(
            f"cannot reach the coordinator at {tried}: {last_problem}; "
            f"check that it runs, or point --receiver / {ENV_RECEIVER} at a running peer")

    def _error(self, url: str, method: str, path: str, status: int, data: bytes) -> errors.FleetError:
        try:
            doc = json.loads(data)
            code, detail = str(doc["error"]), str(doc.get("detail") or doc["error"])
        except (ValueError, TypeError, KeyError):
            return _not_a_coordinator(url, method, path, f"HTTP {status}", data)
        return _fill_attributes(errors.error_from_wire(status, code, detail))

    def _call(self, method: str, path: str, **kw) -> Any:
        status, _, data = self._exchange(method, path, **kw)
        if status >= 300:
            raise self._error(self.urls[self._preferred], method, path, status, data)
        try:
            return json.loads(data)
        except ValueError:
            raise _not_a_coordinator(self.urls[self._preferred], method, path, f"HTTP {status}", data) from None

    # -- the wire API ------------------------------------------------------------------------

    def health(self) -> dict:
        return self._call("GET", "/v1/health")

    def claim(self, capability: dict, wait: float | None = None, slot: dict | None = None) -> dict:
        """``{"job": None}`` or the claim (job_id, job, lease, attempt, heartbeat_s, stale_after_s, trainer;
        with ``slot`` also the GPUs it gives the job)."""
        payload: dict = {"capability": capability}
        if slot is not None:
            payload["slot"] = slot
        if wait:
            payload["wait"] = wait
        return self._call("POST", "/v1/job/claim", payload=payload, session=True,
                          timeout=self.timeout + (wait or 0))

    def register(self, capability: dict) -> dict:
        return self._call("POST", "/v1/worker/register", payload={"capability": capability}, session=True)

    def heartbeat(self, job_id: str, lease, progress: dict | None = None, log_tail: str | None = None) -> dict:
        payload = {k: v for k, v in (("progress", progress), ("log_tail", log_tail)) if v is not None}
        return self._call("POST", f"/v1/job/{_quote(job_id)}/heartbeat", payload=payload,
                          headers={"x-lease": lease}, session=True)

    def complete(self, job_id: str, lease, artifact_id: str, metrics: dict | None = None,
                 progress: dict | None = None) -> dict:
        payload = {"artifact_id": artifact_id, **({"metrics": metrics} if metrics else {}),
                   **({"progress": progress} if progress else {})}
        return self._call("POST", f"/v1/job/{_quote(job_id)}/complete", payload=payload,
                          headers={"x-lease": lease}, session=True)

    def fail(self, job_id: str, lease, error: str, failure_class: str | None = None) -> dict:
        """Report the attempt failed; ``failure_class`` (``jobs.FAILURE_CLASSES``) says whose fault, so whether
        it is retried (None: the coordinator takes it as the job's own)."""
        payload = {"error": error} if failure_class is None else {"error": error, "class": failure_class}
        return self._call("POST", f"/v1/job/{_quote(job_id)}/fail", payload=payload,
                          headers={"x-lease": lease}, session=True)

    def leave(self) -> dict:
        """This worker is stopping: the coordinator shows it gone at once."""
        return self._call("POST", "/v1/worker/leave", session=True)

    def watch(self, job_id: str, lease, wait: float) -> dict:
        """``{"cancel": bool}`` as soon as the job is cancelled, else after ``wait`` seconds (StaleLease: lost)."""
        return self._call("POST", f"/v1/job/{_quote(job_id)}/watch", payload={"wait": wait},
                          headers={"x-lease": lease}, timeout=wait + self.timeout)

    def release(self, job_id: str, lease) -> dict:
        return self._call("POST", f"/v1/job/{_quote(job_id)}/release", headers={"x-lease": lease},
                          session=True)

    def upload_checkpoint(self, job_id: str, lease, path: str | Path, *, sha256: str, epoch: int | None) -> dict:
        """Stream a checkpoint bundle (``bundle.make_bundle`` of the trainer's checkpoint folder):
        ``{"sha256", "attempt", "epoch", "size", "deduplicated"}``."""
        extra = {} if epoch is None else {"x-checkpoint-epoch": str(epoch)}
        return self._put_held_file(job_id, "checkpoint", lease, path, sha256, "application/octet-stream", extra,
                                   timeout=max(self.timeout, 120.0))

    def upload_log(self, job_id: str, lease, path: str | Path, *, sha256: str) -> dict:
        """Hand in the attempt's log (``attempt_log.pack``'s gzip file): ``{"sha256", "attempt", "size"}``."""
        return self._put_held_file(job_id, "log", lease, path, sha256, "application/gzip")

    def _put_held_file(self, job_id: str, what: str, lease, path: str | Path, sha256: str, content_type: str,
                       extra: dict | None = None, timeout: float | None = None) -> dict:
        """PUT ``path`` to ``/v1/job/{job_id}/{what}`` under the caller's lease, with its sha256 and size."""
        _check_sha256(sha256, "sha256")
        path = Path(path)
        try:
            size = path.stat().st_size
        except OSError as err:
            raise errors.ConfigError(f"cannot read {what} {path}: {err.strerror or err}") from None
        headers = {"x-lease": lease, "x-content-sha256": sha256, "content-length": size,
                   "content-type": content_type, **(extra or {})}
        return self._call("PUT", f"/v1/job/{_quote(job_id)}/{what}", headers=headers, body_path=path,
                          timeout=timeout)

    def job_log(self, ref: str, attempt: int | None = None) -> tuple[int, str]:
        """(attempt number, its whole log as text) of the job named by ``ref``; None: its newest log."""
        import gzip

        path = f"/v1/job/{_quote(ref)}/log" + ("" if attempt is None else f"?attempt={int(attempt)}")
        status, headers, data = self._exchange("GET", path)
        if status >= 300:
            raise self._error(self.urls[self._preferred], "GET", path, status, data)
        if (headers.get("content-encoding") or "").lower() == "gzip":
            data = gzip.decompress(data)
        return int(headers.get("x-attempt") or 0), data.decode("utf-8", "replace")

    def download_checkpoint(self, sha256: str, dest_path: str | Path) -> Path:
        """Stream a checkpoint to ``dest_path`` through a temporary file; its sha256 must equal ``sha256``."""
        _check_sha256(sha256, "checkpoint id")
        return self._download(f"/v1/checkpoint/{sha256}", Path(dest_path), expect=sha256)

    def upload(self, job_id: str, lease, path: str | Path, *, sha256: str | None = None) -> dict:
        """Stream the bundle at ``path`` (1 MiB chunks, never all in memory): ``{"artifact_id", "path", "deduplicated"}``.

        ``sha256``: the bundle's hash when the caller already has it (``bundle.make_bundle`` returns it);
        the file is then read once, not twice, and the server still verifies every byte against it.
        """
        path = Path(path)
        try:
            if sha256 is not None:
                _check_sha256(sha256, "sha256")
                size = path.stat().st_size
            else:
                import hashlib  # only uploads and downloads hash; `jobs status` starts faster without it

                digest = hashlib.sha256()
                size = 0
                with open(path, "rb") as f:
                    while chunk := f.read(CHUNK):
                        digest.update(chunk)
                        size += len(chunk)
                sha256 = digest.hexdigest()
        except OSError as err:
            raise errors.ConfigError(f"cannot read bundle {path}: {err.strerror or err}") from None
        headers = {"x-lease": lease, "x-content-sha256": sha256, "content-length": size,
                   "content-type": "application/octet-stream"}
        return self._call("PUT", f"/v1/model/{_quote(job_id)}", headers=headers, body_path=path,
                          timeout=max(self.timeout, 120.0))

    def jobs(self, status: str | None = None, model: str | None = None, host: str | None = None,
             limit: int | None = None, offset: int = 0) -> dict:
        query = {k: v for k, v in (("status", status), ("model", model), ("host", host), ("limit", limit),
                                   ("offset", offset or None)) if v is not None}
        qs = ("?" + urllib.parse.urlencode(query)) if query else ""
        return self._call("GET", "/v1/jobs" + qs)

    def job(self, id_or_prefix: str) -> dict:
        """``{"job": detail}``; a prefix matching several jobs raises AmbiguousId."""
        if not id_or_prefix:
            raise errors.BadRequest("a job id (or a unique prefix of one) is required")
        return self._call("GET", f"/v1/job/{_quote(id_or_prefix)}")

    def workers(self) -> dict:
        return self._call("GET", "/v1/workers")

    def failures(self, limit: int | None = None) -> dict:
        """``{"failures": [...]}``: the newest failed or stale attempts (the server's default is 20)."""
        qs = "" if limit is None else "?" + urllib.parse.urlencode({"limit": limit})
        return self._call("GET", "/v1/failures" + qs)

    def submit(self, toml_text: str, *, dry_run: bool = False) -> dict:
        """``{"added", "existing", "jobs": [{"id", "name", "model", "mode", "hyper", "seed"}], "dry_run"}``."""
        return self._call("POST", "/v1/jobs", payload={"toml": toml_text, "dry_run": dry_run}, session=True)

    def metric_history(self, id_or_prefix: str) -> dict:
        """``{"job_id", "attempts": [{"attempt", "points": [{"t", "epoch", "step", "metrics"}]}]}``."""
        return self._call("GET", f"/v1/job/{_quote(id_or_prefix)}/metrics")

    def results(self, *, sweep: str | None = None, model: str | None = None, sort: str | None = None,
                order: str | None = None) -> dict:
        """``{"results", "metrics", "sort", "order"}``: completed jobs and their final metrics, best first."""
        query = {k: v for k, v in (("sweep", sweep), ("model", model), ("sort", sort), ("order", order)) if v}
        return self._call("GET", "/v1/results" + ("?" + urllib.parse.urlencode(query) if query else ""))

    def cancel(self, job_id: str) -> dict:
        return self._call("POST", f"/v1/job/{_quote(job_id)}/cancel", session=True)

    def requeue(self, job_id: str) -> dict:
        return self._call("POST", f"/v1/job/{_quote(job_id)}/requeue", session=True)

    def reload(self, text: str | None = None, name: str | None = None) -> dict:
        """Put the manifest ``text`` (from file ``name``) in force; without it, the receiving peer's own file."""
        payload = None if text is None else {"text": text, "name": name or "manifest"}
        return self._call("POST", "/v1/manifest/reload", payload=payload, session=True)

    def add_peer(self, peer_id: str, url: str) -> dict:
        """Add a coordinator peer to the replicated group (a learner first); answers once committed."""
        return self._call("POST", "/v1/peers", payload={"id": peer_id, "url": url})

    def remove_peer(self, peer_id: str) -> dict:
        return self._call("DELETE", f"/v1/peers/{_quote(peer_id)}")

    def replace_peer(self, old: str, peer_id: str, url: str) -> dict:
        return self._call("POST", "/v1/peers/replace", payload={"old": old, "id": peer_id, "url": url})
    def hosts(self) -> dict:
        """``{"hosts": [...]}``: every host with a key or a [[hosts]] entry (operator; keys are never listed)."""
        return self._call("GET", "/v1/hosts")

    def hosts_add(self, host: str) -> dict:
        """``{"host", "key", "enroll"?}``: a new key for ``host``, answered this once."""
        return self._call("POST", "/v1/hosts", payload={"host": host})

    def hosts_rotate(self, host: str) -> dict:
        return self._call("POST", f"/v1/hosts/{_quote(host)}/rotate")

    def hosts_revoke(self, host: str) -> dict:
        return self._call("POST", f"/v1/hosts/{_quote(host)}/revoke")

    def metrics(self) -> str:
        status, _, data = self._exchange("GET", "/metrics", headers={"accept": "text/plain"})
        if status >= 300:
            raise self._error(self.urls[self._preferred], "GET", "/metrics", status, data)
        return data.decode("utf-8")

    def download_artifact(self, artifact_id: str, dest_path: str | Path) -> Path:
        """Stream an artifact to ``dest_path`` through a temporary file; its sha256 must equal the id."""
        _check_sha256(artifact_id, "artifact id")
        return self._download(f"/v1/artifact/{artifact_id}", Path(dest_path), expect=artifact_id)

    def download_zipapp(self, dest_path: str | Path) -> Path:
        """Fetch the coordinator's zipapp; verified against its x-content-sha256 header when sent."""
        return self._download("/v1/zipapp", Path(dest_path), expect=None)

    def _download(self, path: str, dest: Path, expect: str | None) -> Path:
        tmp = dest.with_name(f".{dest.name}.part-{os.getpid()}-{threading.get_ident()}")
        with _writing(dest):
            dest.parent.mkdir(parents=True, exist_ok=True)

        import hashlib

        def sink(resp) -> str:
            digest = hashlib.sha256()
            with _writing(dest):
                f = open(tmp, "wb")
            with f:
                while chunk := resp.read(CHUNK):
                    digest.update(chunk)
                    with _writing(dest):
                        f.write(chunk)
                with _writing(dest):
                    f.flush()
                    os.fsync(f.fileno())
            return digest.hexdigest()

        try:
            status, headers, result = self._exchange("GET", path, sink=sink,
                                                        headers={"accept": "application/octet-stream"},
                                                        timeout=max(self.timeout, 120.0))
            if status >= 300:
                raise self._error(self.urls[self._preferred], "GET", path, status, result)
            declared = headers.get("x-content-sha256")
            for want in (expect, declared):
                if want and want != result:
                    raise errors.IntegrityError(
                        f"download of {path} has sha256 {result}, expected {want}; "
                        "the transfer or the stored file is damaged, try again")
            with _writing(dest):
                os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
        return dest
