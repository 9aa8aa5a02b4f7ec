"""Who sent a request, as the coordinator decides it: the server side of the trust model.

Shell (used by ``http_api``). Nothing is believed because a header says so:

- a host signs each request with its key (``signing``), or, under mutual TLS,
  is named by its client certificate;
- a peer signs with the cluster key, or presents a certificate the peer list
  names; a request a peer forwards carries the host identity that peer
  verified (``x-fleet-identity``), which only a peer may assert;
- an operator sends one of the named operator tokens, a reader a read token
  (compared in constant time, never logged).

``serve --trust-host-header`` (``Trust.legacy``) is the seed's mode for a
closed lab network: ``x-lab-host`` names the host, leases are optional, reads
are open. Keys and tokens never appear in an answer, a log line or an error.
"""

from __future__ import annotations

import hmac
import os
import stat
import threading
import time
from typing import NamedTuple
from pathlib import Path

from cis490fleet import errors, model, signing, tokens

H_IDENTITY = "x-fleet-identity"
H_CLIENT_NONCE = "x-fleet-client-nonce"
H_READ_TOKEN = "x-read-token"
H_OPERATOR_TOKEN = "x-operator-token"
IDENTITY_HEADERS = (H_IDENTITY, H_CLIENT_NONCE) + signing.SIGNATURE_HEADERS
"""Headers a follower replaces with its own when it forwards: a client's are never passed on."""
DEFAULT_OPERATOR = "operator"
ADD_HOST_HINT = "an operator adds it with `jobs hosts add {host}`, which prints the key and the enroll commands"


class Identity(NamedTuple):
    """What a request proved: ``kind`` is host, peer or anonymous; ``name`` the host id or node id."""

    kind: str
    name: str = ""

    def __str__(self) -> str:
        return f"{self.kind}:{self.name}" if self.name else self.kind


ANONYMOUS = Identity("anonymous")


def constant_time_find(sent: str | None, tokens: dict[str, str]) -> str | None:
    """The name of the token equal to ``sent``; every token is compared, in constant time each."""
    if not sent:
        return None
    raw = sent.strip().encode("utf-8", "surrogateescape")
    found = None
    for name, token in tokens.items():
        if hmac.compare_digest(raw, token.encode("utf-8")) and found is None:
            found = name
    return found


class Trust:
    """A coordinator's trust settings, and the nonce memory every signed request passes through."""

    def __init__(self, *, operator_tokens: dict[str, str] | None = None, read_tokens: dict[str, str] | None = None,
                 cluster_key: bytes | None = None, legacy: bool = False, public_read: bool = False):
        self.operator_tokens = dict(operator_tokens or {})
        self.read_tokens = dict(read_tokens or {})
        self.cluster_key = cluster_key
        self.legacy = legacy
        self.public_read = public_read or legacy
        self._nonces = signing.NonceMemory()
        self._lock = threading.Lock()
        self.not_before: float = float("-inf")
        """Where a replay could act, host signatures made before this are refused (``StaleSignature``); see
        ``forget_before``."""

    def summary(self) -> dict:
        """What ``/v1/health`` says about trust (nothing secret): how workers prove who they are, who may read."""
        return {"workers": "legacy: x-lab-host is trusted unproved" if self.legacy else "signed",
                "reads": "open" if self.public_read else "token"}

    def remember(self, signer: str, nonce: str, timestamp: int, now: float) -> None:
        with self._lock:
            self._nonces.check_and_add(signer, nonce, timestamp, now)

    def forget_before(self, since: float) -> None:
        """This process's nonce memory begins at ``since``, but requests were accepted before it (a data folder
        in use before this start): refuse host signatures made before then, where a replay could act."""
        self.not_before = signing.not_before(since)

    def host_not_before(self, replicator) -> float:
        """The earliest host signature time this peer can tell from a replay: not before its start, nor, on a
        leader, before it became the leader (a write an earlier leader accepted was never seen here)."""
        since = getattr(replicator, "leader_since", None) if replicator is not None else None
        return self.not_before if since is None else max(self.not_before, signing.not_before(since))


def signed_body_sha(req) -> str:
    """The body's sha256 as the signature covers it: the declared one for a streamed upload, else the bytes'."""
    if req.method == "PUT" and req.header("x-content-sha256"):
        return req.header("x-content-sha256").lower()
    return signing.body_sha256(req.body_bytes(limit=req.signed_body_limit))


_FIRST_SIGNED = len(signing.SIGNATURE_HEADERS)
_CLIENT_ID = signing.SIGNATURE_AND_SIGNED.index("x-client-id")
_CLIENT_SERIAL = signing.SIGNATURE_AND_SIGNED.index("x-client-serial")


