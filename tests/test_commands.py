"""The one validation of queue commands (``commands.validate``) and the total apply behind it.

A command is checked before it is batched or proposed; one that slips past (an older
peer's log, a caller that skips the check) fails alone when applied, with the same
error on every replica, and the writer carries on.
"""

from __future__ import annotations

import math
import time

import pytest

from conftest import http_call, manifest_toml
from test_replication import W1, group, three  # noqa: F401 - the in-process group fixture
from test_e2e import wait_for

from cis490fleet import commands, errors
from cis490fleet.coordinator import GroupCommitWriter
from cis490fleet.jobstore import JobStore
from cis490fleet.manifest import parse

T0 = 1_700_000_000.0
POISON = [
    ({"ram_gib": 1e999}, "capability.ram_gib"),
    ({"ram_gib": math.nan}, "capability.ram_gib"),
    ({"gpus": [{"vram_gib": "x"}]}, "capability.gpus[0].vram_gib"),
    ({"gpus": "rtx"}, "capability.gpus"),
    ({"cuda": "yes"}, "capability.cuda"),
    ({"extra": {"deep": [1e999]}}, "capability.extra.deep[0]"),
    ({"cores": -3}, "capability.cores"),
]


def claim_cmd(capability, **kw) -> dict:
    return {"op": "claim", "now": T0, "host": "ws1", "capability": capability, "lease": "L1", **kw}


@pytest.mark.parametrize("capability,field", POISON)
def test_a_claim_with_a_poisoned_capability_is_refused_naming_the_field(capability, field):
    with pytest.raises(errors.BadRequest) as err:
        commands.validate(claim_cmd(capability))
    assert f"'{field}'" in str(err.value)


def test_validate_normalises_the_capability_and_fills_defaults():
    out = commands.validate({"op": "heartbeat", "now": T0, "job_id": "a" * 64, "host": "ws1",
                             "client_id": "c" * 16, "serial": 3})
    assert out == {"op": "heartbeat", "now": T0, "job_id": "a" * 64, "host": "ws1", "lease": None,
                   "progress": None, "log_tail": None, "client_id": "c" * 16, "serial": 3}
    cap = commands.validate(claim_cmd({"gpus": [{"index": 0, "name": "x", "vram_gib": 8}]}))["capability"]
    assert cap["cuda"] is True and cap["vram_gib"] == 8.0 and cap["slots"] == 1


def test_a_replicated_claim_carries_lease_from_index_instead_of_a_lease():
    out = commands.validate({"op": "claim", "now": T0, "host": "ws1", "capability": {}, "lease": None,
                             "lease_from_index": True})
    assert out["lease"] is None and out["lease_from_index"] is True
    with pytest.raises(errors.BadRequest, match="'lease'"):
        commands.validate({"op": "claim", "now": T0, "host": "ws1", "capability": {}, "lease": None})


@pytest.mark.parametrize("progress,words", [
    ({"loss": math.inf}, "'progress.loss' must be a finite number"),
    ({"a": {"b": {"c": {"d": {"e": {"f": {"g": {"h": 1}}}}}}}}, "nested more than 8"),
    ({"history": list(range(5000))}, "more than 2048 values"),
    ({"text": "x" * 70_000}, "over the 65536 allowed"),
])
def test_progress_is_bounded_in_depth_size_and_numbers(progress, words):
    with pytest.raises(errors.BadRequest, match=words):
        commands.validate({"op": "heartbeat", "now": T0, "job_id": "a" * 64, "host": "ws1", "progress": progress})


def synced_store(tmp_path, n_jobs: int = 3) -> JobStore:
    tmp_path.mkdir(parents=True, exist_ok=True)
    store = JobStore(tmp_path / "queue.sqlite3")
    store.execute({"op": "sync_manifest", "now": T0, "manifest": parse(manifest_toml(n_jobs), "m.toml").to_json()})
    return store


def test_a_poisoned_command_in_a_batch_fails_alone_and_the_rest_commits(tmp_path):
    store = synced_store(tmp_path)
    results = store.execute_batch([
        claim_cmd({}),
        claim_cmd({"ram_gib": 1e999}, host="ws2", lease="L2"),
        claim_cmd({"gpus": [{"vram_gib": "x"}]}, host="ws3", lease="L3"),
        {"op": "register_worker", "now": T0, "host": "ws4", "capability": {"cores": 2}},
    ])
    assert results[0]["job"] is not None
    assert isinstance(results[1], errors.BadRequest) and isinstance(results[2], errors.BadRequest)
    assert results[3]["ok"] is True
    assert store.counts()["claimed"] == 1
    assert {w["host"] for w in store.workers(T0)} == {"ws1", "ws4"}


