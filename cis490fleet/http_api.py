"""The coordinator's HTTP wire API: server, route table, request parsing and limits, error mapping.

Shell. Owns the sockets of ``serve``: HTTP/1.1 keep-alive on a threading server,
each response written in one send, TCP_NODELAY, a bound on handler threads, a
socket timeout, bodies bounded and validated before anything acts on them.
Every decision about jobs and artifacts is the application's (``server.app``,
a ``coordinator.Coordinator`` or anything with the same methods); this module
only translates between the wire and those calls. Tokens never reach a log.

Routes live in one table (``make_router``). Other modules add pages without
touching this file: a module named in ``EXTENSIONS`` that exists defines
``register(router)`` and calls ``router.add(method, template, handler)``; its
handler gets a ``Request`` and returns a ``Response``, a dict (JSON 200) or a
``(status, content_type, body_bytes)`` tuple. That is how the dashboard (GET /)
and the Prometheus page (GET /metrics) replace the placeholders here.
"""

from __future__ import annotations

import http.client
import http.server
import importlib
import json
import logging
import re
import socket
import ssl
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Callable

from cis490fleet import __version__, auth, connection_guard, edge_json, errors, model, openapi, results, signing, tls
from cis490fleet.client import connection_dropped
from cis490fleet.jobs import CLASS_JOB, FAILURE_CLASSES

log = logging.getLogger(__name__)
access_log = logging.getLogger(__name__ + ".access")

MAX_JSON_BYTES = 1 << 20
MAX_WAIT_S = 60.0
SOCKET_TIMEOUT_S = 60.0
MAX_HANDLERS = 512
MAX_LEASE_CHARS = 128
CLIENT_ID_RE = re.compile(r"[A-Za-z0-9_-]{16,64}")
MAX_SERIAL = 2**63 - 1  # SQLite's INTEGER
MAX_ERROR_TEXT = 64 * 1024
MAX_LOG_TAIL = 256 * 1024
LINGER_S = 2.0
SMALL_STREAM = 256 * 1024  # streamed bodies up to this size go out in the same send as the headers
EXTENSIONS = ("cis490fleet.dashboard", "cis490fleet.metrics", "cis490fleet.checkpoint_api", "cis490fleet.log_api",
              "cis490fleet.membership_api")
_SECRET_QUERY_KEYS = re.compile(r"token|secret|key|pass|auth|lease", re.I)


class MethodNotAllowed(errors.BadRequest):
    code = "method_not_allowed"

    def __init__(self, method: str, path: str, allowed: list[str]):
        self.allowed = allowed
        super().__init__(f"{method[:20]} is not supported on {path[:200]}; use {' or '.join(allowed)}")


class LengthRequired(errors.BadRequest):
    code = "length_required"


# Statuses of the errors this layer adds; everything else goes through errors.http_status().
_LOCAL_STATUS = {MethodNotAllowed: 405, LengthRequired: 411}


def status_of(err: errors.FleetError) -> int:
    for cls in type(err).__mro__:
        if cls in _LOCAL_STATUS:
            return _LOCAL_STATUS[cls]
    return errors.http_status(err)


# -- requests and responses ---------------------------------------------------------------------


@dataclass
class Response:
    status: int = 200
    body: bytes = b""
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)
    stream: BinaryIO | None = None  # sent after the headers, ``length`` bytes; closed afterwards
    length: int = 0
    close: bool = False


def json_response(obj: Any, status: int = 200, headers: dict | None = None) -> Response:
    body = json.dumps(obj, separators=(",", ":"), allow_nan=False).encode()
    return Response(status=status, body=body, headers=dict(headers or {}))


def error_response(err: errors.FleetError) -> Response:
    extra = {"not_before": err.not_before} if isinstance(err, errors.StaleSignature) else {}
    resp = json_response({"error": err.code, "detail": err.detail, **extra}, status_of(err))
    if isinstance(err, MethodNotAllowed):
        resp.headers["Allow"] = ", ".join(err.allowed)
    if isinstance(err, errors.NotLeader) and err.leader_url:
        resp.headers["x-leader"] = err.leader_url
    if isinstance(err, (errors.Unavailable, errors.NotLeader)):
        resp.headers.setdefault("Retry-After", "1")
    if isinstance(err, errors.StaleSignature):
        resp.headers["x-fleet-not-before"] = str(err.not_before)
    return resp