def _verify_signature(req, trust: Trust, key_of) -> Identity | None:
    """The signer of a signed request (host or peer), checked: signature, time window, then nonce."""
    values = req.headers.stripped(signing.SIGNATURE_AND_SIGNED)
    signed = signing.parse_values(values)
    if signed is None:
        return None
    now = time.time()
    key = key_of(signed)
    if key is None:
        if signed.kind == "peer":
            raise errors.Unauthorized(f"{signed.signer} signs as a peer, but this coordinator has no cluster key; "
                                      "start every peer with the same --cluster-key-file")
        raise errors.Forbidden(f"host {signed.name!r} has no key on this fleet (never added, or revoked); "
                               + ADD_HOST_HINT.format(host=signed.name))
    host = signed.kind == "host"
    signing.verify(key, signed, req.method, req.handler.path, signed_body_sha(req), now,
                   values=values[_FIRST_SIGNED:], ahead=signing.HOST_AHEAD_S if host else None)
    if host and _replay_would_act(req.method, bool(values[_CLIENT_ID] and values[_CLIENT_SERIAL])):
        signing.check_not_before(signed.signer, signed.timestamp, trust.host_not_before(getattr(req.app, "replicator", None)))
    trust.remember(signed.signer, signed.nonce, signed.timestamp, now)
    return Identity(signed.kind, signed.name)


def has_session(req) -> bool:
    """Whether the request carries a client session (x-client-id + x-client-serial), which the queue applies once
    and answers alike when repeated."""
    return bool(req.header("x-client-id") and req.header("x-client-serial"))


def _replay_would_act(method: str, session: bool) -> bool:
    """Whether a replay of this request, if accepted, could change anything: a POST without a client session.
    A read changes nothing, an upload stores the same bytes under their sha256 again, and the queue applies a
    session's serial once and answers a repeat as the first time, in a record that survives restarts and
    leader changes; so only these need the time floor (``Trust.host_not_before``) once the in-memory nonces
    are gone."""
    return method == "POST" and not session


def _peer_cert_names(app) -> set[str]:
    import urllib.parse

    replicator = getattr(app, "replicator", None)
    if replicator is None:
        return set()
    return set(replicator.peers) | {urllib.parse.urlsplit(u).hostname for u in replicator.peers.values()}


def identify(req) -> Identity:
    """The identity a request proved (cached on the request); Unauthorized/Forbidden when a proof is wrong."""
    app = req.app
    trust: Trust = app.trust

    def key_of(signed: signing.Signed) -> bytes | None:
        if signed.kind == "peer":  # the cluster key makes a peer, member or not yet (a peer waiting to join)
            return trust.cluster_key
        return app.host_key(signed.name)

    signer = _verify_signature(req, trust, key_of)
    from_peer = (signer is not None and signer.kind == "peer") or (
        signer is None and req.peer_host is not None and req.peer_host in _peer_cert_names(app))
    if from_peer:
        asserted = req.header(H_IDENTITY)
        if asserted:
            session = has_session(req)
            floor = trust.host_not_before(getattr(app, "replicator", None)) \
                if _replay_would_act(req.method, session) else None
            return _forwarded_identity(trust, asserted, req.header(H_CLIENT_NONCE), session, floor)
        return signer or Identity("peer", req.peer_host)
    if signer is not None:
        if req.peer_host is not None and req.peer_host != signer.name:
            raise errors.Forbidden(f"this worker signs as {signer.name!r} but its TLS client certificate names "
                                   f"{req.peer_host!r}; a host acts only as itself: run it with --host-id "
                                   f"{req.peer_host} and that host's key, or give it {signer.name}'s certificate")
        sent = req.header("x-lab-host")
        if sent and sent != signer.name:
            raise errors.Forbidden(f"x-lab-host {sent[:80]!r} differs from the host that signed the request "
                                   f"({signer.name}); a host acts only as itself")
        return signer
    if req.peer_host is not None and not trust.legacy:
        sent = req.header("x-lab-host")
        if sent and sent != req.peer_host:
            raise errors.Forbidden(_cert_mismatch(sent, req.peer_host))
        return Identity("host", req.peer_host)
    return ANONYMOUS