def test_a_command_that_raises_while_applied_fails_alone_with_the_same_error_each_time(tmp_path, caplog):
    """A fault past validation (here: a manifest whose job is a string) is ApplyFailed for its slot,
    logged with a traceback; the batch's other commands commit and the store is left as it was."""
    stores = [synced_store(tmp_path / name) for name in "ab"]
    batch = [{"op": "sync_manifest", "now": T0, "manifest": {"jobs": ["x"]}}, claim_cmd({})]
    answers = [s.execute_batch(batch) for s in stores]
    for results in answers:
        assert isinstance(results[0], errors.ApplyFailed)
        assert results[1]["job"] is not None
    assert str(answers[0][0]) == str(answers[1][0])
    assert stores[0].apply_failures() == [{"index": None, "op": "sync_manifest", "error": answers[0][0].detail}]
    assert "could not be applied" in caplog.text and "Traceback" in caplog.text
    assert stores[0].counts() == {**stores[0].counts(), "claimed": 1, "pending": 2}


def test_one_bad_command_in_a_single_coordinator_s_batch_fails_alone(tmp_path):
    """The group-commit writer applies what is queued in one transaction: a poisoned claim among good
    commands must not fail the other callers' claims."""
    store = synced_store(tmp_path)
    writer = GroupCommitWriter(store)
    futures = [writer.submit(claim_cmd({}, host=f"ws{i}", lease=f"L{i}")) for i in range(2)]
    futures.insert(1, writer.submit(claim_cmd({"ram_gib": 1e999}, host="bad", lease="Lx")))
    writer.start()
    try:
        assert futures[0].result(10)["job"] is not None
        assert isinstance(futures[1].exception(10), errors.BadRequest)
        assert futures[2].result(10)["job"] is not None
        assert writer.execute(claim_cmd({}, host="ws9", lease="L9"))["job"] is not None
    finally:
        writer.stop()
        store.close()


def test_a_poisoned_claim_to_a_single_coordinator_is_a_400_naming_the_field(live_server):
    url = live_server(manifest_toml(3)).url
    for text, words in ((b'{"capability": {"ram_gib": 1e999}}', "1e999"),  # refused as early as the JSON parse
                        (b'{"capability": {"gpus": [{"vram_gib": "x"}]}}', "'capability.gpus[0].vram_gib'")):
        status, _, body = http_call(url, "POST", "/v1/job/claim", text,
                                    headers={"x-lab-host": "w1", "content-type": "application/json"})
        assert status == 400 and words in body["detail"], body
    status, _, body = http_call(url, "POST", "/v1/job/claim", {"capability": {}}, headers={"x-lab-host": "w1"})
    assert status == 200 and body["job"] is not None


def test_a_poisoned_claim_through_a_follower_is_a_400_and_the_group_keeps_committing(group):  # noqa: F811
    g = three(group)
    f = g.follower()
    for text, field in ((b'{"capability": {"gpus": [{"vram_gib": "x"}]}}', "capability.gpus[0].vram_gib"),
                        (b'{"capability": {"ram_gib": 1e999}}', "1e999")):
        status, _, body = http_call(g.urls[f], "POST", "/v1/job/claim", text,
                                    headers={**W1, "content-type": "application/json"})
        assert status == 400 and field in body["detail"], body
    status, _, body = http_call(g.urls[f], "POST", "/v1/job/claim", {"capability": {}}, headers=W1)
    assert status == 200 and body["job"] is not None
    assert g.converged()["claimed"] == 1
    assert all(c.writer.alive for c in g.coords.values())


def test_a_poisoned_entry_is_refused_before_it_reaches_the_log(group):  # noqa: F811
    """Even proposed straight to the Raft driver, an entry with a non-finite number never enters the log:
    no follower could parse it, and the group would stall on it."""
    g = three(group)
    poison = {"op": "claim", "now": time.time(), "host": "w1", "capability": {"ram_gib": math.inf},
              "lease": None, "lease_from_index": True}
    with pytest.raises(errors.BadRequest, match="ram_gib"):
        g.coords[g.leader()].replicator.execute(poison)


def test_an_entry_that_fails_to_apply_fails_alike_on_every_replica_and_a_restarted_peer_carries_on(group):  # noqa: F811
    """An entry that passes validation yet raises when applied (a manifest whose job is a string) is the same
    ApplyFailed on every replica: no driver dies, a peer that was down applies it when it comes back, and the
    group keeps committing."""
    g = three(group)
    leader = g.leader()
    away = next(n for n in g.coords if n != leader)
    g.stop(away)
    with pytest.raises(errors.ApplyFailed, match="AttributeError"):
        g.coords[leader].execute({"op": "sync_manifest", "manifest": {"jobs": ["x"]}})
    back = g.start(away)
    status, _, body = http_call(g.urls[leader], "POST", "/v1/job/claim", {"capability": {}}, headers=W1)
    assert status == 200 and body["job"] is not None
    wait_for("every peer to apply the claim", lambda: g.converged()["claimed"] == 1, timeout=20)
    assert back.writer.alive and all(c.writer.alive for c in g.coords.values())
    recorded = [c.store.apply_failures() for c in g.coords.values()]
    assert recorded[0] == recorded[1] == recorded[2] and len(recorded[0]) == 1, recorded
    assert recorded[0][0]["op"] == "sync_manifest" and recorded[0][0]["index"] > 0
    assert back.health()["apply_failures"] == 1