class Request:
    """One parsed request as handlers see it. The body is read only when a handler asks for it."""

    def __init__(self, handler: "Handler", method: str, path: str, query: dict[str, list[str]],
                 params: dict[str, str]):
        self.handler = handler
        self.app = handler.server.app
        self.server = handler.server
        self.method = method
        self.path = path
        self.query = query
        self.params = params
        self.headers = handler.headers
        self.peer_host = handler.peer_host
        self._length = handler.body_length
        self.remaining = self._length or 0
        self._body: bytes | None = None
        self._identity: auth.Identity | None = None
        self.signed_body_limit = RAFT_MAX_BYTES if path.startswith(RAFT_PREFIX) else MAX_JSON_BYTES

    def header(self, name: str) -> str | None:
        value = self.headers.get(name)
        return value.strip() if isinstance(value, str) else None

    @property
    def content_length(self) -> int | None:
        return self._length

    def read(self, n: int = -1) -> bytes:
        """Up to ``n`` bytes of the body (the rest with -1); never reads past content-length."""
        if self.remaining <= 0:
            return b""
        self.handler.send_continue()
        n = self.remaining if n < 0 else min(n, self.remaining)
        data = self.handler.rfile.read(n)
        self.remaining -= len(data)
        if not data:
            self.remaining = 0
            self.handler.close_connection = True
        return data

    def readinto(self, buffer) -> int:
        """``read`` into ``buffer`` (a writable bytes-like object): the upload's copy loop reuses one buffer."""
        if self.remaining <= 0:
            return 0
        self.handler.send_continue()
        view = memoryview(buffer).cast("B")
        n = self.handler.rfile.readinto(view[:self.remaining]) or 0
        self.remaining -= n
        if not n:
            self.remaining = 0
            self.handler.close_connection = True
        return n

    def body_bytes(self, limit: int = MAX_JSON_BYTES) -> bytes:
        """The whole body, read once (the signature check and the handler share it)."""
        if self._body is not None:
            return self._body
        if self._length is not None and self._length > limit:
            raise errors.TooLarge(f"request body of {self._length} bytes is over the limit of {limit} bytes")
        data = self.read()
        if self._length is not None and len(data) < self._length:
            raise errors.BadRequest(f"request body ended after {len(data)} of {self._length} bytes")
        self._body = data
        return data

    def json(self) -> Any:
        """The JSON body (finite numbers, bounded depth: ``edge_json``); None for an empty body."""
        return edge_json.parse(self.body_bytes())

    def json_object(self) -> dict:
        body = self.json()
        if body is None:
            return {}
        if not isinstance(body, dict):
            raise errors.BadRequest(f"request body must be a JSON object, got {_json_type(body)}")
        return body

    def identity(self) -> "auth.Identity":
        """What this request proved about its sender (``auth.identify``), checked once."""
        if self._identity is None:
            self._identity = auth.identify(self)
        return self._identity

    def host_id(self) -> str:
        """The worker this request acts for: proved by a signature or certificate (``auth.host``)."""
        return auth.host(self)

    def lease(self) -> str | None:
        """The ``x-lease`` header. Only in legacy mode may it be missing (None: 'fence by host identity', as the
        original client sends none); otherwise every worker write carries the lease of its claim."""
        value = self.header("x-lease")
        if value is None or value == "":
            if self.app.trust.legacy:
                return None
            raise errors.BadRequest("missing x-lease header: send the lease the claim answered with (only serve "
                                    "--trust-host-header fences by host name alone)")
        if len(value) > MAX_LEASE_CHARS or not value.isprintable() or not value.isascii():
            raise errors.BadRequest(f"x-lease is not a valid lease: expected the lease token from the claim "
                                    f"(at most {MAX_LEASE_CHARS} printable characters)")
        return value

    def session(self) -> dict:
        """``client_id`` + ``serial`` from ``x-client-id`` / ``x-client-serial`` for a write command, so a
        retried request applies once; empty when neither is sent (the original client sends none)."""
        client_id, serial = self.header("x-client-id"), self.header("x-client-serial")
        if not client_id and not serial:
            return {}
        if not client_id:
            raise errors.BadRequest("x-client-serial was sent without x-client-id: send both headers or neither")
        if not serial:
            raise errors.BadRequest("x-client-id was sent without x-client-serial: send both headers or neither")
        if not CLIENT_ID_RE.fullmatch(client_id):
            raise errors.BadRequest(f"x-client-id {client_id[:80]!r} is not a valid client id: use 16-64 letters, "
                                    "digits, '_' or '-'")
        if not (serial.isascii() and serial.isdigit()) or not 0 < int(serial) <= MAX_SERIAL:
            raise errors.BadRequest(f"x-client-serial {serial[:40]!r} is not a positive whole number: send the "
                                    f"request's serial, 1 to {MAX_SERIAL}")
        return {"client_id": client_id, "serial": int(serial)}

    def require_operator(self) -> str:
        """The name of the operator whose token came with the request."""
        return auth.operator(self)

    def require_reader(self) -> None:
        auth.reader(self)

    def query_one(self, name: str) -> str | None:
        values = self.query.get(name)
        if not values:
            return None
        if len(values) > 1:
            raise errors.BadRequest(f"query parameter {name!r} is given {len(values)} times; give it once")
        return values[0]

    def query_int(self, name: str, default: int, lo: int, hi: int) -> int:
        raw = self.query_one(name)
        if raw is None or raw == "":
            return default
        try:
            value = int(raw)
        except ValueError:
            raise errors.BadRequest(f"query parameter {name}={raw[:40]!r} is not an integer") from None
        if not lo <= value <= hi:
            raise errors.BadRequest(f"query parameter {name}={value} is out of range: expected {lo}..{hi}")
        return value


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def field_object(body: dict, name: str, required: bool = False) -> dict | None:
    value = body.get(name)
    if value is None:
        if required:
            raise errors.BadRequest(f"field {name!r} is required: send a JSON object")
        return None
    if not isinstance(value, dict):
        raise errors.BadRequest(f"field {name!r} must be a JSON object, got {_json_type(value)}")
    return value


def field_string(body: dict, name: str, required: bool = False, keep_last: int = MAX_ERROR_TEXT) -> str | None:
    """A string field; a longer text keeps its last ``keep_last`` characters (where a trainer's error ends)."""
    value = body.get(name)
    if value is None:
        if required:
            raise errors.BadRequest(f"field {name!r} is required: send a string")
        return None
    if not isinstance(value, str):
        raise errors.BadRequest(f"field {name!r} must be a string, got {_json_type(value)}")
    return value[-keep_last:]


def field_number(body: dict, name: str, lo: float, hi: float) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise errors.BadRequest(f"field {name!r} must be a number of seconds, got {_json_type(value)}")
    if not lo <= value <= hi:
        raise errors.BadRequest(f"field {name!r} = {value} is out of range: expected {lo:g}..{hi:g}")
    return float(value)


def job_id_param(value: str) -> str:
    """A full job id, as workers send it."""
    if not model.JOB_ID_RE.match(value):
        raise errors.BadRequest(f"job id {value[:80]!r} is not valid: expected 64 lowercase hex digits")
    return value


def job_ref_param(value: str) -> str:
    """A job's manifest name, its id or an operator's unique prefix (at least 4 hex digits)."""
    if not model.NAME_RE.match(value):
        raise errors.BadRequest(f"job {value[:80]!r} is not valid: expected a job name from the manifest, 64 hex "
                                "digits or a unique prefix of at least 4")
    return value


def sha_param(value: str, what: str = "artifact id") -> str:
    if not model.SHA256_RE.match(value):
        raise errors.BadRequest(f"{what} {value[:80]!r} is not valid: expected 64 lowercase hex digits (a sha256)")
    return value


# -- the route table ------------------------------------------------------------------------------

Handler_ = Callable[[Request], Any]


@dataclass
class Route:
    method: str
    template: str
    handler: Handler_
    regex: re.Pattern = field(repr=False, default=None)

    def __post_init__(self):
        pattern = re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[^/]+)", re.escape(self.template))
        self.regex = re.compile(f"^{pattern}$")


class Router:
    """Method + path template -> handler. ``{name}`` in a template matches one path segment."""

    def __init__(self):
        self.routes: list[Route] = []
        self._exact: dict[tuple[str, str], Route] = {}

    def add(self, method: str, template: str, handler: Handler_) -> None:
        """Register ``handler``; an existing route with the same method and template is replaced."""
        method = method.upper()
        self.routes = [r for r in self.routes if (r.method, r.template) != (method, template)]
        self.routes.append(Route(method, template, handler))
        self._exact = {(r.method, r.template): r for r in self.routes if "{" not in r.template}

    def table(self) -> list[tuple[str, str]]:
        return [(r.method, r.template) for r in self.routes]

    def match(self, method: str, path: str) -> tuple[Route, dict[str, str]]:
        route = self._exact.get((method, path))
        if route is not None:
            return route, {}
        allowed = []
        for route in self.routes:
            m = route.regex.match(path)
            if m is None:
                continue
            if route.method == method or (method == "HEAD" and route.method == "GET"):
                return route, {k: urllib.parse.unquote(v) for k, v in m.groupdict().items()}
            allowed.append(route.method)
        if allowed:
            raise MethodNotAllowed(method, path, sorted(set(allowed)))
        raise errors.NotFound(f"no such endpoint: {method} {path[:200]}; see GET /v1/openapi.json")


