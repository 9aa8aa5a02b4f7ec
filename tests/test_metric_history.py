"""Metric history: every progress report's numbers kept per attempt by the coordinator, bounded, served for curves."""

from __future__ import annotations

from cis490fleet import metric_history
from cis490fleet.model import HostSpec
from test_jobstore import CPU, T0, claim, finish, seeds, store, sync  # noqa: F401 (store is a fixture)
from test_worker import cpu_host  # noqa: F401 (a fixture)


def beat(store, job_id, progress, now, lease="L1"):
    return store.execute({"op": "heartbeat", "now": now, "job_id": job_id, "host": "ws1", "lease": lease,
                          "progress": progress})


def test_each_new_report_is_a_point_of_its_attempt_and_repeats_add_nothing(store):
    sync(store, *seeds(1), hosts=(HostSpec(id="ws1"),))
    job_id = claim(store)["job_id"]
    for epoch in (1, 2, 2, 3):  # the second 2 is a heartbeat that brought no new progress
        beat(store, job_id, {"epoch": epoch, "epochs": 3, "loss": 1 / epoch, "metrics": {"val_loss": 2 / epoch}},
             T0 + epoch)
    beat(store, job_id, {"epoch": 3, "epochs": 3, "fraction": 1.0}, T0 + 4)  # no numbers worth a point
    finish(store, job_id)
    (attempt,) = store.metric_history(job_id)
    assert attempt["attempt"] == 1
    assert [(p["epoch"], p["metrics"]) for p in attempt["points"]] == [
        (1, {"loss": 1.0, "val_loss": 2.0}), (2, {"loss": 0.5, "val_loss": 1.0}),
        (3, {"loss": 1 / 3, "val_loss": 2 / 3})]
    assert [p["t"] for p in attempt["points"]] == [T0 + 1, T0 + 2, T0 + 3]


def test_a_new_attempt_starts_its_own_curve(store):
    sync(store, *seeds(1), hosts=(HostSpec(id="ws1"),), stale_after_s=60, heartbeat_s=10)
    job_id = claim(store)["job_id"]
    beat(store, job_id, {"epoch": 1, "loss": 0.9}, T0 + 1)
    store.execute({"op": "sweep_stale", "now": T0 + 1000})
    claim(store, lease="L2", now=T0 + 2000)
    beat(store, job_id, {"epoch": 1, "loss": 0.8}, T0 + 2001, lease="L2")
    assert [(a["attempt"], [p["metrics"]["loss"] for p in a["points"]]) for a in store.metric_history(job_id)] \
        == [(1, [0.9]), (2, [0.8])]


def test_a_long_run_is_downsampled_keeping_its_first_and_newest_points(store, monkeypatch):
    monkeypatch.setattr(metric_history, "MAX_POINTS", 10)
    sync(store, *seeds(1), hosts=(HostSpec(id="ws1"),))
    job_id = claim(store)["job_id"]
    for step in range(1, 101):
        beat(store, job_id, {"step": step, "loss": 1 / step}, T0 + step)
    points = store.metric_history(job_id)[0]["points"]
    steps = [p["step"] for p in points]
    assert len(points) <= 10
    assert steps[0] == 1 and steps[-1] == 100 and steps == sorted(steps)


def test_the_history_is_served_by_name_over_http(live_server):
    from conftest import manifest_toml

    server = live_server(manifest_toml(1, extra='[[hosts]]\nid = "ws1"\n'))
    coord = server.coordinator
    got = coord.claim("ws1", CPU)
    for epoch in (1, 2):
        coord.execute({"op": "heartbeat", "job_id": got["job_id"], "host": "ws1", "lease": got["lease"],
                       "progress": {"epoch": epoch, "metrics": {"val_loss": 1 / epoch}}})
    status, _, body = server.call("GET", f"/v1/job/{got['job_id'][:8]}/metrics")
    assert status == 200, body
    assert body["job_id"] == got["job_id"]
    assert [p["metrics"]["val_loss"] for p in body["attempts"][0]["points"]] == [1.0, 0.5]
    status, _, body = server.call("GET", "/v1/job/ffffffff/metrics")
    assert status == 404 and body["error"] == "not_found"


def test_a_finished_jobs_curve_ends_at_its_last_report(live_server, tmp_path, cpu_host):  # noqa: F811
    """The trainer's last progress line goes with complete: a fast job's curve has every epoch."""
    from cis490fleet import slots
    from test_worker import make_worker, only_job, trainer_manifest

    job_toml = '[[jobs]]\nmodel = "mlp"\nmode = "fast"\nhyper = { lr = 1e-2, epochs = 3, sleep = 0.4 }\n'
    server = live_server(trainer_manifest("metrics.py", job_toml, heartbeat_s=5, stale_after_s=60))
    w = make_worker(server.url, tmp_path)
    assert w.run_once() == slots.COMPLETED
    job = only_job(server)
    assert job["progress"]["epoch"] == 3 and job["progress"]["fraction"] == 1.0
    status, _, body = server.call("GET", f"/v1/job/{job['id']}/metrics")
    points = body["attempts"][-1]["points"]
    assert [p["epoch"] for p in points][-1] == 3 and points[-1]["metrics"]["val_loss"] == 1.0
