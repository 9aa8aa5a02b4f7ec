"""Client sessions end to end: a write retried with the same x-client-id + x-client-serial applies once.

Real coordinators on 127.0.0.1; the raw tests send the headers with ``http.client``,
the last ones drive ``client.Client`` through a TCP proxy that loses an answer.
"""

from __future__ import annotations

import socket
import threading
import time

import pytest

from cis490fleet import errors
from cis490fleet.client import Client
from conftest import OPERATOR_TOKEN, alias, manifest_toml

OP = {"x-operator-token": OPERATOR_TOKEN}
CAP = {"capability": {"slots": 8}}
CID = "session-test-0123456789"


def session(serial: int, client_id: str = CID) -> dict:
    return {"x-client-id": client_id, "x-client-serial": str(serial)}


def worker(host: str, serial: int, lease: str | None = None, client_id: str = CID) -> dict:
    headers = {"x-lab-host": host, **session(serial, client_id)}
    if lease is not None:
        headers["x-lease"] = lease
    return headers


@pytest.fixture
def srv(live_server):
    return live_server(manifest_toml(3, max_attempts=3))


def held(srv) -> list[dict]:
    status, _, body = srv.call("GET", "/v1/jobs")
    assert status == 200
    return [j for j in body["jobs"] if j["status"] in ("claimed", "running")]


def test_a_claim_sent_twice_with_one_serial_gets_one_job_and_one_lease(srv):
    first = srv.call("POST", "/v1/job/claim", CAP, worker("ws1", 1))
    again = srv.call("POST", "/v1/job/claim", CAP, worker("ws1", 1))
    assert first[0] == again[0] == 200
    assert first[2]["job_id"] and again[2] == first[2]
    assert [(j["id"], j["attempts"]) for j in held(srv)] == [(first[2]["job_id"], 1)]
    detail = srv.call("GET", f"/v1/job/{first[2]['job_id']}")[2]["job"]
    assert len(detail["attempts"]) == 1

    other = srv.call("POST", "/v1/job/claim", CAP, worker("ws1", 2))[2]
    assert other["job_id"] not in (None, first[2]["job_id"]) and other["lease"] != first[2]["lease"]
    assert len(held(srv)) == 2


def test_without_session_headers_a_second_claim_is_a_second_job(srv):
    a = srv.call("POST", "/v1/job/claim", CAP, {"x-lab-host": "ws1"})[2]
    b = srv.call("POST", "/v1/job/claim", CAP, {"x-lab-host": "ws1"})[2]
    assert a["job_id"] != b["job_id"] and len(held(srv)) == 2


def test_an_empty_claim_is_not_remembered_so_its_retry_can_get_a_job(live_server):
    srv = live_server(manifest_toml(1))
    taken = srv.call("POST", "/v1/job/claim", CAP, worker("ws1", 1, client_id="other-client-0123456"))
    assert taken[2]["job_id"]
    assert srv.call("POST", "/v1/job/claim", CAP, worker("ws2", 1))[2] == {"job": None}
    status, _, _ = srv.call("POST", f"/v1/job/{taken[2]['job_id']}/release",
                            None, worker("ws1", 2, taken[2]["lease"], client_id="other-client-0123456"))
    assert status == 200
    again = srv.call("POST", "/v1/job/claim", CAP, worker("ws2", 1))[2]
    assert again["job_id"] == taken[2]["job_id"]


def test_a_retried_fail_answers_as_the_first_time_instead_of_stale_lease(srv):
    claim = srv.call("POST", "/v1/job/claim", CAP, worker("ws1", 1))[2]
    path = f"/v1/job/{claim['job_id']}/fail"
    boom = {"error": "boom", "class": "infra"}  # not the job's fault: back to pending, the lease gone
    first = srv.call("POST", path, boom, worker("ws1", 2, claim["lease"]))
    again = srv.call("POST", path, boom, worker("ws1", 2, claim["lease"]))
    assert first[0] == again[0] == 200 and again[2] == first[2] and first[2]["status"] == "pending"
    assert srv.call("POST", path, boom, worker("ws1", 3, claim["lease"]))[0] == 409
    detail = srv.call("GET", f"/v1/job/{claim['job_id']}")[2]["job"]
    assert len(detail["attempts"]) == 1