def _as_response(result: Any) -> Response:
    """A handler's answer: a Response, ``(status, content_type, body[, headers])``, or JSON for 200."""
    if isinstance(result, Response):
        return result
    if isinstance(result, tuple) and len(result) in (3, 4):
        status, ctype, body, *headers = result
        return Response(status=status, body=body if isinstance(body, bytes) else str(body).encode(),
                        content_type=ctype, headers=dict(headers[0] or {}) if headers else {})
    return json_response(result)


# -- endpoint handlers ----------------------------------------------------------------------------


def h_health(req: Request):
    return {**req.app.health(), "access": auth.access(req)}


def h_openapi(req: Request):
    return openapi.document()


def h_claim(req: Request):
    host = req.host_id()
    if not req.app.trust.legacy:
        req.app.check_known_host(host)
    body = req.json_object()
    capability = field_object(body, "capability") or {}
    wait = field_number(body, "wait", 0, MAX_WAIT_S) or 0.0
    slot = field_object(body, "slot")
    extra = {"slot": slot} if slot is not None else {}
    session = req.session()
    if session:
        return req.app.claim(host, capability, wait, session=session, **extra)
    return req.app.claim(host, capability, wait, **extra)


def h_heartbeat(req: Request):
    job_id = job_id_param(req.params["id"])
    host = req.host_id()
    lease = req.lease()
    body = req.json()
    if isinstance(body, list):
        if not all(isinstance(item, dict) for item in body):
            raise errors.BadRequest("heartbeat body must be a JSON object or an array of objects")
        body = body[-1] if body else {}
    elif body is None:
        body = {}
    elif not isinstance(body, dict):
        raise errors.BadRequest(f"heartbeat body must be a JSON object or an array of objects, got {_json_type(body)}")
    cmd = {"op": "heartbeat", "job_id": job_id, "host": host, "lease": lease, **req.session()}
    progress = field_object(body, "progress")
    if progress is not None:
        cmd["progress"] = progress
    log_tail = field_string(body, "log_tail", keep_last=MAX_LOG_TAIL)
    if log_tail is not None:
        cmd["log_tail"] = log_tail
    result = req.app.execute(cmd)
    return {"ok": True, "cancel": bool(result.get("cancel", False))}


def h_complete(req: Request):
    job_id = job_id_param(req.params["id"])
    host = req.host_id()
    lease = req.lease()
    body = req.json_object()
    artifact_id = field_string(body, "artifact_id", required=True)
    sha_param(artifact_id)
    extra = {k: v for k in ("metrics", "progress") if (v := field_object(body, k)) is not None}
    req.app.execute({"op": "complete", "job_id": job_id, "host": host, "lease": lease, "artifact_id": artifact_id,
                     **extra, **req.session()})
    return {"ok": True}


def h_fail(req: Request):
    job_id = job_id_param(req.params["id"])
    host = req.host_id()
    lease = req.lease()
    body = req.json_object()
    error = field_string(body, "error", required=True)
    failure_class = field_string(body, "class") or CLASS_JOB  # a client that sends none: the job's fault
    if failure_class not in FAILURE_CLASSES:
        raise errors.BadRequest(f"field 'class' must be one of {', '.join(sorted(FAILURE_CLASSES))}; "
                                f"got {failure_class[:40]!r}")
    result = req.app.execute({"op": "fail", "job_id": job_id, "host": host, "lease": lease, "error": error,
                              "failure_class": failure_class, **req.session()})
    return {**result, "ok": True}


def h_watch(req: Request):
    job_id = job_id_param(req.params["id"])
    host = req.host_id()
    lease = req.lease()
    wait = field_number(req.json_object(), "wait", 0, MAX_WAIT_S) or 0.0
    return req.app.watch(job_id, host, lease, wait)


def h_release(req: Request):
    job_id = job_id_param(req.params["id"])
    host = req.host_id()
    lease = req.lease()
    req.json()  # an optional, ignored body is read so the connection stays usable
    req.app.execute({"op": "release", "job_id": job_id, "host": host, "lease": lease, **req.session()})
    return {"ok": True}


def h_cancel(req: Request):
    by = req.require_operator()
    job_id = req.app.resolve_job_id(job_ref_param(req.params["id"]))
    req.app.execute({"op": "cancel", "job_id": job_id, "by": by, **req.session()})
    return {"ok": True}


def h_requeue(req: Request):
    by = req.require_operator()
    job_id = req.app.resolve_job_id(job_ref_param(req.params["id"]))
    req.app.execute({"op": "requeue", "job_id": job_id, "by": by, **req.session()})
    return {"ok": True}


def h_reload(req: Request):
    """Body ``{"text": manifest TOML, "name": file name}``; without a text, this peer's own ``--manifest``.
    A follower reads its own file before the request goes to the leader, which proposes the parse."""
    req.require_operator()
    req.session()  # checked like every write's; a reload of the same text changes nothing anyway
    body = req.json_object()
    text = field_string(body, "text", keep_last=MAX_JSON_BYTES)  # the body's limit bounds it
    name = field_string(body, "name", keep_last=4096)
    leader = req.app.leader_url() if hasattr(req.app, "leader_url") else None
    if leader is None:
        return req.app.reload_manifest(text, name)
    if text is None:
        text, name = req.app.manifest_texts.read()
    return forward(req, leader, body=json.dumps({"text": text, "name": name}).encode())


def _host_param(value: str) -> str:
    if not model.HOST_ID_RE.match(value):
        raise errors.BadRequest(f"host {value[:80]!r} is not a valid host id: use 1-63 letters, digits, '.', '_' "
                                "or '-', starting with a letter or digit")
    return value


def _with_key(req: Request, host: str, rotate: bool, by: str):
    """Draw a host key here, at the edge (applying a command draws nothing), store it, answer it once."""
    import secrets

    key = secrets.token_hex(32)
    req.app.execute({"op": "host_key_set", "host": host, "key": key, "by": by, "rotate": rotate})
    answer = {"host": host, "key": key}
    enroll = req.app.enroll_commands(host, key, _receiver(req))
    if enroll is not None:
        answer["enroll"] = enroll
    return json_response(answer, 200 if rotate else 201, headers={"cache-control": "no-store"})


def _receiver(req: Request) -> str:
    """The coordinator's URL as this client reached it (for the enroll commands), else the one it listens on."""
    host = req.header("host") or ""
    scheme = "https" if isinstance(req.handler.connection, ssl.SSLSocket) else "http"
    if host and re.fullmatch(r"[A-Za-z0-9.\-\[\]:]{1,255}", host):
        return f"{scheme}://{host}"
    return req.app.url or ""


def h_hosts(req: Request):
    req.require_operator()
    return {"hosts": req.app.hosts_list()}


def h_hosts_add(req: Request):
    by = req.require_operator()
    host = field_string(req.json_object(), "host", required=True)
    return _with_key(req, _host_param(host), rotate=False, by=by)


