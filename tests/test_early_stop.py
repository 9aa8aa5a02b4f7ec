"""Early stopping for sweeps: which jobs stop, checked against a hand-computed expectation."""

from __future__ import annotations

import pytest

from cis490fleet import stop_rules
from cis490fleet.errors import InvalidTransition
from cis490fleet.model import HostSpec, JobSpec
from test_jobstore import T0, claim, store, sync  # noqa: F401 (store is a fixture)


def sweep_jobs(stop: dict) -> list[JobSpec]:
    return [JobSpec(model="mlp", mode="sweep", seed=i, name=f"lr-{i}", sweep="lr", stop=stop_rules.normalise(stop))
            for i in range(4)]


def start(store, stop: dict) -> dict[str, str]:
    """Sync the sweep and claim its four jobs as A, B, C, D (one lease each)."""
    sync(store, *sweep_jobs(stop), hosts=(HostSpec(id="ws1", slots=4),))
    return {label: claim(store, lease=f"L-{label}")["job_id"] for label in "ABCD"}


def report(store, ids, label, epoch, value, now=T0):
    return store.execute({"op": "heartbeat", "now": now + epoch, "job_id": ids[label], "host": "ws1",
                          "lease": f"L-{label}", "progress": {"epoch": epoch, "metrics": {"val_loss": value}}})


def statuses(store, ids) -> dict[str, str]:
    return {label: store.job(job_id, T0)["status"] for label, job_id in ids.items()}


def test_the_median_rule_stops_the_jobs_worse_than_the_median_of_the_others(store):
    ids = start(store, {"metric": "val_loss", "rule": "median", "min_epochs": 2})
    for label, value in zip("ABCD", (1.0, 1.2, 0.9, 1.5)):  # epoch 1 < min_epochs: nobody stops
        assert report(store, ids, label, 1, value)["cancel"] is False
    assert report(store, ids, "A", 2, 0.8)["cancel"] is False   # no other job at epoch 2 yet
    assert report(store, ids, "B", 2, 0.7)["cancel"] is False   # one other: too few to judge
    answer = report(store, ids, "C", 2, 0.85)                    # others 0.8, 0.7: median 0.75
    assert answer["cancel"] is True
    assert answer["stopped"].startswith("stopped early: val_loss 0.85 at epoch 2 is worse than the median 0.75")
    assert report(store, ids, "D", 2, 1.1)["cancel"] is True    # others 0.8, 0.7, 0.85: median 0.8
    assert report(store, ids, "A", 3, 0.6)["cancel"] is False
    assert report(store, ids, "B", 3, 0.65)["cancel"] is False  # one other at epoch 3
    assert statuses(store, ids) == {"A": "running", "B": "running", "C": "stopped", "D": "stopped"}
    assert report(store, ids, "C", 3, 0.1)["cancel"] is True    # its holder keeps hearing it must stop
    job = store.job(ids["C"], T0)
    assert job["attempts"][-1]["outcome"] == "stopped" and "median 0.75" in job["last_error"]


def test_asha_keeps_the_best_fraction_at_each_rung(store):
    ids = start(store, {"metric": "val_loss", "rule": "asha", "min_epochs": 1, "reduction_factor": 2})
    assert report(store, ids, "A", 1, 0.5)["cancel"] is False   # alone at rung 1: promoted
    assert report(store, ids, "B", 1, 0.6)["cancel"] is True    # best 1 of 2 is 0.5
    assert report(store, ids, "C", 1, 0.4)["cancel"] is False   # best 1 of 3 is 0.4: itself
    assert report(store, ids, "D", 1, 0.45)["cancel"] is False  # best 2 of 4: 0.4, 0.45
    assert report(store, ids, "A", 2, 0.3)["cancel"] is False   # alone at rung 2
    assert report(store, ids, "C", 2, 0.35)["cancel"] is True   # best 1 of 2 is 0.3
    assert report(store, ids, "D", 3, 0.9)["cancel"] is False   # epoch 3 is not a rung
    assert statuses(store, ids) == {"A": "running", "B": "stopped", "C": "stopped", "D": "running"}


def test_a_stopped_job_is_final_until_requeued_and_then_claimable_again(store):
    ids = start(store, {"metric": "val_loss", "min_epochs": 1})
    for label, value in zip("ABC", (0.1, 0.2, 0.9)):
        report(store, ids, label, 1, value)
    assert statuses(store, ids)["C"] == "stopped"
    with pytest.raises(InvalidTransition):
        store.execute({"op": "cancel", "now": T0 + 5, "job_id": ids["C"]})
    store.execute({"op": "requeue", "now": T0 + 5, "job_id": ids["C"]})
    assert store.job(ids["C"], T0 + 5)["status"] == "pending"
    assert claim(store, lease="L-again", now=T0 + 6)["job_id"] == ids["C"]


def test_rungs_and_the_rule_alone():
    assert [e for e in range(1, 20) if stop_rules.is_rung(e, 1, 3)] == [1, 3, 9]
    assert [e for e in range(1, 40) if stop_rules.is_rung(e, 2, 2)] == [2, 4, 8, 16, 32]
    rule = {"metric": "val_accuracy", "mode": "max", "rule": "median"}
    assert stop_rules.verdict(rule, 3, 0.7, [0.8, 0.9]) is not None  # higher is better here
    assert stop_rules.verdict(rule, 3, 0.95, [0.8, 0.9]) is None


def test_stop_rules_are_checked_in_the_manifest_with_every_problem_named():
    from cis490fleet import manifest
    from cis490fleet.errors import ManifestError

    text = ('[[sweeps]]\nmodel = "mlp"\nmode = "s"\nseed = [1, 2]\n'
            'stop = { rule = "meadian", mode = "low", min_epochs = 0 }\n'
            '[[jobs]]\nmodel = "mlp"\nmode = "x"\nstop = { metric = "val_loss" }\n')
    with pytest.raises(ManifestError) as err:
        manifest.parse(text, "m.toml")
    problems = "\n".join(err.value.problems)
    assert "sweeps[0] (model=mlp).stop: missing required key 'metric'" in problems
    assert "jobs[0] (model=mlp).stop: early stopping compares the jobs of one sweep" in problems
    assert "stop.rule: unknown rule \"meadian\"; did you mean 'median'?" in problems
    assert "stop.mode: unknown mode \"low\"; expected one of: min, max" in problems
    assert "stop.min_epochs" in problems
    ok = manifest.parse(text.replace('rule = "meadian", mode = "low", min_epochs = 0',
                                     'metric = "val_acc", mode = "max", rule = "asha"').split("[[jobs]]")[0], "m.toml")
    assert ok.jobs[0].stop == {"metric": "val_acc", "mode": "max", "rule": "asha", "min_epochs": 1,
                               "reduction_factor": 3}