def _forwarded_identity(trust: Trust, asserted: str, client_nonce: str | None, session: bool,
                        not_before: float | None) -> Identity:
    """The identity a peer verified and forwarded, with the host's nonce and signature time
    (``<nonce> <time>``): for a write without a session the time must not predate this peer's memory
    (``not_before``, None for other requests), and the nonce is remembered here too, so a request replayed
    through another peer is refused. A session write's nonce is not remembered: the queue applies each serial
    once and answers a repeat as the first time, and a follower may repeat one after a dropped connection."""
    kind, _, name = asserted.partition(":")
    if kind == "anonymous" and not name:
        return ANONYMOUS
    if kind != "host" or not model.HOST_ID_RE.match(name):
        raise errors.BadRequest(f"{H_IDENTITY} {asserted[:80]!r} is not host:<host id> or anonymous")
    if client_nonce:
        now = time.time()
        nonce, _, signed_at = client_nonce.partition(" ")
        timestamp = int(signed_at) if signed_at.isascii() and signed_at.isdigit() and len(signed_at) <= 12 \
            else int(now)  # a peer of an earlier version forwards the nonce alone
        if not_before is not None:
            signing.check_not_before(f"host/{name}", timestamp, not_before)
        if not session:
            trust.remember(f"host/{name}", nonce, timestamp, now)
    return Identity("host", name)


def forward_headers(req, identity: Identity, node_id: str, body_sha: str | None = None) -> dict[str, str]:
    """What a follower puts in place of the client's identity headers when it forwards: ``x-lab-host`` and
    the identity it verified and, with a cluster key, the peer signature over the request as forwarded
    (the leader checks it before believing the identity)."""
    out = {"x-lab-host": identity.name} if identity.kind == "host" else {}
    out[H_IDENTITY] = str(identity)
    values = req.headers.stripped(signing.SIGNATURE_AND_SIGNED)
    signed = signing.parse_values(values) if identity.kind == "host" else None
    if signed is not None:
        out[H_CLIENT_NONCE] = f"{signed.nonce} {signed.timestamp}"
    key = req.app.trust.cluster_key
    if key is not None:
        headers = {**dict(zip(signing.SIGNED_HEADERS, values[_FIRST_SIGNED:])), "x-lab-host": "", **out}
        body_sha = body_sha or signed_body_sha(req)
        out.update(signing.signature_headers(key, f"peer/{node_id}", req.method, req.handler.path, body_sha,
                                             time.time(), tokens.token_hex(16), headers))
    return out


# -- what each route needs --------------------------------------------------------------------------


def host(req) -> str:
    """The host a worker call acts as: proved by its signature or certificate (or, in legacy mode, named)."""
    trust: Trust = req.app.trust
    if trust.legacy:
        return _legacy_host(req)
    ident = req.identity()
    if ident.kind == "host":
        return ident.name
    if req.header("x-lab-host") or req.peer_host is None:
        raise errors.Unauthorized("this coordinator accepts only signed worker requests: give the worker its key "
                                  "(work --host-key-file FILE, or CIS490_HOST_KEY_FILE); "
                                  + ADD_HOST_HINT.format(host=req.header("x-lab-host") or "HOST"))
    raise errors.Unauthorized("no host identity: sign the request with the host's key or use a client certificate")


def _legacy_host(req) -> str:
    sent = req.header("x-lab-host")
    if not sent:
        if req.peer_host:
            return req.peer_host
        raise errors.Unauthorized("no host identity: a worker says which host it is (work --host-id; "
                                  "x-lab-host: <host id> over HTTP)")
    if req.peer_host is not None and sent != req.peer_host and not _legacy_from_peer(req):
        raise errors.Forbidden(_cert_mismatch(sent, req.peer_host))
    if not model.HOST_ID_RE.match(sent):
        raise errors.BadRequest(f"x-lab-host {sent[:80]!r} is not a valid host id: use 1-63 letters, digits, "
                                "'.', '_' or '-', starting with a letter or digit")
    return sent


def _cert_mismatch(sent: str, named: str) -> str:
    return (f"this worker says it is {sent[:80]!r} (work --host-id, x-lab-host over HTTP) but its TLS client "
            f"certificate names {named!r}: run it with --host-id {named} (host_id in worker.toml), or give it "
            f"{sent[:80]}'s certificate")


def _legacy_from_peer(req) -> bool:
    return bool(req.header("x-forwarded-by")) and req.peer_host in _peer_cert_names(req.app)


def operator(req) -> str:
    """The name of the operator whose token the request carries."""
    trust: Trust = req.app.trust
    if not trust.operator_tokens:
        raise errors.Forbidden("operator actions are disabled: this coordinator has no operator token; start "
                               "serve with CIS490_OPERATOR_TOKEN set or with --operator-token-file FILE")
    sent = req.headers.get(H_OPERATOR_TOKEN)
    if sent is None or sent == "":
        raise errors.Unauthorized("this needs the operator token: set CIS490_OPERATOR_TOKEN to the token the "
                                  "coordinator was started with (HTTP clients send it as x-operator-token)")
    name = constant_time_find(sent, trust.operator_tokens)
    if name is None:
        raise errors.Forbidden("wrong operator token: use one the coordinator was started with (the jobs "
                               "command reads it from CIS490_OPERATOR_TOKEN)")
    return name