def h_hosts_rotate(req: Request):
    by = req.require_operator()
    req.json()
    return _with_key(req, _host_param(req.params["host"]), rotate=True, by=by)


def h_hosts_revoke(req: Request):
    by = req.require_operator()
    req.json()
    req.app.execute({"op": "host_key_revoke", "host": _host_param(req.params["host"]), "by": by})
    return {"ok": True}


def h_job(req: Request):
    req.require_reader()
    return {"job": req.app.job_detail(job_ref_param(req.params["id"]))}


def h_jobs(req: Request):
    req.require_reader()
    status = req.query_one("status") or None
    if status is not None and status not in model.STATUSES:
        raise errors.BadRequest(f"status {status[:40]!r} is not a job status: use one of {', '.join(model.STATUSES)}")
    model_name = req.query_one("model") or None
    if model_name is not None and not model.NAME_RE.match(model_name):
        raise errors.BadRequest(f"model {model_name[:80]!r} is not a valid model name")
    host = req.query_one("host") or None
    if host is not None and not model.HOST_ID_RE.match(host):
        raise errors.BadRequest(f"host {host[:80]!r} is not a valid host id")
    limit = req.query_int("limit", 1000, 1, 10000)
    offset = req.query_int("offset", 0, 0, 10**9)
    jobs, total = req.app.list_jobs(status=status, model=model_name, host=host, limit=limit, offset=offset)
    return {"jobs": jobs, "total": total}


def h_workers(req: Request):
    req.require_reader()
    return {"workers": req.app.workers()}


def h_failures(req: Request):
    req.require_reader()
    return {"failures": req.app.failures(req.query_int("limit", 20, 1, 1000))}


def h_submit(req: Request):
    """Body ``{"toml": "[[jobs]] ...", "dry_run": false}``: jobs added without editing the manifest (operator)."""
    req.require_operator()
    req.session()
    body = req.json_object()
    text = field_string(body, "toml", required=True, keep_last=MAX_JSON_BYTES)
    dry_run = body.get("dry_run", False)
    if not isinstance(dry_run, bool):
        raise errors.BadRequest("field 'dry_run' must be true or false")
    return req.app.submit_jobs(text, dry_run=dry_run)


def h_job_metrics(req: Request):
    """Every progress report's numbers, per attempt: the curves of a running or finished job."""
    req.require_reader()
    ref = job_ref_param(req.params["id"])
    return {"job_id": req.app.resolve_job_id(ref), "attempts": req.app.metric_history(ref)}


def h_results(req: Request):
    """Completed jobs with their hyper values and final metrics, best first; ``format=csv`` for a spreadsheet."""
    req.require_reader()
    sweep, model_name = req.query_one("sweep") or None, req.query_one("model") or None
    if sweep is not None and (len(sweep) > 200 or not sweep.isprintable()):
        raise errors.BadRequest(f"sweep {sweep[:80]!r} is not a sweep name: use a [[sweeps]] entry's name")
    if model_name is not None and not model.NAME_RE.match(model_name):
        raise errors.BadRequest(f"model {model_name[:80]!r} is not a valid model name")
    order = req.query_one("order") or None
    if order not in (None, "min", "max"):
        raise errors.BadRequest(f"order {order[:20]!r} is not min or max: say which way is better")
    fmt = req.query_one("format") or "json"
    if fmt not in ("json", "csv"):
        raise errors.BadRequest(f"format {fmt[:20]!r} is not json or csv")
    rows = req.app.results(sweep=sweep, model=model_name)
    names = results.metric_names(rows)
    metric = req.query_one("sort") or results.default_metric(names)
    if metric is not None and names and metric not in names:
        raise errors.BadRequest(f"no completed job reported a metric {metric[:80]!r}; these did: {', '.join(names)}")
    ranked = results.rank(rows, metric, order)
    if fmt == "csv":
        return 200, "text/csv; charset=utf-8", results.to_csv(ranked).encode("utf-8"), {
            "content-disposition": 'attachment; filename="results.csv"'}
    return {"results": ranked, "metrics": names, "sort": metric,
            "order": order or (None if metric is None else "min" if results.better_lower(metric) else "max")}


def h_register(req: Request):
    host = req.host_id()
    capability = field_object(req.json_object(), "capability", required=True)
    result = req.app.execute({"op": "register_worker", "host": host, "capability": capability, **req.session()})
    return {**result, "ok": True}


def h_leave(req: Request):
    host = req.host_id()
    req.json()  # an optional, ignored body is read so the connection stays usable
    return req.app.execute({"op": "leave_worker", "host": host, **req.session()})


def declared_upload(req: Request, what: str = "bundle") -> tuple[str, int]:
    """The sha256 and size an upload declares in its headers, checked against ``max_artifact_bytes``
    before a byte of the body is read."""
    declared = (req.header("x-content-sha256") or "").lower()
    if not declared:
        raise errors.BadRequest(f"missing x-content-sha256 header: send the sha256 of the {what} (64 hex digits)")
    sha_param(declared, "x-content-sha256")
    length = req.content_length
    if length is None:
        raise LengthRequired(f"missing content-length header: send the {what}'s size in bytes")
    limit = req.app.max_artifact_bytes()
    if length > limit:
        raise errors.TooLarge(f"{what} of {length} bytes is over this fleet's max_artifact_bytes ({limit}); "
                              f"raise [fleet] max_artifact_bytes in the manifest or make the {what} smaller")
    return declared, length


def h_upload(req: Request):
    job_id = job_id_param(req.params["job_id"])
    host = req.host_id()
    lease = req.lease()
    declared, length = declared_upload(req)
    result = req.app.store_artifact(job_id, host, lease, req, declared, length)
    return json_response({"artifact_id": result["artifact_id"], "path": result["path"],
                          "deduplicated": bool(result["deduplicated"])}, 201)


def h_artifact(req: Request):
    req.require_reader()
    sha = sha_param(req.params["sha256"])
    if req.header("x-forwarded-by"):  # a peer fetching a copy: this store only, never a further hop
        f, size = req.app.open_artifact(sha, from_peers=False)
    else:
        f, size = req.app.open_artifact(sha)
    return Response(status=200, content_type="application/octet-stream", stream=f, length=size,
                    headers={"x-content-sha256": sha})


def h_zipapp(req: Request):
    data, sha = req.app.zipapp()
    return Response(status=200, body=data, content_type="application/zip",
                    headers={"x-content-sha256": sha,
                             "content-disposition": 'attachment; filename="cis490fleet.pyz"'})


def h_install_script(req: Request):
    data, sha = req.app.install_script()
    return Response(status=200, body=data, content_type="text/plain; charset=utf-8",
                    headers={"x-content-sha256": sha,
                             "content-disposition": 'attachment; filename="install-worker.ps1"'})


