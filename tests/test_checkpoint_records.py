"""Checkpoint records in the queue (checkpoint_records.py through jobstore.JobStore), on real SQLite files."""

from __future__ import annotations

import pytest

from cis490fleet.errors import BadRequest, InvalidTransition, StaleLease
from test_jobstore import CPU, T0, claim, finish, seeds, store, sync  # noqa: F401  (store is a fixture)

A, B, C = "a" * 64, "b" * 64, "c" * 64


def record(store, job_id, sha, *, host="ws1", lease="L1", now=T0, epoch=1, size=100):
    return store.execute({"op": "record_checkpoint", "now": now, "job_id": job_id, "host": host, "lease": lease,
                          "sha256": sha, "epoch": epoch, "size": size, "model": "mlp", "mode": "train"})


def stale(store, now):
    return store.execute({"op": "sweep_stale", "now": now})


def test_the_next_attempt_is_told_the_newest_checkpoint_of_the_job(store):
    sync(store, *seeds(1), stale_after_s=60)
    first = claim(store, "ws1", "L1")
    assert first["resume"] is None
    job_id = first["job_id"]
    assert record(store, job_id, A, epoch=1)["unreferenced_checkpoints"] == []
    # A newer checkpoint of the same attempt replaces the older one, whose file nothing refers to now.
    assert record(store, job_id, B, epoch=2, now=T0 + 5)["unreferenced_checkpoints"] == [A]
    assert stale(store, T0 + 100)["recovered"] == 1
    second = claim(store, "ws2", "L2", now=T0 + 101)
    assert second["job_id"] == job_id and second["attempt"] == 2
    assert second["resume"] == {"attempt": 1, "sha256": B, "epoch": 2, "size": 100, "host": "ws1",
                                "created": T0 + 5}
    shown = store.job(job_id, T0 + 102)["checkpoints"]
    assert [(c["attempt"], c["sha256"], c["epoch"]) for c in shown] == [(1, B, 2)]


def test_only_the_holder_records_a_checkpoint_and_a_cancelled_holder_still_may(store):
    sync(store, *seeds(1))
    job_id = claim(store)["job_id"]
    with pytest.raises(StaleLease):
        record(store, job_id, A, lease="other")
    with pytest.raises(StaleLease):
        record(store, job_id, A, host="ws2")
    store.execute({"op": "cancel", "now": T0 + 1, "job_id": job_id})
    record(store, job_id, A, now=T0 + 2)  # what the trainer saved when the cancel stopped it
    store.execute({"op": "requeue", "now": T0 + 3, "job_id": job_id})
    again = claim(store, "ws2", "L2", now=T0 + 4)
    assert again["resume"]["sha256"] == A
    with pytest.raises(StaleLease):
        record(store, job_id, B, now=T0 + 5)  # the old holder lost the job with the requeue


def test_a_completed_job_keeps_only_its_last_checkpoint(store):
    sync(store, *seeds(2), stale_after_s=60)
    job_id = claim(store, "ws1", "L1")["job_id"]
    record(store, job_id, A, epoch=3)
    stale(store, T0 + 100)
    assert claim(store, "ws2", "L2", now=T0 + 101)["job_id"] == job_id
    record(store, job_id, B, host="ws2", lease="L2", now=T0 + 102, epoch=5)
    other = claim(store, "ws3", "L3", now=T0 + 103)["job_id"]
    record(store, other, A, host="ws3", lease="L3", now=T0 + 104)  # the same bytes, another job's checkpoint
    done = finish(store, job_id, host="ws2", lease="L2", now=T0 + 110)
    assert "unreferenced_checkpoints" not in done  # A is still another job's
    assert [c["sha256"] for c in store.job(job_id, T0 + 111)["checkpoints"]] == [B]
    with pytest.raises(InvalidTransition):
        record(store, job_id, C, host="ws2", lease="L2", now=T0 + 112)


