"""Slow or greedy clients hold only their own connections: a cap per client address, and deadlines.

Adapter. Owns two bounds of the HTTP server that no socket timeout gives: a
request's head (request line and headers) must arrive within ``head_s`` of its
first byte, and a TLS handshake within ``handshake_s`` of the accept, however
slowly the bytes trickle in (a per-read timeout restarts with every byte). One
reaper thread shuts the socket of a connection whose deadline passed, which
ends the read its handler thread is blocked in. And no client address holds more
than ``per_address`` connections at once (``exempt``: the group's own peers), so
one host cannot take every handler thread. It never reads or writes a request.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from typing import Callable

log = logging.getLogger(__name__)

HEAD_S = 10.0
HANDSHAKE_S = 10.0
PER_ADDRESS = 64
REAP_EVERY_S = 0.25


def client_key(address: str) -> str:
    """Whose share a connection counts against: its IPv4 address, or the /64 network of an IPv6 one (a
    single host usually holds a whole /64, so per-address would be no cap at all)."""
    import ipaddress

    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address
    if ip.version == 6:
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return address


class ConnectionGuard:
    def __init__(self, *, per_address: int = PER_ADDRESS, head_s: float = HEAD_S, handshake_s: float = HANDSHAKE_S,
                 exempt: Callable[[str], bool] | None = None):
        self.per_address = per_address
        self.head_s = head_s
        self.handshake_s = handshake_s
        self.exempt = exempt  # asked only for an address over its share, from the accept loop alone
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}
        self._deadlines: dict[socket.socket, tuple[float, str]] = {}
        self._stop = threading.Event()
        self._reaper: threading.Thread | None = None
        self.reaped = 0
        self.refused = 0
        self._refusal_logged = float("-inf")

    # -- per-address cap ------------------------------------------------------------------------

    def admit(self, address: str) -> bool:
        """Count a new connection from ``address``; False (nothing counted) when it already holds its share."""
        with self._lock:
            if self._counts.get(address, 0) < self.per_address:
                self._counts[address] = self._counts.get(address, 0) + 1
                return True
        if self.exempt is None or not self.exempt(address):  # outside the lock: it may resolve names
            return False
        with self._lock:
            self._counts[address] = self._counts.get(address, 0) + 1
        return True

    def release(self, address: str) -> None:
        with self._lock:
            held = self._counts.get(address, 0) - 1
            if held > 0:
                self._counts[address] = held
            else:
                self._counts.pop(address, None)

    def note_refusal(self, why: str) -> None:
        """Log a refused connection, at most once a second (a flood must not flood the log too)."""
        now = time.monotonic()
        with self._lock:
            self.refused += 1
            if now - self._refusal_logged < 1.0:
                return
            self._refusal_logged, count = now, self.refused
        log.warning("refusing a connection: %s (%d refused so far)", why, count)

    def held(self, address: str) -> int:
        with self._lock:
            return self._counts.get(address, 0)

    # -- deadlines ------------------------------------------------------------------------------

    def arm(self, sock: socket.socket, seconds: float, what: str) -> None:
        """Shut ``sock`` down unless ``disarm`` comes within ``seconds``."""
        with self._lock:
            self._deadlines[sock] = (time.monotonic() + seconds, what)
        if self._reaper is None:
            self._start()

    def disarm(self, sock: socket.socket) -> None:
        with self._lock:
            self._deadlines.pop(sock, None)

    def _start(self) -> None:
        with self._lock:
            if self._reaper is not None:
                return
            self._reaper = threading.Thread(target=self._reap_loop, name="connection-deadlines", daemon=True)
        self._reaper.start()

    def stop(self) -> None:
        self._stop.set()

    def _reap_loop(self) -> None:
        while not self._stop.wait(REAP_EVERY_S):
            try:
                self.reap(time.monotonic())
            except Exception:  # the reaper must outlive anything one socket does
                log.exception("connection deadline check failed; carrying on")

    def reap(self, now: float) -> int:
        """Shut down every connection whose deadline is before ``now``; how many."""
        with self._lock:
            late = [(sock, what) for sock, (deadline, what) in self._deadlines.items() if deadline <= now]
            for sock, _ in late:
                del self._deadlines[sock]
        for sock, what in late:
            try:
                peer = sock.getpeername()[0]
            except OSError:
                peer = "?"
            log.info("dropping the connection from %s: its %s did not arrive in time", peer, what)
            try:
                # socket.socket's own shutdown, also for an SSLSocket: it wakes the blocked read without
                # touching the TLS state the handler thread is using.
                socket.socket.shutdown(sock, socket.SHUT_RDWR)
            except OSError:
                pass
        self.reaped += len(late)
        return len(late)


def peer_addresses(urls) -> frozenset[str]:
    """The IP addresses the hosts of ``urls`` resolve to (names that do not resolve are skipped)."""
    import urllib.parse

    found = set()
    for url in urls:
        host = urllib.parse.urlsplit(url).hostname
        if not host:
            continue
        try:
            found.update(info[4][0] for info in socket.getaddrinfo(host, None, type=socket.SOCK_STREAM))
        except (OSError, UnicodeError):
            log.warning("peer %s does not resolve now; its connections count against the per-address cap", host)
    return frozenset(found)
