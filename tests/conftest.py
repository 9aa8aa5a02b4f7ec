"""Shared fixtures: a real coordinator, in a subprocess or in this process, and raw HTTP helpers.

- ``serve_process`` — a factory that starts ``python -m cis490fleet serve`` on
  127.0.0.1:0 with a temp data folder (and manifest, if given), waits for
  /v1/health, and kills whatever is left at teardown. Use it for what needs a
  real process: signals, kill -9, exit codes, sd_notify, the command line.
- ``live_server`` — a factory for an in-process ``Coordinator`` + HTTP server
  on 127.0.0.1:0 (served by a thread). Faster; use it for the API itself.
- ``http_call`` / ``Conn`` — raw ``http.client`` requests that return
  ``(status, headers, json-or-bytes)``; no project code in the way.
- ``manifest_toml(n_jobs, ...)`` — manifest text with ``n_jobs`` jobs (a seed sweep).

Both servers get the operator token ``OPERATOR_TOKEN`` unless told otherwise, and
the read token ``READ_TOKEN`` (this process has it in CIS490_READ_TOKEN, so a
``Client`` reads). They run with the real key path, not the legacy mode: a
server's ``call`` signs a request that names a host in ``x-lab-host`` with that
host's key, giving the host a key first (``host_key``); ``client(host)`` is a
signing ``Client``; ``host_key_for(url, host)`` gives a worker its key.
"""

from __future__ import annotations

import contextlib
import http.client
import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
OPERATOR_TOKEN = "test-operator-token-0123456789"
READ_TOKEN = "test-read-token-0123456789"
_SERVERS: dict[str, Any] = {}  # URL -> LiveServer or ServeProcess, for host_key_for
_SERVE_KEYS: dict[tuple[str, str], bytes] = {}  # (data folder, host) -> the key a serve subprocess drew


@pytest.fixture(autouse=True, scope="session")
def _zipapp_bytecode_cache_in_a_temp_folder(tmp_path_factory):
    """A pyz run by a test keeps its compiled modules here, not in the user's ~/.cache."""
    os.environ.setdefault("CIS490_CACHE_DIR", str(tmp_path_factory.mktemp("bytecode-cache")))
    os.environ["CIS490_READ_TOKEN"] = READ_TOKEN


@pytest.fixture(autouse=True, scope="session")
def _clients_of_fixture_servers_sign():
    """A ``client.Client`` made in this process with a host id but no key, for a fixture server, gets that
    host's key there: tests (and in-process workers) use the real signed path without handling keys."""
    from cis490fleet import client

    original = client.Client.__init__

    def init(self, urls=None, *args, host_id=None, host_key=None, **kw):
        if host_id and host_key is None:
            for url in client.parse_urls(urls):
                server = _SERVERS.get(url)
                if server is not None and not server.legacy:
                    host_key = server.host_key(host_id)
                    break
        original(self, urls, *args, host_id=host_id, host_key=host_key, **kw)

    client.Client.__init__ = init
    yield
    client.Client.__init__ = original


def clean_env() -> dict:
    """This process's environment without cis490fleet's settings, except where a pyz keeps its bytecode and the
    fixture servers' read token (a `jobs` subprocess reads with it, as an operator's shell would)."""
    return {k: v for k, v in os.environ.items()
            if not k.startswith("CIS490_") or k in ("CIS490_CACHE_DIR", "CIS490_READ_TOKEN")}


def manifest_toml(n_jobs: int = 3, *, model: str = "mlp", mode: str = "train", heartbeat_s: float = 30,
                  stale_after_s: float = 600, max_attempts: int = 3, max_artifact_bytes: int | None = None,
                  extra: str = "") -> str:
    """A manifest with ``n_jobs`` jobs of one model (seeds 0..n-1), plus ``extra`` TOML appended."""
    lines = ["[fleet]", f"heartbeat_s = {heartbeat_s}", f"stale_after_s = {stale_after_s}",
             f"max_attempts = {max_attempts}"]
    if max_artifact_bytes is not None:
        lines.append(f"max_artifact_bytes = {max_artifact_bytes}")
    if n_jobs:
        lines += ["", "[[sweeps]]", f'model = "{model}"', f'mode = "{mode}"',
                  f"seed = [{', '.join(str(i) for i in range(n_jobs))}]"]
    return "\n".join(lines) + "\n" + extra