_PLACEHOLDER_PAGE = b"""<!doctype html>
<html><head><meta charset="utf-8"><title>cis490fleet</title></head>
<body><h1>cis490fleet coordinator</h1>
<p>The dashboard is not part of this build. See <a href="/v1/jobs">/v1/jobs</a>,
<a href="/v1/workers">/v1/workers</a>, <a href="/v1/health">/v1/health</a> and
<a href="/v1/openapi.json">/v1/openapi.json</a>.</p></body></html>
"""


def h_index(req: Request):
    return Response(body=_PLACEHOLDER_PAGE, content_type="text/html; charset=utf-8")


def h_metrics(req: Request):
    req.require_reader()
    snapshot = req.app.counters.snapshot()
    lines = []
    for name, value in sorted(snapshot["counters"].items()):
        lines.append(f"# TYPE cis490fleet_{name}_total counter")
        lines.append(f"cis490fleet_{name}_total {value}")
    return Response(body=("\n".join(lines) + "\n").encode(), content_type="text/plain; version=0.0.4")


RAFT_MAX_BYTES = 256 << 20
RAFT_PREFIX = "/v1/raft/"


def h_raft_messages(req: Request):
    """Peers only. A sender that asks (``x-raft-answer: inline``) gets this peer's answers in the response,
    signed for that request (``Replicator.answer``); else they follow on this peer's own connection."""
    auth.peer(req)
    body = edge_json.parse(req.body_bytes(limit=RAFT_MAX_BYTES), what="raft messages")
    answer = req.app.raft_receive(body, answer=req.header("x-raft-answer") == "inline",
                                  request_nonce=req.header(signing.H_NONCE))
    if answer is None:
        return {"ok": True}
    body, headers = answer
    return Response(body=body, headers=headers)


def h_raft_snapshot(req: Request):
    auth.peer(req)
    f, size = req.app.raft_snapshot(req.header("x-raft-cluster"))
    return Response(status=200, content_type="application/octet-stream", stream=f, length=size)


def h_raft_artifact(req: Request):
    auth.peer(req)
    sha = sha_param(req.params["sha256"])
    if req.content_length is None:
        raise LengthRequired("missing content-length header: send the bundle's size in bytes")
    result = req.app.raft_artifact(sha, req.header("x-raft-cluster"), req.header("x-artifact"), req,
                                   req.content_length)
    return json_response({"artifact_id": result["artifact_id"], "deduplicated": bool(result["deduplicated"])}, 201)


# -- forwarding to the leader ----------------------------------------------------------------------

_HOP_HEADERS = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
                          "transfer-encoding", "upgrade", "host", "expect", "content-length"})
_ANSWER_HEADERS = ("x-leader", "x-content-sha256", "content-disposition", "allow", "retry-after", "content-encoding",
                   "x-attempt", "x-fleet-not-before")
FORWARD_TIMEOUT_S = SOCKET_TIMEOUT_S + MAX_WAIT_S


_upstreams = threading.local()  # per handler thread: leader URL -> kept-alive connection


def _repeatable(req: Request) -> bool:
    """A request the leader may see twice without harm: a read, or a write of a client session
    (x-client-id + x-client-serial), which the queue applies once and answers alike."""
    return req.method in ("GET", "HEAD") or auth.has_session(req)


def _upstream_conn(url: str, context, reuse: bool) -> tuple[http.client.HTTPConnection, bool]:
    cache = _upstreams.__dict__.setdefault("conns", {})
    conn = cache.pop(url, None)
    if conn is not None and reuse and not connection_dropped(conn):
        return conn, True
    if conn is not None:
        conn.close()
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "https":
        return http.client.HTTPSConnection(parts.hostname, parts.port or 443, timeout=FORWARD_TIMEOUT_S,
                                           context=context), False
    return http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=FORWARD_TIMEOUT_S), False


class _Upstream:
    """The leader's answer as a stream for ``Response``: only ``read`` (so ``sendfile`` falls back to send).

    Closing it after the whole answer was read keeps the connection for this thread's next forward."""

    def __init__(self, resp: http.client.HTTPResponse, conn: http.client.HTTPConnection, url: str):
        self._resp, self._conn, self._url = resp, conn, url

    def read(self, n: int = -1) -> bytes:
        return self._resp.read(None if n is None or n < 0 else n)

    def close(self) -> None:
        if self._resp.isclosed() and not self._resp.will_close:
            _upstreams.__dict__.setdefault("conns", {})[self._url] = self._conn
        else:
            self._resp.close()
            self._conn.close()


_REPLACED_WHEN_FORWARDED = frozenset({"x-forwarded-by", "x-lab-host", *auth.IDENTITY_HEADERS})


def _forward_identity(req: Request, node: str, body: bytes | None) -> dict[str, str]:
    """The identity headers a forwarded request carries: the host this peer verified (never what the client
    said), signed with the cluster key over ``body`` (the one sent, when the caller replaced the request's);
    in legacy mode ``x-lab-host``, checked against a client certificate."""
    if req.app.trust.legacy:
        sent = req.header("x-lab-host")
        if req.peer_host is not None:
            return {"x-lab-host": auth.host(req)}
        return {"x-lab-host": sent} if sent else {}
    ident = req.identity()
    return auth.forward_headers(req, ident if ident.kind == "host" else auth.ANONYMOUS, node,
                                None if body is None else signing.body_sha256(body))


def forward(req: Request, leader_url: str, body: bytes | None = None) -> Response:
    """Proxy ``req`` whole (method, target, headers, body) to the leader; stream its answer back.

    ``body`` replaces the request's body (read by the caller), as a reload that names no manifest
    sends this peer's file.

    A small body is read first and goes on this thread's kept-alive connection, unless the
    leader has closed it meanwhile; a large one (an upload) is streamed through on a fresh
    connection. A request that got no answer on a kept-alive connection may have reached the
    leader, so it goes again (on a fresh one) only when repeating it is harmless (``_repeatable``)."""
    node = getattr(req.app, "node_id", "?")
    if req.header("x-forwarded-by"):
        raise errors.Unavailable(f"forwarded by {req.header('x-forwarded-by')[:40]} but {node} is not the leader "
                                 "either (leadership is changing); retry in a second")
    replaced = body
    length = req.content_length if body is None else len(body)
    if body is None and (req._body is not None or (req.content_length or 0) <= SMALL_STREAM):
        body = req.body_bytes(limit=SMALL_STREAM)
    context = getattr(req.app, "peer_ssl_context", None)
    for attempt in (1, 2):
        conn, reused = _upstream_conn(leader_url, context, reuse=body is not None and attempt == 1)
        added = _forward_identity(req, node, replaced)  # signed anew for each send: a repeat is no replay
        try:
            conn.putrequest(req.method, req.handler.path, skip_accept_encoding=True)
            for name, value in req.headers.items():
                if name.lower() not in _HOP_HEADERS and name.lower() not in _REPLACED_WHEN_FORWARDED:
                    conn.putheader(name, value)
            for name, value in added.items():
                conn.putheader(name, value)
            conn.putheader("x-forwarded-by", node)
            if length is not None:
                conn.putheader("content-length", str(length))
            conn.endheaders(body or None)
            while body is None and req.remaining > 0:
                chunk = req.read(1 << 16)
                if not chunk:
                    break
                conn.send(chunk)
            resp = conn.getresponse()
            break
        except (OSError, http.client.HTTPException) as err:
            conn.close()
            if reused and _repeatable(req):
                continue
            if reused:
                raise errors.Unavailable(
                    f"the leader at {leader_url} closed the connection before answering ({err}): the request may "
                    "have been applied; check before repeating it (a request with x-client-id and x-client-serial "
                    "is repeated safely)") from None
            raise errors.Unavailable(f"the leader at {leader_url} did not answer ({err}); retry in a second") from None
    headers = {h: resp.getheader(h) for h in _ANSWER_HEADERS if resp.getheader(h)}
    headers["x-forwarded-by"] = node
    length = int(resp.getheader("content-length") or 0)
    return Response(status=resp.status, content_type=resp.getheader("content-type") or "application/octet-stream",
                    headers=headers, stream=_Upstream(resp, conn, leader_url), length=length)


