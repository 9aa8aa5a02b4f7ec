"""Checkpoints in a replicated group: on a majority before they are recorded, fetched by a peer that missed them."""

from __future__ import annotations

import hashlib
import os

from conftest import http_call
from test_replication import W1, claim, group, three, wait_for  # noqa: F401  (group is a fixture)


def put_checkpoint(url: str, got: dict, data: bytes, host: str = "w1") -> tuple[int, dict]:
    sha = hashlib.sha256(data).hexdigest()
    status, _, body = http_call(url, "PUT", f"/v1/job/{got['job_id']}/checkpoint", data,
                                headers={"x-lab-host": host, "x-lease": got["lease"], "x-content-sha256": sha,
                                         "x-checkpoint-epoch": "4"})
    return status, body


def test_a_checkpoint_through_a_follower_is_on_a_majority_when_acknowledged_and_then_everywhere(group):
    g = three(group)
    f = g.follower()
    got = claim(g.urls[f], "w1")
    data = os.urandom(200_000)
    status, body = put_checkpoint(g.urls[f], got, data)
    assert status == 201 and body["epoch"] == 4, body
    sha = body["sha256"]
    holding = [n for n, c in g.coords.items() if c.checkpoints.locate(sha) is not None]
    assert len(holding) >= 2, holding
    assert not any(c.artifacts.locate(sha) for c in g.coords.values()), "a checkpoint landed among the models"
    wait_for("every peer to hold the checkpoint", lambda: all(c.checkpoints.locate(sha) for c in g.coords.values()))
    status, _, detail = http_call(g.urls[g.follower()], "GET", f"/v1/job/{got['job_id']}")
    assert status == 200 and [c["sha256"] for c in detail["job"]["checkpoints"]] == [sha]


def test_a_follower_that_missed_a_checkpoint_fetches_it_when_it_applies_the_record(group):
    g = three(group)
    leader = g.leader()
    away = g.follower()
    g.stop(away)
    got = claim(g.urls[leader], "w1")
    status, body = put_checkpoint(g.urls[leader], got, os.urandom(10_000))
    assert status == 201, body
    back = g.start(away)
    wait_for("the returning follower to fetch the checkpoint",
             lambda: back.checkpoints.locate(body["sha256"]) is not None, timeout=10)
    data = back.checkpoints.locate(body["sha256"]).read_bytes()
    assert hashlib.sha256(data).hexdigest() == body["sha256"]
