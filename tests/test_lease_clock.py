"""The coordinator measures stale_after_s on its own monotonic clock too, so a wall-clock step cannot hand a
job to a second host while its holder still heartbeats."""

from __future__ import annotations

import time

from conftest import manifest_toml
from cis490fleet.lease_clock import LeaseClock


class Ticks:
    def __init__(self):
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_a_peer_holds_back_what_it_saw_renewed_within_the_window_and_sweeps_nothing_before_a_whole_one():
    ticks = Ticks()
    clock = LeaseClock(ticks)
    a, b = "a" * 64, "b" * 64
    clock.observe([{"op": "claim"}, {"op": "heartbeat", "job_id": b}, {"op": "heartbeat", "job_id": "c" * 64}],
                  [{"job_id": a, "lease": "L"}, {"ok": True}, RuntimeError("refused")])
    assert clock.hold(10.0) is None  # up for less than a window: it cannot tell who went silent
    ticks.t += 6
    clock.observe([{"op": "heartbeat", "job_id": a}], [{"ok": True}])
    ticks.t += 5  # 11 s since b's heartbeat, 5 since a's
    assert clock.hold(10.0) == [a]
    ticks.t += 5
    assert clock.hold(10.0) == []


def test_a_wall_clock_step_forward_does_not_expire_a_lease_renewed_moments_ago(live_server):
    server = live_server(manifest_toml(1, heartbeat_s=0.5, stale_after_s=2.0))
    coordinator = server.coordinator
    time.sleep(max(0.0, coordinator.lease_clock.started + 2.0 - time.monotonic()))  # up for a whole window
    status, _, got = server.call("POST", "/v1/job/claim", {"capability": {}}, {"x-lab-host": "ws1"})
    assert status == 200 and got["job"], got
    renewed = time.monotonic()
    coordinator.wall_clock = lambda: time.time() + 3600  # an NTP step of an hour
    coordinator.sweep_once()
    job = server.call("GET", f"/v1/job/{got['job_id']}")[2]["job"]
    assert job["status"] == "claimed" and job["host"] == "ws1", job  # wall clock: an hour past lease_expires
    time.sleep(max(0.0, renewed + 2.1 - time.monotonic()))
    coordinator.sweep_once()  # now silent for stale_after_s on the monotonic clock as well
    assert server.call("GET", f"/v1/job/{got['job_id']}")[2]["job"]["status"] == "pending"
