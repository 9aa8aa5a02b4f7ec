"""GET /metrics: parsed by prometheus_client's own parser and checked against the queue it describes."""

from __future__ import annotations

import hashlib
import math

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import OPERATOR_TOKEN, manifest_toml

from cis490fleet import metrics, model

CAP = {"cores": 4, "ram_gib": 16, "cuda": False, "gpus": [], "slots": 2}


def parse(text: str) -> dict:
    """family name -> (type, {(sample name, sorted label items): value})."""
    out = {}
    for family in text_string_to_metric_families(text):
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for s in family.samples}
        out[family.name] = (family.type, samples)
    return out


def value(families: dict, family: str, sample: str | None = None, **labels) -> float:
    _, samples = families[family]
    return samples[(sample or family, tuple(sorted(labels.items())))]


def scrape(srv) -> tuple[dict, str]:
    status, headers, body = srv.call("GET", "/metrics")
    assert status == 200, body
    assert headers["content-type"].startswith("text/plain; version=0.0.4")
    text = body.decode()
    return parse(text), text


def claim(srv, host: str) -> dict:
    status, _, body = srv.call("POST", "/v1/job/claim", {"capability": CAP}, {"x-lab-host": host})
    assert status == 200, body
    return body


@pytest.fixture
def srv(live_server):
    return live_server(manifest_toml(8))


def test_an_idle_coordinator_exposes_every_family(srv):
    families, text = scrape(srv)
    for status in model.STATUSES:
        assert value(families, "cis490fleet_jobs", status=status) == (8 if status == "pending" else 0)
    assert families["cis490fleet_jobs"][0] == "gauge"
    assert value(families, "cis490fleet_workers_live") == 0
    for name in ("claims", "completions", "failures", "stale_recoveries"):
        assert families[f"cis490fleet_{name}"][0] == "counter"
        assert value(families, f"cis490fleet_{name}", f"cis490fleet_{name}_total") == 0
    assert families["cis490fleet_request_duration_seconds"][0] == "histogram"
    assert families["cis490fleet_claim_duration_seconds"][0] == "histogram"
    assert value(families, "cis490fleet_artifact_bytes") == 0
    assert value(families, "cis490fleet_peer_role", peer="test-node", role="leader") == 1
    assert value(families, "cis490fleet_peer_role", peer="test-node", role="follower") == 0
    assert value(families, "cis490fleet_peer_term", peer="test-node") == 1
    for line in text.splitlines():
        if line.startswith("cis490fleet_"):
            name = line.split("{")[0].split(" ")[0]
            base = name.removesuffix("_total").removesuffix("_bucket").removesuffix("_sum").removesuffix("_count")
            assert f"# TYPE {name} " in text or f"# TYPE {base} " in text or f"# TYPE {base}_total " in text, line
            assert f"# HELP {name} " in text or f"# HELP {base} " in text or f"# HELP {base}_total " in text, line


def test_values_follow_the_queue(srv):
    held = {host: claim(srv, host) for host in ("ws1", "ws2", "ws3")}
    claim(srv, "ws1")  # ws1 holds two now
    # ws2 fails its attempt: a failure counted, the job back to pending for a retry.
    job2 = held["ws2"]
    status, _, body = srv.call("POST", f"/v1/job/{job2['job_id']}/fail", {"error": "CUDA out of memory",
                                                                         "class": "signal"},
                               {"x-lab-host": "ws2", "x-lease": job2["lease"]})
    assert status == 200, body
    # ws3 uploads a bundle and completes.
    job3 = held["ws3"]
    bundle = b"\0" * 1000 + b"model"
    sha = hashlib.sha256(bundle).hexdigest()
    status, _, body = srv.call("PUT", f"/v1/model/{job3['job_id']}", bundle,
                               {"x-lab-host": "ws3", "x-lease": job3["lease"], "x-content-sha256": sha})
    assert status == 201, body
    status, _, body = srv.call("POST", f"/v1/job/{job3['job_id']}/complete", {"artifact_id": sha},
                               {"x-lab-host": "ws3", "x-lease": job3["lease"]})
    assert status == 200, body
    # An operator cancels one pending job.
    _, _, listing = srv.call("GET", "/v1/jobs?status=pending&limit=1")
    status, _, body = srv.call("POST", f"/v1/job/{listing['jobs'][0]['id']}/cancel", None,
                               {"x-operator-token": OPERATOR_TOKEN})
    assert status == 200, body

    families, _ = scrape(srv)
    _, _, health = srv.call("GET", "/v1/health")
    for status_name, n in health["jobs"].items():
        assert value(families, "cis490fleet_jobs", status=status_name) == n
    assert sum(value(families, "cis490fleet_jobs", status=s) for s in model.STATUSES) == 8
    assert value(families, "cis490fleet_jobs", status="completed") == 1
    assert value(families, "cis490fleet_jobs", status="cancelled") == 1
    assert value(families, "cis490fleet_jobs", status="claimed") == 2  # ws1's two
    assert value(families, "cis490fleet_workers_live") == 3
    assert value(families, "cis490fleet_jobs_held", host="ws1") == 2
    assert value(families, "cis490fleet_jobs_held", host="ws3") == 0
    assert value(families, "cis490fleet_claims", "cis490fleet_claims_total") == 4
    assert value(families, "cis490fleet_completions", "cis490fleet_completions_total") == 1
    assert value(families, "cis490fleet_failures", "cis490fleet_failures_total") == 1
    assert value(families, "cis490fleet_artifact_bytes") == len(bundle)
    assert claims_applied(families) == 4
    assert value(families, "cis490fleet_claim_duration_seconds", "cis490fleet_claim_duration_seconds_count") == 4
    assert value(families, "cis490fleet_claim_duration_seconds", "cis490fleet_claim_duration_seconds_bucket",
                 le="+Inf") == 4