def test_pruning_answers_the_files_nothing_refers_to(store):
    sync(store, *seeds(1), stale_after_s=60)
    job_id = claim(store, "ws1", "L1")["job_id"]
    record(store, job_id, A)
    stale(store, T0 + 100)
    claim(store, "ws2", "L2", now=T0 + 101)
    record(store, job_id, B, host="ws2", lease="L2", now=T0 + 102)
    assert finish(store, job_id, host="ws2", lease="L2", now=T0 + 110)["unreferenced_checkpoints"] == [A]
    assert store.checkpoint_records() == [{"job_id": job_id, "sha256": B, "model": "mlp", "mode": "train",
                                           "host": "ws2", "created": T0 + 102}]


@pytest.mark.parametrize("field,value,message", [
    ("sha256", "xyz", "'sha256' must be a sha256"),
    ("epoch", -1, "'epoch' must be a whole number of epochs >= 0"),
    ("epoch", True, "'epoch' must be a whole number of epochs >= 0"),
    ("size", 1.5, "'size' must be a whole number of bytes"),
])
def test_a_bad_record_checkpoint_names_the_field(store, field, value, message):
    sync(store, *seeds(1))
    job_id = claim(store)["job_id"]
    cmd = {"op": "record_checkpoint", "now": T0, "job_id": job_id, "host": "ws1", "lease": "L1", "sha256": A,
           "epoch": 1, "size": 1, "model": "mlp", "mode": "train", field: value}
    with pytest.raises(BadRequest, match=message):
        store.execute(cmd)
    assert store.job(job_id, T0)["checkpoints"] == []


def test_a_claim_says_how_often_to_upload_checkpoints_the_job_s_setting_over_the_fleet_s(store):
    from cis490fleet import manifest

    text = """
        [fleet]
        checkpoint_every_s = 30
        [[jobs]]
        model = "mlp"
        mode = "own"
        checkpoint_every_s = 0
        [[jobs]]
        model = "mlp"
        mode = "fleet"
    """
    parsed = manifest.parse(text, "m.toml")
    store.execute({"op": "sync_manifest", "now": T0, "manifest": parsed.to_json()})
    first, second = claim(store, "ws1", "L1"), claim(store, "ws2", "L2")
    assert {first["job"]["mode"]: first["checkpoint_every_s"],
            second["job"]["mode"]: second["checkpoint_every_s"]} == {"own": 0, "fleet": 30}


@pytest.mark.parametrize("where,value", [("fleet", -1), ("jobs", "often")])
def test_a_bad_checkpoint_every_s_is_named_with_its_place(where, value):
    from cis490fleet import manifest
    from cis490fleet.errors import ManifestError

    job = '[[jobs]]\nmodel = "mlp"\nmode = "m"\n'
    setting = f"checkpoint_every_s = {value!r}".replace("'", '"')
    text = f"[fleet]\n{setting}\n{job}" if where == "fleet" else f"{job}{setting}\n"
    with pytest.raises(ManifestError) as caught:
        manifest.parse(text, "m.toml")
    assert any(".checkpoint_every_s: expected a number >= 0" in p for p in caught.value.problems), caught.value


def test_a_self_fenced_holder_back_after_the_stale_sweep_still_hands_in_its_checkpoint(store):
    sync(store, *seeds(1), stale_after_s=60)
    job_id = claim(store, "ws1", "L1")["job_id"]
    record(store, job_id, A, epoch=3)
    stale(store, T0 + 100)  # ws1 stopped its trainer on its own and was cut off: the job is pending again
    late = record(store, job_id, B, epoch=5, now=T0 + 101)
    assert late["attempt"] == 1 and late["unreferenced_checkpoints"] == [A]
    with pytest.raises(StaleLease):
        record(store, job_id, C, lease="L-other", now=T0 + 102)
    with pytest.raises(StaleLease):
        record(store, job_id, C, host="ws2", now=T0 + 102)
    again = claim(store, "ws2", "L2", now=T0 + 103)
    assert again["resume"]["sha256"] == B and again["resume"]["epoch"] == 5
    with pytest.raises(StaleLease):  # once another host holds the job, the old lease proves nothing
        record(store, job_id, C, now=T0 + 104)