def decode(headers, data: bytes) -> Any:
    ctype = headers.get("content-type", "") if headers is not None else ""
    if data and ctype.startswith("application/json"):
        return json.loads(data)
    return data


def test_host_key(host: str) -> bytes:
    """The key the in-process fixtures give ``host`` (the same on every server, so a restart keeps it)."""
    import hashlib

    return hashlib.sha256(f"test host key/{host}".encode()).digest()


test_host_key.__test__ = False


def signed(key: bytes, host: str, method: str, path: str, body: Any, headers: dict | None,
           kind: str = "host") -> tuple[Any, dict]:
    """(body bytes, headers with the host's signature) for a raw request, as ``client.Client`` signs it;
    ``kind="peer"``: as peer ``host`` signs with the cluster key."""
    import secrets

    from cis490fleet import signing

    headers = dict(headers or {})
    if isinstance(body, (dict, list)):
        body = json.dumps(body).encode()
        headers.setdefault("content-type", "application/json")
    sha = headers.get("x-content-sha256") if method == "PUT" and headers.get("x-content-sha256") else \
        signing.body_sha256(body or b"")
    headers.update(signing.signature_headers(key, f"{kind}/{host}", method, path, sha, time.time(),
                                             secrets.token_hex(16), headers))
    return body, headers


def _with_credentials(server, method: str, path: str, body: Any, headers: dict | None) -> tuple[Any, dict]:
    """A fixture server's ``call``: the read token, and a signature when the request names a host."""
    headers = dict(headers or {})
    headers.setdefault("x-read-token", READ_TOKEN)
    host = headers.get("x-lab-host")
    if host and "x-fleet-signature" not in headers and not server.legacy:
        key = server.host_key(host)
        if key is not None:
            return signed(key, host, method, path, body, headers)
    return body, headers


CLUSTER_KEY = bytes(range(32))


def cluster_key_file(folder: Path) -> Path:
    """A --cluster-key-file holding ``CLUSTER_KEY`` (the same for every peer a test starts), mode 0600."""
    path = Path(folder) / "cluster.key"
    if not path.exists():
        path.write_text(CLUSTER_KEY.hex() + "\n")
        path.chmod(0o600)
    return path


class GroupKeys:
    """Host keys of a coordinator group reached by its URLs (``POST /v1/hosts`` with the operator token, through
    any peer): ``register()`` makes the fixture helpers sign requests to every URL with them."""

    legacy = False

    def __init__(self, urls, token: str = OPERATOR_TOKEN, context=None):
        self.urls = [u.rstrip("/") for u in urls]
        self.token, self.context = token, context
        self.keys: dict[str, bytes] = {}
        self.port = None

    def register(self) -> "GroupKeys":
        for url in self.urls:
            _SERVERS[url] = self
        return self

    def host_key(self, host: str) -> bytes | None:
        from cis490fleet import model
        from cis490fleet.client import Client

        if not model.HOST_ID_RE.match(host):
            return None
        if host not in self.keys:
            with Client(self.urls, operator_token=self.token, retries=20, backoff_s=0.1, backoff_max_s=0.5) as c:
                self.keys[host] = bytes.fromhex(c.hosts_add(host)["key"])
        return self.keys[host]


def alias(url: str, server) -> None:
    """Requests to ``url`` (a proxy or a second listener in front of ``server``, or of the fixture server on
    that port) are signed for ``server``."""
    if isinstance(server, int):
        server = next((s for s in reversed(list(_SERVERS.values())) if s.port == server), None)
        if server is None:
            return
    _SERVERS[url.rstrip("/")] = server


def host_key_for(url: str, host: str) -> bytes:
    """The key of ``host`` on the fixture server at ``url`` (given to it first if needed)."""
    return _SERVERS[url.rstrip("/")].host_key(host)