def claims_applied(families: dict) -> float:
    return (value(families, "cis490fleet_claims", "cis490fleet_claims_total")
            + value(families, "cis490fleet_empty_claims", "cis490fleet_empty_claims_total"))


def test_every_applied_claim_is_timed_empty_ones_too_without_their_long_poll(srv):
    for i in range(8):
        claim(srv, f"w{i}")
    assert claim(srv, "late")["job"] is None
    status, _, body = srv.call("POST", "/v1/job/claim", {"capability": CAP, "wait": 1.5}, {"x-lab-host": "waiter"})
    assert status == 200 and body["job"] is None
    families, _ = scrape(srv)
    assert value(families, "cis490fleet_empty_claims", "cis490fleet_empty_claims_total") >= 2
    timed = value(families, "cis490fleet_claim_duration_seconds", "cis490fleet_claim_duration_seconds_count")
    assert timed == claims_applied(families)
    # Each claim's own time: the 1.5 s the waiting one was held for is in none of them.
    assert value(families, "cis490fleet_claim_duration_seconds", "cis490fleet_claim_duration_seconds_sum") < 1.5


def test_without_the_coordinators_own_timing_claim_answers_are_timed_by_outcome():
    h = metrics.Histogram(metrics.CLAIM_BUCKETS_S)
    h.observe(0.01, "job")
    h.observe(20.0, "empty")
    families = parse(metrics.render(health={"node_id": "n"}, workers=[], counters={}, artifact_bytes=None,
                                    claim_latency=h.snapshot()))
    assert value(families, "cis490fleet_claim_duration_seconds", "cis490fleet_claim_duration_seconds_count",
                 outcome="job") == 1
    assert value(families, "cis490fleet_claim_duration_seconds", "cis490fleet_claim_duration_seconds_count",
                 outcome="empty") == 1


def test_request_histogram_counts_requests_in_seconds(srv):
    for _ in range(5):
        srv.call("GET", "/v1/health")
    families, _ = scrape(srv)
    count = value(families, "cis490fleet_request_duration_seconds", "cis490fleet_request_duration_seconds_count")
    assert count >= 5
    _, samples = families["cis490fleet_request_duration_seconds"]
    buckets = sorted((float(dict(labels)["le"]), v) for (name, labels), v in samples.items()
                     if name.endswith("_bucket"))
    assert buckets[-1] == (math.inf, count)
    assert [v for _, v in buckets] == sorted(v for _, v in buckets)  # cumulative
    assert buckets[0][0] == 0.001  # milliseconds became seconds


# -- render on its own: peers of a Raft group, escaping ----------------------------------------------


def test_peers_of_a_group_each_get_role_term_and_commit_index():
    health = {"node_id": "a", "role": "follower", "leader": "b", "term": 7, "commit_index": 41, "version": "1",
              "jobs": {"pending": 2},
              "peers": [{"id": "a", "url": "https://a"}, {"id": "b", "url": "https://b", "term": 7, "commit_index": 42},
                        {"id": "c", "url": "https://c", "role": "candidate", "term": 8}]}
    families = parse(metrics.render(health=health, workers=[], counters={}, artifact_bytes=None))
    assert value(families, "cis490fleet_peer_role", peer="a", role="follower") == 1
    assert value(families, "cis490fleet_peer_role", peer="b", role="leader") == 1
    assert value(families, "cis490fleet_peer_role", peer="c", role="candidate") == 1
    assert value(families, "cis490fleet_peer_role", peer="c", role="leader") == 0
    assert value(families, "cis490fleet_peer_term", peer="a") == 7
    assert value(families, "cis490fleet_peer_term", peer="c") == 8
    assert value(families, "cis490fleet_peer_commit_index", peer="a") == 41
    assert value(families, "cis490fleet_peer_commit_index", peer="b") == 42
    assert ("cis490fleet_peer_commit_index", (("peer", "c"),)) not in families["cis490fleet_peer_commit_index"][1]
    assert value(families, "cis490fleet_jobs", status="failed") == 0
    assert "cis490fleet_artifact_bytes" not in families


def test_label_values_are_escaped():
    workers = [{"host": 'od"d\\host\n', "live": True, "running": ["x"]}]
    text = metrics.render(health={"node_id": "n"}, workers=workers, counters={}, artifact_bytes=0)
    families = parse(text)
    assert value(families, "cis490fleet_jobs_held", host='od"d\\host\n') == 1


def test_histogram_snapshot_is_cumulative():
    h = metrics.Histogram((0.1, 1.0))
    for s in (0.05, 0.5, 0.7, 5.0):
        h.observe(s, "job")
    snap = h.snapshot()["job"]
    assert snap["buckets"] == [(0.1, 1), (1.0, 3), (math.inf, 4)]
    assert snap["count"] == 4 and snap["sum"] == pytest.approx(6.25)
    assert h.series("job") == snap
    assert h.series() == {"buckets": [(0.1, 0), (1.0, 0), (math.inf, 0)], "sum": 0.0, "count": 0}