def make_router() -> Router:
    """The route table: every endpoint of the wire API, then the extensions' pages."""
    router = Router()
    for method, template, handler in (
        ("GET", "/", h_index),
        ("GET", "/metrics", h_metrics),
        ("GET", "/v1/health", h_health),
        ("GET", "/v1/openapi.json", h_openapi),
        ("POST", "/v1/job/claim", h_claim),
        ("POST", "/v1/job/{id}/heartbeat", h_heartbeat),
        ("POST", "/v1/job/{id}/complete", h_complete),
        ("POST", "/v1/job/{id}/fail", h_fail),
        ("POST", "/v1/job/{id}/release", h_release),
        ("POST", "/v1/job/{id}/watch", h_watch),
        ("POST", "/v1/job/{id}/cancel", h_cancel),
        ("POST", "/v1/job/{id}/requeue", h_requeue),
        ("GET", "/v1/job/{id}", h_job),
        ("GET", "/v1/job/{id}/metrics", h_job_metrics),
        ("GET", "/v1/jobs", h_jobs),
        ("POST", "/v1/jobs", h_submit),
        ("GET", "/v1/workers", h_workers),
        ("GET", "/v1/failures", h_failures),
        ("GET", "/v1/results", h_results),
        ("POST", "/v1/worker/register", h_register),
        ("POST", "/v1/worker/leave", h_leave),
        ("PUT", "/v1/model/{job_id}", h_upload),
        ("GET", "/v1/artifact/{sha256}", h_artifact),
        ("GET", "/v1/zipapp", h_zipapp),
        ("GET", "/v1/install-worker.ps1", h_install_script),
        ("POST", "/v1/manifest/reload", h_reload),
        ("GET", "/v1/hosts", h_hosts),
        ("POST", "/v1/hosts", h_hosts_add),
        ("POST", "/v1/hosts/{host}/rotate", h_hosts_rotate),
        ("POST", "/v1/hosts/{host}/revoke", h_hosts_revoke),
        ("POST", "/v1/raft/messages", h_raft_messages),
        ("GET", "/v1/raft/snapshot", h_raft_snapshot),
        ("PUT", "/v1/raft/artifact/{sha256}", h_raft_artifact),
    ):
        router.add(method, template, handler)
    for name in EXTENSIONS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name != name:
                raise
            continue
        register = getattr(module, "register", None)
        if register is not None:
            register(router)
    return router


# -- the server -----------------------------------------------------------------------------------

MAX_HEADER_LINE = 65536
MAX_HEADERS = 100


class Headers:
    """Request headers, case-insensitive, repeated names kept: what handlers use of ``email.message.Message``
    (``get``, ``get_all``, ``[]``, ``in``, ``items``) at a fraction of its parsing cost."""

    __slots__ = ("_items", "_map")

    def __init__(self, items: list[tuple[str, str]]):
        self._items = items
        self._map: dict[str, list[str]] = {}
        for name, value in items:
            self._map.setdefault(name.lower(), []).append(value)

    def get(self, name: str, default=None):
        values = self._map.get(name.lower())
        return values[0] if values else default

    def stripped(self, names: tuple[str, ...]) -> list[str]:
        """The first value of each of ``names`` (lowercase), stripped; "" for an absent one."""
        got = self._map.get
        return [values[0].strip() if (values := got(name)) else "" for name in names]

    def get_all(self, name: str, failobj=None):
        values = self._map.get(name.lower())
        return list(values) if values else failobj

    def __getitem__(self, name: str):
        return self.get(name)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._map

    def __iter__(self):
        return (name for name, _ in self._items)

    def __len__(self) -> int:
        return len(self._items)

    def keys(self) -> list[str]:
        return [name for name, _ in self._items]

    def items(self) -> list[tuple[str, str]]:
        return list(self._items)