def test_a_late_retry_of_a_cancel_does_not_undo_a_requeue_in_between(srv):
    job_id = srv.call("GET", "/v1/jobs")[2]["jobs"][0]["id"]
    alice, bob = "operator-alice-0001", "operator-bob-000001"
    cancel = (f"/v1/job/{job_id}/cancel", None, {**OP, **session(1, alice)})
    assert srv.call("POST", *cancel)[0] == 200
    assert srv.call("POST", f"/v1/job/{job_id}/requeue", None, {**OP, **session(1, bob)})[0] == 200
    status, _, body = srv.call("POST", *cancel)  # alice's answer was lost; her client sends it again
    assert (status, body) == (200, {"ok": True})
    assert srv.call("GET", f"/v1/job/{job_id}")[2]["job"]["status"] == "pending"
    # Without a session the same request would act again.
    assert srv.call("POST", f"/v1/job/{job_id}/cancel", None, OP)[0] == 200
    assert srv.call("GET", f"/v1/job/{job_id}")[2]["job"]["status"] == "cancelled"


def test_an_older_serial_is_refused(srv):
    assert srv.call("POST", "/v1/worker/register", CAP, worker("ws1", 5))[0] == 200
    status, _, body = srv.call("POST", "/v1/worker/register", CAP, worker("ws1", 4))
    assert status == 400 and "serial 4 is older than 5" in body["detail"]


@pytest.mark.parametrize("headers,named", [
    ({"x-client-id": CID}, "x-client-serial"),
    ({"x-client-serial": "1"}, "x-client-id"),
    ({"x-client-id": "short", "x-client-serial": "1"}, "x-client-id"),
    ({"x-client-id": "bad id with spaces!!", "x-client-serial": "1"}, "x-client-id"),
    ({"x-client-id": "x" * 65, "x-client-serial": "1"}, "x-client-id"),
    ({"x-client-id": CID, "x-client-serial": "0"}, "x-client-serial"),
    ({"x-client-id": CID, "x-client-serial": "-3"}, "x-client-serial"),
    ({"x-client-id": CID, "x-client-serial": "1.5"}, "x-client-serial"),
    ({"x-client-id": CID, "x-client-serial": "9" * 30}, "x-client-serial"),
])
def test_bad_session_headers_are_400_naming_the_header(srv, headers, named):
    for method, path, body, extra in (
            ("POST", "/v1/job/claim", CAP, {"x-lab-host": "ws1"}),
            ("POST", "/v1/worker/register", CAP, {"x-lab-host": "ws1"}),
            ("POST", f"/v1/job/{'a' * 64}/heartbeat", {}, {"x-lab-host": "ws1", "x-lease": "1"}),
            ("POST", "/v1/manifest/reload", None, OP)):
        status, _, answer = srv.call(method, path, body, {**extra, **headers})
        assert status == 400 and answer["error"] == "bad_request", (path, answer)
        assert named in answer["detail"] and "\n" not in answer["detail"]
    assert held(srv) == []


# -- our Client, through a proxy that loses an answer ---------------------------------------------


class DropFirstAnswer:
    """TCP proxy to ``target``: the first connection's request goes through, its answer is thrown away and
    the connection cut; later connections pass untouched."""

    def __init__(self, target_port: int, on_drop=None):
        self.target = ("127.0.0.1", target_port)
        self.on_drop = on_drop  # called after the answer was thrown away, before the client's socket is cut
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.connections = 0
        self.dropped = threading.Event()
        self._socks: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            self._socks += [client, upstream]
            self.connections += 1
            drop = self.connections == 1
            threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, drop), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, drop: bool) -> None:
        try:
            while data := src.recv(65536):
                if drop:
                    self.dropped.set()
                    if self.on_drop is not None:
                        self.on_drop()
                    break
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def close(self) -> None:
        self.listener.close()
        for s in self._socks:
            s.close()