def http_call(url: str, method: str, path: str, body: Any = None, headers: dict | None = None,
              timeout: float = 30, context=None, credentials: bool = True) -> tuple[int, Any, Any]:
    """One request on a fresh connection; a dict/list body is sent as JSON. ``credentials``: see ``Conn``."""
    with Conn(url, timeout=timeout, context=context, credentials=credentials) as conn:
        return conn.call(method, path, body, headers)


class Conn:
    """One kept-alive ``http.client`` connection to ``url``.

    To a fixture server, a request goes with the read token and, when it names a host in ``x-lab-host``,
    signed with that host's key; ``credentials=False`` sends exactly what the test gives."""

    def __init__(self, url: str, timeout: float = 30, context=None, credentials: bool = True):
        self.server = _SERVERS.get(url.rstrip("/")) if credentials else None
        parts = urllib.parse.urlsplit(url)
        if parts.scheme == "https":
            self.conn = http.client.HTTPSConnection(parts.hostname, parts.port, timeout=timeout, context=context)
        else:
            self.conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)

    def call(self, method: str, path: str, body: Any = None, headers: dict | None = None) -> tuple[int, Any, Any]:
        """One request; one that the fixtures signed is signed again once the time a restarted coordinator (or a
        new leader) names in ``x-fleet-not-before`` has come, as our client does."""
        status, answer_headers, answer = self._send(method, path, body, headers)
        not_before = answer_headers.get("x-fleet-not-before")
        if status == 401 and self.server is not None and not_before:
            time.sleep(max(0.0, int(not_before) - time.time()) + 0.05)
            status, answer_headers, answer = self._send(method, path, body, headers)
        return status, answer_headers, answer

    def _send(self, method: str, path: str, body: Any, headers: dict | None) -> tuple[int, Any, Any]:
        if self.server is not None:
            body, headers = _with_credentials(self.server, method, path, body, headers)
        headers = dict(headers or {})
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
            headers.setdefault("content-type", "application/json")
        self.conn.request(method, path, body=body, headers=headers)
        resp = self.conn.getresponse()
        data = resp.read()
        return resp.status, resp.headers, decode(resp.headers, data)

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> "Conn":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def wait_health(url: str, timeout: float = 30, proc: subprocess.Popen | None = None, context=None) -> dict:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"serve exited with {proc.returncode} before answering /v1/health")
        try:
            status, _, body = http_call(url, "GET", "/v1/health", timeout=5, context=context)
            if status == 200:
                return body
        except OSError as err:
            last = err
        time.sleep(0.05)
    raise TimeoutError(f"{url}/v1/health did not answer within {timeout} s (last error: {last})")


@dataclass
class ServeProcess:
    """A running ``serve`` subprocess. ``log_text()`` is its stderr so far."""

    proc: subprocess.Popen
    url: str
    data_dir: Path
    log_path: Path
    argv: list[str]
    env: dict
    ssl_context: Any = None
    legacy: bool = False

    @property
    def port(self) -> int:
        return urllib.parse.urlsplit(self.url).port

    def call(self, method: str, path: str, body: Any = None, headers: dict | None = None, timeout: float = 30):
        return http_call(self.url, method, path, body, headers, timeout, context=self.ssl_context)

    def host_key(self, host: str) -> bytes | None:
        """``host``'s key, added through ``POST /v1/hosts`` with the operator token the first time."""
        from cis490fleet import model

        slot = (str(self.data_dir), host)
        if not model.HOST_ID_RE.match(host):
            return None
        if slot not in _SERVE_KEYS:
            token = self.env.get("CIS490_OPERATOR_TOKEN")
            if not token:
                return None
            status, _, body = http_call(self.url, "POST", "/v1/hosts", {"host": host},
                                        {"x-operator-token": token}, context=self.ssl_context, credentials=False)
            if status != 201:
                raise AssertionError(f"could not give {host} a key: {status} {body}")
            _SERVE_KEYS[slot] = bytes.fromhex(body["key"])
        return _SERVE_KEYS[slot]

    def client(self, host: str | None = None, **kw):
        """A ``client.Client`` for this server; with ``host``, one that signs as that host."""
        from cis490fleet.client import Client

        key = self.host_key(host) if host else None
        return Client(self.url, host_id=host, host_key=key, **kw)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        """Send ``sig`` and wait for the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        """kill -9, as a power cut would."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)