def reader(req) -> None:
    """A read needs a host or peer identity, an operator token or a read token, unless reads are public."""
    trust: Trust = req.app.trust
    if trust.public_read:
        return
    if constant_time_find(req.headers.get(H_OPERATOR_TOKEN), trust.operator_tokens):
        return
    if constant_time_find(req.headers.get(H_READ_TOKEN), trust.read_tokens):
        return
    if req.identity().kind in ("host", "peer"):
        return
    raise errors.Unauthorized("reading the queue needs a token: send x-read-token (CIS490_READ_TOKEN; serve "
                              "--read-token-file), an operator token, or a host's signature; or start serve with "
                              "--public-read")


def access(req) -> str:
    """What the caller's token allows, for ``/v1/health`` (the dashboard shows actions to operators only):
    operator, reader or none. It tells the holder of a token what that token is, nothing more."""
    trust: Trust = req.app.trust
    if constant_time_find(req.headers.get(H_OPERATOR_TOKEN), trust.operator_tokens):
        return "operator"
    if trust.public_read or constant_time_find(req.headers.get(H_READ_TOKEN), trust.read_tokens):
        return "reader"
    return "none"


def peer(req) -> str:
    """The node id of the peer that sent a /v1/raft/* request."""
    if getattr(req.app, "replicator", None) is None:
        raise errors.NotFound("this coordinator is not part of a replicated group (serve without --peer)")
    ident = req.identity()
    if ident.kind == "peer":
        return ident.name
    if req.app.trust.legacy and req.app.trust.cluster_key is None:
        return ""
    raise errors.Forbidden("only the group's peers may call /v1/raft/*: sign with the cluster key (serve "
                           "--cluster-key-file, the same file on every peer) or present a certificate the "
                           "peer list names")


# -- files ----------------------------------------------------------------------------------------


def read_named_tokens(path: str, what: str, default_name: str) -> dict[str, str]:
    """``name:token`` lines (a line without a name is ``default_name``'s token); blank lines and # comments skipped."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as err:
        raise errors.ConfigError(f"{what} {path}: cannot read it ({err.strerror or err})") from None
    except UnicodeDecodeError:
        raise errors.ConfigError(f"{what} {path} is not UTF-8 text; write one name:token per line") from None
    tokens: dict[str, str] = {}
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, token = line.partition(":")
        if not sep:
            name, token = default_name, line
        name, token = name.strip(), token.strip()
        if not model.OPERATOR_NAME_RE.fullmatch(name) or not token:
            raise errors.ConfigError(f"{what} {path} line {n}: expected name:token (a name of letters, digits, "
                                     "'.', '_', '-', '@', then the token)")
        if name in tokens:
            raise errors.ConfigError(f"{what} {path} line {n}: the name {name!r} is given twice; give each once")
        tokens[name] = token
    if not tokens:
        raise errors.ConfigError(f"{what} {path} is empty; put name:token lines in it")
    warn_if_shared(p, what)
    return tokens


def warn_if_shared(path: Path, what: str) -> None:
    """Warn when anyone but the owner and its group may read the key, or the group may change it. Group
    read is how ``enroll`` gives the service account a root-owned key (0640 root:cis490fleet)."""
    import logging

    mode = path.stat().st_mode
    if os.name != "nt" and mode & (stat.S_IRWXO | stat.S_IWGRP | stat.S_IXGRP):
        logging.getLogger(__name__).warning("%s %s has mode %03o: others may read or change it; chmod 600 it "
                                            "(or 640 with the service's group)", what, path, mode & 0o777)


def load_or_create_key(path: str, what: str) -> bytes:
    """The key in ``path``; a missing file is created with a fresh key, mode 0600 from the first byte."""
    import secrets

    p = Path(path)
    try:
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        try:
            text = p.read_text(encoding="ascii")
        except (OSError, UnicodeDecodeError) as err:
            raise errors.ConfigError(f"{what} {path}: cannot read it ({err})") from None
        warn_if_shared(p, what)
        return signing.parse_key(text, f"{what} {path}")
    except OSError as err:
        raise errors.ConfigError(f"{what} {path}: cannot create it ({err.strerror or err})") from None
    key = secrets.token_bytes(signing.KEY_BYTES)
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write(key.hex() + "\n")
        f.flush()
        os.fsync(f.fileno())
    return key