def _safe_target(path: str, query: str) -> str:
    """The request target for the access log, with the values of secret-looking query keys removed."""
    if not query:
        return path[:300]
    pairs = urllib.parse.parse_qsl(query, keep_blank_values=True)
    shown = "&".join(f"{k}={'***' if _SECRET_QUERY_KEYS.search(k) else v}" for k, v in pairs)
    return f"{path[:300]}?{shown[:300]}"


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = f"cis490fleet/{__version__}"
    sys_version = ""
    server: "FleetHTTPServer"
    _date: tuple[int, str] = (0, "")  # the Date header of the current second, shared by every connection

    def date_time_string(self, timestamp=None) -> str:
        # email.utils.formatdate was about 3% of a claim's handler CPU; the header changes once a second.
        if timestamp is not None:
            return super().date_time_string(timestamp)
        now = int(time.time())
        cached = Handler._date
        if cached[0] != now:
            cached = Handler._date = (now, super().date_time_string(now))
        return cached[1]

    def setup(self):
        self.peer_host = None
        if isinstance(self.request, ssl.SSLSocket):
            # In this connection's own thread, under a deadline: a silent client holds only itself.
            guard = self.server.guard
            guard.arm(self.request, guard.handshake_s, "TLS handshake")
            try:
                self.request.do_handshake()
            finally:
                guard.disarm(self.request)
            self.peer_host = tls.peer_host_id(self.request)
        super().setup()

    def handle_one_request(self):
        """Wait (up to the socket timeout) for the next request's first byte; from then on its head must
        arrive within the guard's head deadline, however slowly it trickles in."""
        try:
            if not self.rfile.peek(1):
                self.close_connection = True
                return
        except (OSError, ValueError):
            self.close_connection = True
            return
        guard = self.server.guard
        guard.arm(self.connection, guard.head_s, "request head")
        try:
            super().handle_one_request()
        finally:
            guard.disarm(self.connection)

    def parse_request(self) -> bool:
        """``BaseHTTPRequestHandler.parse_request`` with a plain header reader instead of the e-mail parser
        (which costs more than the rest of a claim). Same limits: 64 KiB lines, 100 headers."""
        self.command = None
        self.request_version = self.default_request_version
        self.close_connection = True
        requestline = str(self.raw_requestline, "iso-8859-1").rstrip("\r\n")
        self.requestline = requestline
        words = requestline.split()
        if not words:
            return False
        if len(words) != 3:
            self.send_error(400, f"Bad request syntax ({requestline[:100]!r})")
            return False
        command, path, version = words
        try:
            if not version.startswith("HTTP/"):
                raise ValueError
            numbers = version[5:].split(".")
            if len(numbers) != 2 or not all(n.isdigit() and n.isascii() and len(n) <= 10 for n in numbers):
                raise ValueError
            version_number = int(numbers[0]), int(numbers[1])
        except ValueError:
            self.send_error(400, f"Bad request version ({version[:40]!r})")
            return False
        if version_number >= (2, 0):
            self.send_error(505, f"Invalid HTTP version ({version[:40]})")
            return False
        self.request_version = version
        if version_number >= (1, 1):
            self.close_connection = False
        self.command, self.path = command, path
        if self.path.startswith("//"):
            self.path = "/" + self.path.lstrip("/")
        lines = self._header_lines()
        if lines is None:
            return False
        if len(lines) > MAX_HEADERS:
            self.send_error(431, "Too many headers")
            return False
        items: list[tuple[str, str]] = []
        for text in lines:
            if text[:1] in (" ", "\t"):
                if not items:
                    self.send_error(400, "Bad header continuation line")
                    return False
                name, value = items[-1]
                items[-1] = (name, f"{value} {text.strip()}")
                continue
            name, sep, value = text.partition(":")
            if not sep or not name or name != name.strip():
                self.send_error(400, f"Bad header line ({text[:60]!r})")
                return False
            items.append((name, value.strip(" \t")))
        self.headers = Headers(items)
        self.server.guard.disarm(self.connection)  # the head is complete: bodies have the socket timeout
        connection = (self.headers.get("connection") or "").lower()
        if connection == "close":
            self.close_connection = True
        elif connection == "keep-alive":
            self.close_connection = False
        if (self.headers.get("expect") or "").lower() == "100-continue" and version_number >= (1, 1):
            if not self.handle_expect_100():
                return False
        return True

    def _header_lines(self) -> list[str] | None:
        """The head's header lines, decoded, without their line ends (at most ``MAX_HEADERS`` + 1); None once
        answered with an error or when the connection ended first. A head that is already in the read buffer
        in CRLF lines (what clients send) is split at once; any other is read line by line."""
        buffered = self.rfile.peek(1)
        if buffered[:2] == b"\r\n":
            self.rfile.read(2)
            return []
        end = buffered.find(b"\r\n\r\n")
        if end >= 0 and buffered.count(b"\n", 0, end) == buffered.count(b"\r\n", 0, end):
            return self.rfile.read(end + 4)[:end].decode("iso-8859-1").split("\r\n")
        lines: list[str] = []
        while len(lines) <= MAX_HEADERS:
            line = self.rfile.readline(MAX_HEADER_LINE + 1)
            if len(line) > MAX_HEADER_LINE:
                self.send_error(431, "Line too long")
                return None
            if not line:  # the connection ended (or its head deadline passed) before the head did
                self.close_connection = True
                return None
            if line in (b"\r\n", b"\n"):
                break
            lines.append(line.decode("iso-8859-1").rstrip("\r\n"))
        return lines

    def __getattr__(self, name: str):
        # Any method reaches the route table, so unknown ones get a JSON 405/404 instead of an HTML 501.
        if name.startswith("do_"):
            return self._dispatch
        raise AttributeError(name)

    def handle_expect_100(self):
        # The 100 goes out only when a handler starts reading the body, so an upload refused
        # on its headers (wrong holder, too large) is never sent.
        self._continue_pending = True
        return True

    def send_continue(self) -> None:
        if getattr(self, "_continue_pending", False):
            self._continue_pending = False
            self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def log_message(self, format, *args):
        log.debug("%s " + format, self.address_string(), *args)

    def send_error(self, code, message=None, explain=None):
        """Errors found by http.server while parsing (bad request line, huge headers): JSON, then close."""
        short = {400: "bad_request", 414: "too_large", 431: "too_large", 501: "method_not_allowed"}.get(code, "error")
        phrase = http.client.responses.get(code, "Error")
        detail = f"{message or phrase}; send a well-formed HTTP/1.1 request"
        self.close_connection = True
        try:
            self._write(json_response({"error": short, "detail": detail}, code), head=False)
        except OSError:
            pass
        access_log.info("%s %s %d - host=-", getattr(self, "command", None) or "-", "-", code)

    def _body_length(self) -> int | None:
        if self.headers.get("transfer-encoding"):
            raise LengthRequired("chunked request bodies are not supported; send content-length instead")
        values = self.headers.get_all("content-length") or []
        if not values:
            return None
        if len(set(v.strip() for v in values)) != 1:
            raise errors.BadRequest("conflicting content-length headers; send one")
        raw = values[0].strip()
        if not raw.isdigit() or not raw.isascii() or len(raw) > 18:
            raise errors.BadRequest(f"content-length {raw[:40]!r} is not a byte count")
        return int(raw)

    def _dispatch(self):
        t0 = time.perf_counter()
        self._continue_pending = getattr(self, "_continue_pending", False)
        self.body_length = None
        self.server.request_started()
        method = self.command
        parsed = urllib.parse.urlsplit(self.path)
        path = parsed.path or "/"
        host_for_log = self.headers.get("x-lab-host") or self.peer_host or "-"
        req = None
        try:
            try:
                self.body_length = self._body_length()
                route, params = self.server.router.match(method, path)
                try:
                    query = urllib.parse.parse_qs(parsed.query, keep_blank_values=True, strict_parsing=False,
                                                  max_num_fields=50)
                except ValueError:
                    raise errors.BadRequest("too many query parameters; send at most 50") from None
                req = Request(self, method, path, query, params)
                forward_url = getattr(self.server.app, "forward_url", None)
                leader = forward_url(route.template, params) if forward_url is not None else None
                resp = forward(req, leader) if leader else _as_response(route.handler(req))
            except errors.FleetError as err:
                resp = error_response(err)
            except (ConnectionError, TimeoutError, socket.timeout):
                self.close_connection = True
                access_log.info("%s %s aborted by the client host=%s", method, _safe_target(path, parsed.query),
                                str(host_for_log)[:64])
                return
            except Exception as err:
                full = errors.disk_full(err, str(getattr(self.server.app, "data_dir", "its data folder")))
                if full is not None:
                    log.error("%s %s: %s (%s)", method, path[:200], full, err)
                    resp = error_response(full)
                else:
                    log.exception("internal error handling %s %s", method, path[:200])
                    resp = json_response({"error": "internal", "detail": "the coordinator hit an unexpected "
                                          "error; see the server log"}, 500)
            unread = (req.remaining if req is not None else self.body_length) or 0
            if unread:
                # Unread body bytes would be taken for the next request: answer, then drop the connection.
                resp.close = True
            ms = (time.perf_counter() - t0) * 1000
            # Logged and counted before the answer goes out, so whoever sees the answer also sees the record.
            peer_traffic = path.startswith(RAFT_PREFIX)  # heartbeats many times a second: not client requests
            if not peer_traffic:
                self.server.observe(resp.status, ms)
            access_log.log(logging.DEBUG if peer_traffic and resp.status < 400 else logging.INFO,
                           "%s %s %d %.1fms host=%s", method, _safe_target(path, parsed.query), resp.status, ms,
                           str(host_for_log)[:64])
            try:
                self._write(resp, head=(method == "HEAD"))
            except OSError:
                self.close_connection = True
                return
            finally:
                if resp.stream is not None:
                    resp.stream.close()
            if unread and not self._continue_pending:
                self._linger(unread)
        finally:
            self._continue_pending = False
            self.server.request_finished()

    def _linger(self, unread: int) -> None:
        """Read and drop what the client is still sending (briefly), so it gets to read our answer.

        Closing a socket with unread input makes the kernel send a reset, which can
        destroy the answer before the client reads it (a 413 for an oversized body).
        """
        deadline = time.monotonic() + LINGER_S
        try:
            if not isinstance(self.connection, ssl.SSLSocket):
                self.connection.shutdown(socket.SHUT_WR)
            while unread > 0 and time.monotonic() < deadline:
                self.connection.settimeout(max(0.01, deadline - time.monotonic()))
                chunk = self.rfile.read1(min(unread, 1 << 16))
                if not chunk:
                    break
                unread -= len(chunk)
        except (OSError, ValueError):
            pass

    def _write(self, resp: Response, head: bool) -> None:
        if resp.close:
            self.close_connection = True
        length = resp.length if resp.stream is not None else len(resp.body)
        lines = [f"HTTP/1.1 {resp.status} {http.client.responses.get(resp.status, 'Unknown')}",
                 f"Server: {self.server_version}",
                 f"Date: {self.date_time_string()}",
                 f"Content-Type: {resp.content_type}",
                 f"Content-Length: {length}"]
        if self.close_connection:
            lines.append("Connection: close")
        lines += [f"{k}: {v}" for k, v in resp.headers.items()]
        head_bytes = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        if head:
            self.wfile.write(head_bytes)
        elif resp.stream is None:
            self.wfile.write(head_bytes + resp.body)
        elif resp.length <= SMALL_STREAM:
            data = resp.stream.read(resp.length)
            self.wfile.write(head_bytes + data)
            if len(data) != resp.length:
                self.close_connection = True
        else:
            self.wfile.write(head_bytes)
            sent = self.connection.sendfile(resp.stream, 0, resp.length) if resp.length else 0
            if sent != resp.length:
                self.close_connection = True


