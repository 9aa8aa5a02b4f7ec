"""A kept-alive HTTP/1.1 connection that posts small bodies to one peer and reads the answers.

Shell (used by ``replication``'s senders). A Raft sender posts hundreds of small batches a second;
``http.client`` spends more on each than the batch's own work (the answer's head goes through the e-mail
parser). Here a request leaves in one write and an answer's head is split at once. Only what the peers'
own server sends is read: a status line, headers, and a body of ``Content-Length`` bytes (or up to the
end of a connection the answer closes).
"""

from __future__ import annotations

import socket
import ssl
import urllib.parse

MAX_HEAD_BYTES = 65536
MAX_BODY_BYTES = 64 << 20


class PeerHTTPError(OSError):
    """The connection broke, or the answer is not HTTP this client understands: drop the connection."""


class Answer:
    """A peer's answer: ``status``, lowercase ``headers`` (first value of each), ``body``."""

    __slots__ = ("status", "headers", "body")

    def __init__(self, status: int, headers: dict[str, str], body: bytes):
        self.status, self.headers, self.body = status, headers, body

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())


class PeerConnection:
    """One connection to ``url`` (http or https), opened on first use and again after a failure."""

    def __init__(self, url: str, ssl_context: ssl.SSLContext | None, timeout: float):
        parts = urllib.parse.urlsplit(url)
        self.tls = parts.scheme == "https"
        self.host = parts.hostname or "localhost"
        self.port = parts.port or (443 if self.tls else 80)
        self.ssl_context = ssl_context
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._file = None
        host = f"[{self.host}]" if ":" in self.host else self.host
        self._host_header = f"{host}:{self.port}"

    @property
    def connected(self) -> bool:
        return self._sock is not None

    def _open(self) -> None:
        sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.tls:
                context = self.ssl_context or ssl.create_default_context()
                sock = context.wrap_socket(sock, server_hostname=self.host)
        except BaseException:
            sock.close()
            raise
        self._sock, self._file = sock, sock.makefile("rb")

    def close(self) -> None:
        sock, file, self._sock, self._file = self._sock, self._file, None, None
        for thing in (file, sock):
            if thing is not None:
                try:
                    thing.close()
                except OSError:
                    pass

    def post(self, path: str, body: bytes, headers: dict[str, str]) -> Answer:
        """Send one POST and read its answer; PeerHTTPError (the connection is then closed) on any failure."""
        lines = [f"POST {path} HTTP/1.1", f"Host: {self._host_header}", f"Content-Length: {len(body)}"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        try:
            head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
            if self._sock is None:
                self._open()
            self._sock.sendall(head + body)
            return self._read_answer()
        except (OSError, ValueError) as err:
            self.close()
            if isinstance(err, PeerHTTPError):
                raise
            raise PeerHTTPError(f"{type(err).__name__}: {err}") from None

    def _read_answer(self) -> Answer:
        file = self._file
        status_line = file.readline(MAX_HEAD_BYTES)
        if not status_line:
            raise PeerHTTPError("the peer closed the connection before answering")
        parts = status_line.split(None, 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
            raise PeerHTTPError(f"not an HTTP answer: {status_line[:80]!r}")
        status = int(parts[1])
        headers: dict[str, str] = {}
        size = len(status_line)
        while True:
            line = file.readline(MAX_HEAD_BYTES)
            size += len(line)
            if not line or size > MAX_HEAD_BYTES:
                raise PeerHTTPError("the answer's head ended early or is too large")
            if line in (b"\r\n", b"\n"):
                break
            name, sep, value = line.decode("latin-1").partition(":")
            if sep:
                headers.setdefault(name.strip().lower(), value.strip())
        close = headers.get("connection", "").lower() == "close"
        if headers.get("transfer-encoding"):
            raise PeerHTTPError("a chunked answer: the peers' server always sends content-length")
        length = headers.get("content-length")
        if length is not None:
            if not length.isdigit() or int(length) > MAX_BODY_BYTES:
                raise PeerHTTPError(f"content-length {length[:40]!r} is not a size this client reads")
            body = file.read(int(length))
            if len(body) < int(length):
                raise PeerHTTPError(f"the answer ended after {len(body)} of {length} bytes")
        elif close:
            body = file.read(MAX_BODY_BYTES + 1)
            if len(body) > MAX_BODY_BYTES:
                raise PeerHTTPError("the answer is too large")
        else:
            body = b""
        if close:
            self.close()
        return Answer(status, headers, body)
