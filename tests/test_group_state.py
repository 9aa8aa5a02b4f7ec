"""The replicated group as the one source of truth: reads, the manifest, artifacts, forwarding.

In-process peers on loopback (``test_replication.Group``); ticks of 50 ms.
"""

from __future__ import annotations

from conftest import http_call
from test_replication import group, three  # noqa: F401 - the in-process group fixture


def test_a_read_on_a_peer_that_is_not_the_leader_still_passes_the_read_barrier(group):  # noqa: F811
    """The window between forward_url (answer here, this peer leads) and the read (it no longer does):
    the read must still see every write acknowledged before it, so the peer's read barrier runs whatever
    its role now (a follower asks the leader for the read index and waits until it has applied that far)."""
    g = three(group, n_jobs=8)
    leader, f = g.leader(), g.follower()
    for i in range(8):
        status, _, got = http_call(g.urls[leader], "POST", "/v1/job/claim", {"capability": {}},
                                   headers={"x-lab-host": f"w{i}"})
        assert status == 200 and got["job"] is not None
        _, total = g.coords[f].list_jobs(status="claimed")
        assert total == i + 1, f"the read after claim {i + 1} missed it"
        assert g.coords[f].job_detail(got["job_id"])["host"] == f"w{i}"