def serve_command(*args: str, program: str | Path | None = None) -> list[str]:
    """argv of ``serve``: from the sources, or from ``program`` (a built cis490fleet.pyz)."""
    if program is not None:
        return [sys.executable, str(program), "serve", *args]
    return [sys.executable, "-m", "cis490fleet", "serve", *args]


def serve_env(extra: dict | None = None, token: str | None = OPERATOR_TOKEN) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CIS490_", "NOTIFY_SOCKET", "WATCHDOG_"))}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    env["CIS490_READ_TOKEN"] = READ_TOKEN
    if token:
        env["CIS490_OPERATOR_TOKEN"] = token
    env.update(extra or {})
    return env


@pytest.fixture
def serve_process(tmp_path_factory):
    """Factory: ``start(data_dir=None, manifest=None, args=(), env=None, token=..., wait=True, program=None)
    -> ServeProcess``.

    ``manifest`` is TOML text (written to a file next to the data folder) or a path.
    Pass the same ``data_dir`` again to restart on the same state. ``program``
    runs a built zipapp instead of the sources; ``ssl_context`` is the client
    context for an https serve (give --cert/--key in ``args``).
    """
    started: list[ServeProcess] = []

    def start(data_dir: Path | None = None, manifest: str | Path | None = None, args=(), env: dict | None = None,
              token: str | None = OPERATOR_TOKEN, wait: bool = True, timeout: float = 60,
              ssl_context=None, program: str | Path | None = None) -> ServeProcess:
        base = tmp_path_factory.mktemp("serve")
        data_dir = Path(data_dir) if data_dir else base / "data"
        argv = serve_command("--data", str(data_dir), "--bind", "127.0.0.1:0", "--port-file", str(base / "url"),
                             *args, program=program)
        if manifest is not None:
            path = Path(manifest) if isinstance(manifest, Path) else base / "manifest.toml"
            if not isinstance(manifest, Path):
                path.write_text(manifest, encoding="utf-8")
            argv += ["--manifest", str(path)]
        log_path = base / "serve.log"
        full_env = serve_env(env, token)
        with open(log_path, "wb") as log_file:
            proc = subprocess.Popen(argv, cwd=ROOT, env=full_env, stdout=log_file, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL)
        sp = ServeProcess(proc, "", data_dir, log_path, argv, full_env, ssl_context,
                          legacy="--trust-host-header" in args)
        started.append(sp)
        if not wait:
            return sp
        deadline = time.monotonic() + timeout
        url_file = base / "url"
        while not url_file.exists():
            if proc.poll() is not None:
                raise RuntimeError(f"serve exited with {proc.returncode}:\n{sp.log_text()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"serve did not start within {timeout} s:\n{sp.log_text()}")
            time.sleep(0.05)
        sp.url = url_file.read_text().strip()
        wait_health(sp.url, timeout=max(1.0, deadline - time.monotonic()), proc=proc, context=ssl_context)
        _SERVERS[sp.url] = sp
        return sp

    yield start
    for sp in started:
        if sp.proc.poll() is None:
            sp.proc.kill()
            sp.proc.wait(30)


@dataclass
class LiveServer:
    """An in-process coordinator serving on 127.0.0.1; ``coordinator`` is the ``Coordinator``."""

    coordinator: Any
    server: Any
    url: str
    thread: threading.Thread
    manifest_path: Path | None = None
    ssl_context: Any = None
    closed: bool = field(default=False)

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def legacy(self) -> bool:
        return self.coordinator.trust.legacy

    def call(self, method: str, path: str, body: Any = None, headers: dict | None = None, timeout: float = 30):
        return http_call(self.url, method, path, body, headers, timeout, context=self.ssl_context)

    def host_key(self, host: str) -> bytes | None:
        """``host``'s key (``test_host_key``), stored through the queue command `jobs hosts add` applies;
        None for a host id no key can be given to."""
        from cis490fleet import errors, model

        if not model.HOST_ID_RE.match(host):
            return None
        key = test_host_key(host)
        if self.coordinator.host_key(host) != key:
            try:
                self.coordinator.execute({"op": "host_key_set", "host": host, "key": key.hex(), "by": "test"})
            except errors.BadRequest:  # it has another key: a test rotated it
                self.coordinator.execute({"op": "host_key_set", "host": host, "key": key.hex(), "by": "test",
                                          "rotate": True})
        return key

    def client(self, host: str | None = None, **kw):
        """A ``client.Client`` for this server; with ``host``, one that signs as that host."""
        from cis490fleet.client import Client

        return Client(self.url, host_id=host, host_key=self.host_key(host) if host else None,
                      ca=kw.pop("ca", None), **kw)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.coordinator.close(grace=10)


@pytest.fixture
def live_server(tmp_path_factory):
    """Factory: ``start(manifest=None, token=OPERATOR_TOKEN, server_context=None, client_context=None,
    synchronous="NORMAL", data_dir=None) -> LiveServer``.

    ``manifest`` is TOML text or a path; it is written to a file and passed as
    --manifest would be, so reload works. Closed at teardown.
    """
    from cis490fleet.coordinator import Coordinator

    servers: list[LiveServer] = []

    def start(manifest: str | Path | None = None, token: str | None = OPERATOR_TOKEN, server_context=None,
              client_context=None, synchronous: str = "NORMAL", data_dir: Path | None = None,
              sweep_interval: float | None = None, legacy: bool = False, public_read: bool = False) -> LiveServer:
        base = tmp_path_factory.mktemp("live")
        manifest_path = None
        if manifest is not None:
            manifest_path = Path(manifest) if isinstance(manifest, Path) else base / "manifest.toml"
            if not isinstance(manifest, Path):
                manifest_path.write_text(manifest, encoding="utf-8")
        from cis490fleet import auth

        trust = auth.Trust(operator_tokens={auth.DEFAULT_OPERATOR: token} if token else {},
                           read_tokens={"test": READ_TOKEN}, legacy=legacy, public_read=public_read)
        coord = Coordinator(data_dir or base / "data", manifest_path=manifest_path, operator_token=token,
                            synchronous=synchronous, node_id="test-node", sweep_interval=sweep_interval, trust=trust)
        try:
            coord.load_manifest(at_start=True)
            server = coord.listen("127.0.0.1", 0, server_context)
        except BaseException:
            coord.close()
            raise
        thread = coord.serve_in_thread()
        coord.start_background()
        live = LiveServer(coord, server, coord.url, thread, manifest_path, client_context)
        servers.append(live)
        _SERVERS[live.url] = live
        return live

    yield start
    for live in servers:
        live.close()


def wait_for(what: str, check, timeout: float = 60, every: float = 0.1):
    """Poll ``check()`` until it returns something truthy and return that; fail naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(every)


def closed_port_url() -> str:
    """A loopback URL on a port nothing listens on (bound once, then released)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"http://127.0.0.1:{port}"



def keeps_the_gil(call, times: int = 20_000, within_s: float = 0.3) -> bool:
    """Whether ``call()``, up to ``times`` over in ``within_s``, never lets go of the GIL. A thread beside the
    calls waits for the GIL with a long switch interval, so it runs only if a call lets go; a call that lets go
    loses the race for it back now and then (os.urandom within about a hundred calls), hence the many calls."""
    interval = 1.0
    spins = [0]
    stop = threading.Event()

    def spin():
        while not stop.is_set():
            spins[0] += 1

    old = sys.getswitchinterval()
    sys.setswitchinterval(interval)
    spinner = threading.Thread(target=spin, daemon=True)
    try:
        spinner.start()
        while spins[0] == 0:
            time.sleep(0.01)  # the spinner runs; this thread has the GIL back only after the switch interval
        before, started = spins[0], time.monotonic()
        n = 0
        while n < times and spins[0] == before and time.monotonic() - started < within_s:
            call()
            n += 1
        after, took = spins[0], time.monotonic() - started
    finally:
        stop.set()
        sys.setswitchinterval(old)
        spinner.join()
    assert took < interval / 2 or after != before, "the calls outlasted the switch interval: no answer"
    return after == before


@contextlib.contextmanager
def loopback_http(handler: type):
    """A real ``http.server`` with ``handler`` on 127.0.0.1, serving on a thread: yields its URL."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
