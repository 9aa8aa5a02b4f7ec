"""The peers' own HTTP client (``peer_post``), against a real HTTP server on loopback."""

from __future__ import annotations

import http.server
import socket

import pytest

from cis490fleet import peer_post
from conftest import loopback_http


class Recorder(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    connections: list = []
    requests: list = []
    mode = "echo"

    def setup(self):
        super().setup()
        Recorder.connections.append(self.client_address)

    def do_POST(self):
        body = self.rfile.read(int(self.headers["content-length"]))
        Recorder.requests.append((self.path, dict(self.headers), body))
        if Recorder.mode == "close-early":
            self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
            self.close_connection = True
            return
        if Recorder.mode == "garbage":
            self.wfile.write(b"SSH-2.0-nonsense\r\n\r\n")
            self.close_connection = True
            return
        answer = b"echo:" + body
        self.send_response(201 if Recorder.mode == "echo" else 200)
        self.send_header("X-Fleet-Signer", "peer/b")
        if Recorder.mode == "close":
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(answer)
            self.close_connection = True
            return
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    Recorder.connections, Recorder.requests, Recorder.mode = [], [], "echo"
    with loopback_http(Recorder) as url:
        yield url


def test_posts_travel_on_one_kept_alive_connection_with_their_headers(server):
    conn = peer_post.PeerConnection(server, None, 5.0)
    answers = [conn.post("/v1/raft/messages", f"batch {i}".encode(), {"x-fleet-nonce": str(i)}) for i in range(3)]
    assert [(a.status, a.body) for a in answers] == [(201, f"echo:batch {i}".encode()) for i in range(3)]
    assert answers[0].header("X-FLEET-SIGNER") == "peer/b" and answers[0].header("absent") is None
    assert len(Recorder.connections) == 1
    assert [(path, h["x-fleet-nonce"], h["Host"]) for path, h, _ in Recorder.requests] == \
        [("/v1/raft/messages", str(i), server.split("//")[1]) for i in range(3)]
    conn.close()


def test_an_answer_that_closes_is_read_to_its_end_and_the_next_post_reconnects(server):
    Recorder.mode = "close"
    conn = peer_post.PeerConnection(server, None, 5.0)
    assert conn.post("/p", b"one", {}).body == b"echo:one"
    assert not conn.connected
    Recorder.mode = "keep"
    assert conn.post("/p", b"two", {}).body == b"echo:two"
    assert len(Recorder.connections) == 2


@pytest.mark.parametrize("mode, error", [("close-early", "ended after 3 of 10 bytes"), ("garbage", "not an HTTP answer")])
def test_a_broken_answer_is_an_error_and_drops_the_connection(server, mode, error):
    Recorder.mode = mode
    conn = peer_post.PeerConnection(server, None, 5.0)
    with pytest.raises(peer_post.PeerHTTPError, match=error):
        conn.post("/p", b"x", {})
    assert not conn.connected
    Recorder.mode = "keep"
    assert conn.post("/p", b"again", {}).body == b"echo:again"


def test_a_peer_that_is_not_there_is_an_os_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    conn = peer_post.PeerConnection(f"http://127.0.0.1:{port}", None, 2.0)
    with pytest.raises(OSError):
        conn.post("/p", b"x", {})
    assert not conn.connected


def test_a_silent_peer_times_out(server):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    try:
        conn = peer_post.PeerConnection(f"http://127.0.0.1:{listener.getsockname()[1]}", None, 0.3)
        with pytest.raises(peer_post.PeerHTTPError, match="timed out|TimeoutError"):
            conn.post("/p", b"x", {})
        assert not conn.connected
    finally:
        listener.close()


def test_a_header_that_cannot_go_on_the_wire_is_an_error_not_a_crash(server):
    conn = peer_post.PeerConnection(server, None, 5.0)
    with pytest.raises(peer_post.PeerHTTPError, match="UnicodeEncodeError"):
        conn.post("/p", b"x", {"x-name": "\u2603"})
    assert conn.post("/p", b"fine", {}).body == b"echo:fine"