class FleetHTTPServer(http.server.ThreadingHTTPServer):
    """ThreadingHTTPServer with bounded handler threads, TCP_NODELAY, socket timeouts and optional TLS.

    ``accept_hook(sock)``, when set, is called with every accepted socket (tests check its options).
    """

    daemon_threads = True
    request_queue_size = 1024
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], app, *, ssl_context: ssl.SSLContext | None = None,
                 router: Router | None = None, max_handlers: int = MAX_HANDLERS,
                 socket_timeout: float = SOCKET_TIMEOUT_S, per_address: int = connection_guard.PER_ADDRESS,
                 head_s: float = connection_guard.HEAD_S, handshake_s: float = connection_guard.HANDSHAKE_S,
                 exempt: Callable[[str], bool] | None = None):
        self.app = app
        self.guard = connection_guard.ConnectionGuard(per_address=per_address, head_s=head_s,
                                                      handshake_s=handshake_s, exempt=exempt)
        self.router = router or make_router()
        self.ssl_context = ssl_context
        self.socket_timeout = socket_timeout
        self.accept_hook: Callable | None = None
        self._slots = threading.BoundedSemaphore(max_handlers)
        self._inflight = 0
        self._inflight_cond = threading.Condition()
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, Handler)

    def server_bind(self):
        # HTTPServer.server_bind resolves the fully qualified host name, which can stall on a bad resolver.
        import socketserver

        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = host
        self.server_port = port

    @property
    def port(self) -> int:
        return self.server_address[1]

    def get_request(self):
        sock, addr = self.socket.accept()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(self.socket_timeout)
        if self.ssl_context is not None:
            sock = self.ssl_context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        if self.accept_hook is not None:
            self.accept_hook(sock)
        return sock, addr

    def process_request(self, request, client_address):
        address = connection_guard.client_key(client_address[0])
        if not self.guard.admit(address):
            self._refuse_busy(request, f"{address} already holds {self.guard.per_address} connections, this "
                                       "address's share; close idle ones or retry in a moment")
            return
        if not self._slots.acquire(blocking=False):
            self.guard.release(address)
            self._refuse_busy(request, "every handler thread is in use; retry in a moment")
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            self.guard.release(address)
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()
            self.guard.release(connection_guard.client_key(client_address[0]))

    def server_close(self):
        self.guard.stop()
        super().server_close()

    def _refuse_busy(self, sock, why: str) -> None:
        self.guard.note_refusal(why)
        if not isinstance(sock, ssl.SSLSocket):
            body = json.dumps({"error": "unavailable", "detail": f"the coordinator is busy: {why}"}).encode()
            try:
                sock.settimeout(1.0)
                sock.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                             b"Connection: close\r\nRetry-After: 1\r\nContent-Length: "
                             + str(len(body)).encode() + b"\r\n\r\n" + body)
                sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        self.shutdown_request(sock)

    def handle_error(self, request, client_address):
        import sys

        err = sys.exc_info()[1]
        if isinstance(err, (OSError, ssl.SSLError)):
            log.debug("connection from %s ended: %s", client_address[0], err)
        else:
            log.exception("unexpected error on the connection from %s", client_address[0])

    # -- request accounting, for a graceful stop and the metrics ------------------------------

    def request_started(self) -> None:
        with self._inflight_cond:
            self._inflight += 1

    def request_finished(self) -> None:
        with self._inflight_cond:
            self._inflight -= 1
            if self._inflight == 0:
                self._inflight_cond.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no request is being handled; False when ``timeout`` ran out first."""
        deadline = time.monotonic() + timeout
        with self._inflight_cond:
            while self._inflight > 0:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._inflight_cond.wait(left)
        return True

    def observe(self, status: int, ms: float) -> None:
        counters = getattr(self.app, "counters", None)
        if counters is not None:
            counters.observe_request(status, ms)
