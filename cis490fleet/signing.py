"""Request signing, used by both sides of the wire: what is signed, how, and when a signature is fresh.

Pure core: every function takes its inputs and ``now``; the caller draws the
nonce and reads the clock. A host (or a peer, with the cluster key) never sends
its key: it sends HMAC-SHA256 over the canonical string of the request
(``canonical``), with a timestamp and a nonce. The receiver recomputes it
(``verify``), refuses a timestamp outside ``WINDOW_S`` of its own clock, and
refuses a (signer, nonce) pair it has already seen (``NonceMemory``), so a
captured request cannot be replayed. The body enters as its sha256; a streamed
upload enters as the ``x-content-sha256`` it declares, which the artifact store
verifies against every byte it receives.
"""

from __future__ import annotations

import email.utils
import hashlib
import hmac
import math
import re
from collections import OrderedDict
from typing import NamedTuple

from cis490fleet import errors

VERSION = "cis490fleet-v1"
WINDOW_S = 300
"""A signature's timestamp may differ from the receiver's clock by this much, either way (a host's: behind)."""
HOST_AHEAD_S = 5
"""A host's signature may be at most this far ahead of the receiver's clock. The client corrects its clock
offset from every answer's Date, so only the first request of a host whose clock is off is refused (and
signed again at once); the bound is what lets a restarted coordinator, or a new leader, refuse every request
the previous one may have accepted (``NonceMemory.not_before``) while making hosts wait only seconds."""
MAX_NONCES = 1_000_000
KEY_BYTES = 32

H_SIGNER = "x-fleet-signer"
H_TIME = "x-fleet-time"
H_NONCE = "x-fleet-nonce"
H_SIGNATURE = "x-fleet-signature"
SIGNATURE_HEADERS = (H_SIGNER, H_TIME, H_NONCE, H_SIGNATURE)
SIGNED_HEADERS = ("x-lab-host", "x-lease", "x-client-id", "x-client-serial", "x-fleet-identity",
                  "x-fleet-client-nonce", "x-artifact")
"""Headers whose values the signature covers (absent ones as empty), besides method, target and body."""
SIGNATURE_AND_SIGNED = SIGNATURE_HEADERS + SIGNED_HEADERS
"""What a receiver reads in one pass: ``parse_values`` takes the first four, ``canonical_of_values`` the rest."""
_SIGNED_PREFIXES = tuple(f"\n{name}:" for name in SIGNED_HEADERS)

EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
_NONCE_RE = re.compile(r"[0-9a-f]{32}")
_SIG_RE = re.compile(r"[0-9a-f]{64}")
_SIGNER_RE = re.compile(r"(host|peer)/[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
_KEY_RE = re.compile(r"[0-9a-f]{64}")


class Signed(NamedTuple):
    """A request's signature headers, parsed: who signed, when, with which nonce."""

    signer: str  # "host/<host id>" or "peer/<node id>"
    timestamp: int
    nonce: str
    signature: str
    kind: str  # the signer's two parts: "host" or "peer",
    name: str  # and the host id or node id


def body_sha256(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


def parse_key(text: str, source: str) -> bytes:
    """A key as stored and printed (64 hex digits) -> its 32 bytes; ConfigError naming ``source`` otherwise."""
    text = text.strip()
    if not _KEY_RE.fullmatch(text):
        raise errors.ConfigError(f"{source} does not hold a key: expected 64 hex digits (what `jobs hosts add` "
                                 "prints, or a cluster key file serve created)")
    return bytes.fromhex(text)


def canonical(method: str, target: str, timestamp: int, nonce: str, body_sha: str, signer: str,
              headers: dict[str, str] | None = None) -> bytes:
    """The bytes that are signed: one field per line, so no field can run into the next."""
    get = {k.lower(): v for k, v in headers.items()}.get if headers else {}.get
    return canonical_of_values(method, target, timestamp, nonce, body_sha, signer,
                               [str(get(name) or "").strip() for name in SIGNED_HEADERS])


def canonical_of_values(method: str, target: str, timestamp: int, nonce: str, body_sha: str, signer: str,
                        values: list[str]) -> bytes:
    """``canonical`` from the ``SIGNED_HEADERS`` values in order, already stripped (absent ones empty): what
    a receiver has at hand, without building a dict per request."""
    signed = "".join([prefix + value for prefix, value in zip(_SIGNED_PREFIXES, values)])
    return (f"{VERSION}\n{signer}\n{method.upper()}\n{target}\n{int(timestamp)}\n{nonce}\n{body_sha}"
            f"{signed}").encode("utf-8", "surrogateescape")


def sign(key: bytes, message: bytes) -> str:
    """HMAC-SHA256 of ``message``, hex. Not ``hmac.digest``: that one-shot releases the GIL on every call,
    however short the message, so on a busy server each signed request waited for the GIL to come back
    from another thread; ``hmac.new`` keeps it for short messages, as ``hashlib`` does."""
    return hmac.new(key, message, "sha256").hexdigest()


def signature_headers(key: bytes, signer: str, method: str, target: str, body_sha: str, now: float, nonce: str,
                      headers: dict[str, str] | None = None) -> dict[str, str]:
    """The four headers that sign a request made at ``now`` (already corrected by the clock offset)."""
    timestamp = int(now)
    message = canonical(method, target, timestamp, nonce, body_sha, signer, headers)
    return {H_SIGNER: signer, H_TIME: str(timestamp), H_NONCE: nonce, H_SIGNATURE: sign(key, message)}


def parse(get) -> Signed | None:
    """The signature headers via ``get(name)``; None when the request carries none; Unauthorized when malformed."""
    return parse_values([(get(name) or "").strip() for name in SIGNATURE_HEADERS])


def parse_values(values: list[str]) -> Signed | None:
    """``parse`` from the ``SIGNATURE_HEADERS`` values in order, stripped, "" for an absent one (more values
    after them, as ``SIGNATURE_AND_SIGNED`` reads, are left alone)."""
    signer, timestamp, nonce, signature = values[0], values[1], values[2], values[3]
    if not (signer or timestamp or nonce or signature):
        return None
    if not (signer and timestamp and nonce and signature):
        missing = [n for n, v in zip(SIGNATURE_HEADERS, (signer, timestamp, nonce, signature)) if not v]
        raise errors.Unauthorized(f"signed request without {', '.join(missing)}: send all of "
                                  f"{', '.join(SIGNATURE_HEADERS)} (the cis490fleet client does)")
    if not _SIGNER_RE.fullmatch(signer):
        raise errors.Unauthorized(f"{H_SIGNER} {signer[:80]!r} is not host/<host id> or peer/<node id>")
    if not (timestamp.isascii() and timestamp.isdigit() and len(timestamp) <= 12):
        raise errors.Unauthorized(f"{H_TIME} {timestamp[:40]!r} is not a whole number of seconds since the epoch")
    if not _NONCE_RE.fullmatch(nonce):
        raise errors.Unauthorized(f"{H_NONCE} must be 32 lowercase hex digits, drawn at random for each request")
    if not _SIG_RE.fullmatch(signature):
        raise errors.Unauthorized(f"{H_SIGNATURE} must be 64 lowercase hex digits (HMAC-SHA256)")
    kind, _, name = signer.partition("/")
    return Signed(signer, int(timestamp), nonce, signature, kind, name)


def check_time(timestamp: int, now: float, window: float = WINDOW_S, ahead: float | None = None) -> None:
    """Unauthorized unless ``timestamp`` is at most ``window`` behind ``now`` and ``ahead`` (default: the
    window) ahead of it."""
    skew = timestamp - now
    allowed = window if skew < 0 or ahead is None else ahead
    if abs(skew) > allowed:
        raise errors.Unauthorized(f"the request's {H_TIME} is {abs(skew):.0f} s {'ahead of' if skew > 0 else 'behind'} "
                                  f"this coordinator's clock (at most {allowed:.0f} s allowed); set the host's clock "
                                  "right (NTP), the client corrects small offsets from the Date header itself")


def not_before(since: float) -> int:
    """The first signature time a memory of received requests that began at ``since`` can vouch for: a host
    request accepted before then was signed at most ``HOST_AHEAD_S`` ahead of the clock, so before this."""
    return math.ceil(since + HOST_AHEAD_S)


def check_not_before(signer: str, timestamp: int, floor: float) -> None:
    if timestamp < floor:
        floor = int(floor)
        raise errors.StaleSignature(f"this request (signer {signer}) was signed {floor - timestamp} s before this "
                                    "coordinator's memory of requests begins (it restarted, or became the leader, "
                                    f"since), so it cannot be told from a replay; sign it again at or after {floor} "
                                    "(x-fleet-not-before; the cis490fleet client waits and does)", floor)


def verify(key: bytes, signed: Signed, method: str, target: str, body_sha: str, now: float,
           headers: dict[str, str] | None = None, window: float = WINDOW_S, *, values: list[str] | None = None,
           ahead: float | None = None) -> None:
    """Unauthorized unless ``signed`` is ``key``'s signature of this request and its time is within the window.
    The signed headers come as ``headers`` (any case) or as ``values`` (``canonical_of_values``).

    The nonce is checked separately (``NonceMemory.check_and_add``), after the signature, so an unsigned
    stranger cannot fill the memory."""
    check_time(signed.timestamp, now, window, ahead)
    if values is None:
        message = canonical(method, target, signed.timestamp, signed.nonce, body_sha, signed.signer, headers)
    else:
        message = canonical_of_values(method, target, signed.timestamp, signed.nonce, body_sha, signed.signer, values)
    expected = sign(key, message)
    if not hmac.compare_digest(expected, signed.signature):
        raise errors.Unauthorized(f"the signature does not match the request (signer {signed.signer}): the body, "
                                  "target or a signed header changed on the way, or the key is not the one the fleet "
                                  "holds for this signer; check --host-key-file (a rotated key must be replaced)")


class NonceMemory:
    """The (signer, nonce) pairs seen in the time window, oldest first, at most ``capacity``.

    When full, the oldest pair is forgotten and ``floor`` rises to its timestamp: a request no newer
    than that is refused as if replayed, so forgetting never lets a replay through."""

    def __init__(self, capacity: int = MAX_NONCES, window: float = WINDOW_S):
        self.capacity = capacity
        self.window = window
        self.floor = float("-inf")
        self._seen: OrderedDict[tuple[str, str], int] = OrderedDict()
        self._expires = float("inf")  # when the front pair leaves the window: no look before then

    def __len__(self) -> int:
        return len(self._seen)

    def check_and_add(self, signer: str, nonce: str, timestamp: int, now: float) -> None:
        if now > self._expires:
            self._expire(now)
        key = (signer, nonce)
        if key in self._seen or timestamp <= self.floor:
            raise errors.Unauthorized(f"this request (signer {signer}, nonce {nonce[:8]}...) was already received: "
                                      "a replay is refused; sign each request with a fresh nonce")
        while len(self._seen) >= self.capacity:
            _, oldest = self._seen.popitem(last=False)
            self.floor = max(self.floor, oldest)
        self._seen[key] = timestamp
        if len(self._seen) == 1:
            self._expires = timestamp + self.window

    def _expire(self, now: float) -> None:
        """Forget pairs whose timestamps the window refuses anyway. Entries arrive roughly in time order,
        so this looks only at the front."""
        limit = now - self.window
        seen = self._seen
        while seen:
            key, ts = next(iter(seen.items()))
            if ts >= limit:
                self._expires = ts + self.window
                return
            del seen[key]
        self._expires = float("inf")


def clock_offset(date_header: str | None, now: float) -> float | None:
    """Server clock minus ours, from an answer's ``Date`` (1 s resolution); None when absent or unreadable."""
    if not date_header:
        return None
    try:
        parsed = email.utils.parsedate_to_datetime(date_header)
    except (TypeError, ValueError, IndexError):
        return None
    if parsed is None or parsed.tzinfo is None:
        return None
    return parsed.timestamp() - now


def corrected_offset(previous: float, observed: float | None) -> float:
    """The offset a client signs with next: kept while within the Date header's one second of error."""
    if observed is None:
        return previous
    if abs(observed - previous) <= 1.5:
        return previous
    return float(round(observed))
