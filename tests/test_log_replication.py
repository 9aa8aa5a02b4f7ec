"""Attempt logs in a replicated group: on a majority before they are recorded, fetched by a peer that missed them,
readable through any peer."""

from __future__ import annotations

import gzip
import hashlib

from conftest import http_call
from test_replication import claim, group, three, wait_for  # noqa: F401  (group is a fixture)


def put_log(url: str, got: dict, text: bytes, host: str = "w1") -> tuple[int, dict]:
    data = gzip.compress(text, mtime=0)
    sha = hashlib.sha256(data).hexdigest()
    status, _, body = http_call(url, "PUT", f"/v1/job/{got['job_id']}/log", data,
                                headers={"x-lab-host": host, "x-lease": got["lease"], "x-content-sha256": sha})
    return status, body


def test_a_log_through_a_follower_is_on_a_majority_when_acknowledged_then_everywhere(group):
    g = three(group)
    f = g.follower()
    got = claim(g.urls[f], "w1")
    text = b"".join(f"epoch {i} loss {1 / (i + 1):.4f}\n".encode() for i in range(5000))
    status, body = put_log(g.urls[f], got, text)
    assert status == 201 and body["attempt"] == 1, body
    sha = body["sha256"]
    assert len([n for n, c in g.coords.items() if c.logs.locate(sha) is not None]) >= 2
    assert not any(c.artifacts.locate(sha) or c.checkpoints.locate(sha) for c in g.coords.values())
    wait_for("every peer to hold the log", lambda: all(c.logs.locate(sha) for c in g.coords.values()))
    status, headers, data = http_call(g.urls[g.follower()], "GET", f"/v1/job/{got['job_id']}/log?attempt=1")
    assert status == 200 and headers["x-attempt"] == "1" and headers["content-encoding"] == "gzip"
    assert gzip.decompress(data) == text


def test_a_follower_that_missed_a_log_fetches_it_when_it_applies_the_record(group):
    g = three(group)
    leader = g.leader()
    away = g.follower()
    g.stop(away)
    got = claim(g.urls[leader], "w1")
    status, body = put_log(g.urls[leader], got, b"only line\n")
    assert status == 201, body
    back = g.start(away)
    wait_for("the returning follower to fetch the log", lambda: back.logs.locate(body["sha256"]) is not None,
             timeout=10)
    assert hashlib.sha256(back.logs.locate(body["sha256"]).read_bytes()).hexdigest() == body["sha256"]


def test_a_log_from_someone_not_holding_the_job_is_refused_before_it_is_stored(group):
    g = three(group)
    got = claim(g.urls[g.leader()], "w1")
    status, body = put_log(g.urls[g.leader()], got, b"not mine\n", host="w2")
    assert status == 409, body
    assert not any(list(c.logs.index()) for c in g.coords.values())