@pytest.fixture
def proxy():
    made = []

    def start(port: int, on_drop=None) -> DropFirstAnswer:
        made.append(DropFirstAnswer(port, on_drop))
        alias(made[-1].url, port)
        return made[-1]

    yield start
    for p in made:
        p.close()


def test_client_retries_a_claim_whose_answer_was_lost_and_holds_one_job(srv, proxy):
    p = proxy(srv.port)
    client = Client(p.url, host_id="ws1", retries=3, backoff_s=0.01)
    claim = client.claim({"host": "ws1", "slots": 8})
    assert p.dropped.is_set() and p.connections == 2
    assert [(j["id"], j["attempts"], j["host"]) for j in held(srv)] == [(claim["job_id"], 1, "ws1")]
    # The lease the retry got is the one the queue holds: the worker can heartbeat and finish the job.
    assert client.heartbeat(claim["job_id"], claim["lease"]) == {"ok": True, "cancel": False}
    assert client.release(claim["job_id"], claim["lease"]) == {"ok": True}
    assert held(srv) == []


def test_client_retries_a_cancel_whose_answer_was_lost(srv, proxy):
    job_id = srv.call("GET", "/v1/jobs")[2]["jobs"][0]["id"]
    p = proxy(srv.port)
    assert Client(p.url, operator_token=OPERATOR_TOKEN, retries=3, backoff_s=0.01).cancel(job_id) == {"ok": True}
    assert p.dropped.is_set()
    assert srv.call("GET", f"/v1/job/{job_id}")[2]["job"]["status"] == "cancelled"


def test_each_thread_of_a_client_has_its_own_session(srv):
    client = Client(srv.url, host_id="ws1")
    got: list[dict] = []

    def work():
        got.append(client._session_headers())
        got.append(client._session_headers())

    t = threading.Thread(target=work)
    t.start()
    t.join()
    mine = [client._session_headers(), client._session_headers()]
    assert [h["x-client-serial"] for h in got] == [h["x-client-serial"] for h in mine] == [1, 2]
    assert got[0]["x-client-id"] == got[1]["x-client-id"] != mine[0]["x-client-id"] == mine[1]["x-client-id"]
    assert all(h["x-client-id"].startswith(client.client_id) for h in got + mine)
    assert 16 <= len(mine[0]["x-client-id"]) <= 64


def test_claims_from_many_threads_of_one_client_do_not_refuse_each_other(live_server):
    srv = live_server(manifest_toml(8))
    client = Client(srv.url, host_id="ws1")
    results: list = []

    def work():
        for _ in range(2):
            try:
                results.append(client.claim({"host": "ws1", "slots": 8})["job_id"])
            except errors.FleetError as err:  # pragma: no cover - the failure this test exists to catch
                results.append(err)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(isinstance(r, str) for r in results), results
    assert len(set(results)) == 8 and len(held(srv)) == 8


def test_a_long_poll_claim_with_a_session_gets_the_job_that_frees_up_while_it_waits(live_server):
    srv = live_server(manifest_toml(1))
    holder = Client(srv.url, host_id="ws1")
    first = holder.claim({"host": "ws1"})
    waiter = Client(srv.url, host_id="ws2")
    got: list = []
    t = threading.Thread(target=lambda: got.append(waiter.claim({"host": "ws2"}, wait=20)))
    t.start()
    try:
        # Release only once the waiter's first try (which found nothing) has reached the store.
        for _ in range(1000):
            if any(w["host"] == "ws2" for w in srv.call("GET", "/v1/workers")[2]["workers"]):
                break
            time.sleep(0.01)
        assert holder.release(first["job_id"], first["lease"]) == {"ok": True}
    finally:
        t.join(30)
    assert got and got[0]["job_id"] == first["job_id"] and got[0]["lease"] != first["lease"]
    assert [j["host"] for j in held(srv)] == ["ws2"]
